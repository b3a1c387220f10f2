"""DynamoDB Streams reader against a real moto server, plus ``FaultyStreamsClient`` for what moto lacks.

No AWS mocks besides the wrapper around the real client; no timed assertions (backoff sleeps are
recorded, never slept).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from durability_pipelines.checkpoints.errors import ConfigError, DurabilityError
from durability_pipelines.checkpoints.ordering import SHARD_END, compare_sequences, max_sequence
from durability_pipelines.sources.backoff import BackoffPolicy
from durability_pipelines.sources.dynamodb import (
    DynamoDBStreamReader,
    ShardBatch,
    StreamRecord,
    TrimGap,
    make_clients,
    resolve_stream,
)
from durability_pipelines.sources.errors import (
    SequenceOutOfRangeError,
    StreamChangedError,
    StreamNotFoundError,
    StreamUnavailableError,
    ThrottledError,
    TrimmedDataError,
)
from tests.support.dynamodb import (
    AWS_TEST_ENV,
    FaultyStreamsClient,
    Topology,
    clients,
    create_stream_table,
    delete_item,
    moto_server,
    put_items,
    wide_sequence,
)
from tests.support.dynamodb_records import checkpoint_before, record_json


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_TEST_ENV.items():
            mp.setenv(name, value)
        with moto_server() as url:
            yield url


@pytest.fixture
def aws(moto_url: str) -> SimpleNamespace:
    ddb, streams = clients(moto_url)
    return SimpleNamespace(url=moto_url, ddb=ddb, streams=streams)


@pytest.fixture
def table(aws: SimpleNamespace) -> SimpleNamespace:
    name, arn = create_stream_table(aws.ddb)
    assert arn
    return SimpleNamespace(name=name, arn=arn)


class Sleeps(list):
    """Injected ``sleep``: records the delays instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def no_wait(max_attempts: int = 5, sleeps: Sleeps | None = None) -> BackoffPolicy:
    return BackoffPolicy(
        max_attempts=max_attempts,
        base_delay_s=0.1,
        max_delay_s=0.25,
        sleep=sleeps if sleeps is not None else Sleeps(),
        random=lambda: 1.0,
    )


def items(n: int, start: int = 0, **extra: Any) -> list[dict[str, Any]]:
    return [{"pk": f"k{i:04d}", "n": i, **extra} for i in range(start, start + n)]


def only_shard(reader: DynamoDBStreamReader) -> str:
    shards = reader.list_shards()
    assert len(shards) == 1
    return shards[0].shard_id


def drain(
    reader: DynamoDBStreamReader, shard_id: str, after: str | None, max_events: int = 1000
) -> tuple[list[StreamRecord], str | None, ShardBatch]:
    """Read and 'ack' batches until caught up or the shard ends; returns records and the final checkpoint."""
    out: list[StreamRecord] = []
    while True:
        batch = reader.read_batch(shard_id, after, max_events)
        out.extend(batch.records)
        if batch.next_checkpoint is not None:
            after = batch.next_checkpoint
        if batch.caught_up or batch.shard_ended or not batch.records:
            return out, after, batch


def strictly_increasing(seqs: list[str]) -> bool:
    return all(compare_sequences(a, b) < 0 for a, b in itertools.pairwise(seqs))


# --------------------------------------------------------------------------- happy path


def test_happy_path_reads_every_record_once_in_order_and_checkpoints(aws, table) -> None:
    put_items(aws.ddb, table.name, items(25, price=Decimal("9.99")))
    put_items(aws.ddb, table.name, [{"pk": "k0000", "n": 100}])  # MODIFY
    delete_item(aws.ddb, table.name, "k0001")  # REMOVE
    calls: list[tuple[str, float]] = []
    reader = DynamoDBStreamReader(aws.streams, table.arn, on_call=lambda op, ms: calls.append((op, ms)))
    shard = only_shard(reader)

    seen: list[StreamRecord] = []
    checkpoint: str | None = None
    for _ in range(3):
        batch = reader.read_batch(shard, checkpoint, max_events=10)
        assert batch.start_after == checkpoint
        assert batch.next_checkpoint == batch.records[-1].sequence
        seen.extend(batch.records)
        checkpoint = batch.next_checkpoint  # ack
    final = reader.read_batch(shard, checkpoint, max_events=10)
    assert final.records == [] and final.caught_up and final.next_checkpoint is None and not final.shard_ended

    assert len(seen) == 27 and len({r.sequence for r in seen}) == 27
    assert strictly_increasing([r.sequence for r in seen])
    assert [r.keys["pk"] for r in seen[:25]] == [f"k{i:04d}" for i in range(25)]
    assert [r.event_name for r in seen[-3:]] == ["INSERT", "MODIFY", "REMOVE"]
    modify, remove = seen[-2], seen[-1]
    assert modify.old_image == {"pk": "k0000", "n": Decimal(0), "price": Decimal("9.99")}
    assert modify.new_image == {"pk": "k0000", "n": Decimal(100)}
    assert remove.new_image is None and remove.old_image["pk"] == "k0001"
    doc = json.loads(json.dumps(record_json(modify)))
    assert doc["old_image"] == {"pk": "k0000", "n": 0, "price": "9.99"} and doc["sequence"] == modify.sequence
    assert {op for op, _ in calls} == {"DescribeStream", "GetShardIterator", "GetRecords"}
    assert all(ms >= 0 for _, ms in calls)


