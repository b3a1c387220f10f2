"""The hybrid starter end to end, as a Supabase client sees it.

DynamoDB (moto server, table ``orders``) -> the ``orders_to_realtime`` starter through its real sensor
and job (tests/support/inprocess.py) -> ``realtime.send`` into ``realtime.messages`` in the checkpoint's
transaction -> the local Realtime server (tests/support/realtime_server.py, its DB poller standing in
for Realtime's replication of that table) -> a real supabase-py async client subscribed to topic
``orders`` (tests/support/realtime_subscriber.py).

Oracle (KCL-style, from the stream itself, read back from moto): every record of every shard arrives
exactly once, with its event name, keys, new/old image, sequence and shard; per shard the received
sequences strictly increase and the unique count equals the produced count. A crash after
``realtime.send`` and before the checkpoint commits publishes nothing extra, and neither does a run
that dies after the commit but before its ack step.

Waits are hang guards only: every wait returns as soon as its condition holds.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from dagster import DagsterEventType

from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointTransaction
from durability_pipelines.consumer.runtime import ConsumerRuntime
from durability_pipelines.sinks.realtime import install_realtime_fixture
from tests.support.dynamodb import clients, create_stream_table, put_items
from tests.support.inprocess import Driver, drain_metadata, log_messages
from tests.support.realtime_server import LocalRealtimeServer
from tests.support.realtime_subscriber import RealtimeSubscriber
from tests.support.servers import PrivateRedis
from tests.support.starters import starter_environment

TOPIC = "orders"  # handler_options.topic of durability_pipelines/defs/consumers/orders_to_realtime/defs.yaml
CONSUMER = "orders_to_realtime"
GUARD_S = 60.0
QUIET_S = 1.0  # after the last expected message: 20 poll intervals for anything extra to show up


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A private Redis: the sensor cursor's mirror key (durability:sensor_cursor:orders_to_realtime_sensor)
    has a fixed name, and the shared test Redis db is shared with every other pytest session on the
    machine; a mirror written there by another session's starter test would be restored here."""
    server = PrivateRedis(appendonly=False)
    server.start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, postgres_url: str, redis_url: str) -> Iterator[str]:
    """As tests/test_starters.py: the repo's starters on the test servers and a fresh, empty moto."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        install_realtime_fixture(conn)
        conn.execute("DELETE FROM realtime.messages WHERE topic = %s", (TOPIC,))
    with starter_environment(monkeypatch, postgres_url, redis_url) as url:
        yield url


@pytest.fixture
def realtime(postgres_url: str) -> Iterator[LocalRealtimeServer]:
    """The local Realtime server, fanning out committed realtime.messages rows every 50 ms."""
    with LocalRealtimeServer() as server:
        server.start_db_poller(postgres_url, interval_s=0.05)
        yield server


@pytest.fixture
def subscriber(realtime: LocalRealtimeServer) -> Iterator[RealtimeSubscriber]:
    """supabase-py subscribed to topic `orders` before anything is produced (Realtime has no replay)."""
    with RealtimeSubscriber(realtime.url, realtime.api_key, TOPIC) as sub:
        assert realtime.subscribers(TOPIC) == 1
        yield sub


def defs():
    from durability_pipelines.definitions import build_definitions

    return build_definitions()


# -- the oracle: the stream as moto holds it ---------------------------------------------------------


def _plain(image: dict[str, Any] | None) -> dict[str, Any] | None:
    """DynamoDB JSON -> what subscribers should get (S as is, N as int when integral, else text)."""
    if image is None:
        return None
    out: dict[str, Any] = {}
    for name, typed in image.items():
        (kind, value), = typed.items()
        if kind == "S":
            out[name] = value
        elif kind == "N":
            out[name] = int(value) if value.lstrip("-").isdigit() else value
        else:
            raise AssertionError(f"the test writes only S and N attributes, got {kind}")
    return out


def produced_records(endpoint: str) -> list[dict[str, Any]]:
    """Every record of every shard of the `orders` stream, in shard order (read straight from moto)."""
    ddb, streams = clients(endpoint)
    arn = ddb.describe_table(TableName=TOPIC)["Table"]["LatestStreamArn"]
    out = []
    for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
        it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        for _ in range(10_000):  # moto never closes its shard: stop at the first empty page
            page = streams.get_records(ShardIterator=it, Limit=1000)
            for r in page["Records"]:
                body = r["dynamodb"]
                out.append({"event": r["eventName"], "shard": shard["ShardId"], "sequence": body["SequenceNumber"],
                            "keys": _plain(body["Keys"]), "new_image": _plain(body.get("NewImage")),
                            "old_image": _plain(body.get("OldImage"))})
            if not page["Records"] or not page.get("NextShardIterator"):
                break
            it = page["NextShardIterator"]
    return out


def assert_received_exactly_once(messages: list[dict[str, Any]], produced: list[dict[str, Any]]) -> None:
    """Each produced record once, intact; per shard strictly increasing; counts equal (KCL oracle)."""
    got = [m["payload"] for m in messages]
    assert [m["event"] for m in messages] == [p["event"] for p in got]  # broadcast event = change kind
    by_shard: dict[str, list[int]] = defaultdict(list)
    for p in got:
        by_shard[p["shard"]].append(int(p["sequence"]))
    expected_by_shard: dict[str, list[int]] = defaultdict(list)
    for r in produced:
        expected_by_shard[r["shard"]].append(int(r["sequence"]))
    assert set(by_shard) == set(expected_by_shard), "every shard, and only the stream's shards"
    for shard, seqs in by_shard.items():
        assert all(a < b for a, b in itertools.pairwise(seqs)), f"{shard}: sequences not strictly increasing"
        assert len(set(seqs)) == len(expected_by_shard[shard]), f"{shard}: unique count != produced count"
        assert seqs == expected_by_shard[shard], f"{shard}: received != produced"
    assert len(got) == len(produced)  # nothing duplicated
    expected = {(r["shard"], r["sequence"]): r for r in produced}
    for p in got:
        want = expected[(p["shard"], p["sequence"])]
        fields = ("event", "keys", "new_image", "old_image")
        assert {f: p[f] for f in fields} == {f: want[f] for f in fields}, p["sequence"]
        assert (p["adapter"], p["stream"]) == ("dynamodb", TOPIC) and p["id"]


def realtime_rows(postgres_url: str) -> list[tuple[str, str]]:
    with psycopg.connect(postgres_url) as conn:
        return conn.execute(
            "SELECT payload->>'shard', payload->>'sequence' FROM realtime.messages WHERE topic = %s", (TOPIC,)
        ).fetchall()


def acked_checkpoint(postgres_url: str) -> str | None:
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute(
            "SELECT sequence FROM checkpoints WHERE adapter = 'dynamodb' AND stream = %s AND grp = 'realtime' "
            "AND consumer = 'broadcaster'", (TOPIC,)).fetchone()
    return row[0] if row else None


def write_wave(endpoint: str, start: int, inserts: int, modifies: int, removes: int) -> int:
    """INSERTs of new orders, then MODIFYs and REMOVEs of some of them; returns records written."""
    ddb, _ = clients(endpoint)
    ids = range(start, start + inserts)
    n = put_items(ddb, TOPIC, [{"pk": f"order-{i:05d}", "status": "placed", "total": i % 97,
                                "price": f"{i}.25"} for i in ids])
    n += put_items(ddb, TOPIC, [{"pk": f"order-{i:05d}", "status": "paid", "total": i % 97 + 1,
                                 "price": f"{i}.25"} for i in list(ids)[:modifies]])
    for i in list(ids)[modifies:modifies + removes]:
        ddb.delete_item(TableName=TOPIC, Key={"pk": {"S": f"order-{i:05d}"}})
        n += 1
    return n


def write_fractional_number(endpoint: str) -> None:
    """One item with a non-integral N (put_items writes the "<i>.25" prices as S)."""
    ddb, _ = clients(endpoint)
    ddb.put_item(TableName=TOPIC, Item={"pk": {"S": "decimal-1"}, "total": {"N": "12.5"}, "status": {"S": "placed"}})


# -- tests -------------------------------------------------------------------------------------------


def test_every_event_of_every_batch_reaches_a_supabase_subscriber_exactly_once(
        env: str, postgres_url: str, subscriber: RealtimeSubscriber) -> None:
    ddb, _ = clients(env)
    create_stream_table(ddb, TOPIC)
    driver = Driver(defs(), CONSUMER)

    # wave 1: 250 INSERT + 60 MODIFY + 40 REMOVE + 1 fractional N = 351 records -> batches of max_events 200,
    # drained by one run (runs drain: fewer runs than batches)
    written = write_wave(env, 0, 250, 60, 40)
    write_fractional_number(env)
    written += 1
    runs = driver.drain()
    assert runs >= 1 and all(r.success for r in driver.runs)
    assert driver.batches() >= 2 > runs
    subscriber.wait_for(written, GUARD_S)

    # wave 2, while the subscriber stays connected: the consumer resumes from its checkpoint
    written += write_wave(env, 1000, 30, 10, 5)
    assert driver.drain() >= 1 and all(r.success for r in driver.runs)
    assert driver.drain() == 0  # nothing new: nothing dispatched, nothing re-published

    produced = produced_records(env)
    assert len(produced) == written == 396
    assert {r["event"] for r in produced} == {"INSERT", "MODIFY", "REMOVE"}
    subscriber.wait_for(len(produced), GUARD_S)
    messages = subscriber.quiet(QUIET_S)
    assert_received_exactly_once(messages, produced)

    # what the subscriber got is what was committed, once each; the checkpoint is the last record
    rows = realtime_rows(postgres_url)
    assert len(rows) == len(set(rows)) == len(produced)
    assert acked_checkpoint(postgres_url) == produced[-1]["sequence"]
    decimal = next(m["payload"] for m in messages if m["payload"]["keys"] == {"pk": "decimal-1"})
    assert decimal["new_image"]["total"] == "12.5" and decimal["old_image"] is None
    removed = next(m["payload"] for m in messages if m["event"] == "REMOVE")
    assert removed["new_image"] is None and removed["old_image"]["status"] == "placed"
    modified = next(m["payload"] for m in messages if m["event"] == "MODIFY")
    assert modified["old_image"]["status"] == "placed" and modified["new_image"]["status"] == "paid"


def test_a_crash_between_publish_and_checkpoint_publishes_nothing_extra(
        env: str, postgres_url: str, subscriber: RealtimeSubscriber, monkeypatch: pytest.MonkeyPatch) -> None:
    ddb, _ = clients(env)
    create_stream_table(ddb, TOPIC)
    written = write_wave(env, 0, 300, 50, 30)  # 380 records: batches of 200 + 180

    # 1. The second batch dies after realtime.send put its messages in realtime.messages and before
    #    the checkpoint save in the same transaction: the transaction rolls back. The run retries the
    #    batch in place (retry.max_retries 3), which publishes the batch once.
    real_save = PostgresCheckpointTransaction.save
    crashes: list[dict[str, int]] = []

    class SimulatedCrash(RuntimeError):
        pass

    def crashing_save(self: PostgresCheckpointTransaction, key: Any, sequence: str, **kwargs: Any) -> Any:
        pending = self.connection.execute(
            "SELECT count(*) FROM realtime.messages WHERE topic = %s", (TOPIC,)).fetchone()[0]
        if len(crashes) == 0 and acked_checkpoint(postgres_url) is not None:  # batch 1 is acked: crash batch 2
            with psycopg.connect(postgres_url) as other:
                committed = other.execute(
                    "SELECT count(*) FROM realtime.messages WHERE topic = %s", (TOPIC,)).fetchone()[0]
            crashes.append({"in_transaction": pending, "committed": committed,
                            "delivered": subscriber.count()})
            raise SimulatedCrash("worker died between realtime.send and the checkpoint save")
        return real_save(self, key, sequence, **kwargs)

    monkeypatch.setattr(PostgresCheckpointTransaction, "save", crashing_save)
    driver = Driver(defs(), CONSUMER)
    driver.drain()
    assert all(r.success for r in driver.runs)
    assert len(crashes) == 1
    crash = crashes[0]
    assert crash["committed"] == 200 and crash["in_transaction"] == 200 + 180  # sent, not yet committed
    retried = [m for r in driver.runs for m in log_messages(driver.instance, r) if m.startswith("batch attempt 1 failed")]
    assert len(retried) == 1 and "SimulatedCrash" in retried[0]
    assert sum(drain_metadata(r)["retried_batches"] for r in driver.runs) == 1
    subscriber.wait_for(written, GUARD_S)
    assert crash["delivered"] <= 200  # nothing of batch 2 was out when it crashed

    # 2. The run's ack dies after the batch committed messages + checkpoint. Nothing is re-published:
    #    the checkpoint committed with the messages; the op's RetryPolicy starts the drain again from it.
    written += write_wave(env, 2000, 40, 10, 5)
    real_ack = ConsumerRuntime.ack
    ack_crashes: list[str] = []

    def crashing_ack(self: ConsumerRuntime, read: Any, processed: Any) -> Any:
        if not ack_crashes and processed.processed:
            ack_crashes.append(processed.ack_to)
            raise SimulatedCrash("worker died before the ack step")
        return real_ack(self, read, processed)

    monkeypatch.setattr(ConsumerRuntime, "ack", crashing_ack)
    before = len(driver.runs)
    driver.drain()
    later = driver.runs[before:]
    assert len(ack_crashes) == 1 and all(r.success for r in later)
    op_retries = [e for r in later for e in r.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert [e.step_key for e in op_retries] == ["drain_shard"]
    assert acked_checkpoint(postgres_url) == ack_crashes[0]  # committed with the batch's messages
    written += write_wave(env, 3000, 20, 5, 5)
    before = len(driver.runs)
    assert driver.drain() >= 1 and all(r.success for r in driver.runs[before:])

    produced = produced_records(env)
    assert len(produced) == written == 465
    assert ack_crashes[0] == produced[434]["sequence"]  # the last record of wave 2
    subscriber.wait_for(len(produced), GUARD_S)
    messages = subscriber.quiet(QUIET_S)
    assert_received_exactly_once(messages, produced)
    rows = realtime_rows(postgres_url)
    assert len(rows) == len(set(rows)) == len(produced)  # nothing extra was ever committed
    assert acked_checkpoint(postgres_url) == produced[-1]["sequence"]


def test_a_foreign_rewind_stops_the_broadcaster_at_the_sensor_tick_and_nothing_is_published_again(
        env: str, postgres_url: str) -> None:
    """Issue 21 item 4 through the real sensor: the original pattern's worker moves the starter's Postgres
    checkpoint back (the plain UPSERT); the next tick dispatches no run for the shard and says why, naming the
    commands that replay on purpose or restore; nothing is re-sent, even as new records arrive."""
    ddb, _ = clients(env)
    create_stream_table(ddb, TOPIC)
    driver = Driver(defs(), CONSUMER)
    written = write_wave(env, 0, 20, 0, 0)
    assert driver.drain() >= 1 and all(r.success for r in driver.runs)
    assert len(realtime_rows(postgres_url)) == written
    produced = produced_records(env)
    with psycopg.connect(postgres_url) as conn:  # the original pattern's plain UPSERT, 15 positions back
        conn.execute(
            "INSERT INTO checkpoints (adapter, stream, grp, consumer, shard, sequence, ts) "
            "VALUES ('dynamodb', %s, 'realtime', 'broadcaster', %s, %s, now()) "
            "ON CONFLICT (adapter, stream, grp, consumer, shard) DO UPDATE SET sequence = EXCLUDED.sequence, "
            "ts = EXCLUDED.ts", (TOPIC, produced[4]["shard"], produced[4]["sequence"]))
    write_wave(env, 100, 5, 0, 0)  # new records too: the shard has work, and still must not move

    result = driver.tick()
    assert not result.run_requests  # no run reads on from the rewound position
    reason = result.skip_reason.skip_message if result.skip_reason else ""
    assert "STOPPED" in reason and "checkpoints rewind" in reason and "checkpoints repair" in reason, reason
    assert len(realtime_rows(postgres_url)) == written  # nothing published twice
    assert acked_checkpoint(postgres_url) == produced[4]["sequence"]  # the foreign move is left for the operator
