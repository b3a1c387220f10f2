"""``durability-pipelines``: the operator's command line for checkpoints, leases and dead letters.

Every command talks to the same Redis / Postgres the workers use (resolved by
``durability_pipelines.services``), prints errors with masked URLs to stderr
and exits non-zero, so it is safe to paste its output into a ticket and to
use it from scripts.  See ``docs/cli.md`` for the recipes it serves.

Exit codes: 0 ok, 1 refused (would move a checkpoint backwards, live lease,
disallowed transition), 2 bad input (including a malformed server URL) or
feature not available, 3 server or schema unavailable, 4 not found, 5 the
server answered but refused the credentials (or has no such database),
130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from durability_pipelines import services
from durability_pipelines.checkpoints.base import (
    CheckpointStore,
    ForceSetResult,
    HistoryEntry,
    Lease,
    LeaseManager,
    SaveContext,
    SaveOutcome,
    forced_reason,
)
from durability_pipelines.checkpoints.errors import (
    ConfigError,
    DurabilityError,
    InvalidCheckpointKeyError,
    InvalidSequenceError,
    LeaseLostError,
    StoreUnavailableError,
)
from durability_pipelines.checkpoints.factory import StoreConfig, open_store
from durability_pipelines.checkpoints.inspect import Drift, Stored, drift
from durability_pipelines.checkpoints.keys import CheckpointKey, LeaseKey
from durability_pipelines.checkpoints.ordering import normalize_sequence, sort_key
from durability_pipelines.redis_client import redis_client

if TYPE_CHECKING:
    from durability_pipelines.checkpoints.postgres_store import PostgresConnection
    from durability_pipelines.consumer.storage import ConsumerStorage, DeadLetter

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_ACCESS_DENIED = 5  # the server is up but refused the credentials / database: retrying will not help
EXIT_INTERRUPTED = 130

ENV_BACKEND = "DURABILITY_CHECKPOINT_BACKEND"
ENV_SUPABASE_DB_URL = "DURABILITY_SUPABASE_DB_URL"
BACKENDS = ("redis", "postgres", "hybrid")
DEFAULT_SET_REASON = "manual set via durability-pipelines CLI"
EXPORT_FIELDS = ("key", "adapter", "stream", "group", "consumer", "shard", "sequence", "redis", "postgres",
                 "postgres_updated_at", "drift", "gap", "consumer_backend")


class CliError(Exception):
    """A failure with a message for the operator and the exit code to return."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- secrets


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


