"""Redis <-> Postgres checkpoint mirror (the hybrid pattern's scheduled half).

* Redis -> Postgres: ``SCAN checkpoint:*`` + pipelined ``MGET`` + one guarded bulk upsert per batch
  (no per-row round trips). The guard is the same ordering as every save, so Postgres never moves
  backwards, and each advance appends a ``checkpoint_history`` row (writer ``mirror``).
* Postgres -> Redis: keys missing in Redis (lost, flushed, restarted) or behind Postgres are restored
  through the monotonic Lua save, so Redis never moves backwards either.

One bad entry never stops the others: a key that cannot be split without guessing, a value that is no
position, a Redis key of another type, a garbage Postgres row are each skipped and reported by name,
and a key is never copied to a store it could not be read back from.

Other writers share these keys (the original pattern's workers). A checkpoint that moved backwards
in a store without a write the project recorded there is a *foreign regression*: the mirror records it
in that store's history (writer ``external``) and reports it, and leaves the key as found, because
putting it back would overrule a decision another worker made; with ``repair=True`` (the operator's
choice: ``durability-pipelines checkpoints repair`` or the mirror asset's config) it writes the last
recorded position back instead, with a history row saying so.

Safe to run concurrently with consumers and with itself: every write is a monotonic compare-and-set,
and each batch locks rows in key order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis

from durability_pipelines.checkpoints.errors import InvalidSequenceError
from durability_pipelines.checkpoints.inspect import (
    EXTERNAL_WRITER,
    external_reason,
    recorded_number,
    redis_key_of_row,
)
from durability_pipelines.checkpoints.keys import REDIS_PREFIX, CheckpointKey
from durability_pipelines.checkpoints.ordering import (
    fast_sequence,
    is_number,
    normalize_sequence,
    sequence_gap,
    sort_key,
)
from durability_pipelines.checkpoints.postgres_store import SCHEMA_VERSION as CHECKPOINT_SCHEMA_VERSION
from durability_pipelines.checkpoints.postgres_store import PostgresConnection, ensure_schema, migrate
from durability_pipelines.checkpoints.redis_store import SAVE_LUA, save_script_keys
from durability_pipelines.redis_client import is_cluster, mget_all

log = logging.getLogger(__name__)
MIRROR_WRITER = "mirror"
#: How many named entries a report keeps per kind (the counts are always complete).
REPORT_LIMIT = 100


def drift(a: str | None, b: str | None) -> int:
    """Distance between two stores' values of one key (0 when equal or not comparable)."""
    if a is None or b is None or a == b:
        return 0
    if a.isdigit() and b.isdigit():  # canonical numbers: the common case, kept cheap
        return abs(int(a) - int(b))
    return max(sequence_gap(a, b) or 0, sequence_gap(b, a) or 0)


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
         up.sequence, %s, %s
  FROM up
  RETURNING 1
)
SELECT count(*) FROM hist
"""
# The same guarded upsert without history rows (``record_history=False``): half the writes.
_BULK_UPSERT_NO_HISTORY_SQL = _UPSERT_CTES + "\nSELECT count(*) FROM up\n"

# Every row, its value's rank (NULL: not a position) and the newest write its history recorded (what that write
# left in the shared row is ``inspect.recorded_number`` of it: a SHARD_END left the number before it).
_POSTGRES_SQL = """
SELECT c.adapter, c.stream, c.grp, c.consumer, c.shard, c.sequence,
       durability_sequence_rank_or_null(c.sequence) IS NOT NULL AS valid, h.new_sequence, h.previous_sequence
FROM checkpoints c
LEFT JOIN LATERAL (
  SELECT new_sequence, previous_sequence FROM checkpoint_history x
  WHERE x.adapter = c.adapter AND x.stream = c.stream AND x.grp = c.grp AND x.consumer = c.consumer
    AND x.shard = c.shard
  ORDER BY x.id DESC LIMIT 1) h ON true
"""
_RECORD_EXTERNAL_SQL = """
INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence, new_sequence, writer, reason)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


