"""Hooks the readers call; here so that readers and the consumer contract share one definition."""

from __future__ import annotations

from collections.abc import Callable

#: ``on_call(operation_name, duration_ms)``: called after every call a reader makes to its backend
#: (retries too), e.g. to emit ``adapter.call.duration_ms``. Readers log its exceptions, never raise them.
CallHook = Callable[[str, float], None]
