"""QAT on the digits CNN: float, PTQ, PTQ + BN re-calibration and QAT per algorithm.

    python benchmarks/qat_digits.py            # prints the QAT tables of benchmarks/README.md

Setup (the same as tests/test_qat.py): examples/digits_cnn.onnx, sklearn's digits split of
examples/train_digits.py (1297 train / 500 validation), graph at opset 21 so 4-bit tensors
are INT4 in the QDQ graph, minmax calibration on 256 training images, QAT from that PTQ
model with BN kept (strategy 1 unless stated), Adam, lr 3e-3 with one warm-up epoch and
cosine decay, batch 64, 10 epochs, seed 0, one CPU thread. Accuracies are top-1 on the 500
validation images of the exported QDQ graph in onnxruntime (optimizations off).
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


if __name__ == "__main__":
    main()
