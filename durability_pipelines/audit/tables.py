"""Checkpoint audit tables (pandas): what each store holds and whether that is healthy.

``checkpoint_audit``: one row per checkpoint key — Redis value, Postgres value,
the sensor's dispatched position, last ack time, lag, drift between the
stores and a status (ok / drifting / stale / dead-lettered).

``checkpoint_history_summary``: per key, advances over time, regressions
(must be 0: history is monotonic except for an operator's recorded
``--force``), dead letters and trimmed-data gaps.

Both are persisted to Postgres tables of the same name (replaced on every
materialization, in one transaction) and returned as DataFrames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd
import redis

from durability_pipelines.audit.mirror import CURSOR_PREFIX, drift
from durability_pipelines.checkpoints.base import FORCED_REASON_PREFIX  # `set --force` / `rewind` rows
from durability_pipelines.checkpoints.errors import InvalidSequenceError
from durability_pipelines.checkpoints.keys import REDIS_PREFIX, CheckpointKey
from durability_pipelines.checkpoints.ordering import normalize_sequence
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.dispatch import SensorCursor, shard_id
from durability_pipelines.consumer.storage import ensure

AUDIT_COLUMNS = {
    "checkpoint_key": "text", "adapter": "text", "stream": "text", "grp": "text", "consumer": "text",
    "shard": "text", "backend": "text", "redis_value": "text", "postgres_value": "text", "dispatched": "text",
    "last_ack_at": "timestamptz", "lag_seconds": "double precision", "drift": "numeric",
    "acks_since_flush": "bigint", "status": "text", "detail": "text",
}
SUMMARY_COLUMNS = {
    "adapter": "text", "stream": "text", "grp": "text", "consumer": "text", "shard": "text",
    "advances": "bigint", "first_advance_at": "timestamptz", "last_advance_at": "timestamptz",
    "advances_last_hour": "bigint", "regressions": "bigint", "forced_moves": "bigint",
    "dead_letters": "bigint", "open_dead_letters": "bigint", "trimmed_gaps": "bigint",
}

_SUMMARY_SQL = """
WITH h AS (
  SELECT adapter, stream, grp, consumer, shard, ts, reason,
         durability_sequence_rank(new_sequence)
           <= lag(durability_sequence_rank(new_sequence)) OVER w AS went_back
  FROM checkpoint_history
  WINDOW w AS (PARTITION BY adapter, stream, grp, consumer, shard ORDER BY id)
)
SELECT adapter, stream, grp, consumer, shard,
       count(*) AS advances, min(ts) AS first_advance_at, max(ts) AS last_advance_at,
       count(*) FILTER (WHERE ts > NOW() - interval '1 hour') AS advances_last_hour,
       count(*) FILTER (WHERE went_back AND coalesce(reason, '') NOT LIKE %(forced)s) AS regressions,
       count(*) FILTER (WHERE coalesce(reason, '') LIKE %(forced)s) AS forced_moves
