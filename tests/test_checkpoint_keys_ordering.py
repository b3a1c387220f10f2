"""Key layout and the one ordering of positions (Python side)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from durability_pipelines.checkpoints import (
    LATEST,
    SHARD_END,
    TRIM_HORIZON,
    CheckpointKey,
    InvalidCheckpointKeyError,
    InvalidSequenceError,
    compare_sequences,
    normalize_sequence,
)
from durability_pipelines.checkpoints.ordering import MAX_DIGITS, fast_sequence, max_sequence, sequence_gap

# Kinesis sequence numbers: up to 129 digits (DynamoDB's: 21-40)
digits = st.integers(min_value=0, max_value=10**MAX_DIGITS - 1).map(str)


def test_redis_key_is_the_original_layout_byte_for_byte() -> None:
    key = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", "shard-000")
    assert key.redis_key == "checkpoint:dynamodb:orders:workers:consumer-a:shard-000"
    assert CheckpointKey.parse(key.redis_key.encode()) == key


def test_unsharded_supabase_key_has_five_parts() -> None:
    key = CheckpointKey("supabase", "room1", "workers", "consumer-a")
    assert key.redis_key == "checkpoint:supabase:room1:workers:consumer-a"
    assert key.as_row()["shard"] == ""
    assert CheckpointKey.parse(key.redis_key) == key


@pytest.mark.parametrize(
    "field,value",
    [("stream", "a:b"), ("group", ""), ("consumer", "x\ny"), ("shard", "s\x00"), ("adapter", " dyn"),
     ("stream", "x" * 300), ("consumer", "tab\there")],
)
def test_ambiguous_key_components_are_rejected(field: str, value: str) -> None:
    parts = {"adapter": "dynamodb", "stream": "orders", "group": "g", "consumer": "c", "shard": "s"}
    parts[field] = value
    with pytest.raises(InvalidCheckpointKeyError, match=field):
        CheckpointKey(**parts)


def test_parse_rejects_foreign_keys() -> None:
    for bad in ("checkpoint:a:b", "other:a:b:c:d:e", "checkpoint:a:b:c:d:e:f:g"):
        with pytest.raises(InvalidCheckpointKeyError):
            CheckpointKey.parse(bad)


@pytest.mark.parametrize("bad", ["", "-1", "1.5", "1e21", " 12", "12 ", "abc", "0x1f", "1" * 130, None, 1.0, True,
                                 "shard_end", "٣"])
def test_garbage_sequences_are_rejected_with_the_key_named(bad: object) -> None:
    with pytest.raises(InvalidSequenceError, match="checkpoint:x"):
        normalize_sequence(bad, key="checkpoint:x")


def test_kinesis_sequence_numbers_up_to_129_digits_are_positions() -> None:
    longest = "9" * 129
    assert MAX_DIGITS == 129
    assert normalize_sequence(longest) == longest
    assert compare_sequences(longest, SHARD_END) == -1
    assert compare_sequences("1" + "0" * 56, "9" * 56) == 1  # 57 digits "1..." above 56 digits "9..."


@given(st.integers(min_value=0, max_value=10**MAX_DIGITS - 1))
def test_fast_sequence_agrees_with_normalize_for_every_width(n: int) -> None:
    text = str(n)
    assert fast_sequence(text) == normalize_sequence(text)
    assert fast_sequence(text.encode()) == normalize_sequence(text)
    assert fast_sequence("0" + text) is None  # not canonical: the long way
    assert fast_sequence("1" * 130) is None


def test_leading_zeros_are_one_spelling() -> None:
    assert normalize_sequence("000123") == "123"
    assert normalize_sequence("0000") == "0"
    assert normalize_sequence(b"42") == "42"
    assert normalize_sequence(7) == "7"


def test_numeric_not_lexical_ordering() -> None:
    # lexically "8..." > "11...", numerically the 22-digit value is larger
    assert compare_sequences("8" * 21, "11" + "0" * 20) == -1
    assert compare_sequences("1100000000017454423009", "1100000000017454423010") == -1


@given(digits, digits)
def test_numbers_compare_as_integers(a: str, b: str) -> None:
    assert compare_sequences(a, b) == (int(a) > int(b)) - (int(a) < int(b))


@given(digits)
def test_sentinels_bracket_every_number(n: str) -> None:
    assert compare_sequences(TRIM_HORIZON, n) == -1
    assert compare_sequences(LATEST, n) == -1
    assert compare_sequences(SHARD_END, n) == 1
    assert compare_sequences(TRIM_HORIZON, LATEST) == -1


def test_max_and_gap() -> None:
    assert max_sequence(None, "9", "10", None) == "10"
    assert max_sequence(None) is None
    assert sequence_gap("100", "250") == 150
    assert sequence_gap(None, "5") is None
    assert sequence_gap(SHARD_END, SHARD_END) == 0