def test_json_form_makes_every_dynamodb_type_json_safe() -> None:
    raw = {
        "eventID": "e1",
        "eventName": "INSERT",
        "dynamodb": {
            "SequenceNumber": "000123",
            "SizeBytes": 10,
            "Keys": {"pk": {"S": "a"}},
            "NewImage": {
                "pk": {"S": "a"},
                "big": {"N": "123456789012345678901234567890"},
                "frac": {"N": "0.1"},
                "blob": {"B": b"\x00\xff"},
                "tags": {"SS": ["b", "a"]},
                "nums": {"NS": ["3", "1.5"]},
                "m": {"M": {"ok": {"BOOL": True}, "none": {"NULL": True}, "l": {"L": [{"N": "1"}]}}},
            },
        },
    }
    record = StreamRecord.from_raw("shard-1", raw)
    assert record.sequence == "123"  # canonical form
    doc = json.loads(json.dumps(record_json(record)))
    assert doc["new_image"] == {
        "pk": "a",
        "big": 123456789012345678901234567890,
        "frac": "0.1",
        "blob": "AP8=",
        "tags": ["a", "b"],
        "nums": ["1.5", 3],
        "m": {"ok": True, "none": None, "l": [1]},
    }
    assert doc["old_image"] is None and doc["approximate_creation_time"] is None


def test_max_events_is_respected_and_limit_never_exceeds_1000(aws, table) -> None:
    put_items(aws.ddb, table.name, items(12))
    client = FaultyStreamsClient(aws.streams, table.arn)  # pass-through, records the calls
    reader = DynamoDBStreamReader(client, table.arn, max_records_per_call=4)
    shard = only_shard(reader)
    batch = reader.read_batch(shard, None, max_events=10)
    assert len(batch.records) == 10 and not batch.caught_up
    assert [c.params["Limit"] for c in client.calls_of("GetRecords")] == [4, 4, 2]

    big = DynamoDBStreamReader(client, table.arn)
    big.read_batch(shard, None, max_events=5000)
    assert max(c.params["Limit"] for c in client.calls_of("GetRecords")) == 1000
    with pytest.raises(ConfigError, match="1..1000"):
        DynamoDBStreamReader(client, table.arn, max_records_per_call=1001)


def test_max_calls_per_batch_bounds_one_batch(aws, table) -> None:
    put_items(aws.ddb, table.name, items(9))
    client = FaultyStreamsClient(aws.streams, table.arn)
    reader = DynamoDBStreamReader(client, table.arn, max_records_per_call=2, max_calls_per_batch=3)
    batch = reader.read_batch(only_shard(reader), None, max_events=100)
    assert (
        batch.calls == 3 and len(batch.records) == 6 and batch.next_checkpoint == batch.records[-1].sequence
    )


# --------------------------------------------------------------------------- shards and lineage


def test_list_shards_follows_describe_stream_pagination_to_every_shard(aws, table) -> None:
    put_items(aws.ddb, table.name, items(10))
    client = FaultyStreamsClient(
        aws.streams, table.arn, topology=Topology((1, 2, 4, 8), (2, 4, 6)), describe_page_size=2
    )
    reader = DynamoDBStreamReader(client, table.arn)
    shards = reader.list_shards()
    assert [s.shard_id for s in shards] == [s.shard_id for s in client.shards()]
    assert len(shards) == 15 and len({s.shard_id for s in shards}) == 15
    describes = client.calls_of("DescribeStream")
    assert len(describes) == 8  # 15 shards, 2 per page
    assert "ExclusiveStartShardId" not in describes[0].params
    assert [d.params["ExclusiveStartShardId"] for d in describes[1:]] == [
        shards[i].shard_id for i in range(1, 15, 2)
    ]
    # Only the root is readable before anything is processed.
    assert [s.shard_id for s in reader.readable_shards(shards, {})] == [shards[0].shard_id]


