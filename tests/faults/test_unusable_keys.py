"""A checkpoint key that holds no position, written by another program: a Redis key of the wrong type
(``HSET <checkpoint key> sequence 100``) or a garbage value. Named, never a raw WRONGTYPE, never a
consumer that re-processes the same batch forever.

* hybrid: loads fall back to Postgres, the next save under the lease replaces the key (history says why);
* redis-only (no other store to take the position from): the shard is dead-lettered with a message that
  names the key and the command that fixes it; the other shards go on.
"""

from __future__ import annotations

import uuid

import pytest
import redis

from durability_pipelines.checkpoints import SaveContext, WrongTypeKeyError
from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer, StopReason
from durability_pipelines.consumer.runtime import BatchDeadLettered, open_runtime
from tests.support.sources import ListSource
from tests.support.stores import build_store, unique_key
from tests.test_consumer_runtime import make_config, rows


def test_redis_store_names_a_wrong_type_key_on_load_and_save(redis_url: str) -> None:
    store = build_store("redis", redis_url, "")
    key = unique_key()
    client = redis.Redis.from_url(redis_url)
    client.hset(key.redis_key, "sequence", "100")
    with pytest.raises(WrongTypeKeyError, match="holds a hash") as caught:
        store.load(key)
    assert key.redis_key in str(caught.value) and "checkpoints set" in str(caught.value)
    assert caught.value.kind == "hash"
    with pytest.raises(WrongTypeKeyError, match=key.redis_key):
        store.save(key, "200")
    with pytest.raises(WrongTypeKeyError):
        store.load_many([key, unique_key()])
    assert client.type(key.redis_key) == b"hash"  # a redis-only store never destroys what it cannot replace
    client.close()


def test_hybrid_falls_back_to_postgres_and_replaces_the_key_under_the_lease(redis_url: str, postgres_url: str) -> None:
    store = build_store("hybrid", redis_url, postgres_url, flush_every_n=1)
    key = unique_key()
    lease = store.leases.acquire(key.lease_key, "run-1", 60)
    assert store.save(key, "100", lease=lease).advanced
    client = redis.Redis.from_url(redis_url)
    client.delete(key.redis_key)
    client.hset(key.redis_key, "sequence", "100")  # another program
    assert store.load(key) == "100"  # from Postgres
    assert any("hash" in f.reason for f in store.fallbacks)
    result = store.save(key, "150", lease=lease, context=SaveContext(writer="run-1", run_id="run-1"))
    assert result.advanced and result.current == "150"
    assert client.get(key.redis_key) == b"150"  # replaced, under the lease
    (latest, *_) = store.redis.history(key)
    assert latest.previous == "<redis hash>" and "replaced <redis hash>" in (latest.reason or "")
    assert store.save(key, "160", lease=lease).advanced and store.load(key) == "160"
    store.close()
    client.close()


@pytest.fixture
def stream() -> str:
    return "wrongtype-" + uuid.uuid4().hex[:10]


@pytest.mark.parametrize("vandal", ["hash", "garbage"])
def test_hybrid_consumer_goes_on_when_its_key_is_overwritten_mid_run(stream, redis_url, postgres_url, vandal) -> None:
    source = ListSource.with_events(stream, 30)
    rt = open_runtime(make_config(stream, "hybrid", checkpoint={"backend": "hybrid", "flush_every_n": 1}),
                      redis_url=redis_url, postgres_url=postgres_url, source=source)
    client = redis.Redis.from_url(redis_url)
    key = rt.key("shard-0")

    def vandalize(record) -> None:
        if record.index == 1:
            client.delete(key.redis_key)
            if vandal == "hash":
                client.hset(key.redis_key, "sequence", "1")
            else:
                client.set(key.redis_key, "not-a-position!")

    report = ShardDrainer(rt, "shard-0", "run-1", DrainBudget(100, 60, 0), on_batch=vandalize).run()
    assert report.stop_reason is StopReason.CAUGHT_UP and report.events == 30
    assert rt.store.load(key) == source.shards_events["shard-0"][-1].sequence
    assert client.type(key.redis_key) == b"string"
    assert rows(postgres_url, stream) == [e.sequence for e in source.shards_events["shard-0"]]
    rt.close()
    client.close()


