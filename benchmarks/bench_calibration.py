"""Calibration benchmark: qtool against onnxruntime.quantization on the same model and data.

For each model and data size, in one run, every variant runs in its own subprocess (so peak
RSS is that variant's own high-water mark, ``VmHWM``):

* ``float``: plain onnxruntime inference over the data (default session options);
* ``ort-minmax``, ``ort-entropy``, ``ort-percentile``: ``quantize_static`` with that method;
* ``qtool-minmax``, ``qtool-mse``, ``qtool-kld``, ``qtool-quantile``: plan (academic backend),
  ``qtool.calibration.calibrate``, ``qtool.qdq.quantize``; ``qtool-minmax-w2``: the same with
  ``workers=2``.

The whole job, as a user runs it (``--job``): the same samples written once to an ``.npy``
file that every job variant reads (memory-mapped, the same pages for all), the raw exported
model (BN kept) as the input:

* ``float-file``: plain onnxruntime inference over the file's samples;
* ``ort-job``: ``quantize_static`` MinMax, QDQ, per-channel weights, its defaults otherwise;
* ``cli-default``: ``qtool calibrate MODEL -b tensorrt --data FILE`` with the defaults
  (MinMax, ``--analysis summary`` on the held-out split, 64 MB memory budget);
* ``cli-auto``: the same with ``--method auto``; ``cli-full``: with ``--analysis full``.

Methods side by side (``--methods auto,mse,minmax``): the whole job with each ``--method``
(variants ``method-NAME``, plus any ``--cli-args``), the rounds interleaved (every method once
per round), and per round the time of the whole job and of its ``calibrate`` phase (the
phases' own timer, :func:`qtool.progress.phase`), with the ratios of the first method to each
other one (auto/mse, auto/minmax) and their medians over the rounds.

Both tools get the same prepared float graph (qtool's cleanup, fold_bn, upgrade_opset) and the
same samples, generated on the fly from a seed so the data itself costs no memory. The
schemes match: per-tensor symmetric int8 weights and activations, Q/DQ on the inputs of
Conv/Gemm/MatMul only (qtool's ``academic`` backend; for onnxruntime ``op_types_to_quantize``
Conv/Gemm/MatMul, symmetric activations and weights, no output quantization, float bias).
SQNR (dB) compares each quantized model's outputs with the float model's on held-out samples,
both in onnxruntime with graph optimizations off; "same graph" puts onnxruntime's calibrated
scales on qtool's graph (:func:`ort_ranges_on_qtool_graph`), isolating calibration from the
two tools' slightly different Q/DQ placement.

Usage:
    python benchmarks/bench_calibration.py --quick          # digits + resnet18, 64 images
    python benchmarks/bench_calibration.py                  # all models, 256 and 1024 images
    python benchmarks/bench_calibration.py --job --models resnet18 mobilenet_v2 resnet50 \
        ssdlite320 --sizes 64 256 1024                     # the whole CLI job vs quantize_static
    python benchmarks/bench_calibration.py --methods auto,mse,minmax --models resnet50 \
        --sizes 64 --repeat 3                              # auto's cost against one method
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
VARIANTS = ("float", "ort-minmax", "ort-entropy", "ort-percentile",
            "qtool-minmax", "qtool-mse", "qtool-kld", "qtool-quantile")
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]
JOB_VARIANTS = ("float-file", "ort-job", "cli-default", "cli-auto")
INPUT_SIZE = {"ssdlite320": 320}  # others: 224 (digits: its own 8x8)


# -- models and data --------------------------------------------------------------------


def export_torchvision(name: str, path: Path) -> None:
    """A torchvision architecture with seeded random weights and BN statistics, BN kept."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, 3, 224, 224),), buffer, dynamo=False, opset_version=13,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    path.write_bytes(buffer.getvalue())


