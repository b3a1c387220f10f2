"""Declarative consumer configs: adding a consumer is adding a folder with a ``defs.yaml``.

A consumer is an instance of the Dagster component ``durability_pipelines.components.StreamConsumer``
whose attributes are a ``ConsumerConfig`` (the one schema). The three starters (DynamoDB worker,
Supabase worker, DynamoDB -> Supabase Realtime) live in ``durability_pipelines/defs/consumers/``.
``load_consumer_instances`` validates every instance of a folder before anything is built, and reports
*all* the problems at once, each naming its file and field (plus files that would be silently
ignored: a ``*.yml``, a YAML file that is not a ``defs.yaml``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.checkpoints.factory import StoreConfig
from durability_pipelines.checkpoints.keys import validate_component

#: The shipped defs folder's consumers (the component instances of the starters).
CONSUMERS_DIR = Path(__file__).resolve().parent.parent / "defs" / "consumers"
#: Points the code location (and the CLI) at another folder of consumer instances.
CONSUMERS_DIR_ENV = "DURABILITY_CONSUMERS_DIR"
COMPONENT_TYPE = "durability_pipelines.components.StreamConsumer"
INSTANCE_FILE = "defs.yaml"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: The shortest lease a consumer may ask for: renewed every third of it, between batches.
MIN_LEASE_S = 10.0
_DOTTED = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DynamoDBSourceConfig(_Strict):
    kind: Literal["dynamodb"] = "dynamodb"
    table: str = Field(description="DynamoDB table whose stream is consumed; also the checkpoint key's stream")
    region: str = "us-east-1"
    endpoint_url: str | None = Field(
        default=None, description="Local emulator URL; DURABILITY_DYNAMODB_ENDPOINT_URL overrides it when set"
    )
    initial_position: Literal["TRIM_HORIZON", "LATEST"] = "TRIM_HORIZON"
    trim_policy: Literal["fail", "skip_to_trim_horizon"] = "fail"

    @property
    def adapter(self) -> str:
        return "dynamodb"

    @property
    def stream(self) -> str:
        return self.table


class KinesisSourceConfig(DynamoDBSourceConfig):
    """A table's changes read from its Kinesis Data Streams destination (``sources/kinesis.py``).

    A subclass of the DynamoDB source on purpose: the consumed thing is still the table (adapter ``dynamodb``,
    checkpoint key ``checkpoint:dynamodb:<table>:...``, the same stream asset), only the change stream differs.
    """

    kind: Literal["dynamodb_kinesis"] = "dynamodb_kinesis"  # type: ignore[assignment]
    stream_name: str = Field(
        min_length=1, max_length=128,
        description="The Kinesis data stream the table's Kinesis streaming destination writes to",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="Local emulator URL for Kinesis; DURABILITY_DYNAMODB_ENDPOINT_URL overrides it when set "
        "(moto serves DynamoDB and Kinesis on one port)",
    )


class SupabaseSourceConfig(_Strict):
    kind: Literal["supabase"] = "supabase"
    channel: str = Field(description="Logical channel name; the checkpoint key's stream")
    table: str = Field(description="Source table whose changes are captured (schema.table or table)")
    change_log: str = Field(default="durability_change_log", description="Change-log table filled by the trigger")
    # Where a consumer WITHOUT a checkpoint starts (with one, all three resume from it): 'stored' = nowhere,
    # fail loudly (a lost checkpoint is never papered over); 'earliest' = the oldest change still in the
    # log; 'latest' = after every change settled now. See consumer/adapters/supabase.py.
    replay_from: Literal["stored", "earliest", "latest"] = "stored"
    trim_policy: Literal["fail", "skip_to_trim_horizon"] = Field(
        default="fail", description="unread change-log rows removed by anything but the project's purge (a DELETE "
        "by age, a TRUNCATE): fail = stop and name the removed range; skip_to_trim_horizon = record the gap "
        "(stream_gaps) and go on")
    db_url_env: str = Field(
        default="DURABILITY_SUPABASE_DB_URL",
        description="Env var with the Postgres URL of the database holding the change log; "
        "DURABILITY_POSTGRES_URL (the project's Postgres) when unset",
    )
    install: bool = Field(
        default=False,
        description="Create the change log and the table's trigger when the source opens (needs DDL rights)",
    )

    @property
    def adapter(self) -> str:
        return "supabase"

    @property
    def stream(self) -> str:
        return self.channel


class SupabaseWalSourceConfig(_Strict):
    """Postgres changes read from the WAL through a logical replication slot (``sources/wal_changes.py``)."""

    kind: Literal["supabase_wal"] = "supabase_wal"
    channel: str = Field(description="Logical channel name; the checkpoint key's stream (adapter supabase)")
    tables: tuple[str, ...] = Field(min_length=1, description="Tables of the publication (schema.table or table)")
    publication: str | None = Field(
        default=None, description="Publication name; durability_<channel> when unset")
    slot: str | None = Field(
        default=None, description="Logical replication slot (one per consumer group); "
        "durability_<channel>_<group> when unset")
    replay_from: Literal["stored", "earliest", "latest"] = "stored"
    trim_policy: Literal["fail", "skip"] = Field(
        default="fail", description="a checkpoint behind the slot (the slot was dropped, recreated or invalidated): "
        "fail = stop and name the gap; skip = record the gap (audited) and go on from the slot")
    db_url_env: str = Field(
        default="DURABILITY_SUPABASE_DB_URL",
        description="Env var with the Postgres URL of the database to replicate from; "
        "DURABILITY_POSTGRES_URL (the project's Postgres) when unset",
    )
    install: bool = Field(
        default=False,
        description="Create the publication and the slot when the source opens (needs REPLICATION and ownership)",
    )
    max_retained_wal_mb: float = Field(
        default=1024.0, gt=0,
        description="The audit warns (status wal-retained, check wal_retained_within_bound) when the slot holds "
        "back more WAL than this; keep it well below the server's max_slot_wal_keep_size and free disk",
    )
    heartbeat_mb: float = Field(
        default=64.0, ge=0, le=1_000_000, allow_inf_nan=False,
        description="When the published tables are quiet while the server writes this much WAL past the "
        "checkpoint (other tables, other databases), the consumer acks the quiet stretch (an empty batch, "
        "checkpoint (current LSN, 0)) so that the slot releases that WAL; the sensor starts a run for it. "
        "0 = never (the slot then holds WAL until a change of its own tables is acked)",
    )

    @property
    def max_retained_bytes(self) -> int:
        """``max_retained_wal_mb`` in bytes (``BoundsRetainedLog``)."""
        return int(self.max_retained_wal_mb * 1024 * 1024)

    @field_validator("tables", mode="before")
    @classmethod
    def _tables(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("publication", "slot")
    @classmethod
    def _pg_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9_]{1,63}", v):
            raise ValueError("must be 1-63 lower-case letters, digits and underscores")
        return v

    @property
    def publication_name(self) -> str:
        return self.publication or re.sub(r"[^a-z0-9_]", "_", f"durability_{self.channel}".lower())[:63]

    def slot_name(self, group: str) -> str:
        return self.slot or re.sub(r"[^a-z0-9_]", "_", f"durability_{self.channel}_{group}".lower())[:63]

    @property
    def table(self) -> str:
        """The tables, for descriptions shared with the trigger feed's (the stream asset's)."""
        return ", ".join(self.tables)

    @property
    def change_log(self) -> str:
        """Where the changes are captured, for descriptions shared with the trigger feed's."""
        return f"the WAL (publication {self.publication_name})"

    @property
    def adapter(self) -> str:
        return "supabase"

    @property
    def stream(self) -> str:
        return self.channel


