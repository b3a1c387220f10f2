"""Issue 21 item 1: a frozen worker holding its sink transaction must not stall the takeover for ever.

The attack: a worker is stopped inside its handler with its ``stream_events`` transaction open and the
rows it inserted locked; the run that took the shard over inserts the same rows and waited on that lock
without a bound (and so, unable to renew its lease, looked dead). To the server a frozen worker is just
an open transaction that inserted those keys, so the holder here is a second connection doing exactly
that, with the settings every project sink transaction now has (``bound_lock_waits``).

Expected: the takeover's batch ends with ``LockWaitTimeoutError`` (retryable, never dead-lettered)
naming the holder, within ``lock_timeout`` = lease/4 (asserted by the error, not a stopwatch); the
server ends the frozen holder after ``idle_in_transaction_session_timeout`` = one lease, and the retry
goes through. Meanwhile the change feed says it is held back by that transaction, not "caught up".

A private PostgreSQL: the visibility horizon is cluster-wide, so on a shared server any other open
transaction could be the one holding it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from durability_pipelines.checkpoints import StoreConfig
from durability_pipelines.checkpoints.errors import StoreUnavailableError
from durability_pipelines.checkpoints.lock_waits import LockWaitBounds, LockWaitTimeoutError, bound_lock_waits
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.consumer.adapters.supabase import build_supabase_source
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.lag import explain_caught_up, measure_lag
from durability_pipelines.consumer.runtime import open_runtime
from durability_pipelines.consumer.storage import ConsumerStorage, ensure
from durability_pipelines.sinks.postgres_events import write_events
from durability_pipelines.sources.supabase_changes import install_change_feed
from tests.support.servers import PrivatePostgres
from tests.support.sources import ListSource

LEASE_S = 10.0  # the shortest lease a consumer may have: lock_timeout 2.5 s, idle-in-transaction timeout 10 s
HANG_GUARD_S = 120.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        ensure(PostgresConnection(server.url))
        yield server
    finally:
        server.close()


def config(stream: str, backend: str) -> ConsumerConfig:
    return ConsumerConfig.model_validate({
        "name": "frozen_" + uuid.uuid4().hex[:6], "source": {"kind": "dynamodb", "table": stream}, "group": "g",
        "consumer": "c", "checkpoint": StoreConfig(backend=backend), "max_events": 10, "lease_duration_s": LEASE_S})


def frozen_worker(pg: PrivatePostgres, source: ListSource, consumer: str) -> psycopg.Connection:
    """The frozen worker as the server sees it: its sink transaction inserted the batch's rows and stopped."""
    conn = psycopg.connect(pg.url)
    bound_lock_waits(conn, LockWaitBounds.for_lease(LEASE_S), application_name="durability frozen-run")
    write_events(conn, source.shards_events["shard-0"], consumer)
    return conn


def wait_until_gone(pg: PrivatePostgres, pid: int) -> None:
    """The server ends the holder's session (idle_in_transaction_session_timeout): polled, hang guard only."""
    deadline = time.monotonic() + HANG_GUARD_S
    with pg.connect() as conn:
        while conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} still there"
            time.sleep(0.2)


def stored_rows(pg: PrivatePostgres, stream: str) -> int:
    with pg.connect() as conn:
        return conn.execute("SELECT count(*) FROM stream_events WHERE stream = %s", (stream,)).fetchone()[0]


@pytest.mark.parametrize("backend", ["postgres", "hybrid"])
def test_a_takeover_blocked_by_a_frozen_holder_gets_a_retryable_error_naming_it_then_goes_through(
        backend: str, pg: PrivatePostgres, redis_url: str) -> None:
    stream = "frozen-" + uuid.uuid4().hex[:8]
    source = ListSource.with_events(stream, 5)
    cfg = config(stream, backend)
    holder = frozen_worker(pg, source, cfg.name)
    holder_pid = holder.info.backend_pid
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=pg.url, source=source)
    try:
        read = rt.read("shard-0", "run-takeover")
        with pytest.raises(LockWaitTimeoutError) as err:
            rt.process(read)
        assert isinstance(err.value, StoreUnavailableError)  # retried by the op's RetryPolicy, never dead-lettered
        message = str(err.value)
        assert f"pid {holder_pid} (durability frozen-run)" in message and "open since" in message
        assert "after 2.5 s (lock_timeout = lease_duration_s 10 s / 4" in message
        assert [b.pid for b in err.value.blockers] == [holder_pid]
        assert ConsumerStorage(PostgresConnection(pg.url)).dead_letters(cfg.name) == []
        lease = rt.store.leases.get(rt.key("shard-0").lease_key)
        assert lease is not None and lease.owner == "run-takeover"  # alive and still the owner, not "dead"

        wait_until_gone(pg, holder_pid)  # one lease after the freeze the server ends the frozen transaction
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            holder.execute("SELECT 1")  # the frozen worker, resumed, finds its transaction gone
        retry = rt.read("shard-0", "run-takeover")  # the op's retry: the lease again, the batch from the checkpoint
        rt.ack(retry, rt.process(retry))
        assert rt.store.load(rt.key("shard-0")) == source.shards_events["shard-0"][-1].sequence
    finally:
        rt.close()
        holder.close()
    assert stored_rows(pg, stream) == 5


