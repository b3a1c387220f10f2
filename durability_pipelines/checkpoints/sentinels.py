"""Positions that are not sequence numbers, kept out of the shared layout.

Workers written for the original pattern feed the value of ``checkpoint:<...>`` (and the
``checkpoints.sequence`` column) to ``GetShardIterator(AT_SEQUENCE_NUMBER)``; a ``SHARD_END``,
``TRIM_HORIZON`` or ``LATEST`` there makes such a worker fail on its next start. So the shared key and
row hold numbers only, and the sentinels live in the project's own places:

* Redis: ``durability:sentinel:<adapter>:<stream>:<group>:<consumer>[:<shard>]`` (a string);
* Postgres: the ``checkpoint_sentinels`` table (same key columns as ``checkpoints``).

A checkpoint's position is the greater of the two in the one ordering (``ordering.py``): a closed
shard keeps its last sequence number in the shared key (another worker resumes after it, finds the
shard's end, and moves on) and ``SHARD_END`` beside it; a ``TRIM_HORIZON`` / ``LATEST`` counts only
where no number is stored. Each of the two only ever advances, so their maximum is monotonic even
under concurrent writers. ``durability-pipelines migrate`` moves sentinels an older version wrote into
the shared key or row to their own place (``convert_redis`` / ``convert_postgres``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from durability_pipelines.checkpoints.keys import REDIS_PREFIX, companion_keys
from durability_pipelines.checkpoints.ordering import LATEST, MAX_DIGITS, SHARD_END, TRIM_HORIZON

SENTINELS = (TRIM_HORIZON, LATEST, SHARD_END)
_SENTINEL_BYTES = {s.encode() for s in SENTINELS}
_SHARD_END_BYTES = SHARD_END.encode()


def is_sentinel(value: Any) -> bool:
    """True for ``SHARD_END`` / ``TRIM_HORIZON`` / ``LATEST`` (str or bytes)."""
    return value in SENTINELS or value in _SENTINEL_BYTES


def effective(shared: Any, sentinel: Any) -> Any:
    """The position of a checkpoint from its shared value and its sentinel (raw, as read).

    ``SHARD_END`` wins over anything; a ``TRIM_HORIZON`` / ``LATEST`` only stands in for a missing
    shared value. Anything else in the sentinel place (not written by this project) is ignored.
    """
    if sentinel is None or not is_sentinel(sentinel):
        return shared
    if shared is None or sentinel in (SHARD_END, _SHARD_END_BYTES):
        return sentinel
    return shared


def sentinel_key_for(checkpoint_key: str, *, cluster: bool = False) -> str:
    """The sentinel key beside a shared ``checkpoint:...`` Redis key (``cluster``: in its hash slot)."""
    return companion_keys(checkpoint_key, cluster=cluster).sentinel


@dataclass(frozen=True)
class Conversion:
    """One shared value ``migrate`` moved out of the shared layout."""

    where: str  # redis | postgres
    key: str  # the Redis key, or the row's key as a Redis key
    value: str  # the sentinel found there

    def describe(self) -> str:
        place = f"Redis key {self.key}" if self.where == "redis" else f"Postgres row {self.key}"
        return f"{place}: moved {self.value} to the project's own sentinel store (the shared value now holds no sentinel)"


# KEYS[1] shared key, KEYS[2] sentinel key; ARGV[1] the number to leave in the shared key for a SHARD_END
# ('' = none known: the key goes). Moves a sentinel from the shared key (only if it still holds one) to the
# sentinel key, keeping the greater; returns the value moved, or false.
CONVERT_LUA = """
local v = redis.call('GET', KEYS[1])
if v ~= 'SHARD_END' and v ~= 'TRIM_HORIZON' and v ~= 'LATEST' then return false end
local s = redis.call('GET', KEYS[2])
local rank = {TRIM_HORIZON = 0, LATEST = 1, SHARD_END = 2}
if not s or rank[s] == nil or rank[s] < rank[v] then redis.call('SET', KEYS[2], v) end
if v == 'SHARD_END' and ARGV[1] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
else
  redis.call('DEL', KEYS[1])
