"""End to end on a real Dagster instance: the sensor's ticks launch real runs through a real daemon.

One module-scoped environment (``e2e``):

* a moto server (``tests.support.dynamodb.moto_server``) with one table + stream per consumer;
* a temporary ``DAGSTER_HOME`` holding a copy of the repository's ``dagster_home/dagster.yaml`` (the
  real file: dagster-postgres storage from ``DAGSTER_POSTGRES_URL``, QueuedRunCoordinator with the
  per-shard tag limit, run retries) on a fresh database of the test PostgreSQL;
* ``dagster-daemon run -w workspace.yaml`` (sensor daemon, run queue, run launcher) in its own process
  group, with ``DURABILITY_*`` / AWS variables and ``DURABILITY_CONSUMERS_DIR`` pointing at three
  consumer YAMLs written here (all hybrid checkpoints, ``sensor_interval_s: 1``, ``max_events: 100``):

  - ``main``: the happy path (tests 1-2) and two node failovers (test 3): a new node restores the
    sensor cursor from the Redis mirror, then a third one from the Postgres mirror (Redis copy deleted);
  - ``retry``: a run that fails (its shard is leased by a foreign worker) is re-dispatched (test 4);
  - ``poison``: a dead-lettered batch stops the shard until an operator acts (test 5).

The handlers (``tests.support.dagster_daemon``) write through the real default sink into
``stream_events`` and, in the same transaction, one ``e2e_deliveries`` row per event: that table
has no unique key, so it shows a batch committed twice, which ``stream_events`` (``ON CONFLICT DO
NOTHING``) would hide.

The sensor daemon evaluates a sensor at most about every 5 s, whatever its minimum interval, so batches are 100 events and the
tests share one daemon (test 3 replaces it twice; tests 4-5 run on the third node). Redis is the test
server on a logical db no session flushes. Every wait is a deadline loop (a hang guard).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from durability_pipelines import services
from durability_pipelines.checkpoints import SaveContext
from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore, PostgresConnection
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore
from durability_pipelines.consumer.cursor_mirror import REDIS_PREFIX as CURSOR_MIRROR_PREFIX
from durability_pipelines.consumer.storage import ConsumerStorage
from tests.support.dagster_daemon import (
    sensor_cursor,
    sensor_state,
    sensor_ticks,
    tick_log_messages,
)
from tests.support.dynamodb import create_stream_table
from tests.support.e2e import (
    E2E,
    FLUSH_EVERY_N,
    FLUSH_EVERY_S,
    Consumer,
    assert_checkpoint_chain,
    assert_every_event_once,
    assert_runs_real_and_serial,
    batch_log_lines,
    batches_of,
    e2e_environment,
    redis_history,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FOREIGN_OWNER = "e2e-foreign-worker"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, postgres_admin_url: str,
        redis_url: str) -> Iterator[E2E]:
    # The session's Redis server on a logical db that is never flushed (as tests/test_cli.py does): the
    # shared fixture's db is flushed whenever a pytest session starts, and a colleague's session once
    # wiped this module's checkpoints mid-test. Keys here are unique; teardown deletes them.
    e2e_redis_url = services.with_redis_db(redis_url, (int(os.environ.get("DURABILITY_TEST_REDIS_DB", "13")) + 1) % 16)

    def consumers(ddb: Any, suffix: str) -> dict[str, Consumer]:
        handler = "tests.support.dagster_daemon:record_deliveries"
        return {
            "main": Consumer(f"e2e_main_{suffix}", create_stream_table(ddb)[0], handler),
            # a run that finds a live foreign owner asks it for the shard and gives up after handoff_timeout_s
            "retry": Consumer(f"e2e_retry_{suffix}", create_stream_table(ddb)[0], handler,
                              overrides={"handoff_timeout_s": 5}),
            "poison": Consumer(
                f"e2e_poison_{suffix}", create_stream_table(ddb)[0], "tests.support.dagster_daemon:poison_until_fixed",
                handler_options={"poison_pk": "poison", "fixed_flag": f"e2e:{suffix}:poison_fixed"},
            ),
        }

    with e2e_environment(
        tmp_path_factory.mktemp("dagster_e2e"), postgres_url=postgres_url, admin_url=postgres_admin_url,
        redis_url=e2e_redis_url, consumers=consumers,
        # The code location also schedules the Redis<->Postgres checkpoint mirror every minute. Kept out
        # of this module: it would mask the consumer's own hybrid flush bound asserted here
        # (tests/test_dagster_drain.py runs it beside its consumers).
        extra_env={"DURABILITY_MIRROR_CRON": "0 0 1 1 *"},
    ) as env:
        yield env


def assert_postgres_within_hybrid_bound(e2e: E2E, c: Consumer, shard: str) -> None:
    """Hybrid: Postgres holds the checkpoint, never ahead of Redis, and at the last ack owed no flush
    (fewer than N acks and less than T seconds since the last flush); an ack after T seconds brings
    Postgres to Redis's value."""
    r, p = e2e.redis_checkpoint(c, shard), e2e.pg_checkpoint(c, shard)
    assert r is not None and p is not None
    assert int(p) <= int(r)
    state = {k.decode(): int(v) for k, v in e2e.redis.hgetall(c.key(shard).hybrid_state_key).items()}
    assert state.get("acks", 0) < FLUSH_EVERY_N, state
    if p != r:
        last_ack_ms = int(redis_history(e2e, c, shard)[-1]["ms"])
        assert last_ack_ms - state["flushed_ms"] < FLUSH_EVERY_S * 1000, (state, last_ack_ms)
        # T seconds after that flush, one more (idempotent) ack flushes.
        wait_s = (state["flushed_ms"] + FLUSH_EVERY_S * 1000) / 1000 - time.time()
        time.sleep(max(0.0, wait_s) + 0.2)
        store = HybridCheckpointStore(RedisCheckpointStore.from_url(e2e.redis_url),
                                      PostgresCheckpointStore(e2e.postgres_url),
                                      flush_every_n=FLUSH_EVERY_N, flush_every_s=FLUSH_EVERY_S)
        try:
            result = store.save(c.key(shard), r, context=SaveContext(writer="e2e-test", reason="idempotent re-ack"))
            assert result.outcome.value == "unchanged"
        finally:
            store.close(flush=False)
            store.redis.client.close()
        assert e2e.pg_checkpoint(c, shard) == r


