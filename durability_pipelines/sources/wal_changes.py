"""Postgres changes read from the write-ahead log: a publication, a logical replication slot, ``pgoutput``.

The trigger feed (``supabase_changes.py``) copies every change into a table; this source reads the
changes Postgres already writes to its WAL, through one logical replication slot per consumer group
(see ``docs/supabase.md``, "The WAL source"):

* ``install_wal_source(conn, publication, slot, tables)`` creates the publication over the tables
  (INSERT, UPDATE, DELETE) and the slot (plugin ``pgoutput``, built in: no extension), in that order
  (a slot decodes with the publication as it was at each change, so the publication must be older).
* ``WalChangeReader.read(after, max_events)`` *peeks* the slot
  (``pg_logical_slot_peek_binary_changes``, which consumes nothing), decodes the messages
  (``sources/pgoutput.py``) and returns the changes after ``after``, whole transactions in commit order;
  a transaction is split only when it alone holds more than ``max_events`` changes.
* ``WalChangeReader.advance(lsn)`` moves the slot's ``confirmed_flush_lsn`` forward
  (``pg_replication_slot_advance``): the server may then recycle the WAL before it. The consumer calls
  it only for a position that is durable in its checkpoint store, after the checkpoint.

Positions
---------
A change's position is ``commit_lsn * 10**10 + index``: the LSN of its transaction's commit record and
its 1-based place in the transaction (at most 30 digits). Positions order like the WAL's commits and,
within a transaction, like its statements. ``(lsn, 0)`` is "before the transaction committing at
``lsn``" (a pinned ``latest`` checkpoints the current WAL position that way).

The slot's position follows the checkpoint: for a durable checkpoint ``(L, i)`` the slot moves to
``L + 1`` when the transaction at ``L`` is known to hold exactly ``i`` changes (it was read whole:
nothing of it is needed again) and to ``L`` otherwise (the transaction is decoded again and its first
``i`` changes are filtered out). So the slot is never past ``L + 1``, and a slot found beyond that
means changes after the checkpoint are gone (``slot_is_past``).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.sources.errors import SourceError, TrimmedDataError
from durability_pipelines.sources.hooks import CallHook
from durability_pipelines.sources.pgoutput import PgOutputDecoder, Transaction, format_lsn, parse_lsn
from durability_pipelines.sources.supabase_changes import QualifiedName

__all__ = [
    "INDEX_SPAN",
    "SlotInfo",
    "WalChange",
    "WalChangeReader",
    "WalError",
    "WalGapError",
    "WalNotInstalledError",
    "WalRead",
    "WalSlotInvalidatedError",
    "WalUnavailableError",
    "decode_position",
    "default_slot_name",
    "drop_wal_source",
    "encode_position",
    "install_wal_source",
    "retained_over_bound",
    "slot_is_past",
    "slot_target",
    "wal_source_status",
]

#: positions are ``commit_lsn * INDEX_SPAN + index`` (index 1-based within the transaction)
INDEX_SPAN = 10**10
_INSTALL_LOCK = 72_190_321  # pg_advisory_lock id: one WAL installer at a time
_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
#: How long a read waits for a slot another session is peeking or advancing (the sensor, a hand-off).
BUSY_TIMEOUT_S = 10.0


# -- errors ------------------------------------------------------------------------------------


class WalError(SourceError):
    """Base class for WAL source errors."""


class WalNotInstalledError(WalError):
    """The slot or the publication does not exist."""


class WalUnavailableError(WalError):
    """The database could not be reached, or the slot stayed busy (another session reading it)."""


class WalGapError(WalError, TrimmedDataError):
    """Changes after the checkpoint are no longer in the slot (it was dropped, recreated, invalidated, or
    moved past the checkpoint by someone else). ``trim_policy: fail``."""

    def __init__(self, *, slot: str, from_sequence: str | None, to_sequence: str | None, reason: str) -> None:
        self.shard_id = "-"
        self.slot = slot
        self.from_sequence = from_sequence
        self.to_sequence = to_sequence
        self.stream_arn = None
        self.reason = reason
        SourceError.__init__(
            self,
            f"replication slot {slot!r}: the changes after checkpoint {from_sequence} "
            f"{'up to position ' + to_sequence + ' (exclusive)' if to_sequence else ''} are no longer in the slot "
            f"({reason}). They were lost for this consumer; the checkpoint was not moved. To go on: (1) recover "
            "the missing changes from the tables themselves or a backup if they matter; (2) then either set "
            "trim_policy: skip (the gap is recorded in the audit table) or set the checkpoint explicitly with "
            "`durability-pipelines checkpoints set ... --sequence <S> --force`. Prevent it: alert on the slot's "
            "retained WAL (`durability-pipelines wal status`) and on consumer lag; after a failover recreate "
            "the slot on the new primary (docs/supabase.md)."
        )


class WalSlotInvalidatedError(WalGapError):
    """The server invalidated the slot (``wal_status = 'lost'``: ``max_slot_wal_keep_size`` exceeded, or a
    conflict on a standby): it cannot be read again, so the changes after the checkpoint that it held are
    gone for this consumer. ``trim_policy: fail``; the fix is a new slot and a deliberate checkpoint decision."""

    def __init__(self, *, slot: str, from_sequence: str | None, cause: str, retained_bound: str | None = None,
                 channel: str | None = None, publication: str | None = None, tables: Sequence[str] = ()) -> None:
        self.shard_id = "-"
        self.slot = slot
        self.from_sequence = from_sequence
        self.to_sequence = None
        self.stream_arn = None
        self.reason = f"the slot was invalidated ({cause})"
        names = (f"--channel {channel} --slot {slot}" + (f" --publication {publication}" if publication else "")
                 if channel else f"--slot {slot}")
        SourceError.__init__(
            self,
            f"replication slot {slot!r} was invalidated by the server ({cause}). It cannot be read any more: the "
            f"changes after checkpoint {from_sequence} that it held are gone for this consumer, which stopped "
            "(trim_policy: fail); the checkpoint was not moved. To go on: (1) `durability-pipelines wal drop "
            f"{names}` and `durability-pipelines wal install {names} {' '.join(tables) or '<tables>'}` (the new "
            "slot starts now); (2) recover the changes committed between the checkpoint and the new slot from the "
            "tables or a backup if they matter; (3) decide the checkpoint deliberately: run once with trim_policy: "
            "skip (the gap is recorded in the audit table) or `durability-pipelines checkpoints set ... --sequence "
            "<S> --force` to the new slot's position. Prevent it: alert on the slot's retained WAL "
            f"(reactive.retained_wal_bytes, the audit's wal-retained status{retained_bound or ''}) and on lag, "
            "long before max_slot_wal_keep_size."
        )


# -- names and positions -----------------------------------------------------------------------


def encode_position(lsn: int, index: int = 0) -> int:
    if lsn < 0 or not 0 <= index < INDEX_SPAN:
        raise ValueError(f"invalid WAL position ({lsn}, {index})")
    return lsn * INDEX_SPAN + index


def decode_position(position: int) -> tuple[int, int]:
    """``(commit_lsn, index)``."""
    if position < 0:
        raise ValueError(f"invalid WAL position {position}")
    return divmod(position, INDEX_SPAN)


def default_slot_name(channel: str, group: str) -> str:
    """``durability_<channel>_<group>``, lower case, other characters as ``_``, at most 63 bytes."""
    name = re.sub(r"[^a-z0-9_]", "_", f"durability_{channel}_{group}".lower())
    return name[:63]


def default_publication_name(channel: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", f"durability_{channel}".lower())[:63]


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ConfigError(f"{what} {value!r}: use 1-63 lower-case letters, digits and underscores")
    return value


def slot_target(durable: int, complete: dict[int, int] | None = None) -> int:
    """The LSN the slot may move to once ``durable`` is durable: past its transaction when that is known
    to be whole (``complete`` maps commit LSN -> change count), else just before it."""
    lsn, index = decode_position(durable)
    if complete is not None and index > 0 and complete.get(lsn) == index:
        return lsn + 1
    return lsn


def slot_is_past(confirmed_flush_lsn: int, checkpoint: int) -> bool:
    """True when the slot is beyond where this consumer's own advances could have put it: the changes
    between the checkpoint and the slot are gone."""
    lsn, _ = decode_position(checkpoint)
    return confirmed_flush_lsn > lsn + 1


# -- install / drop / status -------------------------------------------------------------------


@dataclass(frozen=True)
class SlotInfo:
    """One row of ``pg_replication_slots`` and the server's current WAL position, read in one query.

    The byte figures are ``pg_wal_lsn_diff`` against the current position (the replay position on a
    standby): ``retained_bytes`` is what the server cannot recycle because of the slot (from
    ``restart_lsn``: the disk the slot costs), ``lag_bytes`` is what the consumer has not released (from
    ``confirmed_flush_lsn``). Both count all the WAL the server wrote, not only the published tables'.
    """

    name: str
    plugin: str | None
    database: str | None
    active_pid: int | None
    confirmed_flush_lsn: int | None
    restart_lsn: int | None
    wal_status: str | None  # reserved | extended | unreserved | lost
    retained_bytes: int | None  # WAL the slot holds back (current LSN - restart_lsn)
    current_lsn: int | None = None
    #: why the server invalidated the slot (PostgreSQL 17+: wal_removed, rows_removed, wal_level_insufficient, ...)
    invalidation_reason: str | None = None
    #: PostgreSQL 16+: invalidated by a recovery conflict on a standby
    conflicting: bool | None = None

    @property
    def lost(self) -> bool:
        """Invalidated (``max_slot_wal_keep_size`` exceeded, or a conflict on a standby): unreadable."""
        return (self.wal_status == "lost" or self.restart_lsn is None or bool(self.conflicting)
                or self.invalidation_reason is not None)

    @property
    def lag_bytes(self) -> int | None:
        """WAL written since the consumer's last release (``pg_wal_lsn_diff(current, confirmed_flush_lsn)``)."""
        if self.current_lsn is None or self.confirmed_flush_lsn is None:
            return None
        return max(0, self.current_lsn - self.confirmed_flush_lsn)

    def describe_loss(self) -> str:
        """What invalidated the slot, as far as the server says."""
        if self.invalidation_reason:
            return f"invalidation_reason {self.invalidation_reason!r}"
        if self.conflicting:
            return "a recovery conflict on this standby (conflicting = true)"
        return (f"wal_status {self.wal_status!r}: it retained more WAL than max_slot_wal_keep_size allows, and "
                "the server removed WAL the slot still needed")

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot": self.name, "plugin": self.plugin, "database": self.database, "active_pid": self.active_pid,
            "confirmed_flush_lsn": format_lsn(self.confirmed_flush_lsn) if self.confirmed_flush_lsn is not None else None,
            "restart_lsn": format_lsn(self.restart_lsn) if self.restart_lsn is not None else None,
            "current_lsn": format_lsn(self.current_lsn) if self.current_lsn is not None else None,
            "wal_status": self.wal_status, "retained_bytes": self.retained_bytes, "lag_bytes": self.lag_bytes,
            "invalidation_reason": self.invalidation_reason, "conflicting": self.conflicting, "lost": self.lost,
        }


