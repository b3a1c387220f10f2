"""Postgres checkpoints: the source of truth, auditable, transactional.

Uses the original ``checkpoints`` table unchanged, plus ``checkpoint_history``
and ``checkpoint_leases`` (see ``schema.sql``).  A save is one round trip: a
call of ``durability_save_checkpoint`` that applies the lease check, the
monotonic guard and the history append in one transaction.  Every value is a
bound parameter; SQL is never built from user strings.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors as pg_errors

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
from durability_pipelines.checkpoints.errors import (
    InvalidSequenceError,
    StoreRefusedError,
    StoreUnavailableError,
    lease_lost,
)
from durability_pipelines.checkpoints.external import record_external_on
from durability_pipelines.checkpoints.keys import KEY_CACHE_MAX, CheckpointKey, LeaseKey
from durability_pipelines.checkpoints.lock_waits import lock_wait_error
from durability_pipelines.checkpoints.ordering import (
    MAX_DIGITS,
    SHARD_END,
    as_number,
    is_number,
    max_sequence,
    normalize_sequence,
)
from durability_pipelines.checkpoints.sentinels import effective, is_sentinel

log = logging.getLogger(__name__)
SCHEMA_SQL = (resources.files("durability_pipelines.checkpoints") / "schema.sql").read_text()
# 2: durability_sequence_rank became an inlinable SQL function; 3: leaner save function;
# 4: a fenced save also needs an unexpired lease; durability_sequence_rank_or_null
# 5: sentinels in checkpoint_sentinels, never in checkpoints (see sentinels.py); 6: lease hand-off columns;
# 7: numbers of up to 129 digits (Kinesis sequence numbers), SHARD_END ranks 1e129
SCHEMA_VERSION = 7
_MIGRATION_LOCK = 72_190_311  # pg_advisory_xact_lock id: one migrator at a time

_SAVE_SQL = "SELECT outcome, previous, lease_owner, lease_epoch FROM durability_save_checkpoint(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
_SAVE_MANY_SQL = """
SELECT r.outcome, r.previous, r.lease_owner, r.lease_epoch
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[],
            %s::text[], %s::text[]) WITH ORDINALITY AS k(a, s, g, c, sh, seq, w, e, run, reason, ord)
CROSS JOIN LATERAL durability_save_checkpoint(k.a, k.s, k.g, k.c, k.sh, k.seq, k.w, k.e, k.run, k.reason) AS r
ORDER BY k.ord
"""
# A position is the shared number and the sentinel beside it (sentinels.effective decides).
_LOAD_MANY_SQL = """
SELECT k.a, k.s, k.g, k.co, k.sh, c.sequence, x.sentinel
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) AS k(a, s, g, co, sh)
LEFT JOIN checkpoints c
  ON c.adapter = k.a AND c.stream = k.s AND c.grp = k.g AND c.consumer = k.co AND c.shard = k.sh
LEFT JOIN checkpoint_sentinels x
  ON x.adapter = k.a AND x.stream = k.s AND x.grp = k.g AND x.consumer = k.co AND x.shard = k.sh
WHERE c.sequence IS NOT NULL OR x.sentinel IS NOT NULL
"""
_SENTINELS_SQL = """
SELECT x.adapter, x.stream, x.grp, x.consumer, x.shard, x.sentinel
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) AS k(a, s, g, co, sh)
JOIN checkpoint_sentinels x
  ON x.adapter = k.a AND x.stream = k.s AND x.grp = k.g AND x.consumer = k.co AND x.shard = k.sh
