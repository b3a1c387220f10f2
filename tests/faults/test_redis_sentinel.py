"""Redis behind Sentinel, on a deployment the test owns (one master, one replica, one sentinel): the master is
SIGKILLed and the sentinel promotes the replica. The same store object goes on against the new master; with
``redis_wait_replicas: 1`` nothing acked is lost, with 0 the acks the replica had not received are, and a
consumer re-processes them into the idempotent sink without a duplicate effect.

Replication is held back (replica frozen, its link closed) just before the fault, so that "writes the replica
had not received" is a fixed set instead of a race."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from durability_pipelines.checkpoints.errors import ReplicationTimeoutError, StoreUnavailableError
from durability_pipelines.checkpoints.keys import CheckpointKey
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer
from durability_pipelines.consumer.runtime import open_runtime
from tests.support.dagster_daemon import DELIVERIES_DDL, wait_until
from tests.support.dynamodb import AWS_TEST_ENV, clients, create_stream_table, moto_server, put_items
from tests.support.servers import PrivateSentinelSet

BASE = 10**20  # 21-digit positions, like DynamoDB's


@pytest.fixture
def sentinel_set() -> Iterator[PrivateSentinelSet]:
    with PrivateSentinelSet(sentinels=1) as deployment:
        yield deployment


def _pos(n: int) -> str:
    return str(BASE + n)


def _save_when_reachable(store: RedisCheckpointStore, key: CheckpointKey, sequence: str) -> None:
    """Save, retrying while the client finds the new master (and, with WAIT, a replica for it)."""

    def attempt() -> bool:
        try:
            store.save(key, sequence)
        except ReplicationTimeoutError:
            raise  # a replica that is in sync acks at once: waiting longer would hide a bug
        except StoreUnavailableError:
            return False
        return True

    wait_until(attempt, what=f"a save of {sequence} through the same store after the failover", timeout=90)


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_a_store_on_a_sentinel_url_goes_on_after_a_failover_and_wait_replicas_keeps_every_ack(
    sentinel_set: PrivateSentinelSet, wait_replicas: int
) -> None:
    # WAIT's timeout: long enough that a replica in sync always acks within it, even when CI loads the
    # machine (at 0.2 s a loaded run once saw an in-sync replica miss it); it is only paid where no replica acks.
    store = RedisCheckpointStore.from_url(sentinel_set.url, wait_replicas=wait_replicas, wait_timeout_s=2.0)
    key = CheckpointKey("dynamodb", f"sentinel-{secrets.token_hex(3)}", "g", "c", "shard-0")
    for n in range(1, 21):
        store.save(key, _pos(n))
    assert store.load(key) == _pos(20)

    sentinel_set.pause_replication()  # from here the master's writes reach no replica
    try:
        if wait_replicas:
            with pytest.raises(ReplicationTimeoutError, match="redis_wait_replicas"):
                store.save(key, _pos(21))  # written on the master, but not acked: the batch would be retried
        else:
            assert store.save(key, _pos(21)).advanced  # acked on the master alone
        old = sentinel_set.kill_master()
    finally:
        sentinel_set.resume_replica()
    sentinel_set.wait_for_new_master(old)

    # The promoted replica has what it had received: the last *acked* position with WAIT, one ack less without.
    assert wait_until(lambda: _load_or_none(store, key), what="a load after the failover", timeout=90) == _pos(20)
    if wait_replicas:
        with pytest.raises(ReplicationTimeoutError):
            store.save(key, _pos(21))  # the new master has no replica yet: no ack may claim to survive
        old.start()  # back as a replica of the new master (the sentinel reconfigures it) ...
        sentinel_set.wait_for_replica_in_sync(old)  # ... which acks a WAIT only once it has resynchronised
    _save_when_reachable(store, key, _pos(21))
    store.save(key, _pos(22))
    assert store.load(key) == _pos(22)


def _load_or_none(store: RedisCheckpointStore, key: CheckpointKey) -> str | None:
    try:
        return store.load(key)
    except StoreUnavailableError:
        return None


def test_acks_lost_in_a_failover_are_reprocessed_into_the_idempotent_sink_without_duplicate_effect(
    sentinel_set: PrivateSentinelSet, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(DELIVERIES_DDL)
    with moto_server() as endpoint:
        monkeypatch.setenv("DURABILITY_DYNAMODB_ENDPOINT_URL", endpoint)
        ddb, streams = clients(endpoint)
        table, _ = create_stream_table(ddb)
        put_items(ddb, table, [{"pk": f"k{i:04d}", "n": i} for i in range(60)])
        cfg = ConsumerConfig.model_validate({
            "name": "sentinel_worker", "source": {"kind": "dynamodb", "table": table}, "group": "g-sentinel",
            "consumer": "worker", "handler": "tests.support.dagster_daemon:record_deliveries",
            "checkpoint": {"backend": "redis", "redis_wait_replicas": 0}, "max_events": 30, "max_idle_s": 0,
            "retry": {"max_retries": 0},
        })  # fmt: skip
        rt = open_runtime(cfg, redis_url=sentinel_set.url, postgres_url=postgres_url, is_owner_dead=lambda _: True)
        try:
            shard = rt.source.list_shards()[0]
            key = CheckpointKey("dynamodb", table, "g-sentinel", "worker", shard)

            def drain(run_id: str) -> Any:
                return ShardDrainer(rt, shard, run_id, DrainBudget(10_000, 600, 0), prefetch=False).run()

            first = drain("run-1")
            put_items(ddb, table, [{"pk": f"k{i:04d}", "n": i} for i in range(60, 90)])
            sentinel_set.pause_replication()
            try:
                second = drain("run-2")  # one batch, acked on the master only
                old = sentinel_set.kill_master()
            finally:
                sentinel_set.resume_replica()
            assert second.events == 30 and int(second.checkpoint) > int(first.checkpoint)
            sentinel_set.wait_for_new_master(old)

            # A load says where the consumer really is: the last ack the replica had, not the last one made.
            assert wait_until(lambda: _load_or_none(rt.store, key), what="a load after the failover",
                              timeout=90) == first.checkpoint  # fmt: skip
            third = wait_until(lambda: _drain_or_none(drain, "run-3"), what="a drain after the failover", timeout=90)
            assert third.events == 30 and third.checkpoint == second.checkpoint
            assert rt.store.load(key) == second.checkpoint
        finally:
            rt.close()
        it = streams.get_shard_iterator(StreamArn=ddb.describe_table(TableName=table)["Table"]["LatestStreamArn"],
                                        ShardId=shard, ShardIteratorType="TRIM_HORIZON")  # fmt: skip
        produced = [r["dynamodb"]["SequenceNumber"] for r in
                    streams.get_records(ShardIterator=it["ShardIterator"], Limit=1000)["Records"]]  # fmt: skip
    with psycopg.connect(postgres_url) as conn:
        sink = [s for (s,) in conn.execute(
            "SELECT sequence FROM stream_events WHERE stream = %s ORDER BY sequence::numeric", (table,))]  # fmt: skip
        deliveries = dict(conn.execute(
            "SELECT sequence, count(*) FROM e2e_deliveries WHERE stream = %s GROUP BY sequence", (table,)).fetchall())
    assert sink == produced  # every record once in the sink: the replay had no duplicate effect
    replayed = sorted((s for s, n in deliveries.items() if n > 1), key=int)
    assert replayed == produced[60:]  # exactly the batch whose ack the failover lost was processed again


def _drain_or_none(drain: Any, run_id: str) -> Any:
    try:
        return drain(run_id)
    except StoreUnavailableError:
        return None


def test_without_enough_replicas_a_redis_ack_fails_and_a_hybrid_ack_goes_to_postgres(
    make_private_redis: Any, postgres_url: str
) -> None:
    from durability_pipelines.checkpoints.factory import StoreConfig, open_store
    from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore

    lone = make_private_redis(appendonly=False)  # a master with no replica at all
    key = CheckpointKey("dynamodb", f"lone-{secrets.token_hex(3)}", "g", "c", "shard-0")
    options = {"redis_wait_replicas": 1, "redis_wait_timeout_s": 0.1}
    redis_only = open_store(StoreConfig(backend="redis", **options), redis_url=lone.url)
    with pytest.raises(ReplicationTimeoutError, match="only 0 of the 1 replicas"):
        redis_only.save(key, _pos(1))
    assert lone.client().get(key.redis_key) == _pos(1).encode()  # written on the master, just not acked

    hybrid = open_store(StoreConfig(backend="hybrid", **options), redis_url=lone.url, postgres_url=postgres_url)
    assert isinstance(hybrid, HybridCheckpointStore)
    assert hybrid.save(key, _pos(2)).advanced  # the ack is made durable in Postgres instead
    assert hybrid.postgres.load(key) == _pos(2) and "redis" in hybrid.degraded
    hybrid.close()