SourceConfig = Annotated[DynamoDBSourceConfig | KinesisSourceConfig | SupabaseSourceConfig | SupabaseWalSourceConfig,
                         Field(discriminator="kind")]


#: Event names each source emits (``ChangeEvent.event_name``), for ``filter.event_names``.
EVENT_NAMES: dict[str, tuple[str, ...]] = {
    "dynamodb": ("INSERT", "MODIFY", "REMOVE"),
    # UNDECODABLE: a record of the Kinesis stream that is not a change of the destination's format
    "dynamodb_kinesis": ("INSERT", "MODIFY", "REMOVE", "UNDECODABLE"),
    "supabase": ("INSERT", "UPDATE", "DELETE"),
    "supabase_wal": ("INSERT", "UPDATE", "DELETE"),
}
FilterScalar = str | int | float | bool | None


def _match_values(value: Any) -> tuple[FilterScalar, ...]:
    """A scalar or a list of scalars (any of) -> a tuple; anything else names what is supported."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise ValueError("an empty list matches nothing: give at least one value, or remove the attribute")
    for v in values:
        if v is not None and not isinstance(v, str | int | float | bool):
            raise ValueError(
                f"{v!r} is not a plain value: a filter compares a top-level attribute for equality with a "
                "string, number, boolean or null (or a list of them, meaning any of); Lambda's operators "
                "(prefix, suffix, numeric, exists, anything-but, ...) and nested attributes are not supported"
            )
    return tuple(values)


MatchValues = Annotated[tuple[FilterScalar, ...], BeforeValidator(_match_values)]
AttributeName = Annotated[str, Field(min_length=1)]


class EventFilterConfig(_Strict):
    """Which events reach the handler: an event passes when it matches every part given (an absent part
    matches everything). The others are acked without a handler call (``consumer/filters.py``)."""

    event_names: tuple[str, ...] | None = Field(
        default=None, min_length=1,
        description="INSERT | MODIFY | REMOVE (dynamodb) or INSERT | UPDATE | DELETE (supabase); any of",
    )
    keys: dict[AttributeName, MatchValues] = Field(
        default_factory=dict, description="key attribute -> value or list of values (any of)",
    )
    new_image: dict[AttributeName, MatchValues] = Field(
        default_factory=dict, description="new-image attribute -> value or list of values (any of)",
    )

    @field_validator("event_names", mode="before")
    @classmethod
    def _event_names_list(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, list | tuple):
            raise ValueError(f"must be a list of event names, e.g. [INSERT, MODIFY], not {v!r}")
        return v

    @field_validator("event_names")
    @classmethod
    def _event_names(cls, v: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        """Checked against the source's kind (passed as validation context by ``ConsumerConfig``)."""
        kind = (info.context or {}).get("source_kind")
        allowed = EVENT_NAMES[kind] if kind in EVENT_NAMES else tuple(
            dict.fromkeys(n for names in EVENT_NAMES.values() for n in names))
        bad = [n for n in v or () if n not in allowed]
        if bad:
            source = f"source.kind {kind}" if kind in EVENT_NAMES else "any source"
            raise ValueError(
                f"{', '.join(map(repr, bad))}: not {'an event name' if len(bad) == 1 else 'event names'} of "
                f"{source}; use {', '.join(allowed[:-1])} or {allowed[-1]} (upper case)"
            )
        return v


