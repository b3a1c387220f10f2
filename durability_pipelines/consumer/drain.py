"""A run drains its shard: batch after batch, read -> process -> ack, until there is nothing left.

Why: a Dagster run costs seconds (a sensor tick, a launch, a process start); one run per batch
caps a shard at a few dozen events per second, while one DynamoDB Streams shard carries about a
thousand. So a run holds the shard's lease and loops, with the batch rules of ``runtime`` unchanged
for each batch:

* the checkpoint is saved after *each* batch, under the lease (renewed as the run goes on), so a
  crash mid-run loses nothing: the next run starts after the last acked batch;
* a failing batch is retried in place with bounded, jittered backoff (``retry.max_retries``), then
  dead-lettered by the consumer's policy (``stop`` ends the run, ``bisect`` goes on);
* while a full batch is processed the next one is read ahead (``ReadAhead``), so the stream's latency
  overlaps the handler's; a batch read ahead is dropped if the checkpoint did not end where it starts;
* it polls like Lambda and KCL: after a batch with records it reads again at once, and sleeps a poll
  interval only after an empty read;
* a run hands its shard over gracefully (``consumer/handoff.py``): when a successor asks for the lease,
  the owner finishes the batch in hand, saves its checkpoint (hybrid: in Postgres too) and hands the
  lease over, and the successor reads on at once; on a ``SharedReads`` source the successor has followed
  the shard while it waited (``consumer/follower.py``) and processes what it read at once. A run whose
  budget is used (``max_batches_per_run``, ``max_run_seconds``) reads on for up to ``handoff_timeout_s``
  more while it waits for its successor, so the shard is never left unread on a planned end;
* the run ends when its shard is handed over, the shard is caught up (after ``max_idle_s`` of polling;
  never with ``keep_owned``), its shard ended, the budget and the wait for a successor are used, a batch
  failed, or the lease was lost.

Each batch leaves a :class:`BatchRecord` (handed to ``on_batch``: the Dagster op logs it); the
:class:`DrainReport` sums them. No Dagster import.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from durability_pipelines.checkpoints import (
    DurabilityError,
    InvalidSequenceError,
    Lease,
    LeaseLostError,
    SaveResult,
    StoreUnavailableError,
)
from durability_pipelines.checkpoints.errors import lease_lost
from durability_pipelines.checkpoints.lock_waits import LockWaitTimeoutError
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.dispatch import shard_id
from durability_pipelines.consumer.filters import count_filtered
from durability_pipelines.consumer.follower import Follower
from durability_pipelines.consumer.handoff import Claim, claim_shard
from durability_pipelines.consumer.runtime import (
    BatchDeadLettered,
    ConsumerRuntime,
    PartialBatchFailure,
    ProcessOutput,
    ReadOutput,
)
from durability_pipelines.consumer.source import SharedReads
from durability_pipelines.sources.backoff import BackoffPolicy

log = logging.getLogger(__name__)

#: How often a caught-up run (or a batching window) polls the stream: Lambda polls a shard 4 times a second.
POLL_INTERVAL_S = 0.25
#: Longest wait between two attempts of a failing batch.
MAX_RETRY_DELAY_S = 60.0
#: Lock waits of one batch retried in place (each lock_timeout = lease/4 long) before the run gives up to the op's
#: RetryPolicy: the server ends a frozen holder after one lease, so 8 waits cover two leases.
MAX_LOCK_WAITS = 8
#: Batch records a run keeps (its event log has every one; the op's metadata shows the newest 200).
KEPT_BATCHES = 1000


class StopReason(str, enum.Enum):
    HANDED_OVER = "handed over"
    NOT_GRANTED = "hand-off not granted"
    CAUGHT_UP = "caught up"
    SHARD_ENDED = "shard ended"
    BATCH_BUDGET = "max_batches_per_run reached"
    TIME_BUDGET = "max_run_seconds reached"
    STOPPED = "run stopped"  # canceled or terminated: the batch in hand was finished and acked


@dataclass(frozen=True)
class DrainBudget:
    """How long one run may keep a shard (the sensor dispatches the next run)."""

    max_batches: int
    max_seconds: float
    max_idle_s: float  # math.inf: never end because the stream is quiet (keep_owned)
    batch_window_s: float = 0.0
    poll_interval_s: float = POLL_INTERVAL_S
    #: Once the budget is used, read on this long while waiting for a successor to ask (0: end at once).
    handoff_wait_s: float = 0.0
    #: A successor waits this long for a live, renewing owner to hand over before it gives up.
    handoff_timeout_s: float = 60.0

    @classmethod
    def from_config(cls, config: ConsumerConfig) -> DrainBudget:
        return cls(config.max_batches_per_run, config.max_run_seconds,
                   math.inf if config.keep_owned else config.max_idle_s, config.batch_window_s,
                   handoff_wait_s=config.handoff_timeout_s, handoff_timeout_s=config.handoff_timeout_s)


@dataclass(frozen=True)
class BatchRecord:
    """What one batch did: the run's event log holds one per batch."""

    index: int  # 1-based, within the run
    shard: str | None
    start_after: str | None
    first_sequence: str | None
    last_sequence: str | None
    events: int
    processed: int
    failed: int
    attempts: int
    outcome: str  # the save's outcome (advanced / unchanged) or "nothing to ack"
    checkpoint: str | None  # acked position after the batch
    lag_s: float | None  # age of the newest acked record (Lambda's IteratorAge)
    behind: int | None  # records still after the checkpoint, where the source can tell
    duration_s: float
    dead_letter_ids: tuple[int, ...] = ()
    filtered: int = 0  # events the consumer's filter kept from the handler; acked with the batch

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": self.index, "shard": shard_id(self.shard), "start_after": self.start_after,
            "first_sequence": self.first_sequence, "last_sequence": self.last_sequence, "events": self.events,
            "processed": self.processed, "failed": self.failed, "attempts": self.attempts, "outcome": self.outcome,
            "checkpoint": self.checkpoint, "lag_s": self.lag_s, "behind": self.behind,
            "duration_s": self.duration_s, "dead_letter_ids": list(self.dead_letter_ids),
            "filtered": self.filtered,
        }

    def describe(self) -> str:
        span = f"{self.first_sequence}..{self.last_sequence}" if self.events else "no events"
        lag = f"{self.lag_s:.1f} s" if self.lag_s is not None else "unknown"
        behind = str(self.behind) if self.behind is not None else "unknown"
        extra = f", {self.failed} failed, dead letters {list(self.dead_letter_ids)}" if self.failed else ""
        retried = f", {self.attempts} attempts" if self.attempts > 1 else ""
        extra = f", {self.filtered} filtered out{extra}" if self.filtered else extra
        return (f"batch {self.index} shard {shard_id(self.shard)}: {self.events} events ({span}){extra}{retried}; "
                f"checkpoint {self.outcome} at {self.checkpoint}; lag {lag}, behind {behind}; "
                f"{self.duration_s:.3f} s")


