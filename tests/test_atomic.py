"""Nothing lost: ``qtool calibrate`` killed at random points leaves a complete result or none.

A reference run records the complete output folder (file names and bytes; runs are
byte-identical). Then ``qtool calibrate`` runs as a real process and gets SIGTERM or SIGKILL
after a seeded random delay spread over the length of a whole run. Afterwards the output
folder is either absent, or holds exactly the reference files (or, with ``--force`` over a
previous result, exactly the previous files); never a partial set. No other visible entry may
appear beside it. A hidden staging sibling (``.<name>.*.tmp``) can survive SIGKILL (nothing
runs after it); it is never the output, and the next run ignores it.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"
QTOOL = [sys.executable, "-c", "from qtool.cli import main; main()"]
SEED = 20261123
KILLS = 6


def _args(output: str, backend: str = "tensorrt", *extra: str) -> list[str]:
    return [*QTOOL, "calibrate", str(DIGITS), "-b", backend, "--data", str(CALIB),
            "--num-samples", "64", "-o", output, "-q", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Complete results of two configurations, and how long a whole run takes."""
    base = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    subprocess.run(_args("trt"), cwd=base, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - start
    subprocess.run(_args("acl", "acl"), cwd=base, check=True, capture_output=True, timeout=300)
    return {"trt": _snapshot(base / "trt"), "acl": _snapshot(base / "acl"), "seconds": duration}


def _visible_siblings(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != name and not p.name.startswith("."))


def _hidden_leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _kill_at(args: list[str], cwd: Path, delay: float, signum: int) -> int | None:
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signum)
    try:
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    return process.returncode


def _kill_points(count: int, seconds: float, rng: random.Random) -> list[tuple[float, int]]:
    """Delays over the whole run (start-up, calibration, writing) and a signal each."""
    return [
        (rng.uniform(0.05, 1.1) * seconds, rng.choice([signal.SIGTERM, signal.SIGKILL]))
        for _ in range(count)
    ]


def test_killed_fresh_run_leaves_all_or_nothing(tmp_path, reference):
    rng = random.Random(SEED)
    leftovers = []
    for index, (delay, signum) in enumerate(_kill_points(KILLS, reference["seconds"], rng)):
        work = tmp_path / f"run{index}"
        work.mkdir()
        code = _kill_at(_args("out"), work, delay, signum)
        out = work / "out"
        state = "complete" if out.exists() else "absent"
        hidden = _hidden_leftovers(work, "out")
        print(f"fresh run: {signum!r} at {delay:.2f}s -> exit {code}, output {state}, {hidden}")
        if out.exists():
            assert _snapshot(out) == reference["trt"], f"partial: {signum!r} at {delay:.2f}s"
        assert _visible_siblings(work, "out") == [], "stray visible files beside the output"
        hidden = _hidden_leftovers(work, "out")
        if code == 0:
            assert hidden == []
        leftovers += hidden  # SIGTERM too: see test_sigterm_removes_the_staging_folder
        # The next run is not disturbed by a leftover and completes the folder.
        if not out.exists():
            subprocess.run(_args("out"), cwd=work, check=True, capture_output=True, timeout=300)
            assert _snapshot(out) == reference["trt"]
    for name in leftovers:
        assert name.startswith(".out.") and name.endswith(".tmp"), name


def test_killed_forced_run_keeps_previous_or_new(tmp_path, reference):
    rng = random.Random(SEED + 1)
    for index, (delay, signum) in enumerate(_kill_points(KILLS, reference["seconds"], rng)):
        work = tmp_path / f"run{index}"
        (work / "out").mkdir(parents=True)
        for name, data in reference["acl"].items():
            (work / "out" / name).write_bytes(data)
        code = _kill_at(_args("out", "tensorrt", "--force"), work, delay, signum)
        out = work / "out"
        if out.exists():
            got = _snapshot(out)
            assert got in (reference["acl"], reference["trt"]), (
                f"mixed or partial output after {signum!r} at {delay:.2f}s: {sorted(got)}"
            )
        else:  # killed between moving the old folder aside and moving the new one in
            aside = [p for p in work.iterdir() if p.name.startswith(".out.") and p.suffix == ".old"]
            assert aside and _snapshot(aside[0] / "old") == reference["acl"]
        assert _visible_siblings(work, "out") == []
        if code == 0:
            assert _snapshot(out) == reference["trt"]


