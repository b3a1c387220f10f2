"""Multi-host PostgreSQL URLs (libpq's failover form): both spellings accepted, several hosts without
``target_session_attrs=read-write`` refused with the fix, every host shown and no password, and the
database helpers and Dagster's storage URL keep every host.

Where a test claims a connection works it makes one, to a private primary and its streaming standby.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy

from durability_pipelines import services
from durability_pipelines.checkpoints.postgres_store import PostgresConnection, mask_conninfo
from tests.support.dagster_daemon import wait_until
from tests.support.servers import PrivatePostgres, PrivateStandby, multi_host_url

URI = "postgresql://ops:s3cr%40tpw@db-a:5432,db-b:5433/app?target_session_attrs=read-write"
KEYWORDS = (
    "host=db-a,db-b port=5432,5433 dbname=app user=ops password=s3cr3tpw target_session_attrs=read-write"
)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[PrivatePostgres, PrivateStandby]]:
    """A private primary and a streaming standby of it (never promoted here)."""
    primary = PrivatePostgres()
    primary.start()
    standby = primary.start_standby()
    yield primary, standby
    standby.close()
    primary.close()


@pytest.mark.parametrize("url", [URI, KEYWORDS, URI.replace("read-write", "primary")])
def test_both_multi_host_forms_pass_validation(url: str) -> None:
    services.validate_postgres_url(url, source=services.ENV_POSTGRES_URL)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ops@db-a:5432,db-b:5433/app",
        "postgresql://ops@db-a,db-b/app?target_session_attrs=any",
        "postgresql://ops@db-a,db-b/app?target_session_attrs=prefer-standby",
        "host=db-a,db-b dbname=app password=s3cr3tpw",
    ],
)
def test_several_hosts_without_read_write_are_refused_naming_the_fix(url: str) -> None:
    with pytest.raises(services.InvalidServiceURLError) as info:
        services.validate_postgres_url(url, source=services.ENV_POSTGRES_URL)
    message = str(info.value)
    assert "target_session_attrs=read-write" in message and "standby" in message and "read-only" in message
    assert "$DURABILITY_POSTGRES_URL" in message and "s3cr3tpw" not in message


def test_a_port_count_that_matches_no_host_is_refused() -> None:
    with pytest.raises(services.InvalidServiceURLError, match="3 hosts but 2 ports"):
        services.validate_postgres_url("host=a,b,c port=1,2 target_session_attrs=read-write")


def test_one_host_needs_no_target_session_attrs() -> None:
    services.validate_postgres_url("postgresql://ops@db-a:5432/app")
    services.validate_postgres_url("host=db-a dbname=app")


@pytest.mark.parametrize("url", [URI, KEYWORDS])
def test_masking_lists_every_host_and_hides_the_password(url: str) -> None:
    for masked in (services.mask_url(url), mask_conninfo(url)):
        assert "db-a" in masked and "db-b" in masked and "5433" in masked
        assert "s3cr" not in masked
    assert services.postgres_hosts(url) == ["db-a:5432", "db-b:5433"]


@pytest.mark.parametrize("url", [URI, KEYWORDS])
def test_with_database_and_database_of_keep_every_host_in_both_forms(url: str) -> None:
    assert services.database_of(url) == "app"
    moved = services.with_database(url, "other db")
    assert services.database_of(moved) == "other db"
    assert services.postgres_hosts(moved) == ["db-a:5432", "db-b:5433"]
    assert services.mask_url(moved).count("***") == 1
    services.validate_postgres_url(moved)
    assert (moved.startswith("postgresql://")) == url.startswith("postgresql://")  # the form is kept


def test_a_dbname_query_parameter_does_not_override_the_new_database() -> None:
    moved = services.with_database("postgresql://h1,h2/app?dbname=app&target_session_attrs=read-write", "x")
    assert services.database_of(moved) == "x" and "target_session_attrs=read-write" in moved


@pytest.mark.parametrize("form", ["uri", "keywords"])
def test_dagster_storage_url_of_several_hosts_is_sqlalchemys_host_list(form: str) -> None:
    url = URI if form == "uri" else KEYWORDS
    storage = services.dagster_storage_url(url)
    assert storage.startswith("postgresql+psycopg2://ops:")
    assert "host=db-a:5432&host=db-b:5433" in storage and "target_session_attrs=read-write" in storage
    parsed = sqlalchemy.engine.make_url(storage)  # SQLAlchemy itself cannot read libpq's h1:p1,h2:p2
    assert parsed.database == "app" and parsed.query["host"] == ("db-a:5432", "db-b:5433")


def test_check_postgres_reaches_the_primary_whichever_host_comes_first(
    pair: tuple[PrivatePostgres, PrivateStandby],
) -> None:
    primary, standby = pair
    url = multi_host_url(standby, primary)
    services.check_postgres(url, source=services.ENV_POSTGRES_URL)
    with psycopg.connect(url, autocommit=True) as conn:
        recovery, port = conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()
    assert (recovery, port) == (False, primary.port)


def test_a_down_first_host_is_skipped(pair: tuple[PrivatePostgres, PrivateStandby]) -> None:
    primary, _ = pair
    dead = services.free_port()
    url = f"postgresql://postgres@127.0.0.1:{dead},127.0.0.1:{primary.port}/postgres?target_session_attrs=read-write"
    services.check_postgres(url)


def test_ensure_database_on_a_multi_host_url_creates_it_on_the_primary(
    pair: tuple[PrivatePostgres, PrivateStandby],
) -> None:
    primary, standby = pair
    url = services.ensure_database(multi_host_url(standby, primary), "dp_multihost")
    assert services.database_of(url) == "dp_multihost" and len(services.postgres_hosts(url)) == 2
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == "dp_multihost"


def test_dagster_storage_on_a_multi_host_url_lands_on_the_primary(
    pair: tuple[PrivatePostgres, PrivateStandby],
) -> None:
    from dagster_postgres.run_storage import PostgresRunStorage

    primary, standby = pair
    url = services.dagster_storage_url(
        services.ensure_database(multi_host_url(standby, primary), "dp_mh_dagster")
    )
    # libpq does not try the next host when one answers "no such database": let the standby replay it.
    wait_until(standby.caught_up, what="the standby replayed CREATE DATABASE", timeout=60)
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(sqlalchemy.text("SELECT pg_is_in_recovery(), inet_server_port()")).one()
    engine.dispose()
    assert tuple(row) == (False, primary.port)
    storage = PostgresRunStorage.create_clean_storage(url)  # dagster-postgres creates its tables through it
    assert storage.get_runs() == []
    storage.dispose()


def test_a_connection_on_a_standby_is_dropped_and_reported_as_unavailable(
    pair: tuple[PrivatePostgres, PrivateStandby],
) -> None:
    from durability_pipelines.checkpoints.errors import StoreUnavailableError

    _, standby = pair
    db = PostgresConnection(standby.url)  # one host, no target_session_attrs: it may be a standby
    with (
        pytest.raises(StoreUnavailableError, match="read-only node.*target_session_attrs=read-write"),
        db.connection() as conn,
    ):
        conn.execute("CREATE TABLE dp_never (x int)")
    assert db._conn is None  # dropped: the next call reconnects (to the primary, with a multi-host URL)


def test_sqlalchemys_host_list_is_read_as_libpqs_so_psycopg_sees_every_host() -> None:
    storage = (
        "postgresql+psycopg2://ops:pw@/app?host=db-a:5432&host=db-b:5433&target_session_attrs=read-write"
    )
    assert services.libpq_url(storage) == (
        "postgresql://ops:pw@/app?host=db-a,db-b&port=5432,5433&target_session_attrs=read-write"
    )
    assert services.postgres_hosts(storage) == ["db-a:5432", "db-b:5433"]
    assert services.dagster_storage_url(storage) == storage  # already in Dagster's form: unchanged
    with pytest.raises(services.InvalidServiceURLError, match="target_session_attrs=read-write"):
        services.validate_postgres_url(storage.replace("&target_session_attrs=read-write", ""))


def test_a_socket_directory_url_keeps_its_empty_host_when_the_database_changes() -> None:
    url = "postgresql:///app?host=/var/run/postgresql"
    assert services.with_database(url, "other") == "postgresql:///other?host=/var/run/postgresql"
    assert services.libpq_url(url) == url and services.dagster_storage_url(url).endswith(
        ":///app?host=/var/run/postgresql"
    )


def test_dagster_postgres_url_in_sqlalchemys_form_is_checked_against_the_primary(
    pair: tuple[PrivatePostgres, PrivateStandby], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, standby = pair
    storage = services.dagster_storage_url(multi_host_url(standby, primary))
    monkeypatch.setenv(services.ENV_DAGSTER_POSTGRES_URL, storage)
    assert services.resolve_dagster_postgres_url() == storage  # check_postgres connected through libpq's form
    with psycopg.connect(services.libpq_url(storage), autocommit=True) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == primary.port


def test_only_a_lost_or_read_only_connection_counts_as_stale(
    pair: tuple[PrivatePostgres, PrivateStandby],
) -> None:
    from durability_pipelines.checkpoints.postgres_store import connection_is_stale

    primary, standby = pair
    errors: dict[str, psycopg.Error] = {}
    with primary.connect() as conn, primary.connect() as killer:
        try:
            conn.execute("SET statement_timeout = 1; SELECT pg_sleep(1)")
        except psycopg.Error as exc:
            errors["statement timeout"] = exc
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as exc:
            errors["terminated"] = exc
    with standby.connect() as conn:
        try:
            conn.execute("CREATE TABLE dp_never (x int)")
        except psycopg.Error as exc:
            errors["read-only"] = exc
    assert {what: connection_is_stale(exc) for what, exc in errors.items()} == {
        "statement timeout": False,  # an OperationalError too, but the connection is fine
        "terminated": True,
        "read-only": True,
    }
