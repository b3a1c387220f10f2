"""The ``CheckpointStore`` contract every backend implements.

``save`` is monotonic (never backwards, equal is a no-op, the result says
which happened) and optionally fenced by a lease epoch; ``load`` returns the
acked position.  Nothing in here imports Dagster.
"""

from __future__ import annotations

import abc
import enum
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from durability_pipelines.checkpoints.errors import InvalidSequenceError
from durability_pipelines.checkpoints.keys import CheckpointKey, LeaseKey
from durability_pipelines.checkpoints.ordering import normalize_sequence, sort_key


class SaveOutcome(str, enum.Enum):
    ADVANCED = "advanced"  # the checkpoint moved forward (or was created)
    UNCHANGED = "unchanged"  # equal to the stored value: a no-op
    STALE = "stale"  # behind the stored value: rejected, nothing written
    #: the stored value is below what the project itself last recorded there: another worker moved it back (a
    #: rewind). Recorded as a foreign move and honoured: nothing written, ``current`` is the value found, so the
    #: consumer goes on from there (it replays what the other worker asked for). Redis and Postgres stores (a
    #: store knows what it last wrote only since it opened: the replay mark covers what came before).
    REWOUND = "rewound"


@dataclass(frozen=True)
class SaveResult:
    key: CheckpointKey
    outcome: SaveOutcome
    previous: str | None
    current: str
    #: with ``REWOUND``: the position the project had recorded, which the value found is below
    moved_back_from: str | None = None

    @property
    def advanced(self) -> bool:
        return self.outcome is SaveOutcome.ADVANCED


@dataclass(frozen=True)
class Lease:
    """Proof that ``owner`` holds ``key`` at ``epoch`` (KCL's leaseCounter).

    Every takeover increments the epoch; a write carrying an older epoch, or
    another owner, is refused with ``LeaseLostError``.
    """

    key: LeaseKey
    owner: str
    epoch: int
    expires_at: datetime | None = None
    #: A graceful hand-off (KCL 3.x's): the worker waiting for this lease ('' = nobody), and when it last
    #: asked. The owner hands over at its next batch boundary, after its checkpoint is saved.
    requested_by: str = ""
    requested_at: datetime | None = None
    #: Who handed this lease to its owner, and when ('' / None: the owner took it, it was not handed over).
    handed_from: str = ""
    handed_at: datetime | None = None

    def held_by(self, owner: str, now: datetime) -> bool:
        """``owner`` holds it and it has not expired (by the clock of ``now``)."""
        return self.owner == owner and self.expires_at is not None and self.expires_at > now


@dataclass(frozen=True)
class HistoryEntry:
    key: CheckpointKey
    previous: str | None
    sequence: str
    writer: str | None
    lease_epoch: int | None
    run_id: str | None
    ts: datetime | None
    reason: str | None = None


@dataclass
class SaveContext:
    """Who writes, and why; recorded in history."""

    writer: str = field(default_factory=lambda: default_writer_id())
    run_id: str | None = None
    reason: str | None = None


#: How many history entries ``history_at`` scans where a store has no index by time.
HISTORY_SCAN_LIMIT = 100_000

#: History rows of deliberate operator moves (``checkpoints set --force`` / ``rewind``) start with
#: this, so audits tell a recorded rewind from a regression.
FORCED_REASON_PREFIX = "force: "


def forced_reason(reason: str) -> str:
    return reason if reason.startswith(FORCED_REASON_PREFIX) else FORCED_REASON_PREFIX + reason


def default_writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class ForceSetResult:
    """What an unconditional (operator) write replaced.

    ``previous`` is the raw stored value, which may be invalid: fixing a
    garbage checkpoint is one of the reasons to force a write.
    ``previous_by_store`` names each backing store's value (hybrid has two).
    """

    key: CheckpointKey
    previous: str | None
    current: str
    previous_by_store: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        """created | unchanged | forward | backward | replaced-invalid (relative to ``previous``)."""
        if self.previous is None:
            return "created"
        try:
            before = sort_key(normalize_sequence(self.previous))
        except InvalidSequenceError:
            return "replaced-invalid"
        after = sort_key(self.current)
        return "unchanged" if before == after else ("forward" if after > before else "backward")


