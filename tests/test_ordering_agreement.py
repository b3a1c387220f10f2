"""Python, Redis Lua and Postgres SQL agree on the order of the same pairs."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durability_pipelines.checkpoints import LATEST, SHARD_END, TRIM_HORIZON, compare_sequences
from durability_pipelines.checkpoints.postgres_store import PostgresConnection, migrate
from durability_pipelines.checkpoints.redis_store import SAVE_LUA

# 1-129 digits (Kinesis' maximum), half of them 41-129 (wider than DynamoDB Streams' 40)
numbers = st.one_of(st.integers(min_value=1, max_value=40), st.integers(min_value=41, max_value=129)).flatmap(
    lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n)
)
positions = st.one_of(numbers, st.sampled_from([TRIM_HORIZON, LATEST, SHARD_END]))
OUTCOME_TO_CMP = {"advanced": -1, "unchanged": 0, "stale": 1}


@pytest.fixture(scope="module")
def lua(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    return client, client.register_script(SAVE_LUA)


@pytest.fixture(scope="module")
def pg(postgres_url: str):
    db = PostgresConnection(postgres_url)
    migrate(db)
    conn = psycopg.connect(postgres_url, autocommit=True)
    yield conn
    conn.close()
    db.close()


def _lua_cmp(lua, a: str, b: str) -> int:
    client, script = lua
    key = f"checkpoint:test:{uuid.uuid4().hex}:g:c:s"
    sentinel_key = key + ":sentinel"
    # Where the project keeps it: numbers in the shared key, sentinels in their own key.
    client.set(key if a[0].isdigit() else sentinel_key, a)
    outcome, *_ = script(keys=[key, key + ":lease", key + ":hist", sentinel_key], args=[b, "w", "", "", "", "", "0"])
    client.delete(key, sentinel_key)
    return OUTCOME_TO_CMP[outcome.decode()]


def _assert_agree(lua, pg, a: str, b: str) -> None:
    expected = compare_sequences(a, b)
    assert _lua_cmp(lua, a, b) == expected
    (sql,) = pg.execute(
        "SELECT sign(durability_sequence_rank(%s) - durability_sequence_rank(%s))::int", (a, b)
    ).fetchone()
    assert sql == expected


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(positions, positions)
def test_lua_sql_and_python_agree(lua, pg, a: str, b: str) -> None:
    _assert_agree(lua, pg, a, b)


WIDE_PAIRS = [
    ("9" * 40, "1" + "0" * 40),  # 40 digits below 41
    ("9" * 56, "1" + "0" * 56),  # a Kinesis number growing a digit: "9..." > "1..." as text only
    ("4959" + "0" * 52, "4959" + "0" * 51 + "1"),
    ("9" * 128, "1" + "0" * 128),
    ("9" * 129, SHARD_END),  # the widest number is still below SHARD_END
    ("0" * 80 + "7", "7"),  # leading zeros: one number (they count towards the 129)
    (TRIM_HORIZON, "1" * 129),
]


@pytest.mark.parametrize("a,b", WIDE_PAIRS + [(b, a) for a, b in WIDE_PAIRS])
def test_lua_sql_and_python_agree_on_41_to_129_digits(lua, pg, a: str, b: str) -> None:
    _assert_agree(lua, pg, a, b)


@pytest.mark.parametrize("bad", ["1" * 130, "12abc"])
def test_sql_and_lua_refuse_what_python_refuses(lua, pg, bad: str) -> None:
    with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="invalid sequence"):
        pg.execute("SELECT durability_sequence_rank(%s)", (bad,))
    client, script = lua
    key = f"checkpoint:test:{uuid.uuid4().hex}:g:c:s"
    with pytest.raises(redis.ResponseError, match="DURABILITY_INVALID_SEQUENCE"):
        script(keys=[key, key + ":lease", key + ":hist", key + ":sentinel"], args=[bad, "w", "", "", "", "", "0"])


def test_sql_rank_rejects_garbage_clearly(pg) -> None:
    with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="invalid sequence"):
        pg.execute("SELECT durability_sequence_rank(%s)", ("12abc",))
