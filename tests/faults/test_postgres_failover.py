"""Postgres failover on a multi-host URL: a private primary and a streaming standby of it; the primary
goes away and the standby is promoted while the project is using it.

Replication is asynchronous, so what survives a failover is what the standby had replayed. The
checkpoint-store test waits for the standby to catch up before it SIGKILLs the primary (the position
acknowledged then is the one that must load afterwards); the consumer tests stop the primary with a
fast shutdown, which sends the standby every WAL record before the primary exits, in the middle of a
batch whose transaction is still open. Either way: nothing acked is lost, nothing reaches the sink twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

import psycopg
import pytest

from durability_pipelines.checkpoints import CheckpointKey, SaveContext, StoreUnavailableError
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore, PostgresConnection
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handlers import HandlerContext, transactional
from durability_pipelines.consumer.runtime import SinkUnavailableError, open_runtime
from durability_pipelines.consumer.storage import ensure
from durability_pipelines.sources.supabase_changes import (
    ChangeFeedReader,
    ChangeFeedUnavailableError,
    install_change_feed,
)
from tests.support.dagster_daemon import DELIVERIES_DDL, wait_until
from tests.support.dynamodb import AWS_TEST_ENV, clients, create_stream_table, moto_server, put_items
from tests.support.servers import PrivatePostgres, PrivateStandby, multi_host_url

EVENTS = 300
BATCH = 50
RETRIES = 5  # the op's RetryPolicy in a Dagster run: bounded


@pytest.fixture
def pair(make_private_postgres) -> Iterator[tuple[PrivatePostgres, PrivateStandby]]:
    primary = make_private_postgres()
    standby = primary.start_standby()
    yield primary, standby
    standby.close()


def fail_over(primary: PrivatePostgres, standby: PrivateStandby, *, crash: bool = False) -> None:
    if crash:
        primary.kill()
    else:
        primary.stop()
    standby.promote()


def test_a_checkpoint_store_on_a_multi_host_url_keeps_saving_after_the_standby_is_promoted(pair) -> None:
    primary, standby = pair
    store = PostgresCheckpointStore(multi_host_url(primary, standby))
    key = CheckpointKey("dynamodb", "orders", "g-failover", "worker", "shard-0")
    lease = store.leases.acquire(key.lease_key, "run-1", 600)
    assert lease is not None
    ctx = SaveContext(writer="run-1", run_id="run-1", reason="batch ack")
    for seq in range(100, 150):
        store.save(key, str(seq), lease=lease, context=ctx)
    # Asynchronous replication: an ack is durable on the primary only. Wait for the standby to have
    # it before the crash, so that "the last acknowledged position" is well defined.
    wait_until(standby.caught_up, what="the standby replayed every ack", timeout=60)
    fail_over(primary, standby, crash=True)

    with pytest.raises(StoreUnavailableError):  # the connection still points at the dead primary
        store.load(key)
    assert store.load(key) == "149"  # reconnected, to the promoted standby: nothing lost
    for seq in range(150, 200):
        store.save(key, str(seq), lease=lease, context=ctx)  # the lease replicated too: still fenced
    assert store.load(key) == "199"
    history = [(h.previous, h.sequence) for h in reversed(store.history(key))]
    assert history[0] == (None, "100") and history[-1] == ("198", "199") and len(history) == 100
    store.close()


def failing_handler(real, primary: PrivatePostgres, standby: PrivateStandby, at_batch: int):
    """The real sink, but during batch ``at_batch`` (its rows written, not committed) the primary is
    shut down and the standby promoted: the batch's commit then fails against the old primary."""
    calls = {"n": 0}

    @transactional
    def handle(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
        result = real(events, ctx)
        calls["n"] += 1
        if calls["n"] == at_batch:
            fail_over(primary, standby)
        return result

    return handle


@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_a_consumer_draining_into_postgres_goes_on_after_a_promotion_with_every_event_once(
    backend: str, pair, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, standby = pair
    url = multi_host_url(primary, standby)
    ensure(PostgresConnection(url))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(DELIVERIES_DDL)
    with moto_server() as endpoint:
        for name, value in {**AWS_TEST_ENV, "DURABILITY_DYNAMODB_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        ddb, streams = clients(endpoint)
        table, arn = create_stream_table(ddb)
        put_items(ddb, table, [{"pk": f"k{i:04d}", "n": i} for i in range(EVENTS)])
        group = f"g-{uuid.uuid4().hex[:8]}"
        cfg = ConsumerConfig.model_validate({
            "name": "pg_failover", "source": {"kind": "dynamodb", "table": table}, "group": group,
            "consumer": "worker", "handler": "tests.support.dagster_daemon:record_deliveries",
            "checkpoint": {"backend": backend}, "max_events": BATCH, "max_idle_s": 0,
            "retry": {"max_retries": 0},  # a handler failure would be dead-lettered at once: none may be
        })  # fmt: skip
        rt = open_runtime(cfg, redis_url=redis_url, postgres_url=url)
        rt.handler = failing_handler(rt.handler, primary, standby, at_batch=3)
        shard = rt.source.list_shards()[0]
        failures: list[Exception] = []
        for _ in range(RETRIES):  # what the op's RetryPolicy does: the same run, from the acked checkpoint
            try:
                report = ShardDrainer(rt, shard, "run-1", DrainBudget(10_000, 600, 0), prefetch=False).run()
                break
            except StoreUnavailableError as exc:
                failures.append(exc)
        else:
            pytest.fail(f"still failing after {RETRIES} attempts: {failures[-1]}")
        rt.close()
        expected_error = StoreUnavailableError if backend == "postgres" else SinkUnavailableError
        assert len(failures) == 1 and isinstance(failures[0], expected_error)
        assert "retried" in str(failures[0]) or "rolled back" in str(failures[0])
        it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")
        produced = [
            r["dynamodb"]["SequenceNumber"]
            for r in streams.get_records(ShardIterator=it["ShardIterator"], Limit=1000)["Records"]
        ]
    assert report.checkpoint == produced[-1]
    assert not standby.in_recovery()
    with psycopg.connect(url) as conn:  # lands on the promoted standby
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == standby.port
        sink = [
            s
            for (s,) in conn.execute(
                "SELECT sequence FROM stream_events WHERE stream = %s ORDER BY sequence::numeric", (table,)
            )
        ]
        delivered = [
            s
            for (s,) in conn.execute(
                "SELECT sequence FROM e2e_deliveries WHERE stream = %s ORDER BY sequence::numeric", (table,)
            )
        ]
        dead = conn.execute("SELECT count(*) FROM dead_letters WHERE stream = %s", (table,)).fetchone()[0]
    assert sink == produced  # every record, in order, nothing skipped
    assert delivered == produced  # each batch committed exactly once: the failed one was rolled back
    assert dead == 0


def test_the_change_feed_reconnects_to_the_promoted_standby(pair) -> None:
    primary, standby = pair
    url = multi_host_url(primary, standby)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
        install_change_feed(conn, "orders")
        conn.execute("INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 20) g")
    reader = ChangeFeedReader(url, table="orders")
    first = reader.read(None, 10)
    assert [r.record["id"] for r in first] == list(range(1, 11))
    fail_over(primary, standby)
    with pytest.raises(ChangeFeedUnavailableError, match="can be retried"):
        reader.read(first[-1].position, 10)
    rest = reader.read(first[-1].position, 100)  # reconnected: the promoted standby has every change
    assert [r.record["id"] for r in rest] == list(range(11, 21))
    with psycopg.connect(url, autocommit=True) as conn:  # writes go on on the new primary, and are read
        conn.execute("INSERT INTO orders SELECT g, 'new' FROM generate_series(21, 25) g")
    more = reader.read(rest[-1].position, 100)
    assert [r.record["id"] for r in more] == list(range(21, 26))
    reader.close()
