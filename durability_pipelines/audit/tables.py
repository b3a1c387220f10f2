"""Checkpoint audit tables (pandas): what each store holds and whether that is healthy.

``checkpoint_audit``: one row per checkpoint key — Redis value, Postgres value, the sensor's dispatched
position, last ack time, lag, drift between the stores and a status: ``ok``, ``drifting``, ``stale``,
``dead-lettered``, ``regressed-externally`` (a store moved back by a write the project did not make),
``invalid`` (a value that is no position), ``wrong-type`` (a Redis key of another type) or
``unparseable`` (a ``checkpoint:*`` key that cannot be split without guessing). The stores are read
through ``checkpoints.inspect``: one picture, one definition of drift. For consumers whose server keeps a
log for them (a replication slot: the source config is ``BoundsRetainedLog``, the source
``ReportsBacklogBytes``), the row also shows the WAL the slot retains, with two more statuses:
``slot-lost`` (the slot is invalidated or missing: the consumer stops) and ``wal-retained`` (more than the
configured ``max_retained_wal_mb``: a warning, the disk fills while the consumer lags).

``checkpoint_history_summary``: per key, advances over time, regressions of the project's own writes
(must be 0: history is monotonic except for an operator's recorded ``--force``), foreign regressions
(moves back no recorded write explains), dead letters and trimmed-data gaps.

Both are persisted to Postgres tables of the same name (replaced on every materialization, in one
transaction) and returned as DataFrames. Positions are text (21-129 digits do not survive a float).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pandas as pd
import redis

from durability_pipelines.checkpoints.errors import DurabilityError
from durability_pipelines.checkpoints.inspect import (
    EXTERNAL_WRITER,
    KeyState,
    external_store,
    history_summary,
    snapshot,
)
from durability_pipelines.checkpoints.keys import CheckpointKey
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.cursor_mirror import CursorMirror
from durability_pipelines.consumer.dispatch import SensorCursor, shard_id
from durability_pipelines.consumer.source import BacklogBytes, BoundsRetainedLog, ReportsBacklogBytes
from durability_pipelines.consumer.storage import ConsumerStorage, ensure

if TYPE_CHECKING:
    from durability_pipelines.consumer.runtime import ConsumerRuntime

#: column -> (Postgres type, description shown in the UI)
AUDIT_COLUMNS: dict[str, tuple[str, str]] = {
    "checkpoint_key": ("text", "The Redis key (checkpoint:<adapter>:<stream>:<group>:<consumer>[:<shard>])"),
    "adapter": ("text", "dynamodb | supabase | another writer's adapter"),
    "stream": ("text", "Table (DynamoDB) or channel (Supabase)"),
    "grp": ("text", "Consumer group"),
    "consumer": ("text", "Consumer id within the group"),
    "shard": ("text", "Shard id ('' for the unsharded change feed)"),
    "backend": ("text", "The consumer's checkpoint backend, or the stores holding the key for unknown consumers"),
    "redis_value": ("text", "What Redis holds (garbage included; <redis hash> for a key of another type)"),
    "postgres_value": ("text", "What the checkpoints table holds"),
    "dispatched": ("text", "The acked position the sensor dispatched the in-flight run at"),
    "last_ack_at": ("timestamptz", "Newest recorded write of the key (Redis history or Postgres ts)"),
    "lag_seconds": ("double precision", "Seconds since that write"),
    "drift": ("text", "How far Postgres and Redis differ (positions, as text)"),
    "acks_since_flush": ("bigint", "Hybrid: acks since the last flush to Postgres"),
    "retained_wal_bytes": ("bigint", "WAL the consumer's replication slot keeps the server from recycling (supabase_wal)"),
    "status": ("text", "ok | drifting | stale | dead-lettered | regressed-externally | invalid | wrong-type | "
                       "unparseable | slot-lost | wal-retained"),
    "detail": ("text", "What is wrong and what to do"),
}
SUMMARY_COLUMNS: dict[str, tuple[str, str]] = {
    "adapter": ("text", "dynamodb | supabase"), "stream": ("text", "Table or channel"), "grp": ("text", "Group"),
    "consumer": ("text", "Consumer id"), "shard": ("text", "Shard id"),
    "advances": ("bigint", "Recorded writes"),
    "first_advance_at": ("timestamptz", "First recorded write"),
    "last_advance_at": ("timestamptz", "Newest recorded write"),
    "advances_last_hour": ("bigint", "Recorded writes in the last hour"),
    "regressions": ("bigint", "Project writes that moved the checkpoint back (must be 0)"),
    "external_regressions": ("bigint", "Moves back no recorded write explains (another worker), all time"),
    "external_regressions_recent": ("bigint", "The same, within the audit window"),
    "forced_moves": ("bigint", "Operator moves (checkpoints set --force / rewind)"),
    "dead_letters": ("bigint", "Dead letters, all statuses"),
    "open_dead_letters": ("bigint", "Dead letters still stopping the shard"),
    "trimmed_gaps": ("bigint", "Records the stream no longer had, skipped by policy"),
}



@dataclass(frozen=True)
class AuditThresholds:
    stale_after_s: float = 300.0  # backlog and no ack for longer than this: stale
    default_flush_every_n: int = 100
    default_flush_every_s: float = 5.0
    external_window_s: float = 86_400.0  # a foreign regression keeps its key flagged this long


@dataclass(frozen=True)
class RetainedLog:
    """What a consumer's server keeps for it (its replication slot), as the audit reports it."""

    consumer: str
    key: CheckpointKey
    backlog: BacklogBytes | None
    #: the slot could not be measured (missing, database down): the consumer cannot read either
    problem: str | None = None

    @property
    def lost(self) -> str | None:
        if self.problem:
            return self.problem
        if self.backlog is not None and self.backlog.lost:
            return f"the slot was invalidated ({self.backlog.lost})"
        return None


