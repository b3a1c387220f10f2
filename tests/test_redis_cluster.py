"""The stores, the mirror and the audit on a real 3-master Redis Cluster (``redis+cluster://``).

The shared ``checkpoint:...`` key stays as other workers know it; the project's own keys move into its
hash slot; the save checks a lease copy there, fenced by every takeover (docs/scaling.md).
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster

from durability_pipelines import services
from durability_pipelines.checkpoints import SHARD_END, CheckpointKey, CheckpointStore, LeaseLostError
from durability_pipelines.checkpoints.errors import ConfigError, InvalidCheckpointKeyError
from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
from durability_pipelines.checkpoints.inspect import snapshot
from durability_pipelines.checkpoints.keys import companion_keys
from durability_pipelines.checkpoints.mirror import CheckpointMirror
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore, move_to_cluster_layout
from durability_pipelines.consumer.cursor_mirror import CursorMirror
from durability_pipelines.redis_client import redis_client
from tests import test_checkpoint_stores as contract
from tests.support.servers import PrivateRedisCluster
from tests.support.stores import CLUSTER_BACKENDS, build_store, unique_key

# The store contract suite (every test of tests/test_checkpoint_stores.py that takes only `store`), run
# here against the `store` fixture below: the Redis and hybrid stores on the cluster.
for _name, _test in vars(contract).items():
    if _name.startswith("test_") and list(inspect.signature(_test).parameters) == ["store"]:
        globals()[_name] = _test


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateRedisCluster]:
    with PrivateRedisCluster(masters=3) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: PrivateRedisCluster) -> Iterator[RedisCluster]:
    c = cluster.client()
    yield c
    c.close()


@pytest.fixture(params=CLUSTER_BACKENDS)
def store(
    request: pytest.FixtureRequest, cluster: PrivateRedisCluster, postgres_url: str
) -> Iterator[CheckpointStore]:
    s = build_store(request.param, cluster.url, postgres_url)
    yield s
    s.close()


def _node_of(client: RedisCluster, key: str) -> str:
    return client.get_node_from_key(key).name


# -- layout ------------------------------------------------------------------------------


def test_project_keys_hash_to_the_slot_of_the_shared_key(client: RedisCluster) -> None:
    keys = [
        "checkpoint:dynamodb:orders:workers:consumer-a:shardId-0001",
        "checkpoint:supabase:realtime:public:orders:workers:consumer-a",
        "checkpoint:dynamodb:{orders}:workers:consumer-a:shard-1",  # a hash tag of its own
        "checkpoint:dynamodb:{{orders:workers:consumer-a:shard-1",  # no '}': hashed whole
    ]
    for key in keys:
        slot = client.cluster_keyslot(key)
        companions = companion_keys(key, cluster=True)
        for companion in (
            companions.history,
            companions.sentinel,
            companions.hybrid_state,
            companions.lease_copy,
        ):
            assert client.cluster_keyslot(companion) == slot, (key, companion)
    assert companion_keys(keys[0], cluster=True).history == f"durability:history:{{{keys[0]}}}"
    assert (
        companion_keys(keys[0], cluster=False).history == "durability:history" + keys[0][len("checkpoint") :]
    )


def test_a_key_that_holds_a_closing_brace_is_refused_on_a_cluster(cluster: PrivateRedisCluster) -> None:
    store = RedisCheckpointStore.from_url(cluster.url)
    key = CheckpointKey("dynamodb", f"orders}}{uuid.uuid4().hex[:6]}", "workers", "consumer-a", "shard-1")
    with pytest.raises(InvalidCheckpointKeyError, match="hash tag"):
        store.save(key, "1")
    # '{}' is no tag: the key is hashed whole, and its '}' would end a tag of ours
    with pytest.raises(InvalidCheckpointKeyError, match="hash tag"):
        companion_keys("checkpoint:dynamodb:o{}rders:workers:consumer-a:shard-1", cluster=True)
    store.close()


def test_keys_spread_over_every_node_are_listed_and_loaded(
    cluster: PrivateRedisCluster, client: RedisCluster
) -> None:
    store = RedisCheckpointStore.from_url(cluster.url)
    keys = [unique_key() for _ in range(300)]
    for i, key in enumerate(keys):
        store.save(key, str(10**21 + i))
    assert len({_node_of(client, k.redis_key) for k in keys}) == 3
    listed = set(store.keys())
    assert set(keys) <= listed
    loaded = store.load_many([*keys, unique_key()])
    assert [loaded[k] for k in keys] == [str(10**21 + i) for i in range(300)]
    assert len(loaded) == 301 and list(loaded.values())[-1] is None
    store.close()


def test_a_checkpoint_another_worker_wrote_with_a_plain_set_is_read(
    cluster: PrivateRedisCluster, client: RedisCluster
) -> None:
    key = unique_key()
    client.set(key.redis_key, "12345678901234567890123", ex=86400)  # the original pattern's write
    store = RedisCheckpointStore.from_url(cluster.url)
    assert store.load(key) == "12345678901234567890123"
    assert store.load_many([key]) == {key: "12345678901234567890123"}
    assert store.save(key, "99").outcome.value == "stale"
    assert store.save(key, "12345678901234567890124").advanced
    assert client.get(key.redis_key) == b"12345678901234567890124"
    assert client.ttl(key.redis_key) > 0  # the other worker's TTL is kept
    store.close()


def test_wait_replicas_is_refused_on_a_cluster_with_what_to_do(cluster: PrivateRedisCluster) -> None:
    with pytest.raises(ConfigError, match="redis_wait_replicas"):
        RedisCheckpointStore(redis_client(cluster.url), wait_replicas=1)


# -- fencing -----------------------------------------------------------------------------


def _group_keys(client: RedisCluster) -> tuple[CheckpointKey, CheckpointKey]:
    """Two consumers' checkpoints of one shard (one lease), each on another node than the lease."""
    while True:
        stream = f"orders-{uuid.uuid4().hex[:10]}"
        a = CheckpointKey("dynamodb", stream, "workers", "consumer-a", "shard-000")
        b = CheckpointKey("dynamodb", stream, "workers", "consumer-b", "shard-000")
        nodes = {_node_of(client, k) for k in (a.redis_key, b.redis_key, a.lease_key.redis_key)}
        if len(nodes) == 3:
            return a, b


