"""What the consumer needs from a stream, whatever the stream is.

``StreamSource`` hides DynamoDB shards vs. the (unsharded) Supabase change
feed behind three calls: which shards to read now, is there anything new, and
read a batch.  Each source turns its records into ``ChangeEvent``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from durability_pipelines.consumer.config import ConsumerConfig, DynamoDBSourceConfig
from durability_pipelines.consumer.events import ChangeEvent


@dataclass(frozen=True)
class Gap:
    """Records the stream no longer had and that were skipped by policy (audited)."""

    shard: str | None
    from_sequence: str | None
    to_sequence: str | None
    reason: str


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

    def checkpoint_before(self, sequence: str) -> str | None:
        """Checkpoint when the event at ``sequence`` (and all after it) failed: just before it."""
        previous = self.start_after
        for e in self.events:
            if e.sequence == sequence:
                return previous
            previous = e.sequence
        raise KeyError(f"sequence {sequence} is not in this batch")


class StreamSource(Protocol):
    adapter: str
    stream: str
    #: identifies the physical stream (DynamoDB stream label); None when the source has no such notion
    identity: str | None

    def list_shards(self) -> list[str | None]:
        """Every shard the stream has now."""

    def readable(self, acked: Mapping[str | None, str | None]) -> list[str | None]:
        """Of the listed shards (plus checkpointed ones that vanished), those to read now, lineage respected."""

    def has_new(self, shard: str | None, after: str | None) -> bool:
        """Cheap peek: is there anything to read after ``after``?"""

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch: ...

    def close(self) -> None: ...


CallHook = Callable[[str, float], None]


class DynamoDBSource:
    """``StreamSource`` over ``sources.dynamodb.DynamoDBStreamReader``."""

    adapter = "dynamodb"

    def __init__(self, cfg: DynamoDBSourceConfig, *, streams_client: Any = None, dynamodb_client: Any = None,
                 on_call: CallHook | None = None, **_unused: Any) -> None:
        from durability_pipelines.sources.dynamodb import DynamoDBStreamReader, make_clients, resolve_stream

        self.cfg = cfg
        self.stream = cfg.table
        if streams_client is None or dynamodb_client is None:
            import os

            endpoint = os.environ.get("DURABILITY_DYNAMODB_ENDPOINT_URL") or cfg.endpoint_url
            ddb, streams = make_clients(cfg.region, endpoint)
            dynamodb_client = dynamodb_client or ddb
            streams_client = streams_client or streams
        desc = resolve_stream(dynamodb_client, cfg.table)
        self.description = desc
        # LATEST is implemented here, not by the reader: a run process cannot keep a LATEST
        # iterator alive between runs, so the first read pins the position instead.
        self.reader = DynamoDBStreamReader(
            streams_client, desc.stream_arn, trim_policy=cfg.trim_policy,
            initial_position="TRIM_HORIZON", on_call=on_call,
        )

    @property
    def identity(self) -> str:
        """The stream's label: changes when the stream is disabled and re-enabled (a new stream)."""
        return self.description.stream_label

    def list_shards(self) -> list[str | None]:
        self._listed = self.reader.list_shards()
        return [s.shard_id for s in self._listed]

    def readable(self, acked: Mapping[str | None, str | None]) -> list[str | None]:
        listed = getattr(self, "_listed", None) or self.reader.list_shards()
        known = {k: v for k, v in acked.items() if k is not None}
        return [s.shard_id for s in self.reader.readable_shards(listed, known)]

    def has_new(self, shard: str | None, after: str | None) -> bool:
        assert shard is not None
        if after is None and self.cfg.initial_position == "LATEST":
            return True  # the position must be pinned (see read)
        info = self.reader.shard_info(shard)
        if info is not None and info.in_stream and info.closed:
            return True  # a closed shard must be read to its end (then checkpointed SHARD_END)
        # A vanished shard goes through read_batch too: its trim policy decides (fail raises
        # TrimmedDataError, which stops just this shard in the sensor; skip returns the gap).
        batch = self.reader.read_batch(shard, after, 1)
        return bool(batch.records) or batch.gap is not None or batch.shard_ended

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch:
        assert shard is not None
        if after is None and self.cfg.initial_position == "LATEST":
            return self._pin_latest(shard)
        b = self.reader.read_batch(shard, after, max_events)
        events = [
            ChangeEvent(
                adapter="dynamodb", stream=self.stream, shard=shard, sequence=r.sequence,
                event_name=r.event_name, keys=r.keys, new_image=r.new_image, old_image=r.old_image,
                created_at=r.approximate_creation_time, event_id=r.event_id,
            )
            for r in b.records
        ]
        gap = Gap(shard, b.gap.from_sequence, b.gap.to_sequence, b.gap.reason) if b.gap else None
        # DynamoDB Streams cannot count what is left in a shard; it can tell "nothing left" (an empty page).
        behind = 0 if (b.caught_up or b.shard_ended) else None
        return SourceBatch(shard, b.start_after, events, b.next_checkpoint, b.shard_ended, gap, behind)

    def _pin_latest(self, shard: str) -> SourceBatch:
        """Start at LATEST: checkpoint the newest existing record without delivering anything."""
        position: str | None = None
        while True:
            b = self.reader.read_batch(shard, position, 1000)
            if b.next_checkpoint is not None:
                position = b.next_checkpoint
            if b.caught_up or b.shard_ended or not b.records:
                break
        return SourceBatch(shard, None, [], position, position == "SHARD_END", None)

    def close(self) -> None:
        pass


def build_source(config: ConsumerConfig, **kwargs: Any) -> StreamSource:
    if isinstance(config.source, DynamoDBSourceConfig):
        return DynamoDBSource(config.source, **kwargs)
    from durability_pipelines.consumer.supabase_source import build_supabase_source  # issue: supabase feed

    return build_supabase_source(config, **kwargs)
