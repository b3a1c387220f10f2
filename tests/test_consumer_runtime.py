"""read -> process -> ack against real Redis/Postgres stores, with an in-memory source."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest

from durability_pipelines.checkpoints import LeaseLostError
from durability_pipelines.checkpoints.factory import StoreConfig
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.runtime import (
    BatchDeadLettered,
    PartialBatchFailure,
    ShardBusyError,
    open_runtime,
)
from durability_pipelines.observability import METRICS, Labels, Metrics, read_jsonl
from tests.support.sources import ListSource


def make_config(stream: str, backend: str = "hybrid", **overrides: object) -> ConsumerConfig:
    data = {
        "name": "rt_" + uuid.uuid4().hex[:6], "source": {"kind": "dynamodb", "table": stream},
        "group": "g", "consumer": "c", "checkpoint": StoreConfig(backend=backend), "max_events": 10,
        **overrides,
    }
    return ConsumerConfig.model_validate(data)


def rows(postgres_url: str, stream: str) -> list[str]:
    with psycopg.connect(postgres_url) as conn:
        return [r[0] for r in conn.execute(
            "SELECT sequence FROM stream_events WHERE stream = %s ORDER BY sequence::numeric", (stream,)
        ).fetchall()]


def run_once(rt, shard="shard-0", run_id=None, retry_number=0):
    """One batch, as one run of the first design did: lease, read, process, ack, release."""
    read = rt.read(shard, run_id or "run-" + uuid.uuid4().hex[:8])
    processed = rt.process(read, retry_number=retry_number)
    result = rt.ack(read, processed)
    rt.release(read.lease)
    return read, processed, result


@pytest.fixture
def stream() -> str:
    return "orders-" + uuid.uuid4().hex[:10]


@pytest.mark.parametrize("backend", ["memory", "redis", "postgres", "hybrid"])
def test_batches_are_processed_in_order_and_checkpointed(backend, stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 25)
    rt = open_runtime(make_config(stream, backend), redis_url=redis_url, postgres_url=postgres_url, source=source)
    seqs = [e.sequence for e in source.shards_events["shard-0"]]
    for expected_last in (seqs[9], seqs[19], seqs[24]):
        _, processed, result = run_once(rt)
        assert result.current == expected_last and processed.ack_to == expected_last
    read = rt.read("shard-0", "run-x")
    assert read.batch.events == [] and rt.process(read).ack_to is None  # caught up
    assert rows(postgres_url, stream) == seqs  # every event once, in order
    rt.close()


def test_a_replayed_batch_creates_no_duplicate(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 10)
    rt = open_runtime(make_config(stream, "redis"), redis_url=redis_url, postgres_url=postgres_url, source=source,
                      is_owner_dead=lambda owner: owner == "run-1")
    read = rt.read("shard-0", "run-1")
    rt.process(read)  # side effects committed ... then run-1 dies before the ack
    read2 = rt.read("shard-0", "run-2")  # its lease is taken over and the batch delivered again
    assert [e.sequence for e in read2.batch.events] == [e.sequence for e in read.batch.events]
    rt.ack(read2, rt.process(read2))
    assert len(rows(postgres_url, stream)) == 10
    rt.close()


def test_postgres_store_commits_sink_and_checkpoint_in_one_transaction(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 5)
    cfg = make_config(stream, "postgres", handler="tests.support.runtime_handlers:crash_after_write",
                      retry={"max_retries": 2})
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source)
    read = rt.read("shard-0", "run-1")
    with pytest.raises(RuntimeError, match="crashed after writing"):
        rt.process(read, retry_number=0)
    assert rows(postgres_url, stream) == [] and rt.store.load(rt.key("shard-0")) is None  # both rolled back
    rt.close()
    ok = open_runtime(make_config(stream, "postgres"), redis_url=redis_url, postgres_url=postgres_url, source=source,
                      is_owner_dead=lambda owner: owner == "run-1")
    read = ok.read("shard-0", "run-2")
    ok.process(read)
    # the handler's transaction already holds the checkpoint; ack is an idempotent no-op
    assert ok.store.load(ok.key("shard-0")) == read.batch.events[-1].sequence
    assert ok.ack(read, ok.process(read)).outcome.value == "unchanged"
    ok.close()


def test_partial_failure_acks_just_before_the_lowest_failed_item(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 10)
    events = source.shards_events["shard-0"]
    poison = events[6]
    source.shards_events["shard-0"][6] = type(poison)(**{**poison.__dict__, "new_image": {"poison": True}})
    cfg = make_config(stream, "hybrid", handler="tests.support.runtime_handlers:poison_aware",
                      handler_options={"mode": "report"}, retry={"max_retries": 1})
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source)
    read = rt.read("shard-0", "run-1")
    with pytest.raises(PartialBatchFailure):
        rt.process(read, retry_number=0)
    assert rt.store.load(rt.key("shard-0")) == events[5].sequence  # just before the failed item
    assert rt.pending_events(read)[0].sequence == events[6].sequence  # the retry starts at it
    with pytest.raises(BatchDeadLettered):  # last attempt: dead-lettered, shard stopped
        rt.process(read, retry_number=1)
    (dl,) = rt.storage.dead_letters(cfg.name)
    assert (dl.first_sequence, dl.last_sequence, dl.record_count, dl.status) == (
        events[6].sequence, events[9].sequence, 4, "open")
    assert rt.storage.blocked_shards(cfg.name) == {"shard-0"}
    assert rows(postgres_url, stream) == [e.sequence for e in events[:6]]
    rt.close()


def test_exhausted_retries_stop_policy_dead_letters_and_does_not_advance(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 8)
    source.shards_events["shard-0"][3] = type(source.shards_events["shard-0"][3])(
        **{**source.shards_events["shard-0"][3].__dict__, "new_image": {"poison": True}})
    cfg = make_config(stream, "redis", handler="tests.support.runtime_handlers:poison_aware", retry={"max_retries": 2})
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source)
    read = rt.read("shard-0", "run-1")
    for attempt in (0, 1):
        with pytest.raises(ValueError, match="poison"):
            rt.process(read, retry_number=attempt)  # retried by the op's RetryPolicy
    with pytest.raises(BatchDeadLettered, match="dead-letters retry"):
        rt.process(read, retry_number=2)
    assert rt.store.load(rt.key("shard-0")) is None  # a failed batch is never skipped
    (dl,) = rt.storage.dead_letters(cfg.name)
    assert dl.attempts == 3 and "poison" in dl.error and dl.record_count == 8
    rt.close()


def test_bisect_isolates_the_poison_record_and_goes_on(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 10)
    ev = source.shards_events["shard-0"]
    ev[7] = type(ev[7])(**{**ev[7].__dict__, "new_image": {"poison": True}})
    cfg = make_config(stream, "postgres", handler="tests.support.runtime_handlers:poison_aware",
                      retry={"max_retries": 0}, dead_letter={"policy": "bisect"})
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source)
    _, processed, result = run_once(rt)
    assert processed.failed == [ev[7].sequence] and processed.processed == 9
    assert result.current == ev[9].sequence
    (dl,) = rt.storage.dead_letters(cfg.name)
    assert (dl.first_sequence, dl.record_count, dl.policy) == (ev[7].sequence, 1, "bisect")
    assert rt.storage.blocked_shards(cfg.name) == set()
    assert rows(postgres_url, stream) == [e.sequence for i, e in enumerate(ev) if i != 7]
    rt.close()


def test_shard_leased_by_a_live_worker_is_busy_a_dead_one_is_taken_over(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 3)
    cfg = make_config(stream, "hybrid")
    other = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source)
    other.acquire_lease("shard-0", "run-alive")
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source,
                      is_owner_dead=lambda owner: owner == "run-dead")
    with pytest.raises(ShardBusyError, match="run-alive"):
        rt.read("shard-0", "run-new")
    other.store.leases.acquire(rt.key("shard-0").lease_key, "run-dead", steal=True)
    read = rt.read("shard-0", "run-new")
    assert read.lease.owner == "run-new"
    rt.close()
    other.close()


def test_ack_after_losing_the_lease_writes_nothing(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 5)
    rt = open_runtime(make_config(stream, "hybrid"), redis_url=redis_url, postgres_url=postgres_url, source=source)
    read = rt.read("shard-0", "run-old")
    processed = rt.process(read)
    rt.store.leases.acquire(rt.key("shard-0").lease_key, "run-new", steal=True)
    with pytest.raises(LeaseLostError):
        rt.ack(read, processed)
    assert rt.store.load(rt.key("shard-0")) is None
    rt.close()


def test_metrics_go_to_jsonl_with_the_documented_names(stream, redis_url, postgres_url, tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    cfg = make_config(stream, "hybrid")
    source = ListSource.with_events(stream, 4)
    metrics = Metrics(Labels("dynamodb", stream, "g", "c"), jsonl_path=str(path))
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source, metrics=metrics)
    run_once(rt)
    records = read_jsonl(path)
    names = {r["metric"] for r in records}
    assert {"reactive.events_per_batch", "reactive.ack.success_rate", "reactive.sequence_gap",
            "adapter.call.duration_ms"} <= names <= set(METRICS)
    batch = next(r for r in records if r["metric"] == "reactive.events_per_batch")
    assert batch["value"] == 4 and batch["labels"] == {
        "adapter": "dynamodb", "stream": stream, "group": "g", "consumer": "c", "shard": "shard-0"}
    assert all(set(r) == {"kind", "metric", "value", "labels", "ts"} for r in records)
    assert json.loads(path.read_text().splitlines()[0])  # one JSON object per line
    rt.close()


def test_legacy_jsonl_variable_is_honoured(monkeypatch, tmp_path: Path) -> None:
    path = tmp_path / "legacy.jsonl"
    monkeypatch.delenv("DURABILITY_OBSERVABILITY_JSONL", raising=False)
    monkeypatch.setenv("AINL_OBSERVABILITY_JSONL", str(path))
    Metrics(Labels("dynamodb", "s")).record("reactive.sequence_gap", 3)
    assert read_jsonl(path)[0]["value"] == 3


def test_partial_failure_of_a_non_transactional_handler_acks_the_prefix(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 6)
    ev = source.shards_events["shard-0"]
    ev[4] = type(ev[4])(**{**ev[4].__dict__, "new_image": {"poison": True}})
    cfg = make_config(stream, "redis", handler="tests.support.runtime_handlers:report_poison",
                      retry={"max_retries": 1})
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source)
    read = rt.read("shard-0", "run-1")
    with pytest.raises(PartialBatchFailure):
        rt.process(read, retry_number=0)
    assert rt.store.load(rt.key("shard-0")) == ev[3].sequence
    rt.close()
