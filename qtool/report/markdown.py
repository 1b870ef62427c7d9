"""The report rendered as text: the markdown page, the terminal summary, number formats."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown page."""
    lines = [f"# qtool report: {report['model']} for {report['backend']}", ""]
    for warning in report.get("warnings", []):
        lines.append(f"> **Warning:** {warning}")
        lines.append("")
    for note in report.get("notes", []):
        lines.append(f"> Note: {note}")
        lines.append("")
    cal = report["calibration"]
    lines += [
        "## Calibration",
        "",
        "| setting | value |",
        "|---|---|",
        f"| activation method | {cal['method']} |",
        f"| weight method | {cal['weight_method']} |",
        f"| data | {cal['data']} |",
        f"| samples | {cal['samples']} |",
        f"| random inputs | {'yes' if cal['random_inputs'] else 'no'} |",
        "",
    ]
    ev = report.get("evaluation")
    if ev:
        held = "held-out" if ev["held_out"] else "the calibration data"
        lines += [
            "## Accuracy",
            "",
            f"Evaluated on {ev['data']} ({ev['samples']} samples, {held}).",
            "",
            "| output | SQNR (dB) | cosine | max abs error | top-1 agreement |",
            "|---|---|---|---|---|",
        ]
        for out in ev["outputs"]:
            lines.append(
                f"| {out['name']} | {fmt_db(out['sqnr_db'])} | {out['cosine']:.5f} | "
                f"{out['max_abs_error']:.4g} | {fmt_pct(out['top1_agreement'])} |"
            )
            for part in out.get("slices", ()):
                lines.append(f"| {_slice_label(out['name'], part)} | "
                             f"{fmt_db(part['sqnr_db'])} | | | |")
        accuracy = _accuracy(ev)
        if accuracy:
            lines += ["", f"Top-1 accuracy: float {fmt_pct(accuracy[0])}, quantized "
                      f"{fmt_pct(accuracy[1])} ({_delta(accuracy)})."]
        if ev.get("task"):
            lines += ["", _task_line(ev["task"]) + "."]
        if ev.get("layers"):
            lines += ["", "### Layers, worst first", "", "| tensor | op | SQNR (dB) | cosine |",
                      "|---|---|---|---|"]
            for layer in ev["layers"]:
                lines.append(
                    f"| {layer['tensor']} | {layer['op']} | {fmt_db(layer['sqnr_db'])} | "
                    f"{layer['cosine']:.5f} |"
                )
        lines.append("")
    lines += _analysis_markdown(report.get("analysis"))
    plan = report["plan"]
    lines += ["## Plan", "", f"{plan['quantized_tensors']} tensors quantized "
              f"({plan['activations']} activations, {plan['weights']} weights, "
              f"{plan['biases']} biases); {len(plan['float_nodes'])} nodes stay float"
              + _shape_text(plan) + ".", ""]
    if plan["float_nodes"]:
        lines += ["| node | why it stays float |", "|---|---|"]
        lines += [f"| {node} | {why} |" for node, why in plan["float_nodes"].items()]
        lines.append("")
    lines += ["## Passes", ""] + [f"- {p}" for p in report["passes"]] + [""]
    correction = report.get("bias_correction")
    if correction:
        lines += ["## Bias correction", "", f"{len(correction['layers'])} layer biases corrected "
                  f"for their mean output error on {correction['samples']} calibration samples "
                  f"({correction['stages']} passes of the quantized model)."]
        lines += [f"Output {name} SQNR on the evaluation data: {fmt_db(a)} dB without, "
                  f"{fmt_db(b)} dB with it." for name, (a, b) in
                  correction.get("sqnr_db", {}).items()]
        if correction.get("reverted"):
            lines.append("It lowered an output's SQNR on the evaluation data: the model "
                         "written is the uncorrected one.")
        lines += ["",
                  "| layer | largest bias change |", "|---|---|"]
        lines += [f"| {name} | {delta:.4g} |" for name, delta in correction["layers"].items()]
        lines.append("")
    from qtool.analysis.kernels import engines_markdown

    lines += engines_markdown(report.get("ort_kernels"))
    lines += _options_markdown(report)
    lines += ["## Files", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| {name} | `{digest}` |" for name, digest in report["files"].items()]
    return "\n".join(lines) + "\n"


def _options_markdown(report: Mapping[str, Any]) -> list[str]:
    """The effective options (config keys), and the config file they came from."""
    options = report.get("options")
    if options is None:
        return []
    source = report.get("config")
    lines = ["## Options", "", f"From {source} and the flags given with it." if source
             else "From the command-line flags (no --config).", "",
             "| option | value |", "|---|---|"]
    lines += [f"| {name} | `{json.dumps(value)}` |" for name, value in options.items()]
    return lines + [""]


def _analysis_markdown(analysis: Mapping[str, Any] | None) -> list[str]:
    """The analysis sections of report.md (the same numbers as report.html)."""
    if not analysis:
        return []
    lines: list[str] = []
    fallback = analysis.get("fallback")
    if fallback:
        goals = []
        if fallback["target_sqnr_db"] is not None:
            goals.append(f"output SQNR >= {fallback['target_sqnr_db']:g} dB")
        if fallback["max_accuracy_drop"] is not None:
            judged = f" ({fallback['judged_by']})" if fallback.get("judged_by") else ""
            goals.append(f"accuracy drop <= {fallback['max_accuracy_drop']:g} pts{judged}")
        kept = ", ".join(fallback["float_layers"]) or "none"
        wide = ", ".join(fallback.get("wide_layers") or ()) or "none"
        lines += ["## Float fallback", "",
                  f"Target {' and '.join(goals)}: {'met' if fallback['met'] else 'NOT met'}; "
                  f"16-bit activations: {wide}; kept float: {kept}.", "",
                  "| 16-bit layers | float layers | SQNR (dB) | accuracy drop (pts) | met |",
                  "|---|---|---|---|---|"]
        for step in fallback["steps"]:
            drop = step["accuracy_drop"]
            lines.append(f"| {', '.join(step.get('wide_layers') or ()) or '(none)'} | "
                         f"{', '.join(step['float_layers']) or '(none)'} | "
                         f"{fmt_db(step['sqnr_db'])} | {'-' if drop is None else f'{drop:.2f}'} | "
                         f"{'yes' if step['met'] else 'no'} |")
        lines.append("")
    if analysis.get("layers"):
        task = any(s.get("task_drop") is not None for s in analysis["layers"])
        lines += ["## Layer sensitivity (each layer quantized alone), worst first", "",
                  "| layer | op | output SQNR (dB) | cosine |" + (" task drop (pts) |" if task
                                                                else ""),
                  "|---|---|---|---|" + ("---|" if task else "")]
        lines += [f"| {s['node']} | {s['op']} | {fmt_db(s['sqnr_db'])} | {s['cosine']:.5f} |"
                  + (f" {_pts(s.get('task_drop'))} |" if task else "")
                  for s in analysis["layers"]]
        lines.append("")
    if analysis.get("tensors"):
        lines += ["## Quantized tensors (accumulated error, calibration data)", "",
                  "| tensor | role | SQNR (dB) | cosine |", "|---|---|---|---|"]
        lines += [f"| {t['tensor']} | {t['role']} | {fmt_db(t['sqnr_db'])} | {t['cosine']:.5f} |"
                  for t in analysis["tensors"]]
        lines.append("")
    choice = analysis.get("method_choice")
    if choice:
        lines += ["## Method per tensor (--method auto)", "", "| tensor | method |", "|---|---|"]
        lines += [f"| {name} | {info['method']} |" for name, info in choice["tensors"].items()]
        lines.append("")
    return lines


def _pts(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _shape_text(plan: Mapping[str, Any]) -> str:
    count = plan.get("shape_nodes", 0)
    return f" (+{count} shape arithmetic)" if count else ""


def summary_table(report: Mapping[str, Any], output: str | None = None) -> str:
    """The short text summary ``qtool calibrate`` prints."""
    cal = report["calibration"]
    target = f" -> {output}" if output else ""
    lines = [f"{report['model']}{target}  [{report['backend']}, {cal['method']}]"]
    for warning in report.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    lines.append(f"  calibration data   {cal['data']} ({cal['samples']} samples)")
    ev = report.get("evaluation")
    if ev:
        held = "held out" if ev["held_out"] else "calibration data"
        lines.append(f"  evaluation data    {ev['data']} ({ev['samples']} samples, {held})")
    plan = report["plan"]
    lines.append(
        f"  quantized tensors  {plan['quantized_tensors']} ({plan['activations']} activations, "
        f"{plan['weights']} weights, {plan['biases']} biases); float nodes "
        f"{len(plan['float_nodes'])}" + _shape_text(plan)
    )
    if ev:
        lines.append("")
        lines += _output_rows(ev)
    fallback = (report.get("analysis") or {}).get("fallback")
    if fallback:
        kept = ", ".join(fallback["float_layers"]) or "none"
        wide = fallback.get("wide_layers") or ()
        mix = f"16-bit activations: {', '.join(wide)}; " if wide else ""
        lines.append(f"  float fallback     {'met' if fallback['met'] else 'NOT met'}; "
                     f"{mix}kept float: {kept}")
    correction = report.get("bias_correction")
    if correction:
        effect = "; ".join(f"{name} {fmt_db(a)} -> {fmt_db(b)} dB"
                           for name, (a, b) in correction.get("sqnr_db", {}).items())
        lines.append(f"  bias correction    {len(correction['layers'])} layers"
                     + (f"; SQNR {effect}" if effect else "")
                     + ("; reverted (uncorrected model kept)" if correction.get("reverted")
                        else ""))
    notes = plan.get("notes") or {}
    for reason in dict.fromkeys(r for r in notes.values() if not r.startswith("KV cache")):
        lines.append(f"  scale split: {reason}")
    cache = [r for r in notes.values() if r.startswith("KV cache")]
    if cache:  # one line; plan.json's notes say it per cache tensor
        lines.append(f"  KV cache           {_cache_line(cache)}")
    if plan["float_nodes"]:
        lines.append("")
        shown = list(plan["float_nodes"].items())
        for node, why in shown[:5]:
            lines.append(f"  float: {node}: {why}")
        if len(shown) > 5:
            lines.append(f"  ... and {len(shown) - 5} more float nodes (see report.md)")
    if report.get("files"):
        lines.append("")
        lines.append("  files: " + ", ".join(
            list(report["files"]) + ["report.html", "report.json", "report.md"]))
    return "\n".join(lines) + "\n"


def evaluation_table(ev: Mapping[str, Any]) -> str:
    """The text ``qtool evaluate`` prints: outputs, accuracy, and layers worst first."""
    lines = [f"{ev['samples']} samples"] + _output_rows(ev)
    if ev.get("layers"):
        rows = [("tensor", "op", "SQNR dB", "cosine", "max abs err")]
        for layer in ev["layers"]:
            rows.append((layer["tensor"], layer["op"], fmt_db(layer["sqnr_db"]),
                         f"{layer['cosine']:.5f}", f"{layer['max_abs_error']:.4g}"))
        lines += ["", "layers, worst first:"] + _table(rows)
    return "\n".join(lines) + "\n"


def _output_rows(ev: Mapping[str, Any]) -> list[str]:
    rows = [("output", "SQNR dB", "cosine", "max abs err", "top-1 agree")]
    for out in ev["outputs"]:
        rows.append((out["name"], fmt_db(out["sqnr_db"]), f"{out['cosine']:.5f}",
                     f"{out['max_abs_error']:.4g}", fmt_pct(out["top1_agreement"])))
        for part in out.get("slices", ()):  # judged per slice too (qtool.analysis.slices)
            rows.append(("  " + _slice_label(out["name"], part), fmt_db(part["sqnr_db"]),
                         "", "", ""))
    lines = _table(rows)
    accuracy = _accuracy(ev)
    if accuracy:
        lines.append("")
        lines.append(
            f"  top-1 accuracy     float {fmt_pct(accuracy[0])}   quantized {fmt_pct(accuracy[1])}"
            f"   ({_delta(accuracy)})"
        )
    if ev.get("task"):
        lines += ["", "  " + _task_line(ev["task"])]
    return lines


def _slice_label(output: str, part: Mapping[str, Any]) -> str:
    from qtool.report.sqnr_floor import slice_label

    return slice_label(output, part)


def _task_line(task: Mapping[str, Any]) -> str:
    from qtool.analysis.tasks import task_summary

    return task_summary(task)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return [line.rstrip() for line in lines]


def _accuracy(ev: Mapping[str, Any]) -> tuple[float, float] | None:
    for out in ev["outputs"]:
        if out.get("float_accuracy") is not None and out.get("quant_accuracy") is not None:
            return out["float_accuracy"], out["quant_accuracy"]
    return None


def fmt_db(value: float | str | None) -> str:
    """An SQNR in dB for a table: two decimals, "exact" when there is no error."""
    if value is None:
        return "exact"
    if isinstance(value, str):
        return value
    return f"{value:.2f}"


def fmt_pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals, "-" when unknown."""
    return "-" if value is None else f"{100.0 * value:.2f}%"


def _delta(accuracy: tuple[float, float]) -> str:
    return f"{100.0 * (accuracy[1] - accuracy[0]):+.2f} pts"


def _cache_line(notes: list[str]) -> str:
    """The summary's KV-cache line from the plan's notes (:func:`qtool.kv_cache.cache_notes`)."""
    inside = sum("quantized inside" in n for n in notes)
    quantized = sum(": quantized," in n for n in notes)
    kept = len(notes) - inside - quantized
    return (f"{len(notes)} cache inputs/outputs: {quantized} quantized, {inside} float at the "
            f"model's edge but quantized inside, {kept} float (plan.json notes)")
