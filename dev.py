#!/usr/bin/env python3
"""Developer entry point that needs nothing but Python 3.10+ (standard library only).

    python3 dev.py test [pytest args]   set up .venv if needed, then run pytest; exits with pytest's code
    python3 dev.py lint [ruff args]     ruff check (default: the whole repo)
    python3 dev.py demo [args]          durability-pipelines demo: everything running (UI on :3000); --events N for headless
    python3 dev.py setup                only create/refresh .venv

The virtualenv is (re)installed with `pip install -e ".[dev]"` when it is missing or when
pyproject.toml is newer than its stamp file, so a fresh clone and a changed dependency list both work.
PostgreSQL and Redis come from $DURABILITY_POSTGRES_URL / $DURABILITY_REDIS_URL, or are started
embedded under .durability/ (see durability_pipelines/services.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
PYTHON = BIN / "python"
STAMP = VENV / ".dev-installed"
PYPROJECT = ROOT / "pyproject.toml"


def _say(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str]) -> None:
    _say("$ " + " ".join(cmd))
    result = subprocess.run(cmd, cwd=ROOT, check=False)
    if result.returncode != 0:
        _say(f"failed (exit {result.returncode}): {' '.join(cmd)}")
        raise SystemExit(result.returncode)


def ensure_venv() -> None:
    """Create .venv and install the project into it when missing or stale."""
    if sys.version_info < (3, 10):  # noqa: UP036 - dev.py runs on whatever python3 the machine has
        raise SystemExit(f"Python 3.10+ is required, this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        _say(f"creating {VENV}")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], cwd=ROOT, check=True)
        except subprocess.CalledProcessError as exc:
            raise SystemExit(
                f"could not create {VENV} (exit {exc.returncode}). On Debian/Ubuntu install the venv "
                "module first: apt-get install python3-venv"
            ) from None
        STAMP.unlink(missing_ok=True)
    if STAMP.exists() and STAMP.stat().st_mtime >= PYPROJECT.stat().st_mtime:
        return
    _run([str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", ".[dev]"])
    STAMP.write_text("installed from pyproject.toml by dev.py\n")


def _exec(cmd: list[str]) -> int:
    """Run ``cmd`` from the repo root and return its exit code unchanged."""
    _say("$ " + " ".join(cmd))
    os.chdir(ROOT)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # replaces this process: signals and the exit code are the command's own
    return 0  # unreachable


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command == "setup":
        ensure_venv()
        return 0
    if command == "test":
        ensure_venv()
        return _exec([str(PYTHON), "-m", "pytest", *args])
    if command == "lint":
        ensure_venv()
        return _exec([str(BIN / "ruff"), "check", *(args or ["."])])
    if command == "demo":
        ensure_venv()
        cli = BIN / "durability-pipelines"
        if not cli.exists():
            _say(f"{cli} is missing: the demo is not available yet")
            return 1
        return _exec([str(cli), "demo", *args])
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
