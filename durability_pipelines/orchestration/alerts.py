"""Being told when a consumer fails or falls behind: two sensors that POST to a webhook.

* ``consumer_run_failure_alert``: a run-failure sensor over this code location's jobs; for each failed
  run of a consumer job (tag ``durability/consumer``) it posts one message naming the consumer, the shard,
  the run and the error.
* ``consumer_lag_alert``: every ``DURABILITY_ALERT_LAG_INTERVAL_S`` (60 s) it measures each consumer's lag
  as its ``lag_within_objective`` check does (the oldest record not yet acked, per shard; no lease, no
  write) and posts when a consumer goes beyond its ``max_lag_s`` (or its lag cannot be measured), and
  again when it is back within it. Its cursor remembers which consumers are alerting: one message per
  change, not one per tick.

The target is ``DURABILITY_ALERT_WEBHOOK_URL`` (off when unset: both sensors skip, and they are stopped
by default). The body is Slack-compatible JSON, ``{"text": ...}``, plus the same facts as fields under
``"durability"`` for any other receiver (``DURABILITY_ALERT_WEBHOOK_FORMAT=slack`` sends ``text`` only).
A post that fails is not lost: the run-failure sensor's tick fails (Dagster evaluates that run again),
the lag sensor logs the error and keeps the consumer's old state in its cursor (posted at the next tick).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from dagster import (
    DefaultSensorStatus,
    Definitions,
    RunFailureSensorContext,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from durability_pipelines.checkpoints.errors import DurabilityError
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.lag import measure_lag
from durability_pipelines.orchestration.consumers import CONSUMER_TAG, SHARD_TAG
from durability_pipelines.orchestration.resources import DurabilityResource

WEBHOOK_ENV = "DURABILITY_ALERT_WEBHOOK_URL"
WEBHOOK_FORMAT_ENV = "DURABILITY_ALERT_WEBHOOK_FORMAT"
LAG_INTERVAL_ENV = "DURABILITY_ALERT_LAG_INTERVAL_S"
RUN_FAILURE_SENSOR = "consumer_run_failure_alert"
LAG_SENSOR = "consumer_lag_alert"
DEFAULT_LAG_INTERVAL_S = 60
#: The longest error text put in a message (a traceback's head is enough to recognise it).
MAX_ERROR_CHARS = 1500


class AlertDeliveryError(RuntimeError):
    """The webhook did not accept the alert (the tick fails and is evaluated again)."""


def webhook_url(env: Mapping[str, str] | None = None) -> str | None:
    return ((os.environ if env is None else env).get(WEBHOOK_ENV) or "").strip() or None


def _where(url: str) -> str:
    """The webhook's scheme and host only: a Slack webhook's path is its secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}/…"


def post_alert(url: str, text: str, fields: Mapping[str, Any], *, timeout_s: float = 10.0) -> None:
    """POST ``{"text": text, "durability": fields}`` as JSON (``{"text": text}`` in ``slack`` format)."""
    body: dict[str, Any] = {"text": text}
    if (os.environ.get(WEBHOOK_FORMAT_ENV) or "json").strip().lower() != "slack":
        body["durability"] = dict(fields)
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - operator's URL
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise AlertDeliveryError(f"the alert webhook {_where(url)} ({WEBHOOK_ENV}) did not accept the alert: "
                                 f"{type(exc).__name__}: {exc}") from None


def _status(url: str | None) -> DefaultSensorStatus:
    return DefaultSensorStatus.RUNNING if url else DefaultSensorStatus.STOPPED


def failure_alert(context: RunFailureSensorContext) -> tuple[str, dict[str, Any]] | None:
    """The message for a failed run of a consumer job (None for other jobs)."""
    run = context.dagster_run
    consumer = run.tags.get(CONSUMER_TAG)
    if not consumer:
        return None
    shard = run.tags.get(SHARD_TAG, "").partition(":")[2] or "-"
    errors = [e.event_specific_data.error.message.strip() for e in context.get_step_failure_events()
              if e.event_specific_data is not None and getattr(e.event_specific_data, "error", None)]
    error = "; ".join(errors) or (context.failure_event.message or "the run failed").strip()
    error = error[:MAX_ERROR_CHARS]
    text = (f":rotating_light: consumer {consumer} failed: run {run.run_id} ({run.job_name}, shard {shard}): "
            f"{error}. The sensor {consumer}_sensor re-dispatches the shard from its acked checkpoint; "
            "many failures in a row mean a persistent error (docs/operations.md).")
    return text, {"kind": "run_failure", "consumer": consumer, "shard": shard, "run_id": run.run_id,
                  "job": run.job_name, "error": error}


