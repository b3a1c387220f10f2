"""Hybrid store under real outages: Redis flushed/restarted, Postgres stopped, Redis stopped."""

from __future__ import annotations

import time

import pytest

from durability_pipelines.checkpoints import LeaseLostError, StoreUnavailableError
from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore
from tests.support.stores import unique_key


def hybrid(redis_url: str, postgres_url: str, **kwargs: object) -> HybridCheckpointStore:
    return HybridCheckpointStore(
        RedisCheckpointStore.from_url(redis_url), PostgresCheckpointStore(postgres_url, connect_timeout=2),
        **kwargs,  # type: ignore[arg-type]
    )


def test_redis_flushed_then_load_comes_from_postgres_and_rewarms(make_private_redis, postgres_url: str) -> None:
    server = make_private_redis(appendonly=False)
    store = hybrid(server.url, postgres_url, flush_every_n=1)
    key = unique_key()
    store.save(key, "1000")
    server.client().flushall()
    assert store.load(key) == "1000"
    assert server.client().get(key.redis_key) == b"1000"  # re-warmed
    store.close()


def test_redis_restarted_empty_then_load_comes_from_postgres(make_private_redis, postgres_url: str) -> None:
    server = make_private_redis(appendonly=False)
    store = hybrid(server.url, postgres_url, flush_every_n=1)
    keys = [unique_key() for _ in range(3)]
    for i, k in enumerate(keys):
        store.save(k, str(500 + i))
    server.stop()
    server.start()  # no persistence: Redis comes back empty
    assert store.load_many(keys) == {k: str(500 + i) for i, k in enumerate(keys)}
    store.close()


def test_postgres_down_saves_continue_on_redis_then_catch_up(redis_url: str, private_postgres) -> None:
    store = hybrid(redis_url, private_postgres.url, flush_every_n=2, flush_every_s=3600)
    key = unique_key()
    store.save(key, "10")  # first ack: flushed
    private_postgres.stop()
    for v in ("11", "12", "13", "14"):
        assert store.save(key, v).advanced  # acks keep succeeding on Redis
    assert "postgres" in store.degraded and store.pending[key] == "14"
    assert store.load(key) == "14"
    private_postgres.start()
    assert store.flush() == 1
    assert store.postgres.load(key) == "14" and not store.is_degraded and store.pending == {}
    store.close()


def test_close_while_postgres_is_down_raises_and_redis_keeps_the_ack(redis_url: str, private_postgres) -> None:
    store = hybrid(redis_url, private_postgres.url, flush_every_n=100, flush_every_s=3600)
    key = unique_key()
    store.save(key, "1")
    store.save(key, "2")
    private_postgres.stop()
    with pytest.raises(StoreUnavailableError, match="Postgres"):
        store.close()
    assert RedisCheckpointStore.from_url(redis_url).load(key) == "2"  # nothing acknowledged is lost
    private_postgres.start()


def test_redis_down_saves_go_straight_to_postgres(private_redis, postgres_url: str) -> None:
    store = hybrid(private_redis.url, postgres_url, flush_every_n=100, flush_every_s=3600)
    key = unique_key()
    store.save(key, "1")
    private_redis.stop()
    result = store.save(key, "2")
    assert result.advanced and "redis" in store.degraded
    assert store.postgres.load(key) == "2"
    assert store.load(key) == "2"  # Redis down: served by Postgres
    private_redis.start()
    assert store.save(key, "3").advanced
    assert store.redis.load(key) == "3"
    store.close()


def test_lease_granted_while_redis_was_down_still_fences(private_redis, postgres_url: str) -> None:
    store = hybrid(private_redis.url, postgres_url)
    key = unique_key()
    private_redis.stop()
    lease = store.leases.acquire(key.lease_key, "worker-a")  # granted by Postgres only
    assert lease is not None
    private_redis.start()
    private_redis.client().flushall()  # Redis never saw the lease
    assert store.save(key, "5", lease=lease).advanced  # mirrored on demand, then admitted
    stolen = store.leases.acquire(key.lease_key, "worker-b", steal=True)
    assert stolen is not None and stolen.epoch == lease.epoch + 1
    with pytest.raises(LeaseLostError):
        store.save(key, "6", lease=lease)
    assert store.load(key) == "5"
    store.close()


# -- the fencing rule, whichever store was down when (a save is accepted only under the highest
# -- epoch any store has granted for the lease, before that grant expires) ----------------------


