"""DynamoDB Streams reader: batches of records per shard, positioned by an acked checkpoint.

Plain Python on top of a boto3 ``dynamodbstreams`` client (no Dagster import), so the same code runs
in a Dagster op, the CLI and the tests. The reader never stores checkpoints: it is told where the
acked checkpoint is and returns what to checkpoint once the batch has been processed, because only
the caller knows when side effects have committed.

Decisions that matter for durability (see ``docs/sources-dynamodb.md``):

* Sequence numbers are compared only through ``checkpoints.ordering`` (numeric, SHARD_END above all).
* Trimmed data fails loudly by default; skipping is an explicit policy that returns a ``TrimGap``.
* An expired iterator is replaced by one positioned AFTER the last record already read, so a
  batch neither re-reads nor skips.
* A child shard is read only after its parent is fully processed (KCL's lineage rule).
* Throttling and server errors are retried with bounded, jittered backoff, then raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from boto3.dynamodb.types import TypeDeserializer
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.checkpoints.ordering import (
    LATEST,
    SHARD_END,
    TRIM_HORIZON,
    compare_sequences,
    is_number,
    normalize_sequence,
)
from durability_pipelines.sources.aws_clients import aws_client
from durability_pipelines.sources.backoff import BackoffPolicy
from durability_pipelines.sources.errors import (
    SequenceOutOfRangeError,
    ShardNotFoundError,
    SourceAccessError,
    SourceError,
    StreamChangedError,
    StreamNotFoundError,
    StreamUnavailableError,
    ThrottledError,
    TrimmedDataError,
)
from durability_pipelines.sources.hooks import CallHook

__all__ = [
    "ADAPTER",
    "ENDPOINT_ENV",
    "MAX_RECORDS_PER_CALL",
    "DynamoDBStreamReader",
    "ShardBatch",
    "ShardInfo",
    "StreamDescription",
    "StreamRecord",
    "TrimGap",
    "make_clients",
    "resolve_stream",
]

log = logging.getLogger(__name__)

ADAPTER = "dynamodb"
#: GetRecords returns at most 1,000 records (and 1 MB); asking for more is an API error.
MAX_RECORDS_PER_CALL = 1000
DEFAULT_MAX_CALLS_PER_BATCH = 20
#: GetRecords returns at most 1 MB per call (DynamoDB Streams): a short page near that size was cut by it.
PAGE_BYTES_LIMIT = 1024 * 1024
ENDPOINT_ENV = "DURABILITY_DYNAMODB_ENDPOINT_URL"

TrimPolicy = Literal["fail", "skip_to_trim_horizon"]
InitialPosition = Literal["TRIM_HORIZON", "LATEST"]

THROTTLE_CODES = frozenset(
    {
        "LimitExceededException",
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
    }
)
SERVER_ERROR_CODES = frozenset({"InternalServerError", "InternalFailure", "ServiceUnavailable"})
#: How often one batch may skip to TRIM_HORIZON before it gives up and returns what it has.
_MAX_SKIPS_PER_BATCH = 3
_DESCRIBE_PAGE_LIMIT = 100

_deserializer = TypeDeserializer()


# --------------------------------------------------------------------------- data types


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _deserialize(image: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if image is None:
        return None
    return {name: _deserializer.deserialize(value) for name, value in image.items()}


@dataclass(frozen=True)
class StreamRecord:
    """One DynamoDB stream record, deserialized to plain Python values (numbers are ``Decimal``)."""

    shard_id: str
    sequence: str  # canonical digits (checkpoints.ordering.normalize_sequence)
    event_id: str
    event_name: str  # INSERT | MODIFY | REMOVE
    keys: dict[str, Any]
    new_image: dict[str, Any] | None
    old_image: dict[str, Any] | None
    approximate_creation_time: datetime | None
    size_bytes: int
    raw: dict[str, Any] = field(repr=False, compare=False)
    stream_view_type: str | None = None
    #: ``{"type": "Service", "principalId": "dynamodb.amazonaws.com"}`` marks a TTL deletion.
    user_identity: dict[str, Any] | None = None

    @classmethod
    def from_raw(cls, shard_id: str, raw: Mapping[str, Any]) -> StreamRecord:
        body = raw.get("dynamodb", {})
        created = body.get("ApproximateCreationDateTime")
        if isinstance(created, (int, float)):
            created = datetime.fromtimestamp(created).astimezone()
        return cls(
            shard_id=shard_id,
            sequence=normalize_sequence(body.get("SequenceNumber"), key=shard_id),
            event_id=str(raw.get("eventID", "")),
            event_name=str(raw.get("eventName", "")),
            keys=_deserialize(body.get("Keys")) or {},
            new_image=_deserialize(body.get("NewImage")),
            old_image=_deserialize(body.get("OldImage")),
            approximate_creation_time=created if isinstance(created, datetime) else None,
            size_bytes=int(body.get("SizeBytes") or 0),
            raw=dict(raw),
            stream_view_type=body.get("StreamViewType"),
            user_identity=dict(raw["userIdentity"]) if raw.get("userIdentity") else None,
        )

    def __hash__(self) -> int:  # images are dicts: hash the identity of the change instead
        return hash((self.shard_id, self.sequence, self.event_id))


@dataclass(frozen=True)
class ShardInfo:
    """A shard as DescribeStream lists it.

    ``in_stream`` is False for a shard known only from a checkpoint: it has aged out of the stream,
    and reading it reports the loss (see ``DynamoDBStreamReader.readable_shards``).
    """

    shard_id: str
    parent_shard_id: str | None = None
    starting_sequence: str | None = None
    ending_sequence: str | None = None
    in_stream: bool = True
    #: a merge's second parent (Kinesis Data Streams); DynamoDB Streams shards have one parent at most
    adjacent_parent_shard_id: str | None = None

    @property
    def parents(self) -> tuple[str, ...]:
        """Every shard that must be read to its end before this one (KCL's lineage rule)."""
        return tuple(p for p in (self.parent_shard_id, self.adjacent_parent_shard_id) if p)

    @property
    def closed(self) -> bool:
        """A closed shard receives no new records; once read to its end its checkpoint is SHARD_END."""
        return self.ending_sequence is not None

    @classmethod
    def from_api(cls, shard: Mapping[str, Any]) -> ShardInfo:
        rng = shard.get("SequenceNumberRange") or {}
        start, end = rng.get("StartingSequenceNumber"), rng.get("EndingSequenceNumber")
        shard_id = str(shard["ShardId"])
        return cls(
            shard_id=shard_id,
            parent_shard_id=shard.get("ParentShardId") or None,
            adjacent_parent_shard_id=shard.get("AdjacentParentShardId") or None,
            starting_sequence=normalize_sequence(start, key=shard_id) if start is not None else None,
            ending_sequence=normalize_sequence(end, key=shard_id) if end is not None else None,
        )


@dataclass(frozen=True)
class TrimGap:
    """Records skipped under ``trim_policy='skip_to_trim_horizon'``: write it to the audit log.

    The lost range is strictly after ``from_sequence`` and strictly before ``to_sequence``.
    ``from_sequence`` is the last position delivered before the gap (the acked checkpoint, or the
    last record this batch read before the trim); None means "from the shard's start".
    ``to_sequence`` is the first record available after skipping; None means none was available
    (the rest of the shard is gone, or nothing has arrived since the trim horizon).
    """

    shard_id: str
    from_sequence: str | None
    to_sequence: str | None
    reason: str


@dataclass
class ShardBatch:
    """What one ``read_batch`` call read from one shard.

    Checkpoint ``next_checkpoint`` only after *every* record has been processed (side effects
    committed). It is the last record's sequence, or SHARD_END when the shard is closed and was read
    to its end; None when there is nothing new to checkpoint.
    """

    shard_id: str
    start_after: str | None  # acked checkpoint the read started after (None = initial position)
    records: list[StreamRecord] = field(default_factory=list)
    next_checkpoint: str | None = None
    shard_ended: bool = False
    gap: TrimGap | None = None
    start_at: str | None = None  # AT_SEQUENCE_NUMBER replay position, when given
    caught_up: bool = False  # the last GetRecords reached the tip of an open shard (empty or short page)
    calls: int = 0  # GetRecords calls made (throttle retries not counted)
    retries: int = 0  # throttle / server-error retries across all calls of this batch
    expired_iterators: int = 0
    duplicates_dropped: int = 0  # re-delivered records (at or below what was already read) left out
    size_bytes: int = 0
    millis_behind_latest: int | None = None  # Kinesis: how far the last GetRecords was behind the tip

    @property
    def newest_sequence(self) -> str | None:
        return self.records[-1].sequence if self.records else None


@dataclass(frozen=True)
class StreamDescription:
    """Which stream a table currently has; the label identifies a stream across re-enables."""

    table_name: str | None
    stream_arn: str
    stream_label: str
    status: str  # ENABLED | ENABLING | DISABLED | DISABLING
    view_type: str | None = None


def stream_label_from_arn(stream_arn: str) -> str | None:
    """``arn:aws:dynamodb:<region>:<acct>:table/<T>/stream/<label>`` -> ``<label>``."""
    _, sep, label = stream_arn.partition("/stream/")
    return (label or None) if sep else None


def table_name_from_arn(stream_arn: str) -> str | None:
    resource = stream_arn.split(":", 5)[-1]
    parts = resource.split("/")
    return parts[1] if len(parts) > 1 and parts[0] == "table" else None


# --------------------------------------------------------------------------- clients and stream lookup


def make_clients(region: str | None, endpoint_url: str | None = None) -> tuple[Any, Any]:
    """``(dynamodb, dynamodbstreams)`` clients; credentials come from the usual boto3 chain.

    The endpoint is ``endpoint_url``, else ``$DURABILITY_DYNAMODB_ENDPOINT_URL``, else AWS. The streams
    client has botocore's own retries switched off so the reader's ``BackoffPolicy`` is the single,
    bounded retry layer and every attempt reaches the ``on_call`` metrics hook.
    """
    endpoint = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
    control = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=30)
    data = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=5, read_timeout=30)
    return (  # made once per process (sources/aws_clients.py): a sensor builds its source every tick
        aws_client("dynamodb", region, endpoint, control, "control"),
        aws_client("dynamodbstreams", region, endpoint, data, "data"),
    )


