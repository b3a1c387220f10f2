"""``python -m durability_pipelines.services {urls,stop,env}``."""

from __future__ import annotations

import json
import sys

from durability_pipelines.services.embedded import durability_home, stop_embedded
from durability_pipelines.services.errors import (
    InvalidServiceURLError,
    ServiceRefusedError,
    ServiceUnavailableError,
)
from durability_pipelines.services.local_dynamodb import stop_local_dynamodb
from durability_pipelines.services.resolve import (
    dagster_environment,
    resolve_dagster_postgres_url,
    resolve_postgres_url,
    resolve_redis_url,
)
from durability_pipelines.services.urls import mask_url


def main(argv: list[str]) -> int:
    """``urls``: print masked URLs (starting embedded servers if needed); ``stop``: stop them;
    ``env``: :func:`dagster_environment` as JSON, **unmasked** (for ``dev.py setup``, not for logs)."""
    command = argv[0] if argv else "urls"
    if command == "env":
        try:
            print(json.dumps(dagster_environment()))
        except ServiceUnavailableError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        return 0
    if command == "urls":
        try:
            print(f"postgres {mask_url(resolve_postgres_url())}")
            print(f"redis    {mask_url(resolve_redis_url())}")
            print(f"dagster  {mask_url(resolve_dagster_postgres_url())}")
        except InvalidServiceURLError as exc:  # messages are masked; a traceback would add nothing
            print(f"error: {exc}", file=sys.stderr)
            return 2  # the CLI's exit codes: 2 bad input, 3 unavailable, 5 refused
        except (ServiceRefusedError, ServiceUnavailableError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 5 if isinstance(exc, ServiceRefusedError) else 3
        return 0
    if command == "stop":
        stopped = stop_embedded()
        if stop_local_dynamodb(durability_home()):  # the local DynamoDB `python3 dev.py setup` started
            stopped.append("dynamodb")
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    print("usage: python -m durability_pipelines.services {urls,stop,env}", file=sys.stderr)
    return 2
