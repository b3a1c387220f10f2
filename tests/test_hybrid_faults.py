"""Hybrid store under real outages: Redis flushed/restarted, Postgres stopped, Redis stopped."""

from __future__ import annotations

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
