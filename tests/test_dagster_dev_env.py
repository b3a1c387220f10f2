"""`python3 dev.py setup` writes .env so that Dagster's own commands work in a clone without exports.

Everything happens in a temporary copy of the files Dagster reads (workspace.yaml, dagster_home/);
the repository's own .env is never touched.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
from dotenv import dotenv_values

import dev
from durability_pipelines import services
from durability_pipelines.processes import ProcessGroup
from durability_pipelines.services.local_dynamodb import stop_local_dynamodb
from tests.conftest import fresh_database
from tests.support.dagster_daemon import DagsterHome

REPO = Path(__file__).resolve().parent.parent
DAGSTER = Path(sys.executable).parent / "dagster"


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The files Dagster reads from a clone's root; the code itself is imported through PYTHONPATH."""
    root = tmp_path / "clone"
    (root / "dagster_home").mkdir(parents=True)
    shutil.copyfile(REPO / "workspace.yaml", root / "workspace.yaml")
    shutil.copyfile(REPO / "dagster_home" / "dagster.yaml", root / "dagster_home" / "dagster.yaml")
    return root


@pytest.fixture
def storage(tmp_path: Path, postgres_admin_url: str) -> Iterator[DagsterHome]:
    """A fresh Dagster storage database (and a DAGSTER_HOME with the repository's dagster.yaml)."""
    home = DagsterHome.create(tmp_path, postgres_admin_url, prefix="dp_dotenv")
    try:
        yield home
    finally:
        home.dispose()


