"""Benchmark: many shards, few runs. A Kinesis stream of K shards drained through the real Dagster daemon
(runs that each own up to ``max_shards_per_run`` shards) vs one hand-written process with a thread per shard.

Everything runs here, against the same servers (``benchmarks/common.py``: a moto server in its own process, a
private Redis, fresh Postgres databases, ``dagster-daemon`` on a temporary ``DAGSTER_HOME`` with the
repository's ``dagster.yaml``). The consumer is a copy of the shipped ``orders_worker`` starter whose source is
switched to ``kind: dynamodb_kinesis`` (the table's Kinesis Data Streams destination); everything else is the
starter's, ``max_shards_per_run`` included (its default). moto serves Kinesis with as many shards as asked; it
does not forward table writes to a stream, so the records are written with PutRecords in the destination's
JSON format (the item of ``common.put_batch``), each shard addressed by its starting hash key.

* **drain**, per K of ``--shards``: a stream of K shards, ``--events-per-shard`` records on each. Each round
  drains all of it once with ``hand_consumer.py --kinesis-stream`` (one process, one thread per shard:
  GetRecords(1000) -> the same INSERT into ``stream_events`` -> Redis SET per batch) and once through the
  daemon (a consumer of its own, its sensor started; the clock stops when every shard's acked checkpoint is
  the shard's last record). The variants alternate which goes first; the sink rows are deleted before each.
  Figures: drain time, events/s, run processes (runs launched), peak RSS of the run processes, CPU-s per
  1,000 events of the whole Dagster process tree (daemon, code server, run workers: sensor start -> every
  run ended) vs the hand process's own CPU, and the ratios pipeline / hand.
* **trickle**, per K of ``--trickle-shards`` (default: the largest K): an empty stream of K shards gets 1
  event/s per shard. The hand process (``--follow-until``, its own checkpoints and sink database) follows it
  alone for up to a minute (its CPU fraction), then the consumer (its sensor started). After a warm-up
  (every shard acked once) a window of ``--trickle-seconds``: runs launched per hour for the whole consumer, the Dagster tree's CPU
  as a fraction of one core, the Dagster storage database's growth (``pg_database_size``) in MB/hour.
  A window shorter than the starter's ``max_run_seconds`` (600 s) may see no planned hand-off: read
  ``runs_launched_in_window`` with ``window_s``.

The Dagster process tree is sampled every ``SAMPLE_EVERY_S`` with psutil: the daemon and its descendants;
a run worker is a process the code server started for a run (``RUN_WORKER_MARKS``). CPU of a phase is read at its
two ends (user + system + reaped children, summed over the live tree), so a run worker that ended between
samples still counts (in its parent's children times).

Targets of issue 20 (at 64 shards, the defaults) are reported next to the figures (``met``), never asserted.
Prints one JSON document on stdout (progress on stderr).

    .venv/bin/python benchmarks/shards.py [--shards 1,8,32,64] [--events-per-shard 2000] [--rounds 2]
                                          [--trickle-seconds 300] [--trickle-shards 64] [--no-mirror]
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timezone
from itertools import pairwise
from pathlib import Path
from typing import Any

import boto3
import psutil
import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    AWS_ENV,
    STARTER,
    Bench,
    _wait,
    bench_environment,
    environment,
    hand_loop,
    load,
    say,
    set_label,
    stop_process,
)

from durability_pipelines import services  # noqa: E402

#: issue 20's targets, at 64 shards with the defaults
TARGETS = {
    "drain_time_ratio_max": 1.3,
    "cpu_per_1000_ratio_max": 1.5,
    "run_processes_max": 4,
    "rss_per_added_shard_mb_max": 10.0,
    "trickle_runs_per_hour_max": 12.0,
    "trickle_cpu_fraction_max": 0.5,
    "trickle_db_growth_mb_per_hour_max": 50.0,
}
SAMPLE_EVERY_S = 0.5
#: a run worker's command line: the default run launcher asks the code server, which starts each run as a
#: multiprocessing child (``spawn_main``); other launchers run ``dagster api execute_run``
RUN_WORKER_MARKS = ("spawn_main", "execute_run")
#: the starter's own max_shards_per_run (None: the config default applies)
STARTER_ATTRIBUTES = yaml.safe_load(STARTER.read_text())["attributes"]


# --------------------------------------------------------------------------- the stream


def kinesis_source(table: str, stream: str) -> dict[str, Any]:
    """The starter's source switched to the table's Kinesis destination (position and trim policy kept). No
    endpoint: the daemon's ``DURABILITY_DYNAMODB_ENDPOINT_URL`` (the moto server) is the Kinesis endpoint too."""
    src = STARTER_ATTRIBUTES["source"]
    return {"kind": "dynamodb_kinesis", "table": table, "stream_name": stream, "region": src["region"],
            "initial_position": src["initial_position"], "trim_policy": src["trim_policy"]}


