"""Many shards, few runs, on a real Dagster daemon: a consumer run owns a set of shards (up to
``max_shards_per_run``) and drains each on its own thread with its own lease and checkpoint
(``consumer/shard_set.py``); the sensor packs the shards that need a run into runs.

The stream is a Kinesis Data Stream (DynamoDB's Kinesis destination, ``source.kind: dynamodb_kinesis``) on
moto with many shards, records in the destination's format (``tests/support/kinesis.py``). One module-scoped
environment (``tests/support/e2e.py``: moto, a fresh Dagster storage database with the repository's
``dagster.yaml``, a private Redis, one ``dagster-daemon``).

The KCL oracle throughout: every record in the sink, each committed exactly once (``e2e_deliveries`` has no
unique key), per-shard order.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from durability_pipelines.orchestration.consumers import SHARDS_TAG
from tests.support.dynamodb import AWS_TEST_ENV
from tests.support.e2e import E2E, Consumer, drain_output, e2e_with_private_redis
from tests.support.kinesis import aws_semantics, change_record, create_stream, kinesis_client, put_changes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMMON = {"max_events": 100, "lease_duration_s": 30, "max_idle_s": 2, "max_run_seconds": 120,
          "successor_lead_s": 30, "handoff_timeout_s": 20}


def kinesis_consumer(ddb: Any, name: str, shards: int, per_run: int, handler: str,
                     handler_options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
                     ) -> Consumer:
    table = f"{name}_table"
    stream = create_stream(kinesis_client(ddb.meta.endpoint_url), shards, name=f"{name}-stream")
    source = {"kind": "dynamodb_kinesis", "table": table, "stream_name": stream,
              "region": AWS_TEST_ENV["AWS_DEFAULT_REGION"], "initial_position": "TRIM_HORIZON", "trim_policy": "fail"}
    return Consumer(name, table, handler, handler_options=handler_options or {},
                    overrides={"source": source, "max_shards_per_run": per_run, **COMMON, **(overrides or {})})


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, postgres_admin_url: str) -> Iterator[E2E]:
    def consumers(ddb: Any, suffix: str) -> dict[str, Consumer]:
        return {
            "wide": kinesis_consumer(ddb, f"sets_wide_{suffix}", 16, 4, "tests.support.dagster_daemon:record_deliveries"),
            "kill": kinesis_consumer(ddb, f"sets_kill_{suffix}", 8, 4, "tests.support.dagster_daemon:deliveries_with_hold",
                                     {"hold_flag": f"sets:{suffix}:hold"}),
            "poison": kinesis_consumer(ddb, f"sets_poison_{suffix}", 8, 4,
                                       "tests.support.dagster_daemon:poison_until_fixed",
                                       {"poison_pk": f"poison-{suffix}", "fixed_flag": f"sets:{suffix}:fixed"}),
            "stop": kinesis_consumer(ddb, f"sets_stop_{suffix}", 4, 4, "tests.support.dagster_daemon:record_deliveries",
                                     overrides={"keep_owned": True, "max_run_seconds": 600,
                                                # Postgres only when the run closes: the stop must flush it
                                                "checkpoint": {"backend": "hybrid", "flush_every_n": 100_000,
                                                               "flush_every_s": 3600}}),
        }

    with aws_semantics(), e2e_with_private_redis(
            tmp_path_factory.mktemp("dagster_shard_sets"), postgres_url=postgres_url, admin_url=postgres_admin_url,
            consumers=consumers) as env:
        yield env


def produce(e2e: E2E, c: Consumer, n: int, *, extra: list[str] = ()) -> dict[str, list[tuple[str, str]]]:
    """``n`` changes (and the items named in ``extra``) written to the consumer's Kinesis stream; per shard the
    (sequence, pk) written."""
    start = len(c.produced)
    pks = [f"{c.name}-{start + i:05d}" for i in range(n)] + list(extra)
    written = put_changes(kinesis_client(e2e.endpoint), c.overrides["source"]["stream_name"],
                          [change_record(c.table, pk, i) for i, pk in enumerate(pks)])
    c.produced.extend(pks)
    return written


def merge(into: dict[str, list[tuple[str, str]]], more: dict[str, list[tuple[str, str]]]) -> None:
    for shard, written in more.items():
        into.setdefault(shard, []).extend(written)


def wait_checkpoints(e2e: E2E, c: Consumer, last: dict[str, str], what: str) -> None:
    e2e.wait(lambda: all(e2e.redis_checkpoint(c, s) == seq for s, seq in last.items()), f"{c.name}: {what}")


def assert_each_record_once_in_shard_order(e2e: E2E, c: Consumer, written: dict[str, list[tuple[str, str]]],
                                           *, except_shards: tuple[str, ...] = ()) -> None:
    expected = {s: [seq for seq, _ in w] for s, w in written.items() if s not in except_shards}
    rows = e2e.query("SELECT shard, sequence FROM e2e_deliveries WHERE stream = %s ORDER BY id", c.table)
    delivered: dict[str, list[str]] = {}
    for shard, seq in rows:
        delivered.setdefault(shard, []).append(seq)
    for shard, seqs in expected.items():
        assert delivered.get(shard) == seqs, f"shard {shard}: delivered out of order, twice or not at all"
    (total, distinct), = e2e.query(
        "SELECT count(*), count(DISTINCT (shard, sequence)) FROM stream_events WHERE stream = %s", c.table)
    assert total == distinct


def shards_of(run: Any) -> list[str]:
    tags = run.dagster_run.tags
    return tags[SHARDS_TAG].split(",") if SHARDS_TAG in tags else [tags["durability/shard"].split(":", 1)[1]]


def test_sixteen_shards_drain_through_runs_that_each_own_several(e2e: E2E) -> None:
    c = e2e.consumers["wide"]
    with e2e.dump_on_failure():
        written = produce(e2e, c, 1600)
        assert len(written) == 16  # the records spread over every shard
        wait_checkpoints(e2e, c, {s: w[-1][0] for s, w in written.items()}, "every shard drained")
        e2e.wait(lambda: all(r.dagster_run.is_finished for r in e2e.runs(c)), "the runs to end caught up")
        assert_each_record_once_in_shard_order(e2e, c, written)
        runs = e2e.runs(c)
        assert runs and all(r.dagster_run.is_success for r in runs)
        owned = [shards_of(r) for r in runs]
        assert all(len(s) == 4 for s in owned[:1]) and len(runs) <= 8  # 16 shards: 4 runs, not 16
        assert sorted({s for group in owned for s in group}) == sorted(written)
        out = drain_output(e2e.instance, runs[-1].dagster_run.run_id)
        assert out["shards"] == len(shards_of(runs[-1])) and "per_shard" in out


def test_sigkill_of_a_run_owning_several_shards_hands_each_to_a_new_run_and_spares_the_others(e2e: E2E) -> None:
    c = e2e.consumers["kill"]
    flag = c.handler_options["hold_flag"]
    with e2e.dump_on_failure():
        written = produce(e2e, c, 400)
        wait_checkpoints(e2e, c, {s: w[-1][0] for s, w in written.items()}, "the first wave drained")
        e2e.wait(lambda: all(r.dagster_run.is_finished for r in e2e.runs(c)), "the first runs to end")
        before = {r.dagster_run.run_id for r in e2e.runs(c)}
        # The next wave: one run stops inside a batch of the held item (rows written, not committed): SIGKILL it.
        held_pk = f"{c.name}-held"
        e2e.redis.set(flag, f"after_write:{held_pk}")
        merge(written, produce(e2e, c, 400, extra=[held_pk]))
        held = e2e.wait(lambda: e2e.redis.get(f"{flag}:held"), "a batch to be held")
        pid = int(held.decode().split(":")[0])
        victim = next(r for r in e2e.runs(c) if r.dagster_run.run_id not in before and _runs_pid(e2e, r) == pid)
        killed_shards = set(shards_of(victim))
        assert len(killed_shards) > 1
        last = {s: w[-1][0] for s, w in written.items()}
        os.kill(pid, signal.SIGKILL)
        unfinished = {s for s in killed_shards if e2e.redis_checkpoint(c, s) != last[s]}  # the held one at least
        e2e.redis.delete(flag)
        wait_checkpoints(e2e, c, last, "every shard drained after the kill")
        assert_each_record_once_in_shard_order(e2e, c, written)
        later = [r for r in e2e.runs(c) if r.dagster_run.run_id not in before | {victim.dagster_run.run_id}]
        took_over = {s for r in later for s in shards_of(r)}
        assert unfinished and unfinished <= took_over  # each shard the killed run left unfinished was taken over
        others = [r for r in e2e.runs(c) if r.dagster_run.run_id not in before and not set(shards_of(r)) & killed_shards]
        assert all(r.dagster_run.is_success for r in others if r.dagster_run.is_finished)  # the other runs undisturbed


def _runs_pid(e2e: E2E, run: Any) -> int | None:
    for record in e2e.instance.all_logs(run.dagster_run.run_id):
        if record.is_dagster_event and record.dagster_event.step_key == "drain_shard" and record.dagster_event.pid:
            return record.dagster_event.pid
    return None


def test_one_shard_dead_lettered_stops_alone_while_the_runs_other_shards_drain_on(e2e: E2E) -> None:
    c = e2e.consumers["poison"]
    poison = c.handler_options["poison_pk"]
    with e2e.dump_on_failure():
        written = produce(e2e, c, 400, extra=[poison])
        (stopped,) = [s for s, w in written.items() if any(pk == poison for _, pk in w)]
        others = {s: w[-1][0] for s, w in written.items() if s != stopped}
        wait_checkpoints(e2e, c, others, "every other shard drained")
        e2e.wait(lambda: e2e.query("SELECT shard FROM dead_letters WHERE consumer = %s AND status = 'open'", c.name),
                 "the poisoned shard's dead letter")
        e2e.wait(lambda: all(r.dagster_run.is_finished for r in e2e.runs(c)), "the runs to end")
        assert_each_record_once_in_shard_order(e2e, c, written, except_shards=(stopped,))
        (dead,) = e2e.query("SELECT shard FROM dead_letters WHERE consumer = %s AND status = 'open'", c.name)
        assert dead[0] == stopped
        failed = [r for r in e2e.runs(c) if not r.dagster_run.is_success]
        assert len(failed) == 1 and stopped in shards_of(failed[0]) and len(shards_of(failed[0])) > 1
        poisoned = [seq for seq, pk in written[stopped]]
        acked = e2e.redis_checkpoint(c, stopped)
        assert acked != poisoned[-1]  # the failed batch is never skipped


def test_terminating_a_run_stops_every_shard_after_its_batch_releases_the_leases_and_flushes_postgres(
        e2e: E2E) -> None:
    c = e2e.consumers["stop"]
    with e2e.dump_on_failure():
        written = produce(e2e, c, 300)
        last = {s: w[-1][0] for s, w in written.items()}
        wait_checkpoints(e2e, c, last, "every shard drained (the run keeps its shards: keep_owned)")
        # Usually one run holds the four shards; a tick that saw only part of the writes starts a second.
        unfinished = [r for r in e2e.runs(c) if not r.dagster_run.is_finished]
        assert sorted(s for r in unfinished for s in shards_of(r)) == sorted(last)
        running = [r.dagster_run.run_id for r in unfinished]
        for run_id in running:
            assert e2e.instance.run_coordinator.cancel_run(run_id)  # what Terminate in the UI does
        e2e.wait(lambda: all(e2e.instance.get_run_by_id(i).status.value == "CANCELED" for i in running),
                 "the runs to be canceled")
        for shard, seq in last.items():
            assert e2e.pg_checkpoint(c, shard) == seq  # flushed as the run closed
        owners = e2e.query("SELECT shard, owner FROM checkpoint_leases WHERE stream = %s", c.table)
        assert sorted(s for s, _ in owners) == sorted(last) and {o for _, o in owners} == {""}  # released
        assert_each_record_once_in_shard_order(e2e, c, written)
