"""The code location loads through the StreamConsumer component: every definition, resource and starter
resolves; streams and sinks are in the asset graph; ``dg`` checks, lists and scaffolds consumers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dagster import AssetKey, Definitions

ROOT = Path(__file__).resolve().parent.parent


def test_definitions_load_with_every_job_sensor_asset_and_schedule() -> None:
    from durability_pipelines.definitions import defs

    assert isinstance(defs, Definitions)
    repo = defs.get_repository_def()
    jobs = {j.name for j in repo.get_all_jobs()}
    assert {"orders_worker_job", "checkpoint_mirror_job", "run_retention_job"} <= jobs
    assert {s.name for s in repo.sensor_defs} >= {"orders_worker_sensor"}
    assert {s.name for s in repo.schedule_defs} == {"checkpoint_mirror_schedule", "run_retention_schedule"}
    assert {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()} == {
        "checkpoint_mirror", "checkpoint_audit", "checkpoint_history_summary",
        "streams/dynamodb/orders", "streams/supabase/orders-changes",
        "orders_worker/orders_worker_stream_events", "orders_worker/orders_worker_events_per_minute",
        "supabase_orders_worker/supabase_orders_worker_stream_events",
        "orders_to_realtime/orders_to_realtime_realtime_orders"}
    # the graph labels a node with its key's last part: every consumer asset's label is its own
    mine = [k for k in repo.asset_graph.get_all_asset_keys() if k.path[0] in {"orders_worker",
            "supabase_orders_worker", "orders_to_realtime"}]
    assert len({k.path[-1] for k in mine}) == len(mine) == 4
    # the starter's derived table is rebuilt by declarative automation whenever its sink is materialized
    derived = repo.asset_graph.get(AssetKey(["orders_worker", "orders_worker_events_per_minute"]))
    assert derived.automation_condition is not None and derived.parent_keys == {
        AssetKey(["orders_worker", "orders_worker_stream_events"])}
    assert "orders_worker_automation" in {s.name for s in repo.sensor_defs}
    job = defs.resolve_job_def("orders_worker_job")
    assert [n.name for n in job.graph.node_defs] == ["drain_shard"]  # a run drains its shard, batch by batch


def test_consumers_are_stream_consumer_components_of_the_defs_folder() -> None:
    from durability_pipelines.components import StreamConsumer
    from durability_pipelines.definitions import component_tree, defs

    components = component_tree().get_all_components(of_type=StreamConsumer)
    assert {c.config.name for c in components} == {"orders_worker", "supabase_orders_worker", "orders_to_realtime"}
    assert defs.component_tree is not None
    assert "StreamConsumer" in str(defs.metadata["plugin_component_types_json"])  # the UI: Deployment > the code location > Components


def test_streams_are_external_assets_upstream_of_each_consumers_sink_and_its_lag_check() -> None:
    from dagster import AssetCheckKey, AssetKey

    from durability_pipelines.definitions import defs

    graph = defs.get_repository_def().asset_graph
    stream = graph.get(AssetKey(["streams", "dynamodb", "orders"]))
    assert not stream.is_materializable and stream.kinds == {"dynamodb"}
    assert "table 'orders'" in stream.description and "us-east-1" in stream.description
    feed = graph.get(AssetKey(["streams", "supabase", "orders-changes"]))
    assert feed.kinds == {"supabase"} and "public.orders" in feed.description
    sinks = {"orders_worker/orders_worker_stream_events": ("streams/dynamodb/orders", {"postgres"}),
             "orders_to_realtime/orders_to_realtime_realtime_orders": ("streams/dynamodb/orders", {"supabase"}),
             "supabase_orders_worker/supabase_orders_worker_stream_events": ("streams/supabase/orders-changes",
                                                                             {"postgres"})}
    for key, (upstream, kinds) in sinks.items():
        node = graph.get(AssetKey.from_user_string(key))
        assert {p.to_user_string() for p in node.parent_keys} == {upstream}
        assert node.kinds == kinds and key.split("/")[0] in node.description
        assert AssetCheckKey(node.key, "lag_within_objective") in graph.asset_check_keys
    # the lag checks run with every mirror run (every minute)
    mirror = defs.resolve_job_def("checkpoint_mirror_job")
    assert {k.name for k in mirror.asset_layer.asset_graph.asset_check_keys} >= {"lag_within_objective"}


def test_the_consumer_job_carries_its_config_and_the_shared_op_reads_it() -> None:
    from durability_pipelines.consumer.config import ConsumerConfig
    from durability_pipelines.definitions import defs
    from durability_pipelines.orchestration.consumers import CONFIG_METADATA

    job = defs.resolve_job_def("orders_to_realtime_job")
    cfg = ConsumerConfig.model_validate(job.metadata[CONFIG_METADATA].value)
    assert cfg.name == "orders_to_realtime" and cfg.max_events == 200


def test_every_job_runs_its_steps_in_one_process_and_consumers_go_first_in_the_queue() -> None:
    from durability_pipelines.definitions import defs

    consumer = defs.resolve_job_def("orders_worker_job")
    mirror = defs.resolve_job_def("checkpoint_mirror_job")
    retention = defs.resolve_job_def("run_retention_job")
    assert {job.executor_def.name for job in (consumer, mirror, retention)} == {"in_process"}
    assert int(consumer.tags["dagster/priority"]) > int(mirror.tags["dagster/priority"])
    assert mirror.tags["durability/role"] == retention.tags["durability/role"] == "maintenance"
    assert retention.tags["dagster/priority"] == mirror.tags["dagster/priority"]
    # dagster.yaml limits maintenance runs to one at a time
    import yaml

    config = yaml.safe_load((ROOT / "dagster_home" / "dagster.yaml").read_text())["run_coordinator"]["config"]
    assert {"key": "durability/role", "value": "maintenance", "limit": 1} in config["tag_concurrency_limits"]


def test_the_instance_purges_old_sensor_and_schedule_ticks(tmp_path: Path) -> None:
    # dagster.yaml's retention section, read by Dagster itself (on a sqlite instance in tmp_path).
    import yaml
    from dagster import DagsterInstance
    from dagster._core.definitions.run_request import InstigatorType

    retention = yaml.safe_load((ROOT / "dagster_home" / "dagster.yaml").read_text())["retention"]
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"retention": retention}))
    instance = DagsterInstance.from_config(str(tmp_path))
    try:
        sensor = {s.value: days for s, days in instance.get_tick_retention_settings(InstigatorType.SENSOR).items()}
        schedule = {s.value: days for s, days in
                    instance.get_tick_retention_settings(InstigatorType.SCHEDULE).items()}
    finally:
        instance.dispose()
    assert sensor == {"STARTED": -1, "SKIPPED": 1, "SUCCESS": 7, "FAILURE": 30}
    assert schedule == {"STARTED": -1, "SKIPPED": 7, "SUCCESS": 7, "FAILURE": 30}


def test_dagster_definitions_validate_passes_on_the_workspace_and_leaves_nothing_in_the_tree(
    tmp_path: Path,
) -> None:
    # Without DAGSTER_HOME, `validate` makes a .tmp_dagster_home_* folder in the working directory.
    before = set(ROOT.glob(".tmp_dagster_home_*"))
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},  # an empty home: a default instance in tmp_path
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Validation successful" in out.stdout + out.stderr
    assert set(ROOT.glob(".tmp_dagster_home_*")) == before


DG = Path(sys.executable).parent / "dg"


def _dg(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DG), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_dg_check_defs_passes_on_the_shipped_defs_and_dg_list_defs_lists_them() -> None:
    out = _dg(["check", "defs"], ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "All definitions loaded successfully" in out.stdout + out.stderr
    listed = _dg(["list", "defs", "--json"], ROOT)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "orders_worker_job" in listed.stdout and "orders_worker/orders_worker_stream_events" in listed.stdout


def test_dg_check_defs_names_every_broken_file_and_field_at_once(tmp_path: Path) -> None:
    import shutil

    consumers = tmp_path / "consumers"
    shutil.copytree(ROOT / "durability_pipelines" / "defs" / "consumers", consumers)
    typo = consumers / "orders_worker" / "defs.yaml"
    typo.write_text(typo.read_text().replace("  max_events: 1000", "  max_evnts: 1000"))
    wrong = consumers / "supabase_orders_worker" / "defs.yaml"
    wrong.write_text(wrong.read_text().replace("  sensor_interval_s: 4 ", "  sensor_interval_s: soon "))
    stray = consumers / "billing.yml"
    stray.write_text((consumers / "orders_to_realtime" / "defs.yaml").read_text())
    out = _dg(["check", "defs"], ROOT, DURABILITY_CONSUMERS_DIR=str(consumers))
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "3 problem(s)" in text, text[-3000:]
    assert (f"{typo}: invalid field(s):\n  {typo}:{_line(typo, 'max_evnts:')}: attributes.max_evnts: "
            "Extra inputs are not permitted") in text
    assert (f"{wrong}: invalid field(s):\n  {wrong}:{_line(wrong, 'sensor_interval_s:')}: "
            "attributes.sensor_interval_s: Input should be a valid integer") in text
    assert f"{stray}: not loaded" in text


def _line(path: Path, text: str) -> int:
    """The 1-based line of ``path`` holding ``text``."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_dg_check_defs_names_the_file_and_line_of_a_typo_in_the_project_defs_folder(tmp_path: Path) -> None:
    # A dg project like this one, its defs folder holding the starters, one with a misspelt attribute.
    # dg 1.13's YAML check validates one instance per component type (the last it finds), so the typo
    # may pass it ("All component YAML validated successfully."); loading the code location must fail
    # then, naming the file and the line.
    import shutil

    consumers = tmp_path / "durability_pipelines" / "defs" / "consumers"
    shutil.copytree(ROOT / "durability_pipelines" / "defs" / "consumers", consumers)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for name in ("orders_to_realtime", "orders_worker", "supabase_orders_worker"):
        typo = consumers / name / "defs.yaml"
        original = typo.read_text()
        typo.write_text(original.replace("  max_lag_s:", "  max_lag_sec:"))
        out = _dg(["check", "defs"], tmp_path, DURABILITY_CONSUMERS_DIR=str(consumers))
        text = out.stdout + out.stderr
        assert out.returncode != 0, text[-3000:]
        line = _line(typo, "max_lag_sec:")
        # the code location's check, or dg's own YAML check where it looked at this file
        assert (f"{typo}:{line}: attributes.max_lag_sec: Extra inputs are not permitted" in text
                or f"{typo}:{line} - durability_pipelines.components.StreamConsumer attributes.max_lag_sec" in text
                ), text[-3000:]
        typo.write_text(original)


def test_dg_scaffold_defs_gives_a_working_consumer_to_edit(tmp_path: Path) -> None:
    # A project skeleton with this pyproject: dg writes into its defs folder, not the repository's.
    (tmp_path / "durability_pipelines" / "defs").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    out = _dg(["scaffold", "defs", "durability_pipelines.components.StreamConsumer", "consumers/billing_worker"],
              tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from durability_pipelines.consumer.config import load_consumer_configs
    from durability_pipelines.definitions import build_definitions

    consumers = tmp_path / "durability_pipelines" / "defs" / "consumers"
    (cfg,) = load_consumer_configs(consumers)
    assert cfg.name == cfg.consumer == "billing_worker"  # its own checkpoint key, not the starter's
    assert build_definitions(consumers).resolve_job_def("billing_worker_job") is not None
