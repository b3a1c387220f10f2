"""Hybrid checkpoints: Redis on every ack, Postgres every N acks or T seconds.

The ack count and the last flush time live in Redis (a small hash per key,
updated by the same Lua call as the save), so the bound holds across the
short-lived processes Dagster runs ops in, not only within one process.

On restart ``load`` reads Redis first and falls back to Postgres (then
re-warms Redis).  Outages degrade instead of losing acks:

* Postgres down: saves keep going to Redis; the pending values stay buffered
  (and are in Redis) and are flushed when Postgres answers again.
* Redis down: saves go straight to Postgres, synchronously.

Leases are granted by Postgres only and mirrored to Redis with a copy that
expires no later than the grant (``HybridLeaseManager``), so a writer that lost
its lease is refused by both stores, whichever of them was down when.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
import redis

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
    LeaseLostError,
    StoreRefusedError,
    StoreUnavailableError,
    WrongTypeKeyError,
    lease_lost,
)
from durability_pipelines.checkpoints.inspect import record_external
from durability_pipelines.checkpoints.keys import CheckpointKey, LeaseKey
from durability_pipelines.checkpoints.ordering import fast_sequence, max_sequence, normalize_sequence
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from durability_pipelines.checkpoints.redis_io import WrongType
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore
from durability_pipelines.checkpoints.sentinels import effective, is_sentinel

T = TypeVar("T")

log = logging.getLogger(__name__)

_REPLACE_IF_EQUAL_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end
return 0
"""


@dataclass
class Fallback:
    """Why a load did not come from Redis (kept for operators and audits)."""

    key: CheckpointKey
    reason: str
    ts: float = field(default_factory=time.time)


#: A lease's Redis copy expires this much before its Postgres grant (at most a tenth of the lease):
#: the copy must never outlive the grant, or a takeover in Postgres could leave the old holder a
#: Redis copy that still admits its writes.
MIRROR_MARGIN_S = 1.0


#: How often a hybrid load asks Postgres for sentinels other writers put into ``checkpoint_sentinels``, per key.
SENTINEL_CHECK_EVERY_S = 30.0


def _mirror_margin(duration_s: float) -> float:
    return min(MIRROR_MARGIN_S, duration_s / 10)


