"""README's Python example runs as written and produces what it says."""

import json
import os
import re
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    (block,) = _python_blocks()
    monkeypatch.chdir(ROOT)
    code = block.replace('"out-trt"', repr(str(tmp_path / "out-trt")))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "fold_bn: 6 BatchNormalization folded" in printed
    out = tmp_path / "out-trt"
    assert sorted(os.listdir(out)) == [
        "calibration.cache", "dynamic_range.json", "model.qdq.onnx", "plan.json",
    ]
    lines = (out / "calibration.cache").read_text().splitlines()
    assert lines[0].startswith("TRT-") and lines[0].endswith("-EntropyCalibration2")
    amax = json.loads((out / "dynamic_range.json").read_text())
    for line in lines[1:]:
        name, hexed = line.rsplit(": ", 1)
        scale = struct.unpack(">f", bytes.fromhex(hexed))[0]
        assert abs(scale * 127 - amax[name]) <= 1e-6 * amax[name]