def change(table: str, n: int) -> bytes:
    """One INSERT in the Kinesis destination's JSON format; the item is ``common.put_batch``'s."""
    item = {"pk": {"S": f"o{n:08d}"}, "total": {"N": str(n)}, "status": {"S": "placed"}, "note": {"S": "x" * 64}}
    return json.dumps({
        "awsRegion": "us-east-1", "eventID": uuid.uuid4().hex, "eventName": "INSERT", "userIdentity": None,
        "recordFormat": "application/json", "tableName": table, "eventSource": "aws:dynamodb",
        "dynamodb": {"ApproximateCreationDateTime": int(time.time() * 1000), "Keys": {"pk": item["pk"]},
                     "NewImage": item, "SizeBytes": 120},
    }).encode()


@dataclass
class Stream:
    """A Kinesis stream of the benchmark: its shards (id -> starting hash key) and what was written."""

    name: str
    table: str
    shards: dict[str, str]
    last: dict[str, str] = field(default_factory=dict)  # shard -> last sequence written
    written: int = 0


def kinesis(bench: Bench) -> Any:
    return boto3.client("kinesis", endpoint_url=bench.endpoint, region_name="us-east-1",
                        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])


def create_stream(bench: Bench, name: str, table: str, shards: int) -> Stream:
    client = kinesis(bench)
    client.create_stream(StreamName=name, ShardCount=shards)
    _wait(lambda: client.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"]
          == "ACTIVE", f"stream {name}", 60)
    listed = client.list_shards(StreamName=name)["Shards"]
    return Stream(name, table, {s["ShardId"]: s["HashKeyRange"]["StartingHashKey"] for s in listed})


def put(client: Any, stream: Stream, per_shard: int) -> None:
    """``per_shard`` records on every shard (PutRecords, 500 a call, each addressed by ExplicitHashKey;
    one writer, so each shard's records are in write order)."""
    pending = [(shard, hash_key) for _ in range(per_shard) for shard, hash_key in stream.shards.items()]
    for lo in range(0, len(pending), 500):
        chunk = pending[lo:lo + 500]
        resp = client.put_records(StreamName=stream.name, Records=[
            {"Data": change(stream.table, stream.written + i), "PartitionKey": shard, "ExplicitHashKey": hash_key}
            for i, (shard, hash_key) in enumerate(chunk)])
        if resp.get("FailedRecordCount"):
            raise RuntimeError(f"PutRecords failed for {resp['FailedRecordCount']} records of {stream.name}")
        for r in resp["Records"]:
            stream.last[r["ShardId"]] = r["SequenceNumber"]
        stream.written += len(chunk)


class Trickle(threading.Thread):
    """One record per shard every second until stopped."""

    def __init__(self, bench: Bench, stream: Stream) -> None:
        super().__init__(daemon=True)
        self.client, self.stream = kinesis(bench), stream
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            next_at = time.monotonic()
            while not self.stop_event.is_set():
                put(self.client, self.stream, 1)
                next_at += 1.0
                self.stop_event.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - reported by the benchmark
            self.error = exc


