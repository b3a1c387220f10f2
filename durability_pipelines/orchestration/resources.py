"""``DurabilityResource``: where the durable stores are, from the environment.

URLs come from ``EnvVar("DURABILITY_POSTGRES_URL")`` / ``EnvVar("DURABILITY_REDIS_URL")``
so credentials never appear in run config or the UI; when a variable is unset
the embedded servers (``durability_pipelines.services``) are used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import redis
from dagster import ConfigurableResource, EnvVar, InitResourceContext
from pydantic import Field, PrivateAttr

from durability_pipelines import services
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.cursor_mirror import CursorMirror
from durability_pipelines.consumer.runtime import ConsumerRuntime, open_runtime
from durability_pipelines.consumer.storage import ConsumerStorage, ensure
from durability_pipelines.redis_client import redis_client


class DurabilityResource(ConfigurableResource):
    """Connections to the checkpoint stores.

    ``redis_client()`` and ``postgres()`` are opened once and shared by every step of a run (and
    every check of a tick); Dagster closes them when the run's resources are torn down. Callers
    never close them.
    """

    postgres_url: str | None = Field(default=None, description="DURABILITY_POSTGRES_URL; unset = embedded")
    redis_url: str | None = Field(default=None, description="DURABILITY_REDIS_URL; unset = embedded")
    _redis: redis.Redis | None = PrivateAttr(default=None)
    _postgres: PostgresConnection | None = PrivateAttr(default=None)

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        """Close the shared connections (the next call opens new ones)."""
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._postgres is not None:
            self._postgres.close()
            self._postgres = None

    def resolved_postgres_url(self) -> str:
        return self.postgres_url or services.resolve_postgres_url()

    def resolved_redis_url(self) -> str:
        return self.redis_url or services.resolve_redis_url()

    def runtime(self, config: ConsumerConfig, *, build_source: bool = True, migrate_schema: bool = True,
                is_owner_dead: Callable[[str], bool] | None = None, **kwargs: Any) -> ConsumerRuntime:
        needs_redis = config.checkpoint.backend in ("redis", "hybrid")
        return open_runtime(
            config,
            redis_url=self.resolved_redis_url() if needs_redis else None,
            postgres_url=self.resolved_postgres_url(),
            build_source=build_source,
            migrate_schema=migrate_schema,
            is_owner_dead=is_owner_dead,
            **kwargs,
        )

    def postgres(self) -> PostgresConnection:
        """The shared Postgres connection (reconnects by itself after an outage)."""
        if self._postgres is None:
            self._postgres = PostgresConnection(self.resolved_postgres_url())
        return self._postgres

    def redis_client(self) -> redis.Redis:
        """The shared Redis client (a connection pool)."""
        if self._redis is None:
            self._redis = redis_client(self.resolved_redis_url(), socket_timeout=10, socket_connect_timeout=5)
        return self._redis

    def cursor_mirror(self) -> CursorMirror:
        db = self.postgres()
        ensure(db)
        return CursorMirror(self.redis_client(), ConsumerStorage(db))


def durability_resource_from_env() -> DurabilityResource:
    """Bind each URL to its environment variable when set, so Dagster resolves it at run time."""
    return DurabilityResource(
        postgres_url=EnvVar(services.ENV_POSTGRES_URL) if os.environ.get(services.ENV_POSTGRES_URL) else None,
        redis_url=EnvVar(services.ENV_REDIS_URL) if os.environ.get(services.ENV_REDIS_URL) else None,
    )
