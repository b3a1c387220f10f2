"""Issue 21 item 3: change-log rows removed outside the project's purge are trimmed data, never a silent skip.

The attack: a lagging consumer; someone runs ``DELETE FROM durability_change_log WHERE captured_at < ...``
(or ``TRUNCATE``). Before the fix the reader read on past the hole with no trace. Now the statement
triggers record the removed range in ``<log>_removals`` and the reader reaches it as trimmed data under
``trim_policy``: ``fail`` stops naming the range (``ChangeLogGapError``, a ``TrimmedDataError``),
``skip_to_trim_horizon`` writes a ``stream_gaps`` row and goes on. What is NOT a removal: a rolled-back
insert (its id is a hole too), the project's purge, and rows the consumer had already read.

Real Postgres (the session test database); each test has its own source table and change log.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from durability_pipelines.checkpoints import CheckpointKey, StoreConfig
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from durability_pipelines.consumer.adapters.supabase import SupabaseChangeFeedSource, build_supabase_source
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.runtime import open_runtime
from durability_pipelines.sources.errors import TrimmedDataError
from durability_pipelines.sources.supabase_changes import (
    ChangeLogGapError,
    ChangeRow,
    install_change_feed,
    purge_acked,
    purge_channel,
    uninstall_change_feed,
)
from tests import test_supabase_change_feed
from tests.test_supabase_change_feed import Feed, make_table, read_until
from tests.test_wal_source import drain

feed = test_supabase_change_feed.feed  # the fixture: its own source table and change log per test


def config(feed: Feed, policy: str = "fail", **overrides: Any) -> ConsumerConfig:
    return ConsumerConfig.model_validate({
        "name": "cl_" + uuid.uuid4().hex[:6], "group": "g", "consumer": "c", "max_events": 10,
        "checkpoint": StoreConfig(backend="postgres"),
        "source": {"kind": "supabase", "channel": f"ch-{feed.table}", "table": feed.table, "change_log": feed.log,
                   "replay_from": "earliest", "trim_policy": policy},
        **overrides})


def source(feed: Feed, policy: str = "fail") -> SupabaseChangeFeedSource:
    return build_supabase_source(config(feed, policy), postgres_url=feed.url)


def written(feed: Feed, conn: psycopg.Connection, count: int) -> list[ChangeRow]:
    """``count`` inserts, one transaction each, read back settled."""
    feed.insert(conn, *range(1, count + 1))
    with feed.reader() as reader:
        rows = read_until(reader, None, count)
    assert len(rows) == count
    return rows


def delete_by_age(feed: Feed, conn: psycopg.Connection, up_to: ChangeRow) -> int:
    """The attack: the usual time-based retention written by hand, next to the project's purge."""
    return conn.execute(sql.SQL("DELETE FROM {} WHERE captured_at <= %s").format(sql.Identifier(feed.log)),
                        (up_to.captured_at,)).rowcount


