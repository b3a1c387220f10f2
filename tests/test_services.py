"""Service layer: URL masking, server resolution (configured and embedded), and the test fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml
from psycopg import sql

from durability_pipelines import services
from tests.support.proxy import FlakyProxy
from tests.support.servers import PrivatePostgres, PrivateRedis

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- mask_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:secret@h:5432/db?sslmode=require", "postgresql://u:***@h:5432/db?sslmode=require"),
        ("postgresql+psycopg2://u:s%40cret@h/db", "postgresql+psycopg2://u:***@h/db"),
        ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://default:secret@cache.example.com:6380/2", "rediss://default:***@cache.example.com:6380/2"),
        # an ambiguous userinfo (unencoded '@', '/', '?', '#', '%'): user and password are both hidden
        ("redis://:p@ss@h:6379/0", "redis://***@h:6379/0"),
        ("redis://:pa/ss@h:6379/0", "redis://***@h:6379/0"),
        ("postgresql://u:p?w@h/db", "postgresql://***@h/db"),
        ("postgresql://ops:p@ss@db:5432/app", "postgresql://***@db:5432/app"),
        ("postgresql://ops:12/34@db/app", "postgresql://***@db/app"),
        ("postgresql://ops:1?se#cret@db/app", "postgresql://***@db/app"),
        ("postgresql://ops:50%off@db/app", "postgresql://***@db/app"),
        ("unix://:pa/ss@/run/redis.sock", "unix://***@/run/redis.sock"),
        ("postgresql://u:p:ss@h/db", "postgresql://u:***@h/db"),  # ':' in a password is unambiguous
        ("postgresql://h/db?user=u&password=secret", "postgresql://h/db?user=u&password=***"),
        ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password='se cret' dbname=d", "host=h password=*** dbname=d"),
        # nothing to hide: unchanged
        ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/postgres"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("postgresql://h:5432/db?application_name=a@b", "postgresql://h:5432/db?application_name=a@b"),
        ("postgresql://u@[::1]:5432/db", "postgresql://u@[::1]:5432/db"),
    ],
)
def test_mask_url_hides_the_password(url: str, expected: str) -> None:
    masked = services.mask_url(url)
    assert masked == expected
    for secret in ("secret", "s%40cret", "se cret", "p@ss", "pa/ss", "p?w", "ops", "12/34", "50%off", "p:ss"):
        if secret in url:
            assert secret not in masked


def test_url_helpers() -> None:
    url = "postgresql+psycopg2://u:pw@h:5432/postgres?sslmode=require"
    assert services.libpq_url(url) == "postgresql://u:pw@h:5432/postgres?sslmode=require"
    assert services.libpq_url("postgres://h/db") == "postgresql://h/db"
    assert services.dagster_storage_url("postgresql://h/db") == "postgresql+psycopg2://h/db"
    assert services.with_database(url, 'we"ird db') == (
        "postgresql+psycopg2://u:pw@h:5432/we%22ird%20db?sslmode=require"
    )
    assert services.database_of(services.with_database(url, 'we"ird db')) == 'we"ird db'
    assert services.with_redis_db("rediss://:pw@h:6380/0", 13) == "rediss://:pw@h:6380/13"
    assert services.with_redis_db("redis://h", 2) == "redis://h/2"


# --------------------------------------------------------------------------- configured servers


def test_unreachable_configured_postgres_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    port = services.free_port()  # nothing listens there
    monkeypatch.setenv(services.ENV_POSTGRES_URL, f"postgresql://app:hunter2@127.0.0.1:{port}/db")
    with pytest.raises(services.PostgresUnavailableError) as info:
        services.resolve_postgres_url(timeout=2)
    message = str(info.value)
    assert isinstance(info.value, services.ServiceUnavailableError)
    assert "hunter2" not in message
    assert f"postgresql://app:***@127.0.0.1:{port}/db" in message
    assert services.ENV_POSTGRES_URL in message and "unset it" in message


def test_unreachable_configured_redis_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    port = services.free_port()
    monkeypatch.setenv(services.ENV_REDIS_URL, f"rediss://default:hunter2@127.0.0.1:{port}/0")
    with pytest.raises(services.RedisUnavailableError) as info:
        services.resolve_redis_url(timeout=2)
    message = str(info.value)
    assert "hunter2" not in message
    assert f"rediss://default:***@127.0.0.1:{port}/0" in message
    assert services.ENV_REDIS_URL in message


def test_configured_redis_with_password(
    monkeypatch: pytest.MonkeyPatch, make_private_redis: Callable[..., PrivateRedis]
) -> None:
    server = make_private_redis(password="s3cr/t")
    url = f"redis://:s3cr%2Ft@127.0.0.1:{server.port}/0"
    assert server.url == url
    monkeypatch.setenv(services.ENV_REDIS_URL, url)
    assert services.resolve_redis_url() == url
    monkeypatch.setenv(services.ENV_REDIS_URL, f"redis://:wrong@127.0.0.1:{server.port}/0")
    with pytest.raises(services.RedisAuthenticationError, match="redis://:\\*\\*\\*@"):
        services.resolve_redis_url()
    monkeypatch.setenv(services.ENV_REDIS_URL, f"redis://:s3cr/t@127.0.0.1:{server.port}/0")  # not encoded
    with pytest.raises(services.InvalidServiceURLError, match="not a valid Redis URL") as info:
        services.resolve_redis_url()
    assert "s3cr" not in str(info.value)


def test_resolve_dagster_url_from_env_is_normalised(
    monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    monkeypatch.setenv(services.ENV_DAGSTER_POSTGRES_URL, postgres_url)
    resolved = services.resolve_dagster_postgres_url()
    assert resolved.startswith("postgresql+psycopg2://")
    assert services.libpq_url(resolved) == services.libpq_url(postgres_url)


# --------------------------------------------------------------------------- ensure_database


def test_ensure_database_creates_once_with_quoted_name(postgres_admin_url: str) -> None:
    name = f'dp_test_"Odd" name;{os.getpid()}'
    try:
        url = services.ensure_database(postgres_admin_url, name)
        assert services.ensure_database(postgres_admin_url, name) == url  # idempotent
        with psycopg.connect(services.libpq_url(url)) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        with psycopg.connect(services.libpq_url(postgres_admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_ensure_database_on_unreachable_server() -> None:
    url = f"postgresql://u:hunter2@127.0.0.1:{services.free_port()}/postgres"
    with pytest.raises(services.PostgresUnavailableError) as info:
        services.ensure_database(url, "x")
    assert "hunter2" not in str(info.value)


# --------------------------------------------------------------------------- shared fixtures


def test_session_fixtures_are_real_and_isolated(
    postgres_url: str, pg_conn: psycopg.Connection[Any], redis_url: str, redis_client: redis.Redis
) -> None:
    assert services.database_of(postgres_url).startswith("dp_test_")
    assert pg_conn.autocommit
    assert pg_conn.execute("SELECT current_database()").fetchone() == (services.database_of(postgres_url),)
    expected_db = int(os.environ.get("DURABILITY_TEST_REDIS_DB", 13))
    assert redis_url.endswith(f"/{expected_db}")
    assert redis_client.connection_pool.connection_kwargs["db"] == expected_db
    redis_client.set("dp:test:bytes", b"\x00\xff")
    assert redis_client.get("dp:test:bytes") == b"\x00\xff"  # decode_responses=False


# --------------------------------------------------------------------------- private servers


def test_private_redis_survives_stop_and_crash_on_the_same_port(private_redis: PrivateRedis) -> None:
    port, url = private_redis.port, private_redis.url
    client = private_redis.client(socket_timeout=2)
    client.set("k", "v1")
    private_redis.stop()
    assert not private_redis.is_running()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    private_redis.start()
    assert (private_redis.port, private_redis.url) == (port, url)
    assert client.get("k") == b"v1"  # AOF replayed; the client reconnects by itself
    client.set("k", "v2")
    private_redis.kill()  # SIGKILL: appendfsync always means nothing acked is lost
    private_redis.start()
    assert client.get("k") == b"v2"
    private_redis.stop()
    private_redis.wipe()
    private_redis.start()
    assert client.get("k") is None
    client.close()


def test_private_postgres_survives_stop_and_crash_on_the_same_port(private_postgres: PrivatePostgres) -> None:
    port = private_postgres.port
    with private_postgres.connect() as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (1)")
    live = private_postgres.connect()
    private_postgres.stop()
    with pytest.raises(psycopg.OperationalError):
        live.execute("SELECT 1")
    live.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(private_postgres.url, connect_timeout=1)
    private_postgres.start()
    assert private_postgres.port == port
    with private_postgres.connect() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    private_postgres.kill()  # crash: recovery replays the WAL on the next start
    private_postgres.start()
    with private_postgres.connect() as conn:
        assert conn.execute("SELECT array_agg(v ORDER BY v) FROM t").fetchone() == ([1, 2],)


# --------------------------------------------------------------------------- proxy


def test_proxy_outage_with_redis_py(redis_url: str, make_flaky_proxy: Callable[[str], FlakyProxy]) -> None:
    proxy = make_flaky_proxy(redis_url)
    client = redis.Redis.from_url(proxy.url_for(redis_url), socket_timeout=2, socket_connect_timeout=2)
    client.set("dp:proxy", "1")
    assert proxy.live_connections == 1
    proxy.down()
    assert not proxy.is_up
    with pytest.raises(redis.ConnectionError):
        client.get("dp:proxy")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(proxy.url_for(redis_url), socket_connect_timeout=1).ping()
    proxy.up()
    assert client.get("dp:proxy") == b"1"  # same port, new connection
    assert proxy.accepted >= 2
    client.close()


def test_proxy_stall_makes_clients_time_out(
    redis_url: str, make_flaky_proxy: Callable[[str], FlakyProxy]
) -> None:
    proxy = make_flaky_proxy(redis_url)
    client = redis.Redis.from_url(proxy.url_for(redis_url), socket_timeout=0.3, retry_on_timeout=False)
    assert client.ping()
    proxy.stall()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    assert time.monotonic() - started < 5
    proxy.up()
    assert client.ping()
    client.close()


def test_proxy_outage_with_psycopg(postgres_url: str, make_flaky_proxy: Callable[[str], FlakyProxy]) -> None:
    proxy = make_flaky_proxy(postgres_url)
    url = proxy.url_for(postgres_url)
    conn = psycopg.connect(url, autocommit=True, connect_timeout=2)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    proxy.down()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    assert conn.closed
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=1)
    proxy.up()
    with psycopg.connect(url, autocommit=True, connect_timeout=2) as again:
        assert again.execute("SELECT current_database()").fetchone() == (services.database_of(postgres_url),)


def test_proxy_with_psycopg2_and_private_postgres(
    private_postgres: PrivatePostgres, make_flaky_proxy: Callable[[str], FlakyProxy]
) -> None:
    import psycopg2

    proxy = make_flaky_proxy(private_postgres.url)
    conn = psycopg2.connect(proxy.url_for(private_postgres.url), connect_timeout=2)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    proxy.down()
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()
    proxy.up()
    with (
        psycopg2.connect(proxy.url_for(private_postgres.url), connect_timeout=2) as again,
        again.cursor() as cur,
    ):
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)


# --------------------------------------------------------------------------- embedded servers

_PROBE = r"""
import json, os, sys
import psycopg, redis
from durability_pipelines import services
pg = services.resolve_postgres_url()
rd = services.resolve_redis_url()
dg = services.resolve_dagster_postgres_url()
with psycopg.connect(pg, autocommit=True) as conn:
    pg_pid = conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()[0]
    server_user = conn.execute("SELECT current_setting('data_directory')").fetchone()[0]