def measure_retained_log(consumers: Sequence[ConsumerConfig],
                         open_runtime: Callable[[ConsumerConfig], ConsumerRuntime]) -> dict[str, RetainedLog]:
    """Per checkpoint key (Redis form), the log retained for each consumer whose source config bounds it
    (``BoundsRetainedLog``: only those are opened; opening a DynamoDB source calls AWS). A consumer that
    cannot be measured is reported with its problem, never skipped, and never stops the others."""
    out: dict[str, RetainedLog] = {}
    for cfg in consumers:
        if not isinstance(cfg.source, BoundsRetainedLog):  # a capability (Protocol), not a concrete class
            continue
        key = CheckpointKey(cfg.adapter, cfg.stream, cfg.group, cfg.consumer, None)
        try:
            rt = open_runtime(cfg)
        except DurabilityError as exc:
            out[key.redis_key] = RetainedLog(cfg.name, key, None, f"{type(exc).__name__}: {exc}")
            continue
        try:
            if not isinstance(rt.source, ReportsBacklogBytes):
                continue
            for shard in rt.source.list_shards():
                key = rt.key(shard)
                try:
                    try:
                        checkpoint = rt.store.load(key)
                    except DurabilityError:
                        checkpoint = None  # the audit row names the store's problem; the slot is measured anyway
                    out[key.redis_key] = RetainedLog(cfg.name, key, rt.source.backlog_bytes(shard, checkpoint))
                except DurabilityError as exc:
                    out[key.redis_key] = RetainedLog(cfg.name, key, None, f"{type(exc).__name__}: {exc}")
        finally:
            rt.close()
    return out