class _Parser(argparse.ArgumentParser):
    """argparse that masks URLs in its error messages (they echo the offending argument)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {scrub(message, sys.argv)}\n")


# --------------------------------------------------------------------------- session


def default_who() -> str:
    """``$USER@hostname``: who an operator action is recorded as when ``--by`` is not given."""
    try:
        user = os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _psycopg_url(url: str) -> str:
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
            self._postgres_url = _psycopg_url(url)
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
        from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore

        store = self.store()
        if isinstance(store, HybridCheckpointStore):
            return [("redis", store.redis), ("postgres", store.postgres)]
        return [(store.backend, store)]

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
        return _iso(value)
    return str(value)


def _iso(value: datetime | None) -> str | None:
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


# --------------------------------------------------------------------------- checkpoint helpers


def _key(args: argparse.Namespace) -> CheckpointKey:
    return CheckpointKey(args.adapter, args.stream, args.group, args.consumer, args.shard)


def _valid(raw: str | None) -> str | None:
    """The canonical form of a stored value, or ``None`` if it is missing or invalid."""
    if raw is None:
        return None
    try:
        return normalize_sequence(raw)
    except InvalidSequenceError:
        return None


#: What a drift means for a consumer whose backend is ``postgres``: it loads and saves Postgres only, so a
#: Redis value is the mirror's copy (or another worker's), never a position it resumes from.
POSTGRES_BACKEND_DRIFT = {Drift.POSTGRES_AHEAD: "redis-copy-behind", Drift.REDIS_AHEAD: "redis-copy-ahead",
                          Drift.POSTGRES_ONLY: "ok", Drift.INVALID_REDIS: "invalid-redis-copy",
                          Drift.WRONG_TYPE_REDIS: "wrong-type-redis-copy"}


@dataclass
class CheckpointRow:
    key: CheckpointKey
    values: dict[str, str | None]  # raw per store
    postgres_updated_at: datetime | None = None
    wrong_type: dict[str, str] = field(default_factory=dict)  # store -> the Redis type found instead of a string
    consumer_backend: str | None = None  # the backend of the configured consumer that owns the key, if any

    def effective(self) -> str | None:
        """What a load returns: the first store (Redis before Postgres) holding a valid value."""
        for raw in self.values.values():
            if _valid(raw) is not None:
                return _valid(raw)
        return None

    def _stored(self, name: str) -> Stored | None:
        if name in self.wrong_type:
            return Stored.wrong_type(self.wrong_type[name])
        raw = self.values.get(name)
        return None if raw is None else Stored.of(raw)

    def drift(self) -> tuple[str, int | None]:
        """The one drift (``checkpoints.inspect.drift``), read for the consumer's backend: for a
        ``postgres`` consumer Redis only holds a copy, so no drift means it will re-process anything."""
        if set(self.values) == {"redis", "postgres"}:
            found, gap = drift(self._stored("redis"), self._stored("postgres"))
            if self.consumer_backend == "postgres":
                return POSTGRES_BACKEND_DRIFT.get(found, found.value), gap
            return found.value, gap
        raw = next(iter(self.values.values()))
        if raw is None:
            return "missing", None
        return ("ok", None) if _valid(raw) is not None else ("invalid", None)

    def as_dict(self) -> dict[str, Any]:
        drift, gap = self.drift()
        return {
            "key": self.key.redis_key, "adapter": self.key.adapter, "stream": self.key.stream,
            "group": self.key.group, "consumer": self.key.consumer, "shard": self.key.shard,
            "sequence": self.effective(), "redis": self.values.get("redis"), "postgres": self.values.get("postgres"),
            "postgres_updated_at": _iso(self.postgres_updated_at), "drift": drift, "gap": gap,
            "consumer_backend": self.consumer_backend,
        }


def _raw_values(session: Session, keys: Sequence[CheckpointKey] | None = None) -> dict[CheckpointKey, CheckpointRow]:
    """Raw stored values per store (garbage included: showing it is the point), for ``keys`` or all."""
    from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
    from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore, WrongType

    subs = session.substores()
    names = [name for name, _ in subs]
    rows: dict[CheckpointKey, CheckpointRow] = {}

    def row(key: CheckpointKey) -> CheckpointRow:
        if key not in rows:
            rows[key] = CheckpointRow(key, dict.fromkeys(names))
        return rows[key]

    for name, sub in subs:
        if isinstance(sub, RedisCheckpointStore):
            wanted = list(keys) if keys is not None else sub.keys()
            for key, raw in zip(wanted, sub.load_raw_many(wanted), strict=True):
                if isinstance(raw, WrongType):
                    row(key).wrong_type[name] = raw.kind
                if raw is not None:
                    row(key).values[name] = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        elif isinstance(sub, PostgresCheckpointStore) and keys is None:
            for key, raw, ts in sub.load_rows():
                r = row(key)
                r.values[name] = raw
                r.postgres_updated_at = ts
        else:
            for key in keys or ():
                try:
                    row(key).values[name] = sub.load(key)
                except InvalidSequenceError as exc:
                    row(key).values[name] = str(exc.value)
    for key in keys or ():
        row(key)
    backends = _consumer_backends(session)
    for r in rows.values():
        r.consumer_backend = backends.get((r.key.adapter, r.key.stream, r.key.group, r.key.consumer))
    return rows


def _consumer_backends(session: Session) -> dict[tuple[str, str, str, str], str]:
    """(adapter, stream, group, consumer) -> checkpoint backend of each configured consumer (the shipped ones or
    ``$DURABILITY_CONSUMERS_DIR``): what a drift means depends on which store the consumer resumes from."""
    from durability_pipelines.consumer.config import configured_consumers_dir, load_consumer_instances

    try:
        instances = load_consumer_instances(configured_consumers_dir(), require_dir=False)
    except ConfigError as exc:
        session.warn(f"cannot read the consumer configs, so drift is shown as for hybrid consumers: {exc}")
        return {}
    return {(cfg.adapter, cfg.stream, cfg.group, cfg.consumer): cfg.checkpoint.backend for _, cfg in instances}


def _filtered_rows(session: Session, args: argparse.Namespace) -> list[CheckpointRow]:
    rows = _raw_values(session).values()
    wanted = {"adapter": args.adapter, "stream": args.stream, "group": args.group, "consumer": args.consumer}
    return sorted(
        (r for r in rows if all(v is None or getattr(r.key, f) == v for f, v in wanted.items())),
        key=lambda r: r.key,
    )


def _warn_live_lease(session: Session, key: CheckpointKey) -> None:
    """A forced write is unfenced: a live worker would move the checkpoint forward again."""
    now = datetime.now(timezone.utc)
    live: dict[tuple[str, int], list[str]] = {}
    for name, manager in session.lease_managers():
        lease = manager.get(key.lease_key)
        if lease is not None and _lease_state(lease, now) == "held":
            live.setdefault((lease.owner, lease.epoch), []).append(name)
    for (owner, epoch), stores in live.items():
        session.warn(
            f"lease {key.lease_key} is held by {owner} (epoch {epoch}) in {', '.join(stores)}; that worker may "
            "move this checkpoint forward again. Stop the consumer's sensor and wait for its run, or "
            "`durability-pipelines leases release ... --force`."
        )


def _force(session: Session, key: CheckpointKey, sequence: str, reason: str, by: str) -> ForceSetResult:
    _warn_live_lease(session, key)
    return session.store().force_set(key, sequence, context=SaveContext(writer=by, reason=forced_reason(reason)))


def _force_report(result: ForceSetResult, by: str, reason: str, verb: str) -> tuple[dict[str, Any], str]:
    data = {"key": result.key.redis_key, "action": verb, "previous": result.previous, "sequence": result.current,
            "direction": result.direction, "previous_by_store": dict(result.previous_by_store),
            "by": by, "reason": reason}
    stores = ", ".join(f"{k}: {v if v is not None else '(none)'}" for k, v in result.previous_by_store.items())
    text = (f"{verb} {result.key}: {result.previous or '(none)'} -> {result.current} ({result.direction})\n"
            f"  previous per store: {stores}\n  recorded in history as by={by!r} reason={reason!r}")
    return data, text


def _sequence_arg(text: str, flag: str, key: CheckpointKey) -> str:
    try:
        return normalize_sequence(text, key=key.redis_key)
    except InvalidSequenceError:
        raise CliError(
            f"{flag} {text[:80]!r} is not a stream position: give 1-40 decimal digits (a DynamoDB sequence number "
            "or a change-log position), TRIM_HORIZON, LATEST or SHARD_END",
            EXIT_USAGE,
        ) from None


def _require_reason(args: argparse.Namespace, what: str) -> str:
    reason = (args.reason or "").strip()
    if not reason:
        raise CliError(f"{what} needs --reason TEXT: it is recorded in the checkpoint history with --by", EXIT_USAGE)
    return reason


# --------------------------------------------------------------------------- checkpoints


def cmd_checkpoints_list(session: Session, args: argparse.Namespace) -> int:
    rows = _filtered_rows(session, args)
    data = [r.as_dict() for r in rows]

    def text() -> str:
        if not rows:
            return "no checkpoints" + (" match the filters" if any(
                (args.adapter, args.stream, args.group, args.consumer)) else "")
        names = [n for n, _ in session.substores()]
        headers = ["key", *names, "drift", "consumer backend"] + (["postgres updated"] if "postgres" in names else [])
        body = []
        for d in data:
            drift = d["drift"] + (f" ({d['gap']})" if d["gap"] else "")
            body.append([d["key"], *(d[n] for n in names), drift, d["consumer_backend"] or "-"]
                        + ([d["postgres_updated_at"]] if "postgres" in names else []))
        return table(headers, body) + f"\n{len(rows)} checkpoint(s), backend {session.backend}"

    session.emit(data, text)
    return EXIT_OK


def _history_dicts(entries: Iterable[HistoryEntry]) -> list[dict[str, Any]]:
    return [{"ts": _iso(h.ts), "previous": h.previous, "sequence": h.sequence, "writer": h.writer,
             "lease_epoch": h.lease_epoch, "run_id": h.run_id, "reason": h.reason} for h in entries]


def cmd_checkpoints_get(session: Session, args: argparse.Namespace) -> int:
    key = _key(args)
    row = _raw_values(session, [key])[key]
    if all(v is None for v in row.values.values()):
        stores = " or ".join(row.values)
        raise CliError(
            f"no checkpoint {key} in {stores}. Check the key parts with `durability-pipelines checkpoints list "
            f"--stream {key.stream}` (the shard is optional: omit it for unsharded streams)",
            EXIT_NOT_FOUND,
        )
    history = {name: _history_dicts(sub.history(key, args.history)) for name, sub in session.substores()}
    data = {**row.as_dict(), "history": history}

    def text() -> str:
        lines = [f"checkpoint {key}", f"  sequence: {data['sequence'] or '(no valid value)'}"]
        for name, raw in row.values.items():
            flag = "" if raw is None or _valid(raw) is not None else "  <- INVALID: fix with set --force"
            lines.append(f"  {name}: {raw if raw is not None else '(none)'}{flag}")
        lines.append(f"  drift: {data['drift']}" + (f" ({data['gap']})" if data["gap"] else ""))
        for name, entries in history.items():
            lines.append(f"  history ({name}, newest first):")
            if not entries:
                lines.append("    (none)")
            for h in entries:
                lines.append(f"    {h['ts']}  {h['previous'] or '(none)'} -> {h['sequence']}  by {h['writer']}"
                             + (f"  reason: {h['reason']}" if h["reason"] else ""))
        return "\n".join(lines)

    session.emit(data, text)
    return EXIT_OK


def cmd_checkpoints_set(session: Session, args: argparse.Namespace) -> int:
    key = _key(args)
    sequence = _sequence_arg(args.sequence, "--sequence", key)
    by = args.by or default_who()
    if args.force:
        reason = _require_reason(args, "set --force")
        data, text = _force_report(_force(session, key, sequence, reason, by), by, reason, "forced")
        session.emit(data, text)
        return EXIT_OK

    reason = (args.reason or "").strip() or DEFAULT_SET_REASON
    current = _raw_values(session, [key])[key]
    for name, raw in current.values.items():
        if raw is not None and _valid(raw) is None:
            raise CliError(
                f"refused: {name} holds an invalid value {raw[:80]!r} for {key}, so it cannot be compared. "
                "Replace it with --force --reason '...' (recorded in the history)."
            )
        if raw is not None and sort_key(_valid(raw)) > sort_key(sequence):  # type: ignore[arg-type]
            raise CliError(
                f"refused: {key} is at {_valid(raw)} in {name}; {sequence} is behind it and checkpoints never "
                "move backwards by default. To replay deliberately, use `checkpoints rewind` or add "
                "--force --reason '...' (recorded in the history; stop the consumer first)."
            )
    context = SaveContext(writer=by, reason=reason)
    outcomes: dict[str, str] = {}
    for name, sub in reversed(session.substores()):  # Postgres (the truth) first, as force_set does
        result = sub.save(key, sequence, context=context)
        outcomes[name] = result.outcome.value
        if result.outcome is SaveOutcome.STALE:
            raise CliError(
                f"refused: {key} moved to {result.current} in {name} while this command ran; {sequence} is behind "
                f"it (stores written so far: {outcomes})."
            )
    data = {"key": key.redis_key, "sequence": sequence, "outcome": outcomes, "by": by, "reason": reason}
    changed = any(o == SaveOutcome.ADVANCED.value for o in outcomes.values())
    verb = "set" if changed else "unchanged (already at that value)"
    session.emit(data, f"{verb} {key} = {sequence}  [" + ", ".join(f"{k}: {v}" for k, v in outcomes.items()) + "]")
    return EXIT_OK


def parse_time(text: str) -> datetime:
    """ISO 8601; ``Z`` or an offset, or UTC when naive."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise CliError(
            f"--to-time {text!r} is not an ISO 8601 time; use e.g. 2024-05-01T12:30:00Z or "
            "2024-05-01T14:30:00+02:00 (a time without offset is taken as UTC)",
            EXIT_USAGE,
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _history_at(session: Session, key: CheckpointKey, at: datetime) -> tuple[HistoryEntry | None, str]:
    """The last history entry at or before ``at``: Postgres' checkpoint_history, or the Redis stream."""
    from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore

    subs = dict(session.substores())
    pg = subs.get("postgres")
    if isinstance(pg, PostgresCheckpointStore):
        return pg.history_at(key, at), "postgres checkpoint_history"
    redis_store = subs["redis"]
    limit = max(int(getattr(redis_store, "history_maxlen", 1000) or 0), 1000) * 2
    for entry in redis_store.history(key, limit):
        if entry.ts is not None and entry.ts <= at:
            return entry, "redis history stream"
    return None, "redis history stream (capped: it keeps the newest entries only)"


