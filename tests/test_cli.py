"""``durability-pipelines``: every command in-process against the real servers, plus subprocess runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from durability_pipelines import services
from durability_pipelines.checkpoints import CheckpointKey, LeaseKey, LeaseLostError, SaveContext
from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.cli import (
    EXIT_ACCESS_DENIED,
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    main,
)
from durability_pipelines.consumer.config import CONSUMERS_DIR_ENV, write_consumer_instance
from durability_pipelines.consumer.storage import ConsumerStorage
from tests.support.stores import build_store, unique_key

SCRIPT = Path(sys.executable).parent / "durability-pipelines"
PASSWORD = "Hunter2-Sup3rSecret"


@pytest.fixture(autouse=True)
def cli_env(monkeypatch: pytest.MonkeyPatch, postgres_url: str, redis_url: str) -> None:
    """The CLI resolves the fixture servers through the same env vars operators set."""
    monkeypatch.setenv(services.ENV_POSTGRES_URL, postgres_url)
    monkeypatch.setenv(services.ENV_REDIS_URL, redis_url)
    monkeypatch.delenv("DURABILITY_CHECKPOINT_BACKEND", raising=False)
    monkeypatch.delenv("DURABILITY_SUPABASE_DB_URL", raising=False)
    assert main(["migrate"]) == 0


@pytest.fixture
def hybrid(redis_url: str, postgres_url: str) -> Iterator[HybridCheckpointStore]:
    store = build_store("hybrid", redis_url, postgres_url)
    assert isinstance(store, HybridCheckpointStore)
    yield store
    store.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def parts(key: CheckpointKey) -> list[str]:
    return [key.adapter, key.stream, key.group, key.consumer] + ([key.shard] if key.shard else [])


def closed_port() -> int:
    return services.free_port()


# -- help and subprocess ------------------------------------------------------------------


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("checkpoints", "leases", "dead-letters", "migrate", "change-feed", "demo", "Exit"):
        assert command in out
    for argv in (["checkpoints", "--help"], ["checkpoints", "set", "--help"], ["checkpoints", "rewind", "--help"],
                 ["leases", "release", "--help"], ["dead-letters", "retry", "--help"],
                 ["change-feed", "install", "--help"]):
        code, out, _ = run(capsys, *argv)
        assert code == 0 and "usage: durability-pipelines" in out


def test_console_script_help_and_a_real_command(postgres_url: str, redis_url: str) -> None:
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e . declares the console script"
    helped = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "checkpoints" in helped.stdout
    key = unique_key()
    env = {**os.environ, services.ENV_POSTGRES_URL: postgres_url, services.ENV_REDIS_URL: redis_url}
    done = subprocess.run([str(SCRIPT), "checkpoints", "set", *parts(key), "--sequence", "42"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    got = subprocess.run([str(SCRIPT), "--json", "checkpoints", "get", *parts(key)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert got.returncode == 0, got.stderr
    data = json.loads(got.stdout)
    assert (data["sequence"], data["redis"], data["postgres"], data["drift"]) == ("42", "42", "42", "in-sync")


def test_console_script_unreachable_server_masks_password() -> None:
    env = {**os.environ,
           services.ENV_POSTGRES_URL: f"postgresql://ops:{PASSWORD}@127.0.0.1:{closed_port()}/db",
           services.ENV_REDIS_URL: f"redis://:{PASSWORD}@127.0.0.1:{closed_port()}/0"}
    done = subprocess.run([str(SCRIPT), "checkpoints", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == EXIT_UNAVAILABLE
    assert PASSWORD not in done.stdout + done.stderr
    assert "***" in done.stderr and "unreachable" in done.stderr


# -- checkpoints ---------------------------------------------------------------------------


def test_set_forward_refuses_backward_and_force_records_who_and_why(
    capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore, pg_conn: psycopg.Connection[Any]
) -> None:
    key = unique_key()
    assert run(capsys, "checkpoints", "set", *parts(key), "--sequence", "100")[0] == 0
    assert run(capsys, "checkpoints", "set", *parts(key), "--sequence", "200")[0] == 0
    code, out, err = run(capsys, "checkpoints", "set", *parts(key), "--sequence", "150")
    assert code == EXIT_REFUSED and "refused" in err and "--force" in err and out == ""
    assert hybrid.redis.load(key) == "200" and hybrid.postgres.load(key) == "200"

    code, _, err = run(capsys, "checkpoints", "set", *parts(key), "--sequence", "150", "--force")
    assert code == EXIT_USAGE and "--reason" in err

    data = run_json(capsys, "checkpoints", "set", *parts(key), "--sequence", "150", "--force",
                    "--reason", "replay after bad deploy", "--by", "alice@ops")
    assert (data["previous"], data["sequence"], data["direction"]) == ("200", "150", "backward")
    assert hybrid.redis.load(key) == "150" and hybrid.postgres.load(key) == "150"
    row = pg_conn.execute(
        "SELECT previous_sequence, new_sequence, writer, reason FROM checkpoint_history WHERE stream = %s "
        "ORDER BY id DESC LIMIT 1", (key.stream,),
    ).fetchone()
    assert row == ("200", "150", "alice@ops", "force: replay after bad deploy")
    assert hybrid.redis.history(key)[0].writer == "alice@ops"


def test_set_equal_is_a_noop_and_default_writer_is_user_at_host(
    capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore
) -> None:
    key = unique_key(shard=None)  # unsharded (supabase-style) key
    assert run(capsys, "checkpoints", "set", *parts(key), "--sequence", "7")[0] == 0
    code, out, _ = run(capsys, "checkpoints", "set", *parts(key), "--sequence", "7")
    assert code == 0 and "unchanged" in out
    assert hybrid.postgres.history(key)[0].writer.endswith("@" + os.uname().nodename)


def test_get_shows_each_store_and_history(capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore) -> None:
    key = unique_key()
    hybrid.postgres.save(key, "5", context=SaveContext(writer="w1", reason="batch"))
    hybrid.redis.save(key, "9")
    data = run_json(capsys, "checkpoints", "get", *parts(key))
    assert (data["redis"], data["postgres"], data["sequence"], data["drift"], data["gap"]) == (
        "9", "5", "9", "redis-ahead", 4)
    assert data["history"]["postgres"][0]["writer"] == "w1"
    code, out, _ = run(capsys, "checkpoints", "get", *parts(key))
    assert code == 0 and "redis: 9" in out and "postgres: 5" in out


def test_list_shows_values_per_store_and_drift(
    capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore
) -> None:
    stream = f"orders-{uuid.uuid4().hex[:8]}"
    k = {name: CheckpointKey("dynamodb", stream, "workers", name, "shard-000")
         for name in ("synced", "redis-only", "pg-ahead", "garbage")}
    hybrid.redis.save(k["synced"], "10")
    hybrid.postgres.save(k["synced"], "10")
    hybrid.redis.save(k["redis-only"], "11")
    hybrid.redis.save(k["pg-ahead"], "3")
    hybrid.postgres.save(k["pg-ahead"], "30")
    hybrid.redis.client.set(k["garbage"].redis_key, "not-a-number")
    rows = {r["consumer"]: r for r in run_json(capsys, "checkpoints", "list", "--stream", stream)}
    assert {c: (r["redis"], r["postgres"], r["drift"]) for c, r in rows.items()} == {
        "synced": ("10", "10", "in-sync"),
        "redis-only": ("11", None, "redis-only"),
        "pg-ahead": ("3", "30", "postgres-ahead"),
        "garbage": ("not-a-number", None, "invalid-redis"),
    }
    assert rows["garbage"]["sequence"] is None
    code, out, _ = run(capsys, "checkpoints", "list", "--stream", stream)
    assert code == 0 and "invalid-redis" in out and "4 checkpoint(s)" in out
    only_pg = run_json(capsys, "--backend", "postgres", "checkpoints", "list", "--stream", stream)
    assert {r["consumer"]: r["postgres"] for r in only_pg} == {"synced": "10", "pg-ahead": "30"}



def test_list_reads_drift_for_the_consumer_s_backend_and_claims_no_replay_for_a_postgres_consumer(
    capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A postgres-backend consumer resumes from Postgres only: a Redis value behind it (the mirror's copy) means
    nothing will be re-processed, so the list must not say postgres-ahead; an unconfigured key still does."""
    stream = f"orders-{uuid.uuid4().hex[:8]}"
    write_consumer_instance(tmp_path, {
        "name": "pg_worker", "source": {"kind": "dynamodb", "table": stream}, "group": "workers",
        "consumer": "pg-consumer", "checkpoint": {"backend": "postgres"}})
    monkeypatch.setenv(CONSUMERS_DIR_ENV, str(tmp_path))
    configured = CheckpointKey("dynamodb", stream, "workers", "pg-consumer", "shard-000")
    foreign = CheckpointKey("dynamodb", stream, "workers", "someone-else", "shard-000")
    wrong_type = CheckpointKey("dynamodb", stream, "workers", "hashed", "shard-000")
    for key in (configured, foreign):
        hybrid.redis.save(key, "3")
        hybrid.postgres.save(key, "30")
    hybrid.redis.client.hset(wrong_type.redis_key, "sequence", "100")
    rows = {r["consumer"]: r for r in run_json(capsys, "checkpoints", "list", "--stream", stream)}
    assert (rows["pg-consumer"]["drift"], rows["pg-consumer"]["consumer_backend"]) == ("redis-copy-behind", "postgres")
    assert (rows["someone-else"]["drift"], rows["someone-else"]["consumer_backend"]) == ("postgres-ahead", None)
    assert rows["hashed"]["drift"] == "wrong-type-redis"  # the one drift definition, as the audit says it
    code, out, _ = run(capsys, "checkpoints", "list", "--stream", stream)
    line = next(x for x in out.splitlines() if "pg-consumer" in x)
    assert code == 0 and "redis-copy-behind (27)" in line and "postgres" in line.split("redis-copy-behind")[1]
    hybrid.redis.client.delete(wrong_type.redis_key)