class RetryConfig(_Strict):
    max_retries: int = Field(default=3, ge=0, le=100, strict=True,
                             description="op retries before the batch is dead-lettered")
    delay_s: float = Field(default=1.0, ge=0, le=3600, allow_inf_nan=False,
                           description="first retry delay; doubles each retry, with jitter (at most an hour)")


class DeadLetterConfig(_Strict):
    policy: Literal["stop", "bisect"] = Field(
        default="stop",
        description="stop: the shard stops advancing until an operator acts; "
        "bisect: split the batch to isolate poison records, dead-letter only those and go on",
    )


#: A run that writes materializes its sink at least this often (``orchestration/consumers.SinkReporter``).
SINK_MATERIALIZE_EVERY_S = 60.0


class FreshnessConfig(_Strict):
    """The sink's Dagster ``FreshnessPolicy`` (a time window over its materializations)."""

    enabled: bool = Field(default=True, strict=True)
    fail_after_s: float | None = Field(
        default=None, ge=60, le=366 * 86400, allow_inf_nan=False,
        description="the sink fails its freshness policy when it has not been materialized for this long; "
        "default: max_lag_s + 60 (a run that writes materializes the sink at least once a minute). At least 60 "
        "(Dagster's bound). A quiet stream writes nothing and fails it too: enable freshness on streams with "
        "steady traffic",
    )
    warn_after_s: float | None = Field(
        default=None, ge=60, le=366 * 86400, allow_inf_nan=False,
        description="warn this long after the last materialization (below fail_after_s); default: no warning",
    )

    def windows(self, max_lag_s: float) -> tuple[float, float | None]:
        """(fail, warn) in seconds: fail defaults to max_lag_s plus the minute within which a writing run
        materializes its sink (``SINK_MATERIALIZE_EVERY_S``)."""
        fail = self.fail_after_s if self.fail_after_s is not None else max(60.0, max_lag_s + SINK_MATERIALIZE_EVERY_S)
        return fail, self.warn_after_s


