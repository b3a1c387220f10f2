"""read -> process -> ack: the batch rules, independent of Dagster.

* ``read`` takes the shard's lease (fencing) and reads after the *acked*
  checkpoint, never after the sensor's dispatched position.
* ``process`` calls the handler on events not yet acked (a retry after a
  partial failure does not redo what was acked), applies partial-batch
  failure (checkpoint just before the lowest failed sequence) and, when the
  retries are exhausted, dead-letters the batch: ``stop`` (the shard stops
  advancing until an operator acts) or ``bisect`` (isolate the poison records,
  dead-letter only those and go on).
* ``ack`` saves the checkpoint under the lease only after side effects
  committed; it is idempotent (saving the same position is a no-op).
* A consumer whose sink is not idempotent (``writes_sink(..., idempotent=False)``) never reads below the
  highest position the project recorded for the shard unless an operator rewound it on purpose
  (``guard_replay``): a foreign rewind stops the shard with ``ReplayRefusedError`` instead of re-publishing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psycopg
from psycopg import errors as pg_errors

from durability_pipelines.checkpoints import (
    SHARD_END,
    CheckpointKey,
    CheckpointStore,
    DurabilityError,
    InvalidSequenceError,
    Lease,
    PostgresConnection,
    SaveContext,
    SaveOutcome,
    SaveResult,
    StoreUnavailableError,
    TransactionalStore,
    connection_is_stale,
    mask_conninfo,
    open_store,
    sequence_gap,
    shard_to_tag,
    sort_key,
)
from durability_pipelines.checkpoints.lock_waits import (
    LockWaitBounds,
    LockWaitTimeoutError,
    bound_lock_waits,
    lock_wait_error,
)
from durability_pipelines.checkpoints.replay import Regression, ReplayMark, below_mark
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.filters import count_filtered, matching
from durability_pipelines.consumer.handlers import Handler, HandlerContext, is_idempotent, is_transactional
from durability_pipelines.consumer.source import (
    Gap,
    ReleasingSource,
    ReportsBacklogBytes,
    SourceBatch,
    StreamSource,
)
from durability_pipelines.consumer.storage import ConsumerStorage
from durability_pipelines.observability import (
    ACK_SUCCESS_RATE,
    EVENTS_FAILED,
    EVENTS_FILTERED,
    EVENTS_PER_BATCH,
    LAG_BYTES,
    LAG_SECONDS,
    RECORDS_BEHIND,
    RETAINED_WAL_BYTES,
    SEQUENCE_GAP,
    SLOT_LAG_BYTES,
    Labels,
    Metrics,
)

log = logging.getLogger(__name__)
#: A ``ReportsBacklogBytes`` source's backlog is measured at most this often per shard (one round trip each).
BACKLOG_EVERY_S = 1.0
MAX_DEAD_LETTER_PAYLOAD = 100  # events stored with a dead letter (first N), for inspection


class ShardBusyError(DurabilityError):
    """Another live worker holds the shard's lease."""


class PartialBatchFailure(DurabilityError):
    """The handler reported failed items; the part before the lowest one was acked."""


class SinkUnavailableError(StoreUnavailableError):
    """The Postgres a transactional handler writes to is down or read-only (e.g. mid-failover).

    A :class:`StoreUnavailableError`, so the op's RetryPolicy retries the batch from the acked
    checkpoint instead of dead-lettering it: the data is fine, the database is not.
    """


class BatchDeadLettered(DurabilityError):
    """Retries are exhausted and the batch is in ``dead_letters``; the shard is stopped."""

    def __init__(self, message: str, dead_letter_id: int) -> None:
        super().__init__(message)
        self.dead_letter_id = dead_letter_id


class ReplayRefusedError(DurabilityError):
    """The shard's checkpoint is below the highest position the project recorded, no operator rewound it on
    purpose, and the consumer's sink is not idempotent: reading on would publish those events again.

    Not retried (a retry would find the same checkpoint): the shard stops until an operator either restores the
    checkpoint or rewinds it deliberately; the message names both commands. Other shards go on.
    """

    def __init__(self, message: str, regression: Regression) -> None:
        super().__init__(message)
        self.regression = regression


@dataclass
class ReadOutput:
    """What ``read_batch`` hands to ``process_batch`` (pickled between ops)."""

    consumer: str
    shard: str | None
    run_id: str
    batch: SourceBatch
    lease: Lease | None
    read_started: float | None = None  # the drain loop's clock when the read began (hand-off accounting)


@dataclass
class ProcessOutput:
    ack_to: str | None
    processed: int = 0
    failed: list[str] = field(default_factory=list)
    dead_letter_ids: list[int] = field(default_factory=list)
    attempts: int = 1
    #: the save a transactional handler's transaction already committed (Postgres store): the ack reports it
    saved: SaveResult | None = None


