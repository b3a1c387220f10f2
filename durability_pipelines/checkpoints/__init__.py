"""Durable, monotonic, fenced checkpoints (no Dagster import).

Backends: ``memory`` (process-local), ``redis`` (fast, shared), ``postgres``
(source of truth, auditable, transactional) and ``hybrid`` (Redis on every
ack, Postgres every N acks / T seconds).
"""

from __future__ import annotations

from durability_pipelines.checkpoints.base import (
    CheckpointStore,
    CheckpointTransaction,
    HistoryEntry,
    Lease,
    LeaseManager,
    SaveContext,
    SaveOutcome,
    SaveResult,
    TransactionalStore,
)
from durability_pipelines.checkpoints.errors import (
    ConfigError,
    DurabilityError,
    InvalidCheckpointKeyError,
    InvalidSequenceError,
    LeaseLostError,
    StoreRefusedError,
    StoreUnavailableError,
    WrongTypeKeyError,
)
from durability_pipelines.checkpoints.factory import StoreConfig, open_store
from durability_pipelines.checkpoints.keys import (
    NO_SHARD,
    CheckpointKey,
    LeaseKey,
    shard_from_tag,
    shard_to_tag,
)
from durability_pipelines.checkpoints.ordering import (
    LATEST,
    SHARD_END,
    TRIM_HORIZON,
    compare_sequences,
    normalize_sequence,
    sequence_gap,
    sort_key,
)
from durability_pipelines.checkpoints.postgres_store import (
    PostgresConnection,
    connection_is_stale,
    mask_conninfo,
)

__all__ = [
    "LATEST", "NO_SHARD", "SHARD_END", "TRIM_HORIZON", "CheckpointKey", "CheckpointStore", "CheckpointTransaction",
    "ConfigError", "DurabilityError", "HistoryEntry", "InvalidCheckpointKeyError", "InvalidSequenceError",
    "Lease", "LeaseKey", "LeaseLostError", "LeaseManager", "PostgresConnection", "SaveContext", "SaveOutcome", "SaveResult",
    "StoreConfig", "StoreRefusedError", "StoreUnavailableError", "TransactionalStore", "WrongTypeKeyError", "compare_sequences",
    "connection_is_stale", "mask_conninfo", "normalize_sequence", "open_store", "sequence_gap", "shard_from_tag", "shard_to_tag", "sort_key",
]
