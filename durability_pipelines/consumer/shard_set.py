"""A run owns a set of shards, as a KCL worker owns a set of leases: one ``ShardDrainer`` per shard, each
on its own thread, with its own lease, checkpoint, batch records and retries.

Why: one run per shard costs a Python process per shard (seconds of CPU and ~190 MB before its first
batch) and one launch of Dagster's run coordinator per shard, whatever the shard carries. Threads share
the run's ``ConsumerRuntime`` (its stores and source are thread-safe: per-shard state is keyed by shard, the
Postgres connections are locked, the Redis client is a pool), so each added shard costs a thread pair
(drain + read-ahead), not a process.

* One slow or failing shard does not stop the others: a shard whose drain fails on the infrastructure (a
  store or the stream down, an unexpected error) is restarted in place after a backoff, up to
  ``retry.max_retries`` times; one that fails on its data (a dead letter under ``stop``), loses its lease or
  is refused ends alone and the run reports it when the others are done.
* The shards end "caught up" together (``IdleQuorum``): a quiet shard is not released while the others
  drain, so no shard of a live run is ever left unowned.
* Callbacks run on the caller's thread (the Dagster op's: its context is not thread-safe), in the order
  the shards produced them.

No Dagster import.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from durability_pipelines.consumer.dispatch import shard_id
from durability_pipelines.consumer.drain import (
    BatchRecord,
    DrainBudget,
    DrainReport,
    IdleQuorum,
    ShardDrainer,
)
from durability_pipelines.consumer.runtime import ConsumerRuntime
from durability_pipelines.sources.backoff import BackoffPolicy

log = logging.getLogger(__name__)

#: How often the caller's thread wakes to run callbacks while the shards drain.
CALLBACK_POLL_S = 0.2


@dataclass
class ShardOutcome:
    """How one shard's drain ended in this run: its (last) report, and the error that ended it, if any."""

    shard: str | None
    report: DrainReport
    error: BaseException | None = None
    restarts: int = 0
    #: the reports of the drains before each restart (their batches count too)
    earlier: list[DrainReport] = field(default_factory=list)


class ShardSetDrainer:
    """Drains ``shards`` for run ``run_id``, one thread per shard; ``run()`` returns when every shard ended."""

    def __init__(self, runtime: ConsumerRuntime, shards: list[str | None], run_id: str, budget: DrainBudget, *,
                 on_start: Callable[[DrainReport], None] | None = None,
                 on_batch: Callable[[BatchRecord], None] | None = None,
                 on_retry: Callable[[str | None, int, BaseException, float], None] | None = None,
                 on_restart: Callable[[str | None, int, BaseException, float], None] | None = None,
                 restartable: Callable[[BaseException], bool] = lambda exc: False,
                 drainer: Callable[..., ShardDrainer] = ShardDrainer,
                 sleep: Callable[[float], None] | None = None) -> None:
        if not shards:
            raise ValueError("a run drains at least one shard")
        self.rt = runtime
        self.shards = list(dict.fromkeys(shards))
        self.run_id = run_id
        self.budget = budget
        self.on_start, self.on_batch, self.on_retry, self.on_restart = on_start, on_batch, on_retry, on_restart
        #: errors after which a shard of a multi-shard run is restarted in place (a run of one shard raises them,
        #: so that the op's RetryPolicy retries it, visibly, as before)
        self.restartable = restartable
        self._drainer = drainer
        self._stopping = threading.Event()
        self._sleep = sleep or (lambda s: self._stopping.wait(s))
        retry = runtime.config.retry
        self._restart_policy = BackoffPolicy(max_attempts=retry.max_retries + 1, base_delay_s=max(retry.delay_s, 0.1),
                                             max_delay_s=max(retry.delay_s, 60.0))
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()
        self.quorum = IdleQuorum(self.shards)
        self.outcomes: dict[str | None, ShardOutcome] = {}

    def run(self) -> list[ShardOutcome]:
        threads = [threading.Thread(target=self._drain, args=(shard,), name=f"shard-{shard_id(shard)}", daemon=True)
                   for shard in self.shards]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                self._run_callbacks(CALLBACK_POLL_S)
        except BaseException:
            # The run is being stopped (Dagster raises its interrupt here on a cancel or a SIGTERM) or a
            # callback failed: every shard finishes the batch in hand, acks it and releases its lease.
            self.stop()
            for t in threads:
                t.join()
            raise
        self._run_callbacks(0)
        return [self.outcomes[s] for s in self.shards]

    def stop(self) -> None:
        """End every shard's drain after its batch in hand (``StopReason.STOPPED``)."""
        self._stopping.set()

    def _run_callbacks(self, wait_s: float) -> None:
        try:
            call = self._calls.get(timeout=wait_s) if wait_s > 0 else self._calls.get_nowait()
        except queue.Empty:
            return
        call()
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call()

    def _post(self, fn: Callable[..., None] | None, *args: object) -> None:
        if fn is not None:
            self._calls.put(lambda: fn(*args))

    def _drain(self, shard: str | None) -> None:
        earlier: list[DrainReport] = []
        restarts = 0
        while True:
            self.quorum.busy(shard)
            d = self._drainer(
                self.rt, shard, self.run_id, self.budget, quorum=self.quorum, stop=self._stopping,
                sleep=self._sleep,
                on_start=lambda report: self._post(self.on_start, report),
                on_batch=lambda record: self._post(self.on_batch, record),
                on_retry=lambda attempt, exc, delay: self._post(self.on_retry, shard, attempt, exc, delay),
            )
            try:
                d.run()
            except BaseException as exc:  # noqa: BLE001 - reported per shard; the other shards go on
                self.quorum.leave(shard)
                restarts += 1
                if (len(self.shards) > 1 and self.restartable(exc) and not self._stopping.is_set()
                        and restarts < self._restart_policy.max_attempts):
                    delay = self._restart_policy.delay(restarts)
                    log.warning("consumer %s shard %s: drain failed (%s: %s); restarting it in %.1f s",
                                self.rt.config.name, shard_id(shard), type(exc).__name__, exc, delay)
                    self._post(self.on_restart, shard, restarts, exc, delay)
                    earlier.append(d.report)
                    self._sleep(delay)
                    continue
                self.outcomes[shard] = ShardOutcome(shard, d.report, exc, restarts - 1, earlier)
                return
            self.outcomes[shard] = ShardOutcome(shard, d.report, None, restarts, earlier)
            return