"""
_LOAD_SQL = """
SELECT (SELECT sequence FROM checkpoints WHERE {w}), (SELECT sentinel FROM checkpoint_sentinels WHERE {w})
"""
_KEY_WHERE = "adapter = %s AND stream = %s AND grp = %s AND consumer = %s AND shard = %s"
#: A save that first looks at the shared row, in the same statement (one round trip, as a plain save): the row
#: locked, and the save skipped when the row is below the number this store last left there (the last parameter;
#: NULL: no such number). ``OFFSET 0`` keeps the subquery from being pulled up into the join, so its filter, which
#: references only the row found, is a one-time filter evaluated before the save function runs: the function is
#: never called when it is false (``EXPLAIN`` shows a ``Result`` with ``One-Time Filter`` above the function scan;
#: ``tests/faults/test_foreign_rewind.py`` holds it to that).
_GUARDED_SAVE_SQL = f"""
WITH found AS MATERIALIZED (SELECT (SELECT sequence FROM checkpoints WHERE {_KEY_WHERE} FOR UPDATE) AS seq)
SELECT f.seq, r.outcome, r.previous, r.lease_owner, r.lease_epoch
FROM found f LEFT JOIN LATERAL (
  SELECT * FROM durability_save_checkpoint(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
  WHERE NOT coalesce(durability_sequence_rank_or_null(f.seq) < durability_sequence_rank_or_null(%s), false)
  OFFSET 0
) r ON true
"""
_LEASE_WHERE = "adapter = %s AND stream = %s AND grp = %s AND shard = %s"
_LEASE_WHERE_NAMED = "adapter = %(adapter)s AND stream = %(stream)s AND grp = %(grp)s AND shard = %(shard)s"
#: The update of a lease someone takes (acquire, or a request that finds it free): a takeover bumps the
#: epoch and drops the old epoch's pending request and hand-off record; re-taking a live lease of ours keeps both.
_TAKE_SET = """
  epoch = CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > NOW() THEN l.epoch ELSE l.epoch + 1 END,
  requested_by = CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > NOW() THEN l.requested_by ELSE '' END,
  requested_at = CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > NOW() THEN l.requested_at END,
  handed_from = CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > NOW() THEN l.handed_from ELSE '' END,
  handed_at = CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > NOW() THEN l.handed_at END,
  owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, updated_at = NOW()"""
_LEASE_COLS = ("adapter, stream, grp, shard, owner, epoch, expires_at, requested_by, requested_at, handed_from, "
               "handed_at")


def mask_conninfo(conninfo: str) -> str:
    """The connection target without credentials, for error messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "postgres (unparseable connection string)"
    hosts = [h.strip() for h in str(info.get("host") or info.get("hostaddr") or "localhost").split(",")]
    ports = [p.strip() for p in str(info.get("port") or "5432").split(",")]
    ports = ports * len(hosts) if len(ports) == 1 else ports
    where = ",".join(f"{h}:{ports[i] if i < len(ports) and ports[i] else 5432}" for i, h in enumerate(hosts))
    return f"postgres at {where}/{info.get('dbname') or ''}"


def connection_is_stale(exc: BaseException) -> bool:
    """True if ``exc`` means this connection is useless and a new one may work: drop it and reconnect.

    That is the server gone (``OperationalError``: refused, reset, shut down by a failover), the
    connection closed under us (``InterfaceError``), or a connection that stayed on a node which is now
    (or always was) a standby: every write there fails with "cannot execute ... in a read-only
    transaction" until a reconnect lets ``target_session_attrs=read-write`` find the new primary.
    """
    if isinstance(exc, psycopg.InterfaceError | pg_errors.ReadOnlySqlTransaction
                  | pg_errors.IdleInTransactionSessionTimeout):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    # A lost connection has no SQLSTATE (libpq's own error) or one of class 08 / a shutdown; a deadlock,
    # a serialization failure or a statement timeout are OperationalErrors too, but the connection is fine.
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _SHUTDOWN_STATES


_SHUTDOWN_STATES = frozenset({"57P01", "57P02", "57P03"})  # admin shutdown, crash shutdown, cannot connect now


def _lease_params(key: LeaseKey) -> tuple[str, str, str, str]:
    return (key.adapter, key.stream, key.group, key.shard_column)


def _lease_named(key: LeaseKey) -> dict[str, str]:
    return dict(zip(("adapter", "stream", "grp", "shard"), _lease_params(key), strict=True))


def _lease_from_row(row: Sequence[Any]) -> Lease:
    adapter, stream, grp, shard, owner, epoch, expires, requested_by, requested_at, handed_from, handed_at = row
    return Lease(LeaseKey(adapter, stream, grp, shard or None), owner, int(epoch), expires,
                 requested_by or "", requested_at, handed_from or "", handed_at)


def _refusal(exc: psycopg.OperationalError, conninfo: str) -> str | None:
    """The CLI's message when the server refused this connection (credentials, database), else None."""
    from durability_pipelines.services.checks import refusal_message

    try:
        return refusal_message(exc, conninfo, kind="postgres", source="DURABILITY_POSTGRES_URL")
    except Exception:  # noqa: BLE001 - a conninfo the URL helpers cannot read: say it plainly
        return None


class PostgresConnection:
    """One lazily (re)connected psycopg connection shared by a store, with a lock.

    Kept deliberately simple: a checkpoint store does a handful of calls per
    batch, so pooling buys nothing; reconnecting after an outage matters more.
    """

    def __init__(self, conninfo: str, *, connect_timeout: int = 5) -> None:
        self.conninfo = conninfo
        self.connect_timeout = connect_timeout
        self.lock = threading.RLock()
        self._conn: psycopg.Connection | None = None

    @property
    def target(self) -> str:
        return mask_conninfo(self.conninfo)

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=self.connect_timeout)
        return self._conn

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """The connection, with outages mapped to ``StoreUnavailableError``."""
        with self.lock:
            try:
                yield self._connect()
            except pg_errors.ReadOnlySqlTransaction:
                self.reset()  # the next call reconnects; target_session_attrs=read-write finds the primary
                raise StoreUnavailableError(
                    f"{self.target} answered as a read-only node (a standby, or a primary demoted by a failover); "
                    "nothing was written and the connection was dropped, so a retry reconnects. If this repeats, "
                    "add target_session_attrs=read-write to DURABILITY_POSTGRES_URL so that libpq only connects "
                    "to the primary."
                ) from None
            except pg_errors.IdleInTransactionSessionTimeout:
                self.reset()
                raise StoreUnavailableError(
                    f"{self.target} ended this session: its transaction stayed idle longer than "
                    "idle_in_transaction_session_timeout (one lease: this worker was frozen or stalled inside a "
                    "batch). Nothing of it was committed; a retry reconnects, and its lease has most likely been "
                    "taken over."
                ) from None
            except pg_errors.LockNotAvailable as exc:  # lock_timeout: the connection is fine, a holder is not
                raise lock_wait_error(self._connect(), exc, what=f"a transaction on {self.target}") from None
            except psycopg.OperationalError as exc:
                self.reset()
                refused = _refusal(exc, self.conninfo)
                if refused is not None:  # credentials or database: the server is up, a retry will not help
                    raise StoreRefusedError(refused) from None
                raise StoreUnavailableError(
                    f"cannot reach {self.target}: {type(exc).__name__}. Check that Postgres is running and "
                    "DURABILITY_POSTGRES_URL is right; the transaction was rolled back."
                ) from None
            except psycopg.InterfaceError as exc:
                self.reset()
                raise StoreUnavailableError(f"connection to {self.target} was lost ({exc}); retry") from None

    def reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already broken
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        with self.lock:
            self.reset()