def test_fix_a_garbage_checkpoint(capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore) -> None:
    key = unique_key()
    hybrid.redis.client.set(key.redis_key, "\x00garbage")
    code, _, err = run(capsys, "checkpoints", "set", *parts(key), "--sequence", "5")
    assert code == EXIT_REFUSED and "invalid value" in err and "--force" in err
    data = run_json(capsys, "checkpoints", "set", *parts(key), "--sequence", "5", "--force", "--reason", "garbage")
    assert data["direction"] == "replaced-invalid"
    assert hybrid.redis.load(key) == "5" and hybrid.postgres.load(key) == "5"


def test_unknown_key_bad_sequence_and_bad_key_part(capsys: pytest.CaptureFixture[str]) -> None:
    key = unique_key()
    code, out, err = run(capsys, "checkpoints", "get", *parts(key))
    assert code == EXIT_NOT_FOUND and "no checkpoint" in err and key.redis_key in err and out == ""
    code, _, err = run(capsys, "checkpoints", "set", *parts(key), "--sequence", "12.5")
    assert code == EXIT_USAGE and "'12.5' is not a stream position" in err
    code, _, err = run(capsys, "checkpoints", "set", "dynamodb", "a:b", "g", "c", "--sequence", "1")
    assert code == EXIT_USAGE and "contains ':'" in err
    code, _, err = run(capsys, "checkpoints", "get", "dynamodb", " padded", "g", "c")
    assert code == EXIT_USAGE and "whitespace" in err
    assert run(capsys, "checkpoints", "rewind", *parts(key), "--to-time", "yesterday", "--reason", "x")[0] == EXIT_USAGE


