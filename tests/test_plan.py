"""The quant plan: JSON round trip, user edits, shape/index tensors, sharing groups."""

from __future__ import annotations

import dataclasses
import json

import models
import numpy as np
import pytest
from qdq_helpers import (
    ANCHOR_GRID_SHAPE_PATH,
    BACKENDS,
    TENSORRT_ALL_CONVS,
    dq_producer,
    feeds_for,
    minmax_ranges,
    prepared,
    run,
)
from qtool.backends import resolve_backend

from qtool.errors import PlanError
from qtool.plan import QuantPlan, TensorPlan, parse_precision
from qtool.planner import build_plan, shape_tensors
from qtool.qdq import quantize

# ------------------------------------------------------------------------- JSON round trip


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_json_round_trip_every_backend(name):
    graph = prepared(name)
    for backend in BACKENDS:
        plan = build_plan(graph, backend)
        text = plan.to_json()
        again = QuantPlan.from_json(text)
        assert again == plan
        assert again.to_json() == text
        assert build_plan(prepared(name), backend).to_json() == text  # deterministic


def test_json_layout():
    plan = build_plan(prepared("resnet"), "tensorrt")
    data = json.loads(plan.to_json())
    assert data["format"] == "qtool-plan/1"
    assert data["backend"] == "tensorrt" and data["placement_graph"] == 2
    entry = data["tensors"]["input"]
    assert entry == {
        "role": "activation",
        "scheme": {
            "bits": 8, "signed": True, "symmetric": True, "per_channel_axis": None,
            "narrow_range": False, "power_of_two": False,
        },
        "consumers": ["/stem/stem.0/stem.0.0/Conv"],
        "group": None,
        "pinned_range": None,
        "bias_inputs": None,
    }
    assert data["nodes"]["/Add_1"] == "Add"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(extra=1), "unknown key(s) extra"),
        (lambda d: d["tensors"]["input"].update(scael=1), "unknown key(s) scael"),
        (lambda d: d["tensors"]["input"]["scheme"].update(nbits=4), "unknown scheme field(s)"),
        (lambda d: d["tensors"]["input"].pop("group"), "missing key(s) group"),
        (lambda d: d.update(format="other/9"), "plan format"),
        (lambda d: d["tensors"]["input"].update(role="output"), "role 'output'"),
        (lambda d: d["tensors"]["input"].update(consumers=["nope"]), "consumer nope"),
        (lambda d: d["tensors"]["input"].update(pinned_range=[2, 1]), "lo <= hi"),
        (lambda d: d["tensors"]["input"].update(group="g"), None),  # a lone group is fine
    ],
)
def test_from_json_rejects_bad_plans(edit, message):
    data = json.loads(build_plan(prepared("resnet"), "tensorrt").to_json())
    edit(data)
    if message is None:
        QuantPlan.from_dict(data)
        return
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantPlan.from_json(json.dumps(data))


def test_from_json_rejects_non_json():
    with pytest.raises(PlanError, match="not valid JSON"):
        QuantPlan.from_json("{nope")


# ----------------------------------------------------------------------------- user edits


def _consumers_with_quantized_input(plan):
    return {c for e in plan.tensors.values() for c in e.consumers}


def test_skip_by_node_name_keeps_that_node_float_in_the_model():
    graph = prepared("resnet")
    plan = build_plan(graph, "tvm", skip=["/fc/Gemm"])
    assert "/fc/Gemm" not in _consumers_with_quantized_input(plan)
    assert plan.float_nodes["/fc/Gemm"] == "skipped by user ('/fc/Gemm')"
    assert "fc.weight" not in plan.tensors and "fc.bias" not in plan.tensors
    feeds = feeds_for(graph)
    result = quantize(graph, "tvm", minmax_ranges(graph, plan, feeds), plan=plan)
    gemm = next(n for n in result.graph.nodes if n.name == "/fc/Gemm")
    assert all(dq_producer(t) is None for t in gemm.inputs)
    convs = [n for n in result.graph.nodes if n.op == "Conv"]
    assert all(dq_producer(n.inputs[0]) and dq_producer(n.inputs[1]) for n in convs)


