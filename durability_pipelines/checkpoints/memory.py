"""Process-local checkpoints: the original pattern's default.

Lowest complexity, single runner only: everything is lost when the process
exits.  It obeys the same monotonic and fencing contract as the durable stores
so tests and handlers behave identically on every backend.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import datetime, timezone

from durability_pipelines.checkpoints.base import (
    CheckpointStore,
    ForceSetResult,
    HistoryEntry,
    Lease,
    LeaseManager,
    SaveContext,
    SaveOutcome,
    SaveResult,
    require_force_context,
)
from durability_pipelines.checkpoints.errors import lease_lost
from durability_pipelines.checkpoints.keys import CheckpointKey, LeaseKey
from durability_pipelines.checkpoints.ordering import normalize_sequence, sort_key


def _now() -> datetime:
    return datetime.now(timezone.utc)


class MemoryLeaseManager(LeaseManager):
    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._leases: dict[LeaseKey, tuple[str, int, float]] = {}

    def acquire(self, key: LeaseKey, owner: str, duration_s: float = 60.0, *, steal: bool = False) -> Lease | None:
        with self._lock:
            now = time.time()
            cur_owner, epoch, expires = self._leases.get(key, ("", 0, 0.0))
            if cur_owner == owner and expires > now:
                new_epoch = epoch
            elif cur_owner == "" or expires <= now or steal:
                new_epoch = epoch + 1
            else:
                return None
            self._leases[key] = (owner, new_epoch, now + duration_s)
            return Lease(key, owner, new_epoch, datetime.fromtimestamp(now + duration_s, timezone.utc))

    def renew(self, lease: Lease, duration_s: float = 60.0) -> Lease:
        with self._lock:
            self.check(lease)
            expires = time.time() + duration_s
            self._leases[lease.key] = (lease.owner, lease.epoch, expires)
            return Lease(lease.key, lease.owner, lease.epoch, datetime.fromtimestamp(expires, timezone.utc))

    def release(self, lease: Lease) -> bool:
        with self._lock:
            owner, epoch, _ = self._leases.get(lease.key, ("", 0, 0.0))
            if (owner, epoch) != (lease.owner, lease.epoch):
                return False
            self._leases[lease.key] = ("", epoch, 0.0)
            return True

    def get(self, key: LeaseKey) -> Lease | None:
        with self._lock:
            if key not in self._leases:
                return None
            owner, epoch, expires = self._leases[key]
            return Lease(key, owner, epoch, datetime.fromtimestamp(expires, timezone.utc))

    def list(self) -> list[Lease]:
        with self._lock:
            return [lease for k in sorted(self._leases) if (lease := self.get(k)) is not None]

    def check(self, lease: Lease, *, live: bool = False) -> None:
        """Owner and epoch match (and, with ``live``, the lease has not expired) or ``LeaseLostError``."""
        owner, epoch, expires = self._leases.get(lease.key, ("", 0, 0.0))
        if (owner, epoch) != (lease.owner, lease.epoch) or (live and expires <= time.time()):
            raise lease_lost(lease, owner, epoch)


class MemoryCheckpointStore(CheckpointStore):
    backend = "memory"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._values: dict[CheckpointKey, str] = {}
        self._history: dict[CheckpointKey, list[HistoryEntry]] = defaultdict(list)
        self._leases = MemoryLeaseManager(self._lock)

    @property
    def leases(self) -> MemoryLeaseManager:
        return self._leases

    def load(self, key: CheckpointKey) -> str | None:
        with self._lock:
            return self._values.get(key)

    def keys(self) -> list[CheckpointKey]:
        with self._lock:
            return sorted(self._values)

    def save(
        self,
        key: CheckpointKey,
        sequence: str,
        *,
        lease: Lease | None = None,
        context: SaveContext | None = None,
    ) -> SaveResult:
        sequence = normalize_sequence(sequence, key=key.redis_key)
        ctx = context or SaveContext()
        with self._lock:
            if lease is not None:
                self._leases.check(lease, live=True)  # the fencing rule: owner, epoch, not expired
            previous = self._values.get(key)
            if previous is not None and sort_key(previous) >= sort_key(sequence):
                outcome = SaveOutcome.UNCHANGED if previous == sequence else SaveOutcome.STALE
                return SaveResult(key, outcome, previous, previous)
            self._values[key] = sequence
            self._history[key].append(
                HistoryEntry(
                    key, previous, sequence, lease.owner if lease else ctx.writer,
                    lease.epoch if lease else None, ctx.run_id, _now(), ctx.reason,
                )
            )
            return SaveResult(key, SaveOutcome.ADVANCED, previous, sequence)

    def force_set(self, key: CheckpointKey, sequence: str, *, context: SaveContext) -> ForceSetResult:
        """Unconditional operator write, recorded in history (see ``CheckpointStore.force_set``)."""
        sequence = normalize_sequence(sequence, key=key.redis_key)
        ctx = require_force_context(context)
        with self._lock:
            previous = self._values.get(key)
            self._values[key] = sequence
            self._history[key].append(
                HistoryEntry(key, previous, sequence, ctx.writer, None, ctx.run_id, _now(), ctx.reason)
            )
        return ForceSetResult(key, previous, sequence, {self.backend: previous})

    def history(self, key: CheckpointKey, limit: int = 100) -> list[HistoryEntry]:
        with self._lock:
            return list(reversed(self._history.get(key, [])))[:limit]


__all__ = ["MemoryCheckpointStore", "MemoryLeaseManager"]
