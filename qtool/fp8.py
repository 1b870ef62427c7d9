r"""FP8 (E4M3FN) Q/DQ: ``--precision fp8`` for TensorRT, and for onnxruntime as a simulation.

The backend's placement, calibration and plan are the int8 ones (the same tensors get Q/DQ);
only the number format changes. Every Q/DQ pair and weight becomes float8e4m3fn (opset 19,
whose QuantizeLinear/DequantizeLinear take FLOAT8E4M3FN zero points)::

    scale = amax / 448          (448: E4M3FN's largest finite value)
    zero_point = 0 (float8e4m3fn)
    activations: amax = max(|lo|, |hi|) of the calibrated range, per tensor
    weights:     amax = max |W| per output channel (the int8 plan's weight ranges),
                 stored as float8e4m3fn(W / scale) (round to nearest even, in range)

Biases stay float (TensorRT's FP8 convolutions and GEMMs take float biases; onnxruntime's
int32 bias DequantizeLinear would need the int8 scales). QuantizeLinear saturates at ±448.
onnxruntime runs the Q/DQ graph on the CPU (with and without graph optimizations): a
simulation, no FP8 kernel runs there; TensorRT (Hopper and later) fuses the pairs into FP8
kernels with strong typing (engines.md 2.4).

Files: ``model.qdq.onnx``, ``plan.json``, ``report.json``, ``report.md``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from qtool.errors import PrecisionError

E4M3_MAX = 448.0
FP8_OPSET = 19
BACKENDS = ("tensorrt", "onnxruntime")
_TINY = 1e-12


def float8_tensor(name: str, values: np.ndarray) -> gs.Constant:
    """A FLOAT8E4M3FN initializer of ``values`` (already within ±448)."""
    import ml_dtypes

    array = np.asarray(values, np.float32).astype(ml_dtypes.float8_e4m3fn)
    return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(array, name)))


def _amax(qp) -> np.ndarray:
    lo, hi = np.asarray(qp.lo, np.float64), np.asarray(qp.hi, np.float64)
    return np.maximum(np.maximum(np.abs(lo), np.abs(hi)), _TINY)


def to_fp8(result) -> gs.Graph:
    """The QDQ graph of an int8 :class:`qtool.qdq.QuantizedModel`, in float8e4m3fn."""
    graph = result.graph
    floats = result.float_graph.tensors()
    replaced: dict[int, tuple[gs.Constant, gs.Constant]] = {}
    for node in list(graph.nodes):
        if node.op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        tensor = node.name.rsplit("_", 1)[0]
        qp = result.qparams.get(tensor)
        if qp is None:
            continue
        if qp.role == "bias":
            value = gs.Constant(f"{tensor}_float", np.asarray(floats[tensor].values, np.float32))
            for consumer in list(node.outputs[0].outputs):
                for index, inp in enumerate(consumer.inputs):
                    if inp is node.outputs[0]:
                        consumer.inputs[index] = value
            node.outputs.clear()
            continue
        old_scale = node.inputs[1]
        if id(old_scale) not in replaced:
            scale = np.asarray(_amax(qp) / E4M3_MAX, dtype=np.float32)
            replaced[id(old_scale)] = (
                gs.Constant(f"{tensor}_fp8_scale", scale),
                float8_tensor(f"{tensor}_fp8_zero_point", np.zeros(scale.shape, np.float32)),
            )
        scale, zero = replaced[id(old_scale)]
        node.inputs[1], node.inputs[2] = scale, zero
        if qp.role == "weight":
            weight = np.asarray(floats[tensor].values, np.float32)
            per_channel = scale.values
            if per_channel.ndim:
                shape = [1] * weight.ndim
                shape[qp.axis] = -1
                per_channel = per_channel.reshape(shape)
            levels = np.clip(weight / per_channel, -E4M3_MAX, E4M3_MAX)
            node.inputs[0] = float8_tensor(f"{tensor}_fp8", levels)
    graph.cleanup().toposort()
    return graph


def quantize_fp8(model, backend: str, options) -> tuple[dict[str, bytes], dict[str, Any]]:
    """``(files, report)`` of ``qtool calibrate --precision fp8`` (options: CalibrateOptions).

    Raises:
        PrecisionError: A backend without FP8 Q/DQ.
    """
    from qtool.analysis.evaluate import evaluate
    from qtool.calibrate_job import backend_rules, plan_for, split_data
    from qtool.calibration import calibrate
    from qtool.io import load, serialize
    from qtool.passes.opset import ensure_opset
    from qtool.prepare import prepare
    from qtool.qdq import quantize
    from qtool.samples import labelled_batches

    if backend not in BACKENDS:
        raise PrecisionError(f"backend {backend} has no FP8 (E4M3) Q/DQ")
    graph, passes = prepare(load(model))
    graph = ensure_opset(graph, FP8_OPSET)
    calib, held_out, eval_path, judged_on = split_data(graph, options)
    rules = backend_rules(backend, options.backend_options)
    plan = plan_for(graph, rules, options)
    ranges = calibrate(graph, plan.activation_schemes(), calib, method=options.method,
                       batch_size=options.batch_size, memory_budget=options.memory_budget)
    result = quantize(graph, rules, ranges, plan=plan, weight_method="minmax",
                      activation_method=options.method)
    fp8 = to_fp8(result)
    files = {"model.qdq.onnx": serialize(fp8), "plan.json": result.plan.to_json().encode()}
    report: dict[str, Any] = {
        "model": os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<graph>",
        "backend": backend, "precision": "fp8", "format": "float8e4m3fn Q/DQ, opset 19",
        "activations": len(result.plan.entries("activation")),
        "weights": len(result.plan.entries("weight")),
        "passes": [p.name for p in passes],
    }
    if options.analysis != "none":
        evaluation = evaluate(load(model), fp8,
                              labelled_batches(held_out, eval_path, options.batch_size))
        report["evaluation"] = {"data": judged_on, **evaluation.to_dict()}
    files["report.json"] = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
    lines = [f"# qtool fp8: {report['model']} for {backend}", "",
             f"E4M3FN Q/DQ on {report['activations']} activations and {report['weights']} "
             "weights (scale = amax / 448); biases float.", ""]
    for out in report.get("evaluation", {}).get("outputs", []):
        lines.append(f"- output {out['name']}: SQNR {out['sqnr_db']} dB")
    files["report.md"] = ("\n".join(lines) + "\n").encode()
    return dict(sorted(files.items())), report