@dataclass
class DrainReport:
    """The run's sum of its batches; kept up to date while the run goes, so a failure can report it."""

    consumer: str
    shard: str | None
    run_id: str
    start_after: str | None = None
    checkpoint: str | None = None
    lease_epoch: int | None = None
    #: The newest ``KEPT_BATCHES`` batch records (a long run keeps its memory flat); the totals cover them all.
    batches: list[BatchRecord] = field(default_factory=list)
    batch_count: int = 0
    events: int = 0
    processed: int = 0
    failed: int = 0
    filtered: int = 0
    retried_batches: int = 0
    dead_letters: int = 0
    stop_reason: StopReason | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    #: How the run took its shard (``consumer/handoff.py``), and from whom by hand-off.
    claimed: str = ""
    handed_from: str = ""
    handoff_waited_s: float | None = None  # asking -> holding the lease
    handoff_gap_s: float | None = None  # the hand-off -> this run's first read (wall clocks)
    #: A successor that followed the shard while it waited: how long before the hand-off it first read a record
    #: it then processed (the shard was read all along); None: it read only once it held the lease.
    handoff_followed_s: float | None = None
    #: The run that took the shard over by hand-off, and how long after this run's last read it did.
    handed_to: str = ""
    handoff_after_last_read_s: float | None = None
    handoff_flush_s: float | None = None  # making the checkpoint durable (hybrid: Postgres) before handing over
    handoff_write_s: float | None = None  # the hand-over's conditional write
    not_granted: str = ""

    def add(self, record: BatchRecord) -> None:
        self.batch_count += 1
        self.events += record.events
        self.processed += record.processed
        self.failed += record.failed
        self.filtered += record.filtered
        self.retried_batches += record.attempts > 1
        self.dead_letters += len(record.dead_letter_ids)
        self.batches.append(record)
        if len(self.batches) > KEPT_BATCHES:
            del self.batches[: len(self.batches) - KEPT_BATCHES]

    @property
    def duration_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def events_per_s(self) -> float:
        return round(self.events / self.duration_s, 1) if self.duration_s > 0 else 0.0

    @property
    def last(self) -> BatchRecord | None:
        return self.batches[-1] if self.batches else None

    @property
    def behind(self) -> int | None:
        """Records left after the checkpoint when the run ended: 0 once caught up; None = unknown."""
        if self.stop_reason in (StopReason.CAUGHT_UP, StopReason.SHARD_ENDED):
            return 0
        return self.last.behind if self.last else None

    def as_metadata(self) -> dict[str, Any]:
        """Flat figures (numbers Dagster plots, text for positions: they exceed a float's precision)."""
        last = self.last
        return {
            "consumer": self.consumer,
            "shard": shard_id(self.shard),
            "stop_reason": self.stop_reason.value if self.stop_reason else "failed",
            "batches": self.batch_count,
            "events": self.events,
            "processed": self.processed,
            "failed_items": self.failed,
            "events_filtered": self.filtered,
            "events_per_s": self.events_per_s,
            "duration_s": round(self.duration_s, 3),
            "start_after": self.start_after or "(initial position)",
            "checkpoint": self.checkpoint or "",
            "lag_seconds": last.lag_s if last and last.lag_s is not None else 0.0,
            "records_behind": self.behind if self.behind is not None else -1,
            "retried_batches": self.retried_batches,
            "dead_letters": self.dead_letters,
            "lease_epoch": self.lease_epoch or 0,
            "claimed": self.claimed,
            "handed_from": self.handed_from,
            "handed_to": self.handed_to,
            # the shard unread across a hand-off = the owner's part + the successor's part (-1: no hand-off)
            "handoff_after_last_read_s": _rounded(self.handoff_after_last_read_s),
            "handoff_gap_s": _rounded(self.handoff_gap_s),
            "handoff_followed_s": _rounded(self.handoff_followed_s),
            "handoff_waited_s": _rounded(self.handoff_waited_s),
            "handoff_flush_s": _rounded(self.handoff_flush_s),
            "handoff_write_s": _rounded(self.handoff_write_s),
        }