def export_detector(path: Path) -> None:
    """torchvision's SSDLite 320 (MobileNet-V3 backbone) up to its raw head outputs.

    Seeded random weights; the box decoding and NMS stay outside the graph, as detectors
    are usually exported for deployment. Input 320x320.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    full = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None)

    class Raw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = full.backbone, full.head

        def forward(self, x):
            out = self.head(list(self.backbone(x).values()))
            return out["bbox_regression"], out["cls_logits"]

    model = Raw().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, 3, 320, 320),), buffer, dynamo=False, opset_version=13,
            input_names=["input"], output_names=["boxes", "scores"],
            dynamic_axes={"input": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
        )
    path.write_bytes(buffer.getvalue())


def prepare(source: Path, target: Path) -> None:
    """qtool's preparation (cleanup, BN folding, opset >= 13): the graph both tools get."""
    import qtool
    from qtool.io import save

    graph, _ = qtool.Pipeline(["cleanup", "fold_bn", "upgrade_opset"]).run(qtool.load(source))
    save(graph, target)


def samples(model: str, count: int, held_out: bool = False):
    """``count`` samples ``{"input": (1, C, H, W)}``, generated from seeds (nothing stored).

    digits: the real calibration set (256 images; beyond that, the same images with seeded
    noise), held out: the validation set. ImageNet-sized models: seeded random images.
    """
    if model == "digits":
        if held_out:
            with np.load(ROOT / "examples" / "digits_val.npz") as f:
                data = f["input"][:count]
            for i in range(len(data)):
                yield {"input": data[i : i + 1]}
            return
        with np.load(ROOT / "examples" / "digits_calib.npz") as f:
            data = f["input"]
        for i in range(count):
            x = data[i % len(data) : i % len(data) + 1]
            if i >= len(data):
                noise = np.random.default_rng(i).standard_normal(x.shape).astype(np.float32)
                x = x + 0.05 * noise
            yield {"input": x}
        return
    offset = 10_000_000 if held_out else 0
    side = INPUT_SIZE.get(model, 224) // 8
    for i in range(count):
        rng = np.random.default_rng(offset + i)
        # smooth-ish random images: low-resolution noise upsampled, then normalised
        low = rng.standard_normal((1, 3, side, side)).astype(np.float32)
        yield {"input": np.repeat(np.repeat(low, 8, axis=2), 8, axis=3)}


def write_samples(model: str, count: int, path: Path) -> None:
    """The samples of :func:`samples` as one ``.npy`` file (written row by row)."""
    first = next(samples(model, 1))["input"]
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                      shape=(count, *first.shape[1:]))
    for i, sample in enumerate(samples(model, count)):
        array[i] = sample["input"][0]
    array.flush()
    del array


def file_batches(path: Path, batch_size: int):
    """Batches read from the memory-mapped ``.npy`` file."""
    data = np.load(path, mmap_mode="r")
    for first in range(0, len(data), batch_size):
        yield {"input": np.ascontiguousarray(data[first : first + batch_size])}


def batched(stream, batch_size: int):
    pending = []
    for sample in stream:
        pending.append(sample["input"])
        if len(pending) == batch_size:
            yield {"input": np.concatenate(pending)}
            pending = []
    if pending:
        yield {"input": np.concatenate(pending)}


def is_job(variant: str) -> bool:
    """Whether a variant runs the whole job over the ``.npy`` file (``--job``, ``--methods``)."""
    return variant in JOB_VARIANTS or variant == "cli-full" or variant.startswith("method-")


# -- one variant (runs in a subprocess) --------------------------------------------------


def run_variant(variant: str, model: str, prepared: Path, count: int, batch_size: int,
                out: Path, cli_args: tuple[str, ...] = ()) -> dict:
    """Time one variant's work (imports done first: they cost the same to every variant)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from qtool.calibration import calibrate

    import qtool
    from qtool.io import save
    from qtool.planner import build_plan

    result: dict = {}
    start = time.perf_counter()
    if is_job(variant):
        result["phases_s"] = phases = {}
        with timed_phases(phases):
            run_job(variant, prepared, batch_size, out, cli_args)
    elif variant == "float":
        session = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"])
        for feeds in batched(samples(model, count), batch_size):
            session.run(None, feeds)
    elif variant.startswith("ort-"):

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = batched(samples(model, count), batch_size)

            def get_next(self):
                return next(self.batches, None)

        method = {"ort-minmax": CalibrationMethod.MinMax,
                  "ort-entropy": CalibrationMethod.Entropy,
                  "ort-percentile": CalibrationMethod.Percentile}[variant]
        quantize_static(
            str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS, per_channel=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=method,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "QuantizeBias": False,
                           "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS},
        )
    else:
        graph = qtool.load(prepared)
        plan = build_plan(graph, "academic")
        calibration_start = time.perf_counter()
        method, _, workers = variant.split("-", 1)[1].partition("-w")
        ranges = calibrate(graph, plan.activation_schemes(), samples(model, count),
                           method=method, batch_size=batch_size, progress=False,
                           workers=int(workers or 1))
        result["calibrate_s"] = time.perf_counter() - calibration_start
        save(qtool.quantize(graph, "academic", ranges, plan=plan).graph, out)
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def timed_phases(phases: dict):
    """Record each :func:`qtool.progress.phase`'s seconds into ``phases`` (even with ``-q``)."""
    import contextlib

    from qtool import progress

    real = progress.phase

    @contextlib.contextmanager
    def phase(name):
        start = time.perf_counter()
        with real(name):
            yield
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def patched():
        progress.phase = phase
        try:
            yield
        finally:
            progress.phase = real

    return patched()