# ``to_jsonb(s)``: every column the server has, so that one query serves PostgreSQL 14-17 (``conflicting``
# came in 16, ``invalidation_reason`` in 17).
_SLOT_SQL = """
SELECT to_jsonb(s),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text
  FROM pg_replication_slots s WHERE slot_name = %s
"""


def _lsn(value: object) -> int | None:
    return parse_lsn(str(value)) if value else None


def slot_info(conn: psycopg.Connection, slot: str) -> SlotInfo | None:
    row = conn.execute(_SLOT_SQL, (slot,)).fetchone()
    if row is None:
        return None
    s, current = row[0], _lsn(row[1])
    restart = _lsn(s.get("restart_lsn"))
    return SlotInfo(
        s["slot_name"], s.get("plugin"), s.get("database"), s.get("active_pid"), _lsn(s.get("confirmed_flush_lsn")),
        restart, s.get("wal_status"),
        max(0, current - restart) if current is not None and restart is not None else None,
        current, s.get("invalidation_reason"), s.get("conflicting"))


def retained_over_bound(info: SlotInfo, max_retained_bytes: int | None) -> bool:
    """True when the slot holds back more WAL than the operator's bound (``max_retained_wal_mb``)."""
    return (max_retained_bytes is not None and info.retained_bytes is not None
            and info.retained_bytes > max_retained_bytes)


