"""The sweep's pareto.png, each run's training_curves.png and the sweep page's charts and table, as a
person sees them: tick labels apart, one colour per architecture in the PNG and on the page, a run
logged once still drawn, the printed summary within a log line, the runs table within the window."""

from __future__ import annotations

import json
import os
import re
import subprocess
from html.parser import HTMLParser
from itertools import combinations

import pytest

from tests.builders import HTMLDom, chromium
from trainer.plots import arch_color, draw_pareto, draw_training_curves, write_training_curves

HOOK = "blocks.0.hook_resid_post"
ARCHS = ("topk", "standard", "batchtopk", "gated", "jumprelu", "matryoshka")  # not in name order


def sweep_rows(l0s: tuple[float, ...] = (16.1, 32.3, 64.5)) -> list[dict]:
    """Summary rows as `make sweep` gives them: each architecture at each L0 (its EVs in a band of its
    own, so no other architecture's line crosses its markers), and one refused run."""
    rows = []
    for i, arch in enumerate(ARCHS):
        for j, l0 in enumerate(l0s):
            rows.append({"run": f"{arch}-l0target{round(l0)}", "arch": arch, "hook": HOOK, "d_sae": 1024,
                         "target_l0": round(l0), "k_or_coefficient": 0.7339 * (j + 1), "lr": 0.004242640687119286,
                         "l0": l0 * (1 + 0.01 * i), "explained_variance": 0.30 + 0.1 * i + 0.02 * j,
                         "dead_fraction": 0.0009765625, "tokens_per_s": 133621.43882897036, "status": "ok"})
    rows.append({"run": "topk-k2048", "status": "refused: k 2048 is above d_sae 1024; lower k"})
    return rows


def drawn(fig):
    """Draw `fig` on an Agg canvas (as savefig does) and return its renderer: tick labels and
    transforms are then where the PNG has them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def pixel(img, ax, x: float, y: float) -> tuple[float, float, float]:
    """The PNG's colour where data point (x, y) of `ax` was drawn."""
    px, py = ax.transData.transform((x, y))
    return tuple(img[int(round(img.shape[0] - py)), int(round(px)), :3])


def same_colour(got, want: str) -> bool:
    from matplotlib.colors import to_rgb

    return all(abs(a - b) < 0.04 for a, b in zip(got, to_rgb(want)))


@pytest.mark.parametrize("lo,hi", [(16, 64), (24, 40), (100, 130), (3, 900), (1, 5000)])
def test_pareto_tick_labels_do_not_overlap(tmp_path, lo, hi):
    """A narrow log range (L0 16..64) had a label at every 10^k multiple, 2x10^1 3x10^1 4x10^1...
    run together: the labels drawn now are round numbers, apart."""
    fig = draw_pareto(sweep_rows((lo, (lo * hi) ** 0.5, hi)))
    fig.savefig(tmp_path / "pareto.png", dpi=120)
    renderer = drawn(fig)
    ax = fig.axes[0]
    x0, x1 = ax.get_xlim()
    shown = [t for t, loc in zip(ax.xaxis.get_ticklabels(which="both"), ax.xaxis.get_ticklocs(minor=False))
             if t.get_visible() and t.get_text() and x0 <= loc <= x1]
    assert len(shown) >= 2, [t.get_text() for t in shown]
    assert all(re.fullmatch(r"[0-9.]+", t.get_text()) for t in shown), [t.get_text() for t in shown]
    boxes = [t.get_window_extent(renderer) for t in shown]
    for (a, ta), (b, tb) in combinations(zip(boxes, shown), 2):
        assert not a.overlaps(b), (ta.get_text(), tb.get_text())
    minor = [t for t in ax.xaxis.get_ticklabels(minor=True) if t.get_visible() and t.get_text()]
    assert minor == []


