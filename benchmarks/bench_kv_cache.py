"""A trained tiny Llama with a KV cache through ``qtool calibrate`` on every backend.

The decoder (2 layers, 4 heads, 2 KV heads, hidden 32, vocabulary 16) is trained for a few
seconds on arithmetic sequences ``a + i * d mod 16`` (tests/kv_decoders.py) and exported with
``torch.onnx.export(dynamo=False)``: ``past_key_values.N.key/value`` in, ``present.N.*`` out.
qtool calibrates it on 32 token sequences (it records the cache itself); 64 held-out
sequences are then generated step by step in onnxruntime (4 tokens at once, then one per step),
the quantized model reading the cache it wrote. Printed per backend: the float and quantized
next-token accuracy (from the third token, where the next token is certain), their argmax
agreement, the logits' SQNR with the model's own cache and with the float cache fed in (the
cache's share of the error), and what the plan says of the cache.

Random or tiny trained weights prove the mechanics, not a real LLM's fidelity: no small
pretrained decoder ships inside a PyPI wheel that we found.

    python benchmarks/bench_kv_cache.py --work /tmp/qtool-kv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

BACKENDS = ("onnxruntime", "tensorrt", "qnn", "snpe", "openvino", "fbgemm", "acl", "tvm",
            "academic")


def sqnr(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((other - reference) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qtool-kv"))
    parser.add_argument("--backends", nargs="*", default=BACKENDS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from kv_decoders import Decoder, arithmetic_sequences, export_decoder, trained_llama

    from qtool.options import CalibrateOptions
    from qtool.workflow import quantize_model

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "llama.onnx"
    export_decoder(trained_llama(), model)
    calib, evaluation = args.work / "calib.npz", args.work / "eval.npz"
    np.savez(calib, input_ids=arithmetic_sequences(32, 12, seed=11))
    np.savez(evaluation, input_ids=arithmetic_sequences(8, 12, seed=12))
    held_out = arithmetic_sequences(64, 12, seed=13)
    target = held_out[:, 2:]
    float_model = Decoder(model)
    float_logits = float_model.stepwise_logits(held_out, 4)[:, 1:-1]
    print(f"{'backend':12s} {'float acc':>9s} {'quant acc':>9s} {'agree':>6s} "
          f"{'SQNR own cache':>14s} {'SQNR float cache':>16s}  KV cache notes")
    for backend in args.backends:
        files, report = quantize_model(str(model), backend, CalibrateOptions(
            data=str(calib), eval_data=str(evaluation), analysis="none", kernel_check=False))
        path = args.work / f"{backend}.qdq.onnx"
        path.write_bytes(files["model.qdq.onnx"])
        quantized = Decoder(path)
        own = quantized.stepwise_logits(held_out, 4)[:, 1:-1]
        fed = quantized.stepwise_logits(held_out, 4, cache_from=float_model)[:, 1:-1]
        notes = [n for n in report["plan"].get("notes", {}).values() if n.startswith("KV")]
        kinds = {"quantized": sum(": quantized," in n for n in notes),
                 "inside": sum("quantized inside" in n for n in notes),
                 "float": sum("kept float" in n for n in notes)}
        print(f"{backend:12s} {(float_logits.argmax(-1) == target).mean():9.3f} "
              f"{(own.argmax(-1) == target).mean():9.3f} "
              f"{(own.argmax(-1) == float_logits.argmax(-1)).mean():6.3f} "
              f"{sqnr(float_logits, own):14.2f} {sqnr(float_logits, fed):16.2f}  {kinds}",
              flush=True)


if __name__ == "__main__":
    main()