@contextlib.contextmanager
def _install_lock(conn: psycopg.Connection) -> Iterator[None]:
    # A session lock: the slot cannot be created in a transaction that has written (the publication's DDL).
    conn.execute("SELECT pg_advisory_lock(%s)", (_INSTALL_LOCK,))
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_INSTALL_LOCK,))


def install_wal_source(conn: psycopg.Connection, *, publication: str, slot: str,
                       tables: Sequence[str]) -> SlotInfo:
    """Create (or update) the publication over ``tables`` and create the slot if it is missing.

    ``conn`` must be autocommit. Idempotent; concurrent installers wait for each other. Needs
    ``wal_level = logical`` and a role with REPLICATION (Supabase's ``postgres`` has it) that owns the
    tables. Creating a slot waits for the transactions running at that moment to end. Returns the slot.
    """
    check_name(publication, "publication")
    check_name(slot, "replication slot")
    if not tables:
        raise ConfigError("the WAL source needs at least one table")
    names = [QualifiedName.parse(t) for t in tables]
    level = conn.execute("SHOW wal_level").fetchone()[0]
    if level != "logical":
        raise ConfigError(
            f"wal_level is {level!r} on this server; logical replication needs wal_level = logical "
            "(ALTER SYSTEM SET wal_level = logical, then restart; on Supabase it is already logical)")
    with _install_lock(conn):
        for name in names:
            if conn.execute("SELECT to_regclass(%s)", (str(name.ident.as_string(conn)),)).fetchone()[0] is None:
                raise ConfigError(f"table {name} does not exist in this database; create it first")
        table_list = sql.SQL(", ").join(n.ident for n in names)
        exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update, delete')")
                         .format(sql.Identifier(publication), table_list))
        else:
            conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(sql.Identifier(publication), table_list))
            conn.execute(sql.SQL("ALTER PUBLICATION {} SET (publish = 'insert, update, delete')")
                         .format(sql.Identifier(publication)))
        info = slot_info(conn, slot)
        if info is None:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            info = slot_info(conn, slot)
        elif info.plugin != "pgoutput":
            raise ConfigError(f"replication slot {slot!r} exists with plugin {info.plugin!r}, not pgoutput; "
                              "drop it (`durability-pipelines wal drop`) or choose another slot name")
    assert info is not None
    return info


