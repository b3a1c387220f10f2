"""What the consumer needs from a stream, whatever the stream is: the contract, nothing else.

``StreamSource`` hides DynamoDB shards vs. the (unsharded) Supabase change
feed behind three calls: which shards to read now, is there anything new, and
read a batch.  Each source turns its records into ``ChangeEvent``.  The
adapters that implement it live in ``consumer/adapters/`` (one file each) and
are built by ``consumer.adapters.build_source``; this module imports none of
them, so the runtime depends on the contract only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from durability_pipelines.checkpoints.ordering import sort_key
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.sources.hooks import CallHook

__all__ = ["BacklogBytes", "BoundsRetainedLog", "CallHook", "Gap", "Holdup", "ReleasingSource", "ReportsBacklogBytes",
           "ReportsHoldup", "SharedReads", "SourceBatch", "StreamSource"]


@dataclass(frozen=True)
class Gap:
    """Records the stream no longer had and that were skipped by policy (audited)."""

    shard: str | None
    from_sequence: str | None
    to_sequence: str | None
    reason: str


@dataclass(frozen=True)
class Holdup:
    """Records wait in the stream but cannot be read yet, and why: "caught up" would be a lie."""

    reason: str
    oldest_sequence: str | None = None
    oldest_at: datetime | None = None


@dataclass(frozen=True)
class BacklogBytes:
    """How much log a consumer has in front of it and costs the server, in bytes (``ReportsBacklogBytes``).

    Record counts and ages are what DynamoDB users watch; a Postgres replication slot is measured in WAL
    bytes, and bytes are what fill the server's disk. Each figure is None when the source cannot tell.
    """

    #: log written after the acked checkpoint (WAL: ``pg_wal_lsn_diff(current, checkpoint's LSN)``)
    lag_bytes: int | None
    #: log written after what the server was last allowed to free (WAL: the slot's ``confirmed_flush_lsn``)
    unreleased_bytes: int | None
    #: log the server keeps for this consumer: the disk it costs (WAL: from the slot's ``restart_lsn``)
    retained_bytes: int | None
    #: the operator's bound on ``retained_bytes`` (None: no bound)
    max_retained_bytes: int | None = None
    #: why the server gave the retained log up (an invalidated slot); None while it is usable
    lost: str | None = None

    @property
    def over_bound(self) -> bool:
        return (self.max_retained_bytes is not None and self.retained_bytes is not None
                and self.retained_bytes > self.max_retained_bytes)


@dataclass
class SourceBatch:
    shard: str | None
    start_after: str | None
    events: list[ChangeEvent] = field(default_factory=list)
    #: checkpoint once every event is processed (last sequence, or SHARD_END); None = nothing to ack
    next_checkpoint: str | None = None
    shard_ended: bool = False
    gap: Gap | None = None
    #: records still in the stream after this batch, where the source can tell (0 = caught up); None = unknown
    behind: int | None = None

    @property
    def newest_sequence(self) -> str | None:
        return self.events[-1].sequence if self.events else None

    @property
    def extendable(self) -> bool:
        """Can a later read (after ``next_checkpoint``) be appended to this batch? Not after a shard's end,
        a gap, or a position that is not the last event's (a pinned LATEST)."""
        return (not self.shard_ended and self.gap is None
                and self.next_checkpoint == (self.events[-1].sequence if self.events else None))

    def extended(self, more: SourceBatch) -> SourceBatch:
        """This batch followed by ``more`` (read after it): one batch for the handler (a batching window)."""
        return SourceBatch(
            self.shard, self.start_after, [*self.events, *more.events],
            more.next_checkpoint if more.next_checkpoint is not None else self.next_checkpoint,
            more.shard_ended, more.gap, more.behind,
        )

    def after(self, position: str | None) -> SourceBatch | None:
        """This batch from ``position`` on, or None when it does not cover ``position`` (it starts after it, ends
        before it, or has a gap). A batch read from an older position and cut at a newer checkpoint holds every
        record after that checkpoint up to its end, because a read returns consecutive records: a successor that
        read while its predecessor still worked (``SharedReads``) starts from what it read."""
        if position == self.start_after:
            return self
        if position is None or self.start_after is None or self.next_checkpoint is None or self.gap is not None:
            return None
        floor = sort_key(position)
        if not sort_key(self.start_after) <= floor <= sort_key(self.next_checkpoint):
            return None
        return SourceBatch(self.shard, position, [e for e in self.events if sort_key(e.sequence) > floor],
                           self.next_checkpoint, self.shard_ended, None, self.behind)

    def checkpoint_before(self, sequence: str) -> str | None:
        """Checkpoint when the event at ``sequence`` (and all after it) failed: just before it."""
        previous = self.start_after
        for e in self.events:
            if e.sequence == sequence:
                return previous
            previous = e.sequence
        raise KeyError(f"sequence {sequence} is not in this batch")


