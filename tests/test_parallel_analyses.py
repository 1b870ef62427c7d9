"""``--method auto`` and AdaRound as executor tasks: the same bits as in one process.

Each comparison runs the analysis in this process and through two local worker processes
(and Ray, where it is installed) and compares the outputs exactly: ranges, error sums and
reports as floats with ``==``, models as serialized bytes, the CLI's folder file by file.
The exact-sum helper is checked against ``fractions.Fraction`` arithmetic.
"""

from __future__ import annotations

import math
import random
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from qdq_helpers import TENSORRT_ALL_CONVS
from qtool.calibration import calibrate, load_data
from qtool.cli import main

from qtool.analysis.autoselect import _add_exact, select_ranges
from qtool.executor import ProcessExecutor, SerialExecutor
from qtool.io import load, serialize
from qtool.planner import build_plan
from qtool.prepare import prepare
from qtool.qdq import quantize

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "examples" / "digits_cnn.onnx")
CALIB = str(ROOT / "examples" / "digits_calib.npz")
VAL = str(ROOT / "examples" / "digits_val.npz")


@pytest.fixture(scope="module")
def digits():
    graph, _ = prepare(load(DIGITS))
    return graph, load_data(CALIB, graph, num_samples=96), load_data(VAL, graph, num_samples=64)


@pytest.fixture(scope="module")
def workers():
    with ProcessExecutor(2) as executor:
        yield executor


def test_exact_partials_sum_every_grouping_to_the_correctly_rounded_total():
    rng = random.Random(0)
    values = [rng.uniform(0, 1) * 10.0 ** rng.randint(-12, 12) for _ in range(2000)]
    exact = float(sum(Fraction(v) for v in values))  # Fraction -> float rounds to nearest
    whole: list[float] = []
    for v in values:
        _add_exact(whole, v)
    assert math.fsum(whole) == exact
    cut = 777  # two windows summed apart, then merged as the executor path merges them
    first, second = [], []
    for v in values[:cut]:
        _add_exact(first, v)
    for v in values[cut:]:
        _add_exact(second, v)
    for v in second:
        _add_exact(first, v)
    assert math.fsum(first) == exact


def _choice_equal(a, b) -> None:
    assert a.ranges == b.ranges
    assert a.methods == b.methods
    assert a.errors == b.errors  # every float bit for bit


@pytest.mark.parametrize("backend", ["tensorrt", "snpe"])  # snpe: a shared-scale group
@pytest.mark.parametrize("judged", ["held-out", "histograms"])
def test_auto_method_through_local_workers_equals_one_process(digits, workers, backend, judged):
    graph, calib, val = digits
    plan = build_plan(graph, backend)
    judge = val if judged == "held-out" else None
    # a small memory budget: batches split into micro-batches, as on a large model
    one = select_ranges(graph, plan, calib, batch_size=16, judge_data=judge,
                        memory_budget=200_000)
    two = select_ranges(graph, plan, calib, batch_size=16, judge_data=judge,
                        memory_budget=200_000, executor=workers)
    _choice_equal(one, two)
    assert len(set(one.methods.values())) >= 2  # a real choice, not one method everywhere


def test_auto_method_judged_sums_match_numpy(digits):
    """The judged error of the chosen range is the mean squared fake-quant error."""
    graph, calib, val = digits
    plan = build_plan(graph, "tensorrt")
    choice = select_ranges(graph, plan, calib, batch_size=16, judge_data=val)
    import onnx
    import onnxruntime as ort

    schemes = plan.activation_schemes()
    proto = onnx.load_from_string(serialize(graph))
    del proto.graph.output[:]
    for name in schemes:
        proto.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(list(schemes), {"input": np.load(VAL)["input"][:64]})
    for (name, scheme), x in zip(schemes.items(), values, strict=True):
        x = x.astype(np.float64)
        lo, hi = choice.ranges[name]
        scale, zero_point = scheme.qparams(lo, hi)
        expected = np.sum((x - scheme.fake_quantize(x, scale, zero_point)) ** 2) / x.size
        assert choice.errors[name][choice.methods[name]] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------- AdaRound

