"""The real Dagster UI of a running demo, looked at in headless Chromium as a person would.

``durability-pipelines demo --port <free>`` (interactive mode) runs on a private PostgreSQL and Redis
(tests/support/demo_process.py): moto DynamoDB, the Supabase change feed, dagster-daemon and
dagster-webserver with the three starter consumers. Once every consumer job has a successful run
(asked of the webserver's GraphQL API), Chromium (Debian's package, driven by Python Playwright:
tests/support/browser.py) checks what the UI shows:

* Automation: the three consumer sensors (and the mirror schedule), each switched on;
* Runs: a successful run of a consumer job, launched by its sensor, and its run page with its op
  (``drain_shard``, which drains the shard batch by batch) succeeded;
* Catalog: the audit asset ``checkpoint_audit`` with its description, checks and lineage, and its
  preview showing a 23-digit change-feed position in full (never a float);
* the asset graph: the stream ``streams/dynamodb/orders``, observed by the consumers' sensors (its events
  list an observation with the lag), upstream of the sink
  ``orders_to_realtime/orders_to_realtime_realtime_orders``, whose Plots tab draws the runs' lag figure, and its lag check;
* downstream of a sink: ``orders_worker_events_per_minute``, materialized by itself (declarative automation,
  its sensor ``orders_worker_automation`` switched on) once the starter has written events;
* the code location's Docs tab, documenting the ``StreamConsumer`` component.

The runs page is saved as a screenshot in the test's temporary directory, or as the tracked
``docs/screenshot-ui.png`` when ``DURABILITY_REFRESH_SCREENSHOT=1`` (tests leave the tree as found). At the end the demo gets SIGINT (Ctrl-C) and
must stop everything it started by itself; then every process group it had is checked empty.
Every wait is a hang guard that returns as soon as its condition holds.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from durability_pipelines import services
from tests.support.browser import chromium_context, ensure_chromium, ensure_playwright
from tests.support.demo_process import DemoProcess, StopReport, isolated_services

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parent.parent
DOCS_SCREENSHOT = REPO / "docs" / "screenshot-ui.png"
REFRESH_SCREENSHOT_ENV = "DURABILITY_REFRESH_SCREENSHOT"
CONSUMERS = ("orders_worker", "orders_to_realtime", "supabase_orders_worker")
JOBS = {f"{c}_job" for c in CONSUMERS}
SENSORS = [f"{c}_sensor" for c in CONSUMERS]
UI_TIMEOUT_MS = 30_000
# Variables of the caller's environment that must not leak into the demo: it makes its own.
NOT_INHERITED = ("DAGSTER_HOME", "DAGSTER_POSTGRES_URL", "DURABILITY_DYNAMODB_ENDPOINT_URL",
                 "DURABILITY_CONSUMERS_DIR", "DURABILITY_OBSERVABILITY_JSONL")


def _draining_runs(demo: DemoProcess) -> dict[str, dict[str, Any]]:
    """Newest draining or finished run per consumer job, as the webserver reports them: a consumer's run
    drains for ten minutes and hands its shard on, so on a busy demo the first ones are still running."""
    newest: dict[str, dict[str, Any]] = {}
    for run in demo.runs(["STARTED", "SUCCESS"]):
        if run["jobName"] in JOBS:
            newest.setdefault(run["jobName"], run)
    return newest


def _skip_community_modal(page: Any) -> None:
    """Dagster shows a one-time 'Join the Dagster community' dialog over the first page: skip it
    whenever it shows up, before any action or assertion."""
    skip = page.get_by_role("button", name="Skip")
    page.add_locator_handler(page.get_by_text("Join the Dagster community"), lambda _: skip.click())


def _check_ui(demo: DemoProcess, tmp_path: Path, run: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    base = demo.base_url
    with chromium_context(tmp_path / "chromium-profile", viewport=(1440, 1000), timeout_ms=UI_TIMEOUT_MS) as context:
        page = context.new_page()
        _skip_community_modal(page)
        expect.set_options(timeout=UI_TIMEOUT_MS)

        # 1. Automation: the three sensors, switched on, and the mirror schedule
        page.goto(f"{base}/automation")
        for name in [*SENSORS, "checkpoint_mirror_schedule"]:
            row = page.locator("[data-index]").filter(has=page.locator(f'a[href$="/{name}"]'))
            expect(row).to_have_count(1)
            expect(row).to_contain_text(name)
            expect(row.locator("input[type=checkbox]").last).to_be_checked()  # the on/off switch
        expect(page.locator("body")).to_contain_text("Standard sensor")

        # 2. Runs: every consumer job draining (or done), each launched by its sensor
        short = run["runId"][:8]
        page.goto(f"{base}/runs")
        rows = page.locator("[data-index]")
        for job in sorted(JOBS):  # (not preceded by a name character: orders_worker_job vs supabase_...)
            expect(rows.filter(has_text=re.compile(rf"(^|[^a-z_]){job}")).first).to_contain_text(
                re.compile("Started|Success"))
        row = rows.filter(has_text=short)
        expect(row).to_have_count(1)
        expect(row).to_contain_text(run["jobName"])
        expect(row).to_contain_text(run["jobName"].removesuffix("_job") + "_sensor")
        expect(page.get_by_text("Join the Dagster community")).to_have_count(0)
        page.wait_for_load_state("networkidle")
        shot = screenshot_path(tmp_path)
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))

        # ... and its run page: its op draining the shard, batch after batch
        page.goto(f"{base}/runs/{run['runId']}")
        body = page.locator("body")
        expect(body).to_contain_text(f"Run of {run['jobName']}")
        expect(body).to_contain_text("drain_shard")
        expect(body).to_contain_text(re.compile(r"batch \d+ shard"))  # a batch's record in the event log

        # 3. Catalog: the audit asset, then its own page (description, checks, upstream mirror)
        page.goto(f"{base}/assets")
        expect(page.locator('a[href="/assets/checkpoint_audit"]').first).to_be_visible()
        expect(page.locator("body")).to_contain_text("One row per checkpoint key")
        page.goto(f"{base}/assets/checkpoint_audit")
        body = page.locator("body")
        expect(body).to_contain_text("One row per checkpoint key")
        expect(body).to_contain_text("checkpoint_mirror")  # upstream in its lineage
        expect(body).to_contain_text("Latest check results")
        # its preview (latest materialization's metadata) shows positions as text, all their digits
        demo.wait_until(lambda: _audit_position(demo), timeout=150, what="an audit preview with a 22-digit "
                        "position (the mirror schedule runs every minute)", every=3)
        page.goto(f"{base}/assets/checkpoint_audit?view=events")
        page.get_by_text("[Show Markdown]").first.click()
        preview = page.get_by_role("dialog")
        expect(preview).to_contain_text("checkpoint_key")
        expect(preview).to_contain_text(re.compile(r"(?<![\d.])\d{22,}(?![\d.])"))  # every digit, as text
        expect(preview).not_to_contain_text(re.compile(r"\de\+\d|nan"))  # never a float, never nan
        page.keyboard.press("Escape")

        # 4. The asset graph: stream -> sink; the sink's plots and lag check
        sink = "orders_to_realtime/orders_to_realtime_realtime_orders"
        page.goto(f"{base}/assets/{sink}")
        body = page.locator("body")
        expect(body).to_contain_text("Supabase Realtime broadcast topic 'orders'")
        expect(body).to_contain_text("Upstream assetsstreams / dynamodb / orders")  # its lineage
        expect(body).to_contain_text("reactive.lag_seconds")  # the run's figures, in its metadata
        page.goto(f"{base}/assets/{sink}?view=checks")
        expect(page.locator("body")).to_contain_text("lag_within_objective")
        demo.wait_until(lambda: _stream_observed(demo), timeout=150, every=3,
                        what="an observation of streams/dynamodb/orders (the sensors observe it once a minute)")
        page.goto(f"{base}/assets/streams/dynamodb/orders?view=events")
        events = page.locator("body")  # the stream's events: observed by the consumers, with their lag
        expect(events).to_contain_text("Observed")
        expect(events).to_contain_text(re.compile(r"seen by consumer \w+: \d+ shard\(s\), worst lag"))
        expect(events).to_contain_text("reactive.lag_seconds")
        page.goto(f"{base}/assets/streams/dynamodb/orders")
        expect(page.locator("body")).to_contain_text("DynamoDB Streams stream of table 'orders' in us-east-1")
        expect(page.locator("body")).to_contain_text("orders_to_realtime / orders_to_realtime_realtime_orders")  # downstream
        page.goto(f"{base}/assets/{sink}")
        page.get_by_text("Plots", exact=True).click()  # the overview's metadata: Table | Plots
        plots = page.locator("body")
        expect(plots).to_contain_text("reactive.lag_seconds")
        expect(plots).to_contain_text("events_per_s")
        expect(plots.locator("canvas").first).to_be_visible()  # drawn, not only listed

        # 5. Downstream of a sink: the starter's events_per_minute table, materialized by its automation sensor
        derived = "orders_worker/orders_worker_events_per_minute"
        demo.wait_until(lambda: _derived_materialized(demo), timeout=180, every=3,
                        what="declarative automation to materialize orders_worker_events_per_minute")
        page.goto(f"{base}/assets/{derived}")
        body = page.locator("body")
        expect(body).to_contain_text("Rebuilt whenever the sink is materialized")
        expect(body).to_contain_text("orders_worker / orders_worker_stream_events")  # upstream: the sink
        expect(body).to_contain_text("events_in_window")  # its latest materialization's figures
        page.goto(f"{base}/automation")
        row = page.locator("[data-index]").filter(has=page.locator('a[href$="/orders_worker_automation"]'))
        expect(row).to_have_count(1)
        expect(row.locator("input[type=checkbox]").last).to_be_checked()

        # 6. The code location's Docs tab: the component type and its attributes
        page.goto(f"{base}/locations/__repository__@durability_pipelines/docs")
        expect(page.locator("body")).to_contain_text("Components")
        # follow the links' targets: Dagster's community dialog can sit over the sidebar
        package = page.get_by_role("link", name="durability_pipelines", exact=True)
        page.goto(base + package.get_attribute("href"))  # the package of component types
        component = page.get_by_role("link", name="durability_pipelines.components.StreamConsumer").first
        page.goto(base + component.get_attribute("href"))
        docs = page.locator("body")
        expect(docs).to_contain_text("dg scaffold defs durability_pipelines.components.StreamConsumer")
        expect(docs).to_contain_text("max_lag_s")  # its attributes' schema, with their descriptions
        expect(docs).to_contain_text("the lag objective")


AUDIT_PREVIEW = """{ assetOrError(assetKey: {path: ["checkpoint_audit"]}) { ... on Asset {
  assetMaterializations(limit: 1) { metadataEntries { label ... on MarkdownMetadataEntry { mdStr } } } } } }"""


def _audit_position(demo: DemoProcess) -> str | None:
    """A position of 22+ digits (a float would show 1.187e+22) in the latest audit
    preview, as the webserver serves it; None until the mirror schedule has materialized one."""
    mats = demo.graphql(AUDIT_PREVIEW)["assetOrError"].get("assetMaterializations") or []
    previews = [e.get("mdStr") or "" for m in mats for e in m["metadataEntries"] if e["label"] == "preview"]
    found = re.findall(r"(?<![\d.])\d{22,}(?![\d.])", " ".join(previews))
    return found[0] if found else None


STREAM_OBSERVATIONS = """{ assetOrError(assetKey: {path: ["streams", "dynamodb", "orders"]}) {
  ... on Asset { assetObservations(limit: 1) { runId metadataEntries { label } } } } }"""


def _stream_observed(demo: DemoProcess) -> bool:
    """The stream asset has an observation with the consumer's lag (what its sensor records)."""
    found = demo.graphql(STREAM_OBSERVATIONS)["assetOrError"].get("assetObservations") or []
    return any(e["label"] == "reactive.lag_seconds" for o in found for e in o["metadataEntries"])


