"""The sources the three starters read, created where they are missing (what `python3 dev.py setup` and the
demo provision, so that `dagster dev` shows starters that work instead of failing ticks).

* DynamoDB: table ``orders`` with a ``NEW_AND_OLD_IMAGES`` stream, at ``$DURABILITY_DYNAMODB_ENDPOINT_URL``;
  when that variable is unset, at a local moto server started for it (``services.local_dynamodb``).
  Set it to an empty value to use AWS: then nothing is created there (an AWS account is yours to change).
* Postgres (``$DURABILITY_POSTGRES_URL``, else the embedded server): the project's tables, ``public.orders``
  and its change feed (the Supabase starter), the local stand-in for Supabase's ``realtime.send`` (the
  broadcast starter; a real one is never replaced).

Everything is created only if missing: nothing is dropped, emptied or replaced, so running it again, or
against a database of your own, changes no data.

``python -m durability_pipelines.starter_sources`` does it and prints, as JSON, the variables a Dagster
process needs to reach what it started (the local endpoint and the credentials moto accepts).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import psycopg

STARTER_TABLE = "orders"  # the DynamoDB table and the Postgres table the starters read
STARTER_REGION = "us-east-1"


def create_stream_table(ddb: Any, table: str = STARTER_TABLE, *, replace: bool = False) -> bool:
    """Create ``table`` (hash key ``pk``) with a ``NEW_AND_OLD_IMAGES`` stream; True if it was created.

    An existing table is kept (``replace=False``) or dropped first (the demo starts from an empty one)."""
    if table in ddb.list_tables()["TableNames"]:
        if not replace:
            return False
        ddb.delete_table(TableName=table)
    ddb.create_table(
        TableName=table, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    return True


def prepare_postgres(url: str, table: str = STARTER_TABLE) -> None:
    """The project's tables, ``public.<table>`` with its change feed, and the local ``realtime`` schema."""
    from durability_pipelines.checkpoints.postgres_store import PostgresConnection
    from durability_pipelines.consumer.storage import ensure
    from durability_pipelines.sinks.realtime import install_realtime_fixture
    from durability_pipelines.sources.supabase_changes import install_change_feed

    db = PostgresConnection(url)
    try:
        ensure(db)
    finally:
        db.close()
    with psycopg.connect(url, autocommit=True) as conn:
        install_realtime_fixture(conn)
        conn.execute(f"CREATE TABLE IF NOT EXISTS public.{table} (id BIGINT PRIMARY KEY, status TEXT, total INT)")
        install_change_feed(conn, f"public.{table}")


def provision(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Create the starters' sources where missing; return the variables to give Dagster (empty when the
    user configured the endpoint: their environment already has what they need)."""
    import boto3

    from durability_pipelines import services
    from durability_pipelines.services.local_dynamodb import (
        ENV_DYNAMODB_ENDPOINT_URL,
        LOCAL_AWS_ENV,
        local_dynamodb,
    )

    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    endpoint = environ.get(ENV_DYNAMODB_ENDPOINT_URL)
    if endpoint is None:
        endpoint = local_dynamodb(services.durability_home()).url
        values = {ENV_DYNAMODB_ENDPOINT_URL: endpoint, **LOCAL_AWS_ENV}
    if endpoint:  # empty: AWS itself, where we create nothing
        credentials = ({"aws_access_key_id": LOCAL_AWS_ENV["AWS_ACCESS_KEY_ID"],
                        "aws_secret_access_key": LOCAL_AWS_ENV["AWS_SECRET_ACCESS_KEY"]} if values else {})
        create_stream_table(boto3.client("dynamodb", endpoint_url=endpoint, region_name=STARTER_REGION,
                                         **credentials))
    prepare_postgres(services.libpq_url(services.resolve_postgres_url()))
    return values


def main() -> int:
    from durability_pipelines.services import ServiceUnavailableError

    try:
        print(json.dumps(provision()))
    except ServiceUnavailableError as exc:  # the message says what to do; a traceback would add nothing
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
