"""report.html: its plots show what its tables and report.json say, and a browser opens it.

The page is parsed with the standard library's HTMLParser; the browser test runs headless
Chromium (install: ``apt-get install -y chromium``) and is skipped with that reason when it
is absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from outlier_model import CALIB, HARD_LAYER, VAL, outlier_graph
from qtool.cli import main

from qtool.io import save
from qtool.report.html import PLOT_HEIGHT, render_html
from qtool.workflow import CalibrateOptions, calibrate_to_folder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Page(HTMLParser):
    """Bars, histograms and table cells of the page, by the id of their svg or table."""

    def __init__(self):
        super().__init__()
        self.svg_id = None
        self.svg_attrs: dict[str, dict[str, str]] = {}
        self.bars: dict[str, list[dict[str, str]]] = {}
        self.histograms: list[dict] = []
        self.table_id = None
        self.tables: dict[str, list[list[str]]] = {}
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg":
            if "histogram" in attrs.get("class", ""):
                self.histograms.append({"tensor": attrs["data-tensor"], "bars": [],
                                        "clip": {}, "width": float(attrs["width"])})
                self.svg_id = "histogram"
            else:
                self.svg_id = attrs.get("id")
                self.svg_attrs[self.svg_id] = attrs
                self.bars[self.svg_id] = []
        elif tag == "rect" and self.svg_id == "histogram":
            self.histograms[-1]["bars"].append(attrs)
        elif tag == "rect" and "bar" in attrs.get("class", "").split():
            self.bars[self.svg_id].append(attrs)
        elif tag == "line" and attrs.get("class") == "clip":
            self.histograms[-1]["clip"][attrs["data-edge"]] = attrs
        elif tag == "table":
            self.table_id = attrs.get("id")
            self.tables[self.table_id] = []
        elif tag == "tr" and self.table_id:
            self.tables[self.table_id].append([])
        elif tag == "td" and self.table_id:
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "svg":
            self.svg_id = None
        elif tag == "table":
            self.table_id = None
        elif tag == "td" and self.cell is not None:
            self.tables[self.table_id][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("html")
    model = folder / "hard.onnx"
    save(outlier_graph(), model)
    options = CalibrateOptions(data=CALIB, eval_data=VAL, target_sqnr=30.0, analysis="full",
                               backend_options={"int8_conv_rule": False})  # 8-channel convs
    return calibrate_to_folder(model, "tensorrt", folder / "run", options)


@pytest.fixture(scope="module")
def page(run):
    parser = _Page()
    parser.feed((run.output / "report.html").read_text(encoding="utf-8"))
    return parser


@pytest.mark.parametrize(
    ("chart", "table", "key", "name"),
    [("sensitivity-chart", "sensitivity-table", "layers", "node"),
     ("tensor-chart", "tensor-table", "tensors", "tensor")],
)
def test_bar_heights_show_the_table_values(run, page, chart, table, key, name):
    entries = run.report["analysis"][key]
    bars = page.bars[chart]
    rows = [r for r in page.tables[table] if r]
    assert len(bars) == len(rows) == len(entries) > 0
    scale = float(page.svg_attrs[chart]["data-scale"])
    values = [e["sqnr_db"] for e in entries]
    assert scale == pytest.approx(PLOT_HEIGHT / max(values), rel=1e-5)
    for index, (bar, row, entry) in enumerate(zip(bars, rows, entries, strict=True), start=1):
        assert bar["data-name"] == row[1] == entry[name]
        assert row[0] == str(index)
        value = float(bar["data-value"])
        assert value == pytest.approx(entry["sqnr_db"], rel=1e-5)
        assert row[3] == f"{entry['sqnr_db']:.2f}"
        assert float(bar["height"]) == pytest.approx(value * scale, abs=0.01)
        assert float(bar["y"]) + float(bar["height"]) == pytest.approx(
            float(page.svg_attrs[chart]["height"]) - 24, abs=0.01)
    tallest = max(float(b["height"]) for b in bars)
    assert tallest == pytest.approx(PLOT_HEIGHT, abs=0.01)


def test_sensitivity_chart_shows_the_hard_layer_lowest_and_below_target(page):
    bars = page.bars["sensitivity-chart"]
    assert bars[0]["data-name"] == HARD_LAYER
    assert float(bars[0]["height"]) == min(float(b["height"]) for b in bars)
    below = [b["data-name"] for b in bars if "below" in b["class"].split()]
    assert HARD_LAYER in below


def test_histograms_count_every_value_and_mark_the_clip_range(run, page):
    histograms = run.report["analysis"]["histograms"]
    assert [h["tensor"] for h in page.histograms] == [h["tensor"] for h in histograms]
    for drawn, data in zip(page.histograms, histograms, strict=True):
        counts = [int(b["data-count"]) for b in drawn["bars"]]
        assert counts == [c for c in data["counts"] if c]
        lo, hi = (float(drawn["clip"][edge]["data-value"]) for edge in ("lo", "hi"))
        assert lo == pytest.approx(data["clip"][0], rel=1e-5)
        assert hi == pytest.approx(data["clip"][1], rel=1e-5)
        x_lo, x_hi = (float(drawn["clip"][edge]["x1"]) for edge in ("lo", "hi"))
        assert 0 < x_lo < x_hi < drawn["width"]
    # Every activation value of the calibration data is in the histogram once.
    samples = run.report["analysis"]["samples"]
    assert samples == len(np.load(CALIB)["input"])
    assert all(sum(h["counts"]) % samples == 0 for h in histograms)


def test_float_nodes_and_fallback_are_listed(run, page):
    float_rows = [r for r in page.tables["float-table"] if r]
    assert {r[0]: r[1] for r in float_rows} == run.report["plan"]["float_nodes"]
    assert [r[0] for r in float_rows] == [HARD_LAYER]
    steps = [r for r in page.tables["fallback-table"] if r]
    assert [r[-1] for r in steps] == ["no", "yes"]
    summary = {r[0]: r[1] for r in page.tables["summary"]}
    assert summary["backend"] == "tensorrt"


def test_report_command_renders_the_same_page_from_report_json(run, tmp_path):
    target = tmp_path / "again.html"
    result = CliRunner().invoke(main, ["report", str(run.output), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_bytes() == (run.output / "report.html").read_bytes()
    missing = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert missing.exit_code == 8 and "report.json" in missing.output


def test_names_are_escaped(run):
    report = json.loads(json.dumps(run.report))
    report["plan"]["float_nodes"] = {"<script>alert(1)</script>": "a & b"}
    text = render_html(report)
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "a &amp; b" in text
    # A report written before the analysis existed still renders, without its sections.
    del report["analysis"]
    older = render_html(report)
    assert "<svg" not in older and 'id="float-table"' in older


def _chromium(url: str, profile, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         *extra, url],
        capture_output=True, text=True, timeout=90, check=False,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(CI: apt-get update && apt-get install -y chromium)")
def test_page_opens_in_headless_chromium_without_console_messages(run, tmp_path):
    # The check notices console output: a page that logs an error is caught.
    noisy = tmp_path / "noisy.html"
    noisy.write_text("<html><body><script>console.error('broken')</script></body></html>")
    control = _chromium(noisy.as_uri(), tmp_path / "p0", "--dump-dom")
    assert "CONSOLE" in control.stderr and "broken" in control.stderr
    shot = tmp_path / "report.png"
    opened = _chromium((run.output / "report.html").as_uri(), tmp_path / "p1", "--dump-dom")
    assert opened.returncode == 0, opened.stderr[-2000:]
    assert "CONSOLE" not in opened.stderr, opened.stderr[-2000:]
    assert 'id="sensitivity-chart"' in opened.stdout and 'class="histogram"' in opened.stdout
    drawn = _chromium((run.output / "report.html").as_uri(), tmp_path / "p2",
                      "--window-size=1200,2400", f"--screenshot={shot}")
    assert drawn.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
