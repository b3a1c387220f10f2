"""What the end-to-end tests on a real Dagster daemon share: the environment and the oracles.

* :class:`Consumer`: one consumer YAML the test writes for the daemon's code location, and what the test
  produced for it;
* :class:`E2E`: the moto endpoint, the stores, the daemon(s) and their ``DAGSTER_HOME``s, with deadline
  waits (hang guards, never timed assertions); with ``grpc=True`` every node is the Helm chart's shape:
  a ``dagster code-server`` serves the code location and the daemon loads ``deploy/workspace.grpc.yaml``;
* the KCL-style oracles on the sink, the runs and the checkpoint history.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from durability_pipelines.checkpoints.keys import CheckpointKey
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.consumer.config import write_consumer_instance
from durability_pipelines.consumer.storage import ensure
from durability_pipelines.orchestration.consumers import CONSUMER_TAG, SHARD_TAG
from tests.support.dagster_daemon import (
    DAGSTER_POSTGRES_URL,
    DELIVERIES_DDL,
    GRPC_WORKSPACE,
    REPO_WORKSPACE,
    CodeServer,
    DagsterDaemon,
    DagsterHome,
    run_records,
    sensor_state,
    sensor_ticks,
    wait_until,
)
from tests.support.dynamodb import AWS_TEST_ENV, clients, moto_server, put_items

GROUP = "e2e"
WORKER = "worker"
MAX_EVENTS = 100
FLUSH_EVERY_N = 100
FLUSH_EVERY_S = 5.0
WAIT_S = 150.0  # hang guard for one scenario step
#: After `dagster sensor stop`: longer than a tick interval (5 s) plus a tick, so a tick in flight has written its state.
SENSOR_STOP_SETTLE_S = 8.0
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


@dataclass
class Consumer:
    name: str
    table: str
    handler: str
    handler_options: dict[str, Any] = field(default_factory=dict)
    retry: dict[str, Any] = field(default_factory=lambda: {"max_retries": 1, "delay_s": 0.2})
    overrides: dict[str, Any] = field(default_factory=dict)  # more consumer YAML fields (max_events, ...)
    produced: list[str] = field(default_factory=list)  # pk of every item written, in order

    @property
    def sensor(self) -> str:
        return f"{self.name}_sensor"

    def key(self, shard: str) -> CheckpointKey:
        return CheckpointKey("dynamodb", self.table, GROUP, WORKER, shard)

    def yaml(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": f"e2e consumer of {self.table}",
            "source": {"kind": "dynamodb", "table": self.table, "region": AWS_TEST_ENV["AWS_DEFAULT_REGION"],
                       "initial_position": "TRIM_HORIZON", "trim_policy": "fail"},
            "group": GROUP,
            "consumer": WORKER,
            "handler": self.handler,
            "handler_options": self.handler_options,
            "checkpoint": {"backend": "hybrid", "flush_every_n": FLUSH_EVERY_N, "flush_every_s": FLUSH_EVERY_S},
            "max_events": MAX_EVENTS,
            "retry": self.retry,
            "dead_letter": {"policy": "stop"},
            "sensor_interval_s": 1,
            "lease_duration_s": 120,
            **self.overrides,
        }


@dataclass
class E2E:
    tmp: Path
    endpoint: str
    ddb: Any
    streams: Any
    postgres_url: str
    admin_url: str
    redis: redis.Redis
    redis_url: str
    daemon_env: dict[str, str]
    consumers: dict[str, Consumer]
    homes: list[DagsterHome] = field(default_factory=list)
    daemons: list[DagsterDaemon] = field(default_factory=list)
    grpc: bool = False  # the deployment shape: a gRPC code server per node, the daemon points at it
    code_servers: list[CodeServer] = field(default_factory=list)

    # -- nodes -------------------------------------------------------------------------
    @property
    def daemon(self) -> DagsterDaemon:
        return self.daemons[-1]

    @property
    def instance(self) -> Any:
        return self.daemon.home.instance()

    @property
    def code_server(self) -> CodeServer:
        if not self.code_servers:
            raise RuntimeError("this E2E environment was not made with grpc=True: there is no code server")
        return self.code_servers[-1]

    @property
    def workspace(self) -> Path:
        return GRPC_WORKSPACE if self.grpc else REPO_WORKSPACE

    def node_env(self) -> dict[str, str]:
        """The daemon's variables: in the gRPC shape also where ``deploy/workspace.grpc.yaml`` finds the code."""
        return {**self.daemon_env, **(self.code_server.workspace_env() if self.grpc else {})}

    def start_node(self) -> DagsterDaemon:
        """A new node: new empty DAGSTER_HOME + new storage database + a new daemon (and, with ``grpc``, a
        new code server first: the runs it launches read the storage URL from its environment)."""
        home = DagsterHome.create(self.tmp / "homes", self.admin_url)
        self.homes.append(home)
        home.instance()  # creates the storage schema before the daemon races to
        n = len(self.daemons) + 1
        if self.grpc:
            server = CodeServer(home, self.daemon_env, self.tmp / f"code-server-{n}.log")
            self.code_servers.append(server)
            server.start()
        return self._start_daemon(home)

    def _start_daemon(self, home: DagsterHome) -> DagsterDaemon:
        n = len(self.daemons) + 1
        daemon = DagsterDaemon(home, self.node_env(), self.tmp / f"daemon-{n}.log", workspace=self.workspace)
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def replace_daemon(self) -> DagsterDaemon:
        """The node dies (SIGKILL of the daemon's process group) and a new daemon comes up on the same
        Dagster storage, as after a host replacement. In-process shape: the group holds the code server
        and the runs too, so the dead runs are still STARTED there. gRPC shape: the code server and its
        runs are elsewhere and live on; the new daemon talks to the same code server."""
        old = self.daemon
        old.kill()
        return self._start_daemon(old.home)

    def diagnostics(self) -> str:
        lines = []
        for c in self.consumers.values():
            try:
                runs = run_records(self.instance, {CONSUMER_TAG: c.name})
                lines.append(f"{c.name}: " + ", ".join(
                    f"{r.dagster_run.tags.get('dagster/run_key')}={r.dagster_run.status.value}" for r in runs))
            except Exception as exc:  # noqa: BLE001 - diagnostics must not mask the failure
                lines.append(f"{c.name}: runs unavailable ({exc})")
        alive = "alive" if self.daemons and self.daemon.alive() else "NOT running"
        server = ""
        if self.code_servers:
            state = "alive" if self.code_server.alive() else "NOT running"
            server = f"code server {state}\n{self.code_server.log_tail()}\n"
        return (f"daemon {alive}\n" + "\n".join(lines) + "\n" + server
                + (self.daemon.log_tail() if self.daemons else ""))

    @contextlib.contextmanager
    def dump_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            print(self.diagnostics())  # shown by pytest in "Captured stdout call"
            raise

    def wait(self, predicate: Any, what: str, timeout: float = WAIT_S) -> Any:
        return wait_until(predicate, what=what, timeout=timeout, diagnostics=self.diagnostics)

    # -- stream ----------------------------------------------------------------------
    def produce(self, c: Consumer, pks: list[str]) -> None:
        put_items(self.ddb, c.table, [{"pk": pk, "n": i, "by": "e2e"} for i, pk in enumerate(pks)])
        c.produced.extend(pks)

    def produce_new(self, c: Consumer, n: int) -> list[str]:
        start = len(c.produced)
        pks = [f"{c.name}-{start + i:05d}" for i in range(n)]
        self.produce(c, pks)
        return pks

    def stream_records(self, c: Consumer) -> list[tuple[str, str, str]]:
        """(shard, sequence, pk) of every record of the table's stream, read straight from moto."""
        arn = self.ddb.describe_table(TableName=c.table)["Table"]["LatestStreamArn"]
        out = []
        for shard in self.streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
            it = self.streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"],
                                                 ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
            while it:
                resp = self.streams.get_records(ShardIterator=it, Limit=1000)
                for r in resp["Records"]:
                    out.append((shard["ShardId"], r["dynamodb"]["SequenceNumber"], r["dynamodb"]["Keys"]["pk"]["S"]))
                if not resp["Records"]:
                    break
                it = resp.get("NextShardIterator")
        return out

    def last_sequences(self, c: Consumer) -> dict[str, str]:
        last: dict[str, str] = {}
        for shard, seq, _ in self.stream_records(c):
            last[shard] = seq
        return last

    # -- stores ----------------------------------------------------------------------
    def redis_checkpoint(self, c: Consumer, shard: str) -> str | None:
        raw = self.redis.get(c.key(shard).redis_key)
        return raw.decode() if raw is not None else None

    def pg_checkpoint(self, c: Consumer, shard: str) -> str | None:
        with psycopg.connect(self.postgres_url) as conn:
            row = conn.execute(
                "SELECT sequence FROM checkpoints WHERE adapter = 'dynamodb' AND stream = %s AND grp = %s "
                "AND consumer = %s AND shard = %s", (c.table, GROUP, WORKER, shard)).fetchone()
        return row[0] if row else None

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.postgres_url) as conn:
            return conn.execute(sql, params).fetchall()

    def runs(self, c: Consumer, instance: Any = None) -> list[Any]:
        return run_records(instance or self.instance, {CONSUMER_TAG: c.name})

    def set_sensor(self, c: Consumer, *, running: bool) -> None:
        """``dagster sensor start|stop`` on the current node, as an operator would.

        A stop can be lost: a tick in flight when the CLI writes STOPPED writes the sensor's state back (with its
        new cursor, and the status it read when it began), and the sensor goes on ticking. Seen once in CI: the
        consumer kept draining while a test waited for it to fall behind. So a stop is checked one tick
        interval later and repeated, as an operator who saw the sensor still ticking would."""
        home = self.daemon.home
        env = {**os.environ, **self.node_env(), "DAGSTER_HOME": str(home.path), DAGSTER_POSTGRES_URL: home.storage_url}
        for _ in range(5):
            out = subprocess.run([str(Path(sys.executable).parent / "dagster"), "sensor",
                                  "start" if running else "stop", "-w", str(self.workspace), c.sensor],
                                 cwd=REPO_WORKSPACE.parent, env=env, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            if running:
                return
            time.sleep(SENSOR_STOP_SETTLE_S)  # a tick in flight has written its state by now
            state = sensor_state(self.instance, c.sensor)
            if state is None or state.status.value == "STOPPED":
                return
        raise AssertionError(f"{c.sensor} still runs after 5 stops")

    # -- waits -----------------------------------------------------------------------
    def wait_drained(self, c: Consumer, timeout: float = WAIT_S) -> dict[str, str]:
        """Until every shard's Redis checkpoint is the shard's last sequence and no run is in flight."""
        last = self.last_sequences(c)
        assert last, f"{c.table} has no stream records"
        self.wait(lambda: all(self.redis_checkpoint(c, s) == seq for s, seq in last.items()),
                  f"{c.name}: checkpoints to reach {last}", timeout)
        self.wait(lambda: all(r.dagster_run.status.value in FINISHED for r in self.runs(c)),
                  f"{c.name}: every run to finish", timeout)
        return last

    def wait_tick_after(self, c: Consumer, after: float, *, contains: str = "", count: int = 1) -> list[Any]:
        """Until ``count`` ticks of the consumer's sensor evaluated after ``after`` (epoch s), each
        with ``contains`` in its skip reason when given."""
        def ticks() -> list[Any]:
            found = [t for t in sensor_ticks(self.instance, c.sensor, limit=50)
                     if t.timestamp > after and t.status.value in ("SKIPPED", "SUCCESS")
                     and contains in (t.skip_reason or "")]
            return found if len(found) >= count else []
        return self.wait(ticks, f"{count} tick(s) of {c.sensor} after {after} with {contains!r}")


def delete_keys(client: redis.Redis, patterns: list[str]) -> None:
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)



