"""A real moto server for DynamoDB Streams tests, and a fault-injecting wrapper around the real client.

moto serves one never-splitting shard with contiguous 22-digit sequence numbers, iterators that never
expire, no trimming and no throttling. ``FaultyStreamsClient`` wraps the *real* boto3
``dynamodbstreams`` client talking to that server and adds what moto lacks, using real botocore
``ClientError`` objects with the real error codes:

* a virtual shard topology (``Topology``): moto's single shard is partitioned into generations of
  shards; a generation closes (EndingSequenceNumber, then no NextShardIterator) once the record
  that starts the next one is written, and its children name their parent in ``ParentShardId``.
  Within a generation records go to shards by key hash range, like DynamoDB's own partitions;
* non-contiguous 21-40 digit sequence numbers whose text order differs from numeric order;
* trimming of the oldest records (StartingSequenceNumber moves up, fully trimmed closed shards leave
  the stream, stale positions get TrimmedDataAccessException);
* any error code N times on any operation (``inject``): ExpiredIteratorException mid-batch,
  LimitExceededException / ProvisionedThroughputExceededException, TrimmedDataAccessException...;
* DescribeStream pagination with a small page size (ExclusiveStartShardId / LastEvaluatedShardId).

Record data always comes from the moto server through the real client: the wrapper only relabels
and partitions it.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import boto3
from boto3.dynamodb.types import TypeSerializer
from botocore.exceptions import ClientError

REGION = "us-east-1"
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}
OPERATIONS = ("DescribeStream", "GetShardIterator", "GetRecords")
_serializer = TypeSerializer()


# --------------------------------------------------------------------------- moto server


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A ``ThreadedMotoServer`` on a free port of 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def clients(endpoint_url: str, region: str = REGION) -> tuple[Any, Any]:
    """Plain ``(dynamodb, dynamodbstreams)`` boto3 clients for the moto server (test credentials)."""
    kwargs = {
        "endpoint_url": endpoint_url,
        "region_name": region,
        "aws_access_key_id": AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
    }
    return boto3.client("dynamodb", **kwargs), boto3.client("dynamodbstreams", **kwargs)


def create_stream_table(
    dynamodb: Any, name: str | None = None, *, view_type: str = "NEW_AND_OLD_IMAGES", stream: bool = True
) -> tuple[str, str | None]:
    """Create a table keyed by ``pk`` (string) with a stream; returns ``(table_name, stream_arn)``."""
    name = name or f"t-{uuid.uuid4().hex[:12]}"
    kwargs: dict[str, Any] = {
        "TableName": name,
        "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
        "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
        "BillingMode": "PAY_PER_REQUEST",
    }
    if stream:
        kwargs["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": view_type}
    dynamodb.create_table(**kwargs)
    return name, dynamodb.describe_table(TableName=name)["Table"].get("LatestStreamArn")


def put_items(dynamodb: Any, table: str, items: Iterable[Mapping[str, Any]]) -> int:
    """Write plain-Python items in order, one stream record each; returns how many were written.

    Runs of distinct keys go through BatchWriteItem (25 per call, ~20x faster on moto than PutItem);
    a key repeated within a run starts a new call so the per-key write order is kept.
    """
    written = 0
    chunk: list[dict[str, Any]] = []
    keys: set[str] = set()

    def flush() -> None:
        if chunk:
            dynamodb.batch_write_item(RequestItems={table: [{"PutRequest": {"Item": it}} for it in chunk]})
        chunk.clear()
        keys.clear()

    for item in items:
        encoded = {k: _serializer.serialize(v) for k, v in item.items()}
        pk = json.dumps(encoded["pk"], sort_keys=True)
        if pk in keys or len(chunk) == 25:
            flush()
        chunk.append(encoded)
        keys.add(pk)
        written += 1
    flush()
    return written


def delete_item(dynamodb: Any, table: str, pk: str) -> None:
    dynamodb.delete_item(TableName=table, Key={"pk": {"S": pk}})


# --------------------------------------------------------------------------- sequence numbers


def wide_sequence(index: int, block: int = 3) -> int:
    """A non-contiguous 21-40 digit sequence number for moto's ``index``-th record (strictly increasing).

    The first ``block`` records get 21 digits starting with 9, the next ones 22 digits starting with 1
    (so ``"9..." > "1..."`` as text but not as numbers), then 23, 25, 28, 32, 36 and 40 digits.
    """
    lengths = (21, 22, 23, 25, 28, 32, 36, 40)
    b = min(index // block, len(lengths) - 1)
    length = lengths[b]
    k = index - b * block
    lead = 9 * 10 ** (length - 1) if length == 21 else 10 ** (length - 1)
    return lead + 11 + k * 7_000_000_019 + (k * k) % 1009


@dataclass(frozen=True)
class Topology:
    """Generations of shards carved out of moto's single shard.

    ``shard_counts[g]`` shards in generation ``g`` (each count a multiple of the previous one, so
    every child has exactly one parent); generation ``g + 1`` starts at moto record index
    ``split_at[g]``; generation ``g`` closes (and ``g + 1`` appears) when that record is written.
    ``Topology((1, 2), (10,))``: one parent holding records 0-9, closed once record 10 exists, then
    two children splitting the key space.
    """

    shard_counts: tuple[int, ...] = (1,)
    split_at: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.split_at) != len(self.shard_counts) - 1:
            raise ValueError("split_at needs one index per generation after the first")
        if list(self.split_at) != sorted(set(self.split_at)) or (self.split_at and self.split_at[0] <= 0):
            raise ValueError("split_at must be strictly increasing positive indices")
        for prev, cur in itertools.pairwise(self.shard_counts):
            if cur % prev:
                raise ValueError("each generation's shard count must be a multiple of the previous one")

    @property
    def starts(self) -> tuple[int, ...]:
        return (0, *self.split_at)


@dataclass
class _Fault:
    operation: str
    code: str
    skip: int
    remaining: int
    message: str


@dataclass
class _VIterator:
    shard: tuple[int, int]  # (generation, index in generation)
    position: int  # next moto record index to examine


@dataclass
class CallLog:
    operation: str
    params: dict[str, Any]
    error: str | None = None


@dataclass
class _Shard:
    shard_id: str
    generation: int
    index: int
    parent: str | None


# --------------------------------------------------------------------------- the wrapper


@dataclass
class FaultyStreamsClient:
    """Wraps a real boto3 ``dynamodbstreams`` client (pointed at moto) and injects what moto lacks.

    ``topology=None`` is pass-through: calls go to moto unchanged, only injected faults apply.
    With a topology, the wrapped stream ``stream_arn`` is served as virtual shards; other ARNs pass
    through. ``sequences="wide"`` relabels sequence numbers with ``wide_sequence``; ``"identity"``
    keeps moto's numbers.
    """

    real: Any
    stream_arn: str
    topology: Topology | None = None
    sequences: Literal["wide", "identity"] = "wide"
    describe_page_size: int | None = None
    wide_block: int = 3
    calls: list[CallLog] = field(default_factory=list)
    trimmed: int = 0  # how many of the oldest moto records are trimmed (virtual mode)

    def __post_init__(self) -> None:
        self._faults: list[_Fault] = []
        self._expired: set[str] = set()
        self._records: list[dict[str, Any]] = []
        self._real_shard: str | None = None
        self._base: int | None = None
        self._tail: str | None = None
        self._iterators: dict[str, _VIterator] = {}
        self._scheduled_trims: list[list[Any]] = []

    # ----------------------------------------------------------------- fault control

    def inject(self, operation: str, code: str, *, times: int = 1, after: int = 0, message: str = "") -> None:
        """Raise ``ClientError(code)`` on the next ``times`` calls of ``operation``, after ``after`` more succeed."""
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}")
        self._faults.append(_Fault(operation, code, after, times, message or f"injected {code}"))

    def throttle(
        self,
        operation: str = "GetRecords",
        *,
        times: int = 1,
        after: int = 0,
        code: str = "LimitExceededException",
    ) -> None:
        self.inject(operation, code, times=times, after=after, message="Rate exceeded for shard")

    def expire_iterator(self, *, after: int = 0) -> None:
        """The GetRecords call after ``after`` more successful ones finds its iterator expired (15 min)."""
        self.inject("GetRecords", "ExpiredIteratorException", after=after, message="Iterator expired")

    def expire_all_iterators(self) -> None:
        """Every iterator handed out so far is expired, as if 15 minutes had passed."""
        self._expired.update(self._iterators)

    def schedule_trim(self, count: int, *, operation: str = "GetRecords", after: int = 0) -> None:
        """Trim ``count`` records just before the call of ``operation`` that follows ``after`` more calls.

        Lets retention overtake a reader in the middle of a batch.
        """
        self._require_virtual()
        self._scheduled_trims.append([operation, after, count])

    def trim(self, count: int) -> None:
        """Trim the ``count`` oldest records (moto index order), as 24 h retention would."""
        self._require_virtual()
        self._sync()
        self.trimmed = max(self.trimmed, min(count, len(self._records)))

    @property
    def pending_faults(self) -> int:
        return sum(f.remaining for f in self._faults)

    def calls_of(self, operation: str) -> list[CallLog]:
        return [c for c in self.calls if c.operation == operation]

    # ----------------------------------------------------------------- introspection for oracles

    def sequence_of(self, index: int) -> str:
        """The sequence number clients see for moto's ``index``-th record."""
        self._sync_base()
        return str(self._seq(index))

    def shards(self) -> list[_Shard]:
        """Every visible virtual shard (generation order)."""
        self._require_virtual()
        self._sync()
        return self._visible_shards()

    def expected_sequences(self) -> dict[str, list[str]]:
        """Per virtual shard, every sequence number written to it (trimmed ones included)."""
        self._require_virtual()
        self._sync()
        out: dict[str, list[str]] = {s.shard_id: [] for s in self._all_shards()}
        for i in range(len(self._records)):
            out[self._shard_id(*self._owner(i))].append(str(self._seq(i)))
        return out

    @property
    def record_count(self) -> int:
        self._sync()
        return len(self._records)

    # ----------------------------------------------------------------- boto3 client surface

    def describe_stream(self, **params: Any) -> dict[str, Any]:
        self._enter("DescribeStream", params)
        if not self._virtual(params):
            return self.real.describe_stream(**params)
        self._sync()
        desc = dict(self.real.describe_stream(StreamArn=params["StreamArn"])["StreamDescription"])
        shards = self._visible_shards()
        ids = [s.shard_id for s in shards]
        first = 0
        if params.get("ExclusiveStartShardId"):
            first = bisect.bisect_right(ids, params["ExclusiveStartShardId"])
        size = min(int(params.get("Limit") or 100), self.describe_page_size or 100)
        page = shards[first : first + size]
        desc["Shards"] = [self._describe_shard(s) for s in page]
        desc.pop("LastEvaluatedShardId", None)
        if first + size < len(shards):
            desc["LastEvaluatedShardId"] = page[-1].shard_id
        return {"StreamDescription": desc}

    def get_shard_iterator(self, **params: Any) -> dict[str, Any]:
        self._enter("GetShardIterator", params)
        if not self._virtual(params):
            return self.real.get_shard_iterator(**params)
        self._sync()
        shard = self._find(params["ShardId"], "GetShardIterator")
        gen = shard.generation
        lo, hi = self._bounds(gen)
        horizon = max(lo, self.trimmed)
        kind = params["ShardIteratorType"]
        if kind == "TRIM_HORIZON":
            position = horizon
        elif kind == "LATEST":
            position = hi if self._closed(gen) else max(lo, len(self._records))
        elif kind in ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"):
            seq = int(params["SequenceNumber"])
            if self.trimmed > lo and seq < self._seq(horizon):
                raise self._error(
                    "TrimmedDataAccessException",
                    "GetShardIterator",
                    f"sequence {seq} is older than the trim horizon of {shard.shard_id}",
                )
            count = bisect.bisect_right(range(10**15), seq, key=self._seq)  # indices with seq <= given
            if kind == "AT_SEQUENCE_NUMBER":
                position = count - 1 if count > 0 and self._seq(count - 1) == seq else count
            else:
                position = count
            position = max(lo, position)
        else:
            raise self._error("ValidationException", "GetShardIterator", f"bad ShardIteratorType {kind}")
        token = f"virtual|{shard.shard_id}|{uuid.uuid4().hex}"
        self._iterators[token] = _VIterator((shard.generation, shard.index), position)
        return {"ShardIterator": token}

    def get_records(self, **params: Any) -> dict[str, Any]:
        self._enter("GetRecords", params)
        token = params["ShardIterator"]
        if token in self._expired:
            raise self._error("ExpiredIteratorException", "GetRecords", "Iterator expired")
        if not token.startswith("virtual|"):
            return self.real.get_records(**params)
        state = self._iterators.get(token)
        if state is None:
            raise self._error("ValidationException", "GetRecords", "Invalid ShardIterator")
        limit = int(params.get("Limit") or 1000)
        if not 1 <= limit <= 1000:
            raise self._error("ValidationException", "GetRecords", f"Limit {limit} must be 1..1000")
        self._sync()
        gen, idx = state.shard
        if state.position < self.trimmed:
            raise self._error(
                "TrimmedDataAccessException",
                "GetRecords",
                "the iterator points to records that have been trimmed",
            )
        lo, hi = self._bounds(gen)
        closed = self._closed(gen)
        end = hi if closed else len(self._records)
        out: list[dict[str, Any]] = []
        pos = state.position
        while pos < end and len(out) < limit:
            if self._owner(pos) == (gen, idx):
                out.append(self._relabel(pos))
            pos += 1
        result: dict[str, Any] = {"Records": out}
        if not (closed and pos >= hi):
            nxt = f"virtual|{self._shard_id(gen, idx)}|{uuid.uuid4().hex}"
            self._iterators[nxt] = _VIterator((gen, idx), pos)
            result["NextShardIterator"] = nxt
        return result

    def __getattr__(self, name: str) -> Any:  # meta, exceptions, list_streams, ...
        if name == "real" or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.real, name)

    # ----------------------------------------------------------------- internals

    def _enter(self, operation: str, params: dict[str, Any]) -> None:
        shown = {k: v for k, v in params.items() if k != "ShardIterator"}
        entry = CallLog(operation, shown)
        self.calls.append(entry)
        for scheduled in list(self._scheduled_trims):
            if scheduled[0] != operation:
                continue
            if scheduled[1] > 0:
                scheduled[1] -= 1
                continue
            self._scheduled_trims.remove(scheduled)
            self.trim(scheduled[2])
        for fault in self._faults:
            if fault.operation != operation or fault.remaining <= 0:
                continue
            if fault.skip > 0:
                fault.skip -= 1
                continue
            fault.remaining -= 1
            entry.error = fault.code
            if fault.code == "ExpiredIteratorException" and "ShardIterator" in params:
                self._expired.add(params["ShardIterator"])
            raise self._error(fault.code, operation, fault.message)

    def _error(self, code: str, operation: str, message: str) -> ClientError:
        status = 500 if code in ("InternalServerError", "InternalFailure") else 400
        response = {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": uuid.uuid4().hex},
        }
        cls = self.real.exceptions.from_code(code)
        return cls(response, operation)

    def _virtual(self, params: Mapping[str, Any]) -> bool:
        return self.topology is not None and params.get("StreamArn") == self.stream_arn

    def _require_virtual(self) -> None:
        if self.topology is None:
            raise RuntimeError("this needs a Topology (virtual mode)")

    def _sync_base(self) -> None:
        if self._real_shard is None:
            desc = self.real.describe_stream(StreamArn=self.stream_arn)["StreamDescription"]
            shard = desc["Shards"][0]
            self._real_shard = shard["ShardId"]
            self._base = int(shard["SequenceNumberRange"]["StartingSequenceNumber"])

    def _sync(self) -> None:
        """Append every moto record not seen yet (moto's records never change once written)."""
        if self.topology is None:
            return
        self._sync_base()
        assert self._base is not None
        if self._tail is None:
            self._tail = self.real.get_shard_iterator(
                StreamArn=self.stream_arn, ShardId=self._real_shard, ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
        while True:
            resp = self.real.get_records(ShardIterator=self._tail, Limit=1000)
            self._tail = resp.get("NextShardIterator") or self._tail
            page = resp.get("Records") or []
            for raw in page:
                index = int(raw["dynamodb"]["SequenceNumber"]) - self._base
                if index != len(self._records):
                    raise AssertionError(
                        f"moto record index {index} out of order (have {len(self._records)})"
                    )
                self._records.append(raw)
            if not page:
                return

    def _seq(self, index: int) -> int:
        if self.sequences == "identity":
            assert self._base is not None
            return self._base + index
        return wide_sequence(index, self.wide_block)

    def _bounds(self, gen: int) -> tuple[int, int]:
        assert self.topology is not None
        starts = self.topology.starts
        return starts[gen], (starts[gen + 1] if gen + 1 < len(starts) else 10**15)

    def _closed(self, gen: int) -> bool:
        """A generation closes when the record that starts the next one is written."""
        _, hi = self._bounds(gen)
        return len(self._records) > hi

    def _generation_of(self, index: int) -> int:
        assert self.topology is not None
        return bisect.bisect_right(self.topology.starts, index) - 1

    def _owner(self, index: int) -> tuple[int, int]:
        assert self.topology is not None
        gen = self._generation_of(index)
        keys = self._records[index]["dynamodb"].get("Keys", {})
        h = zlib.crc32(json.dumps(keys, sort_keys=True, default=str).encode())
        return gen, (h * self.topology.shard_counts[gen]) >> 32

    def _shard_id(self, gen: int, idx: int) -> str:
        tag = zlib.crc32(f"{self.stream_arn}|{gen}|{idx}".encode())
        return f"shardId-{1_700_000_000_000 + gen * 1000 + idx:020d}-{tag:08x}"

    def _all_shards(self) -> list[_Shard]:
        assert self.topology is not None
        out = []
        counts = self.topology.shard_counts
        for gen, n in enumerate(counts):
            for idx in range(n):
                parent = None if gen == 0 else self._shard_id(gen - 1, idx // (n // counts[gen - 1]))
                out.append(_Shard(self._shard_id(gen, idx), gen, idx, parent))
        return out

    def _visible_shards(self) -> list[_Shard]:
        out = []
        for shard in self._all_shards():
            lo, hi = self._bounds(shard.generation)
            if shard.generation > 0 and not self._closed(shard.generation - 1):
                continue  # not split yet
            if self._closed(shard.generation) and self.trimmed >= hi:
                continue  # aged out entirely
            out.append(shard)
        return out

    def _find(self, shard_id: str, operation: str) -> _Shard:
        for shard in self._visible_shards():
            if shard.shard_id == shard_id:
                return shard
        raise self._error("ResourceNotFoundException", operation, f"Shard {shard_id} not found")

    def _describe_shard(self, shard: _Shard) -> dict[str, Any]:
        lo, hi = self._bounds(shard.generation)
        rng = {"StartingSequenceNumber": str(self._seq(max(lo, self.trimmed)))}
        if self._closed(shard.generation):
            rng["EndingSequenceNumber"] = str(self._seq(hi - 1))
        out: dict[str, Any] = {"ShardId": shard.shard_id, "SequenceNumberRange": rng}
        if shard.parent:
            out["ParentShardId"] = shard.parent
        return out

    def _relabel(self, index: int) -> dict[str, Any]:
        raw = self._records[index]
        body = dict(raw["dynamodb"], SequenceNumber=str(self._seq(index)))
        return dict(raw, dynamodb=body)
