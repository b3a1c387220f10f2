"""A real Dagster instance and ``dagster-daemon`` process for end-to-end tests.

* :class:`DagsterHome`: a temporary ``DAGSTER_HOME`` holding a *copy of the repository's*
  ``dagster_home/dagster.yaml`` (so the file under test is the real one) and its own fresh
  PostgreSQL database for Dagster's run/event/schedule storage (``DAGSTER_POSTGRES_URL``, in the
  ``postgresql+psycopg2://`` form the file requires).
* :class:`DagsterDaemon`: ``dagster-daemon run -w workspace.yaml`` as a subprocess in its own
  session (process group), output captured to a log file. It runs the sensor daemon, the queued run
  coordinator and launches runs in subprocesses of the code server, all inside that group.
  :meth:`DagsterDaemon.stop` signals the whole group (SIGTERM, then SIGKILL) and waits until no
  member is left: detached Dagster processes have been seen to ignore SIGTERM.
* :class:`CodeServer`: ``dagster code-server start`` (the Helm chart's user-code deployment) serving the
  code location over gRPC on a free loopback port, in its own process group; a daemon started with
  ``workspace=GRPC_WORKSPACE`` and :meth:`CodeServer.workspace_env` loads the code from it, and the
  runs it launches are subprocesses of the code server, not of the daemon.
* :class:`DagsterWebserver`: ``dagster-webserver -w <workspace>`` on a free port, asked over GraphQL.
* :func:`wait_until`: a deadline loop (a hang guard, not a timed assertion).
* Handlers the e2e consumers name by dotted path (``tests.support.dagster_daemon:record_deliveries``):
  they run in Dagster run processes, so everything they share with the test is in Redis/Postgres.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import redis
from psycopg import sql

from durability_pipelines import services
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handlers import HandlerContext, transactional
from durability_pipelines.processes import ProcessGroup, group_members, temporary_env
from durability_pipelines.sinks.postgres_events import handle as sink_handle

REPO = Path(__file__).resolve().parents[2]
REPO_DAGSTER_YAML = REPO / "dagster_home" / "dagster.yaml"
REPO_WORKSPACE = REPO / "workspace.yaml"
GRPC_WORKSPACE = REPO / "deploy" / "workspace.grpc.yaml"
CODE_SERVER_HOST = "DURABILITY_CODE_SERVER_HOST"
CODE_SERVER_PORT = "DURABILITY_CODE_SERVER_PORT"
LOCATION_NAME = "durability_pipelines"
DAGSTER_POSTGRES_URL = "DAGSTER_POSTGRES_URL"

T = TypeVar("T")


# --------------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], T],
    *,
    what: str,
    timeout: float = 120.0,
    interval: float = 0.5,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` every ``interval`` s until it returns something truthy; return that.

    A hang guard, not a timed assertion: on timeout it fails with ``what`` and the diagnostics
    (e.g. the daemon log tail), so a stuck pipeline fails loudly instead of hanging the session.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = diagnostics() if diagnostics else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{extra}")
        time.sleep(interval)


# --------------------------------------------------------------------------- DAGSTER_HOME


@dataclass
class DagsterHome:
    """A ``DAGSTER_HOME`` with the repository's ``dagster.yaml`` and a fresh storage database."""

    path: Path
    database: str
    storage_url: str  # postgresql+psycopg2://…/<database>
    admin_url: str
    _instance: Any = None

    @classmethod
    def create(cls, parent: Path, admin_url: str, *, prefix: str = "dp_e2e") -> DagsterHome:
        name = f"{prefix}_{secrets.token_hex(4)}"
        url = services.ensure_database(admin_url, name)
        path = parent / name
        path.mkdir(parents=True)
        shutil.copyfile(REPO_DAGSTER_YAML, path / "dagster.yaml")
        return cls(path, name, services.dagster_storage_url(url), admin_url)

    def instance(self) -> Any:
        """A ``DagsterInstance`` on this home (created once; creating it migrates the storage schema).

        ``dagster.yaml`` reads ``DAGSTER_POSTGRES_URL`` from the environment when the instance is
        built, so it is set only for that moment.
        """
        if self._instance is None:
            from dagster import DagsterInstance

            with temporary_env(DAGSTER_HOME=str(self.path), **{DAGSTER_POSTGRES_URL: self.storage_url}):
                instance = DagsterInstance.from_config(str(self.path))
                instance.get_runs(limit=1)  # touch the storage: schema created before any daemon starts
            self._instance = instance
        return self._instance

    def dispose(self) -> None:
        """Close the instance and drop the storage database (WITH FORCE: daemons may linger)."""
        if self._instance is not None:
            with contextlib.suppress(Exception):
                self._instance.dispose()
            self._instance = None
        with psycopg.connect(services.libpq_url(self.admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.database)))