def cmd_checkpoints_rewind(session: Session, args: argparse.Namespace) -> int:
    key = _key(args)
    reason = _require_reason(args, "rewind")
    by = args.by or default_who()
    source: dict[str, Any] = {}
    if args.to_sequence is not None:
        target = _sequence_arg(args.to_sequence, "--to-sequence", key)
        note = f"rewind to sequence {target}: {reason}"
    else:
        at = parse_time(args.to_time)
        entry, where = _history_at(session, key, at)
        if entry is None:
            raise CliError(
                f"no history entry for {key} at or before {_iso(at)} in the {where}. The consumer had no "
                "checkpoint then: to replay from the oldest record still in the stream use "
                "--to-sequence TRIM_HORIZON (see `checkpoints get` for the history that exists).",
                EXIT_NOT_FOUND,
            )
        target = normalize_sequence(entry.sequence, key=key.redis_key)
        note = f"rewind to {_iso(at)}: {reason}"
        source = {"at": _iso(at), "history_ts": _iso(entry.ts), "history_writer": entry.writer, "from": where}
    if args.dry_run:
        row = _raw_values(session, [key])[key]
        data = {"key": key.redis_key, "dry_run": True, "current": row.values, "target": target, **source}
        session.emit(data, f"would set {key} to {target} (now: {row.values})"
                     + (f"\n  from the {source['from']} entry at {source['history_ts']}" if source else ""))
        return EXIT_OK
    data, text = _force_report(_force(session, key, target, note, by), by, note, "rewound")
    data.update(source)
    if source:
        text += f"\n  from the {source['from']} entry at {source['history_ts']} (writer {source['history_writer']})"
    session.emit(data, text)
    return EXIT_OK


