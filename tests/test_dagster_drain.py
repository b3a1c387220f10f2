"""Keeping up with a busy stream, on a real Dagster daemon: a run drains its shard's backlog, a run killed
mid-drain loses nothing, and a slow mirror never starves the consumers.

One module-scoped environment (``tests/support/e2e.py``): a moto server, a fresh Dagster storage
database with the repository's ``dagster.yaml``, a private Redis (the mirror reads every key of it) and
one ``dagster-daemon``, with the mirror schedule on (every minute, as shipped) beside two consumers:

* ``backlog``: the default-style drain (``max_events: 250``) of a backlog of thousands of events;
* ``kill``: its handler (``tests.support.dagster_daemon:deliveries_with_hold``) stops inside a chosen batch
  so that the test can SIGKILL the run worker there: between two batches, and inside one;
* ``lag``: a short lag objective (``max_lag_s``), whose sink asset and lag check the UI would show.

Oracles as in tests/test_dagster_e2e.py: per shard every produced record in the sink exactly once
(``e2e_deliveries`` has no unique key, so a batch committed twice would show), checkpoints only ever
advance, each run resumes at the acked position it was dispatched from.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from dagster import AssetCheckKey, AssetKey
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from durability_pipelines.consumer.drain import StopReason
from durability_pipelines.orchestration.assets import MIRROR_JOB
from tests.support.dagster_daemon import run_records, schedule_ticks
from tests.support.dynamodb import create_stream_table
from tests.support.e2e import (
    E2E,
    Consumer,
    assert_checkpoint_chain,
    assert_every_event_once,
    assert_runs_real_and_serial,
    batch_log_lines,
    batches_of,
    drain_output,
    e2e_environment,
)
from tests.support.servers import PrivateRedis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BACKLOG = 3000
BACKLOG_BATCH = 250
MIRROR_SCHEDULE = "checkpoint_mirror_schedule"
LAG_OBJECTIVE_S = 10
FRESHNESS_FAIL_S = 60  # Dagster's shortest window


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, postgres_admin_url: str) -> Iterator[E2E]:
    redis_server = PrivateRedis(appendonly=False)
    redis_server.start()

    def consumers(ddb: Any, suffix: str) -> dict[str, Consumer]:
        return {
            "backlog": Consumer(f"drain_backlog_{suffix}", create_stream_table(ddb)[0],
                                "tests.support.dagster_daemon:record_deliveries",
                                overrides={"max_events": BACKLOG_BATCH, "max_idle_s": 1}),
            "kill": Consumer(f"drain_kill_{suffix}", create_stream_table(ddb)[0],
                             "tests.support.dagster_daemon:deliveries_with_hold",
                             handler_options={"hold_flag": f"e2e:{suffix}:hold"},
                             overrides={"max_events": 100, "max_idle_s": 1}),
            # a short lease: a run whose node died is declared dead within about one lease
            "node": Consumer(f"drain_node_{suffix}", create_stream_table(ddb)[0],
                             "tests.support.dagster_daemon:deliveries_with_hold",
                             handler_options={"hold_flag": f"e2e:{suffix}:node_hold"},
                             overrides={"max_events": 100, "max_idle_s": 1, "lease_duration_s": 12}),
            "lag": Consumer(f"drain_lag_{suffix}", create_stream_table(ddb)[0],
                            "tests.support.dagster_daemon:record_deliveries",
                            overrides={"max_events": 100, "max_idle_s": 1, "max_lag_s": LAG_OBJECTIVE_S,
                                       # the sink's FreshnessPolicy, and a derived asset automation rebuilds
                                       "freshness": {"fail_after_s": FRESHNESS_FAIL_S},
                                       "events_per_minute": {"window_hours": 1}}),
        }

    try:
        with e2e_environment(tmp_path_factory.mktemp("dagster_drain"), postgres_url=postgres_url,
                             admin_url=postgres_admin_url, redis_url=redis_server.url, consumers=consumers) as env:
            yield env
    finally:
        redis_server.close()


def shard_of(e2e: E2E, c: Consumer) -> str:
    arn = e2e.ddb.describe_table(TableName=c.table)["Table"]["LatestStreamArn"]
    (shard,) = e2e.streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
    return shard["ShardId"]


def test_a_backlog_drains_in_fewer_runs_than_batches_and_every_event_lands_once(e2e: E2E) -> None:
    c = e2e.consumers["backlog"]
    with e2e.dump_on_failure():
        e2e.produce_new(c, BACKLOG)
        (shard,) = e2e.wait_drained(c)
        records = assert_every_event_once(e2e, c)
        assert len(records) == BACKLOG

        runs = e2e.runs(c)
        assert all(r.dagster_run.status.value == "SUCCESS" for r in runs)
        batches = batches_of(e2e.instance, runs)
        assert batches >= BACKLOG // BACKLOG_BATCH and len(runs) < batches  # the runs drained
        outputs = [drain_output(e2e.instance, r.dagster_run.run_id) for r in runs]
        assert sum(o["events"] for o in outputs) == BACKLOG
        assert {o["stop_reason"] for o in outputs} <= {s.value for s in StopReason}
        # every batch left its record in the run's event log, and the run's metadata sums them
        for run, out in zip(runs, outputs, strict=True):
            lines = batch_log_lines(e2e.instance, run.dagster_run.run_id)
            assert len(lines) == out["batches"] == len(out["batch_log"])
            assert sum(b["events"] for b in out["batch_log"]) == out["events"]
            assert out["batch_log"][-1]["checkpoint"] == out["checkpoint"]
            assert all(b["lag_s"] is not None and b["lag_s"] >= 0 for b in out["batch_log"])
        assert outputs[-1]["checkpoint"] == records[-1][1] and outputs[-1]["records_behind"] == 0
        assert_runs_real_and_serial(e2e, c, runs)
        assert_checkpoint_chain(e2e, c, shard, runs)


def kill_inside_a_batch(e2e: E2E, c: Consumer, where: str) -> None:
    """Produce a backlog whose 4th batch holds the marker item; SIGKILL the run worker while the handler
    holds it (``where``: before the batch's writes or after them, before the commit); then let it go on."""
    flag = c.handler_options["hold_flag"]
    marker = f"{c.name}-{where}-hold"
    e2e.redis.set(flag, f"{where}:{marker}")
    start = len(c.produced)
    e2e.produce(c, [f"{c.name}-{where}-{i:04d}" for i in range(350)] + [marker]
                + [f"{c.name}-{where}-{i:04d}" for i in range(350, 500)])
    shard = shard_of(e2e, c)
    held = e2e.wait(lambda: e2e.redis.get(f"{flag}:held"), f"the run to hold the batch of {marker}")
    pid, written = (int(x) for x in held.decode().split(":"))
    acked = e2e.redis_checkpoint(c, shard)
    (killed,) = [r for r in e2e.runs(c) if r.dagster_run.status.value == "STARTED"]
    committed = e2e.query("SELECT count(*) FROM e2e_deliveries WHERE stream = %s", c.table)[0][0]
    records = e2e.stream_records(c)
    sequences = [seq for _, seq, _ in records]
    marker_index = [pk for _, _, pk in records].index(marker)
    acked_index = sequences.index(acked)
    # the batches before the held one are acked and committed; the held one (<= 100 events, the marker in
    # it) is not: its rows are not written yet ('before') or written in the open transaction ('after_write')
    assert marker_index - 100 < acked_index < marker_index
    assert committed == acked_index + 1
    if where == "before":
        assert written == 0
    else:
        assert marker_index - acked_index <= written <= 100

    os.kill(pid, signal.SIGKILL)
    e2e.redis.delete(flag, f"{flag}:held")  # the dead handler cannot clear its own marker
    e2e.wait(lambda: e2e.instance.get_run_by_id(killed.dagster_run.run_id).status.value == "FAILURE",
             "the killed run to be marked failed (the code server sees its process die)")
    e2e.wait_drained(c)

    assert_every_event_once(e2e, c)  # nothing lost, the held batch's rows not committed twice
    runs = e2e.runs(c)
    after = [r for r in runs if r.create_timestamp > killed.create_timestamp]
    assert after and all(r.dagster_run.status.value == "SUCCESS" for r in after)
    assert after[0].dagster_run.tags["durability/start_after"] == acked  # resumed after the last acked batch
    assert drain_output(e2e.instance, after[0].dagster_run.run_id)["batch_log"][0]["first_sequence"] == (
        sequences[acked_index + 1])
    assert len(c.produced) - start == 501
    assert_runs_real_and_serial(e2e, c, runs)
    assert_checkpoint_chain(e2e, c, shard, runs, failed_may_write=True)


def test_a_run_killed_between_two_batches_resumes_after_the_last_acked_batch(e2e: E2E) -> None:
    with e2e.dump_on_failure():
        kill_inside_a_batch(e2e, e2e.consumers["kill"], "before")


def test_a_run_killed_inside_a_batch_loses_nothing_and_commits_nothing_twice(e2e: E2E) -> None:
    with e2e.dump_on_failure():
        kill_inside_a_batch(e2e, e2e.consumers["kill"], "after_write")


def test_a_shard_whose_node_died_is_redispatched_about_one_lease_later(e2e: E2E) -> None:
    """The whole node dies mid-drain (daemon, code server and run worker, SIGKILL) and a new daemon comes up
    on the same Dagster storage: the dead run stays STARTED there (no process is left to say otherwise),
    and its lease expires. The sensor tells it is dead by the lease, marks it failed and re-dispatches."""
    c = e2e.consumers["node"]
    flag = c.handler_options["hold_flag"]
    with e2e.dump_on_failure():
        marker = f"{c.name}-hold"
        e2e.redis.set(flag, f"after_write:{marker}")
        e2e.produce(c, [f"{c.name}-{i:04d}" for i in range(250)] + [marker] + [f"{c.name}-{i:04d}" for i in range(250, 400)])
        e2e.wait(lambda: e2e.redis.get(f"{flag}:held"), "the run to hold a batch")
        (dead,) = [r for r in e2e.runs(c) if r.dagster_run.status.value == "STARTED"]
        shard = shard_of(e2e, c)
        acked = e2e.redis_checkpoint(c, shard)
        e2e.replace_daemon()
        e2e.redis.delete(flag, f"{flag}:held")
        assert e2e.instance.get_run_by_id(dead.dagster_run.run_id).status.value == "STARTED"  # nobody said otherwise
        e2e.wait_drained(c, timeout=240)
        record = e2e.instance.get_run_record_by_id(dead.dagster_run.run_id)
        assert record.dagster_run.status.value == "FAILURE"
        failure = [e.message for e in e2e.instance.all_logs(dead.dagster_run.run_id)
                   if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE"]
        assert failure and "lease" in failure[-1] and "re-dispatches" in failure[-1]
        after = [r for r in e2e.runs(c) if r.create_timestamp > dead.create_timestamp]
        assert after and after[0].dagster_run.tags["durability/start_after"] == acked
        assert_every_event_once(e2e, c)
        assert_checkpoint_chain(e2e, c, shard, e2e.runs(c), failed_may_write=True)


def mirror_runs(e2e: E2E) -> list[Any]:
    return [r for r in run_records(e2e.instance, {}) if r.dagster_run.job_name == MIRROR_JOB]


def test_a_slow_mirror_runs_one_at_a_time_and_the_consumers_keep_acking(e2e: E2E) -> None:
    c = e2e.consumers["backlog"]
    in_flight_seen: list[int] = []

    def in_flight() -> list[Any]:
        busy = [r for r in mirror_runs(e2e) if r.dagster_run.status.value not in ("SUCCESS", "FAILURE", "CANCELED")]
        in_flight_seen.append(len(busy))
        return busy

    with e2e.dump_on_failure():
        # The schedule (every minute) has run the mirror and audit at least once: the audit table exists.
        e2e.wait(lambda: [r for r in mirror_runs(e2e) if r.dagster_run.status.value == "SUCCESS"],
                 "a first successful mirror run", timeout=180)
        # A slow mirror: its audit step waits on a lock this test holds on checkpoint_audit.
        with psycopg.connect(e2e.postgres_url) as blocker:
            blocker.execute("LOCK TABLE checkpoint_audit IN ACCESS EXCLUSIVE MODE")
            locked_at = time.time()
            def blocked() -> list[Any]:
                # A mirror run is started and some session waits for the lock on the audit table (the run may
                # have been created just before the lock was taken: it blocks all the same).
                waiting = e2e.query("SELECT count(*) FROM pg_locks WHERE relation = 'checkpoint_audit'::regclass"
                                    " AND NOT granted")[0][0]
                started = [r for r in in_flight() if r.dagster_run.status.value == "STARTED"]
                return started if waiting else []

            e2e.wait(blocked, "a mirror run to start (and block on the audit table)", timeout=150)
            # Meanwhile the consumers keep acking: a new burst is drained while the mirror is stuck.
            e2e.produce_new(c, 500)
            e2e.wait_drained(c)
            assert_every_event_once(e2e, c)
            # The next schedule tick skips, saying why, instead of queueing a second mirror run.
            def skipped_ticks() -> list[Any]:
                in_flight()
                return [t for t in schedule_ticks(e2e.instance, MIRROR_SCHEDULE, limit=20)
                        if t.timestamp > locked_at and t.status.value == "SKIPPED" and "still" in (t.skip_reason or "")]

            skipped = e2e.wait(skipped_ticks, "a skipped mirror tick", timeout=150)
            assert MIRROR_JOB in skipped[0].skip_reason
            assert len(in_flight()) == 1
            blocker.rollback()
        e2e.wait(lambda: not in_flight(), "the mirror run to finish once unblocked", timeout=150)

    assert max(in_flight_seen) == 1  # never two mirror runs queued or running at once
    runs = sorted(mirror_runs(e2e), key=lambda r: r.create_timestamp)
    for prev, nxt in zip(runs, runs[1:], strict=False):
        assert prev.end_time is not None and nxt.create_timestamp.timestamp() >= prev.end_time - 1, "mirror runs overlapped"
    assert all(r.dagster_run.tags.get("durability/role") == "maintenance" for r in runs)


def check_result_after(e2e: E2E, key: AssetCheckKey, after: float, status: AssetCheckExecutionRecordStatus,
                       timeout: float = 240) -> Any:
    """The first execution of the check (they run with every mirror run, each minute) created after
    ``after`` with ``status``."""
    def found() -> Any:
        history = e2e.instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
        done = [r for r in history if r.create_timestamp > after and r.status == status]
        return done[-1] if done else None
    return e2e.wait(found, f"a {status.value} execution of {key.to_user_string()} after {after}", timeout=timeout)


def freshness(e2e: E2E, key: AssetKey) -> str | None:
    record = e2e.instance.get_freshness_state_records([key]).get(key)
    return record.freshness_state.value if record is not None else None


def evaluation(record: Any) -> Any:
    return record.event.dagster_event.event_specific_data


def test_a_consumer_reports_lag_and_throughput_on_its_sink_and_its_lag_check_fails_while_it_is_stopped(
        e2e: E2E) -> None:
    c = e2e.consumers["lag"]
    sink = AssetKey([c.name, f"{c.name}_output"])  # record_deliveries describes no sink of its own
    check = AssetCheckKey(sink, "lag_within_objective")
    with e2e.dump_on_failure():
        e2e.produce_new(c, 300)
        (shard,) = e2e.wait_drained(c)
        # every run that wrote reported a materialization of the sink, with the figures Dagster plots
        mats = e2e.instance.fetch_materializations(sink, limit=100).records
        assert sum(m.asset_materialization.metadata["events"].value for m in mats) == 300
        assert {m.run_id for m in mats} <= {r.dagster_run.run_id for r in e2e.runs(c)}
        latest = mats[0].asset_materialization.metadata
        assert latest["shard"].value == shard and latest["events_per_s"].value > 0
        assert latest["reactive.records_behind"].value == 0 and latest["reactive.lag_seconds"].value == 0.0
        caught_up = time.time()
        passed = check_result_after(e2e, check, caught_up, AssetCheckExecutionRecordStatus.SUCCEEDED)
        assert evaluation(passed).metadata["reactive.lag_seconds"].value <= LAG_OBJECTIVE_S

        # Declarative automation rebuilt the derived table from the sink by itself (no test launched it), and
        # the daemon's freshness loop finds the sink fresh.
        rollup = AssetKey([c.name, f"{c.name}_events_per_minute"])
        def rolled_up() -> Any:
            found = e2e.instance.fetch_materializations(rollup, limit=20).records
            return [m for m in found if m.asset_materialization.metadata["events_in_window"].value == 300]
        derived = e2e.wait(rolled_up, "the automation sensor to materialize the events_per_minute asset", timeout=180)
        run = e2e.instance.get_run_by_id(derived[0].run_id)
        assert run.tags.get("dagster/sensor_name") == f"{c.name}_automation", run.tags  # the consumer's own sensor
        assert sum(n for (n,) in e2e.query(f'SELECT events FROM "{c.name}_events_per_minute"')) == 300
        e2e.wait(lambda: freshness(e2e, sink) == "PASS", "the sink's freshness state to be PASS", timeout=120)

        # The consumer stops (its sensor off) while the stream is still written: the check fails, naming
        # the shard, its lag and its last ack.
        e2e.set_sensor(c, running=False)
        e2e.wait(lambda: all(r.dagster_run.status.value in ("SUCCESS", "FAILURE", "CANCELED") for r in e2e.runs(c)),
                 "the consumer's runs to finish")
        stopped = time.time()
        e2e.produce_new(c, 40)
        failed = check_result_after(e2e, check, stopped + LAG_OBJECTIVE_S, AssetCheckExecutionRecordStatus.FAILED)
        description = evaluation(failed).description
        assert f"shard {shard}: lag" in description and "last ack 20" in description, description
        assert f"objective of {LAG_OBJECTIVE_S} s" in description and f"{c.name}_sensor" in description
        assert evaluation(failed).metadata["reactive.lag_seconds"].value > LAG_OBJECTIVE_S
        # Nothing written for longer than the freshness window: the daemon marks the sink FAIL.
        e2e.wait(lambda: freshness(e2e, sink) == "FAIL", "the sink's freshness state to be FAIL", timeout=240)

        # Running again, it catches up and the check passes again.
        e2e.set_sensor(c, running=True)
        e2e.wait_drained(c)
        recovered = time.time()
        check_result_after(e2e, check, recovered, AssetCheckExecutionRecordStatus.SUCCEEDED)
        e2e.wait(lambda: freshness(e2e, sink) == "PASS", "the sink's freshness state to pass again", timeout=120)
        assert_every_event_once(e2e, c)