class HybridLeaseManager(LeaseManager):
    """Postgres grants every lease; Redis holds a copy that expires no later than the grant.

    That is what makes the fencing rule hold whichever store is down: a save is accepted only under
    the highest epoch any store has granted for the lease, and before that grant expires.

    * Grants and renewals happen in Postgres only (while it is down, none happen: a holder keeps
      its lease until it expires, and nobody else can take it).
    * A takeover of an *expired* lease may happen while Redis is down: the old holder's Redis copy
      has expired too, so Redis refuses it (and Postgres names the new holder).
    * A steal (taking an unexpired lease from a holder presumed dead) first expires the Redis copy:
      while Redis is unreachable it is refused, because the holder might be alive and writing there.
    """

    def __init__(self, store: HybridCheckpointStore) -> None:
        self._store = store
        self._pg = store.postgres.leases
        self._redis = store.redis.leases

    def _mirror(self, lease: Lease, duration_s: float, granted_at: float) -> None:
        remaining = duration_s - (time.monotonic() - granted_at) - _mirror_margin(duration_s)
        if remaining <= 0:
            return  # too late: the save path mirrors it on demand (or refuses it, once expired)
        try:
            self._redis.sync(lease, remaining)
        except StoreUnavailableError as exc:
            self._store._degrade("redis", exc)

    def acquire(self, key: LeaseKey, owner: str, duration_s: float = 60.0, *, steal: bool = False) -> Lease | None:
        if steal:
            try:
                self._redis.revoke(key)
            except StoreUnavailableError as exc:
                self._store._degrade("redis", exc)
                raise StoreUnavailableError(
                    f"cannot take lease {key} from its holder while Redis is unreachable ({exc}): the holder may "
                    "be alive, and its Redis copy of the lease would still admit its writes. Nothing was taken. "
                    "The shard is taken over normally once the lease expires (`durability-pipelines leases "
                    "list` shows when), or when Redis is back."
                ) from exc
        granted_at = time.monotonic()
        try:
            lease = self._pg.acquire(key, owner, duration_s, steal=steal)
        except StoreUnavailableError as exc:
            self._store._degrade("postgres", exc)
            raise StoreUnavailableError(
                f"cannot acquire lease {key}: Postgres, which grants the hybrid store's leases, is unreachable "
                f"({exc}). Nothing was taken; the shard's current holder (if any) keeps it until it expires. "
                "Retry when Postgres is back."
            ) from exc
        if lease is not None:
            self._mirror(lease, duration_s, granted_at)
        return lease

    def renew(self, lease: Lease, duration_s: float = 60.0) -> Lease:
        granted_at = time.monotonic()
        try:
            renewed = self._pg.renew(lease, duration_s)
        except StoreUnavailableError as exc:
            self._store._degrade("postgres", exc)
            raise StoreUnavailableError(
                f"cannot renew lease {lease.key}: Postgres, which grants the hybrid store's leases, is unreachable "
                f"({exc}). The lease stays valid until it expires ({lease.expires_at}); after that this worker's "
                "saves are refused. Retry the renewal."
            ) from exc
        self._mirror(renewed, duration_s, granted_at)
        return renewed

    def release(self, lease: Lease) -> bool:
        released = False
        for manager, name in ((self._pg, "postgres"), (self._redis, "redis")):
            try:
                released = manager.release(lease) or released
            except StoreUnavailableError as exc:
                self._store._degrade(name, exc)
        return released

    def _granting(self, what: str, key: LeaseKey, call: Callable[[], T]) -> T:
        """Run a grant in Postgres; while it is down nothing is granted, and the error says so."""
        try:
            return call()
        except StoreUnavailableError as exc:
            self._store._degrade("postgres", exc)
            raise StoreUnavailableError(
                f"cannot {what} lease {key}: Postgres, which grants the hybrid store's leases, is unreachable "
                f"({exc}). Nothing changed; the shard's current holder (if any) keeps it until it expires. "
                "Retry when Postgres is back."
            ) from exc

    def request_handoff(self, key: LeaseKey, requester: str, duration_s: float = 60.0) -> Lease:
        granted_at = time.monotonic()
        lease = self._granting("ask for", key, lambda: self._pg.request_handoff(key, requester, duration_s))
        if lease.owner == requester:
            self._mirror(lease, duration_s, granted_at)
        return lease

    def hand_over(self, lease: Lease, duration_s: float = 60.0) -> Lease | None:
        """Postgres hands the lease over (the old owner is fenced there at once); the successor's copy in
        Redis, with the higher epoch, fences the old owner's Redis copy too."""
        granted_at = time.monotonic()
        successor = self._granting("hand over", lease.key, lambda: self._pg.hand_over(lease, duration_s))
        if successor is not None:
            self._mirror(successor, duration_s, granted_at)
        return successor

    def withdraw_request(self, key: LeaseKey, requester: str) -> Lease | None:
        return self._granting("withdraw the request for", key, lambda: self._pg.withdraw_request(key, requester))

    def get(self, key: LeaseKey) -> Lease | None:
        try:
            return self._pg.get(key)
        except StoreUnavailableError:
            return self._redis.get(key)

    def list(self) -> list[Lease]:
        try:
            return self._pg.list()
        except StoreUnavailableError:
            return self._redis.list()

    def remirror(self, lease: Lease) -> bool:
        """Copy ``lease`` to Redis again if Postgres still grants it (Redis lost or let expire its copy)."""
        try:
            remaining = self._pg.remaining_s(lease)
        except StoreUnavailableError:
            return False  # cannot tell: refuse, the safe answer
        if remaining is None or remaining <= _mirror_margin(remaining):
            return False
        return self._redis.sync(lease, remaining - _mirror_margin(remaining))