def cmd_checkpoints_repair(session: Session, args: argparse.Namespace) -> int:
    """Undo a foreign regression: the highest position the project recorded goes back into both stores."""
    from durability_pipelines.checkpoints.mirror import repair_key
    from durability_pipelines.checkpoints.postgres_store import PostgresConnection

    key = CheckpointKey.parse(args.key) if args.key else _key(args)
    by = args.by or default_who()
    client = redis_client(session.redis_url())
    db = PostgresConnection(session.postgres_url())
    try:
        result = repair_key(client, db, key, by=by)
    finally:
        db.close()
        client.close()
    data = {"key": key.redis_key, "target": result.target, "before": result.before, "after": result.after, "by": by}
    if result.target is None:
        session.emit(data, f"nothing to repair for {key}: no store holds or recorded a position")
        return EXIT_OK
    stores = ", ".join(f"{k}: {result.before[k] or '(none)'} -> {result.after[k] or '(none)'}" for k in result.before)
    session.emit(data, f"repaired {key} to {result.target}  [{stores}]\n  recorded in history as by={by!r}")
    return EXIT_OK


def cmd_checkpoints_export(session: Session, args: argparse.Namespace) -> int:
    data = [r.as_dict() for r in _filtered_rows(session, args)]
    if args.format == "json":
        payload = json.dumps(data, indent=2) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(EXPORT_FIELDS), lineterminator="\n")
        writer.writeheader()
        for d in data:
            writer.writerow({k: "" if d[k] is None else d[k] for k in EXPORT_FIELDS})
        payload = buf.getvalue()
    if args.output and args.output != "-":
        with open(args.output, "w", encoding="utf-8", newline="") as handle:
            handle.write(payload)
        print(f"wrote {len(data)} checkpoint(s) as {args.format} to {args.output}", file=session.err)
    else:
        session.out.write(payload)
    return EXIT_OK


# --------------------------------------------------------------------------- leases


def _lease_state(lease: Lease, now: datetime) -> str:
    if not lease.owner:
        return "released"
    return "held" if lease.expires_at is not None and lease.expires_at > now else "expired"


def _lease_dict(store: str, lease: Lease, now: datetime) -> dict[str, Any]:
    return {"store": store, "lease": str(lease.key), "adapter": lease.key.adapter, "stream": lease.key.stream,
            "group": lease.key.group, "shard": lease.key.shard, "owner": lease.owner, "epoch": lease.epoch,
            "expires_at": _iso(lease.expires_at), "state": _lease_state(lease, now)}


def cmd_leases_list(session: Session, args: argparse.Namespace) -> int:
    now = datetime.now(timezone.utc)
    data = [_lease_dict(name, lease, now) for name, manager in session.lease_managers() for lease in manager.list()]
    data.sort(key=lambda d: (d["lease"], d["store"]))

    def text() -> str:
        if not data:
            return "no leases"
        return table(["lease", "store", "owner", "epoch", "state", "expires at"],
                     [[d["lease"], d["store"], d["owner"], d["epoch"], d["state"], d["expires_at"]] for d in data])

    session.emit(data, text)
    return EXIT_OK


