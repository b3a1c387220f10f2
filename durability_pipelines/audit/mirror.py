"""Redis <-> Postgres checkpoint mirror (the hybrid pattern's scheduled half).

* Redis -> Postgres: ``SCAN checkpoint:*`` + pipelined ``MGET`` + one guarded
  bulk upsert per batch (no per-row round trips).  The guard is the same
  ordering as every save, so Postgres never moves backwards, and each advance
  appends a ``checkpoint_history`` row (writer ``mirror``).
* Postgres -> Redis: keys missing in Redis (lost, flushed, restarted) or
  behind Postgres are restored through the monotonic Lua save, so Redis never
  moves backwards either.
* Sensor cursors: a cursor present in only one store is copied to the other.

Safe to run concurrently with consumers and with itself: every write is a
monotonic compare-and-set, and each batch locks rows in key order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis

from durability_pipelines.checkpoints.errors import InvalidSequenceError
from durability_pipelines.checkpoints.keys import REDIS_PREFIX, CheckpointKey
from durability_pipelines.checkpoints.ordering import (
    fast_sequence,
    normalize_sequence,
    sequence_gap,
    sort_key,
)
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.checkpoints.redis_store import SAVE_LUA
from durability_pipelines.consumer.storage import ensure


def drift(a: str | None, b: str | None) -> int:
    """Distance between two stores' values of one key (0 when equal or not comparable)."""
    if a is None or b is None or a == b:
        return 0
    if a.isdigit() and b.isdigit():  # canonical numbers: the common case, kept cheap
        return abs(int(a) - int(b))
    return max(sequence_gap(a, b) or 0, sequence_gap(b, a) or 0)

CURSOR_PREFIX = "durability:sensor_cursor"
MIRROR_WRITER = "mirror"

# One statement per batch. The history's previous value comes from a correlated lookup by primary
# key: every part of a data-modifying WITH sees the statement's snapshot, i.e. the row as it was
# before this upsert (NULL for a new key). (A join against a CTE of old rows made the planner pick
# a nested loop: quadratic in the batch size.)
_UPSERT_CTES = """
WITH k AS (
  SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
    AS k(adapter, stream, grp, consumer, shard, sequence)
), up AS (
  INSERT INTO checkpoints AS c (adapter, stream, grp, consumer, shard, sequence, ts)
  SELECT adapter, stream, grp, consumer, shard, sequence, NOW() FROM k
  ORDER BY adapter, stream, grp, consumer, shard
  ON CONFLICT (adapter, stream, grp, consumer, shard) DO UPDATE
    SET sequence = EXCLUDED.sequence, ts = NOW()
    WHERE durability_sequence_rank(c.sequence) < durability_sequence_rank(EXCLUDED.sequence)
  RETURNING c.adapter, c.stream, c.grp, c.consumer, c.shard, c.sequence
)"""
_BULK_UPSERT_SQL = _UPSERT_CTES + """, hist AS (
  INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence, new_sequence,
                                  writer, reason)
  SELECT up.adapter, up.stream, up.grp, up.consumer, up.shard,
         (SELECT o.sequence FROM checkpoints o
           WHERE o.adapter = up.adapter AND o.stream = up.stream AND o.grp = up.grp
             AND o.consumer = up.consumer AND o.shard = up.shard),
         up.sequence, %s, 'mirror redis->postgres'
  FROM up
  RETURNING 1
)
SELECT count(*) FROM hist
"""
# The same guarded upsert without history rows (``record_history=False``): half the writes.
_BULK_UPSERT_NO_HISTORY_SQL = _UPSERT_CTES + "\nSELECT count(*) FROM up\n"