def require_force_context(context: SaveContext | None) -> SaveContext:
    """A forced write must say who and why: it is the one write that may move a checkpoint backwards."""
    if context is None or not (context.reason or "").strip() or not (context.writer or "").strip():
        raise ValueError(
            "force_set needs a SaveContext with a writer (who) and a non-empty reason (why); "
            "both are recorded in the checkpoint history"
        )
    return context


#: A successor asks again every few tens of milliseconds while it waits; a request not renewed for this
#: long belongs to a successor that died (or gave up): it is not handed anything, and another may ask.
HANDOFF_REQUEST_FRESH_S = 5.0


class LeaseManager(abc.ABC):
    """Acquire / renew / release shard leases with a monotonically rising epoch."""

    @abc.abstractmethod
    def acquire(self, key: LeaseKey, owner: str, duration_s: float = 60.0, *, steal: bool = False) -> Lease | None:
        """Take the lease if free, expired, already ours, or ``steal``; else ``None``.

        A takeover (new owner, expired, released, stolen) increments the epoch;
        re-acquiring a lease we still hold keeps it and extends the expiry.
        """

    @abc.abstractmethod
    def renew(self, lease: Lease, duration_s: float = 60.0) -> Lease:
        """Extend the lease; ``LeaseLostError`` if someone took it over."""

    @abc.abstractmethod
    def release(self, lease: Lease) -> bool:
        """Give the lease up (next acquire is a takeover). False if not ours any more."""

    @abc.abstractmethod
    def request_handoff(self, key: LeaseKey, requester: str, duration_s: float = 60.0) -> Lease:
        """Ask for the lease by graceful hand-off; returns the lease as it is after the call.

        * free, expired or already ours: ``requester`` takes it, as ``acquire`` would (``owner == requester``);
        * held by another worker: the request is recorded (``requested_by == requester``) unless another
          worker's request is pending (renewed less than ``HANDOFF_REQUEST_FRESH_S`` ago), which is left in
          place: only one successor waits per lease. A waiting successor asks again and again (that keeps
          its request fresh); the owner sees it at its next batch boundary and calls :meth:`hand_over`.
        """

    @abc.abstractmethod
    def hand_over(self, lease: Lease, duration_s: float = 60.0) -> Lease | None:
        """Give the lease to the worker that asked for it, in one step: owner = the requester, epoch + 1
        (a takeover, so the old owner is fenced from here on), expiring in ``duration_s``. Returns the
        successor's lease, or None if ``lease`` is not held any more or no fresh request is pending
        (nothing changed: a successor that stopped asking, e.g. died, is handed nothing).

        Call it only after the last checkpoint is saved: from here on the old owner's saves are refused.
        """

    @abc.abstractmethod
    def withdraw_request(self, key: LeaseKey, requester: str) -> Lease | None:
        """Take back ``requester``'s pending request (a successor that stops waiting); returns the lease as
        it is after the call, which may already be the requester's (it was handed over meanwhile)."""

    @abc.abstractmethod
    def get(self, key: LeaseKey) -> Lease | None:
        """The current holder (owner may be '' when released)."""

    @abc.abstractmethod
    def list(self) -> list[Lease]:
        """Every lease this store knows."""


