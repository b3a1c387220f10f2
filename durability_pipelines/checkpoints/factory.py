"""Build a checkpoint store from a small declarative config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from durability_pipelines.checkpoints.base import CheckpointStore
from durability_pipelines.checkpoints.errors import ConfigError

Backend = Literal["memory", "redis", "postgres", "hybrid"]


class StoreConfig(BaseModel):
    """Which store, and its knobs. URLs come from the environment, not from here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend = "hybrid"
    # Every duration is bounded (a float overflow or a date out of range would fail every run, naming no field)
    # and every count strict (YAML's `true` is no count).
    redis_ttl_s: float | None = Field(default=None, gt=0, le=10 * 365 * 86400, allow_inf_nan=False,
                                      description="None = keys never expire (strict); at most 10 years")
    history_maxlen: int = Field(default=1000, ge=0, le=10_000_000, strict=True,
                                description="Redis history stream cap per key; 0 = off")
    flush_every_n: int = Field(default=100, ge=1, le=1_000_000, strict=True,
                               description="hybrid: flush to Postgres every N acks")
    flush_every_s: float = Field(default=5.0, ge=0, le=86400, allow_inf_nan=False,
                                 description="hybrid: ... or every T seconds (at most a day)")
    redis_wait_replicas: int = Field(
        default=0, ge=0, le=16, strict=True,
        description="redis/hybrid: each Redis save waits (WAIT) until this many replicas have it; 0 = async",
    )
    redis_wait_timeout_s: float = Field(
        default=1.0, gt=0, le=60, allow_inf_nan=False,
        description="how long a save waits for redis_wait_replicas before the ack fails (at most 60 s)",
    )

    @model_validator(mode="after")
    def _wait_needs_redis(self) -> StoreConfig:
        """A replica count on a store without Redis would silently promise nothing."""
        if self.redis_wait_replicas and self.backend not in ("redis", "hybrid"):
            raise ValueError(
                f"redis_wait_replicas applies to the redis and hybrid backends, not {self.backend!r}: "
                "remove it or choose backend redis/hybrid"
            )
        return self

    def redis_options(self) -> dict[str, Any]:
        """Keyword arguments of ``RedisCheckpointStore`` from this config."""
        return {"ttl_s": self.redis_ttl_s, "history_maxlen": self.history_maxlen,
                "wait_replicas": self.redis_wait_replicas, "wait_timeout_s": self.redis_wait_timeout_s}


def open_store(config: StoreConfig, *, redis_url: str | None = None, postgres_url: str | None = None,
               memory_store: CheckpointStore | None = None, migrate_schema: bool = True) -> CheckpointStore:
    """Open the configured store; raises ``ConfigError`` when a needed URL is missing."""
    from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
    from durability_pipelines.checkpoints.memory import MemoryCheckpointStore
    from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
    from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore

    def need(url: str | None, name: str) -> str:
        if not url:
            raise ConfigError(
                f"checkpoint backend {config.backend!r} needs {name}; set the environment variable "
                f"or choose another backend"
            )
        return url

    if config.backend == "memory":
        return memory_store or MemoryCheckpointStore()
    if config.backend == "redis":
        store = RedisCheckpointStore.from_url(need(redis_url, "DURABILITY_REDIS_URL"), **config.redis_options())
        if postgres_url:  # a foreign move a save finds goes to checkpoint_history too, where the audit's check reads it
            store.on_foreign_move = _postgres_reporter(postgres_url)
        return store
    if config.backend == "postgres":
        return PostgresCheckpointStore(need(postgres_url, "DURABILITY_POSTGRES_URL"), migrate_schema=migrate_schema)
    return HybridCheckpointStore(
        RedisCheckpointStore.from_url(need(redis_url, "DURABILITY_REDIS_URL"), **config.redis_options()),
        PostgresCheckpointStore(need(postgres_url, "DURABILITY_POSTGRES_URL"), migrate_schema=migrate_schema),
        flush_every_n=config.flush_every_n,
        flush_every_s=config.flush_every_s,
    )


def _postgres_reporter(postgres_url: str) -> Any:
    """Record a Redis save's foreign move (``SaveOutcome.REWOUND``) in Postgres's ``checkpoint_history``; the
    connection is opened on the first one (they are rare) and closed after it."""
    from durability_pipelines.checkpoints.base import SaveContext, SaveResult
    from durability_pipelines.checkpoints.inspect import record_external
    from durability_pipelines.checkpoints.postgres_store import PostgresConnection

    def report(result: SaveResult, ctx: SaveContext) -> None:
        db = PostgresConnection(postgres_url)
        try:
            record_external(db, result.key, result.moved_back_from or "", result.current, store="redis",
                            run_id=ctx.run_id)
        finally:
            db.close()

    return report
