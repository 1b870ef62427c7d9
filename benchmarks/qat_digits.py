"""QAT on the digits CNN: float, PTQ, PTQ + BN re-calibration and QAT per algorithm.

    python benchmarks/qat_digits.py            # prints the QAT tables of benchmarks/README.md
    python benchmarks/qat_digits.py adaround safe   # only some tables (qat, adaround, safe)

Setup (the same as tests/test_qat.py): examples/digits_cnn.onnx, sklearn's digits split of
examples/train_digits.py (1297 train / 500 validation), graph at opset 21 so 4-bit tensors
are INT4 in the QDQ graph, minmax calibration on 256 training images, QAT from that PTQ
model with BN kept (strategy 1 unless stated), Adam, lr 3e-3 with one warm-up epoch and
cosine decay, batch 64, 10 epochs, seed 0, one CPU thread. Accuracies are top-1 on the 500
validation images of the exported QDQ graph in onnxruntime (optimizations off).

``adaround``: W4A8 per backend, round-to-nearest against learned rounding
(:func:`qtool.qat.adaround`, default options: 200 steps per layer, the 256 calibration
images). ``safe``: ``qtool qat`` (:func:`qtool.qat.workflow.qat_model`) at its defaults from
the PTQ start, distilled from the float model without labels, held-out SQNR and top-1 before
and after; and the same with an absurd learning rate, where the PTQ model must come back.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

CONFIGS = (("academic", 4, 4), ("tvm", 4, 4), ("snpe", 4, 8))
ALGORITHMS = ("lsq", "lsq+", "pact", "dorefa", "dsq")
EPOCHS, LR = 10, 3e-3


def main() -> None:
    from qtool.calibration import calibrate
    from train_digits import load_digits_split

    import qtool.qat as qat
    from qtool.io import load
    from qtool.pipeline import Pipeline
    from qtool.planner import build_plan
    from qtool.qat.workflow import accuracy
    from qtool.qdq import quantize

    sections = set(sys.argv[1:]) or {"qat", "adaround", "safe"}
    torch.set_num_threads(1)
    x_train, y_train, x_val, y_val = load_digits_split()
    model = ROOT / "examples" / "digits_cnn.onnx"
    folded, _ = Pipeline(["cleanup", "fold_bn", ("upgrade_opset", {"target": 21})]).run(
        load(model))
    kept, _ = Pipeline(["cleanup", ("upgrade_opset", {"target": 21})]).run(load(model))
    feeds = {"input": x_val}
    float_acc = accuracy(folded, feeds, y_val)

    def loader():
        data = torch.utils.data.TensorDataset(torch.from_numpy(x_train),
                                              torch.from_numpy(y_train))
        return torch.utils.data.DataLoader(data, batch_size=64, shuffle=True,
                                           generator=torch.Generator().manual_seed(0))

    def ptq(backend, w, a):
        plan = build_plan(folded, backend, weight_bits=w, act_bits=a)
        calib = [{"input": x_train[i : i + 1]} for i in range(256)]
        ranges = calibrate(folded, plan.activation_schemes(), calib, progress=False)
        return quantize(folded, backend, ranges, plan=plan)

    def train(result, algorithm, strategy=1):
        torch.manual_seed(0)
        m = qat.to_torch(result, algorithm, bn_graph=kept, bn_strategy=strategy)
        qat.fit(m, loader(), F.cross_entropy, epochs=EPOCHS, lr=LR)
        return accuracy(qat.export(m).graph, feeds, y_val)

    def pct(x):
        return f"{100 * x:.1f}"

    started = time.time()
    if "adaround" in sections:
        adaround_table(folded, ptq, feeds, y_val, float_acc, pct)
    if "safe" in sections:
        safe_qat_table(model, x_train, x_val, y_val)
    if "qat" not in sections:
        print(f"\n({time.time() - started:.0f} s)", file=sys.stderr)
        return
    header = "| backend | W/A | float | PTQ | PTQ + BN calib | " + " | ".join(
        f"QAT {a}" for a in ALGORITHMS) + " |"
    print(header)
    print("|" + "---|" * (5 + len(ALGORITHMS)))
    results = {}
    for backend, w, a in CONFIGS:
        base = ptq(backend, w, a)
        recal = qat.to_torch(base, "lsq", bn_graph=kept, bn_strategy=1)
        qat.recalibrate_bn(recal, [torch.from_numpy(x_train[:256])])
        recal_acc = accuracy(qat.export(recal).graph, feeds, y_val)
        row = [train(base, alg) for alg in ALGORITHMS]
        results[backend] = base
        ptq_acc = accuracy(base.graph, feeds, y_val)
        print(f"| {backend} | W{w}A{a} | {pct(float_acc)} | {pct(ptq_acc)} | {pct(recal_acc)} | "
              + " | ".join(pct(x) for x in row) + " |")
    print()
    print("| BN folding strategy (academic W4A4) | " + " | ".join(
        f"{s}" for s in range(5)) + " |")
    print("|---|" + "---|" * 5)
    for alg in ("lsq", "pact"):
        row = [train(results["academic"], alg, s) for s in range(5)]
        print(f"| QAT {alg} | " + " | ".join(pct(x) for x in row) + " |")
    print(f"\n({time.time() - started:.0f} s)", file=sys.stderr)


def adaround_table(folded, ptq, feeds, y_val, float_acc, pct) -> None:
    """W4A8 top-1: nearest against AdaRound, per backend, and AdaRound's time."""
    from qtool.qat import adaround
    from qtool.qat.workflow import accuracy

    print("| backend | W/A | float | nearest | AdaRound | AdaRound time (s) |")
    print("|---|---|---|---|---|---|")
    calib = [{"input": x} for x in _calibration_images()]
    for backend in ("tensorrt", "acl", "snpe", "academic", "tvm"):
        base = ptq(backend, 4, 8)
        began = time.time()
        learned, _ = adaround(base, calib)
        seconds = time.time() - began
        print(f"| {backend} | W4A8 | {pct(float_acc)} | {pct(accuracy(base.graph, feeds, y_val))} "
              f"| {pct(accuracy(learned.graph, feeds, y_val))} | {seconds:.1f} |")
    print()


