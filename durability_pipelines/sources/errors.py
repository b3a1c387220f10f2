"""Errors raised by the stream sources.

Each one means "stop and let a person decide": the checkpoint has not moved, and the message
names what was affected and the next step, because it is read in Dagster run logs and CLI output
by whoever is on call.
"""

from __future__ import annotations

from durability_pipelines.checkpoints.errors import DurabilityError

_SET_CHECKPOINT = "durability-pipelines checkpoints set ... --sequence <S> --force"


class SourceError(DurabilityError):
    """Base class for errors raised by a stream source."""


class TrimmedDataError(SourceError):
    """Records after the checkpoint are gone from the stream: data was lost for this consumer.

    DynamoDB keeps stream records 24 h. A consumer that falls further behind (or a checkpoint
    that belongs to another shard or stream) cannot be resumed without a decision, so the default
    policy fails instead of silently skipping the way KCL's adapter does.
    """

    def __init__(
        self,
        *,
        shard_id: str,
        from_sequence: str | None,
        to_sequence: str | None,
        stream_arn: str | None = None,
        reason: str = "",
    ) -> None:
        self.shard_id = shard_id
        self.from_sequence = from_sequence
        self.to_sequence = to_sequence
        self.stream_arn = stream_arn
        self.reason = reason
        start = f"after checkpoint {from_sequence}" if from_sequence else "from the shard's start"
        end = (
            f"up to the earliest available sequence {to_sequence} (exclusive)"
            if to_sequence
            else "up to the end of the shard (the whole rest of the shard is gone)"
        )
        where = f" of stream {stream_arn}" if stream_arn else ""
        because = f" ({reason})" if reason else ""
        super().__init__(
            f"shard {shard_id}{where}: records {start} {end} are no longer in the stream{because}. "
            "Those changes were lost for this consumer; the checkpoint was not moved. To go on: "
            "(1) recover the missing changes from the table itself or a backup/export if they matter; "
            "(2) then either rerun with trim_policy='skip_to_trim_horizon' (the skip is returned as a "
            "TrimGap for the audit log) or set the checkpoint explicitly with "
            f"`{_SET_CHECKPOINT}`. Prevent it: alert on consumer lag well before the 24 h retention."
        )


class StreamChangedError(SourceError):
    """The table's stream is not the one the checkpoints belong to.

    Disabling and re-enabling a stream (or recreating the table) creates a new stream with a new
    label, new shards and a new sequence space; old checkpoints mean nothing in it and changes
    made while the stream was off were never captured. Continuing silently would hide both.
    """

    def __init__(
        self,
        *,
        expected_label: str,
        actual_label: str | None,
        stream_arn: str | None = None,
        table_name: str | None = None,
    ) -> None:
        self.expected_label = expected_label
        self.actual_label = actual_label
        self.stream_arn = stream_arn
        self.table_name = table_name
        what = f"table {table_name!r}" if table_name else f"stream {stream_arn}"
        super().__init__(
            f"{what}: the stream was re-enabled under a new label (expected {expected_label!r}, "
            f"found {actual_label!r}{f', ARN {stream_arn}' if stream_arn else ''}). This is a new stream: "
            "checkpoints of the old one do not apply and changes made while the stream was disabled "
            "were never captured. To go on: drain the old stream ARN with its checkpoints if it is "
            "still readable (up to 24 h after it was disabled); reconcile the gap from the table; "
            "then start the new stream from TRIM_HORIZON under a stream name that includes the new "
            "label (fresh checkpoints) and set expected_label to the new label."
        )


class ThrottledError(SourceError):
    """Every attempt of a call was throttled; the bounded backoff is used up.

    Raised rather than retried forever so the batch fails visibly (nothing is checkpointed) and
    the orchestrator's retry policy decides when to try again.
    """

    def __init__(
        self, *, operation: str, attempts: int, code: str, shard_id: str | None = None, advice: str | None = None
    ) -> None:
        self.operation = operation
        self.attempts = attempts
        self.code = code
        self.shard_id = shard_id
        on = f" on shard {shard_id}" if shard_id else ""
        advice = advice or (
            "more than 2 readers per shard get throttled, so look for other consumers of this stream (Lambda "
            "triggers, KCL apps, a second deployment of this code location), poll less often"
        )
        super().__init__(
            f"{operation}{on} was throttled {attempts} times in a row ({code}); backoff exhausted. "
            f"Nothing was checkpointed, so the batch can simply be retried. If it persists: {advice}, or "
            "raise BackoffPolicy.max_attempts / max_delay_s."
        )


class StreamUnavailableError(SourceError):
    """The streams endpoint kept failing with server or connection errors (backoff exhausted)."""

    def __init__(self, *, operation: str, attempts: int, detail: str, shard_id: str | None = None) -> None:
        self.operation = operation
        self.attempts = attempts
        self.shard_id = shard_id
        on = f" on shard {shard_id}" if shard_id else ""
        super().__init__(
            f"{operation}{on} failed {attempts} times with a server or connection error ({detail}). "
            "Nothing was checkpointed; retry the batch. Check the endpoint (DURABILITY_DYNAMODB_ENDPOINT_URL "
            "or the AWS region), network access and the AWS service health."
        )


class ShardNotFoundError(SourceError):
    """A shard asked for by id is not in the stream and there is no checkpoint to judge a loss by."""

    def __init__(self, *, shard_id: str, stream_arn: str, known_shards: int) -> None:
        self.shard_id = shard_id
        self.stream_arn = stream_arn
        super().__init__(
            f"shard {shard_id} is not in stream {stream_arn} ({known_shards} shards listed). Check the "
            "shard id (take it from list_shards/readable_shards). If the shard existed earlier its "
            "records have aged out (24 h retention); its children are readable without it."
        )


class SourceAccessError(SourceError):
    """The source refused or could not authenticate these credentials: retrying will not help."""


class StreamNotFoundError(SourceError):
    """The table or its stream does not exist (or is not visible to these credentials)."""


class SequenceOutOfRangeError(SourceError):
    """A checkpoint lies beyond the end of a closed shard, so it was not produced by this shard.

    Reading on would treat records this consumer never saw as processed, so it stops instead.
    """

    def __init__(self, *, shard_id: str, sequence: str, ending_sequence: str, stream_arn: str) -> None:
        self.shard_id = shard_id
        self.sequence = sequence
        self.ending_sequence = ending_sequence
        super().__init__(
            f"position {sequence} for shard {shard_id} of {stream_arn} is beyond the shard's "
            f"EndingSequenceNumber {ending_sequence}: it was not produced by this shard (a checkpoint "
            "copied from another shard or stream?). Inspect the checkpoint history, then set the right "
            f"checkpoint with `{_SET_CHECKPOINT}` (SHARD_END if the shard was fully processed)."
        )


class SequenceNotInShardError(SourceError):
    """Kinesis says a checkpoint was not produced by this shard (or this stream): it belongs elsewhere.

    Reading from it would skip or repeat records of this shard, so the consumer stops instead.
    """

    def __init__(self, *, shard_id: str, sequence: str, stream_arn: str, detail: str = "") -> None:
        self.shard_id = shard_id
        self.sequence = sequence
        self.stream_arn = stream_arn
        said = f" ({detail})" if detail else ""
        super().__init__(
            f"position {sequence} for shard {shard_id} of {stream_arn} was not produced by this shard{said}: a "
            "checkpoint copied from another shard or stream, or the stream was deleted and recreated under the same "
            "name (a new stream: its checkpoints start over). Inspect the checkpoint history, then set the right "
            f"checkpoint with `{_SET_CHECKPOINT}`."
        )
