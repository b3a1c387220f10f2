"""The many-shards benchmark runs end to end at a tiny size and reports every figure (speed is not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "shards.py"

# About 2 minutes on a quiet machine (three `dagster sensor` CLI calls, each loading the code location, and
# two run launches); up to 6 under heavy load.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MEDIANS = ("seconds", "events_per_s", "cpu_s_per_1000_events", "peak_rss_mb")


def test_shards_benchmark_reports_drain_per_shard_count_and_the_trickle_with_their_targets(postgres_url: str) -> None:
    env = {**os.environ, "DURABILITY_POSTGRES_URL": postgres_url}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shards", "2", "--events-per-shard", "30", "--rounds", "1",
         "--trickle-seconds", "10", "--no-mirror"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON document

    assert report["benchmark"] == "shards" and report["shards"] == [2] and report["events_per_shard"] == 30
    assert report["config"]["mirror_schedule"] is False and report["config"]["max_events"]
    (drain,) = report["drain"]
    assert drain["shards"] == 2 and drain["events"] == 60 and drain["exact_sink"] is True
    assert sorted(r["variant"] for r in drain["rounds"]) == ["hand", "pipeline"]
    for r in drain["rounds"]:
        assert r["seconds"] > 0 and r["events"] == r["sink_rows"] == 60 and len(r["load_before"]) == 3
        assert r["cpu_s"] >= 0 and r["cpu_s_per_1000_events"] >= 0 and r["events_per_s"] > 0
    hand = next(r for r in drain["rounds"] if r["variant"] == "hand")
    assert hand["processes"] == 1 and hand["threads"] == 2 and hand["peak_rss_mb"] > 0
    pipe = next(r for r in drain["rounds"] if r["variant"] == "pipeline")
    assert pipe["runs"] >= 1 and pipe["runs_succeeded"] == pipe["runs"] and sum(pipe["shards_per_run"]) >= 2
    assert pipe["run_processes_seen"] >= 1 and pipe["peak_rss_mb"] > 0 and pipe["peak_tree_rss_mb"] > 0
    assert pipe["maintenance_runs_started"] == 0  # --no-mirror
    for variant in ("hand", "pipeline"):
        assert set(MEDIANS) <= set(drain[variant])
    assert drain["pipeline"]["runs_max"] >= 1
    assert set(drain["ratios"]) == {"time", "cpu_per_1000_events", "run_processes_rss_vs_hand", "tree_rss_vs_hand"}
    for name, target in drain["targets"].items():
        assert name in ("drain_time_ratio", "cpu_per_1000_ratio", "run_processes")
        assert {"value", "max", "met"} <= set(target) and isinstance(target["met"], bool)
    assert report["rss_per_added_shard"]["met"] is None  # one K: no slope

    (trickle,) = report["trickle"]
    assert trickle["shards"] == 2 and trickle["window_s"] >= 10 and trickle["runs_total"] >= 1
    assert trickle["runs_per_hour"] >= 0 and trickle["dagster_tree_cpu_fraction"] >= 0
    assert trickle["dagster_db_mb_after"] > 0 and isinstance(trickle["dagster_db_growth_mb_per_hour"], float)
    assert "error" not in trickle and trickle["peak_tree_rss_mb"] > 0
    assert trickle["hand"]["window_s"] >= 10 and trickle["hand"]["cpu_fraction"] >= 0 and trickle["hand"]["rss_mb"] > 0
    assert {t["met"] for t in trickle["targets"].values()} <= {True, False}
    targets = report["targets"]
    assert targets["at_shards"] == 2 and targets["trickle_at_shards"] == 2
    assert targets["run_processes_max"] == 4 and targets["trickle_runs_per_hour_max"] == 12.0
    assert all(isinstance(targets[k], bool) for k in ("drain_time_met", "cpu_per_1000_met", "run_processes_met",
                                                       "trickle_runs_per_hour_met", "trickle_cpu_fraction_met",
                                                       "trickle_db_growth_met"))
    assert report["environment"]["cpus"] and len(report["environment"]["load_avg_end"]) == 3