@dataclass(frozen=True)
class Skipped:
    """An entry the mirror did not copy, and why (named in the report, the asset's metadata and logs)."""

    where: str  # redis | postgres
    key: str  # the Redis key (for a Postgres row: the key it would be)
    why: str  # unparseable | invalid | wrong-type | external-regression | ...
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"where": self.where, "key": self.key, "why": self.why, "detail": self.detail}


@dataclass
class MirrorReport:
    redis_keys: int = 0
    postgres_keys: int = 0
    mirrored_to_postgres: int = 0  # Postgres rows advanced (or created) from Redis
    restored_to_redis: int = 0  # Redis keys created or advanced from Postgres
    repaired: int = 0  # foreign regressions undone (repair=True only)
    largest_drift: int = 0  # max numeric gap between the stores before mirroring
    skipped: list[Skipped] = field(default_factory=list)
    duration_s: float = 0.0

    def skip(self, where: str, key: str, why: str, detail: str = "") -> None:
        self.skipped.append(Skipped(where, key, why, detail))
        log.warning("mirror: skipped %s key %s (%s) %s", where, key, why, detail)

    def count(self, why: str) -> int:
        return sum(1 for s in self.skipped if s.why == why)

    @property
    def invalid(self) -> list[str]:
        """Keys skipped because a store holds no usable position there."""
        return [s.key for s in self.skipped if s.why in ("invalid", "wrong-type")]

    @property
    def external_regressions(self) -> list[Skipped]:
        return [s for s in self.skipped if s.why == "external-regression"]

    def as_metadata(self) -> dict[str, Any]:
        return {
            "redis_keys": self.redis_keys,
            "postgres_keys": self.postgres_keys,
            "keys_mirrored": self.mirrored_to_postgres,
            "keys_restored": self.restored_to_redis,
            "keys_repaired": self.repaired,
            "largest_drift": self.largest_drift,
            "invalid_values": self.count("invalid"),
            "wrong_type_keys": self.count("wrong-type"),
            "unparseable_keys": self.count("unparseable"),
            "external_regressions": self.count("external-regression"),
            "skipped": len(self.skipped),
            "duration_s": round(self.duration_s, 3),
        }


def _decode(v: bytes | str) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _canonical(raw: bytes | str) -> str | None:
    """Canonical sequence, or None when invalid; a fast path for the common canonical number."""
    fast = fast_sequence(raw)
    if fast is not None:
        return fast
    try:
        return normalize_sequence(raw)
    except InvalidSequenceError:
        return None


@dataclass(frozen=True)
class _Row:
    """A usable Postgres row: its key, value and the number the newest write its history recorded left in the
    shared row (``inspect.recorded_number``; None: none, e.g. a rewind to TRIM_HORIZON)."""

    key: CheckpointKey
    sequence: str
    recorded: str | None


