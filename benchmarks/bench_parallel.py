"""Wall time of parallel jobs: one process vs local processes vs Ray, side by side in one run.

    python benchmarks/bench_parallel.py [--workers 2] [--samples 256] [--jobs auto,adaround]

Jobs on the digits CNN (or ``--model/--data/--eval-data``): ``calibrate`` (KLD, a histogram
method), ``compare`` (3 backends x 2 methods, no sweep), and the analyses inside
``calibrate``: ``sensitivity`` (one candidate per layer), ``auto`` (``--method auto``: the
calibration and judging passes over row windows) and ``adaround`` (``--adaround``, W4A8:
the layers of a wave of independent layers side by side). Each variant runs in a fresh
process (the CLI), so spawning workers and Ray's start-up are counted, as a user pays them.
Prints wall seconds, the ratio to one process, the 1-minute load average before and after
the run (a shared machine: other jobs' load shows there), and a digest of the files written:
every variant must write the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"
VAL = ROOT / "examples" / "digits_val.npz"


def run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qtool.cli", *args], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start


def digest(path: Path) -> str:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


JOBS = ("calibrate", "compare", "sensitivity", "auto", "adaround")


def adaround_waves(paths: list[str]) -> None:
    """How many waves AdaRound's layers take on each model: the parallelism it has at best.

    Quantized (tensorrt, W4A8) on random inputs: the waves depend on the graph alone.
    """
    sys.path.insert(0, str(ROOT))
    from qtool.calibration import calibrate, load_data

    from qtool.io import load
    from qtool.planner import build_plan
    from qtool.prepare import prepare
    from qtool.qat.adaround import _learners, _waves
    from qtool.qat.importer import to_torch
    from qtool.qdq import quantize

    print("| model | learned layers | waves | widest wave | layers alone in their wave |")
    print("|---|---|---|---|---|")
    for path in paths:
        graph, _ = prepare(load(path))
        plan = build_plan(graph, "tensorrt", weight_bits=4, act_bits=8)
        data = load_data(None, graph, num_samples=2)
        ranges = calibrate(graph, plan.activation_schemes(), data, progress=False)
        result = quantize(graph, "tensorrt", ranges, plan=plan)
        model = to_torch(result, "lsq")
        learners = _learners(model)
        waves = _waves(result.float_graph, learners, model, "quantized")
        print(f"| {Path(path).name} | {len(learners)} | {len(waves)} | "
              f"{max(map(len, waves))} | {sum(len(w) == 1 for w in waves)} |", flush=True)


def command(job: str, out: Path, args) -> list[str]:
    """The CLI arguments of one job (its variants add ``--workers``/``--executor``)."""
    data = ["--data", args.data, "--eval-data", args.eval_data, "--num-samples",
            str(args.samples), "--batch-size", "16", "-o", str(out), "-q"]
    if job == "compare":
        return ["compare", args.model, "-b", "tensorrt", "-b", "snpe", "-b", "acl", "-m",
                "minmax", "-m", "kld", "--no-sweep", "--format", "json", *data]
    calibrate = ["calibrate", args.model, "-b", "tensorrt", *data]
    return calibrate + {
        "calibrate": ["--method", "kld"],
        "sensitivity": ["--sensitivity"],
        "auto": ["--method", "auto"],
        "adaround": ["--adaround", "--adaround-iters", str(args.adaround_iters),
                     "--weight-bits", "4"],
    }[job]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--jobs", default=",".join(JOBS),
                        help=f"comma-separated, of: {', '.join(JOBS)}")
    parser.add_argument("--variants", default="one process,local,ray")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--data", default=str(CALIB))
    parser.add_argument("--eval-data", default=str(VAL))
    parser.add_argument("--adaround-iters", type=int, default=200)
    parser.add_argument("--adaround-waves", nargs="+", metavar="MODEL",
                        help="only print the waves AdaRound's layers take on these models")
    args = parser.parse_args()
    if args.adaround_waves:
        adaround_waves(args.adaround_waves)
        return
    every = {"one process": [], "local": ["--workers", str(args.workers)],
             "ray": ["--workers", str(args.workers), "--executor", "ray"]}
    variants = {name: every[name] for name in args.variants.split(",")}
    print(f"cores: {os.cpu_count()}, workers: {args.workers}, samples: {args.samples}, "
          f"model: {Path(args.model).name}")
    print("| job | variant | wall s | vs one process | load before / after | output |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for job in args.jobs.split(","):
            rows = []
            for name, extra in variants.items():  # in the order given (--variants)
                out = Path(tmp) / f"{job}-{name.replace(' ', '_')}"
                before = os.getloadavg()[0]
                seconds = run(command(job, out, args) + extra)
                rows.append((name, seconds, before, os.getloadavg()[0], digest(out)))
            base = dict((r[0], r[1]) for r in rows).get("one process", rows[0][1])
            for name, seconds, before, after, written in rows:
                print(f"| {job} | {name} | {seconds:.1f} | {seconds / base:.2f}x | "
                      f"{before:.1f} / {after:.1f} | {written} |", flush=True)


if __name__ == "__main__":
    main()
