"""A consumer sensor whose stream cannot be read skips its tick with one line saying what to do.

Without this, a source that is not there (no AWS credentials, no table ``orders``, no ``public.orders``,
an endpoint that refuses connections) fails every tick, every 4 s, with a stack trace: a page of red
ticks on a fresh machine, and the one sentence that matters buried in it. The source's own errors
already say what to do (``sources/errors.py``); a skip shows that sentence in the tick list and the
daemon log, keeps the cursor as it was, and the sensor goes on by itself once the source is there.

Failures of the checkpoint stores (Redis, Postgres) still fail the tick: those are this deployment's
own infrastructure, and a failing tick is what an operator alerts on.
"""

# No `from __future__ import annotations`: Dagster reads the wrapped sensor's parameter annotations.

from collections.abc import Callable

from dagster import SensorEvaluationContext, SensorResult

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.orchestration.resources import DurabilityResource
from durability_pipelines.sources.errors import (
    SourceAccessError,
    SourceError,
    StreamNotFoundError,
    StreamUnavailableError,
)
from durability_pipelines.sources.supabase_changes import ChangeFeedNotInstalledError

#: Errors that mean "the source is not there (yet)": on a development machine the command below makes it.
NOT_PROVISIONED = (SourceAccessError, StreamNotFoundError, StreamUnavailableError, ChangeFeedNotInstalledError,
                   ConfigError)
SETUP_COMMAND = "python3 dev.py setup"
SETUP_HINT = (f"On a development machine `{SETUP_COMMAND}` creates the starters' sources (a local DynamoDB "
              "with table `orders`, public.orders with its change feed); then restart `dagster dev` "
              "(docs/getting-started.md, Using dagster dev).")

SensorFn = Callable[[SensorEvaluationContext, DurabilityResource], SensorResult]


def source_not_ready(cfg: ConsumerConfig, exc: Exception) -> str:
    """The tick's skip reason: which consumer, what is wrong with its source, what to do."""
    message = f"{cfg.name}: {cfg.adapter} stream {cfg.stream} cannot be read: {type(exc).__name__}: {exc}"
    return f"{message} {SETUP_HINT}" if isinstance(exc, NOT_PROVISIONED) else message


def skip_when_source_not_ready(cfg: ConsumerConfig) -> Callable[[SensorFn], SensorFn]:
    """Decorate a consumer sensor's evaluation function (beneath ``@sensor``): a source error skips the
    tick with :func:`source_not_ready`'s line instead of failing it."""

    def decorate(evaluate: SensorFn) -> SensorFn:
        def guarded(context: SensorEvaluationContext, durability: DurabilityResource) -> SensorResult:
            try:
                return evaluate(context, durability)
            except (SourceError, ConfigError) as exc:
                reason = source_not_ready(cfg, exc)
                context.log.warning(reason)
                return SensorResult(skip_reason=reason)

        guarded.__name__ = getattr(evaluate, "__name__", "guarded")
        guarded.__doc__ = evaluate.__doc__
        return guarded

    return decorate
