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
* **steady-state burst**: the consumer is already running and so is the hand loop (``--follow-until``,
  its own checkpoint and sink database), both caught up; then ``N`` records (``--burst-sizes``) are
  written as fast as one writer can, and the clock runs from the burst's first write until each one's
  checkpoint reaches the last record. "Already running" with the starter as shipped (``max_idle_s`` 5):
  a few seed records make the sensor start a run; the burst starts as soon as that run has acked them,
  i.e. while it polls in its idle window, a few seconds into its ``max_run_seconds``. A burst that
  outlasts the rest of the run's budget pays the run boundary, as it would in production. Both consume
  the same burst concurrently; the order of the sizes alternates between rounds. Target: pipeline time
  <= 1.1x hand.

Prints one JSON document on stdout (progress on stderr).

    .venv/bin/python benchmarks/drain.py [--events 50000] [--rounds 2] [--live-rates 100,300,1000]
                                         [--live-seconds 180] [--burst-sizes 20000,50000] [--no-mirror]
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    STARTER,
    Bench,
    Producer,
    _wait,
    bench_environment,
    consumer_yaml,
    environment,
    fill,
    hand_loop,
    load,
    put_batch,
    say,
    set_label,
    stop_process,
)

from durability_pipelines.processes import temporary_env  # noqa: E402

TARGET_DRAIN_RATIO = 1.5
TARGET_BURST_RATIO = 1.1
BURST_SEED = 10
#: the starter's max_run_seconds + max_idle_s: how long the previous burst's run may still go on
RUN_BUDGET_S = sum(float(yaml.safe_load(STARTER.read_text())["attributes"][k]) for k in ("max_run_seconds", "max_idle_s"))
SAMPLE_EVERY_S = 2.0


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
    runs = bench.wait_runs_finished(f"{consumer}_job", 300)
    bench.stop_sensor(f"{consumer}_sensor")
    return {"variant": "daemon", "round": round_no, "consumer": consumer, "seconds": round(seconds, 3),
            "events": n, "sink_rows": bench.sink_count(table), "runs": len(runs),
            "runs_succeeded": sum(1 for r in runs if r.dagster_run.status.value == "SUCCESS"),
            "batches": _batches(bench, runs), "load_before": before, "load_after": after}


def _batches(bench: Bench, runs: list[Any]) -> int:
    from dagster import DagsterEventType

    total = 0
    for r in runs:
        for rec in bench.instance().all_logs(r.dagster_run.run_id, of_type=DagsterEventType.STEP_OUTPUT):
            meta = rec.dagster_event.event_specific_data.metadata
            total += int(meta["batches"].value) if "batches" in meta else 0
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
    with temporary_env(**{k: v for k, v in bench.daemon_env.items() if k.startswith(("AWS_", "DURABILITY_"))}):
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
    while True:  # at least one sample, even when starting the sensor took the whole phase (a loaded machine)
        time.sleep(SAMPLE_EVERY_S)
        now, written = time.time(), producer.written
        row: dict[str, Any] = {"t": round(now - t0, 1), "written": written}
        for name, key in (("hand", hand_key), ("pipeline", pipeline_key)):
            behind, oldest = _behind(bench, key, first, written)
            at = producer.written_at(oldest) if oldest is not None else None
            row[f"{name}_behind"] = behind
            row[f"{name}_lag_s"] = round(now - at, 2) if at is not None else 0.0
        samples.append(row)
        if time.time() >= follow_until:
            break
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


