"""QAT: onnx2torch import of the QDQ graph, the algorithms' estimators, BN strategies, export.

The proof runs on the example digits CNN trained on scikit-learn's digits
(examples/train_digits.py): W4A4 for academic and tvm, W4A8 for snpe, PTQ (minmax
calibration) against QAT (BN kept, strategy 1, 10 epochs). The graph is raised to opset 21
first so 4-bit tensors are stored as INT4 and onnxruntime clips them to the 4-bit range
(at opset 13 they live in int8 and QuantizeLinear saturates at +-127 instead).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx2torch")
pytest.importorskip("sklearn")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from qtool.calibration import calibrate  # noqa: E402

import qtool.qat as qat  # noqa: E402
from qtool.errors import DataError, PlanError  # noqa: E402
from qtool.io import load, serialize  # noqa: E402
from qtool.pipeline import Pipeline  # noqa: E402
from qtool.planner import build_plan  # noqa: E402
from qtool.qat.bn import QuantConv, QuantWeight  # noqa: E402
from qtool.qat.fake_quant import (  # noqa: E402
    DSQFakeQuantize,
    LSQFakeQuantize,
    LSQPlusFakeQuantize,
    PACTFakeQuantize,
)
from qtool.qat.workflow import qat_model  # noqa: E402
from qtool.qdq import quantize  # noqa: E402
from qtool.scheme import QuantScheme  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "digits_cnn.onnx"
sys.path.insert(0, str(ROOT / "examples"))
from train_digits import load_digits_split  # noqa: E402

torch.set_num_threads(1)  # tiny model: threads only contend
CONFIGS = {"academic": (4, 4), "tvm": (4, 4), "snpe": (4, 8)}
EPOCHS, LR, STRATEGY = 10, 3e-3, 1


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_val, y_val = load_digits_split()
    return x_train, y_train, x_val, y_val


@pytest.fixture(scope="module")
def graphs():
    """(prepared BN-folded graph, BN-kept graph), both at opset 21."""
    folded, _ = Pipeline(
        ["cleanup", "fold_bn", ("upgrade_opset", {"target": 21})]
    ).run(load(MODEL))
    kept, _ = Pipeline(["cleanup", ("upgrade_opset", {"target": 21})]).run(load(MODEL))
    return folded, kept


@pytest.fixture(scope="module")
def ptq(digits, graphs):
    """Post-training quantized model per backend (minmax calibration on 256 samples)."""
    x_train = digits[0]
    results = {}
    for backend, (w, a) in CONFIGS.items():
        plan = build_plan(graphs[0], backend, weight_bits=w, act_bits=a)
        calib = [{"input": x_train[i : i + 1]} for i in range(256)]
        ranges = calibrate(graphs[0], plan.activation_schemes(), calib, progress=False)
        results[backend] = quantize(graphs[0], backend, ranges, plan=plan)
    return results


def run_ort(graph_or_model, x, extra_outputs=()):
    model = onnx.load_from_string(serialize(graph_or_model))
    for name in extra_outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


def accuracy(graph, x, y) -> float:
    return float((run_ort(graph, x)[0].argmax(1) == y).mean())


def train_loader(digits, seed=0):
    x_train, y_train = digits[0], digits[1]
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    return torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def assert_consistent(model, result, x):
    """Torch (eval) and the QDQ graph in onnxruntime agree within one quantization step.

    Every quantized activation and the output are compared per sample. Where a sample
    differs at all, the first quantized tensor (graph order) where it differs must differ by
    at most one step of that tensor: a value on a rounding boundary that float summation
    order put on the other side. Everything downstream of such a flip follows from it;
    samples without a flip must agree to float precision everywhere.
    """
    model.eval()
    tensors = list(result.plan.activation_schemes())
    with torch.no_grad():
        torch_acts = model.activations(torch.from_numpy(x))
        torch_out = model(torch.from_numpy(x)).numpy()
    ort_out, *ort_acts = run_ort(result.graph, x, [f"{t}_dequantized" for t in tensors])
    steps = {t: float(np.max(result.qparams[t].scale)) for t in tensors}
    flipped = np.zeros(len(x), dtype=bool)
    for t, ort_value in zip(tensors, ort_acts, strict=True):
        diff = np.abs(torch_acts[t].numpy() - ort_value).reshape(len(x), -1).max(axis=1)
        first = (diff > 1e-5 * steps[t]) & ~flipped
        # 1e-4: float32 rounding of two dequantized values up to 255 steps (~3e-5 step).
        assert np.all(diff[first] <= steps[t] * (1 + 1e-4)), f"{t}: {diff[first].max()} > 1 step"
        flipped |= first
    out_diff = np.abs(torch_out - ort_out).reshape(len(x), -1).max(axis=1)
    assert np.all(out_diff[~flipped] <= 1e-4 * max(1.0, np.abs(ort_out).max()))
    assert flipped.mean() < 0.05, f"{flipped.mean():.1%} of samples have a rounding flip"
    return flipped.mean()


# --------------------------------------------------------------------- without torch


def test_import_without_torch_says_what_to_install():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import qtool, qtool.cli, qtool.qdq, qtool.calibration, qtool.backends\n"
        "from qtool.errors import QtoolError\n"
        "try:\n"
        "    import qtool.qat\n"
        "except QtoolError as exc:\n"
        "    print('MESSAGE', exc.message); print('HINT', exc.hint)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MESSAGE QAT needs torch and onnx2torch" in done.stdout
    assert 'HINT pip install "qtool[qat]"' in done.stdout


# ----------------------------------------------------------------- the estimators


def test_lsq_gradients_are_the_papers():
    scheme = QuantScheme(bits=4, signed=True, symmetric=True)  # levels -8..7
    q = LSQFakeQuantize(scheme, np.float32(0.5), np.int64(0))
    x = torch.tensor([0.3, 1.26, -0.74, 5.0, -6.0], requires_grad=True)
    y = q(x)
    y.sum().backward()
    v = x.detach() / 0.5
    inside = (v >= -8) & (v <= 7)
    expected_x = inside.float()
    per_element = torch.where(inside, torch.round(v) - v,
                              torch.where(v > 7, torch.tensor(7.0), torch.tensor(-8.0)))
    g = 1 / math.sqrt(5 * 7)
    assert torch.equal(y.detach(), torch.clamp(torch.round(v), -8, 7) * 0.5)
    assert torch.allclose(x.grad, expected_x)
    assert torch.allclose(q.scale.grad, per_element.sum() * g, atol=1e-6)


def test_lsq_plus_learns_the_offset_only_from_clipped_values():
    scheme = QuantScheme(bits=8, signed=False, symmetric=False)
    q = LSQPlusFakeQuantize(scheme, np.float32(0.1), np.int64(10))
    x = torch.tensor([0.0, 1.0, 26.0, 30.0])  # 26 and 30 clip at 255 -> (255 - 10) * 0.1
    q(x).sum().backward()
    g = 1 / math.sqrt(4 * 255)
    assert torch.allclose(q.zero_point.grad, torch.tensor(-0.1 * 2 * g), atol=1e-7)


def test_pact_clip_gradient_and_grid():
    scheme = QuantScheme(bits=4, signed=False, symmetric=True)  # 0..15
    q = PACTFakeQuantize(scheme, np.float32(0.2), np.int64(0))  # alpha = 3.0
    assert float(q.alpha.detach()) == pytest.approx(3.0)
    x = torch.tensor([0.05, 1.0, 2.9, 3.5, 10.0], requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.allclose(y.detach(), torch.tensor([0.0, 1.0, 2.8, 3.0, 3.0]))
    assert float(q.alpha.grad) == 2.0  # one per element above alpha, nothing inside
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))


def test_dsq_forward_is_hard_rounding_backward_is_soft():
    scheme = QuantScheme(bits=4, signed=True, symmetric=True)
    q = DSQFakeQuantize(scheme, np.float32(0.25), np.int64(0), alpha=0.4)
    x = torch.linspace(-1.5, 1.5, 41, requires_grad=True)
    q.train()
    y = q(x)
    s, z = q.effective()  # range rule: batch min-max (EMA from the calibrated range)
    assert torch.allclose(y.detach(), (torch.clamp(torch.round(x.detach() / s), -8, 7)) * s)
    y.sum().backward()
    inside = x.grad[(x.detach() / s).abs() < 7]
    assert torch.all(inside > 0) and inside.max() > 1.0 and inside.min() < 1.0


def test_power_of_two_is_kept_with_a_gradient():
    scheme = QuantScheme(bits=4, signed=True, symmetric=True, power_of_two=True)
    q = LSQFakeQuantize(scheme, np.float32(0.3), np.int64(0))
    x = torch.linspace(-3, 3, 17)
    q(x).sum().backward()
    scale, _ = q.qparams()
    assert math.frexp(float(scale))[0] == 0.5 and float(scale) == 0.25
    assert q.scale.grad is not None and float(q.scale.grad) != 0.0


# --------------------------------------------------------------------- BN strategies


def _conv_bn(strategy, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    b = torch.randn(4, generator=gen)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(4, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(4, generator=gen))
        bn.running_mean.copy_(torch.randn(4, generator=gen))
        bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    weight_q = LSQFakeQuantize(QuantScheme(bits=8), np.float32(0.05), np.int64(0))
    weight_q.enabled = False  # float: strategies must then be exactly conv + BN
    layer = QuantConv(QuantWeight("w", w.numpy(), weight_q), b, {"pads": [1, 1, 1, 1]},
                      bn=bn if strategy else None, strategy=strategy)
    return layer, w, b, bn


@pytest.mark.parametrize("strategy", [1, 2, 3, 4])
def test_bn_strategies_compute_conv_then_bn(strategy):
    layer, w, b, bn = _conv_bn(strategy)
    reference = torch.nn.BatchNorm2d(4)
    reference.load_state_dict(bn.state_dict())
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    conv = F.conv2d(x, w, b, padding=1)
    layer.train()
    reference.train(strategy != 1)  # strategy 1 keeps the running statistics frozen
    with torch.no_grad():
        expected = reference(conv)
        got = layer(x)
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.allclose(bn.running_mean, reference.running_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, reference.running_var, atol=1e-5)
    layer.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), reference(conv), atol=1e-4)
        folded_w, folded_b = layer.folded()
        assert torch.allclose(F.conv2d(x, folded_w, folded_b, padding=1), reference(conv),
                              atol=1e-4)


def test_bn_recalibration_sets_the_batch_averages(ptq, graphs, digits):
    model = qat.to_torch(ptq["academic"], "lsq", bn_graph=graphs[1], bn_strategy=1)
    stem = model.layers["/stem/stem.0/stem.0.0/Conv"]
    x = torch.from_numpy(digits[0][:256])
    with torch.no_grad():
        s = stem._running_factor()
        xq = model.activation_quantizers["input"].eval()(x)
        w = stem.weight.quantizer.eval()(stem.weight.weight * s.reshape(-1, 1, 1, 1))
        y = F.conv2d(xq, w, None, padding=1) / s.reshape(1, -1, 1, 1)
    batches = [x[:128], x[128:]]
    assert qat.recalibrate_bn(model, batches, rounds=1) == 6
    halves = [y[:128], y[128:]]
    mean = sum(h.mean(dim=(0, 2, 3)) for h in halves) / 2
    var = sum(h.var(dim=(0, 2, 3), unbiased=True) for h in halves) / 2
    assert torch.allclose(stem.bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(stem.bn.running_var, var, rtol=1e-4, atol=1e-6)
    with pytest.raises(PlanError, match="no BatchNorm"):
        qat.recalibrate_bn(qat.to_torch(ptq["academic"], "lsq"), batches)


# ------------------------------------------------------------------- import / export


@pytest.mark.parametrize("backend", list(CONFIGS))
@pytest.mark.parametrize("strategy", [0, 4])
def test_import_reproduces_the_ptq_graph(ptq, graphs, digits, backend, strategy):
    model = qat.to_torch(ptq[backend], "lsq", bn_graph=graphs[1], bn_strategy=strategy)
    assert model.training  # onnx2torch hands it over in train mode
    assert len(model.layers) == 7  # 6 convs + the classifier
    if backend == "tvm":  # Concat inputs share one scale: one module, one parameter
        group = ptq[backend].plan.groups
        members = next(m for m in group.values() if len(m) >= 2)
        assert len({id(model.activation_quantizers[m]) for m in members}) == 1
    assert_consistent(model, ptq[backend], digits[2])


def test_unknown_algorithm_and_missing_bn_graph(ptq):
    with pytest.raises(PlanError, match="unknown QAT algorithm"):
        qat.to_torch(ptq["academic"], "adaround")
    with pytest.raises(PlanError, match="needs the BN"):
        qat.to_torch(ptq["academic"], "lsq", bn_strategy=4)


# ----------------------------------------------------------------- the digits proof


@pytest.mark.parametrize("backend", list(CONFIGS))
@pytest.mark.parametrize("algorithm", ["lsq", "pact"])
def test_qat_recovers_4bit_accuracy(ptq, graphs, digits, backend, algorithm, tmp_path):
    x_val, y_val = digits[2], digits[3]
    float_acc = accuracy(graphs[0], x_val, y_val)
    ptq_acc = accuracy(ptq[backend].graph, x_val, y_val)
    torch.manual_seed(0)
    model = qat.to_torch(ptq[backend], algorithm, bn_graph=graphs[1], bn_strategy=STRATEGY)
    qat.fit(model, train_loader(digits), F.cross_entropy, epochs=EPOCHS, lr=LR)
    result = qat.export(model)
    qat_acc = accuracy(result.graph, x_val, y_val)

    assert float_acc >= 0.99
    assert qat_acc >= float_acc - 0.03, (backend, algorithm, float_acc, ptq_acc, qat_acc)
    if CONFIGS[backend] == (4, 4):
        assert qat_acc >= ptq_acc + 0.10, (backend, algorithm, ptq_acc, qat_acc)
    else:
        assert qat_acc >= ptq_acc
    assert_consistent(model, result, x_val)

    files = result.files()
    if backend == "tvm":  # power-of-two scales survive training, and the shift table says so
        for qp in result.qparams.values():
            for scale in np.atleast_1d(qp.scale):
                assert math.frexp(float(scale))[0] == 0.5
        shifts = json.loads(files["shifts.json"])
        assert shifts["activation_shifts"]
    if backend == "snpe":  # the emitter writes the learned encodings
        encodings = json.loads(files["model.encodings"])
        for enc in encodings["activation_encodings"]:  # version 1.0.0: a list
            tensor = enc["name"]
            assert enc["scale"] == pytest.approx([float(result.qparams[tensor].scale)])
            assert enc["offset"] == [-int(result.qparams[tensor].zero_point)]
        assert encodings["param_encodings"]
    result.save(tmp_path)
    assert (tmp_path / "plan.json").is_file()


@pytest.mark.parametrize("algorithm", ["lsq+", "dorefa", "dsq"])
def test_other_algorithms_train_and_export(ptq, graphs, digits, algorithm):
    x_val, y_val = digits[2], digits[3]
    torch.manual_seed(0)
    model = qat.to_torch(ptq["academic"], algorithm, bn_graph=graphs[1], bn_strategy=STRATEGY)
    qat.fit(model, train_loader(digits), F.cross_entropy, epochs=3, lr=LR)
    result = qat.export(model)
    assert accuracy(result.graph, x_val, y_val) >= accuracy(ptq["academic"].graph, x_val,
                                                            y_val) + 0.10
    assert_consistent(model, result, x_val)


def test_fit_under_a_process_group_uses_ddp(ptq, digits):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    try:
        model = qat.to_torch(ptq["snpe"], "lsq")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        history = qat.fit(model, train_loader(digits), F.cross_entropy, epochs=1, lr=1e-3)
        assert len(history) == 1 and math.isfinite(history[0])
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert_consistent(model, qat.export(model), digits[2][:100])
    finally:
        dist.destroy_process_group()


def test_qat_to_folder_writes_the_backend_files(tmp_path, digits):
    x_train, y_train, x_val, y_val = digits
    train = tmp_path / "train.npz"
    np.savez(train, input=x_train, labels=y_train)
    val = tmp_path / "val.npz"
    np.savez(val, input=x_val, labels=y_val)
    # LR / 3: snpe quantizes every op output, the logits too (converter placement); these 2
    # epochs then reach 0.958 at LR and 0.988 at LR / 3 (float 0.994, PTQ 0.982).
    options = qat.QatOptions(algorithm="lsq", epochs=2, lr=LR / 3, weight_bits=4, act_bits=8,
                             eval_data=val, calib_samples=128)
    folder, report = qat.qat_to_folder(MODEL, "snpe", train, tmp_path / "out", options)
    names = sorted(p.name for p in folder.iterdir() if p.name != ".qtool-manifest.json")
    assert names == ["model.encodings", "model.onnx", "plan.json", "qat_report.json"]
    saved = json.loads((folder / "qat_report.json").read_text())
    assert saved["accuracy"]["qat"] >= saved["accuracy"]["float"] - 0.03
    assert report["epoch_losses"] == saved["epoch_losses"]
    assert report["opset"] == {"model": 13, "quantized": 21}  # 4-bit: INT4 storage
    again, _ = qat_model(MODEL, "snpe", train, options)  # same inputs, same bytes
    assert again == {p.name: p.read_bytes() for p in folder.iterdir()
                     if p.name != ".qtool-manifest.json"}
    with pytest.raises(Exception, match="not empty"):
        qat.qat_to_folder(MODEL, "snpe", train, tmp_path / "out", options)


def test_qat_without_labels_distills_the_float_model(tmp_path, digits):
    train = tmp_path / "unlabelled.npz"
    np.savez(train, input=digits[0])
    options = qat.QatOptions(epochs=4, lr=1e-3, weight_bits=4, act_bits=8)
    files, report = qat_model(MODEL, "tvm", train, options)
    assert report["loss"] == "mse to the float outputs, each divided by its variance"
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]
    assert accuracy(load(files["model.qdq.onnx"], check=False), digits[2], digits[3]) >= 0.96
    held = report["held_out"]  # no eval data: the last 10 % of the training samples
    assert held["data"] == "the last 130 training samples" and held["samples"] == 130
    assert len(held["epochs"]) == 5 and held["selection"]["ptq"] == held["epochs"][0] | {}
    assert held["selection"]["samples"] == 65  # the even rows choose, the odd ones report
    assert held["selection"]["qat"]["sqnr_db"] >= held["selection"]["ptq"]["sqnr_db"]
    with pytest.raises(DataError, match="no array for model input"):
        np.savez(tmp_path / "wrong.npz", pixels=digits[0][:8])
        qat_model(MODEL, "tvm", tmp_path / "wrong.npz", options)


def _sqnr(reference, output) -> float:
    return 10 * math.log10(float(np.sum(reference.astype(np.float64) ** 2))
                           / float(np.sum((reference.astype(np.float64) - output) ** 2)))


def test_default_qat_of_a_pretrained_model_is_never_worse_than_ptq(tmp_path, digits, graphs):
    """Defaults (weights 1e-5, quantizer parameters 1e-3 relative), held-out scores."""
    x_train, y_train, x_val, y_val = digits
    np.savez(tmp_path / "train.npz", input=x_train[:512], labels=y_train[:512])
    np.savez(tmp_path / "val.npz", input=x_val, labels=y_val)
    options = qat.QatOptions(epochs=3, weight_bits=4, act_bits=8, eval_data=tmp_path / "val.npz")
    assert (options.lr, options.quant_lr) == (1e-5, 1e-3)
    files, report = qat_model(MODEL, "tvm", tmp_path / "train.npz", options)
    # independent PTQ start and float reference, scored here in onnxruntime
    plan = build_plan(graphs[0], "tvm", weight_bits=4, act_bits=8)
    ranges = calibrate(graphs[0], plan.activation_schemes(),
                       [{"input": x_train[i : i + 1]} for i in range(256)], progress=False)
    start = quantize(graphs[0], "tvm", ranges, plan=plan)
    written = load(files["model.qdq.onnx"], check=False)
    held = report["held_out"]
    scores = {}
    for part, rows in (("report", slice(1, None, 2)), ("selection", slice(0, None, 2))):
        reference = run_ort(graphs[0], x_val[rows])[0]
        exported = run_ort(written, x_val[rows])[0]
        scores[part] = (_sqnr(reference, run_ort(start.graph, x_val[rows])[0]),
                        _sqnr(reference, exported),
                        float((exported.argmax(1) == y_val[rows]).mean()))
    ptq_sqnr, qat_sqnr, qat_top1 = scores["report"]  # what the report says: the odd rows
    assert held["ptq"]["sqnr_db"] == pytest.approx(ptq_sqnr, abs=1e-3)
    assert held["qat"]["sqnr_db"] == pytest.approx(qat_sqnr, abs=1e-3)
    assert held["qat"]["accuracy"] == pytest.approx(qat_top1)
    ptq_sqnr, qat_sqnr, qat_top1 = scores["selection"]  # never worse where it was chosen
    assert held["selection"]["qat"]["sqnr_db"] == pytest.approx(qat_sqnr, abs=1e-3)
    assert (qat_top1, qat_sqnr) >= (held["selection"]["ptq"]["accuracy"], ptq_sqnr)
    assert held["data"] == (tmp_path / "val.npz").as_posix() and len(held["epochs"]) == 4
    assert held["samples"] == len(x_val) and held["selection"]["samples"] == (len(x_val) + 1) // 2


def test_absurd_learning_rate_exports_the_ptq_start(tmp_path, digits, ptq):
    x_train, y_train, x_val, y_val = digits
    np.savez(tmp_path / "train.npz", input=x_train[:256], labels=y_train[:256])
    np.savez(tmp_path / "val.npz", input=x_val, labels=y_val)
    options = qat.QatOptions(epochs=2, lr=10.0, quant_lr=10.0, weight_bits=4, act_bits=8,
                             eval_data=tmp_path / "val.npz")
    files, report = qat_model(MODEL, "snpe", tmp_path / "train.npz", options)
    held = report["held_out"]
    assert held["improved"] is False and held["best_epoch"] == 0
    assert held["exported"] == "ptq (training did not improve on it)"
    assert all(e["accuracy"] < held["selection"]["ptq"]["accuracy"]
               for e in held["epochs"][1:])
    assert held["qat"] == held["ptq"]
    assert report["accuracy"]["qat"] == report["accuracy"]["ptq"]
    # the files are the PTQ model's, byte for byte (the fixture's PTQ: same calibration)
    assert {k: v for k, v in files.items() if k != "qat_report.json"} == ptq["snpe"].files()


def test_ptq_fallback_on_a_per_channel_backend_is_what_calibrate_writes(tmp_path, digits):
    """tensorrt's per-channel weight scales: training must not change the PTQ model the
    quantizers were initialised from, so the fallback is ``qtool calibrate``'s output."""
    from qtool.workflow import CalibrateOptions, quantize_model

    x_train, y_train, x_val, y_val = digits
    np.savez(tmp_path / "train.npz", input=x_train[:256], labels=y_train[:256])
    np.savez(tmp_path / "calib.npz", input=x_train[:128])  # QAT calibrates on these
    np.savez(tmp_path / "val.npz", input=x_val, labels=y_val)
    options = qat.QatOptions(epochs=1, lr=10.0, quant_lr=10.0, calib_samples=128,
                             eval_data=tmp_path / "val.npz")
    files, report = qat_model(MODEL, "tensorrt", tmp_path / "train.npz", options)
    assert report["held_out"]["exported"] == "ptq (training did not improve on it)"
    calibrated, _ = quantize_model(MODEL, "tensorrt", CalibrateOptions(
        data=str(tmp_path / "calib.npz"), eval_data=str(tmp_path / "val.npz"),
        bias_correction=False, analysis="none"))
    backend_files = set(files) - {"qat_report.json", "plan.json"}
    assert backend_files and backend_files <= set(calibrated)
    for name in sorted(backend_files):
        assert files[name] == calibrated[name], name


