"""A local DynamoDB endpoint (moto server) that outlives the command that started it.

``python3 dev.py setup`` starts it for the DynamoDB starters under ``dagster dev``: without it they
would need an AWS account with a table ``orders``. It runs like the embedded PostgreSQL and Redis:
one per ``$DURABILITY_HOME``, started under a lock, recorded in ``dynamodb.json``, reused while it
answers, stopped by ``python -m durability_pipelines.services stop``.

moto keeps its tables in memory only: after it stops (a reboot, ``services stop``), setup starts a new
one and creates the starters' table again, with a new stream. Checkpoints of the old stream then
belong to nothing; the sensors say so (``StreamChangedError``) and docs/getting-started.md says what
to run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from durability_pipelines.services.embedded import EmbeddedServer, _read_state, _write_state
from durability_pipelines.services.errors import _START_TIMEOUT_S, EmbeddedServerError
from durability_pipelines.services.local_processes import (
    _file_lock,
    _pid_alive,
    _port_open,
    _tail,
    _wait_pid_exit,
    free_port,
)

KIND = "dynamodb"
ENV_DYNAMODB_ENDPOINT_URL = "DURABILITY_DYNAMODB_ENDPOINT_URL"
#: moto accepts any credentials; boto3 refuses to sign a request without some.
LOCAL_AWS_ENV = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}


class LocalDynamoDBError(EmbeddedServerError):
    """The local DynamoDB endpoint could not start; the message says why and what to do."""


def local_dynamodb(home: Path) -> EmbeddedServer:
    """The moto server recorded under ``home`` if it answers, else a new one on a free port."""
    with _file_lock(home / f"{KIND}.lock"):
        running = _read_state(home, KIND)
        if running is not None and _pid_alive(running.pid) and _port_open(running.port):
            return running
        return _start(home, preferred=running.port if running is not None else None)


def _start(home: Path, preferred: int | None) -> EmbeddedServer:
    try:
        import moto.server  # noqa: F401 - only its presence is checked here; it runs in the child
    except ImportError:
        raise LocalDynamoDBError(
            "moto[server] is not installed, so no local DynamoDB endpoint can start. To fix: "
            "pip install 'durability_pipelines[demo]' (python3 dev.py setup installs the dev extra), or set "
            f"${ENV_DYNAMODB_ENDPOINT_URL} to an endpoint of your own (empty = AWS)."
        ) from None
    base = home / KIND
    base.mkdir(parents=True, exist_ok=True)
    log = base / "moto.log"
    port = preferred if preferred and not _port_open(preferred) else free_port()
    with open(log, "ab") as out:
        # Its own session: it must outlive setup and must not get the terminal's Ctrl-C.
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _port_open(port):
            server = EmbeddedServer(KIND, f"http://127.0.0.1:{port}", proc.pid, port, base, log)
            _write_state(home, server)
            return server
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    raise LocalDynamoDBError(
        f"the local DynamoDB endpoint (moto server) did not start on port {port}. Log tail:\n{_tail(log)}\n"
        f"To fix: read {log}, or set ${ENV_DYNAMODB_ENDPOINT_URL} to an endpoint of your own."
    )


def stop_local_dynamodb(home: Path, *, timeout: float = 10.0) -> bool:
    """Stop the moto server recorded under ``home``; True if one was running."""
    if not home.exists():
        return False
    with _file_lock(home / f"{KIND}.lock"):
        server = _read_state(home, KIND)
        if server is None or not _pid_alive(server.pid) or not _is_moto(server.pid):
            return False
        os.kill(server.pid, signal.SIGTERM)
        _wait_pid_exit(server.pid, timeout)
        if _pid_alive(server.pid):
            os.kill(server.pid, signal.SIGKILL)
        return True


def _is_moto(pid: int) -> bool:
    """Never signal a process that merely reuses a recorded pid."""
    try:
        return b"moto.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