def _rounded(value: float | None) -> float:
    return -1.0 if value is None else round(value, 3)


class ReadAhead:
    """Reads the next batch in a background thread while the current one is processed (KCL's
    prefetching record publisher does the same): the stream's latency and the sink's overlap.

    Reading has no side effects, so a batch read ahead is simply dropped when the position it was read
    from is not where the checkpoint ended up (a partial failure, a poison record skipped).
    """

    def __init__(self, read: Callable[[str | None], ReadOutput]) -> None:
        self._read = read
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
        self._pending: tuple[str | None, Future[ReadOutput]] | None = None

    def start(self, after: str | None) -> None:
        self._drop()
        self._pending = (after, self._pool.submit(self._read, after))

    def take(self, after: str | None) -> ReadOutput | None:
        """The batch read ahead from ``after`` (its read's error, if it failed); None if there is none."""
        if self._pending is None or self._pending[0] != after:
            self._drop()
            return None
        _, future = self._pending
        self._pending = None
        return future.result()

    def _drop(self) -> None:
        if self._pending is not None:
            _, future = self._pending
            self._pending = None
            with contextlib.suppress(Exception):  # its outcome no longer matters
                future.result()

    def close(self) -> None:
        """Wait for a read in flight (the source is closed after this), then stop the thread."""
        self._drop()
        self._pool.shutdown(wait=True)


