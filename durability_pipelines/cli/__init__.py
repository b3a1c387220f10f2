"""``durability-pipelines``: the operator's command line for checkpoints, leases and dead letters.

Every command talks to the same Redis / Postgres the workers use (resolved by
``durability_pipelines.services``), prints errors with masked URLs to stderr
and exits non-zero, so it is safe to paste its output into a ticket and to
use it from scripts.  See ``docs/cli.md`` for the recipes it serves.

Exit codes: 0 ok, 1 refused (would move a checkpoint backwards, live lease,
disallowed transition), 2 bad input (including a malformed server URL) or
feature not available, 3 server or schema unavailable, 4 not found, 5 the
server answered but refused the credentials (or has no such database),
130 interrupted.

One module per command group (``checkpoints``, ``leases``, ``dead_letters``, ``schema``), the parser
(``parser``), the session every command gets (``session``), masking (``secrets``) and the exit-code
mapping (``exit_codes``, ``main``).
"""

from __future__ import annotations

from durability_pipelines.cli.exit_codes import (
    EXIT_ACCESS_DENIED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
)
from durability_pipelines.cli.main import main
from durability_pipelines.cli.parser import build_parser
from durability_pipelines.cli.session import Session

__all__ = [
    "EXIT_ACCESS_DENIED", "EXIT_INTERRUPTED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_REFUSED", "EXIT_UNAVAILABLE",
    "EXIT_USAGE", "CliError", "Session", "build_parser", "main",
]
