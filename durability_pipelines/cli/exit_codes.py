"""Exit codes and the error that carries one (see the package docstring for their meaning)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_ACCESS_DENIED = 5  # the server is up but refused the credentials / database: retrying will not help
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure with a message for the operator and the exit code to return."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code
