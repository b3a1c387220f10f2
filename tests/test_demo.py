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
    # read after the demo stopped everything: each drain that ended cleanly flushed hybrid's acks to Postgres
    assert worker["postgres"] == worker["redis"] and summary["hybrid_apart_after_stop"] == []
    feed = stores["checkpoint:supabase:orders-changes:workers:consumer-a"]
    assert feed["postgres"] == feed["redis"] is not None
    realtime = next(c for k, c in stores.items() if k.startswith("checkpoint:dynamodb:orders:realtime:"))
    # postgres backend: the broadcaster writes Postgres only; Redis holds at most the every-minute mirror's copy
    # of that row (the mirror restores every Postgres checkpoint missing in Redis), never anything else
    assert realtime["postgres"] is not None and realtime["redis"] in (None, realtime["postgres"])


def test_a_port_in_use_is_named_before_anything_starts(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [str(Path(sys.executable).parent / "durability-pipelines"), "demo", "--port", str(port)],
            cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120,
        )
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"port {port} on 127.0.0.1 is not free" in out.stderr and "--port N" in out.stderr
    assert "[1/6]" not in out.stderr  # nothing was started


def test_ctrl_c_is_a_stop_not_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    from durability_pipelines.demo import Progress

    progress = Progress(2)
    with pytest.raises(KeyboardInterrupt), progress.step("pipelines processing; Ctrl-C stops"):
        raise KeyboardInterrupt
    with pytest.raises(RuntimeError), progress.step("something else"):
        raise RuntimeError("boom")
    err = capsys.readouterr().err
    assert "[1/2] pipelines processing; Ctrl-C stops ... stopped\n" in err
    assert "[2/2] something else ... failed\n" in err
