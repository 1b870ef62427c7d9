"""The CPU an int8 model is made for (``--target-cpu``): weights and warnings follow it.

onnxruntime's u8 x s8 kernels saturate only on x86 CPUs without VNNI, so only there the
``onnxruntime`` backend reduces weights to 7 bits and other backends' 8-bit models get the
overflow warning. The CPU's flags are injected (``QTOOL_CPU_FLAGS`` or the function
argument): the test machine's own CPU does not decide anything here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from qdq_helpers import EXAMPLES
from qtool.backends import get_backend
from qtool.backends.onnxruntime import target_note
from qtool.cli import main

from qtool.cpu import cpu_flags, detect, resolve_target
from qtool.errors import BackendError

NO_VNNI = "fpu sse4_2 avx avx2 fma avx512f avx512bw"  # Skylake-X: AVX-512 but no VNNI
VNNI = NO_VNNI + " avx512_vnni"
ARM = "fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp"


def test_detect_reads_the_flags():
    assert detect(VNNI.split()).name == "vnni"
    assert detect(["avx2", "avx_vnni"]).name == "vnni"  # Alder Lake's VEX VNNI
    assert detect(["avx2", "amx_tile", "amx_int8"]).name == "vnni"
    assert detect(NO_VNNI.split()).name == "avx2"
    assert detect(ARM.split()).name == "arm"
    assert detect([], machine="x86_64").name == "avx2"  # unknown flags: the safe guess
    assert detect(VNNI.split()).evidence == "avx512_vnni"
    assert resolve_target("amx").name == "vnni" and not resolve_target("arm").detected
    with pytest.raises(BackendError, match="not one of auto, vnni, avx2, arm"):
        resolve_target("sparc")


def test_cpu_flags_from_cpuinfo_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("QTOOL_CPU_FLAGS", raising=False)
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd cpuid\nCPU implementer\t: 0x41\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_vnni"}
    assert detect(cpu_flags(arm)).name == "arm"
    assert cpu_flags(tmp_path / "missing") is None
    monkeypatch.setenv("QTOOL_CPU_FLAGS", "sse4_2 avx2")
    assert cpu_flags(x86) == {"sse4_2", "avx2"}
    assert detect().name == "avx2" and resolve_target("auto").detected


@pytest.mark.parametrize("flags, options, weight_levels", [
    (VNNI, {}, (-128, 127)),
    (NO_VNNI, {}, (-64, 63)),
    (ARM, {}, (-128, 127)),
    (VNNI, {"target_cpu": "avx2"}, (-64, 63)),  # named target wins over this CPU
    (NO_VNNI, {"target_cpu": "vnni"}, (-128, 127)),
    (NO_VNNI, {"reduce_range": False}, (-128, 127)),  # the user asked for 8 bits
])
def test_onnxruntime_weights_follow_the_target(monkeypatch, flags, options, weight_levels):
    monkeypatch.setenv("QTOOL_CPU_FLAGS", flags)
    rules = get_backend("onnxruntime", target_cpu=options.pop("target_cpu", "auto"), **options)
    assert (rules.weight_scheme.qmin, rules.weight_scheme.qmax) == weight_levels
    note = target_note(rules)
    assert f"{8 if weight_levels[1] == 127 else 7}-bit weights" in note
    assert "--target-cpu" in note


def _calibrate(tmp_path, backend, *flags, env):
    out = tmp_path / backend
    result = CliRunner().invoke(main, [
        "calibrate", str(EXAMPLES / "digits_cnn.onnx"), "-b", backend, "--data",
        str(EXAMPLES / "digits_calib.npz"), "--num-samples", "64", "-o", str(out), *flags,
    ], env={"QTOOL_CPU_FLAGS": env}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.parametrize("flags, warned", [(NO_VNNI, True), (VNNI, False), (ARM, False)])
def test_overflow_warning_only_on_a_target_without_vnni(tmp_path, flags, warned):
    """tensorrt's 8-bit x 8-bit model: a WARNING for x86 without VNNI, else a one-line note."""
    out, output = _calibrate(tmp_path, "tensorrt", env=flags)
    report = json.loads((out / "report.json").read_text())
    overflow = [w for w in report["warnings"] if "without VNNI" in w]
    assert bool(overflow) is warned, report["warnings"]
    assert ("WARNING: tensorrt's 8-bit activations" in output) is warned
    notes = [n for n in report["notes"] if "x86 CPUs without VNNI" in n]
    assert len(notes) == (0 if warned else 1)
    assert report["ort_kernels"]["target_cpu"] == ("avx2" if warned else detect(
        flags.split()).name)


def test_target_cpu_flag_sets_the_onnxruntime_weights(tmp_path):
    """--target-cpu avx2 on a VNNI machine: 7-bit weights in the file, said in the summary;
    a VNNI target keeps 8 bits and no overflow warning."""
    for target, limit in (("avx2", 64), ("vnni", 128)):
        out, output = _calibrate(tmp_path / target, "onnxruntime", "--target-cpu", target,
                                 env=VNNI)
        model = onnx.load(str(out / "model.qdq.onnx"))
        weights = [numpy_helper.to_array(t) for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) >= 2]
        assert weights
        largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
        assert largest <= limit - 1 and largest >= limit // 2  # the full range is used
        assert f"note: target CPU: {resolve_target(target).description}, --target-cpu " \
               f"{target}: {7 if target == 'avx2' else 8}-bit weights" in output
        assert "without VNNI (the target" not in output
