"""The built-in passes, proven numerically in onnxruntime on torch exports and hand-built graphs.

Every rewrite is checked three ways: the rewrite count (ops before/after), the outputs before
and after agreeing to 1e-5 relative on random inputs (dynamic batch run at two sizes), and
onnx.checker with full shape inference on the result.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from models import MODEL_NAMES, OPSETS, assert_close, random_inputs, run, torch_model
from onnx import TensorProto, helper, numpy_helper

import qtool
from qtool.errors import PassError
from qtool.io import to_model
from qtool.passes.opset import ensure_opset
from qtool.pipeline import Pipeline, op_histogram, run_pass

BATCHES = (1, 3)


def apply(model: onnx.ModelProto, *passes: str) -> tuple[gs.Graph, list]:
    """Load ``model`` and run ``passes`` on it through the pipeline (invariants checked)."""
    return Pipeline(passes).run(qtool.load(model))


def assert_same_function(model: onnx.ModelProto, graph: gs.Graph, batches=BATCHES) -> None:
    """Outputs agree to 1e-5 relative at every batch size, names and order kept; checker ok."""
    out = to_model(graph)
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    for batch in batches:
        feeds = random_inputs(model, batch=batch, seed=batch)
        assert_close(run(model, feeds), run(out, feeds))


def make_model(nodes, inputs, outputs, initializers=(), opset=13, **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers), **kwargs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


def bn_params(prefix: str, channels: int, seed: int, var_scale: float = 1.0) -> list:
    rng = np.random.default_rng(seed)
    return [
        tensor(f"{prefix}_gamma", (rng.standard_normal(channels) * 0.5 + 1).astype(np.float32)),
        tensor(f"{prefix}_beta", (rng.standard_normal(channels) * 0.2).astype(np.float32)),
        tensor(f"{prefix}_mean", (rng.standard_normal(channels) * 0.5).astype(np.float32)),
        tensor(f"{prefix}_var", ((rng.random(channels) + 0.5) * var_scale).astype(np.float32)),
    ]


def bn_node(prefix: str, x: str, y: str, epsilon: float = 1e-5) -> onnx.NodeProto:
    names = [f"{prefix}_{p}" for p in ("gamma", "beta", "mean", "var")]
    return helper.make_node(
        "BatchNormalization", [x, *names], [y], name=prefix, epsilon=epsilon
    )


def vinfo(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def weights(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(dtype)


# --- torch-exported models at every opset ----------------------------------------------------


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cleanup_and_fold_bn_exact_on_torch_models(name, opset):
    model = torch_model(name, opset)
    bn_count = op_histogram(qtool.load(model)).get("BatchNormalization", 0)
    assert bn_count > 0
    graph, reports = apply(model, "cleanup", "fold_bn", "fuse_affine")
    ops = op_histogram(graph)
    assert "BatchNormalization" not in ops  # every BN follows Conv/ConvTranspose/Gemm
    assert "Constant" not in ops and "Identity" not in ops
    assert reports[1].notes == [f"{bn_count} BatchNormalization folded"]
    assert reports[1].summary() == f"fold_bn: {bn_count} BatchNormalization folded"
    assert_same_function(model, graph)
    assert graph.inputs[0].shape[0] == "batch"  # the dynamic batch dim survives


@pytest.mark.parametrize("name", ["resnet", "convtranspose", "attention"])
def test_fold_bn_exact_with_huge_running_variance(name):
    model = torch_model(name, 13, var_scale=1e8)
    graph, reports = apply(model, "cleanup", "fold_bn")
    assert "BatchNormalization" not in op_histogram(graph)
    assert_same_function(model, graph)


@pytest.mark.parametrize("target", [13, 21])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_upgrade_opset_from_11_is_exact(name, target):
    model = torch_model(name, 11)
    graph, reports = apply(model, ("upgrade_opset", {"target": target}))
    assert graph.opset == target
    assert reports[-1].notes == [f"opset 11 -> {target}, outputs checked equal in onnxruntime"]
    out = to_model(graph)
    assert [e.version for e in out.opset_import if e.domain in ("", "ai.onnx")] == [target]
    assert_same_function(model, graph)


def test_upgrade_opset_is_a_no_op_when_already_there():
    model = torch_model("resnet", 17)
    graph = qtool.load(model)
    before = qtool.io.serialize(graph)
    graph, report = run_pass(graph, "upgrade_opset", target=13)
    assert report.notes == ["already at opset 17"]
    assert graph.opset == 17 and qtool.io.serialize(graph) == before


def test_ensure_opset_converts_and_leaves_newer_graphs_alone():
    model = torch_model("mobilenet_v2", 11)
    graph = qtool.load(model)
    upgraded = ensure_opset(graph, 13)
    assert upgraded.opset == 13
    assert_same_function(model, upgraded)
    assert ensure_opset(upgraded, 13) is upgraded


def test_upgrade_opset_refuses_a_target_outside_the_range():
    with pytest.raises(qtool.errors.RecipeError, match="target 9"):
        run_pass(qtool.load(torch_model("resnet", 11)), "upgrade_opset", target=9)


# --- fold_bn on hand-built graphs ------------------------------------------------------------


def test_fold_bn_matmul_add_bn():
    w, b = weights((12, 6)), weights((6,), 1)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
            helper.make_node("Add", ["b", "mm"], ["lin"], name="add"),  # bias first
            bn_node("bn", "lin", "y"),
            helper.make_node("MatMul", ["x", "w2"], ["mm2"], name="mm2"),  # no bias
            bn_node("bn2", "mm2", "y2"),
        ],
        [vinfo("x", ["N", 12])],
        [vinfo("y", ["N", 6]), vinfo("y2", ["N", 6])],
        [tensor("w", w), tensor("b", b), tensor("w2", weights((12, 6), 2)),
         *bn_params("bn", 6, 0), *bn_params("bn2", 6, 1)],
    )
    graph, reports = apply(model, "fold_bn")
    assert op_histogram(graph) == {"Add": 2, "MatMul": 2}
    assert reports[0].summary() == "fold_bn: 2 BatchNormalization folded"
    assert_same_function(model, graph)


def test_fold_bn_declines_matmul_whose_bn_channel_is_not_the_last_axis():
    # (N, C, K) @ (K, L) -> (N, C, L): BN's channel axis 1 is C, not the MatMul's columns.
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]), bn_node("bn", "mm", "y")],
        [vinfo("x", ["N", 6, 5])],
        [vinfo("y", ["N", 6, 4])],
        [tensor("w", weights((5, 4))), *bn_params("bn", 6, 0)],
    )
    graph, reports = apply(model, "fold_bn")
    assert op_histogram(graph) == {"Add": 1, "MatMul": 1, "Mul": 1}
    assert reports[0].summary() == "fold_bn: 1 turned into Mul+Add"
    mul = next(n for n in graph.nodes if n.op == "Mul")
    assert mul.inputs[1].values.shape == (6, 1)  # shaped for a rank-3 input
    assert_same_function(model, graph)


@pytest.mark.parametrize("shape", [["N", 4], ["N", 4, 7], ["N", 4, 5, 5], ["N", 4, 3, 3, 3]])
def test_bn_with_nothing_to_fold_into_becomes_exact_mul_add(shape):
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), bn_node("bn", "r", "y", epsilon=1e-3)],
        [vinfo("x", shape)],
        [vinfo("y", shape)],
        bn_params("bn", 4, 3),
    )
    graph, reports = apply(model, "cleanup", "fold_bn")
    assert op_histogram(graph) == {"Add": 1, "Mul": 1, "Relu": 1}
    assert reports[1].notes == ["1 turned into Mul+Add"]
    assert_same_function(model, graph)


def test_fold_bn_conv_transpose_with_groups_and_bias():
    model = make_model(
        [
            helper.make_node("ConvTranspose", ["x", "w", "b"], ["ct"], group=2, strides=[2, 2]),
            bn_node("bn", "ct", "y"),
        ],
        [vinfo("x", ["N", 4, 5, 5])],
        [vinfo("y", ["N", 6, 11, 11])],
        [tensor("w", weights((4, 3, 3, 3))), tensor("b", weights((6,), 1)), *bn_params("bn", 6, 2)],
    )
    graph, _ = apply(model, "fold_bn")
    assert op_histogram(graph) == {"ConvTranspose": 1}
    assert_same_function(model, graph)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (5,), (1, 5), (3, 5)])
def test_fold_bn_gemm_honours_trans_b_alpha_beta(trans_b, bias_shape):
    w = weights((5, 8) if trans_b else (8, 5))
    inputs, inits = ["x", "w"], [tensor("w", w), *bn_params("bn", 5, 4)]
    if bias_shape is not None:
        inputs.append("c")
        inits.append(tensor("c", weights(bias_shape, 5)))
    model = make_model(
        [helper.make_node("Gemm", inputs, ["g"], alpha=0.7, beta=1.9, transB=trans_b),
         bn_node("bn", "g", "y")],
        [vinfo("x", [3, 8])],
        [vinfo("y", [3, 5])],
        inits,
    )
    graph, _ = apply(model, "fold_bn")
    assert op_histogram(graph) == {"Gemm": 1}
    assert_same_function(model, graph, batches=(1,))


def test_fold_bn_shared_weight_keeps_other_users_correct():
    """Two Conv+BN share one weight and a third Conv uses it raw: each gets its own copy."""
    conv = dict(pads=[1, 1, 1, 1])
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", **conv),
            bn_node("bn1", "c1", "y1"),
            helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2", **conv),
            bn_node("bn2", "c2", "y2"),
            helper.make_node("Conv", ["x", "w"], ["y3"], name="conv3", **conv),
        ],
        [vinfo("x", ["N", 3, 6, 6])],
        [vinfo(n, ["N", 4, 6, 6]) for n in ("y1", "y2", "y3")],
        [tensor("w", weights((4, 3, 3, 3))), *bn_params("bn1", 4, 1), *bn_params("bn2", 4, 2)],
    )
    graph, reports = apply(model, "cleanup", "fold_bn")
    assert op_histogram(graph) == {"Conv": 3}
    weight_names = {n.name: n.inputs[1].name for n in graph.nodes}
    assert weight_names["conv3"] == "w" and len(set(weight_names.values())) == 3
    assert_same_function(model, graph)


def test_fold_bn_skips_conv_whose_output_has_another_consumer():
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            bn_node("bn", "c", "y"),
            helper.make_node("Relu", ["c"], ["r"]),
        ],
        [vinfo("x", ["N", 3, 4, 4])],
        [vinfo("y", ["N", 2, 4, 4]), vinfo("r", ["N", 2, 4, 4])],
        [tensor("w", weights((2, 3, 1, 1))), *bn_params("bn", 2, 0)],
    )
    graph, reports = apply(model, "fold_bn")
    assert op_histogram(graph) == {"Add": 1, "Conv": 1, "Mul": 1, "Relu": 1}
    assert_same_function(model, graph)


def test_fold_bn_overflow_in_float32_raises_pass_error():
    model = torch_model("resnet", 13)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    inits = {t.name: t for t in model.graph.initializer}
    gamma, var = inits[bn.input[1]], inits[bn.input[4]]
    gamma.CopyFrom(tensor(gamma.name, np.full(gamma.dims, 1e38, np.float32)))
    var.CopyFrom(tensor(var.name, np.zeros(var.dims, np.float32)))
    with pytest.raises(PassError, match=f"fold_bn: BatchNormalization '{bn.name}'.*float32"):
        apply(model, "fold_bn")


def test_fold_bn_overflow_in_float16_raises_pass_error():
    params = [
        tensor(p.name, numpy_helper.to_array(p).astype(np.float16)) for p in bn_params("bn", 2, 0)
    ]
    params[0] = tensor("bn_gamma", np.full(2, 1000.0, np.float16))
    params[3] = tensor("bn_var", np.zeros(2, np.float16))
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("bn", "c", "y", epsilon=1e-7)],
        [vinfo("x", ["N", 3, 4, 4], TensorProto.FLOAT16)],
        [vinfo("y", ["N", 2, 4, 4], TensorProto.FLOAT16)],
        [tensor("w", weights((2, 3, 1, 1), dtype=np.float16) + np.float16(60)), *params],
    )
    with pytest.raises(PassError, match="not finite in float16"):
        apply(model, "fold_bn")


def test_fold_bn_keeps_float16_weights_float16():
    params = [
        tensor(p.name, numpy_helper.to_array(p).astype(np.float16)) for p in bn_params("bn", 2, 0)
    ]
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("bn", "c", "y")],
        [vinfo("x", ["N", 3, 4, 4], TensorProto.FLOAT16)],
        [vinfo("y", ["N", 2, 4, 4], TensorProto.FLOAT16)],
        [tensor("w", weights((2, 3, 1, 1), dtype=np.float16)), *params],
    )
    graph, _ = apply(model, "fold_bn")
    conv = graph.nodes[0]
    assert conv.op == "Conv" and conv.inputs[1].values.dtype == np.float16
    assert conv.inputs[2].values.dtype == np.float16
    onnx.checker.check_model(to_model(graph), full_check=True)


# --- fuse_affine -----------------------------------------------------------------------------


def conv_then(ops, consts, shape_out=("N", 4, 6, 6), op="Conv", w_shape=(4, 3, 3, 3), **attrs):
    """x -> Conv -> ops[0](., consts[0]) -> ... -> y."""
    nodes = [helper.make_node(op, ["x", "w"], ["t0"], name="conv", pads=[1, 1, 1, 1], **attrs)]
    inits = [tensor("w", weights(w_shape))]
    for i, (kind, const) in enumerate(zip(ops, consts, strict=True)):
        out = "y" if i == len(ops) - 1 else f"t{i + 1}"
        args = [f"c{i}", f"t{i}"] if kind == "Add" and i % 2 else [f"t{i}", f"c{i}"]
        if kind == "RSub":
            kind, args = "Sub", [f"c{i}", f"t{i}"]
        nodes.append(helper.make_node(kind, args, [out], name=f"op{i}"))
        inits.append(tensor(f"c{i}", const))
    return make_model(nodes, [vinfo("x", ["N", 3, 6, 6])], [vinfo("y", list(shape_out))], inits)


def per_channel(shape, seed=7):
    return (np.random.default_rng(seed).random(shape) + 0.5).astype(np.float32)


@pytest.mark.parametrize(
    "ops,consts",
    [
        (["Mul", "Add"], [per_channel((1, 4, 1, 1)), per_channel((4, 1, 1), 8)]),
        (["Mul"], [np.float32(1.7)]),
        (
            ["Add", "Mul", "Sub"],
            [per_channel((4, 1, 1)), per_channel((1,)), per_channel((1, 4, 1, 1))],
        ),
    ],
)
def test_fuse_affine_fuses_per_channel_constants(ops, consts):
    model = conv_then(ops, consts)
    graph, reports = apply(model, "fuse_affine")
    assert op_histogram(graph) == {"Conv": 1}
    assert "fused into Conv" in reports[0].summary()
    assert_same_function(model, graph)


def test_fuse_affine_conv_transpose_with_groups():
    model = conv_then(
        ["Mul", "Add"], [per_channel((1, 6, 1, 1)), per_channel((6, 1, 1), 3)],
        shape_out=("N", 6, 6, 6), op="ConvTranspose", w_shape=(3, 2, 3, 3), group=3,
    )
    graph, _ = apply(model, "fuse_affine")
    assert op_histogram(graph) == {"ConvTranspose": 1}
    assert_same_function(model, graph)


@pytest.mark.parametrize(
    "ops,consts,shape_out",
    [
        (["Mul"], [per_channel((1, 1, 6, 6))], ("N", 4, 6, 6)),  # varies over space
        (["Add"], [per_channel((2, 4, 1, 1))], (2, 4, 6, 6)),  # varies over batch
        (["Mul"], [per_channel((1, 1, 4, 1, 1))], ("N", 1, 4, 6, 6)),  # raises the rank
        (["RSub"], [per_channel((4, 1, 1))], ("N", 4, 6, 6)),  # c - y
    ],
)
def test_fuse_affine_declines_what_is_not_exact(ops, consts, shape_out):
    model = conv_then(ops, consts, shape_out=shape_out)
    graph, reports = apply(model, "fuse_affine")
    assert op_histogram(graph) == op_histogram(qtool.load(model))
    assert "declined" in reports[0].summary()
    assert_same_function(model, graph, batches=(2,))


# --- cleanup ---------------------------------------------------------------------------------


def test_cleanup_turns_constant_node_weights_into_initializers():
    w, b = weights((4, 3, 3, 3)), weights((4,), 1)
    model = make_model(
        [
            helper.make_node("Constant", [], ["w"], value=tensor("wv", w)),
            helper.make_node("Constant", [], ["b"], value_floats=b.tolist()),
            helper.make_node("Constant", [], ["k"], value_float=0.1),
            helper.make_node("Constant", [], ["shape"], value_ints=[0, -1]),
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Mul", ["c", "k"], ["m"]),
            helper.make_node("Reshape", ["m", "shape"], ["y"]),
        ],
        [vinfo("x", ["N", 3, 5, 5])],
        [vinfo("y", ["N", 100])],
    )
    graph, reports = apply(model, "cleanup")
    assert op_histogram(graph) == {"Conv": 1, "Mul": 1, "Reshape": 1}
    assert reports[0].summary() == "cleanup: 4 Constant nodes made initializers"
    out = to_model(graph)
    dtypes = {t.name: t.data_type for t in out.graph.initializer}
    assert dtypes == {"w": TensorProto.FLOAT, "b": TensorProto.FLOAT, "k": TensorProto.FLOAT,
                      "shape": TensorProto.INT64}
    weight = graph.nodes[0].inputs[1]
    assert weight.name == "w" and isinstance(weight, gs.Constant)
    assert_same_function(model, graph)


def test_cleanup_removes_identity_chains_and_dropout_keeping_output_names():
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["i0"]),
            helper.make_node("Relu", ["i0"], ["r"]),
            helper.make_node("Dropout", ["r", "ratio"], ["d"]),
            helper.make_node("Identity", ["d"], ["i1"]),
            helper.make_node("Sigmoid", ["i1"], ["s"]),
            helper.make_node("Identity", ["s"], ["i2"]),
            helper.make_node("Identity", ["i2"], ["y"]),
            helper.make_node("Identity", ["x"], ["x_copy"]),  # input straight to output: kept
        ],
        [vinfo("x", ["N", 5])],
        [vinfo("y", ["N", 5]), vinfo("x_copy", ["N", 5])],
        [tensor("ratio", np.float32(0.5))],
    )
    graph, reports = apply(model, "cleanup")
    assert op_histogram(graph) == {"Identity": 1, "Relu": 1, "Sigmoid": 1}
    assert reports[0].notes == ["1 Dropout removed, 4 Identity removed"]
    assert [t.name for t in graph.outputs] == ["y", "x_copy"]
    assert graph.nodes[-1].outputs[0].name in ("y", "x_copy")
    assert_same_function(model, graph)


def test_cleanup_removes_opset11_dropout_but_keeps_one_whose_mask_is_used():
    model = make_model(
        [
            helper.make_node("Dropout", ["x"], ["d", "unused_mask"], ratio=0.3),
            helper.make_node("Dropout", ["d"], ["y", "mask"]),
        ],
        [vinfo("x", ["N", 5])],
        [vinfo("y", ["N", 5]), vinfo("mask", ["N", 5], TensorProto.BOOL)],
        opset=11,
    )
    graph, reports = apply(model, "cleanup")
    assert op_histogram(graph) == {"Dropout": 1}
    assert graph.nodes[0].inputs[0].name == "x"
    assert_same_function(model, graph)


def test_cleanup_dedupes_identical_initializers_only():
    w = weights((4, 3, 1, 1))
    zeros_f = np.zeros(4, np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w_a", "b_a"], ["c1"]),
            helper.make_node("Conv", ["x", "w_b", "b_b"], ["c2"]),
            helper.make_node("Conv", ["x", "w_c"], ["c3"]),
            helper.make_node("Sum", ["c1", "c2", "c3"], ["y"]),
            helper.make_node("Add", ["ints", "ints_same_bytes_other_dtype"], ["_unused"]),
            helper.make_node("Cast", ["ints_f"], ["y2"], to=TensorProto.INT32),
        ],
        [vinfo("x", ["N", 3, 4, 4])],
        [vinfo("y", ["N", 4, 4, 4]), vinfo("y2", [4], TensorProto.INT32)],
        [tensor("w_a", w), tensor("w_b", w.copy()), tensor("w_c", w * 2),
         tensor("b_a", zeros_f), tensor("b_b", zeros_f.copy()),
         tensor("ints", np.zeros(4, np.int32)), tensor("ints_same_bytes_other_dtype",
                                                      np.zeros(4, np.int32)),
         tensor("ints_f", zeros_f.copy())],
    )
    graph, reports = apply(model, "cleanup")
    convs = [n for n in graph.nodes if n.op == "Conv"]
    assert [n.inputs[1].name for n in convs] == ["w_a", "w_a", "w_c"]
    assert [n.inputs[2].name for n in convs[:2]] == ["b_a", "b_a"]
    cast = next(n for n in graph.nodes if n.op == "Cast")
    assert cast.inputs[0].name in ("ints_f", "b_a")  # same float32 bytes: may share
    assert "duplicate initializers merged" in reports[0].summary()
    out = to_model(graph)
    assert len(out.graph.initializer) == len({t.name for t in out.graph.initializer})
    assert "ints" not in {t.name for t in out.graph.initializer}  # the dead Add is gone
    assert_same_function(model, graph)


def test_cleanup_dedupe_keeps_dtype_apart():
    model = make_model(
        [helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["a32", "b"], ["s"]),
         helper.make_node("Add", ["s", "x"], ["y"])],
        [vinfo("x", ["N", 4])],
        [vinfo("y", ["N", 4])],
        [tensor("a", np.zeros(4, np.int32)), tensor("b", np.zeros(4, np.float32))],
    )
    graph, _ = apply(model, "cleanup")  # folded to one float32 constant; int32 never merged
    assert_same_function(model, graph)


def test_cleanup_makes_initializers_listed_as_graph_inputs_plain():
    w = weights((4, 3, 1, 1))
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        [vinfo("x", ["N", 3, 4, 4]), vinfo("w", [4, 3, 1, 1])],
        [vinfo("y", ["N", 4, 4, 4])],
        [tensor("w", w)],
    )
    graph, _ = apply(model, "cleanup")
    assert [t.name for t in graph.inputs] == ["x"]
    out = to_model(graph)
    assert [i.name for i in out.graph.input] == ["x"]
    assert [t.name for t in out.graph.initializer] == ["w"]
    assert_same_function(model, graph)


def test_cleanup_leaves_if_subgraphs_untouched():
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["i"], ["t_id"]),
         helper.make_node("Add", ["t_id", "c"], ["t_out"])],
        "then", [], [vinfo("t_out", ["N", 3])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Sub", ["i", "c_dup"], ["e_out"])], "else", [], [vinfo("e_out", ["N", 3])]
    )
    c = np.array([1.0, 2.0, 3.0], np.float32)
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["i"]),  # read inside both branches
            helper.make_node("Identity", ["x"], ["j"]),
            helper.make_node("ReduceSum", ["j"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_branch,
                             else_branch=else_branch),
        ],
        [vinfo("x", ["N", 3])],
        [vinfo("y", ["N", 3])],
        [tensor("c", c), tensor("c_dup", c.copy()), tensor("zero", np.float32(0))],
    )
    graph, _ = apply(model, "cleanup")
    if_node = next(n for n in graph.nodes if n.op == "If")
    assert [n.op for n in if_node.attrs["then_branch"].nodes] == ["Identity", "Add"]
    assert [n.op for n in if_node.attrs["else_branch"].nodes] == ["Sub"]
    assert op_histogram(graph) == {"Greater": 1, "Identity": 1, "If": 1, "ReduceSum": 1}
    out = to_model(graph)
    onnx.checker.check_model(out, full_check=True)
    for sign in (1.0, -1.0):  # both branches
        feeds = {"x": np.abs(random_inputs(model, batch=2)["x"]) * sign}
        assert_close(run(model, feeds), run(out, feeds))


def test_cleanup_does_not_freeze_a_dynamic_batch_dim():
    """A stale static value_info (traced batch 1) must not turn Shape(x) into a constant."""
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Shape", ["r"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
            helper.make_node("Reshape", ["r", "target"], ["y"]),
        ],
        [vinfo("x", ["N", 3, 4, 4])],
        [vinfo("y", ["N", 48])],
        [tensor("zero", np.int64(0)), tensor("axes", np.array([0], np.int64)),
         tensor("minus_one", np.array([-1], np.int64))],
        value_info=[vinfo("r", [1, 3, 4, 4])],
    )
    graph, _ = apply(model, "cleanup")
    assert "Shape" in op_histogram(graph)
    assert_same_function(model, graph, batches=(1, 3))


def test_cleanup_folds_static_shapes_and_constant_subgraphs():
    model = make_model(
        [
            helper.make_node("Shape", ["w"], ["w_shape"]),
            helper.make_node("Reshape", ["w_flat", "w_shape"], ["w_full"]),
            helper.make_node("Transpose", ["w_full"], ["w_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "w_t"], ["y"]),
        ],
        [vinfo("x", ["N", 3])],
        [vinfo("y", ["N", 2])],
        [tensor("w", np.zeros((2, 3), np.float32)), tensor("w_flat", weights((6,)))],
    )
    graph, reports = apply(model, "cleanup")
    assert op_histogram(graph) == {"MatMul": 1}
    assert isinstance(graph.nodes[0].inputs[1], gs.Constant)
    assert graph.nodes[0].inputs[1].values.shape == (3, 2)
    assert "1 static Shape nodes folded, 2 constant nodes folded" in reports[0].summary()
    assert_same_function(model, graph)


def test_cleanup_keeps_float_precision_of_shape_arithmetic():
    """Cast(int->float) * 0.5 -> Cast(int) must stay float math (2 for batch 4), not 4 * 0."""
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
            helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["nf", "half"], ["halfn"]),
            helper.make_node("Cast", ["halfn"], ["y"], to=TensorProto.INT64),
        ],
        [vinfo("x", ["N", 3])],
        [vinfo("y", [], TensorProto.INT64)],
        [tensor("zero", np.int64(0)), tensor("half", np.float32(0.5))],
    )
    graph, _ = apply(model, "cleanup")
    assert run(graph, {"x": np.zeros((4, 3), np.float32)})[0] == 2
    assert run(graph, {"x": np.zeros((5, 3), np.float32)})[0] == 2


def test_cleanup_never_folds_random_ops():
    model = make_model(
        [helper.make_node("RandomNormal", [], ["noise"], shape=[3], seed=1.0),
         helper.make_node("Add", ["x", "noise"], ["y"])],
        [vinfo("x", ["N", 3])],
        [vinfo("y", ["N", 3])],
    )
    graph, _ = apply(model, "cleanup")
    assert op_histogram(graph) == {"Add": 1, "RandomNormal": 1}


def test_cleanup_keeps_constant_graph_outputs_as_node_outputs_in_their_dtype():
    model = make_model(
        [
            helper.make_node("Constant", [], ["k"], value_float=0.5),
            helper.make_node("Shape", ["w"], ["s"]),
            helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "k"], ["y"]),
        ],
        [vinfo("x", ["N", 2])],
        [vinfo("y", ["N", 2]), vinfo("k", []), vinfo("sf", [2])],
        [tensor("w", np.zeros((3, 4), np.float32))],
    )
    graph, reports = apply(model, "cleanup")
    out = to_model(graph)
    produced = {o for n in out.graph.node for o in n.output}
    assert {"y", "k", "sf"} <= produced  # every output still comes from a node
    assert not {"k", "sf"} & {t.name for t in out.graph.initializer}
    assert reports[0].notes == ["1 static Shape nodes folded"]
    result = run(out, {"x": np.ones((2, 2), np.float32)})
    assert result[1].dtype == np.float32 and result[1] == np.float32(0.5)
    assert result[2].tolist() == [3.0, 4.0]
    assert_same_function(model, graph)


def test_upgrade_opset_refuses_a_conversion_that_changes_the_outputs(monkeypatch):
    """The numerical check is real: a converter that perturbs one weight is caught."""
    convert = onnx.version_converter.convert_version

    def perturbing_convert(model, target):
        converted = convert(model, target)
        weight = converted.graph.initializer[0]
        values = numpy_helper.to_array(weight) * np.float32(1.001)
        weight.CopyFrom(numpy_helper.from_array(values, weight.name))
        return converted

    monkeypatch.setattr(onnx.version_converter, "convert_version", perturbing_convert)
    graph = qtool.load(torch_model("resnet", 11))
    with pytest.raises(PassError, match="upgrade_opset: output output differs .* 11 to 13"):
        run_pass(graph, "upgrade_opset")
    assert graph.opset == 11


def test_upgrade_opset_reports_a_failed_conversion(monkeypatch):
    def failing_convert(model, target):
        raise RuntimeError("No adapter for op Foo\nmore details")

    monkeypatch.setattr(onnx.version_converter, "convert_version", failing_convert)
    with pytest.raises(PassError, match="cannot convert the model from opset 11 to 13: No adapter"):
        run_pass(qtool.load(torch_model("resnet", 11)), "upgrade_opset")


def _fixed_size_concat_model(opset: int = 17) -> onnx.ModelProto:
    """Dynamic height and width declared, but a Concat with an 8x8 constant: only 8x8 runs
    (a YOLOv8 export's feature pyramid is the same, at multiples of its stride)."""
    return make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
         helper.make_node("Concat", ["h", "grid"], ["c"], axis=1),
         helper.make_node("Conv", ["c", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])],
        [vinfo("x", [1, 2, "height", "width"])], [vinfo("y", [1, 2, "height", "width"])],
        [tensor("w1", weights((2, 2, 3, 3), 1)), tensor("b1", weights((2,), 2)),
         tensor("grid", weights((1, 2, 8, 8), 3)),
         tensor("w2", weights((2, 4, 3, 3), 4)), tensor("b2", weights((2,), 5))],
        opset=opset)


