r"""The HTML page of a ``qtool calibrate`` run, rendered from its report.json alone.

One self-contained file: inline CSS, plots as inline SVG written here (no script, no
external resource, no plotting library). Sections, each present when the report has the data:

* summary table: backend, methods, data, output SQNR / cosine / top-1 agreement, accuracy;
* per-layer sensitivity (each layer quantized alone, worst first) and accumulated SQNR per
  quantized tensor: bar charts beside their tables. A bar's height is ``value * scale``
  pixels, with ``scale = PLOT_HEIGHT / max(value)`` written on the ``<svg>`` as
  ``data-scale``; bars and table rows carry the same number (``#`` column = bar label);
  bars below the SQNR target (when one was given) are red;
* histograms of the worst activations: float values over the data (bar height
  ``log(1 + count)``, so the tails stay visible), with the clip range the chosen scale and
  zero point represent marked by two vertical lines (``class="clip"``);
* the float fallback search, ``--method auto``'s choice per tensor, what stayed float and why.

The same report gives the same bytes.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from qtool.report.markdown import fmt_db, fmt_pct

PLOT_HEIGHT = 180.0
BAR_WIDTH = 22
BAR_GAP = 6
MARGIN_LEFT = 48
MARGIN_BOTTOM = 24
MARGIN_TOP = 12
HIST_WIDTH = 520.0
HIST_HEIGHT = 150.0

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warning { background: #fff4e5; border-left: 4px solid #f0a030; padding: .5em 1em; }
.note { color: #555; font-size: .9em; } .chart { overflow-x: auto; }
.flex { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
svg text { font-size: 10px; fill: #333; } .bar { fill: #4a78c2; } .bar.below { fill: #d0473c; }
.hist-bar { fill: #8aa9d6; } .clip { stroke: #d0473c; stroke-width: 2; }
.target { stroke: #d0473c; stroke-dasharray: 4 3; } .axis { stroke: #888; }
"""


def render_html(report: Mapping[str, Any]) -> str:
    """The HTML page of a report (the dict of report.json)."""
    title = f"qtool report: {report['model']} for {report['backend']}"
    analysis = report.get("analysis") or {}
    fallback = analysis.get("fallback") or {}
    target = fallback.get("target_sqnr_db")
    parts = [f"<h1>{_e(title)}</h1>"]
    parts += [f'<p class="warning">{_e(w)}</p>' for w in report.get("warnings", [])]
    parts.append(_summary(report))
    if analysis.get("layers"):
        rows = [(layer["node"], layer["sqnr_db"]) for layer in analysis["layers"]]
        parts.append("<h2>Layer sensitivity (each layer quantized alone)</h2>")
        parts.append(
            '<p class="note">Worst output SQNR of the model when only this layer\'s inputs '
            "are quantized; the lowest bars are the layers that cost the most.</p>"
        )
        task = any(layer.get("task_drop") is not None for layer in analysis["layers"])
        table = _table(
            ["#", "layer", "op", "SQNR (dB)", "cosine", "accuracy"]
            + (["task drop (pts)"] if task else []),
            [
                [str(i), layer["node"], layer["op"], fmt_db(layer["sqnr_db"]),
                 f"{layer['cosine']:.5f}", fmt_pct(layer.get("accuracy"))]
                + ([_pts(layer.get("task_drop"))] if task else [])
                for i, layer in enumerate(analysis["layers"], start=1)
            ],
            "sensitivity-table", numeric={0, 3, 4, 5, 6},
        )
        parts.append(_flex(_bar_chart("sensitivity-chart", rows, target), table))
    if analysis.get("tensors"):
        tensors = analysis["tensors"]
        parts.append("<h2>Quantized tensors (accumulated error)</h2>")
        parts.append(
            '<p class="note">SQNR of each quantized tensor in the quantized model against the '
            "float model: its own rounding plus every error upstream. Graph order.</p>"
        )
        rows = [(t["tensor"], t["sqnr_db"]) for t in tensors]
        table = _table(
            ["#", "tensor", "role", "SQNR (dB)", "cosine", "max abs error"],
            [
                [str(i), t["tensor"], t["role"], fmt_db(t["sqnr_db"]), f"{t['cosine']:.5f}",
                 f"{t['max_abs_error']:.4g}"]
                for i, t in enumerate(tensors, start=1)
            ],
            "tensor-table", numeric={0, 3, 4, 5},
        )
        parts.append(_flex(_bar_chart("tensor-chart", rows, None), table))
    if analysis.get("histograms"):
        parts.append("<h2>Worst activations: float values and the clip range</h2>")
        parts.append(
            '<p class="note">Histogram of the float values over the analysis data (bar height: '
            "log of the count); the red lines mark the range the chosen scale and zero point "
            "represent (values outside are clipped).</p>"
        )
        parts.append('<div class="flex">' + "".join(
            _histogram(h) for h in analysis["histograms"]) + "</div>")
    if fallback:
        parts.append(_fallback(fallback))
    if analysis.get("method_choice"):
        parts.append(_method_choice(analysis["method_choice"]))
    parts.append(_float_nodes(report))
    if report.get("files"):
        parts.append("<h2>Files</h2>")
        parts.append(_table(["file", "sha256"],
                            [[n, d] for n, d in report["files"].items()], "files-table"))
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
        f"<p class=\"note\">qtool {_e(report.get('qtool_version', ''))}</p>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------- sections


