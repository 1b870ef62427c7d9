"""The qtool command line through click's CliRunner and as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from qtool.cli import main
from test_lint import validate_sarif

import qtool
from qtool.analysis.evaluate import evaluate
from qtool.io import load
from qtool.planner import build_plan
from qtool.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "examples" / "digits_cnn.onnx")
CALIB = str(ROOT / "examples" / "digits_calib.npz")
VAL = str(ROOT / "examples" / "digits_val.npz")
COMMANDS = ("calibrate", "lint", "inspect", "evaluate", "run")


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def two_line_error(result, exit_code, *fragments):
    """The error is `error: ...` and `hint: ...` on stderr, no traceback, and the exit code."""
    assert result.exit_code == exit_code, result.output
    lines = result.stderr.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["error", "hint"], result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def snpe_out(tmp_path_factory):
    """The README's main job, run once through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "out"
    result = CliRunner().invoke(main, ["calibrate", DIGITS, "--backend", "snpe", "--data", CALIB,
                                       "--eval-data", VAL, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, result


# ------------------------------------------------------------------------ calibrate


def test_main_job_prints_float_and_quantized_accuracy(snpe_out):
    out, result = snpe_out
    report = json.loads((out / "report.json").read_text())
    (metrics,) = report["evaluation"]["outputs"]
    line = next(x for x in result.stdout.splitlines() if "top-1 accuracy" in x)
    assert f"float {100 * metrics['float_accuracy']:.2f}%" in line
    assert f"quantized {100 * metrics['quant_accuracy']:.2f}%" in line
    assert metrics["float_accuracy"] == pytest.approx(0.994)
    assert f"{metrics['sqnr_db']:.2f}" in result.stdout
    assert "500 samples, held out" in result.stdout
    assert {"model.onnx", "model.encodings", "plan.json", "report.json", "report.md"} <= {
        p.name for p in out.iterdir()
    }


def test_calibrate_is_byte_identical_across_runs(runner, tmp_path, snpe_out):
    out, _ = snpe_out
    again = tmp_path / "again"
    result = invoke(runner, "calibrate", DIGITS, "-b", "snpe", "--data", CALIB,
                    "--eval-data", VAL, "-o", again, "--quiet")
    assert result.exit_code == 0 and result.stdout == ""
    first = sorted(p.name for p in out.iterdir())
    assert first == sorted(p.name for p in again.iterdir())
    for name in first:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_calibrate_options_reach_the_files(runner, tmp_path):
    out = tmp_path / "o"
    result = invoke(runner, "calibrate", DIGITS, "-b", "academic", "--data", CALIB,
                    "--num-samples", 64, "--batch-size", 16, "--method", "mse",
                    "--weight-method", "minmax", "--bits", 8,
                    "--weight-bits", 4, "--skip", "Gemm", "--workers", 1, "--seed", 1,
                    "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["method"] == "mse"
    # without --eval-data every 8th sample is held out to judge on, not calibrated on
    assert report["calibration"]["samples"] == 56
    assert report["evaluation"]["samples"] == 8 and report["evaluation"]["held_out"]
    plan = json.loads((out / "plan.json").read_text())
    bits = {(t["role"], t["scheme"]["bits"]) for t in plan["tensors"].values()}
    assert {b for role, b in bits if role == "weight"} == {4}
    assert {b for role, b in bits if role == "activation"} == {8}
    assert any("Gemm" in n for n in report["plan"]["float_nodes"])
    assert "float: " in result.stdout


def test_save_plan_then_plan(runner, tmp_path):
    plan_file = tmp_path / "plan.json"
    result = invoke(runner, "calibrate", DIGITS, "-b", "tensorrt", "--save-plan", plan_file)
    assert result.exit_code == 0 and plan_file.is_file()
    out = tmp_path / "o"
    result = invoke(runner, "calibrate", DIGITS, "-b", "tensorrt", "--data", CALIB,
                    "--num-samples", 32, "--plan", plan_file, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "plan.json").read_bytes() == plan_file.read_bytes()


def test_random_inputs_are_marked(runner, tmp_path):
    result = invoke(runner, "calibrate", DIGITS, "-b", "snpe", "--num-samples", 4,
                    "-o", tmp_path / "o")
    assert result.exit_code == 0
    assert "WARNING: calibrated on random inputs" in result.stdout
    assert "random inputs" in result.stderr  # the data loader's log line


def test_error_missing_model(runner, tmp_path):
    result = invoke(runner, "calibrate", tmp_path / "nope.onnx", "-b", "snpe")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_error_not_onnx(runner, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    result = invoke(runner, "calibrate", bad, "-b", "snpe", "-o", tmp_path / "o")
    two_line_error(result, 3, "not an ONNX model")
    assert not (tmp_path / "o").exists()
    debug = invoke(runner, "calibrate", bad, "-b", "snpe", "-o", tmp_path / "o", "--debug")
    assert debug.exit_code == 3 and "Traceback" in debug.stderr


def test_error_data_does_not_fit(runner, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, input=np.zeros((4, 1, 9, 9), np.float32))
    result = invoke(runner, "calibrate", DIGITS, "-b", "snpe", "--data", data,
                    "-o", tmp_path / "o")
    two_line_error(result, 6, "does not fit", "9 != 8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]


def test_error_unknown_backend_and_method(runner):
    result = invoke(runner, "calibrate", DIGITS, "-b", "nope")
    assert result.exit_code == 2 and "'nope' is not one of" in result.stderr
    assert "'tensorrt'" in result.stderr
    result = invoke(runner, "calibrate", DIGITS, "-b", "snpe", "--method", "avg")
    assert result.exit_code == 2 and "'avg' is not one of" in result.stderr


def test_error_existing_output(runner, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep")
    result = invoke(runner, "calibrate", DIGITS, "-b", "snpe", "--data", CALIB, "-o", out)
    two_line_error(result, 8, "not empty")
    assert "--force" in result.stderr.splitlines()[1]
    assert [p.name for p in out.iterdir()] == ["x"]


def test_error_unwritable_output(runner, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke(runner, "calibrate", DIGITS, "-b", "snpe", "--data", CALIB,
                    "-o", blocker / "out")
    two_line_error(result, 8, "is a file")

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        target = locked / "out"
        if os.access(locked, os.W_OK):  # root writes anywhere; /proc refuses even root
            if not Path("/proc/self").is_dir():
                pytest.skip("running as root without /proc: no unwritable folder to try")
            target = Path("/proc/qtool-test-out")
        result = invoke(runner, "calibrate", DIGITS, "-b", "snpe", "--data", CALIB,
                        "-o", target)
        two_line_error(result, 8, "cannot write")
        assert list(locked.iterdir()) == [] and not target.exists()
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------ lint


@pytest.fixture(scope="module")
def ort_qdq(tmp_path_factory):
    from test_lint import _ort_quantize

    return str(_ort_quantize(DIGITS, np.load(CALIB)["input"][:16], tmp_path_factory, "cli"))


def test_lint_formats_and_exit_codes(runner, tmp_path, ort_qdq):
    clean = invoke(runner, "lint", DIGITS)
    assert clean.exit_code == 0 and "0 errors, 0 warnings, 2 notes" in clean.stdout
    assert invoke(runner, "lint", DIGITS, "--fail-on", "note").exit_code == 1

    sarif = invoke(runner, "lint", ort_qdq, "--backend", "tensorrt", "--format", "sarif")
    assert sarif.exit_code == 1
    log = validate_sarif(sarif.stdout)
    levels = {r["level"] for r in log["runs"][0]["results"]}
    assert "error" in levels

    junit_file = tmp_path / "lint.xml"
    junit = invoke(runner, "lint", ort_qdq, "--format", "junit", "--fail-on", "warning",
                   "-o", junit_file)
    assert junit.exit_code == 1 and junit.stdout == ""
    suite = ET.parse(junit_file).getroot().find("testsuite")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["shared-scale-mismatch"]

    as_json = invoke(runner, "lint", DIGITS, ort_qdq, "--format", "json")
    document = json.loads(as_json.stdout)
    assert as_json.exit_code == 0 and document["exit_code"] == 0
    assert [r["model"] for r in document["results"]] == [DIGITS, ort_qdq]

    text = invoke(runner, "lint", ort_qdq, "--backend", "tvm")
    assert text.exit_code == 1 and "QT108 [non-pot-scale]" in text.stdout


def test_lint_cannot_run_exits_2(runner, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    two_line_error(invoke(runner, "lint", bad), 2, "not an ONNX model")
    two_line_error(invoke(runner, "lint", tmp_path / "missing.onnx"), 2, "no such file")
    assert invoke(runner, "lint", DIGITS, "--backend", "nope").exit_code == 2
    assert invoke(runner, "lint", DIGITS, "--format", "xml").exit_code == 2


# ----------------------------------------------------------------- inspect, evaluate, run


def test_inspect(runner):
    result = invoke(runner, "inspect", DIGITS, "--format", "json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    model = onnx.load(DIGITS)
    assert info["opset"] == 13
    assert info["inputs"] == [{"name": "input", "dtype": "float", "shape": ["batch", 1, 8, 8]}]
    assert info["op_histogram"]["BatchNormalization"] == 6
    assert info["nodes"] == len(model.graph.node)
    graph, _ = prepare(load(DIGITS))
    for view in info["backends"]:
        plan = build_plan(graph.copy(), view["backend"])
        assert view["quantized_tensors"] == len(plan.tensors)
        assert view["float_nodes"] == dict(sorted(plan.float_nodes.items()))
    assert [v["backend"] for v in info["backends"]] == list(qtool.backends.backend_names())
    text = invoke(runner, "inspect", DIGITS, "-b", "academic")
    assert "opset 13" in text.stdout and "academic: float /Add" in text.stdout


def test_evaluate(runner, snpe_out):
    out, _ = snpe_out
    result = invoke(runner, "evaluate", DIGITS, out / "model.qdq.onnx", "--data", VAL,
                    "--format", "json", "--layerwise")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    report = json.loads((out / "report.json").read_text())["evaluation"]
    assert document["outputs"] == report["outputs"]
    assert document["samples"] == 500 and document["layers"]
    data = np.load(VAL)
    direct = evaluate(DIGITS, str(out / "model.qdq.onnx"),
                      [{"input": data["input"], "labels": data["labels"]}])
    assert document["outputs"][0]["quant_accuracy"] == pytest.approx(direct.accuracy[1])
    text = invoke(runner, "evaluate", DIGITS, out / "model.qdq.onnx", "--data", VAL)
    assert "top-1 accuracy" in text.stdout
    bad = invoke(runner, "evaluate", DIGITS, out / "model.qdq.onnx", "--data", CALIB,
                 "--num-samples", 0)
    assert bad.exit_code == 2


def test_run_recipe(runner, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [cleanup, fold_bn, {upgrade_opset: {target: 17}}]\n")
    out = tmp_path / "prepared.onnx"
    result = invoke(runner, "run", recipe, DIGITS, "-o", out)
    assert result.exit_code == 0, result.output
    assert "fold_bn: 6 BatchNormalization folded" in result.stdout
    assert onnx.load(out).opset_import[0].version == 17
    recipe.write_text("passes: [cleanup]\nmodle: x.onnx\n")
    two_line_error(invoke(runner, "run", recipe, DIGITS), 2, "unknown recipe key(s) modle")
    listing = invoke(runner, "run", "--list-passes")
    assert listing.exit_code == 0 and "fold_bn" in listing.stdout


def test_version_and_help(runner):
    version = invoke(runner, "--version")
    assert version.exit_code == 0 and qtool.__version__ in version.stdout
    for command in COMMANDS:
        result = invoke(runner, command, "--help")
        assert result.exit_code == 0 and "Example" in result.stdout, command
        assert f"qtool {command}" in result.stdout


# ------------------------------------------------------------------- as a real process


def _qtool(*args, cwd):
    command = [sys.executable, "-c", "from qtool.cli import main; main()", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_process_main_job_and_errors(tmp_path):
    done = _qtool("calibrate", DIGITS, "--backend", "snpe", "--data", CALIB, "--eval-data", VAL,
                  "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "top-1 accuracy     float 99.40%" in done.stdout
    assert (tmp_path / "out" / "model.encodings").is_file()
    again = _qtool("calibrate", DIGITS, "--backend", "snpe", "--data", CALIB, "-o", "out",
                   cwd=tmp_path)
    assert again.returncode == 8
    assert again.stderr.splitlines()[0].startswith("error: out: output folder exists")
    lint = _qtool("lint", DIGITS, "--format", "sarif", "-o", "lint.sarif", cwd=tmp_path)
    assert lint.returncode == 0
    validate_sarif((tmp_path / "lint.sarif").read_text())


CONSOLE_SCRIPT = shutil.which("qtool") or shutil.which(
    "qtool", path=str(Path(sys.executable).parent)
)


@pytest.mark.skipif(CONSOLE_SCRIPT is None, reason="the qtool console script is not installed")
def test_console_script(tmp_path):
    done = subprocess.run([CONSOLE_SCRIPT, "inspect", DIGITS, "-b", "snpe"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "opset 13" in done.stdout
    missing = subprocess.run([CONSOLE_SCRIPT, "lint", str(tmp_path / "x.onnx")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


def test_docs_and_pre_commit_hook(runner, tmp_path):
    import re

    import yaml

    from qtool.lint import available_rules

    docs = (ROOT / "docs" / "cli.md").read_text()
    for rule in available_rules().values():
        assert f"| {rule.id} | {rule.name} |" in docs, rule.id
    assert "github/codeql-action/upload-sarif" in docs and "--format sarif" in docs

    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "qtool-lint" and hook["language"] == "python"
    assert re.search(hook["files"], "models/net.onnx") and not re.search(hook["files"], "a.py")
    program, *entry_args = hook["entry"].split()
    assert program == "qtool"
    # pre-commit appends the staged files to the entry.
    result = invoke(runner, *entry_args, DIGITS, DIGITS)
    assert result.exit_code == 0 and result.stdout.count("passes --fail-on error") == 2
