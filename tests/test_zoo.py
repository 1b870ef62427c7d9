"""The whole flow over a zoo of real architectures, every backend, opsets 11 to 21.

Each case: load the export (checked), prepare (cleanup, BN folding, opset >= 13), plan for the
backend, calibrate (MinMax or KLD, four samples), quantize, emit the backend's files, then run
float and QDQ models in onnxruntime with graph optimizations off on held-out samples.

The matrix is not the full product (see :func:`matrix`): every model meets every backend once,
and its runs walk through every opset it can be exported at and both calibration methods, so
each backend also meets every opset and method across the models. Exports and prepared graphs
are cached per (model, opset).

SQNR floors: the weights are random (seeded), so the pre-softmax outputs are judged. Every
backend is 8-bit; measured SQNR is 22-50 dB, TVM's power-of-two scales are the lowest (a
power-of-two scale loses up to one bit). The floors are 15 dB (TVM 12 dB) — well above the
~0 dB of a broken placement or a wrong scale, with margin for seed-to-seed variation.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import zoo

from qtool.backends import MODULES, backend_names, get_backend
from qtool.calibration import calibrate
from qtool.io import load, serialize
from qtool.planner import SHAPE_INPUTS, SHAPE_SOURCES, build_plan
from qtool.qdq import quantize
from qtool.workflow import prepare

OPSETS = (11, 13, 17, 21)
#: The attention exports need opset 14 (scaled_dot_product_attention); 17 and 21 it is.
MODEL_OPSETS = {"vit": (17, 21), "transformer": (17, 21)}
MAIN_BACKENDS = tuple(module.BACKEND.name for module in MODULES)
METHODS = ("minmax", "kld")
SQNR_FLOOR_DB = {"tvm": 12.0}
DEFAULT_FLOOR_DB = 15.0
CALIBRATION_SAMPLES = 4
EVAL_SAMPLES = 2

ort.set_default_logger_severity(3)


def matrix() -> list[tuple[str, str, int, str]]:
    """(model, backend, opset, method) cases.

    Model ``k``'s ``i``-th backend runs at ``opsets[(i + k) % n]`` with method
    ``METHODS[(i + k) % 2]``: six backends walk through all four opsets, and shifting by
    ``k`` gives every backend different opsets on different models. The small custom graphs
    also run the ``qnn`` alias.
    """
    cases = []
    for k, name in enumerate(zoo.MODEL_NAMES):
        opsets = MODEL_OPSETS.get(name, OPSETS)
        backends = backend_names() if name in ("detector", "ocr", "legacy") else MAIN_BACKENDS
        for i, backend in enumerate(backends):
            cases.append((name, backend, opsets[(i + k) % len(opsets)], METHODS[(i + k) % 2]))
    return cases


CASES = matrix()


def test_matrix_covers_every_backend_opset_and_method():
    for name in zoo.MODEL_NAMES:
        mine = [c for c in CASES if c[0] == name]
        assert {c[1] for c in mine} >= set(MAIN_BACKENDS)
        assert {c[2] for c in mine} == set(MODEL_OPSETS.get(name, OPSETS))
        assert {c[3] for c in mine} == set(METHODS)
    for backend in MAIN_BACKENDS:
        assert {c[2] for c in CASES if c[1] == backend} == set(OPSETS)
        assert {c[3] for c in CASES if c[1] == backend} == set(METHODS)


@functools.lru_cache(maxsize=None)
def _prepared(name: str, opset: int) -> bytes:
    graph, reports = prepare(load(zoo.zoo_bytes(name, opset)))
    return serialize(graph)


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _eval_feeds(name: str) -> dict[str, np.ndarray]:
    rows = zoo.samples(name, EVAL_SAMPLES, seed=1000)
    if name == "legacy":  # batch fixed to 1
        return rows[0]
    return {"input": np.concatenate([r["input"] for r in rows])}


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(sum x^2 / sum (x - q)^2), in float64."""
    x = reference.astype(np.float64)
    noise = float(((x - test.astype(np.float64)) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((x**2).sum()) / noise)


def _float_is_reported(plan, graph: gs.Graph, backend) -> None:
    """Every node that computes on a float activation is quantized or listed as float."""
    dequantized = {
        n.outputs[0].name for n in graph.nodes if n.op == "DequantizeLinear"
    }
    moves = set(backend.pass_through) | backend.sharing_ops | backend.fused_activations
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear", "Constant") or node.op in SHAPE_SOURCES:
            continue
        reads_quantized = any(t.name in dequantized for t in node.inputs)
        if node.name in plan.float_nodes:
            assert not reads_quantized, f"{node.name} is listed float but reads a Q/DQ tensor"
            assert plan.float_nodes[node.name], f"{node.name}: no reason given"
            continue
        if reads_quantized or node.op in moves:
            continue
        data_inputs = [
            t for i, t in enumerate(node.inputs)
            if isinstance(t, gs.Variable) and i not in SHAPE_INPUTS.get(node.op, ())
            and t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.floating)
        ]
        assert not data_inputs or node.op not in backend.quantizable_ops or all(
            t.inputs and t.inputs[0].op in ("Constant",) for t in data_inputs
        ), f"{node.op} {node.name} is quantizable for {backend.name} but got no Q/DQ and no reason"


