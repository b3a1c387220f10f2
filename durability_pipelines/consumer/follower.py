"""A successor follows its shard while it waits for the graceful hand-off, so the shard is never unread.

Without it a planned hand-off leaves the shard unread from the owner's last read until the successor's first
one: the owner's last batch (processing, ack, hand-over) plus the successor's first read (noticing the lease,
loading the checkpoint, opening a shard iterator, GetRecords). KCL 3.x hands a lease over at a checkpoint and
the new owner starts reading then; here a successor on a ``SharedReads`` source reads the shard *while* it
waits, from the owner's checkpoint on, and keeps up with it: what it read is cut at every checkpoint the owner
saves (``SourceBatch.after``). When the lease arrives it holds the records after the hand-over checkpoint
(up to ``max_events``) and an open iterator after them, and processes them at once.

Reading has no side effect, so nothing here touches fencing: the follower never acks or writes; what it read
is used only if it covers the checkpoint the successor loads *after* the lease is its own, and is dropped
otherwise. Any error just ends the following (the successor then reads as it always did). No Dagster import.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from durability_pipelines.checkpoints.ordering import sort_key
from durability_pipelines.consumer.source import SourceBatch

log = logging.getLogger(__name__)


class Follower:
    """Reads a shard in a background thread from the owner's checkpoint on, until ``take``.

    ``read(after, max_events)`` reads one batch; ``acked()`` is the shard's checkpoint as the store holds it now
    (the owner's). At most one read per ``poll_s``: with the owner, two readers on the shard, as DynamoDB
    Streams allows, and no more calls than a caught-up owner makes.
    """

    def __init__(self, read: Callable[[str | None, int], SourceBatch], acked: Callable[[], str | None], *,
                 max_events: int, poll_s: float, wall_clock: Callable[[], float] = time.time) -> None:
        self._read = read
        self._acked = acked
        self._max = max_events
        self._poll = poll_s
        self._wall = wall_clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batch: SourceBatch | None = None
        #: (wall time a read began, the newest sequence the buffer held after it): when each record was read
        self._reads: list[tuple[float, str | None]] = []
        self.reads = 0
        self.ended_by: str = ""  # why it stopped following before ``take`` (an error, a gap), for the log

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="follower", daemon=True)
            self._thread.start()

    def _follow(self) -> None:
        try:
            while not self._stop.is_set():
                self._step()
                self._stop.wait(self._poll)
        except Exception as exc:  # noqa: BLE001 - following is an optimisation: the successor reads as usual
            self.ended_by = f"{type(exc).__name__}: {exc}"
            log.info("stopped following the shard before the hand-off (%s); the successor reads once it holds "
                     "the lease", self.ended_by)

    def _step(self) -> None:
        floor = self._acked()
        if floor is None:
            return  # nothing acked yet: where to follow from depends on the initial position, read it after
        held = self._batch.after(floor) if self._batch is not None else None
        started = self._wall()
        if held is None:  # nothing followed yet, or the owner is past what was read: read afresh
            fresh = self._read(floor, self._max)
            self.reads += 1
            if fresh.gap is not None:
                self._stop.set()
                self.ended_by = "the stream had trimmed data after the checkpoint"
                return
            self._batch, self._reads = fresh, [(started, fresh.newest_sequence)]
            return
        self._batch = held
        if len(held.events) >= self._max or held.shard_ended or (held.events and not held.extendable):
            return  # a full batch waits for the lease (or for the owner's next checkpoint to cut it)
        more = self._read(held.next_checkpoint or floor, self._max - len(held.events))
        self.reads += 1
        if more.gap is not None:
            self._stop.set()
            self.ended_by = "the stream had trimmed data after the followed records"
            return
        if more.events or more.next_checkpoint is not None:
            self._batch = held.extended(more)
            self._reads.append((started, self._batch.newest_sequence))

    def stop(self) -> None:
        """Stop following (waits for a read in flight: the source is the caller's after this)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def take(self, acked: str | None) -> tuple[SourceBatch, float] | None:
        """Stop, and return what was read after ``acked`` (the checkpoint the lease came with) and the wall time
        of the first read that reached past it (or of the newest read, when none did: nothing was missed up to
        then); None when what was read does not cover ``acked``."""
        self.stop()
        batch = self._batch.after(acked) if self._batch is not None and acked is not None else None
        if batch is None or not self._reads:
            return None
        first = batch.events[0].sequence if batch.events else None
        for started, newest in self._reads:
            if first is not None and newest is not None and sort_key(newest) >= sort_key(first):
                return batch, started
        return batch, self._reads[-1][0]
