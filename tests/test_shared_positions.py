"""The shared key and row hold only positions other workers can use (issue 11.3).

The other worker is raw redis-py and the original SQL: it reads ``GET checkpoint:...`` and
``SELECT sequence FROM checkpoints`` and feeds the value to AT_SEQUENCE_NUMBER, so a SHARD_END,
TRIM_HORIZON or LATEST there would break it. The project keeps those in its own sentinel key / table.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
import redis

from durability_pipelines.checkpoints import LATEST, SHARD_END, TRIM_HORIZON, CheckpointKey, SaveContext
from durability_pipelines.checkpoints.base import forced_reason
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from tests.support.sources import ListSource
from tests.support.stores import build_store
from tests.test_cli import cli_env, run_json  # noqa: F401 - cli_env: the CLI finds the fixture servers
from tests.test_consumer_drain import SHARD, FakeClock, budget, drainer, open_rt

SHARED_BACKENDS = ("redis", "postgres", "hybrid")


def other_worker_reads(key: CheckpointKey, redis_url: str, postgres_url: str) -> dict[str, str | None]:
    """What a worker of the original pattern reads from each store (plain GET, the original SELECT)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        in_redis = client.get(key.redis_key)
    finally:
        client.close()
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute(
            "SELECT sequence FROM checkpoints WHERE adapter = %s AND stream = %s AND grp = %s AND consumer = %s "
            "AND shard = %s", (key.adapter, key.stream, key.group, key.consumer, key.shard_column)).fetchone()
    return {"redis": in_redis, "postgres": row[0] if row else None}


def shared_value(backend: str, key: CheckpointKey, redis_url: str, postgres_url: str) -> str | None:
    reads = other_worker_reads(key, redis_url, postgres_url)
    return reads["postgres"] if backend == "postgres" else reads["redis"]


@pytest.fixture
def key() -> CheckpointKey:
    return CheckpointKey("dynamodb", "pos-" + uuid.uuid4().hex[:8], "g", "c", "shard-0")


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_shard_end_leaves_the_last_number_in_the_shared_key(backend: str, key: CheckpointKey, redis_url: str,
                                                             postgres_url: str) -> None:
    store = build_store(backend, redis_url, postgres_url)
    store.save(key, "1000")
    assert store.save(key, SHARD_END).advanced
    assert store.load(key) == SHARD_END
    assert store.load_many([key]) == {key: SHARD_END}
    assert shared_value(backend, key, redis_url, postgres_url) == "1000"
    assert not store.save(key, "2000").advanced  # nothing moves a shard that ended
    assert store.save(key, SHARD_END).outcome.value == "unchanged"
    assert shared_value(backend, key, redis_url, postgres_url) == "1000"
    store.close()


def test_hybrid_flushes_the_last_number_to_postgres_before_shard_end(key: CheckpointKey, redis_url: str,
                                                                      postgres_url: str) -> None:
    store = build_store("hybrid", redis_url, postgres_url, flush_every_n=1000, flush_every_s=3600)
    store.save(key, "10")
    store.save(key, "20")
    store.save(key, SHARD_END)
    assert other_worker_reads(key, redis_url, postgres_url) == {"redis": "20", "postgres": "20"}
    assert PostgresCheckpointStore(postgres_url).load(key) == SHARD_END  # the closed state is durable at once
    store.close()


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_a_drained_closed_shard_keeps_its_last_sequence_for_other_workers(backend: str, redis_url: str,
                                                                          postgres_url: str) -> None:
    stream = "closed-" + uuid.uuid4().hex[:8]
    source = ListSource.with_events(stream, 15)
    source.closed.add(SHARD)
    rt = open_rt(stream, redis_url, postgres_url, source, backend)
    report = drainer(rt, FakeClock(), budget(max_idle_s=30.0)).run()
    assert report.checkpoint == SHARD_END and rt.store.load(rt.key(SHARD)) == SHARD_END
    last = source.shards_events[SHARD][-1].sequence
    assert shared_value(backend, rt.key(SHARD), redis_url, postgres_url) == last
    rt.close()


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
@pytest.mark.parametrize("sentinel", [TRIM_HORIZON, LATEST])
def test_a_forced_rewind_to_an_initial_position_leaves_no_number_behind(backend: str, sentinel: str,
                                                                        key: CheckpointKey, redis_url: str,
                                                                        postgres_url: str) -> None:
    store = build_store(backend, redis_url, postgres_url)
    store.save(key, "500")
    ctx = SaveContext(writer="ops", reason=forced_reason("re-read the shard"))
    result = store.force_set(key, sentinel, context=ctx)
    assert result.previous == "500" and result.direction == "backward"
    assert store.load(key) == sentinel
    assert other_worker_reads(key, redis_url, postgres_url) == {"redis": None, "postgres": None}
    assert store.save(key, "10").advanced  # the first ack after the rewind goes to the shared key
    assert store.load(key) == "10" and shared_value(backend, key, redis_url, postgres_url) == "10"
    store.close()


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_forcing_shard_end_keeps_the_number_and_forcing_a_number_clears_it(backend: str, key: CheckpointKey,
                                                                           redis_url: str, postgres_url: str) -> None:
    store = build_store(backend, redis_url, postgres_url)
    store.save(key, "700")
    ctx = SaveContext(writer="ops", reason=forced_reason("the shard was processed elsewhere"))
    store.force_set(key, SHARD_END, context=ctx)
    assert store.load(key) == SHARD_END and shared_value(backend, key, redis_url, postgres_url) == "700"
    store.force_set(key, "650", context=ctx)
    assert store.load(key) == "650" and shared_value(backend, key, redis_url, postgres_url) == "650"
    store.close()


