"""Graceful hand-off between two runs of a shard (KCL 3.x's), on real Redis and Postgres stores: the
successor asks, the owner finishes its batch, saves its checkpoint and hands the lease over, the successor
reads on from there. The KCL oracle throughout: per-shard order, every record delivered, each sink effect
once, no checkpoint backwards, and no write by the old owner after the hand-off."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from durability_pipelines.checkpoints import Lease, LeaseLostError
from durability_pipelines.consumer.drain import DrainBudget, DrainReport, ShardDrainer, StopReason
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handoff import claim_shard
from durability_pipelines.consumer.runtime import ConsumerRuntime
from durability_pipelines.sinks.realtime import install_realtime_fixture
from tests.support.runtime_handlers import DELIVERED
from tests.support.sources import ListSource, SharedListSource
from tests.test_consumer_drain import SHARD, FakeClock, budget, drainer, open_rt
from tests.test_consumer_runtime import rows

BACKENDS = ["redis", "postgres", "hybrid"]


@pytest.fixture
def stream() -> str:
    return "handoff-" + uuid.uuid4().hex[:10]


def recording_rt(stream: str, redis_url: str, postgres_url: str, source: ListSource, backend: str,
                 **overrides: object) -> tuple[ConsumerRuntime, str]:
    flag = f"handoff:{stream}:{backend}"
    rt = open_rt(stream, redis_url, postgres_url, source, backend=backend,
                 handler="tests.support.runtime_handlers:recording", handler_options={"flag": flag}, **overrides)
    return rt, flag


def more_records(source: ListSource, n: int) -> None:
    """The stream goes on: ``n`` more records on the shard."""
    events = source.shards_events[SHARD]
    for _ in range(n):
        nxt = str(int(events[-1].sequence) + 17)
        events.append(ChangeEvent("dynamodb", source.stream, SHARD, nxt, "INSERT", {"pk": nxt}, {"pk": nxt}))


def delivered(flag: str) -> list[str]:
    return [seq for call in DELIVERED.get(flag, []) for seq in call]


def assert_history_never_backwards_and_fenced(rt: ConsumerRuntime, owner: str, successor: str) -> None:
    """Every save advanced; the owner's saves all come before the successor's, under a lower epoch."""
    entries = list(reversed(rt.store.history(rt.key(SHARD))))
    writers = [e.writer for e in entries if e.writer in (owner, successor)]
    assert writers == sorted(writers, key=lambda w: w == successor), writers  # owner's first, then successor's
    epochs = [e.lease_epoch for e in entries if e.lease_epoch is not None]
    assert epochs == sorted(epochs)
    values = [int(e.sequence) for e in entries]
    assert values == sorted(values) and len(set(values)) == len(values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_owner_hands_over_after_its_batch_and_the_successor_reads_on_from_its_checkpoint(
        backend, stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 95)
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    rt, flag = recording_rt(stream, redis_url, postgres_url, source, backend)
    key = rt.key(SHARD).lease_key

    def successor_asks(record) -> None:
        if record.index == 3:  # the successor has started while batch 3 was processed, and asks
            rt.store.leases.request_handoff(key, "run-next", rt.config.lease_duration_s)

    owner = drainer(rt, FakeClock(), budget(max_idle_s=30.0), run_id="run-first", on_batch=successor_asks)
    first = owner.run()
    assert first.stop_reason is StopReason.HANDED_OVER and first.handed_to == "run-next"
    assert first.batch_count == 3 and first.checkpoint == seqs[29]  # it finished the batch in hand, no more
    assert rt.store.load(rt.key(SHARD)) == seqs[29]
    lease = rt.store.leases.get(key)
    assert lease is not None and (lease.owner, lease.epoch) == ("run-next", first.lease_epoch + 1)
    assert lease.handed_from == "run-first" and lease.requested_by == ""

    second = drainer(rt, FakeClock(), budget(max_idle_s=0.0), run_id="run-next").run()
    assert second.claimed == "handed over" and second.handed_from == "run-first"
    assert second.start_after == seqs[29] and second.batches[0].first_sequence == seqs[30]
    assert second.lease_epoch == first.lease_epoch + 1 and second.stop_reason is StopReason.CAUGHT_UP
    assert second.handoff_gap_s is not None and second.handoff_gap_s >= 0
    assert delivered(flag) == seqs  # every record once, in order, across the two runs
    assert rows(postgres_url, stream) == seqs
    assert_history_never_backwards_and_fenced(rt, "run-first", "run-next")
    rt.close()


def test_an_owner_past_its_budget_reads_on_until_its_successor_asks(stream, redis_url, postgres_url) -> None:
    """A successor that is late (a slow launch) never leaves the shard unread: the owner keeps reading."""
    source = ListSource.with_events(stream, 60)
    rt, flag = recording_rt(stream, redis_url, postgres_url, source, "hybrid")
    key = rt.key(SHARD).lease_key
    clock = FakeClock()
    started = clock.now

    def stream_goes_on(record) -> None:
        more_records(source, 1)  # one more record arrives during each batch
        clock.now += 1.0  # and each batch takes a second
        if clock.now - started >= 45 and not rt.store.leases.get(key).requested_by:  # type: ignore[union-attr]
            rt.store.leases.request_handoff(key, "run-late", 120)  # the successor arrives, 35 s late

    owner = drainer(rt, clock, budget(max_seconds=10.0, max_idle_s=300.0, handoff_wait_s=60.0), run_id="run-first",
                    on_batch=stream_goes_on)
    report = owner.run()
    assert report.stop_reason is StopReason.HANDED_OVER and report.handed_to == "run-late"
    assert clock.now - started >= 45  # it read past max_run_seconds (10 s) while it waited
    assert report.events > 60 and rt.store.load(rt.key(SHARD)) == report.checkpoint
    assert delivered(flag) == [e.sequence for e in source.shards_events[SHARD]][: report.events]
    rt.close()


def test_a_successor_that_never_comes_leaves_the_owner_reading_until_the_wait_is_over(
        stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 20)
    rt, _ = recording_rt(stream, redis_url, postgres_url, source, "redis")
    clock = FakeClock()
    started = clock.now
    report = drainer(rt, clock, budget(max_seconds=10.0, max_idle_s=1000.0, handoff_wait_s=60.0),
                     run_id="run-alone").run()
    assert report.stop_reason is StopReason.TIME_BUDGET
    assert clock.now - started >= 70.0  # budget + the whole wait for a successor, polling all along
    lease = rt.store.leases.get(rt.key(SHARD).lease_key)
    assert lease is not None and lease.owner == ""  # released: the unplanned path's next run takes it at once
    rt.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_successors_race_and_exactly_one_gets_the_shard(backend, stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 10)
    rt, _ = recording_rt(stream, redis_url, postgres_url, source, backend)
    key = rt.key(SHARD).lease_key
    owner = rt.store.leases.acquire(key, "run-owner", 120)
    assert owner is not None
    rt.store.leases.request_handoff(key, "run-b", 120)  # run-b asked first
    loser = claim_shard(rt.store.leases, key, "run-c", duration_s=120, timeout_s=60,
                        is_owner_dead=lambda run: False, sleep=lambda s: None)
    assert loser.lease is None and "run-b is already waiting" in loser.why_not
    assert rt.store.leases.hand_over(owner, 120) is not None
    winner = claim_shard(rt.store.leases, key, "run-b", duration_s=120, timeout_s=60,
                         is_owner_dead=lambda run: False, sleep=lambda s: None)
    assert winner.lease is not None and winner.how == "handed over" and winner.lease.epoch == owner.epoch + 1
    rt.store.leases.request_handoff(key, "run-d", 120)  # run-b's successor is already waiting ...
    report = drainer(rt, FakeClock(), run_id="run-c").run()  # ... when a run-c starts: it touches nothing
    assert report.stop_reason is StopReason.NOT_GRANTED and report.batch_count == 0
    assert "run-d is already waiting" in report.not_granted and rt.store.load(rt.key(SHARD)) is None
    rt.close()


def test_a_live_owner_that_does_not_hand_over_keeps_its_shard_and_the_successor_withdraws(
        stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 10)
    rt, _ = recording_rt(stream, redis_url, postgres_url, source, "postgres")
    key = rt.key(SHARD).lease_key
    owner = rt.store.leases.acquire(key, "run-busy", 120)
    assert owner is not None
    clock = FakeClock()
    clock.on_sleep = lambda now: rt.store.leases.renew(owner, 120 + now)  # alive: it keeps renewing
    claim = claim_shard(rt.store.leases, key, "run-next", duration_s=120, timeout_s=5, is_owner_dead=lambda r: False,
                        sleep=clock.sleep, clock=clock)
    assert claim.lease is None and "did not hand it over within handoff_timeout_s" in claim.why_not
    lease = rt.store.leases.get(key)
    assert lease is not None and lease.owner == "run-busy" and lease.requested_by == ""  # withdrawn
    rt.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_owner_is_taken_over_when_its_lease_expires_and_fenced_when_it_wakes(
        backend, stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 10)
    rt, _ = recording_rt(stream, redis_url, postgres_url, source, backend)
    key = rt.key(SHARD).lease_key
    frozen = rt.store.leases.acquire(key, "run-frozen", 1.0)  # it stops renewing: SIGSTOP, a paused VM
    assert frozen is not None
    claim = claim_shard(rt.store.leases, key, "run-next", duration_s=120, timeout_s=0.2,
                        is_owner_dead=lambda r: False, poll_s=0.05)
    assert claim.lease is not None and claim.how == "released or expired"
    assert claim.lease.epoch == frozen.epoch + 1
    time.sleep(0.05)
    with pytest.raises(LeaseLostError):  # the owner wakes and tries to save its batch
        rt.store.save(rt.key(SHARD), source.shards_events[SHARD][0].sequence, lease=frozen)
    assert rt.store.load(rt.key(SHARD)) is None
    rt.close()


def test_a_successor_takes_the_shard_of_a_finished_owner_at_once(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 10)
    rt, _ = recording_rt(stream, redis_url, postgres_url, source, "hybrid")
    key = rt.key(SHARD).lease_key
    rt.store.leases.acquire(key, "run-crashed", 120)  # its run was killed: Dagster marked it finished
    claim = claim_shard(rt.store.leases, key, "run-next", duration_s=120, timeout_s=60,
                        is_owner_dead=lambda run: run == "run-crashed", sleep=lambda s: None)
    assert claim.lease is not None and claim.how == "owner dead"
    rt.close()


def test_a_run_reads_again_at_once_after_records_and_sleeps_only_after_an_empty_read(
        stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 25)
    rt, _ = recording_rt(stream, redis_url, postgres_url, source, "redis")
    clock = FakeClock()
    report = drainer(rt, clock, budget(max_idle_s=1.0)).run()
    assert [b.events for b in report.batches] == [10, 10, 5] and report.stop_reason is StopReason.CAUGHT_UP
    # no sleep after the non-full batch of 5: the only sleeps are the idle polls after empty reads
    assert clock.slept == [0.25] * 4
    rt.close()


def test_keep_owned_never_ends_a_run_because_the_stream_is_quiet(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 5)
    rt, _ = recording_rt(stream, redis_url, postgres_url, source, "redis", keep_owned=True, max_run_seconds=30,
                         handoff_timeout_s=10)
    clock = FakeClock()
    report = ShardDrainer(rt, SHARD, "run-keep", DrainBudget.from_config(rt.config), sleep=clock.sleep,
                          clock=clock).run()
    assert report.stop_reason is StopReason.TIME_BUDGET  # quiet for 40 s, ended only by budget + wait
    assert report.events == 5 and sum(clock.slept) >= 40
    rt.close()


def test_the_postgres_backend_broadcaster_publishes_every_message_once_across_hand_offs(
        stream, redis_url, postgres_url) -> None:
    """Realtime broadcasts are not idempotent: a hand-off must neither skip nor repeat one. With the
    postgres backend each batch's realtime.send calls commit with its checkpoint, under the lease; a
    fenced-out owner's batch rolls back whole."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        install_realtime_fixture(conn)
    room = "room-" + uuid.uuid4().hex[:8]
    source = ListSource.with_events(stream, 70)
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    rt = open_rt(stream, redis_url, postgres_url, source, backend="postgres",
                 handler="durability_pipelines.sinks.realtime:broadcast_handler", handler_options={"topic": room})
    key = rt.key(SHARD).lease_key
    runs = ["run-1", "run-2", "run-3", "run-4"]
    reports = []
    for me, nxt in zip(runs, runs[1:] + [None], strict=True):
        def ask(record, nxt=nxt) -> None:
            if nxt is not None and record.index == 2:  # the successor asks during this run's 2nd batch
                rt.store.leases.request_handoff(key, nxt, rt.config.lease_duration_s)
        reports.append(drainer(rt, FakeClock(), budget(max_idle_s=0.0), run_id=me, on_batch=ask).run())
    assert [r.stop_reason for r in reports] == [StopReason.HANDED_OVER] * 3 + [StopReason.CAUGHT_UP]
    assert [r.handed_to for r in reports[:3]] == runs[1:]
    # the first run's lease, kept by a zombie: its batch (broadcasts and checkpoint) is refused whole
    more_records(source, 5)  # new records, which the zombie reads and tries to publish under its old lease
    zombie = Lease(key, "run-1", reports[0].lease_epoch or 0)
    read = rt.read_after(SHARD, "run-1", zombie, seqs[-1])
    assert len(read.batch.events) == 5
    with pytest.raises(LeaseLostError):
        rt.process(read)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        sent = [r[0] for r in conn.execute(
            "SELECT payload->>'sequence' FROM realtime.messages WHERE topic = %s", (room,)).fetchall()]
    assert sorted(sent, key=int) == seqs and len(sent) == len(set(sent))  # every message once
    rt.close()