def assert_every_event_once(e2e: E2E, c: Consumer) -> list[tuple[str, str, str]]:
    """KCL-style oracle on the sink: every produced record exactly once, per shard, nothing else."""
    records = e2e.stream_records(c)
    assert len(records) == len(c.produced)  # one INSERT record per put (all keys distinct)
    assert sorted(pk for _, _, pk in records) == sorted(c.produced)
    (total, distinct), = e2e.query(
        "SELECT count(*), count(DISTINCT (shard, sequence)) FROM stream_events WHERE stream = %s", c.table)
    assert total == distinct == len(c.produced)
    sink = e2e.query("SELECT shard, sequence, keys->>'pk' FROM stream_events WHERE stream = %s", c.table)
    by_shard: dict[str, set[str]] = {}
    for shard, seq, _ in records:
        by_shard.setdefault(shard, set()).add(seq)
    sink_by_shard: dict[str, set[str]] = {}
    for shard, seq, _ in sink:
        sink_by_shard.setdefault(shard, set()).add(seq)
    assert sink_by_shard == by_shard  # per shard, exactly the produced sequences
    assert sorted(pk for _, _, pk in sink) == sorted(c.produced)
    # committed exactly once: e2e_deliveries has no unique key, a second commit would show
    deliveries = Counter(e2e.query("SELECT shard, sequence FROM e2e_deliveries WHERE stream = %s", c.table))
    twice = {k: n for k, n in deliveries.items() if n > 1}
    assert not twice, f"events committed more than once: {twice}"
    assert set(deliveries) == {(s, q) for s, q, _ in records}
    return records


