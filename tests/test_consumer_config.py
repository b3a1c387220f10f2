"""Declarative consumer configs: the starters load, bad files name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from durability_pipelines.checkpoints import ConfigError
from durability_pipelines.consumer.config import CONSUMERS_DIR, load_consumer_config, load_consumer_configs

GOOD = """
name: t_worker
source: {kind: dynamodb, table: orders}
group: workers
consumer: consumer-a
"""


def test_every_starter_in_the_repo_validates() -> None:
    configs = load_consumer_configs(CONSUMERS_DIR)
    assert configs and len({c.name for c in configs}) == len(configs)
    assert any(c.adapter == "dynamodb" for c in configs)


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (cfg,) = load_consumer_configs(tmp_path)
    assert cfg.checkpoint.backend == "hybrid" and cfg.checkpoint.flush_every_n == 100
    assert cfg.source.trim_policy == "fail" and cfg.dead_letter.policy == "stop"
    assert cfg.handler == "durability_pipelines.sinks.postgres_events:handle"


@pytest.mark.parametrize(
    "text,field",
    [
        (GOOD.replace("group: workers", "group: 'a:b'"), "group"),
        (GOOD + "max_events: 0\n", "max_events"),
        (GOOD + "checkpoint: {backend: sqlite}\n", "checkpoint.backend"),
        (GOOD + "retry: {max_retries: -1}\n", "retry.max_retries"),
        (GOOD + "handler: not a path\n", "handler"),
        (GOOD + "unknown_field: 1\n", "unknown_field"),
        (GOOD.replace("kind: dynamodb", "kind: kafka"), "source"),
        (GOOD.replace("table: orders", "table: orders, trim_policy: drop"), "source.dynamodb.trim_policy"),
        (GOOD.replace("name: t_worker", "name: 'bad name'"), "name"),
    ],
)
def test_bad_file_names_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_consumer_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_consumer_configs(tmp_path)
    (tmp_path / "x.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_consumer_configs(tmp_path)


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    with pytest.raises(ConfigError, match="already used"):
        load_consumer_configs(tmp_path)


def test_bad_file_fails_definition_loading(tmp_path: Path) -> None:
    from durability_pipelines.definitions import build_definitions

    (tmp_path / "broken.yaml").write_text(GOOD + "max_events: many\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        build_definitions(tmp_path)


@pytest.mark.parametrize(
    "extra,message",
    [("checkpoint: {backend: memory}\n", "process-local"),
     ("handler: no_such_module.handlers:handle\n", "cannot import module")],
)
def test_configs_that_cannot_work_under_dagster_fail_definition_loading(tmp_path: Path, extra: str,
                                                                        message: str) -> None:
    from durability_pipelines.definitions import build_definitions

    (tmp_path / "c.yaml").write_text(GOOD + extra)
    with pytest.raises(ConfigError, match=message):
        build_definitions(tmp_path)