def _slot_status(slot: RetainedLog | None) -> tuple[str, str] | None:
    if slot is None:
        return None
    if slot.lost:
        return "slot-lost", (f"consumer {slot.consumer} cannot read its replication slot: {slot.lost}. It stops "
                             "(trim_policy fail) or records a gap (skip). See `durability-pipelines wal status` and "
                             "docs/supabase.md, \"Operating it\" (wal drop, wal install, a deliberate checkpoint).")
    backlog = slot.backlog
    if backlog is not None and backlog.over_bound:
        return "wal-retained", (
            f"the replication slot of consumer {slot.consumer} retains {backlog.retained_bytes} bytes of WAL, above "
            f"max_retained_wal_mb ({backlog.max_retained_bytes} bytes): the server's disk fills while the consumer "
            "lags, and beyond max_slot_wal_keep_size the server invalidates the slot (changes lost for the "
            "consumer). Is the consumer running and acking (its lag check)? Retire it with `durability-pipelines "
            "wal drop` if it is gone for good.")
    return None


def _consumer_for(configs: Sequence[ConsumerConfig], key: CheckpointKey | None) -> ConsumerConfig | None:
    if key is None:
        return None
    for c in configs:
        if (c.adapter, c.stream, c.group, c.consumer) == (key.adapter, key.stream, key.group, key.consumer):
            return c
    return None


def _cursors(client: redis.Redis, db: PostgresConnection) -> dict[str, SensorCursor]:
    raw = ConsumerStorage(db).all_cursors()
    mirror = CursorMirror(client, None)
    raw.update({name: c for name, c in mirror.load_all().items()})  # Redis is written first each tick
    return {name: SensorCursor.from_json(c) for name, c in raw.items()}


def _foreign(st: KeyState, since: datetime) -> str | None:
    """Why this key is flagged as moved back by another writer, or None."""
    found = [r.describe() for r in st.external_regressions]  # not recorded yet (the mirror records them)
    recorded = list(st.external_writes)  # recorded in Postgres within the audit window
    head = st.redis_last_write  # recorded in Redis by a save (or the mirror) and not moved past yet
    if head is not None and head.writer == EXTERNAL_WRITER and head.at is not None and head.at >= since:
        recorded.append(head)
    seen: set[tuple[str, str | None, str]] = set()
    for w in recorded:
        name = (external_store(w.reason) or "a store").capitalize()
        if (name, w.previous, w.sequence) in seen or w.at is None:
            continue
        seen.add((name, w.previous, w.sequence))
        line = (f"{name} moved back from {w.previous} to {w.sequence} by a write the project did not make "
                f"(seen {w.at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}Z)")
        if line not in found:
            found.append(line)
    if not found:
        return None
    return ("; ".join(found) + ". The project leaves the key as found (its consumer goes on from the lower "
            "position, replaying what that write asked for). If that write was wrong, put the position "
            f"back with `durability-pipelines checkpoints repair {st.redis_key}`; if it was deliberate (another "
            "worker rewound it), nothing to do: the flag clears after the audit window.")


def _status(st: KeyState, cfg: ConsumerConfig | None, sc: object, lag: float | None, n_dead: int,
            thresholds: AuditThresholds, now: datetime, slot: RetainedLog | None = None) -> tuple[str, str]:
    if st.key is None:
        return "unparseable", (f"{st.parse_error}. Nothing copies or reads this key; if it is yours, move it to a key "
                               "of the layout; if another program owns it, ignore it.")
    if st.redis is not None and st.redis.problem == "wrong-type":
        return "wrong-type", (f"Redis holds a {st.redis.raw[7:-1]} at this key, not a position. Replace it with "
                              "`durability-pipelines checkpoints set ... --sequence <position> --force` (hybrid "
                              "consumers replace it themselves at their next ack).")
    invalid = [name for name, v in (("redis", st.redis), ("postgres", st.postgres)) if v is not None and v.problem]
    if invalid:
        return "invalid", (f"not a position in {', '.join(invalid)}: set a valid one with `durability-pipelines "
                           "checkpoints set ... --force`")
    slot_status = _slot_status(slot)
    if slot_status is not None and slot_status[0] == "slot-lost":
        return slot_status
    foreign = _foreign(st, now - timedelta(seconds=thresholds.external_window_s))
    if foreign:
        return "regressed-externally", foreign
    if n_dead:
        return "dead-lettered", f"{n_dead} open dead letter(s): shard stopped (`durability-pipelines dead-letters list`)"
    if slot_status is not None:
        return slot_status
    if getattr(sc, "backlog", False) and lag is not None and lag > thresholds.stale_after_s:
        return "stale", f"backlog and no ack for {lag:.0f} s: is the sensor running, are runs failing?"
    n = cfg.checkpoint.flush_every_n if cfg else thresholds.default_flush_every_n
    t = cfg.checkpoint.flush_every_s if cfg else thresholds.default_flush_every_s
    drift_kind, gap = st.drift
    flush_age = (now - st.flushed_at).total_seconds() if st.flushed_at else None
    if drift_kind.value == "redis-ahead" and gap and (
            (st.acks_since_flush is not None and st.acks_since_flush >= n) or (flush_age is not None and flush_age > t)):
        return "drifting", f"Postgres behind Redis beyond the hybrid bound ({n} acks / {t} s): is Postgres reachable?"
    return "ok", ""