def assert_runs_real_and_serial(e2e: E2E, c: Consumer, runs: list[Any]) -> None:
    """Launched by the sensor through the daemon, distinct run keys, one in flight per shard."""
    keys = [r.dagster_run.tags.get("dagster/run_key") for r in runs]
    assert all(keys) and len(set(keys)) == len(keys), keys
    for r in runs:
        tags = r.dagster_run.tags
        assert tags.get("dagster/sensor_name") == c.sensor
        assert tags.get(SHARD_TAG, "").startswith(f"{c.name}:")
        assert "dagster/parent_run_id" not in tags  # no run-level retry behind the sensor's back
        assert r.start_time is not None and r.end_time is not None
    by_shard: dict[str, list[Any]] = {}
    for r in runs:
        by_shard.setdefault(r.dagster_run.tags[SHARD_TAG], []).append(r)
    for shard_runs in by_shard.values():
        shard_runs.sort(key=lambda r: r.start_time)
        for prev, nxt in zip(shard_runs, shard_runs[1:], strict=False):
            assert nxt.start_time >= prev.end_time, (
                f"runs {prev.dagster_run.run_id} and {nxt.dagster_run.run_id} of one shard overlapped")


def redis_history(e2e: E2E, c: Consumer, shard: str) -> list[dict[str, str]]:
    entries = e2e.redis.xrange(c.key(shard).history_key)
    return [{k.decode(): v.decode() for k, v in fields.items()} | {"ms": eid.decode().split("-")[0]}
            for eid, fields in entries]


