"""Shared fixtures: real PostgreSQL and Redis for every test, never a skip.

Servers come from ``durability_pipelines.services``: ``$DURABILITY_POSTGRES_URL`` /
``$DURABILITY_REDIS_URL`` when set (``.ci/run`` sets them to the machine's services), else embedded
servers started on demand. A session stops, at its end, the embedded servers it started itself
(not ones it found running, nor ones another process still uses); ``DURABILITY_TEST_KEEP_SERVERS=1``
keeps them for the next session. Tests that need to stop or break a server use
``private_redis`` / ``private_postgres`` (their own processes) or a ``FlakyProxy`` in front of a
shared one, never the shared server itself.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from psycopg import sql

from durability_pipelines import services
from durability_pipelines.checkpoints import CheckpointStore
from tests.support.proxy import FlakyProxy
from tests.support.servers import PrivatePostgres, PrivateRedis
from tests.support.shared_layout import Shared
from tests.support.stores import BACKENDS, build_store

TEST_REDIS_DB_ENV = "DURABILITY_TEST_REDIS_DB"
DEFAULT_TEST_REDIS_DB = 13
KEEP_SERVERS_ENV = "DURABILITY_TEST_KEEP_SERVERS"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the embedded servers this session started, after every fixture is torn down.

    ``python3 dev.py test`` used to leave them running. Servers that were running before the session,
    or that another process (another session, a demo, ``dagster dev``) still uses, stay up.
    """
    if os.environ.get(KEEP_SERVERS_ENV, "").strip().lower() in {"1", "true", "yes"}:
        return
    try:
        report = services.stop_embedded_started_here()
    except services.ServiceUnavailableError as exc:
        _report(session, f"could not stop the embedded servers this session started: {exc}")
        return
    if report.stopped:
        _report(session, "stopped the embedded servers this session started: " + ", ".join(report.stopped)
                + f" ({KEEP_SERVERS_ENV}=1 keeps them)")
    if report.in_use:
        _report(session, "left running, another process still uses them: " + ", ".join(report.in_use))


def _report(session: pytest.Session, message: str) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[durability] {message}")
    else:
        print(f"[durability] {message}", file=sys.stderr)


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """URL of the resolved server's maintenance database; for creating/dropping extra databases."""
    return services.resolve_postgres_url()


@contextlib.contextmanager
def fresh_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A new database ``<prefix>_<hex>`` on the server of ``admin_url``, dropped (WITH FORCE) at the end."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    url = services.ensure_database(admin_url, name)
    try:
        yield url
    finally:
        with psycopg.connect(services.libpq_url(admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database ``dp_test_<hex>`` for this test session, dropped (WITH FORCE) at the end."""
    with fresh_database(postgres_admin_url, "dp_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The resolved Redis on db ``$DURABILITY_TEST_REDIS_DB`` (default 13).

    Never flushed: tests use keys of their own (unique streams), so two pytest sessions on one
    machine cannot wipe each other's keys mid-test. Tests that read *every* key (mirror, audit)
    use ``own_redis_url``: a server this session started, the only kind a test may flush.
    """
    db = int(os.environ.get(TEST_REDIS_DB_ENV, DEFAULT_TEST_REDIS_DB))
    return services.with_redis_db(services.resolve_redis_url(), db)


@pytest.fixture(scope="session")
def own_redis_server() -> Iterator[PrivateRedis]:
    """A Redis server this session started for itself (no persistence), for tests that read or wipe
    *every* key (mirror, audit): only a server of our own may be flushed."""
    server = PrivateRedis(appendonly=False)
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_redis_url(own_redis_server: PrivateRedis) -> str:
    """db 0 of the session's own Redis, emptied for this test (never the resolved, shared Redis)."""
    client = own_redis_server.client()
    try:
        client.flushdb()
    finally:
        client.close()
    return own_redis_server.url


@pytest.fixture
def shared(postgres_admin_url: str, own_redis_url: str) -> Iterator[Shared]:
    """A database of its own and the session's own Redis (emptied), beside the original pattern's worker."""
    from durability_pipelines.checkpoints.postgres_store import PostgresConnection
    from durability_pipelines.consumer.storage import ensure

    name = f"dp_shared_{secrets.token_hex(4)}"
    url = services.ensure_database(postgres_admin_url, name)
    redis_url = own_redis_url  # the session's own server: the only kind a test may flush
    client = redis.Redis.from_url(redis_url)
    ensure(PostgresConnection(url))
    yield Shared(url, redis_url, client)
    client.close()
    with psycopg.connect(services.libpq_url(postgres_admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_conn(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit psycopg 3 connection to the session database, closed after the test."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A ``redis.Redis`` (bytes in, bytes out) on the session test db, closed after the test."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def make_private_redis() -> Iterator[Callable[..., PrivateRedis]]:
    """Factory: ``make_private_redis(**PrivateRedis kwargs)`` → a started server, closed after the test."""
    made: list[PrivateRedis] = []

    def make(**kwargs: Any) -> PrivateRedis:
        server = PrivateRedis(**kwargs)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def private_redis(make_private_redis: Callable[..., PrivateRedis]) -> PrivateRedis:
    """A started private Redis (AOF, fsync always) the test may ``stop()``/``kill()``/``start()``."""
    return make_private_redis()


@pytest.fixture
def make_private_postgres() -> Iterator[Callable[..., PrivatePostgres]]:
    """Factory: ``make_private_postgres(**PrivatePostgres kwargs)`` → a started server, closed after."""
    made: list[PrivatePostgres] = []

    def make(**kwargs: Any) -> PrivatePostgres:
        server = PrivatePostgres(**kwargs)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def private_postgres(make_private_postgres: Callable[..., PrivatePostgres]) -> PrivatePostgres:
    """A started private PostgreSQL the test may ``stop()``/``kill()``/``start()``."""
    return make_private_postgres()


@pytest.fixture(scope="module")
def wal_pg() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL with ``wal_level = logical`` for the WAL source's tests (one per module: the
    setting needs a restart, and the machine's shared server is never reconfigured)."""
    server = PrivatePostgres(settings={"wal_level": "logical", "max_replication_slots": "20",
                                       "max_wal_senders": "20"})
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def make_flaky_proxy() -> Iterator[Callable[[str], FlakyProxy]]:
    """Factory: ``make_flaky_proxy(url)`` → a ``FlakyProxy`` to that URL's host:port, closed after.

    Use ``proxy.url_for(url)`` as the client URL, then ``proxy.down()`` / ``proxy.up()``.
    """
    made: list[FlakyProxy] = []

    def make(url: str) -> FlakyProxy:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"need a host:port URL to proxy, got {services.mask_url(url)}")
        port = parts.port or (6379 if parts.scheme.startswith("redis") else 5432)
        proxy = FlakyProxy(parts.hostname, port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, redis_url: str, postgres_url: str) -> Iterator[CheckpointStore]:
    """Each checkpoint backend in turn (memory, redis, postgres, hybrid) on the session's servers."""
    s = build_store(request.param, redis_url, postgres_url)
    yield s
    s.close()