def test_child_is_not_readable_until_parent_checkpoint_is_shard_end(aws, table) -> None:
    client = FaultyStreamsClient(aws.streams, table.arn, topology=Topology((1, 2), (6,)))
    reader = DynamoDBStreamReader(client, table.arn)
    put_items(aws.ddb, table.name, items(4))
    (parent,) = reader.list_shards()
    assert not parent.closed
    first = reader.read_batch(parent.shard_id, None, 100)  # open shard read to its tail
    assert len(first.records) == 4 and first.caught_up and first.next_checkpoint == first.records[-1].sequence

    put_items(aws.ddb, table.name, items(12, start=4))  # record 6 splits the shard
    shards = reader.list_shards()
    parent = shards[0]
    children = shards[1:]
    assert parent.closed and len(children) == 2
    assert {c.parent_shard_id for c in children} == {parent.shard_id}
    checkpoints: dict[str, str | None] = {parent.shard_id: first.next_checkpoint}
    assert [s.shard_id for s in reader.readable_shards(shards, checkpoints)] == [parent.shard_id]

    rest = reader.read_batch(parent.shard_id, first.next_checkpoint, 100)
    assert [r.keys["pk"] for r in rest.records] == ["k0004", "k0005"]
    assert rest.shard_ended and rest.next_checkpoint == SHARD_END
    # The last record is acked but not SHARD_END yet: the children still wait ...
    checkpoints[parent.shard_id] = rest.records[-1].sequence
    assert [s.shard_id for s in reader.readable_shards(shards, checkpoints)] == [parent.shard_id]
    # ... and reading after the shard's last sequence just reports the end.
    again = reader.read_batch(parent.shard_id, rest.records[-1].sequence, 100)
    assert again.records == [] and again.shard_ended and again.next_checkpoint == SHARD_END
    checkpoints[parent.shard_id] = SHARD_END
    assert [s.shard_id for s in reader.readable_shards(shards, checkpoints)] == [c.shard_id for c in children]
    done = reader.read_batch(parent.shard_id, SHARD_END, 100)
    assert done.records == [] and done.shard_ended and done.next_checkpoint is None

    child_records = [r for c in children for r in drain(reader, c.shard_id, None)[0]]
    assert sorted(r.keys["pk"] for r in child_records) == [f"k{i:04d}" for i in range(6, 16)]
    with pytest.raises(SequenceOutOfRangeError, match="beyond the shard's EndingSequenceNumber"):
        reader.read_batch(parent.shard_id, str(int(parent.ending_sequence) + 1), 10)


def test_closed_shard_read_to_its_end_without_new_records_checkpoints_shard_end(aws, table) -> None:
    client = FaultyStreamsClient(aws.streams, table.arn, topology=Topology((2, 4), (8,)))
    reader = DynamoDBStreamReader(client, table.arn)
    put_items(aws.ddb, table.name, items(8))
    roots = reader.list_shards()
    acked = {s.shard_id: drain(reader, s.shard_id, None)[1] for s in roots}
    put_items(aws.ddb, table.name, items(4, start=8))  # closes both roots
    roots = reader.list_shards()[:2]
    assert all(r.closed for r in roots)
    calls = []
    for root in roots:
        batch = reader.read_batch(root.shard_id, acked[root.shard_id], 100)
        assert batch.records == [] and batch.shard_ended and batch.next_checkpoint == SHARD_END
        calls.append(batch.calls)
    # The root holding the generation's last record is recognised by its EndingSequenceNumber (no call);
    # the other learns it from a GetRecords answer without NextShardIterator.
    assert sorted(calls) == [0, 1]


# --------------------------------------------------------------------------- sequence numbers