def _check_files(files: dict[str, bytes], result, feeds, reference) -> None:
    assert "plan.json" in files
    json.loads(files["plan.json"])
    models = {k: v for k, v in files.items() if k.endswith(".onnx")}
    assert models, f"no model among {sorted(files)}"
    for fname, data in models.items():
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
        out = _session(data).run(None, feeds)[0]
        assert out.shape == reference.shape, fname
    for fname, data in files.items():
        if fname.endswith((".json", ".encodings")):
            json.loads(data)
    if "model.encodings" in files:  # SNPE/QNN: encodings name tensors of the shipped model
        shipped = onnx.load_from_string(files["model.onnx"])
        names = {t.name for t in shipped.graph.initializer} | {
            o for n in shipped.graph.node for o in n.output
        } | {i.name for i in shipped.graph.input}
        enc = json.loads(files["model.encodings"])
        for section in ("activation_encodings", "param_encodings"):
            missing = set(enc[section]) - names
            assert not missing, f"{section} names unknown tensors {sorted(missing)[:3]}"
    if "calibration.cache" in files:  # TensorRT: one line per quantized activation
        lines = files["calibration.cache"].decode().splitlines()[1:]
        names = {line.rsplit(":", 1)[0] for line in lines}
        assert names == set(result.plan.activation_schemes())
    if "record.txt" in files:  # ACL: keys are node names of the QDQ model
        nodes = {n.name for n in result.graph.nodes}
        keys = [line.split('"')[1] for line in files["record.txt"].decode().splitlines()
                if line.strip().startswith("key:")]
        assert keys and set(keys) <= nodes


@pytest.mark.parametrize(
    "name,backend_name,opset,method", CASES, ids=[f"{c[0]}-{c[1]}-op{c[2]}-{c[3]}" for c in CASES]
)
def test_zoo_flow(name, backend_name, opset, method, caplog):
    caplog.set_level(logging.ERROR)
    backend = get_backend(backend_name)
    graph = load(_prepared(name, opset), check=False)
    assert graph.opset >= 13
    assert not [n for n in graph.nodes if n.op in ("BatchNormalization", "Identity")]
    plan = build_plan(graph, backend)
    assert plan.activation_schemes(), "nothing to calibrate"
    ranges = calibrate(
        graph, plan.activation_schemes(), zoo.samples(name, CALIBRATION_SAMPLES),
        method=method, batch_size=CALIBRATION_SAMPLES,
    )
    result = quantize(graph, backend, ranges, plan=plan)
    qdq = result.graph
    assert any(n.op == "QuantizeLinear" for n in qdq.nodes)
    _float_is_reported(result.plan, qdq, backend)

    feeds = _eval_feeds(name)
    reference = _session(zoo.zoo_bytes(name, opset)).run(None, feeds)[0]
    quantized = _session(serialize(qdq)).run(None, feeds)[0]
    assert quantized.shape == reference.shape
    assert np.isfinite(quantized).all()
    sqnr = sqnr_db(reference, quantized)
    floor = SQNR_FLOOR_DB.get(backend.name, DEFAULT_FLOOR_DB)
    print(f"SQNR {name} {backend_name} opset {opset} {method}: {sqnr:.1f} dB")
    assert sqnr > floor, f"{name}/{backend_name}: SQNR {sqnr:.1f} dB <= {floor} dB"
    _check_files(result.files(), result, feeds, reference)


