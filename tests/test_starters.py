"""Each starter config in durability_pipelines/defs/consumers/ loads, validates and runs end to end
(real sensor, real job, moto server, real Postgres and Redis)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import redis

from durability_pipelines.checkpoints import CheckpointKey
from durability_pipelines.sinks.realtime import install_realtime_fixture
from tests.support.dynamodb import clients, create_stream_table, put_items
from tests.support.inprocess import Driver
from tests.support.starters import starter_environment


@pytest.fixture
def env(monkeypatch, postgres_url: str, redis_url: str) -> Iterator[str]:
    """The repo's starters, pointed at the test servers and a fresh moto server."""
    with starter_environment(monkeypatch, postgres_url, redis_url) as url:
        yield url


def defs():
    from durability_pipelines.definitions import build_definitions

    return build_definitions()


def stream_rows(postgres_url: str, stream: str) -> list[tuple[str, str]]:
    with psycopg.connect(postgres_url) as conn:
        return conn.execute(
            "SELECT shard, sequence FROM stream_events WHERE stream = %s ORDER BY sequence::numeric", (stream,)
        ).fetchall()


def test_dynamodb_worker_starter_runs(env: str, postgres_url: str, redis_url: str) -> None:
    ddb, _ = clients(env)
    create_stream_table(ddb, "orders")
    put_items(ddb, "orders", [{"pk": f"o{i}", "total": i} for i in range(120)])
    driver = Driver(defs(), "orders_worker")
    assert driver.drain() >= 1 and all(r.success for r in driver.runs)
    rows = stream_rows(postgres_url, "orders")
    assert len(rows) == 120 and len(set(rows)) == 120
    shard = rows[0][0]
    key = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", shard)
    assert redis.Redis.from_url(redis_url).get(key.redis_key).decode() == rows[-1][1]


def test_dynamodb_to_realtime_starter_broadcasts_every_event_once(env: str, postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        install_realtime_fixture(conn)
        conn.execute("DELETE FROM realtime.messages WHERE topic = 'orders'")
    ddb, _ = clients(env)
    create_stream_table(ddb, "orders")
    put_items(ddb, "orders", [{"pk": f"o{i}", "total": i} for i in range(30)])
    ddb.delete_item(TableName="orders", Key={"pk": {"S": "o0"}})
    driver = Driver(defs(), "orders_to_realtime")
    assert driver.drain() >= 1 and all(r.success for r in driver.runs)
    driver.drain()  # a further tick finds nothing new: nothing re-published
    with psycopg.connect(postgres_url) as conn:
        msgs = conn.execute(
            "SELECT event, payload FROM realtime.messages WHERE topic = 'orders' ORDER BY inserted_at, id"
        ).fetchall()
        (ckpt,) = conn.execute(
            "SELECT sequence FROM checkpoints WHERE adapter='dynamodb' AND stream='orders' AND grp='realtime'"
        ).fetchone()
    seqs = [p["sequence"] for _, p in msgs]
    assert len(msgs) == 31 and len(set(seqs)) == 31  # every event, exactly once
    assert {e for e, _ in msgs} == {"INSERT", "REMOVE"}
    removed = next(p for e, p in msgs if e == "REMOVE")
    assert removed["keys"] == {"pk": "o0"} and removed["old_image"]["pk"] == "o0" and removed["shard"]
    assert ckpt == max(seqs, key=int)


def test_supabase_worker_starter_runs(env: str, postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.orders (id int PRIMARY KEY, total int)")
        conn.execute("TRUNCATE public.orders")
    driver = Driver(defs(), "supabase_orders_worker")
    driver.drain()  # installs the change feed (install: true) and pins nothing yet
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for i in range(40):
            conn.execute("INSERT INTO public.orders VALUES (%s, %s)", (i, i))
        conn.execute("UPDATE public.orders SET total = 0 WHERE id = 1")
        conn.execute("DELETE FROM public.orders WHERE id = 2")
    driver.drain()
    assert all(r.success for r in driver.runs)
    with psycopg.connect(postgres_url) as conn:
        events = conn.execute(
            "SELECT event_name, old_image FROM stream_events WHERE stream = 'orders-changes' "
            "ORDER BY sequence::numeric").fetchall()
    assert [e for e, _ in events] == ["INSERT"] * 40 + ["UPDATE", "DELETE"]
    assert events[-1][1]["id"] == 2 and events[-2][1]["total"] == 1  # old records captured
