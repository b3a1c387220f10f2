"""The many-consumers benchmark runs end to end at a tiny size and reports every figure (speed is not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "consumers.py"

# About a minute on a quiet machine: the daemon's start, two sensors ticking, two run launches.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_consumers_benchmark_reports_each_probes_ack_latency_its_parts_and_the_sensor_ticks(postgres_url: str) -> None:
    env = {**os.environ, "DURABILITY_POSTGRES_URL": postgres_url}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--consumers", "3", "--probes", "2", "--probe-every", "1", "--no-mirror"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON document

    assert report["benchmark"] == "consumers" and report["consumers"] == 3 and report["probes"] == 2
    assert report["keep_owned"] is False and report["warmup_s"] >= 0
    assert len(report["probe_results"]) == 2
    for probe in report["probe_results"]:
        assert probe["ack_s"] > 0 and probe["runs"] >= 1  # every probe's event was acked, by a run of its own
        assert probe["to_run_created_s"] is not None and probe["created_to_started_s"] is not None
        assert probe["started_to_committed_s"] is not None
    assert report["ack_latency_s"]["count"] == 2 and report["ack_latency_s"]["max_s"] >= report["ack_latency_s"]["p50_s"]
    assert set(report["parts_median_s"]) == {"to_run_created_s", "created_to_started_s", "started_to_committed_s"}
    ticks = report["sensor_ticks"]
    assert ticks["sensors"] == 3 and ticks["ticks"] >= 3 and "p50_s" in ticks["interval_s"]
    assert report["targets"]["ack_max_s"] == 5.0 and isinstance(report["targets"]["met"], bool)
    assert report["environment"]["mirror_schedule"] is False
