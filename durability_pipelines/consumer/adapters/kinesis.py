"""``StreamSource`` over a table's Kinesis Data Streams destination (``sources.kinesis.KinesisStreamReader``).

The shard rules (lineage, LATEST pinning, closed shards read to their end, trimmed data through
``trim_policy``) are the DynamoDB Streams source's, which this extends: only how the stream is found,
its identity and which records belong to the table differ.
"""

from __future__ import annotations

import os
from typing import Any

from durability_pipelines.consumer.adapters.dynamodb import DynamoDBSource
from durability_pipelines.consumer.config import KinesisSourceConfig
from durability_pipelines.consumer.source import CallHook
from durability_pipelines.sources.dynamodb import ENDPOINT_ENV, ShardInfo, StreamRecord
from durability_pipelines.sources.kinesis import KinesisStreamReader, describe_stream, make_client, table_of


class KinesisSource(DynamoDBSource):
    """One table's changes on a Kinesis data stream; each Kinesis shard is a shard of the checkpoint key.

    Several tables may write to one Kinesis stream: changes of other tables are read past (the
    checkpoint covers them) and never delivered. Undecodable records are delivered (``UNDECODABLE``).
    """

    #: Not ``SharedReads``: a Kinesis shard serves five reads a second across all its readers, which a successor
    #: following its owner would share with it (and with the table's other consumers).
    shared_reads = False

    def __init__(self, cfg: KinesisSourceConfig, *, client: Any = None, on_call: CallHook | None = None) -> None:
        self.cfg = cfg
        self.stream = cfg.table
        if client is None:
            client = make_client(cfg.region, os.environ.get(ENDPOINT_ENV) or cfg.endpoint_url)
        self.kinesis = describe_stream(client, cfg.stream_name)
        self._listed: list[ShardInfo] | None = None
        # LATEST is pinned by the first read (DynamoDBSource._pin_latest), never left to an iterator.
        self.reader = KinesisStreamReader(
            client, self.kinesis.arn, trim_policy=cfg.trim_policy, initial_position="TRIM_HORIZON", on_call=on_call,
        )

    @property
    def identity(self) -> str:
        """The Kinesis stream's ARN and creation time: a deleted and recreated stream is a new stream."""
        return self.kinesis.identity

    def _wanted(self, r: StreamRecord) -> bool:
        table = table_of(r)
        return table is None or table == self.cfg.table
