"""Masking: nothing this CLI prints may leak a URL's password."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from durability_pipelines import services

ENV_SUPABASE_DB_URL = "DURABILITY_SUPABASE_DB_URL"
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+")
FLAG_POSTGRES_URL = "--postgres-url"
FLAG_REDIS_URL = "--redis-url"
FLAG_DB_URL = "--db-url"


def scrub(text: str, urls: Iterable[str | None] = ()) -> str:
    """Mask every URL and every known password in ``text``: nothing this CLI prints may leak one."""
    urls = [*urls, os.environ.get(services.ENV_POSTGRES_URL), os.environ.get(services.ENV_REDIS_URL),
            os.environ.get(ENV_SUPABASE_DB_URL)]
    text = _URL_RE.sub(lambda m: services.mask_url(m.group(0)), text)
    secrets: set[str] = set()
    for url in urls:
        secrets |= services.url_secrets(url)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
