"""Headless Chromium for UI tests: Debian's ``chromium`` package driven by Python Playwright.

Playwright's own browser download (``playwright install``) cannot work here (no network but the
package registries), so tests launch the system browser at ``/usr/bin/chromium`` through
``executable_path``. ``ensure_chromium()`` installs the Debian package when it is missing and we
are root (as in CI); otherwise it raises with the command to run.

    ensure_chromium()
    with chromium_context(tmp_path / "profile") as context:
        page = context.new_page()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
APT_PACKAGE = "chromium"
# The flags this machine needs (env notes for python-svc): no sandbox as root, no GPU, and no
# background connections, which the closed network would refuse many at a time. Playwright adds
# --headless itself; the profile directory is a fresh one per launch (launch_persistent_context).
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class BrowserUnavailable(RuntimeError):
    """Chromium or Playwright is missing and cannot be installed from here."""


def _works(path: Path) -> bool:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "Chromium" in out.stdout


def ensure_chromium(*, timeout_s: float = 900.0) -> Path:
    """``/usr/bin/chromium``, installed with apt-get when missing and we are root. Idempotent."""
    if CHROMIUM.exists() and _works(CHROMIUM):
        return CHROMIUM
    if os.geteuid() != 0:
        raise BrowserUnavailable(
            f"{CHROMIUM} is missing and this process is not root, so it cannot install it. Run once: "
            f"sudo apt-get update && sudo apt-get install -y {APT_PACKAGE}")
    if shutil.which("apt-get") is None:
        raise BrowserUnavailable(f"{CHROMIUM} is missing and there is no apt-get to install Debian's {APT_PACKAGE!r}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # With recommends: they bring the fonts that make screenshots legible.
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", APT_PACKAGE]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise BrowserUnavailable(f"`{' '.join(cmd)}` did not finish in {timeout_s:.0f}s") from exc
        if out.returncode != 0:
            raise BrowserUnavailable(
                f"`{' '.join(cmd)}` failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    if not _works(CHROMIUM):
        raise BrowserUnavailable(f"apt-get installed {APT_PACKAGE!r} but {CHROMIUM} --version does not answer")
    return CHROMIUM


def ensure_playwright() -> Any:
    """The ``playwright.sync_api`` module (the ``playwright`` package of the project's ``dev`` extra)."""
    try:
        from playwright import sync_api
    except ImportError as exc:
        raise BrowserUnavailable(
            "Python Playwright is not installed: pip install -e '.[dev]' (it needs no browser download; "
            "the tests use Debian's chromium)") from exc
    return sync_api


@contextlib.contextmanager
def chromium_context(profile_dir: Path, *, viewport: tuple[int, int] = (1440, 900),
                     timeout_ms: float = 30_000) -> Iterator[Any]:
    """A headless Chromium ``BrowserContext`` on a fresh profile directory, closed on exit."""
    sync_api = ensure_playwright()
    executable = ensure_chromium()
    profile_dir.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile_dir), executable_path=str(executable), headless=True, args=list(CHROMIUM_ARGS),
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        context.set_default_timeout(timeout_ms)
        try:
            yield context
        finally:
            context.close()
