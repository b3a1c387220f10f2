"""A private Prometheus and Pushgateway (Debian's ``prometheus`` and ``prometheus-pushgateway``) for tests.

``ensure_monitoring()`` installs the two packages when a binary is missing and we are root (as in CI;
``.ci/run`` does it up front), otherwise it raises with the command to run. Both servers run as the
test's own processes on free ``127.0.0.1`` ports, with their data in the test's directory; Prometheus
scrapes the private Pushgateway every second with ``honor_labels: true`` (the pushed ``job`` and
``instance`` labels are kept), as a real deployment scrapes a Pushgateway.

    ensure_monitoring()
    with PrivatePushgateway(tmp_path / "pgw") as gateway, PrivatePrometheus(tmp_path / "prom", gateway) as prom:
        prom.wait_for('reactive_events_total{consumer="c"}', timeout=60)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.servers import _ServerProcess

PROMETHEUS = Path("/usr/bin/prometheus")
PUSHGATEWAY = Path("/usr/bin/prometheus-pushgateway")
APT_PACKAGES = ("prometheus", "prometheus-pushgateway")


class MonitoringUnavailable(RuntimeError):
    """Prometheus or the Pushgateway is missing and cannot be installed from here."""


def _works(path: Path) -> bool:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def ensure_monitoring(*, timeout_s: float = 900.0) -> tuple[Path, Path]:
    """``(prometheus, pushgateway)`` binaries, installed with apt-get when missing and we are root. Idempotent."""
    if _works(PROMETHEUS) and _works(PUSHGATEWAY):
        return PROMETHEUS, PUSHGATEWAY
    command = f"apt-get update && apt-get install -y {' '.join(APT_PACKAGES)}"
    if os.geteuid() != 0:
        raise MonitoringUnavailable(f"{PROMETHEUS} or {PUSHGATEWAY} is missing and this process is not root, so it "
                                    f"cannot install them. Run once: sudo sh -c '{command}'")
    if shutil.which("apt-get") is None:
        raise MonitoringUnavailable(f"{PROMETHEUS} or {PUSHGATEWAY} is missing and there is no apt-get")
    # policy-rc.d style: the packages' services are not started (no systemd here); we start our own.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise MonitoringUnavailable(f"`{' '.join(cmd)}` did not finish in {timeout_s:.0f}s") from exc
        if out.returncode != 0:
            raise MonitoringUnavailable(
                f"`{' '.join(cmd)}` failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    if not (_works(PROMETHEUS) and _works(PUSHGATEWAY)):
        raise MonitoringUnavailable(f"apt-get installed {APT_PACKAGES} but {PROMETHEUS} / {PUSHGATEWAY} "
                                    "--version does not answer")
    return PROMETHEUS, PUSHGATEWAY


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own loopback server
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


class PrivatePushgateway(_ServerProcess):
    kind = "pushgateway"

    def __init__(self, base_dir: Path, port: int | None = None) -> None:
        base_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(base_dir, port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        return [str(PUSHGATEWAY), f"--web.listen-address={self.host}:{self.port}"]

    def _ready(self) -> bool:
        return _get(f"{self.url}/-/ready", 1.0)[0] == 200

    def metrics_text(self) -> str:
        return _get(f"{self.url}/metrics")[1].decode(errors="replace")


class PrivatePrometheus(_ServerProcess):
    kind = "prometheus"

    def __init__(self, base_dir: Path, gateway: PrivatePushgateway, port: int | None = None,
                 scrape_interval: str = "1s") -> None:
        base_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(base_dir, port)
        self.gateway = gateway
        self.scrape_interval = scrape_interval

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _prepare(self) -> None:
        (self.base_dir / "data").mkdir(exist_ok=True)
        (self.base_dir / "prometheus.yml").write_text(
            "global:\n"
            f"  scrape_interval: {self.scrape_interval}\n"
            f"  evaluation_interval: {self.scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: pushgateway\n"
            "    honor_labels: true\n"
            f"    scrape_interval: {self.scrape_interval}\n"
            "    static_configs:\n"
            f"      - targets: ['{self.gateway.host}:{self.gateway.port}']\n"
        )

    def _command(self) -> list[str]:
        return [str(PROMETHEUS), f"--config.file={self.base_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.base_dir / 'data'}", f"--web.listen-address={self.host}:{self.port}"]

    def _ready(self) -> bool:
        return _get(f"{self.url}/-/ready", 1.0)[0] == 200

    def query(self, promql: str) -> list[dict[str, Any]]:
        """``/api/v1/query``: the instant vector's samples (``[{"metric": {...}, "value": [ts, "v"]}]``)."""
        status, body = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if status != 200:
            raise AssertionError(f"query {promql!r} answered {status}: {body[:500]!r}")
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll until ``promql`` returns samples (a scrape happened after the push); fail with what is known."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.query(promql)
            if found:
                return found
            if time.monotonic() > deadline:
                targets = _get(f"{self.url}/api/v1/targets")[1][:2000]
                raise AssertionError(f"no samples for {promql!r} in {timeout:.0f}s; targets: {targets!r}; "
                                     f"the Pushgateway holds:\n{self.gateway.metrics_text()[-3000:]}")
            time.sleep(0.25)