def test_rewind_to_time_uses_postgres_history(
    capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore, pg_conn: psycopg.Connection[Any]
) -> None:
    key = unique_key()
    assert run(capsys, "checkpoints", "set", *parts(key), "--sequence", "10")[0] == 0
    (between,) = pg_conn.execute("SELECT clock_timestamp()").fetchone()
    assert run(capsys, "checkpoints", "set", *parts(key), "--sequence", "20")[0] == 0
    assert run(capsys, "checkpoints", "set", *parts(key), "--sequence", "30")[0] == 0

    dry = run_json(capsys, "checkpoints", "rewind", *parts(key), "--to-time", between.isoformat(),
                   "--reason", "replay", "--dry-run")
    assert dry["target"] == "10" and hybrid.load(key) == "30"
    data = run_json(capsys, "checkpoints", "rewind", *parts(key), "--to-time", between.isoformat(),
                    "--reason", "replay orders after fix", "--by", "carol")
    assert (data["previous"], data["sequence"], data["from"]) == ("30", "10", "postgres checkpoint_history")
    assert hybrid.redis.load(key) == "10" and hybrid.postgres.load(key) == "10"
    newest = hybrid.postgres.history(key)[0]
    assert newest.writer == "carol" and newest.reason.startswith("force: rewind to ") and "replay orders" in newest.reason

    code, _, err = run(capsys, "checkpoints", "rewind", *parts(key), "--to-time", "2001-01-01T00:00:00Z",
                       "--reason", "x")
    assert code == EXIT_NOT_FOUND and "TRIM_HORIZON" in err
    assert run(capsys, "checkpoints", "rewind", *parts(key), "--to-sequence", "TRIM_HORIZON", "--reason", "all")[0] == 0
    assert hybrid.load(key) == "TRIM_HORIZON"


