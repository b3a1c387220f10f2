"""Realtime sink: realtime.send in the checkpoint's transaction (exactly once), REST broadcast, and
the real supabase-py client against the local Realtime server (tests/support/realtime_server.py).

Async client code runs under ``asyncio.run``; ``asyncio.wait_for`` timeouts are hang guards only.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql
from supabase import acreate_client

from durability_pipelines import services
from durability_pipelines.checkpoints import CheckpointKey
from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from durability_pipelines.consumer.adapters.supabase import build_supabase_source
from durability_pipelines.consumer.config import ConsumerConfig, SupabaseSourceConfig
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handlers import HandlerContext, is_transactional
from durability_pipelines.consumer.runtime import ConsumerRuntime, ReadOutput
from durability_pipelines.consumer.source import SourceBatch
from durability_pipelines.sinks.realtime import (
    BroadcastMessage,
    RealtimeNotInstalledError,
    RealtimePublishError,
    RealtimeSendError,
    RestBroadcaster,
    broadcast_handler,
    install_realtime_fixture,
    rest_broadcast_handler,
)
from durability_pipelines.sources.backoff import BackoffPolicy
from durability_pipelines.sources.supabase_changes import install_change_feed, uninstall_change_feed
from tests.support.realtime_server import LocalRealtimeServer

GUARD_S = 30.0


@pytest.fixture(scope="module")
def realtime_db(postgres_url: str) -> str:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert install_realtime_fixture(conn) is True
        assert install_realtime_fixture(conn) is True  # idempotent
    return postgres_url


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRealtimeServer]:
    with LocalRealtimeServer(api_key=f"test-key-{secrets.token_hex(4)}") as s:
        yield s


def topic() -> str:
    return f"room-{uuid.uuid4().hex[:10]}"


def make_events(n: int, *, stream: str = "orders", start: int = 1) -> list[ChangeEvent]:
    return [
        ChangeEvent(adapter="dynamodb", stream=stream, shard="shard-000", sequence=str(10**21 + i),
                    event_name="INSERT" if i % 2 else "MODIFY", keys={"pk": f"order-{i}"},
                    new_image={"pk": f"order-{i}", "amount": Decimal("1.5"), "tags": {"a", "b"}},
                    old_image=None if i % 2 else {"pk": f"order-{i}", "amount": Decimal(1)}, event_id=f"e{i}")
        for i in range(start, start + n)
    ]


def make_ctx(conn: psycopg.Connection | None, options: dict[str, Any], *, stream: str = "orders") -> HandlerContext:
    return HandlerContext(consumer="broadcaster", adapter="dynamodb", stream=stream, group="workers",
                          shard="shard-000", run_id="run-1", options=options, postgres_url=None,
                          log=logging.getLogger("test"), connection=conn)


def landed(conn: psycopg.Connection, topic_name: str) -> list[tuple[str, dict[str, Any], bool]]:
    rows = conn.execute(
        "SELECT event, payload, private FROM realtime.messages WHERE topic = %s ORDER BY payload->>'sequence'",
        (topic_name,),
    ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


# -- database path -------------------------------------------------------------------------------


def test_every_event_of_a_batch_is_sent_with_the_checkpoint(realtime_db: str) -> None:
    assert is_transactional(broadcast_handler)
    room, events = topic(), make_events(5)
    key = CheckpointKey("dynamodb", f"orders-{uuid.uuid4().hex[:8]}", "workers", "broadcaster", "shard-000")
    store = PostgresCheckpointStore(realtime_db)
    try:
        with store.transaction() as tx:
            broadcast_handler(events, make_ctx(tx.connection, {"topic": room}))
            tx.save(key, events[-1].sequence)
        assert store.load(key) == events[-1].sequence
    finally:
        store.close()
    with psycopg.connect(realtime_db, autocommit=True) as conn:
        rows = landed(conn, room)
    assert [p["sequence"] for _, p, _ in rows] == [e.sequence for e in events]
    assert [event for event, _, _ in rows] == [e.event_name for e in events]  # default: the change's name
    assert all(private is False for _, _, private in rows)
    first = rows[0][1]
    assert {"event", "keys", "new_image", "old_image", "sequence", "shard", "stream", "adapter", "id"} <= set(first)
    assert first["new_image"]["amount"] == "1.5" and first["keys"] == {"pk": "order-1"}  # JSON-safe
    assert len({p["id"] for _, p, _ in rows}) == 5


def test_a_crash_between_publish_and_checkpoint_publishes_nothing_then_exactly_once(realtime_db: str) -> None:
    room, events = topic(), make_events(3)
    key = CheckpointKey("dynamodb", f"orders-{uuid.uuid4().hex[:8]}", "workers", "broadcaster", "shard-000")
    store = PostgresCheckpointStore(realtime_db)

    class Crash(Exception):
        pass

    try:
        with pytest.raises(Crash), store.transaction() as tx:
            broadcast_handler(events, make_ctx(tx.connection, {"topic": room, "event": "change"}))
            raise Crash  # the process dies after realtime.send, before the checkpoint commits
        with psycopg.connect(realtime_db, autocommit=True) as conn:
            assert landed(conn, room) == []
        assert store.load(key) is None
        with store.transaction() as tx:  # the retry
            broadcast_handler(events, make_ctx(tx.connection, {"topic": room, "event": "change"}))
            tx.save(key, events[-1].sequence)
    finally:
        store.close()
    with psycopg.connect(realtime_db, autocommit=True) as conn:
        rows = landed(conn, room)
    assert [p["sequence"] for _, p, _ in rows] == [e.sequence for e in events]  # each exactly once
    assert {event for event, _, _ in rows} == {"change"}


def test_runtime_publishes_once_across_a_crash_and_a_redelivery(realtime_db: str) -> None:
    """The same through ConsumerRuntime: failed attempt, successful retry, then the batch again."""
    room, events = topic(), make_events(4, stream="orders-rt")
    config = ConsumerConfig(
        name="rt_broadcast", group="workers", consumer=f"c-{uuid.uuid4().hex[:8]}",
        source=SupabaseSourceConfig(channel="orders-rt", table="orders"),
        handler="durability_pipelines.sinks.realtime:broadcast_handler", handler_options={"topic": room},
    )
    store = PostgresCheckpointStore(realtime_db)
    crashing = True

    def handler(evs: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
        broadcast_handler(evs, ctx)
        if crashing:
            raise RuntimeError("worker died after publishing")

    handler.transactional = True  # type: ignore[attr-defined]
    runtime = ConsumerRuntime(config, store=store, source=None, handler=handler, storage=None,
                              postgres_url=realtime_db)
    read = ReadOutput(config.name, None, "run-1", SourceBatch(None, None, events, events[-1].sequence), None)
    try:
        with pytest.raises(RuntimeError, match="worker died"):
            runtime.process(read, retry_number=0)
        crashing = False
        out = runtime.process(read, retry_number=1)
        assert out.processed == 4
        runtime.ack(read, out)
        again = runtime.process(read, retry_number=0)  # a duplicate run of the same batch
        assert again.processed == 0
        assert store.load(runtime.key(None)) == events[-1].sequence
    finally:
        runtime.close()
    with psycopg.connect(realtime_db, autocommit=True) as conn:
        assert [p["sequence"] for _, p, _ in landed(conn, room)] == [e.sequence for e in events]


def test_a_send_that_realtime_swallows_fails_the_batch(realtime_db: str) -> None:
    room = topic()
    fn, trigger = f"refuse_{uuid.uuid4().hex[:8]}", f"refuse_{uuid.uuid4().hex[:8]}"
    key = CheckpointKey("dynamodb", f"orders-{uuid.uuid4().hex[:8]}", "workers", "broadcaster", "shard-000")
    with psycopg.connect(realtime_db, autocommit=True) as conn:
        conn.execute(sql.SQL(
            "CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.topic = {room} AND NEW.payload->>'sequence' = {seq} THEN RAISE EXCEPTION 'disk full'; END IF; "
            "RETURN NEW; END $$").format(fn=sql.Identifier(fn), room=sql.Literal(room),
                                         seq=sql.Literal(str(10**21 + 2))))
        conn.execute(sql.SQL("CREATE TRIGGER {t} BEFORE INSERT ON realtime.messages FOR EACH ROW "
                             "EXECUTE FUNCTION {fn}()").format(t=sql.Identifier(trigger), fn=sql.Identifier(fn)))
        store = PostgresCheckpointStore(realtime_db)
        try:
            with pytest.raises(RealtimeSendError, match="stored 2 of 3 .*disk full"), store.transaction() as tx:
                broadcast_handler(make_events(3), make_ctx(tx.connection, {"topic": room}))
                tx.save(key, str(10**21 + 3))
            assert store.load(key) is None  # rolled back with the two messages that did land
            assert landed(conn, room) == []
        finally:
            store.close()
            conn.execute(sql.SQL("DROP TRIGGER {t} ON realtime.messages").format(t=sql.Identifier(trigger)))
            conn.execute(sql.SQL("DROP FUNCTION {fn}()").format(fn=sql.Identifier(fn)))


def test_without_a_realtime_schema_the_error_names_the_fix(postgres_admin_url: str) -> None:
    name = f"dp_test_nort_{secrets.token_hex(4)}"
    url = services.ensure_database(postgres_admin_url, name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            with pytest.raises(RealtimeNotInstalledError, match="install_realtime_fixture"), conn.transaction():
                broadcast_handler(make_events(1), make_ctx(conn, {"topic": "room"}))
            # a project's own realtime.send is never replaced by the fixture
            conn.execute("CREATE SCHEMA realtime")
            conn.execute("CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean "
                         "DEFAULT true) RETURNS void LANGUAGE sql AS 'SELECT NULL'")
            assert install_realtime_fixture(conn) is False
            assert conn.execute("SELECT to_regclass('realtime.messages')").fetchone()[0] is None
    finally:
        with psycopg.connect(services.libpq_url(postgres_admin_url), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_handler_options_are_validated(realtime_db: str) -> None:
    with psycopg.connect(realtime_db) as conn:
        with pytest.raises(ConfigError, match="Allowed keys"):
            broadcast_handler(make_events(1), make_ctx(conn, {"topik": "x"}))
        with pytest.raises(ConfigError, match="wire prefix"):
            broadcast_handler(make_events(1), make_ctx(conn, {"topic": "realtime:room"}))
    with pytest.raises(ConfigError, match="no connection"):
        broadcast_handler(make_events(1), make_ctx(None, {}))


# -- REST path -------------------------------------------------------------------------------------


def test_rest_broadcaster_and_handler(server: LocalRealtimeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    room = topic()
    with RestBroadcaster(server.url, server.api_key, messages_per_request=2) as rest:
        assert rest.send([BroadcastMessage(room, "ping", {"n": i}) for i in range(3)]) == 3
    monkeypatch.setenv("TEST_SUPABASE_URL", server.url)
    monkeypatch.setenv("TEST_SUPABASE_KEY", server.api_key)
    events = make_events(4)
    rest_broadcast_handler(events, make_ctx(None, {"topic": room, "url_env": "TEST_SUPABASE_URL",
                                                   "key_env": "TEST_SUPABASE_KEY"}))
    got = [m for m in server.published if m["topic"] == room]
    assert [m["payload"].get("n") for m in got[:3]] == [0, 1, 2]
    assert [m["payload"]["sequence"] for m in got[3:]] == [e.sequence for e in events]  # every event
    assert [m["event"] for m in got[3:]] == [e.event_name for e in events]


def test_rest_broadcaster_fails_fast_on_a_bad_key(server: LocalRealtimeServer) -> None:
    sleeps: list[float] = []
    policy = BackoffPolicy(max_attempts=3, sleep=sleeps.append)
    with RestBroadcaster(server.url, "wrong-key", backoff=policy) as rest, \
            pytest.raises(RealtimePublishError, match="401") as err:
        rest.broadcast(topic(), "ping", {"n": 1})
    assert err.value.status == 401 and sleeps == []  # not retried: retrying cannot fix a key


def test_rest_handler_without_env_names_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_URL", raising=False)
    with pytest.raises(ConfigError, match="NOPE_URL"):
        rest_broadcast_handler(make_events(1), make_ctx(None, {"url_env": "NOPE_URL", "key_env": "NOPE_URL"}))


# -- supabase-py against the local Realtime server ----------------------------------------------------


async def _subscribe(client: Any, name: str, queue: asyncio.Queue[Any], **config: Any) -> Any:
    states: list[Any] = []
    channel = client.channel(name, {"config": {"broadcast": config.get("broadcast", {"self": False}),
                                               "private": config.get("private", False)}})
    channel.on_broadcast("*", queue.put_nowait)
    await asyncio.wait_for(channel.subscribe(lambda state, err: states.append((str(state.value), err))), GUARD_S)
    assert states == [("SUBSCRIBED", None)]
    return channel


def test_supabase_client_receives_broadcasts(server: LocalRealtimeServer, realtime_db: str) -> None:
    room = topic()

    async def scenario() -> None:
        alice = await acreate_client(server.url, server.api_key)
        bob = await acreate_client(server.url, server.api_key)
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        bob_inbox: asyncio.Queue[Any] = asyncio.Queue()
        try:
            await _subscribe(alice, room, inbox)
            bob_channel = await _subscribe(bob, room, bob_inbox, broadcast={"self": True, "ack": True})
            assert server.subscribers(room) == 2
            # 1. a broadcast from another client (and back to the sender, who asked for self)
            await bob_channel.send_broadcast("greet", {"hello": "alice"})
            msg = await asyncio.wait_for(inbox.get(), GUARD_S)
            assert (msg["event"], msg["payload"]) == ("greet", {"hello": "alice"})
            assert (await asyncio.wait_for(bob_inbox.get(), GUARD_S))["event"] == "greet"
            # 2. REST broadcast through supabase-py's http_send
            await bob_channel.http_send("rest", {"n": 1})
            msg = await asyncio.wait_for(inbox.get(), GUARD_S)
            assert (msg["event"], msg["payload"]) == ("rest", {"n": 1})
            await asyncio.wait_for(bob_inbox.get(), GUARD_S)
            # 3. database messages: realtime.send committed with a checkpoint, then fanned out
            events = make_events(3)
            store = PostgresCheckpointStore(realtime_db)
            try:
                with store.transaction() as tx:
                    broadcast_handler(events, make_ctx(tx.connection, {"topic": room, "event": "change"}))
                    tx.save(CheckpointKey("dynamodb", room, "workers", "broadcaster", "shard-000"),
                             events[-1].sequence)
            finally:
                store.close()
            assert await asyncio.to_thread(server.publish_from_db, realtime_db, topic=room) == 3
            got = [await asyncio.wait_for(inbox.get(), GUARD_S) for _ in events]
            assert [m["payload"]["sequence"] for m in got] == [e.sequence for e in events]
            assert {m["event"] for m in got} == {"change"}
            assert await asyncio.to_thread(server.publish_from_db, realtime_db, topic=room) == 0  # once each
        finally:
            await alice.remove_all_channels()
            await bob.remove_all_channels()

    before = server.stats["heartbeat"], server.stats["phx_leave"]
    asyncio.run(scenario())
    assert server.stats["heartbeat"] > before[0]  # the client's first heartbeat was answered
    assert server.stats["phx_leave"] >= before[1] + 2


def test_private_and_public_channels_do_not_mix(server: LocalRealtimeServer) -> None:
    room = topic()

    async def scenario() -> None:
        client = await acreate_client(server.url, server.api_key)
        public: asyncio.Queue[Any] = asyncio.Queue()
        try:
            await _subscribe(client, room, public)
            assert await asyncio.to_thread(server.publish, room, "secret", {"x": 1}, private=True) == 0
            assert await asyncio.to_thread(server.publish, room, "open", {"x": 2}) == 1
            msg = await asyncio.wait_for(public.get(), GUARD_S)
            assert msg["event"] == "open" and public.empty()
        finally:
            await client.remove_all_channels()

    asyncio.run(scenario())


# -- the whole pipeline ------------------------------------------------------------------------------


def test_change_feed_to_realtime_subscriber(server: LocalRealtimeServer, realtime_db: str) -> None:
    """Table change -> change log -> consumer runtime (Postgres checkpoint) -> realtime.send -> client."""
    suffix = uuid.uuid4().hex[:8]
    table, log, channel, room = f"orders_{suffix}", f"cl_{suffix}", f"orders-{suffix}", topic()
    with psycopg.connect(realtime_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, status text)").format(sql.Identifier(table)))
        install_change_feed(conn, table, change_log=log)
    config = ConsumerConfig(
        name="feed_to_realtime", group="workers", consumer="c1",
        source=SupabaseSourceConfig(channel=channel, table=table, change_log=log, replay_from="earliest"),
        handler="durability_pipelines.sinks.realtime:broadcast_handler", handler_options={"topic": room},
        max_events=2,
    )
    store = PostgresCheckpointStore(realtime_db)
    runtime = ConsumerRuntime(config, store=store, source=build_supabase_source(config, postgres_url=realtime_db),
                              handler=broadcast_handler, storage=None, postgres_url=realtime_db)

    async def scenario() -> list[Any]:
        client = await acreate_client(server.url, server.api_key)
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        try:
            await _subscribe(client, room, inbox)
            with psycopg.connect(realtime_db, autocommit=True) as conn:
                conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'new'), (2, 'new'), (3, 'new')").format(
                    sql.Identifier(table)))
                conn.execute(sql.SQL("UPDATE {} SET status = 'paid' WHERE id = 2").format(sql.Identifier(table)))
            delivered = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + GUARD_S
            while delivered < 4 and loop.time() < deadline:  # runs of max_events=2 until all 4 changes are acked
                read = await asyncio.to_thread(runtime.read, None, f"run-{delivered}")
                out = await asyncio.to_thread(runtime.process, read)
                await asyncio.to_thread(runtime.ack, read, out)
                await asyncio.to_thread(runtime.release, read.lease)  # one batch per run here
                delivered += out.processed
                await asyncio.to_thread(server.publish_from_db, realtime_db, topic=room)
            return [await asyncio.wait_for(inbox.get(), GUARD_S) for _ in range(4)]
        finally:
            await client.remove_all_channels()

    try:
        got = asyncio.run(scenario())
    finally:
        runtime.close()
        with psycopg.connect(realtime_db, autocommit=True) as conn:
            uninstall_change_feed(conn, table, change_log=log, drop_change_log=True)
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
    assert [(m["event"], m["payload"]["keys"]) for m in got] == [
        ("INSERT", {"id": 1}), ("INSERT", {"id": 2}), ("INSERT", {"id": 3}), ("UPDATE", {"id": 2})]
    assert [m["payload"]["adapter"] for m in got] == ["supabase"] * 4
    assert got[3]["payload"]["old_image"] == {"id": 2, "status": "new"}
    sequences = [int(m["payload"]["sequence"]) for m in got]
    assert sequences == sorted(sequences)
