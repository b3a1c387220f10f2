"""Issue 21 item 5: a TTL another worker set (the original pattern's ``SET key seq EX 86400``) must never turn a
checkpoint the project recorded into "no checkpoint".

The attack: the other worker writes the shared key with ``EX 86400`` and stops. The project keeps acking
with ``KEEPTTL``, so the TTL counts down under it; the consumer then goes idle, the key expires, and the
next run loads nothing and starts from ``initial_position``: with ``LATEST`` every record that arrived in
between is silently skipped.

Expected: each save renews a TTL it keeps (to the original pattern's 86400 s), and a load that finds the key
gone while the key's own history recorded a position puts it back (a history entry and a warning that name the
key and the TTL that ran out), never "no checkpoint".

Waiting a day is not a test: "time passes" is ``PEXPIRE`` of the key (the TTL as it stands 23:59 later), and
"the TTL ran out" is waiting, polled, until Redis expired the key itself.
"""

from __future__ import annotations

import logging
import time
import uuid

import pytest
import redis

from durability_pipelines.checkpoints.ordering import sort_key
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore
from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer
from durability_pipelines.consumer.runtime import open_runtime
from durability_pipelines.consumer.source import SourceBatch
from tests.support.sources import ListSource
from tests.support.stores import unique_key
from tests.test_consumer_runtime import make_config, rows

DAY_S = 86400


class LatestListSource(ListSource):
    """``initial_position: LATEST``: a read with no checkpoint starts at the tip (DynamoDB's LATEST iterator)."""

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch:
        if after is None and self.shards_events[shard]:
            tip = self.shards_events[shard][-1].sequence
            batch = super().read(shard, tip, max_events)
            return SourceBatch(shard, None, batch.events, batch.next_checkpoint, batch.shard_ended)
        return super().read(shard, after, max_events)


def expire_now(client: redis.Redis, redis_key: str, timeout_s: float = 10.0) -> None:
    """The TTL runs out: let Redis expire the key by itself (polled, bounded)."""
    client.pexpire(redis_key, 1)
    deadline = time.monotonic() + timeout_s
    while client.exists(redis_key):
        assert time.monotonic() < deadline, f"{redis_key} did not expire"
        time.sleep(0.01)


@pytest.fixture
def stream() -> str:
    return "ttl-" + uuid.uuid4().hex[:10]


def test_a_save_renews_a_ttl_another_worker_set(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = unique_key()
    store = RedisCheckpointStore(client)
    client.set(key.redis_key, "100", ex=DAY_S)  # the other worker, then it stops
    assert store.save(key, "200").advanced
    client.pexpire(key.redis_key, 3000)  # 23 h 59 min 57 s later: 3 s left, the project still acking
    assert store.save(key, "300").advanced
    assert client.get(key.redis_key) == b"300"
    assert DAY_S - 60 < client.ttl(key.redis_key) <= DAY_S  # renewed, as the other worker's own SET would
    (last, *_) = client.xrevrange(key.companions(cluster=False).history, count=1)
    assert DAY_S * 1000 - 60_000 < int(last[1][b"ttl"]) <= DAY_S * 1000  # the history says what TTL it left
    client.pexpire(key.redis_key, 3000)
    assert store.save(key, "300").outcome.value == "unchanged"  # a repeated ack renews it too
    assert client.ttl(key.redis_key) > DAY_S - 60
    client.persist(key.redis_key)
    assert store.save(key, "310").advanced and client.ttl(key.redis_key) == -1  # none left: none made up
    client.set(key.redis_key, "310", ex=DAY_S)  # the other worker writes the very value this store left, with EX
    client.pexpire(key.redis_key, 3000)
    assert store.save(key, "320").advanced and client.ttl(key.redis_key) > DAY_S - 60
    # a configured TTL still wins, and a key without a TTL gets none
    assert RedisCheckpointStore(client, ttl_s=3600).save(key, "400").advanced
    assert 3500 < client.ttl(key.redis_key) <= 3600
    fresh = unique_key()
    assert store.save(fresh, "1").advanced and client.ttl(fresh.redis_key) == -1
    client.delete(key.redis_key, fresh.redis_key)
    client.close()


@pytest.mark.parametrize("backend", ["redis", "hybrid"])
def test_an_expired_inherited_ttl_never_sends_a_latest_consumer_past_unread_records(
        stream: str, redis_url: str, postgres_url: str, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    source = LatestListSource.with_events(stream, 30)
    events = source.shards_events["shard-0"]
    first, later = events[:20], events[20:]
    source.shards_events["shard-0"] = list(first)
    cfg = make_config(stream, backend, source={"kind": "dynamodb", "table": stream, "initial_position": "LATEST"},
                      checkpoint={"backend": backend, "flush_every_n": 1})
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source)
    client = redis.Redis.from_url(redis_url)
    key = rt.key("shard-0")
    # the other worker had read the first record, wrote its position the original way, and stopped
    client.set(key.redis_key, first[0].sequence, ex=DAY_S)
    report = ShardDrainer(rt, "shard-0", "run-1", DrainBudget(100, 60, 0)).run()
    assert report.events == 19 and rt.store.load(key) == first[-1].sequence
    # the consumer goes idle for a day: the TTL runs out; then ten more records arrive
    expire_now(client, key.redis_key)
    source.shards_events["shard-0"] += later
    with caplog.at_level(logging.WARNING, logger="durability_pipelines.checkpoints.redis_store"):
        report = ShardDrainer(rt, "shard-0", "run-2", DrainBudget(100, 60, 0)).run()
    assert report.start_after == first[-1].sequence  # not None: not LATEST
    assert report.events == 10, "records written while the key was expired were skipped"
    assert rows(postgres_url, stream) == [e.sequence for e in events[1:]]
    assert sort_key(rt.store.load(key)) == sort_key(events[-1].sequence)
    if backend == "redis":  # restored from the key's own history, said so, and recorded
        restored = [r for r in caplog.records if key.redis_key in r.getMessage()]
        assert restored and "TTL of 86400 s" in restored[0].getMessage()
        reasons = [h.reason or "" for h in rt.store.history(key)]
        assert any(r.startswith("restored from history: the key was missing (its TTL ran out") for r in reasons)
    rt.close()
    client.delete(key.redis_key)
    client.close()


def test_a_deliberate_reset_is_not_undone_and_a_new_key_stays_new(redis_url: str) -> None:
    from durability_pipelines.checkpoints import SaveContext

    client = redis.Redis.from_url(redis_url)
    store = RedisCheckpointStore(client)
    key = unique_key()
    assert store.load(key) is None and not client.exists(key.redis_key)  # no history: nothing to restore
    assert store.save(key, "500").advanced
    store.force_set(key, "TRIM_HORIZON", context=SaveContext(writer="ops", reason="start over"))
    assert store.load(key) == "TRIM_HORIZON" and not client.exists(key.redis_key)
    client.delete(key.companions(cluster=False).sentinel)  # even with the sentinel gone: the history says "none"
    assert store.load(key) is None and not store.restores
    # a key deleted outright (no TTL at the last write) comes back too, saying it was deleted
    assert store.save(key, "600").advanced
    client.delete(key.redis_key)
    assert store.load(key) == "600" and "deleted" in store.restores[-1].why
    client.delete(key.redis_key)
    client.close()
