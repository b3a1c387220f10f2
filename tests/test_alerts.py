"""Alerts: a failed consumer run and a missed lag objective are posted to the webhook of
``DURABILITY_ALERT_WEBHOOK_URL`` (a local HTTP server here), through the real Dagster path: the consumer's
sensor and job executed in-process on a real instance, the alert sensors evaluated with Dagster's
public context builders (no daemon)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
from dagster import Definitions, build_run_status_sensor_context, build_sensor_context, job, op

from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handlers import HandlerContext
from durability_pipelines.orchestration.alerts import (
    LAG_SENSOR,
    RUN_FAILURE_SENSOR,
    WEBHOOK_ENV,
    build_alert_defs,
)
from durability_pipelines.orchestration.consumers import build_consumer_defs
from durability_pipelines.orchestration.resources import DurabilityResource
from tests.support.inprocess import Driver


@op
def fails() -> None:
    raise RuntimeError("not a consumer")


@job
def not_a_consumer_job() -> None:
    fails()


def always_fails(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    raise RuntimeError(f"sink rejected {len(events)} events: disk full")


class Webhook:
    """A local HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Webhook]:
    hook = Webhook()
    monkeypatch.setenv(WEBHOOK_ENV, hook.url)
    try:
        yield hook
    finally:
        hook.close()


def failing_consumer(postgres_url: str) -> tuple[ConsumerConfig, str]:
    suffix = uuid.uuid4().hex[:8]
    table = f"alert_src_{suffix}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY, total int)")
    cfg = ConsumerConfig.model_validate({
        "name": f"alerting_{suffix}", "group": "workers", "consumer": "consumer-a",
        "source": {"kind": "supabase", "channel": f"alerts-{suffix}", "table": f"public.{table}", "install": True,
                   "replay_from": "earliest"},
        "handler": "tests.test_alerts:always_fails", "checkpoint": {"backend": "postgres"},
        "retry": {"max_retries": 0, "delay_s": 0}, "dead_letter": {"policy": "stop"},
        "max_idle_s": 0, "max_lag_s": 0.001,
    })
    return cfg, table


def test_a_failed_consumer_run_and_a_missed_lag_objective_are_posted_to_the_webhook(
        webhook: Webhook, postgres_url: str, redis_url: str) -> None:
    cfg, table = failing_consumer(postgres_url)
    durability = DurabilityResource(postgres_url=postgres_url, redis_url=redis_url)
    defs = Definitions.merge(build_consumer_defs(cfg), build_alert_defs([cfg]),
                             Definitions(resources={"durability": durability}))
    driver = Driver(defs, cfg.name)
    driver.drain()  # installs the change feed; nothing to read yet
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO public.{table} SELECT g, g FROM generate_series(1, 3) g")
    driver.drain(max_ticks=3)
    failed = [r for r in driver.runs if not r.success]
    assert len(failed) == 1, [r.success for r in driver.runs]
    run = failed[0]

    failure_sensor = defs.get_sensor_def(RUN_FAILURE_SENSOR)
    context = build_run_status_sensor_context(
        sensor_name=RUN_FAILURE_SENSOR, dagster_event=run.get_run_failure_event(),
        dagster_instance=driver.instance, dagster_run=run.dagster_run).for_run_failure()
    failure_sensor(context)
    assert len(webhook.posts) == 1
    post = webhook.posts[0]
    details = post["durability"]
    assert details["kind"] == "run_failure" and details["consumer"] == cfg.name
    assert details["run_id"] == run.run_id and details["shard"] == "-"
    assert "sink rejected 3 events: disk full" in details["error"]
    assert cfg.name in post["text"] and "disk full" in post["text"] and run.run_id in post["text"]
    # a failed run of another job is not a consumer's: not posted
    other = not_a_consumer_job.execute_in_process(instance=driver.instance, raise_on_error=False)
    failure_sensor(build_run_status_sensor_context(
        sensor_name=RUN_FAILURE_SENSOR, dagster_event=other.get_run_failure_event(),
        dagster_instance=driver.instance, dagster_run=other.dagster_run).for_run_failure())
    assert len(webhook.posts) == 1
    # the shard is stopped by the dead letter: its oldest waiting record ages past max_lag_s (1 ms)
    lag_sensor = defs.get_sensor_def(LAG_SENSOR)
    with build_sensor_context(instance=driver.instance, sensor_name=LAG_SENSOR,
                              resources={"durability": durability}) as ctx:
        result = lag_sensor(ctx)
        cursor = ctx.cursor
    assert len(webhook.posts) == 2, result
    lag = webhook.posts[1]["durability"]
    assert lag["kind"] == "lag_late" and lag["consumer"] == cfg.name and lag["shards_late"] == 1
    assert lag["lag_seconds"] > 0.001 and cfg.name in webhook.posts[1]["text"]
    # the next tick, still late: no second message
    with build_sensor_context(instance=driver.instance, sensor_name=LAG_SENSOR, cursor=cursor,
                              resources={"durability": durability}) as ctx:
        lag_sensor(ctx)
    assert len(webhook.posts) == 2


def test_without_a_webhook_the_alert_sensors_skip(monkeypatch: pytest.MonkeyPatch, postgres_url: str,
                                                  redis_url: str) -> None:
    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    cfg, _ = failing_consumer(postgres_url)
    defs = build_alert_defs([cfg])
    with build_sensor_context(sensor_name=LAG_SENSOR, resources={
            "durability": DurabilityResource(postgres_url=postgres_url, redis_url=redis_url)}) as ctx:
        result = defs.get_sensor_def(LAG_SENSOR)(ctx)
    assert WEBHOOK_ENV in str(result.skip_message if hasattr(result, "skip_message") else result)


def test_the_code_location_carries_both_alert_sensors() -> None:
    from durability_pipelines.definitions import defs

    names = {s.name for s in defs.get_repository_def().sensor_defs}
    assert {RUN_FAILURE_SENSOR, LAG_SENSOR} <= names
