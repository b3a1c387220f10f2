"""Durable change feed for Supabase (or any) Postgres: a trigger-filled change log read by position.

Supabase Realtime's Postgres Changes have no position and no replay: whatever commits while a client
is disconnected is gone. A Supabase project is Postgres, so durable consumption reads an append-only
change log instead (see ``docs/supabase.md``):

* ``install_change_feed(conn, "orders")`` creates the log, its indexes, a trigger function and an
  ``AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW`` trigger on the table. Idempotent and safe to run
  concurrently (advisory lock).
* ``ChangeFeedReader.read(after, limit)`` returns the rows after a position, oldest first.

Why positions are ``(txid, id)`` and not ``id`` alone
-----------------------------------------------------
Identity ids are handed out at INSERT time, not at commit, so a transaction that commits late can
hold a *lower* id than rows already read. Guarding each row with ``txid < pg_snapshot_xmin(...)`` is
not enough with an id cursor: a transaction B that took its xid *before* a still-running A, but wrote
its row *after* A did, is below the horizon while A's lower id is invisible; reading B's row moves an
id cursor past A's row for good. Ordering by ``(txid, id)`` closes that hole: every transaction with
``txid < xmin`` has finished, so no row can ever appear below the horizon again, and a cursor below
it never passes a change that commits later. A position is one integer (it is stored as a checkpoint
sequence): ``txid * 10**19 + id`` (at most 39 digits; the last 19 digits are the change-log id).

Consequences worth knowing: changes are delivered grouped by transaction in xid order (roughly
transaction start order, not commit order); one long-running writing transaction anywhere in the
cluster holds the horizon back (the feed pauses, nothing is lost); TRUNCATE of a source table is not
captured (row triggers do not fire for it).

Rows removed from the log by anything but ``purge_acked`` (a DELETE by age, a TRUNCATE) are
recorded by statement triggers in ``<log>_removals``; a read whose checkpoint lies below a removed
range reaches it as trimmed data (``ChangeLogGapError``, or a ``RemovedRange`` for the skip policy)
instead of reading on past the hole. Ids cannot tell: a rolled-back insert leaves a hole too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.checkpoints.ordering import MAX_DIGITS
from durability_pipelines.sources.errors import SourceError, TrimmedDataError
from durability_pipelines.sources.hooks import CallHook

__all__ = [
    "ADAPTER",
    "DEFAULT_CHANGE_LOG",
    "ID_SPAN",
    "ChangeFeedAccessError",
    "ChangeFeedError",
    "ChangeFeedNotInstalledError",
    "ChangeFeedReader",
    "ChangeFeedUnavailableError",
    "ChangeLogGapError",
    "ChangeRow",
    "CheckpointAheadError",
    "FeedBatch",
    "FeedHoldup",
    "QualifiedName",
    "Removal",
    "RemovedRange",
    "decode_position",
    "encode_position",
    "install_change_feed",
    "min_acked_position",
    "purge_acked",
    "purge_channel",
    "uninstall_change_feed",
]

ADAPTER = "supabase"
DEFAULT_CHANGE_LOG = "durability_change_log"
#: positions are ``txid * ID_SPAN + id``; a bigint id is < 2**63 < 10**19
ID_SPAN = 10**19
MAX_LOG_NAME = 40  # derived names (<log>_txid_idx, durability_capture_<log>) stay within 63 bytes
SQL_TEMPLATE = (resources.files("durability_pipelines.sources") / "supabase_changes.sql").read_text()
_INSTALL_LOCK = 72_190_320  # pg_advisory_xact_lock id: one installer at a time
#: Set (SET LOCAL) by the project's purge so that the removal trigger does not record its deletes.
PURGE_MARKER = "durability.purge"
#: How many adjacent removed ranges one read merges into one gap (a DELETE run in batches).
MAX_MERGED_REMOVALS = 1000
#: ``held_back`` counts at most this many waiting rows (a count of millions would cost more than it tells).
HOLDUP_COUNT_LIMIT = 10_000
log = logging.getLogger(__name__)


# -- errors ------------------------------------------------------------------------------------


class ChangeFeedError(SourceError):
    """Base class for change-feed errors."""


class ChangeFeedNotInstalledError(ChangeFeedError):
    """The change log (or its trigger) is missing in the database the reader connects to."""


class ChangeFeedUnavailableError(ChangeFeedError):
    """The database holding the change log could not be reached."""


class ChangeFeedAccessError(ChangeFeedError):
    """The reader's role cannot see the log's rows (row-level security or missing privilege)."""


class CheckpointAheadError(ChangeFeedError):
    """A checkpoint lies beyond every transaction this database has run: it belongs elsewhere."""


class ChangeLogGapError(ChangeFeedError, TrimmedDataError):
    """Unread change-log rows were removed by something other than the project's purge (``trim_policy: fail``).

    A ``TrimmedDataError`` like DynamoDB's trimmed records and the WAL source's lost slot, so the
    orchestration stops the shard the same way.
    """

    def __init__(self, *, change_log: str, from_sequence: str, removed: RemovedRange) -> None:
        self.shard_id = "-"
        self.change_log = change_log
        self.from_sequence = from_sequence
        self.to_sequence = str(removed.to_position)
        self.stream_arn = None
        self.removed = removed
        self.reason = removed.describe()
        SourceError.__init__(
            self,
            f"change log {change_log}: the changes after checkpoint {from_sequence} up to position "
            f"{removed.to_position} (inclusive) are gone: {self.reason}. They were lost for this consumer; the "
            "checkpoint was not moved. To go on: (1) recover the missing changes from the source table or a backup "
            "if they matter; (2) then either set trim_policy: skip_to_trim_horizon in the consumer's defs.yaml (the "
            "gap is recorded in stream_gaps and the consumer goes on) or set the checkpoint explicitly with "
            f"`durability-pipelines checkpoints set ... --sequence {removed.to_position} --force`. Prevent it: "
            "delete change-log rows only with `durability-pipelines change-feed purge` (docs/supabase.md#retention)."
        )


# -- names and positions -----------------------------------------------------------------------


@dataclass(frozen=True)
class QualifiedName:
    """``schema.name``, always quoted through ``psycopg.sql.Identifier``."""

    schema: str
    name: str

    @classmethod
    def parse(cls, value: str, default_schema: str = "public", *, what: str = "table") -> QualifiedName:
        """``"schema.table"`` or ``"table"`` (in ``default_schema``)."""
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{what} name {value!r} is empty; give a name like 'orders' or 'public.orders'")
        schema, _, name = value.partition(".") if "." in value else (default_schema, "", value)
        if not schema or not name or value != value.strip():
            raise ConfigError(f"{what} name {value!r} is not 'name' or 'schema.name'")
        return cls(schema, name)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def sibling(self, name: str) -> sql.Identifier:
        """Another object in the same schema (function, index)."""
        return sql.Identifier(self.schema, name)

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


def _log_name(change_log: str) -> QualifiedName:
    log = QualifiedName.parse(change_log, what="change log")
    if len(log.name.encode()) > MAX_LOG_NAME:
        raise ConfigError(
            f"change log name {log.name!r} is longer than {MAX_LOG_NAME} bytes; Postgres truncates names at 63 "
            "bytes and the derived index/trigger names would collide. Choose a shorter name."
        )
    return log


def _trigger_name(log: QualifiedName) -> str:
    return f"durability_capture_{log.name}"


def _function_name(log: QualifiedName) -> str:
    return f"{log.name}_capture"


def _removals_name(log: QualifiedName) -> str:
    return f"{log.name}_removals"


def _removal_function_name(log: QualifiedName) -> str:
    return f"{log.name}_removal"


def encode_position(txid: int, change_id: int) -> int:
    """The one-integer position of change-log row ``change_id`` written by transaction ``txid``."""
    if txid < 0 or not 0 <= change_id < ID_SPAN:
        raise ValueError(f"invalid change-log position txid={txid} id={change_id}")
    return txid * ID_SPAN + change_id


def decode_position(position: int) -> tuple[int, int]:
    """``(txid, id)`` of a position."""
    if position < 0:
        raise ValueError(f"invalid change-log position {position}")
    return divmod(position, ID_SPAN)


# -- install -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _transaction(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction (or a savepoint inside the caller's) holding the install lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INSTALL_LOCK,))
        yield


def install_change_feed(conn: psycopg.Connection, table: str, *, schema: str = "public",
                        change_log: str = DEFAULT_CHANGE_LOG) -> QualifiedName:
    """Create the change log (if missing) and capture every row change of ``table`` into it.

    ``table`` may be ``"schema.table"``; ``change_log`` may be ``"schema.name"`` (default schema
    ``public``). Safe to run again and concurrently. Adding the trigger briefly takes a
    SHARE ROW EXCLUSIVE lock on the table (writers wait, readers do not). Returns the log's name.
    """
    src = QualifiedName.parse(table, schema)
    log = _log_name(change_log)
    ddl = sql.SQL(SQL_TEMPLATE).format(
        log=log.ident, fn=log.sibling(_function_name(log)),
        txid_idx=sql.Identifier(f"{log.name}_txid_idx"), table_idx=sql.Identifier(f"{log.name}_table_idx"),
        removals=log.sibling(_removals_name(log)), removals_idx=sql.Identifier(f"{_removals_name(log)}_idx"),
        removal_fn=log.sibling(_removal_function_name(log)),
        delete_trigger=sql.Identifier(f"durability_delete_{log.name}"),
        truncate_trigger=sql.Identifier(f"durability_truncate_{log.name}"),
    )
    with _transaction(conn):
        if conn.execute("SELECT to_regclass(%s)", (_regclass_text(src),)).fetchone()[0] is None:
            raise ConfigError(f"table {src} does not exist in this database; create it before installing the feed")
        # Writers lock the source table, then (in the trigger) the log. Take the table first too, or
        # the DDL on the log below deadlocks against a concurrent writer.
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(src.ident))
        conn.execute(ddl)
        conn.execute(
            sql.SQL("CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {table} "
                    "FOR EACH ROW EXECUTE FUNCTION {fn}()").format(
                trigger=sql.Identifier(_trigger_name(log)), table=src.ident,
                fn=log.sibling(_function_name(log)),
            )
        )
    return log


def uninstall_change_feed(conn: psycopg.Connection, table: str, *, schema: str = "public",
                          change_log: str = DEFAULT_CHANGE_LOG, drop_change_log: bool = False) -> None:
    """Stop capturing ``table``; with ``drop_change_log`` also drop the log and its function
    (and so the capture of every other table writing to it)."""
    src = QualifiedName.parse(table, schema)
    log = _log_name(change_log)
    with _transaction(conn):
        if conn.execute("SELECT to_regclass(%s)", (_regclass_text(src),)).fetchone()[0] is not None:
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table}").format(
                trigger=sql.Identifier(_trigger_name(log)), table=src.ident))
        if drop_change_log:
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {fn}() CASCADE").format(
                fn=log.sibling(_function_name(log))))
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {log}, {removals}").format(
                log=log.ident, removals=log.sibling(_removals_name(log))))
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {fn}()").format(fn=log.sibling(_removal_function_name(log))))


def _regclass_text(name: QualifiedName) -> str:
    """The name as ``to_regclass`` text input (each part double-quoted)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in (name.schema, name.name))


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeRow:
    """One captured change. ``position`` is its place in the feed (the checkpoint value)."""

    id: int
    txid: int
    schema_name: str
    table_name: str
    operation: str  # INSERT | UPDATE | DELETE
    record: dict[str, Any] | None
    old_record: dict[str, Any] | None
    captured_at: datetime
    keys: dict[str, Any] = field(default_factory=dict)

    @property
    def position(self) -> int:
        return encode_position(self.txid, self.id)

    @property
    def sequence(self) -> str:
        return str(self.position)