def cmd_leases_release(session: Session, args: argparse.Namespace) -> int:
    key = LeaseKey(args.adapter, args.stream, args.group, args.shard)
    now = datetime.now(timezone.utc)
    by = args.by or default_who()
    found: list[tuple[str, LeaseManager, Lease]] = []
    for name, manager in session.lease_managers():
        lease = manager.get(key)
        if lease is None:
            continue
        if _lease_state(lease, now) == "held" and not args.force and lease.owner != args.owner:
            raise CliError(
                f"refused: lease {key} is held by {lease.owner} (epoch {lease.epoch}) in {name} until "
                f"{_iso(lease.expires_at)}. If that worker is dead or stuck, re-run with --force (its later "
                "writes are then rejected); nothing was released."
            )
        found.append((name, manager, lease))
    if not found:
        raise CliError(f"no lease {key} in {' or '.join(n for n, _ in session.lease_managers())}; "
                       "see `durability-pipelines leases list`", EXIT_NOT_FOUND)
    results = []
    for name, manager, lease in found:
        state = _lease_state(lease, now)
        released = False if state == "released" else manager.release(lease)
        if state != "released" and not released:
            raise CliError(f"lease {key} changed in {name} while releasing (another worker took it); "
                           "check `leases list` and try again")
        results.append({"store": name, "lease": str(key), "previous_owner": lease.owner, "epoch": lease.epoch,
                        "previous_state": state, "released": released,
                        "forced": bool(args.force and state == "held"), "by": by})
    lines = []
    for r in results:
        if not r["released"]:
            lines.append(f"{r['store']}: lease {key} was already released (epoch {r['epoch']})")
        else:
            how = f"FORCED by {by}" if r["forced"] else f"by {by}"
            lines.append(f"{r['store']}: released lease {key} held by {r['previous_owner']} at epoch {r['epoch']} "
                         f"({r['previous_state']}), {how}; the next acquire takes it over with epoch {r['epoch'] + 1}")
    session.emit(results, "\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------- dead letters


def _dead_letter_dict(dl: DeadLetter) -> dict[str, Any]:
    return {"id": dl.id, "status": dl.status, "consumer": dl.consumer, "adapter": dl.adapter, "stream": dl.stream,
            "group": dl.group, "shard": dl.shard or None, "first_sequence": dl.first_sequence,
            "last_sequence": dl.last_sequence, "record_count": dl.record_count, "attempts": dl.attempts,
            "policy": dl.policy, "run_id": dl.run_id, "created_at": _iso(dl.created_at), "error": dl.error}


def cmd_dead_letters_list(session: Session, args: argparse.Namespace) -> int:
    from durability_pipelines.consumer import storage as consumer_storage

    st = session.consumer_storage()
    consumer_storage.ensure(st.db)
    data = [_dead_letter_dict(dl) for dl in st.dead_letters(args.consumer, status=args.status)]

    def text() -> str:
        if not data:
            return "no dead letters"
        rows = [[d["id"], d["status"], d["consumer"], d["shard"], f"{d['first_sequence']}..{d['last_sequence']}",
                 d["record_count"], d["attempts"], d["policy"], d["created_at"],
                 (d["error"].splitlines() or [""])[0][:60]] for d in data]
        return table(["id", "status", "consumer", "shard", "sequences", "records", "attempts", "policy", "created",
                      "error"], rows)

    session.emit(data, text)
    return EXIT_OK


def _set_dead_letter(session: Session, args: argparse.Namespace, status: str) -> int:
    from durability_pipelines.consumer import storage as consumer_storage

    st = session.consumer_storage()
    consumer_storage.ensure(st.db)
    by = args.by or default_who()
    dl = next((d for d in st.dead_letters() if d.id == args.id), None)
    if dl is None:
        raise CliError(f"no dead letter with id {args.id}; see `durability-pipelines dead-letters list`",
                       EXIT_NOT_FOUND)
    shard = dl.shard or "(unsharded)"
    if dl.status == status:
        session.emit({"id": dl.id, "status": status, "changed": False},
                     f"dead letter #{dl.id} is already {status}; nothing changed")
        return EXIT_OK
    if status == "retry" and dl.status == "resolved":
        raise CliError(
            f"refused: dead letter #{dl.id} is resolved (policy {dl.policy}); its shard is not blocked by it. "
            f"To process sequences {dl.first_sequence}..{dl.last_sequence} again, rewind the checkpoint with "
            "`durability-pipelines checkpoints rewind ... --to-sequence S --reason ...`."
        )
    if not st.set_dead_letter_status(dl.id, status, by=by, note=args.note):
        raise CliError(f"dead letter #{dl.id} vanished while updating it", EXIT_NOT_FOUND)
    if status == "retry":
        hint = (f"consumer {dl.consumer} shard {shard} is unblocked: its sensor dispatches it again from the acked "
                f"checkpoint at the next tick, re-reading {dl.first_sequence}..{dl.last_sequence}")
    else:
        hint = (f"consumer {dl.consumer} shard {shard} is unblocked and resumes from the acked checkpoint, which "
                f"re-reads {dl.first_sequence}..{dl.last_sequence}. To skip that batch instead, first move the "
                f"checkpoint past it: `durability-pipelines checkpoints set {dl.adapter} {dl.stream} {dl.group} "
                f"<consumer> {dl.shard} --sequence {dl.last_sequence} --reason ...`")
    data = {"id": dl.id, "previous_status": dl.status, "status": status, "changed": True, "by": by,
            "note": args.note, "consumer": dl.consumer, "shard": dl.shard or None}
    session.emit(data, f"dead letter #{dl.id}: {dl.status} -> {status} by {by}\n  {hint}")
    return EXIT_OK


def cmd_dead_letters_retry(session: Session, args: argparse.Namespace) -> int:
    return _set_dead_letter(session, args, "retry")


def cmd_dead_letters_resolve(session: Session, args: argparse.Namespace) -> int:
    if not (args.note or "").strip():
        raise CliError("dead-letters resolve needs --note TEXT saying how it was resolved", EXIT_USAGE)
    return _set_dead_letter(session, args, "resolved")


# --------------------------------------------------------------------------- schema, change feed, demo


_SCHEMA_TABLES = ("checkpoints", "checkpoint_history", "checkpoint_leases", "checkpoint_sentinels", "durability_schema_version",
                  "dead_letters", "stream_gaps", "sensor_cursors", "stream_events")


def _schema_state(db: PostgresConnection) -> tuple[set[str], dict[str, int]]:
    with db.connection() as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relkind IN ('r', 'p') AND c.relname = ANY(%s) "
            "AND pg_table_is_visible(c.oid)", (list(_SCHEMA_TABLES),)).fetchall()}
        versions: dict[str, int] = {}
        if "durability_schema_version" in tables:
            versions = dict(conn.execute("SELECT component, version FROM durability_schema_version").fetchall())
    return tables, versions