def drop_wal_source(conn: psycopg.Connection, *, slot: str, publication: str | None = None) -> dict[str, bool]:
    """Drop the slot (the server then frees the WAL it held) and, if named, the publication."""
    dropped = {"slot": False, "publication": False}
    if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone():
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        dropped["slot"] = True
    if publication and conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone():
        conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
        dropped["publication"] = True
    return dropped


def wal_source_status(conn: psycopg.Connection, *, slot: str, publication: str,
                      max_retained_bytes: int | None = None) -> dict[str, Any]:
    """The slot (position, WAL retained and lag in bytes, invalidated?) and the publication's tables, for
    operators; ``retained_over_bound`` says whether the slot holds back more than ``max_retained_bytes``."""
    info = slot_info(conn, slot)
    tables = [f"{r[0]}.{r[1]}" for r in conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1, 2",
        (publication,)).fetchall()]
    pub = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone() is not None
    identity = {f"{r[0]}.{r[1]}": {"d": "default", "n": "nothing", "f": "full", "i": "index"}.get(r[2], r[2])
                for r in conn.execute(
                    "SELECT n.nspname, c.relname, c.relreplident FROM pg_publication_tables t "
                    "JOIN pg_namespace n ON n.nspname = t.schemaname "
                    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename WHERE t.pubname = %s",
                    (publication,)).fetchall()}
    return {"slot": info.as_dict() if info else None, "slot_name": slot, "publication": publication,
            "max_retained_bytes": max_retained_bytes,
            "retained_over_bound": retained_over_bound(info, max_retained_bytes) if info else False,
            "publication_exists": pub, "tables": tables, "replica_identity": identity,
            "wal_level": conn.execute("SHOW wal_level").fetchone()[0]}


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WalChange:
    """One row change, as the consumer sees it."""

    position: int
    xid: int
    commit_lsn: int
    index: int
    commit_time: datetime
    schema: str
    table: str
    operation: str  # INSERT | UPDATE | DELETE
    new: dict[str, Any] | None
    old: dict[str, Any] | None
    keys: dict[str, Any] = field(default_factory=dict)

    @property
    def sequence(self) -> str:
        return str(self.position)


