"""One command's resolved URLs, open clients and output."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

from durability_pipelines import services
from durability_pipelines.checkpoints.base import (
    CheckpointStore,
    LeaseManager,
)
from durability_pipelines.checkpoints.factory import StoreConfig, open_store
from durability_pipelines.cli.secrets import FLAG_POSTGRES_URL, FLAG_REDIS_URL, scrub

if TYPE_CHECKING:
    from durability_pipelines.checkpoints.postgres_store import PostgresConnection
    from durability_pipelines.consumer.storage import ConsumerStorage


ENV_BACKEND = "DURABILITY_CHECKPOINT_BACKEND"
BACKENDS = ("redis", "postgres", "hybrid")


def default_who() -> str:
    """``$USER@hostname``: who an operator action is recorded as when ``--by`` is not given."""
    try:
        user = os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def psycopg_url(url: str) -> str:
    return services.libpq_url(url) if "://" in url else url


@dataclass(repr=False)  # the generated repr would show the URLs (and their passwords)
class Session:
    """Resolved URLs and open clients for one command; everything lazily, so a command needs only its servers."""

    args: argparse.Namespace
    out: TextIO
    err: TextIO
    _postgres_url: str | None = None
    _redis_url: str | None = None
    _store: CheckpointStore | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return str(self.args.backend)

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def postgres_url(self) -> str:
        if self._postgres_url is None:
            given = self.args.postgres_url
            if given:
                services.check_postgres(given, source=FLAG_POSTGRES_URL)
                url = given
            else:
                url = services.resolve_postgres_url()
            self._postgres_url = psycopg_url(url)
        return self._postgres_url

    def redis_url(self) -> str:
        if self._redis_url is None:
            given = self.args.redis_url
            try:
                if given:
                    services.check_redis(given, source=FLAG_REDIS_URL)
                    self._redis_url = given
                else:
                    self._redis_url = services.resolve_redis_url()
            except services.ServiceUnavailableError as exc:  # down; refused or malformed URLs pass as is
                if self.backend != "hybrid":
                    raise
                raise services.ServiceUnavailableError(
                    f"{exc} While Redis is down, `--backend postgres` reads and writes the Postgres side alone "
                    "(hybrid loads fall back to it); re-run hybrid commands when Redis is back."
                ) from None
        return self._redis_url

    def store(self) -> CheckpointStore:
        """The configured checkpoint store; the schema must exist (``migrate``), reads never create it."""
        if self._store is None:
            backend = self.backend
            self._store = open_store(
                StoreConfig(backend=backend),  # type: ignore[arg-type]
                redis_url=self.redis_url() if backend in ("redis", "hybrid") else None,
                postgres_url=self.postgres_url() if backend in ("postgres", "hybrid") else None,
                migrate_schema=False,
            )
        return self._store

    def substores(self) -> list[tuple[str, CheckpointStore]]:
        """The backing stores by name: hybrid has two, the others one."""
        return self.store().parts()

    def lease_managers(self) -> list[tuple[str, LeaseManager]]:
        """Each store's own lease view (hybrid mirrors Postgres leases to Redis; both fence writes)."""
        return [(name, sub.leases) for name, sub in self.substores()]

    def postgres_connection(self) -> PostgresConnection:
        from durability_pipelines.checkpoints.postgres_store import PostgresConnection

        db = PostgresConnection(self.postgres_url())
        self._closers.append(db.close)
        return db

    def consumer_storage(self) -> ConsumerStorage:
        from durability_pipelines.consumer.storage import ConsumerStorage

        return ConsumerStorage(self.postgres_connection())

    def __repr__(self) -> str:
        masked = {name: services.mask_url(url) if url else None
                  for name, url in (("postgres", self._postgres_url), ("redis", self._redis_url))}
        return (f"Session(backend={self.backend!r}, postgres={masked['postgres']!r}, "
                f"redis={masked['redis']!r})")

    def close(self) -> None:
        for closer in reversed(self._closers):
            closer()
        if self._store is not None:
            for _, sub in self.substores():
                client = getattr(sub, "client", None)
                if client is not None:
                    client.close()
            self._store.close()

    # -- output ------------------------------------------------------------------------
    def print(self, text: str = "") -> None:
        print(text, file=self.out)

    def warn(self, text: str) -> None:
        print(f"warning: {scrub(text, self.urls())}", file=self.err)

    def urls(self) -> list[str | None]:
        return [self.args.postgres_url, self.args.redis_url, self._postgres_url, self._redis_url]

    def emit(self, data: Any, text: str | Callable[[], str]) -> None:
        """Print ``data`` as JSON with ``--json``, else the human text."""
        if self.json:
            self.print(json.dumps(data, indent=2, default=_json_default, sort_keys=False))
        else:
            self.print(text() if callable(text) else text)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    return str(value)


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns; ``-`` for empty cells."""
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)