class EventsPerMinuteConfig(_Strict):
    """A downstream asset ``<name>/<name>_events_per_minute``: the ``stream_events`` rows of the consumer's
    stream counted per minute and event name, rebuilt by declarative automation as batches land."""

    window_hours: float = Field(
        default=24.0, gt=0, le=24 * 366, allow_inf_nan=False,
        description="the table covers this many hours back from now; each materialization rebuilds them",
    )
    rebuild_every_minutes: int = Field(
        default=0, ge=0, le=60,
        description="0: rebuild whenever the sink is materialized (AutomationCondition.eager(), about one run a "
        "minute while the stream is written); N (a divisor of 60): at most once every N minutes, once the sink "
        "has been materialized since (AutomationCondition.on_cron). Each rebuild is a run: a process of its own",
    )

    @field_validator("rebuild_every_minutes")
    @classmethod
    def _divides_the_hour(cls, value: int) -> int:
        if value and 60 % value:
            raise ValueError(f"rebuild_every_minutes must be 0 or a divisor of 60 (1, 2, 3, 4, 5, 6, 10, 12, 15, "
                             f"20, 30, 60), got {value}: a cron step that does not divide the hour is uneven")
        return value

    def cron(self) -> str | None:
        """The rebuild schedule as cron, or None for "whenever the sink is materialized"."""
        if not self.rebuild_every_minutes:
            return None
        return "0 * * * *" if self.rebuild_every_minutes == 60 else f"*/{self.rebuild_every_minutes} * * * *"


