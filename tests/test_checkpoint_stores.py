"""The CheckpointStore contract, run against every backend on real servers."""

from __future__ import annotations

import time

import psycopg
import pytest
import redis

from durability_pipelines.checkpoints import (
    LATEST,
    SHARD_END,
    TRIM_HORIZON,
    CheckpointKey,
    CheckpointStore,
    InvalidSequenceError,
    LeaseLostError,
    SaveContext,
    SaveOutcome,
)
from durability_pipelines.checkpoints.base import HANDOFF_REQUEST_FRESH_S
from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore
from tests.support.stores import build_store, unique_key

D21 = "1" + "0" * 20  # 21 digits
D22 = "1" + "0" * 21


def test_missing_key_loads_none(store: CheckpointStore) -> None:
    assert store.load(unique_key()) is None


def test_save_then_load(store: CheckpointStore) -> None:
    key = unique_key()
    result = store.save(key, D21)
    assert result.outcome is SaveOutcome.ADVANCED and result.previous is None and result.current == D21
    assert store.load(key) == D21
    assert key in store.keys()


def test_save_is_monotonic_equal_is_noop_backwards_is_refused(store: CheckpointStore) -> None:
    key = unique_key()
    store.save(key, D22)
    same = store.save(key, D22)
    assert same.outcome is SaveOutcome.UNCHANGED and same.current == D22
    back = store.save(key, "9" * 21)  # lexically larger, numerically smaller
    assert back.outcome is SaveOutcome.STALE and back.current == D22
    assert store.load(key) == D22
    assert [h.sequence for h in store.history(key)] == [D22]  # no-ops and refusals leave no history


def test_sentinels_order(store: CheckpointStore) -> None:
    key = unique_key()
    assert store.save(key, TRIM_HORIZON).advanced
    assert store.save(key, LATEST).advanced
    assert store.save(key, "5").advanced
    assert store.save(key, TRIM_HORIZON).outcome is SaveOutcome.STALE
    assert store.save(key, SHARD_END).advanced
    assert store.save(key, "9" * 40).outcome is SaveOutcome.STALE
    assert store.load(key) == SHARD_END


def test_load_many_mixes_present_and_missing(store: CheckpointStore) -> None:
    keys = [unique_key() for _ in range(5)]
    for i, k in enumerate(keys[:3]):
        store.save(k, str(10**25 + i))
    loaded = store.load_many(keys)
    assert loaded == {keys[0]: str(10**25), keys[1]: str(10**25 + 1), keys[2]: str(10**25 + 2),
                      keys[3]: None, keys[4]: None}


def test_history_newest_first_with_writer_and_run(store: CheckpointStore) -> None:
    key = unique_key()
    store.save(key, "10", context=SaveContext(writer="w1", run_id="run-1", reason="batch"))
    store.save(key, "20", context=SaveContext(writer="w1", run_id="run-2"))
    hist = store.history(key)
    assert [(h.previous, h.sequence, h.run_id) for h in hist] == [("10", "20", "run-2"), (None, "10", "run-1")]
    assert hist[0].writer == "w1" and hist[1].reason == "batch"


def test_unsharded_key_round_trip(store: CheckpointStore) -> None:
    key = unique_key(adapter="supabase", shard=None)
    store.save(key, "42")
    assert store.load(key) == "42"
    assert key in store.keys()


def test_invalid_sequence_is_refused_before_writing(store: CheckpointStore) -> None:
    key = unique_key()
    with pytest.raises(InvalidSequenceError, match=key.redis_key):
        store.save(key, "12.5")
    assert store.load(key) is None


def test_sql_looking_names_are_stored_literally(store: CheckpointStore) -> None:
    stream = unique_key().stream + "'); DROP TABLE checkpoints;--"
    key = CheckpointKey("dynamodb", stream, "g%s", "c\"x", "s'1")
    store.save(key, "7")
    assert store.load(key) == "7"
    assert store.save(key, "8").advanced


# -- fencing: KCL's leaseCounter cases -------------------------------------------------