@dataclass(frozen=True)
class Removal:
    """One statement that removed change-log rows of one source table without the purge's marker."""

    id: int
    schema_name: str
    table_name: str
    operation: str  # DELETE | TRUNCATE
    from_position: int
    to_position: int
    row_count: int
    removed_by: str
    application_name: str | None
    removed_at: datetime


@dataclass(frozen=True)
class RemovedRange:
    """Removals a reader meets as one hole: overlapping ones, and adjacent ones with no row left between."""

    from_position: int
    to_position: int
    removals: tuple[Removal, ...]

    def describe(self) -> str:
        """What an operator needs to find the culprit: how many rows, which statements, who, when."""
        ops = sorted({r.operation for r in self.removals})
        who = sorted({f"{r.removed_by}" + (f" ({r.application_name})" if r.application_name else "")
                      for r in self.removals})
        first = min(r.removed_at for r in self.removals)
        last = max(r.removed_at for r in self.removals)
        when = first.isoformat() if first == last else f"{first.isoformat()} .. {last.isoformat()}"
        tables = sorted({f"{r.schema_name}.{r.table_name}" for r in self.removals})
        return (f"{sum(r.row_count for r in self.removals)} change-log row(s) of {', '.join(tables)} at positions "
                f"{self.from_position}..{self.to_position} were removed by {len(self.removals)} "
                f"{'/'.join(ops)} statement(s) at {when} by {', '.join(who)}, not by the project's purge")


