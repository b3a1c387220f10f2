"""``StreamSource`` over DynamoDB Streams (``sources.dynamodb.DynamoDBStreamReader``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from durability_pipelines.consumer.config import DynamoDBSourceConfig
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.source import CallHook, Gap, SourceBatch
from durability_pipelines.sources.dynamodb import (
    ADAPTER,
    ENDPOINT_ENV,
    DynamoDBStreamReader,
    ShardInfo,
    StreamRecord,
    make_clients,
    resolve_stream,
)


class DynamoDBSource:
    """One table's stream; each shard is a shard of the checkpoint key."""

    adapter = ADAPTER
    #: ``SharedReads``: DynamoDB Streams serves two readers per shard, the owner and a successor following it.
    shared_reads = True

    def __init__(self, cfg: DynamoDBSourceConfig, *, streams_client: Any = None, dynamodb_client: Any = None,
                 on_call: CallHook | None = None) -> None:
        self.cfg = cfg
        self.stream = cfg.table
        if streams_client is None or dynamodb_client is None:
            endpoint = os.environ.get(ENDPOINT_ENV) or cfg.endpoint_url
            ddb, streams = make_clients(cfg.region, endpoint)
            dynamodb_client = dynamodb_client or ddb
            streams_client = streams_client or streams
        desc = resolve_stream(dynamodb_client, cfg.table)
        self.description = desc
        self._listed: list[ShardInfo] | None = None
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
        listed = self._listed or self.reader.list_shards()
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
        events = [self._event(shard, r) for r in b.records if self._wanted(r)]
        gap = Gap(shard, b.gap.from_sequence, b.gap.to_sequence, b.gap.reason) if b.gap else None
        # DynamoDB Streams cannot count what is left in a shard; it can tell "nothing left" (an empty page).
        behind = 0 if (b.caught_up or b.shard_ended) else None
        return SourceBatch(shard, b.start_after, events, b.next_checkpoint, b.shard_ended, gap, behind)

    def _event(self, shard: str, r: StreamRecord) -> ChangeEvent:
        return ChangeEvent(
            adapter=ADAPTER, stream=self.stream, shard=shard, sequence=r.sequence,
            event_name=r.event_name, keys=r.keys, new_image=r.new_image, old_image=r.old_image,
            created_at=r.approximate_creation_time, event_id=r.event_id,
        )

    def _wanted(self, r: StreamRecord) -> bool:
        """Is this record one of the consumed table's changes? (Every record of a DynamoDB stream is.)"""
        return True

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
