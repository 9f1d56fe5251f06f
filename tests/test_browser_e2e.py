"""Real browser, real stack: start a training run from the Prefect UI, find it in the MLflow UI.

Debian's Chromium driven by Playwright (``make browser-deps`` installs both; no browser is ever
downloaded). Screenshots of every step go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.test_stack import Stack, _start, _stop

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("RINGFLOW_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling Google on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
RUN_TIMEOUT_S = float(os.environ.get("RINGFLOW_E2E_RUN_TIMEOUT", "900"))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: run `make browser-deps` (Debian chromium + chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="run `make browser-deps`")
    profile = tempfile.mkdtemp(prefix="ringflow-chromium-")
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 1000},
        )
        ctx.set_default_timeout(30_000)
        try:
            yield ctx
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("e2e") / "home")
    _start(s)
    yield s
    _stop(s)


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


def _form_field(page, label: str):
    """The input of a schema-form property by its exact label (nested forms repeat the markup)."""
    return (
        page.locator(
            f"div.schema-form-property:has(> .p-label__header .schema-form-property__label:text-is('{label}'))"
        )
        .locator("input, textarea")
        .first
    )


@pytest.fixture
def page(browser):
    page = browser.new_page()
    yield page
    _shot(page, "last-page")  # what the browser showed when the test ended (pass or fail)
    page.close()


def test_custom_run_from_prefect_ui_shows_up_in_mlflow_ui(stack, page):
    epochs = 2  # smoke default is 3: the changed value must reach the run
    reason = f"browser-e2e-{uuid.uuid4().hex[:8]}"
    started = int(time.time() * 1000)

    # --- Prefect UI: deployments -> training-pipeline -> Run -> Custom run
    page.goto(f"http://127.0.0.1:{stack.prefect_port}/deployments")
    page.get_by_role("link", name="training-pipeline").first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/"))
    page.get_by_role("button", name="Run", exact=True).wait_for()
    _shot(page, "01-prefect-deployment")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.wait_for_url(re.compile(r"/run\?"))
    field = _form_field(page, "Epochs (Optional)")
    field.fill(str(epochs))
    # the config's field docstrings reach the form as descriptions
    page.get_by_text("Most epochs (early stopping may end sooner).").first.wait_for(timeout=10_000)
    reason_field = _form_field(page, "reason (Optional)")
    reason_field.fill(reason)
    _form_field(page, "Epochs (Optional)").scroll_into_view_if_needed()
    _shot(page, "02-prefect-custom-run-form")
    page.get_by_role("button", name="Submit").click()

    # The UI returns to the deployment and toasts the new run; find it by its unique reason.
    flow_run_id = None
    deadline = time.monotonic() + 60
    while flow_run_id is None and time.monotonic() < deadline:
        found = httpx.post(f"{stack.api}/flow_runs/filter", json={"limit": 50}).json()
        flow_run_id = next((r["id"] for r in found if r["parameters"].get("reason") == reason), None)
        if flow_run_id is None:
            time.sleep(1)
    assert flow_run_id, "submitting the custom-run form created no flow run"
    page.goto(f"http://127.0.0.1:{stack.prefect_port}/runs/flow-run/{flow_run_id}")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    state = None
    while time.monotonic() < deadline:
        fr = httpx.get(f"{stack.api}/flow_runs/{flow_run_id}").json()
        state = fr["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(1)
    page.reload()
    if state == "COMPLETED":
        page.get_by_text("Completed").first.wait_for(timeout=30_000)
    _shot(page, "03-prefect-flow-run")
    assert state == "COMPLETED", f"flow run {flow_run_id} ended {state}; see {SHOTS}/03-prefect-flow-run.png"
    assert fr["parameters"]["config"]["training"]["epochs"] == epochs
    assert fr["parameters"]["reason"] == reason

    # --- MLflow: the training run of that flow run (tagged with the reason, else the newest one)
    ml = f"http://127.0.0.1:{stack.mlflow_port}"
    exp = httpx.get(
        f"{ml}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": fr["parameters"]["config"]["registry"]["experiment"]},
    ).json()
    exp_id = exp["experiment"]["experiment_id"]
    runs = (
        httpx.post(
            f"{ml}/api/2.0/mlflow/runs/search",
            json={
                "experiment_ids": [exp_id],
                "filter": f"attributes.start_time >= {started}",
                "order_by": ["attributes.start_time DESC"],
                "max_results": 50,
            },
        )
        .json()
        .get("runs", [])
    )
    assert runs, "no MLflow run was started by the flow run"
    tagged = [
        r
        for r in runs
        if any(t["key"] == "ringflow.reason" and t["value"] == reason for t in r["data"].get("tags", []))
    ]
    run = (tagged or runs)[0]
    run_id = run["info"]["run_id"]
    metric_keys = sorted(m["key"] for m in run["data"].get("metrics", []))
    assert metric_keys, f"MLflow run {run_id} has no metrics"

    page.goto(f"{ml}/#/experiments/{exp_id}/runs/{run_id}")
    page.get_by_text(metric_keys[0], exact=True).first.wait_for()
    _shot(page, "04-mlflow-run")

    model = fr["parameters"]["config"]["registry"]["model_name"]
    champion = httpx.get(
        f"{ml}/api/2.0/mlflow/registered-models/alias", params={"name": model, "alias": "champion"}
    ).json()
    assert "model_version" in champion, f"no @champion alias on {model}: {champion}"
    page.goto(f"{ml}/#/models/{model}")
    page.get_by_text("champion").first.wait_for()
    _shot(page, "05-mlflow-registered-model")


def test_evidently_ui_shows_the_monitoring_trend_dashboard(stack, page):
    """Monitoring snapshots in $RINGFLOW_HOME/evidently (as every monitoring run adds them) appear
    in the stack's Evidently UI with the trend panels: drift share, prediction PSI, AUC per batch."""
    import datetime as dt

    import numpy as np

    from ringflow.monitoring.reports import (
        DASHBOARD_PANELS,
        WORKSPACE_DIR,
        EvidentlyWorkspace,
        RuleThresholds,
        build_reports,
    )
    from tests.test_conventions import _batch

    rng = np.random.default_rng(1)
    reference = _batch(rng, 2000, 0.0, 0.0, 0.1)
    workspace = EvidentlyWorkspace(path=str(stack.home / WORKSPACE_DIR), project="flights-delay")
    for month, (shift, unseen, missing) in enumerate([(0.0, 0.0, 0.1), (0.5, 0.05, 0.2), (1.0, 0.2, 0.5)], start=3):
        build_reports(
            reference,
            _batch(rng, 2000, shift, unseen, missing),
            ["x"],
            ["c"],
            stack.home / f"report-{month}",
            target="target",
            rules=RuleThresholds(vocabulary={"c": ["a", "b"]}),
            workspace=workspace,
            batch_label=f"2013-{month:02d}",
            batch_time=dt.datetime(2013, month, 1),
        )
    ui = f"http://127.0.0.1:{stack.evidently_port}"
    projects = httpx.get(f"{ui}/api/projects", timeout=30).json()
    project_id = next(p["id"] for p in projects if p["name"] == "flights-delay")
    page.goto(f"{ui}/projects/{project_id}")
    for title in DASHBOARD_PANELS:
        page.get_by_text(title).first.wait_for(timeout=60_000)
    page.wait_for_timeout(2000)  # let the plots draw
    _shot(page, "06-evidently-dashboard")


def test_docs_site_renders_every_page_in_the_browser(page, tmp_path):
    """The built site, served over HTTP, in Chromium: every page of the nav shows its title and
    content; screenshots of the home page and the configuration reference."""
    import functools
    import http.server
    import threading

    import yaml

    from tests.test_docs import _nav_pages, _page_html, build_site

    site = build_site(tmp_path / "site")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        pages = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
        for doc in pages:
            url = base + "/" + str(_page_html(site, doc).relative_to(site).parent).strip(".") + "/"
            response = page.goto(url.replace("//", "/").replace("http:/", "http://"))
            assert response is not None and response.status == 200, (doc, url)
            title = page.locator("article h1").first
            assert title.is_visible() and title.inner_text().strip(), f"{doc}: no title at {url}"
            if doc in ("index.md", "reference/config.md"):
                _shot(page, "docs-" + doc.replace("/", "-").removesuffix(".md"))
        page.goto(base + "/reference/config/")
        assert page.get_by_text("training.world_size").first.is_visible()
    finally:
        server.shutdown()