def client_region(client: Any) -> str:
    return getattr(getattr(client, "meta", None), "region_name", None) or "the configured region"


@contextlib.contextmanager
def lookup_errors(what: str, region: str, operation: str, *, attempts: int, not_found: str) -> Iterator[None]:
    """A start-up lookup's failures as the source errors an operator can act on (``not_found``: the message)."""
    try:
        yield
    except ClientError as exc:
        if _error_code(exc) == "ResourceNotFoundException":
            raise StreamNotFoundError(not_found) from exc
        raise
    except NoCredentialsError as exc:
        raise SourceAccessError(
            f"no AWS credentials to describe {what} in {region}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance/pod role (any values do for moto)."
        ) from exc
    except (BotoConnectionError, HTTPClientError) as exc:
        raise StreamUnavailableError(operation=operation, attempts=attempts, detail=str(exc)) from exc


def resolve_stream(
    dynamodb_client: Any, table_name: str, *, expected_label: str | None = None
) -> StreamDescription:
    """The table's current stream (``LatestStreamArn``), refusing a stream other than ``expected_label``.

    Run it at start-up with the label stored alongside the checkpoints: a different label means the
    stream was disabled and re-enabled (or the table recreated), which must never be continued
    silently. A DISABLED status is returned, not raised: the old stream stays readable for 24 h so
    it can be drained.
    """
    region = client_region(dynamodb_client)
    with lookup_errors(
        f"table {table_name!r}", region, "DescribeTable", attempts=3,
        not_found=f"table {table_name!r} does not exist in {region} (or these credentials cannot see it). "
        f"Check the table name, the region and {ENDPOINT_ENV}.",
    ):
        table = dynamodb_client.describe_table(TableName=table_name)["Table"]
    arn = table.get("LatestStreamArn")
    label = table.get("LatestStreamLabel") or (stream_label_from_arn(arn) if arn else None)
    if not arn or not label:
        raise StreamNotFoundError(
            f"table {table_name!r} has no DynamoDB stream, so there is nothing to consume. Enable one: "
            f"`aws dynamodb update-table --table-name {table_name} --stream-specification "
            "StreamEnabled=true,StreamViewType=NEW_AND_OLD_IMAGES` (NEW_AND_OLD_IMAGES gives sinks both images)."
        )
    if expected_label is not None and label != expected_label:
        raise StreamChangedError(
            expected_label=expected_label, actual_label=label, stream_arn=arn, table_name=table_name
        )
    spec = table.get("StreamSpecification") or {}
    return StreamDescription(
        table_name=table.get("TableName", table_name),
        stream_arn=arn,
        stream_label=label,
        status="ENABLED" if spec.get("StreamEnabled") else "DISABLED",
        view_type=spec.get("StreamViewType"),
    )


