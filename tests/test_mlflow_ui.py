"""The MLflow UI, served by the product's own command on loopback, opened in headless Chromium driven by Selenium.

Chromium and its driver (Debian's ``chromium``, ``chromium-driver``: one version) come from the set-up step. Each check
waits for what it reads to be rendered (a real deadline, ``patience``-scaled), never for a fixed budget: a snapshot
taken after a time budget raced the single-page app's requests on a loaded machine. Screenshots go to ``test-output/``.
"""
import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from services import patience
from test_sweep_analysis import synthetic_trials

from pipeline import system_metrics
from pipeline.config import REPO_ROOT, flatten, load_config
from pipeline.tracking import create_run, resolve_tracking_uri
from tune.analysis import write_analysis
from tune.spec import load_sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(None in (CHROMIUM, CHROMEDRIVER) and not os.environ.get("CI"),
                                reason="chromium or chromium-driver is not installed (scripts/setup.sh installs them)")


@pytest.fixture
def mlflow_ui(varcon_home, mlflow_server):
    """A store holding a sweep (parent run, two child trials), served on 127.0.0.1 by ``ui_command``."""
    uri = resolve_tracking_uri()
    parent = create_run(uri, "ui-check", "sweep", "sweep-digits", {"searcher": "random"})
    for trial in range(2):
        config = load_config(None, [f"name=trial-{trial}", "tracking.experiment=ui-check"])
        run = create_run(uri, "ui-check", f"trial-{trial}", config.name, flatten(config), parent_run_id=parent.run_id)
        run.log_metrics({"val_knn_top1_k20": 0.5 + trial / 10}, step=1)
        with system_metrics.node_monitor(run.run_id, uri, 0.5, "node0-test"):  # this machine, sampled for real
            time.sleep(3)
        run.end()
    spec = load_sweep("configs/tune/digits_asha.yaml", ["tune.scheduler=fifo"])
    rows, records = synthetic_trials(spec)
    analysis_folder = varcon_home / "analysis"
    analysis_folder.mkdir()
    write_analysis(spec, rows, records, analysis_folder)
    parent.log_artifacts(analysis_folder, "analysis")
    parent.end()
    server = mlflow_server(uri)
    assert server.command[server.command.index("--host") + 1] == "127.0.0.1"  # never public by default
    return server.url, parent


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium through its own driver (paths given: Selenium Manager neither looks nor downloads)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def rendered_text(driver: webdriver.Chrome, url: str, *expected: str) -> str:
    """Opens ``url`` and returns the page's visible text once it holds every one of ``expected``; fails with the
    text it had at the deadline otherwise."""
    driver.get(url)
    text = ""

    def holds_all(d: webdriver.Chrome) -> bool:
        nonlocal text
        text = d.find_element(By.TAG_NAME, "body").text
        return all(e in text for e in expected)

    with contextlib.suppress(TimeoutException):
        WebDriverWait(driver, patience(120), poll_frequency=0.5).until(holds_all)
    missing = [e for e in expected if e not in text]
    assert not missing, f"{url} never showed {missing}; it showed: {text[:400]!r}"
    return text


def screenshot(driver: webdriver.Chrome, name: str) -> None:
    target = REPO_ROOT / "test-output" / name
    target.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 20000


@pytest.mark.cluster
def test_ui_lists_the_experiment_and_its_runs(mlflow_ui, browser):
    base, parent = mlflow_ui
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    rendered_text(browser, f"{base}/#/experiments", "ui-check")
    # the parent run, its two trials nested (collapsed) under it
    rendered_text(browser, f"{base}/#/experiments/{experiment_id}/runs", "sweep-digits", "3 matching runs")
    screenshot(browser, "mlflow-ui.png")


@pytest.mark.cluster
def test_the_system_metrics_tab_and_the_sweeps_analysis_are_in_the_ui(mlflow_ui, browser, tmp_path):
    base, parent = mlflow_ui
    client = parent.client
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    (trial, _) = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    sampled = {key for key in trial.data.metrics if key.startswith("system/node0-test/")}
    assert {"system/node0-test/cpu_utilization_percentage", "system/node0-test/system_memory_usage_megabytes"} <= \
        sampled  # MLflow's monitor, attached by run id, one node name per monitor
    rendered_text(browser, f"{base}/#/experiments/{experiment_id}/runs/{trial.info.run_id}/system-metrics",
                  "system/node0-test", "cpu_utilization_percentage")  # charts below the fold render when scrolled to
    screenshot(browser, "mlflow-system-metrics.png")
    assert {a.path for a in client.list_artifacts(parent.run_id, "analysis")} >= {
        "analysis/importance.txt", "analysis/parallel_coordinates.png", "analysis/best_schedules.png"}
    plot = "analysis/parallel_coordinates.png"
    png = Path(client.download_artifacts(parent.run_id, plot, str(tmp_path))).read_bytes()
    width = int.from_bytes(png[16:20], "big")  # IHDR's width
    browser.get(f"{base}/#/experiments/{experiment_id}/runs/{parent.run_id}/artifacts/{plot}")
    shown = f"return [...document.images].filter(i => i.alt === '{plot}' && i.complete).map(i => i.naturalWidth)"
    with contextlib.suppress(TimeoutException):  # the preview is the artifact itself, decoded (PNG header's width)
        WebDriverWait(browser, patience(120), poll_frequency=0.5).until(lambda d: width in d.execute_script(shown))
    assert width in browser.execute_script(shown), f"the artifact view never showed {plot} ({width} px wide)"
    screenshot(browser, "mlflow-sweep-parent.png")