def test_non_contiguous_21_to_40_digit_sequences_are_ordered_numerically(aws, table) -> None:
    put_items(aws.ddb, table.name, items(26))
    client = FaultyStreamsClient(aws.streams, table.arn, topology=Topology(), sequences="wide")
    reader = DynamoDBStreamReader(client, table.arn)
    shard = only_shard(reader)
    seen, checkpoint, _ = [], None, None
    while True:
        batch = reader.read_batch(shard, checkpoint, max_events=7)
        if not batch.records:
            break
        seen.extend(batch.records)
        checkpoint = batch.next_checkpoint
    seqs = [r.sequence for r in seen]
    assert [r.keys["pk"] for r in seen] == [f"k{i:04d}" for i in range(26)]
    assert {len(s) for s in seqs} >= {21, 22, 40}
    assert strictly_increasing(seqs)
    assert sorted(seqs) != seqs  # text order would misplace them: "9..." (21 digits) > "1..." (22 digits)
    assert max_sequence(*seqs) == seqs[-1]
    # Resuming after a 21-digit checkpoint yields the 22-digit successor, not a lexical neighbour.
    resumed = reader.read_batch(shard, seqs[2], max_events=1)
    assert len(seqs[2]) == 21 and resumed.records[0].sequence == seqs[3] == str(wide_sequence(3))


# --------------------------------------------------------------------------- expired iterators


def test_expired_iterator_mid_batch_neither_rereads_nor_skips(aws, table) -> None:
    put_items(aws.ddb, table.name, items(12))
    client = FaultyStreamsClient(aws.streams, table.arn)  # real moto iterators
    client.expire_iterator(after=2)  # the 3rd GetRecords of the batch finds its iterator expired
    reader = DynamoDBStreamReader(client, table.arn, max_records_per_call=3)
    shard = only_shard(reader)
    batch = reader.read_batch(shard, None, max_events=12)
    pks = [r.keys["pk"] for r in batch.records]
    assert pks == [f"k{i:04d}" for i in range(12)]  # each once, in order
    assert batch.expired_iterators == 1
    iterators = client.calls_of("GetShardIterator")
    assert [c.params["ShardIteratorType"] for c in iterators] == ["TRIM_HORIZON", "AFTER_SEQUENCE_NUMBER"]
    assert iterators[1].params["SequenceNumber"] == batch.records[5].sequence  # right after the last read


def test_expired_iterator_before_any_record_reopens_at_the_checkpoint(aws, table) -> None:
    put_items(aws.ddb, table.name, items(6))
    client = FaultyStreamsClient(aws.streams, table.arn, topology=Topology(), sequences="wide")
    reader = DynamoDBStreamReader(client, table.arn)
    shard = only_shard(reader)
    checkpoint = reader.read_batch(shard, None, max_events=2).next_checkpoint
    client.expire_iterator()
    # the next batch goes on with the first batch's NextShardIterator, which has expired meanwhile
    batch = reader.read_batch(shard, checkpoint, max_events=100)
    assert [r.keys["pk"] for r in batch.records] == [f"k{i:04d}" for i in range(2, 6)]
    assert batch.expired_iterators == 1
    opened = client.calls_of("GetShardIterator")
    assert [c.params["ShardIteratorType"] for c in opened] == ["TRIM_HORIZON", "AFTER_SEQUENCE_NUMBER"]
    assert opened[-1].params["SequenceNumber"] == checkpoint  # reopened right at the checkpoint
    # a fresh reader (a new run) opens its own iterator at the checkpoint
    fresh = DynamoDBStreamReader(client, table.arn)
    assert [r.keys["pk"] for r in fresh.read_batch(shard, checkpoint, max_events=100).records] == [
        f"k{i:04d}" for i in range(2, 6)]
    assert client.calls_of("GetShardIterator")[-1].params["SequenceNumber"] == checkpoint


def test_consecutive_batches_continue_one_iterator(aws, table) -> None:
    put_items(aws.ddb, table.name, items(9))
    client = FaultyStreamsClient(aws.streams, table.arn, topology=Topology(), sequences="wide")
    reader = DynamoDBStreamReader(client, table.arn)
    shard = only_shard(reader)
    position, seen = None, []
    for _ in range(4):
        batch = reader.read_batch(shard, position, max_events=3)
        seen += [r.keys["pk"] for r in batch.records]
        position = batch.next_checkpoint or position
    assert seen == [f"k{i:04d}" for i in range(9)]
    assert len(client.calls_of("GetShardIterator")) == 1  # one iterator for the whole drain
    # a read from another position than where the last one ended opens an iterator of its own
    assert [r.keys["pk"] for r in reader.read_batch(shard, None, max_events=2).records] == ["k0000", "k0001"]
    assert len(client.calls_of("GetShardIterator")) == 2


# --------------------------------------------------------------------------- trimmed data