class StreamSource(Protocol):
    """A stream as the runtime and the sensor see it; ``None`` is the shard of an unsharded stream."""

    @property
    def adapter(self) -> str:
        """The checkpoint key's adapter part (``dynamodb``, ``supabase``)."""

    @property
    def stream(self) -> str:
        """The checkpoint key's stream part (table name, channel)."""

    @property
    def identity(self) -> str | None:
        """The physical stream (the DynamoDB stream label): the sensor refuses to continue a cursor
        written for another one. None when the source has no such notion."""

    def list_shards(self) -> list[str | None]:
        """Every shard the stream has now."""

    def readable(self, acked: Mapping[str | None, str | None]) -> list[str | None]:
        """Of the listed shards (plus checkpointed ones that vanished), those to read now, lineage respected."""

    def has_new(self, shard: str | None, after: str | None) -> bool:
        """Cheap peek: is there anything to read after ``after``?"""

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch: ...

    def close(self) -> None: ...


@runtime_checkable
class ReleasingSource(Protocol):
    """A capability: a source whose server keeps what a consumer has not released (a Postgres replication
    slot keeps the WAL). The runtime flushes the store and calls ``release`` after each ack (and once more, with
    ``final``, as a drain ends and when it closes), with ``durable``: the shard's checkpoint as the store's
    durable part holds it (hybrid: the
    position flushed to Postgres, never a Redis-only one; None: nothing durable, e.g. the memory store).
    The source calls ``durable`` only when it means to release (it may throttle), and never releases past
    what it returns, so that no loss of a checkpoint store leaves the checkpoint behind the server."""

    def release(self, shard: str | None, durable: Callable[[], str | None], *, final: bool = False) -> None: ...


@runtime_checkable
class SharedReads(Protocol):
    """A capability: a second reader may read a shard while its owner does, without disturbing it (DynamoDB
    Streams serves two readers per shard). A successor waiting for a graceful hand-off then follows the shard
    (``consumer/drain.py``'s ``Follower``), so that it holds the records after the owner's last checkpoint when
    the lease arrives and the shard is never unread. Sources whose reads hold something on the server (a
    replication slot has one reader) or are rate-limited per shard across readers (Kinesis: five reads a
    second) do not declare it: their successors read once they hold the lease."""

    shared_reads: bool


@runtime_checkable
class ReportsHoldup(Protocol):
    """A capability: a source that can tell why nothing is readable while records wait (the change feed's
    horizon held back by an open transaction). The sensor and the lag check ask it when a peek finds
    nothing, so that they say what holds the shard instead of "caught up"."""

    def held_back(self, shard: str | None, after: str | None) -> Holdup | None: ...


@runtime_checkable
class ReportsBacklogBytes(Protocol):
    """A capability: a source whose server measures the backlog in bytes of log it keeps (a replication
    slot's WAL). The runtime records it as metrics after acks (at most once a second per shard), the lag
    check and the sensor's observation report it per shard, the audit compares ``retained_bytes`` with the
    bound. ``after`` is the acked checkpoint (None: none yet). One round trip, no side effect."""

    def backlog_bytes(self, shard: str | None, after: str | None) -> BacklogBytes | None: ...


@runtime_checkable
class BoundsRetainedLog(Protocol):
    """A capability of a source's *config*: the server keeps log for the consumer (a replication slot), and
    the operator bounds how much (``max_retained_wal_mb``). The audit opens only such sources (opening a
    DynamoDB source calls AWS) to report what they retain."""

    @property
    def max_retained_bytes(self) -> int: ...