with psycopg.connect(services.libpq_url(dg)) as conn:
    dagster_db = conn.execute("SELECT current_database()").fetchone()[0]
client = redis.Redis.from_url(rd)
client.incr("probe")
print(json.dumps({"pg": pg, "redis": rd, "dagster": dg, "pg_started": pg_pid, "data_dir": server_user,
                  "dagster_db": dagster_db, "redis_pid": client.info("server")["process_id"],
                  "servers": {k: v.pid for k, v in services.embedded_servers().items()}}))
"""


@pytest.fixture
def embedded_env() -> Iterator[dict[str, str]]:
    """Environment with DURABILITY_* unset and a private DURABILITY_HOME; stops what it started."""
    home = Path(tempfile.mkdtemp(prefix="dp-embedded-home-"))  # under /tmp: reachable by the pg OS user
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABILITY_", "DAGSTER_POSTGRES"))}
    env[services.ENV_HOME] = str(home)
    yield env
    subprocess.run([sys.executable, "-m", "durability_pipelines.services", "stop"], env=env, check=False)
    shutil.rmtree(home, ignore_errors=True)


def _probe(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _PROBE],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return dict(json.loads(out))


def test_embedded_servers_start_once_and_are_reused(embedded_env: dict[str, str]) -> None:
    # Two processes race on a fresh home: one starts the servers, the other waits and reuses them.
    first, second = _probe(embedded_env), _probe(embedded_env)
    a, b = _result(first), _result(second)
    assert a["pg"] == b["pg"] and a["redis"] == b["redis"]
    assert a["pg"].startswith("postgresql://postgres@127.0.0.1:")
    assert a["redis"].startswith("redis://127.0.0.1:")
    assert a["dagster"].startswith("postgresql+psycopg2://") and a["dagster_db"] == "dagster"
    assert a["data_dir"].startswith(embedded_env[services.ENV_HOME])
    assert (a["pg_started"], a["redis_pid"]) == (b["pg_started"], b["redis_pid"])
    # A later process reuses the running servers too (they outlive the processes that started them).
    c = _result(_probe(embedded_env))
    assert (c["pg"], c["redis"], c["pg_started"], c["redis_pid"]) == (
        a["pg"],
        a["redis"],
        a["pg_started"],
        a["redis_pid"],
    )
    assert set(c["servers"]) == {"postgres", "redis"}
    # stop_embedded stops both; the next resolve starts them again on the same ports, data kept.
    stop = subprocess.run(
        [sys.executable, "-m", "durability_pipelines.services", "stop"],
        env=embedded_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "postgres" in stop.stdout and "redis" in stop.stdout
    d = _result(_probe(embedded_env))
    assert (d["pg"], d["redis"]) == (a["pg"], a["redis"])
    assert d["pg_started"] != a["pg_started"] and d["redis_pid"] != a["redis_pid"]
    assert redis.Redis.from_url(d["redis"]).get("probe") == b"4"  # AOF kept the three earlier increments
    if os.geteuid() == 0:  # PostgreSQL refuses root: the cluster belongs to an unprivileged user
        data_dir = Path(embedded_env[services.ENV_HOME]) / "postgres" / "data"
        assert data_dir.stat().st_uid != 0


def _child_session(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A separate pytest session running one test that uses the session's PostgreSQL and Redis."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_services.py::test_session_fixtures_are_real_and_isolated"],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300, check=False,
    )


def test_a_test_session_stops_the_embedded_servers_it_started_and_not_the_ones_it_found(
    embedded_env: dict[str, str],
) -> None:
    env = {k: v for k, v in embedded_env.items() if k != "DURABILITY_TEST_KEEP_SERVERS"}
    home = Path(env[services.ENV_HOME])
    first = _child_session(env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"stopped the embedded servers this session started: postgres@{home}, redis@{home}" in first.stdout
    assert services.embedded_servers(home) == {}

    # Started by another process before the session: the session uses them and leaves them running.
    _result(_probe(env))
    before = {kind: server.pid for kind, server in services.embedded_servers(home).items()}
    assert set(before) == {"postgres", "redis"}
    second = _child_session(env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "stopped the embedded servers" not in second.stdout
    assert {kind: server.pid for kind, server in services.embedded_servers(home).items()} == before


_HOLD = r"""
import sys
from durability_pipelines import services
print(services.resolve_redis_url(), flush=True)
sys.stdin.read()
"""


def test_a_server_another_process_still_uses_is_left_running_until_it_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = Path(tempfile.mkdtemp(prefix="dp-embedded-home-"))
    monkeypatch.delenv(services.ENV_REDIS_URL, raising=False)
    monkeypatch.setenv(services.ENV_HOME, str(home))
    holder: subprocess.Popen[str] | None = None
    try:
        url = services.resolve_redis_url()  # this process starts it
        assert set(services.started_here(home)) == {"redis"}
        holder = subprocess.Popen([sys.executable, "-c", _HOLD], env=dict(os.environ), cwd=str(REPO),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == url  # the other process uses the same server
        assert services.started_here(home)  # ... but did not start it

        report = services.stop_embedded_started_here(home)
        assert (report.stopped, report.in_use) == ([], ["redis"])
        assert redis.Redis.from_url(url).ping()

        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        report = services.stop_embedded_started_here(home)
        assert (report.stopped, report.in_use) == (["redis"], [])
        assert services.embedded_servers(home) == {} and services.started_here(home) == {}
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        services.stop_embedded(home)
        shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------- dagster instance


def test_dagster_yaml_loads_and_runs_against_postgres(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_admin_url: str
) -> None:
    from dagster import DagsterInstance, job, op

    db = f"dp_test_dagster_{os.getpid()}"
    url = services.dagster_storage_url(services.ensure_database(postgres_admin_url, db))
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", url)

    @op
    def one() -> int:
        return 1

    @job(tags={"durability/shard": "shard-000"})
    def tiny() -> None:
        one()

    try:
        with DagsterInstance.from_config(str(tmp_path)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
            assert instance.run_retries_enabled and instance.run_retries_max_retries == 3
            limits = instance.run_coordinator.get_run_queue_config().tag_concurrency_limits  # type: ignore[attr-defined]
            assert limits == [
                {"key": "durability/shard", "value": {"applyLimitPerUniqueValue": True}, "limit": 2},
                {"key": "durability/role", "value": "maintenance", "limit": 1},
            ]
            # Storing events exercises dagster-postgres' NOTIFY, which a bare postgresql:// URL breaks.
            assert tiny.execute_in_process(instance=instance).success
            assert len(instance.get_runs()) == 1
    finally:
        with psycopg.connect(services.libpq_url(postgres_admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))


def test_workspace_yaml_loads_the_definitions_module() -> None:
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    assert workspace["load_from"] == [
        {
            "python_module": {
                "module_name": "durability_pipelines.definitions",
                "location_name": "durability_pipelines",
            }
        }
    ]