@dataclass(frozen=True)
class FeedBatch:
    """A read that may have reached a removed range (``ChangeFeedReader.read_batch``).

    ``removed`` is set when no unread row is left below the range: the rows (if any) are the ones
    still in the log inside and after it. ``resume`` is where a consumer that skips the range checkpoints
    (past the range and the rows), or None when this read does not get past the range yet.
    """

    rows: list[ChangeRow]
    removed: RemovedRange | None = None
    resume: int | None = None


@dataclass(frozen=True)
class FeedHoldup:
    """Settled-looking changes wait behind the visibility horizon: the oldest open transaction holds it."""

    txid: int
    waiting: int  # rows after the position that the horizon holds back (capped)
    oldest_position: int
    oldest_captured_at: datetime
    pid: int | None = None
    application_name: str | None = None
    state: str | None = None
    xact_start: datetime | None = None
    database: str | None = None
    prepared_gid: str | None = None

    def describe(self) -> str:
        if self.pid is not None:
            since = self.xact_start.isoformat(timespec="seconds") if self.xact_start else "?"
            app = f", {self.application_name}" if self.application_name else ""
            db = f", database {self.database}" if self.database else ""
            who = f"transaction {self.txid} (pid {self.pid}{app}{db}, {self.state or '?'}) open since {since}"
        elif self.prepared_gid is not None:
            who = f"prepared transaction {self.prepared_gid!r} ({self.txid}): COMMIT PREPARED or ROLLBACK PREPARED it"
        else:
            who = f"transaction {self.txid} (it has just ended, or is not visible to this role)"
        return (f"held back by {who}: {self.waiting}{'+' if self.waiting >= HOLDUP_COUNT_LIMIT else ''} change(s) "
                f"wait behind it, the oldest captured at {self.oldest_captured_at.isoformat(timespec='seconds')}")