def build_checkpoint_audit(client: redis.Redis, db: PostgresConnection, consumers: Sequence[ConsumerConfig],
                           thresholds: AuditThresholds = AuditThresholds(),
                           now: datetime | None = None,
                           retained: Mapping[str, RetainedLog] | None = None) -> pd.DataFrame:
    """``retained``: ``measure_retained_log``'s figures (the slots), by checkpoint key; a slot whose consumer
    has no checkpoint yet gets a row of its own (a new slot retains WAL from its creation)."""
    ensure(db)
    retained = dict(retained or {})
    now = now or datetime.now(timezone.utc)
    states = snapshot(client, db, external_since=now - timedelta(seconds=thresholds.external_window_s))
    with db.connection() as conn:
        open_dl = conn.execute(
            "SELECT consumer, shard, count(*) FROM dead_letters WHERE status = 'open' GROUP BY consumer, shard"
        ).fetchall()
    dead = {(c, s): n for c, s, n in open_dl}
    cursors = _cursors(client, db)
    records = []
    for st in states:
        key = st.key
        cfg = _consumer_for(consumers, key)
        cursor = cursors.get(f"{cfg.name}_sensor") if cfg else None
        sc = cursor.shards.get(shard_id(key.shard)) if cursor and key else None
        last_ack = st.last_ack_at
        lag = (now - last_ack).total_seconds() if last_ack else None
        n_dead = dead.get((cfg.name, key.shard_column), 0) if cfg and key else 0
        slot = retained.pop(st.redis_key, None)
        status, detail = _status(st, cfg, sc, lag, n_dead, thresholds, now, slot)
        _, gap = st.drift
        stores = "+".join(n for n, v in (("redis", st.redis), ("postgres", st.postgres)) if v is not None)
        records.append({
            "checkpoint_key": st.redis_key,
            "adapter": key.adapter if key else "", "stream": key.stream if key else "",
            "grp": key.group if key else "", "consumer": key.consumer if key else "",
            "shard": key.shard_column if key else "",
            "backend": cfg.checkpoint.backend if cfg else stores,
            "redis_value": st.redis.raw if st.redis else None,
            "postgres_value": st.postgres.raw if st.postgres else None,
            "dispatched": sc.dispatched if sc else None,
            "last_ack_at": last_ack, "lag_seconds": round(lag, 3) if lag is not None else None,
            "drift": str(gap) if gap is not None else "",
            "acks_since_flush": st.acks_since_flush,
            "retained_wal_bytes": slot.backlog.retained_bytes if slot and slot.backlog else None,
            "status": status, "detail": detail,
        })
    for redis_key, slot in retained.items():  # slots whose consumer has no checkpoint in any store
        k = slot.key
        cfg = _consumer_for(consumers, k)
        status, detail = _slot_status(slot) or ("ok", "")
        records.append({
            "checkpoint_key": redis_key, "adapter": k.adapter, "stream": k.stream, "grp": k.group,
            "consumer": k.consumer, "shard": k.shard_column, "backend": cfg.checkpoint.backend if cfg else "",
            "redis_value": None, "postgres_value": None, "dispatched": None, "last_ack_at": None,
            "lag_seconds": None, "drift": "", "acks_since_flush": None,
            "retained_wal_bytes": slot.backlog.retained_bytes if slot.backlog else None,
            "status": status, "detail": detail or "no checkpoint yet; the slot retains WAL from its creation",
        })
    df = pd.DataFrame.from_records(records, columns=list(AUDIT_COLUMNS))
    return df.astype({"drift": "object", "acks_since_flush": "object", "redis_value": "object",
                      "postgres_value": "object", "dispatched": "object", "retained_wal_bytes": "object"})