# --------------------------------------------------------------------------- the daemon process


def _executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed next to this Python nor on PATH")
    return found


def _daemon_executable() -> str:
    return _executable("dagster-daemon")


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


class CodeServerError(RuntimeError):
    """The gRPC code server exited or never answered its health check; its log tail says why."""


@dataclass
class CodeServer:
    """``dagster code-server start -m durability_pipelines.definitions`` on a free loopback port.

    The deployment shape of the Helm chart's user-code deployment: the code location lives in this
    process (and the ``dagster api grpc`` server it supervises), the daemon only talks to it. It is
    given ``home``'s ``DAGSTER_HOME``/``DAGSTER_POSTGRES_URL``, because the runs it launches run in
    its environment (their instance config reads ``DAGSTER_POSTGRES_URL`` there).
    """

    home: DagsterHome
    env: Mapping[str, str]
    log_path: Path
    host: str = "127.0.0.1"
    port: int = 0
    group: ProcessGroup | None = None

    def start(self, timeout: float = 180.0) -> CodeServer:
        if self.group is not None:
            raise RuntimeError("code server already started")
        self.port = self.port or services.free_port(self.host)
        env = {
            **os.environ,
            **self.env,
            "DAGSTER_HOME": str(self.home.path),
            DAGSTER_POSTGRES_URL: self.home.storage_url,
            "PYTHONPATH": _pythonpath(),
            "PYTHONUNBUFFERED": "1",
        }
        argv = [_executable("dagster"), "code-server", "start", "-m", "durability_pipelines.definitions",
                "-h", self.host, "-p", str(self.port), "--location-name", LOCATION_NAME]
        self.group = ProcessGroup("dagster-code-server", argv, env, self.log_path, cwd=REPO).start()
        wait_until(self._healthy, what=f"the code server on {self.host}:{self.port} to answer", timeout=timeout,
                   interval=1.0, diagnostics=self.log_tail)
        return self

    def _healthy(self) -> bool:
        if not self.alive():
            raise CodeServerError(f"dagster code-server exited before it answered\n{self.log_tail()}")
        out = subprocess.run([_executable("dagster"), "api", "grpc-health-check", "-h", self.host,
                              "-p", str(self.port)], capture_output=True, text=True, timeout=60)
        return out.returncode == 0

    def workspace_env(self) -> dict[str, str]:
        """What ``deploy/workspace.grpc.yaml`` reads: where this code server listens."""
        return {CODE_SERVER_HOST: self.host, CODE_SERVER_PORT: str(self.port)}

    @property
    def pgid(self) -> int | None:
        return self.group.proc.pid if self.group and self.group.proc else None

    def alive(self) -> bool:
        return self.group is not None and self.group.alive()

    def group_members(self) -> list[int]:
        return group_members(self.pgid) if self.pgid else []

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop the code server's group: the server, its ``dagster api grpc`` child and any run left."""
        if self.group is None:
            return
        left = self.group.stop(grace_s)
        if left:
            raise CodeServerError(f"dagster code-server process group {self.pgid} survived SIGKILL: {left}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- tail of {self.log_path} ---\n{tail}\n--- end of code server log ---"


@dataclass
class DagsterWebserver:
    """``dagster-webserver -w <workspace>`` on a free loopback port, in its own process group.

    Like the daemon it only reads the code location (over gRPC with ``GRPC_WORKSPACE``); the test asks
    its GraphQL API what it sees.
    """

    home: DagsterHome
    env: Mapping[str, str]
    log_path: Path
    workspace: Path = REPO_WORKSPACE
    port: int = 0
    group: ProcessGroup | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> DagsterWebserver:
        if self.group is not None:
            raise RuntimeError("webserver already started")
        self.port = self.port or services.free_port()
        env = {**os.environ, **self.env, "DAGSTER_HOME": str(self.home.path),
               DAGSTER_POSTGRES_URL: self.home.storage_url, "PYTHONPATH": _pythonpath(), "PYTHONUNBUFFERED": "1"}
        argv = [_executable("dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port), "-w", str(self.workspace)]
        self.group = ProcessGroup("dagster-webserver", argv, env, self.log_path, cwd=REPO).start()
        wait_until(self._answers, what=f"dagster-webserver on port {self.port} to answer", timeout=timeout,
                   interval=1.0, diagnostics=lambda: self.group.log_tail(60) if self.group else "")
        return self

    def _answers(self) -> bool:
        if self.group is None or not self.group.alive():
            raise RuntimeError(f"dagster-webserver exited\n{self.group.log_tail(60) if self.group else ''}")
        try:
            with urllib.request.urlopen(self.base_url + "/server_info", timeout=5) as resp:
                return resp.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        req = urllib.request.Request(self.base_url + "/graphql", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = json.loads(resp.read())
        if data.get("errors"):
            raise AssertionError(f"GraphQL errors: {data['errors']}")
        return data["data"]

    def stop(self, grace_s: float = 15.0) -> None:
        if self.group is None:
            return
        left = self.group.stop(grace_s)
        if left:
            raise RuntimeError(f"dagster-webserver process group survived SIGKILL: {left}")


def process_cmdline(pid: int) -> list[str]:
    """A live process's argv from /proc ([] once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass
class DagsterDaemon:
    """``dagster-daemon run -w <workspace>`` on ``home`` with ``env`` added, output to ``log_path``.

    Runs as a ``durability_pipelines.processes.ProcessGroup`` (the demo's own mechanism): the
    daemon, its code server and the runs it launches are stopped as one group.
    """

    home: DagsterHome
    env: Mapping[str, str]
    log_path: Path
    workspace: Path = REPO_WORKSPACE
    group: ProcessGroup | None = None

    def start(self) -> DagsterDaemon:
        if self.group is not None:
            raise RuntimeError("daemon already started")
        pythonpath = _pythonpath()
        env = {
            **os.environ,
            **self.env,
            "DAGSTER_HOME": str(self.home.path),
            DAGSTER_POSTGRES_URL: self.home.storage_url,
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
        }
        self.group = ProcessGroup("dagster-daemon", [_daemon_executable(), "run", "-w", str(self.workspace)],
                                  env, self.log_path, cwd=REPO).start()
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.group.proc if self.group else None

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None  # session leader: pgid == pid

    def alive(self) -> bool:
        return self.group is not None and self.group.alive()

    def group_members(self) -> list[int]:
        return group_members(self.pgid) if self.pgid else []

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``grace_s``; wait until empty."""
        if self.group is None:
            return
        left = self.group.stop(grace_s)
        if left:
            raise RuntimeError(f"dagster-daemon process group {self.pgid} survived SIGKILL: {left}")

    def kill(self) -> None:
        """The node dies: SIGKILL the whole group at once (daemon, code server, run workers), nothing graceful."""
        if self.group is None or self.group.proc is None:
            return
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.group.proc.pid, signal.SIGKILL)
        self.stop(grace_s=0)  # checks that nothing survived
        # A multithreaded leader shows as a zombie before its last thread is gone and cannot be reaped
        # until then: wait for it, so that alive() is False when kill() returns.
        self.group.proc.wait(timeout=30)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- tail of {self.log_path} ---\n{tail}\n--- end of daemon log ---"


# --------------------------------------------------------------------------- instance queries


def sensor_state(instance: Any, sensor_name: str) -> Any | None:
    """The sensor's ``InstigatorState`` (created by the daemon at its first tick), or None."""
    from dagster._core.scheduler.instigation import InstigatorType

    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.name == sensor_name:
            return state
    return None


def sensor_ticks(instance: Any, sensor_name: str, *, limit: int | None = None) -> Sequence[Any]:
    """The sensor's ticks, newest first (empty before its first tick)."""
    state = sensor_state(instance, sensor_name)
    if state is None:
        return []
    return instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=limit)


def sensor_cursor(instance: Any, sensor_name: str) -> str | None:
    state = sensor_state(instance, sensor_name)
    data = state.instigator_data if state is not None else None
    return getattr(data, "cursor", None)


def tick_log_messages(instance: Any, tick: Any) -> list[str]:
    """What the sensor logged (``context.log``) during ``tick``, from the compute log manager."""
    from dagster._core.definitions.instigation_logger import get_instigation_log_records

    if not tick.log_key:
        return []
    return [str(r.get("msg", "")) for r in get_instigation_log_records(instance, tick.log_key)]


def run_records(instance: Any, tags: Mapping[str, str]) -> list[Any]:
    """Run records carrying ``tags``, oldest first."""
    from dagster import RunsFilter

    return sorted(instance.get_run_records(filters=RunsFilter(tags=dict(tags))), key=lambda r: r.create_timestamp)


# --------------------------------------------------------------------------- e2e handlers

DELIVERIES_DDL = """
CREATE TABLE IF NOT EXISTS e2e_deliveries (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  consumer TEXT NOT NULL, stream TEXT NOT NULL, shard TEXT NOT NULL, sequence TEXT NOT NULL,
  run_id TEXT, ts TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())
"""
_INSERT_DELIVERIES = """
INSERT INTO e2e_deliveries (consumer, stream, shard, sequence, run_id)
SELECT %s, %s, s.shard, s.sequence, %s FROM unnest(%s::text[], %s::text[]) AS s(shard, sequence)
"""


class PoisonRecordError(ValueError):
    """The batch holds the poison item and the test has not 'fixed the handler' yet."""


@transactional
def record_deliveries(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """The real default sink plus one ``e2e_deliveries`` row per event, in the same transaction.

    ``stream_events`` cannot show a batch committed twice (``ON CONFLICT DO NOTHING``);
    ``e2e_deliveries`` has no such key, so a sequence found twice there was processed twice.
    The table is created by the test before the daemon starts.
    """
    sink_handle(events, ctx)
    assert ctx.connection is not None
    ctx.connection.execute(
        _INSERT_DELIVERIES,
        (ctx.consumer, ctx.stream, ctx.run_id, [e.shard or "" for e in events], [e.sequence for e in events]),
    )




@transactional
def poison_until_fixed(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """Fail the whole batch while it holds the item ``handler_options.poison_pk`` and the Redis key
    ``handler_options.fixed_flag`` is unset (the operator has not fixed the handler); every call is
    counted in ``<fixed_flag>:calls``. Otherwise :func:`record_deliveries`."""
    poison = str(ctx.options.get("poison_pk", "poison"))
    flag = str(ctx.options["fixed_flag"])
    client = redis.Redis.from_url(services.resolve_redis_url(check=False), socket_timeout=10)
    try:
        client.incr(f"{flag}:calls")
        fixed = bool(client.exists(flag))
    finally:
        client.close()
    if not fixed and any((e.keys or {}).get("pk") == poison for e in events):
        raise PoisonRecordError(f"poison item {poison!r} in a batch of {len(events)} events")
    record_deliveries(events, ctx)




HOLD_LIMIT_S = 120.0  # a held batch gives up after this long (a hang guard if the test died)


@transactional
def deliveries_with_hold(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """:func:`record_deliveries`, except that it stops while the Redis key ``handler_options.hold_flag``
    exists and the batch holds the item it names, so that the test can SIGKILL the run worker there.

    The key's value is ``<where>:<pk>``; where is ``before`` (at the handler's entry: the batches before
    are acked, this one has no effect yet: the run is between two batches) or ``after_write`` (inside the
    batch's transaction, its rows written but not committed). While holding, ``<hold_flag>:held`` is
    ``<pid>:<rows written>``.
    """
    flag = str(ctx.options["hold_flag"])
    client = redis.Redis.from_url(services.resolve_redis_url(check=False), socket_timeout=10)
    try:
        mode, _, pk = (client.get(flag) or b"").decode().partition(":")
        holding = bool(mode) and any((e.keys or {}).get("pk") == pk for e in events)
        if holding and mode == "before":
            _hold(client, flag, written=0)
        record_deliveries(events, ctx)
        if holding and mode == "after_write":
            _hold(client, flag, written=len(events))
    finally:
        client.close()




def _hold(client: redis.Redis, flag: str, *, written: int) -> None:
    client.set(f"{flag}:held", f"{os.getpid()}:{written}")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while client.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.1)
    client.delete(f"{flag}:held")


def schedule_ticks(instance: Any, schedule_name: str, *, limit: int | None = None) -> Sequence[Any]:
    """The schedule's ticks, newest first (empty before its first tick)."""
    from dagster._core.scheduler.instigation import InstigatorType

    for state in instance.all_instigator_state(instigator_type=InstigatorType.SCHEDULE):
        if state.name == schedule_name:
            return instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=limit)
    return []