def _jsonb(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    return json.loads(value)


class ChangeFeedReader:
    """Reads a change log from a position, never past a change that may still commit below it.

    The reader stores nothing: the caller passes the acked position and checkpoints the last row's
    ``position`` once its side effects have committed. One autocommit connection, opened lazily and
    reopened after an outage; each read is one statement (its own snapshot).
    """

    def __init__(self, conninfo: str | None = None, *, connection: psycopg.Connection | None = None,
                 change_log: str = DEFAULT_CHANGE_LOG, table: str | None = None, schema: str = "public",
                 on_call: CallHook | None = None, connect_timeout: int = 5) -> None:
        if conninfo is None and connection is None:
            raise ConfigError("ChangeFeedReader needs a Postgres URL (conninfo) or a connection")
        self.conninfo = conninfo
        self._conn = connection
        self._owns_conn = connection is None
        self.log = _log_name(change_log)
        self.table = QualifiedName.parse(table, schema) if table else None
        self.on_call = on_call
        self.connect_timeout = connect_timeout
        self._checked = False
        #: the log has the removals table (installed by this version); an older install reads without it
        self._removals: sql.Identifier | None = None
        self._keys_cache: dict[tuple[str, str], list[str]] = {}

    # connection ------------------------------------------------------------------------------
    @property
    def target(self) -> str:
        from durability_pipelines.checkpoints.postgres_store import mask_conninfo

        return mask_conninfo(self.conninfo) if self.conninfo else "the given Postgres connection"

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if not self._owns_conn or self.conninfo is None:
                raise ChangeFeedUnavailableError(f"the connection to {self.target} is closed; open a new reader")
            self._conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=self.connect_timeout)
        return self._conn

    @contextlib.contextmanager
    def _call(self, operation: str) -> Iterator[psycopg.Connection]:
        start = time.perf_counter()
        try:
            conn = self._connect()
            if not self._checked:
                self._check(conn)
            yield conn
        except pg_errors.UndefinedTable:
            raise self._not_installed() from None
        except psycopg.Error as exc:
            from durability_pipelines.checkpoints.postgres_store import connection_is_stale

            if not connection_is_stale(exc):
                raise
            if self._owns_conn:
                self._reset()  # the next call reconnects: after a failover, to the promoted standby
            raise ChangeFeedUnavailableError(
                f"change log {self.log} at {self.target} is unreachable ({type(exc).__name__}: {exc}). Nothing was "
                "read or checkpointed; the batch can be retried. Check the database URL "
                "(DURABILITY_SUPABASE_DB_URL / DURABILITY_POSTGRES_URL) and that the database is up."
            ) from None
        finally:
            if self.on_call is not None:
                self.on_call(f"change_log.{operation}", (time.perf_counter() - start) * 1000)

    def _not_installed(self) -> ChangeFeedNotInstalledError:
        table = str(self.table) if self.table else "<table>"
        return ChangeFeedNotInstalledError(
            f"change log {self.log} does not exist at {self.target}. Install the feed once (needs DDL rights): "
            f"durability_pipelines.sources.supabase_changes.install_change_feed(conn, {table!r}, "
            f"change_log={str(self.log)!r}); on Supabase run it with the database URL of the project "
            "(Settings > Database), not the API URL."
        )

    def _check(self, conn: psycopg.Connection) -> None:
        """Fail loudly where row-level security would make every read silently empty."""
        row = conn.execute(
            """SELECT c.relrowsecurity, c.relforcerowsecurity, pg_has_role(c.relowner, 'USAGE'),
                      r.rolsuper OR r.rolbypassrls, has_table_privilege(c.oid, 'SELECT')
               FROM pg_class c, pg_roles r WHERE c.oid = to_regclass(%s) AND r.rolname = current_user""",
            (_regclass_text(self.log),),
        ).fetchone()
        if row is None:
            raise self._not_installed()
        rls, forced, owner, bypass, can_select = row
        if not can_select:
            raise ChangeFeedAccessError(
                f"the reader's role has no SELECT privilege on {self.log} at {self.target}. Connect as the role "
                "that installed the feed (on Supabase: the postgres user), or GRANT SELECT to this role."
            )
        if rls and not bypass and (forced or not owner):
            raise ChangeFeedAccessError(
                f"{self.log} has row-level security and the reader's role neither owns it nor bypasses RLS, so every "
                "read would return nothing. Connect as the table owner (on Supabase: the postgres user) or a "
                "BYPASSRLS role (service_role), or add a SELECT policy for this role."
            )
        self._removals = self._check_removals(conn)
        self._checked = True

    def _check_removals(self, conn: psycopg.Connection) -> sql.Identifier | None:
        """The removals table, or None (with a warning) on a log installed by an older version."""
        removals = QualifiedName(self.log.schema, _removals_name(self.log))
        (can_select,) = conn.execute(
            "SELECT CASE WHEN to_regclass(%s) IS NULL THEN NULL ELSE has_table_privilege(to_regclass(%s), 'SELECT') END",
            (_regclass_text(removals), _regclass_text(removals)),
        ).fetchone()
        if can_select is None:
            log.warning(
                "change log %s at %s has no %s table (installed by an older version): rows deleted outside the "
                "project's purge cannot be detected. Run `durability-pipelines change-feed install` for its tables "
                "again (idempotent) to add it.", self.log, self.target, removals)
            return None
        if not can_select:
            raise ChangeFeedAccessError(
                f"the reader's role has no SELECT privilege on {removals} at {self.target}, so removed change-log "
                "rows could not be detected. Connect as the role that installed the feed (on Supabase: the postgres "
                f"user), or GRANT SELECT ON {removals} to this role."
            )
        return removals.ident

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None
        self._checked = False

    def close(self) -> None:
        if self._owns_conn:
            self._reset()

    def __enter__(self) -> ChangeFeedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # queries ---------------------------------------------------------------------------------
    def _filters(self, after: int | None, *, safe_only: bool = True, held_only: bool = False,
                 before: int | None = None) -> tuple[sql.Composable, list[Any]]:
        parts: list[sql.Composable] = []
        params: list[Any] = []
        for bound, op in ((after, ">"), (before, "<")):
            if bound is not None:
                txid, change_id = decode_position(bound)
                parts.append(sql.SQL("(txid, id) " + op + " (%s::text::xid8, %s)"))
                params += [str(txid), change_id]
        if safe_only:
            parts.append(sql.SQL("txid < pg_snapshot_xmin(pg_current_snapshot())"))
        if held_only:
            parts.append(sql.SQL("txid >= pg_snapshot_xmin(pg_current_snapshot())"))
        if self.table is not None:
            parts.append(sql.SQL("schema_name = %s AND table_name = %s"))
            params += [self.table.schema, self.table.name]
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts) if parts else sql.SQL("")
        return where, params

    def read(self, after: int | None, limit: int) -> list[ChangeRow]:
        """Up to ``limit`` rows after position ``after`` (None = from the start), in position order.

        Only rows of transactions older than every running transaction are returned, so the rows
        after the last one returned can only be rows this call did not return yet, never rows that
        appear below it later. An empty list means "nothing safe to read yet", not "end of feed".
        Reaching rows removed outside the purge raises ``ChangeLogGapError`` (``read_batch`` returns them).
        """
        batch = self.read_batch(after, limit)
        if batch.removed is not None:
            assert after is not None
            raise ChangeLogGapError(change_log=str(self.log), from_sequence=str(after), removed=batch.removed)
        return batch.rows

    def read_batch(self, after: int | None, limit: int) -> FeedBatch:
        """``read``, telling a removed range the read reached instead of raising.

        Rows below the first removed range above ``after`` come first; once none is left below it, the
        range is reached and the rows inside and after it (up to the next range) are returned with it.
        A read from the start (``after`` None: "whatever the log still has") meets no removal. One
        REPEATABLE READ snapshot for the removals, the horizon and the rows, so a removal committing
        between two of them cannot go unseen.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        with self._call("read") as conn, self._snapshot(conn):
            pending = self._pending_removals(conn, after) if after is not None else []
            if not pending:
                return FeedBatch(self._rows(conn, after, limit))
            (xmin,) = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
            horizon = encode_position(int(xmin), 0)
            first = pending[0]
            below = self._rows(conn, after, limit, before=first.from_position)
            if below or first.from_position >= horizon:
                return FeedBatch(below)  # the range is not reached yet (or rows may still commit below it)
            removed, rest = self._merge_reached(conn, first, pending[1:], horizon)
            rows = self._rows(conn, after, limit, before=rest[0].from_position if rest else None)
            last = rows[-1].position if rows else None
            passed = (last is not None and last >= removed.to_position) or (
                len(rows) < limit and removed.to_position < horizon)
            resume = max(removed.to_position, last or 0) if passed else None
            return FeedBatch(rows, removed, resume)

    @contextlib.contextmanager
    def _snapshot(self, conn: psycopg.Connection) -> Iterator[None]:
        """One snapshot for the statements of a read (the log has removals to consult), else autocommit."""
        if self._removals is None or not conn.autocommit:
            yield  # a caller's connection in a transaction reads in that transaction
            return
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield

    def _rows(self, conn: psycopg.Connection, after: int | None, limit: int, *,
              before: int | None = None) -> list[ChangeRow]:
        where, params = self._filters(after, before=before)
        query = sql.SQL(
            "SELECT id, txid::text AS txid_text, schema_name, table_name, operation, record, old_record, captured_at "
            "FROM {log}{where} ORDER BY txid, id LIMIT %s"
        ).format(log=self.log.ident, where=where)
        rows = conn.execute(query, [*params, limit]).fetchall()
        if not rows and after is not None and before is None:
            self._check_not_ahead(conn, after)
        out = []
        for r in rows:
            record, old = _jsonb(r[5]), _jsonb(r[6])
            pk = self._primary_key(conn, r[2], r[3])
            image = record if record is not None else old or {}
            keys = {k: image.get(k) for k in pk if k in image}
            out.append(ChangeRow(r[0], int(r[1]), r[2], r[3], r[4], record, old, r[7], keys))
        return out

    def _removal_filters(self, after: int) -> tuple[sql.Composable, list[Any]]:
        where: sql.Composable = sql.SQL(" WHERE to_position > %s::numeric")
        params: list[Any] = [str(after)]
        if self.table is not None:
            where = where + sql.SQL(" AND schema_name = %s AND table_name = %s")
            params += [self.table.schema, self.table.name]
        return where, params

    def _pending_removals(self, conn: psycopg.Connection, after: int) -> list[Removal]:
        """Removals above ``after`` (of the reader's table), lowest first: the rows they took were unread."""
        if self._removals is None:
            return []
        where, params = self._removal_filters(after)
        rows = conn.execute(
            sql.SQL("SELECT id, schema_name, table_name, operation, from_position::text, to_position::text, row_count, "
                    "removed_by, application_name, removed_at FROM {removals}{where} "
                    "ORDER BY from_position, id").format(removals=self._removals, where=where),
            params,
        ).fetchall()
        return [Removal(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), r[6], r[7], r[8], r[9]) for r in rows]

    def _merge_reached(self, conn: psycopg.Connection, first: Removal, others: list[Removal],
                       horizon: int) -> tuple[RemovedRange, list[Removal]]:
        """The reached range: ``first`` plus every later removal overlapping it or with no row in between
        (a DELETE run in batches is one hole, not one per batch). Returns it and the removals after it."""
        merged, high = [first], first.to_position
        while others and len(merged) < MAX_MERGED_REMOVALS:
            nxt = others[0]
            if nxt.from_position > high and (nxt.from_position >= horizon or self._rows(
                    conn, high, 1, before=nxt.from_position)):
                break
            merged.append(others.pop(0))
            high = max(high, nxt.to_position)
        return RemovedRange(first.from_position, high, tuple(merged)), others

    def has_new(self, after: int | None) -> bool:
        """Is at least one row safe to read after ``after``, or a removed range to report? (cheap peek for sensors)"""
        where, params = self._filters(after)
        query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {log}{where})").format(log=self.log.ident, where=where)
        with self._call("has_new") as conn:
            if after is not None and self._removals is not None:
                rwhere, rparams = self._removal_filters(after)
                query = query + sql.SQL(
                    " OR EXISTS (SELECT 1 FROM {removals}{where} AND from_position < "
                    "pg_snapshot_xmin(pg_current_snapshot())::text::numeric * %s)").format(
                    removals=self._removals, where=rwhere)
                params = [*params, *rparams, ID_SPAN]
            found = bool(conn.execute(query, params).fetchone()[0])
            if not found and after is not None:
                self._check_not_ahead(conn, after)  # else a foreign checkpoint stalls the sensor silently
        return found

    def held_back(self, after: int | None) -> FeedHoldup | None:
        """Why nothing is readable although rows after ``after`` are in the log: the oldest transaction still
        open in the cluster (a frozen worker, an idle-in-transaction session, a prepared transaction) holds
        the visibility horizon, and the rows of every later transaction wait. None when nothing waits."""
        where, params = self._filters(after, safe_only=False, held_only=True)
        query = sql.SQL(
            """WITH waiting AS (SELECT txid, id, captured_at FROM {log}{where} ORDER BY txid, id LIMIT %s),
                    h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)
               SELECT (SELECT count(*) FROM waiting), w.txid::text, w.id, w.captured_at, h.xmin::text,
                      a.pid, a.application_name, a.state, a.xact_start, a.datname, p.gid
               FROM (SELECT * FROM waiting ORDER BY txid, id LIMIT 1) w CROSS JOIN h
               LEFT JOIN pg_stat_activity a ON a.backend_xid = xid(h.xmin)
               LEFT JOIN pg_prepared_xacts p ON p.transaction = xid(h.xmin)
               LIMIT 1""").format(log=self.log.ident, where=where)
        with self._call("held_back") as conn:
            row = conn.execute(query, [*params, HOLDUP_COUNT_LIMIT]).fetchone()
        if row is None:
            return None
        return FeedHoldup(int(row[4]), int(row[0]), encode_position(int(row[1]), row[2]), row[3], row[5], row[6],
                          row[7], row[8], row[9], row[10])

    def latest_position(self) -> int:
        """A position after every change that is settled now ("start from now").

        It is the visibility horizon itself: changes of transactions still running (or not yet
        started) sort above it and will be delivered.
        """
        with self._call("latest") as conn:
            (xmin,) = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        return encode_position(int(xmin), 0)

    def earliest_position(self) -> int | None:
        """Position of the oldest row still in the log (for this table), or None when it is empty.

        Reading with ``after=None`` starts there; this is for lag and retention reports.
        """
        where, params = self._filters(None, safe_only=False)
        query = sql.SQL("SELECT id, txid::text AS txid_text FROM {log}{where} ORDER BY txid, id LIMIT 1").format(
            log=self.log.ident, where=where)
        with self._call("earliest") as conn:
            row = conn.execute(query, params).fetchone()
        return encode_position(int(row[1]), row[0]) if row else None

    def pending_count(self, after: int | None, *, limit: int | None = None) -> int:
        """Rows after ``after``, settled or not (a lag gauge). ``limit`` caps the count (and its cost):
        the answer is then at most ``limit``."""
        where, params = self._filters(after, safe_only=False)
        if limit is None:
            query = sql.SQL("SELECT count(*) FROM {log}{where}").format(log=self.log.ident, where=where)
        else:
            query = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {log}{where} LIMIT %s) AS capped").format(
                log=self.log.ident, where=where)
            params = [*params, limit]
        with self._call("count") as conn:
            return int(conn.execute(query, params).fetchone()[0])

    def _check_not_ahead(self, conn: psycopg.Connection, after: int) -> None:
        """A checkpoint from another database (or a restored one) would silently skip everything."""
        txid, _ = decode_position(after)
        (xmax,) = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
        if txid > int(xmax):
            raise CheckpointAheadError(
                f"checkpoint position {after} (transaction {txid}) is ahead of every transaction {self.target} has "
                f"run (next is {xmax}): it was not produced by this database (restored from a backup, or a "
                "checkpoint of another project?). Nothing was read. Inspect the checkpoint history, then set a "
                "position from this database with `durability-pipelines checkpoints set ... --force` (e.g. the "
                "value of ChangeFeedReader.latest_position() or earliest_position())."
            )

    def _primary_key(self, conn: psycopg.Connection, schema: str, table: str) -> list[str]:
        cached = self._keys_cache.get((schema, table))
        if cached is None:
            rows = conn.execute(
                """SELECT a.attname FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                   WHERE i.indrelid = to_regclass(%s) AND i.indisprimary
                   ORDER BY array_position(i.indkey::int2[], a.attnum)""",
                (_regclass_text(QualifiedName(schema, table)),),
            ).fetchall()
            cached = self._keys_cache[(schema, table)] = [r[0] for r in rows]
        return cached


