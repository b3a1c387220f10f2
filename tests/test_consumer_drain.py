"""A run drains its shard: many batches per run, each acked, with budgets, retries and leases
(real Redis/Postgres stores, an in-memory source, a fake clock so that no test waits)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import psycopg
import pytest

from durability_pipelines.checkpoints import LeaseLostError, StoreUnavailableError
from durability_pipelines.checkpoints.ordering import SHARD_END
from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer, StopReason
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.runtime import BatchDeadLettered, ConsumerRuntime, open_runtime
from durability_pipelines.consumer.source import SourceBatch
from tests.support.sources import ListSource
from tests.test_consumer_runtime import make_config, rows

SHARD = "shard-0"


class FakeClock:
    """``sleep`` advances ``now``: budgets, idle polling and backoff run without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self.on_sleep: Callable[[float], None] | None = None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(self.now)


def budget(**overrides: float) -> DrainBudget:
    values = {"max_batches": 1000, "max_seconds": 60.0, "max_idle_s": 0.0, **overrides}
    return DrainBudget(int(values.pop("max_batches")), values.pop("max_seconds"), values.pop("max_idle_s"), **values)


def drainer(rt: ConsumerRuntime, clock: FakeClock, b: DrainBudget | None = None, run_id: str | None = None,
            **kwargs: object) -> ShardDrainer:
    return ShardDrainer(rt, SHARD, run_id or "run-" + uuid.uuid4().hex[:8], b or budget(), sleep=clock.sleep,
                        clock=clock, **kwargs)


def history(rt: ConsumerRuntime) -> list[tuple[str | None, str]]:
    return [(h.previous, h.sequence) for h in reversed(rt.store.history(rt.key(SHARD)))]


@pytest.fixture
def stream() -> str:
    return "drain-" + uuid.uuid4().hex[:10]


def open_rt(stream: str, redis_url: str, postgres_url: str, source: object, backend: str = "hybrid",
            **overrides: object) -> ConsumerRuntime:
    return open_runtime(make_config(stream, backend, **overrides), redis_url=redis_url, postgres_url=postgres_url,
                        source=source)


@pytest.mark.parametrize("backend", ["redis", "postgres", "hybrid"])
def test_one_run_drains_every_batch_and_acks_each(backend, stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 95)
    rt = open_rt(stream, redis_url, postgres_url, source, backend)
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    records = []
    report = drainer(rt, FakeClock(), on_batch=records.append).run()
    assert report.stop_reason is StopReason.CAUGHT_UP
    assert len(report.batches) == len(records) == 10 and report.events == report.processed == 95
    assert [b.events for b in report.batches] == [10] * 9 + [5]
    assert [b.checkpoint for b in report.batches] == [seqs[i] for i in range(9, 95, 10)] + [seqs[94]]
    assert {b.outcome for b in report.batches} == {"advanced"}  # postgres: the save in the handler's transaction
    assert all(b.attempts == 1 for b in report.batches)
    assert report.batches[-1].behind is None and report.checkpoint == seqs[94]
    # the checkpoint was saved after each batch, each save from where the previous one left it
    assert history(rt) == list(zip([None, *[seqs[i] for i in range(9, 95, 10)]],
                                   [b.checkpoint for b in report.batches], strict=True))
    assert rows(postgres_url, stream) == seqs
    assert rt.store.leases.get(rt.key(SHARD).lease_key).owner == ""  # released at the end
    meta = report.as_metadata()
    assert (meta["batches"], meta["events"], meta["stop_reason"]) == (10, 95, "caught up")
    rt.close()


