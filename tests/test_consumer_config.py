"""Consumers are StreamConsumer component instances (``<name>/defs.yaml``): the starters load, bad files
name the file and the field, every bad file is reported at once, and nothing is silently ignored."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from durability_pipelines.checkpoints import ConfigError
from durability_pipelines.consumer.config import (
    COMPONENT_TYPE,
    CONSUMERS_DIR,
    load_consumer_config,
    load_consumer_configs,
    load_consumer_instances,
)

GOOD = """
name: t_worker
source: {kind: dynamodb, table: orders}
group: workers
consumer: consumer-a
"""


def instance(root: Path, folder: str, attributes: str, *, type_: str = COMPONENT_TYPE) -> Path:
    """``root/folder/defs.yaml`` with ``attributes`` (YAML text) under the component type."""
    path = root / folder / "defs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"type: {type_}\nattributes:\n" + textwrap.indent(attributes.strip() + "\n", "  "))
    return path


def test_every_starter_in_the_repo_validates() -> None:
    configs = load_consumer_configs(CONSUMERS_DIR)
    assert {c.name for c in configs} == {"orders_worker", "supabase_orders_worker", "orders_to_realtime"}
    assert all(p.name == "defs.yaml" and p.parent.name == c.name for p, c in load_consumer_instances(CONSUMERS_DIR))


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    instance(tmp_path, "a", GOOD)
    (cfg,) = load_consumer_configs(tmp_path)
    assert cfg.checkpoint.backend == "hybrid" and cfg.checkpoint.flush_every_n == 100
    assert cfg.source.trim_policy == "fail" and cfg.dead_letter.policy == "stop"
    assert cfg.handler == "durability_pipelines.sinks.postgres_events:handle"
    assert cfg.max_lag_s == 300 and cfg.max_events == 1000


@pytest.mark.parametrize(
    "text,field",
    [
        (GOOD.replace("group: workers", "group: 'a:b'"), "attributes.group"),
        (GOOD + "max_events: 0\n", "attributes.max_events"),
        (GOOD + "max_lag_s: 0\n", "attributes.max_lag_s"),
        (GOOD + "checkpoint: {backend: sqlite}\n", "attributes.checkpoint.backend"),
        (GOOD + "retry: {max_retries: -1}\n", "attributes.retry.max_retries"),
        (GOOD + "handler: not a path\n", "attributes.handler"),
        (GOOD + "unknown_field: 1\n", "attributes.unknown_field"),
        (GOOD.replace("kind: dynamodb", "kind: kafka"), "attributes.source"),
        (GOOD.replace("table: orders", "table: orders, trim_policy: drop"), "attributes.source.dynamodb.trim_policy"),
        (GOOD.replace("name: t_worker", "name: 'bad name'"), "attributes.name"),
    ],
)
def test_bad_file_names_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = instance(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as err:
        load_consumer_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_not_yaml_not_a_mapping_no_attributes_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "x" / "defs.yaml"
    path.parent.mkdir()
    path.write_text("attributes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_consumer_configs(tmp_path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_consumer_configs(tmp_path)
    path.write_text(f"type: {COMPONENT_TYPE}\n")
    with pytest.raises(ConfigError, match="'attributes' must be a mapping"):
        load_consumer_configs(tmp_path)
    path.write_text(GOOD)  # the attributes alone, without the component's type
    with pytest.raises(ConfigError, match=f"type: {COMPONENT_TYPE}"):
        load_consumer_configs(tmp_path)
    instance(tmp_path, "x", GOOD, type_="durability_pipelines.components.StreamConsumr")
    with pytest.raises(ConfigError, match="StreamConsumr"):
        load_consumer_configs(tmp_path)


def test_other_component_types_are_left_to_dg(tmp_path: Path) -> None:
    instance(tmp_path, "a", GOOD)
    instance(tmp_path, "other", "whatever: 1", type_="dagster.DefsFolderComponent")
    assert [c.name for c in load_consumer_configs(tmp_path)] == ["t_worker"]


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    instance(tmp_path, "a", GOOD)
    instance(tmp_path, "b", GOOD)
    with pytest.raises(ConfigError, match="already used"):
        load_consumer_configs(tmp_path)


def test_every_bad_file_is_reported_at_once(tmp_path: Path) -> None:
    first = instance(tmp_path, "one", GOOD.replace("t_worker", "one") + "max_events: many\n")
    second = instance(tmp_path, "two", GOOD.replace("t_worker", "two") + "retry: {max_retries: -1}\n")
    instance(tmp_path, "fine", GOOD)
    with pytest.raises(ConfigError) as err:
        load_consumer_configs(tmp_path)
    text = str(err.value)
    assert "2 problem(s)" in text
    # each error names its file and line (line 7: after type, attributes and the four lines of GOOD)
    assert f"{first}: invalid field(s):\n  {first}:7: attributes.max_events" in text
    assert f"{second}: invalid field(s):\n  {second}:7: attributes.retry.max_retries" in text


@pytest.mark.parametrize("name,hint", [("orders.yml", "orders/defs.yaml"), ("orders.yaml", "orders/defs.yaml"),
                                       ("sub/defs.yml", "sub/defs.yaml")])
def test_files_that_would_be_ignored_are_reported(tmp_path: Path, name: str, hint: str) -> None:
    instance(tmp_path, "a", GOOD)
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(GOOD)
    with pytest.raises(ConfigError) as err:
        load_consumer_configs(tmp_path)
    assert str(path) in str(err.value) and "not loaded" in str(err.value) and hint in str(err.value)


def test_a_missing_folder_is_an_error_not_zero_consumers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist.*DURABILITY_CONSUMERS_DIR"):
        load_consumer_configs(tmp_path / "nope")


def test_bad_file_fails_definition_loading(tmp_path: Path) -> None:
    from durability_pipelines.definitions import build_definitions

    path = instance(tmp_path, "broken", GOOD + "max_events: many\n")
    with pytest.raises(ConfigError, match=f"{path}(.|\n)*attributes.max_events"):
        build_definitions(tmp_path, strict=True)  # as under dg check defs


def test_a_bad_file_beside_good_ones_is_left_out_and_reported_by_its_own_failing_sensor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blast radius of one bad file (issue 21): outside validation the code location still loads, with every
    good consumer, the mirror and retention; the bad file gets a sensor, running by default, that fails each
    tick naming the file and the field. ``dg check defs`` (strict) still fails on it."""
    from dagster import DefaultSensorStatus, build_sensor_context

    from durability_pipelines.definitions import VALIDATION_ENV, build_definitions

    monkeypatch.delenv(VALIDATION_ENV, raising=False)
    instance(tmp_path, "good_worker", GOOD.replace("t_worker", "good_worker"))
    bad = instance(tmp_path, "typo_worker", GOOD.replace("t_worker", "typo_worker") + "max_evnts: 10\n")
    stray = tmp_path / "billing.yml"
    stray.write_text("attributes: {}\n")
    defs = build_definitions(tmp_path)
    assert defs.resolve_job_def("good_worker_job") is not None  # the good consumer runs on
    assert defs.resolve_job_def("checkpoint_mirror_job") is not None and defs.resolve_job_def("run_retention_job")
    jobs = {j.name for j in defs.get_repository_def().get_all_jobs()}
    assert "typo_worker_job" not in jobs
    sensors = {s.name: s for s in defs.get_repository_def().sensor_defs}
    assert {"good_worker_sensor", "broken_consumer_typo_worker", "broken_consumer_billing"} <= set(sensors)
    report = sensors["broken_consumer_typo_worker"]
    assert report.default_status == DefaultSensorStatus.RUNNING
    with pytest.raises(Exception) as err:  # a failed tick, every tick
        report.evaluate_tick(build_sensor_context())
    text = str(err.value)
    assert str(bad) in text and "attributes.max_evnts" in text and "dg check defs" in text
    assert "other consumers" in text

    monkeypatch.setenv(VALIDATION_ENV, "1")  # what dg check defs sets: the whole load fails, naming both files
    with pytest.raises(ConfigError, match="2 problem\\(s\\)") as strict:
        build_definitions(tmp_path)
    assert str(bad) in str(strict.value) and str(stray) in str(strict.value)