torch = pytest.importorskip("torch")
pytest.importorskip("onnx2torch")


@pytest.fixture(scope="module")
def ptq(digits):
    graph, calib, _ = digits
    # every conv (the 8-channel ones too: int8_conv_rule off) learns its rounding
    plan = build_plan(graph, TENSORRT_ALL_CONVS, weight_bits=4, act_bits=8)
    ranges = calibrate(graph, plan.activation_schemes(), calib, progress=False)
    return quantize(graph, TENSORRT_ALL_CONVS, ranges, plan=plan), list(calib)


def test_adaround_waves_put_parallel_branches_together(ptq):
    from qtool.qat.adaround import _learners, _waves
    from qtool.qat.importer import to_torch

    result, _ = ptq
    model = to_torch(result, "lsq")
    learners = _learners(model)
    waves = _waves(result.float_graph, learners, model, "quantized")
    assert [name for wave in waves for name in wave] == learners  # graph order kept
    # the digits CNN's two branches read the same tensor: one wave of two
    assert sorted(len(w) for w in waves)[-1] == 2
    nodes = {n.name: n for n in result.float_graph.nodes}
    for wave in waves:
        if len(wave) == 2:
            a, b = (nodes[name] for name in wave)
            assert a.inputs[0].name == b.inputs[0].name
    assert _waves(result.float_graph, learners, model, "float") == [learners]


@pytest.mark.parametrize("inputs", ["quantized", "float"])
def test_adaround_through_local_workers_equals_one_process(ptq, workers, inputs):
    from qtool.qat.adaround import AdaRoundOptions, adaround

    result, calib = ptq
    options = AdaRoundOptions(iterations=20, samples=32, inputs=inputs)
    one, one_layers = adaround(result, calib, options)
    two, two_layers = adaround(result, calib, options, executor=workers)
    assert two_layers == one_layers  # dataclass equality: every error bit for bit
    assert serialize(two.graph) == serialize(one.graph)
    assert any(not layer.kept_nearest for layer in one_layers)  # the rounding was learned


def _folder(tmp_path: Path, name: str, *extra: str) -> dict[str, bytes]:
    out = tmp_path / name
    result = CliRunner().invoke(main, [
        "calibrate", DIGITS, "-b", "tensorrt", "--data", CALIB, "--eval-data", VAL,
        "--num-samples", "64", "--batch-size", "16", "--method", "auto", "--adaround",
        "--adaround-iters", "10", "--weight-bits", "4", "-o", str(out), "-q", *extra])
    assert result.exit_code == 0, result.output
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


def test_cli_auto_method_and_adaround_write_the_same_bytes_with_two_workers(tmp_path):
    one = _folder(tmp_path, "one")
    two = _folder(tmp_path, "two", "--workers", "2")
    assert set(one) == set(two)
    for name in one:
        assert two[name] == one[name], name


def test_auto_method_and_adaround_on_ray_equal_one_process(ptq, digits):
    ray = pytest.importorskip("ray")
    from qtool.executor import RayExecutor
    from qtool.qat.adaround import AdaRoundOptions, adaround

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    graph, calib, val = digits
    plan = build_plan(graph, "tensorrt")
    result, samples = ptq
    options = AdaRoundOptions(iterations=20, samples=64)
    executor = RayExecutor(2, address="")
    try:
        _choice_equal(select_ranges(graph, plan, calib, batch_size=16, judge_data=val,
                                    executor=SerialExecutor()),
                      select_ranges(graph, plan, calib, batch_size=16, judge_data=val,
                                    executor=executor))
        one, one_layers = adaround(result, samples, options)
        two, two_layers = adaround(result, samples, options, executor=executor)
        assert two_layers == one_layers
        assert serialize(two.graph) == serialize(one.graph)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