def test_budgets_end_the_run_and_the_next_run_resumes_after_the_last_acked_batch(
        stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 100)
    rt = open_rt(stream, redis_url, postgres_url, source)
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    clock = FakeClock()
    first = drainer(rt, clock, budget(max_batches=3)).run()
    assert first.stop_reason is StopReason.BATCH_BUDGET and len(first.batches) == 3
    assert rt.store.load(rt.key(SHARD)) == seqs[29]

    # a batch takes 25 s on this clock: the run starts no new batch after max_run_seconds (60 s)
    slow = drainer(rt, clock, budget(max_seconds=60))
    real_process = slow._process

    def process(read, acked):
        clock.now += 25
        return real_process(read, acked)

    slow._process = process
    second = slow.run()
    assert second.stop_reason is StopReason.TIME_BUDGET and len(second.batches) == 3
    assert second.start_after == seqs[29] and second.batches[0].first_sequence == seqs[30]
    third = drainer(rt, clock).run()
    assert third.start_after == seqs[59] and third.events == 40 and third.stop_reason is StopReason.CAUGHT_UP
    assert rows(postgres_url, stream) == seqs  # nothing lost, nothing twice across the three runs
    rt.close()


def test_a_run_that_dies_mid_drain_loses_nothing(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 50)
    rt = open_rt(stream, redis_url, postgres_url, source)
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    real_read = source.read
    calls = []

    def flaky_read(shard, after, max_events):
        calls.append(after)
        if len(calls) == 3:
            raise StoreUnavailableError("simulated: the run's Postgres went away between two batches")
        return real_read(shard, after, max_events)

    source.read = flaky_read
    dying = drainer(rt, FakeClock(), run_id="run-dead")
    with pytest.raises(StoreUnavailableError):
        dying.run()
    assert len(dying.report.batches) == 2 and rt.store.load(rt.key(SHARD)) == seqs[19]
    source.read = real_read
    resumed = drainer(rt, FakeClock(), run_id="run-next").run()
    assert resumed.start_after == seqs[19] and resumed.events == 30
    assert rows(postgres_url, stream) == seqs
    rt.close()


def test_a_failing_batch_is_retried_in_place_then_the_run_goes_on(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 30)
    cfg = {"handler": "tests.support.runtime_handlers:fail_first_call", "retry": {"max_retries": 2, "delay_s": 1.0},
           "handler_options": {"flag": f"flaky:{stream}"}}
    rt = open_rt(stream, redis_url, postgres_url, source, **cfg)
    clock, retries = FakeClock(), []
    report = drainer(rt, clock, on_retry=lambda attempt, exc, delay: retries.append((attempt, str(exc)))).run()
    assert [b.attempts for b in report.batches] == [2, 1, 1]
    assert retries == [(1, "first call fails")]
    assert 0 <= clock.slept[0] <= 1.0  # the backoff: up to delay_s (full jitter) before the first retry
    assert report.events == report.processed == 30 and report.as_metadata()["retried_batches"] == 1
    assert rows(postgres_url, stream) == [e.sequence for e in source.shards_events[SHARD]]
    rt.close()


def poisoned(stream: str, count: int, poison_at: int) -> ListSource:
    source = ListSource.with_events(stream, count)
    ev = source.shards_events[SHARD]
    ev[poison_at] = ChangeEvent(**{**ev[poison_at].__dict__, "new_image": {"poison": True}})
    return source


def test_stop_policy_dead_letters_the_failing_batch_after_acking_the_ones_before(
        stream, redis_url, postgres_url) -> None:
    source = poisoned(stream, 40, 25)
    rt = open_rt(stream, redis_url, postgres_url, source, handler="tests.support.runtime_handlers:poison_aware",
                 retry={"max_retries": 1, "delay_s": 0.1})
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    d = drainer(rt, FakeClock())
    with pytest.raises(BatchDeadLettered):
        d.run()
    assert len(d.report.batches) == 2 and d.report.checkpoint == seqs[19]  # batches 1-2 acked
    assert rt.store.load(rt.key(SHARD)) == seqs[19]  # the failed batch is never skipped
    (dl,) = rt.storage.dead_letters(rt.config.name)
    assert (dl.first_sequence, dl.attempts, dl.status) == (seqs[20], 2, "open")
    assert rows(postgres_url, stream) == seqs[:20]
    rt.close()


