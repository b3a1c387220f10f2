"""What the stores hold, key by key: the one place that reads the storage layout for people.

The CLI (``checkpoints list`` / ``export``), the audit tables and the demo's summary all need the same
picture of a checkpoint: the raw value in Redis and in Postgres (garbage and keys of another type
included: showing them is the point), whether each is a usable position, the newest write each store
recorded in its history, the hybrid flush state, and how the two stores differ. This module builds that
picture (``snapshot``) and holds the one definition of drift (``drift``) and of a regression that no
recorded write explains (``KeyState.external_regressions``), so that every report agrees.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import redis

from durability_pipelines.checkpoints.errors import InvalidSequenceError
from durability_pipelines.checkpoints.external import (  # noqa: F401 - re-exported: callers import them from here
    EXTERNAL_WRITER,
    external_reason,
    external_store,
    record_external_on,
    save_external_reason,
)
from durability_pipelines.checkpoints.keys import REDIS_PREFIX, CheckpointKey
from durability_pipelines.checkpoints.ordering import (
    SHARD_END,
    as_number,
    fast_sequence,
    is_number,
    normalize_sequence,
    sequence_gap,
    sort_key,
)
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.redis_client import is_cluster, mget_all


def record_external(db: PostgresConnection, key: CheckpointKey, frm: str, to: str, *, store: str,
                    run_id: str | None = None) -> None:
    """One ``checkpoint_history`` row (writer ``external``) for a foreign move a save found in ``store``: what
    the history summary (``no_checkpoint_regression``) and the audit read."""
    with db.connection() as conn:
        record_external_on(conn, key, frm, to, store=store, run_id=run_id)


_CHUNK = 1000


def recorded_number(sequence: str | None, previous: str | None = None) -> str | None:
    """The number a recorded write left in the *shared* value (key or row), canonical; None when it left none.

    The shared value holds numbers only: a write of a number left that number; a write of ``SHARD_END`` left
    the number before it (the shared value keeps the shard's last number, the sentinel lives beside it); a
    ``TRIM_HORIZON`` / ``LATEST`` (an operator's rewind) left no number. A shared value is compared with this,
    never with the sentinel the history also records: an ended shard is no regression.
    """
    return as_number(previous if sequence == SHARD_END else sequence)


def _dec(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class Stored:
    """One store's value of one key."""

    raw: str  # as stored ("<redis hash>" for a key of another Redis type)
    sequence: str | None  # the canonical position; None when unusable
    problem: str | None = None  # "invalid" | "wrong-type" | None

    @classmethod
    def of(cls, raw: Any) -> Stored:
        fast = fast_sequence(raw) if isinstance(raw, bytes | str) else None
        if fast is not None:
            return cls(_dec(raw) or "", fast)
        text = _dec(raw) or ""
        try:
            return cls(text, normalize_sequence(text))
        except InvalidSequenceError:
            return cls(text, None, "invalid")

    @classmethod
    def wrong_type(cls, kind: str) -> Stored:
        return cls(f"<redis {kind}>", None, "wrong-type")


@dataclass(frozen=True)
class RecordedWrite:
    """The newest write a store's history recorded for a key."""

    sequence: str
    writer: str | None
    at: datetime | None
    reason: str | None
    previous: str | None = None


class Drift(str, enum.Enum):
    """How Redis and Postgres disagree about one key (the one definition every report uses)."""

    IN_SYNC = "in-sync"
    REDIS_AHEAD = "redis-ahead"  # normal up to the hybrid flush bound
    POSTGRES_AHEAD = "postgres-ahead"  # Redis lost acks or was changed alone
    REDIS_ONLY = "redis-only"
    POSTGRES_ONLY = "postgres-only"
    INVALID_REDIS = "invalid-redis"
    INVALID_POSTGRES = "invalid-postgres"
    WRONG_TYPE_REDIS = "wrong-type-redis"
    MISSING = "missing"


def drift(redis_value: Stored | None, postgres_value: Stored | None) -> tuple[Drift, int | None]:
    """The stores' disagreement and, when both hold numbers, its size."""
    if redis_value is None and postgres_value is None:
        return Drift.MISSING, None
    if redis_value is not None and redis_value.problem == "wrong-type":
        return Drift.WRONG_TYPE_REDIS, None
    if redis_value is not None and redis_value.sequence is None:
        return Drift.INVALID_REDIS, None
    if postgres_value is not None and postgres_value.sequence is None:
        return Drift.INVALID_POSTGRES, None
    if postgres_value is None:
        return Drift.REDIS_ONLY, None
    if redis_value is None:
        return Drift.POSTGRES_ONLY, None
    r, p = redis_value.sequence, postgres_value.sequence
    assert r is not None and p is not None
    if r == p:
        return Drift.IN_SYNC, 0
    gap = abs(int(r) - int(p)) if is_number(r) and is_number(p) else max(sequence_gap(r, p) or 0, sequence_gap(p, r) or 0)
    return (Drift.REDIS_AHEAD if sort_key(r) > sort_key(p) else Drift.POSTGRES_AHEAD), gap


@dataclass(frozen=True)
class ExternalRegression:
    """A store's value is behind the last write that store recorded: someone wrote it without the project."""

    store: str  # redis | postgres
    from_sequence: str  # the last recorded write
    to_sequence: str  # what the store holds now

    def describe(self) -> str:
        return (f"{self.store.capitalize()} moved back from {self.from_sequence} to {self.to_sequence} by a write "
                "the project did not make (another worker?)")


@dataclass
class KeyState:
    """Everything the stores say about one checkpoint key."""

    redis_key: str
    key: CheckpointKey | None  # None: the key cannot be parsed without guessing (see ``parse_error``)
    parse_error: str | None = None
    redis: Stored | None = None
    postgres: Stored | None = None
    postgres_updated_at: datetime | None = None
    redis_ttl_s: float | None = None  # None: no expiry (or no Redis value)
    redis_last_write: RecordedWrite | None = None
    postgres_last_write: RecordedWrite | None = None
    acks_since_flush: int | None = None
    flushed_at: datetime | None = None
    #: writes of other workers the mirror recorded (Postgres history, writer ``external``), oldest first
    external_writes: list[RecordedWrite] = field(default_factory=list)

    @property
    def drift(self) -> tuple[Drift, int | None]:
        return drift(self.redis, self.postgres)

    @property
    def effective(self) -> str | None:
        """What a hybrid load returns: Redis when usable, else Postgres."""
        for value in (self.redis, self.postgres):
            if value is not None and value.sequence is not None:
                return value.sequence
        return None

    @property
    def last_ack_at(self) -> datetime | None:
        times = [t for t in (self.redis_last_write.at if self.redis_last_write else None,
                             self.postgres_updated_at) if t is not None]
        return max(times) if times else None

    @property
    def external_regressions(self) -> list[ExternalRegression]:
        """Stores whose shared value is behind the number their own last recorded write left there (a foreign,
        unrecorded write). ``SHARD_END`` is compared as what it left in the shared value: the shard's last number."""
        out = []
        for name, value, last in (("redis", self.redis, self.redis_last_write),
                                  ("postgres", self.postgres, self.postgres_last_write)):
            if value is None or value.sequence is None or last is None:
                continue
            recorded = recorded_number(last.sequence, last.previous)
            if recorded is not None and sort_key(value.sequence) < sort_key(recorded):
                out.append(ExternalRegression(name, recorded, value.sequence))
        return out


# --------------------------------------------------------------------------- reading the stores


def _redis_part(client: redis.Redis, states: dict[str, KeyState], redis_keys: list[str]) -> None:
    """Values (a missing key told apart from one of another type), TTLs, history heads, flush state.

    On a Redis Cluster the values are read per slot and the pipelines hold one-key commands only."""
    cluster = is_cluster(client)
    for i in range(0, len(redis_keys), _CHUNK):
        chunk = redis_keys[i : i + _CHUNK]
        values = mget_all(client, chunk)
        pipe = client.pipeline(transaction=False)
        for rkey, value in zip(chunk, values, strict=True):
            pipe.pttl(rkey)
            if value is None:
                pipe.type(rkey)
        replies = iter(pipe.execute())
        for rkey, value in zip(chunk, values, strict=True):
            st = states[rkey]
            ttl = next(replies)
            if value is None:
                kind = _dec(next(replies))
                if kind not in ("none", "string", None):
                    st.redis = Stored.wrong_type(kind)
            else:
                st.redis = Stored.of(value)
            if st.redis is not None and isinstance(ttl, int) and ttl >= 0:
                st.redis_ttl_s = ttl / 1000
        keyed = [(rkey, states[rkey].key) for rkey in chunk if states[rkey].key is not None]
        if not keyed:
            continue
        pipe = client.pipeline(transaction=False)
        for _, key in keyed:
            assert key is not None
            companions = key.companions(cluster=cluster)
            pipe.xrevrange(companions.history, count=1)
            pipe.hmget(companions.hybrid_state, "acks", "flushed_ms")
            pipe.type(companions.sentinel)
        replies = pipe.execute()
        for n, (rkey, key) in enumerate(keyed):
            head, (acks, flushed_ms), sentinel_kind = replies[3 * n], replies[3 * n + 1], _dec(replies[3 * n + 2])
            st = states[rkey]
            if sentinel_kind not in ("none", "string", None):  # another program's key where the sentinel goes
                assert key is not None
                st.redis = Stored(f"<redis {sentinel_kind} at {key.companions(cluster=cluster).sentinel}>", None,
                                  "wrong-type")
            if head:
                entry_id, fields = head[0]
                f = {_dec(k): _dec(v) for k, v in fields.items()}
                ms = int(_dec(entry_id).split("-")[0])
                st.redis_last_write = RecordedWrite(f.get("seq") or "", f.get("writer") or None,
                                                    datetime.fromtimestamp(ms / 1000, timezone.utc),
                                                    f.get("reason") or None, f.get("prev") or None)
            st.acks_since_flush = int(acks) if acks is not None else None
            if flushed_ms:
                st.flushed_at = datetime.fromtimestamp(int(flushed_ms) / 1000, timezone.utc)


_PG_SQL = """
SELECT c.adapter, c.stream, c.grp, c.consumer, c.shard, c.sequence, c.ts, h.new_sequence, h.writer, h.ts, h.reason,
       h.previous_sequence
FROM checkpoints c
LEFT JOIN LATERAL (
  SELECT new_sequence, writer, ts, reason, previous_sequence FROM checkpoint_history x
  WHERE x.adapter = c.adapter AND x.stream = c.stream AND x.grp = c.grp AND x.consumer = c.consumer
    AND x.shard = c.shard
  ORDER BY x.id DESC LIMIT 1) h ON true
"""


def redis_key_of_row(adapter: str, stream: str, grp: str, consumer: str, shard: str) -> str:
    """The Redis key a ``checkpoints`` row corresponds to (even when its parts are not valid components)."""
    return f"{REDIS_PREFIX}:{adapter}:{stream}:{grp}:{consumer}" + (f":{shard}" if shard else "")


def _state(states: dict[str, KeyState], rkey: str, key: CheckpointKey | None = None) -> KeyState:
    st = states.get(rkey)
    if st is None:
        if key is None:
            try:
                key = CheckpointKey.parse(rkey)
            except ValueError as exc:
                st = states[rkey] = KeyState(rkey, None, parse_error=str(exc))
                return st
        st = states[rkey] = KeyState(rkey, key)
    return st


_EXTERNAL_SQL = """
SELECT adapter, stream, grp, consumer, shard, previous_sequence, new_sequence, writer, ts, reason
FROM checkpoint_history WHERE writer = %s AND ts >= %s ORDER BY id
"""


def snapshot(client: redis.Redis | None, db: PostgresConnection | None, *,
             keys: Sequence[CheckpointKey] | None = None,
             external_since: datetime | None = None) -> list[KeyState]:
    """Every checkpoint key the stores hold (or just ``keys``), sorted by Redis key.

    ``client`` / ``db`` may be None for a single-store deployment. Foreign keys under ``checkpoint:*``
    that cannot be split without guessing are included, with ``key=None`` and ``parse_error``.
    ``external_since``: also collect the other workers' writes recorded since then (``external_writes``).
    """
    states: dict[str, KeyState] = {}
    if keys is not None:
        for k in keys:
            _state(states, k.redis_key, k)
    if client is not None:
        redis_keys = list(states) if keys is not None else sorted(
            {_dec(k) or "" for k in client.scan_iter(match=f"{REDIS_PREFIX}:*", count=_CHUNK)})
        for rkey in redis_keys:
            _state(states, rkey)
        _redis_part(client, states, redis_keys)
    if db is not None:
        wanted = set(states) if keys is not None else None
        with db.connection() as conn:
            rows = conn.execute(_PG_SQL).fetchall()
        for adapter, stream, grp, consumer, shard, sequence, ts, h_seq, h_writer, h_ts, h_reason, h_prev in rows:
            rkey = redis_key_of_row(adapter, stream, grp, consumer, shard)
            if wanted is not None and rkey not in wanted:
                continue
            try:
                key = CheckpointKey.from_row(adapter, stream, grp, consumer, shard)
                st = _state(states, rkey, key)
            except ValueError as exc:
                st = states.setdefault(rkey, KeyState(rkey, None, parse_error=f"Postgres row: {exc}"))
            st.postgres = Stored.of(sequence)
            st.postgres_updated_at = ts
            if h_seq is not None:
                st.postgres_last_write = RecordedWrite(h_seq, h_writer, h_ts, h_reason, h_prev)
        if external_since is not None:
            with db.connection() as conn:
                rows = conn.execute(_EXTERNAL_SQL, (EXTERNAL_WRITER, external_since)).fetchall()
            for adapter, stream, grp, consumer, shard, prev, new, writer, ts, reason in rows:
                st = states.get(redis_key_of_row(adapter, stream, grp, consumer, shard))
                if st is not None:
                    st.external_writes.append(RecordedWrite(new, writer, ts, reason, prev))
    return [states[k] for k in sorted(states)]


def for_keys(client: redis.Redis | None, db: PostgresConnection | None,
             keys: Iterable[CheckpointKey]) -> dict[CheckpointKey, KeyState]:
    keys = list(keys)
    by_redis_key = {st.redis_key: st for st in snapshot(client, db, keys=keys)}
    return {k: by_redis_key[k.redis_key] for k in keys}


# A row went back when its new value is at or below the previous row's. It is the project's own
# regression only when the row starts where the previous one ended (its previous_sequence is the last
# recorded value): a row whose previous value is lower than the last recorded one means someone wrote
# the checkpoint in between without the project (a foreign write), and so does a row by the writer
# 'external' (recorded by the mirror). Operator moves ('force: ' reason) are neither.
_SUMMARY_SQL = """
WITH h AS (
  SELECT adapter, stream, grp, consumer, shard, ts, reason, writer, previous_sequence,
         lag(new_sequence) OVER w AS last_new,
         durability_sequence_rank_or_null(new_sequence)
           <= lag(durability_sequence_rank_or_null(new_sequence)) OVER w AS went_back,
         durability_sequence_rank_or_null(previous_sequence)
           < lag(durability_sequence_rank_or_null(new_sequence)) OVER w AS started_lower
  FROM checkpoint_history
  WINDOW w AS (PARTITION BY adapter, stream, grp, consumer, shard ORDER BY id)
), c AS (
  SELECT *, coalesce(reason, '') LIKE %(forced)s AS forced,
         (writer = %(external)s) OR coalesce(started_lower, false) AS foreign_move
  FROM h
)
SELECT adapter, stream, grp, consumer, shard,
       count(*) AS advances, min(ts) AS first_advance_at, max(ts) AS last_advance_at,
       count(*) FILTER (WHERE ts > NOW() - interval '1 hour') AS advances_last_hour,
       count(*) FILTER (WHERE went_back AND NOT forced AND NOT foreign_move) AS regressions,
       count(*) FILTER (WHERE foreign_move AND NOT forced) AS external_regressions,
       count(*) FILTER (WHERE foreign_move AND NOT forced AND ts > %(since)s) AS external_regressions_recent,
       count(*) FILTER (WHERE forced) AS forced_moves
FROM c GROUP BY adapter, stream, grp, consumer, shard
"""


def history_summary(conn: Any, *, external_since: datetime) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Per key, from ``checkpoint_history``: advances, first/last/last-hour writes, the project's own
    regressions, foreign regressions (all time and since ``external_since``) and operator moves.
    Returns ``(column names, rows)``; the key columns come first (adapter, stream, grp, consumer, shard)."""
    from durability_pipelines.checkpoints.base import FORCED_REASON_PREFIX

    cur = conn.execute(_SUMMARY_SQL, {"forced": FORCED_REASON_PREFIX + "%", "external": EXTERNAL_WRITER,
                                      "since": external_since})
    return [c.name for c in cur.description or []], cur.fetchall()
