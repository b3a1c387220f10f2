"""Kinesis Data Streams reader for DynamoDB's "Kinesis Data Streams destination".

A DynamoDB table can stream its item changes to a Kinesis data stream instead of (or besides) its
DynamoDB stream: the same change records as JSON, on as many shards as the Kinesis stream has,
resharded by split and merge, kept up to a year, and with no two-readers-per-shard limit. Plain
Python on a boto3 ``kinesis`` client (no Dagster import).

The reading rules are the DynamoDB Streams reader's (``DynamoDBStreamReader``, whose subclass this
is): positions compared only through ``checkpoints.ordering``, a child shard read only after its
parents (here up to two: a merge has an adjacent parent), trimmed data failing loudly unless
``trim_policy`` says skip, throttling retried with bounded backoff, the next iterator cached so that
a steady poll costs one GetRecords call. What differs lives here: ListShards instead of
DescribeStream, Kinesis' iterator and trim errors, ``MillisBehindLatest`` and the destination's
record format (see ``docs/sources-kinesis.md``).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError

from durability_pipelines.checkpoints.ordering import normalize_sequence
from durability_pipelines.sources.aws_clients import aws_client
from durability_pipelines.sources.dynamodb import (
    ENDPOINT_ENV,
    DynamoDBStreamReader,
    ShardBatch,
    ShardInfo,
    StreamRecord,
    _deserialize,
    _error_code,
    _Position,
    client_region,
    lookup_errors,
)
from durability_pipelines.sources.errors import SequenceNotInShardError, SourceError, StreamNotFoundError

__all__ = [
    "EVENT_NAMES",
    "MAX_RECORDS_PER_CALL",
    "UNDECODABLE",
    "KinesisStream",
    "KinesisStreamReader",
    "decode_change_record",
    "describe_stream",
    "make_client",
]

#: GetRecords returns at most 10,000 records (and 10 MB) per call.
MAX_RECORDS_PER_CALL = 10_000
#: The change kinds the destination writes, plus the name of a record this reader cannot decode.
UNDECODABLE = "UNDECODABLE"
EVENT_NAMES = ("INSERT", "MODIFY", "REMOVE", UNDECODABLE)
_CHANGE_NAMES = frozenset(EVENT_NAMES[:3])
_LIST_PAGE_LIMIT = 1000
#: ``ApproximateCreationDateTime`` is epoch milliseconds, or microseconds when the destination's
#: ApproximateCreationDateTimePrecision is MICROSECOND; anything above this is microseconds (year 5138 in ms).
_MICROSECONDS_ABOVE = 10**14
#: InvalidArgumentException messages that mean "this position belongs to another shard or stream", not "trimmed".
_FOREIGN_MARKERS = ("did not come from this stream", "it encodes shardid", "while it was used in a call to")


@dataclass(frozen=True)
class KinesisStream:
    """The stream as DescribeStreamSummary reports it; ``identity`` tells a recreated stream apart."""

    name: str
    arn: str
    created: datetime
    status: str
    retention_hours: int | None = None

    @property
    def identity(self) -> str:
        """ARN plus creation time: a stream deleted and recreated under the same name is a new stream."""
        return f"{self.arn}@{self.created.astimezone(timezone.utc).isoformat()}"


def make_client(region: str | None, endpoint_url: str | None = None) -> Any:
    """A ``kinesis`` client. The endpoint is ``endpoint_url``, else ``$DURABILITY_DYNAMODB_ENDPOINT_URL``
    (moto serves DynamoDB and Kinesis on one port), else AWS. botocore's own retries are off so that the
    reader's ``BackoffPolicy`` is the single, bounded retry layer (as for DynamoDB Streams)."""
    endpoint = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
    config = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=5, read_timeout=30)
    return aws_client("kinesis", region, endpoint, config, "data")  # once per process (sources/aws_clients.py)


def describe_stream(client: Any, stream_name: str) -> KinesisStream:
    """The stream's ARN and creation time (DescribeStreamSummary), with errors that say what to check."""
    region = client_region(client)
    with lookup_errors(
        f"Kinesis stream {stream_name!r}", region, "DescribeStreamSummary", attempts=1,
        not_found=f"Kinesis stream {stream_name!r} does not exist in {region} (or these credentials "
        f"cannot see it). Check source.stream_name, the region and {ENDPOINT_ENV}; the table's destination is "
        "listed by `aws dynamodb describe-kinesis-streaming-destination --table-name <table>`.",
    ):
        summary = client.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]
    return KinesisStream(
        name=summary.get("StreamName", stream_name),
        arn=summary["StreamARN"],
        created=summary["StreamCreationTimestamp"],
        status=str(summary.get("StreamStatus", "")),
        retention_hours=summary.get("RetentionPeriodHours"),
    )