def test_ensure_opset_checks_on_the_samples_the_model_accepts():
    from qtool.passes.opset import checked_on

    graph = qtool.load(_fixed_size_concat_model())
    with pytest.raises(PassError, match="Non concat axis dimensions must match"):
        ensure_opset(graph, 21)  # random 1x1 and 2x2 inputs: the model cannot take them
    samples = [{"x": weights((1, 2, 8, 8), seed)} for seed in (6, 7)]
    with checked_on(samples):
        converted = ensure_opset(graph, 21)
    assert converted.opset == 21
    for sample in samples:
        assert_close(run(_fixed_size_concat_model(), sample), run(to_model(converted), sample))


def test_act_bits_16_on_a_model_that_runs_only_at_its_data_size(tmp_path):
    import json

    from qtool.backends.base import QDQ_MODEL_FILE

    from qtool.workflow import CalibrateOptions, quantize_model

    model_path, data_path = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(_fixed_size_concat_model(), model_path)
    np.savez(data_path, x=weights((16, 2, 8, 8), 8))
    files, report = quantize_model(model_path, "qnn", CalibrateOptions(
        data=str(data_path), act_bits=16, bias_correction=False))
    qdq = onnx.load_from_string(files[QDQ_MODEL_FILE])
    assert [o.version for o in qdq.opset_import if o.domain == ""] == [21]
    zero_points = [i for i in qdq.graph.initializer if i.data_type == TensorProto.UINT16]
    assert zero_points  # 16-bit activations really written
    assert json.loads(files["model.encodings"])["activation_encodings"]
