"""Weight-only int4 benchmark: qtool's algorithms against onnxruntime's MatMulNBitsQuantizer.

On the same model, calibration data and held-out data, every variant writes a 4-bit blockwise
model that onnxruntime runs; the table gives the SQNR of the model's output against float on
the held-out data (onnxruntime, default optimizations), the file size against float, and the
wall time of the quantization.

* ``qtool-rtn|hqq|gptq|awq``: ``qtool.weight_only.run.quantize_weights`` (backend
  onnxruntime, MatMulNBits, asymmetric unless ``-sym``), i.e. ``qtool calibrate -b onnxruntime
  --weight-only --weight-algorithm ALG``;
* ``ort-rtn-sym``/``ort-rtn-asym``: ``MatMulNBitsQuantizer`` with its default RTN config
  (``DefaultWeightOnlyQuantConfig``), symmetric or not; ``ort-hqq``: ``HQQWeightOnlyQuantConfig``;
  ``ort-gptq``: ``GPTQWeightOnlyQuantConfig`` (needs neural-compressor's code that onnxruntime
  bundles; reported as failed where it does not run).

Models:

* ``mlp``: the fitted MLP block of ``tests/mlp_block.py`` (256 -> 512 -> 256, GELU, input
  channel scales spread 0.1 .. 10); 2048 calibration rows, 512 held-out rows.
* ``bert``: a *random-init* ``transformers`` BertModel (hidden 256, 4 layers, 4 heads, FFN
  1024), exported with ``torch.onnx.export(dynamo=False)``, opset 17: for the mechanics only
  (random weights have none of the outliers of trained ones); random token ids, 128
  calibration and 32 held-out sequences of 32 tokens; output ``last_hidden_state``.

    python benchmarks/bench_weight_only.py                 # both models, block 32 and 128
    python benchmarks/bench_weight_only.py --models mlp --blocks 32

``onnx-ir`` must be importable for onnxruntime's quantizer (``pip install onnx-ir``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def mlp_model(folder: Path):
    from mlp_block import inputs, mlp_onnx

    path = folder / "mlp.onnx"
    path.write_bytes(mlp_onnx())
    calib, held = {"x": inputs(2048, seed=10)}, {"x": inputs(512, seed=11)}
    return path, calib, held


def bert_model(folder: Path):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, vocab_size=1000, max_position_embeddings=64)
    bert = BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids,
                             attention_mask=attention_mask).last_hidden_state

    path = folder / "bert.onnx"
    ids = torch.randint(0, 1000, (2, 32))
    torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids)), str(path),
                      input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "b"}, "attention_mask": {0: "b"}})
    rng = np.random.default_rng(0)

    def sample(rows):
        ids = rng.integers(0, 1000, (rows, 32)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return path, sample(128), sample(32)


def run(model, feeds):
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def sqnr(ref, out) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2)
                               / np.sum((ref.astype(np.float64) - out) ** 2)))


def qtool_variant(path, calib_file, algorithm, block, symmetric):
    from qtool.weight_only.run import WeightOnlyOptions, quantize_weights

    options = WeightOnlyOptions(
        bits=4, block_size=block, algorithm=algorithm, data=calib_file, eval_data=calib_file,
        batch_size=32, analysis="none",
        backend_options=("symmetric=true",) if symmetric else ())
    files, _ = quantize_weights(path, "onnxruntime", options)
    return files["model.onnx"]


def ort_variant(path, calib, algorithm, block, symmetric):
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            rows = len(next(iter(calib.values())))
            self.items = iter([{k: v[i:i + 8] for k, v in calib.items()}
                               for i in range(0, rows, 8)])

        def get_next(self):
            return next(self.items, None)

    config = {
        "rtn": lambda: DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric),
        "hqq": lambda: HQQWeightOnlyQuantConfig(block_size=block),
        "gptq": lambda: GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader()),
    }[algorithm]()
    quantizer = MatMulNBitsQuantizer(onnx.load(path), block_size=block, is_symmetric=symmetric,
                                     algo_config=config)
    with contextlib.redirect_stdout(sys.stderr):  # its GPTQ prints progress bars
        quantizer.process()
    return quantizer.model.model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "bert"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[32, 128])
    args = parser.parse_args()
    logging.disable(logging.INFO)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models:
            path, calib, held = {"mlp": mlp_model, "bert": bert_model}[name](folder)
            calib_file = folder / f"{name}_calib.npz"
            np.savez(calib_file, **calib)
            ref = run(path, held)
            size = path.stat().st_size
            for block in args.blocks:
                variants = [(f"qtool-{a}", qtool_variant, a, False)
                            for a in ("rtn", "hqq", "gptq", "awq")]
                variants += [("qtool-awq-sym", qtool_variant, "awq", True),
                             ("ort-rtn-sym", ort_variant, "rtn", True),
                             ("ort-rtn-asym", ort_variant, "rtn", False),
                             ("ort-hqq", ort_variant, "hqq", False),
                             ("ort-gptq", ort_variant, "gptq", False)]
                for label, make, algorithm, symmetric in variants:
                    start = time.perf_counter()
                    try:
                        source = calib_file if make is qtool_variant else calib
                        model = make(path, source, algorithm, block, symmetric)
                    except Exception as exc:  # a variant that does not run here
                        rows.append((name, block, label, None, None, None,
                                     f"{type(exc).__name__}: {str(exc)[:60]}"))
                        continue
                    seconds = time.perf_counter() - start
                    rows.append((name, block, label, sqnr(ref, run(model, held)),
                                 len(model) / size, seconds, ""))
                    print(*rows[-1][:3], f"{rows[-1][3]:.2f} dB", file=sys.stderr)
    print("| model | block | variant | held-out SQNR (dB) | size / float | time (s) | note |")
    print("|---|---|---|---|---|---|---|")
    for name, block, label, db, ratio, seconds, note in rows:
        cells = [f"{db:.2f}" if db is not None else "-",
                 f"{ratio:.3f}" if ratio is not None else "-",
                 f"{seconds:.1f}" if seconds is not None else "-"]
        print(f"| {name} | {block} | {label} | {' | '.join(cells)} | {note} |")


if __name__ == "__main__":
    main()