def _trimmed_setup(
    aws, table, policy: str
) -> tuple[FaultyStreamsClient, DynamoDBStreamReader, str, list[str]]:
    put_items(aws.ddb, table.name, items(10))
    client = FaultyStreamsClient(aws.streams, table.arn, topology=Topology(), sequences="wide")
    reader = DynamoDBStreamReader(client, table.arn, trim_policy=policy)  # type: ignore[arg-type]
    shard = only_shard(reader)
    seqs = [client.sequence_of(i) for i in range(10)]
    assert reader.read_batch(shard, None, max_events=3).next_checkpoint == seqs[2]
    client.trim(6)  # records 0-5 age out: 3, 4 and 5 were never processed
    return client, reader, shard, seqs


def test_trimmed_data_fail_policy_raises_naming_shard_and_missing_range(aws, table) -> None:
    client, reader, shard, seqs = _trimmed_setup(aws, table, "fail")
    with pytest.raises(TrimmedDataError) as err:
        reader.read_batch(shard, seqs[2], max_events=100)  # cached range is stale: AWS's error path
    assert (err.value.shard_id, err.value.from_sequence, err.value.to_sequence) == (shard, seqs[2], seqs[6])
    assert shard in str(err.value) and seqs[2] in str(err.value) and seqs[6] in str(err.value)
    assert "TrimmedDataAccessException" in err.value.reason
    assert isinstance(err.value, DurabilityError)

    fresh = DynamoDBStreamReader(client, table.arn)  # knows the new StartingSequenceNumber: pre-check path
    with pytest.raises(TrimmedDataError) as err2:
        fresh.read_batch(shard, seqs[2], max_events=100)
    assert (err2.value.from_sequence, err2.value.to_sequence) == (seqs[2], seqs[6])
    # Nothing was read past the trim: the caller's checkpoint did not move.
    assert fresh.read_batch(shard, seqs[6], max_events=100).records[0].sequence == seqs[7]


def test_trimmed_data_skip_policy_continues_at_trim_horizon_and_returns_gap(aws, table) -> None:
    _client, reader, shard, seqs = _trimmed_setup(aws, table, "skip_to_trim_horizon")
    batch = reader.read_batch(shard, seqs[2], max_events=100)
    assert batch.gap is not None
    assert (batch.gap.shard_id, batch.gap.from_sequence, batch.gap.to_sequence) == (shard, seqs[2], seqs[6])
    assert [r.sequence for r in batch.records] == seqs[6:]
    assert batch.next_checkpoint == seqs[9]
    assert json.loads(json.dumps(dataclasses.asdict(batch.gap)))["to_sequence"] == seqs[6]


def test_trimmed_data_access_exception_mid_batch_under_both_policies(aws, table) -> None:
    put_items(aws.ddb, table.name, items(6))
    client = FaultyStreamsClient(aws.streams, table.arn)
    client.inject("GetRecords", "TrimmedDataAccessException", after=1)
    reader = DynamoDBStreamReader(client, table.arn, max_records_per_call=2)
    shard = only_shard(reader)
    with pytest.raises(TrimmedDataError) as err:
        reader.read_batch(shard, None, max_events=100)
    assert err.value.shard_id == shard and err.value.from_sequence is None

    # moto did not really trim, so TRIM_HORIZON is behind what was read: the skip must not re-deliver.
    client.inject("GetRecords", "TrimmedDataAccessException", after=1)
    skip = DynamoDBStreamReader(client, table.arn, max_records_per_call=2, trim_policy="skip_to_trim_horizon")
    batch = skip.read_batch(shard, None, max_events=100)
    assert [r.keys["pk"] for r in batch.records] == [f"k{i:04d}" for i in range(6)]
    assert batch.duplicates_dropped == 2
    seqs = [r.sequence for r in batch.records]
    assert batch.gap == TrimGap(shard, seqs[1], seqs[2], batch.gap.reason)
    assert "TrimmedDataAccessException" in batch.gap.reason
    assert [c.params["ShardIteratorType"] for c in client.calls_of("GetShardIterator")][-1] == "TRIM_HORIZON"


def test_retention_overtaking_a_batch_mid_read_leaves_a_gap_between_records(aws, table) -> None:
    put_items(aws.ddb, table.name, items(10))
    client = FaultyStreamsClient(aws.streams, table.arn, topology=Topology(), sequences="wide")
    seqs = [client.sequence_of(i) for i in range(10)]
    skip = DynamoDBStreamReader(client, table.arn, max_records_per_call=2, trim_policy="skip_to_trim_horizon")
    shard = only_shard(skip)
    client.schedule_trim(6, after=1)  # records 0-5 age out before the batch's 2nd GetRecords
    batch = skip.read_batch(shard, None, max_events=100)
    assert [r.sequence for r in batch.records] == seqs[:2] + seqs[6:]
    assert batch.gap == TrimGap(shard, seqs[1], seqs[6], batch.gap.reason)
    assert batch.next_checkpoint == seqs[9] and batch.duplicates_dropped == 0

    # Under "fail" the batch is abandoned and the error starts at the acked checkpoint, not mid-batch.
    fail = DynamoDBStreamReader(client, table.arn, max_records_per_call=1)
    client.schedule_trim(9, after=1)  # seqs[7] is read, then retention passes seqs[8]
    with pytest.raises(TrimmedDataError) as err:
        fail.read_batch(shard, seqs[6], max_events=100)
    assert (err.value.from_sequence, err.value.to_sequence) == (seqs[6], seqs[9])


