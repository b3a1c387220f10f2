"""A decoder of PostgreSQL's built-in ``pgoutput`` logical decoding messages (protocol version 1).

What ``pg_logical_slot_peek_binary_changes(slot, NULL, n, 'proto_version', '1', 'publication_names', p)``
returns, one message per row: Begin (B), Commit (C), Relation (R), Type (Y), Origin (O), Insert (I),
Update (U), Delete (D), Truncate (T) and Message (M). Reference: "Logical Replication Message Formats" in
the PostgreSQL manual. Only the text format is decoded (the ``binary`` option is never asked for).

:class:`PgOutputDecoder` turns the messages into whole :class:`Transaction` objects (a peek returns whole
transactions only: pgoutput emits a transaction at its commit). Column values arrive as text and are
converted by type OID to what the trigger feed's ``jsonb`` gives (bool, int, float, Decimal for numeric,
json/jsonb parsed, everything else as text); an unchanged TOASTed value that is not in the message is
left out of the row (``Transaction.changes[i].unchanged_toast`` names it).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

__all__ = ["Change", "PgOutputDecoder", "PgOutputError", "Relation", "Transaction", "format_lsn", "parse_lsn"]

#: pgoutput's timestamps are microseconds since 2000-01-01 UTC.
PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)

_INT_TYPES = {20, 21, 23, 26, 28}  # int8, int2, int4, oid, xid
_FLOAT_TYPES = {700, 701}
_NUMERIC = 1700
_BOOL = 16
_JSON_TYPES = {114, 3802}


class PgOutputError(ValueError):
    """A message that is not pgoutput protocol 1, or one referring to an unknown relation."""


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> 64-bit number."""
    high, _, low = str(text).partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    """64-bit number -> ``'16/B374D848'`` (what ``pg_lsn`` accepts)."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def pg_time(micros: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=micros)


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    key: bool  # part of the replica identity


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str  # d (default: primary key) | n (nothing) | f (full) | i (index)
    columns: tuple[Column, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass
class Change:
    """One row change as pgoutput sent it."""

    relation: Relation
    operation: str  # INSERT | UPDATE | DELETE
    new: dict[str, Any] | None
    #: the old row: the whole row with REPLICA IDENTITY FULL, the key columns only otherwise (DELETE, or an
    #: UPDATE that changed the key); None when the server sent none (an UPDATE that kept its key)
    old: dict[str, Any] | None
    keys: dict[str, Any] = field(default_factory=dict)
    unchanged_toast: tuple[str, ...] = ()


@dataclass
class Transaction:
    xid: int
    final_lsn: int  # the commit record's LSN (Begin's final_lsn = Commit's commit_lsn)
    commit_time: datetime
    end_lsn: int | None = None  # the end of the commit record (set by Commit)
    changes: list[Change] = field(default_factory=list)
    messages: int = 0  # messages of this transaction (Begin and Commit included)


def _convert(type_oid: int, text: str) -> Any:
    try:
        if type_oid in _INT_TYPES:
            return int(text)
        if type_oid == _BOOL:
            return text == "t"
        if type_oid in _FLOAT_TYPES:
            return float(text)
        if type_oid == _NUMERIC:
            return Decimal(text)
        if type_oid in _JSON_TYPES:
            return json.loads(text)
    except (ValueError, ArithmeticError):
        return text  # NaN, Infinity and the like stay text
    return text


class _Buffer:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise PgOutputError("truncated pgoutput message")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def byte(self) -> str:
        return chr(self.take("!B"))

    def string(self) -> str:
        end = self.data.index(b"\0", self.pos)
        value = self.data[self.pos:end].decode("utf-8")
        self.pos = end + 1
        return value

    def raw(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise PgOutputError("truncated pgoutput message")
        value = self.data[self.pos:self.pos + size]
        self.pos += size
        return value


class PgOutputDecoder:
    """Feed messages in order (``feed``); complete transactions come out of ``feed`` as they commit.

    Relation messages are remembered across calls (each peek re-sends the ones it uses, so one decoder
    may serve a whole source); a change of a relation never described is a :class:`PgOutputError`.
    """

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self._txn: Transaction | None = None

    def feed(self, message: bytes) -> Transaction | None:
        buf = _Buffer(bytes(message))
        kind = buf.byte()
        if kind == "B":
            final_lsn, commit_time, xid = buf.take("!Q"), buf.take("!q"), buf.take("!I")
            self._txn = Transaction(xid=xid, final_lsn=final_lsn, commit_time=pg_time(commit_time), messages=1)
            return None
        if kind == "R":
            self._relation(buf)
        elif kind in "IUD":
            self._in_txn(kind).changes.append(self._change(kind, buf))
        elif kind == "C":
            txn = self._in_txn(kind)
            buf.take("!B")  # flags (unused)
            commit_lsn, end_lsn, _commit_time = buf.take("!Q"), buf.take("!Q"), buf.take("!q")
            if commit_lsn != txn.final_lsn:
                raise PgOutputError(f"commit at {format_lsn(commit_lsn)} does not match begin "
                                    f"{format_lsn(txn.final_lsn)}")
            txn.end_lsn = end_lsn
            txn.messages += 1
            self._txn = None
            return txn
        elif kind not in "YOTM":
            raise PgOutputError(f"unknown pgoutput message type {kind!r}")
        if self._txn is not None:
            self._txn.messages += 1
        return None

    def _in_txn(self, kind: str) -> Transaction:
        if self._txn is None:
            raise PgOutputError(f"pgoutput message {kind!r} outside a transaction")
        self._txn.messages += 1
        return self._txn

    def _relation(self, buf: _Buffer) -> None:
        oid = buf.take("!I")
        schema, name = buf.string(), buf.string()
        identity = buf.byte()
        columns = []
        for _ in range(buf.take("!H")):
            flags = buf.take("!B")
            col_name = buf.string()
            type_oid = buf.take("!I")
            buf.take("!i")  # typmod
            columns.append(Column(col_name, type_oid, bool(flags & 1)))
        self.relations[oid] = Relation(oid, schema or "pg_catalog", name, identity, tuple(columns))

    def _tuple(self, relation: Relation, buf: _Buffer) -> tuple[dict[str, Any], list[str]]:
        row: dict[str, Any] = {}
        toasted: list[str] = []
        count = buf.take("!H")
        if count > len(relation.columns):
            raise PgOutputError(f"{relation.qualified}: {count} columns sent, {len(relation.columns)} described")
        for column in relation.columns[:count]:
            kind = buf.byte()
            if kind == "n":
                row[column.name] = None
            elif kind == "u":
                toasted.append(column.name)
            elif kind in "tb":
                data = buf.raw(buf.take("!I"))
                row[column.name] = _convert(column.type_oid, data.decode("utf-8")) if kind == "t" else data
            else:
                raise PgOutputError(f"unknown tuple column kind {kind!r}")
        return row, toasted

    def _change(self, kind: str, buf: _Buffer) -> Change:
        oid = buf.take("!I")
        relation = self.relations.get(oid)
        if relation is None:
            raise PgOutputError(f"change of relation {oid} before its Relation message")
        key_names = [c.name for c in relation.columns if c.key]
        old: dict[str, Any] | None = None
        new: dict[str, Any] | None = None
        toasted: list[str] = []
        marker = buf.byte()
        if marker in "KO":
            old, _ = self._tuple(relation, buf)
            if marker == "K":  # the key columns only; the others are sent as nulls
                old = {k: old.get(k) for k in key_names}
            if kind == "U":
                marker = buf.byte()
        if kind in "IU":
            if marker != "N":
                raise PgOutputError(f"{kind} message without a new tuple")
            new, toasted = self._tuple(relation, buf)
            if toasted and old is not None:  # REPLICA IDENTITY FULL: the old row has the value
                for name in [n for n in toasted if n in old]:
                    new[name] = old[name]
                toasted = [n for n in toasted if n not in new]
        image = new if new is not None else (old or {})
        keys = {k: image.get(k) for k in key_names if k in image}
        operation = {"I": "INSERT", "U": "UPDATE", "D": "DELETE"}[kind]
        return Change(relation, operation, new, old, keys, tuple(toasted))
