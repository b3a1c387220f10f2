"""Kinesis on a real moto server, made to behave as AWS does where the reader depends on it.

moto (server mode, the same in-process ``ThreadedMotoServer`` as the DynamoDB tests) serves Kinesis
streams with many shards, ListShards, split and merge. Where it differs from AWS in what the reader
relies on, ``aws_semantics()`` patches moto's models (the server runs in this process, so the patch
reaches the HTTP server; every call still goes through boto3 and HTTP):

* sequence numbers: moto counts 1, 2, 3 per shard; AWS's are 56-digit numbers (up to 129 digits by
  the API). Each shard here starts at a wide base and steps by a non-contiguous stride: shards 0, 2, ...
  use 56 digits, shard 1 crosses from 56 to 57 digits (``"9..." > "1..."`` as text, not as numbers),
  every fourth shard uses 129 digits (the API's maximum);
* a split moves the parent's records into the children and a merge copies them into the child; AWS
  keeps them in the closed parents (read them first, then the children);
* a closed shard read to its end still answers a NextShardIterator; AWS omits it (shard end);
* a write whose key hashes into a closed parent's range lands in the parent; AWS writes to open shards only.

``FaultyKinesisClient`` wraps the real boto3 client for what moto cannot do at all: injected errors
(throttling, an expired checkpoint's InvalidArgumentException) and ListShards pages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import boto3
from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import ClientError

from tests.support.dynamodb import AWS_TEST_ENV, REGION

STRIDE = 10**20 + 7
_serializer = TypeSerializer()


def _base(shard_index: int) -> int:
    if shard_index % 4 == 3:
        return 10**128 + shard_index * 10**100  # 129 digits
    if shard_index == 1:
        return 10**56 - 2 * STRIDE - 1  # 56 digits, then 57
    return 49_590_000 * 10**48 + shard_index * 10**44  # 56 digits


@contextlib.contextmanager
def aws_semantics() -> Iterator[None]:
    """Patch moto's Kinesis models as described in the module docstring, for the ``with`` block."""
    from moto.kinesis import models

    def put_record(self: Any, partition_key: str, data: bytes, explicit_hash_key: str) -> str:
        last = self.get_max_sequence_number() if self.records else _base(self._shard_id) - STRIDE
        sequence = last + STRIDE
        self.records[sequence] = models.Record(partition_key, data, sequence, explicit_hash_key)
        return str(sequence)

    original_split, original_merge = models.Stream.split_shard, models.Stream.merge_shards
    original_get_records = models.KinesisBackend.get_records

    def split_shard(self: Any, shard_to_split: str, new_starting_hash_key: str) -> None:
        shard = self.shards[shard_to_split]
        kept, shard.records = shard.records, OrderedDict()
        try:
            original_split(self, shard_to_split, new_starting_hash_key)
        finally:
            shard.records = kept

    def merge_shards(self: Any, shard_to_merge: str, adjacent_shard_to_merge: str) -> None:
        parents = [self.shards[shard_to_merge], self.shards[adjacent_shard_to_merge]]
        kept = [p.records for p in parents]
        for p in parents:
            p.records = OrderedDict()
        try:
            original_merge(self, shard_to_merge, adjacent_shard_to_merge)
        finally:
            for p, records in zip(parents, kept, strict=True):
                p.records = records

    def get_records(self: Any, stream_arn: str | None, shard_iterator: str, limit: int | None) -> Any:
        nxt, records, behind = original_get_records(self, stream_arn, shard_iterator, limit)
        stream_name, shard_id, _ = models.decompose_shard_iterator(nxt)
        shard = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name).get_shard(shard_id)
        last = int(models.decompose_shard_iterator(nxt)[2])
        if not shard.is_open and last >= shard.get_max_sequence_number():
            nxt = None  # AWS: a closed shard read to its end has no next iterator
        return nxt, records, behind

    original_shard_for_key = models.Stream.get_shard_for_key

    def get_shard_for_key(self: Any, partition_key: str, explicit_hash_key: str) -> Any:
        open_only = {k: v for k, v in self.shards.items() if v.is_open}
        everything, self.shards = self.shards, open_only
        try:
            return original_shard_for_key(self, partition_key, explicit_hash_key)
        finally:
            self.shards = everything

    with mock.patch.object(models.Shard, "put_record", put_record), \
            mock.patch.object(models.Stream, "get_shard_for_key", get_shard_for_key), \
            mock.patch.object(models.Stream, "split_shard", split_shard), \
            mock.patch.object(models.Stream, "merge_shards", merge_shards), \
            mock.patch.object(models.KinesisBackend, "get_records", get_records):
        yield