FROM h GROUP BY adapter, stream, grp, consumer, shard
"""


@dataclass(frozen=True)
class AuditThresholds:
    stale_after_s: float = 300.0  # backlog and no ack for longer than this: stale
    default_flush_every_n: int = 100
    default_flush_every_s: float = 5.0


def _dec(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def _consumer_for(configs: Sequence[ConsumerConfig], key: CheckpointKey) -> ConsumerConfig | None:
    for c in configs:
        if (c.adapter, c.stream, c.group, c.consumer) == (key.adapter, key.stream, key.group, key.consumer):
            return c
    return None


def _cursors(client: redis.Redis, db: PostgresConnection) -> dict[str, SensorCursor]:
    raw: dict[str, str] = {}
    with db.connection() as conn:
        raw.update(conn.execute("SELECT sensor_name, cursor FROM sensor_cursors").fetchall())
    keys = list(client.scan_iter(match=f"{CURSOR_PREFIX}:*", count=1000))
    if keys:
        for k, v in zip(keys, client.mget(keys), strict=True):
            if v is not None:
                raw[_dec(k)[len(CURSOR_PREFIX) + 1 :]] = _dec(v)  # Redis is written first each tick
    return {name: SensorCursor.from_json(c) for name, c in raw.items()}


def build_checkpoint_audit(client: redis.Redis, db: PostgresConnection, consumers: Sequence[ConsumerConfig],
                           thresholds: AuditThresholds = AuditThresholds(),
                           now: datetime | None = None) -> pd.DataFrame:
    ensure(db)
    now = now or datetime.now(timezone.utc)
    redis_keys = [k for k in client.scan_iter(match=f"{REDIS_PREFIX}:*", count=1000)]
    redis_vals: dict[CheckpointKey, str] = {}
    for i in range(0, len(redis_keys), 1000):
        chunk = redis_keys[i : i + 1000]
        for raw_key, raw_val in zip(chunk, client.mget(chunk), strict=True):
            try:
                key = CheckpointKey.parse(raw_key)
            except ValueError:
                continue
            if raw_val is not None:
                redis_vals[key] = _dec(raw_val) or ""
    with db.connection() as conn:
        pg_rows = conn.execute("SELECT adapter, stream, grp, consumer, shard, sequence, ts FROM checkpoints").fetchall()
        open_dl = conn.execute(
            "SELECT consumer, shard, count(*) FROM dead_letters WHERE status = 'open' GROUP BY consumer, shard"
        ).fetchall()
    pg_vals: dict[CheckpointKey, tuple[str, datetime]] = {}
    for r in pg_rows:
        try:
            pg_vals[CheckpointKey.from_row(*r[:5])] = (r[5], r[6])
        except ValueError:
            continue
    dead = {(c, s): n for c, s, n in open_dl}
    cursors = _cursors(client, db)
    keys = sorted(set(redis_vals) | set(pg_vals))

    # Last ack per key: the newest entry of its Redis history stream, pipelined; hybrid flush state too.
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.xrevrange(k.history_key, count=1)
        pipe.hmget(k.hybrid_state_key, "acks", "flushed_ms")
    replies = pipe.execute() if keys else []

    records = []
    for i, key in enumerate(keys):
        hist, (acks, flushed_ms) = replies[2 * i], replies[2 * i + 1]
        r_val = redis_vals.get(key)
        p_val, p_ts = pg_vals.get(key, (None, None))
        invalid = []
        for name, v in (("redis", r_val), ("postgres", p_val)):
            if v is not None:
                try:
                    normalize_sequence(v)
                except InvalidSequenceError:
                    invalid.append(name)
        last_ack = p_ts
        if hist:
            ms = int(_dec(hist[0][0]).split("-")[0])
            redis_ack = datetime.fromtimestamp(ms / 1000, timezone.utc)
            last_ack = max(filter(None, [last_ack, redis_ack]))
        cfg = _consumer_for(consumers, key)
        cursor = cursors.get(f"{cfg.name}_sensor") if cfg else None
        sc = cursor.shards.get(shard_id(key.shard)) if cursor else None
        lag = (now - last_ack).total_seconds() if last_ack else None
        d = 0 if invalid else drift(r_val, p_val)
        acks_n = int(acks) if acks is not None else None
        n = cfg.checkpoint.flush_every_n if cfg else thresholds.default_flush_every_n
        t = cfg.checkpoint.flush_every_s if cfg else thresholds.default_flush_every_s
        flush_age = (now.timestamp() * 1000 - int(flushed_ms)) / 1000 if flushed_ms else None
        n_dead = dead.get((cfg.name, key.shard_column), 0) if cfg else 0
        if invalid:
            status, detail = "invalid", f"unparseable value in {', '.join(invalid)}"
        elif n_dead:
            status, detail = "dead-lettered", f"{n_dead} open dead letter(s): shard stopped"
        elif sc is not None and sc.backlog and lag is not None and lag > thresholds.stale_after_s:
            status, detail = "stale", f"backlog and no ack for {lag:.0f} s"
        elif r_val is not None and p_val is not None and d > 0 and (
            (acks_n is not None and acks_n >= n) or (flush_age is not None and flush_age > t)
        ):
            status, detail = "drifting", f"Postgres behind Redis beyond the hybrid bound ({n} acks / {t} s)"
        else:
            status, detail = "ok", ""
        records.append({
            "checkpoint_key": key.redis_key, "adapter": key.adapter, "stream": key.stream, "grp": key.group,
            "consumer": key.consumer, "shard": key.shard_column,
            "backend": cfg.checkpoint.backend if cfg else ("hybrid" if r_val and p_val else "redis" if r_val else "postgres"),
            "redis_value": r_val, "postgres_value": p_val, "dispatched": sc.dispatched if sc else None,
            "last_ack_at": last_ack, "lag_seconds": round(lag, 3) if lag is not None else None, "drift": d,
            "acks_since_flush": acks_n, "status": status, "detail": detail,
        })
    return pd.DataFrame.from_records(records, columns=list(AUDIT_COLUMNS))


def build_history_summary(db: PostgresConnection) -> pd.DataFrame:
    ensure(db)
    with db.connection() as conn:
        cur = conn.execute(_SUMMARY_SQL, {"forced": FORCED_REASON_PREFIX + "%"})
        cols = [c.name for c in cur.description or []]
        hist = pd.DataFrame(cur.fetchall(), columns=cols)
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
    for col in ("dead_letters", "open_dead_letters", "trimmed_gaps"):
        out[col] = out[col].fillna(0).astype("int64")
    return out.reindex(columns=list(SUMMARY_COLUMNS))


def persist(db: PostgresConnection, table: str, df: pd.DataFrame, columns: dict[str, str]) -> None:
    """Replace ``table``'s rows with ``df`` in one transaction (readers never see it half-written)."""
    from psycopg import sql

    ident = sql.Identifier(table)
    col_defs = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in columns.items())
    names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    marks = sql.SQL(", ").join(sql.Placeholder() for _ in columns)
    rows = [tuple(_py(v) for v in row) for row in df[list(columns)].itertuples(index=False, name=None)]
    with db.connection() as conn, conn.transaction():
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


def markdown_preview(df: pd.DataFrame, rows: int = 20) -> str:
    """A markdown table of the first rows (tabulate ships with Dagster)."""
    return df.head(rows).to_markdown(index=False) if not df.empty else "_no rows_"