class ConsumerConfig(_Strict):
    name: str = Field(description="Unique name; the Dagster job is <name>_job and the sensor <name>_sensor")
    description: str = ""
    source: SourceConfig
    group: str
    consumer: str
    handler: str = Field(
        default="durability_pipelines.sinks.postgres_events:handle",
        description="Dotted path 'package.module:function' of the batch handler",
    )
    handler_options: dict[str, Any] = Field(default_factory=dict)
    filter: EventFilterConfig | None = Field(
        default=None,
        description="only matching events reach the handler; the others are acked and counted "
        "(Lambda's filter criteria, exact matches only: see docs/configuration.md)",
    )
    checkpoint: StoreConfig = Field(default_factory=StoreConfig)
    max_events: int = Field(
        default=1000, ge=1, le=10_000, strict=True,
        description="events per batch (Lambda's BatchSize); above 1,000 a batch takes several GetRecords calls",
    )
    batch_window_s: float = Field(
        default=0.0, ge=0, le=300, allow_inf_nan=False,
        description="wait up to this long to fill a batch when the stream is quiet (Lambda's "
        "MaximumBatchingWindowInSeconds); 0 = hand over what one read returns",
    )
    max_batches_per_run: int = Field(
        default=1_000_000, ge=1, le=10_000_000, strict=True,
        description="a run drains at most this many batches, then hands its shard over (a bound for tests and "
        "for handlers that leak; max_run_seconds is the budget that matters)",
    )
    max_run_seconds: float = Field(
        default=600.0, gt=0, le=3600, allow_inf_nan=False,
        description="a run's budget: the sensor starts its successor successor_lead_s before it ends, and the run "
        "hands its shard over to it after the batch in hand (docs/performance.md says why 10 minutes)",
    )
    max_idle_s: float = Field(
        default=5.0, ge=0, le=600, allow_inf_nan=False,
        description="a caught-up run keeps polling this long for new records before it ends; 0 = end at once",
    )
    max_shards_per_run: int = Field(
        default=32, ge=1, le=1024, strict=True,
        description="a run owns up to this many shards and drains each on its own thread, as a KCL worker owns "
        "several leases: the cost grows with the work, not with the number of shards (docs/scaling.md)",
    )
    retry: RetryConfig = Field(default_factory=RetryConfig)
    dead_letter: DeadLetterConfig = Field(default_factory=DeadLetterConfig)
    sensor_interval_s: int = Field(
        default=4, ge=1, le=3600, strict=True,
        description="the sensor's minimum interval. The sensor daemon wakes every 5 s: below 5 every wake-up "
        "ticks (a steady 5 s); exactly 5 or 10 alternates between two cadences (5/10 s, 10/15 s)",
    )
    sensor_running_by_default: bool = True
    lease_duration_s: float = Field(
        default=120, ge=MIN_LEASE_S, le=86400, allow_inf_nan=False,
        description="the shard lease; a run renews it every third of it. A run that stops renewing it (its "
        "process or node died) is declared dead by the sensor about one lease later, and the shard re-dispatched",
    )

    max_lag_s: float = Field(
        default=300.0, gt=0, le=30 * 86400, allow_inf_nan=False,
        description="the lag objective: the sink's check lag_within_objective fails while a shard's oldest "
        "unprocessed record is older than this (seconds)",
    )
    freshness: FreshnessConfig | None = Field(
        default=None,
        description="give the sink a Dagster FreshnessPolicy derived from max_lag_s (dagster.yaml enables the "
        "freshness daemon); off by default, because a quiet stream materializes nothing and would fail it",
    )
    events_per_minute: EventsPerMinuteConfig | None = Field(
        default=None,
        description="add a downstream asset counting the sink's stream_events rows per minute, materialized by "
        "declarative automation when the sink is (the handler must write stream_events, as the default does)",
    )
    successor_lead_s: float = Field(
        default=30.0, ge=0, le=3600, allow_inf_nan=False,
        description="graceful hand-off: the sensor starts a shard's next run this long before the current "
        "run's max_run_seconds, so that it has started and opened its clients when it asks for the shard "
        "(run start + one sensor interval; more on a run launcher that starts pods or containers)",
    )
    handoff_timeout_s: float = Field(
        default=60.0, ge=1, le=3600, allow_inf_nan=False,
        description="graceful hand-off: a run past its budget reads on this long while it waits for its "
        "successor to ask for the shard; a successor waits this long for a live owner to hand over",
    )
    keep_owned: bool = Field(
        default=False, strict=True,
        description="never end a run because its stream is quiet (max_idle_s is ignored): every shard is "
        "always owned by a run, handed from run to run, so the first event after a quiet period is read within "
        "a poll interval; costs one run process per shard at all times",
    )

    @model_validator(mode="after")
    def _freshness(self) -> ConsumerConfig:
        if self.freshness is not None and self.freshness.warn_after_s is not None:
            fail, warn = self.freshness.windows(self.max_lag_s)
            if warn is not None and warn >= fail:
                raise ValueError(f"freshness.warn_after_s ({warn:g} s) must be below the fail window ({fail:g} s: "
                                 "freshness.fail_after_s, or max_lag_s + 60 when unset)")
        return self

    @field_validator("lease_duration_s")
    @classmethod
    def _lease(cls, v: float, info: ValidationInfo) -> float:
        """The lease is renewed between batches, every third of it: a batch (its batching window included) must
        fit comfortably in that third, or every save is fenced out as the lease runs out under it."""
        window = info.data.get("batch_window_s") or 0.0
        if v < 3 * window + MIN_LEASE_S:
            raise ValueError(
                f"{v:g} s is too short for batch_window_s {window:g} s: a run renews the lease every third of it, "
                f"between batches, so it must be at least 3 x batch_window_s + {MIN_LEASE_S:g} s "
                f"({3 * window + MIN_LEASE_S:g} s) and comfortably longer than the slowest batch (handler included)")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be a Python identifier (letters, digits, underscores)")
        return v

    @field_validator("group", "consumer")
    @classmethod
    def _key_part(cls, v: str, info: Any) -> str:
        try:
            return validate_component(info.field_name, v)
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("filter", mode="wrap")
    @classmethod
    def _filter(cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """Event names depend on the source (validated before this field): its errors keep their
        field path (``filter.event_names``) so that the loader names them."""
        source = info.data.get("source")
        if v is None or source is None:
            return handler(v)
        if isinstance(v, EventFilterConfig):
            v = v.model_dump()
        return EventFilterConfig.model_validate(v, context={"source_kind": source.kind})

    @field_validator("handler")
    @classmethod
    def _handler(cls, v: str) -> str:
        if not _DOTTED.match(v):
            raise ValueError("must be a dotted path like 'package.module:function'")
        return v

    @property
    def adapter(self) -> str:
        return self.source.adapter

    @property
    def stream(self) -> str:
        return self.source.stream


def config_error(path: Path | None, message: str) -> ConfigError:
    return ConfigError(f"consumer config {path or '(no file)'}: {message}")


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of ``attributes.<loc>`` in the composed document: the key of the deepest part of
    ``loc`` that the file has (a missing field: its mapping's; a union's tag in ``loc``: skipped)."""
    if not isinstance(root, yaml.MappingNode):
        return None
    node: yaml.Node = root
    line = None
    for part in ("attributes", *loc):
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)),
                         None)
            if found is not None:
                line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
    return line


def _format_validation_error(path: Path, exc: ValidationError, document: yaml.Node | None = None) -> str:
    """One line per error, ``<file>:<line>: attributes.<field>: <message>`` (the form editors open)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        line = _line_of(document, tuple(err["loc"]))
        where = f"{path}:{line}: " if line else ""
        lines.append(f"  {where}attributes.{loc}: {err['msg']}")
    return f"consumer config {path}: invalid field(s):\n" + "\n".join(lines)


def load_consumer_config(path: Path) -> ConsumerConfig:
    """One ``defs.yaml`` (``type: durability_pipelines.components.StreamConsumer`` + ``attributes``)."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise config_error(path, f"not valid YAML: {exc}") from None
    except OSError as exc:
        raise config_error(path, f"cannot read it: {exc}") from None
    if not isinstance(raw, dict) or set(raw) - {"type", "attributes", "requirements", "post_processing"}:
        raise config_error(path, "expected a component instance: a mapping with 'type' and 'attributes' "
                                 f"(type: {COMPONENT_TYPE})")
    if raw.get("type") != COMPONENT_TYPE:
        raise config_error(path, f"type is {raw.get('type')!r}; a consumer is type: {COMPONENT_TYPE}")
    if not isinstance(raw.get("attributes"), dict):
        raise config_error(path, "'attributes' must be a mapping of the consumer's fields (name, source, group, ...)")
    try:
        return ConsumerConfig.model_validate(raw["attributes"])
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc, yaml.compose(text, Loader=yaml.SafeLoader))) from None


def instance_document(attributes: dict[str, Any]) -> dict[str, Any]:
    """A consumer's ``defs.yaml`` document: the component type and its attributes."""
    return {"type": COMPONENT_TYPE, "attributes": attributes}


def write_consumer_instance(directory: Path, attributes: dict[str, Any]) -> Path:
    """Write ``<directory>/<name>/defs.yaml`` for a consumer (tests, benchmarks, scripted set-ups)."""
    path = directory / str(attributes["name"]) / INSTANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(instance_document(attributes), sort_keys=False), encoding="utf-8")
    return path