# -- retention ---------------------------------------------------------------------------------

_DIGITS = f"^[0-9]{{1,{MAX_DIGITS}}}$"


def min_acked_position(conn: psycopg.Connection, channel: str, *, groups: Sequence[str] | None = None,
                       adapter: str = ADAPTER) -> int | None:
    """The lowest position acked by every consumer of ``channel`` in the ``checkpoints`` table.

    None (purge nothing) when there is no checkpoint, when a consumer's checkpoint is a sentinel
    (it acked nothing yet), or when one of ``groups`` has no checkpoint at all: a group that never
    checkpointed must be named here, or its unread changes could be purged. Only Postgres is consulted
    (``durability_checkpoint_positions``: the shared number and the sentinel beside it; Redis-only
    stores: pass positions to ``purge_acked``).
    """
    rows = conn.execute(
        """SELECT grp, bool_and(sequence ~ %s), min(CASE WHEN sequence ~ %s THEN sequence::numeric END)
           FROM durability_checkpoint_positions WHERE adapter = %s AND stream = %s GROUP BY grp""",
        (_DIGITS, _DIGITS, adapter, channel),
    ).fetchall()
    if not rows or not all(r[1] for r in rows):
        return None
    if groups is not None and set(groups) - {r[0] for r in rows}:
        return None
    return int(min(r[2] for r in rows))