def assert_checkpoint_chain(e2e: E2E, c: Consumer, shard: str, runs: list[Any], *,
                            failed_may_write: bool = False) -> None:
    """Checkpoints only ever advanced, each run started after the previous acked position."""
    hist = redis_history(e2e, c, shard)
    assert hist, "no checkpoint history in Redis"
    prev = ""
    for h in hist:
        assert h["prev"] == prev and int(h["seq"]) > int(prev or 0), hist
        prev = h["seq"]
    pg_hist = e2e.query(
        "SELECT previous_sequence, new_sequence FROM checkpoint_history WHERE stream = %s AND consumer = %s "
        "AND shard = %s ORDER BY id", c.table, WORKER, shard)
    assert pg_hist, "no checkpoint history in Postgres (hybrid flushes)"
    last = None
    for previous, new in pg_hist:
        assert previous == last and int(new) > int(last or 0), pg_hist
        last = new
    # Runs drain: each writing run advanced the checkpoint one or more times (once per batch), its saves
    # contiguous and in run order, the first from the acked position it was dispatched at. Only the given
    # runs wrote (no test, no zombie), and only successful ones unless ``failed_may_write`` (a run killed
    # mid-drain keeps the batches it acked).
    by_id = {r.dagster_run.run_id: r for r in runs}
    writers = [h["writer"] for h in hist]
    assert set(writers) <= set(by_id), f"unknown writers: {set(writers) - set(by_id)}"
    groups = [(w, [h for h in hist if h["writer"] == w]) for w in dict.fromkeys(writers)]
    assert [h["writer"] for _, entries in groups for h in entries] == writers, "a run's saves were interleaved"
    ordered = sorted(by_id.values(), key=lambda r: r.start_time)
    assert [w for w, _ in groups] == [r.dagster_run.run_id for r in ordered if r.dagster_run.run_id in writers]
    for writer, entries in groups:
        run = by_id[writer]
        assert failed_may_write or run.dagster_run.status.value == "SUCCESS", (writer, run.dagster_run.status)
        assert run.dagster_run.tags["durability/start_after"] == (entries[0]["prev"] or "INITIAL"), entries[0]