def test_skip_by_op_type_and_by_regex():
    graph = prepared("resnet")
    full = build_plan(graph, "fbgemm")
    no_add = full.skip("Add")
    assert {"/Add", "/Add_1"} <= set(no_add.float_nodes)
    assert not {"/Add", "/Add_1"} & _consumers_with_quantized_input(no_add)
    # The Add-only inputs are gone; the shortcut also feeds a conv so it stays quantized.
    assert "/a/a.2/a.2.1/BatchNormalization_output_0" not in no_add.tensors
    assert no_add.tensors["/Relu_output_0"].consumers == ("/b/b.0/b.0.0/Conv",)

    by_regex = full.skip(r"/b/.*")
    skipped = {n for n in full.nodes if n.startswith("/b/")}
    assert not skipped & _consumers_with_quantized_input(by_regex)
    assert all(by_regex.float_nodes[n] == "skipped by user ('/b/.*')"
               for n in skipped if n in _consumers_with_quantized_input(full))
    assert full.skip("op:Conv").tensors == full.skip("Conv").tensors
    assert full.skip("re:/fc/.*").tensors == full.skip("name:/fc/Gemm").tensors
    assert full.match_nodes("re:/fc/.*") == ["/fc/Gemm"]


def test_skip_pattern_matching_nothing_is_an_error():
    plan = build_plan(prepared("resnet"), "tensorrt")
    with pytest.raises(PlanError, match="matches no node"):
        plan.skip("NoSuchOp")
    with pytest.raises(PlanError, match="matches no node"):
        build_plan(prepared("resnet"), "tensorrt", skip=["re:/nothing/.*"])


@pytest.mark.parametrize("precision, weight_bits, act_bits", [("W4A8", 4, 8), ("w4a4", 4, 4)])
def test_force_bits(precision, weight_bits, act_bits):
    graph = prepared("mobilenet_v2")
    plan = build_plan(graph, "acl").with_precision(precision)
    assert plan == build_plan(graph, "acl", weight_bits=weight_bits, act_bits=act_bits)
    assert {e.scheme.bits for e in plan.entries("weight")} == {weight_bits}
    assert {e.scheme.bits for e in plan.entries("activation")} == {act_bits}
    assert {e.scheme.bits for e in plan.entries("bias")} == {32}
    feeds = feeds_for(graph)
    result = quantize(graph, "acl", minmax_ranges(graph, plan, feeds), plan=plan)
    for entry in plan.entries("weight"):  # opset 13: 8-bit storage, 4-bit levels
        levels = result.graph.tensors()[entry.tensor + "_quantized"].values
        assert levels.dtype == np.int8
        assert levels.min() >= -8 and levels.max() <= 7
        assert levels.max() == 7 or levels.min() == -8
    for entry in plan.entries("activation"):
        qp = result.qparams[entry.tensor]
        low, high = -(2 ** (act_bits - 1)), 2 ** (act_bits - 1) - 1
        assert low <= int(qp.zero_point) <= high
        levels = 2**act_bits - 1
        assert np.isclose(qp.scale, (max(qp.hi, 0) - min(qp.lo, 0)) / levels, rtol=1e-6)


def test_parse_precision():
    assert parse_precision("W8A8") == (8, 8)
    with pytest.raises(PlanError, match="W<bits>A<bits>"):
        parse_precision("int8")


def test_pinned_range_replaces_calibration():
    graph = prepared("resnet")
    plan = build_plan(graph, "academic").pin_range("input", -3.0, 2.0)
    assert "input" not in plan.activation_schemes()
    assert QuantPlan.from_json(plan.to_json()).tensors["input"].pinned_range == (-3.0, 2.0)
    feeds = feeds_for(graph)
    ranges = minmax_ranges(graph, plan, feeds)
    assert "input" not in ranges
    result = quantize(graph, "academic", ranges, plan=plan)
    assert result.qparams["input"].scale == np.float32(3.0 / 127)
    scale = result.graph.tensors()["input_scale"].values
    assert scale == np.float32(3.0 / 127)


def test_pin_range_errors():
    plan = build_plan(prepared("resnet"), "acl")
    with pytest.raises(PlanError, match="not quantized in this plan"):
        plan.pin_range("/Add_output_0", 0, 1)
    with pytest.raises(PlanError, match="bias"):
        plan.pin_range("fc.bias", 0, 1)
    with pytest.raises(PlanError, match="finite"):
        plan.pin_range("input", 0, float("nan"))