def test_quantizers_copy_the_ptq_scales(graphs, digits):
    plan = build_plan(graphs[0], "tensorrt")  # per-channel weight scales (float32 arrays)
    ranges = calibrate(graphs[0], plan.activation_schemes(),
                       [{"input": digits[0][i : i + 1]} for i in range(16)], progress=False)
    result = quantize(graphs[0], "tensorrt", ranges, plan=plan)
    before = serialize(result.graph)
    model = qat.to_torch(result, "lsq")
    arrays = [np.asarray(getattr(q, field)) for q in result.qparams.values()
              for field in ("scale", "zero_point")]
    for parameter in model.parameters():
        data = parameter.detach().numpy()
        assert not any(np.shares_memory(data, a) for a in arrays)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    assert serialize(result.graph) == before


def test_normalized_distillation_divides_each_output_by_its_variance():
    from qtool.qat.workflow import normalized_distillation, sqnr_db

    gen = torch.Generator().manual_seed(0)
    scores, boxes = torch.rand(16, 4, generator=gen), 500 * torch.rand(16, 4, generator=gen)
    target = (scores + 0.1, boxes + 5.0)
    loss = normalized_distillation([float(scores.var()), float(boxes.var())])
    expected = 0.01 / float(scores.var()) + 25.0 / float(boxes.var())
    assert float(loss((scores, boxes), target)) == pytest.approx(expected, rel=1e-5)
    one = normalized_distillation([4.0])
    assert float(one(torch.zeros(3), torch.full((3,), 2.0))) == pytest.approx(1.0)
    x = np.array([3.0, 4.0])
    assert sqnr_db([x, x], [x + 0.5, x]) == pytest.approx((10 * math.log10(25 / 0.5) + 200) / 2)