class ConsumerRuntime:
    def __init__(
        self,
        config: ConsumerConfig,
        *,
        store: CheckpointStore,
        source: StreamSource | None,
        handler: Handler,
        storage: ConsumerStorage | None,
        postgres_url: str | None,
        metrics: Metrics | None = None,
        is_owner_dead: Callable[[str], bool] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        #: per shard, the save the last transactional handler call committed (see ``ProcessOutput.saved``)
        self._saved_in_transaction: dict[str | None, SaveResult] = {}
        self.source = source
        self.handler = handler
        self.storage = storage
        self.postgres_url = postgres_url
        self.metrics = metrics or Metrics(Labels(config.adapter, config.stream, config.group, config.consumer))
        self.is_owner_dead = is_owner_dead or (lambda owner: False)
        self._released: set[str | None] = set()  # shards acked through a ReleasingSource (released once more at close)
        self._sink_local = threading.local()  # each drain thread's sink connection (transactional handlers)
        self._sink_conns: list[psycopg.Connection] = []
        self._sink_lock = threading.Lock()
        #: shard -> (when its backlog in bytes was last measured, the checkpoint then); measured once more at close
        self._backlog_at: dict[str | None, tuple[float, str]] = {}
        #: False for a sink a replay repeats (a broadcast): ``guard_replay`` then checks every read's start
        self.replay_safe = is_idempotent(handler)
        #: per shard, a position known to be at or above its replay mark (checked, or acked by this runtime
        #: since): a read from at least there needs no history lookup
        self._replay_cleared: dict[str | None, str] = {}

    def key(self, shard: str | None) -> CheckpointKey:
        c = self.config
        return CheckpointKey(c.adapter, c.stream, c.group, c.consumer, shard)

    def _labels(self, shard: str | None) -> Labels:
        return self.metrics.labels.with_(shard=shard or "")

    # -- read ------------------------------------------------------------------------
    def acquire_lease(self, shard: str | None, owner: str) -> Lease:
        leases = self.store.leases
        lk = self.key(shard).lease_key
        lease = leases.acquire(lk, owner, self.config.lease_duration_s)
        if lease is None:
            current = leases.get(lk)
            if current is not None and self.is_owner_dead(current.owner):
                lease = leases.acquire(lk, owner, self.config.lease_duration_s, steal=True)
            if lease is None:
                raise ShardBusyError(
                    f"shard {lk} is leased by {current.owner if current else '?'} until "
                    f"{current.expires_at if current else '?'}; another worker is processing it. "
                    "This run changed nothing; the sensor dispatches again once the lease is free."
                )
        return lease

    def read(self, shard: str | None, run_id: str) -> ReadOutput:
        """Take the lease, load the acked checkpoint and read one batch after it."""
        with self.metrics.timed(f"{self.store.backend}.acquire_lease", self.store.backend, shard):
            lease = self.acquire_lease(shard, run_id)
        with self.metrics.timed(f"{self.store.backend}.load", self.store.backend, shard):
            acked = self.store.load(self.key(shard))
        return self.read_after(shard, run_id, lease, acked)

    def read_after(self, shard: str | None, run_id: str, lease: Lease | None, acked: str | None,
                   *, max_events: int | None = None, record_gap: bool = True) -> ReadOutput:
        """Read one batch after ``acked`` under ``lease`` (the drain loop already holds both).

        A gap (trimmed data skipped by policy) is audited here unless ``record_gap`` is False: a
        batch read ahead of time may be discarded, so the drain loop audits it when it processes it.
        """
        assert self.source is not None
        self.guard_replay(shard, acked)
        self.metrics.start_pushing(shard)  # a run reading its shard (sensors never read): its metrics are pushed
        with self.metrics.timed("read_batch", self.config.adapter, shard):
            batch = self.source.read(shard, acked, max_events or self.config.max_events)
        if batch.gap is not None and record_gap:
            self.record_gap(batch.gap, run_id)
        return ReadOutput(self.config.name, shard, run_id, batch, lease)

    def record_gap(self, gap: Gap, run_id: str) -> None:
        log.warning("consumer %s skipped trimmed data on shard %s: %s", self.config.name, gap.shard, gap.reason)
        if self.storage is not None:
            c = self.config
            self.storage.add_gap(
                consumer=c.name, adapter=c.adapter, stream=c.stream, group=c.group, shard=gap.shard,
                from_sequence=gap.from_sequence, to_sequence=gap.to_sequence, reason=gap.reason, run_id=run_id,
            )

    # -- process ---------------------------------------------------------------------
    def pending_events(self, read: ReadOutput) -> list[ChangeEvent]:
        """Events of the batch not yet acked (an earlier attempt may have acked a prefix)."""
        acked = self.store.load(self.key(read.shard))
        if acked is None:
            return list(read.batch.events)
        floor = sort_key(acked)
        return [e for e in read.batch.events if sort_key(e.sequence) > floor]

    def process(self, read: ReadOutput, *, retry_number: int = 0) -> ProcessOutput:
        attempts = retry_number + 1
        last_attempt = retry_number >= self.config.retry.max_retries
        # Filtered-out events never reach the handler but are acked with the batch (consumer/filters.py).
        self._saved_in_transaction.pop(read.shard, None)
        events = matching(self.config.filter, self.pending_events(read))
        if not events:
            return ProcessOutput(ack_to=read.batch.next_checkpoint, attempts=attempts)
        try:
            failed = self._handle(read, events, ack_to=read.batch.next_checkpoint)
        except DurabilityError:
            raise  # lease lost, store down: not the handler's fault, not dead-lettered
        except Exception as exc:
            if not last_attempt:
                raise
            return self._exhausted(read, events, exc, attempts)
        if not failed:
            return ProcessOutput(ack_to=read.batch.next_checkpoint, processed=len(events), attempts=attempts,
                                 saved=self._saved_in_transaction.pop(read.shard, None))
        lowest = min(failed, key=sort_key)
        done = [e for e in events if sort_key(e.sequence) < sort_key(lowest)]
        if not last_attempt:
            raise PartialBatchFailure(
                f"handler reported {len(failed)} failed item(s) on shard {read.shard}; acked up to just before "
                f"{lowest} ({len(done)} events) and retrying the rest"
            )
        remaining = [e for e in events if sort_key(e.sequence) >= sort_key(lowest)]
        out = self._exhausted(read, remaining, PartialBatchFailure(f"failed items: {sorted(failed, key=sort_key)}"),
                              attempts)
        out.processed += len(done)
        out.failed = list(failed)
        return out

    def _context(self, read: ReadOutput, connection: psycopg.Connection | None) -> HandlerContext:
        c = self.config
        return HandlerContext(
            consumer=c.name, adapter=c.adapter, stream=c.stream, group=c.group, shard=read.shard,
            run_id=read.run_id, options=dict(c.handler_options), postgres_url=self.postgres_url,
            log=logging.getLogger(f"durability_pipelines.handler.{c.name}"), connection=connection,
        )

    def _handle(self, read: ReadOutput, events: Sequence[ChangeEvent], *, ack_to: str | None) -> list[str]:
        """Run the handler; for transactional handlers commit its writes (and, with a Postgres
        store, the checkpoint) in one transaction. Returns the failed sequences."""
        key = self.key(read.shard)
        ctx_save = SaveContext(writer=read.run_id, run_id=read.run_id, reason="batch ack")
        if not is_transactional(self.handler):
            with self.metrics.timed("handler", "handler", read.shard):
                result = self.handler(list(events), self._context(read, None))
            failed = list(result.failed_sequences) if result else []
            self._ack_prefix(read, failed, ctx_save)
            return failed
        # A lock held by a frozen worker must end neither in an endless wait nor in a dead-looking run.
        bounds = LockWaitBounds.for_lease(self.config.lease_duration_s)
        app = f"durability {self.config.name} {read.run_id}"
        if isinstance(self.store, TransactionalStore):  # a capability (Protocol), not a concrete class
            saved: SaveResult | None = None
            try:
                with self.store.transaction() as tx:
                    bound_lock_waits(tx.connection, bounds, application_name=app)
                    with self.metrics.timed("handler", "handler", read.shard):
                        result = self.handler(list(events), self._context(read, tx.connection))
                    failed = list(result.failed_sequences) if result else []
                    target = read.batch.checkpoint_before(min(failed, key=sort_key)) if failed else ack_to
                    if target is not None:
                        for position in self._positions_to_save(read, target):
                            saved = tx.save(key, position, lease=read.lease, context=ctx_save)
                            if saved.outcome is SaveOutcome.REWOUND:
                                break  # another worker moved it back: honoured, nothing written over it
            except LockWaitTimeoutError as exc:
                raise self._lock_wait(read, exc, bounds) from exc
            if saved is not None and (target == ack_to or saved.outcome is SaveOutcome.REWOUND):
                self._saved_in_transaction[read.shard] = saved  # committed: the ack reports this save
            return failed
        if not self.postgres_url:
            raise DurabilityError(f"handler {self.config.handler} is transactional but no Postgres URL is configured")
        # The handler's transaction commits before the checkpoint is saved. On this thread's own sink connection,
        # kept open across batches (a connection per batch cost ~10 ms each); dropped when it goes stale.
        conn = self._sink_connection()
        try:
            try:
                with conn.transaction(), self.metrics.timed("handler", "handler", read.shard):
                    bound_lock_waits(conn, bounds, application_name=app)
                    result = self.handler(list(events), self._context(read, conn))
            except pg_errors.LockNotAvailable as exc:  # rolled back: now ask who held the lock
                raise self._lock_wait(read, lock_wait_error(
                    conn, exc, what="the sink transaction", waited_ms=bounds.lock_timeout_ms), bounds) from None
        except DurabilityError:
            raise
        except Exception as exc:
            if connection_is_stale(exc):  # (a closed or broken one is replaced by the next _sink_connection)
                self._drop_sink_connection()
                raise SinkUnavailableError(self._sink_unavailable(read, exc)) from exc
            raise
        failed = list(result.failed_sequences) if result else []
        self._ack_prefix(read, failed, ctx_save)
        return failed

    def _sink_connection(self) -> psycopg.Connection:
        """This thread's connection to the sink database (each shard of a run drains on a thread of its own)."""
        conn = getattr(self._sink_local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            try:
                conn = psycopg.connect(self.postgres_url, autocommit=True)
            except psycopg.OperationalError as exc:
                raise SinkUnavailableError(f"consumer {self.config.name}: cannot connect to the sink database "
                                           f"({mask_conninfo(self.postgres_url or '')}): {type(exc).__name__}; "
                                           "the batch is retried from the acked checkpoint") from None
            self._sink_local.conn = conn
            with self._sink_lock:
                self._sink_conns.append(conn)
        return conn

    def _drop_sink_connection(self) -> None:
        conn = getattr(self._sink_local, "conn", None)
        self._sink_local.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _lock_wait(self, read: ReadOutput, exc: LockWaitTimeoutError, bounds: LockWaitBounds) -> LockWaitTimeoutError:
        """The consumer, the shard and the bound in front of the holder's description."""
        c = self.config
        return LockWaitTimeoutError(
            f"consumer {c.name} shard {shard_to_tag(read.shard)}: the batch's sink transaction gave up a lock wait "
            f"after {bounds.lock_timeout_ms / 1000:g} s (lock_timeout = lease_duration_s {c.lease_duration_s:g} s / 4, "
            f"so the run keeps its lease while it waits): {exc}", exc.blockers)

    def _sink_unavailable(self, read: ReadOutput, exc: BaseException) -> str:
        from durability_pipelines.services import scrub_secrets

        c = self.config
        target = mask_conninfo(self.postgres_url or "")
        detail = scrub_secrets(str(exc).strip(), self.postgres_url or "") or "no detail"
        return (
            f"consumer {c.name} shard {shard_to_tag(read.shard)}: the sink database ({target}) is unreachable or read-only "
            f"({type(exc).__name__}: {detail}); the batch's writes were rolled back and its "
            "checkpoint was not saved, so it is retried from the acked checkpoint (the op's RetryPolicy), never "
            "skipped. During a failover this clears once the standby is promoted, if DURABILITY_POSTGRES_URL names "
            "both hosts with target_session_attrs=read-write; otherwise start the server or correct the URL."
        )

    def _ack_prefix(self, read: ReadOutput, failed: list[str], context: SaveContext) -> None:
        """Partial failure: everything before the lowest failed item is done; checkpoint just before it."""
        if not failed:
            return
        target = read.batch.checkpoint_before(min(failed, key=sort_key))
        if target is not None:
            self.store.save(self.key(read.shard), target, lease=read.lease, context=context)

    def _exhausted(self, read: ReadOutput, events: list[ChangeEvent], exc: BaseException,
                   attempts: int) -> ProcessOutput:
        if self.config.dead_letter.policy == "bisect":
            return self._bisect(read, events, attempts)
        dl_id = self._dead_letter(read, events, exc, attempts, policy="stop")
        raise BatchDeadLettered(
            f"consumer {self.config.name} shard {read.shard}: batch {events[0].sequence}..{events[-1].sequence} "
            f"({len(events)} events) failed {attempts} time(s): {exc!r}. It is dead letter #{dl_id} and the "
            "shard is stopped (policy 'stop'). Fix the handler or the data, then run "
            f"`durability-pipelines dead-letters retry {dl_id}` to resume from the acked checkpoint.",
            dl_id,
        )

    def load_acked(self, shards: Sequence[str | None], *, blocked: set[str], run_id: str
                   ) -> tuple[dict[str | None, str | None], dict[str | None, str]]:
        """Every shard's acked checkpoint in one call, isolating the unusable ones: ``(acked, stopped)``.

        A shard whose checkpoint cannot be read (garbage, a key of another type) gets a dead letter once
        (unless one is open already, ``blocked``) and is left out, so that it never stops the others. So is a
        shard whose checkpoint another worker moved back when the sink is not idempotent (``guard_replay``): no
        dead letter there, it stays stopped only until an operator rewinds or restores the checkpoint.
        """
        keys = {s: self.key(s) for s in shards}
        acked: dict[str | None, str | None] = {}
        stopped: dict[str | None, str] = {}
        try:
            found = self.store.load_many(list(keys.values()))
            acked = {s: found[k] for s, k in keys.items()}
        except InvalidSequenceError:  # at least one is unusable: find which, one by one
            for shard, key in keys.items():
                try:
                    acked[shard] = self.store.load(key)
                except InvalidSequenceError as exc:
                    if (shard or "") not in blocked:
                        stopped[shard] = str(self.unreadable_checkpoint(shard, exc, run_id))
                    else:
                        stopped[shard] = f"checkpoint unusable ({exc}); see its open dead letter"
        for shard in acked:  # a sink that is not idempotent: a foreign rewind stops the shard, not the others
            try:
                self.guard_replay(shard, acked[shard])
            except ReplayRefusedError as exc:
                stopped[shard] = str(exc)
        return acked, stopped

    def unreadable_checkpoint(self, shard: str | None, exc: InvalidSequenceError, run_id: str,
                              events: Sequence[ChangeEvent] = ()) -> BatchDeadLettered:
        """The shard's stored checkpoint cannot be read or written (garbage, a Redis key of another type) and
        no other store can stand in: stop the shard with a dead letter that names the key and the fix.
        ``events``: the batch whose ack failed (its effects are committed; it is redone after the fix)."""
        if self.storage is None:
            return BatchDeadLettered(f"{exc} (and no Postgres to record a dead letter in)", 0)
        c = self.config
        first, last = (events[0].sequence, events[-1].sequence) if events else ("", "")
        dl_id = self.storage.add_dead_letter(
            consumer=c.name, adapter=c.adapter, stream=c.stream, group=c.group, shard=shard,
            first_sequence=first, last_sequence=last, record_count=len(events),
            error=f"{type(exc).__name__}: {exc}", attempts=1, policy="stop", run_id=run_id,
            payload=[e.to_json_dict() for e in events[:MAX_DEAD_LETTER_PAYLOAD]],
        )
        return BatchDeadLettered(
            f"consumer {c.name} shard {shard_to_tag(shard)}: its checkpoint {self.key(shard).redis_key} is unusable: {exc} "
            f"The shard is stopped (dead letter #{dl_id}); nothing was skipped. Fix the key as said, then run "
            f"`durability-pipelines dead-letters retry {dl_id}`.",
            dl_id,
        )

    def _dead_letter(self, read: ReadOutput, events: Sequence[ChangeEvent], exc: BaseException, attempts: int,
                     *, policy: str) -> int:
        if self.storage is None:
            raise DurabilityError("dead-lettering needs Postgres (DURABILITY_POSTGRES_URL)") from exc
        c = self.config
        return self.storage.add_dead_letter(
            consumer=c.name, adapter=c.adapter, stream=c.stream, group=c.group, shard=read.shard,
            first_sequence=events[0].sequence, last_sequence=events[-1].sequence, record_count=len(events),
            error=f"{type(exc).__name__}: {exc}", attempts=attempts, policy=policy, run_id=read.run_id,
            payload=[e.to_json_dict() for e in events[:MAX_DEAD_LETTER_PAYLOAD]],
        )

    def _bisect(self, read: ReadOutput, events: list[ChangeEvent], attempts: int) -> ProcessOutput:
        """Split until the poison records are alone; dead-letter those, process the rest in order."""
        out = ProcessOutput(ack_to=read.batch.next_checkpoint, attempts=attempts)
        key = self.key(read.shard)
        ctx = SaveContext(writer=read.run_id, run_id=read.run_id, reason="bisect ack")

        def run(group: list[ChangeEvent]) -> None:
            try:
                failed = self._handle(read, group, ack_to=group[-1].sequence)
                if failed:
                    raise PartialBatchFailure(f"failed items: {failed}")
                out.processed += len(group)
                self.store.save(key, group[-1].sequence, lease=read.lease, context=ctx)
            except DurabilityError as exc:
                if not isinstance(exc, PartialBatchFailure):
                    raise
                split(group, exc)
            except Exception as exc:  # noqa: BLE001 - the handler's failure is what we isolate
                split(group, exc)

        def split(group: list[ChangeEvent], exc: BaseException) -> None:
            if len(group) == 1:
                out.dead_letter_ids.append(self._dead_letter(read, group, exc, attempts, policy="bisect"))
                out.failed.append(group[0].sequence)
                self.store.save(key, group[0].sequence, lease=read.lease,
                                context=SaveContext(writer=read.run_id, run_id=read.run_id,
                                                    reason=f"skipped poison record (dead letter #{out.dead_letter_ids[-1]})"))
                return
            mid = len(group) // 2
            run(group[:mid])
            run(group[mid:])

        split(events, RuntimeError("retries exhausted"))
        return out

    # -- ack -------------------------------------------------------------------------
    def ack(self, read: ReadOutput, processed: ProcessOutput) -> SaveResult | None:
        """Save the checkpoint under the lease (kept: the drain loop reads the next batch under it)."""
        key = self.key(read.shard)
        result = None
        rewound_at: str | None = None  # the position whose save found another worker's rewind
        if processed.saved is not None and processed.saved.outcome is SaveOutcome.REWOUND:
            result = processed.saved  # the save in the handler's transaction found a foreign rewind: honour it
            rewound_at = processed.ack_to
        elif processed.saved is not None and processed.saved.current == processed.ack_to:
            result = processed.saved  # saved in the handler's transaction: saving again would report "unchanged"
        elif processed.ack_to is not None:
            context = SaveContext(writer=read.run_id, run_id=read.run_id, reason="batch ack")
            with self.metrics.timed(f"{self.store.backend}.save", self.store.backend, read.shard):
                for position in self._positions_to_save(read, processed.ack_to):
                    result = self.store.save(key, position, lease=read.lease, context=context)
                    if result.outcome is SaveOutcome.REWOUND:
                        rewound_at = position
                        break  # another worker rewound the checkpoint: go on from there (no SHARD_END over it)
        self._cleared_by_ack(read.shard, result)
        self._batch_metrics(read, processed, result)
        self._release_source(read.shard)
        if result is not None:
            self._backlog_metrics(read.shard, result.current)
        if rewound_at is not None and result is not None and not self.replay_safe:
            raise self._rewound_under_batch(read.shard, result, rewound_at)
        return result

    # -- replay guard (sinks that are not idempotent) ------------------------------------
    def guard_replay(self, shard: str | None, acked: str | None) -> None:
        """Refuse to read after ``acked`` when that replays what the project already recorded past it and the
        sink is not idempotent (``ReplayRefusedError``). Idempotent sinks: nothing to check (replay is safe).

        One history lookup per shard and runtime: after it, and after each own ack, the position cleared is
        remembered, and a read from at least there (every read of a drain, which only moves forward) is fine.
        A read from below it (a save that found a foreign rewind, a drain restarted on a moved checkpoint)
        looks the history up again."""
        if self.replay_safe:
            return
        cleared = self._replay_cleared.get(shard)
        if cleared is not None and acked is not None and sort_key(acked) >= sort_key(cleared):
            return
        regression = below_mark(self.store, self.key(shard), acked)
        if regression is not None:
            raise self.replay_refused(shard, regression)
        if acked is not None:
            self._replay_cleared[shard] = acked

    def _cleared_by_ack(self, shard: str | None, result: SaveResult | None) -> None:
        """An own ack moves the mark up (a save that found a foreign rewind leaves it where the project was)."""
        if self.replay_safe or result is None or result.outcome is SaveOutcome.STALE or shard not in self._replay_cleared:
            return
        position = result.moved_back_from if result.outcome is SaveOutcome.REWOUND else result.current
        if position is not None and sort_key(position) > sort_key(self._replay_cleared[shard]):
            self._replay_cleared[shard] = position

    def _rewound_under_batch(self, shard: str | None, result: SaveResult, position: str) -> ReplayRefusedError:
        """The ack of a batch already published found another worker's rewind (the save honoured it and wrote
        nothing): stop here rather than at the next read, naming ``position`` (what was sent) as the one to
        restore, since the history's mark does not include this batch."""
        regression = below_mark(self.store, self.key(shard), result.current)
        if regression is None:  # the history cannot say more than the save did
            mark = ReplayMark(result.moved_back_from or position, self.store.backend, None, None, None, False)
            regression = Regression(self.key(shard), result.current, mark)
        return self.replay_refused(shard, regression, published_to=position)

    def replay_refused(self, shard: str | None, regression: Regression, *,
                       published_to: str | None = None) -> ReplayRefusedError:
        """The error that stops the shard: what moved (from -> to, by whom), why replaying is refused, and the two
        ways on: replay on purpose (``checkpoints rewind``) or restore the checkpoint (``checkpoints repair``, or
        ``checkpoints set`` to ``published_to`` when a batch past the recorded mark was already published)."""
        c = self.config
        key, mark = self.key(shard), regression.mark
        found = regression.found
        parts = " ".join([key.adapter, key.stream, key.group, key.consumer, *([key.shard] if key.shard else [])])
        recorded = f"recorded by {mark.writer or '?'}" + (f" at {mark.at:%Y-%m-%dT%H:%M:%SZ}" if mark.at else "")
        if mark.deliberate:
            recorded += " (an operator's deliberate move)"
        target = found if found is not None else "TRIM_HORIZON"
        if published_to is None:
            sent_to, sent = mark.sequence, ""
            restore = f"`durability-pipelines checkpoints repair {key.redis_key}`"
        else:  # the batch in hand went out before its ack found the move: the history's mark is behind it
            sent_to = published_to
            sent = (f" The batch in hand (up to {published_to}) was published before its ack found the move, and "
                    "its ack was not written.")
            restore = (f"`durability-pipelines checkpoints set {parts} --backend hybrid --sequence {published_to} "
                       "--reason '<why>'`")
        return ReplayRefusedError(
            f"consumer {c.name} shard {shard_to_tag(shard)}: its checkpoint {key.redis_key} was moved back from "
            f"{mark.sequence} (the highest position the project recorded, in {mark.store}: {recorded}) to "
            f"{found if found is not None else 'nothing (the checkpoint is gone)'}, by {regression.who()}.{sent} "
            f"Its sink ({c.handler}) is not idempotent: reading on would publish every event after {target} up "
            f"to {sent_to} again, so the shard is stopped and nothing was re-sent; the other shards go on. To "
            f"replay them on purpose: `durability-pipelines checkpoints rewind {parts} --backend hybrid --to "
            f"{target} --reason '<why>'` (recorded; the replay then happens once). To restore the checkpoint "
            f"instead (nothing is re-sent): {restore}.",
            regression,
        )

    def durable_checkpoint(self, shard: str | None) -> str | None:
        """The shard's checkpoint as the store's most durable part holds it: Postgres's when the store has a
        Postgres part (hybrid: what was flushed), else the store's own (redis); None for a process-local
        store (memory), which no restart survives. Read through ``parts()``, a capability of every store."""
        parts = dict(self.store.parts())
        key = self.key(shard)
        if "postgres" in parts:
            return parts["postgres"].load(key)
        if "memory" in parts:
            return None
        return self.store.load(key)

    def settle(self, shard: str | None) -> None:
        """A drain of ``shard`` ends cleanly (caught up, budget used, stopped, handed over), its lease still held:
        flush the store, so that hybrid's buffered acks reach Postgres under the lease (a stop, a deploy, the
        demo's end leave the two stores equal; only a crash leaves acks in Redis alone, for the mirror); and under
        a source that releases upstream only what is durable (a WAL slot), release up to the last ack, or the
        server would hold that WAL until the next run."""
        if shard in self._released:
            self._release_source(shard, final=True)  # flushes first
        else:
            self._flush(f"as the drain of shard {shard} ended")

    def _flush(self, when: str) -> None:
        """Flush the store (hybrid: buffered acks to Postgres); an outage only logs: Redis has every ack, the next
        flush or the mirror carries them, and a releasing source stays at the last durable position."""
        try:
            self.store.flush()
        except DurabilityError as exc:
            log.warning("consumer %s: could not flush the checkpoints %s: %s", self.config.name, when, exc)

    def _release_source(self, shard: str | None, *, final: bool = False) -> None:
        """Ack = checkpoint, then source: let a ``ReleasingSource`` free what the durable checkpoint covers.

        The store is flushed first (hybrid: the ack reaches Postgres now, not at the flush bound): such a source
        can only move to a durable position, and one that lags behind costs more than the write (a WAL slot
        left behind makes every read decode the acked batches again)."""
        if isinstance(self.source, ReleasingSource):  # a capability (Protocol), not a concrete class
            self._released.add(shard)
            self._flush("before releasing the source")
            self.source.release(shard, lambda: self.durable_checkpoint(shard), final=final)

    def _backlog_metrics(self, shard: str | None, checkpoint: str | None, *, final: bool = False) -> None:
        """Record a ``ReportsBacklogBytes`` source's backlog in bytes (lag after the checkpoint, unreleased,
        retained) as gauges: at most every ``BACKLOG_EVERY_S`` per shard, and once more at close, so that the
        run's metadata (``metrics.summary()``) ends with the figures as the run left them. Monitoring: a
        failed measurement is logged, never fails the ack."""
        if not isinstance(self.source, ReportsBacklogBytes) or checkpoint is None:  # a capability (Protocol)
            return
        now = time.monotonic()
        last = self._backlog_at.get(shard)
        if not final and last is not None and now - last[0] < BACKLOG_EVERY_S:
            self._backlog_at[shard] = (last[0], checkpoint)
            return
        self._backlog_at[shard] = (now, checkpoint)
        try:
            backlog = self.source.backlog_bytes(shard, checkpoint)
        except DurabilityError as exc:
            log.warning("consumer %s: backlog in bytes of shard %s not measured: %s", self.config.name, shard, exc)
            return
        if backlog is None:
            return
        labels = self._labels(shard)
        for metric, value in ((LAG_BYTES, backlog.lag_bytes), (SLOT_LAG_BYTES, backlog.unreleased_bytes),
                              (RETAINED_WAL_BYTES, backlog.retained_bytes)):
            if value is not None:
                self.metrics.record(metric, value, labels=labels)

    @staticmethod
    def _positions_to_save(read: ReadOutput, target: str) -> list[str]:
        """``[target]``, or for a shard that ended in this batch its last sequence number first: the
        shared key keeps a number other workers can resume after, ``SHARD_END`` goes beside it."""
        if target == SHARD_END and read.batch.events:
            return [read.batch.events[-1].sequence, SHARD_END]
        return [target]

    def release(self, lease: Lease | None) -> None:
        """Give the shard up (the next run takes it over without waiting for the expiry)."""
        if lease is not None:
            self.store.leases.release(lease)

    def lag_seconds(self, events: Sequence[ChangeEvent]) -> float | None:
        """Age of the newest of ``events`` (Lambda's IteratorAge once they are acked); None if undated."""
        created = [e.created_at for e in events if e.created_at is not None]
        if not created:
            return None
        newest = max(created)
        if newest.tzinfo is None:
            newest = newest.replace(tzinfo=timezone.utc)
        return round(max(0.0, (datetime.now(timezone.utc) - newest).total_seconds()), 3)

    def _batch_metrics(self, read: ReadOutput, processed: ProcessOutput, result: SaveResult | None) -> None:
        labels = self._labels(read.shard)
        total = len(read.batch.events)
        self.metrics.record(EVENTS_PER_BATCH, total, labels=labels)
        if self.config.filter is not None:
            filtered = count_filtered(self.config.filter, read.batch.events)
            self.metrics.record(EVENTS_FILTERED, filtered, labels=labels)
        ok = total - len(processed.failed)
        self.metrics.count(EVENTS_FAILED, len(processed.failed), labels=labels)
        self.metrics.record(ACK_SUCCESS_RATE, round(ok / total, 4) if total else 1.0, labels=labels)
        acked = result.current if result else None
        gap = sequence_gap(acked, read.batch.newest_sequence) if acked else None
        self.metrics.record(SEQUENCE_GAP, gap or 0, labels=labels)
        lag = self.lag_seconds(read.batch.events)
        if lag is not None:
            self.metrics.record(LAG_SECONDS, lag, labels=labels)
        if read.batch.behind is not None:
            self.metrics.record(RECORDS_BEHIND, read.batch.behind, labels=labels)

    def close(self) -> None:
        # Each drain flushed as it ended (``settle``, under its lease); what is still buffered here belongs to
        # drains that did not end cleanly, and stays in Redis for the mirror to carry (a lease may be gone).
        for shard in sorted(self._released, key=lambda s: s or ""):
            try:
                self._release_source(shard, final=True)
            except DurabilityError as exc:  # the next run releases it: the server only keeps more meanwhile
                log.warning("consumer %s: could not release shard %s at the source: %s", self.config.name, shard, exc)
        for shard, (_, checkpoint) in sorted(self._backlog_at.items(), key=lambda kv: kv[0] or ""):
            self._backlog_metrics(shard, checkpoint, final=True)
        self.metrics.close()  # a run's last push to the Pushgateway (when one is configured)
        with self._sink_lock:
            for conn in self._sink_conns:
                with contextlib.suppress(Exception):
                    conn.close()
            self._sink_conns.clear()
        self.store.close(flush=False)
        if self.source is not None:
            self.source.close()


def open_runtime(config: ConsumerConfig, *, redis_url: str | None, postgres_url: str | None,
                 source: StreamSource | None = None, build_source: bool = True,
                 metrics: Metrics | None = None, is_owner_dead: Callable[[str], bool] | None = None,
                 migrate_schema: bool = True) -> ConsumerRuntime:
    """Wire a runtime from config and URLs (what the Dagster resources do)."""
    from durability_pipelines.consumer.adapters import build_source as make_source
    from durability_pipelines.consumer.handlers import load_handler
    from durability_pipelines.consumer.storage import ensure

    storage = None
    if postgres_url:
        db = PostgresConnection(postgres_url)
        if migrate_schema:
            ensure(db)
        storage = ConsumerStorage(db)
    store = open_store(config.checkpoint, redis_url=redis_url, postgres_url=postgres_url,
                       migrate_schema=migrate_schema)
    metrics = metrics or Metrics(Labels(config.adapter, config.stream, config.group, config.consumer))
    if source is None and build_source:
        source = make_source(config, postgres_url=postgres_url, on_call=lambda op, ms: metrics.call_duration(op, ms))
    return ConsumerRuntime(
        config, store=store, source=source, handler=load_handler(config.handler), storage=storage,
        postgres_url=postgres_url, metrics=metrics, is_owner_dead=is_owner_dead,
    )
