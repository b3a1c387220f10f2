"""Checkpoint and lease keys, byte-for-byte compatible with the original layout.

``checkpoint:<adapter>:<stream>:<group>:<consumer>:<shard>`` is shared with
other workers, so a component that would make it ambiguous (a ``:`` inside it,
an empty one, control characters, surrounding whitespace) is rejected rather
than escaped: escaping would silently produce keys other workers never read.

One exception, from the original pattern itself: the Supabase form
``checkpoint:supabase:<channel>:<group>:<consumer>`` (no shard) uses channels
such as ``realtime:public:orders``. Its channel is everything between
``checkpoint:supabase:`` and the last two components, so a channel may hold
``:``; group and consumer may not. Parsing never guesses: a key that cannot be
split this way raises ``InvalidCheckpointKeyError`` and callers report it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from durability_pipelines.checkpoints.errors import InvalidCheckpointKeyError

REDIS_PREFIX = "checkpoint"
#: Our own Redis namespaces; they never match ``checkpoint:*``.
#: Every key of the project's own lives under this prefix.
PROJECT_PREFIX = "durability"
LEASE_PREFIX = "durability:lease"
HISTORY_PREFIX = "durability:history"
HYBRID_STATE_PREFIX = "durability:hybrid"
#: Positions that are not sequence numbers (SHARD_END, TRIM_HORIZON, LATEST), kept out of the shared
#: ``checkpoint:*`` keys that other workers feed to ``AT_SEQUENCE_NUMBER`` (see ``checkpoints.sentinels``).
SENTINEL_PREFIX = "durability:sentinel"
#: Each sensor's cursor, mirrored for failover (``durability:sensor_cursor:<sensor name>``).
SENSOR_CURSOR_PREFIX = "durability:sensor_cursor"
#: Redis Cluster only: a checkpoint's copy of its shard's lease, in the checkpoint's hash slot (the Lua
#: save checks it there), and the set of such copies beside the lease (so a takeover can fence them).
LEASE_COPY_PREFIX = "durability:leasecopy"
LEASE_COPIES_PREFIX = "durability:leasecopies"
#: "No shard" (the unsharded change feed, ``None`` in code) where it must be text: sensor cursors, the
#: ``durability/shard`` tag, run keys and ``ops.drain_shard.config.shard``. The Redis key has no shard
#: part and Postgres rows store ''; those stay as they are (other workers read them).
NO_SHARD = "-"

#: The size beyond which a store clears a cache kept per checkpoint key (Redis key strings, what its last save
#: left in the shared value).
KEY_CACHE_MAX = 65_536



def shard_to_tag(shard: str | None) -> str:
    return shard or NO_SHARD


def shard_from_tag(text: str | None) -> str | None:
    """Inverse of ``shard_to_tag``; '' (the run config's spelling before ``NO_SHARD``) is no shard too."""
    return None if text in (None, "", NO_SHARD) else text


def stream_key_patterns(stream: str) -> list[str]:
    """Redis glob patterns of every key that belongs to ``stream``: its shared checkpoints and the project's
    own keys (leases, history, sentinels, flush state). For tools that reset a stream (the demo)."""
    return [f"{REDIS_PREFIX}:*:{stream}*", f"{PROJECT_PREFIX}:*:{stream}*"]


MAX_COMPONENT_LENGTH = 256
_FORBIDDEN = re.compile(r"[:\x00-\x1f\x7f]")
_FORBIDDEN_IN_CHANNEL = re.compile(r"[\x00-\x1f\x7f]")  # ':' allowed: the channel is split off from both ends
_FIELDS = ("adapter", "stream", "group", "consumer", "shard")
#: The adapter whose (unsharded) keys carry a channel that may contain ':' (the original pattern's Supabase form).
CHANNEL_ADAPTER = "supabase"


def validate_channel(value: object) -> str:
    """A Supabase channel: like any component, except that ':' is allowed (``realtime:public:orders``)."""
    if not isinstance(value, str):
        raise InvalidCheckpointKeyError(f"checkpoint key field 'stream' must be a string, got {type(value).__name__}")
    if value == "" or value.startswith(":") or value.endswith(":") or "::" in value:
        raise InvalidCheckpointKeyError(
            f"channel {value!r} is empty or has an empty ':'-separated part; give it a name like 'realtime:public:orders'")
    bad = _FORBIDDEN_IN_CHANNEL.search(value)
    if bad or value != value.strip() or len(value) > MAX_COMPONENT_LENGTH:
        return validate_component("stream", value.replace(":", "-"))  # the same message as any component
    return value


def validate_component(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidCheckpointKeyError(f"checkpoint key field {name!r} must be a string, got {type(value).__name__}")
    if value == "":
        raise InvalidCheckpointKeyError(f"checkpoint key field {name!r} is empty; give it a name")
    if value != value.strip():
        raise InvalidCheckpointKeyError(
            f"checkpoint key field {name!r}={value!r} has leading or trailing whitespace; remove it"
        )
    bad = _FORBIDDEN.search(value)
    if bad:
        raise InvalidCheckpointKeyError(
            f"checkpoint key field {name!r}={value!r} contains {bad.group()!r}: ':' and control characters "
            "would make the Redis key checkpoint:<adapter>:<stream>:<group>:<consumer>:<shard> ambiguous; "
            "choose a name without them (e.g. replace ':' with '-')"
        )
    if len(value) > MAX_COMPONENT_LENGTH:
        raise InvalidCheckpointKeyError(
            f"checkpoint key field {name!r} is {len(value)} characters long; the limit is {MAX_COMPONENT_LENGTH}"
        )
    return value


def _suffix(shard: str | None) -> str:
    return "" if shard is None else f":{shard}"


def hash_tag(redis_key: str) -> str:
    """The part of ``redis_key`` that Redis Cluster hashes to pick its slot (``CLUSTER KEYSLOT``).

    Redis hashes only the text between the first ``{`` and the first ``}`` after it, if that text is not
    empty; otherwise the whole key. A key hashed whole that holds a ``}`` cannot be given a companion in
    its slot (``{<key>}`` would end at that ``}``), so it is refused with ``InvalidCheckpointKeyError``.
    """
    start = redis_key.find("{")
    if start >= 0:
        end = redis_key.find("}", start + 1)
        if end > start + 1:
            return redis_key[start + 1 : end]
    if "}" in redis_key:
        raise InvalidCheckpointKeyError(
            f"Redis key {redis_key!r} holds a '}}' but no '{{...}}' hash tag, so on a Redis Cluster the project's "
            "own keys (history, sentinel, lease copy) cannot be placed in its hash slot; rename the component "
            "that holds the '}' (e.g. replace it with '-'), or use a single-node Redis (redis://)")
    return redis_key


def slotted_key(prefix: str, redis_key: str) -> str:
    """``<prefix>:{<redis_key>}``: a key of ours in the same Redis Cluster slot as ``redis_key``.

    When ``redis_key`` carries a hash tag of its own (``checkpoint:a:{x}:...``), the companion is
    ``<prefix>:{x}:<redis_key>``: same slot, and still one companion per key.
    """
    tag = hash_tag(redis_key)
    return f"{prefix}:{{{tag}}}" if tag == redis_key else f"{prefix}:{{{tag}}}:{redis_key}"


@dataclass(frozen=True)
class CompanionKeys:
    """The project's own Redis keys that go with one checkpoint key, in the layout of one deployment.

    Single-node Redis: ``durability:<kind>:<adapter>:...`` (as ever; ``lease_copy`` is ``None``: the save
    checks the lease itself). Redis Cluster: ``durability:<kind>:{checkpoint:<adapter>:...}`` (the shared
    key's slot, so that one Lua call may touch them all) and a lease copy ``durability:leasecopy:{...}``.
    """

    history: str
    sentinel: str
    hybrid_state: str
    lease_copy: str | None


def companion_keys(checkpoint_redis_key: str, *, cluster: bool) -> CompanionKeys:
    """The companions of a shared ``checkpoint:...`` key (also for keys not parsed into a ``CheckpointKey``)."""
    if not cluster:
        rest = checkpoint_redis_key[len(REDIS_PREFIX) :]
        return CompanionKeys(HISTORY_PREFIX + rest, SENTINEL_PREFIX + rest, HYBRID_STATE_PREFIX + rest, None)
    return CompanionKeys(
        slotted_key(HISTORY_PREFIX, checkpoint_redis_key), slotted_key(SENTINEL_PREFIX, checkpoint_redis_key),
        slotted_key(HYBRID_STATE_PREFIX, checkpoint_redis_key), slotted_key(LEASE_COPY_PREFIX, checkpoint_redis_key))


@dataclass(frozen=True)
class LeaseKey:
    """What a lease covers: one shard of one stream for one consumer group."""

    adapter: str
    stream: str
    group: str
    shard: str | None = None

    def __post_init__(self) -> None:
        for field in ("adapter", "stream", "group", "shard"):
            value = getattr(self, field)
            if field == "stream" and self.adapter == CHANNEL_ADAPTER and self.shard is None:
                validate_channel(value)
            elif not (field == "shard" and value is None):
                validate_component(field, value)

    @classmethod
    def parse(cls, redis_key: str | bytes) -> LeaseKey:
        """Parse ``durability:lease:a:s:g[:shard]`` (a Supabase channel may hold ':')."""
        if isinstance(redis_key, bytes):
            redis_key = redis_key.decode("utf-8", "replace")
        prefix = LEASE_PREFIX + ":"
        if not redis_key.startswith(prefix):
            raise InvalidCheckpointKeyError(f"{redis_key!r} is not a lease key ({prefix}...)")
        parts = redis_key[len(prefix):].split(":")
        if len(parts) >= 3 and parts[0] == CHANNEL_ADAPTER:
            return cls(CHANNEL_ADAPTER, ":".join(parts[1:-1]), parts[-1])
        if len(parts) not in (3, 4):
            raise InvalidCheckpointKeyError(f"{redis_key!r} is not a lease key ({prefix}<adapter>:<stream>:<group>[:<shard>])")
        return cls(*parts)

    def __lt__(self, other: LeaseKey) -> bool:
        return (self.adapter, self.stream, self.group, self.shard_column) < (
            other.adapter, other.stream, other.group, other.shard_column)

    @property
    def redis_key(self) -> str:
        return f"{LEASE_PREFIX}:{self.adapter}:{self.stream}:{self.group}{_suffix(self.shard)}"

    @property
    def shard_column(self) -> str:
        return self.shard or ""

    @property
    def copies_key(self) -> str:
        """Redis Cluster: the set of checkpoint lease copies of this lease, in the lease key's slot."""
        return slotted_key(LEASE_COPIES_PREFIX, self.redis_key)

    def __str__(self) -> str:
        return f"{self.adapter}:{self.stream}:{self.group}{_suffix(self.shard)}"


@dataclass(frozen=True)
class CheckpointKey:
    """Identifies one checkpoint: ``(adapter, stream, group, consumer, shard)``.

    ``shard`` is ``None`` for unsharded streams (the Supabase change feed):
    the Redis key is then ``checkpoint:supabase:<channel>:<group>:<consumer>``
    as in the original layout, and the Postgres ``shard`` column holds ``''``.
    In Postgres the group column is called ``grp`` (``group`` is reserved).
    """

    adapter: str
    stream: str
    group: str
    consumer: str
    shard: str | None = None

    def __post_init__(self) -> None:
        channel = self.adapter == CHANNEL_ADAPTER
        if channel and self.shard is not None:
            raise InvalidCheckpointKeyError(
                f"supabase checkpoint keys have no shard (checkpoint:supabase:<channel>:<group>:<consumer>), "
                f"got shard {self.shard!r}")
        for field in _FIELDS:
            value = getattr(self, field)
            if field == "shard" and value is None:
                continue
            if field == "stream" and channel:
                validate_channel(value)
            else:
                validate_component(field, value)

    def __lt__(self, other: CheckpointKey) -> bool:
        return self.sort_tuple < other.sort_tuple

    @property
    def sort_tuple(self) -> tuple[str, str, str, str, str]:
        return (self.adapter, self.stream, self.group, self.consumer, self.shard_column)

    @property
    def redis_key(self) -> str:
        return f"{REDIS_PREFIX}:{self.adapter}:{self.stream}:{self.group}:{self.consumer}{_suffix(self.shard)}"

    @property
    def history_key(self) -> str:
        return f"{HISTORY_PREFIX}:{self.adapter}:{self.stream}:{self.group}:{self.consumer}{_suffix(self.shard)}"

    @property
    def hybrid_state_key(self) -> str:
        return f"{HYBRID_STATE_PREFIX}:{self.adapter}:{self.stream}:{self.group}:{self.consumer}{_suffix(self.shard)}"

    @property
    def sentinel_key(self) -> str:
        return f"{SENTINEL_PREFIX}:{self.adapter}:{self.stream}:{self.group}:{self.consumer}{_suffix(self.shard)}"

    def companions(self, *, cluster: bool = False) -> CompanionKeys:
        """This checkpoint's own keys in the single-node (default) or the Redis Cluster layout."""
        return companion_keys(self.redis_key, cluster=cluster)

    @property
    def shard_column(self) -> str:
        return self.shard or ""

    @property
    def lease_key(self) -> LeaseKey:
        return LeaseKey(self.adapter, self.stream, self.group, self.shard)

    def as_row(self) -> dict[str, str]:
        """Column values for the ``checkpoints`` table."""
        return {
            "adapter": self.adapter,
            "stream": self.stream,
            "grp": self.group,
            "consumer": self.consumer,
            "shard": self.shard_column,
        }

    @classmethod
    def from_row(cls, adapter: str, stream: str, grp: str, consumer: str, shard: str) -> CheckpointKey:
        return cls(adapter, stream, grp, consumer, shard or None)

    @classmethod
    def parse(cls, redis_key: str | bytes) -> CheckpointKey:
        """Parse ``checkpoint:a:s:g:c[:shard]`` (``checkpoint:supabase:<channel>:g:c``, the channel possibly
        holding ':'); raises ``InvalidCheckpointKeyError`` for anything that cannot be split without guessing."""
        if isinstance(redis_key, bytes):
            redis_key = redis_key.decode("utf-8", "replace")
        parts = redis_key.split(":")
        if len(parts) >= 5 and parts[0] == REDIS_PREFIX and parts[1] == CHANNEL_ADAPTER:
            return cls(CHANNEL_ADAPTER, ":".join(parts[2:-2]), parts[-2], parts[-1])
        if len(parts) not in (5, 6) or parts[0] != REDIS_PREFIX:
            raise InvalidCheckpointKeyError(
                f"{redis_key!r} is not a checkpoint key of the form "
                "checkpoint:<adapter>:<stream>:<group>:<consumer>[:<shard>] "
                "(or checkpoint:supabase:<channel>:<group>:<consumer>)"
            )
        return cls(*parts[1:])

    def __str__(self) -> str:
        return self.redis_key