def removals(feed: Feed, conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(sql.SQL("SELECT operation, from_position::text, to_position::text, row_count FROM {} "
                                "ORDER BY id").format(sql.Identifier(f"{feed.log}_removals"))).fetchall()


def test_a_delete_by_age_under_a_lagging_consumer_stops_it_naming_the_removed_range(
        feed: Feed, pg_conn: psycopg.Connection) -> None:
    rows = written(feed, pg_conn, 10)
    checkpoint = rows[2].sequence  # the consumer acked 3 rows and lags
    assert delete_by_age(feed, pg_conn, rows[5]) == 6  # 3 read, 3 never read
    src = source(feed, "fail")
    try:
        assert src.has_new(None, checkpoint)
        with pytest.raises(ChangeLogGapError) as err:
            src.read(None, checkpoint, 10)
    finally:
        src.close()
    assert isinstance(err.value, TrimmedDataError)  # the orchestration stops the shard as for DynamoDB's trims
    assert err.value.from_sequence == checkpoint and err.value.to_sequence == rows[5].sequence
    message = str(err.value)
    assert f"{rows[0].position}..{rows[5].position}" in message and "6 change-log row(s)" in message
    assert "DELETE" in message and "skip_to_trim_horizon" in message and "change-feed purge" in message


def test_rows_still_below_a_removed_range_are_delivered_before_the_consumer_stops(
        feed: Feed, pg_conn: psycopg.Connection) -> None:
    rows = written(feed, pg_conn, 8)
    pg_conn.execute(sql.SQL("DELETE FROM {} WHERE id BETWEEN %s AND %s").format(sql.Identifier(feed.log)),
                    (rows[4].id, rows[5].id))
    src = source(feed, "fail")
    try:
        batch = src.read(None, rows[1].sequence, 10)
        assert [e.sequence for e in batch.events] == [r.sequence for r in rows[2:4]] and batch.gap is None
        with pytest.raises(ChangeLogGapError) as err:
            src.read(None, batch.next_checkpoint, 10)
        assert err.value.to_sequence == rows[5].sequence
    finally:
        src.close()


def test_skip_records_the_removed_range_in_stream_gaps_once_and_goes_on(
        feed: Feed, pg_conn: psycopg.Connection, redis_url: str) -> None:
    rows = written(feed, pg_conn, 10)
    delete_by_age(feed, pg_conn, rows[5])
    cfg = config(feed, "skip_to_trim_horizon")
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=feed.url,
                      source=build_supabase_source(cfg, postgres_url=feed.url))
    seen: list[ChangeEvent] = []
    try:
        rt.store.save(rt.key(None), rows[2].sequence)
        drain(rt, seen)
        drain(rt, seen)  # a second run: the range lies below the checkpoint now
        gaps = rt.storage.gaps(cfg.name)
        acked = rt.store.load(rt.key(None))
    finally:
        rt.close()
    assert [e.sequence for e in seen] == [r.sequence for r in rows[6:]]
    assert len(gaps) == 1
    assert gaps[0]["from_sequence"] == rows[2].sequence and gaps[0]["to_sequence"] == rows[5].sequence
    assert "DELETE" in gaps[0]["reason"] and "6 change-log row(s)" in gaps[0]["reason"]
    assert acked == rows[9].sequence


@pytest.mark.parametrize("policy", ["fail", "skip_to_trim_horizon"])
def test_a_truncate_under_a_lagging_consumer_is_trimmed_data(
        policy: str, feed: Feed, pg_conn: psycopg.Connection) -> None:
    rows = written(feed, pg_conn, 5)
    pg_conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.Identifier(feed.log)))
    assert removals(feed, pg_conn) == [("TRUNCATE", str(rows[0].position), str(rows[4].position), 5)]
    src = source(feed, policy)
    try:
        assert src.has_new(None, rows[1].sequence)  # nothing left in the log, yet the sensor must start a run
        if policy == "fail":
            with pytest.raises(ChangeLogGapError, match="TRUNCATE"):
                src.read(None, rows[1].sequence, 10)
            return
        batch = src.read(None, rows[1].sequence, 10)
        assert batch.gap is not None and not batch.events and batch.next_checkpoint == rows[4].sequence
        assert "TRUNCATE" in batch.gap.reason
        assert not src.has_new(None, batch.next_checkpoint)
        feed.insert(pg_conn, 100)  # ids restart at 1; positions still grow with the transaction id
        with feed.reader() as reader:
            read_until(reader, int(batch.next_checkpoint), 1)
        after = src.read(None, batch.next_checkpoint, 10)
        assert [e.keys for e in after.events] == [{"id": 100}] and after.gap is None
    finally:
        src.close()


def test_a_rolled_back_insert_leaves_an_id_hole_that_is_not_a_removal(
        feed: Feed, pg_conn: psycopg.Connection) -> None:
    feed.insert(pg_conn, 1)
    with pytest.raises(psycopg.errors.UniqueViolation), pg_conn.transaction():
        feed.insert(pg_conn, 2)  # takes an id from the log's sequence...
        feed.insert(pg_conn, 2)  # ...and rolls back
    feed.insert(pg_conn, 3)
    src = source(feed, "fail")
    try:
        with feed.reader() as reader:
            rows = read_until(reader, None, 2)
        assert rows[1].id - rows[0].id > 1  # the hole
        first = src.read(None, rows[0].sequence, 10)
        assert [e.keys for e in first.events] == [{"id": 3}]
    finally:
        src.close()
    assert removals(feed, pg_conn) == []