class CheckpointMirror:
    def __init__(self, client: redis.Redis, db: PostgresConnection, *, batch_size: int = 5000,
                 scan_count: int = 1000, record_history: bool = True, repair: bool = False) -> None:
        """``record_history=False`` skips the ``checkpoint_history`` row per mirrored advance: about half
        the Postgres writes, for deployments whose acks already write history (postgres or hybrid
        backends) and only need the mirror as a safety net. ``repair=True`` undoes foreign regressions."""
        self.client = client
        self.record_history = record_history
        self.repair = repair
        self.db = db
        self.batch_size = batch_size
        self.scan_count = scan_count
        self._save = client.register_script(SAVE_LUA)
        self.cluster = is_cluster(client)  # SCAN covers every primary; MGET goes per slot

    def run(self) -> MirrorReport:
        ensure_schema(self.db, "checkpoints", CHECKPOINT_SCHEMA_VERSION, migrate)
        start = time.perf_counter()
        report = MirrorReport()
        postgres_before, bad_rows = self._postgres_values(report)
        redis_values = self._redis_to_postgres(report, postgres_before, bad_rows)
        self._postgres_to_redis(postgres_before, redis_values, report)
        report.duration_s = time.perf_counter() - start
        return report

    # -- Postgres as found ------------------------------------------------------------
    def _postgres_values(self, report: MirrorReport) -> tuple[dict[str, _Row], set[str]]:
        """``({redis key: usable row}, {redis keys of unusable rows})``; foreign regressions recorded."""
        with self.db.connection() as conn:
            rows = conn.execute(_POSTGRES_SQL).fetchall()
        report.postgres_keys = len(rows)
        values: dict[str, _Row] = {}
        bad: set[str] = set()
        for adapter, stream, grp, consumer, shard, sequence, valid, recorded, recorded_prev in rows:
            rkey = redis_key_of_row(adapter, stream, grp, consumer, shard)
            try:
                key = CheckpointKey.from_row(adapter, stream, grp, consumer, shard)
            except ValueError as exc:
                report.skip("postgres", rkey, "unparseable", str(exc))  # never restored to Redis
                bad.add(rkey)
                continue
            value = _canonical(sequence) if valid else None
            if value is None:
                report.skip("postgres", rkey, "invalid", f"Postgres holds {str(sequence)[:80]!r}: fix it with "
                            "`durability-pipelines checkpoints set ... --force`")
                bad.add(rkey)
                continue
            values[rkey] = _Row(key, value, recorded_number(recorded, recorded_prev))
        self._postgres_regressions(values, report)
        return values, bad

    def _postgres_regressions(self, values: dict[str, _Row], report: MirrorReport) -> None:
        regressed = [(rkey, row) for rkey, row in values.items()
                     if row.recorded is not None and sort_key(row.sequence) < sort_key(row.recorded)]
        if not regressed:
            return
        with self.db.connection() as conn, conn.transaction():
            for rkey, row in regressed:
                assert row.recorded is not None
                detail = f"Postgres moved back from {row.recorded} to {row.sequence} without a recorded write"
                report.skip("postgres", rkey, "external-regression", detail)
                conn.execute(_RECORD_EXTERNAL_SQL, (
                    *row.key.as_row().values(), row.recorded, row.sequence, EXTERNAL_WRITER, external_reason("postgres")))
                if self.repair:
                    self._repair_postgres(conn, row, report)
                    values[rkey] = _Row(row.key, row.recorded, row.recorded)

    def _repair_postgres(self, conn: psycopg.Connection, row: _Row, report: MirrorReport) -> None:
        assert row.recorded is not None
        updated = conn.execute(  # compare-and-set: only the value found, never over a newer write
            "UPDATE checkpoints SET sequence = %s, ts = NOW() WHERE adapter = %s AND stream = %s AND grp = %s "
            "AND consumer = %s AND shard = %s AND sequence = %s",
            (row.recorded, *row.key.as_row().values(), row.sequence)).rowcount
        if updated:
            conn.execute(_RECORD_EXTERNAL_SQL, (*row.key.as_row().values(), row.sequence, row.recorded, MIRROR_WRITER,
                                                "repair: undo a foreign regression"))
            report.repaired += 1

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

    def _redis_to_postgres(self, report: MirrorReport, postgres_before: dict[str, _Row],
                           bad_rows: set[str]) -> dict[str, str]:
        """Returns ``{redis key: canonical value}`` of every usable checkpoint seen in Redis."""
        seen: dict[str, str] = {}
        for raw_keys in self._scan_batches():
            values = mget_all(self.client, raw_keys)
            rows: list[tuple[str, ...]] = []
            absent: list[str] = []
            for raw_key, raw_value in zip(raw_keys, values, strict=True):
                rkey = _decode(raw_key)
                if rkey in seen:
                    continue  # SCAN may return a key twice
                if raw_value is None:
                    absent.append(rkey)  # expired since the SCAN, or a key of another type
                    continue
                key = self._parse(rkey, report)
                if key is None:
                    continue
                value = _canonical(raw_value)
                if value is None:
                    report.skip("redis", rkey, "invalid", f"Redis holds {_decode(raw_value)[:80]!r}")
                    continue
                if not is_number(value):  # never copied into the shared row other workers read
                    report.skip("redis", rkey, "invalid", f"Redis holds {value} in the shared key, which holds numbers "
                                "only: `durability-pipelines migrate` moves it to the sentinel key")
                    continue
                seen[rkey] = value
                if rkey in bad_rows:
                    report.skip("postgres", rkey, "not-mirrored", "its Postgres row is unusable (see above)")
                    continue
                before = postgres_before.get(rkey)
                if before is not None and before.recorded is not None and sort_key(before.sequence) < sort_key(
                        before.recorded) and not self.repair:
                    continue  # a foreign regression in Postgres: left as found (reported above)
                rows.append((*key.as_row().values(), value))
            self._wrong_types(absent, report)
            report.redis_keys += len(rows)
            if rows:
                report.mirrored_to_postgres += self._upsert(rows, report)
        return seen

    def _parse(self, rkey: str, report: MirrorReport) -> CheckpointKey | None:
        try:
            return CheckpointKey.parse(rkey)
        except ValueError as exc:
            report.skip("redis", rkey, "unparseable", str(exc))  # never copied: it could not be read back
            return None

    def _wrong_types(self, rkeys: list[str], report: MirrorReport) -> None:
        if not rkeys:
            return
        pipe = self.client.pipeline(transaction=False)
        for rkey in rkeys:
            pipe.type(rkey)
        for rkey, kind in zip(rkeys, pipe.execute(), strict=True):
            kind = _decode(kind)
            if kind not in ("none", "string"):
                report.skip("redis", rkey, "wrong-type", f"Redis holds a {kind}, not a position")

    def _upsert(self, rows: list[tuple[str, ...]], report: MirrorReport) -> int:
        """One guarded bulk upsert; a row that turned unusable meanwhile sends the batch down row by row."""
        rows.sort()
        try:
            return self._upsert_batch(rows)
        except psycopg.errors.InvalidTextRepresentation:
            pass  # a Postgres row became garbage since it was read: isolate it
        advanced = 0
        for row in rows:
            try:
                advanced += self._upsert_batch([row])
            except psycopg.errors.InvalidTextRepresentation as exc:
                rkey = redis_key_of_row(*row[:5])
                report.skip("postgres", rkey, "invalid", f"Postgres row unusable: {exc.diag.message_primary}")
        return advanced

    def _upsert_batch(self, rows: list[tuple[str, ...]]) -> int:
        cols = [list(c) for c in zip(*rows, strict=True)]
        with self.db.connection() as conn:
            if self.record_history:
                (advanced,) = conn.execute(_BULK_UPSERT_SQL, [*cols, MIRROR_WRITER, "mirror redis->postgres"]).fetchone()
            else:
                (advanced,) = conn.execute(_BULK_UPSERT_NO_HISTORY_SQL, cols).fetchone()
        return int(advanced)

    # -- Postgres -> Redis ------------------------------------------------------------
    def _postgres_to_redis(self, postgres_before: dict[str, _Row], redis_values: dict[str, str],
                           report: MirrorReport) -> None:
        """Restore keys Redis lacks or holds behind Postgres (as Postgres was before this run), unless Redis
        is behind its own recorded history (a foreign regression: recorded and left, or repaired)."""
        behind: list[tuple[str, _Row]] = []
        missing: list[tuple[str, _Row]] = []
        for rkey, row in postgres_before.items():
            in_redis = redis_values.get(rkey)
            if in_redis is None:
                missing.append((rkey, row))
                continue
            if in_redis != row.sequence:
                report.largest_drift = max(report.largest_drift, drift(row.sequence, in_redis))
            # Behind Postgres, or behind what Postgres last recorded (both stores lowered by another writer)
            if sort_key(in_redis) < sort_key(max(row.sequence, row.recorded or row.sequence, key=sort_key)):
                behind.append((rkey, row))
        skipped = {s.key for s in report.skipped if s.where == "redis"}  # wrong-type, invalid: not touched
        to_restore = [(row.key, row.sequence, "mirror postgres->redis") for rkey, row in missing if rkey not in skipped]
        to_restore += self._redis_regressions(behind, redis_values, report)
        for i in range(0, len(to_restore), 1000):
            chunk = to_restore[i : i + 1000]
            for (key, _, _), result in zip(chunk, self._restore(chunk), strict=True):
                if isinstance(result, list) and _decode(result[0]) == "advanced":
                    report.restored_to_redis += 1
                elif isinstance(result, Exception):
                    report.skip("redis", key.redis_key, "wrong-type" if "WRONGTYPE" in str(result) else "error",
                                str(result)[:200])

    def _restore(self, chunk: list[tuple[CheckpointKey, str, str]]) -> list[Any]:
        """Run the (unfenced, monotonic) save for each of ``chunk``: one pipeline on one server; one call
        per key on a cluster (redis-py does not pipeline scripts there). Errors are returned, not raised."""
        def args(key: CheckpointKey, value: str, reason: str) -> dict[str, Any]:
            return {"keys": list(save_script_keys(key, cluster=self.cluster)),
                    "args": [value, MIRROR_WRITER, "", "", "", reason, "1000"]}

        if not self.cluster:
            pipe = self.client.pipeline(transaction=False)
            for key, value, reason in chunk:
                self._save(**args(key, value, reason), client=pipe)
            return pipe.execute(raise_on_error=False)
        out: list[Any] = []
        for key, value, reason in chunk:
            try:
                out.append(self._save(**args(key, value, reason)))
            except redis.RedisError as exc:
                out.append(exc)
        return out

    def _redis_regressions(self, behind: list[tuple[str, _Row]], redis_values: dict[str, str],
                           report: MirrorReport) -> list[tuple[CheckpointKey, str, str]]:
        """Of the keys Redis holds behind Postgres, those it holds behind its own last recorded write were
        lowered by another writer: record and leave them (or repair them). The rest lost acks: restore."""
        if not behind:
            return []
        pipe = self.client.pipeline(transaction=False)
        for _, row in behind:
            pipe.xrevrange(row.key.companions(cluster=self.cluster).history, count=1)
        heads = pipe.execute()
        restore: list[tuple[CheckpointKey, str, str]] = []
        record = self.client.pipeline(transaction=False)
        recorded_in_postgres: list[tuple[str, ...]] = []  # the audit trail (and its summary) lives in Postgres
        for (rkey, row), head in zip(behind, heads, strict=True):
            fields = head[0][1] if head else {}
            recorded = recorded_number(_decode(fields.get(b"seq", b"")) or None,
                                       _decode(fields.get(b"prev", b"")) or None) if head else None
            current = redis_values[rkey]
            if recorded is None or sort_key(current) >= sort_key(recorded):
                # A foreign move already recorded (by a save, or an earlier mirror run) and not moved past yet is
                # honoured: the consumer replays from it, so Postgres being ahead is no lost ack to restore.
                honoured = bool(head) and _decode(fields.get(b"writer", b"")) == EXTERNAL_WRITER and not self.repair
                if sort_key(current) < sort_key(row.sequence) and not honoured:  # Redis lost acks (restart, snapshot)
                    restore.append((row.key, row.sequence, "mirror postgres->redis"))
                continue
            report.skip("redis", rkey, "external-regression",
                        f"Redis moved back from {recorded} to {current} without a recorded write")
            record.xadd(row.key.companions(cluster=self.cluster).history, {"prev": recorded, "seq": current, "writer": EXTERNAL_WRITER,
                                              "epoch": "", "run": "", "reason": external_reason("redis")},
                        maxlen=1000, approximate=True)
            recorded_in_postgres.append((*row.key.as_row().values(), recorded, current, EXTERNAL_WRITER,
                                         external_reason("redis")))
            if self.repair:  # the shared key gets a number back, even beside a SHARD_END (the monotonic save
                # would call that stale: the position is the sentinel's), never the sentinel itself
                target = max(recorded, row.sequence, key=sort_key)
                if is_number(target) and advance_shared(self.client, row.key, target, writer=MIRROR_WRITER,
                                                        reason="repair: undo a foreign regression"):
                    report.repaired += 1
        if recorded_in_postgres:
            record.execute()
            with self.db.connection() as conn, conn.cursor() as cur:
                cur.executemany(_RECORD_EXTERNAL_SQL, recorded_in_postgres)
        return restore


