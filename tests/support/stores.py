"""Build every checkpoint backend against the test session's real servers."""

from __future__ import annotations

import uuid

from durability_pipelines.checkpoints import CheckpointKey, CheckpointStore
from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
from durability_pipelines.checkpoints.memory import MemoryCheckpointStore
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore

BACKENDS = ("memory", "redis", "postgres", "hybrid")
#: The Redis-backed stores on a Redis Cluster: ``redis_url`` is then the cluster's ``redis+cluster://`` URL
#: (tests/test_redis_cluster.py runs the contract suite on them).
CLUSTER_BACKENDS = ("redis-cluster", "hybrid-cluster")


def build_store(backend: str, redis_url: str, postgres_url: str, **kwargs: object) -> CheckpointStore:
    backend = backend.removesuffix("-cluster")  # the same stores; the URL says it is a cluster
    if backend == "memory":
        return MemoryCheckpointStore()
    if backend == "redis":
        return RedisCheckpointStore.from_url(redis_url, **kwargs)  # type: ignore[arg-type]
    if backend == "postgres":
        return PostgresCheckpointStore(postgres_url)
    if backend == "hybrid":
        return HybridCheckpointStore(
            RedisCheckpointStore.from_url(redis_url), PostgresCheckpointStore(postgres_url), **kwargs  # type: ignore[arg-type]
        )
    raise ValueError(backend)


def unique_key(adapter: str = "dynamodb", shard: str | None = "shard-000") -> CheckpointKey:
    """A key no other test touches (tests share the servers)."""
    return CheckpointKey(adapter, f"orders-{uuid.uuid4().hex[:10]}", "workers", "consumer-a", shard)