def build_history_summary(db: PostgresConnection, *, window_s: float = AuditThresholds.external_window_s
                          ) -> pd.DataFrame:
    ensure(db)
    with db.connection() as conn:
        since = datetime.now(timezone.utc) - timedelta(seconds=window_s)
        cols, rows = history_summary(conn, external_since=since)
        hist = pd.DataFrame(rows, columns=cols)
        dls = pd.DataFrame(conn.execute(
            "SELECT adapter, stream, grp, shard, count(*) AS dead_letters, "
            "count(*) FILTER (WHERE status = 'open') AS open_dead_letters "
            "FROM dead_letters GROUP BY adapter, stream, grp, shard").fetchall(),
            columns=["adapter", "stream", "grp", "shard", "dead_letters", "open_dead_letters"])
        gaps = pd.DataFrame(conn.execute(
            "SELECT adapter, stream, grp, shard, count(*) AS trimmed_gaps FROM stream_gaps "
            "GROUP BY adapter, stream, grp, shard").fetchall(),
            columns=["adapter", "stream", "grp", "shard", "trimmed_gaps"])
    on = ["adapter", "stream", "grp", "shard"]
    out = hist.merge(dls, on=on, how="left").merge(gaps, on=on, how="left")
    for col in ("dead_letters", "open_dead_letters", "trimmed_gaps", "regressions", "external_regressions",
                "external_regressions_recent", "forced_moves", "advances", "advances_last_hour"):
        out[col] = out[col].fillna(0).astype("int64")
    return out.reindex(columns=list(SUMMARY_COLUMNS))


def persist(db: PostgresConnection, table: str, df: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> None:
    """Replace ``table``'s rows with ``df`` in one transaction (readers never see it half-written).

    The table is derived (rebuilt on every materialization), so a table of an older layout is simply
    dropped and created again.
    """
    from psycopg import sql

    ident = sql.Identifier(table)
    col_defs = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, (t, _) in columns.items())
    names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    marks = sql.SQL(", ").join(sql.Placeholder() for _ in columns)
    rows = [tuple(_py(v) for v in row) for row in df[list(columns)].itertuples(index=False, name=None)]
    with db.connection() as conn, conn.transaction():
        found = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = %s ORDER BY ordinal_position", (table,)).fetchall()
        if found and [c for c, _ in found] != list(columns):
            conn.execute(sql.SQL("DROP TABLE {}").format(ident))
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(ident, col_defs))
        conn.execute(sql.SQL("DELETE FROM {}").format(ident))
        if rows:
            with conn.cursor() as cur:
                cur.executemany(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(ident, names, marks), rows)


def _py(v: object) -> object:
    if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NaT:
        return None
    if hasattr(v, "item"):
        return v.item()  # numpy scalar -> Python
    if isinstance(v, pd.Timestamp):
        return v.to_pydatetime()
    return v


def _cell(v: object) -> str:
    """How a value shows in the UI's markdown preview: never a float for a position, never nan."""
    v = _py(v)
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, datetime):
        return v.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(v)


def markdown_preview(df: pd.DataFrame, rows: int = 20) -> str:
    """A markdown table of the first rows (tabulate ships with Dagster), every cell as text."""
    if df.empty:
        return "_no rows_"
    return df.head(rows).map(_cell).to_markdown(index=False, disable_numparse=True)