def _wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_successor_follows_the_shard_while_it_waits_and_processes_what_it_read_at_once(
        backend, stream, redis_url, postgres_url) -> None:
    """On a source that serves two readers per shard, the successor reads while the owner finishes its last
    batch: what it read is cut at the owner's checkpoint, and its first batch needs no read after the hand-off."""
    source = SharedListSource.with_events(stream, 95)
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    owner_rt, flag = recording_rt(stream, redis_url, postgres_url, source, backend)
    next_rt, _ = recording_rt(stream, redis_url, postgres_url, source, backend)
    successor: dict[str, object] = {}

    def run_successor() -> None:
        successor["report"] = ShardDrainer(next_rt, SHARD, "run-next", budget(max_idle_s=0.0)).run()

    thread = threading.Thread(target=run_successor, name="successor")

    def followed(after: str) -> bool:
        return any(name == "follower" and at == after for name, at, _ in source.reads)

    def owner_reads(name: str, after: str | None) -> None:
        if after == seqs[19] and name == "MainThread" and not thread.is_alive():
            thread.start()  # the successor starts while the owner reads its 3rd batch ...
            _wait_for(lambda: followed(seqs[19]), "the successor to follow from the owner's checkpoint")

    def before_loop_top(record) -> None:
        if record.index == 3:  # ... the owner acked its 3rd batch: the follower reads on from that checkpoint
            _wait_for(lambda: followed(seqs[29]), "the follower to read past the owner's new checkpoint")

    source.on_read = owner_reads
    # the owner reads each batch in turn (no read-ahead), so that the successor asks while it processes batch 3
    owner = drainer(owner_rt, FakeClock(), budget(max_idle_s=30.0), run_id="run-first", on_batch=before_loop_top,
                    prefetch=False)
    first = owner.run()
    thread.join(timeout=60)
    second = successor["report"]
    assert isinstance(second, DrainReport)
    assert first.stop_reason is StopReason.HANDED_OVER and first.handed_to == "run-next"
    assert first.checkpoint == seqs[29] and second.claimed == "handed over" and second.start_after == seqs[29]
    # its first batch is what it followed: nothing read again from the hand-over checkpoint after the hand-off
    assert second.batches[0].first_sequence == seqs[30] and second.batches[0].events == 10
    assert not [r for r in source.reads if r[0] == "successor" and r[1] == seqs[29]]
    assert second.handoff_followed_s is not None and second.handoff_followed_s > 0 and second.handoff_gap_s == 0
    assert delivered(flag) == seqs  # every record once, in order, across the two runs
    assert rows(postgres_url, stream) == seqs
    assert_history_never_backwards_and_fenced(owner_rt, "run-first", "run-next")
    owner_rt.close()
    next_rt.close()


