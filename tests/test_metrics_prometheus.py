"""The metrics a monitoring stack scrapes: a drain pushes them to a real Pushgateway, a real Prometheus
scrapes it, and each metric is found there with the consumer's labels (Debian's ``prometheus`` and
``prometheus-pushgateway``, started privately; ``tests/support/monitoring.py``)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from durability_pipelines.consumer.drain import ShardDrainer, StopReason
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.source import SourceBatch
from durability_pipelines.observability import (
    PUSH_INTERVAL_ENV,
    PUSHGATEWAY_ENV,
    Labels,
    Metrics,
    PushgatewayExporter,
    read_jsonl,
)
from durability_pipelines.processes import temporary_env
from tests.support.monitoring import PrivatePrometheus, PrivatePushgateway, ensure_monitoring
from tests.support.sources import ListSource
from tests.test_consumer_drain import FakeClock, budget, open_rt

EVENTS = 25  # max_events 10: batches of 10, 10, 5


class DatedListSource(ListSource):
    """A ListSource whose events carry a creation time (so lag is measured) and that counts what is left
    after each batch (``records_behind``), as the change feed does."""

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch:
        batch = super().read(shard, after, max_events)
        left = super().read(shard, batch.next_checkpoint or after, 10**6)
        return replace(batch, behind=len(left.events))


def dated_source(stream: str, shards: tuple[str, ...]) -> DatedListSource:
    created = datetime.now(timezone.utc) - timedelta(seconds=42)
    return DatedListSource(stream, {
        shard: [ChangeEvent("dynamodb", stream, shard, str(10**21 + i * 17), "INSERT", {"pk": f"{shard}-{i}"},
                            {"pk": f"{shard}-{i}", "n": i}, created_at=created) for i in range(EVENTS)]
        for shard in shards})


@pytest.fixture(scope="module")
def monitoring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivatePushgateway, PrivatePrometheus]]:
    ensure_monitoring()
    base = tmp_path_factory.mktemp("monitoring")
    with PrivatePushgateway(base / "pushgateway") as gateway, PrivatePrometheus(base / "prometheus", gateway) as prom:
        yield gateway, prom


def _only(samples: list[dict]) -> float:
    assert len(samples) == 1, samples
    return float(samples[0]["value"][1])


def test_a_drain_pushes_every_metric_and_prometheus_scrapes_it_with_the_consumers_labels(
        monitoring, redis_url, postgres_url, tmp_path: Path) -> None:
    gateway, prom = monitoring
    stream = "metrics-" + uuid.uuid4().hex[:10]
    shards = ("shard-0", "shard-1")
    source = dated_source(stream, shards)
    jsonl = tmp_path / "metrics.jsonl"
    pushed_mid_run: list[bool] = []
    with temporary_env(**{PUSHGATEWAY_ENV: gateway.url, PUSH_INTERVAL_ENV: "1",
                          "DURABILITY_OBSERVABILITY_JSONL": str(jsonl)}):
        for shard in shards:
            rt = open_rt(stream, redis_url, postgres_url, source, "hybrid")
            instance = f"dynamodb:{stream}:g:c:{shard}"

            waited: list[bool] = []

            def first_batch(record, instance=instance, waited=waited) -> None:
                if waited:
                    return
                # The run is still draining: the periodic push (every second, from its own thread) gets there.
                deadline = time.monotonic() + 30
                while f'instance="{instance}"' not in gateway.metrics_text():
                    assert time.monotonic() < deadline, "no periodic push while the run drains"
                    time.sleep(0.1)
                waited.append(True)

            clock = FakeClock()
            d = ShardDrainer(rt, shard, "run-" + uuid.uuid4().hex[:8], budget(), on_batch=first_batch,
                             sleep=clock.sleep, clock=clock)
            try:
                report = d.run()
            finally:
                rt.close()  # the run's last push
            pushed_mid_run += waited
            assert report.stop_reason is StopReason.CAUGHT_UP and report.events == EVENTS
            assert rt.metrics.exporter is not None and rt.metrics.exporter.last_error is None
    assert pushed_mid_run == [True, True]

    for shard in shards:
        labels = (f'adapter="dynamodb",stream="{stream}",group="g",consumer="c",shard="{shard}",'
                  f'job="durability_pipelines",instance="dynamodb:{stream}:g:c:{shard}"')
        # counters
        assert _only(prom.wait_for(f"reactive_events_total{{{labels}}}")) == EVENTS
        assert _only(prom.wait_for(f"reactive_acks_total{{{labels}}}")) == 3
        assert _only(prom.wait_for(f"reactive_events_failed_total{{{labels}}}")) == 0
        # gauges: the last batch's
        assert _only(prom.wait_for(f"reactive_ack_success_rate{{{labels}}}")) == 1.0
        assert _only(prom.wait_for(f"reactive_sequence_gap{{{labels}}}")) == 0
        assert 40 <= _only(prom.wait_for(f"reactive_lag_seconds{{{labels}}}")) < 600
        assert _only(prom.wait_for(f"reactive_records_behind{{{labels}}}")) == 0
        assert _only(prom.wait_for(f"reactive_last_ack_timestamp_seconds{{{labels}}}")) > time.time() - 600
        # histograms
        assert _only(prom.wait_for(f"reactive_events_per_batch_count{{{labels}}}")) == 3
        assert _only(prom.wait_for(f"reactive_events_per_batch_sum{{{labels}}}")) == EVENTS
        assert _only(prom.wait_for(f'reactive_events_per_batch_bucket{{{labels},le=~"1|1[.]0"}}')) == 0
        assert _only(prom.wait_for(f'reactive_events_per_batch_bucket{{{labels},le=~"5|5[.]0"}}')) == 1
        assert _only(prom.wait_for(f'reactive_events_per_batch_bucket{{{labels},le=~"10|10[.]0"}}')) == 3
        for operation, adapter in (("read_batch", "dynamodb"), ("handler", "handler"), ("hybrid.save", "hybrid")):
            call = labels.replace('adapter="dynamodb"', f'adapter="{adapter}"') + f',operation="{operation}"'
            assert _only(prom.wait_for(f"adapter_call_duration_seconds_count{{{call}}}")) >= 3
            assert _only(prom.wait_for(f'adapter_call_duration_seconds_bucket{{{call},le="+Inf"}}')) >= 3
    # the two shards' runs are two groups: neither replaced the other
    assert len(prom.query(f'reactive_events_total{{stream="{stream}"}}')) == 2
    # a PromQL lag alert reads them as the docs say
    assert len(prom.query(f'max by (consumer, shard) (reactive_lag_seconds{{stream="{stream}"}}) > 30')) == 2
    # and the JSONL file is still written, line by line
    lines = read_jsonl(jsonl)
    assert {line["metric"] for line in lines} >= {"reactive.events_per_batch", "reactive.ack.success_rate",
                                                  "reactive.sequence_gap", "adapter.call.duration_ms",
                                                  "reactive.lag_seconds", "reactive.records_behind"}
    assert "reactive.events_failed" not in {line["metric"] for line in lines}  # Prometheus only


def test_without_a_pushgateway_nothing_is_exported() -> None:
    with temporary_env(**{PUSHGATEWAY_ENV: ""}):
        metrics = Metrics(Labels("dynamodb", "s", "g", "c"))
    assert metrics.exporter is None
    metrics.start_pushing("shard-0")
    metrics.count("reactive.events_failed", 1)
    metrics.close()


def test_a_pushgateway_that_is_down_never_fails_the_run(caplog: pytest.LogCaptureFixture) -> None:
    from durability_pipelines.services import free_port

    exporter = PushgatewayExporter(f"http://127.0.0.1:{free_port()}", interval_s=60, timeout_s=1)
    metrics = Metrics(Labels("dynamodb", "s", "g", "c"), use_env=False, exporter=exporter)
    metrics.start_pushing("shard-0")
    metrics.record("reactive.events_per_batch", 3, labels=metrics.labels.with_(shard="shard-0"))
    with caplog.at_level(logging.WARNING, logger="durability_pipelines.observability"):
        metrics.close()
    assert exporter.pushes == 0 and exporter.last_error
    assert "could not push metrics to the Pushgateway" in caplog.text
