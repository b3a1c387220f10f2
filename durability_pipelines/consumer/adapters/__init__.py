"""The ``StreamSource`` adapters, one file each, and the one factory that picks one by config.

A new source: a module here implementing ``consumer.source.StreamSource`` (``identity`` included), a
config model in ``consumer.config`` and a branch in ``build_source``. Adapters import their reader from
``sources/`` and never resolve URLs themselves: the caller passes what they need.
"""

from __future__ import annotations

from durability_pipelines.consumer.config import (
    ConsumerConfig,
    DynamoDBSourceConfig,
    KinesisSourceConfig,
    SupabaseWalSourceConfig,
)
from durability_pipelines.consumer.source import CallHook, StreamSource

__all__ = ["build_source"]


def build_source(config: ConsumerConfig, *, postgres_url: str | None = None,
                 on_call: CallHook | None = None) -> StreamSource:
    """The consumer's source. ``postgres_url`` is the project's resolved Postgres (the change feed's
    database unless its ``db_url_env`` says otherwise); ``on_call`` receives every backend call's duration.

    Each adapter's module is imported only when it is used, so one source's dependencies (boto3,
    psycopg) never load for another.
    """
    if isinstance(config.source, KinesisSourceConfig):  # before DynamoDB: it is a DynamoDBSourceConfig too
        from durability_pipelines.consumer.adapters.kinesis import KinesisSource

        return KinesisSource(config.source, on_call=on_call)
    if isinstance(config.source, DynamoDBSourceConfig):
        from durability_pipelines.consumer.adapters.dynamodb import DynamoDBSource

        return DynamoDBSource(config.source, on_call=on_call)
    if isinstance(config.source, SupabaseWalSourceConfig):
        from durability_pipelines.consumer.adapters.wal import build_wal_source

        return build_wal_source(config, postgres_url=postgres_url, on_call=on_call)
    from durability_pipelines.consumer.adapters.supabase import build_supabase_source

    return build_supabase_source(config, postgres_url=postgres_url, on_call=on_call)