@pytest.mark.parametrize(
    "extra,message",
    [("checkpoint: {backend: memory}\n", "attributes.checkpoint.backend 'memory' is process-local"),
     ("handler: no_such_module.handlers:handle\n", "attributes.handler: .*cannot import module")],
)
def test_configs_that_cannot_work_under_dagster_fail_definition_loading(tmp_path: Path, extra: str,
                                                                        message: str) -> None:
    from durability_pipelines.definitions import build_definitions

    path = instance(tmp_path, "c", GOOD + extra)
    with pytest.raises(ConfigError, match=message) as err:
        build_definitions(tmp_path, strict=True)  # as under dg check defs
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- impossible values (issue 21, item 10)


def _attrs(**overrides: object) -> dict[str, object]:
    return {"name": "bounds", "source": {"kind": "dynamodb", "table": "orders"}, "group": "g", "consumer": "c",
            **overrides}


@pytest.mark.parametrize("overrides, field", [
    ({"lease_duration_s": 0.001}, "lease_duration_s"),
    ({"lease_duration_s": 1e300}, "lease_duration_s"),
    ({"lease_duration_s": float("inf")}, "lease_duration_s"),
    ({"lease_duration_s": 30, "batch_window_s": 10}, "lease_duration_s"),
    ({"retry": {"delay_s": 1e300}}, "retry.delay_s"),
    ({"retry": {"delay_s": float("inf")}}, "retry.delay_s"),
    ({"retry": {"max_retries": True}}, "retry.max_retries"),
    ({"checkpoint": {"flush_every_s": 1e300}}, "checkpoint.flush_every_s"),
    ({"checkpoint": {"flush_every_s": float("inf")}}, "checkpoint.flush_every_s"),
    ({"checkpoint": {"redis_ttl_s": 1e300}}, "checkpoint.redis_ttl_s"),
    ({"checkpoint": {"flush_every_n": True}}, "checkpoint.flush_every_n"),
    ({"max_events": True}, "max_events"),
    ({"max_batches_per_run": True}, "max_batches_per_run"),
    ({"max_lag_s": float("inf")}, "max_lag_s"),
])  # fmt: skip
def test_impossible_values_are_refused_naming_the_field(tmp_path, overrides: dict[str, object], field: str) -> None:
    from durability_pipelines.checkpoints.errors import ConfigError
    from durability_pipelines.consumer.config import load_consumer_config, write_consumer_instance

    path = write_consumer_instance(tmp_path, _attrs(**overrides))
    with pytest.raises(ConfigError, match=rf"attributes\.{field}:"):
        load_consumer_config(path)