def test_a_follower_whose_reads_do_not_cover_the_hand_over_checkpoint_is_dropped(
        stream, redis_url, postgres_url) -> None:
    """The follower read from an older checkpoint than the one the lease comes with and did not reach it (the
    owner was faster): its records are dropped, the successor reads from the checkpoint, nothing is lost."""
    source = SharedListSource.with_events(stream, 60)
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    rt, flag = recording_rt(stream, redis_url, postgres_url, source, "redis")
    rt.store.save(rt.key(SHARD), seqs[9])
    follower = ShardDrainer(rt, SHARD, "run-next", budget())._follower()
    assert follower is not None
    follower.start()
    _wait_for(lambda: follower.reads >= 1, "the follower's first read")
    follower.stop()
    assert follower.take(seqs[9]) is not None  # it covers the checkpoint it read from ...
    assert follower.take(seqs[29]) is None  # ... but not one past what it read (records 11..20)
    rt.close()
    assert flag


def test_no_follower_on_a_source_that_serves_one_reader_per_shard(stream, redis_url, postgres_url) -> None:
    rt, _ = recording_rt(stream, redis_url, postgres_url, ListSource.with_events(stream, 5), "redis")
    assert ShardDrainer(rt, SHARD, "run-next", budget())._follower() is None
    rt.close()


def test_a_batch_read_from_an_older_checkpoint_is_cut_at_a_newer_one_it_covers() -> None:
    source = ListSource.with_events("cut", 30)
    seqs = [e.sequence for e in source.shards_events[SHARD]]
    batch = source.read(SHARD, seqs[4], 10)  # records 5..14
    assert batch.after(seqs[4]) is batch
    cut = batch.after(seqs[9])
    assert cut is not None and cut.start_after == seqs[9] and [e.sequence for e in cut.events] == seqs[10:15]
    assert cut.next_checkpoint == seqs[14]
    empty = batch.after(seqs[14])
    assert empty is not None and empty.events == [] and empty.next_checkpoint == seqs[14]
    assert batch.after(seqs[15]) is None  # past its end: records 15.. were never read
    assert batch.after(seqs[2]) is None  # before its start: records 3..4 are not in it
    assert batch.after(None) is None