def test_bisect_policy_isolates_the_poison_record_and_the_run_drains_on(stream, redis_url, postgres_url) -> None:
    source = poisoned(stream, 40, 25)
    rt = open_rt(stream, redis_url, postgres_url, source, "postgres",
                 handler="tests.support.runtime_handlers:poison_aware", retry={"max_retries": 0},
                 dead_letter={"policy": "bisect"})
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    report = drainer(rt, FakeClock()).run()
    assert report.stop_reason is StopReason.CAUGHT_UP and report.checkpoint == seqs[39]
    assert [b.failed for b in report.batches] == [0, 0, 1, 0] and report.batches[2].dead_letter_ids
    assert rows(postgres_url, stream) == [s for i, s in enumerate(seqs) if i != 25]
    rt.close()


def test_a_run_that_loses_its_lease_stops_and_writes_nothing_more(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 50)
    rt = open_rt(stream, redis_url, postgres_url, source)
    seqs = [e.sequence for e in source.shards_events[SHARD]]

    def steal(record) -> None:
        if record.index == 2:  # another worker takes the shard over between batches 2 and 3
            rt.store.leases.acquire(rt.key(SHARD).lease_key, "run-new-owner", steal=True)

    d = drainer(rt, FakeClock(), on_batch=steal)
    with pytest.raises(LeaseLostError):
        d.run()
    assert len(d.report.batches) == 2 and rt.store.load(rt.key(SHARD)) == seqs[19]
    # The run reads its lease before each batch: it sees the takeover before batch 3 and writes none of it.
    assert rows(postgres_url, stream) == seqs[:20]
    assert rt.store.leases.get(rt.key(SHARD).lease_key).owner == "run-new-owner"  # not released by the zombie
    rt.close()


def test_the_lease_is_renewed_as_the_run_goes_on(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 60)
    rt = open_rt(stream, redis_url, postgres_url, source, lease_duration_s=30)
    clock = FakeClock()
    expiries = []

    def tick(record) -> None:
        clock.now += 8  # each batch takes 8 s: 6 batches outlive a 30 s lease
        expiries.append(rt.store.leases.get(rt.key(SHARD).lease_key).expires_at)

    report = drainer(rt, clock, on_batch=tick).run()
    assert len(report.batches) == 6 and report.events == 60
    assert len(set(expiries)) >= 3  # renewed (every third of the lease), never lost
    rt.close()


class GrowingSource(ListSource):
    """A live stream: ``grow(n)`` appends n events (as a producer would)."""

    def grow(self, n: int) -> None:
        ev = self.shards_events[SHARD]
        start = int(ev[-1].sequence) + 17 if ev else 10**21
        ev.extend(ChangeEvent("dynamodb", self.stream, SHARD, str(start + 17 * i), "INSERT", {"pk": f"g{len(ev) + i}"})
                  for i in range(n))


def test_a_caught_up_run_keeps_polling_for_max_idle_s_and_takes_what_arrives(stream, redis_url, postgres_url) -> None:
    source = GrowingSource(stream, {SHARD: []})
    source.grow(5)
    rt = open_rt(stream, redis_url, postgres_url, source)
    clock = FakeClock()
    arrivals = {1001.0: 3, 1003.0: 4}  # records arriving while the run polls

    def on_sleep(now: float) -> None:
        for at, n in list(arrivals.items()):
            if now >= at:
                source.grow(n)
                del arrivals[at]

    clock.on_sleep = on_sleep
    report = drainer(rt, clock, budget(max_idle_s=2.0)).run()
    assert report.stop_reason is StopReason.CAUGHT_UP and report.events == 12
    assert [b.events for b in report.batches] == [5, 3, 4]
    assert clock.now - 1003.0 >= 2.0  # ended only after 2 s without a record
    rt.close()