def _burst_round(bench: Bench, consumer: str, keys: dict[str, str], first: int, written: int, n: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    """One burst of ``n`` records (the shard holds ``written`` records before it) against a run that is
    alive and caught up, and the hand loop, caught up too."""
    job = f"{consumer}_job"
    fresh = True
    if bench.runs_of(job):  # each burst meets a fresh run, unless the consumer never lets a run end
        try:
            bench.wait_runs_finished(job, RUN_BUDGET_S + 30)
        except TimeoutError:
            fresh = False
    put_batch(bench.ddb, keys["table"], written, BURST_SEED)
    written += BURST_SEED
    seed_last = str(first + written - 1)
    _wait(lambda: all(bench.checkpoint(k) == seed_last for k in (keys["hand_loop"], keys["pipeline"])),
          "a run and the hand loop to ack the seed records", 300, every=0.02)
    alive = [r for r in bench.runs_of(job) if r.dagster_run.status.value == "STARTED"]
    before = load()
    t0 = time.time()
    fill(bench, keys["table"], n, written)
    write_s = time.time() - t0
    last = str(first + written + n - 1)
    done: dict[str, float] = {}

    def finished() -> bool:
        for variant in ("hand_loop", "pipeline"):
            if variant not in done and bench.checkpoint(keys[variant]) == last:
                done[variant] = time.time() - t0
        return len(done) == 2

    _wait(finished, "both to reach the burst's last record", args.catch_up_s, every=0.02)
    used = [r for r in bench.runs_of(job) if (r.start_time or 0) <= t0 + done["pipeline"]
            and (r.end_time is None or r.end_time >= t0)]
    return {"events": n, "write_seconds": round(write_s, 3), "hand_loop_seconds": round(done["hand_loop"], 3),
            "pipeline_seconds": round(done["pipeline"], 3),
            "ratio": round(done["pipeline"] / done["hand_loop"], 3),
            # after the last write: what is left when the burst is write-bound (one writer on moto)
            "hand_loop_after_last_write_s": round(done["hand_loop"] - write_s, 3),
            "pipeline_after_last_write_s": round(done["pipeline"] - write_s, 3),
            "run_alive_at_burst": bool(alive),
            "run_age_at_burst_s": round(t0 - alive[0].start_time, 2) if alive and alive[0].start_time else None,
            "pipeline_runs_used": len(used), "waited_for_previous_run_to_end": fresh, "load_before": before, "load_after": load()}


def burst_phase(bench: Bench, args: argparse.Namespace, sizes: list[int], table: str, consumer: str,
                group: str) -> dict[str, Any]:
    put_batch(bench.ddb, table, 0, BURST_SEED)
    written = BURST_SEED
    shard, first = bench.shard(table)
    keys = {"table": table, "hand_loop": f"bench:hand:{table}:burst",
            "pipeline": bench.consumer_key(table, group, shard).redis_key}
    hand = hand_loop(bench, table, keys["hand_loop"], follow_until=time.time() + 24 * 3600,
                     postgres_url=bench.hand_postgres_url)
    bench.start_sensor(f"{consumer}_sensor")
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            for n in sizes if r % 2 == 0 else sizes[::-1]:
                say(f"steady-state burst, round {r + 1}: {n} records")
                rounds.append({"round": r, **_burst_round(bench, consumer, keys, first, written, n, args)})
                written += BURST_SEED + n
                say(f"  hand loop {rounds[-1]['hand_loop_seconds']} s, pipeline {rounds[-1]['pipeline_seconds']} s "
                    f"({rounds[-1]['pipeline_runs_used']} run(s))")
    finally:
        bench.stop_sensor(f"{consumer}_sensor")
        stop_process(hand)
    by_size = {}
    for n in sizes:
        mine = [x for x in rounds if x["events"] == n]
        by_size[str(n)] = {"hand_loop_median_s": statistics.median(x["hand_loop_seconds"] for x in mine),
                           "pipeline_median_s": statistics.median(x["pipeline_seconds"] for x in mine),
                           "ratio_median": statistics.median(x["ratio"] for x in mine)}
    ratio = round(statistics.median(x["ratio"] for x in rounds), 3)
    return {
        "measures": "time from a burst's first write until each variant's checkpoint reaches its last record; "
                    "the consumer's run alive and caught up (in its max_idle_s window, starter as shipped) "
                    "and the hand loop following, both caught up, when the burst starts",
        "interleaving": "concurrent: both consume the same burst; the order of sizes alternates between rounds",
        "sizes": sizes, "rounds": rounds, "by_size": by_size, "ratio_pipeline_vs_hand": ratio,
        "target_max": TARGET_BURST_RATIO, "met": ratio <= TARGET_BURST_RATIO,
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the servers and the daemon are stopped, the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    set_label("drain-bench")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=50_000, help="backlog of the drain phase")
    ap.add_argument("--rounds", type=int, default=2, help="drain rounds (each: hand loop and daemon)")
    ap.add_argument("--live-rates", default="100,300,1000", help="producer rates of the live phase; '' = skip")
    ap.add_argument("--live-seconds", type=float, default=180.0)
    ap.add_argument("--batch-sizes", default="250,500,1000,2000,5000",
                    help="max_events values for the core-loop phase (no Dagster); '' = skip")
    ap.add_argument("--burst-sizes", default="20000,50000",
                    help="steady-state burst sizes (consumer and hand loop already running); '' = skip")
    ap.add_argument("--catch-up-s", type=float, default=300.0,
                    help="live, burst: how long to wait for the pipeline to catch up after the producer stops")
    ap.add_argument("--no-mirror", action="store_true", help="switch the every-minute mirror schedule off")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    rates = [int(x) for x in args.live_rates.split(",") if x.strip()]
    tag = secrets.token_hex(3)
    drain_table = f"bench_drain_{tag}"
    consumers = {f"bench_drain_r{r}": (drain_table, f"bench-r{r}") for r in range(args.rounds)}
    live = {rate: (f"bench_live_{rate}_{tag}", f"bench_live_{rate}", f"bench-live-{rate}") for rate in rates}
    consumers.update({name: (table, group) for table, name, group in live.values()})
    bursts = [int(x) for x in args.burst_sizes.split(",") if x.strip()] if args.rounds else []
    burst = (f"bench_burst_{tag}", "bench_burst", "bench-burst")
    if bursts:
        consumers[burst[1]] = (burst[0], burst[2])
    started = time.time()
    with bench_environment(args, consumers) as bench:
        report: dict[str, Any] = {"benchmark": "drain", "drain": drain_phase(bench, args, drain_table) if args.rounds
                                  else None, "live": []}
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        report["batch_sizes"] = batch_size_phase(bench, args, drain_table, sizes) if sizes and args.rounds else None
        for rate in rates:
            table, name, group = live[rate]
            report["live"].append(live_phase(bench, args, rate, table, name, group))
        report["steady_burst"] = burst_phase(bench, args, bursts, *burst) if bursts else None
    report["targets"] = {
        "drain_ratio_max": TARGET_DRAIN_RATIO,
        "drain_met": report["drain"]["met"] if report["drain"] else None,
        "live_met": all(x["met"] for x in report["live"]) if report["live"] else None,
        "burst_ratio_max": TARGET_BURST_RATIO,
        "burst_met": report["steady_burst"]["met"] if report["steady_burst"] else None,
    }
    report["environment"] = environment(started, mirror=not args.no_mirror)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