def purge_acked(conn: psycopg.Connection, change_log: str, acked_position: int, *, table: str | None = None,
                schema: str = "public", keep_last: int = 0, batch_size: int = 10_000) -> int:
    """Delete the log rows at or below ``acked_position`` (of ``table`` only, when given).

    Every consumer must have acked ``acked_position`` (see ``min_acked_position``); deleted rows can
    never be replayed. ``keep_last`` keeps the newest N rows anyway (for inspection and manual
    replay). Deletes in batches of ``batch_size``, each its own statement, so locks stay short.
    Returns how many rows were deleted.
    """
    if keep_last < 0 or batch_size < 1:
        raise ValueError("keep_last must be >= 0 and batch_size >= 1")
    log = _log_name(change_log)
    src = QualifiedName.parse(table, schema) if table else None
    filters: list[sql.Composable] = []
    fparams: list[Any] = []
    if src is not None:
        filters.append(sql.SQL("schema_name = %s AND table_name = %s"))
        fparams += [src.schema, src.name]
    bound = acked_position
    if keep_last:
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(filters) if filters else sql.SQL("")
        row = conn.execute(
            sql.SQL("SELECT id, txid::text AS txid_text FROM {log}{where} ORDER BY txid DESC, id DESC OFFSET %s LIMIT 1").format(
                log=log.ident, where=where),
            [*fparams, keep_last],
        ).fetchone()
        if row is None:
            return 0
        bound = min(bound, encode_position(int(row[1]), row[0]))
    txid, change_id = decode_position(bound)
    where = sql.SQL(" AND ").join([sql.SQL("(txid, id) <= (%s::text::xid8, %s)"), *filters])
    delete = sql.SQL(
        "DELETE FROM {log} WHERE id IN (SELECT id FROM {log} WHERE {where} ORDER BY txid, id LIMIT %s)"
    ).format(log=log.ident, where=where)
    total = 0
    while True:
        with _purging(conn):
            deleted = conn.execute(delete, [str(txid), change_id, *fparams, batch_size]).rowcount
        total += deleted
        if deleted < batch_size:
            break
    _forget_removals(conn, log, acked_position, filters, fparams)
    return total