# --------------------------------------------------------------------------- the reader

_Position = tuple[str, str | None]  # (ShardIteratorType, SequenceNumber)


def _transient_kind(exc: BaseException) -> str | None:
    """'throttled', 'server' or None (not worth retrying)."""
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in THROTTLE_CODES:
            return "throttled"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in SERVER_ERROR_CODES or int(status) >= 500:
            return "server"
        return None
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return "server"
    return None


class DynamoDBStreamReader:
    """Reads one DynamoDB stream shard by shard, from checkpoints the caller keeps.

    ``on_call(operation_name, duration_ms)`` is invoked for every AWS call attempt (retries too),
    e.g. to emit ``adapter.call.duration_ms``; an exception in the hook is logged, not raised.
    ``expected_label`` defaults to the label in ``stream_arn``; DescribeStream answering with
    another label raises ``StreamChangedError``.
    """

    #: GetRecords' own ceiling on ``Limit``
    records_per_call_limit = MAX_RECORDS_PER_CALL
    #: why a shard that left the stream was lost (the reason of its TrimGap / TrimmedDataError)
    gone_reason = "the shard is no longer in the stream (aged out of the 24 h retention)"
    #: what to look at when throttling outlasts the backoff (ThrottledError's advice)
    throttle_advice: str | None = None

    def __init__(
        self,
        streams_client: Any,
        stream_arn: str,
        *,
        trim_policy: TrimPolicy = "fail",
        initial_position: InitialPosition = "TRIM_HORIZON",
        max_records_per_call: int = MAX_RECORDS_PER_CALL,
        max_calls_per_batch: int = DEFAULT_MAX_CALLS_PER_BATCH,
        backoff: BackoffPolicy | None = None,
        on_call: CallHook | None = None,
        expected_label: str | None = None,
    ) -> None:
        if trim_policy not in ("fail", "skip_to_trim_horizon"):
            raise ConfigError(f"trim_policy must be 'fail' or 'skip_to_trim_horizon', got {trim_policy!r}")
        if initial_position not in (TRIM_HORIZON, LATEST):
            raise ConfigError(
                f"initial_position must be 'TRIM_HORIZON' or 'LATEST', got {initial_position!r}"
            )
        if (not isinstance(max_records_per_call, int)
                or not 1 <= max_records_per_call <= self.records_per_call_limit):
            raise ConfigError(
                f"max_records_per_call must be 1..{self.records_per_call_limit} (the GetRecords limit), "
                f"got {max_records_per_call!r}"
            )
        if not isinstance(max_calls_per_batch, int) or max_calls_per_batch < 1:
            raise ConfigError(f"max_calls_per_batch must be an integer >= 1, got {max_calls_per_batch!r}")
        if not stream_arn:
            raise ConfigError(
                "stream_arn is empty; resolve it with resolve_stream(dynamodb_client, table_name)"
            )
        self.client = streams_client
        self.stream_arn = stream_arn
        self.trim_policy: TrimPolicy = trim_policy
        self.initial_position: InitialPosition = initial_position
        self.max_records_per_call = max_records_per_call
        self.max_calls_per_batch = max_calls_per_batch
        self.backoff = backoff or BackoffPolicy()
        self.on_call = on_call
        self.expected_label = expected_label or stream_label_from_arn(stream_arn)
        self.description: StreamDescription | None = None
        self._shards: dict[str, ShardInfo] = {}
        # shard -> (the position a read ended at, the NextShardIterator that continues from it): the next
        # batch of a draining run goes on with it instead of a GetShardIterator call (iterators live 15 min;
        # an expired one is replaced as in any read).
        self._continue: dict[str, tuple[str, str]] = {}

    # ----------------------------------------------------------------- AWS calls

    def _report(self, operation: str, started: float) -> None:
        if self.on_call is None:
            return
        try:
            self.on_call(operation, (time.perf_counter() - started) * 1000.0)
        except Exception:  # metrics must never break the data path
            log.exception("on_call hook failed for %s", operation)

    def _call(
        self, operation: str, method: str, batch: ShardBatch | None, shard_id: str | None, **kwargs: Any
    ) -> Any:
        fn = getattr(self.client, method)

        def attempt() -> Any:
            started = time.perf_counter()
            try:
                return fn(**kwargs)
            finally:
                self._report(operation, started)

        def on_retry(_retry: int, _exc: BaseException, _delay: float) -> None:
            if batch is not None:
                batch.retries += 1

        try:
            return self.backoff.call(
                attempt, is_retryable=lambda e: _transient_kind(e) is not None, on_retry=on_retry
            )
        except Exception as exc:
            kind = _transient_kind(exc)
            if kind == "throttled":
                raise ThrottledError(
                    operation=operation,
                    attempts=self.backoff.max_attempts,
                    code=_error_code(exc),
                    shard_id=shard_id,
                    advice=self.throttle_advice,
                ) from exc
            if kind == "server":
                raise StreamUnavailableError(
                    operation=operation,
                    attempts=self.backoff.max_attempts,
                    detail=str(exc),
                    shard_id=shard_id,
                ) from exc
            raise

    # ----------------------------------------------------------------- shards

    def list_shards(self) -> list[ShardInfo]:
        """Every shard of the stream (DescribeStream, following ExclusiveStartShardId to the last page)."""
        shards: dict[str, ShardInfo] = {}
        start: str | None = None
        seen: set[str] = set()
        while True:
            kwargs: dict[str, Any] = {"StreamArn": self.stream_arn, "Limit": _DESCRIBE_PAGE_LIMIT}
            if start is not None:
                kwargs["ExclusiveStartShardId"] = start
            try:
                desc = self._call("DescribeStream", "describe_stream", None, None, **kwargs)[
                    "StreamDescription"
                ]
            except ClientError as exc:
                if _error_code(exc) == "ResourceNotFoundException":
                    raise StreamNotFoundError(
                        f"stream {self.stream_arn} does not exist (the table was deleted, or the ARN is wrong). "
                        "Resolve the table's current stream with resolve_stream(); if its label changed, "
                        "handle it as a new stream (see StreamChangedError)."
                    ) from exc
                raise
            if start is None:
                self._check_label(desc)
            for raw in desc.get("Shards") or []:
                info = ShardInfo.from_api(raw)
                shards[info.shard_id] = info
            nxt = desc.get("LastEvaluatedShardId")
            if not nxt:
                break
            if nxt in seen:
                raise SourceError(
                    f"DescribeStream pagination for {self.stream_arn} returned LastEvaluatedShardId {nxt!r} "
                    "twice; refusing to loop. Retry; if it persists, report it to AWS support."
                )
            seen.add(nxt)
            start = nxt
        self._shards = shards
        return list(shards.values())

    def _check_label(self, desc: Mapping[str, Any]) -> None:
        label = desc.get("StreamLabel")
        table = desc.get("TableName") or table_name_from_arn(self.stream_arn)
        if self.expected_label and label and label != self.expected_label:
            raise StreamChangedError(
                expected_label=self.expected_label,
                actual_label=label,
                stream_arn=desc.get("StreamArn") or self.stream_arn,
                table_name=table,
            )
        self.description = StreamDescription(
            table_name=table,
            stream_arn=desc.get("StreamArn") or self.stream_arn,
            stream_label=label or self.expected_label or "",
            status=str(desc.get("StreamStatus", "")),
            view_type=desc.get("StreamViewType"),
        )

    def readable_shards(
        self, shards: Sequence[ShardInfo], checkpoints: Mapping[str, str | None]
    ) -> list[ShardInfo]:
        """Shards to read now, in lineage order.

        A shard whose checkpoint is SHARD_END is done. A child is readable only once its parent is
        absent from the stream (aged out) or the parent's checkpoint is SHARD_END, so per-key order
        holds across splits. Shards that have a checkpoint short of SHARD_END but are no longer in
        the stream come first (``in_stream=False``): reading them reports the lost tail through
        ``trim_policy`` (TrimmedDataError, or a TrimGap and SHARD_END) instead of dropping it quietly.
        """
        present = {s.shard_id for s in shards}

        def finished(shard_id: str) -> bool:
            value = checkpoints.get(shard_id)
            return value is not None and normalize_sequence(value, key=shard_id) == SHARD_END

        orphans = [
            ShardInfo(shard_id=shard_id, in_stream=False)
            for shard_id, value in checkpoints.items()
            if value is not None and shard_id not in present and not finished(shard_id)
        ]
        ready = [
            s
            for s in shards
            if not finished(s.shard_id)
            and all(p not in present or finished(p) for p in s.parents)
        ]
        return orphans + ready

    def shard_info(self, shard_id: str, *, refresh: bool = False) -> ShardInfo | None:
        """The shard as last listed (lists the stream if it is unknown); None if not in the stream."""
        if refresh or shard_id not in self._shards:
            self.list_shards()
        return self._shards.get(shard_id)

    # ----------------------------------------------------------------- reading

    def read_batch(
        self, shard_id: str, after: str | None, max_events: int, *, at: str | None = None
    ) -> ShardBatch:
        """Read up to ``max_events`` records of one shard.

        ``after`` is the acked checkpoint (AFTER_SEQUENCE_NUMBER; None -> ``initial_position``;
        SHARD_END -> nothing to read). ``at`` replays from a sequence (AT_SEQUENCE_NUMBER) and wins
        over ``after``. Loops GetRecords until ``max_events``, an empty page (caught up), the end of
        a closed shard, or ``max_calls_per_batch``.
        """
        if not isinstance(max_events, int) or max_events < 1:
            raise ConfigError(f"max_events must be an integer >= 1, got {max_events!r}")
        after_n = normalize_sequence(after, key=shard_id) if after is not None else None
        at_n = normalize_sequence(at, key=shard_id) if at is not None else None
        if at_n is not None and not is_number(at_n):
            raise ConfigError(f"at= must be a sequence number to replay from, got {at_n!r}")
        batch = ShardBatch(shard_id=shard_id, start_after=after_n, start_at=at_n)
        if at_n is None and after_n == SHARD_END:
            batch.shard_ended = True
            return batch

        # The position the caller asked for, as a number (None for TRIM_HORIZON / LATEST / no checkpoint).
        requested = (
            at_n if at_n is not None else (after_n if after_n is not None and is_number(after_n) else None)
        )
        if at_n is not None:
            start: _Position = ("AT_SEQUENCE_NUMBER", at_n)
        elif after_n is None:
            start = (self.initial_position, None)
        elif not is_number(after_n):
            start = (after_n, None)
        else:
            start = ("AFTER_SEQUENCE_NUMBER", after_n)

        info = self.shard_info(shard_id)
        if info is None:
            if after_n is None and at_n is None:
                raise ShardNotFoundError(
                    shard_id=shard_id, stream_arn=self.stream_arn, known_shards=len(self._shards)
                )
            return self._shard_gone(batch, requested)

        if requested is not None:
            if info.ending_sequence is not None:
                order = compare_sequences(requested, info.ending_sequence)
                if order > 0:
                    raise SequenceOutOfRangeError(
                        shard_id=shard_id,
                        sequence=requested,
                        ending_sequence=info.ending_sequence,
                        stream_arn=self.stream_arn,
                    )
                if order == 0 and at_n is None:
                    # The acked checkpoint is the shard's last record: the shard is done.
                    batch.shard_ended = True
                    batch.next_checkpoint = SHARD_END
                    return batch
            if (
                info.starting_sequence is not None
                and compare_sequences(requested, info.starting_sequence) < 0
            ):
                # Records between the checkpoint and the trim horizon may be gone; AWS cannot tell either.
                self._trimmed(
                    batch,
                    from_sequence=requested,
                    earliest=info.starting_sequence,
                    reason=f"position is below the shard's StartingSequenceNumber {info.starting_sequence}",
                )
                start = (TRIM_HORIZON, None)

        floor = after_n if at_n is None and after_n is not None and is_number(after_n) else None
        iterator = None
        if at_n is None and after_n is not None and batch.gap is None:
            position, cached = self._continue.pop(shard_id, (None, None))
            iterator = cached if position == after_n else None
        return self._read(batch, start, requested, floor, max_events, iterator)

    def _read(
        self,
        batch: ShardBatch,
        start: _Position,
        requested: str | None,
        floor: str | None,
        max_events: int,
        iterator: str | None = None,
    ) -> ShardBatch:
        """The GetRecords loop. ``floor``: records at or below it were already delivered (acked);
        ``iterator``: one that continues exactly at ``start`` (from the previous batch), if known."""
        shard_id = batch.shard_id
        records = batch.records
        restart = start  # where a fresh iterator must point: moves AFTER each record read
        skips = 1 if batch.gap is not None else 0
        read_at_skip = 0  # len(records) when the last skip happened
        truncated = False
        while len(records) < max_events and batch.calls < self.max_calls_per_batch:
            try:
                if iterator is None:
                    iterator = self._get_iterator(shard_id, restart, batch)
                    if iterator is None:  # no iterator for a closed shard: nothing left in it
                        batch.shard_ended = True
                        break
                limit = min(self.max_records_per_call, max_events - len(records))
                batch.calls += 1
                resp = self._call(
                    "GetRecords", "get_records", batch, shard_id, ShardIterator=iterator, Limit=limit
                )
            except ClientError as exc:
                code = _error_code(exc)
                if code == "ExpiredIteratorException":
                    # Iterators live 15 minutes. Resume right after the last record read (or at the
                    # original start if none was): never re-read from the start, never stall.
                    batch.expired_iterators += 1
                    iterator = None
                    continue
                if self._is_trimmed(exc):
                    if batch.gap is not None and len(records) > read_at_skip:
                        break  # a second trim after progress: return what we have; the next batch reports it
                    skips += 1
                    if skips > _MAX_SKIPS_PER_BATCH:
                        break
                    if batch.gap is None:
                        earliest = (
                            None if self.trim_policy == "skip_to_trim_horizon" else self._earliest(shard_id)
                        )
                        self._trimmed(
                            batch,
                            from_sequence=records[-1].sequence
                            if records and self.trim_policy != "fail"
                            else requested,
                            earliest=earliest,
                            reason=f"{code}: {exc.response.get('Error', {}).get('Message', '')}".rstrip(": "),
                        )
                    read_at_skip = len(records)
                    restart, iterator = (TRIM_HORIZON, None), None
                    continue
                if code == "ResourceNotFoundException" and self.shard_info(shard_id, refresh=True) is None:
                    iterator = None
                    if records:  # keep what was read; the next batch reports the rest as gone
                        break
                    return self._shard_gone(batch, requested)
                raise

            raw_records = resp.get("Records") or []
            page = [self._decode(shard_id, raw) for raw in raw_records]
            # Sequence numbers only grow within a shard, so anything at or below what this batch (or the
            # acked checkpoint) already covers is a re-delivery from a re-positioned iterator, e.g. a
            # TRIM_HORIZON that had not actually moved past us. Never hand it out twice or backwards.
            low = records[-1].sequence if records else floor
            if low is not None and page:
                kept = [r for r in page if compare_sequences(r.sequence, low) > 0]
                batch.duplicates_dropped += len(page) - len(kept)
                page = kept
            room = max_events - len(records)
            if len(page) > room:  # a server ignoring Limit: keep order, never drop silently
                page, truncated = page[:room], True
            if page:
                if batch.gap is not None and batch.gap.to_sequence is None and len(records) == read_at_skip:
                    batch.gap = dataclasses.replace(batch.gap, to_sequence=page[0].sequence)
                records.extend(page)
                batch.size_bytes += sum(r.size_bytes for r in page)
                restart = ("AFTER_SEQUENCE_NUMBER", page[-1].sequence)
            if truncated:
                iterator = None  # it points past records this batch left out
                break
            nxt = resp.get("NextShardIterator")
            if not nxt:
                batch.shard_ended = True  # closed shard read to its end
                iterator = None
                break
            iterator = nxt
            if self._caught_up(resp, raw_records, batch, limit):
                batch.caught_up = True
                break

        if batch.shard_ended:
            batch.next_checkpoint = SHARD_END
        elif records:
            batch.next_checkpoint = records[-1].sequence
        end = batch.next_checkpoint or batch.start_after
        if iterator is not None and end is not None and batch.gap is None and end != SHARD_END:
            self._continue[shard_id] = (end, iterator)
        return batch

    # ----------------------------------------------------------------- what differs between change streams

    def _decode(self, shard_id: str, raw: Mapping[str, Any]) -> StreamRecord:
        """One GetRecords record as a ``StreamRecord``."""
        return StreamRecord.from_raw(shard_id, raw)

    def _caught_up(
        self, resp: Mapping[str, Any], raw_records: Sequence[Any], batch: ShardBatch, limit: int
    ) -> bool:
        """Did this page (asked for ``limit`` records) reach the shard's tip? An empty page, or one with fewer
        records than asked that the 1 MB page limit did not cut short: the shard had no more when it was read.

        Why a short page ends the batch: under a steady stream every page brings the records written since the
        last one, so a loop that read on until an empty page filled ``max_events`` at the stream's rate (two
        seconds for 1,000 records at 500/s) and held the first records back that long. Lambda (with no batching
        window) and KCL hand one poll's records over at once; so does this reader (``batch_window_s`` is how
        to wait for more)."""
        if not raw_records:
            return True
        page_bytes = sum(int((r.get("dynamodb") or {}).get("SizeBytes") or 0) for r in raw_records)
        return len(raw_records) < limit and page_bytes < PAGE_BYTES_LIMIT // 2

    def _is_trimmed(self, exc: ClientError) -> bool:
        """Does this error say the position's records are gone (so ``trim_policy`` decides)?"""
        return _error_code(exc) == "TrimmedDataAccessException"

    def _get_iterator(self, shard_id: str, position: _Position, batch: ShardBatch) -> str | None:
        kind, sequence = position
        kwargs: dict[str, Any] = {
            "StreamArn": self.stream_arn,
            "ShardId": shard_id,
            "ShardIteratorType": kind,
        }
        if sequence is not None:
            kwargs["SequenceNumber"] = sequence
        resp = self._call("GetShardIterator", "get_shard_iterator", batch, shard_id, **kwargs)
        return resp.get("ShardIterator") or None

    def _earliest(self, shard_id: str) -> str | None:
        """The shard's current StartingSequenceNumber, for the error message (best effort)."""
        try:
            info = self.shard_info(shard_id, refresh=True)
        except (SourceError, ClientError):
            return None
        return info.starting_sequence if info is not None else None

    def _trimmed(
        self, batch: ShardBatch, *, from_sequence: str | None, earliest: str | None, reason: str
    ) -> None:
        """Apply ``trim_policy``: raise TrimmedDataError, or record the gap and let the caller skip."""
        if self.trim_policy == "fail":
            raise TrimmedDataError(
                shard_id=batch.shard_id,
                from_sequence=from_sequence,
                to_sequence=earliest,
                stream_arn=self.stream_arn,
                reason=reason,
            )
        log.warning(
            "shard %s: skipping trimmed records after %s to TRIM_HORIZON (%s)",
            batch.shard_id,
            from_sequence,
            reason,
        )
        batch.gap = TrimGap(
            shard_id=batch.shard_id, from_sequence=from_sequence, to_sequence=None, reason=reason
        )

    def _shard_gone(self, batch: ShardBatch, requested: str | None) -> ShardBatch:
        """The shard aged out of the stream while a checkpoint still pointed into it."""
        self._trimmed(
            batch,
            from_sequence=requested,
            earliest=None,
            reason=self.gone_reason,
        )
        batch.shard_ended = True
        batch.next_checkpoint = SHARD_END
        return batch
