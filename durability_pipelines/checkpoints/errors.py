"""Exception classes for the checkpoint library.

Every message says what went wrong *and* what the operator should do, because
these errors surface in Dagster run logs and CLI output read by on-call people.
"""

from __future__ import annotations


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


class StoreUnavailableError(DurabilityError):
    """A backing service (Redis or Postgres) could not be reached."""


class ConfigError(DurabilityError, ValueError):
    """Configuration (environment, YAML file, resource config) is invalid."""