def test_redis_consumer_dead_letters_the_shard_naming_the_key_and_the_fix(stream, redis_url, postgres_url) -> None:
    source = ListSource.with_events(stream, 20)
    cfg = make_config(stream, "redis")
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source)
    client = redis.Redis.from_url(redis_url)
    key = rt.key("shard-0")
    client.hset(key.redis_key, "sequence", "1")
    with pytest.raises(BatchDeadLettered, match="dead-letters retry") as caught:
        ShardDrainer(rt, "shard-0", "run-1", DrainBudget(100, 60, 0)).run()
    assert key.redis_key in str(caught.value) and "holds a hash" in str(caught.value)
    (dl,) = rt.storage.dead_letters(cfg.name)
    assert dl.status == "open" and "WrongTypeKeyError" in dl.error and dl.record_count == 0
    assert rows(postgres_url, stream) == []  # nothing processed from a guessed position

    # the sensor's view: that shard is stopped with the reason, the others are read as usual
    other = ListSource.with_events(stream, 5, shard="shard-1")
    source.shards_events.update(other.shards_events)
    acked, stopped = rt.load_acked(["shard-0", "shard-1"], blocked=rt.storage.blocked_shards(cfg.name),
                                   run_id="sensor")
    assert acked == {"shard-1": None} and "see its open dead letter" in stopped["shard-0"]
    assert len(rt.storage.dead_letters(cfg.name)) == 1  # not one per tick

    # the operator fixes the key as the message says, and retries the dead letter
    rt.store.force_set(key, source.shards_events["shard-0"][9].sequence,
                       context=SaveContext(writer="ops", reason="replace a foreign hash"))
    rt.storage.set_dead_letter_status(dl.id, "retry", by="ops")
    report = ShardDrainer(rt, "shard-0", "run-2", DrainBudget(100, 60, 0)).run()
    assert report.events == 10 and rt.store.load(key) == source.shards_events["shard-0"][-1].sequence
    rt.close()
    client.close()


# --------------------------------------------------------------------------- a wrong-type key at the sentinel place


def _sentinel_key(key) -> str:  # noqa: ANN001
    return key.companions(cluster=False).sentinel


def test_a_wrong_type_sentinel_key_is_named_on_load_and_save_and_replaced_by_a_forced_set(
        redis_url: str, postgres_url: str) -> None:
    store = build_store("redis", redis_url, "")
    key = unique_key()
    client = redis.Redis.from_url(redis_url)
    assert store.save(key, "100").advanced
    client.hset(_sentinel_key(key), "x", "1")  # another program
    with pytest.raises(WrongTypeKeyError, match="durability:sentinel:") as caught:
        store.load(key)
    assert "checkpoints set" in str(caught.value)
    with pytest.raises(WrongTypeKeyError, match="durability:sentinel:"):
        store.save(key, "200")
    # the remedy the message names, on the CLI's default (hybrid) backend: nothing half-done, nothing raw
    hybrid = build_store("hybrid", redis_url, postgres_url)
    forced = hybrid.force_set(key, "150", context=SaveContext(writer="op", reason="fix the sentinel key"))
    assert forced.current == "150"
    assert client.type(_sentinel_key(key)) == b"none" and client.get(key.redis_key) == b"150"
    assert store.load(key) == "150" and store.save(key, "200").advanced
    hybrid.close()
    client.close()


def test_a_hybrid_store_goes_on_from_postgres_past_a_wrong_type_sentinel_key(redis_url: str, postgres_url: str) -> None:
    store = build_store("hybrid", redis_url, postgres_url, flush_every_n=1)
    key = unique_key()
    lease = store.leases.acquire(key.lease_key, "run-1", 60)
    assert store.save(key, "100", lease=lease, context=SaveContext(writer="run-1")).advanced
    client = redis.Redis.from_url(redis_url)
    client.hset(_sentinel_key(key), "x", "1")
    assert store.load(key) == "100"  # from Postgres
    assert store.save(key, "200", lease=lease, context=SaveContext(writer="run-1")).advanced
    assert client.type(_sentinel_key(key)) == b"none" and client.get(key.redis_key) == b"200"
    assert any("sentinel key" in (h.reason or "") for h in store.redis.history(key))  # type: ignore[attr-defined]
    store.close()
    client.close()


def test_checkpoints_list_names_a_wrong_type_sentinel_key(shared) -> None:  # noqa: ANN001
    from durability_pipelines.audit.tables import build_checkpoint_audit
    from durability_pipelines.checkpoints.inspect import snapshot

    key = unique_key()
    store = build_store("hybrid", shared.redis_url, shared.postgres_url, flush_every_n=1)
    store.save(key, "100")
    store.close()
    shared.client.hset(_sentinel_key(key), "x", "1")
    (state,) = snapshot(shared.client, shared.db())
    assert state.drift[0].value == "wrong-type-redis" and "durability:sentinel:" in state.redis.raw
    audit = build_checkpoint_audit(shared.client, shared.db(), [])
    assert list(audit["status"]) == ["wrong-type"] and "durability:sentinel:" in audit["detail"][0]
