"""Refused credentials are not an outage (issue 21, item 10): a Postgres role that does not exist, a database
that does not exist, a Redis password that is wrong.

* every store says so with the CLI's message ("answered but refused …; retrying will not help"), as
  ``StoreRefusedError``, never "cannot reach";
* a consumer run fails at once and is not retried by its ``RetryPolicy`` (Dagster's in-process executor:
  no ``STEP_UP_FOR_RETRY``);
* a hybrid consumer whose Redis refuses its password goes on with Postgres alone (no ack lost) and is
  visibly degraded: ``refusals()`` names Redis, the run logs it and its lag check fails naming it.

Real servers: the session's PostgreSQL (a trust server refuses a role that does not exist) and a private
Redis started with ``requirepass``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import pytest

from durability_pipelines.checkpoints import (
    CheckpointKey,
    StoreRefusedError,
    StoreUnavailableError,
)
from durability_pipelines.checkpoints.factory import StoreConfig, open_store
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.orchestration.consumers import build_consumer_defs, lag_check_key
from durability_pipelines.orchestration.resources import DurabilityResource
from durability_pipelines.services import with_database
from tests.support.servers import PrivateRedis

PASSWORD = "s3cret-Pw"


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis(appendonly=False, password=PASSWORD)
    server.start()
    yield server
    server.close()


def wrong_password(server: PrivateRedis) -> str:
    return f"redis://:Wr0ng@127.0.0.1:{server.port}/0"


def no_such_role(postgres_url: str) -> str:
    parts = urlsplit(postgres_url)
    return f"postgresql://dp_no_such_role_{secrets.token_hex(2)}@{parts.hostname}:{parts.port or 5432}{parts.path}"


def key() -> CheckpointKey:
    return CheckpointKey("dynamodb", f"refused_{secrets.token_hex(3)}", "g", "c", "shardId-1")


def test_a_postgres_store_whose_role_or_database_is_refused_says_so_and_not_cannot_reach(
        postgres_url: str) -> None:
    for url, what in ((no_such_role(postgres_url), "refused the credentials"),
                      (with_database(postgres_url, "dp_no_such_db"), "has no database 'dp_no_such_db'")):
        with pytest.raises(StoreRefusedError, match=what) as info:
            open_store(StoreConfig(backend="postgres"), postgres_url=url).save(key(), "100")
        message = str(info.value)
        assert "cannot reach" not in message and "DURABILITY_POSTGRES_URL" in message
        assert isinstance(info.value, StoreUnavailableError)  # a hybrid store may still go on without it


def test_a_redis_store_whose_password_is_wrong_says_so_and_not_cannot_reach(locked_redis: PrivateRedis) -> None:
    store = open_store(StoreConfig(backend="redis"), redis_url=wrong_password(locked_redis))
    try:
        with pytest.raises(StoreRefusedError, match="refused the credentials") as info:
            store.save(key(), "100")
        assert "retrying will not help" in str(info.value) and "Wr0ng" not in str(info.value)
        with pytest.raises(StoreRefusedError):
            store.load(key())
    finally:
        store.close(flush=False)
    good = open_store(StoreConfig(backend="redis"), redis_url=locked_redis.url)  # the right password works
    try:
        assert good.save(key(), "100").current == "100"
    finally:
        good.close(flush=False)


def test_a_hybrid_store_whose_redis_refuses_goes_on_with_postgres_and_names_the_refusal(
        locked_redis: PrivateRedis, postgres_url: str) -> None:
    store = open_store(StoreConfig(backend="hybrid", flush_every_n=1), redis_url=wrong_password(locked_redis),
                       postgres_url=postgres_url)
    k = key()
    try:
        assert store.refusals() == {}
        store.save(k, "100")
        store.save(k, "200")
        assert store.load(k) == "200"  # acked on Postgres: nothing lost
        refused = store.refusals()
        assert set(refused) == {"redis"} and "refused the credentials" in refused["redis"]
    finally:
        store.close()
    with open_store(StoreConfig(backend="postgres"), postgres_url=postgres_url) as postgres:
        assert postgres.load(k) == "200"


def consumer(backend: str, **overrides: Any) -> ConsumerConfig:
    name = f"refused_{secrets.token_hex(3)}"
    return ConsumerConfig.model_validate({
        "name": name, "source": {"kind": "supabase", "channel": f"{name}-changes", "table": "public.orders"},
        "group": "g", "consumer": "c", "checkpoint": {"backend": backend}, "retry": {"max_retries": 3, "delay_s": 0},
        **overrides})


def run_consumer_job(cfg: ConsumerConfig, resource: DurabilityResource) -> dg.ExecuteInProcessResult:
    defs = dg.Definitions.merge(build_consumer_defs(cfg), dg.Definitions(
        assets=[dg.AssetSpec(["streams", cfg.adapter, cfg.stream])], resources={"durability": resource}))
    return defs.resolve_job_def(f"{cfg.name}_job").execute_in_process(raise_on_error=False)


@pytest.mark.parametrize("backend", ["postgres", "hybrid"])
def test_a_consumer_run_whose_postgres_refuses_fails_at_once_without_a_retry(
        backend: str, postgres_url: str, locked_redis: PrivateRedis) -> None:
    cfg = consumer(backend)  # hybrid: Postgres is its durable half, and holds the run's records
    result = run_consumer_job(cfg, DurabilityResource(postgres_url=no_such_role(postgres_url),
                                                      redis_url=locked_redis.url))
    assert not result.success
    types = [e.event_type_value for e in result.all_events]
    assert "STEP_UP_FOR_RETRY" not in types and types.count("STEP_FAILURE") == 1
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "refused the credentials" in str(failure.event_specific_data.error)


def test_a_hybrid_consumer_whose_redis_refuses_fails_its_lag_check_naming_it(
        locked_redis: PrivateRedis, postgres_url: str) -> None:
    cfg = consumer("hybrid")
    defs = dg.Definitions.merge(build_consumer_defs(cfg), dg.Definitions(
        assets=[dg.AssetSpec(["streams", cfg.adapter, cfg.stream])],
        resources={"durability": DurabilityResource(postgres_url=postgres_url,
                                                    redis_url=wrong_password(locked_redis))}))
    check = lag_check_key(cfg)
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_check_selection={check})
    result = job.execute_in_process(raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert "runs without its redis part" in evaluation.description
    assert "refused the credentials" in evaluation.description
