"""AIMET check: qtool's SNPE/QNN encodings loaded into Qualcomm's AIMET-ONNX QuantSim.

AIMET-ONNX (``pip install aimet-onnx``) reads the encodings format and is the nearest thing to
a Qualcomm device that runs here. For ``snpe`` and ``qnn`` at 8 and 16-bit activations, this
script

1. runs ``qtool calibrate`` on the digits example (``examples/``), writing ``model.onnx``,
   ``model.encodings`` and ``model.qdq.onnx``;
2. builds an AIMET ``QuantizationSimModel`` of ``model.onnx`` configured as the backend
   (AIMET's default config; weights asymmetric per tensor for snpe, symmetric per channel
   for qnn; ``activation_type`` int8 or int16) and loads the encodings with
   ``load_encodings_to_sim(sim, path, strict=True)``: AIMET refuses the file if a quantizer
   it enables has no encoding, an encoding names a tensor it does not quantize, or the
   settings (bit width, symmetry, per channel) differ;
3. runs AIMET's simulation and onnxruntime on ``model.qdq.onnx`` (graph optimizations off)
   on the held-out digits and compares them: largest absolute difference, share of equal
   outputs, SQNR of each against the float model, top-1 agreement.

Not part of CI: aimet-onnx pulls torch. Run it from a separate venv, with qtool taken from
this checkout (the script runs ``qtool`` with the repository on ``PYTHONPATH``)::

    python3 -m venv /work/venvs/aimet
    /work/venvs/aimet/bin/pip install torch==2.14.1 torchvision==0.29.1 aimet-onnx
    /work/venvs/aimet/bin/python benchmarks/aimet_check.py --qtool /path/to/venv/bin/qtool

(torch pinned to the release on this machine's disk: unpinned, pip downloads GBs of CUDA.
``--qtool`` may be a two-line wrapper running ``python -m qtool.cli "$@"`` of a checkout.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"
VAL = ROOT / "examples" / "digits_val.npz"

#: AIMET config per backend: changes to AIMET's default config (defaults section).
PARAM_CONFIG = {
    "snpe": {"is_symmetric": "False", "per_channel_quantization": "False"},
    "qnn": {"is_symmetric": "True", "per_channel_quantization": "True"},
}


def run_qtool(qtool: str, backend: str, bits: int, out: Path) -> None:
    """``qtool calibrate`` of the digits model for one backend and width."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [qtool, "calibrate", str(MODEL), "-b", backend, "--act-bits", str(bits),
               "--data", str(CALIB), "-o", str(out)]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def aimet_config(backend: str, folder: Path) -> str:
    """AIMET's default QuantSim config with the backend's weight rules, as a file."""
    from aimet_onnx.common.quantsim_config import quantsim_config

    default = Path(quantsim_config.__file__).with_name("default_config.json")
    config = json.loads(default.read_text())
    settings = PARAM_CONFIG[backend]
    config["defaults"]["params"]["is_symmetric"] = settings["is_symmetric"]
    config["defaults"]["per_channel_quantization"] = settings["per_channel_quantization"]
    path = folder / f"aimet_{backend}.json"
    path.write_text(json.dumps(config))
    return str(path)


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's first output in onnxruntime, graph optimizations off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = float(((reference - test) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((reference**2).sum()) / noise)


def check(backend: str, bits: int, folder: Path, config: str, x: np.ndarray) -> dict:
    """Load one output folder into AIMET strictly and compare with its model.qdq.onnx."""
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel, load_encodings_to_sim

    sim = QuantizationSimModel(
        onnx.load(folder / "model.onnx"), param_type="int8", activation_type=f"int{bits}",
        quant_scheme="min_max", config_file=config,
    )
    row = {"backend": backend, "bits": bits}
    try:
        load_encodings_to_sim(sim, str(folder / "model.encodings"), strict=True)
        row["strict"] = "loaded"
    except Exception as exc:  # AIMET raises AssertionError/RuntimeError with the mismatch
        row["strict"] = f"refused: {str(exc).splitlines()[0][:200]}"
        load_encodings_to_sim(sim, str(folder / "model.encodings"), strict=False)
    aimet = sim.session.run(None, {"input": x})[0]
    qdq = ort_run(folder / "model.qdq.onnx", x)
    reference = ort_run(folder / "model.onnx", x)
    row.update(
        max_abs_diff=float(np.abs(aimet - qdq).max()),
        equal_share=float((aimet == qdq).mean()),
        sqnr_aimet_db=sqnr_db(reference, aimet),
        sqnr_qdq_db=sqnr_db(reference, qdq),
        top1_agree=float((aimet.argmax(1) == qdq.argmax(1)).mean()),
    )
    return row


def main() -> int:
    """Run the check for snpe and qnn at 8 and 16 bits and print a table (and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qtool", default="qtool", help="the qtool console script")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    x = np.load(VAL)["input"].astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for backend in ("snpe", "qnn"):
            config = aimet_config(backend, tmp)
            for bits in (8, 16):
                out = tmp / f"{backend}_{bits}"
                run_qtool(args.qtool, backend, bits, out)
                rows.append(check(backend, bits, out, config, x))
    header = "backend bits  strict   max|aimet-qdq|  equal   SQNR aimet  SQNR qdq  top-1"
    print(header)
    for r in rows:
        print(f"{r['backend']:<7} {r['bits']:>4}  {r['strict'][:7]:<7}  {r['max_abs_diff']:>14.3g}"
              f"  {r['equal_share']:6.1%}  {r['sqnr_aimet_db']:9.2f}  {r['sqnr_qdq_db']:8.2f}"
              f"  {r['top1_agree']:6.1%}")
        if r["strict"] != "loaded":
            print(f"    {r['strict']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["strict"] == "loaded" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
