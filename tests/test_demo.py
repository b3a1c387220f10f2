"""The bounded, headless demo: the real path (daemon -> sensor -> runs -> checkpoints) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_bounded_demo_loses_and_duplicates_nothing() -> None:
    env = dict(os.environ)
    out = subprocess.run(
        [str(Path(sys.executable).parent / "durability-pipelines"), "demo", "--events", "150", "--timeout", "420"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = out.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{out.stderr[-4000:]}"
    summary = json.loads(lines[-1])  # the JSON summary is the last line
    assert out.returncode == 0, f"{summary}\n{out.stderr[-4000:]}"
    assert summary["ok"] is True
    assert summary["events_produced"] == {"dynamodb": 150, "supabase": 150}
    assert summary["events_processed"] == {"orders_worker": 150, "supabase_orders_worker": 150,
                                           "orders_to_realtime": 150}
    assert set(summary["duplicates"].values()) == {0} and set(summary["lost"].values()) == {0}
    assert summary["failed_runs"] == 0
    stores = {c["key"]: c for c in summary["checkpoints"]}
    worker = next(c for k, c in stores.items() if k.startswith("checkpoint:dynamodb:orders:workers:consumer-a:"))
    assert worker["redis"] is not None  # hybrid: Redis always holds the latest ack
    realtime = next(c for k, c in stores.items() if k.startswith("checkpoint:dynamodb:orders:realtime:"))
    assert realtime["postgres"] is not None and realtime["redis"] is None  # postgres backend
