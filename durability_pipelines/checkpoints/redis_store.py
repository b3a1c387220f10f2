"""Redis checkpoints: fast and shared between workers.

Each save is one ``EVALSHA`` of ``checkpoint.lua`` (monotonic guard, lease
fencing, optional TTL and a capped history stream, atomically).  Keys follow
the original layout so other workers read and write the same checkpoints.

On a Redis Cluster (``redis+cluster://``) the shared ``checkpoint:...`` key stays as it is and the
project's own keys of a checkpoint move into its hash slot (``keys.companion_keys``), so the one Lua
call still touches one slot. The shard's lease cannot be in every checkpoint's slot, so the save checks
a *lease copy* beside the checkpoint, which :class:`RedisLeaseManager` keeps in step (see there).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

from durability_pipelines.checkpoints.base import (
    CheckpointStore,
    ForceSetResult,
    HistoryEntry,
    Lease,
    LeaseManager,
    SaveContext,
    SaveOutcome,
    SaveResult,
    require_force_context,
)
from durability_pipelines.checkpoints.errors import (
    ConfigError,
    InvalidSequenceError,
    ReplicationTimeoutError,
    StoreUnavailableError,
    WrongTypeKeyError,
    lease_lost,
)
from durability_pipelines.checkpoints.keys import REDIS_PREFIX, CheckpointKey, LeaseKey
from durability_pipelines.checkpoints.ordering import fast_sequence, normalize_sequence
from durability_pipelines.checkpoints.sentinels import effective
from durability_pipelines.redis_client import describe_client, is_cluster, mget_all, redis_client

_SCRIPT_DIR = resources.files("durability_pipelines.checkpoints")
SAVE_LUA = (_SCRIPT_DIR / "checkpoint.lua").read_text()
LEASE_LUA = (_SCRIPT_DIR / "lease.lua").read_text()
MARK_FLUSHED_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, k in ipairs(KEYS) do redis.call('HSET', k, 'acks', 0, 'flushed_ms', string.format('%d', now)) end
return #KEYS
"""
MGET_CHUNK = 1000
# Redis Cluster lease copies (see RedisLeaseManager). KEYS[1] the lease hash, KEYS[2] the set of its copies;
# ARGV[1] owner, ARGV[2] epoch, ARGV[3] the copy key. If the lease is this holder's and unexpired, the copy
# is registered (a takeover then fences it) in the same step: returns {1, ms left} or {0, owner, epoch}.
REGISTER_COPY_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local l = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'expires')
if l[1] ~= ARGV[1] or l[2] ~= ARGV[2] or tonumber(l[3] or '0') <= now then
  return {0, l[1] or false, l[2] or false}
end
redis.call('SADD', KEYS[2], ARGV[3])
return {1, tonumber(l[3]) - now}
"""
# KEYS[1] a lease copy {owner, epoch, expires (ms, this node's clock), dead}; ARGV[1] owner, ARGV[2] epoch,
# ARGV[3] ms the lease has left ('0': released / revoked), ARGV[4] 'fence' (the lease's holder of record
# after a takeover, release or revoke: wins at an equal epoch) or 'refresh' (a holder renewing its copy on
# demand: never revives a copy fenced at its epoch). A lower epoch never overwrites a higher one. The copy
# expires a margin before the lease (the time between reading the lease and writing the copy).
SET_COPY_LUA = """
local c = redis.call('HMGET', KEYS[1], 'epoch', 'dead')
local ce, e = tonumber(c[1] or '-1'), tonumber(ARGV[2])
if e < ce or (e == ce and ARGV[4] == 'refresh' and c[2] == '1') then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = tonumber(ARGV[3])
local expires = now + left - math.min(1000, math.floor(left / 10))
if left <= 0 then expires = now end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[2], 'expires', string.format('%d', expires),
  'dead', left <= 0 and '1' or '0')
