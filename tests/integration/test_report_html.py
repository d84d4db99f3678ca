"""A trained run's reports: every plot drawn after training, a report.html that embeds them
all, links nothing outside itself and renders in headless Chromium; `detpact eval` and
`detpact report` rewrite them."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, train_tiny_run
from detpact.cli import build_parser
from detpact.commands import report as report_command
from detpact.commands.report import report
from detpact.errors import DetpactError
from detpact.run.contract import PLOT_NAMES

pytestmark = pytest.mark.slow

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One tiny run with its reports on (the shared tiny config turns them off)."""
    root = tmp_path_factory.mktemp("report")
    env, run, _ = train_tiny_run(root, cache_dir, "--set", "logging.reports=true")
    return root, env, run


def plot_path(run, name):
    return run / "reports" / f"plot_{name}.png"


def external_references(page: str) -> list[str]:
    """Everything in `page` a browser could fetch or follow outside the file: URLs with a
    scheme or protocol-relative, and src / href / url() / @import not to a data: URI or
    an anchor of the page."""
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", page)  # base64 may hold "//"
    found = re.findall(r"(?:https?:|ftp:|file:)?//[^\s\"'<>)]*", text)
    found += [value for value in re.findall(r"(?:src|href)\s*=\s*[\"']?([^\"'\s>]*)", text, flags=re.I)
              if not value.startswith(("data:", "#"))]
    found += re.findall(r"url\(\s*[\"']?(?!data:)[^)]*\)|@import", text, flags=re.I)
    return found


def test_training_writes_every_plot_into_one_self_contained_page(trained):
    _, _, run = trained
    page = (run / "reports" / "report.html").read_text(encoding="utf-8")
    for name in PLOT_NAMES:
        with Image.open(plot_path(run, name)) as image:
            assert image.format == "PNG" and image.width > 300, name
        assert base64.b64encode(plot_path(run, name).read_bytes()).decode() in page, name
    assert page.count("data:image/png;base64,") == len(PLOT_NAMES)
    assert external_references(page) == []
    assert external_references('<img src="https://cdn.example/x.png"> <a href="//x">') != []  # the scan sees them
    # the page shows what the run is: its id, config hash, classes and resolved config
    meta = json.loads((run / "reports" / "run_meta.json").read_text())
    assert meta["config_hash"] in page and "triangle" in page and "config_version: 1" in page
    best_step = json.loads((run / "reports" / "train_report.json").read_text())["best"]["step"]
    assert f"best.pt at step {best_step}, 6 validation images" in page  # where the PR curves came from
    files = json.loads((run / "manifest.json").read_text())["files"]
    for rel in [*(f"reports/plot_{name}.png" for name in PLOT_NAMES), "reports/report.html"]:
        assert files[rel]["sha256"] == hashlib.sha256((run / rel).read_bytes()).hexdigest(), rel


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (chromium, chromium-browser or google-chrome "
                                             "on PATH): .ci/run installs it with the system's package manager")
def test_report_html_renders_in_headless_chromium(trained, tmp_path):
    _, _, run = trained
    shot = tmp_path / "shot.png"
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--window-size=1280,3000", f"--screenshot={shot}",
                             (run / "reports" / "report.html").resolve().as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.int64)
    assert pixels.shape[:2] == (3000, 1280) and pixels.std() > 10  # not a blank page
    # the plots rendered: text, tables and links alone colour a few thousand pixels
    assert ((pixels.max(-1) - pixels.min(-1)) > 80).sum() > 30_000


def test_eval_and_report_rewrite_the_reports(trained, capsys):
    root, env, run = trained
    for name in ("confusion", "val_images"):
        plot_path(run, name).unlink()
    evaluated = run_cli(["eval", str(run)], env, root)
    assert evaluated.returncode == 0, evaluated.stderr
    assert plot_path(run, "confusion").is_file() and plot_path(run, "val_images").is_file()
    page = (run / "reports" / "report.html").read_text(encoding="utf-8")
    assert "eval_best.json" in page  # the page now lists the evaluation's metrics
    # the detections the plots were drawn from are validation's: eval reproduces best.pt's logged numbers
    best_step = json.loads((run / "reports" / "train_report.json").read_text())["best"]["step"]
    logged = next(json.loads(line) for line in (run / "reports" / "val_metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["step"] == best_step)
    metrics = json.loads((run / "reports" / "eval_best.json").read_text())["metrics"]
    assert metrics["num_dets"] > 0 and metrics == {key: logged[key] for key in metrics}

    (run / "reports" / "report.html").unlink()
    plot_path(run, "loss").unlink()
    # `detpact report RUN --no-eval`, parsed and run in this process (it evaluates nothing,
    # so it leaves no torch state behind; `detpact eval` above went through a subprocess)
    args = build_parser().parse_args(["report", str(run), "--no-eval"])
    assert report_command.run(args) == 0
    assert f"wrote {run / 'reports' / 'report.html'} (4 plots drawn)" in capsys.readouterr().out
    assert plot_path(run, "loss").is_file() and (run / "reports" / "report.html").is_file()
    assert base64.b64encode(plot_path(run, "pr_curves").read_bytes()).decode() in \
        (run / "reports" / "report.html").read_text(encoding="utf-8")  # kept from the eval, still embedded
    with pytest.raises(DetpactError, match="Run folder not found: nothere"):  # not a folder, nor a run id there
        report("nothere", environ=env)
    with pytest.raises(DetpactError, match="no checkpoints/best.pt yet"):
        (run / "checkpoints" / "best.pt").rename(run / "checkpoints" / "best.bak")
        try:
            report(run, environ=env)
        finally:
            (run / "checkpoints" / "best.bak").rename(run / "checkpoints" / "best.pt")