def _bare_env(**extra: str) -> dict[str, str]:
    """This environment without any DAGSTER_* or DURABILITY_* variable: only .env may provide them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "DURABILITY_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


def _validate(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DAGSTER), "definitions", "validate", "-w", "workspace.yaml"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _has_dagster_tables(home: DagsterHome) -> bool:
    with psycopg.connect(services.libpq_url(home.storage_url)) as conn:
        return conn.execute("SELECT to_regclass('public.runs')").fetchone()[0] is not None


def test_setup_env_file_lets_dagster_validate_the_workspace_with_nothing_exported(
    clone: Path, storage: DagsterHome
) -> None:
    # What `dev.py setup` does, for the copy: resolve the servers (a fresh storage database), write .env.
    values = dev.resolve_env_values(clone, Path(sys.executable),
                                    env={**os.environ, "DAGSTER_POSTGRES_URL": storage.storage_url})
    assert values["DAGSTER_HOME"] == str((clone / "dagster_home").resolve())
    assert values["DAGSTER_POSTGRES_URL"] == storage.storage_url
    assert values["DAGSTER_POSTGRES_URL"].startswith("postgresql+psycopg2://")
    assert values["DURABILITY_POSTGRES_URL"] == services.resolve_postgres_url()
    assert values["DURABILITY_REDIS_URL"] == services.resolve_redis_url()
    env_file = clone / ".env"
    assert dev.write_env_file(env_file, values) == []
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it may hold passwords

    # DAGSTER_HOME pointing at a copy of dagster_home, and no DAGSTER_POSTGRES_URL anywhere but .env.
    out = _validate(clone, _bare_env(DAGSTER_HOME=str(storage.path)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "Validation successful" in log
    assert "Loaded environment variables from .env file: " in log and "DAGSTER_POSTGRES_URL" in log
    assert _has_dagster_tables(storage)  # the instance really opened the storage .env names

    # Nothing exported at all: DAGSTER_HOME comes from .env too, so no temporary instance is made.
    out = _validate(clone, _bare_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "temporary directory" not in out.stdout + out.stderr
    assert not list(clone.glob(".tmp_dagster_home_*"))


def test_without_dotenv_the_missing_variable_is_dagster_postgres_url_and_dagster_yaml_says_what_to_run(
    clone: Path,
) -> None:
    out = _validate(clone, _bare_env(DAGSTER_HOME=str(clone / "dagster_home")))
    assert out.returncode != 0
    assert 'environment variable "DAGSTER_POSTGRES_URL" which is not set' in out.stdout + out.stderr
    # Dagster builds the instance before it imports any project code: the fix is named where the
    # variable is read (and in docs/getting-started.md, which quotes this message).
    dagster_yaml = (REPO / "dagster_home" / "dagster.yaml").read_text()
    assert "python3 dev.py setup" in dagster_yaml and "which is not set" in dagster_yaml
    assert "which is not set" in (REPO / "docs" / "getting-started.md").read_text()


VALUES = {
    "DAGSTER_HOME": "/srv/clone/dagster_home",
    "DAGSTER_POSTGRES_URL": "postgresql+psycopg2://postgres@127.0.0.1:5432/dagster",
    "DURABILITY_POSTGRES_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
    "DURABILITY_REDIS_URL": "redis://127.0.0.1:6379/0",
}


def test_setup_refreshes_only_its_block_and_leaves_out_keys_the_user_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in VALUES:
        monkeypatch.delenv(key, raising=False)
    env_file = tmp_path / ".env"
    mine_before = "# my settings\nAWS_PROFILE=dev\nexport DURABILITY_REDIS_URL='redis://cache:6379/2'\n"
    env_file.write_text(mine_before)
    env_file.chmod(0o640)

    assert dev.write_env_file(env_file, VALUES) == ["DURABILITY_REDIS_URL"]
    text = env_file.read_text()
    assert text.startswith(mine_before)
    block = text[text.index(dev.BLOCK_BEGIN):]
    assert text.count(dev.BLOCK_BEGIN) == 1 and block.endswith(dev.BLOCK_END + "\n")
    assert "rewritten on every run" in block and "outside this block" in block  # the file says how it works
    assignments = [line.split("=", 1)[0] for line in block.splitlines() if "=" in line and line[0] != "#"]
    assert assignments == ["DAGSTER_HOME", "DAGSTER_POSTGRES_URL", "DURABILITY_POSTGRES_URL"]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640  # the user's mode is kept
    loaded = dotenv_values(env_file)
    assert loaded["DURABILITY_REDIS_URL"] == "redis://cache:6379/2"  # the user's value, untouched
    assert loaded["DAGSTER_POSTGRES_URL"] == VALUES["DAGSTER_POSTGRES_URL"]
    assert dev.user_values(env_file) == {"DURABILITY_REDIS_URL": "redis://cache:6379/2"}

    # The user adds a line after the block; the servers moved: the next setup refreshes the block in place.
    with env_file.open("a") as handle:
        handle.write("LATER=1\n")
    moved = {**VALUES, "DURABILITY_POSTGRES_URL": "postgresql://postgres@127.0.0.1:6543/postgres"}
    dev.write_env_file(env_file, moved)
    text = env_file.read_text()
    assert text.startswith(mine_before) and text.endswith(f"{dev.BLOCK_END}\nLATER=1\n")
    assert text.count(dev.BLOCK_BEGIN) == 1 and ":5432/postgres" not in text
    assert dotenv_values(env_file)["DURABILITY_POSTGRES_URL"] == moved["DURABILITY_POSTGRES_URL"]


def test_a_variable_exported_in_the_shell_wins_over_the_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / ".env"
    dev.write_env_file(env_file, VALUES)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", "postgresql+psycopg2://ops@db:5432/dagster")
    monkeypatch.delenv("DURABILITY_REDIS_URL", raising=False)
    loaded = dotenv_values(env_file)  # how Dagster reads it (dagster._core.secrets.env_file)
    assert loaded["DAGSTER_POSTGRES_URL"] == "postgresql+psycopg2://ops@db:5432/dagster"
    assert loaded["DURABILITY_REDIS_URL"] == VALUES["DURABILITY_REDIS_URL"]


def test_a_password_with_dotenv_syntax_survives_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DURABILITY_POSTGRES_URL", raising=False)
    password = 'p}a$s{w"o\\rd`'
    url = f"postgresql://app:{password}@db:5432/app"
    env_file = tmp_path / ".env"
    dev.write_env_file(env_file, {**VALUES, "DURABILITY_POSTGRES_URL": url})
    written = dotenv_values(env_file)["DURABILITY_POSTGRES_URL"]
    assert written is not None
    assert unquote(urlsplit(written).password or "") == password  # percent-encoded, decoded by every client
    assert urlsplit(written).hostname == "db"


# --------------------------------------------------------------------------- the starters under `dagster dev`

STARTER_SENSORS = ("orders_worker_sensor", "supabase_orders_worker_sensor", "orders_to_realtime_sensor")
TICKS_PER_SENSOR = 3


@pytest.fixture
def data_db(postgres_admin_url: str) -> Iterator[str]:
    """A database of its own for the starters' data (their names are fixed: `orders`, `consumer-a`)."""
    with fresh_database(postgres_admin_url, "dp_dotenv_data") as url:
        yield url


@pytest.fixture
def durability_home(tmp_path: Path) -> Iterator[Path]:
    """A $DURABILITY_HOME of its own: the local DynamoDB setup starts is this test's, and stopped after it."""
    home = tmp_path / "durability_home"
    yield home
    stop_local_dynamodb(home)