def migrate(db: PostgresConnection) -> None:
    """Create or upgrade the schema; idempotent and safe to run concurrently."""
    with db.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(SCHEMA_SQL)
        conn.execute(
            "INSERT INTO durability_schema_version (component, version) VALUES ('checkpoints', %s) "
            "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, applied_at = NOW()",
            (SCHEMA_VERSION,),
        )


_ENSURED: set[tuple[str, str]] = set()


def ensure_schema(db: PostgresConnection, component: str, version: int, apply: Callable[[PostgresConnection], None]) -> None:
    """Run ``apply`` only when ``component`` is missing or older than ``version``.

    Checked once per process and database: a sensor tick or a run then costs
    one SELECT, not DDL (and writes nothing when the schema is current).
    """
    marker = (db.conninfo, component)
    if marker in _ENSURED:
        return
    with db.connection() as conn:
        exists = conn.execute("SELECT to_regclass('durability_schema_version') IS NOT NULL").fetchone()[0]
        current = None
        if exists:
            row = conn.execute(
                "SELECT version FROM durability_schema_version WHERE component = %s", (component,)
            ).fetchone()
            current = row[0] if row else None
    if current is None or current < version:
        apply(db)
    _ENSURED.add(marker)


class PostgresLeaseManager(LeaseManager):
    def __init__(self, db: PostgresConnection) -> None:
        self._db = db

    def acquire(self, key: LeaseKey, owner: str, duration_s: float = 60.0, *, steal: bool = False) -> Lease | None:
        with self._db.connection() as conn:
            row = conn.execute(
                f"""INSERT INTO checkpoint_leases AS l (adapter, stream, grp, shard, owner, epoch, expires_at)
                VALUES (%s, %s, %s, %s, %s, 1, NOW() + make_interval(secs => %s))
                ON CONFLICT (adapter, stream, grp, shard) DO UPDATE SET {_TAKE_SET}
                WHERE l.owner = EXCLUDED.owner OR l.owner = '' OR l.expires_at <= NOW() OR %s
                RETURNING {_LEASE_COLS}""",
                (*_lease_params(key), owner, duration_s, steal),
            ).fetchone()
        return _lease_from_row(row) if row else None

    def request_handoff(self, key: LeaseKey, requester: str, duration_s: float = 60.0) -> Lease:
        with self._db.connection() as conn, conn.transaction():
            # Free, expired or ours: take it, as acquire does.
            row = conn.execute(
                f"""INSERT INTO checkpoint_leases AS l (adapter, stream, grp, shard, owner, epoch, expires_at)
                VALUES (%s, %s, %s, %s, %s, 1, NOW() + make_interval(secs => %s))
                ON CONFLICT (adapter, stream, grp, shard) DO UPDATE SET {_TAKE_SET}
                WHERE l.owner = EXCLUDED.owner OR l.owner = '' OR l.expires_at <= NOW()
                RETURNING {_LEASE_COLS}""",
                (*_lease_params(key), requester, duration_s),
            ).fetchone()
            if row is None:  # held by another worker: ask, unless another successor's request is pending
                row = conn.execute(
                    f"""UPDATE checkpoint_leases SET
                      requested_by = CASE WHEN requested_by IN ('', %(me)s)
                                            OR requested_at + make_interval(secs => %(fresh)s) <= NOW()
                                          THEN %(me)s ELSE requested_by END,
                      requested_at = CASE WHEN requested_by IN ('', %(me)s)
                                            OR requested_at + make_interval(secs => %(fresh)s) <= NOW()
                                          THEN NOW() ELSE requested_at END
                    WHERE {_LEASE_WHERE_NAMED} RETURNING {_LEASE_COLS}""",
                    {"me": requester, "fresh": HANDOFF_REQUEST_FRESH_S, **_lease_named(key)},
                ).fetchone()
        return _lease_from_row(row)

    def hand_over(self, lease: Lease, duration_s: float = 60.0) -> Lease | None:
        with self._db.connection() as conn:
            row = conn.execute(
                f"""UPDATE checkpoint_leases SET owner = requested_by, epoch = epoch + 1,
                  expires_at = NOW() + make_interval(secs => %s), updated_at = NOW(),
                  requested_by = '', requested_at = NULL, handed_from = owner, handed_at = NOW()
                WHERE {_LEASE_WHERE} AND owner = %s AND epoch = %s AND requested_by <> ''
                  AND requested_at + make_interval(secs => %s) > NOW()
                RETURNING {_LEASE_COLS}""",
                (duration_s, *_lease_params(lease.key), lease.owner, lease.epoch, HANDOFF_REQUEST_FRESH_S),
            ).fetchone()
        return _lease_from_row(row) if row else None

    def withdraw_request(self, key: LeaseKey, requester: str) -> Lease | None:
        with self._db.connection() as conn:
            conn.execute(
                f"""UPDATE checkpoint_leases SET requested_by = '', requested_at = NULL
                WHERE {_LEASE_WHERE} AND requested_by = %s""", (*_lease_params(key), requester))
        return self.get(key)

    def renew(self, lease: Lease, duration_s: float = 60.0) -> Lease:
        with self._db.connection() as conn:
            row = conn.execute(
                f"""UPDATE checkpoint_leases SET expires_at = NOW() + make_interval(secs => %s), updated_at = NOW()
                WHERE {_LEASE_WHERE} AND owner = %s AND epoch = %s RETURNING {_LEASE_COLS}""",
                (duration_s, *_lease_params(lease.key), lease.owner, lease.epoch),
            ).fetchone()
        if row is None:
            now = self.get(lease.key)
            raise lease_lost(lease, now.owner if now else None, now.epoch if now else None)
        return _lease_from_row(row)

    def release(self, lease: Lease) -> bool:
        with self._db.connection() as conn:
            row = conn.execute(
                f"""UPDATE checkpoint_leases SET owner = '', expires_at = NOW(), updated_at = NOW()
                WHERE {_LEASE_WHERE} AND owner = %s AND epoch = %s RETURNING epoch""",
                (*_lease_params(lease.key), lease.owner, lease.epoch),
            ).fetchone()
        return row is not None

    def remaining_s(self, lease: Lease) -> float | None:
        """Seconds ``lease`` is still granted for (by this server's clock), or None if lost or expired."""
        with self._db.connection() as conn:
            row = conn.execute(
                f"""SELECT EXTRACT(EPOCH FROM (expires_at - clock_timestamp()))::float8 FROM checkpoint_leases
                WHERE {_LEASE_WHERE} AND owner = %s AND epoch = %s AND expires_at > clock_timestamp()""",
                (*_lease_params(lease.key), lease.owner, lease.epoch),
            ).fetchone()
        return float(row[0]) if row else None

    def get(self, key: LeaseKey) -> Lease | None:
        with self._db.connection() as conn:
            row = conn.execute(
                f"SELECT {_LEASE_COLS} FROM checkpoint_leases WHERE {_LEASE_WHERE}", _lease_params(key)
            ).fetchone()
        return _lease_from_row(row) if row else None

    def list(self) -> list[Lease]:
        with self._db.connection() as conn:
            rows = conn.execute(
                f"SELECT {_LEASE_COLS} FROM checkpoint_leases ORDER BY adapter, stream, grp, shard"
            ).fetchall()
        return [_lease_from_row(r) for r in rows]


