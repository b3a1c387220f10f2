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

import logging
from collections import deque
from collections.abc import Callable, Iterable
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
    SaveContext,
    SaveOutcome,
    SaveResult,
    require_force_context,
)
from durability_pipelines.checkpoints.errors import (
    ConfigError,
    InvalidSequenceError,
    ReplicationTimeoutError,
    WrongTypeKeyError,
    lease_lost,
)
from durability_pipelines.checkpoints.keys import KEY_CACHE_MAX, REDIS_PREFIX, CheckpointKey
from durability_pipelines.checkpoints.ordering import fast_sequence, is_number, normalize_sequence
from durability_pipelines.checkpoints.redis_io import (
    WrongType,
    as_text,
    describe_server,
    parse_stored,
    redis_errors,
    unavailable_error,
    wrong_type_error,
)
from durability_pipelines.checkpoints.redis_leases import RedisLeaseManager
from durability_pipelines.checkpoints.sentinels import effective
from durability_pipelines.redis_client import is_cluster, mget_all, redis_client

_SCRIPT_DIR = resources.files("durability_pipelines.checkpoints")
log = logging.getLogger(__name__)

#: The length a TTL found on a shared key (another worker's ``SET key seq EX 86400``) is renewed to at each save
#: of a store with no TTL of its own: the original pattern's. Never shortens a longer one.
INHERITED_TTL_S = 86400.0


def _script(name: str) -> str:
    """A Lua script shipped beside this module (each file's header says its KEYS, ARGV and reply)."""
    return (_SCRIPT_DIR / name).read_text()


SAVE_LUA = _script("checkpoint.lua")
MARK_FLUSHED_LUA = _script("mark_flushed.lua")
MGET_CHUNK = 1000
_OUTCOMES = {o.value.encode(): o for o in SaveOutcome}  # as the save script returns them
FORCE_SET_LUA = _script("force_set.lua")


REPLACE_UNUSABLE_LUA = _script("replace_unusable.lua")
RESTORE_MISSING_LUA = _script("restore_missing.lua")


@dataclass(frozen=True)
class Restore:
    """A checkpoint a load found missing in Redis although the project's history recorded it, put back."""

    key: CheckpointKey
    sequence: str
    why: str  # what happened to the key (its TTL ran out, or it was deleted), from the history entry


def save_script_keys(key: CheckpointKey, *, cluster: bool) -> tuple[str, str, str, str]:
    """KEYS[1..4] of ``checkpoint.lua`` for ``key``: checkpoint, lease (on a cluster: the checkpoint's
    lease copy), history, sentinel. For every caller of the save script (store, mirror, repair)."""
    companions = key.companions(cluster=cluster)
    lease = companions.lease_copy if companions.lease_copy is not None else key.lease_key.redis_key
    return (key.redis_key, lease, companions.history, companions.sentinel)


















