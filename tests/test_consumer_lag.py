"""The lag objective's measure (consumer/lag.py) and what a run reports on its sink: real Redis and
Postgres stores, an in-memory source with dated records."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from dagster import AssetMaterialization, AssetObservation

from durability_pipelines.checkpoints.keys import CheckpointKey
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.lag import measure_lag
from durability_pipelines.observability import LAG_SECONDS
from durability_pipelines.orchestration.consumers import SinkReporter, sink_asset_key, sink_event
from tests.support.sources import ListSource
from tests.test_consumer_drain import SHARD, FakeClock, budget, drainer, open_rt

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)


def dated(stream: str, count: int, *, oldest_age_s: float, shard: str | None = SHARD) -> list[ChangeEvent]:
    """``count`` events, one second apart, the first ``oldest_age_s`` old at ``NOW``."""
    return [ChangeEvent("dynamodb", stream, shard, str(10**21 + i * 17), "INSERT", {"pk": f"k{i}"}, {"n": i},
                        created_at=NOW - timedelta(seconds=oldest_age_s - i)) for i in range(count)]


@pytest.mark.parametrize("backend", ["redis", "postgres", "hybrid"])
def test_lag_is_the_age_of_the_oldest_record_not_yet_acked(backend, redis_url, postgres_url) -> None:
    stream = "lag-" + uuid.uuid4().hex[:10]
    events = dated(stream, 30, oldest_age_s=600)
    rt = open_rt(stream, redis_url, postgres_url, ListSource(stream, {SHARD: events}), backend)
    (before,) = measure_lag(rt, now=NOW)
    assert before.lag_s == 600 and before.oldest_waiting == events[0].sequence and before.acked is None
    assert before.last_ack_at is None and "last ack never" in before.describe()

    read = rt.read(SHARD, "run-1")
    rt.ack(read, rt.process(read))
    rt.release(read.lease)
    (after,) = measure_lag(rt, now=NOW)
    assert after.acked == events[9].sequence and after.oldest_waiting == events[10].sequence
    assert after.lag_s == 590 and after.last_ack_at is not None
    assert f"shard {SHARD}: lag 590.0 s" in after.describe() and "last ack 20" in after.describe()
    rt.close()


def test_a_caught_up_shard_has_no_lag_however_old_its_newest_record(redis_url, postgres_url) -> None:
    stream = "lag-" + uuid.uuid4().hex[:10]
    rt = open_rt(stream, redis_url, postgres_url, ListSource(stream, {SHARD: dated(stream, 5, oldest_age_s=86_400)}))
    drainer(rt, FakeClock()).run()
    (lag,) = measure_lag(rt, now=NOW)
    assert lag.lag_s == 0.0 and lag.problem is None
    rt.close()


def test_an_unreadable_checkpoint_is_reported_and_the_other_shards_are_still_measured(
        redis_url, postgres_url) -> None:
    stream = "lag-" + uuid.uuid4().hex[:10]
    source = ListSource(stream, {"shard-a": dated(stream, 3, oldest_age_s=50, shard="shard-a"),
                                 "shard-b": dated(stream, 3, oldest_age_s=70, shard="shard-b")})
    rt = open_rt(stream, redis_url, postgres_url, source, "redis")
    key: CheckpointKey = rt.key("shard-a")
    rt.store.client.set(key.redis_key, "not-a-position")  # someone else's garbage
    try:
        lags = {x.shard: x for x in measure_lag(rt, now=NOW)}
        assert lags["shard-a"].lag_s is None and "checkpoint unreadable" in lags["shard-a"].problem
        assert lags["shard-b"].lag_s == 70
    finally:
        rt.store.client.delete(key.redis_key)
        rt.close()


def test_a_run_that_wrote_materializes_the_sink_and_one_that_did_not_observes_it(redis_url, postgres_url) -> None:
    stream = "lag-" + uuid.uuid4().hex[:10]
    rt = open_rt(stream, redis_url, postgres_url, ListSource(stream, {SHARD: dated(stream, 25, oldest_age_s=100)}))
    report = drainer(rt, FakeClock()).run()
    cfg = rt.config
    event = sink_event(cfg, report, rt.key(SHARD).redis_key)
    assert isinstance(event, AssetMaterialization) and event.asset_key == sink_asset_key(cfg)
    figures = {k: v.value for k, v in event.metadata.items()}
    assert figures["events"] == 25 and figures["shard"] == SHARD
    assert figures["reactive.lag_seconds"] == 0.0  # caught up: nothing waiting
    assert figures["reactive.records_behind"] == 0 and figures["checkpoint"] == report.checkpoint
    idle = sink_event(cfg, drainer(rt, FakeClock()).run(), rt.key(SHARD).redis_key)
    assert isinstance(idle, AssetObservation) and idle.metadata["events"].value == 0
    rt.close()


def test_a_draining_run_materializes_its_sink_as_it_goes_not_only_when_it_ends(redis_url, postgres_url) -> None:
    """A run lives ten minutes: its sink is materialized at its first batch with events, then every
    SINK_MATERIALIZE_EVERY_S, then for the rest at its end; each event covers its own batches, with the lag of then."""
    stream = "lag-" + uuid.uuid4().hex[:10]
    rt = open_rt(stream, redis_url, postgres_url, ListSource(stream, {SHARD: dated(stream, 45, oldest_age_s=100)}))
    clock = FakeClock()
    events: list = []
    sink = SinkReporter(rt.config, SHARD, rt.key(SHARD).redis_key, events.append, clock=clock)

    def batch_takes_a_while(record) -> None:
        clock.now += 25.0  # each batch of 10 takes 25 s: a materialization every third batch or so
        sink.batch(record)

    report = drainer(rt, clock, budget(max_seconds=3600.0), on_batch=batch_takes_a_while).run()
    sink.finish(report)
    figures = [{k: v.value for k, v in e.metadata.items()} for e in events]
    assert all(isinstance(e, AssetMaterialization) for e in events) and len(events) >= 3
    assert figures[0]["events"] == 10 and figures[0]["stop_reason"] == "draining"  # at the first batch
    assert sum(f["events"] for f in figures) == 45  # each batch counted once
    assert figures[-1]["stop_reason"] == report.as_metadata()["stop_reason"]
    assert figures[-1]["checkpoint"] == report.checkpoint
    assert figures[0][LAG_SECONDS] > 0  # the lag while it was behind, not 0 after the fact
    rt.close()