def run_job(variant: str, paths: Path, batch_size: int, out: Path,
            cli_args: tuple[str, ...] = ()) -> None:
    """One whole-job variant; ``paths`` is ``MODEL::DATA`` (raw model, the .npy samples)."""
    import onnxruntime as ort

    model, data = (Path(p) for p in str(paths).split("::"))
    if variant == "float-file":
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        for feeds in file_batches(data, batch_size):
            session.run(None, feeds)
    elif variant == "ort-job":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = file_batches(data, batch_size)

            def get_next(self):
                return next(self.batches, None)

        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    else:
        from qtool.cli import main as cli

        if variant.startswith("method-"):
            extra = ["--method", variant.split("-", 1)[1]]
        else:
            extra = {"cli-default": [], "cli-auto": ["--method", "auto"],
                     "cli-full": ["--analysis", "full"]}[variant]
        cli(["calibrate", str(model), "-b", "tensorrt", "--data", str(data), "--batch-size",
             str(batch_size), "-o", str(out), "--force", "-q", *extra, *cli_args],
            standalone_mode=False)


def peak_rss_mb() -> float:
    """This process's own peak RSS (``VmHWM``).

    Not ``ru_maxrss``: Linux carries the parent's high-water mark across fork + exec into the
    child's ``ru_maxrss``, so every variant would read at least the parent's size (the
    parent holds torch and the exported models).
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spawn(variant, model, prepared, count, batch_size, out, mem_limit_gb, cli_args=()) -> dict:
    command = [sys.executable, __file__, "--one", variant, model, str(prepared), str(count),
               str(batch_size), str(out), str(mem_limit_gb), json.dumps(list(cli_args))]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


# -- SQNR ---------------------------------------------------------------------------------


def sqnr_db(float_model: Path, quant_model: Path, model: str, count: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    f = ort.InferenceSession(str(float_model), options, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(quant_model), options, providers=["CPUExecutionProvider"])
    signal = noise = 0.0
    for feeds in batched(samples(model, count, held_out=True), 16):
        for a, b in zip(f.run(None, feeds), q.run(None, feeds), strict=True):
            a = a.astype(np.float64)
            signal += float(np.sum(a * a))
            noise += float(np.sum((a - b) ** 2))
    return 10 * np.log10(signal / max(noise, 1e-30))


def ort_ranges_on_qtool_graph(prepared: Path, ort_model: Path, out: Path) -> Path:
    """onnxruntime's calibrated scales applied to qtool's academic graph (same placement).

    The tools place Q/DQ slightly differently (onnxruntime routes every consumer of a
    quantized tensor through its DequantizeLinear, e.g. a residual Add; the academic backend
    only the Conv/Gemm/MatMul edges), so comparing their files mixes placement with
    calibration. Here onnxruntime's activation scales become ranges ``(-127 s, 127 s)`` for
    qtool's own plan: the SQNR of that graph isolates the calibration method.
    """
    import onnx

    import qtool
    from qtool.io import save
    from qtool.planner import build_plan

    model = onnx.load(str(ort_model))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    scales = {n.input[0]: float(initializers[n.input[1]]) for n in model.graph.node
              if n.op_type == "QuantizeLinear" and n.input[1] in initializers}
    graph = qtool.load(prepared)
    plan = build_plan(graph, "academic")
    ranges = {name: (-127 * scales[name], 127 * scales[name])
              for name in plan.activation_schemes()}
    save(qtool.quantize(graph, "academic", ranges, plan=plan).graph, out)
    return out


# -- the run ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="digits + resnet18, 64 images")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--sizes", nargs="*", type=int, default=None)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=64, help="samples for SQNR")
    parser.add_argument("--mem-limit-gb", type=float, default=8.0,
                        help="address-space cap per variant (protects a shared machine)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--job", action="store_true",
                        help="the whole CLI job vs quantize_static (JOB_VARIANTS)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant")
    parser.add_argument("--methods", default=None,
                        help="comma-separated --method values run side by side as whole jobs "
                             "(e.g. auto,mse,minmax): ratios of the first to each other one")
    parser.add_argument("--cli-args", default="",
                        help="extra flags for the CLI job variants, e.g. '--no-bias-correction'")
    args = parser.parse_args()
    cli_args = tuple(args.cli_args.split())
    methods = [m for m in (args.methods or "").split(",") if m]
    if methods:
        args.job, args.variants = True, [f"method-{m}" for m in methods]
    elif args.job and args.variants == list(VARIANTS):
        args.variants = list(JOB_VARIANTS)
    models = args.models or (["digits", "resnet18"] if args.quick
                             else ["digits", "resnet18", "mobilenet_v2"])
    sizes = args.sizes or ([64] if args.quick else [256, 1024])

    results = []
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qtool-bench-") as tmp:
        tmp = Path(tmp)
        for model in models:
            raw = tmp / f"{model}.onnx"
            if model == "digits":
                raw.write_bytes(DIGITS.read_bytes())
            elif model == "ssdlite320":
                export_detector(raw)
            else:
                export_torchvision(model, raw)
            prepared = tmp / f"{model}.prepared.onnx"
            prepare(raw, prepared)
            held_out = 500 if model == "digits" else args.held_out  # digits: the val set
            for count in sizes:
                data = tmp / f"{model}-{count}.npy"
                if args.job:
                    write_samples(model, count, data)
                runs = itertools.product(args.variants, range(args.repeat))
                if methods:  # rounds: every method once per round, back to back
                    runs = ((v, r) for r in range(args.repeat) for v in args.variants)
                for variant, round_ in runs:
                    job = is_job(variant)
                    out = tmp / f"{model}-{count}-{variant}" if job \
                        else tmp / f"{model}-{count}-{variant}.onnx"
                    row = {"model": model, "images": count, "variant": variant, "round": round_}
                    row.update(spawn(variant, model, f"{raw}::{data}" if job else prepared,
                                     count, args.batch_size, out, args.mem_limit_gb, cli_args))
                    if job:
                        results.append(row)
                        print(format_row(row, results), flush=True)
                        continue
                    if variant != "float" and "error" not in row:
                        row["sqnr_db"] = sqnr_db(prepared, out, model, held_out)
                        same = out
                        if variant.startswith("ort-"):
                            same = ort_ranges_on_qtool_graph(prepared, out, tmp / "same.onnx")
                        row["sqnr_same_graph_db"] = sqnr_db(prepared, same, model, held_out)
                    results.append(row)
                    print(format_row(row, results), flush=True)
                data.unlink(missing_ok=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(method_ratios(results, methods) if methods else markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def baseline(row: dict, results: list[dict], variant: str | None = None) -> dict | None:
    """The first ``variant`` row of the same model and size (default: its float run)."""
    if variant is None:
        variant = "float-file" if is_job(row["variant"]) else "float"
    return next((r for r in results if r["model"] == row["model"] and r["images"] ==
                 row["images"] and r["variant"] == variant and "wall_s" in r), None)


def format_row(row: dict, results: list[dict]) -> str:
    if "error" in row:
        return f"{row['model']:>12} {row['images']:>5} {row['variant']:<15} {row['error']}"
    base = baseline(row, results)
    ratio = (f" ({row['wall_s'] / base['wall_s']:.2f}x time, "
             f"{row['peak_rss_mb'] / base['peak_rss_mb']:.2f}x RSS)") if base else ""
    sqnr = (f" SQNR {row['sqnr_db']:.2f} dB (same graph {row['sqnr_same_graph_db']:.2f})"
            if "sqnr_db" in row else "")
    return (f"{row['model']:>12} {row['images']:>5} {row['variant']:<15} "
            f"{row['wall_s']:7.2f} s {row['peak_rss_mb']:8.0f} MB{ratio}{sqnr}")


def markdown(results: list[dict]) -> str:
    if any(r["variant"] in JOB_VARIANTS for r in results):
        return job_markdown(results)
    lines = ["| model | images | variant | wall s | x float | peak RSS MB | x float | "
             "calibrate s | SQNR dB | SQNR dB, same graph |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        base = baseline(row, results)
        if "error" in row:
            lines.append(f"| {row['model']} | {row['images']} | {row['variant']} | "
                         f"failed: {row['error']} | | | | | | |")
            continue
        t = f"{row['wall_s'] / base['wall_s']:.2f}" if base else ""
        m = f"{row['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else ""
        c = f"{row['calibrate_s']:.2f}" if "calibrate_s" in row else ""
        s = f"{row['sqnr_db']:.2f}" if "sqnr_db" in row else ""
        g = f"{row['sqnr_same_graph_db']:.2f}" if "sqnr_same_graph_db" in row else ""
        lines.append(f"| {row['model']} | {row['images']} | {row['variant']} | "
                     f"{row['wall_s']:.2f} | {t} | {row['peak_rss_mb']:.0f} | {m} | {c} | {s} "
                     f"| {g} |")
    return "\n".join(lines)


def method_ratios(results: list[dict], methods: list[str]) -> str:
    """Per round: job and calibrate-phase seconds of each method, first method / each other."""
    first, others = methods[0], methods[1:]
    head = ["model", "images", "round"]
    for m in methods:
        head += [f"{m} job s", f"{m} calibrate s"]
    for m in others:
        head += [f"{first}/{m} job", f"{first}/{m} calibrate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios: dict[tuple, list[float]] = {}
    keys = dict.fromkeys((r["model"], r["images"], r["round"]) for r in results)
    for model, images, round_ in keys:
        rows = {r["variant"][len("method-"):]: r for r in results
                if (r["model"], r["images"], r["round"]) == (model, images, round_)}
        if any(m not in rows or "error" in rows[m] for m in methods):
            lines.append(f"| {model} | {images} | {round_} | failed |")
            continue
        cells = [model, str(images), str(round_)]
        times = {m: (rows[m]["wall_s"], rows[m]["phases_s"].get("calibrate", float("nan")))
                 for m in methods}
        for m in methods:
            cells += [f"{times[m][0]:.2f}", f"{times[m][1]:.2f}"]
        for m in others:
            for i, part in enumerate(("job", "calibrate")):
                value = times[first][i] / times[m][i]
                ratios.setdefault((model, images, m, part), []).append(value)
                cells.append(f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for (model, images, m, part), values in ratios.items():
        lines.append(f"{model} {images} images: {first}/{m} {part} median "
                     f"{float(np.median(values)):.2f} over {len(values)} rounds "
                     f"({', '.join(f'{v:.2f}' for v in values)})")
    return "\n".join(lines)


def job_markdown(results: list[dict]) -> str:
    """The whole-job table: ratios to float inference and to quantize_static's job."""
    lines = ["| model | images | variant | wall s | x float | x ort-job | peak RSS MB | x float "
             "| x ort-job |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['images']} | {row['variant']} | "
                         f"failed: {row['error']} | | | | | |")
            continue
        cells = []
        for ref in (baseline(row, results), baseline(row, results, "ort-job")):
            cells.append((f"{row['wall_s'] / ref['wall_s']:.2f}" if ref else "",
                          f"{row['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ref else ""))
        lines.append(f"| {row['model']} | {row['images']} | {row['variant']} | "
                     f"{row['wall_s']:.2f} | {cells[0][0]} | {cells[1][0]} | "
                     f"{row['peak_rss_mb']:.0f} | {cells[0][1]} | {cells[1][1]} |")
    return "\n".join(lines)


def one() -> None:
    variant, model, prepared, count, batch_size, out, limit, cli_args = sys.argv[2:10]
    cap = int(float(limit) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.path.insert(0, str(ROOT))
    result = run_variant(variant, model, Path(prepared), int(count), int(batch_size), Path(out),
                         tuple(json.loads(cli_args)))
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one()
    else:
        main()
