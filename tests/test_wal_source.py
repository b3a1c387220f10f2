"""The WAL source (``source.kind: supabase_wal``): a publication, a logical slot, pgoutput, read by peeking.

A private PostgreSQL with ``wal_level = logical`` (started here, stopped at the end of the module; the
shared server's settings are never touched) is the database replicated from; checkpoints live in the
shared Redis/Postgres test servers, as everywhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from durability_pipelines.checkpoints import StoreConfig
from durability_pipelines.consumer.adapters import build_source
from durability_pipelines.consumer.adapters.wal import WalSource
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.lag import measure_lag
from durability_pipelines.consumer.runtime import ConsumerRuntime, open_runtime
from durability_pipelines.observability import (
    LAG_BYTES,
    RETAINED_WAL_BYTES,
    SLOT_LAG_BYTES,
    Labels,
    Metrics,
    PushgatewayExporter,
    read_jsonl,
)
from durability_pipelines.sources.pgoutput import parse_lsn
from durability_pipelines.sources.wal_changes import (
    INDEX_SPAN,
    WalGapError,
    WalSlotInvalidatedError,
    decode_position,
    drop_wal_source,
    install_wal_source,
    slot_info,
    slot_is_past,
    slot_target,
)
from tests.support.servers import PrivatePostgres
from tests.support.shared_layout import Shared
from tests.test_consumer_drain import FakeClock


@pytest.fixture
def channel() -> str:
    return "wal" + uuid.uuid4().hex[:8]


@pytest.fixture
def db(wal_pg: PrivatePostgres, channel: str) -> Iterator[psycopg.Connection]:
    """Two tables of this test (one with REPLICA IDENTITY FULL); the slots are dropped afterwards."""
    with wal_pg.connect() as conn:
        conn.execute(f"CREATE TABLE {channel}_a (id int PRIMARY KEY, v text, doc jsonb)")
        conn.execute(f"CREATE TABLE {channel}_b (id int PRIMARY KEY, n numeric, ok boolean)")
        conn.execute(f"ALTER TABLE {channel}_b REPLICA IDENTITY FULL")
        yield conn
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s",
                                    (f"%{channel}%",)).fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def config(channel: str, backend: str = "postgres", **overrides: Any) -> ConsumerConfig:
    source = {"kind": "supabase_wal", "channel": channel, "tables": [f"{channel}_a", f"public.{channel}_b"],
              "replay_from": "earliest", "install": True, **overrides.pop("source", {})}
    return ConsumerConfig.model_validate({
        "name": "wal_" + uuid.uuid4().hex[:6], "source": source, "group": "g", "consumer": "c",
        "checkpoint": StoreConfig(backend=backend), "max_events": 10, **overrides})


def source_for(cfg: ConsumerConfig, wal_pg: PrivatePostgres) -> WalSource:
    src = build_source(cfg, postgres_url=wal_pg.url)
    assert isinstance(src, WalSource)
    return src


def write_workload(wal_pg: PrivatePostgres, channel: str) -> list[tuple[str, str, Any]]:
    """Inserts, updates and deletes across both tables and several transactions, one rolled back, one of 25
    changes (> max_events), and two overlapping ones that commit in the opposite order of their start.
    Returns the committed changes in commit order as (table, operation, id)."""
    a, b = f"public.{channel}_a", f"public.{channel}_b"
    expected: list[tuple[str, str, Any]] = []
    with wal_pg.connect(autocommit=False) as c1, wal_pg.connect(autocommit=False) as c2:
        c1.execute(f"INSERT INTO {a} VALUES (1, 'one', '{{\"k\": [1, 2]}}')")
        c1.execute(f"INSERT INTO {b} VALUES (1, 1.50, true)")
        c1.commit()
        expected += [(a, "INSERT", 1), (b, "INSERT", 1)]
        c1.execute(f"UPDATE {a} SET v = 'uno' WHERE id = 1")
        c1.execute(f"DELETE FROM {b} WHERE id = 1")
        c1.commit()
        expected += [(a, "UPDATE", 1), (b, "DELETE", 1)]
        c1.execute(f"INSERT INTO {a} VALUES (99, 'rolled back', null)")
        c1.execute(f"DELETE FROM {a} WHERE id = 1")
        c1.rollback()
        c1.execute(f"INSERT INTO {a} SELECT g, 'bulk', null FROM generate_series(100, 124) g")
        c1.commit()
        expected += [(a, "INSERT", i) for i in range(100, 125)]
        # c1 starts first and writes first, c2 commits first: delivery follows the commits
        c1.execute(f"INSERT INTO {b} VALUES (2, 2, false)")
        c2.execute(f"INSERT INTO {a} VALUES (2, 'two', null)")
        c2.commit()
        c1.execute(f"UPDATE {b} SET n = 3 WHERE id = 2")
        c1.commit()
        expected += [(a, "INSERT", 2), (b, "INSERT", 2), (b, "UPDATE", 2)]
        c2.execute(f"UPDATE {a} SET id = 3 WHERE id = 2")  # a key change: the old key comes along
        c2.commit()
        expected += [(a, "UPDATE", 3)]
    return expected


def shape(events: list[ChangeEvent]) -> list[tuple[str, str, Any]]:
    return [(e.table, e.event_name, e.keys["id"]) for e in events]


def test_each_committed_change_once_in_commit_order_whole_transactions(wal_pg, db, channel) -> None:
    src = source_for(config(channel), wal_pg)
    try:
        expected = write_workload(wal_pg, channel)
        batches, after = [], None
        while True:
            batch = src.read(None, after, 10)
            if not batch.events:
                break
            batches.append(batch)
            after = batch.next_checkpoint
        events = [e for b in batches for e in b.events]
        assert shape(events) == expected
        assert len({e.sequence for e in events}) == len(events)
        assert [int(e.sequence) for e in events] == sorted(int(e.sequence) for e in events)
        # whole transactions per batch; only the one of 25 changes is split (10 + 10 + 5, then whole ones)
        sizes = [len(b.events) for b in batches]
        assert sizes == [4, 10, 10, 9], sizes
        txids = [[e.txid for e in b.events] for b in batches]
        assert len(set(txids[1])) == 1 and set(txids[1]) == set(txids[2]) == set(txids[3][:5])
        assert txids[1][0] not in txids[3][5:] and txids[0][-1] not in txids[1]
        assert batches[-1].behind == 0
        # what the events carry
        first, update, delete = events[0], events[2], events[3]
        assert first.new_image == {"id": 1, "v": "one", "doc": {"k": [1, 2]}} and first.old_image is None
        assert events[1].new_image == {"id": 1, "n": pytest.approx(1.5), "ok": True}
        assert update.new_image["v"] == "uno" and update.old_image is None  # default identity, key unchanged
        assert delete.old_image == {"id": 1, "n": pytest.approx(1.5), "ok": True}  # REPLICA IDENTITY FULL
        assert events[-2].old_image == {"id": 2, "n": 2, "ok": False}
        assert events[-1].old_image == {"id": 2} and events[-1].keys == {"id": 3}
        assert all(e.created_at is not None and e.adapter == "supabase" and e.stream == channel for e in events)
        assert first.to_json_dict()["table"] == f"public.{channel}_a" and "txid" in first.to_json_dict()
        # nothing was consumed: a second source reads the same
        assert not src.has_new(None, after)
        assert src.has_new(None, batches[2].next_checkpoint)  # mid-transaction: the rest of it is pending
        rest = src.read(None, batches[2].next_checkpoint, 100)
        assert shape(rest.events) == expected[24:]
    finally:
        src.close()


def drain(rt: ConsumerRuntime, seen: list[ChangeEvent]) -> None:
    def handler(events, ctx):
        seen.extend(events)

    rt.handler = handler
    clock = FakeClock()
    ShardDrainer(rt, None, "run-" + uuid.uuid4().hex[:8], DrainBudget(1000, 600.0, 1.0), sleep=clock.sleep,
                 clock=clock).run()


def confirmed(wal_pg: PrivatePostgres, slot: str) -> int:
    with wal_pg.connect() as conn:
        info = slot_info(conn, slot)
    assert info is not None and info.confirmed_flush_lsn is not None
    return info.confirmed_flush_lsn


@pytest.mark.parametrize("backend", ["postgres", "hybrid", "redis"])
def test_drained_by_shard_drainer_acked_then_the_slot_follows_the_durable_checkpoint(
        backend, wal_pg, db, channel, redis_url, postgres_url) -> None:
    cfg = config(channel, backend)
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source_for(cfg, wal_pg))
    slot = cfg.source.slot_name("g")
    seen: list[ChangeEvent] = []
    try:
        expected = write_workload(wal_pg, channel)
        created_at = confirmed(wal_pg, slot)
        drain(rt, seen)
        assert shape(seen) == expected
        acked = rt.store.load(rt.key(None))
        assert acked == seen[-1].sequence
        durable = rt.durable_checkpoint(None)
    finally:
        rt.close()
    moved_to = confirmed(wal_pg, slot)
    if backend == "hybrid":
        # only what Postgres holds moves the slot, never a Redis-only position
        assert durable is None or slot_target(int(durable)) <= moved_to <= slot_target(int(durable)) + 1
        if durable is None:
            assert moved_to == created_at
    else:
        last_lsn, _ = decode_position(int(acked))
        assert moved_to == last_lsn + 1  # past the last transaction: read whole, acked durably
    # a second run reads nothing more, and new changes after the slot are delivered once
    with wal_pg.connect() as conn:
        conn.execute(f"INSERT INTO {channel}_a VALUES (500, 'later', null)")
    rt2 = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source_for(cfg, wal_pg))
    more: list[ChangeEvent] = []
    try:
        drain(rt2, more)
    finally:
        rt2.close()
    assert shape(more) == [(f"public.{channel}_a", "INSERT", 500)]


def write_other_wal(wal_pg: PrivatePostgres, channel: str, megabytes: float) -> None:
    """WAL of a table outside the publication (the rest of a busy database)."""
    with wal_pg.connect() as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {channel}_other (id serial PRIMARY KEY, pad text)")
        conn.execute(f"INSERT INTO {channel}_other (pad) SELECT repeat(md5(g::text), 32) FROM "
                     f"generate_series(1, %s) g", (int(megabytes * 1024),))  # ~1 KB a row


@pytest.mark.parametrize("backend", ["postgres", "hybrid"])
def test_quiet_tables_on_a_busy_server_are_acked_by_a_heartbeat_so_the_slot_releases_the_wal(
        backend, wal_pg, db, channel, redis_url, postgres_url) -> None:
    cfg = config(channel, backend, source={"heartbeat_mb": 1})
    slot = cfg.source.slot_name("g")
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source_for(cfg, wal_pg))
    seen: list[ChangeEvent] = []
    try:
        expected = write_workload(wal_pg, channel)
        drain(rt, seen)
        acked = rt.store.load(rt.key(None))
        assert not rt.source.has_new(None, acked)  # caught up, and the server quiet: no run is needed
        write_other_wal(wal_pg, channel, 3)
        # the sensor's question: yes, a run should ack the quiet stretch
        assert rt.source.has_new(None, acked)
        held = confirmed(wal_pg, slot)
        drain(rt, seen)  # the heartbeat: an empty batch acked at (current LSN, 0)
        beat = rt.store.load(rt.key(None))
        assert int(beat) > int(acked) and decode_position(int(beat))[1] == 0
        assert shape(seen) == expected  # no event delivered by it
    finally:
        rt.close()  # hybrid: flushed as the run ends, so the final release reaches the heartbeat
    moved = confirmed(wal_pg, slot)
    assert moved == decode_position(int(beat))[0] > held + 3 * 1024 * 1024 - 65536  # the WAL is released
    assert not slot_is_past(moved, int(beat))
    # a change after the heartbeat is delivered once, with no gap
    with wal_pg.connect() as conn:
        conn.execute(f"INSERT INTO {channel}_a VALUES (700, 'after the heartbeat', null)")
    rt2 = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source_for(cfg, wal_pg))
    more: list[ChangeEvent] = []
    try:
        assert rt2.source.has_new(None, beat)
        drain(rt2, more)
    finally:
        rt2.close()
    assert shape(more) == [(f"public.{channel}_a", "INSERT", 700)]


def test_without_a_heartbeat_a_quiet_publication_holds_the_wal_and_no_run_is_asked_for(
        wal_pg, db, channel, redis_url, postgres_url) -> None:
    cfg = config(channel, "postgres", source={"heartbeat_mb": 0})
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=source_for(cfg, wal_pg))
    try:
        write_workload(wal_pg, channel)
        drain(rt, [])
        acked = rt.store.load(rt.key(None))
        write_other_wal(wal_pg, channel, 2)
        assert not rt.source.has_new(None, acked)
        batch = rt.source.read(None, acked, 10)
        assert batch.events == [] and batch.next_checkpoint is None  # nothing to ack
    finally:
        rt.close()


def test_a_checkpoint_mid_transaction_keeps_the_transaction_in_the_slot(wal_pg, db, channel, postgres_url) -> None:
    cfg = config(channel)
    src = source_for(cfg, wal_pg)
    try:
        with wal_pg.connect() as conn:
            conn.execute(f"INSERT INTO {channel}_a SELECT g, 'bulk', null FROM generate_series(1, 25) g")
        first = src.read(None, None, 10)
        assert len(first.events) == 10
        src.release(None, lambda: first.next_checkpoint, final=True)
        lsn, index = decode_position(int(first.next_checkpoint))
        assert index == 10 and confirmed(wal_pg, cfg.source.slot_name("g")) == lsn  # not past it
        rest = []
        after = first.next_checkpoint
        while (batch := src.read(None, after, 10)).events:
            rest += batch.events
            after = batch.next_checkpoint
        assert [e.keys["id"] for e in first.events + rest] == list(range(1, 26))
        src.release(None, lambda: after, final=True)
        assert confirmed(wal_pg, cfg.source.slot_name("g")) == lsn + 1
    finally:
        src.close()


def _lagging_consumer(wal_pg, channel, cfg) -> tuple[WalSource, str]:
    """A consumer that acked one transaction; two more were written after its checkpoint."""
    src = source_for(cfg, wal_pg)
    with wal_pg.connect() as conn:
        conn.execute(f"INSERT INTO {channel}_a VALUES (1, 'acked', null)")
    batch = src.read(None, None, 10)
    checkpoint = batch.next_checkpoint
    with wal_pg.connect() as conn:
        conn.execute(f"INSERT INTO {channel}_a VALUES (2, 'lost', null)")
        conn.execute(f"INSERT INTO {channel}_a VALUES (3, 'lost', null)")
    return src, checkpoint


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_slot_dropped_under_a_lagging_consumer_is_a_gap_never_a_silent_skip(
        policy, wal_pg, db, channel, redis_url, postgres_url) -> None:
    cfg = config(channel, "postgres", source={"trim_policy": policy})
    src, checkpoint = _lagging_consumer(wal_pg, channel, cfg)
    slot, pub = cfg.source.slot_name("g"), cfg.source.publication_name
    try:
        with wal_pg.connect() as conn:
            drop_wal_source(conn, slot=slot)
            install_wal_source(conn, publication=pub, slot=slot, tables=cfg.source.tables)
            conn.execute(f"INSERT INTO {channel}_a VALUES (4, 'after the new slot', null)")
        assert src.has_new(None, checkpoint)
        if policy == "fail":
            with pytest.raises(WalGapError) as err:
                src.read(None, checkpoint, 10)
            assert err.value.from_sequence == checkpoint and "dropped and recreated" in str(err.value)
            return
        # skip: through the drainer with a real store, the gap is recorded and the run goes on from the slot
        rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=src)
        rt.store.save(rt.key(None), checkpoint)
        seen: list[ChangeEvent] = []
        try:
            drain(rt, seen)
            gaps = rt.storage.gaps(cfg.name)
        finally:
            rt.close()
        assert [e.keys["id"] for e in seen] == [4]
        assert len(gaps) == 1 and gaps[0]["from_sequence"] == checkpoint
        assert int(gaps[0]["to_sequence"]) > int(checkpoint)
    finally:
        src.close()


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_slot_invalidated_under_a_lagging_consumer_is_a_gap(policy, wal_pg, db, channel) -> None:
    cfg = config(channel, "postgres", source={"trim_policy": policy})
    src, checkpoint = _lagging_consumer(wal_pg, channel, cfg)
    slot = cfg.source.slot_name("g")
    try:
        with wal_pg.connect() as conn:
            conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
            conn.execute("SELECT pg_reload_conf()")
            try:
                for _ in range(20):  # new segments and a checkpoint until the slot is given up
                    conn.execute(f"INSERT INTO {channel}_b VALUES ({100 + _}, 1, true)")
                    conn.execute("SELECT pg_switch_wal()")
                    conn.execute("CHECKPOINT")
                    if slot_info(conn, slot).lost:
                        break
            finally:
                conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
                conn.execute("SELECT pg_reload_conf()")
            assert slot_info(conn, slot).lost
        if policy == "fail":
            with pytest.raises(WalSlotInvalidatedError) as err:  # a WalGapError: trimmed data under trim_policy
                src.read(None, checkpoint, 10)
            message = str(err.value)
            assert isinstance(err.value, WalGapError) and err.value.from_sequence == checkpoint
            assert f"replication slot {slot!r} was invalidated" in message and "wal_status 'lost'" in message
            assert f"wal drop --channel {channel} --slot {slot}" in message and "wal install" in message
            assert "--force" in message and "trim_policy: skip" in message  # the deliberate checkpoint decision
            with pytest.raises(WalSlotInvalidatedError):  # it stays stopped: nothing was moved or recreated
                src.read(None, checkpoint, 10)
            backlog = src.backlog_bytes(None, checkpoint)
            assert backlog.lost and "lost" in backlog.lost and backlog.retained_bytes is None
            return
        batch = src.read(None, checkpoint, 10)
        assert batch.gap is not None and batch.gap.from_sequence == checkpoint and not batch.events
        with wal_pg.connect() as conn:
            assert not slot_info(conn, slot).lost
            conn.execute(f"INSERT INTO {channel}_a VALUES (7, 'after', null)")
        after = src.read(None, batch.next_checkpoint, 10)
        assert [e.keys["id"] for e in after.events] == [7]
    finally:
        src.close()


def _bulk_insert(wal_pg: PrivatePostgres, table: str, first: int, n: int) -> None:
    with wal_pg.connect() as conn:
        conn.execute(f"INSERT INTO {table} SELECT g, repeat('x', 100), null FROM generate_series(%s::int, %s::int) g",
                     (first, first + n - 1))


def test_the_backlog_in_bytes_reaches_the_lag_measure_the_run_metrics_jsonl_and_prometheus(
        wal_pg, db, channel, postgres_url, tmp_path) -> None:
    cfg = config(channel, max_events=1000)
    labels = Labels(cfg.adapter, cfg.stream, cfg.group, cfg.consumer)
    exporter = PushgatewayExporter("http://127.0.0.1:9", interval_s=3600)  # nothing listens: never pushed
    jsonl = tmp_path / "metrics.jsonl"
    rt = open_runtime(cfg, redis_url=None, postgres_url=postgres_url, source=source_for(cfg, wal_pg),
                      metrics=Metrics(labels, jsonl_path=str(jsonl), use_env=False, exporter=exporter))
    try:
        _bulk_insert(wal_pg, f"{channel}_a", 1, 2000)  # ~0.3 MB of WAL
        (before,) = measure_lag(rt)
        assert before.lag_s is not None and before.lag_s >= 0 and before.acked is None
        assert before.lag_bytes is not None and before.lag_bytes > 200_000  # the whole insert is behind
        assert before.retained_bytes is not None and before.retained_bytes >= before.lag_bytes
        assert "WAL behind" in before.describe()
        drain(rt, [])
        acked = rt.store.load(rt.key(None))
        (after,) = measure_lag(rt)
        assert after.lag_s == 0.0 and after.acked == acked
        assert after.lag_bytes is not None and after.lag_bytes < before.lag_bytes // 2  # measured from the checkpoint
    finally:
        rt.close()
    summary = rt.metrics.summary()  # what the run's output metadata carries
    assert {LAG_BYTES, SLOT_LAG_BYTES, RETAINED_WAL_BYTES} <= set(summary)
    assert 0 <= summary[LAG_BYTES] < before.lag_bytes // 2
    # close released the slot to the checkpoint, then measured once more: little is left unreleased
    assert summary[SLOT_LAG_BYTES] < before.lag_bytes // 2
    lines = [r for r in read_jsonl(jsonl) if r["metric"] == LAG_BYTES]
    assert lines and lines[-1]["labels"]["stream"] == channel and lines[-1]["value"] == summary[LAG_BYTES]
    values = ("supabase", channel, "g", "c", "")
    names = ("adapter", "stream", "group", "consumer", "shard")
    sample = exporter.registry.get_sample_value("reactive_lag_bytes", dict(zip(names, values, strict=True)))
    assert sample == summary[LAG_BYTES]
    assert exporter.registry.get_sample_value("reactive_retained_wal_bytes",
                                              dict(zip(names, values, strict=True))) == summary[RETAINED_WAL_BYTES]


def test_the_lag_check_shows_the_wal_behind_each_checkpoint_in_bytes(wal_pg, db, channel, postgres_url,
                                                                      monkeypatch) -> None:
    import dagster as dg

    from durability_pipelines.orchestration.consumers import build_consumer_defs, lag_check_key
    from durability_pipelines.orchestration.resources import DurabilityResource

    monkeypatch.setenv("DURABILITY_SUPABASE_DB_URL", wal_pg.url)
    cfg = config(channel, max_lag_s=3600)
    source_for(cfg, wal_pg).close()  # installs the publication and the slot
    _bulk_insert(wal_pg, f"{channel}_a", 1, 2000)  # ~0.3 MB of WAL, none of it acked
    defs = dg.Definitions.merge(build_consumer_defs(cfg), dg.Definitions(
        assets=[dg.AssetSpec(["streams", cfg.adapter, cfg.stream])],
        resources={"durability": DurabilityResource(postgres_url=postgres_url)}))
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_check_selection={lag_check_key(cfg)})
    (evaluation,) = job.execute_in_process().get_asset_check_evaluations()
    assert evaluation.passed  # within the objective: bytes are shown, not judged
    assert evaluation.metadata["reactive.lag_bytes"].value > 200_000
    table = evaluation.metadata["per_shard"].value
    assert "| WAL behind (bytes) |" in table.splitlines()[0]
    assert str(evaluation.metadata["reactive.lag_bytes"].value) in table


def test_the_audit_warns_when_a_slot_retains_more_wal_than_its_bound(wal_pg, db, channel, shared: Shared,
                                                                      capsys) -> None:
    import json

    from durability_pipelines.audit.tables import build_checkpoint_audit, measure_retained_log
    from durability_pipelines.cli.main import main

    def audit(cfg: ConsumerConfig):
        retained = measure_retained_log([cfg], lambda c: open_runtime(
            c, redis_url=None, postgres_url=shared.postgres_url, source=source_for(c, wal_pg)))
        df = build_checkpoint_audit(shared.client, shared.db(), [cfg], retained=retained)
        return df[df["consumer"] == cfg.consumer].iloc[0]

    tight = config(channel, source={"max_retained_wal_mb": 0.05})  # 52 kB
    roomy = config(channel, source={"max_retained_wal_mb": 64})
    source_for(tight, wal_pg).close()  # install: the slot retains WAL from now
    _bulk_insert(wal_pg, f"{channel}_a", 1, 1000)  # ~0.15 MB
    row = audit(tight)  # no checkpoint yet: the slot still gets a row
    assert row["status"] == "wal-retained" and row["retained_wal_bytes"] > tight.source.max_retained_bytes
    assert "max_retained_wal_mb" in row["detail"] and "wal drop" in row["detail"]
    assert row["checkpoint_key"] == f"checkpoint:supabase:{channel}:g:c"
    row = audit(roomy)
    assert row["status"] == "ok" and row["retained_wal_bytes"] > 0
    # a consumer with a checkpoint: its own row carries the figure
    save_checkpoint(shared, tight)
    row = audit(tight)
    assert row["status"] == "wal-retained" and row["postgres_value"] is not None
    # `wal status` says it too
    capsys.readouterr()
    code = main(["--json", "wal", "status", "--channel", channel, "--group", "g", "--db-url", wal_pg.url,
                 "--max-retained-wal-mb", "0.05"])
    status = json.loads(capsys.readouterr().out)
    assert code == 0 and status["retained_over_bound"] is True and status["slot"]["lag_bytes"] > 0
    code = main(["wal", "status", "--channel", channel, "--group", "g", "--db-url", wal_pg.url])
    assert code == 0 and "WARNING" not in capsys.readouterr().out  # the default bound: 1024 MB


def save_checkpoint(shared: Shared, cfg: ConsumerConfig) -> None:
    """The consumer acked something (its checkpoint key exists in the audit's stores)."""
    from durability_pipelines.checkpoints import CheckpointKey
    from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore

    store = PostgresCheckpointStore(shared.postgres_url)
    store.save(CheckpointKey(cfg.adapter, cfg.stream, cfg.group, cfg.consumer, None), str(5 * INDEX_SPAN + 1))


def test_positions_and_config(channel) -> None:
    cfg = config(channel)
    assert cfg.adapter == "supabase" and cfg.stream == channel
    assert cfg.source.slot_name("g") == f"durability_{channel}_g"
    assert INDEX_SPAN == 10**10 and len(str(parse_lsn("FFFFFFFF/FFFFFFFF") * INDEX_SPAN + INDEX_SPAN - 1)) <= 40
    assert slot_target(5 * INDEX_SPAN + 3, {5: 3}) == 6 and slot_target(5 * INDEX_SPAN + 2, {5: 3}) == 5
    with pytest.raises(ValueError):
        config(channel, source={"slot": "Bad-Name"})


def test_cli_installs_inspects_and_drops_the_slot_and_publication(wal_pg, db, channel, capsys) -> None:
    import json

    from durability_pipelines.cli.main import main
    from durability_pipelines.sources.wal_changes import default_publication_name, default_slot_name

    def cli(*argv: str) -> dict[str, Any]:
        capsys.readouterr()
        code = main(["--json", "wal", *argv, "--channel", channel, "--group", "ops", "--db-url", wal_pg.url])
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    slot, pub = default_slot_name(channel, "ops"), default_publication_name(channel)
    cfg = config(channel, source={"install": False})
    assert (cfg.source.slot_name("ops"), cfg.source.publication_name) == (slot, pub)  # config and CLI agree
    installed = cli("install", f"{channel}_a", f"{channel}_b")
    assert installed["slot"] == slot and installed["plugin"] == "pgoutput"
    assert cli("install", f"{channel}_a", f"{channel}_b")["confirmed_flush_lsn"] == installed["confirmed_flush_lsn"]
    with wal_pg.connect() as conn:
        conn.execute(f"INSERT INTO {channel}_a VALUES (1, 'x', null)")
    status = cli("status")
    assert status["slot"]["wal_status"] in ("reserved", "extended") and status["slot"]["retained_bytes"] > 0
    assert status["tables"] == [f"public.{channel}_a", f"public.{channel}_b"]
    assert status["replica_identity"][f"public.{channel}_b"] == "full"
    assert cli("drop", "--publication-too")["dropped"] == {"slot": True, "publication": True}
    status = cli("status")
    assert status["slot"] is None and not status["publication_exists"]
