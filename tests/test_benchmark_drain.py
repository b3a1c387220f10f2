"""The drain benchmark runs end to end at a tiny size and reports every figure (speed is not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "drain.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_drain_benchmark_reports_both_variants_the_ratio_live_lag_and_the_steady_burst(postgres_url: str) -> None:
    env = {**os.environ, "DURABILITY_POSTGRES_URL": postgres_url}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--events", "400", "--rounds", "1", "--live-rates", "20",
         "--live-seconds", "12", "--batch-sizes", "100,400", "--burst-sizes", "200"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON document

    drain = report["drain"]
    assert drain["events"] == 400 and drain["exact_sink"] is True
    variants = [r["variant"] for r in drain["rounds"]]
    assert sorted(variants) == ["daemon", "hand_loop"]
    for r in drain["rounds"]:
        assert r["seconds"] > 0 and r["events"] == r["sink_rows"] == 400 and len(r["load_before"]) == 3
    daemon = next(r for r in drain["rounds"] if r["variant"] == "daemon")
    assert daemon["runs"] >= 1 and daemon["runs_succeeded"] == daemon["runs"] and daemon["batches"] >= 1
    assert drain["ratio_daemon_vs_hand"] > 0 and len(drain["ratio_daemon_vs_hand_per_round"]) == 1
    assert drain["target_max"] == 1.5 and isinstance(drain["met"], bool)
    assert [x["max_events"] for x in report["batch_sizes"]["results"]] == [100, 400]
    assert all(x["events"] == 400 and x["events_per_s"] > 0 for x in report["batch_sizes"]["results"])

    (live,) = report["live"]
    assert live["rate_target"] == 20 and live["rate_achieved"] > 0 and live["records"] > 0
    assert live["samples"] and {"t", "written", "hand_behind", "hand_lag_s", "pipeline_behind",
                                "pipeline_lag_s"} <= set(live["samples"][0])
    for side in ("hand_loop", "pipeline"):
        assert {"slope_per_s", "max", "growing", "max_behind"} <= set(live[side])
    assert live["pipeline"]["runs"] >= 1 and isinstance(live["met"], bool)

    burst = report["steady_burst"]
    assert burst["sizes"] == [200] and burst["interleaving"].startswith("concurrent")
    (one,) = burst["rounds"]
    assert one["events"] == 200 and one["write_seconds"] > 0
    assert one["hand_loop_seconds"] > 0 and one["pipeline_seconds"] > 0 and one["ratio"] > 0
    assert isinstance(one["run_alive_at_burst"], bool) and isinstance(one["waited_for_previous_run_to_end"], bool)
    assert one["pipeline_runs_used"] >= 1
    assert isinstance(one["hand_loop_after_last_write_s"], float) and isinstance(one["pipeline_after_last_write_s"], float)
    assert set(burst["by_size"]) == {"200"} and burst["ratio_pipeline_vs_hand"] > 0
    assert burst["target_max"] == 1.1 and isinstance(burst["met"], bool)
    assert set(report["targets"]) == {"drain_ratio_max", "drain_met", "live_met", "burst_ratio_max", "burst_met"}
    assert report["environment"]["cpus"] and report["environment"]["mirror_schedule"] is True
