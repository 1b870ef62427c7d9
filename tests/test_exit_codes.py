"""docs/cli.md's exit-code table is what qtool does: one real case per documented code.

The table is parsed from the docs; every code there must have a case here and every
QtoolError subclass's code must be in the table, so neither can drift alone. Ctrl-C is
tested for real: SIGINT to the whole process group (as a terminal sends it) of a run with
two worker processes.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from qtool.cli import main

import qtool.errors

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "cli.md"
DIGITS = str(ROOT / "examples" / "digits_cnn.onnx")
CALIB = str(ROOT / "examples" / "digits_calib.npz")


def documented_codes() -> dict[int, str]:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Errors and exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.+) \|$", section, re.M)}


def _model(nodes, inputs, outputs, initializers=(), opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _io(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(tmp_path, monkeypatch, code: int):
    """Trigger the documented case of ``code``; returns the CliRunner result."""
    invoke = CliRunner().invoke
    out = str(tmp_path / "out")
    if code == 0:
        return invoke(main, ["inspect", DIGITS])
    if code == 1:
        return invoke(main, ["lint", DIGITS, "--fail-on", "note"])
    if code == 2:
        return invoke(main, ["calibrate", DIGITS, "-b", "tvm", "--method", "nope"])
    if code == 3:
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"\x08garbage")
        return invoke(main, ["inspect", str(bad)])
    if code == 4:
        old = tmp_path / "old.onnx"
        onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])], [_io("x", [1, 2])],
                         [_io("y", [1, 2])], opset=9), old)
        return invoke(main, ["inspect", str(old)])
    if code == 5:  # fold_bn overflows float32: a graph pass fails
        model = tmp_path / "overflow.onnx"
        inits = [numpy_helper.from_array(np.full((1, 1, 1, 1), 1e30, np.float32), "w"),
                 numpy_helper.from_array(np.full(1, 1e30, np.float32), "gamma"),
                 numpy_helper.from_array(np.zeros(1, np.float32), "beta"),
                 numpy_helper.from_array(np.zeros(1, np.float32), "mean"),
                 numpy_helper.from_array(np.ones(1, np.float32), "var")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
                 helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                                  ["y"])]
        onnx.save(_model(nodes, [_io("x", [1, 1, 2, 2])], [_io("y", [1, 1, 2, 2])], inits),
                  model)
        recipe = tmp_path / "r.yaml"
        recipe.write_text("model: overflow.onnx\noutput: o.onnx\npasses: [fold_bn]\n")
        return invoke(main, ["run", str(recipe)])
    if code == 6:
        data = tmp_path / "small.npz"
        np.savez(data, input=np.zeros((2, 1, 4, 4), np.float32))
        return invoke(main, ["calibrate", DIGITS, "-b", "tvm", "--data", str(data), "-o", out])
    if code == 7:  # finite inputs, NaN activations: log of negative numbers
        model = tmp_path / "log.onnx"
        w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
        nodes = [helper.make_node("Log", ["x"], ["l"]),
                 helper.make_node("MatMul", ["l", "w"], ["y"])]
        onnx.save(_model(nodes, [_io("x", [1, 4])], [_io("y", [1, 2])], [w]), model)
        data = tmp_path / "neg.npz"
        np.savez(data, x=-np.ones((4, 4), np.float32))
        return invoke(main, ["calibrate", str(model), "-b", "tensorrt", "--data", str(data),
                             "-o", out])
    if code == 8:
        Path(out).mkdir()
        (Path(out) / "mine.txt").write_text("mine")
        return invoke(main, ["calibrate", DIGITS, "-b", "tvm", "--data", CALIB, "-o", out])
    if code == 9:  # a Ray cluster nothing answers on
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        return invoke(main, ["calibrate", DIGITS, "-b", "tvm", "--data", CALIB, "-o", out,
                             "--executor", "ray", "--workers", "2"])
    if code == 70:
        def broken(*args, **kwargs):
            raise RuntimeError("simulated bug")

        monkeypatch.setattr("qtool.inspection.inspect_model", broken)
        return invoke(main, ["inspect", DIGITS])
    if code == 130:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr("qtool.inspection.inspect_model", interrupted)
        return invoke(main, ["inspect", DIGITS])
    raise AssertionError(f"docs/cli.md documents exit {code}: add a case for it here")


def test_the_table_covers_every_error_class():
    codes = documented_codes()
    assert {0, 1, 2, 70, 130} <= set(codes)
    for _, cls in inspect.getmembers(qtool.errors, inspect.isclass):
        if issubclass(cls, qtool.errors.QtoolError):
            assert cls.exit_code in codes, (cls.__name__, cls.exit_code)


@pytest.mark.parametrize("code", sorted(documented_codes()))
def test_each_documented_exit_code_happens(tmp_path, monkeypatch, code):
    monkeypatch.chdir(tmp_path)
    result = _run(tmp_path, monkeypatch, code)
    assert result.exit_code == code, (code, result.output)
    if code >= 2:
        assert result.stderr.strip(), code
        assert "Traceback" not in result.output
    if 3 <= code <= 8:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, result.stderr
    if code == 130:
        assert result.stderr.strip().splitlines() == ["interrupted: nothing written"]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc (Linux)")
def _default_sigint() -> None:
    """Ctrl-C as in a terminal: a test run started in the background by a shell without job
    control inherits SIGINT ignored, and so would the command under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_with_workers_prints_one_line(tmp_path):
    big = tmp_path / "calib.npz"
    x = np.load(CALIB)["input"]
    np.savez(big, input=np.concatenate([x] * 16))  # long enough to interrupt
    args = [sys.executable, "-c", "from qtool.cli import main; main()", "calibrate", DIGITS,
            "-b", "tensorrt", "--data", str(big), "--workers", "2", "--batch-size", "8",
            "--method", "kld", "-o", "out"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 120
        while len([c for c in _children(process.pid)]) < 2 and process.poll() is None:
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.05)
        time.sleep(1.0)  # the workers are importing or calibrating
        if process.poll() is not None:
            pytest.skip("the run finished before Ctrl-C")
        os.killpg(process.pid, signal.SIGINT)  # what a terminal does: the whole group
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted: nothing written"], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]


def test_report_does_not_offer_a_force_it_lacks(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["calibrate", DIGITS, "-b", "tvm", "--data", CALIB,
                                       "--num-samples", "8", "-o", str(run), "-q"])
    assert result.exit_code == 0, result.output
    page = tmp_path / "missing-folder" / "deep" / "page.html"
    result = CliRunner().invoke(main, ["report", str(run), "-o", str(page)])
    assert result.exit_code == 8 and "--force" not in result.stderr
    assert result.stderr.splitlines()[1].startswith("hint: ")


def test_ctrl_c_while_workers_start_is_not_lost():
    """A Ctrl-C that arrives while the workers start is raised once they have started (it
    used to be ignored for that moment, and the run went on to the end)."""
    from qtool.calibration.collector import _start_quietly

    class Starting:
        started = terminated = False

        def start(self):  # the Ctrl-C lands while the process starts
            self.started = True
            os.kill(os.getpid(), signal.SIGINT)

        def is_alive(self):
            return self.started and not self.terminated

        def terminate(self):
            self.terminated = True

    processes = [Starting(), Starting()]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(KeyboardInterrupt):
            _start_quietly(processes)
            time.sleep(0.5)  # the old code: ignored, nothing raised even after a while
    finally:
        signal.signal(signal.SIGINT, previous)
    assert all(p.started for p in processes)  # both started: the interrupt waited for them
    assert all(p.terminated for p in processes)