end
return v
"""


def _last_number_in_history(client: Any, history_key: str) -> str:
    """The newest sequence number a Redis history stream recorded for a key ('' if none)."""
    for _, fields in client.xrevrange(history_key, count=100):
        for name in (b"seq", b"prev"):
            value = fields.get(name, b"")
            if value.isdigit():
                return value.decode()
    return ""


def convert_redis(client: Any, *, scan_count: int = 1000) -> list[Conversion]:
    """Move every sentinel an older version left in a shared ``checkpoint:*`` key to its sentinel key.

    A ``SHARD_END`` leaves the shard's last sequence number (from the key's history) in the shared key,
    so other workers resume after it; a ``TRIM_HORIZON`` / ``LATEST`` (or a ``SHARD_END`` with no number
    on record) leaves the shared key absent: other workers start from their initial position.
    """
    from durability_pipelines.redis_client import is_cluster

    cluster = is_cluster(client)
    script = client.register_script(CONVERT_LUA)
    out: list[Conversion] = []
    for raw in client.scan_iter(match=f"{REDIS_PREFIX}:*", count=scan_count):
        key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        try:
            if not is_sentinel(client.get(key)):
                continue
            companions = companion_keys(key, cluster=cluster)
            last = _last_number_in_history(client, companions.history)
            moved = script(keys=[key, companions.sentinel], args=[last])
        except Exception as exc:  # a key of another type: not ours to touch
            if "WRONGTYPE" in str(exc):
                continue
            raise
        if moved:
            out.append(Conversion("redis", key, moved.decode() if isinstance(moved, bytes) else str(moved)))
    return out


_KEY_MATCH = "{a}.adapter = {b}.adapter AND {a}.stream = {b}.stream AND {a}.grp = {b}.grp AND " \
             "{a}.consumer = {b}.consumer AND {a}.shard = {b}.shard"
_CONVERT_POSTGRES_SQL = f"""
WITH old AS (
  SELECT c.adapter, c.stream, c.grp, c.consumer, c.shard, c.sequence,
         CASE WHEN c.sequence = 'SHARD_END' THEN
           (SELECT h.new_sequence FROM checkpoint_history h
             WHERE {_KEY_MATCH.format(a="h", b="c")} AND h.new_sequence ~ '^[0-9]{{1,{MAX_DIGITS}}}$'
             ORDER BY h.id DESC LIMIT 1) END AS last_number
  FROM checkpoints c WHERE c.sequence IN ('SHARD_END', 'TRIM_HORIZON', 'LATEST') FOR UPDATE
), kept_number AS (
  UPDATE checkpoints c SET sequence = o.last_number, ts = NOW() FROM old o
   WHERE {_KEY_MATCH.format(a="c", b="o")} AND o.last_number IS NOT NULL
  RETURNING 1
), removed AS (
  DELETE FROM checkpoints c USING old o WHERE {_KEY_MATCH.format(a="c", b="o")} AND o.last_number IS NULL
  RETURNING 1
), kept AS (
  INSERT INTO checkpoint_sentinels AS s (adapter, stream, grp, consumer, shard, sentinel, ts)
  SELECT adapter, stream, grp, consumer, shard, sequence, NOW() FROM old
  ON CONFLICT (adapter, stream, grp, consumer, shard) DO UPDATE SET sentinel = EXCLUDED.sentinel, ts = NOW()
    WHERE durability_sequence_rank(s.sentinel) < durability_sequence_rank(EXCLUDED.sentinel)
  RETURNING 1
)
SELECT adapter, stream, grp, consumer, shard, sequence FROM old ORDER BY 1, 2, 3, 4, 5
"""


def convert_postgres(conn: Any) -> list[Conversion]:
    """Move every sentinel an older version left in ``checkpoints.sequence`` to ``checkpoint_sentinels``
    (one statement, so a concurrent reader sees it in one place or the other); a ``SHARD_END`` row keeps
    the shard's last number from ``checkpoint_history``, other rows with a sentinel go."""
    from durability_pipelines.checkpoints.keys import CheckpointKey

    out: list[Conversion] = []
    for adapter, stream, grp, consumer, shard, value in conn.execute(_CONVERT_POSTGRES_SQL).fetchall():
        try:
            where = CheckpointKey.from_row(adapter, stream, grp, consumer, shard).redis_key
        except ValueError:
            where = f"({adapter}, {stream}, {grp}, {consumer}, {shard})"
        out.append(Conversion("postgres", where, value))
    return out
