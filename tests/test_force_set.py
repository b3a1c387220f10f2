"""``force_set``: the one unconditional write (operators only), on every backend and real servers."""

from __future__ import annotations

import psycopg
import pytest
import redis

from durability_pipelines.checkpoints import CheckpointStore, InvalidSequenceError, SaveContext, SaveOutcome
from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore
from tests.support.stores import build_store, unique_key

D21 = "1" + "0" * 20
WHO = SaveContext(writer="alice@ops-host", reason="replay after bad deploy")


def test_force_set_moves_backwards_and_records_who_and_why(store: CheckpointStore) -> None:
    key = unique_key()
    store.save(key, D21 + "5")
    result = store.force_set(key, D21, context=WHO)
    assert (result.previous, result.current, result.direction) == (D21 + "5", D21, "backward")
    assert store.load(key) == D21
    newest = store.history(key)[0]
    assert (newest.previous, newest.sequence, newest.writer, newest.reason) == (
        D21 + "5", D21, "alice@ops-host", "replay after bad deploy")
    assert newest.lease_epoch is None


def test_force_set_creates_and_monotonic_saves_resume_from_it(store: CheckpointStore) -> None:
    key = unique_key()
    created = store.force_set(key, "50", context=WHO)
    assert created.previous is None and created.direction == "created"
    assert store.save(key, "40").outcome is SaveOutcome.STALE
    assert store.save(key, "60").advanced
    assert store.force_set(key, "60", context=WHO).direction == "unchanged"
    assert store.force_set(key, "70", context=WHO).direction == "forward"
    assert store.load(key) == "70"


def test_force_set_needs_a_reason_and_a_valid_sequence(store: CheckpointStore) -> None:
    key = unique_key()
    with pytest.raises(ValueError, match="reason"):
        store.force_set(key, "5", context=SaveContext(writer="bob", reason=""))
    with pytest.raises(InvalidSequenceError, match=key.redis_key):
        store.force_set(key, "12.5", context=WHO)
    assert store.load(key) is None
    assert store.history(key) == []


def test_force_set_ignores_leases_it_is_for_operators(store: CheckpointStore) -> None:
    key = unique_key()
    lease = store.leases.acquire(key.lease_key, "worker-a")
    assert lease is not None and store.save(key, "100", lease=lease).advanced
    store.force_set(key, "10", context=WHO)
    assert store.load(key) == "10"
    assert store.save(key, "11", lease=lease).advanced  # the holder keeps going: why the CLI warns


def test_redis_force_set_replaces_garbage_and_keeps_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    store = RedisCheckpointStore(client)
    key = unique_key()
    client.set(key.redis_key, "not-a-sequence", ex=3600)
    result = store.force_set(key, "7", context=WHO)
    assert result.previous == "not-a-sequence" and result.direction == "replaced-invalid"
    assert client.get(key.redis_key) == b"7"
    assert 0 < client.pttl(key.redis_key) <= 3_600_000  # the workers' expiry policy is kept
    wrong_type = unique_key()
    client.hset(wrong_type.redis_key, "x", "1")
    assert store.force_set(wrong_type, "8", context=WHO).previous == "<redis hash>"
    assert store.load(wrong_type) == "8"
    client.close()


def test_redis_force_set_is_recorded_even_with_history_off(redis_url: str) -> None:
    store = RedisCheckpointStore.from_url(redis_url, history_maxlen=0)
    key = unique_key()
    store.save(key, "5")
    store.force_set(key, "3", context=WHO)
    assert [(h.previous, h.sequence, h.writer) for h in store.history(key)] == [("5", "3", "alice@ops-host")]
    store.client.close()


def test_postgres_force_set_replaces_garbage_and_writes_history_row(postgres_url: str) -> None:
    store = PostgresCheckpointStore(postgres_url)
    key = unique_key()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO checkpoints (adapter, stream, grp, consumer, shard, sequence) VALUES (%s,%s,%s,%s,%s,%s)",
            (*key.as_row().values(), "garbage"),
        )
        result = store.force_set(key, "9", context=WHO)
        rows = conn.execute(
            "SELECT previous_sequence, new_sequence, writer, reason, lease_epoch FROM checkpoint_history "
            "WHERE stream = %s", (key.stream,),
        ).fetchall()
    assert result.direction == "replaced-invalid" and store.load(key) == "9"
    assert rows == [("garbage", "9", "alice@ops-host", "replay after bad deploy", None)]
    store.close()


def test_postgres_history_at_finds_the_value_at_a_point_in_time(postgres_url: str) -> None:
    store = PostgresCheckpointStore(postgres_url)
    key = unique_key()
    store.save(key, "10")
    with psycopg.connect(postgres_url) as conn:
        (between,) = conn.execute("SELECT clock_timestamp()").fetchone()
    store.save(key, "20")
    entry = store.history_at(key, between)
    assert entry is not None and entry.sequence == "10"
    assert store.history_at(key, between.replace(year=2000)) is None
    store.close()


def test_hybrid_force_set_writes_both_stores_and_drops_pending(redis_url: str, postgres_url: str) -> None:
    store = build_store("hybrid", redis_url, postgres_url, flush_every_n=1000, flush_every_s=3600)
    assert isinstance(store, HybridCheckpointStore)
    key = unique_key()
    store.save(key, "100")  # first ack: flushed
    store.save(key, "200")  # buffered, Postgres still at 100
    assert store.pending == {key: "200"}
    result = store.force_set(key, "50", context=WHO)
    assert dict(result.previous_by_store) == {"redis": "200", "postgres": "100"}
    assert result.previous == "200" and result.direction == "backward"
    assert store.pending == {}
    store.flush()
    assert store.redis.load(key) == "50" and store.postgres.load(key) == "50" and store.load(key) == "50"
    assert store.postgres.history(key)[0].reason == "replay after bad deploy"
    assert store.redis.history(key)[0].writer == "alice@ops-host"
    store.close()