class CheckpointStore(abc.ABC):
    """Durable, monotonic, fenced checkpoints."""

    #: short backend name: memory | redis | postgres | hybrid
    backend: str = "abstract"

    @property
    @abc.abstractmethod
    def leases(self) -> LeaseManager: ...

    @abc.abstractmethod
    def load(self, key: CheckpointKey) -> str | None:
        """The acked position, or ``None`` when the key was never saved."""

    def load_many(self, keys: Iterable[CheckpointKey]) -> dict[CheckpointKey, str | None]:
        return {k: self.load(k) for k in keys}

    @abc.abstractmethod
    def save(
        self,
        key: CheckpointKey,
        sequence: str,
        *,
        lease: Lease | None = None,
        context: SaveContext | None = None,
    ) -> SaveResult:
        """Monotonic save; raises ``LeaseLostError`` (nothing written) if ``lease`` is stale."""

    def force_set(self, key: CheckpointKey, sequence: str, *, context: SaveContext) -> ForceSetResult:
        """Write ``sequence`` unconditionally (even backwards, even over garbage) and record who/why.

        For operators only (``durability-pipelines checkpoints set --force`` / ``rewind``):
        no monotonic guard and no lease fencing, so a worker still holding the
        shard's lease may move the checkpoint forward again; stop it first.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not support force_set; use the memory, redis, postgres or hybrid store"
        )

    @abc.abstractmethod
    def history(self, key: CheckpointKey, limit: int = 100) -> list[HistoryEntry]:
        """Newest first."""

    def history_at(self, key: CheckpointKey, at: datetime) -> HistoryEntry | None:
        """The last history entry written at or before ``at`` (for rewinding to a point in time).

        This default scans what ``history`` keeps (a capped Redis stream keeps the newest entries only);
        Postgres answers from the whole ``checkpoint_history``.
        """
        for entry in self.history(key, HISTORY_SCAN_LIMIT):
            if entry.ts is not None and entry.ts <= at:
                return entry
        return None

    @abc.abstractmethod
    def keys(self) -> list[CheckpointKey]:
        """Every checkpoint key the store holds."""

    def load_all(self) -> Mapping[CheckpointKey, str | None]:
        return self.load_many(self.keys())

    def load_raw_many(self, keys: list[CheckpointKey]) -> list[Any]:
        """Stored values in key order, unparsed (garbage included: showing it is the point of a listing);
        ``None`` for a missing key. Stores that can read raw values faster override this."""
        out: list[Any] = []
        for key in keys:
            try:
                out.append(self.load(key))
            except InvalidSequenceError as exc:
                out.append(None if exc.value is None else str(exc.value))
        return out

    def raw_rows(self) -> list[tuple[CheckpointKey, Any, datetime | None]]:
        """Every checkpoint as ``(key, raw value, last write time or None)``, for listings and audits."""
        keys = self.keys()
        return [(k, raw, None) for k, raw in zip(keys, self.load_raw_many(keys), strict=True)]

    def parts(self) -> list[tuple[str, CheckpointStore]]:
        """The stores this one is made of, by name: hybrid has ``redis`` and ``postgres``, the others themselves."""
        return [(self.backend, self)]

    def refusals(self) -> dict[str, str]:
        """Parts of this store whose server refused the credentials or the database, by part name, with the
        message that says what to fix. Only a store that goes on without such a part (hybrid, on Postgres
        alone) has any: the others fail the call. The lag check fails while there are some."""
        return {}

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Push buffered state to durable storage (hybrid); no-op elsewhere."""

    def close(self, *, flush: bool = True) -> None:
        """Disconnect; ``flush=False`` leaves buffered acks where they are (hybrid: in Redis, for the
        flush bound or the mirror to carry), which is what a short-lived run process wants."""
        if flush:
            self.flush()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointTransaction(Protocol):
    """Business writes (on ``connection``) and checkpoint saves committed together, or not at all."""

    connection: Any

    def save(self, key: CheckpointKey, sequence: str, *, lease: Lease | None = None,
             context: SaveContext | None = None) -> SaveResult: ...


@runtime_checkable
class TransactionalStore(Protocol):
    """A store whose saves can join the caller's database transaction (Postgres): a transactional
    handler's writes and the checkpoint then commit atomically."""

    def transaction(self) -> AbstractContextManager[CheckpointTransaction]: ...