# --------------------------------------------------------------------------- the Dagster process tree


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _is_run_worker(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
        return any(mark in cmdline for mark in RUN_WORKER_MARKS)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def tree_cpu_s(root: psutil.Process) -> float:
    """CPU seconds the tree has used so far: each live process's own time plus its reaped children's."""
    total = 0.0
    for proc in _tree(root):
        try:
            t = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class TreeSampler(threading.Thread):
    """Samples the Dagster tree's RSS every ``SAMPLE_EVERY_S``; ``take(pids)`` returns the peaks since the last
    ``take()`` and starts a new window. The run-worker figures count only ``pids`` (the consumer's runs: the
    mirror schedule's runs are run workers of the same code server)."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(root_pid)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.peak_tree_rss = 0
        self.samples: list[dict[int, int]] = []  # per sample: run worker pid -> RSS

    def take(self, pids: set[int] | None = None) -> dict[str, Any]:
        with self._lock:
            samples, tree = self.samples, self.peak_tree_rss
            self._reset()
        mine = [{p: rss for p, rss in sample.items() if pids is None or p in pids} for sample in samples]
        return {"peak_run_processes_rss_mb": _mb(max((sum(x.values()) for x in mine), default=0)),
                "peak_one_run_rss_mb": _mb(max((max(x.values(), default=0) for x in mine), default=0)),
                "peak_tree_rss_mb": _mb(tree), "peak_run_processes": max((len(x) for x in mine), default=0),
                "run_processes_seen": len({p for x in mine for p in x}), "rss_samples": len(samples)}

    def run(self) -> None:
        while not self.stop_event.wait(SAMPLE_EVERY_S):
            tree_rss, runs = 0, {}
            for proc in _tree(self.root):
                try:
                    rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                tree_rss += rss
                if _is_run_worker(proc):
                    runs[proc.pid] = rss
            with self._lock:
                self.peak_tree_rss = max(self.peak_tree_rss, tree_rss)
                self.samples.append(runs)


def run_pids(bench: Bench, runs: list[Any]) -> set[int]:
    """The process ids of ``runs`` (their event logs record the worker's pid)."""
    pids = set()
    for run in runs:
        for entry in bench.instance().all_logs(run.dagster_run.run_id):
            if entry.dagster_event is not None and entry.dagster_event.pid:
                pids.add(entry.dagster_event.pid)
                break
    return pids


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


def dagster_db_size_mb(bench: Bench) -> float:
    url = services.libpq_url(bench.daemon_env["DAGSTER_POSTGRES_URL"])
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 2**20


def consumer_runs(bench: Bench, consumer: str) -> list[Any]:
    return bench.runs_of(f"{consumer}_job")


def maintenance_runs(bench: Bench) -> list[Any]:
    from dagster import RunsFilter

    return list(bench.instance().get_run_records(filters=RunsFilter(tags={"durability/role": "maintenance"})))


def _created(record: Any) -> float:
    """A run record's creation time, epoch seconds (Dagster stores UTC; a naive datetime is UTC)."""
    created = record.create_timestamp
    return (created if created.tzinfo else created.replace(tzinfo=timezone.utc)).timestamp()


def _acked(bench: Bench, keys: dict[str, str]) -> dict[str, str | None]:
    values = bench.redis.mget(list(keys.values()))
    return {shard: v.decode() if v else None for shard, v in zip(keys, values, strict=True)}


# --------------------------------------------------------------------------- drain


def drain_hand(bench: Bench, stream: Stream, label: str) -> dict[str, Any]:
    prefix = f"bench:hand:{stream.name}:{label}"
    keys = {s: f"{prefix}:{s}" for s in stream.shards}
    bench.delete_sink_rows(stream.table)
    before = load()
    t0 = time.monotonic()
    proc = hand_loop(bench, stream.table, prefix, kinesis_stream=stream.name)
    out, _ = proc.communicate(timeout=3600)
    seconds = time.monotonic() - t0
    if proc.returncode != 0 or _acked(bench, keys) != stream.last:
        raise RuntimeError(f"hand process failed (exit {proc.returncode}); checkpoints {_acked(bench, keys)}")
    figures = json.loads(out)
    return {"variant": "hand", "seconds": round(seconds, 3), "events": figures["events"],
            "sink_rows": bench.sink_count(stream.table), "processes": 1, "threads": figures["shards"],
            "cpu_s": figures["cpu_s"], "peak_rss_mb": figures["max_rss_mb"], "load_before": before,
            "load_after": load()}


def drain_pipeline(bench: Bench, sampler: TreeSampler, stream: Stream, consumer: str, group: str) -> dict[str, Any]:
    keys = {s: bench.consumer_key(stream.table, group, s).redis_key for s in stream.shards}
    bench.delete_sink_rows(stream.table)
    before = load()
    sampler.take()
    cpu0, maintenance0 = tree_cpu_s(sampler.root), len(maintenance_runs(bench))
    bench.start_sensor(f"{consumer}_sensor")
    t0 = time.monotonic()
    _wait(lambda: _acked(bench, keys) == stream.last, f"{consumer} to drain", 3600, every=0.1)
    seconds = time.monotonic() - t0
    after = load()
    runs = bench.wait_runs_finished(f"{consumer}_job", 600)
    cpu_s = tree_cpu_s(sampler.root) - cpu0
    maintenance = len(maintenance_runs(bench)) - maintenance0
    tail_s = time.monotonic() - t0 - seconds
    bench.stop_sensor(f"{consumer}_sensor")
    peaks = sampler.take(run_pids(bench, runs))
    return {"variant": "pipeline", "consumer": consumer, "seconds": round(seconds, 3), "events": stream.written,
            "sink_rows": bench.sink_count(stream.table), "runs": len(runs),
            "runs_succeeded": sum(1 for r in runs if r.dagster_run.is_success),
            "shards_per_run": [len(r.dagster_run.tags.get("durability/shards", "").split(",")) if
                               r.dagster_run.tags.get("durability/shards") else 1 for r in runs],
            "cpu_s": round(cpu_s, 3), "cpu_measured_until_runs_ended_s": round(seconds + tail_s, 3),
            "maintenance_runs_started": maintenance,
            "peak_rss_mb": peaks["peak_run_processes_rss_mb"], **peaks, "load_before": before, "load_after": after}


def _per_1000(x: dict[str, Any]) -> float:
    return round(x["cpu_s"] * 1000 / max(1, x["events"]), 4)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def drain_phase(bench: Bench, sampler: TreeSampler, args: argparse.Namespace, streams: dict[int, Stream],
                consumers: dict[tuple[int, int], tuple[str, str]]) -> list[dict[str, Any]]:
    rounds: dict[int, list[dict[str, Any]]] = {k: [] for k in streams}
    for r in range(args.rounds):
        for i, k in enumerate(streams):
            order = ("hand", "pipeline") if (r + i) % 2 == 0 else ("pipeline", "hand")
            for variant in order:
                say(f"round {r + 1}, {k} shard(s): {variant}")
                if variant == "hand":
                    x = drain_hand(bench, streams[k], f"r{r}")
                else:
                    x = drain_pipeline(bench, sampler, streams[k], *consumers[(k, r)])
                x.update(round=r, first=variant == order[0], events_per_s=round(x["events"] / x["seconds"], 1),
                         cpu_s_per_1000_events=_per_1000(x))
                rounds[k].append(x)
                say(f"  {x['seconds']} s, {x['events_per_s']} events/s, {x['cpu_s_per_1000_events']} CPU-s/1000"
                    + (f", {x['runs']} run(s), peak run RSS {x['peak_rss_mb']} MB" if variant == "pipeline" else ""))
    out = []
    for k, xs in rounds.items():
        hand = [x for x in xs if x["variant"] == "hand"]
        pipe = [x for x in xs if x["variant"] == "pipeline"]
        med = {v: {f: _median([x[f] for x in group]) for f in ("seconds", "events_per_s", "cpu_s_per_1000_events",
                                                               "peak_rss_mb")}
               for v, group in (("hand", hand), ("pipeline", pipe))}
        time_ratio = _ratio(med["pipeline"]["seconds"], med["hand"]["seconds"])
        cpu_ratio = _ratio(med["pipeline"]["cpu_s_per_1000_events"], med["hand"]["cpu_s_per_1000_events"])
        runs = max((x["runs"] for x in pipe), default=0)
        out.append({
            "shards": k, "events_per_shard": args.events_per_shard, "events": streams[k].written, "rounds": xs,
            "hand": med["hand"],
            "pipeline": {**med["pipeline"], "runs_max": runs,
                         "peak_tree_rss_mb": _median([x["peak_tree_rss_mb"] for x in pipe]),
                         "peak_one_run_rss_mb": _median([x["peak_one_run_rss_mb"] for x in pipe]),
                         "max_shards_in_a_run": max((max(x["shards_per_run"], default=0) for x in pipe), default=0)},
            "ratios": {"time": time_ratio, "cpu_per_1000_events": cpu_ratio,
                       "run_processes_rss_vs_hand": _ratio(med["pipeline"]["peak_rss_mb"], med["hand"]["peak_rss_mb"]),
                       "tree_rss_vs_hand": _ratio(_median([x["peak_tree_rss_mb"] for x in pipe]),
                                                  med["hand"]["peak_rss_mb"])},
            "exact_sink": all(x["sink_rows"] == streams[k].written for x in xs),
            "targets": {
                "drain_time_ratio": {"value": time_ratio, "max": TARGETS["drain_time_ratio_max"],
                                     "met": time_ratio is not None and time_ratio <= TARGETS["drain_time_ratio_max"]},
                "cpu_per_1000_ratio": {"value": cpu_ratio, "max": TARGETS["cpu_per_1000_ratio_max"],
                                       "met": cpu_ratio is not None and cpu_ratio <= TARGETS["cpu_per_1000_ratio_max"]},
                "run_processes": {"value": runs, "max": TARGETS["run_processes_max"],
                                  "met": runs <= TARGETS["run_processes_max"]},
            },
        })
    return out


def rss_per_added_shard(drains: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak RSS of all the consumer's run processes, per shard added: between the smallest and the largest K
    (``value_mb``, the target's figure: a K that needs one more run pays that process too), and step by step;
    ``in_one_run_mb``: the largest run's peak RSS per shard it owned, between the smallest and the largest K
    (what a shard costs inside a process)."""
    pts = sorted((d["shards"], d["pipeline"]["peak_rss_mb"]) for d in drains if d["pipeline"]["peak_rss_mb"])
    one = sorted({(d["pipeline"]["max_shards_in_a_run"], d["pipeline"]["peak_one_run_rss_mb"]) for d in drains
                  if d["pipeline"]["peak_one_run_rss_mb"]})
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return {"value_mb": None, "steps": [], "in_one_run_mb": None, "max_mb": TARGETS["rss_per_added_shard_mb_max"],
                "met": None}
    slope = round((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 2)
    steps = [{"from": a[0], "to": b[0], "mb_per_shard": round((b[1] - a[1]) / (b[0] - a[0]), 2)}
             for a, b in pairwise(pts)]
    in_one = (round((one[-1][1] - one[0][1]) / (one[-1][0] - one[0][0]), 2)
              if len(one) >= 2 and one[-1][0] != one[0][0] else None)
    return {"value_mb": slope, "steps": steps, "in_one_run_mb": in_one,
            "max_mb": TARGETS["rss_per_added_shard_mb_max"], "met": slope <= TARGETS["rss_per_added_shard_mb_max"]}


# --------------------------------------------------------------------------- trickle


#: how long the hand process follows the trickle alone (before the pipeline), for its CPU figure
HAND_TRICKLE_MAX_S = 60.0
#: how long the pipeline may take to ack a record on every shard of the trickle
TRICKLE_WARMUP_TIMEOUT_S = 900.0


def trickle_hand(bench: Bench, stream: Stream, seconds: float) -> dict[str, Any]:
    """The hand process following the trickle alone (the sensor not started yet): its CPU over ``seconds``
    once it has acked a record on every shard. Alone, because both followers poll each shard 4 times a
    second: at 64 shards that is 256 calls/s each, more than one moto process serves beside the other."""
    prefix = f"bench:hand:{stream.name}:trickle"
    keys = {s: f"{prefix}:{s}" for s in stream.shards}
    hand = hand_loop(bench, stream.table, prefix, kinesis_stream=stream.name, postgres_url=bench.hand_postgres_url,
                     follow_until=time.time() + 24 * 3600)
    try:
        _wait(lambda: all(_acked(bench, keys).values()), "the hand process to ack a record on every shard", 300,
              every=0.5)
        proc = psutil.Process(hand.pid)
        t0, cpu0 = time.time(), sum(proc.cpu_times()[:2])
        time.sleep(seconds)
        window, cpu = time.time() - t0, sum(proc.cpu_times()[:2]) - cpu0
        rss = _mb(proc.memory_info().rss)
    finally:
        stop_process(hand)
    return {"window_s": round(window, 1), "cpu_fraction": round(cpu / window, 4), "rss_mb": rss}


def trickle_phase(bench: Bench, sampler: TreeSampler, args: argparse.Namespace, stream: Stream, consumer: str,
                  group: str, *, last: bool) -> dict[str, Any]:
    """The trickle for one stream: the hand process alone first (``trickle_hand``), then the pipeline.
    ``last``: nothing is measured after this phase, so its sensor and runs are left to the environment's
    teardown (stopping a sensor costs a ``dagster`` CLI call that loads the code location). A pipeline that
    does not ack every shard within ``TRICKLE_WARMUP_TIMEOUT_S`` is reported (``error``), not raised: the
    drain figures are kept."""
    k = len(stream.shards)
    pipe_keys = {s: bench.consumer_key(stream.table, group, s).redis_key for s in stream.shards}
    producer = Trickle(bench, stream)
    producer.start()
    try:
        say(f"trickle, {k} shard(s): the hand process alone")
        hand = trickle_hand(bench, stream, min(HAND_TRICKLE_MAX_S, args.trickle_seconds))
        bench.start_sensor(f"{consumer}_sensor")
        say(f"trickle, {k} shard(s): warming up (every shard acked once)")
        t_warm = time.monotonic()
        try:
            _wait(lambda: all(_acked(bench, pipe_keys).values()), f"{consumer} to ack a record on every shard",
                  TRICKLE_WARMUP_TIMEOUT_S, every=0.5)
        except TimeoutError as exc:
            acked = sum(bool(v) for v in _acked(bench, pipe_keys).values())
            return {"shards": k, "events_per_s": k, "hand": hand, "error": f"{exc} ({acked} of {k} acked)",
                    "runs_total": len(consumer_runs(bench, consumer)), "load_end": load(), "targets": {}}
        warmup_s = time.monotonic() - t_warm
        sampler.take()
        t0, cpu0, db0 = time.time(), tree_cpu_s(sampler.root), dagster_db_size_mb(bench)
        say(f"trickle, {k} shard(s): {args.trickle_seconds:.0f} s window")
        time.sleep(args.trickle_seconds)
        t1, cpu1, db1 = time.time(), tree_cpu_s(sampler.root), dagster_db_size_mb(bench)
    finally:
        producer.stop_event.set()
        producer.join()
    window = t1 - t0
    runs = consumer_runs(bench, consumer)
    peaks = sampler.take(run_pids(bench, runs))
    launched = [r for r in runs if t0 <= _created(r) < t1]
    maintenance = [r for r in maintenance_runs(bench) if t0 <= _created(r) < t1]
    if not last:
        bench.stop_sensor(f"{consumer}_sensor")
        try:
            bench.wait_runs_finished(f"{consumer}_job", 120)  # caught up, each run ends after max_idle_s
        except TimeoutError:
            say("  the trickle's runs did not end within 120 s; the next phase is measured beside them")
    if producer.error is not None:
        raise RuntimeError(f"the trickle producer failed: {producer.error!r}")
    per_hour = 3600 / window
    runs_h = round(len(launched) * per_hour, 1)
    cpu_fraction = round((cpu1 - cpu0) / window, 3)
    growth = round((db1 - db0) * per_hour, 1)
    return {
        "shards": k, "events_per_s": k, "window_s": round(window, 1), "warmup_s": round(warmup_s, 1),
        "max_run_seconds": float(STARTER_ATTRIBUTES["max_run_seconds"]),
        "runs_total": len(runs), "runs_launched_in_window": len(launched), "runs_per_hour": runs_h,
        "maintenance_runs_in_window": len(maintenance),
        "dagster_tree_cpu_s": round(cpu1 - cpu0, 2), "dagster_tree_cpu_fraction": cpu_fraction, "hand": hand,
        "dagster_db_mb_before": round(db0, 2), "dagster_db_mb_after": round(db1, 2),
        "dagster_db_growth_mb_per_hour": growth, **peaks,
        "load_end": load(),
        "targets": {
            "runs_per_hour": {"value": runs_h, "max": TARGETS["trickle_runs_per_hour_max"],
                              "met": runs_h <= TARGETS["trickle_runs_per_hour_max"]},
            "cpu_fraction": {"value": cpu_fraction, "max": TARGETS["trickle_cpu_fraction_max"],
                             "met": cpu_fraction <= TARGETS["trickle_cpu_fraction_max"]},
            "db_growth_mb_per_hour": {"value": growth, "max": TARGETS["trickle_db_growth_mb_per_hour_max"],
                                      "met": growth <= TARGETS["trickle_db_growth_mb_per_hour_max"]},
        },
    }


# --------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the servers and the daemon are stopped, the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    set_label("shards-bench")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="1,8,32,64", help="the drain phase's stream sizes (shards)")
    ap.add_argument("--events-per-shard", type=int, default=2000, help="backlog of each shard in the drain phase")
    ap.add_argument("--rounds", type=int, default=2, help="drain rounds (each: hand process and daemon, per K)")
    ap.add_argument("--trickle-seconds", type=float, default=300.0, help="the trickle's window; 0 = skip the trickle")
    ap.add_argument("--trickle-shards", default=None, help="the trickle's stream sizes (default: the largest K)")
    ap.add_argument("--no-mirror", action="store_true", help="switch the every-minute mirror schedule off")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    sizes = _ints(args.shards)
    trickle_sizes = (_ints(args.trickle_shards) if args.trickle_shards is not None else sizes[-1:]) \
        if args.trickle_seconds > 0 else []
    tag = secrets.token_hex(3)
    consumers: dict[str, tuple[str, str]] = {}
    drain_consumers: dict[tuple[int, int], tuple[str, str]] = {}
    names: dict[int, tuple[str, str]] = {k: (f"bench_shards_{k}_{tag}", f"bench-shards-{k}-{tag}") for k in sizes}
    trickle_names = {k: (f"bench_trickle_{k}_{tag}", f"bench-trickle-{k}-{tag}") for k in trickle_sizes}
    for k in sizes:
        for r in range(args.rounds):
            consumer, group = f"bench_shards_k{k}_r{r}", f"bench-k{k}-r{r}"
            consumers[consumer] = (names[k][0], group)
            drain_consumers[(k, r)] = (consumer, group)
    for k in trickle_sizes:
        consumers[f"bench_trickle_k{k}"] = (trickle_names[k][0], f"bench-trickle-k{k}")
    started = time.time()
    report: dict[str, Any] = {"benchmark": "shards", "shards": sizes, "events_per_shard": args.events_per_shard,
                              "rounds": args.rounds, "load_start": load()}
    stream_of = dict([*names.values(), *trickle_names.values()])  # table -> its Kinesis stream
    overrides = {c: {"source": kinesis_source(table, stream_of[table])} for c, (table, _) in consumers.items()}
    with bench_environment(args, consumers, overrides) as bench:
        say(f"environment up in {time.time() - started:.0f} s")
        daemon = next(g for g in bench.groups if g.name == "dagster-daemon")
        sampler = TreeSampler(daemon.proc.pid)
        sampler.start()
        client = kinesis(bench)
        streams = {k: create_stream(bench, names[k][1], names[k][0], k) for k in sizes} if args.rounds else {}
        for k, stream in streams.items():
            t0 = time.monotonic()
            put(client, stream, args.events_per_shard)
            say(f"filled {k} shard(s) x {args.events_per_shard} in {time.monotonic() - t0:.1f} s")
        per_run = STARTER_ATTRIBUTES.get("max_shards_per_run")
        report["config"] = {"max_shards_per_run": per_run if per_run is not None else "default (32)",
                            "max_events": STARTER_ATTRIBUTES["max_events"],
                            "max_run_seconds": STARTER_ATTRIBUTES["max_run_seconds"],
                            "mirror_schedule": not args.no_mirror}
        report["drain"] = drain_phase(bench, sampler, args, streams, drain_consumers) if args.rounds else []
        report["rss_per_added_shard"] = rss_per_added_shard(report["drain"])
        report["trickle"] = []
        for i, k in enumerate(trickle_sizes):
            stream = create_stream(bench, trickle_names[k][1], trickle_names[k][0], k)
            report["trickle"].append(trickle_phase(bench, sampler, args, stream, f"bench_trickle_k{k}",
                                                   f"bench-trickle-k{k}", last=i == len(trickle_sizes) - 1))
        sampler.stop_event.set()
    largest = max(report["drain"], key=lambda d: d["shards"]) if report["drain"] else None
    measured = [t for t in report["trickle"] if "error" not in t]
    trickle = max(measured, key=lambda t: t["shards"]) if measured else None
    report["targets"] = {
        "at_shards": largest["shards"] if largest else None, **TARGETS,
        "drain_time_met": largest["targets"]["drain_time_ratio"]["met"] if largest else None,
        "cpu_per_1000_met": largest["targets"]["cpu_per_1000_ratio"]["met"] if largest else None,
        "run_processes_met": largest["targets"]["run_processes"]["met"] if largest else None,
        "rss_per_added_shard_met": report["rss_per_added_shard"]["met"],
        "trickle_at_shards": trickle["shards"] if trickle else None,
        "trickle_runs_per_hour_met": trickle["targets"]["runs_per_hour"]["met"] if trickle else None,
        "trickle_cpu_fraction_met": trickle["targets"]["cpu_fraction"]["met"] if trickle else None,
        "trickle_db_growth_met": trickle["targets"]["db_growth_mb_per_hour"]["met"] if trickle else None,
    }
    report["environment"] = {**environment(started, mirror=not args.no_mirror), "load_start": report.pop("load_start")}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