def test_rewind_to_time_on_redis_backend_uses_the_history_stream(
    capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore
) -> None:
    key = unique_key()
    assert run(capsys, "--backend", "redis", "checkpoints", "set", *parts(key), "--sequence", "10")[0] == 0
    secs, micros = hybrid.redis.client.time()
    time.sleep(0.01)
    assert run(capsys, "--backend", "redis", "checkpoints", "set", *parts(key), "--sequence", "20")[0] == 0
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}Z"
    data = run_json(capsys, "checkpoints", "rewind", *parts(key), "--to-time", at, "--reason", "r",
                    "--backend", "redis")
    assert data["sequence"] == "10" and data["from"] == "redis history stream"
    assert hybrid.redis.load(key) == "10" and hybrid.postgres.load(key) is None


def test_rewind_to_records_the_reason_and_where_replay_is_allowed_from(
    capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore
) -> None:
    from durability_pipelines.checkpoints.replay import replay_mark

    key = unique_key()
    assert run(capsys, "checkpoints", "set", *parts(key), "--sequence", "500")[0] == 0
    data = run_json(capsys, "checkpoints", "rewind", *parts(key), "--to", "120", "--reason", "INC-9: re-send",
                    "--by", "dave")
    assert (data["previous"], data["sequence"], data["replay_allowed_from"]) == ("500", "120", "120")
    assert hybrid.redis.load(key) == "120" and hybrid.postgres.load(key) == "120"
    for part in (hybrid.redis, hybrid.postgres):
        newest = part.history(key)[0]
        assert (newest.writer, newest.reason) == ("dave", "force: rewind to sequence 120: INC-9: re-send")
    mark = replay_mark(hybrid, key)  # what a broadcaster's consumer reads: replay is allowed from here, once
    assert mark is not None and (mark.sequence, mark.deliberate) == ("120", True)
    code, out, _ = run(capsys, "checkpoints", "rewind", *parts(key), "--to", "110", "--reason", "again")
    assert code == 0 and "replay allowed from 110" in out

    code, _, err = run(capsys, "checkpoints", "rewind", *parts(key), "--to", "100")
    assert code == EXIT_USAGE and "--reason" in err
    code, _, err = run(capsys, "checkpoints", "rewind", *parts(key), "--to", "100", "--to-time",
                       "2024-01-01T00:00:00Z", "--reason", "x")
    assert code == EXIT_USAGE and "not allowed with" in err
    assert hybrid.load(key) == "110"  # refused commands wrote nothing


def test_export_csv_and_json_parse_back(
    capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore, tmp_path: Path
) -> None:
    stream = f"exp-{uuid.uuid4().hex[:8]}"
    expected = {}
    for i, shard in enumerate(("shard-000", "shard-001", None)):
        key = CheckpointKey("dynamodb", stream, "workers", "consumer-a", shard)
        expected[key.redis_key] = str(10**25 + i)
        assert run(capsys, "checkpoints", "set", *parts(key), "--sequence", expected[key.redis_key])[0] == 0
    target = tmp_path / "checkpoints.csv"
    code, _, err = run(capsys, "checkpoints", "export", "--format", "csv", "--output", str(target), "--stream", stream)
    assert code == 0 and "wrote 3 checkpoint(s)" in err
    with open(target, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["key"]: r["sequence"] for r in rows} == expected
    assert {r["shard"] for r in rows} == {"shard-000", "shard-001", ""}
    code, out, _ = run(capsys, "checkpoints", "export", "--format", "json", "--stream", stream)
    assert code == 0
    data = json.loads(out)
    assert {d["key"]: (d["sequence"], d["redis"], d["postgres"]) for d in data} == {
        k: (v, v, v) for k, v in expected.items()}
    assert all(CheckpointKey.parse(d["key"]).stream == stream for d in data)


# -- leases --------------------------------------------------------------------------------


