"""Benchmark: many consumers on idle streams through the real Dagster daemon (issue 20: "with 50 consumers, an
event on an idle stream is acked within 5 s"; "many consumers do not make each other's ticks late").

``--consumers`` copies of the shipped ``orders_worker`` starter, each on an empty table of its own, their
sensors running (the shipped ``dagster.yaml``: sensors evaluated on 8 threads, ``sensor_interval_s`` 4).
After a warm-up (every sensor has ticked), ``--probes`` probes, ``--probe-every`` seconds apart: each writes
one item to a table nobody has written to yet (an idle stream, no run in flight) and times it until its sink
row is seen committed (an observer polls ``stream_events`` every 50 ms). Each probe is split, from the
consumer's run in Dagster's storage, into: the write -> the run created by the sensor's tick (tick wait and
tick), created -> started (queue, launch, process start), started -> committed (resources, claim, read,
process, ack). Over the same window, each sensor's ticks: the time between consecutive ticks (lateness shows
as intervals above the daemon's 5 s loop) and how long a tick took.

``--keep-owned`` measures the other setting: every consumer with ``keep_owned: true`` (its shards owned all
the time by a run that never ends because the stream is quiet), after a warm-up in which every consumer's run
has started.

Prints one JSON document on stdout (progress on stderr). A test runs it tiny and checks the shape only.

    .venv/bin/python benchmarks/consumers.py [--consumers 50] [--probes 20] [--probe-every 6] [--keep-owned]
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg  # noqa: E402
from common import (  # noqa: E402
    Bench,
    _wait,
    bench_environment,
    environment,
    percentiles,
    put_batch,
    say,
    set_label,
)

TARGET_ACK_S = 5.0
OBSERVE_EVERY_S = 0.05


class FirstRowObserver(threading.Thread):
    """Stamps, per table, when its first sink row is seen committed."""

    def __init__(self, postgres_url: str, tables: list[str]) -> None:
        super().__init__(daemon=True)
        self.postgres_url = postgres_url
        self.waiting = set(tables)
        self.seen: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.postgres_url, autocommit=True) as conn:
                while not self.stop_event.is_set():
                    with self.lock:
                        waiting = list(self.waiting)
                    if waiting:
                        rows = conn.execute("SELECT DISTINCT stream FROM stream_events WHERE stream = ANY(%s)",
                                            (waiting,)).fetchall()
                        now = time.time()
                        with self.lock:
                            for (table,) in rows:
                                self.waiting.discard(table)
                                self.seen.setdefault(table, now)
                    self.stop_event.wait(OBSERVE_EVERY_S)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc


def sensor_ticks(bench: Bench, names: set[str], since: float, until: float) -> dict[str, list[tuple[float, float]]]:
    """Per sensor of ``names``: (start, end) of each tick between ``since`` and ``until``."""
    from dagster._core.scheduler.instigation import InstigatorType as Kind

    instance = bench.instance()
    out: dict[str, list[tuple[float, float]]] = {}
    for state in instance.all_instigator_state(instigator_type=Kind.SENSOR):
        if state.instigator_name not in names:
            continue
        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, before=until, after=since,
                                   limit=100_000)
        out[state.instigator_name] = sorted((t.timestamp, t.end_timestamp or t.timestamp) for t in ticks)
    return out


def tick_figures(ticks: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    intervals = [b[0] - a[0] for series in ticks.values() for a, b in zip(series, series[1:], strict=False)]
    durations = [end - start for series in ticks.values() for start, end in series]
    return {"sensors": len(ticks), "ticks": sum(len(s) for s in ticks.values()),
            "interval_s": percentiles(intervals), "tick_duration_s": percentiles(durations),
            "intervals_over_10s": sum(1 for i in intervals if i > 10.0)}


def probe_breakdown(bench: Bench, name: str, written: float, committed: float | None) -> dict[str, Any]:
    """Where a probe's time went, from the consumer's first run."""
    runs = sorted(bench.runs_of(f"{name}_job"), key=lambda r: r.create_timestamp.timestamp())
    run = runs[0] if runs else None
    created = run.create_timestamp.timestamp() if run else None
    started = run.start_time if run else None

    def part(a: float | None, b: float | None) -> float | None:
        return round(b - a, 3) if a is not None and b is not None else None

    return {"consumer": name, "ack_s": part(written, committed), "to_run_created_s": part(written, created),
            "created_to_started_s": part(created, started), "started_to_committed_s": part(started, committed),
            "runs": len(runs)}


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    set_label("consumers-bench")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--consumers", type=int, default=50)
    ap.add_argument("--probes", type=int, default=20, help="events written, each to an idle stream of its own")
    ap.add_argument("--probe-every", type=float, default=6.0, help="seconds between two probes")
    ap.add_argument("--keep-owned", action="store_true", help="every consumer with keep_owned: true")
    ap.add_argument("--warmup-s", type=float, default=600.0, help="longest wait for the warm-up")
    ap.add_argument("--no-mirror", action="store_true", help="switch the every-minute mirror schedule off")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    if args.probes > args.consumers:
        ap.error("--probes must not exceed --consumers: each probe writes to a stream nobody wrote to")
    tag = secrets.token_hex(3)
    names = {f"bench_idle_{i:03d}": (f"bench_idle_{tag}_{i:03d}", f"bench-idle-{i:03d}") for i in range(args.consumers)}
    overrides: dict[str, Any] = {"sensor_running_by_default": True}
    if args.keep_owned:
        overrides["keep_owned"] = True
    started = time.time()
    with bench_environment(args, names, {n: overrides for n in names}) as bench:
        sensors = {f"{n}_sensor" for n in names}
        t0 = time.time()
        say(f"{args.consumers} consumers: waiting for every sensor to tick"
            + (" and every consumer's run to start" if args.keep_owned else ""))

        def warm() -> bool:
            ticked = sensor_ticks(bench, sensors, t0, time.time() + 1)
            if sum(1 for s in ticked.values() if s) < len(sensors):
                return False
            return not args.keep_owned or all(
                any(r.start_time for r in bench.runs_of(f"{n}_job")) for n in names)

        _wait(warm, "the warm-up", args.warmup_s, every=2.0)
        warmup_s = time.time() - t0
        say(f"warm-up took {warmup_s:.0f} s; {args.probes} probes, one every {args.probe_every:g} s")
        probed = list(names)[: args.probes]
        observer = FirstRowObserver(bench.postgres_url, [names[n][0] for n in probed])
        observer.start()
        window_start = time.time()
        written: dict[str, float] = {}
        for i, name in enumerate(probed):
            table = names[name][0]
            written[name] = time.time()
            put_batch(bench.ddb, table, i, 1, stamp=True)
            time.sleep(args.probe_every)
        _wait(lambda: not observer.waiting or observer.error, "every probe's sink row", 300, every=0.2)
        window_end = time.time()
        observer.stop_event.set()
        observer.join()
        if observer.error is not None:
            raise observer.error
        probes = [probe_breakdown(bench, n, written[n], observer.seen.get(names[n][0])) for n in probed]
        ticks = tick_figures(sensor_ticks(bench, sensors, window_start, window_end))
    acks = [p["ack_s"] for p in probes if p["ack_s"] is not None]
    ack = percentiles(acks)
    report = {
        "benchmark": "consumers",
        "consumers": args.consumers, "keep_owned": args.keep_owned, "probes": args.probes,
        "probe_every_s": args.probe_every, "warmup_s": round(warmup_s, 1),
        "ack_latency_s": ack,
        "parts_median_s": {k: (statistics.median(v) if (v := [p[k] for p in probes if p[k] is not None]) else None)
                           for k in ("to_run_created_s", "created_to_started_s", "started_to_committed_s")},
        "probe_results": probes,
        "sensor_ticks": ticks,
        "targets": {"ack_max_s": TARGET_ACK_S, "met": bool(acks) and len(acks) == len(probes)
                    and max(acks) <= TARGET_ACK_S},
        "environment": environment(started, mirror=not args.no_mirror),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