def _run_daemon_until_ticks(clone: Path, storage: DagsterHome, env: dict[str, str]) -> dict[str, list]:
    """`dagster-daemon run -w workspace.yaml` from the clone's root (so .env applies), until every starter
    sensor ticked TICKS_PER_SENSOR times; its finished ticks, newest first, by sensor."""
    from tests.support.dagster_daemon import sensor_ticks, wait_until

    daemon = ProcessGroup("dagster-daemon", [str(DAGSTER.parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                          env, clone / "daemon.log", cwd=clone).start()
    instance = storage.instance()

    def enough() -> dict[str, list] | None:
        ticks = {name: [t for t in sensor_ticks(instance, name) if t.status.value != "STARTED"]
                 for name in STARTER_SENSORS}
        return ticks if all(len(t) >= TICKS_PER_SENSOR for t in ticks.values()) else None

    try:
        return wait_until(
            enough, what=f"{TICKS_PER_SENSOR} ticks of every starter sensor", timeout=240, interval=2.0,
            diagnostics=lambda: daemon.log_tail(60))
    finally:
        assert daemon.stop() == []


def test_after_setup_every_starter_sensor_ticks_without_error(
    clone: Path, storage: DagsterHome, data_db: str, own_redis_url: str, durability_home: Path
) -> None:
    # `python3 dev.py setup` on the copy: the servers, then the starters' sources (a local moto server of
    # this test's own $DURABILITY_HOME), then .env. Nothing about AWS comes from this environment.
    shell = {k: v for k, v in _bare_env(DURABILITY_HOME=str(durability_home)).items() if not k.startswith("AWS_")}
    servers = {"DAGSTER_POSTGRES_URL": storage.storage_url, "DURABILITY_POSTGRES_URL": data_db,
               "DURABILITY_REDIS_URL": own_redis_url}
    resolved = dev.resolve_env_values(clone, Path(sys.executable), env={**shell, **servers})
    values = {**resolved, **dev.provision_starter_sources(clone, Path(sys.executable), resolved, env=shell)}
    endpoint = values["DURABILITY_DYNAMODB_ENDPOINT_URL"]
    assert endpoint.startswith("http://127.0.0.1:") and values["AWS_ACCESS_KEY_ID"]
    dev.write_env_file(clone / ".env", values)
    with psycopg.connect(data_db) as conn:  # what the Supabase and the broadcast starters read
        found = conn.execute("SELECT to_regclass('public.orders'), to_regclass('public.durability_change_log'), "
                             "to_regprocedure('realtime.send(jsonb,text,text,boolean)')").fetchone()
        assert found is not None and None not in found, found

    # Setup again: everything is reused (same endpoint, nothing recreated).
    again = dev.provision_starter_sources(clone, Path(sys.executable), resolved, env=shell)
    assert again["DURABILITY_DYNAMODB_ENDPOINT_URL"] == endpoint

    ticks = _run_daemon_until_ticks(clone, storage, shell)
    for name, seen in ticks.items():
        failed = [t for t in seen if t.status.value == "FAILURE"]
        assert not failed, f"{name}: {failed[0].error}"
        assert not [t for t in seen if "cannot be read" in (t.skip_reason or "")], (name, seen[0].skip_reason)
        assert any("caught up" in (t.skip_reason or "") for t in seen), (name, [t.skip_reason for t in seen])


def test_without_the_starters_sources_their_sensors_skip_naming_the_command(
    clone: Path, storage: DagsterHome, data_db: str, own_redis_url: str
) -> None:
    # `python3 dev.py setup --no-starter-sources`, no AWS credentials, no endpoint, no public.orders.
    shell = {k: v for k, v in _bare_env().items() if not k.startswith("AWS_")}
    shell["DURABILITY_DYNAMODB_ENDPOINT_URL"] = f"http://127.0.0.1:{services.free_port()}"  # nothing listens
    shell["AWS_EC2_METADATA_DISABLED"] = "true"  # boto3 must not look for an instance role off this machine
    values = dev.resolve_env_values(clone, Path(sys.executable), env={
        **shell, "DAGSTER_POSTGRES_URL": storage.storage_url, "DURABILITY_POSTGRES_URL": data_db,
        "DURABILITY_REDIS_URL": own_redis_url})
    dev.write_env_file(clone / ".env", values)

    ticks = _run_daemon_until_ticks(clone, storage, shell)
    for name, seen in ticks.items():
        assert [t.status.value for t in seen] == ["SKIPPED"] * len(seen), (name, [t.error for t in seen])
        reason = seen[0].skip_reason or ""
        assert "cannot be read" in reason and "python3 dev.py setup" in reason, reason
        assert "Traceback" not in reason and "\n" not in reason