def _summary(report: Mapping[str, Any]) -> str:
    cal = report["calibration"]
    plan = report["plan"]
    rows = [
        ["backend", report["backend"]],
        ["activation method", cal["method"]],
        ["weight method", cal["weight_method"]],
        ["calibration data", f"{cal['data']} ({cal['samples']} samples)"],
        ["quantized tensors", f"{plan['quantized_tensors']} ({plan['activations']} activations, "
                              f"{plan['weights']} weights, {plan['biases']} biases)"],
        ["float nodes", str(len(plan["float_nodes"]))],
    ]
    ev = report.get("evaluation")
    if ev:
        held = "held out" if ev["held_out"] else "calibration data"
        rows.append(["evaluation data", f"{ev['data']} ({ev['samples']} samples, {held})"])
        for out in ev["outputs"]:
            rows.append([f"output {out['name']}: SQNR", f"{fmt_db(out['sqnr_db'])} dB"
                         if out["sqnr_db"] is not None else "exact"])
            rows.append([f"output {out['name']}: cosine", f"{out['cosine']:.5f}"])
            for part in out.get("slices", ()):  # judged per slice (qtool.analysis.slices)
                from qtool.report.sqnr_floor import slice_label

                rows.append([f"output {slice_label(out['name'], part)}: SQNR",
                             f"{fmt_db(part['sqnr_db'])} dB" if part["sqnr_db"] is not None
                             else "exact"])
            if out.get("top1_agreement") is not None:
                rows.append([f"output {out['name']}: top-1 agreement",
                             fmt_pct(out["top1_agreement"])])
            if out.get("float_accuracy") is not None:
                drop = 100.0 * (out["quant_accuracy"] - out["float_accuracy"])
                rows.append(["top-1 accuracy", f"float {fmt_pct(out['float_accuracy'])}, "
                             f"quantized {fmt_pct(out['quant_accuracy'])} ({drop:+.2f} pts)"])
        if ev.get("task"):
            from qtool.analysis.tasks import task_summary

            rows.append(["task metric", task_summary(ev["task"]).split(": ", 1)[1]])
    return "<h2>Summary</h2>\n" + _table(["", ""], rows, "summary", header=False)


