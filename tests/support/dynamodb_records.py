"""Helpers over the DynamoDB reader's data types that only tests need (the production path converts
``ChangeEvent``, not ``StreamRecord``)."""

from __future__ import annotations

from typing import Any

from durability_pipelines.consumer.events import json_safe
from durability_pipelines.sources.dynamodb import ADAPTER, ShardBatch, StreamRecord


def record_json(record: StreamRecord) -> dict[str, Any]:
    """A record's JSON-safe form (``raw`` left out), through the one conversion sinks use."""
    return {
        "adapter": ADAPTER,
        "shard_id": record.shard_id,
        "sequence": record.sequence,
        "event_id": record.event_id,
        "event_name": record.event_name,
        "keys": json_safe(record.keys),
        "new_image": json_safe(record.new_image),
        "old_image": json_safe(record.old_image),
        "approximate_creation_time": json_safe(record.approximate_creation_time),
        "size_bytes": record.size_bytes,
        "stream_view_type": record.stream_view_type,
        "user_identity": json_safe(record.user_identity),
    }


def checkpoint_before(batch: ShardBatch, index: int) -> str | None:
    """Checkpoint to store when ``batch.records[index]`` (and everything after it) failed.

    Lambda's partial-batch-failure rule: everything strictly before the first failure is done, so the
    next read starts at the failed record; ``start_after`` for index 0. Never skips the failed record.
    (The runtime applies the same rule to ``SourceBatch.checkpoint_before``.)
    """
    if not 0 <= index <= len(batch.records):
        raise IndexError(f"record index {index} outside the batch of {len(batch.records)}")
    if index == len(batch.records):
        return batch.next_checkpoint if batch.next_checkpoint is not None else batch.start_after
    return batch.records[index - 1].sequence if index > 0 else batch.start_after
