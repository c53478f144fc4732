"""The HTML report: sections, embedded figures, and a real headless-Chromium rendering check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from crashlm.cli import main
from crashlm.core.io import write_json
from crashlm.emulators.plans import crash_plan, uniform_plan
from crashlm.outputs.plotting import (
    plot_clusters,
    plot_fidelity_gain,
    plot_offsite_table,
    plot_training_curves,
)
from crashlm.outputs.report import build_report, write_report
from tests.cli import run_cli

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    table = {
        "model": "tiny", "tasks": ["piqa", "arc_easy"], "seeds": [1, 2], "metric": "acc",
        "rows": [
            {"name": "Full ZS", "scores": {"piqa": 0.6, "arc_easy": 0.5}, "spread": {}, "average": 0.55},
            {"name": "Full FT", "scores": {"piqa": 0.7, "arc_easy": 0.6}, "spread": {}, "average": 0.65},
            {"name": "Uniform, Plug-in", "run": "uniform", "scores": {"piqa": 0.61, "arc_easy": 0.52}, "spread": {},
             "average": 0.565, "gain_recovered": 0.15, "gain_recovered_std": 0.05, "gain_recovered_seeds": 2},
            {"name": "CRaSh, Plug-in", "run": "crash-share", "scores": {"piqa": 0.68, "arc_easy": 0.55}, "spread": {},
             "average": 0.615, "gain_recovered": 0.65, "gain_recovered_std": 0.1, "gain_recovered_seeds": 2},
        ],
    }
    write_json(tmp_path / "table.json", table)
    plot_offsite_table(table, tmp_path / "table.png")
    plot_fidelity_gain([("Uniform", 2.0, 0.15, 0.05), ("CRaSh", 1.0, 0.65, 0.1)], tmp_path / "fidelity.png", "fidelity")
    curves = {"validation loss": [("Full FT, seed 1", [0, 2], [1.0, 0.8])]}
    plot_training_curves(curves, tmp_path / "piqa" / "training_curves.png", "piqa")
    # crash and crash-share share one plan: the report shows it once; uniform's is another.
    plan = crash_plan([0.9, 0.2, 0.95, 0.97, 0.3, 0.9, 0.99], k=4)
    for strategy in ("crash", "crash-share"):
        plan.save(tmp_path / "piqa" / strategy / "plan.json")
        plot_clusters(plan, tmp_path / "piqa" / strategy / "clusters.png")
    uniform = uniform_plan(8, k=4, trainable=2)
    uniform.save(tmp_path / "piqa" / "uniform" / "plan.json")
    plot_clusters(uniform, tmp_path / "piqa" / "uniform" / "clusters.png")
    lens_dir = tmp_path / "lens"
    plot_clusters(plan, lens_dir / "some_analysis.png")
    write_json(lens_dir / "lens.json", {"layers": [1, 2, 3]})
    return tmp_path


def test_report_has_every_section_and_figure(run_dir: Path):
    page = build_report(run_dir)
    assert "Offsite-tuning table" in page and "Layer similarity and plans" in page and "Analyses" in page
    # Every PNG under the run embedded once, except crash-share's plan figure: crash's is the same plan.
    assert page.count("data:image/png;base64,") == 6 and "piqa/crash-share/clusters.png" not in page
    assert "<b>piqa/crash, piqa/crash-share</b>: crash plan" in page and "<b>piqa/uniform</b>" in page
    assert "65 ± 10 % (2 seeds)" in page  # gain recovered in the table
    assert "lens/lens.json" in page  # the configuration beside a figure


def test_report_leads_with_the_verdict(run_dir: Path):
    page = build_report(run_dir)
    order = ["Verdict: gain recovered", "fidelity.png", "piqa/training_curves.png", "Offsite-tuning table",
             "Layer similarity and plans", "Analyses"]
    positions = [page.index(marker) for marker in order]
    assert positions == sorted(positions), dict(zip(order, positions))
    verdict = page[positions[0]:positions[1]]
    # Best first, with the std over seeds and their number.
    assert verdict.index("CRaSh") < verdict.index("Uniform")
    assert "<td>CRaSh</td><td>65 %</td><td>10 %</td><td>2</td>" in verdict


def test_report_cli_and_errors(run_dir: Path, tmp_path: Path, capsys):
    code, _, err = run_cli(["report", str(tmp_path / "missing")], capsys)
    assert code == 2 and "run directory not found" in err
    main(["report", str(run_dir)])
    assert (run_dir / "report.html").stat().st_size > 1000


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(
    _chromium() is None, reason="Debian's chromium and chromium-driver are not installed (make test installs them as root)"
)
def test_report_renders_in_headless_chromium(run_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    page = write_report(run_dir)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(page.resolve().as_uri())
        sizes = driver.execute_script(
            "return Array.from(document.images)"
            ".map(i => [i.naturalWidth, i.getBoundingClientRect().width, i.getBoundingClientRect().height]);"
        )
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "report.png"))
    finally:
        driver.quit()
    assert len(sizes) == 6
    assert all(natural > 0 and width > 0 and height > 0 for natural, width, height in sizes), sizes
    assert errors == [], json.dumps(errors)
