"""Bounded lock waits for a sink transaction: a frozen worker must not stall its successor for ever.

A worker stopped inside its handler (SIGSTOP, a paused VM) keeps its transaction open and the rows it
inserted locked. The run that takes the shard over inserts the same rows and, without a bound, waits
on that lock for as long as the freeze lasts; it cannot renew its lease meanwhile (renewal is between
batches), so it looks dead too. Two settings, both derived from the consumer's ``lease_duration_s`` (L)
and set with ``SET LOCAL`` on the sink's transaction only:

* ``lock_timeout`` = L/4: a lock wait ends (``LockWaitTimeoutError``, retryable, naming the holder)
  well inside the third of the lease after which a live run renews it, so even the insert and the
  checkpoint save both waiting (L/2) leave the lease valid: a run waiting on a lock is never mistaken
  for a dead one.
* ``idle_in_transaction_session_timeout`` = L: the server ends a session idle inside such a transaction
  for a whole lease. A batch must fit in the lease anyway (its fenced save is refused after that), so
  this never aborts a transaction that could still commit, and it frees a frozen holder's locks about
  one lease after the freeze: the successor's next attempt goes through.

``application_name`` is set (also ``SET LOCAL``) to the consumer and run, so that the holder a waiter
names is recognisable in ``pg_stat_activity``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import errors as pg_errors

from durability_pipelines.checkpoints.errors import StoreUnavailableError

__all__ = [
    "Blocker",
    "LockWaitBounds",
    "LockWaitTimeoutError",
    "bound_lock_waits",
    "lock_wait_error",
]

LOCK_TIMEOUT_SHARE = 0.25  # of the lease: < 1/3, the renewal interval
IDLE_TIMEOUT_SHARE = 1.0  # of the lease: a batch idle that long could not commit a fenced save anyway
MAX_BLOCKERS = 3
_RELATION = re.compile(r'relation "([^"]+)"')


@dataclass(frozen=True)
class LockWaitBounds:
    lock_timeout_ms: int
    idle_in_transaction_ms: int

    @classmethod
    def for_lease(cls, lease_duration_s: float) -> LockWaitBounds:
        return cls(max(1, int(lease_duration_s * LOCK_TIMEOUT_SHARE * 1000)),
                   max(1, int(lease_duration_s * IDLE_TIMEOUT_SHARE * 1000)))


def bound_lock_waits(conn: psycopg.Connection, bounds: LockWaitBounds, *, application_name: str | None = None) -> None:
    """Set the bounds (and the name) for the transaction ``conn`` is in (``SET LOCAL``: nothing outlives it)."""
    conn.execute(
        "SELECT set_config('lock_timeout', %s, true), set_config('idle_in_transaction_session_timeout', %s, true)",
        (f"{bounds.lock_timeout_ms}ms", f"{bounds.idle_in_transaction_ms}ms"))
    if application_name:
        conn.execute("SELECT set_config('application_name', %s, true)", (application_name[:63],))


@dataclass(frozen=True)
class Blocker:
    """A session that probably held the lock: it has written (it has an xid) and was open before the wait."""

    pid: int
    application_name: str
    state: str | None
    xact_start: datetime | None
    xid: str | None

    def describe(self) -> str:
        since = self.xact_start.isoformat(timespec="seconds") if self.xact_start else "?"
        app = f" ({self.application_name})" if self.application_name else ""
        return f"backend pid {self.pid}{app}, {self.state or '?'}, transaction {self.xid or '?'} open since {since}"


class LockWaitTimeoutError(StoreUnavailableError):
    """A sink statement waited ``lock_timeout`` for a row another transaction holds: retried, never dead-lettered.

    A ``StoreUnavailableError``: nothing was committed and the data is fine. The drain loop retries the batch
    in place (``consumer/drain.MAX_LOCK_WAITS``), then leaves it to the op's RetryPolicy as after an outage.
    """

    def __init__(self, message: str, blockers: tuple[Blocker, ...] = ()) -> None:
        super().__init__(message)
        self.blockers = blockers


def _blockers(conn: psycopg.Connection, relation: str | None, waited_ms: int) -> tuple[Blocker, ...]:
    """Sessions that have written and were open before the wait began, holding a lock on ``relation``
    when the error named one: one cheap query, after the fact (the wait itself is over)."""
    rows = conn.execute(
        """SELECT a.pid, a.application_name, a.state, a.xact_start, a.backend_xid::text
           FROM pg_stat_activity a
           WHERE a.pid <> pg_backend_pid() AND a.backend_xid IS NOT NULL
             AND a.xact_start <= clock_timestamp() - make_interval(secs => %s)
             AND (%s::text IS NULL OR EXISTS (
                   SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.granted
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND l.relation = to_regclass(quote_ident(%s::text))))
           ORDER BY a.xact_start LIMIT %s""",
        (waited_ms / 1000, relation, relation, MAX_BLOCKERS),
    ).fetchall()
    return tuple(Blocker(r[0], r[1] or "", r[2], r[3], r[4]) for r in rows)


def lock_wait_error(conn: psycopg.Connection, exc: pg_errors.LockNotAvailable, *, what: str,
                    waited_ms: int = 0) -> LockWaitTimeoutError:
    """The error for a lock wait that timed out, naming the likely holder(s). ``conn`` must be usable
    again (the failed transaction rolled back); if it is not, the error says the holder is unknown."""
    context = (exc.diag.context or "") + " " + (exc.diag.message_primary or "")
    match = _RELATION.search(context)
    relation = match.group(1) if match else None
    try:
        blockers = _blockers(conn, relation, waited_ms) or (_blockers(conn, None, waited_ms) if relation else ())
    except psycopg.Error:
        blockers = ()
    on = f" on {relation}" if relation else ""
    waited = f" within lock_timeout ({waited_ms / 1000:g} s)" if waited_ms else " within lock_timeout"
    held = ("; held by " + "; ".join(b.describe() for b in blockers)) if blockers else (
        "; the holder could not be identified (look in pg_locks / pg_stat_activity)")
    return LockWaitTimeoutError(
        f"{what}: a lock{on} was not granted{waited}{held}. Nothing was committed; the batch is retried from the "
        "acked checkpoint. A worker of this project frozen inside its transaction (SIGSTOP, a paused VM) is ended by "
        "the server after idle_in_transaction_session_timeout (one lease_duration_s), after which the retry goes "
        "through; another application's transaction must be ended by its owner (or pg_terminate_backend(<pid>)).",
        blockers,
    )