def test_the_change_feed_names_the_transaction_holding_it_back_instead_of_caught_up(
        pg: PrivatePostgres, redis_url: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    table, log = f"orders_{suffix}", f"cl_{suffix}"
    with pg.connect() as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(sql.Identifier(table)))
        install_change_feed(conn, table, change_log=log)
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(table)))
    cfg = ConsumerConfig.model_validate({
        "name": "held_" + suffix, "group": "g", "consumer": "c", "checkpoint": StoreConfig(backend="postgres"),
        "source": {"kind": "supabase", "channel": f"ch-{table}", "table": table, "change_log": log,
                   "replay_from": "earliest"}})
    source = build_supabase_source(cfg, postgres_url=pg.url)
    first = source.read(None, None, 10)
    assert [e.keys for e in first.events] == [{"id": 1}] and source.held_back(None, first.next_checkpoint) is None
    holder = frozen_worker(pg, ListSource.with_events("frozen-" + suffix, 1), "frozen")
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=pg.url, source=source)
    try:
        rt.store.save(rt.key(None), first.next_checkpoint)
        with pg.connect() as conn:  # committed, but after the frozen transaction began
            conn.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(sql.Identifier(table)))
        assert not source.has_new(None, first.next_checkpoint)  # the horizon holds it back
        holdup = source.held_back(None, first.next_checkpoint)
        assert holdup is not None
        assert "held back by transaction" in holdup.reason and f"pid {holder.info.backend_pid}" in holdup.reason
        assert "durability frozen-run" in holdup.reason and "open since" in holdup.reason
        (lag,) = measure_lag(rt)
        assert lag.held_back == holdup.reason and lag.lag_s is not None and lag.oldest_waiting is not None
        assert "held back by transaction" in lag.describe()
        # the sensor's skip reason (orchestration calls explain_caught_up after plan_tick)
        assert explain_caught_up(source, {"-": "caught up"}, {None: first.next_checkpoint}) == {
            "-": f"nothing readable: {holdup.reason}"}
        holder.rollback()  # the holder is gone: the change is read, nothing holds the feed
        assert [e.keys for e in source.read(None, first.next_checkpoint, 10).events] == [{"id": 2}]
        assert source.held_back(None, first.next_checkpoint) is None
    finally:
        rt.close()
        holder.close()


def test_a_draining_run_blocked_by_a_frozen_holder_retries_the_batch_in_place_and_goes_through(
        pg: PrivatePostgres, redis_url: str) -> None:
    """The drain loop itself: the lock waits are retried inside the run (lease renewed between them, nothing
    dead-lettered), and the batch commits once the server has ended the frozen transaction: no new run."""
    from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer

    stream = "frozen-" + uuid.uuid4().hex[:8]
    source = ListSource.with_events(stream, 5)
    cfg = config(stream, "hybrid")
    holder = frozen_worker(pg, source, cfg.name)
    holder_pid = holder.info.backend_pid
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=pg.url, source=source)
    waits: list[BaseException] = []
    try:
        drainer = ShardDrainer(rt, "shard-0", "run-takeover", DrainBudget(100, 600, 0),
                               on_retry=lambda n, exc, delay: waits.append(exc))
        report = drainer.run()  # returns only once the batch went through
        assert report.events == 5 and report.checkpoint == source.shards_events["shard-0"][-1].sequence
        assert waits and all(isinstance(e, LockWaitTimeoutError) for e in waits)
        assert f"pid {holder_pid} (durability frozen-run)" in str(waits[0])
        assert report.dead_letters == 0 and ConsumerStorage(PostgresConnection(pg.url)).dead_letters(cfg.name) == []
        assert report.batches[0].attempts == 1  # the waits were not handler attempts
    finally:
        rt.close()
        holder.close()
    assert stored_rows(pg, stream) == 5
