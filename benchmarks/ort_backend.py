"""The ``onnxruntime`` backend's model against the float model, in onnxruntime's CPU kernels.

For each model, in one run and on the same CPU, side by side:

* ``float``: the prepared float model (cleanup, fold_bn, upgrade_opset);
* ``onnxruntime`` (and, for comparison, ``fbgemm`` and ``tensorrt``): ``model.qdq.onnx`` of
  that backend, calibrated with minmax;

all run with onnxruntime's default graph optimizations (the integer kernels), one thread,
batch 1 and batch 8. The table gives the median latency of ``--runs`` runs after warm-up, the
speed-up over float, and the output SQNR against float in the kernels and in the pure Q/DQ
simulation (optimizations off). Models: the trained digits CNN (examples/) and torchvision's
resnet18 (random weights, 224x224, calibrated on random images: a speed model only).

Usage:
    python benchmarks/ort_backend.py            # digits + resnet18
    python benchmarks/ort_backend.py --quick    # digits only
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtool.backends import get_backend  # noqa: E402
from qtool.backends.onnxruntime import cpu_has_vnni  # noqa: E402

import qtool  # noqa: E402
from qtool.io import serialize  # noqa: E402
from qtool.planner import build_plan  # noqa: E402
from qtool.qdq import quantize  # noqa: E402
from qtool.workflow import prepare  # noqa: E402

BACKENDS = ("onnxruntime", "fbgemm", "tensorrt")


def _session(model: bytes, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _latency_ms(session: ort.InferenceSession, feeds: dict, runs: int) -> float:
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _sqnr(reference: np.ndarray, test: np.ndarray) -> float:
    noise = float(((reference.astype(np.float64) - test) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((reference**2).sum()) / noise)


def _models(quick: bool):
    calib = np.load(ROOT / "examples" / "digits_calib.npz")["input"]
    val = np.load(ROOT / "examples" / "digits_val.npz")["input"]
    yield "digits", qtool.load(str(ROOT / "examples" / "digits_cnn.onnx")), calib, val
    if quick:
        return
    import torch
    import torchvision

    module = torchvision.models.resnet18(weights=None).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, 224, 224),), buffer, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    rng = np.random.default_rng(0)
    images = rng.standard_normal((64, 3, 224, 224)).astype(np.float32)
    yield "resnet18", qtool.load(buffer.getvalue()), images[:32], images[32:]


def main() -> None:
    """Print the latency/SQNR table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per cell")
    args = parser.parse_args()
    runs = args.runs or 20
    print(f"onnxruntime {ort.__version__}, VNNI: {cpu_has_vnni()}, 1 thread, median of {runs}")
    print(f"{'model':10} {'variant':12} {'batch':>5} {'ms':>9} {'speed-up':>9} "
          f"{'SQNR kernels':>13} {'SQNR sim':>9}")
    for name, graph, calib, val in _models(args.quick):
        graph, _ = prepare(graph)
        float_bytes = serialize(graph)
        variants = {"float": float_bytes}
        for backend in BACKENDS:
            rules = get_backend(backend)
            plan = build_plan(graph, rules)
            ranges = qtool.calibrate(graph, plan.activation_schemes(), [{"input": calib}],
                                     method="minmax")
            variants[backend] = serialize(quantize(graph, rules, ranges, plan=plan).graph)
        for batch in (1, 8):
            feeds = {"input": val[:batch]}
            (reference,) = _session(float_bytes, True).run(None, feeds)
            base = None
            for variant, model in variants.items():
                fast = _session(model, True)
                ms = _latency_ms(fast, feeds, runs)
                base = base or ms
                (kernels,) = fast.run(None, feeds)
                (simulated,) = _session(model, False).run(None, feeds)
                sqnr = "" if variant == "float" else f"{_sqnr(reference, kernels):13.1f}"
                sim = "" if variant == "float" else f"{_sqnr(reference, simulated):9.1f}"
                print(f"{name:10} {variant:12} {batch:5d} {ms:9.3f} {base / ms:8.2f}x "
                      f"{sqnr:>13} {sim:>9}")


if __name__ == "__main__":
    main()
