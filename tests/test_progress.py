"""Progress: one line per phase with its time and bars, on a terminal only; --quiet silences.

The terminal is a real pseudo-terminal (os.openpty) given to a qtool process as stderr.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from qtool import progress

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"
QTOOL = [sys.executable, "-c", "from qtool.cli import main; main()"]
PHASES = ("load", "prepare", "plan", "calibrate", "quantize", "analysis", "evaluate", "write")


def _has_phase(text: str, name: str) -> bool:
    """A line ``name  1.23 s`` once the bars' carriage returns are taken as line breaks."""
    return any(re.fullmatch(rf"{re.escape(name)} +\d+\.\d\d s", part.strip())
               for part in re.split(r"[\r\n]", text))


def test_phase_and_bar_print_only_when_shown():
    stream = io.StringIO()
    with progress.shown(True, stream):
        with progress.phase("calibrate"):
            total = sum(progress.bar(range(5), desc="calibrating", unit="sample"))
    assert total == 10
    text = stream.getvalue()
    assert _has_phase(text, "calibrate"), text
    assert "calibrating" in text  # tqdm wrote its bar to the stream
    quiet = io.StringIO()
    with progress.shown(False, quiet), progress.phase("x"):
        assert list(progress.bar([1, 2])) == [1, 2]
    with progress.phase("outside"):  # library use: nothing unless a caller asked
        progress.bar(total=3).update(3)
    assert quiet.getvalue() == ""
    with progress.shown(None, io.StringIO()) as on:  # None: only on a terminal
        assert on is False and not progress.active()


def _calibrate_on_a_tty(tmp_path, *extra) -> tuple[int, str]:
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 cols
    try:
        process = subprocess.Popen(
            [*QTOOL, "calibrate", str(DIGITS), "-b", "tensorrt", "--data", str(CALIB),
             "--num-samples", "64", "--sensitivity", "-o", "out", *extra],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=follower,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = process.wait(timeout=300)
    finally:
        os.close(leader)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_calibrate_shows_every_phase_on_a_terminal(tmp_path):
    code, text = _calibrate_on_a_tty(tmp_path)
    assert code == 0, text
    for name in PHASES:
        assert _has_phase(text, name), (name, text)
    assert "calibrating" in text and "sensitivity" in text  # the bars
    code, text = _calibrate_on_a_tty(tmp_path, "--force", "-q")
    assert code == 0 and text == ""


def test_no_progress_when_stderr_is_not_a_terminal(tmp_path):
    result = subprocess.run([*QTOOL, "calibrate", str(DIGITS), "-b", "tvm", "--data",
                             str(CALIB), "--num-samples", "16", "-o", "out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert not _has_phase(result.stderr, "load") and not _has_phase(result.stderr, "calibrate")


def test_compare_prints_a_line_per_cell():
    from qtool.analysis.compare import compare

    stream = io.StringIO()
    with progress.shown(True, stream):
        compare(DIGITS, CALIB, backends=["tvm"], methods=["minmax", "mse"], sweep_backend="",
                num_samples=16)
    text = stream.getvalue()
    for cell in ("tvm x minmax", "tvm x mse"):
        assert _has_phase(text, cell), text
    assert "compare" in text


@pytest.mark.parametrize("alias, method", [("entropy", "kld"), ("percentile", "quantile")])
def test_method_aliases(tmp_path, alias, method):
    import json

    from click.testing import CliRunner
    from qtool.cli import main

    result = CliRunner().invoke(main, ["calibrate", str(DIGITS), "-b", "tvm", "--data",
                                       str(CALIB), "--num-samples", "16", "--method", alias,
                                       "--weight-method", alias, "-o", str(tmp_path / "o"),
                                       "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["calibration"]["method"] == method
    assert report["calibration"]["weight_method"] == method
    helptext = CliRunner().invoke(main, ["calibrate", "--help"]).stdout
    assert "entropy = kld" in helptext and "percentile = quantile" in helptext