return 1
"""
#: Per-store cache of a key's Redis key strings (building them validates a LeaseKey each time).
KEY_CACHE_MAX = 65_536
_OUTCOMES = {o.value.encode(): o for o in SaveOutcome}  # as the save script returns them
# Operator write: no monotonic guard, no fencing; replaces even a garbage value (or a key of the wrong
# type) and always appends a history entry. KEYS[1] checkpoint, KEYS[2] history stream, KEYS[3] sentinel.
# ARGV[1] sequence, ARGV[2] writer, ARGV[3] ttl ms ('' = keep the key's current TTL), ARGV[4] run id,
# ARGV[5] reason, ARGV[6] history maxlen ('0' = uncapped: a forced write is always recorded).
# A number goes to the shared key (and clears the sentinel); a sentinel goes to its own key, and a
# TRIM_HORIZON / LATEST also removes the shared number (a rewind: other workers start over too).
# Returns the previous position (or '<type>' for a non-string key), or false.
FORCE_SET_LUA = """
local kind = redis.call('TYPE', KEYS[1]).ok
local prev = false
if kind == 'string' then
  prev = redis.call('GET', KEYS[1])
elseif kind ~= 'none' then
  prev = '<redis ' .. kind .. '>'
  redis.call('DEL', KEYS[1])
end
local sprev = redis.call('GET', KEYS[3])
if sprev and (not prev or sprev == 'SHARD_END' or not string.find(prev, '^[0-9]+$')) then prev = sprev end
if string.find(ARGV[1], '^[0-9]+$') then
  redis.call('DEL', KEYS[3])
  if ARGV[3] ~= '' then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  elseif kind == 'string' then
    redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
  else
    redis.call('SET', KEYS[1], ARGV[1])
  end
else
  if ARGV[1] ~= 'SHARD_END' or (kind == 'string' and not string.find(redis.call('GET', KEYS[1]), '^[0-9]+$')) then
    redis.call('DEL', KEYS[1])
  end
  if ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3]) else redis.call('SET', KEYS[3], ARGV[1]) end
end
local fields = {'prev', prev or '', 'seq', ARGV[1], 'writer', ARGV[2], 'epoch', '', 'run', ARGV[4],
                'reason', ARGV[5], 'forced', '1'}
if ARGV[6] ~= '0' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', unpack(fields))
else
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
return prev
"""


# A checkpoint key that holds no position (garbage, or another Redis type) replaced by one, fenced like a
# save and only if the key still holds what was found. KEYS[1] checkpoint, KEYS[2] lease, KEYS[3] history,
# KEYS[4] sentinel (where a SHARD_END / TRIM_HORIZON / LATEST goes: the shared key then holds nothing).
# ARGV[1] the type found ('string' for a garbage value), ARGV[2] sequence, ARGV[3] writer, ARGV[4] epoch
# ('' = unfenced), ARGV[5] run id, ARGV[6] reason, ARGV[7] history maxlen, ARGV[8] ttl ms ('' = keep the key's),
# ARGV[9] the garbage value found (type 'string'). Returns {'replaced'|'changed'|'lease_lost', owner, epoch}.
REPLACE_UNUSABLE_LUA = """
if ARGV[4] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local l = redis.call('HMGET', KEYS[2], 'owner', 'epoch', 'expires')
  if l[1] ~= ARGV[3] or l[2] ~= ARGV[4] or tonumber(l[3] or '0') <= now then
    return {'lease_lost', l[1] or false, l[2] or false}
  end
end
if redis.call('TYPE', KEYS[1]).ok ~= ARGV[1] then return {'changed', false, false} end
local prev = '<redis ' .. ARGV[1] .. '>'
if ARGV[1] == 'string' then
  prev = redis.call('GET', KEYS[1])
  if prev ~= ARGV[9] then return {'changed', false, false} end
end
if not string.find(ARGV[2], '^[0-9]+$') then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[4], ARGV[2])
elseif ARGV[8] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[8])
elseif ARGV[1] == 'string' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[1], ARGV[2])
end
if ARGV[7] ~= '0' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'prev', prev, 'seq', ARGV[2],
    'writer', ARGV[3], 'epoch', ARGV[4], 'run', ARGV[5], 'reason', ARGV[6])