# ------------------------------------------------------------------ old-exporter quirks


def test_legacy_quirks_are_cleaned_and_subgraphs_left_untouched():
    original = zoo.legacy_model(11)
    assert {"Identity", "Constant", "BatchNormalization", "If", "Loop"} <= {
        n.op_type for n in original.graph.node
    }
    assert {t.name for t in original.graph.initializer} <= {i.name for i in original.graph.input}
    graph, _ = prepare(load(original.SerializeToString()))
    ops = [n.op for n in graph.nodes]
    assert "BatchNormalization" not in ops and "Identity" not in ops and "Constant" not in ops
    assert [i.name for i in graph.inputs] == ["input"]  # initializers no longer inputs
    convs = [n for n in graph.nodes if n.op == "Conv"]
    assert convs[1].inputs[1] is convs[2].inputs[1]  # the shared weight stays one tensor

    plan = build_plan(graph, "tensorrt")
    weight = convs[1].inputs[1].name
    assert set(plan.tensors[weight].consumers) == {convs[1].name, convs[2].name}
    assert "branch" in plan.float_nodes and "loop" in plan.float_nodes

    ranges = calibrate(graph, plan.activation_schemes(), zoo.samples("legacy", 4))
    result = quantize(graph, "tensorrt", ranges, plan=plan)
    model = onnx.load_from_string(serialize(result.graph))
    by_name = {n.name: n for n in model.graph.node}
    before = {n.name: n for n in original.graph.node}
    for node_name in ("branch", "loop"):  # bodies byte-identical to the export's
        for new, old in zip(by_name[node_name].attribute, before[node_name].attribute):
            assert new.SerializeToString(deterministic=True) == old.SerializeToString(
                deterministic=True
            )
    # One shared weight -> one quantized initializer read by both convs.
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and weight in n.input[0]]
    assert len(dq) == 1


def test_ocr_lstm_stays_float_with_a_reason():
    graph = load(_prepared("ocr", 13), check=False)
    for backend in MAIN_BACKENDS:
        plan = build_plan(graph, backend)
        lstm = [n.name for n in graph.nodes if n.op == "LSTM"]
        assert lstm and all("LSTM" in plan.float_nodes[name] for name in lstm), backend


def test_detector_keeps_dynamic_shapes_and_runs_at_other_sizes():
    """The detector's H/W are symbolic: prepare must not freeze them, QDQ runs at 64x80."""
    graph = load(_prepared("detector", 13), check=False)
    assert [d for d in graph.inputs[0].shape[2:]] == ["height", "width"]
    plan = build_plan(graph, "fbgemm")
    ranges = calibrate(graph, plan.activation_schemes(), zoo.samples("detector", 4))
    result = quantize(graph, "fbgemm", ranges, plan=plan)
    feeds = {"input": np.random.default_rng(5).standard_normal((2, 3, 64, 80)).astype(np.float32)}
    reference = _session(zoo.zoo_bytes("detector", 13)).run(None, feeds)[0]
    quantized = _session(serialize(result.graph)).run(None, feeds)[0]
    assert quantized.shape == reference.shape == (2, 8 * (32 * 40 + 16 * 20 + 8 * 10))
    assert sqnr_db(reference, quantized) > DEFAULT_FLOOR_DB
    # Resize/Slice/Reshape shape inputs are never quantized.
    from qtool.planner import shape_tensors

    shape = shape_tensors(graph)
    assert not shape & set(plan.activation_schemes())
