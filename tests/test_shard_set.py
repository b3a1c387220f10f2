"""A run owns a set of shards (``consumer/shard_set.py``): one drain per shard on its own thread, each with
its own lease, checkpoint, batch records and retries, against real Redis/Postgres stores and an in-memory
source. Real time (threads): every budget here is short."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from durability_pipelines.checkpoints import StoreUnavailableError
from durability_pipelines.consumer.drain import DrainBudget, StopReason
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.runtime import BatchDeadLettered
from durability_pipelines.consumer.shard_set import ShardSetDrainer
from durability_pipelines.consumer.source import SourceBatch
from durability_pipelines.sources.errors import StreamUnavailableError
from tests.support.sources import ListSource
from tests.test_consumer_drain import open_rt

SHARDS = [f"shardId-{i:05d}" for i in range(6)]


def events(stream: str, shard: str, count: int, *, poison_at: int | None = None) -> list[ChangeEvent]:
    base = 10**21 + SHARDS.index(shard) * 10**6
    return [ChangeEvent("dynamodb", stream, shard, str(base + 17 * i), "INSERT", {"pk": f"{shard}-{i}"},
                        {"pk": f"{shard}-{i}", **({"poison": True} if i == poison_at else {})})
            for i in range(count)]


def budget(**overrides: float) -> DrainBudget:
    values = {"max_batches": 10_000, "max_seconds": 60.0, "max_idle_s": 0.0, "poll_interval_s": 0.05, **overrides}
    return DrainBudget(int(values.pop("max_batches")), values.pop("max_seconds"), values.pop("max_idle_s"), **values)


def rows_by_shard(postgres_url: str, stream: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with psycopg.connect(postgres_url) as conn:
        for shard, seq in conn.execute("SELECT shard, sequence FROM stream_events WHERE stream = %s "
                                       "ORDER BY inserted_at, sequence::numeric",
                                       (stream,)).fetchall():
            out.setdefault(shard, []).append(seq)
    return out


@pytest.fixture
def stream() -> str:
    return "set-" + uuid.uuid4().hex[:10]


@pytest.mark.parametrize("backend", ["redis", "postgres", "hybrid"])
def test_a_run_drains_each_of_its_shards_with_its_own_lease_and_checkpoint(backend, stream, redis_url,
                                                                            postgres_url) -> None:
    source = ListSource(stream, {s: events(stream, s, 45 + i) for i, s in enumerate(SHARDS)})
    rt = open_rt(stream, redis_url, postgres_url, source, backend)
    run_id = "run-" + uuid.uuid4().hex[:8]
    batches: list = []
    starts: list = []
    outcomes = ShardSetDrainer(rt, list(SHARDS), run_id, budget(), on_batch=batches.append,
                               on_start=starts.append).run()
    assert [o.shard for o in outcomes] == SHARDS and all(o.error is None for o in outcomes)
    assert {o.report.stop_reason for o in outcomes} == {StopReason.CAUGHT_UP}
    stored = rows_by_shard(postgres_url, stream)
    for i, shard in enumerate(SHARDS):
        seqs = [e.sequence for e in source.shards_events[shard]]
        assert stored[shard] == seqs  # every record once, in the shard's order
        assert rt.store.load(rt.key(shard)) == seqs[-1]
        assert outcomes[i].report.events == len(seqs) and outcomes[i].report.checkpoint == seqs[-1]
        assert [b.index for b in batches if b.shard == shard] == list(range(1, 6))  # per-shard batch records
        assert rt.store.leases.get(rt.key(shard).lease_key).owner == ""  # released at the end
    assert sorted(r.shard for r in starts) == sorted(SHARDS)
    rt.close()


def test_one_shard_dead_lettered_stops_alone_and_the_others_drain_on(stream, redis_url, postgres_url) -> None:
    poisoned = SHARDS[2]
    source = ListSource(stream, {s: events(stream, s, 40, poison_at=25 if s == poisoned else None) for s in SHARDS})
    rt = open_rt(stream, redis_url, postgres_url, source, handler="tests.support.runtime_handlers:poison_aware",
                 retry={"max_retries": 1, "delay_s": 0.05})
    outcomes = {o.shard: o for o in ShardSetDrainer(rt, list(SHARDS), "run-dl", budget()).run()}
    assert isinstance(outcomes[poisoned].error, BatchDeadLettered) and outcomes[poisoned].restarts == 0
    seqs = [e.sequence for e in source.shards_events[poisoned]]
    assert rt.store.load(rt.key(poisoned)) == seqs[19]  # the failed batch is never skipped
    stored = rows_by_shard(postgres_url, stream)
    assert stored[poisoned] == seqs[:20]
    for shard in SHARDS:
        if shard != poisoned:
            assert outcomes[shard].error is None and outcomes[shard].report.stop_reason is StopReason.CAUGHT_UP
            assert stored[shard] == [e.sequence for e in source.shards_events[shard]]
    rt.close()


class FlakySource(ListSource):
    """The stream fails ``failures`` reads of one shard (a throttled or unreachable endpoint)."""

    flaky: str = ""
    failures: int = 0

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch:
        if shard == self.flaky and self.failures > 0:
            self.failures -= 1
            raise StreamUnavailableError(operation="GetRecords", attempts=1, detail="endpoint unreachable (injected)",
                                         shard_id=shard)
        return super().read(shard, after, max_events)


def test_a_shard_failing_on_the_infrastructure_is_restarted_in_place_and_loses_nothing(
        stream, redis_url, postgres_url) -> None:
    source = FlakySource(stream, {s: events(stream, s, 30) for s in SHARDS})
    source.flaky, source.failures = SHARDS[4], 2
    rt = open_rt(stream, redis_url, postgres_url, source, retry={"max_retries": 3, "delay_s": 0.05})
    restarts: list = []
    outcomes = {o.shard: o for o in ShardSetDrainer(
        rt, list(SHARDS), "run-flaky", budget(),
        on_restart=lambda shard, n, exc, delay: restarts.append((shard, n, type(exc).__name__)),
        restartable=lambda exc: isinstance(exc, StoreUnavailableError | StreamUnavailableError)).run()}
    assert restarts == [(SHARDS[4], 1, "StreamUnavailableError"), (SHARDS[4], 2, "StreamUnavailableError")]
    assert all(o.error is None for o in outcomes.values()) and outcomes[SHARDS[4]].restarts == 2
    assert rows_by_shard(postgres_url, stream) == {s: [e.sequence for e in source.shards_events[s]] for s in SHARDS}
    rt.close()


def test_a_shard_still_failing_after_its_restarts_ends_alone_with_its_error(stream, redis_url, postgres_url) -> None:
    source = FlakySource(stream, {s: events(stream, s, 30) for s in SHARDS[:3]})
    source.flaky, source.failures = SHARDS[1], 100
    rt = open_rt(stream, redis_url, postgres_url, source, retry={"max_retries": 2, "delay_s": 0.05})
    outcomes = {o.shard: o for o in ShardSetDrainer(
        rt, SHARDS[:3], "run-down", budget(), restartable=lambda exc: isinstance(exc, StreamUnavailableError)).run()}
    assert isinstance(outcomes[SHARDS[1]].error, StreamUnavailableError) and outcomes[SHARDS[1]].restarts == 2
    assert rt.store.load(rt.key(SHARDS[1])) is None  # nothing acked that was not processed
    assert outcomes[SHARDS[0]].error is None and outcomes[SHARDS[2]].error is None
    rt.close()


class TrickleSource(ListSource):
    """One shard gets a record per read for ``reads`` reads (a slow producer); the others stay quiet."""

    busy: str = ""
    reads: int = 0

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch:
        if shard == self.busy and self.reads > 0:
            self.reads -= 1
            ev = self.shards_events[shard]
            start = int(ev[-1].sequence) + 17 if ev else 10**21
            ev.append(ChangeEvent("dynamodb", self.stream, shard, str(start), "INSERT", {"pk": f"t{len(ev)}"}))
            time.sleep(0.1)
        return super().read(shard, after, max_events)


def test_quiet_shards_stay_owned_until_every_shard_of_the_run_is_idle(stream, redis_url, postgres_url) -> None:
    quiet, busy = SHARDS[0], SHARDS[1]
    source = TrickleSource(stream, {quiet: [], busy: []})
    source.busy, source.reads = busy, 12  # ~1.2 s of records, well past max_idle_s
    rt = open_rt(stream, redis_url, postgres_url, source)
    run_id = "run-" + uuid.uuid4().hex[:8]
    held: list[str] = []

    def on_batch(record) -> None:  # while the busy shard drains, the quiet one is still this run's
        held.append(rt.store.leases.get(rt.key(quiet).lease_key).owner)

    outcomes = ShardSetDrainer(rt, [quiet, busy], run_id, budget(max_idle_s=0.3), on_batch=on_batch).run()
    assert [o.report.stop_reason for o in outcomes] == [StopReason.CAUGHT_UP, StopReason.CAUGHT_UP]
    assert outcomes[1].report.events == 12 and len(held) == 12 and set(held) == {run_id}
    assert outcomes[0].report.ended >= outcomes[1].report.ended  # the quiet shard ended with the run, not before
    rt.close()


def test_stopping_the_run_ends_every_shard_after_its_batch_and_releases_its_lease(
        stream, redis_url, postgres_url) -> None:
    source = ListSource(stream, {s: events(stream, s, 20) for s in SHARDS[:4]})
    rt = open_rt(stream, redis_url, postgres_url, source)
    drainer = ShardSetDrainer(rt, SHARDS[:4], "run-stop", budget(max_idle_s=float("inf")))  # keep_owned
    stopper = threading.Timer(1.0, drainer.stop)
    stopper.start()
    outcomes = drainer.run()
    assert {o.report.stop_reason for o in outcomes} == {StopReason.STOPPED} and all(o.error is None for o in outcomes)
    for shard in SHARDS[:4]:
        assert rt.store.load(rt.key(shard)) == source.shards_events[shard][-1].sequence
        assert rt.store.leases.get(rt.key(shard).lease_key).owner == ""
    rt.close()


def test_a_second_run_takes_half_of_the_shards_by_hand_off_and_the_first_keeps_the_rest(
        stream, redis_url, postgres_url) -> None:
    """Rebalancing: run B asks for two of run A's four shards; A hands each over after its batch in hand and
    drains on with the other two. Records keep arriving throughout: none lost, none processed twice."""
    shards = SHARDS[:4]
    source = ListSource(stream, {s: events(stream, s, 30) for s in shards})
    rt_a = open_rt(stream, redis_url, postgres_url, source)
    rt_b = open_rt(stream, redis_url, postgres_url, source)
    forever = budget(max_idle_s=float("inf"), handoff_timeout_s=30.0)
    run_a = ShardSetDrainer(rt_a, shards, "run-a", forever)
    run_b = ShardSetDrainer(rt_b, shards[2:], "run-b", forever)
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            for s in shards:
                ev = source.shards_events[s]
                ev.append(ChangeEvent("dynamodb", stream, s, str(int(ev[-1].sequence) + 17), "INSERT",
                                      {"pk": f"{s}-late-{n}"}))
            n += 1
            time.sleep(0.02)

    results: dict[str, list] = {}
    threads = [threading.Thread(target=lambda: results.__setitem__("a", run_a.run())),
               threading.Thread(target=produce)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    b_thread = threading.Thread(target=lambda: results.__setitem__("b", run_b.run()))
    b_thread.start()
    wait_until = time.monotonic() + 30
    while time.monotonic() < wait_until and not all(
            rt_a.store.leases.get(rt_a.key(s).lease_key).owner == "run-b" for s in shards[2:]):
        time.sleep(0.05)
    time.sleep(0.5)
    stop.set()
    threads[1].join()
    run_a.stop()
    run_b.stop()
    threads[0].join()
    b_thread.join()
    a = {o.shard: o.report for o in results["a"]}
    b = {o.shard: o.report for o in results["b"]}
    for s in shards[2:]:
        assert a[s].stop_reason is StopReason.HANDED_OVER and a[s].handed_to == "run-b"
        assert b[s].claimed == "handed over" and b[s].handed_from == "run-a" and b[s].start_after == a[s].checkpoint
    for s in shards[:2]:
        assert a[s].stop_reason is StopReason.STOPPED  # kept its other shards to the end
    stored = rows_by_shard(postgres_url, stream)
    for s in shards:  # every record once, in order, across the hand-off
        seqs = [e.sequence for e in source.shards_events[s]]
        acked = rt_a.store.load(rt_a.key(s))
        assert stored[s] == seqs[:seqs.index(acked) + 1]
    rt_a.close()
    rt_b.close()
