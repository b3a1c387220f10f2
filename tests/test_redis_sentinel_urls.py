"""``redis+sentinel://`` URLs: parsed into sentinels, master name, database and credentials; malformed ones
refused before connecting with the expected form in the message; passwords masked; and the knobs of
``redis_wait_replicas`` validated. One real Sentinel deployment checks that ``check_redis`` goes through it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError
from redis.sentinel import SentinelConnectionPool

from durability_pipelines import services
from durability_pipelines.checkpoints.factory import StoreConfig
from durability_pipelines.redis_client import (
    SENTINEL_FORM,
    SentinelURL,
    SentinelURLError,
    describe_client,
    parse_sentinel_url,
    redis_client,
)
from tests.support.servers import PrivateSentinelSet

SECRET = "Sup3rSecr3t"
SENTINEL_SECRET = "S3ntinelPw"


def test_a_sentinel_url_is_parsed_into_sentinels_master_db_and_credentials() -> None:
    url = f"redis+sentinel://app:{SECRET}@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/3?sentinel_password={SENTINEL_SECRET}"
    assert parse_sentinel_url(url) == SentinelURL(
        (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)), "mymaster", 3, "app", SECRET,
        None, SENTINEL_SECRET,
    )  # fmt: skip
    assert parse_sentinel_url("redis+sentinel://h:26379/mymaster").db == 0
    assert parse_sentinel_url(f"redis+sentinel://:{SECRET}@h/m").password == SECRET
    assert SECRET not in repr(parse_sentinel_url(url)) and SENTINEL_SECRET not in repr(parse_sentinel_url(url))


@pytest.mark.parametrize(
    "url, why",
    [
        ("redis+sentinel://h:26379", "no master name"),
        ("redis+sentinel://h:26379/", "no master name"),
        ("redis+sentinel:///mymaster", "no sentinel host"),
        ("redis+sentinel://h:99999/mymaster", "host:port"),
        ("redis+sentinel://h:port/mymaster", "host:port"),
        ("redis+sentinel://h:26379/mymaster/zero", "database number"),
        ("redis+sentinel://h:26379/mymaster/0/extra", "database number"),
        ("redis+sentinel://h:26379/mymaster?password=x", "unknown query parameter"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_with_the_expected_form(url: str, why: str) -> None:
    with pytest.raises(services.InvalidServiceURLError) as info:
        services.validate_redis_url(url, source=services.ENV_REDIS_URL)
    message = str(info.value)
    assert why in message and "$DURABILITY_REDIS_URL" in message and "no connection was attempted" in message
    assert "redis+sentinel://" in message  # the form to write instead


def test_the_parser_error_says_the_expected_form() -> None:
    with pytest.raises(SentinelURLError, match="no master name") as info:
        parse_sentinel_url("redis+sentinel://h:26379")
    assert SENTINEL_FORM in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379/mymaster",
        "redis+sentinel://a:26379,b:26380,c:26381/mymaster/2",
        f"redis+sentinel://:{SECRET}@a:26379/mymaster/0?sentinel_password={SENTINEL_SECRET}",
        "REDIS+SENTINEL://a/mymaster",
    ],
)
def test_well_formed_sentinel_urls_pass_validation(url: str) -> None:
    services.validate_redis_url(url)


def test_an_unknown_redis_scheme_names_the_sentinel_form() -> None:
    with pytest.raises(services.InvalidServiceURLError, match=r"redis\+sentinel://"):
        services.validate_redis_url("sentinel://h:26379/mymaster")


def test_masking_hides_the_master_and_the_sentinel_passwords() -> None:
    url = f"redis+sentinel://app:{SECRET}@a:26379,b:26379/mymaster/0?sentinel_password={SENTINEL_SECRET}"
    masked = services.mask_url(url)
    assert masked == "redis+sentinel://app:***@a:26379,b:26379/mymaster/0?sentinel_password=***"
    assert {SECRET, SENTINEL_SECRET} <= services.url_secrets(url)
    with pytest.raises(services.InvalidServiceURLError) as info:
        services.validate_redis_url(url.replace("/mymaster/0", ""))
    assert SECRET not in str(info.value) and SENTINEL_SECRET not in str(info.value)


def test_a_sentinel_url_builds_a_master_for_client_without_connecting() -> None:
    client = redis_client(f"redis+sentinel://:{SECRET}@127.0.0.1:1,127.0.0.1:2/mymaster/4", socket_timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster" and pool.is_master
    assert pool.connection_kwargs["db"] == 4 and pool.connection_kwargs["password"] == SECRET
    sentinel_kwargs = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert sentinel_kwargs["password"] is None and sentinel_kwargs["socket_timeout"] == 3  # the master's, not theirs
    described = describe_client(client)
    assert "mymaster" in described and "127.0.0.1:1,127.0.0.1:2" in described and SECRET not in described


def test_plain_redis_urls_still_build_a_plain_client() -> None:
    client = redis_client("redis://127.0.0.1:6379/5")
    assert not isinstance(client.connection_pool, SentinelConnectionPool)
    assert describe_client(client) == "redis at 127.0.0.1:6379 db 5"


def test_redis_wait_replicas_defaults_to_zero_and_is_validated() -> None:
    assert StoreConfig().redis_wait_replicas == 0
    assert StoreConfig(backend="redis", redis_wait_replicas=2).redis_options()["wait_replicas"] == 2
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        StoreConfig(backend="redis", redis_wait_replicas=-1)
    with pytest.raises(ValidationError, match="redis_wait_replicas applies to the redis and hybrid backends"):
        StoreConfig(backend="postgres", redis_wait_replicas=1)
    with pytest.raises(ValidationError):
        StoreConfig(backend="redis", redis_wait_timeout_s=0)


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[PrivateSentinelSet]:
    with PrivateSentinelSet(sentinels=1) as deployment:
        yield deployment


def test_check_redis_pings_the_master_through_the_sentinels(sentinel_set: PrivateSentinelSet) -> None:
    services.check_redis(sentinel_set.url, source=services.ENV_REDIS_URL)


def test_an_unknown_master_name_is_unreachable_not_a_crash(sentinel_set: PrivateSentinelSet) -> None:
    url = sentinel_set.url.replace("/mymaster/", "/nosuchmaster/")
    with pytest.raises(services.RedisUnavailableError, match="DURABILITY_REDIS_URL"):
        services.check_redis(url, timeout=2, source=services.ENV_REDIS_URL)


def test_a_sentinel_password_goes_to_the_sentinels_only() -> None:
    client = redis_client(f"redis+sentinel://127.0.0.1:1/mymaster?sentinel_password={SENTINEL_SECRET}")
    pool = client.connection_pool
    assert pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["password"] == SENTINEL_SECRET
    assert pool.connection_kwargs.get("password") is None
