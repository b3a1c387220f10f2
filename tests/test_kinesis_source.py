"""The Kinesis Data Streams source (DynamoDB's Kinesis destination) against a real moto server.

moto serves the streams over HTTP; ``tests/support/kinesis.py`` says where its models are patched to
AWS's behaviour (wide sequence numbers, splits and merges that keep the parents' records, shard end)
and what ``FaultyKinesisClient`` injects (throttling, an expired checkpoint, ListShards pages).
No timed assertions: backoff sleeps are recorded, never slept.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from durability_pipelines.checkpoints import SHARD_END, compare_sequences
from durability_pipelines.checkpoints.ordering import MAX_DIGITS
from durability_pipelines.consumer.adapters import build_source
from durability_pipelines.consumer.adapters.kinesis import KinesisSource
from durability_pipelines.consumer.config import ConsumerConfig, KinesisSourceConfig
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handlers import HandlerContext
from durability_pipelines.consumer.runtime import ConsumerRuntime
from durability_pipelines.sources.backoff import BackoffPolicy
from durability_pipelines.sources.errors import (
    SequenceNotInShardError,
    ThrottledError,
    TrimmedDataError,
)
from durability_pipelines.sources.kinesis import UNDECODABLE, KinesisStreamReader, describe_stream
from tests.support.dynamodb import AWS_TEST_ENV, moto_server
from tests.support.kinesis import (
    FaultyKinesisClient,
    aws_semantics,
    change_record,
    create_stream,
    kinesis_client,
    put_changes,
    put_raw,
)
from tests.support.stores import build_store, unique_key

EXPIRED = ("StartingSequenceNumber {seq} used in GetShardIterator on shard {shard} in stream {stream} under account "
           "123456789012 is invalid because the record is older than the stream's retention period (trim horizon).")


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_TEST_ENV.items():
            mp.setenv(name, value)
        with aws_semantics(), moto_server() as url:
            yield url


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    monkeypatch.setenv("DURABILITY_DYNAMODB_ENDPOINT_URL", moto_url)
    return SimpleNamespace(url=moto_url, client=kinesis_client(moto_url))


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _config(stream: str, table: str, **source: Any) -> ConsumerConfig:
    return ConsumerConfig.model_validate({
        "name": "kinesis_worker", "group": "workers", "consumer": "consumer-a",
        "source": {"kind": "dynamodb_kinesis", "table": table, "stream_name": stream, **source},
        "checkpoint": {"backend": "memory"},
    })


def _source(stream: str, table: str, client: Any = None, **source: Any) -> KinesisSource:
    cfg = _config(stream, table, **source).source
    assert isinstance(cfg, KinesisSourceConfig)
    return KinesisSource(cfg, client=client) if client is not None else KinesisSource(cfg)


def _changes(table: str, keys: int, rounds: int) -> list[dict[str, Any]]:
    """``rounds`` changes of each of ``keys`` items, n counting up per item (per-key order is checkable)."""
    return [change_record(table, f"item-{k}", r, event="INSERT" if r == 0 else "MODIFY")
            for r in range(rounds) for k in range(keys)]


def _drain(src: KinesisSource, acked: dict[str | None, str | None], *, max_events: int = 37,
           seen: list[ChangeEvent] | None = None, order: list[str] | None = None) -> list[ChangeEvent]:
    """Read every readable shard to its tip, lineage respected, acking as a consumer would."""
    seen = [] if seen is None else seen
    src.list_shards()
    while True:
        progressed = False
        for shard in src.readable(acked):
            b = src.read(shard, acked.get(shard), max_events)
            seen.extend(b.events)
            if b.events and order is not None and (not order or order[-1] != shard):
                order.append(shard)
            if b.next_checkpoint is not None and b.next_checkpoint != acked.get(shard):
                acked[shard] = b.next_checkpoint
                progressed = True
        if not progressed:
            return seen


def _by_key(events: list[ChangeEvent]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e in events:
        out.setdefault(e.keys["pk"], []).append(int((e.new_image or e.old_image or {})["n"]))
    return out


# --------------------------------------------------------------------------- many shards, order, completeness


def test_eight_shards_are_read_completely_and_in_order_per_shard(aws: SimpleNamespace) -> None:
    stream, table = create_stream(aws.client, 8), "orders"
    written = put_changes(aws.client, stream, _changes(table, keys=40, rounds=6))
    assert len(written) == 8  # every shard got records

    src = _source(stream, table)
    acked: dict[str | None, str | None] = {}
    events = _drain(src, acked)

    for shard, records in written.items():
        got = [e.sequence for e in events if e.shard == shard]
        assert got == [seq for seq, _ in records]  # complete, no duplicates, stream order
        assert all(compare_sequences(a, b) < 0 for a, b in zip(got, got[1:], strict=False))
    widths = {len(e.sequence) for e in events}
    assert {56, 57, MAX_DIGITS} <= widths  # AWS-like 56 digits, one shard growing a digit, the 129-digit maximum
    assert _by_key(events) == {f"item-{k}": list(range(6)) for k in range(40)}
    assert {e.event_name for e in events} == {"INSERT", "MODIFY"}
    assert all(e.adapter == "dynamodb" and e.stream == table for e in events)
    assert build_source(_config(stream, table)).identity == src.identity


def test_a_steady_poll_costs_one_get_records_call_per_read(aws: SimpleNamespace) -> None:
    stream = create_stream(aws.client, 1)
    put_changes(aws.client, stream, _changes("orders", keys=5, rounds=1))
    client = FaultyKinesisClient(kinesis_client(aws.url))
    reader = KinesisStreamReader(client, describe_stream(client, stream).arn)
    (shard,) = [s.shard_id for s in reader.list_shards()]
    first = reader.read_batch(shard, None, 100)
    assert len(first.records) == 5 and first.caught_up and first.millis_behind_latest == 0

    client.calls.clear()
    again = reader.read_batch(shard, first.next_checkpoint, 100)
    assert again.records == [] and again.caught_up
    assert client.calls == ["GetRecords"]  # the cached iterator: no GetShardIterator


def test_list_shards_follows_next_token_pages(aws: SimpleNamespace) -> None:
    stream = create_stream(aws.client, 8)
    client = FaultyKinesisClient(kinesis_client(aws.url), list_page_size=3)
    reader = KinesisStreamReader(client, describe_stream(client, stream).arn)
    shards = reader.list_shards()
    assert len({s.shard_id for s in shards}) == 8
    assert client.calls.count("ListShards") == 3


# --------------------------------------------------------------------------- lineage: split and merge


def test_split_and_merge_children_are_read_only_after_their_parents_end(aws: SimpleNamespace) -> None:
    stream, table = create_stream(aws.client, 2), "orders"
    keys = 24
    put_changes(aws.client, stream, _changes(table, keys=keys, rounds=3))
    src = _source(stream, table)
    acked: dict[str | None, str | None] = {}
    parent = src.list_shards()[0]
    first = src.read(parent, None, 10)  # a consumer in the middle of the parent
    acked[parent] = first.next_checkpoint
    seen = list(first.events)

    info = {s["ShardId"]: s for s in aws.client.list_shards(StreamName=stream)["Shards"]}[parent]
    low, high = int(info["HashKeyRange"]["StartingHashKey"]), int(info["HashKeyRange"]["EndingHashKey"])
    aws.client.split_shard(StreamName=stream, ShardToSplit=parent, NewStartingHashKey=str((low + high) // 2))
    put_changes(aws.client, stream, [change_record(table, f"item-{k}", 3, event="MODIFY") for k in range(keys)])

    src.list_shards()
    children = [s for s in src.reader.list_shards() if parent in s.parents]
    assert len(children) == 2
    readable = src.readable(acked)
    assert parent in readable and not {c.shard_id for c in children} & set(readable)

    order: list[str] = []
    _drain(src, acked, seen=seen, order=order)
    assert acked[parent] == SHARD_END
    assert order.index(parent) < min(order.index(c.shard_id) for c in children if c.shard_id in order)

    # Merge the two children: the merged shard waits for both.
    a, b = sorted((c for c in children), key=lambda c: c.shard_id)
    aws.client.merge_shards(StreamName=stream, ShardToMerge=a.shard_id, AdjacentShardToMerge=b.shard_id)
    put_changes(aws.client, stream, [change_record(table, f"item-{k}", 4, event="MODIFY") for k in range(keys)])
    src.list_shards()
    (merged,) = [s for s in src.reader.list_shards() if set(s.parents) == {a.shard_id, b.shard_id}]
    half = {k: v for k, v in acked.items() if k != b.shard_id}
    assert merged.shard_id not in src.readable(half)  # one parent not ended yet (b's checkpoint not at SHARD_END)
    _drain(src, acked, seen=seen)
    assert acked[a.shard_id] == acked[b.shard_id] == SHARD_END
    assert merged.shard_id in acked

    # Every change once, and every item's changes in order across split and merge.
    assert len({(e.shard, e.sequence) for e in seen}) == len(seen)
    assert _by_key(seen) == {f"item-{k}": [0, 1, 2, 3, 4] for k in range(keys)}


def test_runtime_drains_a_split_stream_through_its_batch_rules(aws: SimpleNamespace) -> None:
    """The same lineage through ``ConsumerRuntime`` (lease, read, handler, ack) with a memory store."""
    stream, table = create_stream(aws.client, 1), "orders"
    put_changes(aws.client, stream, _changes(table, keys=10, rounds=2))
    parent = aws.client.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    aws.client.split_shard(StreamName=stream, ShardToSplit=parent, NewStartingHashKey=str(2**127))
    put_changes(aws.client, stream, [change_record(table, f"item-{k}", 2, event="MODIFY") for k in range(10)])

    handled: list[ChangeEvent] = []

    def handler(events: list[ChangeEvent], ctx: HandlerContext) -> None:
        handled.extend(events)

    cfg = _config(stream, table)
    runtime = ConsumerRuntime(cfg, store=build_store("memory", "", ""), source=_source(stream, table),
                              handler=handler, storage=None, postgres_url=None)
    assert runtime.source is not None
    for _ in range(10):
        shards = runtime.source.list_shards()
        acked, _stopped = runtime.load_acked(shards, blocked=set(), run_id="run-1")
        ready = runtime.source.readable(acked)
        if not ready or all(not runtime.source.has_new(s, acked.get(s)) for s in ready):
            break
        for shard in ready:
            read = runtime.read(shard, "run-1")
            runtime.ack(read, runtime.process(read))
            runtime.release(read.lease)
    assert runtime.store.load(runtime.key(parent)) == SHARD_END
    assert _by_key(handled) == {f"item-{k}": [0, 1, 2] for k in range(10)}


# --------------------------------------------------------------------------- LATEST, bad and foreign records


def test_latest_skips_what_was_there_and_delivers_what_comes_next(aws: SimpleNamespace) -> None:
    stream, table = create_stream(aws.client, 3), "orders"
    written = put_changes(aws.client, stream, _changes(table, keys=30, rounds=2))
    assert len(written) == 3
    src = _source(stream, table, initial_position="LATEST")
    acked: dict[str | None, str | None] = {}
    assert _drain(src, acked) == []  # pinned, nothing delivered
    assert all(v is not None for v in acked.values()) and len(acked) == 3
    put_changes(aws.client, stream, [change_record(table, f"item-{k}", 7, event="MODIFY") for k in range(30)])
    assert _by_key(_drain(src, acked)) == {f"item-{k}": [7] for k in range(30)}


def test_an_undecodable_record_is_delivered_in_place_and_does_not_stop_the_good_ones(aws: SimpleNamespace) -> None:
    stream, table = create_stream(aws.client, 1), "orders"
    put_changes(aws.client, stream, [change_record(table, "a", 0)])
    put_raw(aws.client, stream, b"{not json", "a")
    put_raw(aws.client, stream, json.dumps({"eventName": "INSERT", "tableName": table}).encode(), "a")
    put_raw(aws.client, stream, b"\xff\xfe binary", "a")
    put_changes(aws.client, stream, [change_record(table, "a", 1, event="MODIFY")])
    events = _drain(_source(stream, table), {})
    assert [e.event_name for e in events] == ["INSERT", UNDECODABLE, UNDECODABLE, UNDECODABLE, "MODIFY"]
    bad = events[1:4]
    assert bad[0].new_image is not None and bad[0].new_image["payload"] == "{not json"
    assert "JSONDecodeError" in bad[0].new_image["error"]
    assert "dynamodb" in bad[1].new_image["error"]  # type: ignore[index]
    assert bad[2].new_image["payload"].startswith("base64:")  # type: ignore[index]
    assert all(json.dumps(e.to_json_dict()) for e in bad)  # dead letters and sinks can store them


def test_changes_of_other_tables_on_the_same_stream_are_acked_not_delivered(aws: SimpleNamespace) -> None:
    stream = create_stream(aws.client, 1)
    put_changes(aws.client, stream, [change_record("orders", "a", 0), change_record("users", "u", 0),
                                     change_record("orders", "a", 1, event="MODIFY")])
    acked: dict[str | None, str | None] = {}
    events = _drain(_source(stream, "orders"), acked)
    assert [(e.keys["pk"], e.event_name) for e in events] == [("a", "INSERT"), ("a", "MODIFY")]
    assert list(acked.values()) == [events[-1].sequence]


# --------------------------------------------------------------------------- long sequence numbers in every store


@pytest.mark.parametrize("backend", ["memory", "redis", "postgres"])
def test_kinesis_sequence_numbers_are_stored_and_compared_numerically(backend: str, redis_url: str,
                                                                     postgres_url: str) -> None:
    store = build_store(backend, redis_url, postgres_url)
    key = unique_key(shard="shardId-000000000001")
    try:
        nine56, one57, widest = "9" * 56, "1" + "0" * 56, "9" * MAX_DIGITS
        assert store.save(key, nine56).advanced
        assert store.save(key, one57).advanced  # "1..." is lexically smaller, numerically larger
        assert store.load(key) == one57
        assert not store.save(key, nine56).advanced  # never backwards
        assert store.save(key, widest).advanced
        assert store.load(key) == widest
        assert store.save(key, SHARD_END).advanced
        assert store.load(key) == SHARD_END
    finally:
        store.close()


# --------------------------------------------------------------------------- trimmed, expired, foreign, throttled


def _reader_at(aws: SimpleNamespace, **kwargs: Any) -> tuple[FaultyKinesisClient, KinesisStreamReader, str, Any]:
    stream = create_stream(aws.client, 1)
    put_changes(aws.client, stream, _changes("orders", keys=6, rounds=1))
    client = FaultyKinesisClient(kinesis_client(aws.url))
    reader = KinesisStreamReader(client, describe_stream(client, stream).arn, **kwargs)
    (shard,) = [s.shard_id for s in reader.list_shards()]
    first = reader.read_batch(shard, None, 2)
    return client, KinesisStreamReader(client, reader.stream_arn, **kwargs), shard, (stream, first)


def test_an_expired_checkpoint_fails_loudly_by_default_naming_the_range(aws: SimpleNamespace) -> None:
    client, reader, shard, (stream, first) = _reader_at(aws)
    seq = first.next_checkpoint
    client.inject("GetShardIterator", "InvalidArgumentException",
                  message=EXPIRED.format(seq=seq, shard=shard, stream=stream))
    with pytest.raises(TrimmedDataError) as err:
        reader.read_batch(shard, seq, 10)
    assert err.value.from_sequence == seq and err.value.shard_id == shard
    assert "checkpoint was not moved" in str(err.value)


def test_an_expired_checkpoint_is_skipped_to_trim_horizon_as_an_audited_gap(aws: SimpleNamespace) -> None:
    client, reader, shard, (stream, first) = _reader_at(aws, trim_policy="skip_to_trim_horizon")
    seq = first.next_checkpoint
    client.inject("GetShardIterator", "InvalidArgumentException",
                  message=EXPIRED.format(seq=seq, shard=shard, stream=stream))
    batch = reader.read_batch(shard, seq, 10)
    assert batch.gap is not None and batch.gap.from_sequence == seq
    # moto trims nothing, so "the trim horizon" is the shard's first record: nothing is handed out twice
    assert [r.sequence for r in batch.records][0] == batch.gap.to_sequence
    assert all(compare_sequences(r.sequence, seq) > 0 for r in batch.records)


def test_a_checkpoint_of_another_shard_is_refused(aws: SimpleNamespace) -> None:
    client, reader, shard, (stream, first) = _reader_at(aws)
    client.inject("GetShardIterator", "InvalidArgumentException",
                  message=f"Invalid StartingSequenceNumber. It encodes shardId-000000000007, while it was used in a "
                          f"call to {shard}")
    with pytest.raises(SequenceNotInShardError, match="not produced by this shard"):
        reader.read_batch(shard, first.next_checkpoint, 10)


def test_a_shard_that_left_the_stream_with_a_checkpoint_short_of_its_end_is_a_loss(aws: SimpleNamespace) -> None:
    stream, table = create_stream(aws.client, 1), "orders"
    gone = "shardId-000000000099"
    src = _source(stream, table)
    src.list_shards()
    acked: dict[str | None, str | None] = {gone: "4" * 56}
    assert src.readable(acked)[0] == gone  # orphans first: the loss is reported before the children run
    with pytest.raises(TrimmedDataError, match="aged out of the stream's retention"):
        src.read(gone, acked[gone], 10)
    skip = _source(stream, table, trim_policy="skip_to_trim_horizon")
    skip.list_shards()
    b = skip.read(gone, acked[gone], 10)
    assert b.gap is not None and b.next_checkpoint == SHARD_END and b.shard_ended


def test_throttling_is_retried_with_backoff_then_raised_with_kinesis_advice(aws: SimpleNamespace) -> None:
    sleeps = Sleeps()
    policy = BackoffPolicy(max_attempts=4, sleep=sleeps, random=lambda: 1.0)
    client, reader, shard, (_, first) = _reader_at(aws, backoff=policy)
    client.inject("GetRecords", "ProvisionedThroughputExceededException", times=2, message="Rate exceeded")
    batch = reader.read_batch(shard, first.next_checkpoint, 10)
    assert len(batch.records) == 4 and batch.retries == 2 and len(sleeps) == 2

    client.inject("GetRecords", "ProvisionedThroughputExceededException", times=10, message="Rate exceeded")
    with pytest.raises(ThrottledError, match="5 GetRecords calls and 2 MB per second"):
        reader.read_batch(shard, batch.next_checkpoint, 10)


# --------------------------------------------------------------------------- config and identity


def test_config_needs_the_stream_name_and_keeps_the_tables_checkpoint_key() -> None:
    with pytest.raises(ValueError, match="stream_name"):
        ConsumerConfig.model_validate({"name": "k", "group": "g", "consumer": "c",
                                       "source": {"kind": "dynamodb_kinesis", "table": "orders"}})
    cfg = _config("orders-changes", "orders")
    assert (cfg.adapter, cfg.stream) == ("dynamodb", "orders")
    with_filter = ConsumerConfig.model_validate({**cfg.model_dump(), "filter": {"event_names": ["UNDECODABLE"]}})
    assert with_filter.filter is not None


def test_stream_asset_spec_describes_the_table(aws: SimpleNamespace) -> None:
    from durability_pipelines.orchestration.consumers import stream_asset_spec

    spec = stream_asset_spec(_config("orders-changes", "orders"))
    assert spec.key.path == ["streams", "dynamodb", "orders"]
    assert spec.metadata["table"] == "orders"


def test_a_recreated_stream_has_a_new_identity(aws: SimpleNamespace) -> None:
    name = f"k-{uuid.uuid4().hex[:10]}"
    create_stream(aws.client, 1, name)
    before = _source(name, "orders").identity
    aws.client.delete_stream(StreamName=name)
    create_stream(aws.client, 1, name)
    after = _source(name, "orders").identity
    assert before != after and before.startswith("arn:aws:kinesis:")