def cmd_migrate(session: Session, args: argparse.Namespace) -> int:
    from durability_pipelines.consumer import storage as consumer_storage

    db = session.postgres_connection()
    before_tables, before_versions = _schema_state(db)
    consumer_storage.migrate(db)
    after_tables, after_versions = _schema_state(db)
    created = sorted(after_tables - before_tables)
    components = {
        c: {"before": before_versions.get(c), "after": v,
            "action": "created" if before_versions.get(c) is None
            else ("upgraded" if before_versions[c] < v else "up to date")}
        for c, v in sorted(after_versions.items())
    }
    moved: list[Any] = []
    converted, redis_note = _convert_sentinels(session, db, moved)
    data = {"database": services.mask_url(session.postgres_url()), "created_tables": created,
            "existing_tables": sorted(before_tables & after_tables), "components": components,
            "sentinels_converted": [{"store": c.where, "key": c.key, "value": c.value} for c in converted]}
    lines = [f"migrated {data['database']}"]
    lines += [f"  {c}: v{info['after']} ({info['action']})" for c, info in components.items()]
    lines.append("  created tables: " + (", ".join(created) if created else "none (schema was already present)"))
    lines.append(f"  sentinels moved out of shared keys and rows: {len(converted)}")
    lines += [f"    {c.describe()}" for c in converted]
    if moved:  # Redis Cluster only: keys of the single-node layout moved into their checkpoint's slot
        data["cluster_layout"] = [{"from": m.old, "to": m.new, "moved": m.moved, "why": m.why} for m in moved]
        lines.append(f"  keys moved to the Redis Cluster layout: {sum(m.moved for m in moved)}")
        lines += [f"    {m.describe()}" for m in moved]
    if redis_note:
        data["redis"] = redis_note
        lines.append(f"  redis: {redis_note}")
    session.emit(data, "\n".join(lines))
    return EXIT_OK


def _convert_sentinels(session: Session, db: PostgresConnection, moved: list[Any]) -> tuple[list[Any], str | None]:
    """Move SHARD_END / TRIM_HORIZON / LATEST values an older version wrote into the shared layout to the
    project's own sentinel store (Postgres always; Redis when it answers, else say so). On a Redis Cluster,
    first move project keys of the single-node layout into their checkpoint's slot (appended to ``moved``)."""
    import redis as redis_lib

    from durability_pipelines.checkpoints import sentinels

    with db.connection() as conn, conn.transaction():
        converted = sentinels.convert_postgres(conn)
    try:
        url = session.redis_url()
    except services.ServiceUnavailableError as exc:
        return converted, f"not converted ({exc}); run `durability-pipelines migrate` again when Redis answers"
    client = redis_client(url)
    try:
        from durability_pipelines.checkpoints.redis_store import move_to_cluster_layout

        moved += move_to_cluster_layout(client)
        converted += sentinels.convert_redis(client)
    except redis_lib.RedisError as exc:
        return converted, f"not converted ({type(exc).__name__}); run `durability-pipelines migrate` again"
    finally:
        client.close()
    return converted, None


def _change_feed_url(session: Session, args: argparse.Namespace) -> str:
    """The change log's database: --db-url, $DURABILITY_SUPABASE_DB_URL, else the project's Postgres."""
    url = args.db_url or os.environ.get(ENV_SUPABASE_DB_URL)
    if url:
        services.check_postgres(url, source=FLAG_DB_URL if args.db_url else ENV_SUPABASE_DB_URL)
        return _psycopg_url(url)
    return session.postgres_url()