def test_pinned_weight_range_sets_every_channel():
    graph = prepared("resnet")
    plan = build_plan(graph, "tensorrt").pin_range("fc.weight", -0.5, 0.5)
    feeds = feeds_for(graph)
    result = quantize(graph, "tensorrt", minmax_ranges(graph, plan, feeds), plan=plan)
    assert np.array_equal(result.qparams["fc.weight"].scale, np.full(10, 0.5 / 127, np.float32))


def test_summary_is_printable():
    plan = build_plan(prepared("attention"), "tensorrt")
    text = str(plan)
    assert text.startswith("plan for tensorrt (MQBench graph 2)")
    assert "/Softmax: Softmax has no integer kernel" in text


# --------------------------------------------------------------- shape and index tensors


def test_anchor_grid_shape_path_is_found():
    graph = prepared("anchor_grid")
    assert shape_tensors(graph) == set(ANCHOR_GRID_SHAPE_PATH)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_grid_has_no_qdq_on_the_shape_path(backend):
    graph = prepared("anchor_grid")
    if backend == "tensorrt":  # its 4-channel convs have no int8 kernel: quantize them anyway
        backend = TENSORRT_ALL_CONVS
    plan = build_plan(graph, backend)
    assert not set(plan.tensors) & set(ANCHOR_GRID_SHAPE_PATH)
    for node in ("shape", "range", "step", "one", "nothing", "feat_mean", "grid_column"):
        assert plan.float_nodes[node] == "shape/index computation: never quantized"
    feeds = feeds_for(graph, batch=3)
    result = quantize(graph, backend, minmax_ranges(graph, plan, feeds), plan=plan)
    quantized = {n.inputs[0].name.removesuffix("_clipped")  # a Clip to 7-bit levels
                 for n in result.graph.nodes if n.op == "QuantizeLinear"}
    assert not quantized & set(ANCHOR_GRID_SHAPE_PATH)
    # the grid Add's feature input: quantized by graph 2/3 placements, except TensorRT's,
    # which quantizes residual Adds only (an Add of a grid is not one; issue 24)
    placement = resolve_backend(backend).placement
    expected = {"input", "with_grid"} | ({"feat"} if plan.placement_graph > 1
                                         and not placement.residual_shortcuts_only else set())
    if placement.quantize_outputs:  # the graph output, renamed *_float
        expected.add("output_float")
    assert quantized == expected
    (want,), (got,) = run(graph, feeds), run(result.graph, feeds)
    assert got.shape == want.shape == (3, 4, 8, 8)


def test_anchor_grid_breaks_when_the_step_is_quantized():
    """Negative control: forcing Q/DQ onto the Range step (the competitor's bug) breaks it."""
    graph = prepared("anchor_grid")
    plan = build_plan(graph, "tvm")
    tensors = dict(plan.tensors)
    tensors["one"] = TensorPlan(
        "one", "activation", plan.tensors["feat"].scheme, ("step",), pinned_range=(-1.0, 1.0)
    )
    broken = dataclasses.replace(plan, tensors=tensors)
    feeds = feeds_for(graph)
    result = quantize(graph, "tvm", minmax_ranges(graph, plan, feeds), plan=broken)
    assert result.qparams["one"].scale == np.float32(2.0**-7)  # 1.0 -> 127/128
    with pytest.raises(Exception, match="add_grid"):
        run(result.graph, feeds)


# ------------------------------------------------------------------------ sharing groups


def test_concat_groups_are_one_union_find():
    plan = build_plan(prepared("concat"), "tvm")
    groups = sorted(plan.groups.values(), key=len)
    # The stem's ReLU output and the MaxPool reading it share (pass-through).
    assert groups[0] == ["/stem/stem.1/Relu_output_0", "/bp/bp.0/MaxPool_output_0"]
    # Both Concats chain into one group: 3 branches + Concat out + dense branch + Concat_1 out.
    assert groups[1] == [
        "/b1/b1.1/Relu_output_0", "/b3/b3.3/Relu_output_0", "/bp/bp.2/Relu_output_0",
        "/Concat_output_0", "/dense/dense.1/Relu_output_0", "/Concat_1_output_0",
    ]


def test_pass_through_joins_flatten_and_pool_chain_only_when_both_quantized():
    plan = build_plan(prepared("digits"), "tvm")
    groups = list(plan.groups.values())
    # Concat (2 branches) -> MaxPool -> conv: one group, MaxPool passes the scale through.
    assert [
        "/branch1/branch1.1/Relu_output_0", "/branch3/branch3.1/Relu_output_0",
        "/pool/MaxPool_output_0",
    ] in groups
