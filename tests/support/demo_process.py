"""``durability-pipelines demo`` as a subprocess for UI tests: start, wait, query, stop it all.

The demo (interactive mode: no ``--events``) runs in its own session/process group and starts
dagster-daemon and dagster-webserver in process groups of their own. ``DemoProcess`` remembers every
process group it has seen among the demo's descendants, so ``stop()`` can prove that nothing is left:
SIGINT to the demo first (its own cleanup stops the Dagster groups), then SIGTERM and SIGKILL of the
demo's group and of every remembered group, and a final count of survivors.

``isolated_services()`` gives the demo a private PostgreSQL and Redis: the demo drops and recreates
fixed database names (``durability_demo``, ``durability_demo_dagster``) and demo keys, so it must not
share a server with another demo (tests/test_demo.py, a developer's) running at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from durability_pipelines import services
from durability_pipelines.processes import group_members
from tests.support.servers import PrivatePostgres, PrivateRedis

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of a live, non-zombie process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2])


def descendants(root: int) -> dict[int, int]:
    """Live descendants of ``root`` as {pid: pgid}."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parents[int(entry.name)] = st
    out: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, pgid) in parents.items():
            if ppid == parent and pid not in out:
                out[pid] = pgid
                frontier.append(pid)
    return out


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _BigPostgres(PrivatePostgres):
    """A private PostgreSQL with room for Dagster's daemon, webserver, code servers and run workers."""

    def _command(self) -> list[str]:
        cmd = super()._command()
        return [("max_connections=300" if c.startswith("max_connections=") else c) for c in cmd]


@contextlib.contextmanager
def isolated_services() -> Iterator[dict[str, str]]:
    """A private PostgreSQL and Redis for one demo; yields the DURABILITY_* env for it."""
    pg, rd = _BigPostgres(), PrivateRedis(appendonly=False)
    try:
        pg.start()
        rd.start()
        yield {services.ENV_POSTGRES_URL: pg.url, services.ENV_REDIS_URL: rd.url}
    finally:
        pg.close()
        rd.close()


@dataclass
class StopReport:
    exit_code: int | None  # the demo's, None if it had to be killed
    graceful: bool  # the demo exited on SIGINT alone, with every group it started already empty
    seconds: float
    survivors: dict[int, list[int]]  # pgid -> pids alive after the whole sequence (must be empty)
    groups: list[int] = field(default_factory=list)  # every process group seen


class DemoProcess:
    def __init__(self, port: int, env: dict[str, str], log_path: Path, *, rate: float = 20.0) -> None:
        self.port, self.log_path, self.rate = port, log_path, rate
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.groups: set[int] = set()
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DemoProcess:
        exe = Path(sys.executable).parent / "durability-pipelines"
        argv = [str(exe), "demo", "--port", str(self.port), "--rate", str(self.rate)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # preexec: a shell's background job (`cmd &`, nohup) starts with SIGINT ignored, the child inherits
        # that and Python then installs no KeyboardInterrupt handler: Ctrl-C (our SIGINT) would do nothing.
        self.proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint)
        self.groups.add(self.proc.pid)
        return self

    def track(self) -> None:
        """Remember the process groups of the demo's current descendants."""
        if self.proc is not None and self.proc.poll() is None:
            self.groups.update(descendants(self.proc.pid).values())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- waiting and asking ------------------------------------------------------------------------
    def wait_until(self, check: Callable[[], T | None], *, timeout: float, what: str, every: float = 1.0) -> T:
        """Call ``check`` until it returns a truthy value (returned); fail if the demo dies or time runs out."""
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            self.track()
            if not self.alive():
                raise AssertionError(f"the demo exited ({self.proc.returncode if self.proc else '?'}) while "
                                     f"waiting for {what}; log tail:\n{self.log_tail()}")
            try:
                value = check()
                if value:
                    return value
            except (OSError, ValueError) as exc:  # not up yet
                last_error = exc
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:.0f}s (last error: {last_error!r}); "
                                     f"demo log tail:\n{self.log_tail()}")
            time.sleep(every)

    def http_ok(self, path: str = "/server_info") -> bool:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=5) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return False

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(self.base_url + "/graphql", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = json.loads(resp.read())
        if data.get("errors"):
            raise ValueError(f"GraphQL errors: {data['errors']}")
        return data["data"]

    def runs(self, statuses: list[str] | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Runs as the webserver reports them: [{runId, jobName, status}], newest first."""
        data = self.graphql(
            """query Runs($filter: RunsFilter, $limit: Int) {
                 runsOrError(filter: $filter, limit: $limit) {
                   __typename
                   ... on Runs { results { runId jobName status } }
                   ... on PythonError { message }
                 }
               }""",
            {"filter": {"statuses": statuses} if statuses else {}, "limit": limit},
        )["runsOrError"]
        if data["__typename"] != "Runs":
            raise ValueError(f"runsOrError: {data}")
        return data["results"]

    # -- stopping ------------------------------------------------------------------------------------
    def stop(self, *, sigint_grace_s: float = 90.0, term_grace_s: float = 10.0) -> StopReport:
        start = time.monotonic()
        if self.proc is None:
            return StopReport(None, False, 0.0, {})
        self.track()
        proc, pgid = self.proc, self.proc.pid
        exit_code: int | None = None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                exit_code = proc.wait(sigint_grace_s)
        else:
            exit_code = proc.returncode
        graceful = exit_code is not None and not any(group_members(g) for g in self.groups)
        for sig, grace in ((signal.SIGTERM, term_grace_s), (signal.SIGKILL, 10.0)):
            alive = [g for g in self.groups if group_members(g)]
            if not alive:
                break
            for g in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(g, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(group_members(g) for g in alive):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        survivors = {g: m for g in sorted(self.groups) if (m := group_members(g))}
        return StopReport(exit_code, graceful, time.monotonic() - start, survivors, sorted(self.groups))