def test_lease_is_exclusive_and_takeover_bumps_epoch(store: CheckpointStore) -> None:
    key = unique_key()
    a = store.leases.acquire(key.lease_key, "worker-a")
    assert a is not None and a.epoch >= 1
    assert store.leases.acquire(key.lease_key, "worker-b") is None  # held
    again = store.leases.acquire(key.lease_key, "worker-a")  # re-acquiring what we hold: same epoch
    assert again is not None and again.epoch == a.epoch
    b = store.leases.acquire(key.lease_key, "worker-b", steal=True)
    assert b is not None and b.epoch == a.epoch + 1


def test_write_after_another_worker_took_the_lease_fails(store: CheckpointStore) -> None:
    key = unique_key()
    a = store.leases.acquire(key.lease_key, "worker-a")
    assert store.save(key, "100", lease=a).advanced
    b = store.leases.acquire(key.lease_key, "worker-b", steal=True)
    with pytest.raises(LeaseLostError, match="worker-b"):
        store.save(key, "200", lease=a)
    assert store.load(key) == "100"
    assert store.save(key, "150", lease=b).advanced


def test_write_still_fails_after_the_first_worker_reacquires(store: CheckpointStore) -> None:
    key = unique_key()
    a1 = store.leases.acquire(key.lease_key, "worker-a")
    store.leases.acquire(key.lease_key, "worker-b", steal=True)
    a2 = store.leases.acquire(key.lease_key, "worker-a", steal=True)
    assert a2 is not None and a2.epoch == a1.epoch + 2
    with pytest.raises(LeaseLostError):
        store.save(key, "300", lease=a1)  # stale concurrency token
    assert store.load(key) is None
    assert store.save(key, "300", lease=a2).advanced


def test_write_under_an_expired_lease_fails_even_without_a_takeover(store: CheckpointStore) -> None:
    """The fencing rule: owner, epoch, and before the lease expires (a stalled writer may be taken over
    at any moment after that, in a store that was down when it happened)."""
    key = unique_key()
    a = store.leases.acquire(key.lease_key, "worker-a", duration_s=0.3)
    assert store.save(key, "100", lease=a).advanced
    time.sleep(0.5)  # the writer stalls past its lease
    with pytest.raises(LeaseLostError, match="expired"):
        store.save(key, "200", lease=a)
    assert store.load(key) == "100"
    renewed = store.leases.renew(a, duration_s=30)  # nobody took it: renewing it is safe
    assert store.save(key, "200", lease=renewed).advanced


def test_renew_release_and_lost_renewal(store: CheckpointStore) -> None:
    key = unique_key()
    a = store.leases.acquire(key.lease_key, "worker-a", duration_s=30)
    renewed = store.leases.renew(a, duration_s=60)
    assert renewed.epoch == a.epoch and renewed.expires_at > a.expires_at
    assert store.leases.release(a)
    b = store.leases.acquire(key.lease_key, "worker-b")  # free after release: a takeover
    assert b is not None and b.epoch == a.epoch + 1
    with pytest.raises(LeaseLostError):
        store.leases.renew(a)
    assert not store.leases.release(a)
    assert any(lease.key == key.lease_key and lease.owner == "worker-b" for lease in store.leases.list())


# -- graceful hand-off (KCL 3.x): the successor asks, the owner hands over after its checkpoint ------

