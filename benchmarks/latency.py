"""Benchmark: end-to-end latency of a live DynamoDB stream through the real Dagster daemon vs the hand loop,
and how long the shard goes unread at each run boundary (issue 19, "a shard never goes dark").

Per rate of ``--rates``: a producer writes that many records/s to a table of its own for a warm-up and then
``--seconds``, each item stamped with its write time (``written_at``, epoch seconds, taken just before
the BatchWriteItem call). Two consumers read the same stream in the same window (concurrently, each with
its own checkpoint): the ``orders_worker`` starter as shipped (only name, table, group and endpoint
changed, and its downstream ``events_per_minute`` asset off unless ``--with-rollup``) through ``dagster-daemon`` and its sensor, and ``benchmarks/hand_consumer.py --follow-until``.
Each writes ``stream_events`` in a database of its own on the same server. A thread polls both tables
every 50 ms and stamps each row when it first sees it committed; a record's latency is that stamp minus
its ``written_at`` (so it includes the write call, the read, the sink transaction and up to one poll
period). Only records written inside the window count: the warm-up (until both consumers have caught
up once, which includes the daemon's first run launch) is reported apart.

The consumer's runs are read back from Dagster's event log (one line per batch, ``BatchRecord.describe``;
the op's output metadata for ``stop_reason`` and, once runs hand over, ``handed_to`` / ``handed_from`` /
``handoff_unread_s``): for each run boundary, how long the shard went unread (the successor's first read
minus the predecessor's last), against one batch cycle (the median time between reads inside a run).

Targets (``met`` in the JSON): pipeline p99 <= 1.0 s and max <= 3.0 s at every rate; every planned
hand-off (a run that ended by its budget or handed over) leaves the shard unread <= one batch cycle.

Prints one JSON document on stdout (progress on stderr).

    .venv/bin/python benchmarks/latency.py [--rates 100,500,1000] [--seconds 360] [--no-mirror]
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Bench,
    Producer,
    SinkObserver,
    _wait,
    batch_cycle_s,
    bench_environment,
    environment,
    hand_loop,
    load,
    percentiles,
    run_boundaries,
    run_timeline,
    say,
    set_label,
    stop_process,
)

TARGET_P99_S = 1.0
TARGET_MAX_S = 3.0
OBSERVE_EVERY_S = 0.05
#: a variant has "caught up" when it committed every record written more than this long ago
CAUGHT_UP_WITHIN_S = 1.0
VARIANTS = ("pipeline", "hand_loop")


def _rel(t: float | None, origin: float) -> float | None:
    return round(t - origin, 3) if t is not None else None


def rate_phase(bench: Bench, args: argparse.Namespace, rate: int, table: str, consumer: str,
               group: str) -> dict[str, Any]:
    producer = Producer(bench, table, rate, stamp=True)
    producer.start()
    _wait(lambda: producer.written > 0, "the first write", 60)
    shard, first = bench.shard(table)
    observer = SinkObserver({"pipeline": bench.postgres_url, "hand_loop": bench.hand_postgres_url}, table, shard,
                            first, every=OBSERVE_EVERY_S)
    observer.start()
    t0 = time.time()
    # The hand loop follows until well after the window; it is stopped once both have caught up.
    hand = hand_loop(bench, table, f"bench:hand:{table}", follow_until=t0 + args.warmup_s + args.seconds + 600,
                     postgres_url=bench.hand_postgres_url)
    bench.start_sensor(f"{consumer}_sensor")
    say(f"{rate}/s: warming up (the daemon's first run, the hand loop's start)")

    def caught_up() -> bool:
        if observer.error:
            raise observer.error
        due = producer.written_by(time.time() - CAUGHT_UP_WITHIN_S)
        return due > 0 and all(observer.covered(v) >= due for v in VARIANTS)

    _wait(caught_up, "both consumers to catch up once (warm-up)", args.warmup_s, every=0.1)
    start = time.time()
    end = start + args.seconds
    say(f"{rate}/s: warm-up took {start - t0:.1f} s; measuring for {args.seconds:.0f} s")
    while time.time() < end:
        time.sleep(min(30.0, max(0.0, end - time.time())))
        if observer.error:
            raise observer.error
        say(f"  {rate}/s: {producer.written} written, pipeline {observer.covered('pipeline')}, "
            f"hand loop {observer.covered('hand_loop')} committed")
    producer.stop_event.set()
    producer.join()
    total = producer.written
    caught = {}
    for variant in VARIANTS:
        try:
            _wait(lambda v=variant: observer.covered(v) >= total, f"{variant} to commit every record",
                  args.catch_up_s, every=0.1)
            caught[variant] = round(time.time() - producer.stopped_at, 2)
        except TimeoutError:
            caught[variant] = None
    bench.stop_sensor(f"{consumer}_sensor")
    stop_process(hand)
    observer.stop_event.set()
    observer.join()
    bench.wait_runs_finished(f"{consumer}_job", 300)
    runs = run_timeline(bench, f"{consumer}_job")
    cycle = batch_cycle_s(runs)
    boundaries = run_boundaries(runs, cycle)
    planned = [b for b in boundaries if b["planned"]]

    variants = {}
    for variant in VARIANTS:
        latencies, unstamped = observer.latencies(variant, start, end)
        written_in_window = sum(1 for w, _ in observer.seen[variant].values() if w is not None and start <= w < end)
        variants[variant] = {**percentiles(latencies), "committed_in_window": written_in_window,
                             "unstamped_rows": unstamped, "committed_total": observer.covered(variant),
                             "caught_up_after_stop_s": caught[variant],
                             # per 5 s of write time: [offset s, rows, p50 s, max s]
                             "timeline": observer.timeline(variant, start, end)}
    pipe = variants["pipeline"]
    latency_met = pipe["p99_s"] is not None and pipe["p99_s"] <= TARGET_P99_S and pipe["max_s"] <= TARGET_MAX_S
    handoff_met = all(b["within_one_cycle"] for b in planned) if planned else None
    for r in runs:  # times relative to the window's start, batches summarised
        batches = r.pop("batches")
        r.update(batches=len(batches), first_read_s=_rel(batches[0]["read_at"], start) if batches else None,
                 last_read_s=_rel(batches[-1]["read_at"], start) if batches else None,
                 started_s=_rel(r.pop("started_at"), start), ended_s=_rel(r.pop("ended_at"), start),
                 drained_s=_rel(r.pop("drained_at"), start))
    for b in boundaries:
        b["last_read_s"], b["next_read_s"] = _rel(b.pop("last_read_at"), start), _rel(b.pop("next_read_at"), start)
    return {
        "rate_target": rate, "rate_achieved": round(producer.achieved_rate, 1), "seconds": args.seconds,
        "warmup_s": round(start - t0, 2), "records_written": total,
        "records_in_window": total - producer.written_by(start) if total else 0,
        "variants": variants,
        "runs": runs,
        "batch_cycle_s": cycle,
        "boundaries": boundaries,
        # the other runs in the window (mirror, audit, the starter's rollup): [job, started s, ended s]
        "other_runs": [[r.dagster_run.job_name, _rel(r.start_time, start), _rel(r.end_time, start)]
                       for r in bench.instance().get_run_records() if r.dagster_run.job_name != f"{consumer}_job"
                       and r.start_time is not None and start - 60 <= r.start_time <= end],
        "planned_handoffs": len(planned),
        "max_unread_s": max((b["unread_s"] for b in planned if b["unread_s"] is not None), default=None),
        "targets": {"pipeline_p99_max_s": TARGET_P99_S, "pipeline_max_max_s": TARGET_MAX_S,
                    "latency_met": latency_met, "handoff_unread_max": "one batch cycle",
                    "handoff_met": handoff_met},
        "observer_poll_period_s": observer.poll_period_s,
        "load_end": load(),
    }


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the servers and the daemon are stopped, the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    set_label("latency-bench")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="100,500,1000", help="producer rates (records/s), one phase each")
    ap.add_argument("--seconds", type=float, default=360.0,
                    help="measured window per rate (360: at least 3 run boundaries with max_run_seconds 60)")
    ap.add_argument("--warmup-s", type=float, default=300.0, help="longest wait for both consumers to catch up once")
    ap.add_argument("--catch-up-s", type=float, default=300.0,
                    help="how long to wait for both to commit every record after the producer stops")
    ap.add_argument("--max-run-seconds", type=float, default=None,
                    help="override the starter's max_run_seconds (more run boundaries in a short test); "
                         "default: as shipped")
    ap.add_argument("--no-mirror", action="store_true", help="switch the every-minute mirror schedule off")
    ap.add_argument("--with-rollup", action="store_true",
                    help="keep the starter's events_per_minute asset (a run a minute while the sink is written)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    rates = [int(x) for x in args.rates.split(",") if x.strip()]
    tag = secrets.token_hex(3)
    phases = {rate: (f"bench_lat_{rate}_{tag}", f"bench_lat_{rate}", f"bench-lat-{rate}") for rate in rates}
    overrides: dict[str, object] = {"max_run_seconds": args.max_run_seconds} if args.max_run_seconds is not None else {}
    if not args.with_rollup:
        # The starter's downstream asset is not the consumer's work (the hand loop computes no rollup): its runs,
        # one a minute while the sink is written, compete for the same cores. --with-rollup measures it.
        overrides["events_per_minute"] = None
    started = time.time()
    with bench_environment(args, {name: (table, group) for table, name, group in phases.values()},
                           {name: overrides for _, name, _ in phases.values()}) as bench:
        results = [rate_phase(bench, args, rate, *phases[rate]) for rate in rates]
    report = {
        "benchmark": "latency",
        "interleaving": "concurrent: both variants consume the same stream in the same window, each with its "
                        "own checkpoint and its own sink database on the same server",
        "latency_measure": "sink row first seen committed by an observer polling every "
                           f"{OBSERVE_EVERY_S} s, minus the item's written_at (taken just before its write call)",
        "unread_measure": "successor's first read minus predecessor's last read (the start of its last batch "
                          "when it stopped by plan, else its end), from the runs' event logs",
        "config_overrides": overrides,
        "rates": results,
        "targets": {
            "pipeline_p99_max_s": TARGET_P99_S, "pipeline_max_max_s": TARGET_MAX_S,
            "latency_met": all(r["targets"]["latency_met"] for r in results),
            "handoff_unread_max": "one batch cycle",
            "handoff_met": (None if all(r["targets"]["handoff_met"] is None for r in results) else
                            all(r["targets"]["handoff_met"] is not False for r in results)),
        },
        "environment": environment(started, mirror=not args.no_mirror),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
