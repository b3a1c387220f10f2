"""A derived asset downstream of a consumer's sink, kept fresh by declarative automation.

``<consumer>/<consumer>_events_per_minute`` counts the ``stream_events`` rows of the consumer's stream per
minute and event name (``audit/rollup.py``). Its automation condition is ``eager()``: whenever the sink is
materialized (a draining run does so at least once a minute while it writes), the asset is requested
again, never twice at once (or ``on_cron`` with ``rebuild_every_minutes``); a per-consumer ``AutomationConditionSensorDefinition``, running by default,
evaluates it. The pattern is the one to copy for your own tables downstream of a stream (docs/assets.md).
"""

# No `from __future__ import annotations`: Dagster resolves asset parameter annotations at definition time.

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)

from durability_pipelines.audit.rollup import COLUMNS, rebuild, rollup_table
from durability_pipelines.audit.tables import markdown_preview
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.orchestration.resources import DurabilityResource

#: How often the consumer's automation sensor evaluates its rollup (Dagster's default is 30 s).
AUTOMATION_INTERVAL_S = 15


def rollup_asset_key(cfg: ConsumerConfig) -> AssetKey:
    return AssetKey([cfg.name, rollup_table(cfg.name)])


def automation_condition(cfg: ConsumerConfig) -> AutomationCondition:
    """``eager()``: whenever the sink is materialized; with ``rebuild_every_minutes``, ``on_cron``: once per
    period after the sink was materialized in it (fewer runs where each run's process costs the consumer)."""
    assert cfg.events_per_minute is not None
    cron = cfg.events_per_minute.cron()
    return AutomationCondition.eager() if cron is None else AutomationCondition.on_cron(cron)


def build_rollup_defs(cfg: ConsumerConfig, *, sink_key: AssetKey, group_name: str) -> Definitions:
    """The consumer's ``events_per_minute`` asset downstream of its sink ``sink_key`` (in ``group_name``, the
    sink's group), and the sensor that automates it; empty when not asked for. (``consumers.py`` passes both:
    this module does not import it, so that the factory can import this one.)"""
    if cfg.events_per_minute is None:
        return Definitions()
    window_s = cfg.events_per_minute.window_hours * 3600
    table = rollup_table(cfg.name)

    @asset(
        key=rollup_asset_key(cfg), deps=[sink_key], group_name=group_name,
        kinds={"pandas", "postgres"}, automation_condition=automation_condition(cfg),
        description=f"Events of {cfg.adapter} stream {cfg.stream} per minute and event name over the last "
                    f"{cfg.events_per_minute.window_hours:g} h, from the stream_events rows consumer {cfg.name} "
                    f"wrote (Postgres table {table}). Rebuilt whenever the sink is materialized"
                    + (f", at most every {cfg.events_per_minute.rebuild_every_minutes} min." if
                       cfg.events_per_minute.rebuild_every_minutes else "."),
        metadata={"table": table, "consumer": cfg.name,
                  "dagster/column_schema": TableSchema([TableColumn(c, t, description=d)
                                                        for c, (t, d) in COLUMNS.items()])},
    )
    def _events_per_minute(context: AssetExecutionContext, durability: DurabilityResource) -> MaterializeResult:
        result = rebuild(durability.postgres(), cfg.name, cfg.stream, window_s)
        context.log.info(f"{table}: {len(result.frame)} rows, {result.events} events in the window")
        return MaterializeResult(metadata={
            "dagster/row_count": len(result.frame),
            "events_in_window": result.events,
            "events_newest_minute": result.events_newest_minute,
            "newest_minute": result.newest_minute.isoformat() if result.newest_minute else "",
            "preview": MetadataValue.md(markdown_preview(result.frame.tail(20))),
        })

    sensor = AutomationConditionSensorDefinition(
        f"{cfg.name}_automation", target=AssetSelection.assets(rollup_asset_key(cfg)),
        default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=AUTOMATION_INTERVAL_S,
        description=f"Declarative automation of consumer {cfg.name}'s derived assets: each is materialized again "
                    "when its sink is",
    )
    return Definitions(assets=[_events_per_minute], sensors=[sensor])
