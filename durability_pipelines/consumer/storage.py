"""Postgres tables of the consumer layer: dead letters, trim gaps, cursor mirror.

One small class per concern would be overkill: these are a few statements
each, all keyed by consumer and shard, and always used together by the job
and the sensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from durability_pipelines.checkpoints.postgres_store import PostgresConnection, ensure_schema
from durability_pipelines.checkpoints.postgres_store import migrate as migrate_checkpoints

SCHEMA_VERSION = 1
SCHEMA_SQL = (resources.files("durability_pipelines.consumer") / "schema.sql").read_text()
_LOCK = 72_190_312


def migrate(db: PostgresConnection) -> None:
    """Create every table this project uses (checkpoints first); idempotent."""
    migrate_checkpoints(db)
    with db.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute(SCHEMA_SQL)
        conn.execute(
            "INSERT INTO durability_schema_version (component, version) VALUES ('consumer', %s) "
            "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, applied_at = NOW()",
            (SCHEMA_VERSION,),
        )


def ensure(db: PostgresConnection) -> None:
    """Create the schema if this database lacks it (checked once per process)."""
    ensure_schema(db, "consumer", SCHEMA_VERSION, migrate)


@dataclass(frozen=True)
class DeadLetter:
    id: int
    consumer: str
    adapter: str
    stream: str
    group: str
    shard: str
    first_sequence: str
    last_sequence: str
    record_count: int
    error: str
    attempts: int
    policy: str
    run_id: str | None
    status: str
    created_at: datetime


_DL_COLS = ("id, consumer, adapter, stream, grp, shard, first_sequence, last_sequence, record_count, error, "
            "attempts, policy, run_id, status, created_at")


class ConsumerStorage:
    def __init__(self, db: PostgresConnection) -> None:
        self.db = db

    # -- dead letters ----------------------------------------------------------------
    def add_dead_letter(self, *, consumer: str, adapter: str, stream: str, group: str, shard: str | None,
                        first_sequence: str, last_sequence: str, record_count: int, error: str, attempts: int,
                        policy: str, run_id: str | None, payload: Any = None) -> int:
        with self.db.connection() as conn:
            (dl_id,) = conn.execute(
                """INSERT INTO dead_letters (consumer, adapter, stream, grp, shard, first_sequence, last_sequence,
                   record_count, error, attempts, policy, run_id, payload, status)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
                (consumer, adapter, stream, group, shard or "", first_sequence, last_sequence, record_count,
                 error[:4000], attempts, policy, run_id, json.dumps(payload) if payload is not None else None,
                 "open" if policy == "stop" else "resolved"),
            ).fetchone()
        return int(dl_id)

    def dead_letters(self, consumer: str | None = None, *, status: str | None = None) -> list[DeadLetter]:
        where, params = [], []
        if consumer:
            where.append("consumer = %s")
            params.append(consumer)
        if status:
            where.append("status = %s")
            params.append(status)
        sql = f"SELECT {_DL_COLS} FROM dead_letters"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.db.connection() as conn:
            rows = conn.execute(sql + " ORDER BY id", params).fetchall()
        return [DeadLetter(*r) for r in rows]

    def blocked_shards(self, consumer: str) -> set[str]:
        """Shards with an open dead letter: not dispatched until an operator acts."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT DISTINCT shard FROM dead_letters WHERE consumer = %s AND status = 'open'", (consumer,)
            ).fetchall()
        return {r[0] for r in rows}

    def set_dead_letter_status(self, dl_id: int, status: str, *, by: str, note: str | None = None) -> bool:
        with self.db.connection() as conn:
            row = conn.execute(
                """UPDATE dead_letters SET status = %s, resolved_at = NOW(), resolved_by = %s, note = %s
                   WHERE id = %s RETURNING id""",
                (status, by, note, dl_id),
            ).fetchone()
        return row is not None

    # -- trimmed-data gaps -------------------------------------------------------------
    def add_gap(self, *, consumer: str, adapter: str, stream: str, group: str, shard: str | None,
                from_sequence: str | None, to_sequence: str | None, reason: str, run_id: str | None) -> None:
        with self.db.connection() as conn:
            conn.execute(
                """INSERT INTO stream_gaps (consumer, adapter, stream, grp, shard, from_sequence, to_sequence,
                   reason, run_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                (consumer, adapter, stream, group, shard or "", from_sequence, to_sequence, reason, run_id),
            )

    def gaps(self, consumer: str | None = None) -> list[dict[str, Any]]:
        with self.db.connection() as conn:
            cur = conn.execute(
                "SELECT * FROM stream_gaps" + (" WHERE consumer = %s" if consumer else "") + " ORDER BY id",
                (consumer,) if consumer else (),
            )
            cols = [c.name for c in cur.description or []]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    # -- sensor cursor mirror (Postgres side) ------------------------------------------
    def save_cursor(self, sensor_name: str, cursor: str) -> None:
        with self.db.connection() as conn:
            conn.execute(
                """INSERT INTO sensor_cursors (sensor_name, cursor) VALUES (%s, %s)
                   ON CONFLICT (sensor_name) DO UPDATE SET cursor = EXCLUDED.cursor, updated_at = NOW()""",
                (sensor_name, cursor),
            )

    def all_cursors(self) -> dict[str, str]:
        with self.db.connection() as conn:
            return dict(conn.execute("SELECT sensor_name, cursor FROM sensor_cursors").fetchall())

    def insert_cursors(self, cursors: dict[str, str]) -> None:
        """Add cursors that are not stored yet (never overwrites: each tick writes its own)."""
        if not cursors:
            return
        names, values = zip(*cursors.items(), strict=True)
        with self.db.connection() as conn:
            conn.execute(
                "INSERT INTO sensor_cursors (sensor_name, cursor) SELECT * FROM unnest(%s::text[], %s::text[]) "
                "ON CONFLICT (sensor_name) DO NOTHING", (list(names), list(values)))

    def load_cursor(self, sensor_name: str) -> str | None:
        with self.db.connection() as conn:
            row = conn.execute("SELECT cursor FROM sensor_cursors WHERE sensor_name = %s", (sensor_name,)).fetchone()
        return row[0] if row else None
