"""`pipeline report SWEEP_DIR` (the sweep page), training_curves.png in each run folder, and the
pages opened in headless Chromium."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from analysis.sweep_report import SweepReportConfig, build_sweep_report, frontier, read_summary
from cache_writer.run import CacheConfig, run_cache
from tests.builders import HTMLDom, chromium, small_corpus
from trainer.plots import CURVES_PNG, read_curves

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """4 runs of a tiny sweep on the shipped tiny model's activations, and one refused (k > d_sae)."""
    from trainer.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    torch.set_num_threads(1)
    run_cache(CacheConfig(out=str(root / "c"), dataset=small_corpus(root / "docs"), tokens=6000, context_size=64,
                          eval_fraction=0.3, hooks=["blocks.0.hook_resid_post"]), progress=False)
    spec = {"base": {"cache": str(root / "c"), "out": str(root / "sw"), "d_sae": 128, "batch_size": 256,
                     "tokens": 256 * 8, "log_every": 2, "wandb": False, "device": "cpu"},
            "sweep": {"arch": ["topk", "standard"], "k": [4, 8, 500], "l1": [1.0, 3.0]}}
    rows = run_sweep(spec, {}, name="t")
    assert sum(r["status"] == "ok" for r in rows) == 4
    return root / "sw"


def test_frontier_is_the_runs_nothing_beats():
    pts = [(4, 0.5), (8, 0.7), (8, 0.6), (16, 0.69), (32, 0.9), (32, 0.9)]
    assert frontier(pts) == [True, True, False, False, True, True]


def test_every_run_folder_has_training_curves(sweep, tmp_path):
    from trainer.run import TrainConfig, run_train

    for run in ("topk-k4", "standard-l1_3"):
        png = sweep / run / CURVES_PNG
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
        curves = read_curves(sweep / run / "metrics.jsonl")
        lines = (sweep / run / "metrics.jsonl").read_text().splitlines()
        assert len(curves["tokens"]) == len(curves["loss"]) == len(lines) == 4 and curves["tokens"][-1] == 256 * 8
    # `pipeline train` too: its metric lines hold per-run lists.
    run_train(TrainConfig(cache=str(sweep.parent / "c"), out=str(tmp_path), d_sae=64, k=4, batch_size=256,
                          tokens=256 * 4, log_every=2, wandb=False, device="cpu"))
    run = tmp_path / "topk-d64-k4"
    assert (run / CURVES_PNG).read_bytes()[:8] == PNG
    assert read_curves(run / "metrics.jsonl")["l0"] == [4.0, 4.0]


def test_sweep_page_has_table_plots_curves_and_feature_links(sweep):
    page = build_sweep_report(SweepReportConfig(sweep=str(sweep), features=True, ce_contexts=4, device="cpu"),
                              feature_options={"n_latents": 3, "contexts": 2})
    assert page == sweep / "index.html"
    text = page.read_text(encoding="utf-8")
    dom = HTMLDom(text)
    assert {"runs-table", "pareto-ev", "pareto-ce", "curves-loss", "curves-l0", "curves-ev", "curve-legend"} <= dom.ids
    assert "pareto-ce-missing" not in dom.ids
    assert text.count("<tr data-run=") == 5 and "refused" in text  # the refused run is listed, not plotted
    assert dom.classes["point"] == 8 and dom.classes.get("frontier", 0) == 2  # 4 runs in each of two plots
    assert dom.classes["curve"] >= 3 * 4
    # Each finished run links to its feature report, relative to the page, and the report is there.
    links = [line.split('href="')[1].split('"')[0] for line in text.split('class="feature-link"')[1:]]
    assert len(links) == 4 and all((sweep / link).is_file() and not link.startswith("/") for link in links)
    assert "logit-table" in (sweep / links[0]).read_text()
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # The CE columns computed for the page are added to summary.csv, as `pipeline sweep --eval` adds them.
    summary = read_summary(sweep)
    assert [r["ce_recovered_zero"] is not None for r in summary] == [True] * 4 + [False]
    assert summary[0]["d_sae"] == 128 and summary[-1]["status"].startswith("refused: ")


def test_sweep_page_without_ce_or_features_says_how_to_get_them(sweep, tmp_path):
    import csv
    import shutil

    from trainer.sweep import COLUMNS

    # A copy of the sweep as `pipeline sweep` left it: no CE columns, no feature reports.
    shutil.copytree(sweep, tmp_path / "sw", ignore=shutil.ignore_patterns("_sweep", "report", "index.html"))
    cache, sweep = sweep.parent / "c", tmp_path / "sw"
    rows = read_summary(sweep)
    with open(sweep / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    page = build_sweep_report(SweepReportConfig(sweep=str(sweep), out=str(tmp_path / "page")))
    text = page.read_text(encoding="utf-8")
    dom = HTMLDom(text)
    assert "pareto-ce-missing" in dom.ids and "pareto-ce" not in dom.ids and "--ce-contexts" in text
    # Each finished run: a link to its feature report where one exists (relative to this page, elsewhere
    # than the sweep), else the command that writes it.
    assert dom.classes.get("feature-link", 0) == 0 and dom.classes["feature-command"] == 4
    # The command names the cache the run was trained on (its cfg.json).
    assert f"pipeline report {sweep / 'topk-k4'} --cache {cache} --out {sweep / 'topk-k4' / 'report'}" in text


def test_report_command_takes_a_sweep_folder_or_an_sae(sweep, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.errors import PipelineError

    res = CliRunner().invoke(app, ["report", str(sweep), "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p" / "index.html").is_file() and "wrote" in res.output
    res = CliRunner().invoke(app, ["report", str(sweep / "topk-k4")])
    assert isinstance(res.exception, PipelineError) and "needs --cache" in str(res.exception)


def _open(page: Path, tmp_path: Path, shot: Path, height: int) -> HTMLDom:
    """The page's DOM after its scripts ran in headless Chromium; no console message; a screenshot."""
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the pages are not opened in a browser")
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    env = dict(os.environ, HOME=str(tmp_path))
    out = subprocess.run(base + ["--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line for line in out.stderr.splitlines() if ":CONSOLE" in line] == []  # no error, no log
    subprocess.run(base + [f"--window-size=1300,{height}", f"--screenshot={shot}", page.resolve().as_uri()],
                   capture_output=True, timeout=120, env=env, check=True)
    assert shot.read_bytes()[:8] == PNG
    return HTMLDom(out.stdout)


@pytest.mark.slow  # a real browser process
def test_sweep_and_feature_pages_open_in_headless_chromium(sweep, tmp_path):
    page = build_sweep_report(SweepReportConfig(sweep=str(sweep), out=str(tmp_path / "s"), features=True,
                                                ce_contexts=4, device="cpu"),
                              feature_options={"n_latents": 2, "contexts": 2})
    dom = _open(page, tmp_path, tmp_path / "sweep.png", 1900)
    assert dom.body.get("data-ready") == "1"  # the script ran to its end
    assert {"runs-table", "pareto-ev", "pareto-ce", "curves-loss", "curves-l0", "curves-ev"} <= dom.ids
    assert dom.classes["point"] == 8 and dom.classes["curve"] >= 12
    feature = _open(sweep / "topk-k4" / "report" / "index.html", tmp_path, tmp_path / "feature.png", 1400)
    assert feature.body.get("data-ready") == "1"
    assert feature.classes.get("logit-table") == 2 and feature.classes.get("logit-histogram") == 2
    assert feature.classes.get("context-table", 0) >= 1