@dataclass
class WalRead:
    changes: list[WalChange]
    #: commit LSN -> change count of every transaction of ``changes`` that was returned whole
    complete: dict[int, int]
    #: False: nothing more after the last change (caught up); True: more is waiting; None: unknown
    more: bool | None


class WalChangeReader:
    """Peeks one slot through one autocommit connection (opened lazily, reopened after an outage).

    The reader stores nothing: the caller passes the acked position, and advances the slot itself
    (``advance``) once a position is durable.
    """

    def __init__(self, conninfo: str, *, slot: str, publication: str, on_call: CallHook | None = None,
                 connect_timeout: int = 5, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.conninfo = conninfo
        self.slot = check_name(slot, "replication slot")
        self.publication = check_name(publication, "publication")
        self.on_call = on_call
        self.connect_timeout = connect_timeout
        self.busy_timeout_s = busy_timeout_s
        self._conn: psycopg.Connection | None = None
        self._decoder = PgOutputDecoder()
        self._skip_rows = 0  # messages before the last read's first change: the next peek asks for them too

    @property
    def target(self) -> str:
        from durability_pipelines.checkpoints.postgres_store import mask_conninfo

        return mask_conninfo(self.conninfo)

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=self.connect_timeout)
        return self._conn

    @contextlib.contextmanager
    def _call(self, operation: str) -> Iterator[psycopg.Connection]:
        start = time.perf_counter()
        try:
            yield self._connect()
        except psycopg.Error as exc:
            from durability_pipelines.checkpoints.postgres_store import connection_is_stale

            if not connection_is_stale(exc):
                raise
            self.close()
            raise WalUnavailableError(
                f"replication slot {self.slot!r} at {self.target} is unreachable ({type(exc).__name__}: {exc}). "
                "Nothing was read or checkpointed; the batch can be retried."
            ) from None
        finally:
            if self.on_call is not None:
                self.on_call(f"wal.{operation}", (time.perf_counter() - start) * 1000)

    def slot_info(self) -> SlotInfo | None:
        with self._call("slot_info") as conn:
            return slot_info(conn, self.slot)

    def current_lsn(self) -> int:
        with self._call("current_lsn") as conn:
            return parse_lsn(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])

    def _peek(self, n: int) -> list[bytes]:
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.01
        while True:
            try:
                with self._call("peek") as conn:
                    rows = conn.execute(
                        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s, 'proto_version', '1', "
                        "'publication_names', %s)", (self.slot, n, self.publication)).fetchall()
                return [bytes(r[0]) for r in rows]
            except pg_errors.ObjectInUse as exc:  # another session is peeking or advancing the slot
                if time.monotonic() >= deadline:
                    raise WalUnavailableError(
                        f"replication slot {self.slot!r} stayed busy for {self.busy_timeout_s:g} s ({exc}); "
                        "another session reads it (a second consumer on the same slot?). Nothing was read.") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
            except pg_errors.UndefinedObject as exc:
                raise WalNotInstalledError(
                    f"replication slot {self.slot!r} or publication {self.publication!r} does not exist at "
                    f"{self.target} ({exc}). Install them: `durability-pipelines wal install` or install: true."
                ) from None

    def _transactions(self, messages: list[bytes]) -> list[Transaction]:
        self._decoder._txn = None  # a peek starts at a transaction's beginning
        out = []
        for m in messages:
            txn = self._decoder.feed(m)
            if txn is not None:
                out.append(txn)
        return out

    def read(self, after: int | None, max_events: int) -> WalRead:
        """Changes after ``after`` (all the slot has when None), whole transactions in commit order, up to
        ``max_events`` (more only never: a transaction larger than that is returned in parts)."""
        floor = decode_position(after) if after is not None else (-1, -1)
        want = self._skip_rows + max_events + 64
        while True:
            messages = self._peek(want)
            exhausted = len(messages) < want
            changes: list[WalChange] = []
            complete: dict[int, int] = {}
            skipped = 0
            more: bool | None = None
            for txn in self._transactions(messages):
                pending = [(i, c) for i, c in enumerate(txn.changes, start=1) if (txn.final_lsn, i) > floor]
                if not pending:
                    if not changes:
                        skipped += txn.messages
                    continue
                if changes and len(changes) + len(pending) > max_events:
                    more = True
                    break
                taken = pending[:max_events - len(changes)]
                changes.extend(WalChange(
                    encode_position(txn.final_lsn, i), txn.xid, txn.final_lsn, i, txn.commit_time, c.relation.schema,
                    c.relation.name, c.operation, c.new, c.old, c.keys) for i, c in taken)
                if len(taken) == len(pending):
                    complete[txn.final_lsn] = len(txn.changes)
                else:
                    more = True
                    break
                if len(changes) >= max_events:
                    break
            self._skip_rows = skipped
            if more or len(changes) >= max_events:
                return WalRead(changes, complete, more)
            if exhausted:
                return WalRead(changes, complete, False)
            want *= 4

    def has_new(self, after: int | None) -> bool:
        return bool(self.read(after, 1).changes)

    def advance(self, lsn: int) -> bool:
        """Move the slot's confirmed position forward to ``lsn`` (never backwards; a busy slot is left for
        the next call). True when it moved."""
        try:
            with self._call("advance") as conn:
                row = conn.execute(
                    "SELECT pg_replication_slot_advance(slot_name, %s::pg_lsn) FROM pg_replication_slots "
                    "WHERE slot_name = %s AND confirmed_flush_lsn < %s::pg_lsn AND wal_status <> 'lost'",
                    (format_lsn(lsn), self.slot, format_lsn(lsn))).fetchone()
        except pg_errors.ObjectInUse:
            return False
        return row is not None

    def recreate_slot(self) -> SlotInfo:
        """Drop the slot (if it is there) and create it again at the current WAL position (``trim_policy:
        skip`` after an invalidation). The publication is kept."""
        with self._call("recreate_slot") as conn:
            with contextlib.suppress(pg_errors.UndefinedObject):
                conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))
            info = slot_info(conn, self.slot)
        assert info is not None
        self._skip_rows = 0
        return info

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None
