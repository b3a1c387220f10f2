"""``checkpoints list|get|set|rewind|repair|export``."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from durability_pipelines.checkpoints.base import (
    ForceSetResult,
    HistoryEntry,
    SaveContext,
    SaveOutcome,
    forced_reason,
)
from durability_pipelines.checkpoints.errors import (
    ConfigError,
    InvalidSequenceError,
)
from durability_pipelines.checkpoints.inspect import Drift, Stored, drift
from durability_pipelines.checkpoints.keys import CheckpointKey
from durability_pipelines.checkpoints.ordering import MAX_DIGITS, normalize_sequence, sort_key
from durability_pipelines.cli.exit_codes import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, CliError
from durability_pipelines.cli.leases import lease_state
from durability_pipelines.cli.session import Session, default_who, iso, table
from durability_pipelines.redis_client import redis_client

DEFAULT_SET_REASON = "manual set via durability-pipelines CLI"
EXPORT_FIELDS = ("key", "adapter", "stream", "group", "consumer", "shard", "sequence", "redis", "postgres",
                 "postgres_updated_at", "drift", "gap", "consumer_backend")


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
            "postgres_updated_at": iso(self.postgres_updated_at), "drift": drift, "gap": gap,
            "consumer_backend": self.consumer_backend,
        }


def _raw_values(session: Session, keys: Sequence[CheckpointKey] | None = None) -> dict[CheckpointKey, CheckpointRow]:
    """Raw stored values per store (garbage included: showing it is the point), for ``keys`` or all."""
    from durability_pipelines.checkpoints.redis_io import WrongType

    subs = session.substores()
    names = [name for name, _ in subs]
    rows: dict[CheckpointKey, CheckpointRow] = {}

    def row(key: CheckpointKey) -> CheckpointRow:
        if key not in rows:
            rows[key] = CheckpointRow(key, dict.fromkeys(names))
        return rows[key]

    for name, sub in subs:
        if keys is None:
            found = sub.raw_rows()
        else:
            wanted = list(keys)
            found = [(k, raw, None) for k, raw in zip(wanted, sub.load_raw_many(wanted), strict=True)]
        for key, raw, ts in found:
            if isinstance(raw, WrongType):
                row(key).wrong_type[name] = raw.kind
            if raw is not None:
                row(key).values[name] = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            if ts is not None:
                row(key).postgres_updated_at = ts
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
        if lease is not None and lease_state(lease, now) == "held":
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
            f"{flag} {text[:80]!r} is not a stream position: give 1-{MAX_DIGITS} decimal digits (a DynamoDB or "
            "Kinesis sequence number or a change-log position), TRIM_HORIZON, LATEST or SHARD_END",
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
    return [{"ts": iso(h.ts), "previous": h.previous, "sequence": h.sequence, "writer": h.writer,
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
    subs = dict(session.substores())
    if "postgres" in subs:  # the whole audit trail
        return subs["postgres"].history_at(key, at), "postgres checkpoint_history"
    entry = subs["redis"].history_at(key, at)
    return entry, "redis history stream" if entry else "redis history stream (capped: it keeps the newest entries only)"


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
                f"no history entry for {key} at or before {iso(at)} in the {where}. The consumer had no "
                "checkpoint then: to replay from the oldest record still in the stream use "
                "--to-sequence TRIM_HORIZON (see `checkpoints get` for the history that exists).",
                EXIT_NOT_FOUND,
            )
        target = normalize_sequence(entry.sequence, key=key.redis_key)
        note = f"rewind to {iso(at)}: {reason}"
        source = {"at": iso(at), "history_ts": iso(entry.ts), "history_writer": entry.writer, "from": where}
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
    # The forced history entry is the checkpoint's new replay mark (checkpoints/replay.py): a consumer whose sink
    # is not idempotent replays from here because of this rewind, once, where it refuses a foreign one.
    data["replay_allowed_from"] = target
    text += f"\n  replay allowed from {target}: consumers replay from here once, broadcasters included"
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
