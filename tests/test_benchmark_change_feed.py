"""The change-feed benchmark runs end to end at a tiny size and reports every figure (speed is not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "change_feed.py"

# About a minute: a private wal_level=logical server, one daemon, two consumer runs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_change_feed_benchmark_reports_write_overhead_per_feed_and_the_wal_drain_against_a_hand_loop(
        postgres_url: str) -> None:
    env = {**os.environ, "DURABILITY_POSTGRES_URL": postgres_url}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--changes", "400", "--rounds", "3", "--drain-changes", "300",
         "--drain-rounds", "2", "--no-mirror"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON document

    writes = report["write_overhead"]
    assert writes["changes"] == 400 and len(writes["rounds"]) == 9
    # every round writes every variant once, in a rotated order
    orders = [[r["variant"] for r in writes["rounds"] if r["round"] == n] for n in (1, 2, 3)]
    assert all(sorted(o) == ["plain", "trigger", "wal"] for o in orders) and len({tuple(o) for o in orders}) == 3
    assert all(writes["median_seconds"][v] > 0 for v in ("plain", "trigger", "wal"))
    assert set(writes["ratio_to_plain"]) == {"trigger", "wal"}
    assert writes["target"]["wal_ratio_max"] == 1.05 and isinstance(writes["target"]["met"], bool)

    drain = report["drain"]
    assert drain["changes"] == 300 and drain["exact_sink"] is True
    assert drain["sink_rows"] == {"daemon": 600, "hand_loop": 600}  # every change once, both ways
    variants = [r["variant"] for r in drain["rounds"]]
    assert variants == ["hand_loop", "daemon", "daemon", "hand_loop"]  # alternating which goes first
    for r in drain["rounds"]:
        assert r["seconds"] > 0 and len(r["load_before"]) == 3
    daemon = [r for r in drain["rounds"] if r["variant"] == "daemon"]
    assert all(r["runs"] >= 1 and r["runs_succeeded"] == r["runs"] for r in daemon)
    assert drain["daemon_over_hand"] > 0 and drain["target"]["ratio_max"] == 1.2
    assert report["targets"]["drain"] == drain["target"]
    assert report["environment"]["mirror_schedule"] is False
