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
    args = parser.parse_args()
    every = {"one process": [], "local": ["--workers", str(args.workers)],
             "ray": ["--workers", str(args.workers), "--executor", "ray"]}
    variants = {name: every[name] for name in args.variants.split(",")}
    print(f"cores: {os.cpu_count()}, workers: {args.workers}, samples: {args.samples}, "
          f"model: {Path(args.model).name}")
    print("| job | variant | wall s | vs one process | load before / after | output |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for job in args.jobs.split(","):
            base = None
            for name, extra in variants.items():
                out = Path(tmp) / f"{job}-{name.replace(' ', '_')}"
                before = os.getloadavg()[0]
                seconds = run(command(job, out, args) + extra)
                after = os.getloadavg()[0]
                base = base or seconds
                print(f"| {job} | {name} | {seconds:.1f} | {seconds / base:.2f}x | "
                      f"{before:.1f} / {after:.1f} | {digest(out)} |", flush=True)


if __name__ == "__main__":
    main()