end
return {'replaced', false, false}
"""


def save_script_keys(key: CheckpointKey, *, cluster: bool) -> tuple[str, str, str, str]:
    """KEYS[1..4] of ``checkpoint.lua`` for ``key``: checkpoint, lease (on a cluster: the checkpoint's
    lease copy), history, sentinel. For every caller of the save script (store, mirror, repair)."""
    companions = key.companions(cluster=cluster)
    lease = companions.lease_copy if companions.lease_copy is not None else key.lease_key.redis_key
    return (key.redis_key, lease, companions.history, companions.sentinel)


def _s(v: Any) -> str | None:
    if v is None or v is False:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class WrongType:
    """What ``load_raw_many`` returns for a key of another Redis type than a string (``MGET`` says nil)."""

    kind: str  # hash, list, set, zset, stream

    def __str__(self) -> str:
        return f"<redis {self.kind}>"


def wrong_type_error(redis_key: str, kind: str) -> WrongTypeKeyError:
    return WrongTypeKeyError(
        f"Redis key {redis_key!r} holds a {kind}, not the checkpoint string the shared layout puts there "
        f"(another program wrote it?); nothing was read or written there. Look at it (`redis-cli TYPE {redis_key}`), "
        "then replace it with the last position known to be processed: `durability-pipelines checkpoints set "
        "<adapter> <stream> <group> <consumer> [<shard>] --sequence <position> --force`, or delete it "
        "(the hybrid store then restores it from Postgres).",
        key=redis_key, kind=kind,
    )


def parse_stored(key: CheckpointKey, raw: Any) -> str | None:
    """A stored raw value as a canonical sequence (``None`` if absent); raises ``InvalidSequenceError``
    (``WrongTypeKeyError`` for a key of another type)."""
    if raw is None:
        return None
    if isinstance(raw, WrongType):
        raise wrong_type_error(key.redis_key, raw.kind)
    fast = fast_sequence(raw)
    return fast if fast is not None else normalize_sequence(raw, key=key.redis_key)


def _mask(client: redis.Redis) -> str:
    return describe_client(client)


def _unavailable(client: redis.Redis, exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"cannot reach {_mask(client)}: {type(exc).__name__}. Check that Redis is running and "
        "DURABILITY_REDIS_URL is right; nothing was written."
    )


@contextmanager
def redis_errors(client: redis.Redis) -> Iterator[None]:
    """Turn connection failures into ``StoreUnavailableError`` (no credentials in the message)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise _unavailable(client, exc) from exc


