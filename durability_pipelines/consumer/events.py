"""The one event shape every source produces and every handler receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any


def json_safe(value: Any) -> Any:
    """Decimals, sets, bytes and datetimes -> JSON-compatible values (lossless for ints).

    The one JSON conversion for stream values (sinks, dead letters, Realtime payloads): binary is
    base64, including boto3's ``Binary`` (DynamoDB ``B``/``BS``), which is not ``bytes`` but has ``__bytes__``.
    """
    if isinstance(value, Decimal):
        return int(value) if value.is_finite() and value == value.to_integral_value() else str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((json_safe(v) for v in value), key=repr)
    if isinstance(value, bytes | bytearray) or hasattr(value, "__bytes__"):
        import base64

        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, datetime):
        return value.isoformat()
    return value


@dataclass(frozen=True)
class ChangeEvent:
    """One change from a stream: the sequence is its idempotency key."""

    adapter: str  # dynamodb | supabase
    stream: str  # table name / channel
    shard: str | None  # DynamoDB shard id; None for the (unsharded) change feed
    sequence: str  # canonical position (digits)
    event_name: str  # INSERT | MODIFY | REMOVE (DynamoDB) / INSERT | UPDATE | DELETE (Postgres)
    keys: dict[str, Any] = field(default_factory=dict)
    new_image: dict[str, Any] | None = None
    old_image: dict[str, Any] | None = None
    created_at: datetime | None = None
    event_id: str | None = None
    #: the changed table (``schema.table``) and the writing transaction's id, where the source has them
    #: (the WAL source); left out of ``to_json_dict`` when None
    table: str | None = None
    txid: int | None = None

    def to_json_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.table is not None:
            extra["table"] = self.table
        if self.txid is not None:
            extra["txid"] = self.txid
        return {
            "adapter": self.adapter,
            "stream": self.stream,
            "shard": self.shard,
            "sequence": self.sequence,
            "event": self.event_name,
            "keys": json_safe(self.keys),
            "new_image": json_safe(self.new_image),
            "old_image": json_safe(self.old_image),
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "event_id": self.event_id,
            **extra,
        }
