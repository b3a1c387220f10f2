"""The default handler: every event into ``stream_events``, replay-safe.

Rows are keyed by (stream, shard, sequence) with ``ON CONFLICT DO NOTHING``, so
a batch delivered twice creates no duplicate.  The handler is transactional:
when the checkpoint store is Postgres, the rows and the checkpoint commit in
one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg

from durability_pipelines.consumer.events import ChangeEvent, json_safe
from durability_pipelines.consumer.handlers import HandlerContext, SinkDescription, transactional, writes_sink

INSERT_SQL = """
INSERT INTO stream_events (stream, shard, sequence, adapter, event_name, keys, new_image, old_image,
                           event_created_at, event_id, consumer)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::jsonb[], %s::jsonb[],
                     %s::jsonb[], %s::timestamptz[], %s::text[], %s::text[])
ON CONFLICT (stream, shard, sequence) DO NOTHING
"""


def _j(value: object) -> str | None:
    return None if value is None else json.dumps(json_safe(value))


def write_events(conn: psycopg.Connection, events: Sequence[ChangeEvent], consumer: str) -> int:
    """Insert the events in one statement; returns how many were new."""
    if not events:
        return 0
    cols: list[list[object]] = [[] for _ in range(11)]
    for e in events:
        row = (e.stream, e.shard or "", e.sequence, e.adapter, e.event_name, _j(e.keys), _j(e.new_image),
               _j(e.old_image), e.created_at, e.event_id, consumer)
        for col, value in zip(cols, row, strict=True):
            col.append(value)
    cur = conn.execute(INSERT_SQL, cols)
    return cur.rowcount


def _stream_events_sink(options: dict[str, Any], stream: str) -> SinkDescription:
    return SinkDescription(
        "stream_events", ("postgres",), "Postgres table stream_events: one row per change event, keyed by "
        "(stream, shard, sequence), written in the checkpoint's transaction when the store is Postgres")


@transactional
@writes_sink(_stream_events_sink)
def handle(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    if ctx.connection is None:
        raise RuntimeError("postgres_events.handle needs a Postgres connection (it is a transactional handler)")
    inserted = write_events(ctx.connection, events, ctx.consumer)
    ctx.log.info("stream_events: %d new of %d events", inserted, len(events))

