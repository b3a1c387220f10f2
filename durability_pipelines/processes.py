"""Child processes in their own process group, stopped as a whole.

``dagster dev`` / ``dagster-daemon`` spawn code servers and run workers; a
detached Dagster process has been seen to ignore SIGTERM (a daemon kept running
after it), so stopping means: SIGTERM the group, wait, SIGKILL what is left, and check nothing stays.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def temporary_env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block (a Dagster instance or client built in it
    reads them), then put back what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def group_members(pgid: int) -> list[int]:
    """Live PIDs whose process group is ``pgid`` (read from /proc; zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # comm may contain spaces: split after the last ')'
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@dataclass
class ProcessGroup:
    """One command started as the leader of a new session, its output in ``log_path``."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> ProcessGroup:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(self.argv), cwd=str(self.cwd) if self.cwd else None, env=dict(self.env),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> list[int]:
        """Stop the whole group; returns PIDs that survived SIGKILL (should be empty)."""
        if self.proc is None:
            return []
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.1)
                if not group_members(pgid):
                    break
                time.sleep(0.2)
            if not group_members(pgid):
                break
        if self._log is not None:
            self._log.close()
            self._log = None
        return group_members(pgid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