@pytest.mark.parametrize("backend", CLUSTER_BACKENDS)
def test_a_zombie_writer_is_fenced_once_the_takeover_returns(
    backend: str, cluster: PrivateRedisCluster, client: RedisCluster, postgres_url: str
) -> None:
    """Worker a stalls holding the shard; worker b (another consumer of the group, another node) steals it.
    Once b's acquire has returned, a's saves are refused on every node, whichever key a writes."""
    key_a, key_b = _group_keys(client)
    zombie = build_store(backend, cluster.url, postgres_url)
    taker = build_store(backend, cluster.url, postgres_url)
    lease_a = zombie.leases.acquire(key_a.lease_key, "worker-a", duration_s=60)
    assert lease_a is not None
    assert zombie.save(key_a, "100", lease=lease_a).advanced  # a's copy of the lease now sits beside key_a
    assert zombie.save(key_b, "100", lease=lease_a).advanced
    lease_b = taker.leases.acquire(key_a.lease_key, "worker-b", duration_s=60, steal=True)
    assert lease_b is not None and lease_b.epoch == lease_a.epoch + 1
    for key in (key_a, key_b):
        with pytest.raises(LeaseLostError, match="worker-b"):
            zombie.save(key, "200", lease=lease_a)
    assert taker.save(key_b, "150", lease=lease_b).advanced
    assert zombie.load(key_a) == "100" and zombie.load(key_b) == "150"
    zombie.close()
    taker.close()


def test_a_released_lease_fences_its_copies_and_a_new_holder_writes(
    cluster: PrivateRedisCluster, client: RedisCluster
) -> None:
    key_a, _ = _group_keys(client)
    store = RedisCheckpointStore.from_url(cluster.url)
    a = store.leases.acquire(key_a.lease_key, "worker-a")
    assert a is not None and store.save(key_a, "1", lease=a).advanced
    assert store.leases.release(a)
    with pytest.raises(LeaseLostError):
        store.save(key_a, "2", lease=a)
    b = store.leases.acquire(key_a.lease_key, "worker-b")
    assert b is not None and store.save(key_a, "2", lease=b).advanced
    store.close()


# -- hybrid, mirror, audit, cursors, migrate ---------------------------------------------------


def test_hybrid_on_the_cluster_flushes_to_postgres_and_restores_from_it(
    cluster: PrivateRedisCluster, client: RedisCluster, postgres_url: str
) -> None:
    store = build_store("hybrid-cluster", cluster.url, postgres_url, flush_every_n=3, flush_every_s=3600)
    assert isinstance(store, HybridCheckpointStore)
    key = unique_key()
    for seq in ("1", "2", "3", "4"):
        store.save(key, seq)
    assert store.postgres.load(key) == "4"  # first ack, then the third since
    store.save(key, "5")
    store.flush()
    assert store.postgres.load(key) == "5"
    client.delete(key.redis_key)  # Redis lost the key: the load falls back to Postgres and re-warms Redis
    assert store.load(key) == "5"
    assert client.get(key.redis_key) == b"5"
    store.close()


