"""``qtool calibrate -b openvino`` against NNCF, both run in OpenVINO's CPU plugin.

Per model of the wheel set (``bench_fidelity.py`` prepares the float model and its data
under ``$QTOOL_BENCH_CACHE/fidelity/<model>/``; issue 24's 32 calibration / 16 held-out
samples by default):

* ``qtool``: ``qtool calibrate MODEL -b openvino --data calib.npz`` (its defaults: minmax,
  bias correction judged on a held-out split);
* ``nncf/performance`` and ``nncf/mixed``: ``nncf.quantize`` on the same ONNX model and the
  same calibration samples (its defaults: fast bias correction), run with NNCF's venv
  python (``--nncf-python``; NNCF is not a qtool dependency).

Each QDQ model and the float model are compiled by OpenVINO CPU with
``INFERENCE_PRECISION_HINT=f32`` (bf16 CPUs would otherwise run the float parts in bf16)
and run on the held-out samples: SQNR (dB, over all samples, mean over outputs) against the
float model's own outputs and the model's task metric (``bench_fidelity.task_metrics``),
both in OpenVINO; the weighted layers that run
in u8/i8 (from the runtime model); latency: median of batch-1 inferences, the float model
and the quantized ones interleaved round by round so that machine load hits all alike,
reported as a ratio to float.

Usage:
    QTOOL_BENCH_CACHE=/work/cache python benchmarks/bench_openvino.py --models digits,magika
    python benchmarks/bench_openvino.py --nncf-python /work/venvs/h8/bin/python  # every model
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_fidelity as bf  # noqa: E402
from bench_engines import MODELS  # noqa: E402

F32 = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
WEIGHTED = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected"}

NNCF_SCRIPT = """
import json, sys, numpy as np, onnx, nncf
spec = json.loads(sys.argv[1])
with np.load(spec["calib"]) as archive:
    arrays = {k: archive[k] for k in archive.files if k != "labels"}
rows = len(next(iter(arrays.values())))
feeds = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(rows)]
preset = {"performance": nncf.QuantizationPreset.PERFORMANCE,
          "mixed": nncf.QuantizationPreset.MIXED}[spec["preset"]]
model = nncf.quantize(onnx.load(spec["model"]), nncf.Dataset(feeds), preset=preset,
                      subset_size=rows)
onnx.save(model, spec["out"])
"""


def rows_of(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "labels"}
    rows = len(next(iter(arrays.values())))
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(rows)]


def run_qtool(model: Path, calib: Path, out: Path) -> tuple[Path, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qtool.cli", "calibrate", str(model), "-b", "openvino",
                    "--data", str(calib), "-o", str(out), "--force", "-q"], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out / "model.qdq.onnx", time.perf_counter() - start


def run_nncf(python: str, model: Path, calib: Path, out: Path, preset: str) -> tuple[Path, float]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.qdq.onnx"
    spec = {"model": str(model), "calib": str(calib), "out": str(path), "preset": preset}
    start = time.perf_counter()
    subprocess.run([python, "-c", NNCF_SCRIPT, json.dumps(spec)], check=True,
                   stdout=subprocess.DEVNULL)
    return path, time.perf_counter() - start


def compile_model(path: Path):
    import openvino as ov

    core = ov.Core()
    return core.compile_model(ov.convert_model(io.BytesIO(path.read_bytes())), "CPU", F32)


def int8_layers(compiled) -> tuple[int, int]:
    int8 = total = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in WEIGHTED:
            total += 1
            int8 += info["runtimePrecision"].astype(str) in ("u8", "i8")
    return int8, total


def outputs(compiled, rows) -> list[list[np.ndarray]]:
    """Per sample, the model's outputs (as ``bench_fidelity.run_model`` gives them)."""
    return [[np.asarray(r[compiled.output(i)]) for i in range(len(compiled.outputs))]
            for r in (compiled(row) for row in rows)]


def latencies(models: dict[str, object], row, rounds: int) -> dict[str, float]:
    """Median batch-1 latency (ms) per model, the models interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for compiled in models.values():
        for _ in range(5):
            compiled(row)  # warm-up
    for _ in range(rounds):
        for name, compiled in models.items():
            start = time.perf_counter()
            compiled(row)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def bench(name: str, nncf_python: str | None, rounds: int, sizes: tuple[int, int]) -> dict:
    """qtool and NNCF on one model of the wheel set, in OpenVINO CPU."""
    model = bf.prepare_model(name)
    data = bf.prepare_data(name, sizes)
    held = rows_of(data["eval"])
    work = Path(tempfile.mkdtemp(prefix=f"bench-ov-{name}-"))
    variants = {"qtool": run_qtool(model, data["calib"], work / "qtool")}
    if nncf_python:
        for preset in ("performance", "mixed"):
            variants[f"nncf/{preset}"] = run_nncf(nncf_python, model, data["calib"],
                                                  work / preset, preset)
    compiled = {"float": compile_model(model)}
    compiled.update({key: compile_model(path) for key, (path, _) in variants.items()})
    reference = outputs(compiled["float"], held)
    speed = latencies(compiled, held[0], rounds)
    key_name = bf.TASK_COLUMNS[name][0]
    results = {}
    for key, (_, wall) in variants.items():
        got = outputs(compiled[key], held)
        int8, total = int8_layers(compiled[key])
        results[key] = {
            "sqnr_db": float(np.mean(bf.sqnr_per_output(reference, got))),
            "task": bf.task_metrics(name, reference, got, data["truth"])[key_name],
            "int8_layers": f"{int8}/{total}",
            "latency_ms": speed[key],
            "speedup_vs_float": speed["float"] / speed[key],
            "quantize_s": wall,
        }
    return {"model": name, "samples": len(held), "float_latency_ms": speed["float"],
            "float_task": bf.task_metrics(name, reference, reference, data["truth"])[key_name],
            "variants": results}


def table(runs: list[dict]) -> str:
    """Markdown: per model and variant, SQNR and task metric in OpenVINO, int8 layers, speed."""
    lines = ["| model | variant | SQNR dB (OpenVINO) | task | int8 layers | "
             "latency ms (x float) | quantize s |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        task = bf.TASK_COLUMNS[run["model"]][1]
        lines.append(f"| {run['model']} | float | | {task} {100 * run['float_task']:.1f} | | "
                     f"{run['float_latency_ms']:.3f} | |")
        best = max(r["sqnr_db"] for k, r in run["variants"].items() if k != "qtool")
        for key, r in run["variants"].items():
            sqnr = f"{r['sqnr_db']:.2f}"
            if key == "qtool":
                sqnr = f"**{sqnr}** ({r['sqnr_db'] - best:+.1f})"
            lines.append(f"| {run['model']} | {key} | {sqnr} | {100 * r['task']:.1f} | "
                         f"{r['int8_layers']} | {r['latency_ms']:.3f} "
                         f"({r['speedup_vs_float']:.2f}x) | {r['quantize_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sizes", default="32,16",
                        help="calibration,held-out samples per model (issue 24: 32,16)")
    parser.add_argument("--nncf-python", default=None,
                        help="python of a venv with nncf (omit: qtool only)")
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    sizes = tuple(int(v) for v in args.sizes.split(","))
    runs = []
    for name in args.models.split(","):
        runs.append(bench(name, args.nncf_python, args.rounds, sizes))
        print(table(runs[-1:]), flush=True)
    print(json.dumps(runs, indent=2))
    print(table(runs))


if __name__ == "__main__":
    main()
