"""A shard never goes dark, on a real Dagster daemon: before a run's budget ends the sensor starts its
successor, which asks for the shard's lease; the owner finishes its batch, saves its checkpoint and hands
the lease over, and the successor reads on from that checkpoint (consumer/handoff.py).

One module-scoped environment (``tests/support/e2e.py``: moto, a fresh Dagster storage database with the
repository's ``dagster.yaml``, a private Redis, one ``dagster-daemon``), consumers with short runs:

* ``steady``: a steady stream over several hand-offs;
* ``kill``: its handler (``deliveries_with_hold``) stops inside a chosen batch, so that the test can
  SIGKILL the owner, or its waiting successor, in the middle of a hand-off.

The KCL oracle throughout: every record in the sink, each committed exactly once (``e2e_deliveries`` has
no unique key), per-shard order, no checkpoint backwards; and here: each hand-off in both runs' event logs,
the successor starting exactly at the owner's last checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from durability_pipelines.consumer.drain import StopReason
from tests.support.dynamodb import create_stream_table
from tests.support.e2e import (
    E2E,
    Consumer,
    assert_every_event_once,
    drain_output,
    e2e_environment,
    redis_history,
)
from tests.support.servers import PrivateRedis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: Short runs, so that a test sees several hand-offs: a successor is due 8 s into a run.
SHORT_RUNS = {"max_run_seconds": 16, "successor_lead_s": 8, "handoff_timeout_s": 20, "max_idle_s": 2}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, postgres_admin_url: str) -> Iterator[E2E]:
    redis_server = PrivateRedis(appendonly=False)
    redis_server.start()

    def consumers(ddb: Any, suffix: str) -> dict[str, Consumer]:
        return {
            "steady": Consumer(f"handoff_steady_{suffix}", create_stream_table(ddb)[0],
                               "tests.support.dagster_daemon:record_deliveries",
                               overrides={"max_events": 50, "lease_duration_s": 30, **SHORT_RUNS}),
            # a long lease: a successor waiting for a held owner must find it alive until the test kills it
            "kill": Consumer(f"handoff_kill_{suffix}", create_stream_table(ddb)[0],
                             "tests.support.dagster_daemon:deliveries_with_hold",
                             handler_options={"hold_flag": f"handoff:{suffix}:hold"},
                             overrides={"max_events": 20, "lease_duration_s": 90, **SHORT_RUNS}),
        }

    try:
        with e2e_environment(tmp_path_factory.mktemp("dagster_handoff"), postgres_url=postgres_url,
                             admin_url=postgres_admin_url, redis_url=redis_server.url, consumers=consumers) as env:
            yield env
    finally:
        redis_server.close()


class Producer:
    """A steady stream: ``per_tick`` items every ``every_s`` until stopped."""

    def __init__(self, e2e: E2E, c: Consumer, *, per_tick: int = 5, every_s: float = 0.25) -> None:
        self.e2e, self.c, self.per_tick, self.every_s = e2e, c, per_tick, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.e2e.produce_new(self.c, self.per_tick)
            self._stop.wait(self.every_s)

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def outputs_of(e2e: E2E, c: Consumer) -> dict[str, dict[str, Any]]:
    return {r.dagster_run.run_id: drain_output(e2e.instance, r.dagster_run.run_id) for r in e2e.runs(c)}


def hand_offs(e2e: E2E, c: Consumer) -> list[tuple[str, dict[str, Any]]]:
    return [(run_id, out) for run_id, out in outputs_of(e2e, c).items()
            if out.get("stop_reason") == StopReason.HANDED_OVER.value]


def log_messages(e2e: E2E, run_id: str) -> list[str]:
    return [r.user_message for r in e2e.instance.all_logs(run_id) if not r.is_dagster_event]


def lease_row(e2e: E2E, c: Consumer) -> tuple[str, str] | None:
    """(owner, requested_by) of the shard's lease, where the hybrid store grants it (Postgres)."""
    rows = e2e.query("SELECT owner, requested_by FROM checkpoint_leases WHERE stream = %s", c.table)
    return rows[0] if rows else None  # type: ignore[return-value]


def run_worker_pid(e2e: E2E, run_id: str) -> int:
    """The process executing a run, from its event log (every step event records its pid)."""
    def pid() -> int | None:
        for record in e2e.instance.all_logs(run_id):
            if record.is_dagster_event and record.dagster_event.step_key == "drain_shard" and record.dagster_event.pid:
                return int(record.dagster_event.pid)
        return None
    return e2e.wait(pid, f"run {run_id}'s step to start")


def assert_checkpoints_advance_and_runs_never_interleave(e2e: E2E, c: Consumer) -> None:
    """Redis history: each save moves on from the previous one; one run's saves are contiguous (two runs
    never wrote for the shard at the same time), and every writer is one of the consumer's runs."""
    (shard,) = e2e.last_sequences(c)
    hist = redis_history(e2e, c, shard)
    prev = ""
    for h in hist:
        assert h["prev"] == prev and int(h["seq"]) > int(prev or 0), hist
        prev = h["seq"]
    writers = [h["writer"] for h in hist]
    assert set(writers) <= {r.dagster_run.run_id for r in e2e.runs(c)}
    blocks = list(dict.fromkeys(writers))
    assert [w for w in blocks for _ in range(writers.count(w))] == writers, "two runs' saves interleaved"


