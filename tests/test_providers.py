"""--provider / providers=: onnxruntime execution providers reach every session qtool makes.

GPU providers cannot run here; the checks are that the names resolve or fail clearly, that
every session of a whole calibrate run (collector, auto-method, sensitivity, tensor errors,
evaluation) is created with the providers asked for, and that ranges do not depend on how
the CPU provider runs (1 vs 2 intra-op threads) beyond float rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from qtool.calibration import calibrate, load_data
from qtool.cli import main

from qtool import providers
from qtool.errors import ProviderError
from qtool.io import load
from qtool.planner import build_plan
from qtool.workflow import CalibrateOptions, prepare, quantize_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"


def test_names_resolve_in_order_or_fail_listing_the_available():
    assert providers.resolve(None) == ("CPUExecutionProvider",)
    assert providers.resolve("cpu") == ("CPUExecutionProvider",)
    assert providers.resolve(["CPUExecutionProvider", "cpu"]) == ("CPUExecutionProvider",)
    with pytest.raises(ProviderError, match="unknown execution provider 'nope'") as info:
        providers.resolve("nope,cpu")
    assert "cpu" in info.value.hint
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderError, match="not available") as info:
            providers.resolve("cuda,cpu")
        assert "onnxruntime-gpu" in info.value.hint


def test_cli_unknown_provider_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["calibrate", str(DIGITS), "-b", "tvm", "--data",
                                       str(CALIB), "-o", str(tmp_path / "o"), "--provider",
                                       "nope"])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: unknown execution provider") and "cpu" in lines[1]
    assert not (tmp_path / "o").exists()


def test_every_session_of_a_run_gets_the_providers(monkeypatch):
    """A fake provider stands for a GPU: every session must be asked for it, first."""
    fake = "FakeGpuExecutionProvider"
    real_session = ort.InferenceSession
    asked = []

    def recording_session(model, sess_options=None, providers=None, **kwargs):
        asked.append(tuple(providers or ()))
        usable = [p for p in providers if p != fake]
        return real_session(model, sess_options, providers=usable, **kwargs)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [fake, "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "get_all_providers", lambda: [fake, "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    # the kernel check is left out: it measures onnxruntime's CPU integer kernels on purpose
    options = CalibrateOptions(data=CALIB, num_samples=16, method="auto", sensitivity=True,
                               providers="fakegpu,cpu", kernel_check=False)
    quantize_model(DIGITS, "tensorrt", options)
    assert len(asked) >= 5  # auto-method (1 session), sensitivity, tensor errors, evaluation
    assert set(asked) == {(fake, "CPUExecutionProvider")}
    assert providers.current() == ("CPUExecutionProvider",)  # restored after the run


def test_ranges_do_not_depend_on_threads():
    graph, _ = prepare(load(DIGITS))
    schemes = build_plan(graph, "snpe").activation_schemes()
    data = load_data(CALIB, graph, num_samples=128)
    for method in ("minmax", "mse"):
        one = calibrate(graph, schemes, data, method=method, intra_op_threads=1, batch_size=16)
        with providers.use(providers.resolve("cpu")):
            two = calibrate(graph, schemes, data, method=method, intra_op_threads=2,
                            batch_size=16)
        assert one.keys() == two.keys()
        for name in one:
            np.testing.assert_allclose(np.asarray(one[name]), np.asarray(two[name]),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{method} {name}")
