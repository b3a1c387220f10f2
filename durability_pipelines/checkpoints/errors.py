"""Exception classes for the checkpoint library.

Every message says what went wrong *and* what the operator should do, because
these errors surface in Dagster run logs and CLI output read by on-call people.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from durability_pipelines.checkpoints.base import Lease


class DurabilityError(Exception):
    """Base class for every error raised by durability_pipelines."""


class InvalidCheckpointKeyError(DurabilityError, ValueError):
    """A key component would make the Redis key ambiguous or unreadable."""


class InvalidSequenceError(DurabilityError, ValueError):
    """A sequence (given or found in a store) is not a valid position."""

    def __init__(self, message: str, *, key: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.key = key
        self.value = value


class WrongTypeKeyError(InvalidSequenceError):
    """A Redis key of the layout holds another type (a hash, a list...) than the string it must hold."""

    def __init__(self, message: str, *, key: str | None = None, kind: str | None = None) -> None:
        super().__init__(message, key=key, value=f"<redis {kind}>")
        self.kind = kind


class LeaseLostError(DurabilityError):
    """The writer no longer holds the shard's lease; nothing was written.

    Mirrors KCL's "can't update checkpoint - instance doesn't hold the lease":
    another worker took the shard over (its epoch is higher), so this worker
    must stop processing the shard and re-acquire before doing more work.
    """

    def __init__(self, message: str, *, lease_key: str | None = None, held_by: str | None = None,
                 held_epoch: int | None = None) -> None:
        super().__init__(message)
        self.lease_key = lease_key
        self.held_by = held_by
        self.held_epoch = held_epoch


def lease_lost(lease: Lease, held_by: str | None, held_epoch: int | None) -> LeaseLostError:
    """The error every store raises for a refused fenced write (one wording everywhere)."""
    if held_by == lease.owner and held_epoch == lease.epoch:
        why = (f"lease {lease.key} of {lease.owner} at epoch {lease.epoch} has expired (it was not renewed in "
               "time); nothing was written. A lease must be renewed before it runs out: once expired, another "
               "worker may take the shard over at any moment. Stop processing it and re-acquire the lease.")
    else:
        why = (f"lease {lease.key} is no longer held by {lease.owner} at epoch {lease.epoch} "
               f"(now: owner={held_by or 'nobody'!s}, epoch={held_epoch}); nothing was written. "
               "Another worker took the shard over: stop processing it and re-acquire the lease before retrying.")
    return LeaseLostError(why, lease_key=str(lease.key), held_by=held_by, held_epoch=held_epoch)


class StoreUnavailableError(DurabilityError):
    """A backing service (Redis or Postgres) could not be reached."""


class StoreRefusedError(StoreUnavailableError):
    """The server answered but refused: wrong credentials, no such role or database. Not an outage:
    retrying will not help, so runs fail at once (never retried) and a hybrid store that falls back on its
    other part reports it as a refusal (the lag check fails naming it)."""


class ConfigError(DurabilityError, ValueError):
    """Configuration (environment, YAML file, resource config) is invalid."""


class ReplicationTimeoutError(StoreUnavailableError):
    """A Redis save reached the master but fewer replicas than ``redis_wait_replicas`` confirmed it in time.

    The checkpoint *was* written on the master, but a failover now could lose it: the ack is reported as
    failed so the batch is retried (saves are monotonic, so repeating one is harmless).
    """