def test_leases_list_and_release(capsys: pytest.CaptureFixture[str], hybrid: HybridCheckpointStore) -> None:
    key = unique_key()
    lease = hybrid.leases.acquire(key.lease_key, "worker-a", duration_s=300)
    assert lease is not None and hybrid.save(key, "100", lease=lease).advanced
    listed = [d for d in run_json(capsys, "leases", "list") if d["lease"] == str(key.lease_key)]
    assert {(d["store"], d["owner"], d["state"]) for d in listed} == {
        ("postgres", "worker-a", "held"), ("redis", "worker-a", "held")}

    hybrid.leases.request_handoff(key.lease_key, "worker-next", duration_s=300)  # a successor waits for it
    (granted,) = [d for d in run_json(capsys, "leases", "list")
                  if d["lease"] == str(key.lease_key) and d["store"] == "postgres"]  # hybrid: Postgres grants
    assert granted["requested_by"] == "worker-next" and granted["handoff"].startswith("requested by worker-next")
    code, out, _ = run(capsys, "leases", "list")
    assert code == 0 and "HAND-OFF" in out and "requested by worker-next" in out
    hybrid.leases.withdraw_request(key.lease_key, "worker-next")

    lease_parts = [key.adapter, key.stream, key.group, key.shard or ""]
    code, _, err = run(capsys, "leases", "release", *lease_parts)
    assert code == EXIT_REFUSED and "worker-a" in err and "--force" in err
    assert hybrid.leases.get(key.lease_key).owner == "worker-a"

    code, _, err = run(capsys, "checkpoints", "set", *parts(key), "--sequence", "50", "--force", "--reason", "x")
    assert code == 0 and "held by worker-a" in err  # a forced write warns about the live holder

    code, out, _ = run(capsys, "leases", "release", *lease_parts, "--force", "--by", "dave")
    assert code == 0 and "FORCED by dave" in out and "worker-a" in out
    with pytest.raises(LeaseLostError):
        hybrid.save(key, "200", lease=lease)  # the old holder is fenced off
    assert hybrid.redis.load(key) == "50"

    code, out, _ = run(capsys, "leases", "release", *lease_parts)
    assert code == 0 and "already released" in out
    expired = unique_key()
    assert hybrid.leases.acquire(expired.lease_key, "worker-b", duration_s=0.01) is not None
    time.sleep(0.05)
    code, out, _ = run(capsys, "leases", "release", expired.adapter, expired.stream, expired.group, "shard-000")
    assert code == 0 and "(expired)" in out
    mine = unique_key()
    assert hybrid.leases.acquire(mine.lease_key, "worker-c", duration_s=300) is not None
    assert run(capsys, "leases", "release", mine.adapter, mine.stream, mine.group, "shard-000",
               "--owner", "worker-c")[0] == 0
    missing = LeaseKey("dynamodb", f"none-{uuid.uuid4().hex[:6]}", "workers", "shard-000")
    assert run(capsys, "leases", "release", missing.adapter, missing.stream, missing.group, "shard-000")[0] == EXIT_NOT_FOUND


# -- dead letters --------------------------------------------------------------------------


def test_dead_letters_list_retry_resolve(capsys: pytest.CaptureFixture[str], postgres_url: str) -> None:
    storage = ConsumerStorage(PostgresConnection(postgres_url))
    consumer = f"orders_{uuid.uuid4().hex[:8]}"
    dl_id = storage.add_dead_letter(
        consumer=consumer, adapter="dynamodb", stream="orders", group="workers", shard="shard-003",
        first_sequence="100", last_sequence="200", record_count=3, error="KeyError: 'id'", attempts=4,
        policy="stop", run_id="run-1",
    )
    assert storage.blocked_shards(consumer) == {"shard-003"}
    listed = run_json(capsys, "dead-letters", "list", "--consumer", consumer)
    assert [(d["id"], d["status"], d["shard"], d["error"]) for d in listed] == [
        (dl_id, "open", "shard-003", "KeyError: 'id'")]
    code, out, _ = run(capsys, "dead-letters", "list", "--consumer", consumer, "--status", "open")
    assert code == 0 and str(dl_id) in out and "KeyError" in out

    code, out, _ = run(capsys, "dead-letters", "retry", str(dl_id), "--note", "handler fixed", "--by", "erin")
    assert code == 0 and "open -> retry" in out and "acked checkpoint" in out
    assert storage.blocked_shards(consumer) == set()  # the sensor dispatches the shard again
    assert run_json(capsys, "dead-letters", "list", "--consumer", consumer)[0]["status"] == "retry"
    code, out, _ = run(capsys, "dead-letters", "retry", str(dl_id))
    assert code == 0 and "already retry" in out

    assert run(capsys, "dead-letters", "resolve", str(dl_id), "--note", "   ")[0] == EXIT_USAGE
    assert run(capsys, "dead-letters", "resolve", str(dl_id), "--note", "replayed")[0] == 0
    code, _, err = run(capsys, "dead-letters", "retry", str(dl_id))
    assert code == EXIT_REFUSED and "rewind" in err
    assert run(capsys, "dead-letters", "retry", "987654321")[0] == EXIT_NOT_FOUND
    storage.db.close()


# -- migrate, change feed, demo --------------------------------------------------------------


