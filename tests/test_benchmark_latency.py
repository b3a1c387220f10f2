"""The latency benchmark runs end to end at a tiny size and reports every figure (speed is not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "latency.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STATS = ("count", "p50_s", "p95_s", "p99_s", "max_s", "mean_s")


def test_latency_benchmark_reports_percentiles_runs_and_boundaries(postgres_url: str) -> None:
    env = {**os.environ, "DURABILITY_POSTGRES_URL": postgres_url}
    # max_run_seconds 8 (shipped: 60) so that a 20 s window holds at least one run boundary
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--rates", "20", "--seconds", "20", "--max-run-seconds", "8",
         "--warmup-s", "240", "--catch-up-s", "120"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON document

    assert report["benchmark"] == "latency" and report["interleaving"].startswith("concurrent")
    # the starter's downstream rollup is off unless --with-rollup: its runs are not the consumer's work
    assert report["config_overrides"] == {"max_run_seconds": 8.0, "events_per_minute": None}
    (phase,) = report["rates"]
    assert phase["rate_target"] == 20 and phase["rate_achieved"] > 0 and phase["seconds"] == 20
    assert phase["warmup_s"] > 0 and phase["records_in_window"] > 0
    assert phase["records_written"] >= phase["records_in_window"]
    assert set(phase["variants"]) == {"pipeline", "hand_loop"}
    for figures in phase["variants"].values():
        assert all(isinstance(figures[k], int | float) for k in STATS)
        assert figures["count"] == figures["committed_in_window"] > 0  # every record was seen committed
        assert figures["committed_total"] == phase["records_written"] and figures["unstamped_rows"] == 0
        assert figures["p50_s"] <= figures["p95_s"] <= figures["p99_s"] <= figures["max_s"]
        # per 5 s of write time: [offset, rows, p50, max]; together the buckets hold every record of the window
        assert figures["timeline"] and all(len(b) == 4 and b[2] <= b[3] for b in figures["timeline"])
        assert sum(b[1] for b in figures["timeline"]) == figures["count"]

    # the first run ends by its budget before the producer stops: at least one run boundary
    runs, boundaries = phase["runs"], phase["boundaries"]
    readers = [r for r in runs if r["batches"]]  # a successor that was not granted the shard read nothing
    assert len(readers) >= 2 and len(boundaries) == len(readers) - 1
    assert sum(r["events"] for r in runs) >= phase["records_written"]
    for r in runs:
        assert {"run_id", "status", "stop_reason", "batches", "first_read_s", "last_read_s", "started_s",
                "ended_s"} <= set(r)
    for b in boundaries:
        assert {"from_run", "to_run", "from_stop_reason", "planned", "unread_s", "reported_unread_s",
                "within_one_cycle", "handed_to", "handed_from", "last_read_s", "next_read_s"} <= set(b)
        assert isinstance(b["planned"], bool) and isinstance(b["unread_s"], float)
    assert phase["planned_handoffs"] >= 1 and isinstance(phase["batch_cycle_s"], float)
    assert phase["observer_poll_period_s"] > 0
    assert all(len(r) == 3 and r[0] != "bench_lat_20_job" for r in phase["other_runs"])  # mirror runs, if any
    for r in runs:
        assert r.get("handoff_followed_s") is None or isinstance(r["handoff_followed_s"], float)
    for targets in (phase["targets"], report["targets"]):
        assert targets["pipeline_p99_max_s"] == 1.0 and targets["pipeline_max_max_s"] == 3.0
        assert isinstance(targets["latency_met"], bool) and isinstance(targets["handoff_met"], bool)
    assert report["environment"]["cpus"] and report["environment"]["mirror_schedule"] is True
