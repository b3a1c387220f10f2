"""Faults injected at random into a running demo (``durability-pipelines demo --events N --chaos``).

So that an operator can see for themselves that nothing is lost: while the bounded demo runs, this
thread injects, every few seconds, one of the faults the project is built to survive, and records
what it did. The demo's JSON summary then lists them next to the counts of lost and duplicated events.

It disrupts the servers the demo runs on (it drops their client connections, pauses Redis) and writes
into the demo's own keys: point the demo at servers nobody else uses (the embedded ones, by default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from durability_pipelines.checkpoints.keys import PROJECT_PREFIX
from durability_pipelines.processes import ProcessGroup, group_members
from durability_pipelines.redis_client import redis_client

log = logging.getLogger(__name__)

#: every fault this module knows, by name (the demo's summary counts them)
FAULTS = (
    "kill-run-worker",  # SIGKILL of a run process mid-drain (at whatever phase it is in)
    "replace-daemon",  # the node dies (daemon, code server, runs: SIGKILL) and a new daemon takes over
    "redis-flush",  # Redis loses the demo's checkpoints (a restart without persistence)
    "redis-pause",  # Redis answers nobody for a few seconds (CLIENT PAUSE)
    "redis-drop-connections",  # every client connection to Redis is closed (CLIENT KILL)
    "postgres-drop-connections",  # every connection to the demo's databases is terminated
    "garbage-value",  # a checkpoint key overwritten with a value that is no position
    "wrong-type-key",  # a checkpoint key replaced by a Redis hash
)


@dataclass
class Injected:
    at_s: float
    fault: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"at_s": round(self.at_s, 1), "fault": self.fault, "detail": self.detail}


@dataclass
class Chaos:
    """Injects a random fault every ``every_s`` (jittered), in a thread of its own, until stopped."""

    redis_url: str
    postgres_url: str  # the demo's data database
    databases: tuple[str, ...]  # whose connections may be terminated
    key_pattern: str  # the demo's checkpoint keys, e.g. checkpoint:*:orders*
    daemon_group: Callable[[], ProcessGroup]  # the current daemon's process group
    replace_daemon: Callable[[], None]
    every_s: float = 6.0
    seed: int | None = None
    injected: list[Injected] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self.run, daemon=True, name="demo-chaos")

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def run(self) -> None:
        while not self.stop_event.wait(self.every_s * self._random.uniform(0.6, 1.4)):
            fault = self._random.choice(FAULTS)
            try:
                detail = getattr(self, "_" + fault.replace("-", "_"))()
            except Exception as exc:  # noqa: BLE001 - an injection that failed is reported, not fatal
                self.errors.append(f"{fault}: {type(exc).__name__}: {exc}")
                continue
            if detail:
                self.injected.append(Injected(time.monotonic() - self._started, fault, detail))
                log.warning("chaos: %s (%s)", fault, detail)

    def counts(self) -> dict[str, int]:
        return {f: sum(1 for i in self.injected if i.fault == f) for f in FAULTS}

    # -- the faults ------------------------------------------------------------------------
    def _run_workers(self) -> list[int]:
        group = self.daemon_group()
        pids = group_members(group.proc.pid) if group.proc else []
        return [p for p in pids if b"execute_run" in _cmdline(p)]

    def _kill_run_worker(self) -> str | None:
        workers = self._run_workers()
        if not workers:
            return None
        pid = self._random.choice(workers)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return f"SIGKILL run worker pid {pid}"

    def _replace_daemon(self) -> str | None:
        if sum(1 for i in self.injected if i.fault == "replace-daemon") >= 2:
            return None  # a node replacement costs a lease duration of recovery: twice is enough
        self.replace_daemon()
        return "SIGKILL of the daemon's whole process group; a new daemon on the same storage"

    def _client(self) -> redis.Redis:
        return redis_client(self.redis_url, socket_timeout=10)

    def _demo_keys(self, client: redis.Redis) -> list[bytes]:
        return [k for k in client.scan_iter(match=self.key_pattern, count=1000)]

    def _redis_flush(self) -> str | None:
        with contextlib.closing(self._client()) as client:
            keys = self._demo_keys(client) + list(client.scan_iter(match=f"{PROJECT_PREFIX}:*", count=1000))
            if keys:
                client.delete(*keys)
        return f"deleted {len(keys)} checkpoint/lease/history keys from Redis"

    def _redis_pause(self) -> str | None:
        with contextlib.closing(self._client()) as client:
            client.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        return "CLIENT PAUSE 3000 ALL"

    def _redis_drop_connections(self) -> str | None:
        with contextlib.closing(self._client()) as client:
            killed = client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        return f"CLIENT KILL TYPE normal: {killed} connection(s)"

    def _postgres_drop_connections(self) -> str | None:
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ANY(%s) "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'", (list(self.databases),)).fetchall()
        return f"pg_terminate_backend: {sum(1 for (ok,) in rows if ok)} connection(s)"

    def _garbage_value(self) -> str | None:
        with contextlib.closing(self._client()) as client:
            keys = [k for k in self._demo_keys(client) if client.type(k) == b"string"]
            if not keys:
                return None
            key = self._random.choice(keys)
            client.set(key, "not-a-position!")
        return f"SET {key.decode()} not-a-position!"

    def _wrong_type_key(self) -> str | None:
        with contextlib.closing(self._client()) as client:
            keys = self._demo_keys(client)
            if not keys:
                return None
            key = self._random.choice(keys)
            pipe = client.pipeline()
            pipe.delete(key)
            pipe.hset(key, "sequence", "1")
            pipe.execute()
        return f"HSET {key.decode()} (a hash where a checkpoint string belongs)"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