class Circles(HTMLParser):
    """(data-run, fill) of every `point` circle of an SVG chart, by chart id."""

    def __init__(self, text: str):
        super().__init__()
        self.chart, self.points = None, {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.chart = a.get("id")
        if tag == "circle" and "point" in (a.get("class") or "").split():
            self.points.setdefault(self.chart, []).append((a["data-run"], a["fill"]))


def test_one_colour_per_architecture_in_pareto_png_and_on_the_sweep_page(tmp_path, capsys):
    """pareto.png coloured architectures in name order, the page in the order they came: the same
    architecture had two colours. Both now use arch_color; checked in the PNG's pixels at each
    marker and in the page's circles."""
    import matplotlib.image

    from analysis.sweep_report import SweepReportConfig, build_sweep_report
    from trainer.sweep import write_summary

    rows = sweep_rows()
    write_summary(rows, tmp_path)
    img = matplotlib.image.imread(tmp_path / "pareto.png")
    ax = draw_pareto(rows).axes[0]  # the same drawing: where each marker landed
    drawn(ax.figure)
    arch_of = {r["run"]: r["arch"] for r in rows[:-1]}
    for r in rows[:-1]:
        assert same_colour(pixel(img, ax, r["l0"], r["explained_variance"]), arch_color(r["arch"])), r["run"]
    page = build_sweep_report(SweepReportConfig(sweep=str(tmp_path)))
    points = Circles(page.read_text(encoding="utf-8")).points["pareto-ev"]
    assert len(points) == len(rows) - 1
    for run, fill in points:
        assert fill == arch_color(arch_of[run]), run
    assert len({arch_color(a) for a in ARCHS}) == len(ARCHS)  # and no two architectures share one


def test_a_run_logged_once_is_drawn(tmp_path):
    """A run with one logged point drew nothing (a line through one point, no marker) in
    training_curves.png and on the sweep page; now a marker, a dot."""
    import matplotlib.image

    from analysis.svg import Series, svg_lines

    run = tmp_path / "topk-d64-k4"
    run.mkdir()
    line = {"step": 1, "tokens": 4096, "loss": [2.5], "l0": [4.0], "explained_variance": [0.41]}
    (run / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    png = write_training_curves(run)
    img = matplotlib.image.imread(png)
    fig = draw_training_curves({"tokens": [4096.0], "loss": [2.5], "l0": [4.0], "explained_variance": [0.41]},
                               run.name)
    drawn(fig)
    for ax, value in zip(fig.axes, (2.5, 4.0, 0.41)):
        (curve,) = ax.lines
        assert same_colour(pixel(img, ax, 4096.0, value), curve.get_color()), ax.get_title()
    svg = svg_lines([Series("a", [4096.0], [2.5]), Series("b", [0.0, 4096.0], [3.0, 2.0])], "tokens", "loss", "c")
    assert svg.count('class="curve dot" data-run="a"') == 1 and svg.count('<polyline class="curve" data-run="b"') == 1


def test_the_printed_sweep_summary_fits_a_log_line(tmp_path, capsys):
    """Off a terminal (a log file) the summary table of an 18-run sweep was 184 characters wide (552
    bytes): short headers, columns every run shares said once below it."""
    from trainer.sweep import write_summary

    write_summary(sweep_rows(), tmp_path)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 110, out
    assert f"every run: hook {HOOK}, d_sae 1024, lr 0.004243" in out
    for r in sweep_rows():
        assert r["run"] in out
    assert "refused" in out and "lower k" not in out  # the reason stays in summary.csv
    assert "133,621" in out and "0.0009766" in out


def test_the_sweep_page_s_runs_table_fits_the_window(tmp_path):
    """The runs table's last column held each run's ~90-character feature-report command and ran past
    the right edge of a 1300-pixel window; measured in headless Chromium."""
    import csv

    from analysis.sweep_report import SweepReportConfig, build_sweep_report
    from trainer.sweep import COLUMNS, EVAL_COLUMNS

    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the page is not opened in a browser")
    sweep = tmp_path / "runs" / "sweep-of-eighteen-saes"
    sweep.mkdir(parents=True)
    rows = [r | {"ce_recovered_zero": 0.9578 - i / 97, "ce_recovered_mean": 0.8123 - i / 89, "kl": 0.1234 + i / 83,
                 "dead_fraction": i / 1024, "tokens_per_s": 133621.43882897036 / (i + 1)} if r["status"] == "ok" else r
            for i, r in enumerate(sweep_rows())]
    with open(sweep / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + EVAL_COLUMNS)
        w.writeheader()
        w.writerows({c: r.get(c) for c in COLUMNS + EVAL_COLUMNS} for r in rows)
    cache = str(tmp_path / "caches" / "default")
    for r in rows[:-1]:
        (sweep / r["run"]).mkdir()
        (sweep / r["run"] / "cfg.json").write_text(json.dumps({"metadata": {"training_config": {"cache": cache}}}))
    page = build_sweep_report(SweepReportConfig(sweep=str(sweep)))
    text = page.read_text(encoding="utf-8")
    assert f"pipeline report {sweep} --features" in text  # how to write them all, said once
    measured = page.with_name("measured.html")
    measured.write_text(text.replace("</body>", '<script>const t = document.getElementById("runs-table");'
                                     "document.body.dataset.right = Math.ceil(t.getBoundingClientRect().right);"
                                     "document.body.dataset.width = document.documentElement.clientWidth;"
                                     "</script></body>"), encoding="utf-8")
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--window-size=1300,900", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          measured.resolve().as_uri()], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HOME=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    body = HTMLDom(out.stdout).body
    assert 0 < int(body["data-right"]) <= int(body["data-width"]), body
