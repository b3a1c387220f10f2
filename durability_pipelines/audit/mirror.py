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
from durability_pipelines.checkpoints.ordering import normalize_sequence, sequence_gap, sort_key
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.checkpoints.redis_store import SAVE_LUA
from durability_pipelines.consumer.storage import ensure


def drift(a: str | None, b: str | None) -> int:
    """Distance between two stores' values of one key (0 when equal or not comparable)."""
    return max(sequence_gap(a, b) or 0, sequence_gap(b, a) or 0)

CURSOR_PREFIX = "durability:sensor_cursor"
MIRROR_WRITER = "mirror"

_BULK_UPSERT_SQL = """
WITH k AS (
  SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
    AS k(adapter, stream, grp, consumer, shard, sequence)
), old AS (
  SELECT c.adapter, c.stream, c.grp, c.consumer, c.shard, c.sequence
  FROM checkpoints c JOIN k USING (adapter, stream, grp, consumer, shard)
), up AS (
  INSERT INTO checkpoints AS c (adapter, stream, grp, consumer, shard, sequence, ts)
  SELECT adapter, stream, grp, consumer, shard, sequence, NOW() FROM k
  ORDER BY adapter, stream, grp, consumer, shard
  ON CONFLICT (adapter, stream, grp, consumer, shard) DO UPDATE
    SET sequence = EXCLUDED.sequence, ts = NOW()
    WHERE durability_sequence_rank(c.sequence) < durability_sequence_rank(EXCLUDED.sequence)
  RETURNING c.adapter, c.stream, c.grp, c.consumer, c.shard, c.sequence
), hist AS (
  INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence, new_sequence,
                                  writer, reason)
  SELECT up.adapter, up.stream, up.grp, up.consumer, up.shard, old.sequence, up.sequence, %s, 'mirror redis->postgres'
  FROM up LEFT JOIN old USING (adapter, stream, grp, consumer, shard)
  RETURNING 1
)
SELECT count(*) FROM hist
"""


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


class CheckpointMirror:
    def __init__(self, client: redis.Redis, db: PostgresConnection, *, batch_size: int = 5000,
                 scan_count: int = 1000) -> None:
        self.client = client
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

    def _redis_to_postgres(self, report: MirrorReport) -> dict[CheckpointKey, str]:
        seen: dict[CheckpointKey, str] = {}
        for raw_keys in self._scan_batches():
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, len(raw_keys), 1000):
                pipe.mget(raw_keys[i : i + 1000])
            values = [v for chunk in pipe.execute() for v in chunk]
            rows: list[tuple[str, ...]] = []
            for raw_key, raw_value in zip(raw_keys, values, strict=True):
                if raw_value is None:
                    continue  # expired between SCAN and MGET
                try:
                    key = CheckpointKey.parse(raw_key)
                except ValueError:
                    continue  # not a checkpoint key of this layout
                try:
                    value = normalize_sequence(raw_value, key=key.redis_key)
                except InvalidSequenceError:
                    report.invalid.append(key.redis_key)
                    continue
                seen[key] = value
                rows.append((*key.sort_tuple, value))
            report.redis_keys += len(rows)
            if rows:
                rows.sort()
                cols = [list(c) for c in zip(*rows, strict=True)]
                with self.db.connection() as conn:
                    (advanced,) = conn.execute(_BULK_UPSERT_SQL, [*cols, MIRROR_WRITER]).fetchone()
                report.mirrored_to_postgres += int(advanced)
        return seen

    # -- Postgres -> Redis ------------------------------------------------------------
    def _postgres_values(self, report: MirrorReport) -> dict[CheckpointKey, str]:
        with self.db.connection() as conn:
            rows = conn.execute("SELECT adapter, stream, grp, consumer, shard, sequence FROM checkpoints").fetchall()
        report.postgres_keys = len(rows)
        values: dict[CheckpointKey, str] = {}
        for row in rows:
            try:
                key = CheckpointKey.from_row(*row[:5])
                values[key] = normalize_sequence(row[5], key=f"postgres row {'/'.join(row[:5])}")
            except ValueError:
                report.invalid.append("postgres:" + ":".join(row[:5]))
        return values

    def _postgres_to_redis(self, postgres_before: dict[CheckpointKey, str], redis_values: dict[CheckpointKey, str],
                           report: MirrorReport) -> None:
        """Restore keys Redis lacks or holds behind Postgres (as Postgres was before this run)."""
        to_restore: list[tuple[CheckpointKey, str]] = []
        for key, value in postgres_before.items():
            in_redis = redis_values.get(key)
            if in_redis is not None:
                report.largest_drift = max(report.largest_drift, drift(value, in_redis))
            if in_redis is None or sort_key(in_redis) < sort_key(value):
                to_restore.append((key, value))
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
