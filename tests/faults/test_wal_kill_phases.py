"""The WAL change feed under SIGKILL and store loss (issue 23): ack = checkpoint, then slot.

* SIGKILL of a run process between its sink's commit and the checkpoint save, and between the checkpoint
  save and the slot's advance: the next run (taking the dead one's lease over) delivers every committed
  change, each stored once; at the kill, and ever after, the slot is never past the durable checkpoint
  (``pg_replication_slots.confirmed_flush_lsn`` against the Postgres ``checkpoints`` row).
* A hybrid consumer whose Redis is flushed resumes from the Postgres checkpoint, which the slot never passed.
* A worker of the original pattern reads the shared key (plain ``GET``) and gets the position as a number it
  can compare: it grows with every ack.

A private PostgreSQL with ``wal_level = logical`` holds the watched tables and the slot; the checkpoints and
the sink live on the session's database; the run process is ``tests/support/drain_worker.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.consumer.config import ConsumerConfig, SupabaseWalSourceConfig
from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer
from durability_pipelines.consumer.runtime import open_runtime
from durability_pipelines.consumer.storage import ensure
from durability_pipelines.sources.wal_changes import (
    decode_position,
    install_wal_source,
    slot_info,
    slot_is_past,
)
from tests.support.dagster_daemon import DELIVERIES_DDL, wait_until
from tests.support.servers import PrivatePostgres, PrivateRedis

ROOT = Path(__file__).resolve().parents[2]
TRANSACTIONS = 12  # of 15 changes each: 180 changes, batches of 20 split some of them
PER_TRANSACTION = 15
GROUP = "g"


@pytest.fixture
def channel(wal_pg: PrivatePostgres, postgres_url: str) -> Iterator[str]:
    """A watched table of this test, its publication and slot (installed before the first write, as
    ``durability-pipelines wal install`` would), dropped afterwards."""
    name = "walkill" + uuid.uuid4().hex[:8]
    ensure(PostgresConnection(postgres_url))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(DELIVERIES_DDL)
    source = SupabaseWalSourceConfig(channel=name, tables=(f"public.{name}",))
    with wal_pg.connect() as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        install_wal_source(conn, publication=source.publication_name, slot=source.slot_name(GROUP),
                           tables=source.tables)
        yield name
        conn.execute("SELECT pg_drop_replication_slot(%s)", (source.slot_name(GROUP),))


def write(wal_pg: PrivatePostgres, table: str, start: int = 0) -> int:
    """TRANSACTIONS committed transactions of inserts and updates; returns the number of changes."""
    with wal_pg.connect(autocommit=False) as conn:
        for t in range(TRANSACTIONS):
            base = start + t * PER_TRANSACTION
            for i in range(PER_TRANSACTION - 3):
                conn.execute(f"INSERT INTO {table} VALUES (%s, 'new')", (base + i,))
            for i in range(3):
                conn.execute(f"UPDATE {table} SET v = 'changed' WHERE id = %s", (base + i,))
            conn.commit()
    return TRANSACTIONS * PER_TRANSACTION


def worker(args: dict, env: dict) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.support.drain_worker", json.dumps(args)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def slot_lsn(wal_pg: PrivatePostgres, table: str) -> int:
    with wal_pg.connect() as conn:
        info = slot_info(conn, SupabaseWalSourceConfig(channel=table, tables=(table,)).slot_name(GROUP))
    assert info is not None and info.confirmed_flush_lsn is not None
    return info.confirmed_flush_lsn


def durable_checkpoint(postgres_url: str, channel: str) -> str | None:
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT sequence FROM checkpoints WHERE adapter = 'supabase' AND stream = %s AND grp = %s",
                           (channel, GROUP)).fetchone()
    return row[0] if row else None


def assert_slot_behind_durable_checkpoint(wal_pg: PrivatePostgres, postgres_url: str, channel: str,
                                          created_at: int) -> None:
    confirmed, durable = slot_lsn(wal_pg, channel), durable_checkpoint(postgres_url, channel)
    if durable is None:
        assert confirmed == created_at, "the slot moved before any checkpoint was durable"
    else:
        assert not slot_is_past(confirmed, int(durable)), (
            f"slot at {confirmed} is past the durable checkpoint {durable} ({decode_position(int(durable))})")


@pytest.mark.parametrize(("backend", "phase"), [
    ("hybrid", "before_ack"),  # the sink committed, the checkpoint not saved
    ("hybrid", "before_release"),  # the checkpoint saved (Postgres too: flush_every_n 1), the slot not moved
    ("postgres", "process"),  # the sink's rows written in the transaction that also saves the checkpoint
    ("postgres", "before_release"),  # that transaction committed, the slot not moved
])
def test_a_wal_run_killed_between_sink_checkpoint_and_slot_loses_nothing_and_the_slot_never_passes_the_checkpoint(
        phase: str, backend: str, wal_pg: PrivatePostgres, channel: str, postgres_url: str, redis_url: str) -> None:
    created_at = slot_lsn(wal_pg, channel)
    total = write(wal_pg, channel)
    env = {**os.environ, "DURABILITY_SUPABASE_DB_URL": wal_pg.url, "PYTHONPATH": str(ROOT)}
    flag = f"wal-kill:{uuid.uuid4().hex}"
    base = {"group": GROUP, "postgres_url": postgres_url, "redis_url": redis_url, "flag": flag, "max_events": 20,
            "max_idle_s": 0.5,  # a batch is whole transactions, rarely full: read until the slot is empty
            "wal": {"channel": channel, "tables": [f"public.{channel}"], "backend": backend}}
    client = redis.Redis.from_url(redis_url)
    try:
        first = worker({**base, "run_id": "run-1", "pause": phase, "pause_at": 4}, env)
        held = wait_until(lambda: client.get(flag) or (first.poll() is not None and b"exited"),
                          what=f"the worker to reach {phase}", timeout=120)
        assert held != b"exited", "\n".join(x[-3000:] for x in first.communicate())
        pid, where = held.decode().split(":")
        assert where == phase
        assert_slot_behind_durable_checkpoint(wal_pg, postgres_url, channel, created_at)  # at the kill
        os.kill(int(pid), signal.SIGKILL)
        first.wait(timeout=30)
        assert first.returncode == -signal.SIGKILL
        assert_slot_behind_durable_checkpoint(wal_pg, postgres_url, channel, created_at)

        second = worker({**base, "run_id": "run-2", "dead": ["run-1"]}, env)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["events"] > 0
    finally:
        client.close()

    with psycopg.connect(postgres_url) as conn:
        stored = conn.execute("SELECT count(*), count(DISTINCT sequence) FROM stream_events WHERE stream = %s",
                              (channel,)).fetchone()
        commits = Counter(s for (s,) in conn.execute("SELECT sequence FROM e2e_deliveries WHERE stream = %s",
                                                     (channel,)).fetchall())
    assert stored == (total, total)  # every committed change, each stored once
    assert len(commits) == total
    twice = {s for s, n in commits.items() if n > 1}
    if phase == "before_ack":
        assert len(twice) <= 20  # committed, not acked: at-least-once redoes that one batch (idempotent sink)
    else:
        # postgres: the sink and the checkpoint commit together; before_release: the batch was acked
        assert not twice, f"committed twice: {sorted(twice)[:5]}"
    assert_slot_behind_durable_checkpoint(wal_pg, postgres_url, channel, created_at)
    last_lsn, _ = decode_position(int(durable_checkpoint(postgres_url, channel)))
    assert slot_lsn(wal_pg, channel) == last_lsn + 1  # released up to the end once the run closed


def wal_consumer(channel: str, backend: str, **checkpoint: Any) -> ConsumerConfig:
    return ConsumerConfig.model_validate({
        "name": "wal_resume", "source": {"kind": "supabase_wal", "channel": channel, "tables": [f"public.{channel}"],
                                         "replay_from": "earliest"},
        "group": GROUP, "consumer": "c", "handler": "tests.support.dagster_daemon:record_deliveries",
        "checkpoint": {"backend": backend, **checkpoint}, "max_events": 20, "max_idle_s": 0})


def test_a_hybrid_wal_consumer_whose_redis_was_flushed_resumes_from_postgres_which_the_slot_never_passed(
        wal_pg: PrivatePostgres, channel: str, postgres_url: str, make_private_redis: Any) -> None:
    private: PrivateRedis = make_private_redis(appendonly=False)
    created_at = slot_lsn(wal_pg, channel)
    total = write(wal_pg, channel)
    env = {**os.environ, "DURABILITY_SUPABASE_DB_URL": wal_pg.url, "PYTHONPATH": str(ROOT)}
    flag = f"wal-flush:{uuid.uuid4().hex}"
    base = {"group": GROUP, "postgres_url": postgres_url, "redis_url": private.url, "flag": flag, "max_events": 20,
            "max_idle_s": 0.5, "wal": {"channel": channel, "tables": [f"public.{channel}"], "backend": "hybrid",
                                       "flush_every_n": 4}}  # Postgres every 4th ack: behind Redis
    key = f"checkpoint:supabase:{channel}:{GROUP}:worker"
    with private.client() as client:
        first = worker({**base, "run_id": "run-1", "pause": "ack", "pause_at": 6}, env)  # the 6th ack saved
        held = wait_until(lambda: client.get(flag), what="the worker to save its 6th checkpoint", timeout=120)
        os.kill(int(held.decode().split(":")[0]), signal.SIGKILL)  # a crash: no flush as the run ends
        first.wait(timeout=30)
        in_redis = client.get(key).decode()
        durable = durable_checkpoint(postgres_url, channel)
        assert durable is not None and int(durable) < int(in_redis)  # Postgres is behind Redis
        assert_slot_behind_durable_checkpoint(wal_pg, postgres_url, channel, created_at)  # followed Postgres
        client.flushall()  # Redis lost every key (a private server of this test)

        second = worker({**base, "run_id": "run-2", "dead": ["run-1"]}, env)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-3000:]
    with psycopg.connect(postgres_url) as conn:
        stored = conn.execute("SELECT count(*), count(DISTINCT sequence) FROM stream_events WHERE stream = %s",
                              (channel,)).fetchone()
        commits = Counter(s for (s,) in conn.execute("SELECT sequence FROM e2e_deliveries WHERE stream = %s",
                                                     (channel,)).fetchall())
    assert stored == (total, total)  # resumed from Postgres: the redone changes were stored once
    redone = sum(n - 1 for n in commits.values())
    assert 0 < redone <= 3 * 20  # at most the acks Postgres had not received (flush_every_n - 1 batches)
    assert_slot_behind_durable_checkpoint(wal_pg, postgres_url, channel, created_at)
    last_lsn, _ = decode_position(int(durable_checkpoint(postgres_url, channel)))
    assert slot_lsn(wal_pg, channel) == last_lsn + 1  # the run's end made its last ack durable, then released


def test_a_worker_of_the_original_pattern_reads_the_lsn_position_as_a_number_that_grows(
        wal_pg: PrivatePostgres, channel: str, postgres_url: str, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABILITY_SUPABASE_DB_URL", wal_pg.url)
    cfg = wal_consumer(channel, "redis")
    key = f"checkpoint:supabase:{channel}:{GROUP}:c"  # the original pattern's layout, no shard
    plain = redis.Redis.from_url(redis_url)
    seen: list[int] = []
    try:
        for start in (0, 10_000):
            write(wal_pg, channel, start=start)
            rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url)
            try:
                ShardDrainer(rt, None, f"run-{start}", DrainBudget(10_000, 600, 0.5), prefetch=False).run()
            finally:
                rt.close()
            raw = plain.get(key)
            assert raw is not None and raw.decode().isdigit(), raw  # a plain number, as the pattern expects
            seen.append(int(raw))
    finally:
        plain.delete(key)
        plain.close()
    assert seen[0] < seen[1]  # compares as numbers: later changes, larger positions
