"""The one ordering of stream positions, shared by Python, SQL and Lua.

Positions are strings:

* ``TRIM_HORIZON`` < ``LATEST`` < every number < ``SHARD_END``
* numbers are decimal digit strings of 1-129 digits: Kinesis sequence numbers
  (``0|([1-9]\\d{0,128})``), DynamoDB Streams' (21-40 digits, not contiguous) and
  bigint change-log ids alike.

Numbers are compared as integers of arbitrary size, never as text (lexically
``"8"`` > ``"11"``) and never as floats (a double holds ~16 digits).  Lua and
SQL implement the same rule: Lua compares length then text after stripping
leading zeros; SQL casts to NUMERIC (see ``schema.sql``).
"""

from __future__ import annotations

import re

TRIM_HORIZON = "TRIM_HORIZON"
LATEST = "LATEST"
SHARD_END = "SHARD_END"

#: Kinesis Data Streams' limit (its API pattern ``0|([1-9][0-9]{0,128})``); Lua and SQL repeat it.
MAX_DIGITS = 129
_DIGITS = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")
_SENTINEL_RANK = {TRIM_HORIZON: 0, LATEST: 1, SHARD_END: 3}
_NUMBER_RANK = 2


def normalize_sequence(value: object, *, key: str | None = None) -> str:
    """Return the canonical form of a position or raise ``InvalidSequenceError``.

    Leading zeros are stripped so that one number has one spelling; whitespace,
    signs, decimals, exponents and anything longer than ``MAX_DIGITS`` digits are rejected.
    """
    from durability_pipelines.checkpoints.errors import InvalidSequenceError

    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            value = repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if isinstance(value, str):
        if value in _SENTINEL_RANK:
            return value
        if _DIGITS.fullmatch(value):
            return value.lstrip("0") or "0"
    where = f" for checkpoint {key!r}" if key else ""
    shown = value if isinstance(value, str) and len(value) <= 80 else repr(value)[:80]
    raise InvalidSequenceError(
        f"invalid sequence {shown!r}{where}: expected 1-{MAX_DIGITS} decimal digits, "
        f"{TRIM_HORIZON}, {LATEST} or {SHARD_END}. If a store holds this value, set a valid "
        "checkpoint with `durability-pipelines checkpoints set ... --sequence S --force`.",
        key=key,
        value=value,
    )


def fast_sequence(value: object) -> str | None:
    """``value`` as a str if it already is a canonical number (1-``MAX_DIGITS`` ASCII digits, no leading zero), else None.

    The hot-path shortcut of ``normalize_sequence``: for such values it returns exactly what
    ``normalize_sequence`` would; anything else (sentinels, leading zeros, garbage) goes the long way.
    """
    cls = value.__class__
    if cls is bytes:
        if value.isdigit() and len(value) <= MAX_DIGITS and (value[0] != 48 or len(value) == 1):
            return value.decode("ascii")
    elif (cls is str and value.isdigit() and value.isascii() and len(value) <= MAX_DIGITS
          and (value[0] != "0" or len(value) == 1)):
        return value
    return None


def sort_key(value: str) -> tuple[int, int, str]:
    """Total-order key for a *canonical* position (see ``normalize_sequence``)."""
    rank = _SENTINEL_RANK.get(value)
    if rank is not None:
        return (rank, 0, "")
    return (_NUMBER_RANK, len(value), value)


def compare_sequences(a: object, b: object) -> int:
    """-1, 0 or 1 as ``a`` sorts before, equal to or after ``b``."""
    ka = sort_key(normalize_sequence(a))
    kb = sort_key(normalize_sequence(b))
    return (ka > kb) - (ka < kb)


def is_number(value: str) -> bool:
    return value not in _SENTINEL_RANK


def as_number(value: object) -> str | None:
    """``value`` as a canonical number; None for a sentinel, garbage or None (what a shared value may hold)."""
    from durability_pipelines.checkpoints.errors import InvalidSequenceError

    if value is None:
        return None
    try:
        canonical = normalize_sequence(value)
    except InvalidSequenceError:
        return None
    return canonical if is_number(canonical) else None


def max_sequence(*values: str | None) -> str | None:
    """The greatest of the given positions, ignoring ``None``."""
    present = [normalize_sequence(v) for v in values if v is not None]
    return max(present, key=sort_key) if present else None


def sequence_gap(acked: str | None, newest: str | None) -> int | None:
    """Numeric distance between two numeric positions (backlog metric), else None."""
    if acked is None or newest is None:
        return None
    a, n = normalize_sequence(acked), normalize_sequence(newest)
    if not (is_number(a) and is_number(n)):
        return 0 if n == a or a == SHARD_END else None
    return max(int(n) - int(a), 0)