def test_a_successor_asks_and_the_owner_hands_over_with_a_takeover_epoch(store: CheckpointStore) -> None:
    key = unique_key()
    owner = store.leases.acquire(key.lease_key, "run-a", duration_s=30)
    assert owner is not None
    asked = store.leases.request_handoff(key.lease_key, "run-b", duration_s=30)
    assert (asked.owner, asked.epoch, asked.requested_by) == ("run-a", owner.epoch, "run-b")
    assert asked.requested_at is not None
    seen = store.leases.get(key.lease_key)
    assert seen is not None and seen.requested_by == "run-b"  # visible to every reader (leases list, sensor)
    assert store.leases.renew(owner, duration_s=30).requested_by == "run-b"  # renewing keeps the request
    assert store.save(key, "100", lease=owner).advanced  # the owner's last batch, then the hand-off
    handed = store.leases.hand_over(owner, duration_s=30)
    assert handed is not None
    assert (handed.owner, handed.epoch, handed.requested_by, handed.handed_from) == (
        "run-b", owner.epoch + 1, "", "run-a")
    assert handed.handed_at is not None
    with pytest.raises(LeaseLostError):  # the old owner is fenced at once
        store.save(key, "200", lease=owner)
    assert store.save(key, "200", lease=handed).advanced  # the successor writes under the new epoch
    assert store.leases.hand_over(owner) is None  # a second hand-off by the old owner changes nothing
    with pytest.raises(LeaseLostError):
        store.leases.renew(owner)


def test_only_one_successor_waits_and_exactly_one_gets_the_lease(store: CheckpointStore) -> None:
    key = unique_key()
    owner = store.leases.acquire(key.lease_key, "run-a", duration_s=30)
    assert owner is not None
    first = store.leases.request_handoff(key.lease_key, "run-b", duration_s=30)
    second = store.leases.request_handoff(key.lease_key, "run-c", duration_s=30)
    assert first.requested_by == second.requested_by == "run-b"  # run-c finds run-b waiting
    handed = store.leases.hand_over(owner, duration_s=30)
    assert handed is not None and handed.owner == "run-b"
    late = store.leases.request_handoff(key.lease_key, "run-c", duration_s=30)
    assert late.owner == "run-b" and late.requested_by == "run-c"  # run-c may ask the new owner next


def test_a_hand_off_needs_a_request_and_the_lease_of_record(store: CheckpointStore) -> None:
    key = unique_key()
    owner = store.leases.acquire(key.lease_key, "run-a", duration_s=30)
    assert owner is not None
    assert store.leases.hand_over(owner) is None  # nobody asked: nothing changes
    assert store.leases.get(key.lease_key).owner == "run-a"  # type: ignore[union-attr]
    store.leases.request_handoff(key.lease_key, "run-b", duration_s=30)
    withdrawn = store.leases.withdraw_request(key.lease_key, "run-b")  # the successor stopped waiting
    assert withdrawn is not None and withdrawn.owner == "run-a" and withdrawn.requested_by == ""
    assert store.leases.hand_over(owner) is None


def test_a_successor_that_stopped_asking_is_handed_nothing_and_another_may_ask(store: CheckpointStore) -> None:
    """A waiting successor renews its request every poll; one that died (SIGKILL) stops renewing it, and
    once the request is stale the owner keeps its lease instead of handing it to a dead run."""
    key = unique_key()
    owner = store.leases.acquire(key.lease_key, "run-a", duration_s=60)
    assert owner is not None
    store.leases.request_handoff(key.lease_key, "run-dead", duration_s=60)
    time.sleep(HANDOFF_REQUEST_FRESH_S + 0.3)
    assert store.leases.hand_over(owner, duration_s=60) is None
    assert store.leases.get(key.lease_key).owner == "run-a"  # type: ignore[union-attr]
    other = store.leases.request_handoff(key.lease_key, "run-c", duration_s=60)
    assert other.requested_by == "run-c"
    handed = store.leases.hand_over(owner, duration_s=60)
    assert handed is not None and handed.owner == "run-c"


def test_a_request_takes_a_free_or_expired_lease_at_once(store: CheckpointStore) -> None:
    key = unique_key()
    taken = store.leases.request_handoff(key.lease_key, "run-b", duration_s=30)  # nobody holds it
    assert taken.owner == "run-b" and taken.epoch >= 1
    assert store.save(key, "100", lease=taken).advanced
    short = store.leases.acquire(key.lease_key, "run-c", steal=True, duration_s=0.3)
    assert short is not None
    time.sleep(0.5)  # run-c froze past its lease: the waiting successor takes it by expiry
    by_expiry = store.leases.request_handoff(key.lease_key, "run-d", duration_s=30)
    assert (by_expiry.owner, by_expiry.epoch, by_expiry.handed_from) == ("run-d", short.epoch + 1, "")
    with pytest.raises(LeaseLostError):
        store.save(key, "200", lease=short)


