"""Health checks: does the server answer, and does it accept these credentials and this database?"""

from __future__ import annotations

import re

from durability_pipelines.services.errors import (
    PostgresAuthenticationError,
    PostgresDatabaseMissingError,
    PostgresUnavailableError,
    RedisAuthenticationError,
    RedisUnavailableError,
)
from durability_pipelines.services.urls import (
    _origin,
    libpq_url,
    mask_url,
    scrub_secrets,
    validate_postgres_url,
    validate_redis_url,
)

# libpq reports these only as text (a failed connection has no SQLSTATE in psycopg).
_PG_CREDENTIALS_RE = re.compile(
    r"password authentication failed|no password supplied|role \"[^\"]*\" does not exist|"
    r"authentication failed for user|no pg_hba\.conf entry|pg_hba\.conf rejects",
    re.IGNORECASE,
)
_PG_DATABASE_MISSING_RE = re.compile(r"database \"([^\"]*)\" does not exist")


def _fix_for_outage(source: str | None, embedded: str) -> str:
    origin = _origin(source)
    if origin is None:
        return "check that the server is running and the URL is right"
    if origin.startswith("$"):
        return f"start that server, correct {origin}, or unset it to use the embedded {embedded}"
    return f"start that server or correct {origin}"


def _postgres_failure(exc: Exception, url: str, source: str | None, prefix: str = "") -> Exception:
    """The error to raise for a failed PostgreSQL connection: refused credentials, no database, or down."""
    detail = _detail(exc, url)
    origin = _origin(source)
    at = f"{prefix}PostgreSQL at {mask_url(url)}"
    if _PG_CREDENTIALS_RE.search(detail):
        return PostgresAuthenticationError(
            f"{at} answered but refused the credentials{_of(origin)}: {detail} To fix: check the user and "
            f"password in {origin or 'the URL'} (special characters percent-encoded); the server is up, so "
            "retrying will not help."
        )
    where = f" (from {origin})" if origin else ""
    missing = _PG_DATABASE_MISSING_RE.search(detail)
    if missing:
        return PostgresDatabaseMissingError(
            f"{at}{where} answered but has no database {missing.group(1)!r}. To fix: create it "
            f"(CREATE DATABASE) or correct the database name in {origin or 'the URL'}."
        )
    return PostgresUnavailableError(
        f"{at}{where} is unreachable: {detail} To fix: {_fix_for_outage(source, 'PostgreSQL')}."
    )


def _of(origin: str | None) -> str:
    return f" of {origin}" if origin else ""


def _detail(exc: BaseException, url: str) -> str:
    """A driver's message, secrets removed, ending in exactly one full stop (or its own ``?``/``!``)."""
    text = scrub_secrets(str(exc).strip(), url).rstrip(".")
    return text if text.endswith(("?", "!")) else f"{text}."


def check_postgres(url: str, *, timeout: float = 5.0, source: str | None = None) -> None:
    """Validate ``url``, then open and close one connection.

    Raises :class:`InvalidServiceURLError` (malformed, nothing connected),
    :class:`PostgresAuthenticationError` or :class:`PostgresDatabaseMissingError` (the server answered
    but refused), else
    :class:`PostgresUnavailableError`. ``source`` names the variable or flag the URL came from.
    """
    import psycopg

    validate_postgres_url(url, source=source)
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise _postgres_failure(exc, url, source) from None


def is_credentials_error(exc: BaseException) -> bool:
    """True if a driver exception means the server refused the credentials (not that it is down)."""
    import psycopg
    import redis

    if isinstance(exc, redis.AuthenticationError | redis.AuthenticationWrongNumberOfArgsError):
        return True
    if isinstance(exc, redis.ResponseError):
        return str(exc).startswith(("WRONGPASS", "NOAUTH", "NOPERM"))
    return isinstance(exc, psycopg.OperationalError) and bool(_PG_CREDENTIALS_RE.search(str(exc)))


def refusal_message(exc: BaseException, url: str, *, kind: str, source: str | None = None) -> str | None:
    """The CLI's message for a connection the server refused (credentials; for Postgres also a missing
    database), or None when ``exc`` is something else (an outage). ``kind``: ``postgres`` or ``redis``."""
    import psycopg

    if kind == "postgres":
        if not isinstance(exc, psycopg.OperationalError):
            return None
        failure = _postgres_failure(exc, url, source)
        refused = isinstance(failure, PostgresAuthenticationError | PostgresDatabaseMissingError)
        return str(failure) if refused else None
    if not is_credentials_error(exc):
        return None
    return redis_refusal(f"Redis at {mask_url(url)}", _detail(exc, url), _origin(source))


def redis_refusal(at: str, detail: str, origin: str | None) -> str:
    """What to say when Redis refused the credentials (the CLI, the stores): ``at`` names the server."""
    return (f"{at} answered but refused the credentials{_of(origin)}: {detail} "
            f"To fix: check the user and password in {origin or 'the URL'} (':password@' before the host "
            "for requirepass, 'user:password@' for an ACL user; special characters percent-encoded); the "
            "server is up, so retrying will not help.")


def check_redis(url: str, *, timeout: float = 5.0, source: str | None = None) -> None:
    """Validate ``url``, then send one PING.

    Raises :class:`InvalidServiceURLError` (malformed, nothing connected), :class:`RedisAuthenticationError`
    (``WRONGPASS``/``NOAUTH``: the server answered), else :class:`RedisUnavailableError`.
    """
    import redis

    from durability_pipelines.redis_client import redis_client

    validate_redis_url(url, source=source)
    origin = _origin(source)
    where = f" (from {origin})" if origin else ""
    client = redis_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as exc:
        detail = _detail(exc, url)
        if is_credentials_error(exc):
            raise RedisAuthenticationError(redis_refusal(f"Redis at {mask_url(url)}", detail, origin)) from None
        raise RedisUnavailableError(
            f"Redis at {mask_url(url)}{where} is unreachable: {detail} "
            f"To fix: {_fix_for_outage(source, 'Redis')}."
        ) from None
    finally:
        client.close()