class RedisCheckpointStore(CheckpointStore):
    """Checkpoints in Redis under ``checkpoint:<adapter>:<stream>:<group>:<consumer>:<shard>``.

    ``ttl_s=None`` (default) keeps keys forever: strict durability.  A TTL
    (the original examples use 86400) lets abandoned consumers expire.
    ``history_maxlen`` caps the per-key history stream (0 disables it).
    A key that has a TTL the store did not set (another worker's ``SET key seq EX 86400``) keeps one: each save
    renews it to ``inherited_ttl_s`` (the original pattern's 86400 s), as that worker's own ``SET`` does, so a
    TTL never runs out under a consumer that keeps acking. A load that finds a key gone (its TTL ran out while
    the consumer was idle, or it was deleted) although the key's history recorded a position puts that position
    back (``_restore_missing``) instead of answering "no checkpoint", which would send the consumer to its
    initial position (``LATEST``: everything in between skipped).
    ``wait_replicas`` > 0 makes every save wait (Redis ``WAIT``, up to ``wait_timeout_s``) until that
    many replicas have it, so that an acked checkpoint survives a failover; fewer in time raises
    ``ReplicationTimeoutError`` (the ack fails and the batch is retried).
    """

    backend = "redis"

    def __init__(self, client: redis.Redis, *, ttl_s: float | None = None, history_maxlen: int = 1000,
                 wait_replicas: int = 0, wait_timeout_s: float = 1.0,
                 inherited_ttl_s: float | None = INHERITED_TTL_S) -> None:
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
        # A TTL another worker put on a key is renewed to this at each save (ttl_s=None only; None: kept as is)
        self.renew_ms = "" if inherited_ttl_s is None else str(int(inherited_ttl_s * 1000))
        self.restores: deque[Restore] = deque(maxlen=100)  # keys loads put back from the history (_restore_missing)
        self.foreign_moves: deque[SaveResult] = deque(maxlen=100)  # saves that found a foreign rewind (REWOUND)
        #: called with each such save (the factory records it in Postgres's ``checkpoint_history`` when it can)
        self.on_foreign_move: Callable[[SaveResult, SaveContext], None] | None = None
        self._restore_missing_script = client.register_script(RESTORE_MISSING_LUA)
        self._save = client.register_script(SAVE_LUA)
        self._mark_flushed = client.register_script(MARK_FLUSHED_LUA)
        self._force_set = client.register_script(FORCE_SET_LUA)
        self._replace_unusable = client.register_script(REPLACE_UNUSABLE_LUA)
        self._leases = RedisLeaseManager(client)
        self._key_cache: dict[CheckpointKey, tuple[str, str, str, str, str]] = {}
        #: per key, the value this store's last save left in the shared key: while it still holds that value,
        #: nobody lowered it since, and the save script skips the foreign-rewind check (one XREVRANGE)
        self._left: dict[CheckpointKey, tuple[str]] = {}

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
            sentinels = both[1::2]
            absent = [i for i, v in enumerate(values) if v is None]
            if absent:  # rare (new shards): tell a missing key from one of another type, and from a lost one
                pipe = self.client.pipeline(transaction=False)
                for i in absent:
                    pipe.type(redis_keys[2 * i])
                    pipe.xrevrange(self._redis_keys(keys[i])[2], count=1)  # what the project last recorded
                replies = pipe.execute(raise_on_error=False)
                for n, i in enumerate(absent):
                    kind, head = replies[2 * n], replies[2 * n + 1]
                    if isinstance(kind, Exception):
                        raise kind
                    kind = as_text(kind)
                    if isinstance(head, Exception):  # a history key of another type: nothing recorded to go by
                        head = None
                    if kind not in ("none", "string"):
                        values[i] = WrongType(kind or "?")
                    elif head and sentinels[i] is None:
                        values[i], sentinels[i] = self._restore_missing(keys[i], head[0])
            # A sentinel key of another type reads as nil too: one EXISTS says whether any nil one exists at all.
            nil = [i for i, s in enumerate(sentinels) if s is None]
            if nil and self.client.exists(*(redis_keys[2 * i + 1] for i in nil)):
                pipe = self.client.pipeline(transaction=False)
                for i in nil:
                    pipe.type(redis_keys[2 * i + 1])
                for i, kind in zip(nil, pipe.execute(), strict=True):
                    kind = as_text(kind)
                    if kind not in ("none", "string") and not isinstance(values[i], WrongType):
                        values[i] = WrongType(kind or "?", redis_keys[2 * i + 1])
        return [v if isinstance(v, WrongType) else effective(v, s) for v, s in zip(values, sentinels, strict=True)]

    def _restore_missing(self, key: CheckpointKey, head: tuple[Any, dict[Any, Any]]) -> tuple[Any, Any]:
        """The key holds nothing, yet its history's newest entry ``head`` recorded a position: its TTL ran out
        (while the consumer was idle) or it was deleted. Put the recorded number back (only if the key is still
        missing and the history unchanged: one Lua call), with a history entry and a warning that name the key
        and what happened, and return ``(shared, sentinel)`` as now stored. A history that recorded no number
        (a forced rewind to ``TRIM_HORIZON`` / ``LATEST``: "start over" on purpose) restores nothing."""
        from durability_pipelines.checkpoints.inspect import recorded_number

        entry_id, fields = head
        f = {as_text(k): as_text(v) for k, v in fields.items()}
        number = recorded_number(f.get("seq") or None, f.get("prev") or None)
        if number is None:
            return None, None
        at = datetime.fromtimestamp(int(as_text(entry_id).split("-")[0]) / 1000, timezone.utc)
        ttl = f.get("ttl")
        if ttl and ttl.lstrip("-").isdigit() and int(ttl) > 0:
            why = (f"its TTL ran out: the key had a TTL of {int(ttl) / 1000:g} s after that write (a TTL the "
                   "project keeps: another worker's `SET ... EX`, or redis_ttl_s), and no save renewed it since")
        elif ttl == "-1":
            why = "it had no TTL: it was deleted (by another program, an operator, or a Redis that lost data)"
        else:
            why = "its TTL ran out or it was deleted"
        reason = f"restored from history: the key was missing ({why[:60]}), last recorded {number} at {at:%Y-%m-%dT%H:%M:%SZ}"
        redis_key, _, history_key, sentinel_key, _ = self._redis_keys(key)
        restored = self._restore_missing_script(
            keys=[redis_key, history_key, sentinel_key],
            args=[number, self.ttl_ms, reason, self.history_maxlen if self.history_maxlen != "0" else "1000",
                  as_text(entry_id)])
        if not restored:  # someone wrote meanwhile: what is stored now
            shared, sentinel = mget_all(self.client, [redis_key, sentinel_key])
            return shared, sentinel
        log.warning(
            "checkpoint %s was missing from Redis although the project recorded %s there at %s: %s. Restored it "
            "from the key's history (%s) instead of starting from the initial position. To start over on purpose, "
            "use `durability-pipelines checkpoints set ... --sequence TRIM_HORIZON --force`.",
            redis_key, number, at.isoformat(), why, history_key)
        self.restores.append(Restore(key, number, why))
        return number, None

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
                ctx.run_id or "", ctx.reason or "", self.history_maxlen, self.renew_ms,
                *self._left.get(key, ())]  # ARGV[9]: what this store's previous save left in the shared key
        keys = [redis_key, lease_key, history_key, sentinel_key]
        if flush_state:
            keys.append(state_key)
        try:  # what redis_errors() does, inline: this is the hot path
            reply = self._run_save_script(keys, args)
            if self.cluster and lease is not None and as_text(reply[0]) == "lease_lost":
                # The copy beside the checkpoint is missing or expired (first save, or after a renewal):
                # refresh it from the lease, if still ours (else LeaseLostError), and save again.
                self._leases.refresh_copy(lease, lease_key)
                reply = self._run_save_script(keys, args)
            outcome, prev, third, fourth = reply[:4]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise unavailable_error(self.client, exc) from exc
        except redis.ResponseError as exc:
            if "DURABILITY_INVALID_SEQUENCE" in str(exc):
                raise InvalidSequenceError(
                    f"Redis key {key.redis_key!r} holds an invalid sequence ({exc}); nothing was written. "
                    "Fix it with `durability-pipelines checkpoints set ... --sequence S --force` "
                    "or delete the key to fall back to Postgres (hybrid).",
                    key=key.redis_key,
                ) from exc
            if "WRONGTYPE" in str(exc):  # Redis 7 starts with it; 6.2 says "Error running script ...: WRONGTYPE"
                raise self._wrong_type(keys) from exc
            raise
        result = _OUTCOMES.get(outcome)
        previous = as_text(prev)
        if result is None:
            outcome = as_text(outcome)
            if outcome == "lease_lost":
                raise lease_lost(lease, as_text(third), int(fourth) if fourth else None)  # type: ignore[arg-type]
            result = SaveOutcome(outcome)
        current = sequence if result is SaveOutcome.ADVANCED else (previous or sequence)
        acks = int(third) if flush_state and third is not None else None
        since = int(fourth) if flush_state and fourth is not None else None
        if result in (SaveOutcome.ADVANCED, SaveOutcome.UNCHANGED) and is_number(current):
            if len(self._left) >= KEY_CACHE_MAX:
                self._left.clear()
            self._left[key] = (current,)  # what this save left in the shared key (checkpoint.lua's ARGV[9])
        else:
            self._left.pop(key, None)
        if len(reply) > 4 and reply[4]:
            return self._moved_back(SaveResult(key, result, previous, current, as_text(reply[4])), ctx), acks, since
        return SaveResult(key, result, previous, current), acks, since

    def _moved_back(self, result: SaveResult, ctx: SaveContext) -> SaveResult:
        """The save found the shared number below the project's last recorded write: another worker moved it back.
        The script recorded it in the history and wrote nothing over it; say so, and report it to Postgres's
        history (``on_foreign_move``) where the audit's check reads it."""
        log.warning(
            "checkpoint %s: another worker moved it back from %s (the project's last recorded write) to %s. "
            "Recorded as a foreign move and honoured: nothing was written over it, and a consumer with an "
            "idempotent sink goes on from %s (it replays what that worker asked for; one whose sink is not "
            "stops the shard instead). If that write was a mistake, "
            "`durability-pipelines checkpoints repair %s` puts the recorded position back.",
            result.key.redis_key, result.moved_back_from, result.previous, result.current, result.key.redis_key)
        self.foreign_moves.append(result)
        if self.on_foreign_move is not None:
            try:
                self.on_foreign_move(result, ctx)
            except Exception as exc:  # noqa: BLE001 - the Redis history has it; the audit reads that too
                log.warning("could not record the foreign move of %s in Postgres: %s", result.key.redis_key, exc)
        return result

    def _wrong_type(self, redis_keys: list[str]) -> WrongTypeKeyError:
        """Which of a save's keys is of the wrong type (the script only says WRONGTYPE)."""
        expected = ("string", "hash", "stream", "string", "hash")  # checkpoint, lease, history, sentinel, flush state
        with redis_errors(self.client):
            pipe = self.client.pipeline(transaction=False)
            for k in redis_keys:
                pipe.type(k) if k else pipe.echo("none")
            kinds = [as_text(t) for t in pipe.execute()]
        for k, kind, want in zip(redis_keys, kinds, expected, strict=False):
            if k and kind not in ("none", want):
                return wrong_type_error(k, kind or "?")
        return wrong_type_error(redis_keys[0], "value of another type")

    def replace_unusable(self, key: CheckpointKey, sequence: str, *, lease: Lease | None,
                         context: SaveContext, at_sentinel: bool = False) -> bool:
        """Replace a checkpoint key that holds no position (garbage, or another Redis type) by ``sequence``,
        under the lease. For the hybrid store, which has the truth in Postgres: a Redis-only store has
        nothing to replace it with. False if the key changed meanwhile; ``LeaseLostError`` if fenced out."""
        redis_key, lease_key, history_key, sentinel_key, _ = self._redis_keys(key)
        self._left.pop(key, None)
        with redis_errors(self.client):
            kind = as_text(self.client.type(sentinel_key if at_sentinel else redis_key)) or "none"
            found = as_text(self.client.get(redis_key)) if kind == "string" and not at_sentinel else ""
            args = [kind, sequence, lease.owner if lease else context.writer,
                    "" if lease is None else str(lease.epoch), context.run_id or "", context.reason or "",
                    self.history_maxlen, self.ttl_ms, found or "", "sentinel" if at_sentinel else ""]
            outcome, owner, epoch = self._replace_unusable(keys=[redis_key, lease_key, history_key, sentinel_key],
                                                           args=args)
            if self.cluster and lease is not None and as_text(outcome) == "lease_lost":
                self._leases.refresh_copy(lease, lease_key)  # see save_counting
                outcome, owner, epoch = self._replace_unusable(
                    keys=[redis_key, lease_key, history_key, sentinel_key], args=args)
        if as_text(outcome) == "lease_lost":
            raise lease_lost(lease, as_text(owner), int(epoch) if epoch else None)  # type: ignore[arg-type]
        return as_text(outcome) == "replaced"

    def check_force_set(self, key: CheckpointKey) -> None:
        """Raise ``WrongTypeKeyError`` if ``force_set`` would refuse ``key`` (its history key is of another type):
        for a caller that must not write another store first (hybrid). Other types it replaces itself."""
        history_key = self._redis_keys(key)[2]
        with redis_errors(self.client):
            kind = as_text(self.client.type(history_key)) or "none"
        if kind not in ("none", "stream"):
            raise wrong_type_error(history_key, kind)

    def force_set(self, key: CheckpointKey, sequence: str, *, context: SaveContext) -> ForceSetResult:
        """Unconditional operator write plus a history entry, atomically (one Lua call).

        With ``ttl_s=None`` an existing key keeps its TTL, so forcing a value does not
        change the expiry policy the workers configured.
        """
        sequence = normalize_sequence(sequence, key=key.redis_key)
        ctx = require_force_context(context)
        args = [sequence, ctx.writer, self.ttl_ms, ctx.run_id or "", ctx.reason or "", self.history_maxlen]
        redis_key, _, history_key, sentinel_key, _ = self._redis_keys(key)
        self._left.pop(key, None)
        try:
            with redis_errors(self.client):
                prev = self._force_set(keys=[redis_key, history_key, sentinel_key], args=args)
        except redis.ResponseError as exc:
            if "WRONGTYPE" in str(exc):  # only the history stream can be (the script replaces the others)
                raise self._wrong_type([redis_key, "", history_key]) from exc
            raise
        previous = as_text(prev)
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
            if int(replicas) < self.wait_replicas and as_text(saved[0]) != "lease_lost":
                raise ReplicationTimeoutError(
                    f"checkpoint {keys[0]!r} was written on the Redis master ({describe_server(self.client)}) but only "
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
            f = {as_text(k): as_text(v) for k, v in fields.items()}
            ms = int(as_text(entry_id).split("-")[0])
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