def test_a_successor_told_the_owner_died_is_handed_nothing_it_steals_as_before(store: CheckpointStore) -> None:
    """A successor that finds the owner dead (its run finished) takes the lease the old way; the request
    it left behind belongs to the old epoch and is dropped by the takeover."""
    key = unique_key()
    owner = store.leases.acquire(key.lease_key, "run-a", duration_s=30)
    assert owner is not None
    store.leases.request_handoff(key.lease_key, "run-b", duration_s=30)
    stolen = store.leases.acquire(key.lease_key, "run-b", duration_s=30, steal=True)
    assert stolen is not None and stolen.epoch == owner.epoch + 1 and stolen.requested_by == ""
    assert store.leases.hand_over(owner) is None


# -- backend specifics -------------------------------------------------------------------

def test_redis_layout_ttl_and_foreign_writer(redis_url: str) -> None:
    key = unique_key()
    client = redis.Redis.from_url(redis_url)
    strict = RedisCheckpointStore(client)
    strict.save(key, D21)
    assert client.get("checkpoint:" + ":".join([key.adapter, key.stream, "workers", "consumer-a", "shard-000"])) == D21.encode()
    assert client.pttl(key.redis_key) == -1  # no TTL: strict durability
    expiring = RedisCheckpointStore(client, ttl_s=86400)
    expiring.save(key, D22)
    assert 0 < client.pttl(key.redis_key) <= 86_400_000
    other = unique_key()
    client.set(other.redis_key, "12345")  # a worker of the original pattern
    assert strict.load(other) == "12345"
    assert strict.save(other, "12346").advanced


def test_redis_garbage_value_names_the_key(redis_url: str) -> None:
    key = unique_key()
    client = redis.Redis.from_url(redis_url)
    client.set(key.redis_key, "not-a-sequence")
    store = RedisCheckpointStore(client)
    with pytest.raises(InvalidSequenceError, match=key.redis_key):
        store.load(key)
    with pytest.raises(InvalidSequenceError, match=key.redis_key):
        store.save(key, "5")
    assert client.get(key.redis_key) == b"not-a-sequence"  # nothing overwritten


def test_postgres_table_is_the_original_layout(postgres_url: str) -> None:
    store = PostgresCheckpointStore(postgres_url)
    key = unique_key()
    store.save(key, D22)
    with psycopg.connect(postgres_url) as conn:
        cols = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'checkpoints' ORDER BY ordinal_position"
        ).fetchall()
        row = conn.execute(
            "SELECT adapter, stream, grp, consumer, shard, sequence FROM checkpoints WHERE stream = %s",
            (key.stream,),
        ).fetchone()
    assert cols == [("adapter", "text"), ("stream", "text"), ("grp", "text"), ("consumer", "text"),
                    ("shard", "text"), ("sequence", "text"), ("ts", "timestamp with time zone")]
    assert row == ("dynamodb", key.stream, "workers", "consumer-a", "shard-000", D22)
    store.migrate()  # idempotent
    store.close()


def test_postgres_garbage_value_names_the_key(postgres_url: str) -> None:
    store = PostgresCheckpointStore(postgres_url)
    key = unique_key()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO checkpoints (adapter, stream, grp, consumer, shard, sequence) VALUES (%s,%s,%s,%s,%s,%s)",
            (*key.as_row().values(), "garbage"),
        )
    with pytest.raises(InvalidSequenceError, match=key.redis_key):
        store.load(key)
    with pytest.raises(InvalidSequenceError, match=key.redis_key):
        store.save(key, "5")
    store.close()


