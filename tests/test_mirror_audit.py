"""Scheduled mirror and audit tables on real Redis/Postgres, and the Dagster assets + checks."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
import redis
from psycopg import sql

from durability_pipelines import services
from durability_pipelines.audit.tables import AuditThresholds, build_checkpoint_audit, build_history_summary
from durability_pipelines.checkpoints import CheckpointKey
from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
from durability_pipelines.checkpoints.keys import SENSOR_CURSOR_PREFIX as CURSOR_PREFIX
from durability_pipelines.checkpoints.mirror import CheckpointMirror
from durability_pipelines.checkpoints.ordering import sort_key
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore, PostgresConnection
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.cursor_mirror import CursorMirror
from durability_pipelines.consumer.dispatch import SensorCursor, ShardCursor
from durability_pipelines.consumer.storage import ConsumerStorage, ensure
from durability_pipelines.orchestration.consumers import LAG_CHECK


@dataclass
class Isolated:
    """A database of its own and the session's own Redis server: the audit reads *every* key."""

    postgres_url: str
    redis_url: str

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def db(self) -> PostgresConnection:
        return PostgresConnection(self.postgres_url)


@pytest.fixture
def iso(postgres_admin_url: str, own_redis_url: str) -> Iterator[Isolated]:
    name = f"dp_audit_{secrets.token_hex(4)}"
    url = services.ensure_database(postgres_admin_url, name)
    redis_url = own_redis_url  # the session's own server: the only kind a test may flush
    client = redis.Redis.from_url(redis_url)
    ensure(PostgresConnection(url))
    yield Isolated(url, redis_url)
    client.close()
    with psycopg.connect(services.libpq_url(postgres_admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def key(i: int, stream: str = "orders") -> CheckpointKey:
    return CheckpointKey("dynamodb", stream, "workers", "consumer-a", f"shard-{i:05d}")


def fill_redis(client: redis.Redis, n: int, base: int = 10**21) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(key(i).redis_key, str(base + i))
    pipe.execute()


def pg_values(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return {r[0]: r[1] for r in conn.execute("SELECT shard, sequence FROM checkpoints").fetchall()}


def test_mirror_copies_every_key_in_batches_and_is_idempotent(iso: Isolated) -> None:
    fill_redis(iso.redis(), 3000)
    mirror = CheckpointMirror(iso.redis(), iso.db(), batch_size=700)
    first = mirror.run()
    assert (first.redis_keys, first.mirrored_to_postgres, first.restored_to_redis) == (3000, 3000, 0)
    assert pg_values(iso.postgres_url)["shard-02999"] == str(10**21 + 2999)
    second = mirror.run()
    assert second.mirrored_to_postgres == 0 and second.restored_to_redis == 0  # nothing to do: no writes


def test_mirror_never_regresses_either_store(iso: Isolated) -> None:
    client = iso.redis()
    fill_redis(client, 10)
    CheckpointMirror(client, iso.db()).run()
    client.set(key(1).redis_key, "5")  # Redis went back (restored from an old snapshot)
    client.delete(key(2).redis_key)  # Redis lost a key
    client.set(key(3).redis_key, str(10**22))  # Redis ahead: normal hybrid drift
    report = CheckpointMirror(client, iso.db()).run()
    assert report.restored_to_redis == 2 and report.mirrored_to_postgres == 1
    assert client.get(key(1).redis_key) == str(10**21 + 1).encode()  # restored, not regressed
    assert client.get(key(2).redis_key) == str(10**21 + 2).encode()
    assert pg_values(iso.postgres_url)["shard-00001"] == str(10**21 + 1)  # Postgres not regressed to 5
    assert pg_values(iso.postgres_url)["shard-00003"] == str(10**22)
    assert report.largest_drift == 10**22 - (10**21 + 3)


def test_mirror_is_safe_with_concurrent_consumers_and_itself(iso: Isolated) -> None:
    client = iso.redis()
    fill_redis(client, 2000)
    store = RedisCheckpointStore(client)
    stop = threading.Event()
    errors: list[BaseException] = []

    def consumer() -> None:
        v = 10**21 + 10_000
        while not stop.is_set():
            for i in range(0, 2000, 97):
                store.save(key(i), str(v))
            v += 1

    def mirror() -> None:
        try:
            for _ in range(3):
                CheckpointMirror(redis.Redis.from_url(iso.redis_url), iso.db(), batch_size=300).run()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    writer = threading.Thread(target=consumer)
    mirrors = [threading.Thread(target=mirror) for _ in range(2)]
    writer.start()
    for t in mirrors:
        t.start()
    for t in mirrors:
        t.join()
    stop.set()
    writer.join()
    assert errors == []
    CheckpointMirror(client, iso.db()).run()
    pg = pg_values(iso.postgres_url)
    for i in range(2000):
        assert pg[f"shard-{i:05d}"] == client.get(key(i).redis_key).decode()
    with psycopg.connect(iso.postgres_url) as conn:  # history is monotonic per key
        rows = conn.execute("SELECT shard, new_sequence FROM checkpoint_history ORDER BY id").fetchall()
    last: dict[str, str] = {}
    for shard, seq in rows:
        assert shard not in last or sort_key(last[shard]) < sort_key(seq)
        last[shard] = seq


def test_mirror_reports_garbage_and_mirrors_cursors_both_ways(iso: Isolated) -> None:
    client = iso.redis()
    client.set(key(0).redis_key, "not-a-number")
    client.set(f"{CURSOR_PREFIX}:only_in_redis", '{"v":1,"shards":{}}')
    ConsumerStorage(iso.db()).save_cursor("only_in_postgres", '{"v":1,"shards":{}}')
    report = CheckpointMirror(client, iso.db()).run()
    assert report.invalid == [key(0).redis_key]
    assert CursorMirror(client, ConsumerStorage(iso.db())).mirror_all() == 2
    assert client.get(f"{CURSOR_PREFIX}:only_in_postgres") is not None
    assert ConsumerStorage(iso.db()).load_cursor("only_in_redis") is not None


def consumer_cfg(**kw: object) -> ConsumerConfig:
    return ConsumerConfig.model_validate({
        "name": "orders_worker", "source": {"kind": "dynamodb", "table": "orders"}, "group": "workers",
        "consumer": "consumer-a", "checkpoint": {"backend": "hybrid", "flush_every_n": 3, "flush_every_s": 60}, **kw,
    })


def test_audit_statuses_ok_drifting_stale_dead_lettered(iso: Isolated) -> None:
    cfg = consumer_cfg()
    hybrid = HybridCheckpointStore(RedisCheckpointStore.from_url(iso.redis_url),
                                   PostgresCheckpointStore(iso.postgres_url), flush_every_n=3, flush_every_s=60)
    hybrid.save(key(0), "100")  # ok: flushed at once
    hybrid.save(key(1), "100")
    for v in ("101", "102", "103"):  # drifting: 3 acks since flush and Postgres behind
        hybrid.redis.save_counting(key(1), v, flush_state=True)
    hybrid.save(key(2), "100")  # stale: backlog and an old last ack
    hybrid.save(key(3), "100")  # dead-lettered
    ConsumerStorage(iso.db()).save_cursor("orders_worker_sensor", SensorCursor(shards={
        "shard-00002": ShardCursor(dispatched="100", run_key="r", backlog=True)}).to_json())
    ConsumerStorage(iso.db()).add_dead_letter(
        consumer="orders_worker", adapter="dynamodb", stream="orders", group="workers", shard="shard-00003",
        first_sequence="101", last_sequence="110", record_count=10, error="boom", attempts=4, policy="stop",
        run_id="r1")
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    df = build_checkpoint_audit(iso.redis(), iso.db(), [cfg], AuditThresholds(stale_after_s=600), now=later)
    status = dict(zip(df["shard"], df["status"], strict=True))
    assert status == {"shard-00000": "ok", "shard-00001": "drifting",
                      "shard-00002": "stale", "shard-00003": "dead-lettered"}
    row = df.set_index("shard").loc["shard-00001"]
    assert (row["redis_value"], row["postgres_value"], row["drift"]) == ("103", "100", "3")  # text: never a float
    assert df.set_index("shard").loc["shard-00002", "dispatched"] == "100"


def test_history_summary_counts_regressions_but_not_recorded_forced_moves(iso: Isolated) -> None:
    store = PostgresCheckpointStore(iso.postgres_url)
    store.save(key(0), "10")
    store.save(key(0), "20")
    summary = build_history_summary(iso.db())
    assert int(summary["regressions"].sum()) == 0 and int(summary["advances"].sum()) == 2
    with psycopg.connect(iso.postgres_url, autocommit=True) as conn:
        for reason in ("force: operator rewind for replay", None):
            conn.execute(
                "INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence, "
                "new_sequence, writer, reason) VALUES ('dynamodb','orders','workers','consumer-a','shard-00000',"
                "'20','5','x',%s)", (reason,))
    summary = build_history_summary(iso.db())
    assert int(summary["forced_moves"].sum()) == 1 and int(summary["regressions"].sum()) == 1


def test_dagster_assets_materialize_and_checks_fail_when_they_should(iso: Isolated, monkeypatch) -> None:
    from dagster import DagsterInstance

    from durability_pipelines.definitions import build_definitions

    monkeypatch.setenv("DURABILITY_POSTGRES_URL", iso.postgres_url)
    monkeypatch.setenv("DURABILITY_REDIS_URL", iso.redis_url)
    fill_redis(iso.redis(), 50)
    defs = build_definitions()
    job = defs.resolve_job_def("checkpoint_mirror_job")
    healthy = job.execute_in_process(instance=DagsterInstance.ephemeral())
    assert healthy.success
    mats = {e.materialization.asset_key.path[-1]: e.materialization.metadata
            for e in healthy.get_asset_materialization_events()}
    assert mats["checkpoint_mirror"]["keys_mirrored"].value == 50
    assert mats["checkpoint_audit"]["dagster/row_count"].value == 50
    assert {c.name for c in mats["checkpoint_audit"]["dagster/column_schema"].schema.columns} >= {
        "redis_value", "postgres_value", "dispatched", "lag_seconds", "drift", "status"}
    evaluations = healthy.get_asset_check_evaluations()
    audit_checks = [e for e in evaluations if e.check_name != LAG_CHECK]
    assert audit_checks and all(e.passed for e in audit_checks)
    # The job also evaluates every consumer's lag check. No stream is reachable here: a lag that cannot be
    # measured fails its check, saying why, and does not fail the mirror.
    lag_checks = [e for e in evaluations if e.check_name == LAG_CHECK]
    assert len(lag_checks) == 3 and not any(e.passed for e in lag_checks)
    assert all((e.description or "").startswith("cannot measure consumer") for e in lag_checks)

    with psycopg.connect(iso.postgres_url, autocommit=True) as conn:  # inject a regression
        conn.execute(
            "INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence, "
            "new_sequence, writer) VALUES ('dynamodb','orders','workers','consumer-a','shard-00000','9','1','x')")
    iso.redis().set(key(1).redis_key, "garbage")  # and a value that is no position at all
    broken = job.execute_in_process(instance=DagsterInstance.ephemeral(), raise_on_error=False)
    checks = {e.check_name: e.passed for e in broken.get_asset_check_evaluations()}
    assert checks["no_checkpoint_regression"] is False
    assert checks["no_invalid_checkpoint_values"] is False