@dataclass
class MirrorReport:
    redis_keys: int = 0
    postgres_keys: int = 0
    mirrored_to_postgres: int = 0  # Postgres rows advanced (or created) from Redis
    restored_to_redis: int = 0  # Redis keys created or advanced from Postgres
    largest_drift: int = 0  # max numeric gap between the stores before mirroring
    cursors_mirrored: int = 0
    invalid: list[str] = field(default_factory=list)  # keys skipped: not a valid sequence (named, not fatal)
    duration_s: float = 0.0

    def as_metadata(self) -> dict[str, float | int]:
        return {
            "redis_keys": self.redis_keys,
            "postgres_keys": self.postgres_keys,
            "keys_mirrored": self.mirrored_to_postgres,
            "keys_restored": self.restored_to_redis,
            "largest_drift": self.largest_drift,
            "cursors_mirrored": self.cursors_mirrored,
            "invalid_values": len(self.invalid),
            "duration_s": round(self.duration_s, 3),
        }


def _decode(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _canonical(raw: bytes | str) -> str | None:
    """Canonical sequence, or None when invalid; a fast path for the common canonical number."""
    fast = fast_sequence(raw)
    if fast is not None:
        return fast
    try:
        return normalize_sequence(raw)
    except InvalidSequenceError:
        return None


class CheckpointMirror:
    def __init__(self, client: redis.Redis, db: PostgresConnection, *, batch_size: int = 5000,
                 scan_count: int = 1000, record_history: bool = True) -> None:
        """``record_history=False`` skips the ``checkpoint_history`` row per mirrored advance:
        about half the Postgres writes, for deployments whose acks already write history
        (postgres or hybrid backends) and only need the mirror as a safety net."""
        self.client = client
        self.record_history = record_history
        self.db = db
        self.batch_size = batch_size
        self.scan_count = scan_count
        self._save = client.register_script(SAVE_LUA)

    def run(self) -> MirrorReport:
        ensure(self.db)
        start = time.perf_counter()
        report = MirrorReport()
        postgres_before = self._postgres_values(report)
        redis_values = self._redis_to_postgres(report)
        self._postgres_to_redis(postgres_before, redis_values, report)
        report.cursors_mirrored = self._mirror_cursors()
        report.duration_s = time.perf_counter() - start
        return report

    # -- Redis -> Postgres ------------------------------------------------------------
    def _scan_batches(self):
        batch: list[bytes] = []
        for raw in self.client.scan_iter(match=f"{REDIS_PREFIX}:*", count=self.scan_count):
            batch.append(raw)
            if len(batch) >= self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _redis_to_postgres(self, report: MirrorReport) -> dict[str, str]:
        """Returns ``{redis key: canonical value}`` of every valid checkpoint seen in Redis.

        Works on plain strings, not ``CheckpointKey`` objects: at 100k keys per run the
        per-key validation cost would dominate, and these keys are already in the shared layout.
        """
        seen: dict[str, str] = {}
        for raw_keys in self._scan_batches():
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, len(raw_keys), 1000):
                pipe.mget(raw_keys[i : i + 1000])
            values = [v for chunk in pipe.execute() for v in chunk]
            rows: list[tuple[str, ...]] = []
            for raw_key, raw_value in zip(raw_keys, values, strict=True):
                if raw_value is None:
                    continue  # expired between SCAN and MGET
                rkey = _decode(raw_key)
                if rkey in seen:
                    continue  # SCAN may return a key twice
                parts = rkey.split(":")
                if len(parts) not in (5, 6) or "" in parts:
                    continue  # not a checkpoint key of this layout
                value = _canonical(raw_value)
                if value is None:
                    report.invalid.append(rkey)
                    continue
                seen[rkey] = value
                rows.append((parts[1], parts[2], parts[3], parts[4], parts[5] if len(parts) == 6 else "", value))
            report.redis_keys += len(rows)
            if rows:
                rows.sort()
                cols = [list(c) for c in zip(*rows, strict=True)]
                with self.db.connection() as conn:
                    if self.record_history:
                        (advanced,) = conn.execute(_BULK_UPSERT_SQL, [*cols, MIRROR_WRITER]).fetchone()
                    else:
                        (advanced,) = conn.execute(_BULK_UPSERT_NO_HISTORY_SQL, cols).fetchone()
                report.mirrored_to_postgres += int(advanced)
        return seen

    # -- Postgres -> Redis ------------------------------------------------------------
    def _postgres_values(self, report: MirrorReport) -> dict[str, str]:
        with self.db.connection() as conn:
            rows = conn.execute("SELECT adapter, stream, grp, consumer, shard, sequence FROM checkpoints").fetchall()
        report.postgres_keys = len(rows)
        values: dict[str, str] = {}
        for adapter, stream, grp, consumer, shard, sequence in rows:
            parts = (adapter, stream, grp, consumer) + ((shard,) if shard else ())
            if any(":" in p or not p for p in parts):
                report.invalid.append(f"postgres:{'/'.join(parts)}")  # cannot be expressed as a Redis key
                continue
            value = _canonical(sequence)
            rkey = f"{REDIS_PREFIX}:" + ":".join(parts)
            if value is None:
                report.invalid.append(f"postgres:{rkey}")
                continue
            values[rkey] = value
        return values

    def _postgres_to_redis(self, postgres_before: dict[str, str], redis_values: dict[str, str],
                           report: MirrorReport) -> None:
        """Restore keys Redis lacks or holds behind Postgres (as Postgres was before this run)."""
        to_restore: list[tuple[CheckpointKey, str]] = []
        for rkey, value in postgres_before.items():
            in_redis = redis_values.get(rkey)
            if in_redis is not None:
                if in_redis == value:
                    continue
                report.largest_drift = max(report.largest_drift, drift(value, in_redis))
            if in_redis is None or sort_key(in_redis) < sort_key(value):
                to_restore.append((CheckpointKey.parse(rkey), value))
        for i in range(0, len(to_restore), 1000):
            pipe = self.client.pipeline(transaction=False)
            chunk = to_restore[i : i + 1000]
            for key, value in chunk:
                self._save(
                    keys=[key.redis_key, key.lease_key.redis_key, key.history_key],
                    args=[value, MIRROR_WRITER, "", "", "", "mirror postgres->redis", "1000"],
                    client=pipe,
                )
            results = pipe.execute(raise_on_error=False)
            for result in results:
                if isinstance(result, list) and _decode(result[0]) == "advanced":
                    report.restored_to_redis += 1
                elif isinstance(result, Exception):
                    report.invalid.append(str(result)[:200])

    # -- sensor cursors ---------------------------------------------------------------
    def _mirror_cursors(self) -> int:
        in_redis: dict[str, str] = {}
        keys = list(self.client.scan_iter(match=f"{CURSOR_PREFIX}:*", count=self.scan_count))
        if keys:
            for k, v in zip(keys, self.client.mget(keys), strict=True):
                if v is not None:
                    in_redis[_decode(k)[len(CURSOR_PREFIX) + 1 :]] = _decode(v)
        with self.db.connection() as conn:
            in_pg = dict(conn.execute("SELECT sensor_name, cursor FROM sensor_cursors").fetchall())
            only_redis = {n: c for n, c in in_redis.items() if n not in in_pg}
            if only_redis:
                names, cursors = zip(*only_redis.items(), strict=True)
                conn.execute(
                    "INSERT INTO sensor_cursors (sensor_name, cursor) SELECT * FROM unnest(%s::text[], %s::text[]) "
                    "ON CONFLICT (sensor_name) DO NOTHING",
                    (list(names), list(cursors)),
                )
        only_pg = {n: c for n, c in in_pg.items() if n not in in_redis}
        if only_pg:
            pipe = self.client.pipeline(transaction=False)
            for name, cursor in only_pg.items():
                pipe.set(f"{CURSOR_PREFIX}:{name}", cursor, nx=True)
            pipe.execute()
        return len(only_redis) + len(only_pg)
