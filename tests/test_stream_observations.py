"""The consumer sensor observes its stream asset (and its sink's lag) at most once a minute per consumer.

A real sensor evaluation of the `orders_worker` starter (moto server, test Postgres and Redis) on a real
Dagster instance; its asset events are recorded the way the sensor daemon records them
(``instance.report_runless_asset_event``), so the rate limit reads what the daemon would have written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dagster import build_sensor_context

from durability_pipelines.observability import LAG_SECONDS
from durability_pipelines.orchestration.consumers import sink_asset_key, stream_asset_key
from durability_pipelines.orchestration.stream_observations import OBSERVE_EVERY_S, observation_due
from tests.support.dynamodb import clients, create_stream_table, put_items
from tests.support.inprocess import Driver
from tests.support.starters import starter_environment


@pytest.fixture
def env(monkeypatch, postgres_url: str, redis_url: str) -> Iterator[str]:
    with starter_environment(monkeypatch, postgres_url, redis_url) as url:
        yield url


def _value(metadata: dict, name: str):
    entry = metadata[name]
    return getattr(entry, "value", entry)


def test_a_tick_observes_the_stream_with_its_lag_and_then_not_again_within_a_minute(env: str) -> None:
    from durability_pipelines.definitions import build_definitions

    ddb, _ = clients(env)
    create_stream_table(ddb, "orders")
    put_items(ddb, "orders", [{"pk": f"o{i}", "total": i} for i in range(50)])
    time.sleep(2.1)  # the records wait: their age is the lag (moto's creation times have 1-s resolution)
    driver = Driver(build_definitions(), "orders_worker")
    cfg_stream, cfg_sink = stream_asset_key_of(driver), sink_asset_key_of(driver)

    first = driver.tick()
    assert first.run_requests  # the consumer's work is untouched: the shard is dispatched
    by_key = {e.asset_key: e for e in first.asset_events}
    assert set(by_key) == {cfg_stream, cfg_sink}
    stream = by_key[cfg_stream].metadata
    assert _value(stream, "consumer") == "orders_worker" and _value(stream, "shards") == 1
    assert _value(stream, "shards_waiting") == 1 and _value(stream, LAG_SECONDS) >= 1.0
    assert list(_value(stream, "acked").values()) == [None]  # nothing acked yet
    assert "| shard | acked | lag (s) |" in _value(stream, "per_shard")
    assert _value(by_key[cfg_sink].metadata, LAG_SECONDS) == _value(stream, LAG_SECONDS)  # the sink's plot

    for event in first.asset_events:  # what the sensor daemon does with a tick's asset events
        driver.instance.report_runless_asset_event(event)
    observed = driver.instance.fetch_observations(cfg_stream, limit=10).records
    assert len(observed) == 1

    for _ in range(3):  # ticks within the minute: nothing more is written to the event log
        assert not driver.tick().asset_events
    with build_sensor_context(instance=driver.instance) as ctx:
        cfg = driver_config(driver)
        assert not observation_due(ctx, cfg, cfg_stream)
        assert observation_due(ctx, cfg, cfg_stream, now=observed[0].timestamp + OBSERVE_EVERY_S)


def driver_config(driver: Driver):
    from durability_pipelines.consumer.config import ConsumerConfig
    from durability_pipelines.orchestration.consumers import CONFIG_METADATA

    job = driver.defs.resolve_job_def(f"{driver.consumer}_job")
    return ConsumerConfig.model_validate(job.metadata[CONFIG_METADATA].value)


def stream_asset_key_of(driver: Driver):
    return stream_asset_key(driver_config(driver))


def sink_asset_key_of(driver: Driver):
    return sink_asset_key(driver_config(driver))