def test_shard_aged_out_with_a_checkpoint_reports_the_loss_and_frees_its_children(aws, table) -> None:
    put_items(aws.ddb, table.name, items(10))
    client = FaultyStreamsClient(aws.streams, table.arn, topology=Topology((1, 2), (4,)))
    reader = DynamoDBStreamReader(client, table.arn)
    parent = reader.list_shards()[0]
    acked = reader.read_batch(parent.shard_id, None, max_events=2).next_checkpoint
    client.trim(6)  # the whole parent generation (records 0-3) ages out
    shards = reader.list_shards()
    assert parent.shard_id not in {s.shard_id for s in shards} and len(shards) == 2
    readable = reader.readable_shards(shards, {parent.shard_id: acked})
    assert [(s.shard_id, s.in_stream) for s in readable] == [(parent.shard_id, False)] + [
        (s.shard_id, True) for s in shards
    ]
    with pytest.raises(TrimmedDataError, match="no longer in the stream") as err:
        reader.read_batch(parent.shard_id, acked, 100)
    assert err.value.from_sequence == acked and err.value.to_sequence is None

    skip = DynamoDBStreamReader(client, table.arn, trim_policy="skip_to_trim_horizon")
    batch = skip.read_batch(parent.shard_id, acked, 100)
    assert batch.shard_ended and batch.next_checkpoint == SHARD_END and batch.records == []
    assert batch.gap == TrimGap(parent.shard_id, acked, None, batch.gap.reason)


# --------------------------------------------------------------------------- throttling


@pytest.mark.parametrize("code", ["LimitExceededException", "ProvisionedThroughputExceededException"])
def test_throttling_is_retried_with_backoff_then_succeeds(aws, table, code: str) -> None:
    put_items(aws.ddb, table.name, items(3))
    client = FaultyStreamsClient(aws.streams, table.arn)
    client.throttle("DescribeStream", times=1, code=code)
    client.throttle("GetRecords", times=2, code=code)
    sleeps = Sleeps()
    calls: list[str] = []
    reader = DynamoDBStreamReader(
        client, table.arn, backoff=no_wait(4, sleeps), on_call=lambda op, _ms: calls.append(op)
    )
    batch = reader.read_batch(only_shard(reader), None, max_events=10)
    assert len(batch.records) == 3 and batch.retries == 2
    assert sleeps == [0.1, 0.1, 0.2]  # describe retry, then GetRecords retries 1 and 2 (exponential)
    assert calls.count("GetRecords") == 3  # 2 throttled + 1 ok (3 of 10: the tip); every attempt reported
    assert client.pending_faults == 0


def test_throttling_exhausted_raises_throttled_error(aws, table) -> None:
    put_items(aws.ddb, table.name, items(3))
    client = FaultyStreamsClient(aws.streams, table.arn)
    sleeps = Sleeps()
    reader = DynamoDBStreamReader(client, table.arn, backoff=no_wait(3, sleeps))
    shard = only_shard(reader)
    client.throttle("GetRecords", times=10)
    with pytest.raises(ThrottledError) as err:
        reader.read_batch(shard, None, max_events=10)
    assert (err.value.operation, err.value.attempts, err.value.code) == (
        "GetRecords",
        3,
        "LimitExceededException",
    )
    assert shard in str(err.value) and "backoff exhausted" in str(err.value)
    assert len(client.calls_of("GetRecords")) == 3 and len(sleeps) == 2


def test_server_errors_are_retried_then_reported_as_stream_unavailable(aws, table) -> None:
    put_items(aws.ddb, table.name, items(2))
    client = FaultyStreamsClient(aws.streams, table.arn)
    reader = DynamoDBStreamReader(client, table.arn, backoff=no_wait(3))
    shard = only_shard(reader)
    client.inject("GetShardIterator", "InternalServerError", times=2)
    assert len(reader.read_batch(shard, None, 10).records) == 2
    client.inject("GetShardIterator", "InternalServerError", times=3)
    with pytest.raises(StreamUnavailableError, match="GetShardIterator on shard") as err:
        reader.read_batch(shard, None, 10)
    assert err.value.attempts == 3 and isinstance(err.value, DurabilityError)


