"""A table derived from the ``stream_events`` sink: events per minute and event name, over a window.

Why a full rebuild of the window rather than an incremental count: ``stream_events.inserted_at`` is the
inserting transaction's start, so a transaction that began before a watermark can commit after it, and an
incremental count that trusted the watermark would miss its rows. Rebuilding the window in one transaction
is correct whatever commits late (a backlog drained hours later lands in the minutes its events belong to),
and it costs one scan of the stream's rows in the window. No Dagster import: the asset that keeps it fresh
is ``orchestration/rollups.py``. It lives with the audit tables (a pandas table that reads what a sink wrote),
above the core: ``sinks/`` stay writers that import nothing but the event shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from durability_pipelines.audit.tables import persist
from durability_pipelines.checkpoints.postgres_store import PostgresConnection

#: The derived table's columns: name -> (SQL type, description). Minutes are the events' own time
#: (``event_created_at``: the stream's ApproximateCreationDateTime or the change's commit time), or the
#: insert time when the source gives none.
COLUMNS: dict[str, tuple[str, str]] = {
    "minute": ("TIMESTAMPTZ", "the minute the events happened (UTC, truncated)"),
    "event_name": ("TEXT", "INSERT / MODIFY / REMOVE (DynamoDB) or INSERT / UPDATE / DELETE (Postgres)"),
    "events": ("BIGINT", "events of that name in that minute, each stored once in stream_events"),
    "last_inserted_at": ("TIMESTAMPTZ", "when the newest of them was written to stream_events"),
}

_QUERY = """
SELECT date_trunc('minute', COALESCE(event_created_at, inserted_at)) AS minute, event_name,
       count(*) AS events, max(inserted_at) AS last_inserted_at
FROM stream_events
WHERE stream = %s AND COALESCE(event_created_at, inserted_at) >= now() - make_interval(secs => %s)
GROUP BY 1, 2 ORDER BY 1, 2
"""


def rollup_table(consumer: str) -> str:
    """``<consumer>_events_per_minute``: one table per consumer, so that two rollups never rebuild each
    other's rows."""
    return f"{consumer}_events_per_minute"


@dataclass(frozen=True)
class Rollup:
    """What one rebuild wrote."""

    table: str
    frame: pd.DataFrame
    events: int
    newest_minute: datetime | None
    events_newest_minute: int


def events_per_minute(db: PostgresConnection, stream: str, window_s: float) -> pd.DataFrame:
    """The stream's events per minute and event name over the last ``window_s`` seconds."""
    with db.connection() as conn:
        rows = conn.execute(_QUERY, (stream, float(window_s))).fetchall()
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["events"] = frame["events"].astype("int64")
    return frame


def rebuild(db: PostgresConnection, consumer: str, stream: str, window_s: float) -> Rollup:
    """Rebuild ``<consumer>_events_per_minute`` from ``stream_events`` (one transaction: readers see the old
    table or the new one)."""
    frame = events_per_minute(db, stream, window_s)
    table = rollup_table(consumer)
    persist(db, table, frame, COLUMNS)
    if frame.empty:
        return Rollup(table, frame, 0, None, 0)
    newest = frame["minute"].max()
    return Rollup(table, frame, int(frame["events"].sum()), newest.to_pydatetime() if hasattr(newest, "to_pydatetime")
                  else newest, int(frame.loc[frame["minute"] == newest, "events"].sum()))