def test_existing_output_is_never_overwritten_without_force(tmp_path, reference):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference["acl"].items():
        (out / name).write_bytes(data)
    result = subprocess.run(_args("out"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 8, result.stderr
    assert "error: " in result.stderr and "--force" in result.stderr
    assert _snapshot(out) == reference["acl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # An existing file where the folder should go is refused too, and left alone.
    shutil.rmtree(out)
    out.write_bytes(b"keep me")
    result = subprocess.run(_args("out"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode in (2, 8) and "error" in result.stderr.lower()  # click: usage error
    assert out.read_bytes() == b"keep me"


def test_forced_run_replaces_the_previous_result_whole(tmp_path, reference):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference["acl"].items():
        (out / name).write_bytes(data)
    assert "record.txt" in reference["acl"] and "record.txt" not in reference["trt"]
    subprocess.run(_args("out", "tensorrt", "--force"), cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)
    assert _snapshot(out) == reference["trt"]  # no file of the old result survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_forced_run_never_replaces_foreign_files(tmp_path, reference):
    """--force replaces a folder qtool wrote; one file qtool did not write (or an edited
    one) and the whole folder is refused, byte for byte as it was."""
    for foreign in ("notes.txt", "sub/data.bin", "report.md"):
        work = tmp_path / foreign.replace("/", "_")
        out = work / "out"
        out.mkdir(parents=True)
        for name, data in reference["acl"].items():
            (out / name).write_bytes(data)
        (out / foreign).parent.mkdir(parents=True, exist_ok=True)
        (out / foreign).write_bytes(b"the user's own bytes")  # report.md: edited by the user
        before = _snapshot(out)
        result = subprocess.run(_args("out", "tensorrt", "--force"), cwd=work,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 8, result.stderr
        assert "did not write" in result.stderr and foreign.split("/")[0] in result.stderr
        assert _snapshot(out) == before
        assert sorted(p.name for p in work.iterdir()) == ["out"]  # nothing left behind


def test_folder_holding_the_model_or_the_current_folder_is_refused(tmp_path):
    danger = tmp_path / "danger"
    danger.mkdir()
    shutil.copy(DIGITS, danger / "my_model.onnx")
    (danger / "notes.txt").write_text("mine")
    before = _snapshot(danger)
    args = [*QTOOL, "calibrate", "danger/my_model.onnx", "-b", "tensorrt", "--data", str(CALIB),
            "--num-samples", "16", "-q"]
    for output in ("danger", "danger/", "."):
        result = subprocess.run([*args, "-o", output, "--force"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 8, result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert _snapshot(danger) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["danger"], output
    # from inside: `-o . --force` in the model's folder
    result = subprocess.run([*QTOOL, "calibrate", "my_model.onnx", "-b", "tensorrt", "--data",
                             str(CALIB), "-q", "-o", ".", "--force"], cwd=danger,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 8 and "current folder" in result.stderr
    assert _snapshot(danger) == before and sorted(p.name for p in danger.iterdir()) == [
        "my_model.onnx", "notes.txt"]


def test_sigterm_removes_the_staging_folder(tmp_path):
    """Regression: Python's default SIGTERM kills without unwinding, which left the staging
    folder .out.*.tmp behind; cli.py turns SIGTERM into SystemExit."""
    process = subprocess.Popen(_args("out"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _hidden_leftovers(tmp_path, "out") and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if code == 0:
        pytest.skip("the run finished before the signal arrived")
    assert code != 0 and not (tmp_path / "out").exists()
    assert _hidden_leftovers(tmp_path, "out") == []