def test_backoff_policy_is_bounded_exponential_with_full_jitter() -> None:
    exact = BackoffPolicy(max_attempts=6, base_delay_s=0.1, max_delay_s=1.0, jitter=False)
    assert list(exact.delays()) == [0.1, 0.2, 0.4, 0.8, 1.0]
    jittered = BackoffPolicy(max_attempts=4, base_delay_s=0.1, max_delay_s=1.0, random=lambda: 0.5)
    assert list(jittered.delays()) == [0.05, 0.1, 0.2]
    assert BackoffPolicy(base_delay_s=1, max_delay_s=2, random=lambda: 1.0).delay(10_000) == 2
    sleeps = Sleeps()
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise TimeoutError("transient")
        return "ok"

    policy = BackoffPolicy(max_attempts=3, sleep=sleeps, random=lambda: 0.0)
    assert policy.call(flaky, is_retryable=lambda e: isinstance(e, TimeoutError)) == "ok" and len(sleeps) == 2
    with pytest.raises(KeyError):  # not retryable: raised at once
        policy.call(lambda: {}["x"], is_retryable=lambda e: isinstance(e, TimeoutError))
    with pytest.raises(ConfigError):
        BackoffPolicy(max_attempts=0)


# --------------------------------------------------------------------------- start positions


def test_start_positions_trim_horizon_latest_and_at_sequence_number(aws, table) -> None:
    put_items(aws.ddb, table.name, items(5))
    horizon = DynamoDBStreamReader(aws.streams, table.arn)
    shard = only_shard(horizon)
    everything = horizon.read_batch(shard, None, 100).records
    seqs = [r.sequence for r in everything]
    assert len(seqs) == 5

    latest = DynamoDBStreamReader(aws.streams, table.arn, initial_position="LATEST")
    batch = latest.read_batch(shard, None, 100)
    assert batch.records == [] and batch.caught_up and batch.next_checkpoint is None

    replay = horizon.read_batch(shard, seqs[4], 100, at=seqs[2])  # AT wins over the checkpoint
    assert [r.sequence for r in replay.records] == seqs[2:] and replay.start_at == seqs[2]
    after = horizon.read_batch(shard, seqs[2], 100)
    assert [r.sequence for r in after.records] == seqs[3:]
    # A stored initial-position sentinel behaves like the position it names.
    assert [r.sequence for r in horizon.read_batch(shard, "TRIM_HORIZON", 100).records] == seqs
    assert latest.read_batch(shard, "LATEST", 100).records == []


# --------------------------------------------------------------------------- stream identity


def test_stream_re_enabled_under_a_new_label_is_detected_never_continued(aws) -> None:
    name, old_arn = create_stream_table(aws.ddb)
    old = resolve_stream(aws.ddb, name)
    assert (old.stream_arn, old.status, old.view_type) == (old_arn, "ENABLED", "NEW_AND_OLD_IMAGES")
    assert resolve_stream(aws.ddb, name, expected_label=old.stream_label) == old

    # moto cannot re-enable a stream in place; recreating the table gives it a new stream label too.
    aws.ddb.delete_table(TableName=name)
    create_stream_table(aws.ddb, name)
    with pytest.raises(StreamChangedError) as err:
        resolve_stream(aws.ddb, name, expected_label=old.stream_label)
    new = resolve_stream(aws.ddb, name)
    assert new.stream_label != old.stream_label
    assert (err.value.expected_label, err.value.actual_label) == (old.stream_label, new.stream_label)
    assert old.stream_label in str(err.value) and new.stream_label in str(err.value)
    # A reader still holding the old ARN refuses the stream that now answers for it.
    with pytest.raises(StreamChangedError):
        DynamoDBStreamReader(aws.streams, old_arn).list_shards()


def test_resolve_stream_errors_for_missing_table_or_stream_and_reports_disabled(aws) -> None:
    with pytest.raises(StreamNotFoundError, match="does not exist"):
        resolve_stream(aws.ddb, "no-such-table")
    plain, _ = create_stream_table(aws.ddb, stream=False)
    with pytest.raises(StreamNotFoundError, match="update-table"):
        resolve_stream(aws.ddb, plain)
    name, _ = create_stream_table(aws.ddb)
    aws.ddb.update_table(TableName=name, StreamSpecification={"StreamEnabled": False})
    assert resolve_stream(aws.ddb, name).status == "DISABLED"