def test_the_projects_purge_is_not_a_removal(feed: Feed, pg_conn: psycopg.Connection) -> None:
    rows = written(feed, pg_conn, 6)
    channel = f"ch-{feed.table}"
    store = PostgresCheckpointStore(feed.url)
    try:
        store.save(CheckpointKey("supabase", channel, "g", "c"), rows[2].sequence)
        assert purge_channel(pg_conn, channel, table=feed.table, change_log=feed.log) == 3
        # in the caller's transaction, the marker is off again after the purge: a later DELETE is recorded
        with pg_conn.transaction():
            assert purge_acked(pg_conn, feed.log, rows[3].position, table=feed.table) == 1
            pg_conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(sql.Identifier(feed.log)), (rows[5].id,))
    finally:
        store.close()
    assert [r[0] for r in removals(feed, pg_conn)] == ["DELETE"]
    assert removals(feed, pg_conn)[0][1:] == (rows[5].sequence, rows[5].sequence, 1)
    src = source(feed, "fail")
    try:
        assert [e.sequence for e in src.read(None, rows[2].sequence, 10).events] == [rows[4].sequence]
    finally:
        src.close()


def test_rows_the_consumer_had_already_read_are_not_a_gap(feed: Feed, pg_conn: psycopg.Connection) -> None:
    rows = written(feed, pg_conn, 8)
    other = Feed(feed.url, f"other_{uuid.uuid4().hex[:8]}", feed.log)  # a second table writing to the same log
    make_table(pg_conn, other.table)
    install_change_feed(pg_conn, other.table, change_log=feed.log)
    try:
        delete_by_age(feed, pg_conn, rows[4])  # read already: the consumer is at rows[5]
        other.insert(pg_conn, 1, 2)
        pg_conn.execute(sql.SQL("DELETE FROM {} WHERE table_name = %s").format(sql.Identifier(feed.log)),
                        (other.table,))  # another table's rows: not this consumer's changes
        src = source(feed, "fail")
        try:
            batch = src.read(None, rows[5].sequence, 10)
        finally:
            src.close()
        assert [e.sequence for e in batch.events] == [r.sequence for r in rows[6:]] and batch.gap is None
        assert len(removals(feed, pg_conn)) == 2
        # the purge forgets removals every consumer has read past
        purge_acked(pg_conn, feed.log, rows[7].position, table=feed.table)
        assert [r[0] for r in removals(feed, pg_conn)] == ["DELETE"]  # the other table's stays
    finally:
        uninstall_change_feed(pg_conn, other.table, change_log=feed.log)
        pg_conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(other.table)))


def test_a_delete_run_in_batches_is_one_gap_not_one_per_batch(feed: Feed, pg_conn: psycopg.Connection) -> None:
    rows = written(feed, pg_conn, 9)
    for lo, hi in ((1, 3), (4, 6)):
        pg_conn.execute(sql.SQL("DELETE FROM {} WHERE id BETWEEN %s AND %s").format(sql.Identifier(feed.log)),
                        (rows[lo].id, rows[hi].id))
    src = source(feed, "skip_to_trim_horizon")
    try:
        batch = src.read(None, rows[0].sequence, 10)
    finally:
        src.close()
    assert batch.gap is not None and batch.gap.to_sequence == rows[6].sequence
    assert "2 DELETE statement(s)" in batch.gap.reason
    assert [e.sequence for e in batch.events] == [r.sequence for r in rows[7:]]


def test_an_install_of_an_older_version_reads_on_and_reinstalling_adds_the_detection(
        feed: Feed, pg_conn: psycopg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    log = sql.Identifier(feed.log)
    for trigger in (f"durability_delete_{feed.log}", f"durability_truncate_{feed.log}"):
        pg_conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trigger), log))
    pg_conn.execute(sql.SQL("DROP FUNCTION {}()").format(sql.Identifier(f"{feed.log}_removal")))
    pg_conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(f"{feed.log}_removals")))  # = before this version
    rows = written(feed, pg_conn, 4)
    src = source(feed, "fail")
    try:
        with caplog.at_level(logging.WARNING):
            assert len(src.read(None, rows[0].sequence, 10).events) == 3
        assert "change-feed install" in caplog.text
    finally:
        src.close()
    install_change_feed(pg_conn, feed.table, change_log=feed.log)  # the upgrade
    delete_by_age(feed, pg_conn, rows[2])
    src = source(feed, "fail")
    try:
        with pytest.raises(ChangeLogGapError):
            src.read(None, rows[0].sequence, 10)
    finally:
        src.close()
