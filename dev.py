#!/usr/bin/env python3
"""Developer entry point that needs nothing but Python 3.10+ (standard library only).

    python3 dev.py test [pytest args]   set up .venv if needed, then run pytest; exits with pytest's code
    python3 dev.py lint [ruff args]     ruff check (default: the whole repo)
    python3 dev.py demo [args]          durability-pipelines demo: everything running (UI on :3000); --events N for headless
    python3 dev.py setup                create/refresh .venv, the starters' sources, and .env for `dagster dev` (below)
    python3 dev.py setup --no-starter-sources   the same without the starters' sources

The virtualenv is (re)installed with `pip install -e ".[dev]"` when it is missing or when
pyproject.toml is newer than its stamp file, so a fresh clone and a changed dependency list both work.
PostgreSQL and Redis come from $DURABILITY_POSTGRES_URL / $DURABILITY_REDIS_URL, or are started
embedded under .durability/ (see durability_pipelines/services/).

`setup` also resolves those servers (starting the embedded ones if nothing is configured) and writes
DAGSTER_HOME, DAGSTER_POSTGRES_URL, DURABILITY_POSTGRES_URL and DURABILITY_REDIS_URL into a block of
the git-ignored .env, which `dagster dev`, dagster-webserver and dagster-daemon load from the
directory they start in. Lines outside that block are yours: setup never changes them, and a key you
set there is left out of the block. Then: .venv/bin/dagster dev -w workspace.yaml

It also creates what the three starters read, where missing (durability_pipelines/starter_sources.py):
table `orders` with its stream on a local DynamoDB endpoint (a moto server it starts, which keeps running,
like the embedded servers; its URL and the credentials moto accepts go into the block), and
`public.orders` with its change feed and a local `realtime.send` in the project's Postgres. With
DURABILITY_DYNAMODB_ENDPOINT_URL set (empty = AWS) no moto server is started.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
PYTHON = BIN / "python"
STAMP = VENV / ".dev-installed"
PYPROJECT = ROOT / "pyproject.toml"

ENV_FILE_NAME = ".env"
#: The keys `setup` manages in .env, in the order written.
ENV_KEYS = ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL", "DURABILITY_POSTGRES_URL", "DURABILITY_REDIS_URL",
            "DURABILITY_DYNAMODB_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
BLOCK_BEGIN = "# >>> managed by `python3 dev.py setup`: this block is rewritten on every run"
BLOCK_END = "# <<< end of the block managed by `python3 dev.py setup`"
BLOCK_HELP = (
    "# Loaded by `dagster dev`, dagster-webserver and dagster-daemon from the directory they start in.",
    "# ${NAME:-value}: a variable exported in your shell wins over the value written here.",
    "# Your own value: set the variable outside this block; setup leaves it out of the block and never",
    "# changes lines outside the block. Edits inside the block are lost at the next setup.",
)
_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
# Characters that would break `${NAME:-value}` or the double quotes around it.
_UNSAFE = {"$": "%24", "{": "%7B", "}": "%7D", '"': "%22", "\\": "%5C", "`": "%60"}


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


class EnvFileError(Exception):
    """.env cannot be written as asked; the message says what to do."""


def _user_lines(lines: list[str]) -> list[str]:
    """The lines of .env outside the managed block (a block without its end marker ends the file)."""
    kept: list[str] = []
    inside = False
    for line in lines:
        if line.strip() == BLOCK_BEGIN:
            inside = True
        elif inside:
            inside = line.strip() != BLOCK_END
        else:
            kept.append(line)
    return kept


def _unquote(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return raw[1:-1]
    return raw.split(" #", 1)[0].strip()


def user_values(path: Path) -> dict[str, str]:
    """The managed keys a user set by hand in ``path`` (outside the block), as written."""
    if not path.exists():
        return {}
    found: dict[str, str] = {}
    for line in _user_lines(path.read_text().splitlines()):
        match = _ASSIGNMENT.match(line)
        if match and match.group(1) in ENV_KEYS:
            found[match.group(1)] = _unquote(match.group(2))
    return found


def _dotenv_value(key: str, value: str) -> str:
    """``"${KEY:-value}"``: the shell's variable wins, else this value. URLs are percent-encoded where a
    character would end the default early (``}``) or be read as a variable (``$``); libpq, SQLAlchemy
    and redis-py decode them back."""
    if key == "DAGSTER_HOME":
        if any(ch in value for ch in _UNSAFE) or "\n" in value:
            raise EnvFileError(
                f"cannot write DAGSTER_HOME={value!r} into .env: it contains one of {''.join(_UNSAFE)}. "
                "To fix: set DAGSTER_HOME yourself outside the managed block of .env, or move the clone.")
    else:
        value = "".join(_UNSAFE.get(ch, ch) for ch in value)
        if "\n" in value:
            raise EnvFileError(f"the value resolved for {key} contains a newline: check ${key} in your shell")
    return f'"${{{key}:-{value}}}"'


def write_env_file(path: Path, values: Mapping[str, str]) -> list[str]:
    """Rewrite the managed block of ``path`` with ``values`` (in place; appended when there is none; the
    file is created with mode 0600, it may hold passwords). Every line outside the block stays as it is.
    Returns the managed keys left out of the block because the user set them outside it."""
    old = path.read_text().splitlines() if path.exists() else []
    pinned = user_values(path)
    block = [BLOCK_BEGIN, *BLOCK_HELP]
    block += [f"{key}={_dotenv_value(key, values[key])}"
              for key in ENV_KEYS if key in values and key not in pinned]
    block.append(BLOCK_END)
    lines: list[str] = []
    placed = inside = False
    for line in old:
        if line.strip() == BLOCK_BEGIN:
            inside = True
            if not placed:
                lines += block
                placed = True
        elif inside:
            inside = line.strip() != BLOCK_END
        else:
            lines.append(line)
    if not placed:
        lines += ([""] if lines and lines[-1].strip() else []) + block
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)
    return sorted(pinned)


def resolve_env_values(root: Path = ROOT, python: Path = PYTHON, env: Mapping[str, str] | None = None,
                       pinned: Mapping[str, str] | None = None) -> dict[str, str]:
    """The values for .env: ``DAGSTER_HOME`` (``<root>/dagster_home``) and the servers the project resolves
    (``services.dagster_environment()``, run in the venv; it starts the embedded servers when nothing is
    configured). Values the user set in .env are passed in, so that resolution agrees with them: Dagster
    loads a plain ``KEY=value`` line of .env over the shell's variable."""
    child_env = dict(os.environ if env is None else env)
    for key, value in (pinned or {}).items():
        if key != "DAGSTER_HOME" and "${" not in value:
            child_env[key] = value
    result = subprocess.run([str(python), "-m", "durability_pipelines.services", "env"], cwd=root,
                            env=child_env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EnvFileError(
            f"could not resolve PostgreSQL and Redis for .env: {result.stderr.strip()[-2000:]}")
    values = {"DAGSTER_HOME": str((root / "dagster_home").resolve())}
    values.update(json.loads(result.stdout.strip().splitlines()[-1]))
    return values


def provision_starter_sources(root: Path, python: Path, values: Mapping[str, str],
                              pinned: Mapping[str, str] | None = None,
                              env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Create the starters' sources where missing (``python -m durability_pipelines.starter_sources`` in the
    venv, with the servers just resolved) and return what it needs in .env: the local DynamoDB endpoint it
    started and the credentials moto accepts (nothing when the endpoint is configured, or pinned in .env)."""
    child_env = dict(os.environ if env is None else env)
    child_env.update({k: v for k, v in values.items() if k != "DAGSTER_HOME"})
    for key, value in (pinned or {}).items():
        if key != "DAGSTER_HOME" and "${" not in value:
            child_env[key] = value
    result = subprocess.run([str(python), "-m", "durability_pipelines.starter_sources"], cwd=root,
                            env=child_env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EnvFileError(
            f"could not create the starters' sources: {result.stderr.strip()[-2000:]}\n"
            "To skip them: python3 dev.py setup --no-starter-sources (the starters' sensors then skip, "
            "naming what is missing)")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def setup_env_file(root: Path = ROOT, python: Path = PYTHON, *, starter_sources: bool = True) -> None:
    path = root / ENV_FILE_NAME
    pinned = user_values(path)
    values = resolve_env_values(root, python, pinned=pinned)
    if starter_sources:
        values.update(provision_starter_sources(root, python, values, pinned))
        _say("starters' sources ready: DynamoDB table `orders` (with its stream), public.orders with its "
             "change feed, realtime.send")
    kept = write_env_file(path, values)
    dagster_url = pinned.get("DAGSTER_POSTGRES_URL", "")
    if dagster_url and not dagster_url.startswith(("postgresql+psycopg2://", "${")):
        _say(f"warning: your DAGSTER_POSTGRES_URL in {path} must start with postgresql+psycopg2:// "
             "(see dagster_home/dagster.yaml): a bare postgresql:// URL leaves runs NOT_STARTED")
    written = [k for k in ENV_KEYS if k in values and k not in kept]
    _say(f"wrote {path}: {', '.join(written)}" + (f" (kept your own {', '.join(kept)})" if kept else ""))
    _say("start Dagster with: .venv/bin/dagster dev -w workspace.yaml")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command == "setup":
        unknown = [a for a in args if a != "--no-starter-sources"]
        if unknown:
            print(f"unknown option(s) for setup: {' '.join(unknown)}\n{__doc__}", file=sys.stderr)
            return 2
        ensure_venv()
        try:
            setup_env_file(starter_sources="--no-starter-sources" not in args)
        except EnvFileError as exc:
            _say(str(exc))
            return 1
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