def drain_first_wave(e2e: E2E, c: Consumer, n: int) -> dict[str, str]:
    if not c.produced:
        e2e.produce_new(c, n)
    return e2e.wait_drained(c)


# --------------------------------------------------------------------------- tests


def test_sensor_ticks_launch_runs_that_checkpoint_every_event(e2e: E2E) -> None:
    c = e2e.consumers["main"]
    with e2e.dump_on_failure():
        e2e.produce_new(c, 200)
        last = e2e.wait_drained(c)
        (shard,) = last

        records = assert_every_event_once(e2e, c)
        assert e2e.redis_checkpoint(c, shard) == records[-1][1]

        runs = e2e.runs(c)
        assert all(r.dagster_run.status.value == "SUCCESS" for r in runs)
        # 200 events, at most 100 per batch: runs drain, so there are fewer runs than batches, and every
        # batch left its record in its run's event log
        batches = batches_of(e2e.instance, runs)
        assert batches >= 2 and len(runs) < batches
        assert sum(len(batch_log_lines(e2e.instance, r.dagster_run.run_id)) for r in runs) == batches
        assert_runs_real_and_serial(e2e, c, runs)
        assert_checkpoint_chain(e2e, c, shard, runs)
        # every delivery was committed by one of these runs
        delivered_by = {row[0] for row in e2e.query(
            "SELECT DISTINCT run_id FROM e2e_deliveries WHERE stream = %s", c.table)}
        assert delivered_by <= {r.dagster_run.run_id for r in runs}

        # caught up: the next tick dispatches nothing
        e2e.wait_tick_after(c, max(r.end_time for r in runs), contains="caught up")
        assert len(e2e.runs(c)) == len(runs)

        assert_postgres_within_hybrid_bound(e2e, c, shard)


def test_more_writes_while_running_are_picked_up(e2e: E2E) -> None:
    c = e2e.consumers["main"]
    with e2e.dump_on_failure():
        first = drain_first_wave(e2e, c, 150)
        (shard,) = first
        before = {r.dagster_run.run_id for r in e2e.runs(c)}
        drained_at = time.time()

        e2e.produce_new(c, 60)
        time.sleep(1.0)  # the daemon keeps running: a second write burst while it polls
        e2e.produce_new(c, 60)
        last = e2e.wait_drained(c)
        assert int(last[shard]) > int(first[shard])

        assert_every_event_once(e2e, c)
        runs = e2e.runs(c)
        new = [r for r in runs if r.dagster_run.run_id not in before]
        assert new and all(r.dagster_run.status.value == "SUCCESS" for r in new)
        assert all(r.start_time >= drained_at - 1 for r in new)
        assert new[0].dagster_run.tags["durability/start_after"] == first[shard]  # resumed at the acked position
        assert_runs_real_and_serial(e2e, c, runs)
        assert_checkpoint_chain(e2e, c, shard, runs)
        assert_postgres_within_hybrid_bound(e2e, c, shard)


