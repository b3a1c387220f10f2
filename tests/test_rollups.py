"""A consumer's sink is a real asset for what Dagster builds on it: a ``FreshnessPolicy`` derived from
``max_lag_s``, and a downstream asset (``events_per_minute``: the sink's ``stream_events`` rows per minute and
event name) that declarative automation materializes again whenever the sink is.

Real PostgreSQL (the session's fresh database); Dagster's own automation evaluation on a test instance. The
daemon's side (the automation sensor and the freshness loop acting on a draining consumer) is in
``tests/test_dagster_drain.py``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest

from durability_pipelines.audit.rollup import rebuild, rollup_table
from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.consumer.config import ConsumerConfig, load_consumer_config
from durability_pipelines.consumer.storage import ensure
from durability_pipelines.orchestration.consumers import build_consumer_defs, sink_asset_key, sink_asset_spec
from durability_pipelines.orchestration.resources import DurabilityResource
from durability_pipelines.orchestration.rollups import rollup_asset_key


def consumer(**overrides: Any) -> ConsumerConfig:
    name = overrides.pop("name", f"rollup_{secrets.token_hex(3)}")
    return ConsumerConfig.model_validate({
        "name": name, "source": {"kind": "dynamodb", "table": f"{name}_table", "region": "us-east-1"},
        "group": "g", "consumer": "c", **overrides})


@pytest.fixture
def db(postgres_url: str) -> Iterator[PostgresConnection]:
    conn = PostgresConnection(postgres_url)
    ensure(conn)
    yield conn
    conn.close()


def insert_events(postgres_url: str, stream: str, rows: list[tuple[str, datetime | None]]) -> None:
    """``stream_events`` rows as the default sink writes them: (event name, event time)."""
    with psycopg.connect(postgres_url) as conn:
        start = conn.execute("SELECT count(*) FROM stream_events WHERE stream = %s", (stream,)).fetchone()[0]
        for i, (name, at) in enumerate(rows):
            conn.execute(
                "INSERT INTO stream_events (stream, shard, sequence, adapter, event_name, event_created_at, consumer)"
                " VALUES (%s, 'shard-1', %s, 'dynamodb', %s, %s, 'c')", (stream, f"{start + i:020d}", name, at))


def drop(postgres_url: str, cfg: ConsumerConfig) -> None:
    with psycopg.connect(postgres_url) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{rollup_table(cfg.name)}"')
        conn.execute("DELETE FROM stream_events WHERE stream = %s", (cfg.stream,))


def test_the_rollup_counts_each_minute_and_event_name_in_its_window_and_a_late_backlog_lands_in_its_minutes(
        db: PostgresConnection, postgres_url: str) -> None:
    cfg = consumer()
    minute = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(minutes=10)
    try:
        insert_events(postgres_url, cfg.stream, [("INSERT", minute + timedelta(seconds=5))] * 3
                      + [("MODIFY", minute + timedelta(seconds=59))]
                      + [("INSERT", minute + timedelta(minutes=1))] * 2
                      + [("REMOVE", minute - timedelta(hours=3))])  # outside a 2-hour window
        first = rebuild(db, cfg.name, cfg.stream, window_s=2 * 3600)
        assert first.events == 6 and first.events_newest_minute == 2
        rows = {(r.minute, r.event_name): r.events for r in first.frame.itertuples()}
        assert rows == {(minute, "INSERT"): 3, (minute, "MODIFY"): 1, (minute + timedelta(minutes=1), "INSERT"): 2}
        # A backlog drained later: its events count in the minute they happened, not when they were written.
        insert_events(postgres_url, cfg.stream, [("INSERT", minute + timedelta(seconds=30))] * 4)
        rebuild(db, cfg.name, cfg.stream, window_s=2 * 3600)
        with psycopg.connect(postgres_url) as conn:
            stored = dict(conn.execute(
                f'SELECT event_name, events FROM "{rollup_table(cfg.name)}" WHERE minute = %s', (minute,)).fetchall())
        assert stored == {"INSERT": 7, "MODIFY": 1}
    finally:
        drop(postgres_url, cfg)


def test_a_stream_with_nothing_in_the_window_gives_an_empty_table_not_an_error(
        db: PostgresConnection, postgres_url: str) -> None:
    cfg = consumer()
    try:
        empty = rebuild(db, cfg.name, cfg.stream, window_s=3600)
        assert empty.events == 0 and empty.newest_minute is None and empty.frame.empty
        with psycopg.connect(postgres_url) as conn:
            assert conn.execute(f'SELECT count(*) FROM "{rollup_table(cfg.name)}"').fetchone()[0] == 0
    finally:
        drop(postgres_url, cfg)


def defs_of(cfg: ConsumerConfig, postgres_url: str) -> dg.Definitions:
    stream = dg.AssetSpec(["streams", cfg.adapter, cfg.stream])
    return dg.Definitions.merge(build_consumer_defs(cfg), dg.Definitions(
        assets=[stream], resources={"durability": DurabilityResource(postgres_url=postgres_url)}))


def test_declarative_automation_materializes_the_rollup_each_time_the_sink_is_materialized_and_not_otherwise(
        postgres_url: str) -> None:
    cfg = consumer(events_per_minute={"window_hours": 1})
    defs = defs_of(cfg, postgres_url)
    sensor = defs.resolve_sensor_def(f"{cfg.name}_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING  # no switch to find in the UI
    with dg.instance_for_test() as instance:
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert result.total_requested == 0  # the sink was never materialized: nothing to derive yet
        instance.report_runless_asset_event(dg.AssetMaterialization(sink_asset_key(cfg)))  # a run wrote a batch
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.total_requested == 1 and result.get_num_requested(rollup_asset_key(cfg)) == 1
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.total_requested == 0  # requested once per new sink materialization


def test_the_rollup_asset_materializes_with_row_count_and_the_events_of_its_newest_minute(postgres_url: str) -> None:
    cfg = consumer(events_per_minute={"window_hours": 1})
    now = datetime.now(timezone.utc)
    try:
        insert_events(postgres_url, cfg.stream, [("INSERT", now)] * 5)
        defs = defs_of(cfg, postgres_url)
        job = defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(asset_selection=[rollup_asset_key(cfg)])
        assert result.success
        (mat,) = result.asset_materializations_for_node(result.dagster_run.step_keys_to_execute[0]
                                                        if result.dagster_run.step_keys_to_execute else
                                                        rollup_asset_key(cfg).to_python_identifier())
        assert mat.metadata["dagster/row_count"].value == 1
        assert mat.metadata["events_in_window"].value == 5 and mat.metadata["events_newest_minute"].value == 5
    finally:
        drop(postgres_url, cfg)


def test_the_sink_has_no_freshness_policy_unless_asked_and_then_fails_max_lag_s_plus_a_minute_after_its_last_write(
        postgres_url: str) -> None:
    plain = consumer()
    assert sink_asset_spec(plain).freshness_policy is None  # a quiet stream would fail it

    derived = consumer(max_lag_s=300, freshness={})
    policy = defs_of(derived, postgres_url).resolve_asset_graph().get(sink_asset_key(derived)).freshness_policy
    assert policy.fail_window.to_timedelta() == timedelta(seconds=360) and policy.warn_window is None

    short = consumer(max_lag_s=5, freshness={"enabled": True})
    policy = sink_asset_spec(short).freshness_policy
    assert policy.fail_window.to_timedelta() == timedelta(seconds=65)

    own = consumer(freshness={"fail_after_s": 900, "warn_after_s": 300})
    policy = sink_asset_spec(own).freshness_policy
    assert (policy.fail_window.to_timedelta(), policy.warn_window.to_timedelta()) == (
        timedelta(seconds=900), timedelta(seconds=300))

    off = consumer(freshness={"enabled": False})
    assert sink_asset_spec(off).freshness_policy is None


def test_freshness_windows_dagster_cannot_evaluate_are_refused_with_the_field_named(tmp_path: Path) -> None:
    base = ("type: durability_pipelines.components.StreamConsumer\nattributes:\n  name: fresh\n"
            "  source: {kind: dynamodb, table: t, region: us-east-1}\n  group: g\n  consumer: c\n")

    def load(extra: str) -> ConsumerConfig:
        path = tmp_path / "defs.yaml"
        path.write_text(base + extra)
        return load_consumer_config(path)

    with pytest.raises(ConfigError, match=r"freshness\.fail_after_s.*greater than or equal to 60"):
        load("  freshness: {fail_after_s: 30}\n")
    with pytest.raises(ConfigError, match=r"warn_after_s \(400 s\) must be below the fail window \(360 s"):
        load("  max_lag_s: 300\n  freshness: {warn_after_s: 400}\n")
    with pytest.raises(ConfigError, match=r"events_per_minute\.window_hourz"):
        load("  events_per_minute: {window_hourz: 2}\n")
    assert load("  freshness: {}\n  events_per_minute: {}\n").events_per_minute.window_hours == 24


def test_with_rebuild_every_minutes_the_rollup_is_rebuilt_at_most_once_a_period_after_the_sink_was_materialized(
        postgres_url: str) -> None:
    cfg = consumer(events_per_minute={"window_hours": 1, "rebuild_every_minutes": 5})
    defs = defs_of(cfg, postgres_url)
    now = datetime.now(timezone.utc)
    tick = now.replace(minute=now.minute - now.minute % 5, second=0, microsecond=0)  # the period's cron tick
    if tick + timedelta(minutes=5) - now < timedelta(seconds=10):  # keep the whole test inside one period
        time.sleep((tick + timedelta(minutes=5) - now).total_seconds() + 0.5)
        now = datetime.now(timezone.utc)
        tick = now.replace(minute=now.minute - now.minute % 5, second=0, microsecond=0)
    with dg.instance_for_test() as instance:
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=tick - timedelta(
            minutes=1))
        assert result.total_requested == 0
        for _ in range(3):  # three batches land in this period
            instance.report_runless_asset_event(dg.AssetMaterialization(sink_asset_key(cfg)))
        asked = []
        for at in (now + timedelta(seconds=1), now + timedelta(seconds=2), tick + timedelta(minutes=5, seconds=1)):
            result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor,
                                                       evaluation_time=at)
            asked.append(result.get_num_requested(rollup_asset_key(cfg)))
    # one rebuild for the period's three materializations; none in the next period, which has none of its own
    assert asked == [1, 0, 0]


def test_rebuild_every_minutes_must_divide_the_hour() -> None:
    with pytest.raises(ValueError, match="divisor of 60"):
        consumer(events_per_minute={"rebuild_every_minutes": 7})
    assert consumer(events_per_minute={"rebuild_every_minutes": 60}).events_per_minute.cron() == "0 * * * *"
    assert consumer(events_per_minute={}).events_per_minute.cron() is None  # eager, the default
