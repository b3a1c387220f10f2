"""boto3 clients, made once per process for each service, region, endpoint and set of credentials.

Why: making a client reads botocore's JSON models and endpoint rules (~0.1 CPU-s each, a new session each
time), and a sensor that built its source every tick spent 80 % of the tick there: 50 consumers' sensors
in one code server then ticked every ~65 s instead of every 5 s. Clients are thread-safe and keep a
connection pool; credentials that refresh (an IAM role, SSO) are refreshed by the client itself. A change
of the credentials in the environment (or of the profile) makes a new client, so a process that switches
them is never answered with the old ones.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import boto3
from botocore.config import Config

#: The environment variables that choose the credentials (their values are hashed into the cache key).
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")

_lock = threading.Lock()
_clients: dict[tuple[str, ...], Any] = {}


def _credentials_identity() -> str:
    values = "\0".join(os.environ.get(name, "") for name in _CREDENTIAL_ENV)
    return hashlib.sha256(values.encode()).hexdigest()[:16]


def aws_client(service: str, region: str | None, endpoint_url: str | None, config: Config, config_name: str) -> Any:
    """The process's ``service`` client for ``region`` and ``endpoint_url`` (None: AWS), made with ``config``
    the first time (``config_name`` names it in the cache key: a ``Config`` is not hashable)."""
    key = (service, region or "", endpoint_url or "", config_name, _credentials_identity())
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = boto3.session.Session(region_name=region or None).client(
                service, endpoint_url=endpoint_url, config=config)
            _clients[key] = client
        return client