def _save_params(key: CheckpointKey, sequence: str, lease: Lease | None, ctx: SaveContext) -> tuple:
    return (
        key.adapter, key.stream, key.group, key.consumer, key.shard_column, sequence,
        lease.owner if lease else ctx.writer, lease.epoch if lease else None, ctx.run_id, ctx.reason,
    )


def _result(key: CheckpointKey, sequence: str, lease: Lease | None, row: Sequence[Any]) -> SaveResult:
    outcome, previous, held_by, held_epoch = row
    if outcome == "lease_lost":
        raise lease_lost(lease, held_by, held_epoch)  # type: ignore[arg-type]
    result = SaveOutcome(outcome)
    return SaveResult(key, result, previous, sequence if result is SaveOutcome.ADVANCED else previous)


@contextmanager
def _invalid_sequence(key_desc: str) -> Iterator[None]:
    try:
        yield
    except pg_errors.InvalidTextRepresentation as exc:
        raise InvalidSequenceError(
            f"Postgres checkpoint {key_desc} holds an invalid sequence ({exc.diag.message_primary}); "
            "nothing was written. Fix the row with `durability-pipelines checkpoints set ... --force`.",
            key=key_desc,
        ) from None


@dataclass
class PostgresCheckpointTransaction:
    """Business writes and checkpoint saves committed together (or not at all).

    Obtained from ``PostgresCheckpointStore.transaction()``; use ``connection``
    for your own statements and ``save`` for checkpoints.
    """

    connection: psycopg.Connection
    store: PostgresCheckpointStore

    def save(self, key: CheckpointKey, sequence: str, *, lease: Lease | None = None,
             context: SaveContext | None = None) -> SaveResult:
        return self.store._save_on(self.connection, key, sequence, lease, context)


