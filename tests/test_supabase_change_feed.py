"""Supabase change feed against a real Postgres: install, capture, late commits, resume, replay, purge.

Every test uses its own source table and change log, so tests never see each other's rows. Reads
that must eventually return rows poll with a generous hang guard: the visibility horizon is
cluster-wide, so a transaction held open by anything else on the server only delays them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from durability_pipelines.checkpoints import CheckpointKey
from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from durability_pipelines.consumer.adapters import build_source
from durability_pipelines.consumer.adapters.supabase import NoCheckpointError, SupabaseChangeFeedSource
from durability_pipelines.consumer.config import ConsumerConfig, SupabaseSourceConfig
from durability_pipelines.sources.supabase_changes import (
    ID_SPAN,
    ChangeFeedAccessError,
    ChangeFeedNotInstalledError,
    ChangeFeedReader,
    ChangeRow,
    CheckpointAheadError,
    decode_position,
    encode_position,
    install_change_feed,
    min_acked_position,
    purge_acked,
    purge_channel,
    uninstall_change_feed,
)

HANG_GUARD_S = 60.0


@dataclass
class Feed:
    url: str
    table: str
    log: str

    def reader(self, **kwargs: Any) -> ChangeFeedReader:
        return ChangeFeedReader(self.url, change_log=self.log, table=self.table, **kwargs)

    def insert(self, conn: psycopg.Connection, *ids: int, status: str = "new") -> None:
        for i in ids:
            conn.execute(sql.SQL("INSERT INTO {} (id, status, amount) VALUES (%s, %s, %s)").format(
                sql.Identifier(self.table)), (i, status, i * 1.5))


def make_table(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, status text, amount numeric)").format(
        sql.Identifier(name)))


@pytest.fixture
def feed(pg_conn: psycopg.Connection, postgres_url: str) -> Iterator[Feed]:
    suffix = uuid.uuid4().hex[:8]
    f = Feed(postgres_url, f"orders_{suffix}", f"cl_{suffix}")
    make_table(pg_conn, f.table)
    install_change_feed(pg_conn, f.table, change_log=f.log)
    yield f
    uninstall_change_feed(pg_conn, f.table, change_log=f.log, drop_change_log=True)
    pg_conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f.table)))


def read_until(reader: ChangeFeedReader, after: int | None, count: int, *, limit: int = 1000) -> list[ChangeRow]:
    """Read until ``count`` rows came back (hang guard only: a foreign open transaction delays them)."""
    deadline = time.monotonic() + HANG_GUARD_S
    got: list[ChangeRow] = []
    while True:
        got += reader.read(got[-1].position if got else after, limit)
        if len(got) >= count or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


# -- install -------------------------------------------------------------------------------------


def _triggers(conn: psycopg.Connection, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal", (table,)
    ).fetchall()
    return [r[0] for r in rows]


def test_install_is_idempotent(feed: Feed, pg_conn: psycopg.Connection) -> None:
    install_change_feed(pg_conn, feed.table, change_log=feed.log)
    install_change_feed(pg_conn, f"public.{feed.table}", change_log=f"public.{feed.log}")
    assert _triggers(pg_conn, feed.table) == [f"durability_capture_{feed.log}"]
    feed.insert(pg_conn, 1)
    with feed.reader() as reader:
        assert [r.operation for r in read_until(reader, None, 1)] == ["INSERT"]  # captured once, not 3 times


def test_install_concurrently_from_two_connections(pg_conn: psycopg.Connection, postgres_url: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    tables, log = [f"a_{suffix}", f"b_{suffix}"], f"cl_{suffix}"
    for t in tables:
        make_table(pg_conn, t)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def install(table: str) -> None:
        try:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                barrier.wait(HANG_GUARD_S)
                install_change_feed(conn, table, change_log=log)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=install, args=(t,)) for t in (*tables, *tables)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert errors == []
    try:
        for t in tables:
            assert _triggers(pg_conn, t) == [f"durability_capture_{log}"]
    finally:
        for t in tables:
            uninstall_change_feed(pg_conn, t, change_log=log, drop_change_log=True)
            pg_conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(t)))


def test_install_on_a_missing_table_says_so(pg_conn: psycopg.Connection) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        install_change_feed(pg_conn, f"missing_{uuid.uuid4().hex[:8]}", change_log="cl_missing")


def test_reader_on_a_database_without_the_feed_names_the_fix(postgres_url: str) -> None:
    reader = ChangeFeedReader(postgres_url, change_log=f"nope_{uuid.uuid4().hex[:8]}", table="orders")
    with reader, pytest.raises(ChangeFeedNotInstalledError, match="install_change_feed"):
        reader.read(None, 10)


# -- capture -------------------------------------------------------------------------------------


def test_insert_update_delete_are_captured_with_old_records(feed: Feed, pg_conn: psycopg.Connection) -> None:
    feed.insert(pg_conn, 1)
    pg_conn.execute(sql.SQL("UPDATE {} SET status = 'paid' WHERE id = 1").format(sql.Identifier(feed.table)))
    pg_conn.execute(sql.SQL("DELETE FROM {} WHERE id = 1").format(sql.Identifier(feed.table)))
    with feed.reader() as reader:
        rows = read_until(reader, None, 3)
    assert [r.operation for r in rows] == ["INSERT", "UPDATE", "DELETE"]
    ins, upd, dele = rows
    assert ins.record == {"id": 1, "status": "new", "amount": 1.5} and ins.old_record is None
    assert upd.record is not None and upd.record["status"] == "paid"
    assert upd.old_record is not None and upd.old_record["status"] == "new"
    assert dele.record is None and dele.old_record is not None and dele.old_record["status"] == "paid"
    assert [r.keys for r in rows] == [{"id": 1}] * 3  # from the primary key, old image for DELETE
    assert all(r.table_name == feed.table and r.schema_name == "public" for r in rows)
    positions = [r.position for r in rows]
    assert positions == sorted(positions) and len(set(positions)) == 3
    assert all(decode_position(r.position) == (r.txid, r.id) for r in rows)


def test_position_encoding_round_trips_and_fits_a_checkpoint() -> None:
    biggest = encode_position(2**64 - 1, ID_SPAN - 1)
    assert len(str(biggest)) <= 40  # checkpoint sequences are at most 40 digits
    assert decode_position(encode_position(745, 12)) == (745, 12)
    assert encode_position(745, ID_SPAN - 1) < encode_position(746, 1)


# -- late commits --------------------------------------------------------------------------------


def test_a_late_commit_holding_a_lower_id_is_not_skipped(feed: Feed, pg_conn: psycopg.Connection) -> None:
    with psycopg.connect(feed.url) as a, psycopg.connect(feed.url) as b, feed.reader() as reader:
        feed.insert(a, 1)  # transaction A: lower id, still open
        feed.insert(b, 2)  # transaction B: higher id, committed
        b.commit()
        assert reader.read(None, 100) == []  # nothing past A's row: B's row must not come first
        assert reader.has_new(None) is False
        a.commit()
        rows = read_until(reader, None, 2)
    assert [r.record["id"] for r in rows if r.record] == [1, 2]
    assert rows[0].id < rows[1].id


def test_an_older_transaction_writing_after_a_newer_one_is_not_skipped(feed: Feed) -> None:
    """Why the cursor is (txid, id): B takes its xid first, A inserts first (lower id) and stays open.

    B's row is below the horizon and is delivered while A runs; an id cursor would now sit past
    A's id and lose A's row when A commits. The (txid, id) position still delivers it.
    """
    with psycopg.connect(feed.url) as a, psycopg.connect(feed.url) as b, feed.reader() as reader:
        b.execute("SELECT pg_current_xact_id()")  # B gets the older xid
        feed.insert(a, 1)                          # A: newer xid, lower change-log id, open
        feed.insert(b, 2)                          # B: higher change-log id
        b.commit()
        first = read_until(reader, None, 1)
        assert [r.record["id"] for r in first if r.record] == [2]
        a_row_id = first[0].id - 1
        assert reader.read(first[-1].position, 100) == []  # A still running
        a.commit()
        rest = read_until(reader, first[-1].position, 1)
    assert [(r.id, r.record["id"] if r.record else None) for r in rest] == [(a_row_id, 1)]
    assert rest[0].id < first[0].id < first[0].position < rest[0].position


def test_rolled_back_changes_never_appear(feed: Feed, pg_conn: psycopg.Connection) -> None:
    with psycopg.connect(feed.url) as a:
        feed.insert(a, 1)
        a.rollback()
    feed.insert(pg_conn, 2)
    with feed.reader() as reader:
        rows = read_until(reader, None, 1)
        assert [r.record["id"] for r in rows if r.record] == [2]
        assert reader.read(rows[-1].position, 100) == []


# -- resume, replay --------------------------------------------------------------------------------


def test_restart_midway_resumes_from_the_cursor(feed: Feed, pg_conn: psycopg.Connection) -> None:
    feed.insert(pg_conn, *range(1, 11))
    with feed.reader() as first:
        part = read_until(first, None, 4, limit=4)
        assert len(part) == 4
    cursor = str(part[-1].position)  # what a checkpoint store would hold
    with feed.reader() as second:  # a new process
        rest = read_until(second, int(cursor), 6)
    ids = [r.record["id"] for r in [*part, *rest] if r.record]
    assert ids == list(range(1, 11))


def _source(feed: Feed, replay_from: str, **kwargs: Any) -> SupabaseChangeFeedSource:
    cfg = ConsumerConfig(
        name="supabase_test", group="workers", consumer="consumer-a",
        source=SupabaseSourceConfig(channel=f"ch-{feed.table}", table=feed.table, change_log=feed.log,
                                    replay_from=replay_from),
    )
    source = build_source(cfg, postgres_url=feed.url, **kwargs)
    assert isinstance(source, SupabaseChangeFeedSource)
    return source


def test_build_source_refuses_an_unknown_option_instead_of_ignoring_it(feed: Feed) -> None:
    cfg = ConsumerConfig(
        name="supabase_test", group="workers", consumer="consumer-a",
        source=SupabaseSourceConfig(channel=f"ch-{feed.table}", table=feed.table, change_log=feed.log),
    )
    with pytest.raises(TypeError, match="unknown_option"):
        build_source(cfg, postgres_url=feed.url, unknown_option="ignored")  # type: ignore[call-arg]


def test_source_events_and_stored_mode(feed: Feed, pg_conn: psycopg.Connection) -> None:
    calls: list[tuple[str, float]] = []
    feed.insert(pg_conn, 1, 2)
    source = _source(feed, "stored", on_call=lambda op, ms: calls.append((op, ms)))
    try:
        assert source.list_shards() == [None] and source.readable({None: None}) == [None]
        assert source.identity is None  # one change log is one stream: nothing for the sensor to compare
        assert source.has_new(None, None) is True  # a run must explain the missing checkpoint
        with pytest.raises(NoCheckpointError, match="replay_from"):
            source.read(None, None, 10)
        # with a checkpoint, 'stored' resumes from it
        rows = read_until(source.reader, None, 2)
        batch = source.read(None, str(rows[0].position), 10)
    finally:
        source.close()
    [event] = batch.events
    assert event.adapter == "supabase" and event.stream == f"ch-{feed.table}" and event.shard is None
    assert event.sequence == str(rows[1].position) and event.event_id == str(rows[1].id)
    assert event.event_name == "INSERT" and event.keys == {"id": 2} and event.new_image == rows[1].record
    assert batch.next_checkpoint == event.sequence and batch.start_after == str(rows[0].position)
    assert calls and all(op.startswith("change_log.") for op, _ in calls)
    key = CheckpointKey("supabase", source.stream, "workers", "consumer-a")
    assert key.redis_key == f"checkpoint:supabase:ch-{feed.table}:workers:consumer-a"


def test_replay_from_earliest_reads_everything_retained(feed: Feed, pg_conn: psycopg.Connection) -> None:
    feed.insert(pg_conn, 1, 2, 3)
    source = _source(feed, "earliest")
    try:
        read_until(source.reader, None, 3)  # settled
        batch = source.read(None, None, 10)
    finally:
        source.close()
    assert [e.new_image["id"] for e in batch.events if e.new_image] == [1, 2, 3]


def test_replay_from_latest_pins_now_and_delivers_only_newer(feed: Feed, pg_conn: psycopg.Connection) -> None:
    feed.insert(pg_conn, 1, 2)
    source = _source(feed, "latest")
    try:
        read_until(source.reader, None, 2)  # the old rows are settled, so "now" is after them
        assert source.has_new(None, None) is True
        pinned = source.read(None, None, 10)
        assert pinned.events == [] and pinned.next_checkpoint is not None
        feed.insert(pg_conn, 3)
        rows = read_until(source.reader, int(pinned.next_checkpoint), 1)
        batch = source.read(None, pinned.next_checkpoint, 10)
    finally:
        source.close()
    assert [r.record["id"] for r in rows if r.record] == [3]
    assert [e.new_image["id"] for e in batch.events if e.new_image] == [3]


def test_a_checkpoint_from_another_database_fails_loudly(feed: Feed) -> None:
    with feed.reader() as reader, pytest.raises(CheckpointAheadError, match="not produced by this database"):
        reader.read(encode_position(2**62, 1), 10)


# -- retention -------------------------------------------------------------------------------------


def _count(conn: psycopg.Connection, log: str, table: str | None = None) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(log))
    if table is None:
        return conn.execute(query).fetchone()[0]
    return conn.execute(query + sql.SQL(" WHERE table_name = %s"), (table,)).fetchone()[0]


def test_purge_deletes_only_what_every_group_acked(feed: Feed, pg_conn: psycopg.Connection) -> None:
    other = f"other_{uuid.uuid4().hex[:8]}"  # a second table writing to the same log
    make_table(pg_conn, other)
    install_change_feed(pg_conn, other, change_log=feed.log)
    try:
        feed.insert(pg_conn, *range(1, 7))
        Feed(feed.url, other, feed.log).insert(pg_conn, 1, 2)
        with feed.reader() as reader:
            rows = read_until(reader, None, 6)
        channel = f"ch-{feed.table}"
        store = PostgresCheckpointStore(feed.url)
        try:
            assert min_acked_position(pg_conn, channel) is None  # nobody checkpointed: purge nothing
            store.save(CheckpointKey("supabase", channel, "fast", "c1"), rows[4].sequence)
            store.save(CheckpointKey("supabase", channel, "slow", "c1"), rows[1].sequence)
            assert min_acked_position(pg_conn, channel) == rows[1].position
            assert min_acked_position(pg_conn, channel, groups=["fast", "slow", "new"]) is None
            deleted = purge_channel(pg_conn, channel, table=feed.table, change_log=feed.log)
            assert deleted == 2
            assert _count(pg_conn, feed.log, feed.table) == 4 and _count(pg_conn, feed.log, other) == 2
            with feed.reader() as reader:  # the slow group resumes where it was
                assert [r.id for r in reader.read(rows[1].position, 100)] == [r.id for r in rows[2:]]
            # keep_last keeps the newest rows even when acked
            assert purge_acked(pg_conn, feed.log, rows[5].position, table=feed.table, keep_last=3) == 1
            assert _count(pg_conn, feed.log, feed.table) == 3
            # a consumer with a sentinel checkpoint has acked nothing
            store.save(CheckpointKey("supabase", channel, "fresh", "c1"), "TRIM_HORIZON")
            assert min_acked_position(pg_conn, channel) is None
        finally:
            store.close()
    finally:
        uninstall_change_feed(pg_conn, other, change_log=feed.log)
        pg_conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(other)))


def test_change_log_is_hidden_from_roles_without_rights(feed: Feed, pg_conn: psycopg.Connection) -> None:
    role = f"api_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        pg_conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(feed.log), sql.Identifier(role)))
        with psycopg.connect(feed.url, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            reader = ChangeFeedReader(connection=conn, change_log=feed.log, table=feed.table)
            with pytest.raises(ChangeFeedAccessError, match="row-level security"):
                reader.read(None, 10)
    finally:
        pg_conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(sql.Identifier(feed.log), sql.Identifier(role)))
        pg_conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))



def test_source_can_install_the_feed_and_finds_the_url_in_the_env(
    pg_conn: psycopg.Connection, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    suffix = uuid.uuid4().hex[:8]
    table, log = f"fresh_{suffix}", f"cl_{suffix}"
    make_table(pg_conn, table)
    monkeypatch.setenv("MY_SUPABASE_DB", postgres_url)
    cfg = ConsumerConfig(
        name="supabase_install", group="workers", consumer="consumer-a",
        source=SupabaseSourceConfig(channel="fresh", table=f"public.{table}", change_log=log,
                                    replay_from="earliest", install=True, db_url_env="MY_SUPABASE_DB"),
    )
    source = build_source(cfg, on_call=None)
    try:
        Feed(postgres_url, table, log).insert(pg_conn, 7)
        read_until(source.reader, None, 1)
        batch = source.read(None, None, 10)
        assert [(e.event_name, e.keys) for e in batch.events] == [("INSERT", {"id": 7})]
    finally:
        source.close()
        uninstall_change_feed(pg_conn, table, change_log=log, drop_change_log=True)
        pg_conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))


def test_rows_order_by_transaction_id_as_a_number_across_digit_boundaries(
    feed: Feed, pg_conn: psycopg.Connection
) -> None:
    """txid 10 sorts after 9 (as text it would sort first, and a batch cut there would skip 9)."""
    log = sql.Identifier(feed.log)
    for txid in (11, 10, 9, 8):  # old transactions, all below the visibility horizon
        pg_conn.execute(sql.SQL(
            "INSERT INTO {} (txid, schema_name, table_name, operation, record) "
            "VALUES (%s::xid8, 'public', %s, 'INSERT', '{{}}'::jsonb)").format(log), (str(txid), feed.table))
    reader = feed.reader()
    first = reader.read(None, 2)
    rest = reader.read(first[-1].position, 10)
    assert [int(r.txid) for r in first] == [8, 9]
    assert [int(r.txid) for r in rest] == [10, 11]
    reader.close()


def test_reinstalling_next_to_a_busy_writer_does_not_deadlock(feed: Feed, pg_conn: psycopg.Connection,
                                                              postgres_url: str) -> None:
    """install takes the source table's lock before the log's, in the same order as writers."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            i = 10_000
            while not stop.is_set():
                try:
                    feed.insert(conn, i)
                except psycopg.Error as exc:
                    errors.append(exc)
                    return
                i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            for _ in range(25):
                install_change_feed(conn, feed.table, change_log=feed.log)
    finally:
        stop.set()
        t.join()
    assert errors == []