def test_a_batching_window_fills_the_batch_from_a_quiet_stream(stream, redis_url, postgres_url) -> None:
    source = GrowingSource(stream, {SHARD: []})
    source.grow(2)
    rt = open_rt(stream, redis_url, postgres_url, source)  # max_events 10
    clock = FakeClock()
    clock.on_sleep = lambda now: source.grow(3)  # 3 records per poll
    report = drainer(rt, clock, budget(batch_window_s=5.0, max_batches=2)).run()
    assert [b.events for b in report.batches] == [10, 10]  # 2 + 3 + 3 + (2 of 3): full batches, fewer acks
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    assert report.checkpoint == seqs[19] and rows(postgres_url, stream) == seqs[:20]
    rt.close()


def test_a_closed_shard_ends_the_run_at_shard_end(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 15)
    source.closed.add(SHARD)
    rt = open_rt(stream, redis_url, postgres_url, source, "redis")
    report = drainer(rt, FakeClock(), budget(max_idle_s=30.0)).run()
    assert report.stop_reason is StopReason.SHARD_ENDED and report.checkpoint == SHARD_END
    rt.close()


def test_records_behind_comes_from_the_source(stream, redis_url, postgres_url) -> None:
    class Counting(ListSource):
        def read(self, shard, after, max_events) -> SourceBatch:
            batch = super().read(shard, after, max_events)
            left = len(super().read(shard, batch.next_checkpoint or after, 10**6).events) if batch.events else 0
            batch.behind = left
            return batch

    base = ListSource.with_events(stream, 25)
    rt = open_rt(stream, redis_url, postgres_url, Counting(stream, base.shards_events))
    report = drainer(rt, FakeClock()).run()
    assert [b.behind for b in report.batches] == [15, 5, 0]
    assert report.as_metadata()["records_behind"] == 0
    rt.close()


def test_transactional_sink_and_checkpoint_commit_together_in_every_batch(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 30)
    rt = open_rt(stream, redis_url, postgres_url, source, "postgres")
    report = drainer(rt, FakeClock()).run()
    # the checkpoint saved in each batch's transaction: the ack reports that save instead of saving again
    assert [b.outcome for b in report.batches] == ["advanced"] * 3  # the save made in the transaction, reported
    with psycopg.connect(postgres_url) as conn:
        (n,) = conn.execute("SELECT count(*) FROM checkpoint_history WHERE stream = %s", (stream,)).fetchone()
    assert n == 3
    rt.close()


def test_a_batch_read_ahead_is_used_only_from_where_the_checkpoint_ended() -> None:
    from durability_pipelines.consumer.drain import ReadAhead

    reads: list[str | None] = []

    def read(after: str | None) -> str:
        reads.append(after)
        if after == "boom":
            raise StoreUnavailableError("the stream went away")
        return f"batch after {after}"

    ahead = ReadAhead(read)  # type: ignore[arg-type]
    ahead.start("100")
    assert ahead.take("100") == "batch after 100"
    ahead.start("200")
    assert ahead.take("150") is None  # the checkpoint ended elsewhere: dropped, the caller reads itself
    assert ahead.take("200") is None  # and it is gone
    ahead.start("boom")
    with pytest.raises(StoreUnavailableError):
        ahead.take("boom")  # a failed read surfaces where the batch is used
    ahead.start("300")
    ahead.close()  # waits for the read in flight
    assert reads == ["100", "200", "boom", "300"]


def test_reading_ahead_changes_nothing_in_what_is_processed(stream, redis_url, postgres_url) -> None:
    for prefetch in (True, False):
        name = f"{stream}-{prefetch}"
        source = ListSource.with_events(name, 57)
        rt = open_rt(name, redis_url, postgres_url, source)
        calls: list[str | None] = []
        real_read = source.read

        def counted(shard, after, n, real=real_read, calls=calls):
            calls.append(after)
            return real(shard, after, n)

        source.read = counted
        report = drainer(rt, FakeClock(), prefetch=prefetch).run()
        assert report.events == 57 and [b.events for b in report.batches] == [10] * 5 + [7]
        assert rows(postgres_url, name) == [e.sequence for e in source.shards_events[SHARD]]
        assert len(calls) == 6  # each batch read once, ahead or not (the short last one ends the run)
        rt.close()