class PostgresCheckpointStore(CheckpointStore):
    backend = "postgres"

    def __init__(self, conninfo: str, *, migrate_schema: bool = True, connect_timeout: int = 5) -> None:
        self.db = PostgresConnection(conninfo, connect_timeout=connect_timeout)
        self._leases = PostgresLeaseManager(self.db)
        #: key -> the number this store's last save left in the shared row: a row found below it was moved back
        #: by another worker (``SaveOutcome.REWOUND``)
        self._left: dict[CheckpointKey, str] = {}
        if migrate_schema:
            ensure_schema(self.db, "checkpoints", SCHEMA_VERSION, migrate)

    @property
    def leases(self) -> PostgresLeaseManager:
        return self._leases

    def migrate(self) -> None:
        migrate(self.db)

    def _parse(self, key: CheckpointKey, value: str | None) -> str | None:
        if value is None:
            return None
        return normalize_sequence(value, key=f"postgres checkpoints row {key.redis_key}")

    def load(self, key: CheckpointKey) -> str | None:
        params = tuple(key.as_row().values())
        with self.db.connection() as conn:
            shared, sentinel = conn.execute(_LOAD_SQL.format(w=_KEY_WHERE), params + params).fetchone()
        return self._parse(key, effective(shared, sentinel))

    def load_many(self, keys: Iterable[CheckpointKey]) -> dict[CheckpointKey, str | None]:
        keys = list(keys)
        if not keys:
            return {}
        cols = list(zip(*(k.sort_tuple for k in keys), strict=True))
        with self.db.connection() as conn:
            rows = conn.execute(_LOAD_MANY_SQL, [list(c) for c in cols]).fetchall()
        found = {CheckpointKey.from_row(*r[:5]): effective(r[5], r[6]) for r in rows}
        return {k: self._parse(k, found.get(k)) for k in keys}

    def load_raw_many(self, keys: list[CheckpointKey]) -> list[Any]:
        if not keys:
            return []
        cols = list(zip(*(k.sort_tuple for k in keys), strict=True))
        with self.db.connection() as conn:
            rows = conn.execute(_LOAD_MANY_SQL, [list(c) for c in cols]).fetchall()
        found = {CheckpointKey.from_row(*r[:5]): effective(r[5], r[6]) for r in rows}
        return [found.get(k) for k in keys]

    def raw_rows(self) -> list[tuple[CheckpointKey, Any, datetime | None]]:
        """Every checkpoint as (key, raw position, ts), a sentinel included (the view joins both tables)."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT adapter, stream, grp, consumer, shard, sequence, ts FROM durability_checkpoint_positions"
            ).fetchall()
        out = []
        for r in rows:
            try:
                out.append((CheckpointKey.from_row(*r[:5]), r[5], r[6]))
            except ValueError:
                continue  # a row another worker wrote with a component we cannot express
        return out

    def keys(self) -> list[CheckpointKey]:
        return sorted(k for k, _, _ in self.raw_rows())

    def load_sentinels(self, keys: Sequence[CheckpointKey]) -> dict[CheckpointKey, str]:
        """The ``checkpoint_sentinels`` value of each of ``keys`` that has one (whoever wrote it)."""
        if not keys:
            return {}
        cols = [list(c) for c in zip(*(k.sort_tuple for k in keys), strict=True)]
        with self.db.connection() as conn:
            rows = conn.execute(_SENTINELS_SQL, cols).fetchall()
        return {CheckpointKey.from_row(*r[:5]): r[5] for r in rows if is_sentinel(r[5])}

    def _save_on(self, conn: psycopg.Connection, key: CheckpointKey, sequence: str, lease: Lease | None,
                 context: SaveContext | None) -> SaveResult:
        sequence = normalize_sequence(sequence, key=key.redis_key)
        ctx = context or SaveContext()
        left = self._left.get(key)
        with _invalid_sequence(key.redis_key):
            found, *row = conn.execute(_GUARDED_SAVE_SQL, (*key.as_row().values(),
                                                           *_save_params(key, sequence, lease, ctx), left)).fetchone()
        if row[0] is None:  # the guard skipped the save: the row is below this store's last write
            return self._moved_back(conn, SaveResult(key, SaveOutcome.REWOUND, as_number(found), as_number(found),
                                                     left), ctx)
        result = _result(key, sequence, lease, row)
        if result.outcome in (SaveOutcome.ADVANCED, SaveOutcome.UNCHANGED) and is_number(result.current):
            if len(self._left) >= KEY_CACHE_MAX:
                self._left.clear()
            self._left[key] = result.current  # what this save left in the shared row
        else:
            self._left.pop(key, None)
        return result

    def _moved_back(self, conn: psycopg.Connection, result: SaveResult, ctx: SaveContext) -> SaveResult:
        """The save found the shared row below this store's last write to it: another worker moved it back (the
        plain UPSERT of the original pattern). Recorded in the history as a foreign move and honoured, as the Redis
        store does (``SaveOutcome.REWOUND``): nothing written over it."""
        log.warning(
            "checkpoint %s: another worker moved its Postgres row back from %s (this store's last write) to %s. "
            "Recorded as a foreign move and honoured: nothing was written over it, and a consumer with an "
            "idempotent sink goes on from %s (one whose sink is not stops the shard instead). If that write was a "
            "mistake, `durability-pipelines checkpoints repair %s` puts the recorded position back.",
            result.key.redis_key, result.moved_back_from, result.current, result.current, result.key.redis_key)
        record_external_on(conn, result.key, result.moved_back_from or "", result.current, store="postgres",
                           run_id=ctx.run_id)
        self._left.pop(result.key, None)
        return result

    def save(self, key: CheckpointKey, sequence: str, *, lease: Lease | None = None,
             context: SaveContext | None = None) -> SaveResult:
        with self.db.connection() as conn:
            return self._save_on(conn, key, sequence, lease, context)

    def save_many(self, items: Sequence[tuple[CheckpointKey, str]], *, context: SaveContext | None = None,
                  lease_for: dict[CheckpointKey, Lease] | None = None) -> list[SaveResult]:
        """Save many checkpoints in one statement and one transaction (hybrid flush, mirror).

        Returns one result per distinct key, in the order the keys were first given.
        Keys are locked in sorted order so concurrent batch writers never deadlock.
        A lease lost on any key raises ``LeaseLostError`` and rolls the whole batch back.
        """
        if not items:
            return []
        ctx = context or SaveContext()
        lease_for = lease_for or {}
        latest: dict[CheckpointKey, str] = {}
        for k, s in items:  # one row per key: the greatest value given for it
            latest[k] = max_sequence(latest.get(k), normalize_sequence(s, key=k.redis_key))  # type: ignore[assignment]
        ordered = sorted(latest.items(), key=lambda kv: kv[0])
        params = [_save_params(k, s, lease_for.get(k), ctx) for k, s in ordered]
        cols = [list(c) for c in zip(*params, strict=True)]
        with self.db.connection() as conn, _invalid_sequence("in batch"), conn.transaction():
            rows = conn.execute(_SAVE_MANY_SQL, cols).fetchall()
            results = {k: _result(k, s, lease_for.get(k), row) for (k, s), row in zip(ordered, rows, strict=True)}
        return [results[k] for k in dict.fromkeys(k for k, _ in items)]

    @contextmanager
    def transaction(self) -> Iterator[PostgresCheckpointTransaction]:
        """Commit the caller's writes and checkpoint saves atomically."""
        with self.db.connection() as conn, conn.transaction():
            yield PostgresCheckpointTransaction(conn, self)

    def history(self, key: CheckpointKey, limit: int = 100) -> list[HistoryEntry]:
        with self.db.connection() as conn:
            rows = conn.execute(
                f"""SELECT previous_sequence, new_sequence, writer, lease_epoch, run_id, ts, reason
                FROM checkpoint_history WHERE {_KEY_WHERE} ORDER BY id DESC LIMIT %s""",
                (*key.as_row().values(), limit),
            ).fetchall()
        return [HistoryEntry(key, *r[:6], reason=r[6]) for r in rows]

    def force_set(self, key: CheckpointKey, sequence: str, *, context: SaveContext) -> ForceSetResult:
        """Unconditional operator write plus a ``checkpoint_history`` row, in one transaction.

        The row is locked first so that the recorded previous value is the one replaced.
        """
        self._left.pop(key, None)  # this store's own move back: the next save must not take it for a foreign one
        sequence = normalize_sequence(sequence, key=key.redis_key)
        ctx = require_force_context(context)
        params = tuple(key.as_row().values())
        with self.db.connection() as conn, conn.transaction():
            row = conn.execute(
                f"SELECT sequence FROM checkpoints WHERE {_KEY_WHERE} FOR UPDATE", params
            ).fetchone()
            shared = row[0] if row else None
            sent = conn.execute(
                f"SELECT sentinel FROM checkpoint_sentinels WHERE {_KEY_WHERE} FOR UPDATE", params
            ).fetchone()
            previous = effective(shared, sent[0] if sent else None)
            if is_sentinel(shared) and not is_sentinel(previous):
                previous = shared  # an older version's sentinel in the shared row, shown as found
            if is_sentinel(sequence):
                conn.execute(
                    """INSERT INTO checkpoint_sentinels (adapter, stream, grp, consumer, shard, sentinel, ts)
                    VALUES (%s, %s, %s, %s, %s, %s, NOW()) ON CONFLICT (adapter, stream, grp, consumer, shard)
                    DO UPDATE SET sentinel = EXCLUDED.sentinel, ts = NOW()""",
                    (*params, sequence),
                )
                # A closed shard keeps its last number for other workers; a rewind to TRIM_HORIZON /
                # LATEST (or an older version's sentinel in the row) leaves no number behind.
                if sequence != SHARD_END or shared is None or not (shared.isdigit() and len(shared) <= MAX_DIGITS):
                    conn.execute(f"DELETE FROM checkpoints WHERE {_KEY_WHERE}", params)
            else:
                conn.execute(f"DELETE FROM checkpoint_sentinels WHERE {_KEY_WHERE}", params)
                conn.execute(
                    """INSERT INTO checkpoints (adapter, stream, grp, consumer, shard, sequence, ts)
                    VALUES (%s, %s, %s, %s, %s, %s, NOW())
                    ON CONFLICT (adapter, stream, grp, consumer, shard)
                    DO UPDATE SET sequence = EXCLUDED.sequence, ts = NOW()""",
                    (*params, sequence),
                )
            conn.execute(
                """INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence,
                new_sequence, writer, lease_epoch, run_id, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, NULL, %s, %s)""",
                (*params, previous, sequence, ctx.writer, ctx.run_id, ctx.reason),
            )
        return ForceSetResult(key, previous, sequence, {self.backend: previous})

    def history_at(self, key: CheckpointKey, at: datetime) -> HistoryEntry | None:
        """The last history entry written at or before ``at`` (for rewinding to a point in time)."""
        with self.db.connection() as conn:
            row = conn.execute(
                f"""SELECT previous_sequence, new_sequence, writer, lease_epoch, run_id, ts, reason
                FROM checkpoint_history WHERE {_KEY_WHERE} AND ts <= %s ORDER BY ts DESC, id DESC LIMIT 1""",
                (*key.as_row().values(), at),
            ).fetchone()
        return HistoryEntry(key, *row[:6], reason=row[6]) if row else None

    def close(self, *, flush: bool = True) -> None:
        self.db.close()