def test_migrate_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    first = run_json(capsys, "migrate")
    second = run_json(capsys, "migrate")
    assert second["created_tables"] == []
    assert {"checkpoints", "checkpoint_history", "dead_letters"} <= set(second["existing_tables"])
    assert second["components"]["checkpoints"]["action"] == "up to date"
    assert first["components"].keys() == second["components"].keys()
    code, out, _ = run(capsys, "migrate")
    assert code == 0 and "up to date" in out


def test_migrate_creates_the_schema_in_an_empty_database(
    capsys: pytest.CaptureFixture[str], postgres_admin_url: str
) -> None:
    name = f"dp_cli_{uuid.uuid4().hex[:8]}"
    url = services.ensure_database(postgres_admin_url, name)
    try:
        code, _, err = run(capsys, "--backend", "postgres", "--postgres-url", url, "checkpoints", "list")
        assert code == EXIT_UNAVAILABLE and "migrate" in err  # reads never create the schema
        data = run_json(capsys, "--postgres-url", url, "migrate")
        assert "checkpoints" in data["created_tables"] and data["components"]["consumer"]["action"] == "created"
    finally:
        with psycopg.connect(services.libpq_url(postgres_admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_change_feed_install_and_uninstall(
    capsys: pytest.CaptureFixture[str], pg_conn: psycopg.Connection[Any]
) -> None:
    table = f"todos_{uuid.uuid4().hex[:8]}"
    log = f"cl_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, title text)')
    data = run_json(capsys, "change-feed", "install", table, "--change-log", log)
    assert data["change_log"] == f"public.{log}"
    pg_conn.execute(f"INSERT INTO \"{table}\" VALUES (1, 'a')")
    assert pg_conn.execute(f'SELECT operation FROM "{log}"').fetchall() == [("INSERT",)]
    code, out, _ = run(capsys, "change-feed", "uninstall", table, "--change-log", log, "--drop-change-log")
    assert code == 0 and "uninstalled" in out
    assert pg_conn.execute("SELECT to_regclass(%s)", (log,)).fetchone() == (None,)
    code, _, err = run(capsys, "change-feed", "install", f"missing_{table}")
    assert code == EXIT_USAGE and "does not exist" in err


def test_backend_from_environment_is_validated(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, hybrid: HybridCheckpointStore
) -> None:
    monkeypatch.setenv("DURABILITY_CHECKPOINT_BACKEND", "memory")
    code, _, err = run(capsys, "checkpoints", "list")
    assert code == EXIT_USAGE and "DURABILITY_CHECKPOINT_BACKEND" in err
    monkeypatch.setenv("DURABILITY_CHECKPOINT_BACKEND", "postgres")
    key = unique_key()
    assert run(capsys, "checkpoints", "set", *parts(key), "--sequence", "3")[0] == 0
    assert hybrid.postgres.load(key) == "3" and hybrid.redis.load(key) is None


def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "demo", "--events", "many")
    assert code == 2 and "--events" in err


# -- unreachable servers never leak a password ----------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["checkpoints", "list"],
        ["--backend", "postgres", "checkpoints", "get", "dynamodb", "orders", "workers", "c"],
        ["--backend", "redis", "leases", "list"],
        ["dead-letters", "list"],
        ["migrate"],
    ],
)
def test_unreachable_server_exits_nonzero_without_the_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.setenv(services.ENV_POSTGRES_URL, f"postgresql://ops:{PASSWORD}@127.0.0.1:{closed_port()}/db")
    monkeypatch.setenv(services.ENV_REDIS_URL, f"redis://:{PASSWORD}@127.0.0.1:{closed_port()}/0")
    code, out, err = run(capsys, *argv)
    assert code == EXIT_UNAVAILABLE
    assert PASSWORD not in out + err
    assert "unreachable" in err and "***" in err


