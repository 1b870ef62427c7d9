"""The defaults' cost: ``qtool calibrate`` against ``quantize_static``, side by side (issue #22).

One command, every row of the README's table "The defaults' cost":

    python benchmarks/bench_cost.py                       # both models, 256 samples, README
    python benchmarks/bench_cost.py --models resnet18 --samples 64 --no-readme
    python benchmarks/bench_cost.py --variants qtool,ort   # some rows again (merged)
    python benchmarks/bench_cost.py --table-only           # README table from the results

Results go to ``<cache>/cost/results.json``, merged run after run (a row per model,
size and variant).

Models: the largest detector of the wheel-model set (``ddddocr_det``: YOLOX-style text
detector from the ``ddddocr`` wheel, 416x416, fixed batch 1; ``wheel_models.py setup`` puts
it in the cache), fed image-like inputs made here (crops of the two photos scikit-learn ships,
0-255 as ddddocr feeds it), and torchvision's ResNet-18 with seeded random weights (fine for
time: the cost does not depend on the weights' values), smooth random 224x224 images.

The samples are written once to an ``.npy`` file that every variant reads memory-mapped.
Each variant runs in its own process (wall time measured around it, Python's start and
imports included for both tools; peak RSS is that process's ``VmHWM``):

* ``ort``: ``onnxruntime.quantization.quantize_static``, MinMax, QDQ, per-channel weights
  (its defaults otherwise), the same batches;
* ``qtool``: ``qtool calibrate MODEL -b tensorrt --data FILE`` at every default;
* ``qtool --no-bias-correction``, ``qtool --analysis none``, ``qtool --bias-correction fast``.

For qtool the phases' own times (:func:`qtool.progress.phase`, plus the kernel check, which
runs outside any phase) are recorded, so the table says where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
CACHE = Path(os.environ.get("QTOOL_BENCH_CACHE", "/work/cache"))
README = ROOT / "benchmarks" / "README.md"
SECTION = "## The defaults' cost (issue #22)"
VARIANTS = {
    "ort": None,
    "qtool": [],
    "qtool --no-bias-correction": ["--no-bias-correction"],
    "qtool --analysis none": ["--analysis", "none"],
    "qtool --bias-correction fast": ["--bias-correction", "fast"],
}
MODELS = ("ddddocr_det", "resnet18")


# -- models and data ---------------------------------------------------------------------


def model_path(name: str, folder: Path) -> Path:
    path = folder / f"{name}.onnx"
    if path.exists():
        return path
    if name == "resnet18":
        from bench_calibration import export_torchvision

        export_torchvision("resnet18", path)
    else:
        source = CACHE / "wheel_models" / f"{name}.onnx"
        if not source.exists():
            raise SystemExit(f"{source}: missing; run `python benchmarks/wheel_models.py setup`")
        path.write_bytes(source.read_bytes())
    return path


def write_data(name: str, count: int, path: Path) -> Path:
    """``count`` samples as one ``.npy`` (rows = samples), written once per size."""
    if path.exists():
        return path
    import fidelity_data as fd

    if name == "resnet18":
        from bench_calibration import samples

        rows = (s["input"][0] for s in samples("resnet18", count))
        shape = (3, 224, 224)
    else:  # image-like: photo crops, RGB 0-255 as ddddocr feeds its detector
        rng = np.random.default_rng(0)
        rows = (np.asarray(fd.photo_crop(rng, (416, 416)), np.float32).transpose(2, 0, 1)
                for _ in range(count))
        shape = (3, 416, 416)
    tmp = path.with_suffix(".tmp.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, *shape))
    for i, row in enumerate(rows):
        array[i] = row
    array.flush()
    del array
    tmp.replace(path)
    return path


def fixed_batch(model: Path) -> bool:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    first = next(i for i in proto.graph.input if i.name not in inits)
    dims = first.type.tensor_type.shape.dim
    return bool(dims) and dims[0].dim_value > 0


# -- one variant (in its own process) -----------------------------------------------------


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_one(variant: str, model: Path, data: Path, batch: int, out: Path) -> dict:
    phases: dict[str, float] = {}
    if variant == "ort":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            quantize_static,
        )

        array = np.load(data, mmap_mode="r")
        name = _input_name(model)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = ({name: np.ascontiguousarray(array[i:i + batch])}
                                for i in range(0, len(array), batch))

            def get_next(self):
                return next(self.batches, None)

        quantize_static(str(model), str(out / "model.onnx"), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)
    else:
        import contextlib

        from qtool.cli import main as cli

        import qtool.analysis.kernels as kernels
        from qtool import progress

        real_phase, real_check = progress.phase, kernels.check_kernels

        @contextlib.contextmanager
        def timed(name):
            start = time.perf_counter()
            with real_phase(name):
                yield
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

        def timed_check(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real_check(*args, **kwargs)
            finally:
                phases["kernel check"] = time.perf_counter() - start

        progress.phase, kernels.check_kernels = timed, timed_check
        args = ["calibrate", str(model), "-b", "tensorrt", "--data", str(data),
                "--batch-size", str(batch), "-o", str(out / "qtool"), "--force", "-q",
                *VARIANTS[variant]]
        cli(args, standalone_mode=False)
    return {"peak_rss_mb": round(peak_rss_mb(), 1),
            "phases": {k: round(v, 2) for k, v in phases.items()}}


def _input_name(model: Path) -> str:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return next(i.name for i in proto.graph.input if i.name not in inits)


def spawn(variant: str, model: Path, data: Path, batch: int, out: Path) -> dict:
    command = [sys.executable, __file__, "--one", variant, str(model), str(data), str(batch),
               str(out)]
    load = os.getloadavg()[0]  # the machine is shared: each row says how busy it was
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"variant": variant, "error": f"exit {done.returncode}: {tail[:200]}"}
    return {"variant": variant, "load": round(load, 1), "wall_s": round(wall, 2),
            **json.loads(lines[-1])}


# -- the table ----------------------------------------------------------------------------


def summarise(runs: list[dict], baseline: list[dict] | None) -> dict:
    """One row from a variant's rounds: the median round's figures, and the median of the
    ratios round by round against the ``ort`` run of the same round (the machine's speed
    drifts between rounds: a ratio within one round is the fair one)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    middle = sorted(good, key=lambda r: r["wall_s"])[(len(good) - 1) // 2]
    row = dict(middle, rounds=[r["wall_s"] for r in good])
    if baseline and len(baseline) == len(runs) and len(runs) > 1:
        pairs = [(r, b) for r, b in zip(runs, baseline, strict=True)
                 if "error" not in r and "error" not in b]
        if pairs:
            row["x_ort_wall"] = float(np.median([r["wall_s"] / b["wall_s"] for r, b in pairs]))
            row["x_ort_rss"] = float(np.median([r["peak_rss_mb"] / b["peak_rss_mb"]
                                                for r, b in pairs]))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | samples | variant | load | wall s | x ort | peak RSS MB | x ort | "
             "where qtool's time goes (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"]
                     and r["samples"] == row["samples"] and r["variant"] == "ort"
                     and "error" not in r), None)
        if "error" in row:
            lines.append(f"| {row['model']} | {row['samples']} | {row['variant']} | | "
                         f"{row['error']} | | | | |")
            continue
        wall = f"{row['wall_s'] / base['wall_s']:.2f}" if base else ""
        rss = f"{row['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else ""
        if "x_ort_wall" in row:  # rounds: the median of the ratios round by round
            wall, rss = f"{row['x_ort_wall']:.2f}", f"{row['x_ort_rss']:.2f}"
        if len(row.get("rounds", [])) > 1:
            wall += f" ({', '.join(f'{w:.1f}' for w in row['rounds'])} s)"
        phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(
            row.get("phases", {}).items(), key=lambda kv: -kv[1]) if v >= 0.05)
        load = f"{row['load']:.1f}" if "load" in row else ""
        lines.append(f"| {row['model']} | {row['samples']} | {row['variant']} | {load} | "
                     f"{row['wall_s']:.1f} | {wall} | {row['peak_rss_mb']:.0f} | {rss} | "
                     f"{phases} |")
    return "\n".join(lines)