def advance_shared(client: redis.Redis, key: CheckpointKey, number: str, *, writer: str, reason: str) -> bool:
    """Put ``number`` in the shared key when it holds nothing or a lower number, whatever sentinel is beside it,
    with a history entry (repairs: the monotonic save compares with the position, and a ``SHARD_END`` beside the
    key would make any number stale). A key holding something else (garbage, a sentinel, another type) is left
    as it is. Returns whether it wrote. The comparison is ``ordering.sort_key``, under ``WATCH``."""
    if not is_number(number):
        raise ValueError(f"the shared key holds numbers only, not {number!r}")
    history = key.companions(cluster=is_cluster(client)).history

    def attempt(pipe: Any) -> bool:
        found = pipe.get(key.redis_key)
        current = _canonical(found) if found is not None else None
        if found is not None and (current is None or not is_number(current) or sort_key(current) >= sort_key(number)):
            return False
        pipe.multi()
        pipe.set(key.redis_key, number, keepttl=True)
        pipe.xadd(history, {"prev": _decode(found) if found is not None else "", "seq": number, "writer": writer,
                            "epoch": "", "run": "", "reason": reason}, maxlen=1000, approximate=True)
        return True

    try:
        return bool(client.transaction(attempt, key.redis_key, value_from_callable=True))
    except redis.ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            return False
        raise


