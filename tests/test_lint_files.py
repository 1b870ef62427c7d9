"""qtool lint over several files: an unreadable one is a result, not the end; QOperator models.

The QOperator model is made by onnxruntime's own quantize_static (QuantFormat.QOperator) from
the trained digits CNN, as a user would make it.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from qtool.cli import main
from test_lint import validate_sarif

from qtool.lint.formats import lint_and_render

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "examples" / "digits_cnn.onnx")
CALIB = ROOT / "examples" / "digits_calib.npz"


@pytest.fixture
def three_models(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not a model")
    return [str(garbage), DIGITS, str(tmp_path / "missing.onnx")]


def test_unreadable_models_are_results_in_every_format(tmp_path, three_models):
    garbage, digits, missing = three_models
    seen = []
    for fmt in ("text", "json", "sarif", "junit"):
        out = tmp_path / f"lint.{fmt}"
        text, code = lint_and_render(three_models, fmt=fmt, output=str(out),
                                     on_error=lambda m, e: seen.append(m))
        assert code == 2 and out.read_text() == text
        if fmt == "text":
            assert f"{garbage}: error QT000 [unreadable-model]" in text
            assert f"{missing}: error QT000 [unreadable-model]" in text
            assert f"{digits}: 0 errors" in text  # the readable model was linted
        elif fmt == "json":
            document = json.loads(text)
            assert document["exit_code"] == 2
            assert [r["model"] for r in document["results"]] == three_models
            rules = [[f["rule_id"] for f in r["findings"]] for r in document["results"]]
            assert rules[0] == ["QT000"] and rules[2] == ["QT000"] and "QT000" not in rules[1]
        elif fmt == "sarif":
            log = validate_sarif(text)
            (run,) = log["runs"]
            ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
            unreadable = [r for r in run["results"] if r["ruleId"] == "QT000"]
            assert sorted(r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
                          for r in unreadable) == sorted([garbage, missing])
            assert all(r["level"] == "error" and ids[r["ruleIndex"]] == "QT000"
                       for r in unreadable)
        else:
            suites = ET.fromstring(text).findall("testsuite")
            assert len(suites) == 3
            failed = [c.get("name") for c in suites[0].iter("testcase")
                      if c.find("failure") is not None]
            assert failed == ["unreadable-model"]
    assert seen == [garbage, missing] * 4


def test_cli_writes_the_sarif_and_exits_2(tmp_path, three_models):
    sarif = tmp_path / "qtool.sarif"
    result = CliRunner().invoke(main, ["lint", *three_models, "--format", "sarif",
                                       "-o", str(sarif)])
    assert result.exit_code == 2
    assert result.stdout == "" and "Traceback" not in result.output
    errors = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 2
    log = validate_sarif(sarif.read_text())
    assert {r["ruleId"] for r in log["runs"][0]["results"]} >= {"QT000"}


@pytest.fixture(scope="module")
def qoperator_model(tmp_path_factory):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    samples = np.load(CALIB)["input"][:16]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{"input": samples[i : i + 1]} for i in range(len(samples))])

        def get_next(self):
            return next(self.rows, None)

    out = tmp_path_factory.mktemp("qop") / "digits_qop.onnx"
    quantize_static(DIGITS, str(out), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return str(out)


def test_qoperator_model_is_named_not_called_broken_qdq(qoperator_model):
    ops = {n.op_type for n in onnx.load(qoperator_model).graph.node}
    assert "QLinearConv" in ops and "QuantizeLinear" in ops  # what ORT wrote
    text, code = lint_and_render([qoperator_model], fmt="json")
    findings = json.loads(text)["results"][0]["findings"]
    rules = [f["rule_id"] for f in findings]
    assert "QT101" not in rules and "QT102" not in rules, findings
    (qop,) = [f for f in findings if f["rule_id"] == "QT110"]
    assert "QOperator" in qop["message"] and "QLinearConv" in qop["message"]
    assert "put a DequantizeLinear" not in text
    assert code == 0  # a warning: --fail-on error passes