def test_urls_given_as_flags_or_stray_arguments_are_masked(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql://ops:{PASSWORD}@127.0.0.1:{closed_port()}/db"
    code, out, err = run(capsys, "--postgres-url", url, "migrate")
    assert code == EXIT_UNAVAILABLE and PASSWORD not in out + err
    code, out, err = run(capsys, "checkpoints", "list", url)  # argparse echoes unrecognized arguments
    assert code == EXIT_USAGE and PASSWORD not in out + err
    code, out, err = run(capsys, "checkpoints", "list", "--redis-url", f"redis://:{PASSWORD}@127.0.0.1:{closed_port()}/0")
    assert code == EXIT_UNAVAILABLE and PASSWORD not in out + err and "--backend postgres" in err


def test_redis_client_is_not_left_open(capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    """Many in-process invocations (a scheduler, tests) must not leak connections."""
    client = redis.Redis.from_url(redis_url)
    before = len(client.client_list())
    for _ in range(5):
        assert run(capsys, "checkpoints", "list", "--stream", "nothing-here")[0] == 0
    assert len(client.client_list()) <= before + 1
    client.close()


def test_change_feed_purge_deletes_only_what_every_group_acked(
    capsys: pytest.CaptureFixture[str], pg_conn: psycopg.Connection[Any], postgres_url: str
) -> None:
    from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
    from durability_pipelines.sources.supabase_changes import ChangeFeedReader

    table = f"todos_{uuid.uuid4().hex[:8]}"
    log = f"cl_{uuid.uuid4().hex[:8]}"
    channel = f"ch-{uuid.uuid4().hex[:6]}"
    pg_conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, title text)')
    run_json(capsys, "change-feed", "install", table, "--change-log", log)
    for i in range(5):
        pg_conn.execute(f'INSERT INTO "{table}" VALUES (%s, %s)', (i, "t"))
    reader = ChangeFeedReader(postgres_url, change_log=log, table=f"public.{table}")
    rows = reader.read(None, 10)
    reader.close()
    store = PostgresCheckpointStore(postgres_url)
    store.save(CheckpointKey("supabase", channel, "g1", "c"), rows[2].sequence)  # g1 acked 3 rows
    code, _, err = run(capsys, "change-feed", "purge", table, "--change-log", log, "--channel", channel,
                       "--groups", "g1,g2")
    assert code == 0  # g2 never checkpointed: nothing may be purged
    assert pg_conn.execute(f'SELECT count(*) FROM "{log}"').fetchone() == (5,)
    data = run_json(capsys, "change-feed", "purge", table, "--change-log", log, "--channel", channel)
    assert data["deleted"] == 3
    assert [r[0] for r in pg_conn.execute(f'SELECT id FROM "{log}" ORDER BY id').fetchall()] == [
        rows[3].id, rows[4].id]
    store.close()


# -- malformed URLs and refused credentials --------------------------------------------------------

CLI = [sys.executable, "-m", "durability_pipelines.cli"]  # this tree's copy (PYTHONPATH is inherited)
URL_USER = "opsadmin"
# Unencoded '@', '/', ':' + '/': each fragment is distinctive, so a leak of any part of it is visible.
BROKEN_PASSWORDS = {"at": "Sup3r@Secr3t", "slash": "Sup3r/Secr3t", "colon-slash": "Sup3r:Ho5t/Secr3t"}


def _assert_no_userinfo(text: str) -> None:
    for fragment in ("Sup3r", "Secr3t", "Ho5t", URL_USER):
        assert fragment not in text, f"{fragment!r} leaked: {text}"


def _broken_url(backend: str, password: str) -> str:
    port = closed_port()
    return (f"postgresql://{URL_USER}:{password}@127.0.0.1:{port}/app" if backend == "postgres"
            else f"redis://{URL_USER}:{password}@127.0.0.1:{port}/0")


def _assert_percent_encode_error(err: str, origin: str) -> None:
    assert err.startswith(f"error: {origin} is not a valid"), err
    assert "percent-encode" in err and "quote(password, safe='')" in err and "***@127.0.0.1:" in err
    assert "unreachable" not in err and "Traceback" not in err


@pytest.mark.parametrize("password", list(BROKEN_PASSWORDS.values()), ids=list(BROKEN_PASSWORDS))
@pytest.mark.parametrize(
    ("backend", "env_or_flag"),
    [("postgres", services.ENV_POSTGRES_URL), ("redis", services.ENV_REDIS_URL),
     ("postgres", "--postgres-url"), ("redis", "--redis-url"), ("hybrid", services.ENV_REDIS_URL)],
)
def test_unencoded_password_exits_2_with_the_percent_encode_fix_and_no_part_of_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, backend: str, env_or_flag: str,
    password: str
) -> None:
    url = _broken_url("postgres" if env_or_flag in (services.ENV_POSTGRES_URL, "--postgres-url") else "redis",
                      password)
    argv = ["--backend", backend, "checkpoints", "list"]
    if env_or_flag.startswith("--"):
        argv += [env_or_flag, url]
    else:
        monkeypatch.setenv(env_or_flag, url)
    code, out, err = run(capsys, *argv)
    assert code == EXIT_USAGE, err
    _assert_percent_encode_error(err, env_or_flag if env_or_flag.startswith("--") else f"${env_or_flag}")
    assert out == "" and "While Redis is down" not in err
    _assert_no_userinfo(out + err)