def fail_over(e2e: E2E, c: Consumer, *, expect_origin: str) -> tuple[Any, str]:
    """Kill the current node once it is idle and start a new one (new empty DAGSTER_HOME, new storage
    database, new daemon). Asserts the new node's sensor restored the old node's cursor from the
    ``expect_origin`` mirror and dispatched nothing. Returns (old instance, the cursor)."""
    old = e2e.daemon
    old_instance = old.home.instance()
    old_runs = e2e.runs(c, old_instance)
    e2e.wait_tick_after(c, max((r.end_time for r in old_runs), default=0.0), contains="caught up")

    old.stop()  # the node dies: the whole process group, nothing left behind
    assert not old.alive() and not old.group_members()

    dagster_cursor = sensor_cursor(old_instance, c.sensor)
    mirror_redis = e2e.redis.get(f"{CURSOR_MIRROR_PREFIX}:{c.sensor}")
    ((mirror_pg,),) = e2e.query("SELECT cursor FROM sensor_cursors WHERE sensor_name = %s", c.sensor)
    assert dagster_cursor and mirror_redis
    assert json.loads(mirror_redis) == json.loads(mirror_pg) == json.loads(dagster_cursor)
    if expect_origin == "postgres":
        e2e.redis.delete(f"{CURSOR_MIRROR_PREFIX}:{c.sensor}")  # Redis lost it: Postgres is the fallback

    new = e2e.start_node()
    assert new.home.database != old.home.database and new.home.path != old.home.path
    new_instance = e2e.instance
    assert sensor_state(new_instance, c.sensor) is None  # an empty instance: no Dagster cursor
    first_tick = e2e.wait(
        lambda: [t for t in sensor_ticks(new_instance, c.sensor)[-1:] if t.status.value != "STARTED"],
        f"the first tick of {c.sensor} on the new node to complete")[0]
    messages = tick_log_messages(new_instance, first_tick)
    assert any(f"restored the cursor from the {expect_origin} mirror" in m for m in messages), messages
    # the new node's Dagster cursor is the old node's, and it dispatched nothing
    restored = e2e.wait(lambda: sensor_cursor(new_instance, c.sensor), "the new node's sensor cursor")
    assert json.loads(restored) == json.loads(dagster_cursor)
    assert e2e.runs(c, new_instance) == []
    return old_instance, dagster_cursor


def test_failover_restores_the_sensor_cursor_from_the_mirror(e2e: E2E) -> None:
    c = e2e.consumers["main"]
    with e2e.dump_on_failure():
        before = drain_first_wave(e2e, c, 100)
        (shard,) = before
        old_instance, _ = fail_over(e2e, c, expect_origin="redis")
        old_runs = e2e.runs(c, old_instance)
        new_instance = e2e.instance

        # Writes after the failover are processed by the new node, from the acked position.
        e2e.produce_new(c, 100)
        last = e2e.wait_drained(c)
        new_runs = e2e.runs(c, new_instance)
        assert new_runs and all(r.dagster_run.status.value == "SUCCESS" for r in new_runs)
        assert new_runs[0].dagster_run.tags["durability/start_after"] == before[shard]
        assert e2e.redis_checkpoint(c, shard) == last[shard]

        # Nothing processed twice, checkpoints never went backwards across both nodes.
        assert_every_event_once(e2e, c)
        assert_runs_real_and_serial(e2e, c, new_runs)
        assert_checkpoint_chain(e2e, c, shard, old_runs + new_runs)

        # A second failover with the Redis copy of the cursor gone: restored from Postgres.
        # (The following tests run on this third node.)
        fail_over(e2e, c, expect_origin="postgres")