def test_quantizer_parameters_get_their_own_relative_learning_rate(ptq):
    from qtool.qat.train import parameter_groups

    model = qat.to_torch(ptq["snpe"], "lsq")
    groups = parameter_groups(model, 1e-5, 1e-4, 1e-3)
    weights, quant = groups[0], groups[1:]
    assert weights["lr"] == 1e-5 and weights["weight_decay"] == 1e-4
    assert len(quant) == sum(1 for q in model.quantizers() for _ in q.parameters())
    for group in quant:
        (p,) = group["params"]
        assert group["lr"] == pytest.approx(1e-3 * float(p.detach().abs().mean()))
        assert group["weight_decay"] == 0.0
    quant_ids = {id(g["params"][0]) for g in quant}
    assert not quant_ids & {id(p) for p in weights["params"]}
    assert len(parameter_groups(model, 1e-3, 0.0, None)) == 1


def _mlp() -> onnx.ModelProto:
    """x (N, 8) -> MatMul(8x6) + b -> Relu -> Gemm(W (6, 4), transB=0) -> y."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    inits = [
        onnx.numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "w1"),
        onnx.numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b1"),
        onnx.numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "w2"),
        onnx.numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b2"),
    ]
    nodes = [
        h.make_node("MatMul", ["input", "w1"], ["m"], name="matmul"),
        h.make_node("Add", ["m", "b1"], ["a"], name="add"),
        h.make_node("Relu", ["a"], ["r"], name="relu"),
        h.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="gemm", transB=0),
    ]
    graph = h.make_graph(
        nodes, "mlp", [h.make_tensor_value_info("input", 1, ["N", 8])],
        [h.make_tensor_value_info("logits", 1, ["N", 4])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])


@pytest.mark.parametrize("backend", ["fbgemm", "tensorrt"])
def test_matmul_weight_and_gemm_layout_per_channel(backend):
    """A MatMul reads its quantized weight through a QuantWeight node; Gemm keeps (K, N)."""
    graph, _ = Pipeline(["cleanup", "fold_bn", "upgrade_opset"]).run(load(_mlp()))
    x = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    plan = build_plan(graph, backend)
    ranges = calibrate(graph, plan.activation_schemes(), [{"input": x}], progress=False)
    result = quantize(graph, backend, ranges, plan=plan)
    assert result.qparams["w1"].scale.shape == (6,)  # per channel: MatMul's last axis
    assert result.qparams["w2"].scale.shape == (4,)  # Gemm transB=0: axis 1
    model = qat.to_torch(result, "lsq")
    assert set(model.weights) == {"w1", "w2"} and set(model.layers) == {"gemm"}
    assert_consistent(model, result, x)
    with torch.no_grad():  # move the learned numbers: export must follow them
        for q in model.quantizers():
            q.scale.mul_(1.1)
        model.weights["w2"].weight.add_(0.05)
    assert_consistent(model, qat.export(model), x)


def test_a_float_layer_trains_and_is_written_back(graphs, digits):
    """A node the plan keeps float is a QuantConv/QuantLinear without quantizer; it trains."""
    x_train = digits[0]
    plan = build_plan(graphs[0], "academic", skip=["/head/head.2/Gemm"])
    calib = [{"input": x_train[i : i + 1]} for i in range(64)]
    ranges = calibrate(graphs[0], plan.activation_schemes(), calib, progress=False)
    result = quantize(graphs[0], "academic", ranges, plan=plan)
    model = qat.to_torch(result, "lsq")
    head = model.layers["/head/head.2/Gemm"]
    assert head.weight.quantizer is None
    before = head.weight.weight.detach().clone()
    qat.fit(model, train_loader(digits), F.cross_entropy, epochs=1, lr=1e-3)
    assert not torch.equal(before, head.weight.weight.detach())
    exported = qat.export(model)
    written = exported.float_graph.tensors()["head.2.weight"].values
    assert np.array_equal(written, head.weight.weight.detach().numpy())
    assert_consistent(model, exported, digits[2])


@pytest.mark.parametrize("backend", ["tensorrt", "acl", "fbgemm", "qnn"])
def test_import_and_export_every_other_backend(graphs, digits, backend):
    """Per-channel, narrow-range and asymmetric schemes survive import and export (W8A8)."""
    x_train = digits[0]
    plan = build_plan(graphs[0], backend)
    calib = [{"input": x_train[i : i + 1]} for i in range(64)]
    ranges = calibrate(graphs[0], plan.activation_schemes(), calib, progress=False)
    result = quantize(graphs[0], backend, ranges, plan=plan)
    model = qat.to_torch(result, "lsq+", bn_graph=graphs[1], bn_strategy=4)
    assert_consistent(model, result, digits[2])
    exported = qat.export(model)  # untrained: the same numbers come back
    for name, qp in result.qparams.items():
        assert np.array_equal(exported.qparams[name].scale, qp.scale), name
        assert np.array_equal(exported.qparams[name].zero_point, qp.zero_point), name
    assert_consistent(model, exported, digits[2])


def test_warmup_cosine_schedule_and_fit_errors(ptq):
    factor = qat.warmup_cosine(total_steps=10, warmup_steps=4)
    assert [factor(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(7) == pytest.approx(0.5)
    assert factor(10) == pytest.approx(0.0, abs=1e-12)
    model = qat.to_torch(ptq["academic"], "lsq")
    with pytest.raises(PlanError, match="unknown optimizer"):
        qat.fit(model, [(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))],
                F.cross_entropy, optimizer="lamb")
    with pytest.raises(PlanError, match="empty"):
        qat.fit(model, [], F.cross_entropy)


def test_cli_qat_command_trains_and_writes_the_backend_files(tmp_path):
    from click.testing import CliRunner
    from qtool.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "qat", str(MODEL), "--backend", "snpe", "--algorithm", "lsq",
        "--data", str(ROOT / "examples" / "digits_val.npz"), "--epochs", "1", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    assert "held-out SQNR (the last 50 training samples): ptq" in result.output
    files = sorted(p.name for p in out.iterdir())
    assert "model.encodings" in files and "model.onnx" in files
    encodings = json.loads((out / "model.encodings").read_text())
    offsets = [o for e in encodings["activation_encodings"] for o in e["offset"]]
    assert offsets and all(isinstance(o, int) for o in offsets)