DERIVED_RUNS = """{ assetOrError(assetKey: {path: ["orders_worker", "orders_worker_events_per_minute"]}) {
  ... on Asset { assetMaterializations(limit: 1) { runId } } } }"""


def _derived_materialized(demo: DemoProcess) -> bool:
    """The derived asset has a materialization, from a run the automation sensor launched."""
    mats = demo.graphql(DERIVED_RUNS)["assetOrError"].get("assetMaterializations") or []
    return bool(mats)


def test_dagster_ui_shows_the_running_demo(tmp_path: Path) -> None:
    ensure_playwright()
    ensure_chromium()  # fail (or install) before starting anything
    started = time.monotonic()
    with isolated_services() as service_env:
        env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
        env.update(service_env)
        demo = DemoProcess(services.free_port(), env, tmp_path / "demo.log").start()
        report: StopReport | None = None
        try:
            demo.wait_until(demo.http_ok, timeout=120, what="answer from dagster-webserver")
            # every consumer job has run successfully through the real daemon -> sensor -> run path
            runs = demo.wait_until(lambda: (r := _draining_runs(demo)) and set(r) == JOBS and r,
                                   timeout=150, what="a draining run of every consumer job", every=2)
            ready_s = time.monotonic() - started
            _check_ui(demo, tmp_path, runs["orders_to_realtime_job"])
        finally:
            report = demo.stop()
        print(f"ready after {ready_s:.0f}s; stopped in {report.seconds:.1f}s; groups {report.groups}")
    assert not report.survivors, f"processes left after stopping the demo: {report.survivors}"
    assert report.exit_code == 0 and report.graceful, (
        f"the demo did not stop everything on SIGINT by itself ({report}); log:\n{demo.log_tail()}")
    assert len(report.groups) >= 3  # the demo, dagster-daemon and dagster-webserver were all seen
    assert screenshot_path(tmp_path).stat().st_size > 20_000


def screenshot_path(tmp_path: Path) -> Path:
    return DOCS_SCREENSHOT if os.environ.get(REFRESH_SCREENSHOT_ENV) == "1" else tmp_path / "screenshot-ui.png"
