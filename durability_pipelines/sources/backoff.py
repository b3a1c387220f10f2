"""Bounded exponential backoff with full jitter.

Bounded, because a reader that retries forever hides an outage from the orchestrator; jittered
("full jitter": a uniform delay in ``[0, min(max_delay, base * 2**n)]``), because several workers
throttled by the same shard would otherwise retry in lock-step and be throttled again. ``sleep``
and ``random`` are injectable so tests run without waiting and deterministically.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from durability_pipelines.checkpoints.errors import ConfigError

T = TypeVar("T")

#: ``base * 2**n`` is computed with ``n`` capped here so huge attempt numbers cannot overflow a float.
_MAX_EXPONENT = 62


@dataclass(frozen=True)
class BackoffPolicy:
    """How often and how long to retry a transient failure.

    ``max_attempts`` counts every attempt including the first, so ``max_attempts=1`` never
    retries and the policy sleeps at most ``max_attempts - 1`` times.
    """

    max_attempts: int = 6
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    jitter: bool = True
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    random: Callable[[], float] = field(default=_random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(
                f"BackoffPolicy.max_attempts must be an integer >= 1, got {self.max_attempts!r}"
            )
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ConfigError(
                f"BackoffPolicy delays must be >= 0, got base_delay_s={self.base_delay_s!r}, "
                f"max_delay_s={self.max_delay_s!r}"
            )
        if self.max_delay_s < self.base_delay_s:
            raise ConfigError(
                f"BackoffPolicy.max_delay_s ({self.max_delay_s}) must be >= base_delay_s ({self.base_delay_s})"
            )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        exponent = min(max(retry - 1, 0), _MAX_EXPONENT)
        ceiling = min(self.max_delay_s, self.base_delay_s * (2.0**exponent))
        if not self.jitter:
            return ceiling
        return ceiling * min(max(self.random(), 0.0), 1.0)

    def delays(self) -> Iterator[float]:
        """The ``max_attempts - 1`` waits between attempts (fresh jitter for each)."""
        for retry in range(1, self.max_attempts):
            yield self.delay(retry)

    def call(
        self,
        fn: Callable[[], T],
        *,
        is_retryable: Callable[[BaseException], bool],
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> T:
        """Run ``fn``; retry while ``is_retryable(exc)``; re-raise the last error when attempts run out.

        ``on_retry(retry_number, error, delay_s)`` is called before each sleep (for logs/metrics).
        Non-retryable errors propagate at once.
        """
        retry = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                retry += 1
                if retry >= self.max_attempts or not is_retryable(exc):
                    raise
                wait = self.delay(retry)
                if on_retry is not None:
                    on_retry(retry, exc, wait)
                self.sleep(wait)