@dataclass(frozen=True)
class RepairResult:
    key: CheckpointKey
    target: str | None  # the position put back (None: nothing to repair)
    before: dict[str, str | None]  # per store, as found
    after: dict[str, str | None]


def repair_key(client: redis.Redis, db: PostgresConnection, key: CheckpointKey, *, by: str) -> RepairResult:
    """Undo a foreign regression of ``key``: put back the highest position the project recorded (in either
    store's history, before any ``external`` entry) or holds, in both stores, each write recorded.

    Never moves a store backwards (a compare-and-set in Postgres, the monotonic save in Redis).
    """
    from durability_pipelines.checkpoints.inspect import for_keys

    state = for_keys(client, db, [key])[key]
    candidates = [v.sequence for v in (state.redis, state.postgres)
                  if v is not None and v.sequence and is_number(v.sequence)]
    for last in (state.redis_last_write, state.postgres_last_write, *state.external_writes):
        if last is None:
            continue
        # what the shared value held: an external row's previous value, else what the write left there
        number = recorded_number(last.previous) if last.writer == EXTERNAL_WRITER else recorded_number(
            last.sequence, last.previous)
        if number is not None:
            candidates.append(number)
    before = {"redis": state.redis.raw if state.redis else None,
              "postgres": state.postgres.raw if state.postgres else None}
    if not candidates:
        return RepairResult(key, None, before, before)
    target = max(candidates, key=sort_key)  # a number: shared keys and rows hold nothing else
    reason = f"repair: undo a foreign regression (by {by})"
    with db.connection() as conn, conn.transaction():
        row = conn.execute(
            "SELECT sequence FROM checkpoints WHERE adapter = %s AND stream = %s AND grp = %s AND consumer = %s "
            "AND shard = %s FOR UPDATE", tuple(key.as_row().values())).fetchone()
        current = _canonical(row[0]) if row else None
        if current is None or sort_key(current) < sort_key(target):
            conn.execute(
                "INSERT INTO checkpoints (adapter, stream, grp, consumer, shard, sequence, ts) "
                "VALUES (%s, %s, %s, %s, %s, %s, NOW()) ON CONFLICT (adapter, stream, grp, consumer, shard) "
                "DO UPDATE SET sequence = EXCLUDED.sequence, ts = NOW()", (*key.as_row().values(), target))
            conn.execute(_RECORD_EXTERNAL_SQL, (*key.as_row().values(), row[0] if row else None, target, by, reason))
    advance_shared(client, key, target, writer=by, reason=reason)
    after_state = for_keys(client, db, [key])[key]
    after = {"redis": after_state.redis.raw if after_state.redis else None,
             "postgres": after_state.postgres.raw if after_state.postgres else None}
    return RepairResult(key, target, before, after)