def _fallback(fallback: Mapping[str, Any]) -> str:
    goals = []
    if fallback.get("target_sqnr_db") is not None:
        goals.append(f"output SQNR &ge; {fallback['target_sqnr_db']:g} dB")
    if fallback.get("max_accuracy_drop") is not None:
        judged = f" ({_e(fallback['judged_by'])})" if fallback.get("judged_by") else ""
        goals.append(f"accuracy drop &le; {fallback['max_accuracy_drop']:g} pts{judged}")
    verdict = "met" if fallback["met"] else "NOT met, even with every layer float"
    kept = ", ".join(fallback["float_layers"]) or "none"
    rows = [
        [str(len(s["float_layers"])), ", ".join(s["float_layers"]) or "(none)",
         fmt_db(s["sqnr_db"]), "-" if s["accuracy_drop"] is None else f"{s['accuracy_drop']:.2f}",
         "yes" if s["met"] else "no"]
        for s in fallback["steps"]
    ]
    return (
        f"<h2>Float fallback</h2>\n<p>Target: {' and '.join(goals)} &mdash; {_e(verdict)}. "
        f"Kept float: <b>{_e(kept)}</b>.</p>\n"
        + _table(["float layers", "which", "SQNR (dB)", "accuracy drop (pts)", "met"], rows,
                 "fallback-table", numeric={0, 2, 3})
    )


