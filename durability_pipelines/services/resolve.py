"""Which URL each component uses: the configured server, else the embedded one."""

from __future__ import annotations

import contextlib
import os

from durability_pipelines.services.checks import _postgres_failure, check_postgres, check_redis
from durability_pipelines.services.embedded import durability_home, embedded_server
from durability_pipelines.services.errors import (
    DAGSTER_DATABASE,
    ENV_DAGSTER_POSTGRES_URL,
    ENV_POSTGRES_URL,
    ENV_REDIS_URL,
)
from durability_pipelines.services.urls import (
    dagster_storage_url,
    libpq_url,
    validate_postgres_url,
    validate_redis_url,
    with_database,
)


def _resolve(kind: str, env: str, check: bool, timeout: float) -> str:
    url = os.environ.get(env)
    if not url:
        return embedded_server(kind, durability_home()).url
    if check:
        (check_postgres if kind == "postgres" else check_redis)(url, timeout=timeout, source=env)
    else:
        (validate_postgres_url if kind == "postgres" else validate_redis_url)(url, source=env)
    return url


def resolve_postgres_url(*, check: bool = True, timeout: float = 5.0) -> str:
    """``$DURABILITY_POSTGRES_URL`` if set (checked), else the embedded server's URL (started if needed)."""
    return _resolve("postgres", ENV_POSTGRES_URL, check, timeout)


def resolve_redis_url(*, check: bool = True, timeout: float = 5.0) -> str:
    """``$DURABILITY_REDIS_URL`` if set (checked), else the embedded server's URL (started if needed)."""
    return _resolve("redis", ENV_REDIS_URL, check, timeout)


def resolve_dagster_postgres_url(*, check: bool = True) -> str:
    """URL for Dagster's run/event storage, in the ``postgresql+psycopg2://`` form.

    ``$DAGSTER_POSTGRES_URL`` if set, else database ``dagster`` (created if missing) on the server
    :func:`resolve_postgres_url` picks. The scheme is always normalised to ``postgresql+psycopg2`` because
    ``dagster.yaml`` passes this URL to SQLAlchemy verbatim and a bare ``postgresql://`` breaks run
    launch: runs stay NOT_STARTED (docs/configuration.md, "Storage and the psycopg2 scheme"); export the
    result as ``DAGSTER_POSTGRES_URL`` for Dagster processes. Use
    :func:`libpq_url` on it before handing it to psycopg.
    """
    url = os.environ.get(ENV_DAGSTER_POSTGRES_URL)
    if url:
        if check:
            check_postgres(url, source=ENV_DAGSTER_POSTGRES_URL)
        else:
            validate_postgres_url(url, source=ENV_DAGSTER_POSTGRES_URL)
        return dagster_storage_url(url)
    return dagster_storage_url(ensure_database(resolve_postgres_url(check=check), DAGSTER_DATABASE))


def dagster_environment() -> dict[str, str]:
    """The variables a Dagster process of this project needs, resolved (embedded servers started if
    nothing is configured): what ``python3 dev.py setup`` writes into ``.env`` for ``dagster dev``."""
    return {
        ENV_DAGSTER_POSTGRES_URL: resolve_dagster_postgres_url(),
        ENV_POSTGRES_URL: resolve_postgres_url(),
        ENV_REDIS_URL: resolve_redis_url(),
    }


def ensure_database(url: str, dbname: str) -> str:
    """Create database ``dbname`` on the server of ``url`` if missing; return a URL pointing at it.

    Connects to the database named in ``url`` (the maintenance database), with autocommit because
    ``CREATE DATABASE`` cannot run in a transaction. Safe when several processes race to create it.
    """
    import psycopg
    from psycopg import errors, sql

    admin = libpq_url(url)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
            if exists is None:
                with contextlib.suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    except psycopg.OperationalError as exc:
        raise _postgres_failure(exc, url, None, prefix=f"cannot create database {dbname!r}: ") from None
    return with_database(url, dbname)
