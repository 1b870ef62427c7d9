"""qtool lint: every rule on a graph built to break it, QDQ models from onnxruntime, formats."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.lint import lint_model
from qtool.lint.formats import format_result

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"

# A faithful subset of the SARIF 2.1.0 schema (OASIS sarif-schema-2.1.0.json): the objects and
# fields qtool writes, with the spec's types, enums and required keys.
SARIF_SUBSET_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["version", "runs"],
    "properties": {
        "$schema": {"type": "string", "format": "uri"},
        "version": {"enum": ["2.1.0"]},
        "runs": {"type": "array", "items": {"$ref": "#/definitions/run"}},
    },
    "definitions": {
        "message": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "id": {"type": "string"}},
            "anyOf": [{"required": ["text"]}, {"required": ["id"]}],
        },
        "multiformatMessageString": {
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string"}},
        },
        "reportingConfiguration": {
            "type": "object",
            "properties": {"level": {"enum": ["none", "note", "warning", "error"]}},
        },
        "reportingDescriptor": {
            "type": "object",
            "required": ["id"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "shortDescription": {"$ref": "#/definitions/multiformatMessageString"},
                "defaultConfiguration": {"$ref": "#/definitions/reportingConfiguration"},
            },
        },
        "toolComponent": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "rules": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {"$ref": "#/definitions/reportingDescriptor"},
                },
            },
        },
        "artifactLocation": {
            "type": "object",
            "properties": {"uri": {"type": "string", "format": "uri-reference"}},
        },
        "region": {
            "type": "object",
            "properties": {"startLine": {"type": "integer", "minimum": 1}},
        },
        "physicalLocation": {
            "type": "object",
            "anyOf": [{"required": ["address"]}, {"required": ["artifactLocation"]}],
            "properties": {
                "artifactLocation": {"$ref": "#/definitions/artifactLocation"},
                "region": {"$ref": "#/definitions/region"},
            },
        },
        "logicalLocation": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "fullyQualifiedName": {"type": "string"},
                "kind": {"type": "string"},
            },
        },
        "location": {
            "type": "object",
            "properties": {
                "physicalLocation": {"$ref": "#/definitions/physicalLocation"},
                "logicalLocations": {
                    "type": "array",
                    "minItems": 0,
                    "uniqueItems": True,
                    "items": {"$ref": "#/definitions/logicalLocation"},
                },
            },
        },
        "result": {
            "type": "object",
            "required": ["message"],
            "properties": {
                "ruleId": {"type": "string"},
                "ruleIndex": {"type": "integer", "minimum": -1},
                "level": {"enum": ["none", "note", "warning", "error"]},
                "message": {"$ref": "#/definitions/message"},
                "locations": {"type": "array", "items": {"$ref": "#/definitions/location"}},
            },
        },
        "run": {
            "type": "object",
            "required": ["tool"],
            "properties": {
                "tool": {
                    "type": "object",
                    "required": ["driver"],
                    "properties": {"driver": {"$ref": "#/definitions/toolComponent"}},
                },
                "results": {"type": "array", "items": {"$ref": "#/definitions/result"}},
            },
        },
    },
}


def validate_sarif(text: str) -> dict:
    log = json.loads(text)
    jsonschema.validate(log, SARIF_SUBSET_SCHEMA)
    return log


# ------------------------------------------------------------------------------ models


def _vi(name, dims, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, dims)


def _model(nodes, inits=(), inputs=None, outputs=None, opset=13, extra_opsets=()):
    inputs = inputs if inputs is not None else [_vi("x", [1, 4])]
    outputs = outputs if outputs is not None else [_vi("y", [1, 4])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 7
    return model


def _const(name, value, dtype=None):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _qdq(tensor, out, scale_name, zp_name, prefix):
    return [
        helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [f"{prefix}_q"],
                         name=f"{prefix}_Q"),
        helper.make_node("DequantizeLinear", [f"{prefix}_q", scale_name, zp_name], [out],
                         name=f"{prefix}_DQ"),
    ]


def rule_ids(model, backend=None, severity=None):
    result = lint_model(model, backend=backend)
    return {f.rule_id for f in result.findings if severity is None or f.severity == severity}


def test_float_example_is_clean_and_only_notes_its_dynamic_batch():
    result = lint_model(str(DIGITS))
    assert result.exit_code("error") == 0
    assert result.exit_code("warning") == 0
    assert [(f.rule_id, f.severity, f.tensor) for f in result.findings] == [
        ("QT005", "note", "input"),
        ("QT005", "note", "logits"),
    ]
    assert result.exit_code("note") == 1


def test_float_model_nodes_a_backend_leaves_float():
    from qtool.io import load
    from qtool.planner import build_plan
    from qtool.prepare import prepare

    graph, _ = prepare(load(str(DIGITS)))
    expected = build_plan(graph, "academic").float_nodes
    assert expected  # graph 1 leaves the residual Add and the pooling in float
    result = lint_model(str(DIGITS), backend="academic")
    found = {f.node: f for f in result.findings if f.rule_id == "QT004"}
    assert set(found) == set(expected)
    assert all(f.severity == "warning" and expected[n] in f.message for n, f in found.items())
    # tensorrt: only the convs it has no int8 kernel for (8 channels: int8_conv_rule)
    trt = [f for f in lint_model(str(DIGITS), backend="tensorrt").findings
           if f.rule_id == "QT004"]
    assert trt and all("no int8 kernel" in f.message for f in trt)
    assert {f.node for f in trt} <= {n.name for n in graph.nodes if n.op == "Conv"}


def test_invalid_graph_is_a_finding_not_a_crash():
    # Relu reads a tensor nothing produces: the checker rejects the model.
    model = _model([helper.make_node("Relu", ["missing"], ["y"], name="relu")])
    result = lint_model(model)
    found = [f for f in result.findings if f.rule_id == "QT001"]
    assert len(found) == 1 and found[0].severity == "error"
    assert "missing" in found[0].message


def test_opset_rules():
    relu = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    assert "QT002" in rule_ids(_model(relu, opset=9), severity="error")
    assert "QT002" in rule_ids(_model(relu, opset=11), severity="note")
    assert "QT002" not in rule_ids(_model(relu, opset=13))


def test_unknown_domain():
    node = helper.make_node("Foo", ["x"], ["y"], name="foo", domain="com.custom")
    model = _model([node], extra_opsets=[helper.make_opsetid("com.custom", 1)])
    result = lint_model(model)
    assert [(f.rule_id, f.node) for f in result.findings if f.rule_id == "QT003"] == [
        ("QT003", "foo")
    ]


def test_dynamic_dims_batch_is_a_note_other_axes_warn():
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        inputs=[_vi("x", ["N", "C"])],
        outputs=[_vi("y", ["N", "C"])],
    )
    found = {(f.tensor, f.severity) for f in lint_model(model).findings if f.rule_id == "QT005"}
    # Each of x and y has a symbolic batch (note) and a symbolic axis 1 (warning).
    assert found == {("x", "note"), ("x", "warning"), ("y", "note"), ("y", "warning")}


def test_non_finite_and_unused_initializers():
    weights = np.ones((4, 4), np.float32)
    weights[1, 2] = np.nan
    weights[3, 3] = np.inf
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        inits=[_const("w", weights), _const("dead", np.zeros(3, np.float32))],
    )
    result = lint_model(model)
    nonfinite = [f for f in result.findings if f.rule_id == "QT006"]
    assert len(nonfinite) == 1 and nonfinite[0].tensor == "w"
    assert "1 NaN and 1 Inf" in nonfinite[0].message
    unused = [f.tensor for f in result.findings if f.rule_id == "QT007"]
    assert unused == ["dead"]
    assert result.exit_code("error") == 1


def _scales(*pairs):
    inits = []
    for name, scale, zp in pairs:
        inits += [_const(f"{name}_s", scale, np.float32), _const(f"{name}_zp", zp, np.uint8)]
    return inits


def test_q_without_dq_and_dq_without_q():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_s", "a_zp"], ["xq"], name="Q"),
        helper.make_node("Cast", ["xq"], ["xc"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Cast", ["x"], ["x8"], to=TensorProto.UINT8, name="to_u8"),
        helper.make_node("DequantizeLinear", ["x8", "a_s", "a_zp"], ["xd"], name="DQ"),
        helper.make_node("Add", ["xc", "xd"], ["y"], name="add"),
    ]
    result = lint_model(_model(nodes, inits=_scales(("a", 0.1, 128))))
    found = {(f.rule_id, f.node) for f in result.findings}
    assert ("QT101", "Q") in found
    assert ("QT102", "DQ") in found


def test_double_quantization_same_and_different_scale():
    for second_scale, word in ((0.1, "same scale"), (0.2, "another scale")):
        nodes = _qdq("x", "x1", "a_s", "a_zp", "first") + _qdq("x1", "y", "b_s", "b_zp", "second")
        model = _model(nodes, inits=_scales(("a", 0.1, 128), ("b", second_scale, 128)))
        found = [f for f in lint_model(model).findings if f.rule_id == "QT103"]
        assert len(found) == 1 and found[0].node == "second_Q"
        assert word in found[0].message


def _concat_model(scale_a, scale_b, quantized_output=True):
    nodes = (
        _qdq("x", "xa", "a_s", "a_zp", "A")
        + _qdq("x", "xb", "b_s", "b_zp", "B")
        + [helper.make_node("Concat", ["xa", "xb"], ["c"], axis=1, name="cat")]
    )
    if quantized_output:  # an integer Concat: its output is quantized again
        nodes += _qdq("c", "y", "a_s", "a_zp", "C")
    else:
        nodes += [helper.make_node("Identity", ["c"], ["y"], name="read")]
    inits = _scales(("a", scale_a, 128), ("b", scale_b, 128))
    return _model(nodes, inits=inits, outputs=[_vi("y", [1, 8])])


def test_concat_scale_mismatch():
    found = [f for f in lint_model(_concat_model(0.1, 0.2)).findings if f.rule_id == "QT104"]
    assert len(found) == 1 and found[0].node == "cat" and found[0].severity == "warning"
    assert "0.1" in found[0].message and "0.2" in found[0].message
    assert "QT104" not in rule_ids(_concat_model(0.1, 0.1))
    # a Concat read in float (no Q after it) joins dequantized values: any scales will do
    assert "QT104" not in rule_ids(_concat_model(0.1, 0.2, quantized_output=False))


def test_converter_backends_requantize_a_concat_input_read_elsewhere():
    """SNPE/QNN (AIMET's rule) tie only the Concat inputs nothing else reads; an input that
    another node reads too keeps its own scale and the converter requantizes it."""
    model = _concat_model(0.1, 0.2)
    model.graph.node.append(helper.make_node("Identity", ["xb"], ["z"], name="other"))
    model.graph.output.append(_vi("z", [1, 4]))

    def qt104(backend):
        return [f for f in lint_model(model, backend=backend).findings if f.rule_id == "QT104"]

    assert not qt104("snpe") and not qt104("qnn")
    assert [f.severity for f in qt104("tvm")] == ["error"]  # an integer Concat: one scale
    # inputs only the Concat reads must still share the output's scale on snpe
    alone = lint_model(_concat_model(0.1, 0.2), backend="snpe").findings
    assert [f.node for f in alone if f.rule_id == "QT104"] == ["cat"]


def test_invalid_scale():
    nodes = _qdq("x", "y", "a_s", "a_zp", "A")
    for bad in (0.0, -0.5):
        found = [f for f in lint_model(_model(nodes, inits=_scales(("a", bad, 0)))).findings
                 if f.rule_id == "QT105"]
        assert {f.node for f in found} == {"A_Q", "A_DQ"}


@pytest.fixture(scope="module")
def ort_qdq_digits(tmp_path_factory):
    """The digits CNN quantized by onnxruntime's quantize_static (QDQ, uint8 activations)."""
    return _ort_quantize(DIGITS, np.load(CALIB)["input"][:32], tmp_path_factory, "digits")


@pytest.fixture(scope="module")
def ort_qdq_torch_concat(tmp_path_factory):
    """A torch-exported Inception-style block, quantized by onnxruntime (QDQ)."""
    import models

    path = tmp_path_factory.mktemp("ort") / "concat_float.onnx"
    onnx.save(models.torch_model("concat", 13), path)
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    return _ort_quantize(path, samples, tmp_path_factory, "concat")


def _ort_quantize(model_path, samples, tmp_path_factory, name):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{"input": samples[i : i + 1]} for i in range(len(samples))])

        def get_next(self):
            return next(self.rows, None)

    out = tmp_path_factory.mktemp("ortq") / f"{name}_qdq.onnx"
    quantize_static(str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _concat_scales(path):
    """(scale, zp) of each DQ feeding each Concat, read straight from the protobuf."""
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    result = {}
    for node in model.graph.node:
        if node.op_type == "Concat":
            result[node.name] = {
                (float(inits[producer[i].input[1]]), int(inits[producer[i].input[2]]))
                for i in node.input
                if i in producer and producer[i].op_type == "DequantizeLinear"
            }
    return result


def test_onnxruntime_qdq_model_without_backend(ort_qdq_torch_concat):
    result = lint_model(str(ort_qdq_torch_concat))
    # onnxruntime does not share Concat input scales: exactly the Concats whose DQ inputs
    # carry more than one (scale, zp) pair are reported.
    mismatched = {name for name, pairs in _concat_scales(ort_qdq_torch_concat).items()
                  if len(pairs) > 1}
    assert mismatched, "the test model should have a Concat with differing input scales"
    reported = {f.node for f in result.findings if f.rule_id == "QT104"}
    assert mismatched <= reported
    # A well-formed QDQ graph otherwise: no structural errors.
    assert not {"QT001", "QT101", "QT102", "QT103", "QT105"} & {f.rule_id for f in result.findings}


def test_onnxruntime_qdq_model_against_backends(ort_qdq_digits):
    model = onnx.load(ort_qdq_digits)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    activation_qs = [n for n in model.graph.node
                     if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    nonzero_zp = {n.name for n in activation_qs if np.any(inits[n.input[2]] != 0)}

    trt = lint_model(str(ort_qdq_digits), backend="tensorrt")
    by_rule = {}
    for f in trt.findings:
        by_rule.setdefault(f.rule_id, set()).add(f.node)
    # TensorRT wants int8 symmetric activations; onnxruntime wrote uint8.
    assert by_rule["QT107"] >= {n.name for n in activation_qs}
    assert by_rule.get("QT106", set()) == nonzero_zp and nonzero_zp
    assert "QT104" in by_rule and trt.exit_code("error") == 1
    assert [f.severity for f in trt.findings if f.rule_id == "QT104"] == ["error"]

    tvm = lint_model(str(ort_qdq_digits), backend="tvm")
    pot = {f.node for f in tvm.findings if f.rule_id == "QT108"}
    expected = {n.name for n in activation_qs
                if not float(np.log2(inits[n.input[1]])).is_integer()}
    assert pot >= expected and expected


def test_sarif_is_valid_and_complete(ort_qdq_digits):
    result = lint_model(str(ort_qdq_digits))
    log = validate_sarif(format_result(result, "sarif"))
    run = log["runs"][0]
    rule_ids_listed = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert rule_ids_listed == sorted(rule_ids_listed) and "QT104" in rule_ids_listed
    assert len(run["results"]) == len(result.findings)
    for sarif_result, finding in zip(run["results"], result.findings, strict=True):
        assert sarif_result["ruleId"] == finding.rule_id
        assert sarif_result["level"] == finding.severity
        assert sarif_result["message"]["text"] == finding.message
        assert rule_ids_listed[sarif_result["ruleIndex"]] == finding.rule_id
        location = sarif_result["locations"][0]
        assert location["physicalLocation"]["artifactLocation"]["uri"].endswith("digits_qdq.onnx")
        names = {loc["name"] for loc in location.get("logicalLocations", [])}
        assert names == {n for n in (finding.node, finding.tensor) if n}


def test_sarif_schema_rejects_what_sarif_forbids():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": "2.0.0", "runs": []}, SARIF_SUBSET_SCHEMA)
    bad_level = {"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "q"}},
                 "results": [{"message": {"text": "m"}, "level": "fatal"}]}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_level, SARIF_SUBSET_SCHEMA)


def test_junit_and_json_and_text(ort_qdq_digits):
    result = lint_model(str(ort_qdq_digits))
    suites = ET.fromstring(format_result(result, "junit", fail_on="warning"))
    cases = suites.findall("./testsuite/testcase")
    assert len(cases) == len(result.rules)
    failed = {c.get("classname").rsplit(".", 1)[1] for c in cases if c.find("failure") is not None}
    assert failed == {f.rule_id for f in result.findings if f.severity in ("warning", "error")}
    assert suites.get("failures") == str(len(failed))
    # With --fail-on error the warnings are not failures but are still reported.
    suites = ET.fromstring(format_result(result, "junit", fail_on="error"))
    assert suites.get("failures") == "0"
    assert any(c.find("system-out") is not None for c in suites.iter("testcase"))

    document = json.loads(format_result(result, "json"))["results"][0]
    assert document["counts"]["warning"] == sum(f.severity == "warning" for f in result.findings)
    assert [f["rule_id"] for f in document["findings"]] == [f.rule_id for f in result.findings]

    text = format_result(result, "text", fail_on="warning")
    assert text.count("\n") == len(result.findings) + 1
    assert text.rstrip().endswith("(fails --fail-on warning)")


def test_output_is_deterministic(ort_qdq_digits):
    first = [format_result(lint_model(str(ort_qdq_digits)), f) for f in ("json", "sarif", "junit")]
    second = [format_result(lint_model(str(ort_qdq_digits)), f) for f in ("json", "sarif", "junit")]
    assert first == second