def test_a_zombie_cannot_save_after_a_takeover_during_a_redis_outage(private_redis, postgres_url: str) -> None:
    a_store = hybrid(private_redis.url, postgres_url, flush_every_n=1)
    b_store = hybrid(private_redis.url, postgres_url, flush_every_n=1)
    key = unique_key()
    a = a_store.leases.acquire(key.lease_key, "run-A", duration_s=1.0)
    assert a is not None and a_store.save(key, "100", lease=a).advanced
    private_redis.stop()
    time.sleep(1.3)  # A stalls past its lease while Redis is away
    b = b_store.leases.acquire(key.lease_key, "run-B", duration_s=60)  # Postgres grants; Redis never hears of it
    assert b is not None and b.epoch == a.epoch + 1
    assert b_store.save(key, "200", lease=b).advanced  # straight to Postgres
    private_redis.start()
    with pytest.raises(LeaseLostError, match="run-B"):
        a_store.save(key, "300", lease=a)  # Redis still holds A's copy, expired: refused; Postgres names B
    assert a_store.postgres.load(key) == "200" and a_store.redis.load(key) == "100"
    writers = {h.writer for h in a_store.postgres.history(key)}
    assert "run-A" in writers and all(h.sequence != "300" for h in a_store.postgres.history(key))
    assert b_store.save(key, "250", lease=b).advanced  # the new holder goes on (its copy mirrored on demand)
    assert b_store.redis.load(key) == "250"
    a_store.close()
    b_store.close()


def test_no_takeover_while_postgres_is_down_and_a_zombie_is_refused_by_postgres(
        redis_url: str, private_postgres, make_flaky_proxy) -> None:
    proxy = make_flaky_proxy(redis_url)  # A's way to Redis, which the test can cut
    a_store = hybrid(proxy.url_for(redis_url), private_postgres.url, flush_every_n=1)
    b_store = hybrid(redis_url, private_postgres.url, flush_every_n=1)
    key = unique_key()
    a = a_store.leases.acquire(key.lease_key, "run-A", duration_s=1.0)
    assert a is not None and a_store.save(key, "100", lease=a).advanced
    private_postgres.stop()
    time.sleep(1.3)
    # Postgres grants hybrid leases: while it is down nobody takes a shard (Redis never grants one)
    with pytest.raises(StoreUnavailableError, match="grants"):
        b_store.leases.acquire(key.lease_key, "run-B", duration_s=60)
    with pytest.raises(LeaseLostError, match="expired"):
        a_store.save(key, "300", lease=a)  # A's own lease has run out: refused by Redis, unverifiable in Postgres
    private_postgres.start()
    b = b_store.leases.acquire(key.lease_key, "run-B", duration_s=60)
    assert b is not None and b.epoch == a.epoch + 1
    assert b_store.save(key, "200", lease=b).advanced
    # A's save while Redis is unreachable goes straight to Postgres, which refuses it too
    proxy.down()
    with pytest.raises(LeaseLostError, match="run-B"):
        a_store.save(key, "300", lease=a)
    assert b_store.postgres.load(key) == "200"
    a_store.close()
    b_store.close()


def test_a_steal_needs_redis_and_a_lost_lease_is_never_flushed(private_redis, postgres_url: str) -> None:
    a_store = hybrid(private_redis.url, postgres_url, flush_every_n=100, flush_every_s=3600)
    b_store = hybrid(private_redis.url, postgres_url, flush_every_n=1)
    key = unique_key()
    a = a_store.leases.acquire(key.lease_key, "run-A", duration_s=60)
    assert a is not None and a_store.save(key, "100", lease=a).advanced  # a key's first ack is flushed at once
    assert a_store.save(key, "120", lease=a).advanced  # admitted in Redis, pending for Postgres
    assert a_store.pending == {key: "120"}
    private_redis.stop()
    # A is presumed dead (its run ended, say), but its lease has not expired: a steal could leave it
    # writing to Redis, so it is refused while Redis is down
    with pytest.raises(StoreUnavailableError, match="Redis is unreachable"):
        b_store.leases.acquire(key.lease_key, "run-B", duration_s=60, steal=True)
    private_redis.start()
    b = b_store.leases.acquire(key.lease_key, "run-B", duration_s=60, steal=True)
    assert b is not None and b.epoch == a.epoch + 1
    with pytest.raises(LeaseLostError):
        a_store.save(key, "150", lease=a)  # the steal expired A's Redis copy first
    assert a_store.flush() == 0  # A's pending ack is not written under a lease it lost
    assert a_store.pending == {} and a_store.postgres.load(key) == "100"
    assert a_store.redis.load(key) == "120"  # a legitimate ack when it was made: the mirror copies it
    a_store.close()
    b_store.close()