@run_failure_sensor(
    name=RUN_FAILURE_SENSOR,
    default_status=_status(webhook_url()),
    description=f"Posts each failed consumer run (consumer, shard, run, error) to ${WEBHOOK_ENV}.",
)
def consumer_run_failure_alert(context: RunFailureSensorContext) -> SkipReason | None:
    url = webhook_url()
    if url is None:
        return SkipReason(f"{WEBHOOK_ENV} is not set")
    alert = failure_alert(context)
    if alert is None:
        return SkipReason(f"run {context.dagster_run.run_id} is not a consumer run")
    post_alert(url, *alert)
    context.log.info(f"posted the failure of run {context.dagster_run.run_id} to {_where(url)}")
    return None


def lag_state(cfg: ConsumerConfig, durability: DurabilityResource) -> tuple[str, str, dict[str, Any]]:
    """``(state, description, fields)``: state ``ok``, ``late`` (a shard beyond ``max_lag_s``) or
    ``unknown`` (a shard whose lag cannot be measured), as the ``lag_within_objective`` check decides."""
    try:
        rt = durability.runtime(cfg, migrate_schema=False)
        try:
            lags = measure_lag(rt)
        finally:
            rt.close()
    except DurabilityError as exc:
        why = f"cannot measure the lag: {type(exc).__name__}: {exc}"
        return "unknown", why, {"max_lag_s": cfg.max_lag_s, "problem": why}
    late = sorted((x for x in lags if x.lag_s is not None and x.lag_s > cfg.max_lag_s), key=lambda x: -(x.lag_s or 0))
    unknown = [x for x in lags if x.lag_s is None]
    worst = max((x.lag_s for x in lags if x.lag_s is not None), default=0.0)
    fields = {"max_lag_s": cfg.max_lag_s, "lag_seconds": worst, "shards": len(lags), "shards_late": len(late),
              "shards_unknown": len(unknown)}
    in_bytes = [x.lag_bytes for x in lags if x.lag_bytes is not None]
    if in_bytes:  # a replication slot's source (ReportsBacklogBytes): the WAL behind, for the receiver
        fields["lag_bytes"] = max(in_bytes)
    if late:
        return "late", "; ".join(x.describe() for x in late[:5]), fields
    if unknown:
        return "unknown", "; ".join(x.describe() for x in unknown[:5]), fields
    return "ok", f"worst lag {worst:.1f} s", fields


def build_lag_alert_sensor(consumers: Sequence[ConsumerConfig]):
    url = webhook_url()
    try:
        interval = int(float(os.environ.get(LAG_INTERVAL_ENV) or DEFAULT_LAG_INTERVAL_S))
    except ValueError:
        interval = DEFAULT_LAG_INTERVAL_S
    by_name = {cfg.name: cfg for cfg in consumers}

    @sensor(
        name=LAG_SENSOR,
        minimum_interval_seconds=max(interval, 5),
        default_status=_status(url),
        description=f"Posts to ${WEBHOOK_ENV} when a consumer falls behind its lag objective (max_lag_s) "
                    "or its lag cannot be measured, and when it is back within it.",
    )
    def consumer_lag_alert(context: SensorEvaluationContext, durability: DurabilityResource) -> SkipReason:
        target = webhook_url()
        if target is None:
            return SkipReason(f"{WEBHOOK_ENV} is not set")
        alerting: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        posted: list[str] = []
        failed: list[str] = []
        for name, cfg in by_name.items():
            state, description, fields = lag_state(cfg, durability)
            before = alerting.get(name, "ok")
            if state == before:
                continue
            if state == "ok":
                text = (f":white_check_mark: consumer {name} is back within its lag objective of "
                        f"{cfg.max_lag_s:g} s ({description}).")
            elif state == "late":
                text = (f":warning: consumer {name} is behind its lag objective of {cfg.max_lag_s:g} s: "
                        f"{description}. Is {name}_sensor running, are its runs failing or queued (Runs, tag "
                        f"{CONSUMER_TAG}={name}), is an open dead letter stopping a shard? See docs/operations.md")
            else:
                text = f":warning: consumer {name}'s lag cannot be measured: {description}"
            try:
                post_alert(target, text, {"kind": f"lag_{state}", "consumer": name, "stream": cfg.stream,
                                          "description": description, **fields})
            except AlertDeliveryError as exc:
                # The cursor keeps this consumer's old state: the next tick posts it again.
                context.log.error(str(exc))
                failed.append(f"{name}: {exc}")
                continue
            posted.append(f"{name}: {before} -> {state}")
            if state == "ok":
                alerting.pop(name, None)
            else:
                alerting[name] = state
        context.update_cursor(json.dumps(alerting, sort_keys=True))
        summary = [f"posted {'; '.join(posted)}"] if posted else []
        summary += [f"NOT POSTED (retried next tick) {'; '.join(failed)}"] if failed else []
        return SkipReason(" | ".join(summary) or
                          f"no change ({len(alerting)} consumer(s) alerting: {', '.join(sorted(alerting)) or 'none'})")

    return consumer_lag_alert


def build_alert_defs(consumers: Sequence[ConsumerConfig]) -> Definitions:
    """The two alert sensors (merged into the code location's Definitions)."""
    return Definitions(sensors=[consumer_run_failure_alert, build_lag_alert_sensor(consumers)])
