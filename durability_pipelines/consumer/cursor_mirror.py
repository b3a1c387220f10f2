"""The sensor cursor's mirror in Redis and Postgres, for failover.

Dagster keeps a sensor's cursor in its own instance storage; a new node with
a new ``DAGSTER_HOME`` starts without it.  Each tick writes the cursor to
Redis (``durability:sensor_cursor:<sensor>``) and to the ``sensor_cursors``
table; a sensor that finds no cursor restores it from Redis first, then
Postgres.
"""

from __future__ import annotations

import logging

import redis

from durability_pipelines.checkpoints.errors import StoreUnavailableError
from durability_pipelines.consumer.storage import ConsumerStorage

log = logging.getLogger(__name__)
REDIS_PREFIX = "durability:sensor_cursor"


class CursorMirror:
    def __init__(self, redis_client: redis.Redis | None, storage: ConsumerStorage | None) -> None:
        self.redis = redis_client
        self.storage = storage

    def save(self, sensor_name: str, cursor: str) -> None:
        if self.redis is not None:
            try:
                self.redis.set(f"{REDIS_PREFIX}:{sensor_name}", cursor)
            except redis.RedisError as exc:
                log.warning("cursor mirror: Redis unavailable (%s)", exc)
        if self.storage is not None:
            try:
                self.storage.save_cursor(sensor_name, cursor)
            except StoreUnavailableError as exc:
                log.warning("cursor mirror: Postgres unavailable (%s)", exc)

    def load(self, sensor_name: str) -> tuple[str | None, str]:
        """The mirrored cursor and where it came from ('redis', 'postgres' or 'none')."""
        if self.redis is not None:
            try:
                raw = self.redis.get(f"{REDIS_PREFIX}:{sensor_name}")
                if raw:
                    return raw.decode() if isinstance(raw, bytes) else raw, "redis"
            except redis.RedisError as exc:
                log.warning("cursor mirror: Redis unavailable (%s); trying Postgres", exc)
        if self.storage is not None:
            try:
                raw = self.storage.load_cursor(sensor_name)
                if raw:
                    return raw, "postgres"
            except StoreUnavailableError as exc:
                log.warning("cursor mirror: Postgres unavailable (%s)", exc)
        return None, "none"