def write_readme(rows: list[dict], command: str, load: str) -> None:
    text = README.read_text()
    body = (f"{SECTION}\n\nRegenerated by `{command}` (load average: {load}; "
            "2 shared cores: only ratios within one model's block mean something; `load`: the "
            "1-minute load average when the row started). "
            "`x ort`: against `quantize_static` (MinMax, QDQ, per-channel) on the same "
            "model and data in the same run (with rounds: the median of the ratios round "
            "by round, each round's wall times in brackets); targets: the default job "
            "<= 1.5x its wall time and <= 1.2x its peak RSS.\n\n" + table(rows) + "\n")
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        tail = rest.split("\n## ", 1)
        text = head + body + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        head, rest = text.split("\n## ", 1)  # first section of the file
        text = head + "\n" + body + "\n## " + rest
    README.write_text(text)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        variant, model, data, batch, out = sys.argv[2:7]
        print(json.dumps(run_one(variant, Path(model), Path(data), int(batch), Path(out))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every variant in turn; the table gives the median "
                             "round and the median of the ratios round by round")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--load-note", help="the load to state in the README (--table-only)")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the README table from the stored results")
    args = parser.parse_args()
    folder = CACHE / "cost"
    folder.mkdir(parents=True, exist_ok=True)
    load = args.load_note or f"{os.getloadavg()[0]:.1f} at the start"
    results = folder / "results.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    for name in [] if args.table_only else args.models.split(","):
        model = model_path(name, folder)
        data = write_data(name, args.samples, folder / f"{name}_{args.samples}.npy")
        batch = 1 if fixed_batch(model) else args.batch_size
        out = folder / f"out_{name}"
        out.mkdir(exist_ok=True)
        variants = args.variants.split(",")
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeat):  # rounds of every variant in turn: A B A B ...
            for variant in variants:
                run = spawn(variant, model, data, batch, out)
                print(json.dumps({"model": name, **run}), flush=True)
                runs[variant].append(run)
        for variant in variants:
            row = {"model": name, "samples": args.samples, "batch": batch,
                   **summarise(runs[variant], runs.get("ort"))}
            rows = [r for r in rows if (r["model"], r["samples"], r["variant"])
                    != (name, args.samples, variant)] + [row]
            results.write_text(json.dumps(rows, indent=1))  # merged run after run
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (r["model"], r["samples"], order.get(r["variant"], 99)))
    print(table(rows))
    if not args.no_readme:
        command = "python benchmarks/bench_cost.py"
        if args.models != ",".join(MODELS) or args.samples != 256:
            command += f" --models {args.models} --samples {args.samples}"
        if args.repeat > 1:
            command += f" --repeat {args.repeat}"
        write_readme(rows, command, load)


if __name__ == "__main__":
    main()