def _pts(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _method_choice(choice: Mapping[str, Any]) -> str:
    candidates = choice["candidates"]
    rows = []
    for name, info in choice["tensors"].items():
        cells = [_e(name), _e(info["method"])]
        for method in candidates:
            value = f"{info['mse'][method]:.4g}"
            cells.append(f"<b>{value}</b>" if method == info["method"] else value)
        rows.append(cells)
    return (
        "<h2>Method chosen per tensor (<code>--method auto</code>)</h2>\n"
        '<p class="note">Mean squared fake-quantization error at each tensor over the '
        "calibration data (shared-scale groups choose together).</p>\n"
        + _table(["tensor", "chosen", *candidates], rows, "method-table",
                 numeric=set(range(2, 2 + len(candidates))), raw=True)
    )


def _float_nodes(report: Mapping[str, Any]) -> str:
    nodes = report["plan"]["float_nodes"]
    if not nodes:
        return "<h2>What stayed float</h2>\n<p>Nothing: every node the backend can run in " \
               "integer arithmetic is quantized.</p>"
    return "<h2>What stayed float and why</h2>\n" + _table(
        ["node", "why"], [[n, why] for n, why in nodes.items()], "float-table")


# -------------------------------------------------------------------------------- plots


def bar_geometry(values: Sequence[float | None]) -> tuple[float, list[float]]:
    """``(scale, heights)``: pixels per dB and each bar's height (0 for None or negatives)."""
    finite = [v for v in values if v is not None and v > 0]
    scale = PLOT_HEIGHT / max(finite) if finite else 1.0
    return scale, [round(max(v, 0.0) * scale, 2) if v is not None else 0.0 for v in values]


def _bar_chart(chart_id: str, rows: Sequence[tuple[str, float | None]],
               target: float | None) -> str:
    values = [v for _, v in rows]
    scale, heights = bar_geometry(values)
    width = MARGIN_LEFT + len(rows) * (BAR_WIDTH + BAR_GAP) + BAR_GAP
    height = MARGIN_TOP + PLOT_HEIGHT + MARGIN_BOTTOM
    base = MARGIN_TOP + PLOT_HEIGHT
    out = [
        f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'data-scale="{scale:.6g}" role="img" aria-label="SQNR per entry in dB">',
        f'<line class="axis" x1="{MARGIN_LEFT}" y1="{base}" x2="{width}" y2="{base}"/>',
        f'<line class="axis" x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" '
        f'y2="{base}"/>',
    ]
    top = PLOT_HEIGHT / scale
    for fraction in (0.0, 0.5, 1.0):
        y = base - fraction * PLOT_HEIGHT
        out.append(f'<text x="{MARGIN_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">'
                   f"{fraction * top:.0f} dB</text>")
    for index, ((name, value), h) in enumerate(zip(rows, heights, strict=True), start=1):
        x = MARGIN_LEFT + BAR_GAP + (index - 1) * (BAR_WIDTH + BAR_GAP)
        below = target is not None and (value is not None and value < target)
        label = fmt_db(value)
        out.append(
            f'<rect class="bar{" below" if below else ""}" x="{x}" y="{base - h:.2f}" '
            f'width="{BAR_WIDTH}" height="{h:.2f}" data-name="{_e(name)}" '
            f'data-value="{"exact" if value is None else f"{value:.6g}"}">'
            f"<title>{index}. {_e(name)}: {label} dB</title></rect>"
        )
        out.append(f'<text x="{x + BAR_WIDTH / 2}" y="{base + 12}" text-anchor="middle">'
                   f"{index}</text>")
    if target is not None and target > 0:
        y = base - min(target * scale, PLOT_HEIGHT)
        out.append(f'<line class="target" x1="{MARGIN_LEFT}" y1="{y:.2f}" x2="{width}" '
                   f'y2="{y:.2f}"><title>target {target:g} dB</title></line>')
    out.append("</svg>")
    return '<div class="chart">' + "".join(out) + "</div>"


def _histogram(h: Mapping[str, Any]) -> str:
    counts = h["counts"]
    left, width = h["left"], h["width"]
    lo, hi = h["clip"]
    data_lo, data_hi = left, left + width * len(counts)
    x_lo, x_hi = min(data_lo, lo), max(data_hi, hi)
    span = (x_hi - x_lo) or 1.0
    x_lo, x_hi = x_lo - 0.03 * span, x_hi + 0.03 * span
    pad_left, pad_bottom, pad_top = 10.0, 30.0, 10.0
    plot_w = HIST_WIDTH - 2 * pad_left
    base = pad_top + HIST_HEIGHT

    def px(value: float) -> float:
        return pad_left + (value - x_lo) / (x_hi - x_lo) * plot_w

    peak = math.log1p(max(counts) or 1)
    out = [
        f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{HIST_WIDTH:.0f}" '
        f'height="{base + pad_bottom:.0f}" data-tensor="{_e(h["tensor"])}" role="img" '
        f'aria-label="histogram of {_e(h["tensor"])}">',
        f'<line class="axis" x1="{pad_left}" y1="{base}" x2="{HIST_WIDTH - pad_left}" '
        f'y2="{base}"/>',
    ]
    for i, count in enumerate(counts):
        if not count:
            continue
        x0, x1 = px(left + i * width), px(left + (i + 1) * width)
        bar = math.log1p(count) / peak * HIST_HEIGHT
        out.append(f'<rect class="hist-bar" x="{x0:.2f}" y="{base - bar:.2f}" '
                   f'width="{max(x1 - x0 - 0.5, 0.5):.2f}" height="{bar:.2f}" '
                   f'data-count="{count}"/>')
    for name, value in (("lo", lo), ("hi", hi)):
        x = px(value)
        out.append(f'<line class="clip" x1="{x:.2f}" y1="{pad_top}" x2="{x:.2f}" y2="{base}" '
                   f'data-edge="{name}" data-value="{value:.6g}"><title>clip {name} '
                   f"{value:.4g}</title></line>")
    out.append(f'<text x="{pad_left}" y="{base + 14}">{x_lo:.3g}</text>')
    out.append(f'<text x="{HIST_WIDTH - pad_left}" y="{base + 14}" text-anchor="end">'
               f"{x_hi:.3g}</text>")
    out.append(f'<text x="{HIST_WIDTH / 2}" y="{base + 26}" text-anchor="middle">clip '
               f"[{lo:.4g}, {hi:.4g}], data [{h['min']:.4g}, {h['max']:.4g}]</text>")
    out.append("</svg>")
    caption = f"{h['tensor']}: accumulated SQNR {fmt_db(h['sqnr_db'])} dB"
    return f"<figure>{''.join(out)}<figcaption>{_e(caption)}</figcaption></figure>"


# ------------------------------------------------------------------------------ helpers


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str, *,
           numeric: set[int] = frozenset(), header: bool = True, raw: bool = False) -> str:
    """An HTML table; ``raw`` cells are already escaped markup."""
    out = [f'<table id="{table_id}">']
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = cell if raw else _e(cell)
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _flex(*blocks: str) -> str:
    return '<div class="flex">' + "".join(blocks) + "</div>"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


__all__ = ["bar_geometry", "render_html"]