def _calibration_images():
    from train_digits import load_digits_split

    x_train = load_digits_split()[0]
    return [x_train[i : i + 1] for i in range(256)]


def safe_qat_table(model, x_train, x_val, y_val) -> None:
    """qtool qat at its defaults (distillation) and with an absurd learning rate."""
    import tempfile

    import numpy as np

    from qtool.qat import QatOptions
    from qtool.qat.workflow import qat_model

    print("| run (distillation, no labels) | W/A | held-out SQNR PTQ -> exported (dB) | "
          "top-1 PTQ -> exported | best epoch | improved |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        train, val = Path(tmp) / "train.npz", Path(tmp) / "val.npz"
        np.savez(train, input=x_train)
        np.savez(val, input=x_val, labels=y_val)
        for backend, w, a, label, extra in (
            ("snpe", 4, 8, "defaults (lr 1e-5, quant-lr 1e-3)", {}),
            ("tvm", 4, 4, "defaults (lr 1e-5, quant-lr 1e-3)", {}),
            ("snpe", 4, 8, "absurd (lr 10, quant-lr 10)", {"lr": 10.0, "quant_lr": 10.0}),
        ):
            options = QatOptions(epochs=5, weight_bits=w, act_bits=a, eval_data=val, **extra)
            _, report = qat_model(model, backend, train, options)
            held = report["held_out"]
            print(f"| {backend}, {label} | W{w}A{a} | {held['ptq']['sqnr_db']:.2f} -> "
                  f"{held['qat']['sqnr_db']:.2f} | {100 * held['ptq']['accuracy']:.1f} -> "
                  f"{100 * held['qat']['accuracy']:.1f} | {held['best_epoch']} | "
                  f"{'yes' if held['improved'] else 'no: PTQ written'} |")
    print()


if __name__ == "__main__":
    main()