def test_another_workers_number_after_shard_end_does_not_reopen_the_shard(key: CheckpointKey, redis_url: str,
                                                                          postgres_url: str) -> None:
    store = build_store("redis", redis_url, postgres_url)
    store.save(key, "100")
    store.save(key, SHARD_END)
    redis.Redis.from_url(redis_url).set(key.redis_key, "900", ex=86400)  # a worker of the original pattern
    assert store.load(key) == SHARD_END
    store.close()


def _old_version_wrote(key: CheckpointKey, value: str, redis_url: str, postgres_url: str,
                       history: list[tuple[str | None, str]]) -> None:
    """The layout an older version left: the sentinel in the shared key and row, numbers in the history."""
    client = redis.Redis.from_url(redis_url)
    client.set(key.redis_key, value)
    for prev, seq in history:
        client.xadd(key.history_key, {"prev": prev or "", "seq": seq, "writer": "old", "epoch": "", "run": "",
                                      "reason": "batch ack"})
    client.close()
    cols = (key.adapter, key.stream, key.group, key.consumer, key.shard_column)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO checkpoints (adapter, stream, grp, consumer, shard, sequence, ts) "
                     "VALUES (%s, %s, %s, %s, %s, %s, NOW())", (*cols, value))
        for prev, seq in history:
            conn.execute("INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence, "
                         "new_sequence, writer) VALUES (%s, %s, %s, %s, %s, %s, %s, 'old')", (*cols, prev, seq))


def test_migrate_moves_an_old_shard_end_out_of_the_shared_layout(capsys: pytest.CaptureFixture[str],
                                                                  key: CheckpointKey, redis_url: str,
                                                                  postgres_url: str) -> None:
    PostgresCheckpointStore(postgres_url).close()  # schema present
    _old_version_wrote(key, SHARD_END, redis_url, postgres_url, [(None, "40"), ("40", "55"), ("55", SHARD_END)])
    data: dict[str, Any] = run_json(capsys, "migrate")
    moved = {(c["store"], c["key"]): c["value"] for c in data["sentinels_converted"]}
    assert moved[("redis", key.redis_key)] == SHARD_END and moved[("postgres", key.redis_key)] == SHARD_END
    assert other_worker_reads(key, redis_url, postgres_url) == {"redis": "55", "postgres": "55"}
    for backend in SHARED_BACKENDS:
        store = build_store(backend, redis_url, postgres_url)
        assert store.load(key) == SHARD_END, backend
        store.close()
    again = run_json(capsys, "migrate")  # idempotent: nothing left to move
    assert not [c for c in again["sentinels_converted"] if c["key"] == key.redis_key]


def test_migrate_removes_an_old_initial_position_from_the_shared_layout(capsys: pytest.CaptureFixture[str],
                                                                         key: CheckpointKey, redis_url: str,
                                                                         postgres_url: str) -> None:
    PostgresCheckpointStore(postgres_url).close()
    _old_version_wrote(key, LATEST, redis_url, postgres_url, [])
    code_out = run_json(capsys, "migrate")
    assert any(c["key"] == key.redis_key and c["value"] == LATEST for c in code_out["sentinels_converted"])
    assert other_worker_reads(key, redis_url, postgres_url) == {"redis": None, "postgres": None}
    for backend in SHARED_BACKENDS:
        store = build_store(backend, redis_url, postgres_url)
        assert store.load(key) == LATEST, backend
        store.close()


def test_migrate_names_each_conversion_in_its_text_output(capsys: pytest.CaptureFixture[str], key: CheckpointKey,
                                                           redis_url: str, postgres_url: str) -> None:
    from tests.test_cli import run

    PostgresCheckpointStore(postgres_url).close()
    _old_version_wrote(key, SHARD_END, redis_url, postgres_url, [(None, "9")])
    code, out, _ = run(capsys, "migrate")
    assert code == 0
    assert f"Redis key {key.redis_key}: moved SHARD_END" in out
    assert f"Postgres row {key.redis_key}: moved SHARD_END" in out
