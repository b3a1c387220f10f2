"""An in-memory StreamSource for runtime tests (the stores behind it are real)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from durability_pipelines.checkpoints.ordering import SHARD_END, sort_key
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.source import SourceBatch


@dataclass
class ListSource:
    """Shards of pre-made events; ``closed`` shards end with SHARD_END."""

    stream: str
    shards_events: dict[str | None, list[ChangeEvent]] = field(default_factory=dict)
    closed: set[str | None] = field(default_factory=set)
    adapter: str = "dynamodb"
    identity: str | None = None

    @classmethod
    def with_events(cls, stream: str, count: int, shard: str | None = "shard-0", start: int = 10**21) -> ListSource:
        events = [
            ChangeEvent("dynamodb", stream, shard, str(start + i * 17), "INSERT", {"pk": f"k{i}"}, {"pk": f"k{i}", "n": i})
            for i in range(count)
        ]
        return cls(stream, {shard: events})

    def list_shards(self) -> list[str | None]:
        return list(self.shards_events)

    def readable(self, acked: Mapping[str | None, str | None]) -> list[str | None]:
        return [s for s in self.shards_events if acked.get(s) != SHARD_END]

    def has_new(self, shard: str | None, after: str | None) -> bool:
        return bool(self.read(shard, after, 1).events) or shard in self.closed

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch:
        events = self.shards_events[shard]
        if after is not None:
            events = [e for e in events if sort_key(e.sequence) > sort_key(after)]
        batch = events[:max_events]
        ended = shard in self.closed and len(batch) == len(events)
        nxt = SHARD_END if ended else (batch[-1].sequence if batch else None)
        return SourceBatch(shard, after, batch, nxt, ended)

    def close(self) -> None:
        pass


class SharedListSource(ListSource):
    """A ``ListSource`` that serves two readers per shard (``SharedReads``, as DynamoDB Streams does), and logs
    every read: (the reading thread's name, the position read after, the sequences returned)."""

    shared_reads = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reads: list[tuple[str, str | None, list[str]]] = []
        self.on_read: Callable[[str, str | None], None] | None = None

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch:
        batch = super().read(shard, after, max_events)
        name = threading.current_thread().name
        self.reads.append((name, after, [e.sequence for e in batch.events]))
        if self.on_read is not None:
            self.on_read(name, after)
        return batch