def _creation_time(value: Any) -> datetime | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    seconds = value / 1_000_000 if value > _MICROSECONDS_ABOVE else value / 1000
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _payload_text(data: bytes) -> str:
    """The record's bytes for a person to read: UTF-8 text, else ``base64:<...>``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode("ascii")


def decode_change_record(shard_id: str, raw: Mapping[str, Any]) -> StreamRecord:
    """One Kinesis record written by the DynamoDB destination, as a ``StreamRecord``.

    A record that is not such a change (not JSON, not the destination's format, undeserializable
    attributes) is never dropped and never stops the shard: it is delivered in its place as an event
    named ``UNDECODABLE`` whose ``new_image`` holds ``payload`` (the record's text) and ``error`` (why),
    so the handler sees it and the consumer's dead-letter policy decides (``bisect`` sets it aside
    alone); the default sink keeps it as a row.
    """
    sequence = normalize_sequence(raw.get("SequenceNumber"), key=shard_id)
    data = raw.get("Data") or b""
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("dynamodb"), dict):
            raise ValueError("not a DynamoDB change record (no 'dynamodb' object)")
        if doc.get("eventName") not in _CHANGE_NAMES:
            raise ValueError(f"eventName {doc.get('eventName')!r} is not INSERT, MODIFY or REMOVE")
        body = doc["dynamodb"]
        keys = _deserialize(body.get("Keys"))
        if not keys:
            raise ValueError("the change has no dynamodb.Keys")
        return StreamRecord(
            shard_id=shard_id,
            sequence=sequence,
            event_id=str(doc.get("eventID", "")),
            event_name=doc["eventName"],
            keys=keys,
            new_image=_deserialize(body.get("NewImage")),
            old_image=_deserialize(body.get("OldImage")),
            approximate_creation_time=_creation_time(body.get("ApproximateCreationDateTime")),
            size_bytes=int(body.get("SizeBytes") or 0),
            raw=doc,
            user_identity=dict(doc["userIdentity"]) if isinstance(doc.get("userIdentity"), dict) else None,
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # json, deserializer and shape errors
        arrived = raw.get("ApproximateArrivalTimestamp")
        return StreamRecord(
            shard_id=shard_id,
            sequence=sequence,
            event_id="",
            event_name=UNDECODABLE,
            keys={},
            new_image={"payload": _payload_text(data), "error": f"{type(exc).__name__}: {exc}",
                       "partition_key": raw.get("PartitionKey")},
            old_image=None,
            approximate_creation_time=arrived if isinstance(arrived, datetime) else None,
            size_bytes=len(data),
            raw={"PartitionKey": raw.get("PartitionKey"), "SequenceNumber": sequence},
        )


def table_of(record: StreamRecord) -> str | None:
    """The table a decoded change came from (``tableName``); None for an undecodable record."""
    name = record.raw.get("tableName") if record.event_name != UNDECODABLE else None
    return str(name) if name else None


class KinesisStreamReader(DynamoDBStreamReader):
    """Reads one Kinesis data stream shard by shard, from checkpoints the caller keeps.

    ``stream_arn`` is the Kinesis stream's ARN (``describe_stream``). Everything the DynamoDB Streams
    reader documents holds; the differences: shards come from ListShards (NextToken pages), a merged
    shard has two parents, a page may be empty while the shard is still behind (caught up means
    ``MillisBehindLatest == 0``), and a checkpoint older than the retention is reported by
    GetShardIterator as an InvalidArgumentException.
    """

    records_per_call_limit = MAX_RECORDS_PER_CALL
    gone_reason = "the shard is no longer in the stream (closed, then aged out of the stream's retention)"
    throttle_advice = (
        "a shard serves 5 GetRecords calls and 2 MB per second to all its readers together, so look for other "
        "consumers of this stream (or use enhanced fan-out for them), poll less often, ask for fewer, larger batches"
    )

    def __init__(self, client: Any, stream_arn: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_records_per_call", MAX_RECORDS_PER_CALL)
        super().__init__(client, stream_arn, **kwargs)
        #: ``arn:aws:kinesis:<region>:<account>:stream/<name>`` -> ``<name>``
        self.stream_name = stream_arn.rpartition(":stream/")[2] or stream_arn

    def list_shards(self) -> list[ShardInfo]:
        """Every shard of the stream (ListShards, following NextToken to the last page)."""
        shards: dict[str, ShardInfo] = {}
        token: str | None = None
        seen: set[str] = set()
        while True:
            # With a NextToken, ListShards must not be given the stream (the token carries it).
            kwargs: dict[str, Any] = (
                {"NextToken": token} if token else {"StreamARN": self.stream_arn}
            )
            kwargs["MaxResults"] = _LIST_PAGE_LIMIT
            try:
                page = self._call("ListShards", "list_shards", None, None, **kwargs)
            except ClientError as exc:
                if _error_code(exc) == "ResourceNotFoundException":
                    raise StreamNotFoundError(
                        f"Kinesis stream {self.stream_arn} does not exist (deleted, or the ARN is wrong). If it was "
                        "recreated, it is a new stream: its checkpoints start over (see docs/sources-kinesis.md)."
                    ) from exc
                if _error_code(exc) == "ExpiredNextTokenException":
                    raise SourceError(
                        f"ListShards of {self.stream_arn}: the NextToken expired (300 s) before the last page was "
                        "read; nothing was changed. Retry; if it persists, the ListShards calls are being throttled."
                    ) from exc
                raise
            for raw in page.get("Shards") or []:
                info = ShardInfo.from_api(raw)
                shards[info.shard_id] = info
            token = page.get("NextToken")
            if not token:
                break
            if token in seen:
                raise SourceError(
                    f"ListShards of {self.stream_arn} returned the same NextToken twice; refusing to loop. Retry."
                )
            seen.add(token)
        self._shards = shards
        return list(shards.values())

    def _decode(self, shard_id: str, raw: Mapping[str, Any]) -> StreamRecord:
        return decode_change_record(shard_id, raw)

    def _caught_up(
        self, resp: Mapping[str, Any], raw_records: Sequence[Any], batch: ShardBatch, limit: int
    ) -> bool:
        """``MillisBehindLatest == 0`` on a page that was not full (records written in the same millisecond
        may follow a full one). An empty page with the shard still behind is not the tip: Kinesis may answer
        empty pages across a stretch with no records, so the loop reads on (bounded by max_calls_per_batch)."""
        behind = resp.get("MillisBehindLatest")
        batch.millis_behind_latest = behind if isinstance(behind, int) else None
        if batch.millis_behind_latest is None:
            return not raw_records
        return batch.millis_behind_latest == 0 and len(raw_records) < limit

    def _is_trimmed(self, exc: ClientError) -> bool:
        """GetShardIterator answers a position that is no longer kept with InvalidArgumentException naming
        the StartingSequenceNumber (a position of another shard or stream raises SequenceNotInShardError)."""
        if _error_code(exc) != "InvalidArgumentException" or exc.operation_name != "GetShardIterator":
            return False
        return "sequencenumber" in str(exc.response.get("Error", {}).get("Message", "")).lower().replace(" ", "")

    def _get_iterator(self, shard_id: str, position: _Position, batch: ShardBatch) -> str | None:
        kind, sequence = position
        # Both names of the stream (AWS accepts either or both; moto's iterators need the name).
        kwargs: dict[str, Any] = {
            "StreamARN": self.stream_arn, "StreamName": self.stream_name, "ShardId": shard_id, "ShardIteratorType": kind,
        }
        if sequence is not None:
            kwargs["StartingSequenceNumber"] = sequence
        try:
            resp = self._call("GetShardIterator", "get_shard_iterator", batch, shard_id, **kwargs)
        except ClientError as exc:
            message = str(exc.response.get("Error", {}).get("Message", ""))
            if _error_code(exc) == "InvalidArgumentException" and any(
                m in message.lower() for m in _FOREIGN_MARKERS
            ):
                raise SequenceNotInShardError(
                    shard_id=shard_id, sequence=sequence or "", stream_arn=self.stream_arn, detail=message
                ) from exc
            raise
        return resp.get("ShardIterator") or None