class RedisLeaseManager(LeaseManager):
    """Leases in ``durability:lease:...`` hashes (``lease.lua``).

    On a Redis Cluster a checkpoint's save cannot read the lease (another slot), so it reads a *copy*
    in the checkpoint's slot (``durability:leasecopy:{checkpoint:...}``, same fields). The copies keep
    the fencing rule by two steps, each atomic on its own node:

    * a holder whose save finds its copy missing or expired refreshes it (:meth:`refresh_copy`): on the
      lease's node, "is the lease still mine, unexpired? then register this copy", then on the copy's
      node "write (owner, epoch, expiry) unless a higher epoch, or this epoch fenced, is there";
    * every takeover, release, revoke or sync first changes the lease, then overwrites every registered
      copy with the new holder and epoch (:meth:`_fence_copies`) before it returns.

    So once ``acquire`` (or ``sync``/``release``/``revoke``) has returned, no save under an older epoch
    succeeds on any node: a refresh that began before the takeover registered its copy before the
    takeover read the set, and loses to the higher epoch whichever lands last. What is not atomic: while a
    takeover is still overwriting copies (one round trip per copy), the old holder's unexpired copy
    still admits its saves; they all happen before the new holder's ``acquire`` returns.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._script = client.register_script(LEASE_LUA)
        self._cluster = is_cluster(client)
        if self._cluster:
            self._register_copy = client.register_script(REGISTER_COPY_LUA)
            self._set_copy = client.register_script(SET_COPY_LUA)

    def _call(self, key: LeaseKey, *args: object) -> tuple[bool, Lease]:
        with redis_errors(self._client):
            ok, owner, epoch, expires = self._script(keys=[key.redis_key], args=list(args))
        lease = Lease(key, _s(owner) or "", int(epoch), datetime.fromtimestamp(int(expires) / 1000, timezone.utc))
        return bool(ok), lease

    def _fence_copies(self, lease: Lease, left_ms: int) -> None:
        """Redis Cluster: make every registered copy of ``lease.key`` say what the lease says now."""
        if not self._cluster:
            return
        with redis_errors(self._client):
            for copy in self._client.smembers(lease.key.copies_key):
                self._set_copy(keys=[copy], args=[lease.owner, lease.epoch, max(0, left_ms), "fence"])

    def refresh_copy(self, lease: Lease, copy_key: str) -> None:
        """Redis Cluster: write ``lease`` to the checkpoint's copy, if it is still the lease of record;
        raises ``LeaseLostError`` (naming the holder of record) if not."""
        with redis_errors(self._client):
            answer = self._register_copy(keys=[lease.key.redis_key, lease.key.copies_key],
                                         args=[lease.owner, lease.epoch, copy_key])
            if not int(answer[0]):
                raise lease_lost(lease, _s(answer[1]), int(answer[2]) if answer[2] else None)
            self._set_copy(keys=[copy_key], args=[lease.owner, lease.epoch, int(answer[1]), "refresh"])

    def acquire(self, key: LeaseKey, owner: str, duration_s: float = 60.0, *, steal: bool = False) -> Lease | None:
        ok, lease = self._call(key, "acquire", owner, int(duration_s * 1000), "1" if steal else "0")
        if ok:
            self._fence_copies(lease, int(duration_s * 1000))
        return lease if ok else None

    def renew(self, lease: Lease, duration_s: float = 60.0) -> Lease:
        ok, now = self._call(lease.key, "renew", lease.owner, int(duration_s * 1000), lease.epoch)
        if not ok:
            raise lease_lost(lease, now.owner, now.epoch)
        return now  # copies are refreshed on demand, by the next save that finds its copy expired

    def release(self, lease: Lease) -> bool:
        ok, now = self._call(lease.key, "release", lease.owner, 0, lease.epoch)
        if ok:
            self._fence_copies(now, 0)
        return ok

    def sync(self, lease: Lease, duration_s: float = 60.0) -> bool:
        """Mirror a lease granted elsewhere (hybrid), valid for ``duration_s`` more; the highest epoch wins."""
        ok, now = self._call(lease.key, "sync", lease.owner, int(duration_s * 1000), lease.epoch)
        if ok:
            self._fence_copies(now, int(duration_s * 1000))
        return ok

    def revoke(self, key: LeaseKey) -> None:
        """Expire the copy now, whoever holds it: its holder's fenced saves are refused from here on."""
        _, now = self._call(key, "revoke", "", 0, 0)
        self._fence_copies(now, 0)

    def get(self, key: LeaseKey) -> Lease | None:
        with redis_errors(self._client):
            owner, epoch, expires = self._client.hmget(key.redis_key, "owner", "epoch", "expires")
        if epoch is None:
            return None
        return Lease(key, _s(owner) or "", int(epoch), datetime.fromtimestamp(int(expires) / 1000, timezone.utc))

    def list(self) -> list[Lease]:
        from durability_pipelines.checkpoints.keys import LEASE_PREFIX

        out = []
        with redis_errors(self._client):
            for raw in self._client.scan_iter(match=f"{LEASE_PREFIX}:*", count=1000):
                try:
                    key = LeaseKey.parse(raw)
                except ValueError:
                    continue  # not a lease key of this layout
                if (lease := self.get(key)) is not None:
                    out.append(lease)
        return sorted(out, key=lambda lease: lease.key)


