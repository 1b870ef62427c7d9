"""The whole flow over a zoo of real architectures, every backend, opsets 11 to 21.

Each case: load the export (checked), prepare (cleanup, BN folding, opset >= 13), plan for the
backend, calibrate (MinMax or KLD, four samples), quantize, emit the backend's files, then run
float and QDQ models in onnxruntime with graph optimizations off on held-out samples. Each
case also checks that every node left float is listed with its reason, that the vendor files
name tensors and nodes of the model they ship with, and that ``qtool lint`` passes the QDQ
model for its backend.

The matrix is not the full product (see :func:`matrix`): every model meets every backend once,
and its runs walk through every opset it can be exported at and both calibration methods, so
each backend also meets every opset and method across the models. Exports and prepared graphs
are cached per (model, opset).

SQNR floors: the weights are random (seeded), so the pre-softmax outputs are judged. Every
backend is 8-bit. Measured: 16-50 dB with MinMax and KLD alike; the lowest is the ``multi``
model's batched-MatMul output (16 dB: four calibration samples see a few of the embedding
table's rows, held-out tokens fetch others and clip), TVM's power-of-two scales lose up to
one bit. Floors: 15 dB, TVM 12 dB; a broken placement or a wrong scale gives ~0 dB. (KLD gave
8.5 dB on EfficientNet and 12 dB on ShuffleNet before the fix tested at the end.)
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
from qdq_helpers import TENSORRT_ALL_CONVS
from qtool.backends import MODULES, backend_names, get_backend
from qtool.calibration import calibrate

from qtool.io import load, serialize
from qtool.lint import lint_model
from qtool.planner import SHAPE_INPUTS, SHAPE_SOURCES, build_plan
from qtool.prepare import prepare
from qtool.qdq import quantize

OPSETS = (11, 13, 17, 21)
#: The attention exports need opset 14 (scaled_dot_product_attention); 17 and 21 it is.
MODEL_OPSETS = {"vit": (17, 21), "transformer": (17, 21)}
#: qnn shares snpe's placement and files: it runs on the small graphs only (backend_names).
MAIN_BACKENDS = tuple(module.BACKEND.name for module in MODULES if module.BACKEND.name != "qnn")
METHODS = ("minmax", "kld")
#: snpe/qnn quantize the graph outputs too (converter placement), with ranges from the 4
#: calibration samples that the 2 evaluation samples exceed: vit 10 dB, multi 14 dB.
SQNR_FLOOR_DB = {"tvm": 12.0, "snpe": 8.0, "qnn": 8.0}
DEFAULT_FLOOR_DB = 15.0
CALIBRATION_SAMPLES = 4
EVAL_SAMPLES = 2

ort.set_default_logger_severity(3)


def matrix() -> list[tuple[str, str, int, str]]:
    """(model, backend, opset, method) cases.

    Model ``k``'s ``i``-th backend runs at ``opsets[(i + k) % n]`` with method
    ``METHODS[(i + k) % 2]``: six backends walk through all four opsets, and shifting by
    ``k`` gives every backend different opsets on different models. The small custom graphs
    run every backend name.
    """
    cases = []
    for k, name in enumerate(zoo.MODEL_NAMES):
        opsets = MODEL_OPSETS.get(name, OPSETS)
        small = ("detector", "ocr", "multi", "legacy")
        backends = backend_names() if name in small else MAIN_BACKENDS
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


@functools.cache
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
    return {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}


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
    # Data movement keeps its input's scale, activations fuse into their producer, and a
    # shortcut op (TensorRT's Add) whose only activation input is a fused conv/matmul output
    # runs inside that producer: none of them needs its own Q/DQ.
    moves = (set(backend.pass_through) | backend.sharing_ops | backend.fused_activations
             | backend.placement.shortcut_ops)
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear", "Constant", *SHAPE_SOURCES):
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
        names = set()
        for graph in _graphs(shipped.graph):  # tensors of If/Loop bodies are tensors too
            names |= {t.name for t in graph.initializer} | {
                o for n in graph.node for o in n.output
            } | {i.name for i in graph.input}
        enc = json.loads(files["model.encodings"])
        for section in ("activation_encodings", "param_encodings"):
            missing = {e["name"] for e in enc[section]} - names  # version 1.0.0: a list
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
    references = _session(zoo.zoo_bytes(name, opset)).run(None, feeds)
    quantized = _session(serialize(qdq)).run(None, feeds)
    floor = SQNR_FLOOR_DB.get(backend.name, DEFAULT_FLOOR_DB)
    for index, (reference, output) in enumerate(zip(references, quantized, strict=True)):
        assert output.shape == reference.shape
        assert np.isfinite(output).all()
        sqnr = sqnr_db(reference, output)
        print(f"SQNR {name}[{index}] {backend_name} opset {opset} {method}: {sqnr:.1f} dB")
        assert sqnr > floor, f"{name}[{index}]/{backend_name}: SQNR {sqnr:.1f} dB <= {floor} dB"
    _check_files(result.files(), result, feeds, references[0])
    # qtool's own QDQ model passes qtool's lint for its backend (Q/DQ structure, shared
    # scales, zero points, integer types), and no rule trips over the graph.
    findings = lint_model(serialize(qdq), backend=backend_name).findings
    assert not [f for f in findings if f.severity == "error" or "could not check" in f.message]


# ------------------------------------------------------------------ old-exporter quirks


@pytest.mark.parametrize("opset", [11, 12])
def test_legacy_quirks_are_cleaned_and_subgraphs_left_untouched(opset):
    original = zoo.legacy_model(opset)
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

    plan = build_plan(graph, TENSORRT_ALL_CONVS)  # its convs have 8 channels
    # Regression: an If reads its outer tensors implicitly, so its output (and the Loop's
    # after it) was taken for a constant and the pooling/FC inputs were silently left float.
    assert {"loop_out", "flat"} <= set(plan.activation_schemes())
    assert "flat" in build_plan(graph, "academic").activation_schemes()
    weight = convs[1].inputs[1].name
    assert set(plan.tensors[weight].consumers) == {convs[1].name, convs[2].name}
    # If/Loop bodies are planned node by node (issue 12): the bodies' own ops are listed,
    # the control-flow nodes are not; the Loop's carried state is never quantized
    assert "else_sigmoid" in plan.float_nodes
    assert "branch" not in plan.float_nodes and "loop" not in plan.float_nodes
    assert "loop_acc_in" not in plan.tensors

    ranges = calibrate(graph, plan.activation_schemes(), zoo.samples("legacy", 4))
    result = quantize(graph, TENSORRT_ALL_CONVS, ranges, plan=plan)
    model = onnx.load_from_string(serialize(result.graph))
    by_name = {n.name: n for n in model.graph.node}
    before = {n.name: n for n in original.graph.node}
    for node_name in ("branch", "loop"):  # bodies: the export's nodes, edges and names
        new = {a.name: _body(a.g) for a in by_name[node_name].attribute}
        old = {a.name: _body(a.g) for a in before[node_name].attribute}
        assert new == old, node_name
    assert "Q" not in "".join(
        n.op_type[0] for a in by_name["loop"].attribute for n in a.g.node
    )  # nothing quantized inside
    # One shared weight -> one quantized initializer read by both convs.
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and weight in n.input[0]]
    assert len(dq) == 1


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)


def _body(graph: onnx.GraphProto):
    return (
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in graph.node],
        [i.name for i in graph.input],
        [o.name for o in graph.output],
    )


def test_ocr_lstm_stays_float_with_a_reason():
    graph = load(_prepared("ocr", 13), check=False)
    for backend in MAIN_BACKENDS:
        if get_backend(backend).placement.quantize_outputs:
            continue  # the SNPE/QNN converter quantizes every op, LSTM included
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


def test_cleanup_keeps_a_scalar_zero_apart_from_a_one_element_zero():
    """Regression: dedupe merged the 0-d index 0 of a Gather with the 1-d [0] of a Slice.

    ``np.ascontiguousarray`` turns a 0-d array 1-d, so both got the same (dtype, shape,
    bytes) key; the Slice then read a scalar and onnxruntime refused it.
    """
    from onnx import TensorProto, helper, numpy_helper

    zero = numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")
    starts = numpy_helper.from_array(np.array([0], dtype=np.int64), "starts")
    ends = numpy_helper.from_array(np.array([1], dtype=np.int64), "ends")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["x", "zero"], ["row"], name="gather"),
            helper.make_node("Slice", ["x", "starts", "ends", "starts"], ["first"], name="slice"),
            helper.make_node("Squeeze", ["first", "starts"], ["first_row"], name="squeeze"),
            helper.make_node("Add", ["row", "first_row"], ["y"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        initializer=[zero, starts, ends],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    prepared, _ = prepare(load(model.SerializeToString()))
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    (expected,) = _session(model.SerializeToString()).run(None, feeds)
    (got,) = _session(serialize(prepared)).run(None, feeds)
    np.testing.assert_array_equal(got, expected)
    shapes = [t.values.shape for t in prepared.tensors().values() if isinstance(t, gs.Constant)]
    assert () in shapes and (1,) in shapes


def test_report_lists_the_float_lstm(tmp_path):
    """Through the job behind ``qtool calibrate``: the report names the LSTM left float."""
    from qtool.workflow import CalibrateOptions, quantize_model

    model = tmp_path / "ocr.onnx"
    model.write_bytes(zoo.zoo_bytes("ocr", 13))
    data = tmp_path / "calib.npz"
    np.savez(data, input=np.concatenate([s["input"] for s in zoo.samples("ocr", 4)]))
    files, report = quantize_model(model, "tensorrt", CalibrateOptions(data=data))
    lstm = [name for name, why in report["plan"]["float_nodes"].items() if "LSTM" in why]
    assert lstm, report["plan"]["float_nodes"]
    assert all(name in files["report.md"].decode() for name in lstm)
    (output,) = report["evaluation"]["outputs"]
    assert output["name"] == "output" and output["sqnr_db"] > DEFAULT_FLOOR_DB


def _pooled_relu(zeros: int, values: int, seed: int) -> np.ndarray:
    gamma = np.random.default_rng(seed).gamma(2.0, 0.06, values)
    return np.concatenate([np.zeros(zeros), gamma])


@pytest.mark.parametrize(
    "name,values,keep",
    [
        # A Sigmoid's output in EfficientNet's squeeze-excite: all of it far from zero.
        ("sigmoid", np.random.default_rng(0).uniform(0.41, 0.61, 8000), 0.9),
        # ReLU then a constant added (a Loop's accumulator): a spike at 0.75, not at 0.
        ("shifted_relu", 0.75 + np.maximum(np.random.default_rng(1).normal(0, 1, 8000), 0), 0.9),
        # Pooled ReLU features (ShuffleNet's, 12 dB): over half exact zeros, the rest a few
        # thousand values, so on a fine grid the bin after the zero spike is empty.
        ("pooled_relu_a", _pooled_relu(4800, 3200, 2), 0.95),
        ("pooled_relu_b", _pooled_relu(2400, 1696, 4), 0.95),
    ],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_kld_keeps_the_bulk_of_data_away_from_zero(name, values, keep, symmetric):
    """Regression: KLD clipped such tensors just above their minimum (8.5 dB on EfficientNet).

    The first candidate kept one non-empty bin: P and Q were the same spike, KL 0, the
    minimum. And the low-end spike was flattened only when it sat in bin 0 and bin 1 was
    not empty.
    """
    from qtool.calibration.observers import get_observer

    from qtool.scheme import QuantScheme

    scheme = QuantScheme(bits=8, signed=symmetric, symmetric=symmetric)
    observer = get_observer("kld")(scheme, name)
    observer.update(values.astype(np.float32).reshape(-1, 16))
    lo, hi = observer.range()
    assert lo == pytest.approx(values.min(), abs=1e-3)
    assert hi >= np.quantile(values[values > values.min()], keep), (lo, hi)


def test_embedding_lookup_is_data_not_a_shape():
    """Regression: the Gather of a float table by int64 ids counted as a shape computation
    (its only non-constant input is an index), so embeddings were never quantized."""
    from qtool.planner import shape_tensors

    graph = load(_prepared("multi", 13), check=False)
    gather = next(n for n in graph.nodes if n.op == "Gather" and n.inputs[1].name == "ids")
    assert gather.outputs[0].name not in shape_tensors(graph)
    plan = build_plan(graph, "academic")
    matmul = next(n for n in graph.nodes if n.op == "MatMul" and len(n.inputs[1].shape) == 3)
    assert matmul.inputs[0].name in plan.activation_schemes()
    assert matmul.inputs[1].name in plan.tensors  # the 3-d weight too
