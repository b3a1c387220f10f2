"""Reading Redis replies and mapping Redis failures, for the Redis store and its leases."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from durability_pipelines.checkpoints.errors import (
    StoreRefusedError,
    StoreUnavailableError,
    WrongTypeKeyError,
)
from durability_pipelines.checkpoints.keys import CheckpointKey
from durability_pipelines.checkpoints.ordering import fast_sequence, normalize_sequence
from durability_pipelines.redis_client import describe_client


def as_text(v: Any) -> str | None:
    if v is None or v is False:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class WrongType:
    """What ``load_raw_many`` returns for a key of another Redis type than a string (``MGET`` says nil)."""

    kind: str  # hash, list, set, zset, stream
    key: str | None = None  # the Redis key of that type, when it is not the checkpoint key (its sentinel key)

    def __str__(self) -> str:
        return f"<redis {self.kind}>" if self.key is None else f"<redis {self.kind} at {self.key}>"


def wrong_type_error(redis_key: str, kind: str) -> WrongTypeKeyError:
    from durability_pipelines.checkpoints.keys import SENTINEL_PREFIX

    if redis_key.startswith(SENTINEL_PREFIX + ":"):
        return WrongTypeKeyError(
            f"Redis key {redis_key!r} holds a {kind}, not the SHARD_END / TRIM_HORIZON / LATEST string the project "
            "keeps beside the checkpoint (another program wrote it?); nothing was written. Replace it: "
            "`durability-pipelines checkpoints set <adapter> <stream> <group> <consumer> [<shard>] --sequence "
            "<position> --force` (hybrid consumers replace it themselves at their next ack, from Postgres).",
            key=redis_key, kind=kind,
        )
    return WrongTypeKeyError(
        f"Redis key {redis_key!r} holds a {kind}, not the checkpoint string the shared layout puts there "
        f"(another program wrote it?); nothing was read or written there. Look at it (`redis-cli TYPE {redis_key}`), "
        "then replace it with the last position known to be processed: `durability-pipelines checkpoints set "
        "<adapter> <stream> <group> <consumer> [<shard>] --sequence <position> --force`, or delete it "
        "(the hybrid store then restores it from Postgres).",
        key=redis_key, kind=kind,
    )


def parse_stored(key: CheckpointKey, raw: Any) -> str | None:
    """A stored raw value as a canonical sequence (``None`` if absent); raises ``InvalidSequenceError``
    (``WrongTypeKeyError`` for a key of another type)."""
    if raw is None:
        return None
    if isinstance(raw, WrongType):
        raise wrong_type_error(raw.key or key.redis_key, raw.kind)
    fast = fast_sequence(raw)
    return fast if fast is not None else normalize_sequence(raw, key=key.redis_key)


def describe_server(client: redis.Redis) -> str:
    return describe_client(client)


def unavailable_error(client: redis.Redis, exc: BaseException) -> StoreUnavailableError:
    """What a failed Redis call raises: ``StoreRefusedError`` when the server refused the credentials
    (WRONGPASS / NOAUTH: it is up, a retry will not help), else ``StoreUnavailableError``."""
    from durability_pipelines.services.checks import is_credentials_error, redis_refusal

    if is_credentials_error(exc):
        return StoreRefusedError(redis_refusal(describe_server(client), f"{str(exc).rstrip('.')}.",
                                               "$DURABILITY_REDIS_URL"))
    return StoreUnavailableError(
        f"cannot reach {describe_server(client)}: {type(exc).__name__}. Check that Redis is running and "
        "DURABILITY_REDIS_URL is right; nothing was written."
    )


@contextmanager
def redis_errors(client: redis.Redis) -> Iterator[None]:
    """Turn connection failures into ``StoreUnavailableError`` (no credentials in the message)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # AuthenticationError is a ConnectionError
        raise unavailable_error(client, exc) from exc
    except redis.ResponseError as exc:
        from durability_pipelines.services.checks import is_credentials_error

        if is_credentials_error(exc):  # NOAUTH / WRONGPASS / NOPERM as a reply to a command
            raise unavailable_error(client, exc) from None
        raise
