"""Redis checkpoints: fast and shared between workers.

Each save is one ``EVALSHA`` of ``checkpoint.lua`` (monotonic guard, lease
fencing, optional TTL and a capped history stream, atomically).  Keys follow
the original layout so other workers read and write the same checkpoints.
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
    InvalidSequenceError,
    ReplicationTimeoutError,
    StoreUnavailableError,
    WrongTypeKeyError,
    lease_lost,
)
from durability_pipelines.checkpoints.keys import REDIS_PREFIX, CheckpointKey, LeaseKey
from durability_pipelines.checkpoints.ordering import fast_sequence, normalize_sequence
from durability_pipelines.checkpoints.sentinels import effective
from durability_pipelines.redis_client import describe_client, redis_client

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
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._script = client.register_script(LEASE_LUA)

    def _call(self, key: LeaseKey, *args: object) -> tuple[bool, Lease]:
        with redis_errors(self._client):
            ok, owner, epoch, expires = self._script(keys=[key.redis_key], args=list(args))
        lease = Lease(key, _s(owner) or "", int(epoch), datetime.fromtimestamp(int(expires) / 1000, timezone.utc))
        return bool(ok), lease

    def acquire(self, key: LeaseKey, owner: str, duration_s: float = 60.0, *, steal: bool = False) -> Lease | None:
        ok, lease = self._call(key, "acquire", owner, int(duration_s * 1000), "1" if steal else "0")
        return lease if ok else None

    def renew(self, lease: Lease, duration_s: float = 60.0) -> Lease:
        ok, now = self._call(lease.key, "renew", lease.owner, int(duration_s * 1000), lease.epoch)
        if not ok:
            raise lease_lost(lease, now.owner, now.epoch)
        return now

    def release(self, lease: Lease) -> bool:
        ok, _ = self._call(lease.key, "release", lease.owner, 0, lease.epoch)
        return ok

    def sync(self, lease: Lease, duration_s: float = 60.0) -> bool:
        """Mirror a lease granted elsewhere (hybrid), valid for ``duration_s`` more; the highest epoch wins."""
        ok, _ = self._call(lease.key, "sync", lease.owner, int(duration_s * 1000), lease.epoch)
        return ok

    def revoke(self, key: LeaseKey) -> None:
        """Expire the copy now, whoever holds it: its holder's fenced saves are refused from here on."""
        self._call(key, "revoke", "", 0, 0)

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
        """(checkpoint, lease, history, sentinel, hybrid flush-state) Redis keys of ``key``, cached."""
        cached = self._key_cache.get(key)
        if cached is None:
            if len(self._key_cache) >= KEY_CACHE_MAX:
                self._key_cache.clear()
            cached = (key.redis_key, key.lease_key.redis_key, key.history_key, key.sentinel_key,
                      key.hybrid_state_key)
            self._key_cache[key] = cached
        return cached

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
            if len(redis_keys) <= MGET_CHUNK:
                both = self.client.mget(redis_keys)
            else:
                pipe = self.client.pipeline(transaction=False)
                for i in range(0, len(redis_keys), MGET_CHUNK):
                    pipe.mget(redis_keys[i : i + MGET_CHUNK])
                both = [v for chunk in pipe.execute() for v in chunk]
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
            prev = self._force_set(keys=[key.redis_key, key.history_key, key.sentinel_key], args=args)
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
            self._mark_flushed(keys=[self._redis_keys(k)[4] for k in keys])

    def history(self, key: CheckpointKey, limit: int = 100) -> list[HistoryEntry]:
        with redis_errors(self.client):
            rows = self.client.xrevrange(key.history_key, count=limit)
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
