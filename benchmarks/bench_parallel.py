"""Wall time of parallel jobs: one process vs local processes vs Ray, side by side in one run.

    python benchmarks/bench_parallel.py [--workers 2] [--samples 256]

Jobs: `qtool calibrate` (KLD, a histogram method) on the digits CNN and `qtool compare`
(3 backends x 2 methods, no sweep). Each variant runs in a fresh process (the CLI), so Ray's
start-up is counted, as a user pays it. Prints wall seconds and the ratio to one process, and
checks that every variant wrote the same bytes.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    variants = {"one process": [], "local": ["--workers", str(args.workers)],
                "ray": ["--workers", str(args.workers), "--executor", "ray"]}
    print(f"cores: {os.cpu_count()}, workers: {args.workers}, samples: {args.samples}")
    print("| job | variant | wall s | vs one process | output |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for job in ("calibrate", "compare"):
            base = None
            for name, extra in variants.items():
                out = Path(tmp) / f"{job}-{name.replace(' ', '_')}"
                if job == "calibrate":
                    cmd = ["calibrate", str(MODEL), "-b", "tensorrt", "--method", "kld",
                           "--data", str(CALIB), "--eval-data", str(VAL), "--num-samples",
                           str(args.samples), "--batch-size", "16", "-o", str(out), "-q"]
                else:
                    cmd = ["compare", str(MODEL), "--data", str(CALIB), "--eval-data",
                           str(VAL), "-b", "tensorrt", "-b", "snpe", "-b", "acl", "-m",
                           "minmax", "-m", "kld", "--no-sweep", "--num-samples",
                           str(args.samples), "--format", "json", "-o", str(out), "-q"]
                seconds = run(cmd + extra)
                base = base or seconds
                print(f"| {job} | {name} | {seconds:.1f} | {seconds / base:.2f}x | "
                      f"{digest(out)} |")


if __name__ == "__main__":
    main()
