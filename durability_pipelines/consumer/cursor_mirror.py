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
from durability_pipelines.checkpoints.keys import SENSOR_CURSOR_PREFIX as REDIS_PREFIX
from durability_pipelines.consumer.storage import ConsumerStorage
from durability_pipelines.redis_client import mget_all

log = logging.getLogger(__name__)


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

    def load_all(self, scan_count: int = 1000) -> dict[str, str]:
        """Every cursor Redis holds, by sensor name."""
        if self.redis is None:
            return {}
        out: dict[str, str] = {}
        # scan_iter covers every primary of a Redis Cluster; mget_all reads per slot there
        keys = list(dict.fromkeys(self.redis.scan_iter(match=f"{REDIS_PREFIX}:*", count=scan_count)))
        if keys:
            for k, v in zip(keys, mget_all(self.redis, keys), strict=True):
                if v is not None:
                    name = (k.decode() if isinstance(k, bytes) else k)[len(REDIS_PREFIX) + 1 :]
                    out[name] = v.decode() if isinstance(v, bytes) else v
        return out

    def mirror_all(self) -> int:
        """Copy every cursor present in only one store to the other (the scheduled mirror's part);
        returns how many were copied. A cursor in both stores is left alone: each tick writes both."""
        assert self.redis is not None and self.storage is not None
        in_redis = self.load_all()
        in_pg = self.storage.all_cursors()
        only_redis = {n: c for n, c in in_redis.items() if n not in in_pg}
        self.storage.insert_cursors(only_redis)
        only_pg = {n: c for n, c in in_pg.items() if n not in in_redis}
        if only_pg:
            pipe = self.redis.pipeline(transaction=False)
            for name, cursor in only_pg.items():
                pipe.set(f"{REDIS_PREFIX}:{name}", cursor, nx=True)
            pipe.execute()
        return len(only_redis) + len(only_pg)