def consumer_files(directory: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(the ``defs.yaml`` files of consumer instances under ``directory``, (file, problem) for other files)."""
    instances: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".yml"):
            continue
        if path.name == INSTANCE_FILE:
            instances.append(path)
        elif path.suffix == ".yml":
            problems.append((path, f"consumer config {path}: not loaded: a consumer is a folder with a file named "
                                   f"exactly {INSTANCE_FILE} (rename it to {path.parent / path.stem / INSTANCE_FILE}, "
                                   f"or to {path.with_name(INSTANCE_FILE)} if the folder is the consumer's)"))
        else:
            problems.append((path, f"consumer config {path}: not loaded: a consumer is a folder with a "
                                   f"{INSTANCE_FILE} (move it to {path.parent / path.stem / INSTANCE_FILE})"))
    return instances, problems


def _other_component(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError):
        return False
    kind = raw.get("type") if isinstance(raw, dict) else None
    # A type of this package that is not the consumer's is a typo of it, not another component.
    return isinstance(kind, str) and not kind.startswith("durability_pipelines") and "StreamConsumer" not in kind


def configured_consumers_dir() -> Path:
    """``$DURABILITY_CONSUMERS_DIR`` when set, else the shipped consumers."""
    env = os.environ.get(CONSUMERS_DIR_ENV)
    return Path(env) if env else CONSUMERS_DIR


def load_consumer_instances(directory: Path | None = None, *, require_dir: bool = True,
                            check: Callable[[ConsumerConfig, Path], None] | None = None,
                            ) -> list[tuple[Path, ConsumerConfig]]:
    """Every consumer instance under ``directory``, validated (and passed to ``check``, which raises
    ``ConfigError`` for a config its caller cannot run); names unique. Every problem of every file is
    collected and raised at once (``ConfigError``), so that one bad file never hides the next."""
    directory = directory or CONSUMERS_DIR
    if not directory.is_dir():
        if not require_dir:
            return []
        raise ConfigError(
            f"consumer folder {directory} does not exist (DURABILITY_CONSUMERS_DIR?). Point it at a folder of "
            f"consumers (one sub-folder per consumer, each with a {INSTANCE_FILE}), or unset it to use the shipped "
            "ones.")
    loaded, broken = scan_consumer_instances(directory, check=check)
    if broken:
        raise ConfigError(f"{len(broken)} problem(s) in the consumer configs under {directory}:\n"
                          + "\n".join(b.message for b in broken))
    return loaded


@dataclass(frozen=True)
class BrokenConsumer:
    """A file under the consumers folder that is not a runnable consumer, and why (the message names it)."""

    path: Path
    message: str


def scan_consumer_instances(directory: Path, *, check: Callable[[ConsumerConfig, Path], None] | None = None,
                            ) -> tuple[list[tuple[Path, ConsumerConfig]], list[BrokenConsumer]]:
    """The runnable consumer instances under ``directory`` and the files that are not (every problem of every
    file: one bad file never hides the next, and never stops the good ones from being listed)."""
    paths, stray = consumer_files(directory)
    broken = [BrokenConsumer(path, message) for path, message in stray]
    loaded: list[tuple[Path, ConsumerConfig]] = []
    seen: dict[str, Path] = {}
    for path in paths:
        if _other_component(path):
            continue  # another component type's instance: dg loads and checks it
        try:
            cfg = load_consumer_config(path)
            if check is not None:
                check(cfg, path)
        except ConfigError as exc:
            broken.append(BrokenConsumer(path, str(exc)))
            continue
        if cfg.name in seen:
            broken.append(BrokenConsumer(path, f"consumer config {path}: name {cfg.name!r} is already used by "
                                               f"{seen[cfg.name]}"))
            continue
        seen[cfg.name] = path
        loaded.append((path, cfg))
    return loaded, broken


def load_consumer_configs(directory: Path | None = None) -> list[ConsumerConfig]:
    return [cfg for _, cfg in load_consumer_instances(directory)]
