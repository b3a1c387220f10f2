"""Process-local checkpoints: the original pattern's default.

Lowest complexity, single runner only: everything is lost when the process
exits.  It obeys the same monotonic and fencing contract as the durable stores
so tests and handlers behave identically on every backend.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

from durability_pipelines.checkpoints.base import (
    HANDOFF_REQUEST_FRESH_S,
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


@dataclass
class _LeaseRow:
    owner: str = ""
    epoch: int = 0
    expires: float = 0.0
    requested_by: str = ""
    requested_at: float = 0.0
    handed_from: str = ""
    handed_at: float = 0.0


def _ts(seconds: float) -> datetime | None:
    return datetime.fromtimestamp(seconds, timezone.utc) if seconds else None


class MemoryLeaseManager(LeaseManager):
    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._leases: dict[LeaseKey, _LeaseRow] = {}

    def _lease(self, key: LeaseKey, row: _LeaseRow) -> Lease:
        return Lease(key, row.owner, row.epoch, datetime.fromtimestamp(row.expires, timezone.utc),
                     row.requested_by, _ts(row.requested_at), row.handed_from, _ts(row.handed_at))

    def _take(self, key: LeaseKey, row: _LeaseRow, owner: str, now: float, duration_s: float) -> Lease:
        """``owner`` takes the lease over (epoch + 1), or keeps it if it is already theirs and live."""
        if not (row.owner == owner and row.expires > now):
            self._leases[key] = row = _LeaseRow(owner, row.epoch + 1)
        row.expires = now + duration_s
        return self._lease(key, row)

    def acquire(self, key: LeaseKey, owner: str, duration_s: float = 60.0, *, steal: bool = False) -> Lease | None:
        with self._lock:
            now = time.time()
            row = self._leases.get(key, _LeaseRow())
            if row.owner in ("", owner) or row.expires <= now or steal:
                return self._take(key, row, owner, now, duration_s)
            return None

    def renew(self, lease: Lease, duration_s: float = 60.0) -> Lease:
        with self._lock:
            self.check(lease)
            row = self._leases[lease.key]
            row.expires = time.time() + duration_s
            return self._lease(lease.key, row)

    def release(self, lease: Lease) -> bool:
        with self._lock:
            row = self._leases.get(lease.key, _LeaseRow())
            if (row.owner, row.epoch) != (lease.owner, lease.epoch):
                return False
            row.owner, row.expires = "", 0.0
            return True

    def request_handoff(self, key: LeaseKey, requester: str, duration_s: float = 60.0) -> Lease:
        with self._lock:
            now = time.time()
            row = self._leases.get(key, _LeaseRow())
            if row.owner in ("", requester) or row.expires <= now:
                return self._take(key, row, requester, now, duration_s)
            if row.requested_by in ("", requester) or row.requested_at + HANDOFF_REQUEST_FRESH_S <= now:
                row.requested_by, row.requested_at = requester, now
            return self._lease(key, row)

    def hand_over(self, lease: Lease, duration_s: float = 60.0) -> Lease | None:
        with self._lock:
            row = self._leases.get(lease.key)
            now = time.time()
            if (row is None or (row.owner, row.epoch) != (lease.owner, lease.epoch) or not row.requested_by
                    or row.requested_at + HANDOFF_REQUEST_FRESH_S <= now):
                return None
            self._leases[lease.key] = row = _LeaseRow(row.requested_by, row.epoch + 1, now + duration_s,
                                                      handed_from=lease.owner, handed_at=now)
            return self._lease(lease.key, row)

    def withdraw_request(self, key: LeaseKey, requester: str) -> Lease | None:
        with self._lock:
            row = self._leases.get(key)
            if row is None:
                return None
            if row.requested_by == requester:
                row.requested_by, row.requested_at = "", 0.0
            return self._lease(key, row)

    def get(self, key: LeaseKey) -> Lease | None:
        with self._lock:
            row = self._leases.get(key)
            return None if row is None else self._lease(key, row)

    def list(self) -> list[Lease]:
        with self._lock:
            return [lease for k in sorted(self._leases) if (lease := self.get(k)) is not None]

    def check(self, lease: Lease, *, live: bool = False) -> None:
        """Owner and epoch match (and, with ``live``, the lease has not expired) or ``LeaseLostError``."""
        row = self._leases.get(lease.key, _LeaseRow())
        if (row.owner, row.epoch) != (lease.owner, lease.epoch) or (live and row.expires <= time.time()):
            raise lease_lost(lease, row.owner, row.epoch)


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