def test_mirror_and_audit_see_every_node(
    cluster: PrivateRedisCluster, client: RedisCluster, postgres_url: str
) -> None:
    store = RedisCheckpointStore.from_url(cluster.url)
    keys = [unique_key() for _ in range(60)]
    for i, key in enumerate(keys[:50]):
        store.save(key, str(1000 + i))
    for key in keys[50:]:
        client.set(key.redis_key, "777")  # other workers' keys
    db = PostgresConnection(postgres_url)
    report = CheckpointMirror(client, db).run()
    assert report.mirrored_to_postgres >= 60
    pg = build_store("postgres", "", postgres_url)
    assert pg.load_many(keys) == {
        **{k: str(1000 + i) for i, k in enumerate(keys[:50])},
        **{k: "777" for k in keys[50:]},
    }
    client.delete(keys[0].redis_key)  # lost in Redis: the mirror restores it from Postgres
    report = CheckpointMirror(client, db).run()
    assert report.restored_to_redis >= 1 and store.load(keys[0]) == "1000"
    states = {s.key: s for s in snapshot(client, db) if s.key in set(keys)}
    assert len(states) == 60
    assert states[keys[1]].redis is not None and states[keys[1]].redis.sequence == "1001"
    assert (
        states[keys[1]].redis_last_write is not None and states[keys[1]].redis_last_write.sequence == "1001"
    )
    pg.close()
    store.close()


def test_cursor_mirror_reads_cursors_on_every_node(client: RedisCluster) -> None:
    names = [f"sensor-{uuid.uuid4().hex[:8]}" for _ in range(30)]
    mirror = CursorMirror(client, None)
    for i, name in enumerate(names):
        mirror.save(name, f"cursor-{i}")
    found = mirror.load_all()
    assert {n: found[n] for n in names} == {n: f"cursor-{i}" for i, n in enumerate(names)}


def test_migrate_moves_single_node_layout_keys_into_the_checkpoint_slot(
    cluster: PrivateRedisCluster, client: RedisCluster
) -> None:
    key = unique_key()
    old_rest = key.redis_key[len("checkpoint") :]
    client.set(key.redis_key, "500")
    client.set("durability:sentinel" + old_rest, SHARD_END)  # as copied over from a single Redis
    client.xadd("durability:history" + old_rest, {"prev": "", "seq": "500", "writer": "w"})
    moved = {m.old: m for m in move_to_cluster_layout(client)}
    assert moved["durability:sentinel" + old_rest].moved
    assert moved["durability:history" + old_rest].new == key.companions(cluster=True).history
    assert client.exists("durability:sentinel" + old_rest) == 0
    store = RedisCheckpointStore.from_url(cluster.url)
    assert store.load(key) == SHARD_END
    assert [h.sequence for h in store.history(key)] == ["500"]
    assert not [m for m in move_to_cluster_layout(client) if m.moved]  # idempotent
    store.close()


# -- configuration -----------------------------------------------------------------------------


def test_cluster_urls_are_validated_and_masked() -> None:
    services.validate_redis_url("redis+cluster://10.0.0.1:6379,10.0.0.2:6380")
    services.validate_redis_url("redis+cluster://user:s3cret-pw@node-1:7000/0")
    with pytest.raises(services.InvalidServiceURLError, match="database 0 only") as info:
        services.validate_redis_url("redis+cluster://:s3cret-pw@node-1:7000/2")
    assert "s3cret-pw" not in str(info.value)
    assert "s3cret-pw" not in services.mask_url("redis+cluster://user:s3cret-pw@node-1:7000")


def test_a_cluster_url_gives_a_cluster_client(cluster: PrivateRedisCluster) -> None:
    c = redis_client(cluster.url, socket_timeout=5)
    assert isinstance(c, RedisCluster) and c.ping()
    services.check_redis(cluster.url)  # what the resources and the CLI run first
    c.close()


def test_the_cli_lists_migrates_and_sets_on_the_cluster(
    cluster: PrivateRedisCluster,
    client: RedisCluster,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from durability_pipelines.cli import main

    monkeypatch.setenv(services.ENV_POSTGRES_URL, postgres_url)
    monkeypatch.setenv(services.ENV_REDIS_URL, cluster.url)
    monkeypatch.delenv("DURABILITY_CHECKPOINT_BACKEND", raising=False)
    key = unique_key()
    client.set("durability:hybrid" + key.redis_key[len("checkpoint") :], "x")  # a single-node layout key
    assert main(["migrate"]) == 0
    assert "keys moved to the Redis Cluster layout" in capsys.readouterr().out
    assert client.exists(key.companions(cluster=True).hybrid_state) == 1
    store = RedisCheckpointStore.from_url(cluster.url)
    lease = store.leases.acquire(key.lease_key, "worker-a")
    assert lease is not None and store.save(key, "41", lease=lease).advanced
    capsys.readouterr()
    assert main(["--json", "--backend", "redis", "checkpoints", "list", "--stream", key.stream]) == 0
    assert [r["redis"] for r in json.loads(capsys.readouterr().out)] == ["41"]
    assert main(["--json", "--backend", "redis", "leases", "list"]) == 0
    assert key.stream in capsys.readouterr().out
    parts = [key.adapter, key.stream, key.group, key.consumer] + ([key.shard] if key.shard else [])
    assert (
        main(
            [
                "--backend",
                "redis",
                "checkpoints",
                "set",
                *parts,
                "--sequence",
                "40",
                "--force",
                "--reason",
                "test",
            ]
        )
        == 0
    )
    assert store.load(key) == "40"
    assert store.save(key, "42", lease=lease).advanced  # the forced move left the lease as it was
    store.close()