@pytest.mark.parametrize(
    ("env_or_flag", "backend", "password"),
    [(services.ENV_POSTGRES_URL, "postgres", BROKEN_PASSWORDS["at"]),  # the reported case: host 'ss'
     ("--redis-url", "redis", BROKEN_PASSWORDS["colon-slash"])],
)
def test_unencoded_password_in_a_subprocess_exits_2_without_a_traceback(
    env_or_flag: str, backend: str, password: str
) -> None:
    url = _broken_url(backend, password)
    env = dict(os.environ)
    argv = [*CLI, "--backend", backend, "leases", "list"]
    if env_or_flag.startswith("--"):
        argv += [env_or_flag, url]
    else:
        env[env_or_flag] = url
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == EXIT_USAGE, done.stderr
    origin = env_or_flag if env_or_flag.startswith("--") else f"${env_or_flag}"
    _assert_percent_encode_error(done.stderr, origin)
    _assert_no_userinfo(done.stdout + done.stderr)


def test_session_repr_shows_no_url_secret(capsys: pytest.CaptureFixture[str]) -> None:
    from durability_pipelines.cli import Session, build_parser

    url = f"postgresql://{URL_USER}:{PASSWORD}@127.0.0.1:5432/app"
    session = Session(build_parser().parse_args(["--postgres-url", url, "migrate"]), sys.stdout, sys.stderr)
    session._postgres_url = url
    assert PASSWORD not in repr(session) and "***" in repr(session)


@pytest.fixture
def redis_with_password(make_private_redis: Any) -> Any:
    return make_private_redis(password="R1ghtPassw0rd")


@pytest.mark.parametrize("backend", ["redis", "hybrid"])
def test_wrong_redis_password_exits_5_says_credentials_not_unreachable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_with_password: Any,
    backend: str
) -> None:
    monkeypatch.setenv(services.ENV_REDIS_URL, f"redis://:Wr0ngPassw0rd@127.0.0.1:{redis_with_password.port}/0")
    code, out, err = run(capsys, "--backend", backend, "checkpoints", "list")
    assert code == EXIT_ACCESS_DENIED, err
    assert f"refused the credentials of ${services.ENV_REDIS_URL}" in err
    assert "check the user and password" in err
    assert "unreachable" not in err and "While Redis is down" not in err  # not an outage: no hybrid advice
    assert "Wr0ng" not in out + err and "R1ght" not in out + err


def test_missing_redis_password_given_as_flag_exits_5(
    capsys: pytest.CaptureFixture[str], redis_with_password: Any
) -> None:
    code, _, err = run(capsys, "--backend", "redis", "leases", "list",
                       "--redis-url", f"redis://127.0.0.1:{redis_with_password.port}/0")
    assert code == EXIT_ACCESS_DENIED and "refused the credentials of --redis-url" in err
    assert "Authentication required" in err


def test_wrong_postgres_password_exits_5_says_credentials_not_unreachable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, make_private_postgres: Any
) -> None:
    server = make_private_postgres(password="R1ght@Passw0rd")
    wrong = f"postgresql://postgres:Wr0ng%40Passw0rd@127.0.0.1:{server.port}/postgres"
    monkeypatch.setenv(services.ENV_POSTGRES_URL, wrong)
    code, out, err = run(capsys, "--backend", "postgres", "checkpoints", "list")
    assert code == EXIT_ACCESS_DENIED, err
    assert f"refused the credentials of ${services.ENV_POSTGRES_URL}" in err
    assert "password authentication failed" in err
    assert "unreachable" not in err and "Wr0ng" not in out + err and "R1ght" not in out + err
    monkeypatch.setenv(services.ENV_POSTGRES_URL, server.url)  # the right, percent-encoded password works
    assert run(capsys, "migrate")[0] == 0


def test_no_such_role_exits_5(capsys: pytest.CaptureFixture[str], postgres_url: str) -> None:
    url = postgres_url.replace("postgresql://postgres@", "postgresql://dp_no_such_role:pw123@")
    code, _, err = run(capsys, "dead-letters", "list", "--postgres-url", url)
    assert code == EXIT_ACCESS_DENIED and "refused the credentials of --postgres-url" in err
    assert "pw123" not in err


def test_port_nobody_listens_on_given_as_flag_is_still_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "--backend", "redis", "leases", "list",
                       "--redis-url", f"redis://:{PASSWORD}@127.0.0.1:{closed_port()}/0")
    assert code == EXIT_UNAVAILABLE and "is unreachable" in err and "correct --redis-url" in err
    assert PASSWORD not in err and "refused the credentials" not in err
