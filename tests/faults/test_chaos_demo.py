"""The bounded demo under chaos (`durability-pipelines demo --events N --chaos`): faults injected at random
while the three pipelines run through the real daemon, and still nothing lost, nothing duplicated.

It runs on a private PostgreSQL and Redis (the chaos drops their connections and pauses Redis), never on
the machine's shared servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from durability_pipelines import services
from durability_pipelines.chaos import FAULTS
from tests.support.demo_process import isolated_services

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_the_demo_under_chaos_loses_and_duplicates_nothing() -> None:
    with isolated_services() as service_env:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DURABILITY_", "DAGSTER_"))}
        env.update(service_env)
        out = subprocess.run(
            [str(Path(sys.executable).parent / "durability-pipelines"), "demo", "--events", "200", "--timeout", "600",
             "--chaos", "--chaos-seed", "7"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
        )
    lines = out.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{out.stderr[-4000:]}"
    summary = json.loads(lines[-1])
    assert out.returncode == 0, f"{summary}\n{out.stderr[-4000:]}"
    chaos = summary["chaos"]
    assert len(chaos["faults_injected"]) >= 5 and set(chaos["counts"]) == set(FAULTS)
    assert sum(1 for n in chaos["counts"].values() if n) >= 3  # several kinds of fault, not one repeated
    assert summary["ok"] is True
    assert summary["events_processed"] == {"orders_worker": 200, "supabase_orders_worker": 200,
                                           "orders_to_realtime": 200}
    assert set(summary["lost"].values()) == {0} and set(summary["duplicates"].values()) == {0}
    assert services.ENV_POSTGRES_URL not in out.stdout  # (the summary names no server credentials)