@contextlib.contextmanager
def _purging(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction whose deletes of log rows the removal trigger does not record (they are acked)."""
    with conn.transaction():
        conn.execute("SELECT set_config(%s, 'on', true)", (PURGE_MARKER,))
        yield
        conn.execute("SELECT set_config(%s, '', true)", (PURGE_MARKER,))  # a caller's transaction goes on


def _forget_removals(conn: psycopg.Connection, log: QualifiedName, acked_position: int,
                     filters: list[sql.Composable], fparams: list[Any]) -> None:
    """Removal records every consumer has read past can no longer stop one: drop them with the rows."""
    removals = QualifiedName(log.schema, _removals_name(log))
    if conn.execute("SELECT to_regclass(%s)", (_regclass_text(removals),)).fetchone()[0] is None:
        return  # installed by an older version
    where = sql.SQL(" AND ").join([sql.SQL("to_position <= %s::numeric"), *filters])
    conn.execute(sql.SQL("DELETE FROM {removals} WHERE {where}").format(removals=removals.ident, where=where),
                 [str(acked_position), *fparams])


def purge_channel(conn: psycopg.Connection, channel: str, *, table: str, schema: str = "public",
                  change_log: str = DEFAULT_CHANGE_LOG, groups: Sequence[str] | None = None, keep_last: int = 0,
                  checkpoints_conn: psycopg.Connection | None = None) -> int:
    """Purge what every consumer group of ``channel`` has acked (``min_acked_position`` + ``purge_acked``).

    ``checkpoints_conn`` reads the ``checkpoints`` table when it lives in another database than the
    log (the project's Postgres vs. the Supabase database). Checkpoints only move forward, so a
    position read first and used a moment later is still safe.
    """
    acked = min_acked_position(checkpoints_conn or conn, channel, groups=groups)
    if acked is None:
        return 0
    return purge_acked(conn, change_log, acked, table=table, schema=schema, keep_last=keep_last)