class IdleQuorum:
    """The shards of one run end "caught up" together: a shard idle for ``max_idle_s`` keeps polling until
    every other shard of the run is idle too (or has ended). A run that released a quiet shard while it
    drains the others would leave that shard unread, and unowned, until the run ends."""

    def __init__(self, shards: list[str | None]) -> None:
        self._lock = threading.Lock()
        self._busy = set(shards)

    def idle(self, shard: str | None) -> bool:
        """``shard`` is idle; True when the whole run is (the caller may end)."""
        with self._lock:
            self._busy.discard(shard)
            return not self._busy

    def busy(self, shard: str | None) -> None:
        with self._lock:
            self._busy.add(shard)

    def leave(self, shard: str | None) -> None:
        """``shard``'s drain ended (for whatever reason): it no longer holds the others up."""
        self.idle(shard)


class ShardDrainer:
    """Drains one shard for one run. ``report`` is readable after ``run()`` returns or raises."""

    def __init__(self, runtime: ConsumerRuntime, shard: str | None, run_id: str, budget: DrainBudget, *,
                 on_start: Callable[[DrainReport], None] | None = None,
                 on_batch: Callable[[BatchRecord], None] | None = None,
                 on_retry: Callable[[int, BaseException, float], None] | None = None,
                 prefetch: bool = True, quorum: IdleQuorum | None = None, stop: threading.Event | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.rt = runtime
        self.quorum = quorum
        self.stop = stop  # set: end after the batch in hand (the lease is released, the checkpoint kept)
        self.shard = shard
        self.run_id = run_id
        self.budget = budget
        self.on_start = on_start
        self.on_batch = on_batch
        self.on_retry = on_retry
        self.prefetch = prefetch
        self.sleep = sleep
        self.clock = clock
        retry = runtime.config.retry
        self.retry_policy = BackoffPolicy(max_attempts=retry.max_retries + 1, base_delay_s=retry.delay_s,
                                          max_delay_s=max(retry.delay_s, MAX_RETRY_DELAY_S))
        self.report = DrainReport(runtime.config.name, shard, run_id)
        self._lease: Lease | None = None
        self._renewed_at = 0.0
        self._overtime_since: float | None = None  # when the budget was used (the wait for a successor began)
        self._last_read_at: float | None = None
        self._handed_at: datetime | None = None  # when the lease was handed to this run (the store's clock)

    # -- the loop --------------------------------------------------------------------
    def run(self) -> DrainReport:
        rt, report = self.rt, self.report
        report.started = self.clock()
        follower = self._follower()
        try:
            claim = self._claim(follower)
        finally:
            if follower is not None:
                follower.stop()
        if claim.lease is None:
            report.stop_reason, report.not_granted = StopReason.NOT_GRANTED, claim.why_not
            report.ended = self.clock()
            if self.quorum is not None:
                self.quorum.leave(self.shard)
            return report
        self._lease = claim.lease
        self._renewed_at = self.clock()
        report.lease_epoch = self._lease.epoch
        ahead = ReadAhead(self._read) if self.prefetch else None
        try:
            try:
                acked = rt.store.load(rt.key(self.shard))
            except InvalidSequenceError as exc:  # garbage or a key of another type, no other store to fall back on
                raise rt.unreadable_checkpoint(self.shard, exc, self.run_id) from exc
            report.start_after = report.checkpoint = acked
            followed = self._followed(follower, acked)
            if self.on_start is not None:
                self.on_start(report)
            idle_since: float | None = None
            while True:
                if self.stop is not None and self.stop.is_set():
                    report.stop_reason = StopReason.STOPPED
                    break
                if self._successor_asked() and self._hand_over():
                    break
                stop = self._budget_used()
                if stop is not None:
                    report.stop_reason = stop
                    break
                self._renew_if_due()
                read, followed = followed or (ahead.take(acked) if ahead is not None else None), None
                read = read or self._read_now(acked)
                self._last_read_at = read.read_started  # the owner's last read, when it hands over
                batch = read.batch
                if not batch.events and batch.next_checkpoint is None and batch.gap is None:
                    # Nothing new: poll until max_idle_s has passed without a record.
                    idle_since = self.clock() if idle_since is None else idle_since
                    if self.clock() - idle_since >= self.budget.max_idle_s and (
                            self.quorum is None or self.quorum.idle(self.shard)):
                        report.stop_reason = StopReason.CAUGHT_UP
                        break
                    self.sleep(self.budget.poll_interval_s)
                    continue
                if idle_since is not None and self.quorum is not None:
                    self.quorum.busy(self.shard)
                idle_since = None
                full = len(batch.events) >= rt.config.max_events and batch.behind != 0
                if ahead is not None and full and batch.extendable and self._another_batch_fits():
                    ahead.start(batch.next_checkpoint)  # read the next batch while this one is processed
                record = self._process(read, acked)
                moved = record.checkpoint != acked
                acked = record.checkpoint
                report.checkpoint = acked
                report.add(record)
                if self.on_batch is not None:
                    self.on_batch(record)
                if batch.shard_ended:
                    report.stop_reason = StopReason.SHARD_ENDED
                    break
                if batch.gap is not None and not moved:
                    # Trimmed data skipped with nothing after it yet: polling would record the gap again.
                    report.stop_reason = StopReason.CAUGHT_UP
                    break
                if not full and self.budget.max_idle_s <= 0:
                    report.stop_reason = StopReason.CAUGHT_UP
                    break
                # Records came: read again at once (Lambda and KCL do); only an empty read waits.
        finally:
            if ahead is not None:
                ahead.close()
            report.ended = self.clock()
            if self._lease is not None:  # still ours: make the acks durable (and released upstream) before letting go
                with contextlib.suppress(DurabilityError):
                    self.rt.settle(self.shard)
            self._release()
            if self.quorum is not None:
                self.quorum.leave(self.shard)
        return report

    def _claim(self, follower: Follower | None) -> Claim:
        rt = self.rt
        claim = claim_shard(
            rt.store.leases, rt.key(self.shard).lease_key, self.run_id, duration_s=rt.config.lease_duration_s,
            timeout_s=self.budget.handoff_timeout_s, is_owner_dead=rt.is_owner_dead, sleep=self.sleep,
            clock=self.clock, should_stop=self.stop.is_set if self.stop is not None else lambda: False,
            on_wait=follower.start if follower is not None else None)
        report = self.report
        report.claimed, report.handoff_waited_s = claim.how, round(claim.waited_s, 3)
        if claim.how == "handed over" and claim.lease is not None:
            report.handed_from = claim.lease.handed_from
            self._handed_at = claim.lease.handed_at
        return claim

    def _follower(self) -> Follower | None:
        """A reader of the shard for the wait for a hand-off, where the source serves two readers at once."""
        source = self.rt.source
        if not self.prefetch or not isinstance(source, SharedReads) or not source.shared_reads:
            return None
        rt, key = self.rt, self.rt.key(self.shard)
        return Follower(
            lambda after, n: rt.read_after(self.shard, self.run_id, None, after, max_events=n, record_gap=False).batch,
            lambda: rt.store.load(key), max_events=rt.config.max_events, poll_s=self.budget.poll_interval_s)

    def _followed(self, follower: Follower | None, acked: str | None) -> ReadOutput | None:
        """What the follower read after ``acked`` (the checkpoint the lease came with), as this run's first batch."""
        if follower is None or self._handed_at is None:
            return None
        taken = follower.take(acked)
        if taken is None or not taken[0].events:
            return None  # nothing read past the hand-over checkpoint: the first read goes on from there
        batch, first_read_at = taken
        handed = self._handed_at.timestamp()
        self.report.handoff_followed_s = max(0.0, handed - first_read_at)
        self.report.handoff_gap_s = max(0.0, first_read_at - handed)
        return ReadOutput(self.rt.config.name, self.shard, self.run_id, batch, self._lease, self.clock())

    def _read_now(self, acked: str | None) -> ReadOutput:
        """A read in the loop (not one read ahead); the first one after a hand-off ends the shard's unread time."""
        if self._handed_at is not None and self.report.handoff_gap_s is None:
            self.report.handoff_gap_s = max(0.0, time.time() - self._handed_at.timestamp())
        return self._read(acked)

    def _another_batch_fits(self) -> bool:
        if self._overtime_since is not None:
            return True  # past the budget, every batch may be the last: the successor decides
        return (self.report.batch_count + 1 < self.budget.max_batches
                and self.clock() - self.report.started < self.budget.max_seconds)

    def _budget_used(self) -> StopReason | None:
        """The budget's stop reason once it is used *and* the wait for a successor is over."""
        if self.report.batch_count >= self.budget.max_batches:
            reason = StopReason.BATCH_BUDGET
        elif self.clock() - self.report.started >= self.budget.max_seconds:
            reason = StopReason.TIME_BUDGET
        else:
            return None
        now = self.clock()
        if self._overtime_since is None:
            self._overtime_since = now
            if self.budget.handoff_wait_s > 0:
                log.info("consumer %s shard %s: %s; reading on for up to %.0f s until a successor asks for the "
                         "shard", self.rt.config.name, shard_id(self.shard), reason.value, self.budget.handoff_wait_s)
        return reason if now - self._overtime_since >= self.budget.handoff_wait_s else None

    # -- graceful hand-off (the owner's side) ---------------------------------------------
    def _successor_asked(self) -> bool:
        """One read of the lease per batch: has a successor asked? (Also: is the lease still ours?)"""
        if self._lease is None:
            return False
        try:
            now = self.rt.store.leases.get(self._lease.key)
        except StoreUnavailableError:
            return False  # asked again at the next batch; the save says whether the lease still holds
        if now is None or (now.owner, now.epoch) != (self._lease.owner, self._lease.epoch):
            lost = lease_lost(self._lease, now.owner if now else None, now.epoch if now else None)
            self._lease = None  # not ours to release any more
            raise lost
        return bool(now.requested_by)

    def _hand_over(self) -> bool:
        """Make the checkpoint durable, then give the lease to the successor that asked (True), or keep
        reading if the request was withdrawn meanwhile (False)."""
        assert self._lease is not None
        rt, started = self.rt, self.clock()
        try:
            rt.store.flush()  # hybrid: the successor must not depend on this process's buffer
        except StoreUnavailableError as exc:  # Redis holds every ack; the mirror carries it to Postgres
            log.warning("consumer %s shard %s: could not flush the checkpoint to Postgres before the hand-off "
                        "(%s); it is in Redis, where the successor reads it first", rt.config.name,
                        shard_id(self.shard), exc)
        flushed = self.clock()
        successor = rt.store.leases.hand_over(self._lease, rt.config.lease_duration_s)
        if successor is None:
            return False
        self.report.handoff_flush_s = round(flushed - started, 3)
        self.report.handoff_write_s = round(self.clock() - flushed, 3)
        last_read = self._last_read_at
        self.report.handoff_after_last_read_s = None if last_read is None else self.clock() - last_read
        self.report.handed_to = successor.owner
        self.report.stop_reason = StopReason.HANDED_OVER
        self._lease = None  # the successor's now: nothing to release
        return True

    # -- lease -----------------------------------------------------------------------
    def _renew_if_due(self) -> None:
        """Renew once a third of the lease has passed: a renewal costs a round trip, an expiry the shard.

        A store that cannot renew now (it is down) is retried at the next batch: the lease stays valid
        until it expires, and the stores refuse every save after that (the run then stops).
        """
        duration = self.rt.config.lease_duration_s
        if self._lease is None or self.clock() - self._renewed_at < duration / 3:
            return
        try:
            self._lease = self.rt.store.leases.renew(self._lease, duration)  # LeaseLostError: someone took it
        except StoreUnavailableError as exc:
            log.warning("consumer %s shard %s: could not renew the lease (%s); retrying at the next batch",
                        self.rt.config.name, shard_id(self.shard), exc)
            return
        self._renewed_at = self.clock()

    def _release(self) -> None:
        if self._lease is None:
            return
        try:
            self.rt.release(self._lease)
        except DurabilityError as exc:  # it expires on its own; the next run may have to wait for that
            log.warning("could not release the lease of shard %s: %s", shard_id(self.shard), exc)
        self._lease = None

    # -- one batch -------------------------------------------------------------------
    def _read(self, acked: str | None) -> ReadOutput:
        """One batch; with a batching window, keep reading after it until it is full or the window closes.
        (A gap is audited when the batch is processed: a batch read ahead may be discarded.)"""
        rt, want, started = self.rt, self.rt.config.max_events, self.clock()
        read = rt.read_after(self.shard, self.run_id, self._lease, acked, record_gap=False)
        read.read_started = started
        window = self.budget.batch_window_s
        if window <= 0:
            return read
        deadline = self.clock() + window
        batch = read.batch
        while len(batch.events) < want and batch.extendable and self.clock() < deadline:
            self.sleep(min(self.budget.poll_interval_s, max(0.0, deadline - self.clock())))
            more = rt.read_after(self.shard, self.run_id, self._lease, batch.next_checkpoint or acked,
                                 max_events=want - len(batch.events), record_gap=False).batch
            if more.gap is not None:
                break  # leave the gap to the next batch, which reports it
            batch = batch.extended(more)
        return ReadOutput(read.consumer, read.shard, read.run_id, batch, read.lease, started)

    def _process(self, read: ReadOutput, acked: str | None) -> BatchRecord:
        """Process and ack one batch, retrying a failing handler in place; returns its record."""
        started = self.clock()
        if read.batch.gap is not None:
            self.rt.record_gap(read.batch.gap, self.run_id)
        try:
            processed = self._process_with_retries(read)
            result: SaveResult | None = self.rt.ack(read, processed)
        except InvalidSequenceError as exc:  # the stored checkpoint became unusable mid-run (a foreign write)
            raise self.rt.unreadable_checkpoint(self.shard, exc, self.run_id, read.batch.events) from exc
        batch = read.batch
        checkpoint = result.current if result else (processed.ack_to or acked)
        failed = set(processed.failed)
        acked_events = [e for e in batch.events if e.sequence not in failed]
        return BatchRecord(
            index=self.report.batch_count + 1, shard=self.shard, start_after=batch.start_after,
            first_sequence=batch.events[0].sequence if batch.events else None,
            last_sequence=batch.newest_sequence, events=len(batch.events), processed=processed.processed,
            failed=len(processed.failed), attempts=processed.attempts,
            outcome=result.outcome.value if result else "nothing to ack", checkpoint=checkpoint,
            lag_s=self.rt.lag_seconds(acked_events), behind=batch.behind,
            duration_s=round(self.clock() - started, 3), dead_letter_ids=tuple(processed.dead_letter_ids),
            filtered=count_filtered(self.rt.config.filter, batch.events),
        )

    def _process_with_retries(self, read: ReadOutput) -> ProcessOutput:
        """``runtime.process`` attempt by attempt; its last attempt dead-letters (stop raises, bisect returns).

        A lock wait (``LockWaitTimeoutError``: another transaction, e.g. a frozen worker's, holds the sink's rows)
        is not the batch's fault: it is retried in place, the lease renewed between waits, up to
        ``MAX_LOCK_WAITS`` times, and never counts towards dead-lettering. The server ends a frozen holder after
        one lease (``idle_in_transaction_session_timeout``), so the batch goes through in this run instead of
        costing a new run process (the op's RetryPolicy gets it only after that)."""
        attempt = 0
        lock_waits = 0
        while True:
            try:
                return self.rt.process(read, retry_number=attempt)
            except (LeaseLostError, BatchDeadLettered):
                raise
            except LockWaitTimeoutError as exc:
                lock_waits += 1
                if lock_waits > MAX_LOCK_WAITS:
                    raise
                log.warning("consumer %s shard %s: lock wait %d of %d (%s); retrying the batch in place",
                            self.rt.config.name, shard_id(self.shard), lock_waits, MAX_LOCK_WAITS, exc)
                if self.on_retry is not None:
                    self.on_retry(lock_waits, exc, 0.0)
                self._renew_if_due()  # a wait is lease/4 at most: the lease is renewed before it could run out
                continue
            except DurabilityError as exc:
                if not isinstance(exc, PartialBatchFailure):
                    raise  # a store or the source is down: not the handler's fault (the op's RetryPolicy)
                error: BaseException = exc
            except Exception as exc:  # noqa: BLE001 - the handler failed: retried, then dead-lettered
                error = exc
            attempt += 1
            delay = self.retry_policy.delay(attempt)
            log.warning("consumer %s shard %s: batch attempt %d failed (%s); retrying in %.2f s",
                        self.rt.config.name, shard_id(self.shard), attempt, error, delay)
            if self.on_retry is not None:
                self.on_retry(attempt, error, delay)
            self.sleep(delay)
            self._renew_if_due()