def test_failed_batch_is_redispatched_not_skipped(e2e: E2E) -> None:
    from dagster import DagsterEventType

    c = e2e.consumers["retry"]
    with e2e.dump_on_failure():
        (shard_desc,) = e2e.streams.describe_stream(
            StreamArn=e2e.ddb.describe_table(TableName=c.table)["Table"]["LatestStreamArn"]
        )["StreamDescription"]["Shards"]
        shard = shard_desc["ShardId"]
        # A live foreign worker holds the shard's lease (it renews it) and never hands it over: the run's
        # drain_shard asks for it, waits handoff_timeout_s, and fails naming the holder.
        store = HybridCheckpointStore(RedisCheckpointStore.from_url(e2e.redis_url),
                                      PostgresCheckpointStore(e2e.postgres_url))
        lease = store.leases.acquire(c.key(shard).lease_key, FOREIGN_OWNER, 300)
        assert lease is not None
        alive = threading.Event()
        alive.set()

        def renew() -> None:
            while alive.is_set():
                store.leases.renew(lease, 300)
                time.sleep(0.5)

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        try:
            e2e.produce_new(c, 80)  # one batch
            failed = e2e.wait(lambda: [r for r in e2e.runs(c) if r.dagster_run.status.value == "FAILURE"],
                              "a run failing on the leased shard")[0]
        finally:
            alive.clear()
            renewer.join(timeout=10)
            store.leases.release(lease)
            store.close(flush=False)
        failure_text = " ".join(
            str(e.dagster_event.event_specific_data)
            for e in e2e.instance.all_logs(failed.dagster_run.run_id, of_type=DagsterEventType.STEP_FAILURE))
        assert FOREIGN_OWNER in failure_text and "drain_shard" in str(
            [e.step_key for e in e2e.instance.all_logs(failed.dagster_run.run_id,
                                                       of_type=DagsterEventType.STEP_FAILURE)])
        assert e2e.redis_checkpoint(c, shard) is None  # the failed batch was not skipped

        e2e.wait_drained(c)
        runs = e2e.runs(c)
        tags = [r.dagster_run.tags for r in runs]
        initial = [(t["dagster/run_key"], t["durability/attempt"], r.dagster_run.status.value)
                   for t, r in zip(tags, runs, strict=True) if t["durability/start_after"] == "INITIAL"]
        failures = [x for x in initial if x[2] == "FAILURE"]
        successes = [x for x in initial if x[2] == "SUCCESS"]
        # attempts 0..k-1 failed, attempt k (>= 1) succeeded from the same acked position
        assert [int(a) for _, a, _ in initial] == list(range(len(initial))), initial
        assert len(successes) == 1 and failures and successes[0] == initial[-1]
        k = len(failures)
        assert successes[0][0] == f"{c.name}:{shard}:INITIAL:a{k}"
        assert_every_event_once(e2e, c)
        assert_runs_real_and_serial(e2e, c, runs)
        assert_checkpoint_chain(e2e, c, shard, runs)


def test_dead_lettered_batch_stops_the_shard_until_an_operator_retries(e2e: E2E) -> None:
    c = e2e.consumers["poison"]
    flag = c.handler_options["fixed_flag"]
    db = PostgresConnection(e2e.postgres_url)
    storage = ConsumerStorage(db)
    with e2e.dump_on_failure(), contextlib.closing(db):
        e2e.produce(c, [f"ok-{i:03d}" for i in range(40)] + ["poison"] + [f"ok-{i:03d}" for i in range(40, 80)])
        records = e2e.stream_records(c)
        (shard,) = {s for s, _, _ in records}

        dl = e2e.wait(lambda: storage.dead_letters(c.name, status="open"), "an open dead letter")[0]
        assert (dl.shard, dl.first_sequence, dl.last_sequence, dl.record_count) == (
            shard, records[0][1], records[-1][1], len(records))
        assert dl.policy == "stop" and dl.attempts == c.retry["max_retries"] + 1 and "poison" in dl.error
        failed = e2e.wait(lambda: [r for r in e2e.runs(c) if r.dagster_run.status.value == "FAILURE"],
                          "the dead-lettering run to fail")
        assert dl.run_id == failed[0].dagster_run.run_id
        assert e2e.redis_checkpoint(c, shard) is None  # nothing acked, nothing skipped
        assert e2e.query("SELECT count(*) FROM stream_events WHERE stream = %s", c.table) == [(0,)]

        # While the dead letter is open the shard stops: ticks skip it, no run is dispatched.
        e2e.wait_tick_after(c, failed[0].end_time, contains="open dead letter", count=2)
        assert len(e2e.runs(c)) == 1

        # The operator fixes the handler and asks for a retry.
        e2e.redis.set(flag, "1")
        assert storage.set_dead_letter_status(dl.id, "retry", by="e2e-operator", note="handler fixed")
        e2e.wait_drained(c)

        runs = e2e.runs(c)
        assert [r.dagster_run.status.value for r in runs] == ["FAILURE", "SUCCESS"]
        assert runs[1].dagster_run.tags["dagster/run_key"] == f"{c.name}:{shard}:INITIAL:a1"
        assert_every_event_once(e2e, c)
        assert [d.status for d in storage.dead_letters(c.name)] == ["retry"]  # no new dead letter
        assert int(e2e.redis.get(f"{flag}:calls")) == dl.attempts + 1
        assert_runs_real_and_serial(e2e, c, runs)
        assert_checkpoint_chain(e2e, c, shard, runs)