def test_make_clients_takes_the_endpoint_from_the_environment(aws, table, monkeypatch) -> None:
    monkeypatch.setenv("DURABILITY_DYNAMODB_ENDPOINT_URL", aws.url)
    ddb, streams = make_clients("us-east-1", None)
    assert resolve_stream(ddb, table.name).stream_arn == table.arn
    assert streams.meta.endpoint_url == aws.url
    assert streams.meta.config.retries["total_max_attempts"] == 1  # the reader's backoff is the retry layer


# --------------------------------------------------------------------------- KCL-style oracle


def test_kcl_oracle_per_shard_order_and_exact_unique_count_across_a_restart(aws, table) -> None:
    """Splits (1 -> 2 -> 4 shards), wide sequences, a crash before an ack, a restart from checkpoints."""
    client = FaultyStreamsClient(aws.streams, table.arn, topology=Topology((1, 2, 4), (12, 30)))
    keys = [f"key-{i}" for i in range(6)]
    writes = [{"pk": keys[i % 6], "v": i} for i in range(20)]
    put_items(aws.ddb, table.name, writes)

    checkpoints: dict[str, str | None] = {}
    acked: list[StreamRecord] = []
    delivered: list[StreamRecord] = []

    def run(reader: DynamoDBStreamReader, *, crash_after: int | None = None) -> list[StreamRecord]:
        """One worker: read readable shards in batches of 4 until nothing is left; maybe die before an ack."""
        batches = 0
        while True:
            progressed = False
            for shard in reader.readable_shards(reader.list_shards(), checkpoints):
                batch = reader.read_batch(shard.shard_id, checkpoints.get(shard.shard_id), 4)
                delivered.extend(batch.records)
                batches += 1
                if crash_after is not None and batches > crash_after and batch.records:
                    return batch.records  # processed but never acked
                acked.extend(batch.records)
                if batch.next_checkpoint is not None:
                    checkpoints[shard.shard_id] = batch.next_checkpoint
                    progressed = True
            if not progressed:
                return []

    lost_ack = run(DynamoDBStreamReader(client, table.arn), crash_after=3)
    assert lost_ack
    writes2 = [{"pk": keys[i % 6], "v": i} for i in range(20, 40)]
    put_items(aws.ddb, table.name, writes2)  # the stream splits again while the worker is down
    assert run(DynamoDBStreamReader(client, table.arn)) == []  # restart from the stored checkpoints

    produced = client.expected_sequences()
    assert sum(len(v) for v in produced.values()) == 40 == client.record_count
    by_shard: dict[str, list[str]] = {}
    for r in acked:
        by_shard.setdefault(r.shard_id, []).append(r.sequence)
    for shard_id, seqs in by_shard.items():
        assert strictly_increasing(seqs), shard_id  # per shard, non-decreasing (and no duplicates once acked)
    assert len({(r.shard_id, r.sequence) for r in acked}) == 40 == len(acked)
    assert by_shard == {k: v for k, v in produced.items() if v}
    # The unacked batch was delivered again after the restart: at-least-once, never lost.
    redelivered = [
        r for r in delivered if (r.shard_id, r.sequence) in {(x.shard_id, x.sequence) for x in lost_ack}
    ]
    assert len(redelivered) == 2 * len(lost_ack)
    # Lineage keeps per-key order across both splits.
    for key in keys:
        versions = [int(r.new_image["v"]) for r in acked if r.keys["pk"] == key]
        assert versions == sorted(versions) and len(versions) == 40 // 6 + (keys.index(key) < 40 % 6)
    assert all(checkpoints[s.shard_id] == SHARD_END for s in client.shards() if s.generation < 2)


def test_checkpoint_before_a_failed_record_never_skips_it() -> None:
    def rec(seq: str) -> StreamRecord:
        return StreamRecord.from_raw("s", {"eventName": "INSERT", "dynamodb": {"SequenceNumber": seq}})

    batch = ShardBatch(
        shard_id="s", start_after="100", records=[rec("200"), rec("1000")], next_checkpoint="1000"
    )
    assert checkpoint_before(batch, 0) == "100"  # first record failed: stay at the acked checkpoint
    assert checkpoint_before(batch, 1) == "200"
    assert checkpoint_before(batch, 2) == "1000"  # nothing failed
    with pytest.raises(IndexError):
        checkpoint_before(batch, 3)