def test_postgres_transaction_couples_business_writes_and_checkpoint(postgres_url: str) -> None:
    store = PostgresCheckpointStore(postgres_url)
    key = unique_key()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS test_business (stream TEXT, seq TEXT)")
    with store.transaction() as tx:
        tx.connection.execute("INSERT INTO test_business VALUES (%s, %s)", (key.stream, "1"))
        assert tx.save(key, "1").advanced
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.connection.execute("INSERT INTO test_business VALUES (%s, %s)", (key.stream, "2"))
        tx.save(key, "2")
        raise RuntimeError("handler crashed after the checkpoint call")
    assert store.load(key) == "1"
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT seq FROM test_business WHERE stream = %s", (key.stream,)).fetchall()
    assert rows == [("1",)]
    store.close()


def test_postgres_save_many_is_one_batch_and_monotonic(postgres_url: str) -> None:
    store = PostgresCheckpointStore(postgres_url)
    keys = [unique_key() for _ in range(50)]
    results = store.save_many([(k, "100") for k in keys] + [(keys[0], "90")])
    assert len(results) == 50 and all(r.advanced for r in results) and results[0].key == keys[0]
    again = store.save_many([(keys[0], "50"), (keys[1], "100"), (keys[2], "101")])
    assert [r.outcome for r in again] == [SaveOutcome.STALE, SaveOutcome.UNCHANGED, SaveOutcome.ADVANCED]
    store.close()


def test_hybrid_flushes_every_n_acks_and_on_flush(redis_url: str, postgres_url: str) -> None:
    store = build_store("hybrid", redis_url, postgres_url, flush_every_n=3, flush_every_s=3600)
    assert isinstance(store, HybridCheckpointStore)
    key = unique_key()
    store.save(key, "1")  # the first ack of a key is flushed at once (never flushed before)
    assert store.postgres.load(key) == "1"
    store.save(key, "2")
    store.save(key, "3")
    assert store.postgres.load(key) == "1" and store.pending == {key: "3"}
    store.save(key, "4")  # third ack since the flush
    assert store.postgres.load(key) == "4" and store.pending == {}
    store.save(key, "5")
    store.flush()
    assert store.postgres.load(key) == "5"
    store.close()


def test_hybrid_flush_bound_is_shared_across_processes(redis_url: str, postgres_url: str) -> None:
    """Two store instances (two run processes) count acks in the same Redis flush state."""
    key = unique_key()
    first = build_store("hybrid", redis_url, postgres_url, flush_every_n=2, flush_every_s=3600)
    first.save(key, "1")  # flushed: first ack
    first.save(key, "2")  # 1 ack since flush
    first.close(flush=False)
    second = build_store("hybrid", redis_url, postgres_url, flush_every_n=2, flush_every_s=3600)
    assert second.postgres.load(key) == "1"
    second.save(key, "3")  # 2 acks since flush, counted across both instances
    assert second.postgres.load(key) == "3"
    second.close(flush=False)


def test_hybrid_flushes_after_t_seconds(redis_url: str, postgres_url: str) -> None:
    store = build_store("hybrid", redis_url, postgres_url, flush_every_n=1000, flush_every_s=5)
    assert isinstance(store, HybridCheckpointStore)
    key = unique_key()
    store.save(key, "1")
    store.save(key, "2")
    assert store.postgres.load(key) == "1"
    # Pretend the last flush happened 6 s ago (Redis server clock, shared by all writers).
    (secs, micros) = store.redis.client.time()
    store.redis.client.hset(key.hybrid_state_key, "flushed_ms", secs * 1000 + micros // 1000 - 6000)
    store.save(key, "3")
    assert store.postgres.load(key) == "3"
    store.close()


def test_hybrid_garbage_in_redis_falls_back_and_records_why(redis_url: str, postgres_url: str) -> None:
    store = build_store("hybrid", redis_url, postgres_url)
    assert isinstance(store, HybridCheckpointStore)
    key = unique_key()
    store.postgres.save(key, "77")
    store.redis.client.set(key.redis_key, "\x00garbage")
    assert store.load(key) == "77"
    assert store.fallbacks[-1].key == key and "garbage" in store.fallbacks[-1].reason
    assert store.redis.client.get(key.redis_key) == b"77"  # re-warmed
    store.close()