def test_a_steady_stream_is_handed_from_run_to_run_and_every_event_lands_once(e2e: E2E) -> None:
    c = e2e.consumers["steady"]
    with e2e.dump_on_failure():
        with Producer(e2e, c):
            e2e.wait(lambda: len(hand_offs(e2e, c)) >= 3, "three graceful hand-offs", timeout=300)
        e2e.wait_drained(c, timeout=240)
        assert_every_event_once(e2e, c)
        assert_checkpoints_advance_and_runs_never_interleave(e2e, c)

        outputs = outputs_of(e2e, c)
        assert all(r.dagster_run.status.value == "SUCCESS" for r in e2e.runs(c))
        for owner, out in hand_offs(e2e, c):
            successor = out["handed_to"]
            after = outputs[successor]
            # the successor read on from exactly where the owner stopped: nothing skipped, nothing redone
            assert after["handed_from"] == owner and after["claimed"] == "handed over"
            assert after["start_after"] == out["checkpoint"]
            assert after["lease_epoch"] == out["lease_epoch"] + 1
            assert out["handoff_after_last_read_s"] >= 0 and after["handoff_gap_s"] >= 0
            # both runs' event logs tell who handed what to whom, at which checkpoint
            assert any(f"over to run {successor} at checkpoint {out['checkpoint']}" in m
                       for m in log_messages(e2e, owner))
            assert any(f"over from run {owner} by graceful hand-off" in m and out["checkpoint"] in m
                       for m in log_messages(e2e, successor))


def hold_a_batch(e2e: E2E, c: Consumer, tag: str) -> tuple[int, str]:
    """Produce a backlog whose 3rd batch holds the marker item; return the held owner's pid and run id once
    its successor is waiting for the shard (the owner cannot hand over while it holds the batch)."""
    flag = c.handler_options["hold_flag"]
    marker = f"{c.name}-{tag}-hold"
    e2e.redis.set(flag, f"before:{marker}")
    e2e.produce(c, [f"{c.name}-{tag}-{i:04d}" for i in range(50)] + [marker]
                + [f"{c.name}-{tag}-{i:04d}" for i in range(50, 100)])
    held = e2e.wait(lambda: e2e.redis.get(f"{flag}:held"), f"the run to hold the batch of {marker}")
    pid = int(held.decode().split(":")[0])
    owner = lease_row(e2e, c)[0]  # type: ignore[index]  # the lease's owner is the run's id
    assert run_worker_pid(e2e, owner) == pid
    e2e.wait(lambda: (lease_row(e2e, c) or ("", ""))[1], "a successor to ask for the held shard", timeout=120)
    return pid, owner


def test_the_owner_killed_in_the_middle_of_a_hand_off_loses_nothing_and_its_successor_takes_over(
        e2e: E2E) -> None:
    c = e2e.consumers["kill"]
    flag = c.handler_options["hold_flag"]
    with e2e.dump_on_failure():
        pid, owner = hold_a_batch(e2e, c, "owner")
        waiting = lease_row(e2e, c)[1]  # type: ignore[index]
        os.kill(pid, signal.SIGKILL)
        e2e.redis.delete(flag, f"{flag}:held")  # the dead handler cannot clear its own marker
        e2e.wait_drained(c, timeout=240)
        assert_every_event_once(e2e, c)  # the held batch committed once, by the successor
        assert_checkpoints_advance_and_runs_never_interleave(e2e, c)
        taken = outputs_of(e2e, c)[waiting]
        # the successor saw its owner die (Dagster marked the run failed) or its lease lapse
        assert taken["claimed"] in ("owner dead", "released or expired") and taken["events"] > 0
        assert e2e.instance.get_run_by_id(owner).status.value == "FAILURE"


def test_a_successor_killed_while_it_waits_is_handed_nothing_and_the_owner_reads_on(e2e: E2E) -> None:
    c = e2e.consumers["kill"]
    flag = c.handler_options["hold_flag"]
    with e2e.dump_on_failure():
        _, owner = hold_a_batch(e2e, c, "successor")
        waiting = lease_row(e2e, c)[1]  # type: ignore[index]
        os.kill(run_worker_pid(e2e, waiting), signal.SIGKILL)
        # its request goes stale once it stops asking: then the owner is let go
        e2e.wait(lambda: e2e.instance.get_run_by_id(waiting).status.value == "FAILURE",
                 "the killed successor to be marked failed")
        time.sleep(6)  # longer than a request stays fresh without being renewed (HANDOFF_REQUEST_FRESH_S)
        e2e.redis.delete(flag)
        e2e.wait_drained(c, timeout=240)
        assert_every_event_once(e2e, c)
        assert_checkpoints_advance_and_runs_never_interleave(e2e, c)
        out = outputs_of(e2e, c)[owner]
        assert out.get("handed_to") != waiting  # a dead run was never handed the shard
        assert out["events"] > 0 and e2e.instance.get_run_by_id(owner).status.value == "SUCCESS"