def kinesis_client(endpoint_url: str, region: str = REGION) -> Any:
    return boto3.client(
        "kinesis", endpoint_url=endpoint_url, region_name=region,
        aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def create_stream(client: Any, shards: int, name: str | None = None) -> str:
    """A new stream with ``shards`` shards; returns its name."""
    name = name or f"k-{uuid.uuid4().hex[:12]}"
    client.create_stream(StreamName=name, ShardCount=shards)
    return name


def change_record(table: str, pk: str, n: int, *, event: str = "INSERT") -> dict[str, Any]:
    """A change in the DynamoDB Kinesis destination's documented JSON format (item ``{pk, n}``)."""
    keys = {"pk": _serializer.serialize(pk)}
    image = {"pk": _serializer.serialize(pk), "n": _serializer.serialize(n)}
    body: dict[str, Any] = {"ApproximateCreationDateTime": 1_700_000_000_000 + n, "Keys": keys, "SizeBytes": 40}
    if event != "REMOVE":
        body["NewImage"] = image
    if event != "INSERT":
        body["OldImage"] = image
    return {
        "awsRegion": REGION, "eventID": uuid.uuid4().hex, "eventName": event, "userIdentity": None,
        "recordFormat": "application/json", "tableName": table, "dynamodb": body, "eventSource": "aws:dynamodb",
    }


def partition_key(pk: str) -> str:
    """What the destination uses as the PartitionKey: a hash of the item's key."""
    return hashlib.md5(json.dumps({"pk": {"S": pk}}, sort_keys=True).encode()).hexdigest().upper()


def put_changes(client: Any, stream: str, changes: list[dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """PutRecords in order (500 a call); returns per shard the ``(sequence, pk)`` written, in order."""
    written: dict[str, list[tuple[str, str]]] = {}
    for start in range(0, len(changes), 500):
        chunk = changes[start:start + 500]
        resp = client.put_records(StreamName=stream, Records=[
            {"Data": json.dumps(c).encode(), "PartitionKey": partition_key(c["dynamodb"]["Keys"]["pk"]["S"])}
            for c in chunk
        ])
        for c, r in zip(chunk, resp["Records"], strict=True):
            written.setdefault(r["ShardId"], []).append((r["SequenceNumber"], c["dynamodb"]["Keys"]["pk"]["S"]))
    return written


def put_raw(client: Any, stream: str, data: bytes, key: str) -> tuple[str, str]:
    """One record of arbitrary bytes; returns ``(shard, sequence)``."""
    r = client.put_record(StreamName=stream, Data=data, PartitionKey=partition_key(key))
    return r["ShardId"], r["SequenceNumber"]


@dataclass
class _Fault:
    operation: str
    code: str
    message: str
    times: int


@dataclass
class FaultyKinesisClient:
    """The real client, plus injected errors (real ``ClientError`` codes) and ListShards pages."""

    real: Any
    list_page_size: int | None = None
    calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._faults: list[_Fault] = []
        self._pages: dict[str, list[dict[str, Any]]] = {}

    def inject(self, operation: str, code: str, *, times: int = 1, message: str = "") -> None:
        self._faults.append(_Fault(operation, code, message or f"injected {code}", times))

    def _enter(self, operation: str) -> None:
        self.calls.append(operation)
        for fault in self._faults:
            if fault.operation == operation and fault.times > 0:
                fault.times -= 1
                status = 500 if code_is_server(fault.code) else 400
                raise self.real.exceptions.from_code(fault.code)(
                    {"Error": {"Code": fault.code, "Message": fault.message},
                     "ResponseMetadata": {"HTTPStatusCode": status}}, operation)

    def list_shards(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("ListShards")
        if self.list_page_size is None:
            return self.real.list_shards(**kwargs)
        token = kwargs.get("NextToken")
        if token is None:
            shards = self.real.list_shards(StreamARN=kwargs["StreamARN"])["Shards"]
            token = uuid.uuid4().hex
            self._pages[token] = shards
        elif "StreamARN" in kwargs or "StreamName" in kwargs:
            raise ClientError({"Error": {"Code": "InvalidArgumentException",
                                         "Message": "NextToken and StreamName cannot be provided together."}},
                              "ListShards")
        rest = self._pages.pop(token)
        page, rest = rest[:self.list_page_size], rest[self.list_page_size:]
        out: dict[str, Any] = {"Shards": page}
        if rest:
            nxt = uuid.uuid4().hex
            self._pages[nxt] = rest
            out["NextToken"] = nxt
        return out

    def get_shard_iterator(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("GetShardIterator")
        return self.real.get_shard_iterator(**kwargs)

    def get_records(self, **kwargs: Any) -> Mapping[str, Any]:
        self._enter("GetRecords")
        return self.real.get_records(**kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "real" or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.real, name)


def code_is_server(code: str) -> bool:
    return code in ("InternalFailure", "InternalServerError", "ServiceUnavailable")