def drain_output(instance: Any, run_id: str) -> dict[str, Any]:
    """The ``drain_shard`` op's output metadata of a daemon-launched run ({} if the op did not finish)."""
    from dagster import DagsterEventType

    for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_OUTPUT):
        data = record.dagster_event.event_specific_data
        if record.dagster_event.step_key == "drain_shard":
            return {k: v.value for k, v in data.metadata.items()}
    return {}


def batch_log_lines(instance: Any, run_id: str) -> list[str]:
    """The per-batch records the run wrote to its event log (``batch <n> shard ...``)."""
    return [r.user_message for r in instance.all_logs(run_id)
            if not r.is_dagster_event and r.user_message.startswith("batch ") and " events (" in r.user_message]


def batches_of(instance: Any, runs: list[Any]) -> int:
    return sum(int(drain_output(instance, r.dagster_run.run_id).get("batches", 0)) for r in runs)


@contextlib.contextmanager
def e2e_environment(tmp: Path, *, postgres_url: str, admin_url: str, redis_url: str,
                    consumers: Callable[[Any, str], dict[str, Consumer]],
                    extra_env: dict[str, str] | None = None, grpc: bool = False) -> Iterator[E2E]:
    """A moto server, the consumer tables, the consumers' YAML files and a first node (daemon; with
    ``grpc``, a code server and a daemon that loads ``deploy/workspace.grpc.yaml``).

    ``consumers(dynamodb_client, suffix)`` makes the consumers (their tables on the moto server);
    ``suffix`` is unique to this environment. Teardown stops every daemon, drops every storage
    database and deletes the consumers' Redis keys.
    """
    suffix = secrets.token_hex(3)
    db = PostgresConnection(postgres_url)
    ensure(db)  # the consumer tables exist before the first query of the test
    db.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(DELIVERIES_DDL)
    client = redis.Redis.from_url(redis_url)
    with moto_server() as endpoint:
        ddb, streams = clients(endpoint)
        made = consumers(ddb, suffix)
        consumers_dir = tmp / "consumers"
        consumers_dir.mkdir()
        for c in made.values():
            write_consumer_instance(consumers_dir, c.yaml())
        daemon_env = {
            **AWS_TEST_ENV,
            "DURABILITY_DYNAMODB_ENDPOINT_URL": endpoint,
            "DURABILITY_POSTGRES_URL": postgres_url,
            "DURABILITY_REDIS_URL": redis_url,
            "DURABILITY_CONSUMERS_DIR": str(consumers_dir),
            # Every run of an e2e instance is young: an hourly retention run would delete nothing and
            # only take the maintenance slot from the mirror for a moment.
            "DURABILITY_RUN_RETENTION_ENABLED": "false",
            **(extra_env or {}),
        }
        env = E2E(tmp, endpoint, ddb, streams, postgres_url, admin_url, client, redis_url, daemon_env, made,
                  grpc=grpc)
        try:
            env.start_node()
            yield env
        finally:
            errors = []
            for daemon in env.daemons:
                try:
                    daemon.stop()
                except Exception as exc:  # noqa: BLE001 - stop every daemon, then report
                    errors.append(exc)
            for server in env.code_servers:  # after the daemons: nothing launches runs on them any more
                try:
                    server.stop()
                except Exception as exc:  # noqa: BLE001 - stop every code server, then report
                    errors.append(exc)
            for home in env.homes:
                with contextlib.suppress(Exception):
                    home.dispose()
            with contextlib.suppress(redis.RedisError):
                delete_keys(client, [f"*{c.table}*" for c in made.values()] + [f"*{suffix}*"])
            client.close()
            if errors:
                raise errors[0]


@contextlib.contextmanager
def e2e_with_private_redis(tmp: Path, *, postgres_url: str, admin_url: str,
                           consumers: Callable[[Any, str], dict[str, Consumer]], **kwargs: Any) -> Iterator[E2E]:
    """``e2e_environment`` on a Redis of its own (started here, closed after): what a module's daemon tests
    share when they may not touch the machine's Redis beyond their keys."""
    from tests.support.servers import PrivateRedis

    redis_server = PrivateRedis(appendonly=False)
    redis_server.start()
    try:
        with e2e_environment(tmp, postgres_url=postgres_url, admin_url=admin_url, redis_url=redis_server.url,
                             consumers=consumers, **kwargs) as env:
            yield env
    finally:
        redis_server.close()