class HybridCheckpointStore(CheckpointStore):
    """Redis for speed, Postgres for truth.

    ``flush_every_n`` acks or ``flush_every_s`` seconds (whichever first)
    bound how far Postgres may lag Redis; ``flush()``/``close()`` push the rest.
    """

    backend = "hybrid"

    def __init__(
        self,
        redis_store: RedisCheckpointStore,
        postgres_store: PostgresCheckpointStore,
        *,
        flush_every_n: int = 100,
        flush_every_s: float = 5.0,
    ) -> None:
        if flush_every_n < 1 or flush_every_s < 0:
            raise ValueError("flush_every_n must be >= 1 and flush_every_s >= 0")
        self.redis = redis_store
        self.postgres = postgres_store
        self.flush_every_n = flush_every_n
        self.flush_every_s = flush_every_s
        self._lock = threading.RLock()
        # key -> (acked value, its context, the lease it was admitted under): what Postgres still lacks
        self._pending: dict[CheckpointKey, tuple[str, SaveContext, Lease | None]] = {}
        self.degraded: dict[str, str] = {}
        self._refused: dict[str, str] = {}  # part -> message: refused credentials or database, not an outage
        self.fallbacks: list[Fallback] = []
        self._replace_if_equal = redis_store.client.register_script(_REPLACE_IF_EQUAL_LUA)
        self._leases = HybridLeaseManager(self)
        self._sentinels_checked: dict[CheckpointKey, float] = {}  # key -> when Postgres's sentinel was last read

    # -- state -----------------------------------------------------------------
    @property
    def leases(self) -> HybridLeaseManager:
        return self._leases

    @property
    def is_degraded(self) -> bool:
        return bool(self.degraded)

    @property
    def pending(self) -> dict[CheckpointKey, str]:
        """Acked values not yet in Postgres."""
        with self._lock:
            return {k: v for k, (v, _, _) in self._pending.items()}

    def refusals(self) -> dict[str, str]:
        return dict(self._refused)

    def _degrade(self, store: str, exc: BaseException) -> None:
        refused = isinstance(exc, StoreRefusedError)
        if store not in self.degraded:
            log.warning("hybrid checkpoint store degraded: %s %s (%s)", store,
                        "refused the credentials or the database; going on with the other store" if refused
                        else "unavailable", exc)
        self.degraded[store] = str(exc)
        if refused:
            self._refused[store] = str(exc)

    def _recover(self, store: str) -> None:
        self._refused.pop(store, None)
        if self.degraded.pop(store, None) is not None:
            log.info("hybrid checkpoint store: %s is back", store)

    # -- writes ----------------------------------------------------------------
    def save(self, key: CheckpointKey, sequence: str, *, lease: Lease | None = None,
             context: SaveContext | None = None) -> SaveResult:
        canonical = fast_sequence(sequence)
        sequence = canonical if canonical is not None else normalize_sequence(sequence, key=key.redis_key)
        ctx = context or SaveContext()
        try:
            try:
                result = self._save_redis(key, sequence, lease, ctx)
            except InvalidSequenceError as exc:  # garbage, or a key of another type (WrongTypeKeyError)
                at_sentinel = isinstance(exc, WrongTypeKeyError) and exc.key == self._sentinel_key(key)
                if exc.key != key.redis_key and not at_sentinel:
                    raise  # one of the project's own keys: the error says how to fix it
                result = self._replace_unusable(key, str(exc.value or "a value that is no position"), sequence,
                                                lease, ctx, at_sentinel=at_sentinel)
        except StoreUnavailableError as exc:
            self._degrade("redis", exc)
            result = self._save_postgres_direct(key, sequence, lease, ctx)
            with self._lock:
                pending = self._pending.get(key)
                if pending and max_sequence(pending[0], result.current) == result.current:
                    self._pending.pop(key, None)
            return result
        result, acks, ms_since_flush = result
        self._recover("redis")
        if result.outcome is SaveOutcome.REWOUND:  # another worker rewound Redis: Postgres's history says so too
            try:
                record_external(self.postgres.db, key, result.moved_back_from or "", result.current, store="redis",
                                run_id=ctx.run_id)
            except (StoreUnavailableError, psycopg.Error) as exc:
                log.warning("could not record the foreign move of %s in Postgres (%s); Redis's history has it",
                            key, exc)
        ends = result.advanced and is_sentinel(sequence)
        if ends:
            # The last number goes to Postgres's shared row before the sentinel replaces it in the buffer
            # (other workers resume after it), and the sentinel itself right away: it happens once a shard.
            self.flush(raise_on_outage=False)
        with self._lock:
            if result.advanced:
                self._pending[key] = (sequence, ctx, lease)
            elif key not in self._pending:
                # Counted as an ack; make sure a due flush carries the stored value.
                self._pending[key] = (result.current, ctx, lease)
        due = ends or (acks is not None and acks >= self.flush_every_n) or (
            ms_since_flush is not None and ms_since_flush >= self.flush_every_s * 1000
        )
        if due:
            self.flush(raise_on_outage=False)
        return result

    def _save_redis(self, key: CheckpointKey, sequence: str, lease: Lease | None,
                    ctx: SaveContext) -> tuple[SaveResult, int | None, int | None]:
        try:
            return self.redis.save_counting(key, sequence, lease=lease, context=ctx, flush_state=True)
        except LeaseLostError as lost:
            # Redis may have lost its copy of a lease Postgres still grants (flushed, restarted, or it was
            # down when the lease was granted or renewed): copy it again, then retry once.
            if lease is None:
                raise
            if self._leases.remirror(lease):
                return self.redis.save_counting(key, sequence, lease=lease, context=ctx, flush_state=True)
            try:
                current = self.postgres.leases.get(lease.key)  # say who holds it, as Postgres (the grantor) sees it
            except StoreUnavailableError:
                raise lost from None
            raise lease_lost(lease, current.owner if current else None, current.epoch if current else None) from None

    def _sentinel_key(self, key: CheckpointKey) -> str:
        return key.companions(cluster=self.redis.cluster).sentinel

    def _replace_unusable(self, key: CheckpointKey, found: str, sequence: str, lease: Lease | None,
                          ctx: SaveContext, *, at_sentinel: bool = False) -> tuple[SaveResult, int | None, int | None]:
        """Redis holds no position at the key (garbage, or a hash another program wrote): Postgres has the
        truth, so replace it (under the lease) by the greater of the acked position and Postgres's, and
        record why. A redis-only store cannot do this; it raises and the consumer dead-letters the shard."""
        stored = self.postgres.load(key)
        target = max_sequence(sequence, stored) or sequence
        where = "the sentinel key" if at_sentinel else "the checkpoint key"
        reason = f"replaced {found[:40]} found at {where} ({ctx.reason or 'save'})"
        if at_sentinel:  # the bad key goes (fenced); the position is then saved the usual, monotonic way
            self.redis.replace_unusable(key, target, lease=lease, at_sentinel=True,
                                        context=SaveContext(writer=ctx.writer, run_id=ctx.run_id, reason=reason))
            log.warning("checkpoint %s: Redis held %s at %s, not a sentinel; replaced", key, found[:80], where)
            self.fallbacks.append(Fallback(key, f"Redis held {found[:80]} at {where}: replaced"))
            if target != sequence:
                self._save_redis(key, target, lease, SaveContext(writer=ctx.writer, run_id=ctx.run_id, reason=reason))
            return self._save_redis(key, sequence, lease, ctx)
        log.warning("checkpoint %s: Redis held %s, not a position; replacing it with %s", key, found[:80], target)
        self.fallbacks.append(Fallback(key, f"Redis held {found[:80]}: replaced by {target}"))
        if not self.redis.replace_unusable(key, target, lease=lease,
                                           context=SaveContext(writer=ctx.writer, run_id=ctx.run_id, reason=reason)):
            return self._save_redis(key, sequence, lease, ctx)  # someone fixed it meanwhile: a normal save
        outcome = SaveOutcome.ADVANCED if target == sequence and target != stored else (
            SaveOutcome.UNCHANGED if target == sequence else SaveOutcome.STALE)
        return SaveResult(key, outcome, stored, target), None, None

    def _save_postgres_direct(self, key: CheckpointKey, sequence: str, lease: Lease | None,
                              ctx: SaveContext) -> SaveResult:
        return self.postgres.save(key, sequence, lease=lease, context=ctx)  # Postgres grants: its word is final

    def force_set(self, key: CheckpointKey, sequence: str, *, context: SaveContext) -> ForceSetResult:
        """Unconditional operator write to Postgres, then Redis; each store records it in its history.

        Both stores must take it: a load reads Redis first, so a value forced into
        Postgres only would be shadowed by Redis. If Redis fails after Postgres was
        written, ``StoreUnavailableError`` says so; re-running is safe (idempotent).
        """
        sequence = normalize_sequence(sequence, key=key.redis_key)
        ctx = require_force_context(context)
        try:
            self.redis.check_force_set(key)  # a Redis that would refuse it: refuse before writing Postgres
        except StoreUnavailableError as exc:
            self._degrade("redis", exc)
        pg = self.postgres.force_set(key, sequence, context=ctx)
        with self._lock:
            self._pending.pop(key, None)  # an unflushed ack from before the forced write is superseded
        try:
            rd = self.redis.force_set(key, sequence, context=ctx)
        except StoreUnavailableError as exc:
            self._degrade("redis", exc)
            raise StoreUnavailableError(
                f"checkpoint {key} was set to {sequence} in Postgres but NOT in Redis ({exc}). Loads read "
                "Redis first, so run the same command again when Redis is back (it is safe to repeat)."
            ) from exc
        previous = rd.previous if rd.previous is not None else pg.previous
        return ForceSetResult(key, previous, sequence, {"redis": rd.previous, "postgres": pg.previous})

    def flush(self, *, raise_on_outage: bool = True) -> int:
        """Write pending values to Postgres in one transaction; returns how many.

        Fenced like every save: each value goes under the lease it was admitted with. A value whose
        lease was lost or expired since is not written (it stays in Redis, where it was a legitimate
        ack; the scheduled mirror copies it).
        """
        with self._lock:
            batch = dict(self._pending)
        while batch:
            try:
                self.postgres.save_many(
                    [(k, v) for k, (v, _, _) in batch.items()],
                    context=SaveContext(writer=next(iter(batch.values()))[1].writer, reason="hybrid flush"),
                    lease_for={k: lease for k, (_, _, lease) in batch.items() if lease is not None},
                )
                break
            except LeaseLostError as exc:
                lost = [k for k, (_, _, lease) in batch.items() if lease is not None and str(lease.key) == exc.lease_key]
                if not lost:
                    raise
                log.warning("hybrid flush: not writing %s to Postgres: %s", [str(k) for k in lost], exc)
                with self._lock:
                    for k in lost:
                        if self._pending.get(k) == batch[k]:
                            del self._pending[k]
                        del batch[k]
            except StoreUnavailableError as exc:
                self._degrade("postgres", exc)
                if raise_on_outage:
                    raise
                return 0
        if not batch:
            return 0
        self._recover("postgres")
        try:
            self.redis.mark_flushed(batch)
        except StoreUnavailableError as exc:
            self._degrade("redis", exc)
        with self._lock:
            for k, entry in batch.items():
                if self._pending.get(k) == entry:
                    del self._pending[k]
        return len(batch)

    def parts(self) -> list[tuple[str, CheckpointStore]]:
        return [("redis", self.redis), ("postgres", self.postgres)]

    def close(self, *, flush: bool = True) -> None:
        """Flush (by default) and disconnect.

        ``flush=False`` leaves unflushed acks in Redis only (where the flush
        bound or the scheduled mirror carries them to Postgres): what a
        per-batch run process wants, so that hybrid does not degrade into
        "both stores on every ack".
        """
        try:
            if flush:
                self.flush(raise_on_outage=True)
        finally:
            self.postgres.close()

    # -- reads -----------------------------------------------------------------
    def load(self, key: CheckpointKey) -> str | None:
        return self.load_many([key])[key]

    def load_many(self, keys: Iterable[CheckpointKey]) -> dict[CheckpointKey, str | None]:
        keys = list(keys)
        out: dict[CheckpointKey, str | None] = {}
        missing: dict[CheckpointKey, bytes | WrongType | None] = {}
        try:
            raws = self.redis.load_raw_many(keys)
            self._recover("redis")
        except StoreUnavailableError as exc:
            self._degrade("redis", exc)
            raws = None
        for i, key in enumerate(keys):
            if raws is None:
                missing[key] = None
                continue
            raw = raws[i]
            if raw is None:
                missing[key] = None
                continue
            if isinstance(raw, WrongType):
                self.fallbacks.append(Fallback(key, f"Redis key holds a {raw.kind}, not a position"))
                log.warning("checkpoint %s: Redis holds a %s, not a position; falling back to Postgres "
                            "(the next save under the lease replaces it)", key, raw.kind)
                missing[key] = raw
                continue
            fast = fast_sequence(raw)
            if fast is not None:
                out[key] = fast
                continue
            try:
                out[key] = normalize_sequence(raw, key=key.redis_key)
            except InvalidSequenceError as exc:
                self.fallbacks.append(Fallback(key, f"garbage in Redis: {exc}"))
                log.warning("checkpoint %s: %s; falling back to Postgres", key, exc)
                missing[key] = raw
        self._apply_postgres_sentinels(out, raws is not None)
        if not missing:
            return out  # every key came from Redis, already in the order given
        from_pg = self.postgres.load_many(list(missing))
        pending = self.pending
        for key, value in from_pg.items():
            # An ack buffered here but not yet flushed is newer than Postgres.
            value = max_sequence(value, pending.get(key))
            out[key] = value
            if value is not None and raws is not None:
                self._rewarm(key, value, missing[key])
        return {k: out.get(k) for k in keys}

    def _apply_postgres_sentinels(self, out: dict[CheckpointKey, str | None], redis_up: bool) -> None:
        """One rule for every backend: a sentinel in ``checkpoint_sentinels`` counts, whoever wrote it (a
        ``SHARD_END`` there ends the shard here as it does for the postgres backend). It is copied to Redis's
        sentinel key, so that the next saves (which read Redis only) see it too. Asked at most every
        ``SENTINEL_CHECK_EVERY_S`` per key (a run loads its shard's checkpoint at every batch: not a Postgres
        query per ack)."""
        now = time.monotonic()
        due = [k for k in out if now - self._sentinels_checked.get(k, -SENTINEL_CHECK_EVERY_S) >= SENTINEL_CHECK_EVERY_S]
        if not due:
            return
        try:
            sentinels = self.postgres.load_sentinels(due)
        except StoreUnavailableError as exc:
            self._degrade("postgres", exc)
            return
        if len(self._sentinels_checked) >= 65_536:
            self._sentinels_checked.clear()
        self._sentinels_checked.update(dict.fromkeys(due, now))
        for key, sentinel in sentinels.items():
            position = effective(out[key], sentinel)
            if position == out[key]:
                continue
            out[key] = position
            if redis_up:
                try:
                    self.redis.save(key, sentinel, context=SaveContext(writer="hybrid-rewarm",
                                                                       reason="sentinel from postgres"))
                except (StoreUnavailableError, InvalidSequenceError, redis.RedisError) as exc:
                    log.warning("could not copy the sentinel of %s to Redis: %s", key, exc)

    def _rewarm(self, key: CheckpointKey, value: str, garbage: bytes | WrongType | None) -> None:
        if isinstance(garbage, WrongType):
            return  # replaced by the next save, under the lease (a load holds none)
        try:
            if garbage is not None:
                if is_sentinel(value):  # never into the shared key: the next save under the lease replaces it
                    return
                self._replace_if_equal(keys=[key.redis_key], args=[garbage, value])
            else:
                self.redis.save(key, value, context=SaveContext(writer="hybrid-rewarm", reason="rewarm from postgres"))
        except (StoreUnavailableError, redis.RedisError) as exc:
            log.warning("could not re-warm %s in Redis: %s", key, exc)

    def keys(self) -> list[CheckpointKey]:
        found: set[CheckpointKey] = set()
        for store in (self.redis, self.postgres):
            try:
                found.update(store.keys())
            except StoreUnavailableError as exc:
                self._degrade(store.backend, exc)
        return sorted(found)

    def history(self, key: CheckpointKey, limit: int = 100) -> list[HistoryEntry]:
        try:
            entries = self.redis.history(key, limit)
        except StoreUnavailableError:
            entries = []
        return entries or self.postgres.history(key, limit)