def cmd_change_feed(session: Session, args: argparse.Namespace) -> int:
    import psycopg

    from durability_pipelines.sources import supabase_changes as module

    url = _change_feed_url(session, args)
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        if args.change_feed_command == "install":
            log = module.install_change_feed(conn, args.table, schema=args.schema, change_log=args.change_log)
            data = {"action": "installed", "table": args.table, "schema": args.schema, "change_log": str(log)}
            text = (f"installed: changes of {args.schema}.{args.table} are captured into {log}"
                    if "." not in args.table else f"installed: changes of {args.table} are captured into {log}")
        elif args.change_feed_command == "purge":
            groups = [g for g in args.groups.split(",") if g] or None
            with psycopg.connect(session.postgres_url(), autocommit=True, connect_timeout=5) as ckpt_conn:
                deleted = module.purge_channel(conn, args.channel, table=args.table, schema=args.schema,
                                               change_log=args.change_log, groups=groups, keep_last=args.keep_last,
                                               checkpoints_conn=ckpt_conn)
            data = {"action": "purged", "table": args.table, "channel": args.channel, "deleted": deleted}
            text = f"purged {deleted} change-log row(s) of {args.table} acked by every consumer of {args.channel}"
        else:
            module.uninstall_change_feed(conn, args.table, schema=args.schema, change_log=args.change_log,
                                         drop_change_log=args.drop_change_log)
            data = {"action": "uninstalled", "table": args.table, "schema": args.schema,
                    "change_log": args.change_log, "dropped_change_log": args.drop_change_log}
            text = f"uninstalled: {args.table} is no longer captured" + (
                f"; dropped the change log {args.change_log}" if args.drop_change_log else "")
    session.emit(data, text)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The end-to-end demo (durability_pipelines.demo): interactive with the UI, or bounded."""
    from durability_pipelines.demo import main as demo_main

    return demo_main(args=args)


# --------------------------------------------------------------------------- parser


def _who_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", metavar="WHO", help="who is acting, recorded with the change (default: $USER@hostname)")


def _key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="e.g. dynamodb or supabase")
    p.add_argument("stream", help="the table / channel name")
    p.add_argument("group", help="consumer group")
    p.add_argument("consumer", help="consumer id")
    p.add_argument("shard", nargs="?", default=None, help="shard id; omit for unsharded streams (supabase)")


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="only this adapter")
    p.add_argument("--stream", help="only this stream")
    p.add_argument("--group", help="only this consumer group")
    p.add_argument("--consumer", help="only this consumer id")


def _global_args(p: argparse.ArgumentParser, *, top: bool) -> None:
    """Global flags, accepted before or after the subcommand (``SUPPRESS`` keeps the top-level value)."""
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--backend", choices=BACKENDS, default=d(os.environ.get(ENV_BACKEND) or "hybrid"),
                   help=f"checkpoint store (default: ${ENV_BACKEND}, else hybrid)")
    p.add_argument("--postgres-url", default=d(None), metavar="URL",
                   help=f"Postgres URL (default: ${services.ENV_POSTGRES_URL}, else the embedded server); "
                   "prefer the environment variable: arguments are visible in `ps`")
    p.add_argument("--redis-url", default=d(None), metavar="URL",
                   help=f"Redis URL (default: ${services.ENV_REDIS_URL}, else the embedded server)")
    p.add_argument("--json", action="store_true", default=d(False), help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    _global_args(common, top=False)
    parser = _Parser(
        prog="durability-pipelines",
        description="Operate durability_pipelines consumers: inspect and repair checkpoints, release stuck "
        "leases, retry dead-lettered batches, migrate the schema. Exit codes: 0 ok, 1 refused, 2 bad input "
        "(also a malformed server URL) or not available, 3 server/schema unavailable, 4 not found, "
        "5 credentials refused by the server.",
        epilog="Passwords are never printed: URLs in messages are masked. See docs/cli.md for recipes.",
    )
    _global_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(parent: Any, name: str, help_text: str, func: Callable[..., int], **kw: Any) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=kw.pop("description", help_text),
                              parents=[common], **kw)
        p.set_defaults(func=func)
        return p

    # checkpoints
    cp = sub.add_parser("checkpoints", help="inspect and repair acked checkpoints",
                        description="Acked checkpoints: the position each consumer resumes after.")
    cps = cp.add_subparsers(dest="checkpoints_command", metavar="ACTION", parser_class=_Parser)
    cps.required = True
    p = add(cps, "list", "every checkpoint, with the value in each store and their drift (hybrid)", cmd_checkpoints_list,
            description="List every checkpoint. With the hybrid backend both stores are shown: drift "
            "'redis-ahead' is normal up to the flush bound; 'postgres-ahead' or 'invalid-*' need attention. For a "
            "consumer configured with the postgres backend, Redis only holds the mirror's copy: its drift reads "
            "'redis-copy-behind' / 'redis-copy-ahead' (nothing is re-processed). See docs/cli.md.")
    _filter_args(p)
    p = add(cps, "get", "one checkpoint: value per store and recent history", cmd_checkpoints_get)
    _key_args(p)
    p.add_argument("--history", type=int, default=5, metavar="N", help="history entries per store (default 5)")
    p = add(cps, "set", "set a checkpoint: forward only, unless --force", cmd_checkpoints_set,
            description="Set a checkpoint. Monotonic by default: moving backwards is refused (exit 1). "
            "--force writes unconditionally (backwards, or over a garbage value) and records --by and --reason "
            "in the checkpoint history. Stop the consumer's sensor first: a running worker keeps its own position.")
    _key_args(p)
    p.add_argument("--sequence", required=True, metavar="S",
                   help="1-40 decimal digits, TRIM_HORIZON, LATEST or SHARD_END")
    p.add_argument("--force", action="store_true", help="write even if it moves backwards (requires --reason)")
    p.add_argument("--reason", metavar="TEXT", help="why; required with --force, recorded in the history")
    _who_arg(p)
    p = add(cps, "rewind", "move a checkpoint back for a replay (to a sequence or a point in time)",
            cmd_checkpoints_rewind,
            description="Rewind a checkpoint so the consumer replays from there (downstream writes are "
            "idempotent by sequence). --to-time uses the last history entry at or before that time (Postgres "
            "checkpoint_history for postgres/hybrid, the Redis history stream for redis). Recorded like "
            "set --force.")
    _key_args(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-sequence", metavar="S", help="the position to resume after")
    target.add_argument("--to-time", metavar="ISO8601", help="e.g. 2024-05-01T12:30:00Z (naive = UTC)")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (recorded in the history)")
    p.add_argument("--dry-run", action="store_true", help="show the target without writing")
    _who_arg(p)
    p = add(cps, "repair", "undo a foreign regression: put the last recorded position back into both stores",
            cmd_checkpoints_repair,
            description="Another worker moved a checkpoint backwards (the audit says regressed-externally). "
            "Put back the highest position the project recorded (or a store holds), in Redis and Postgres; "
            "never moves a store backwards; recorded in both histories.")
    p.add_argument("key", nargs="?", metavar="KEY", help="the Redis key, e.g. checkpoint:dynamodb:orders:workers:consumer-a:shard-1")
    for name in ("adapter", "stream", "group", "consumer", "shard"):
        p.add_argument(f"--{name}", help=f"instead of KEY: the key's {name}")
    _who_arg(p)
    p = add(cps, "export", "write every checkpoint as CSV or JSON (for audits and backups)", cmd_checkpoints_export)
    _filter_args(p)
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="default csv")
    p.add_argument("--output", metavar="FILE", help="file to write (default: stdout)")

    # leases
    lp = sub.add_parser("leases", help="inspect and release shard leases",
                        description="Shard leases: one owner per shard, fenced by a rising epoch.")
    lps = lp.add_subparsers(dest="leases_command", metavar="ACTION", parser_class=_Parser)
    lps.required = True
    add(lps, "list", "every lease with owner, epoch and state (held / expired / released)", cmd_leases_list)
    p = add(lps, "release", "release a lease so another worker can take the shard", cmd_leases_release,
            description="Release a shard lease. An expired lease (or one you own, --owner) is released "
            "as is; a live lease needs --force. The previous holder's later writes are rejected.")
    p.add_argument("adapter")
    p.add_argument("stream")
    p.add_argument("group")
    p.add_argument("shard", nargs="?", default=None, help="omit for unsharded streams")
    p.add_argument("--force", action="store_true", help="release even if another owner holds it live")
    p.add_argument("--owner", help="release only if held by this owner (no --force needed)")
    _who_arg(p)

    # dead letters
    dp = sub.add_parser("dead-letters", help="list, retry and resolve dead-lettered batches",
                        description="Batches that exhausted their retries. An open dead letter stops its shard.")
    dps = dp.add_subparsers(dest="dead_letters_command", metavar="ACTION", parser_class=_Parser)
    dps.required = True
    p = add(dps, "list", "dead letters, oldest first", cmd_dead_letters_list)
    p.add_argument("--consumer", help="only this consumer (config name)")
    p.add_argument("--status", choices=("open", "retry", "resolved"))
    p = add(dps, "retry", "unblock the shard: the sensor re-dispatches it from the acked checkpoint",
            cmd_dead_letters_retry)
    p.add_argument("id", type=int)
    p.add_argument("--note", help="why (recorded)")
    _who_arg(p)
    p = add(dps, "resolve", "close a dead letter (unblocks the shard too)", cmd_dead_letters_resolve)
    p.add_argument("id", type=int)
    p.add_argument("--note", required=True, help="how it was resolved (recorded)")
    _who_arg(p)

    add(sub, "migrate", "create or upgrade the Postgres schema (idempotent)", cmd_migrate,
        description="Create or upgrade every table this project uses (checkpoints, history, leases, dead "
        "letters, gaps, cursor mirror, events). Safe to run repeatedly and concurrently.")

    fp = sub.add_parser("change-feed", help="install / uninstall the Postgres change-log trigger (Supabase source)",
                        description="The durable change feed: a trigger copying every row change of a table "
                        "into an append-only change log the supabase consumer reads.")
    fps = fp.add_subparsers(dest="change_feed_command", metavar="ACTION", parser_class=_Parser)
    fps.required = True
    for name, help_text in (("install", "capture a table's changes into the change log (idempotent)"),
                            ("uninstall", "stop capturing a table"),
                            ("purge", "delete change-log rows of TABLE that every consumer group of --channel acked")):
        p = add(fps, name, help_text, cmd_change_feed)
        p.add_argument("table", help="source table (or schema.table)")
        p.add_argument("--schema", default="public", help="schema of TABLE (default public)")
        p.add_argument("--change-log", default="durability_change_log", help="change-log table name")
        p.add_argument("--db-url", metavar="URL",
                       help=f"database holding the table (default: ${ENV_SUPABASE_DB_URL}, else the project Postgres)")
        if name == "uninstall":
            p.add_argument("--drop-change-log", action="store_true",
                           help="also drop the change log (stops capture of every table writing to it)")
        if name == "purge":
            p.add_argument("--channel", required=True, help="the consumers' channel (checkpoint stream)")
            p.add_argument("--groups", default="",
                           help="comma-separated consumer groups that must all have acked (a group that never "
                           "checkpointed must be named, or its unread changes could be purged)")
            p.add_argument("--keep-last", type=int, default=0, help="keep the newest N rows anyway (default 0)")

    from durability_pipelines.demo import build_parser as build_demo_parser

    p = sub.add_parser("demo", help="run every part on embedded services: interactive (UI) or bounded (--events)",
                       description="Starts PostgreSQL/Redis (embedded unless DURABILITY_*_URL are set), a local "
                       "DynamoDB endpoint, the Supabase change feed and Dagster with the three starters. "
                       "With --events N it runs headless, stops by itself and prints a JSON summary last.")
    build_demo_parser(p)
    p.set_defaults(func=None)
    return parser


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one command; returns the exit code (never raises for operator errors)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "demo":
        try:
            return cmd_demo(args)
        except services.InvalidServiceURLError as exc:  # masked messages: a traceback would add nothing
            print(f"error: {scrub(str(exc), [args.postgres_url, args.redis_url])}", file=err)
            return EXIT_USAGE
        except (services.ServiceRefusedError, services.ServiceUnavailableError) as exc:
            print(f"error: {scrub(str(exc), [args.postgres_url, args.redis_url])}", file=err)
            return EXIT_ACCESS_DENIED if isinstance(exc, services.ServiceRefusedError) else EXIT_UNAVAILABLE
    if args.backend not in BACKENDS:  # a default from the environment bypasses argparse's choices
        print(f"error: ${ENV_BACKEND}={args.backend!r} is not a backend this CLI can operate on; "
              f"use one of {', '.join(BACKENDS)} (memory checkpoints live inside one process)", file=err)
        return EXIT_USAGE
    session = Session(args, out, err)
    code = EXIT_OK
    message: str | None = None
    try:
        code = args.func(session, args)
    except CliError as exc:
        code, message = exc.code, str(exc)
    except (services.InvalidServiceURLError, InvalidCheckpointKeyError, InvalidSequenceError,
            ConfigError) as exc:
        code, message = EXIT_USAGE, str(exc)
    except services.ServiceRefusedError as exc:
        code, message = EXIT_ACCESS_DENIED, str(exc)
    except (services.ServiceUnavailableError, StoreUnavailableError) as exc:
        code, message = EXIT_UNAVAILABLE, str(exc)
    except LeaseLostError as exc:
        code, message = EXIT_REFUSED, str(exc)
    except DurabilityError as exc:
        code, message = EXIT_REFUSED, f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        code, message = EXIT_INTERRUPTED, "interrupted"
    except Exception as exc:  # driver errors: report without a traceback (and without secrets)
        code, message = _driver_error(exc)
    finally:
        try:
            session.close()
        except Exception as exc:  # noqa: BLE001 - closing must not hide the command's result
            if message is None and code == EXIT_OK:
                session.warn(f"closing connections failed: {type(exc).__name__}: {exc}")
    if message is not None:
        print(f"error: {scrub(message, session.urls())}", file=err)
    return code


def _driver_error(exc: Exception) -> tuple[int, str]:
    import psycopg
    import redis

    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedFunction):
        return EXIT_UNAVAILABLE, (f"the database has no durability_pipelines schema ({exc.diag.message_primary}). "
                                  "Run `durability-pipelines migrate` first.")
    if services.is_credentials_error(exc):  # checked first: redis' AuthenticationError is a ConnectionError
        return EXIT_ACCESS_DENIED, (
            f"the server answered but refused the credentials: {type(exc).__name__}: {exc}. "
            "Check the user and password in the URL (special characters percent-encoded)")
    if isinstance(exc, psycopg.OperationalError | redis.ConnectionError | redis.TimeoutError):
        return EXIT_UNAVAILABLE, f"server unavailable: {type(exc).__name__}: {exc}"
    if isinstance(exc, psycopg.Error | redis.RedisError):
        return EXIT_UNAVAILABLE, f"{type(exc).__name__}: {exc}"
    raise exc


if __name__ == "__main__":
    raise SystemExit(main())