class RedisCheckpointStore(CheckpointStore):
    """Checkpoints in Redis under ``checkpoint:<adapter>:<stream>:<group>:<consumer>:<shard>``.

    ``ttl_s=None`` (default) keeps keys forever: strict durability.  A TTL
    (the original examples use 86400) lets abandoned consumers expire.
    ``history_maxlen`` caps the per-key history stream (0 disables it).
    ``wait_replicas`` > 0 makes every save wait (Redis ``WAIT``, up to ``wait_timeout_s``) until that
    many replicas have it, so that an acked checkpoint survives a failover; fewer in time raises
    ``ReplicationTimeoutError`` (the ack fails and the batch is retried).
    """

    backend = "redis"

    def __init__(self, client: redis.Redis, *, ttl_s: float | None = None, history_maxlen: int = 1000,
                 wait_replicas: int = 0, wait_timeout_s: float = 1.0) -> None:
        if wait_replicas < 0 or wait_timeout_s <= 0:
            raise ValueError("wait_replicas must be >= 0 and wait_timeout_s > 0")
        self.cluster = is_cluster(client)
        if self.cluster and wait_replicas:
            raise ConfigError(
                "redis_wait_replicas is not supported on a Redis Cluster (redis+cluster://) yet: WAIT must run on "
                "the node that took the save. Set redis_wait_replicas: 0, or use a Sentinel-managed master "
                "(redis+sentinel://) for acks that wait for replicas.")
        self.client = client
        self.wait_replicas = int(wait_replicas)
        self.wait_timeout_ms = max(1, int(wait_timeout_s * 1000))
        self.ttl_ms = "" if ttl_s is None else str(int(ttl_s * 1000))
        self.history_maxlen = str(int(history_maxlen))
        self._save = client.register_script(SAVE_LUA)
        self._mark_flushed = client.register_script(MARK_FLUSHED_LUA)
        self._force_set = client.register_script(FORCE_SET_LUA)
        self._replace_unusable = client.register_script(REPLACE_UNUSABLE_LUA)
        self._leases = RedisLeaseManager(client)
        self._key_cache: dict[CheckpointKey, tuple[str, str, str, str, str]] = {}

    def _redis_keys(self, key: CheckpointKey) -> tuple[str, str, str, str, str]:
        """(checkpoint, lease, history, sentinel, hybrid flush-state) Redis keys of ``key``, cached.

        On a cluster the "lease" is the checkpoint's lease copy, in the checkpoint's slot like the rest."""
        cached = self._key_cache.get(key)
        if cached is None:
            if len(self._key_cache) >= KEY_CACHE_MAX:
                self._key_cache.clear()
            cached = save_script_keys(key, cluster=self.cluster) + (key.companions(cluster=self.cluster).hybrid_state,)
            self._key_cache[key] = cached  # type: ignore[assignment]
        return cached  # type: ignore[return-value]

    def _position_redis_keys(self, keys: Iterable[CheckpointKey]) -> list[str]:
        """Each key's shared checkpoint key followed by its sentinel key: what one position is read from."""
        get = self._key_cache.get
        out: list[str] = []
        for k in keys:
            cached = get(k) or self._redis_keys(k)
            out += (cached[0], cached[3])
        return out

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisCheckpointStore:
        return cls(redis_client(url, socket_timeout=10, socket_connect_timeout=5), **kwargs)

    @property
    def leases(self) -> RedisLeaseManager:
        return self._leases

    def load(self, key: CheckpointKey) -> str | None:
        return parse_stored(key, self.load_raw_many([key])[0])

    def load_raw_many(self, keys: list[CheckpointKey]) -> list[Any]:
        """Raw positions in key order (pipelined MGET in chunks), unparsed; ``WrongType`` for a key that
        holds another type than a string (MGET answers nil for those, as for a missing key).

        A position is read from the shared key and the sentinel key together (``sentinels.effective``):
        a ``SHARD_END`` there wins, a ``TRIM_HORIZON`` / ``LATEST`` counts only where no number is stored.
        """
        if not keys:
            return []
        redis_keys = self._position_redis_keys(keys)
        with redis_errors(self.client):
            both = mget_all(self.client, redis_keys)  # per slot on a cluster (a key and its sentinel share one)
            values = both[0::2]
            absent = [i for i, v in enumerate(values) if v is None]
            if absent:  # rare (new shards): tell a missing key from one of another type
                pipe = self.client.pipeline(transaction=False)
                for i in absent:
                    pipe.type(redis_keys[2 * i])
                for i, kind in zip(absent, pipe.execute(), strict=True):
                    kind = _s(kind)
                    if kind not in ("none", "string"):
                        values[i] = WrongType(kind or "?")
        return [effective(v, s) for v, s in zip(values, both[1::2], strict=True)]

    def load_many(self, keys: Iterable[CheckpointKey]) -> dict[CheckpointKey, str | None]:
        keys = list(keys)
        return {k: parse_stored(k, raw) for k, raw in zip(keys, self.load_raw_many(keys), strict=True)}

    def keys(self) -> list[CheckpointKey]:
        out = []
        with redis_errors(self.client):
            for raw in self.client.scan_iter(match=f"{REDIS_PREFIX}:*", count=1000):
                try:
                    out.append(CheckpointKey.parse(raw))
                except ValueError:
                    continue  # not ours to interpret (a foreign key under the same prefix)
        return sorted(out)

    def save(
        self,
        key: CheckpointKey,
        sequence: str,
        *,
        lease: Lease | None = None,
        context: SaveContext | None = None,
    ) -> SaveResult:
        return self.save_counting(key, sequence, lease=lease, context=context)[0]

    def save_counting(
        self,
        key: CheckpointKey,
        sequence: str,
        *,
        lease: Lease | None = None,
        context: SaveContext | None = None,
        flush_state: bool = False,
    ) -> tuple[SaveResult, int | None, int | None]:
        """Save; with ``flush_state`` also count the ack in the key's hybrid flush-state hash.

        Returns ``(result, acks_since_flush, ms_since_flush)`` (the last two ``None``
        without ``flush_state``), still in one round trip.
        """
        redis_key, lease_key, history_key, sentinel_key, state_key = self._redis_keys(key)
        canonical = fast_sequence(sequence)
        sequence = canonical if canonical is not None else normalize_sequence(sequence, key=redis_key)
        ctx = context or SaveContext()
        writer = lease.owner if lease else ctx.writer
        args = [sequence, writer, "" if lease is None else str(lease.epoch), self.ttl_ms,
                ctx.run_id or "", ctx.reason or "", self.history_maxlen]
        keys = [redis_key, lease_key, history_key, sentinel_key]
        if flush_state:
            keys.append(state_key)
        try:  # what redis_errors() does, inline: this is the hot path
            outcome, prev, third, fourth = self._run_save_script(keys, args)
            if self.cluster and lease is not None and _s(outcome) == "lease_lost":
                # The copy beside the checkpoint is missing or expired (first save, or after a renewal):
                # refresh it from the lease, if still ours (else LeaseLostError), and save again.
                self._leases.refresh_copy(lease, lease_key)
                outcome, prev, third, fourth = self._run_save_script(keys, args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise _unavailable(self.client, exc) from exc
        except redis.ResponseError as exc:
            if "DURABILITY_INVALID_SEQUENCE" in str(exc):
                raise InvalidSequenceError(
                    f"Redis key {key.redis_key!r} holds an invalid sequence ({exc}); nothing was written. "
                    "Fix it with `durability-pipelines checkpoints set ... --sequence S --force` "
                    "or delete the key to fall back to Postgres (hybrid).",
                    key=key.redis_key,
                ) from exc
            if str(exc).startswith("WRONGTYPE"):
                raise self._wrong_type(keys) from exc
            raise
        result = _OUTCOMES.get(outcome)
        previous = _s(prev)
        if result is None:
            outcome = _s(outcome)
            if outcome == "lease_lost":
                raise lease_lost(lease, _s(third), int(fourth) if fourth else None)  # type: ignore[arg-type]
            result = SaveOutcome(outcome)
        current = sequence if result is SaveOutcome.ADVANCED else (previous or sequence)
        acks = int(third) if flush_state and third is not None else None
        since = int(fourth) if flush_state and fourth is not None else None
        return SaveResult(key, result, previous, current), acks, since

    def _wrong_type(self, redis_keys: list[str]) -> WrongTypeKeyError:
        """Which of a save's keys is of the wrong type (the script only says WRONGTYPE)."""
        expected = ("string", "hash", "stream", "string", "hash")  # checkpoint, lease, history, sentinel, flush state
        with redis_errors(self.client):
            pipe = self.client.pipeline(transaction=False)
            for k in redis_keys:
                pipe.type(k)
            kinds = [_s(t) for t in pipe.execute()]
        for k, kind, want in zip(redis_keys, kinds, expected, strict=False):
            if kind not in ("none", want):
                return wrong_type_error(k, kind or "?")
        return wrong_type_error(redis_keys[0], "value of another type")

    def replace_unusable(self, key: CheckpointKey, sequence: str, *, lease: Lease | None,
                         context: SaveContext) -> bool:
        """Replace a checkpoint key that holds no position (garbage, or another Redis type) by ``sequence``,
        under the lease. For the hybrid store, which has the truth in Postgres: a Redis-only store has
        nothing to replace it with. False if the key changed meanwhile; ``LeaseLostError`` if fenced out."""
        redis_key, lease_key, history_key, sentinel_key, _ = self._redis_keys(key)
        with redis_errors(self.client):
            kind = _s(self.client.type(redis_key)) or "none"
            found = _s(self.client.get(redis_key)) if kind == "string" else ""
            args = [kind, sequence, lease.owner if lease else context.writer,
                    "" if lease is None else str(lease.epoch), context.run_id or "", context.reason or "",
                    self.history_maxlen, self.ttl_ms, found or ""]
            outcome, owner, epoch = self._replace_unusable(keys=[redis_key, lease_key, history_key, sentinel_key],
                                                           args=args)
            if self.cluster and lease is not None and _s(outcome) == "lease_lost":
                self._leases.refresh_copy(lease, lease_key)  # see save_counting
                outcome, owner, epoch = self._replace_unusable(
                    keys=[redis_key, lease_key, history_key, sentinel_key], args=args)
        if _s(outcome) == "lease_lost":
            raise lease_lost(lease, _s(owner), int(epoch) if epoch else None)  # type: ignore[arg-type]
        return _s(outcome) == "replaced"

    def force_set(self, key: CheckpointKey, sequence: str, *, context: SaveContext) -> ForceSetResult:
        """Unconditional operator write plus a history entry, atomically (one Lua call).

        With ``ttl_s=None`` an existing key keeps its TTL, so forcing a value does not
        change the expiry policy the workers configured.
        """
        sequence = normalize_sequence(sequence, key=key.redis_key)
        ctx = require_force_context(context)
        args = [sequence, ctx.writer, self.ttl_ms, ctx.run_id or "", ctx.reason or "", self.history_maxlen]
        with redis_errors(self.client):
            redis_key, _, history_key, sentinel_key, _ = self._redis_keys(key)
            prev = self._force_set(keys=[redis_key, history_key, sentinel_key], args=args)
        previous = _s(prev)
        return ForceSetResult(key, previous, sequence, {self.backend: previous})

    def _run_save_script(self, keys: list[str], args: list[str]) -> Any:
        """``self._save(keys=keys, args=args)`` without redis-py's ``Script`` wrapper: the hot path.

        The same ``EVALSHA``; only when the server does not know the script yet (``NOSCRIPT``)
        does the wrapper run, which loads it and retries. With ``wait_replicas`` the ``WAIT`` follows
        on the same connection (one pipeline): ``WAIT`` counts the replicas that have *this
        connection's* writes.
        """
        if self.wait_replicas:
            return self._run_save_script_and_wait(keys, args)
        try:
            return self.client.execute_command("EVALSHA", self._save.sha, len(keys), *keys, *args)
        except NoScriptError:
            return self._save(keys=keys, args=args)

    def _run_save_script_and_wait(self, keys: list[str], args: list[str]) -> Any:
        """EVALSHA then ``WAIT wait_replicas timeout`` in one pipeline; raises ``ReplicationTimeoutError``."""
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", self._save.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            saved, replicas = pipe.execute(raise_on_error=False)
            if isinstance(saved, NoScriptError) and attempt == 1:
                self.client.script_load(SAVE_LUA)  # the script never ran: running it again is the first run
                continue
            if isinstance(saved, Exception):
                raise saved
            if isinstance(replicas, Exception):
                raise replicas
            if int(replicas) < self.wait_replicas and _s(saved[0]) != "lease_lost":
                raise ReplicationTimeoutError(
                    f"checkpoint {keys[0]!r} was written on the Redis master ({_mask(self.client)}) but only "
                    f"{int(replicas)} of the {self.wait_replicas} replicas required by redis_wait_replicas "
                    f"confirmed it within {self.wait_timeout_ms} ms, so a failover could lose it: the ack is "
                    "reported as failed and the batch will be retried (saves are monotonic, repeating one is "
                    "safe). Check the replicas (`redis-cli INFO replication` on the master: connected_slaves, "
                    "lag), or lower redis_wait_replicas / raise redis_wait_timeout_s."
                )
            return saved
        raise AssertionError("unreachable")  # pragma: no cover

    def mark_flushed(self, keys: Iterable[CheckpointKey]) -> None:
        """Reset the hybrid flush-state of ``keys`` after a successful Postgres flush."""
        keys = list(keys)
        if not keys:
            return
        with redis_errors(self.client):
            if not self.cluster:
                self._mark_flushed(keys=[self._redis_keys(k)[4] for k in keys])
                return
            for k in keys:  # one slot per call on a cluster
                self._mark_flushed(keys=[self._redis_keys(k)[4]])

    def history(self, key: CheckpointKey, limit: int = 100) -> list[HistoryEntry]:
        with redis_errors(self.client):
            rows = self.client.xrevrange(self._redis_keys(key)[2], count=limit)
        out = []
        for entry_id, fields in rows:
            f = {_s(k): _s(v) for k, v in fields.items()}
            ms = int(_s(entry_id).split("-")[0])
            out.append(
                HistoryEntry(
                    key, f.get("prev") or None, f.get("seq") or "", f.get("writer") or None,
                    int(f["epoch"]) if f.get("epoch") else None, f.get("run") or None,
                    datetime.fromtimestamp(ms / 1000, timezone.utc), f.get("reason") or None,
                )
            )
        return out


@dataclass(frozen=True)
class LayoutMove:
    """One key ``migrate`` moved to the Redis Cluster layout (or left, saying why)."""

    old: str
    new: str
    moved: bool
    why: str = ""

    def describe(self) -> str:
        return f"{self.old} -> {self.new}" if self.moved else f"{self.old}: left as is ({self.why})"


def move_to_cluster_layout(client: Any, *, scan_count: int = 1000) -> list[LayoutMove]:
    """On a Redis Cluster, move the project's keys written in the single-node layout (history, sentinel,
    hybrid flush state: ``durability:<kind>:<adapter>:...``, e.g. copied over from a single Redis) to
    their names in the checkpoint's slot (``durability:<kind>:{checkpoint:...}``). No-op on one server.

    The two names are in different slots, so it is ``DUMP`` + ``RESTORE`` (TTL kept) + ``DEL``, not one
    ``RENAME``: run it while no consumer writes (a save meanwhile goes to the new name, and a key that
    already exists there is left as is and reported).
    """
    from durability_pipelines.checkpoints.keys import (
        HISTORY_PREFIX,
        HYBRID_STATE_PREFIX,
        SENTINEL_PREFIX,
        companion_keys,
    )

    if not is_cluster(client):
        return []
    out: list[LayoutMove] = []
    for prefix, kind in ((HISTORY_PREFIX, "history"), (SENTINEL_PREFIX, "sentinel"), (HYBRID_STATE_PREFIX, "hybrid_state")):
        for raw in list(dict.fromkeys(client.scan_iter(match=f"{prefix}:*", count=scan_count))):
            old = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            if old.startswith(f"{prefix}:{{"):
                continue  # already in the cluster layout
            checkpoint = REDIS_PREFIX + old[len(prefix) :]
            try:
                CheckpointKey.parse(checkpoint)
                new = getattr(companion_keys(checkpoint, cluster=True), kind)
            except ValueError as exc:
                out.append(LayoutMove(old, "?", False, f"not a key of this layout: {exc}"))
                continue
            if client.exists(new):
                out.append(LayoutMove(old, new, False, f"{new} exists already (written since); delete one of them"))
                continue
            dump, ttl = client.dump(old), client.pttl(old)
            if dump is None:
                continue  # expired or deleted since the SCAN
            client.restore(new, max(0, ttl), dump)
            client.delete(old)
            out.append(LayoutMove(old, new, True))
    return out
