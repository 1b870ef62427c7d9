"""A 2.4 GB model with external data through ``qtool calibrate -b onnxruntime``: peak memory.

The model is a chain of 6 MatMuls (10240 x 10240 float32 weights, 2.4 GB) with ReLUs between
them, saved as ``big.onnx`` + ``big.onnx.data`` (as exporters write models over 2 GB); 16
calibration rows and 8 held-out rows. The run is a child process; its peak resident memory
(its own ``ru_maxrss``, from ``os.wait4``) is compared with the size of the weights, and the
output is checked: ``model.qdq.onnx`` + ``model.qdq.onnx.data``, run in onnxruntime from its
path against the float model (SQNR on the held-out rows). The child also samples its own
resident memory every 50 ms and prints the peak of each phase of the job
(:func:`qtool.progress.phase`, and the kernel check, which runs outside the phases).

    python benchmarks/bench_large_model.py --work /tmp/qtool-large [--layers 6 --width 10240]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_model(folder: Path, layers: int, width: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = folder / "big.onnx"
    if path.exists() and (folder / "big.onnx.data").exists():
        return path
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width))
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data")
    x = rng.standard_normal((24, width)).astype(np.float32)
    np.savez(folder / "calib.npz", x=x[:16])
    np.savez(folder / "val.npz", x=x[16:])
    return path


def child(args: list[str]) -> None:
    """``qtool calibrate ARGS`` in this process, with the peak resident memory of each phase."""
    import contextlib
    import json
    import threading

    from qtool.cli import main as cli

    import qtool.analysis.kernels as kernels
    from qtool import progress

    peaks: dict[str, float] = {}
    current = ["start"]
    done = threading.Event()

    def rss(field: str = "VmRSS:") -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024 / 2**30
        return 0.0

    # the high-water mark after each phase: exact, where a 50 ms sample can miss a spike
    marks: dict[str, float] = {}

    def sample() -> None:
        while not done.wait(0.05):
            peaks[current[0]] = max(peaks.get(current[0], 0.0), rss())

    real_phase, real_check = progress.phase, kernels.check_kernels

    @contextlib.contextmanager
    def tracked(name):
        before, current[0] = current[0], name
        try:
            with real_phase(name):
                yield
        finally:
            current[0] = before
            marks[name] = rss("VmHWM:")

    def tracked_check(*a, **k):
        with tracked("kernel check"):
            return real_check(*a, **k)

    progress.phase, kernels.check_kernels = tracked, tracked_check
    threading.Thread(target=sample, daemon=True).start()
    try:
        cli(args, standalone_mode=False)
    finally:
        done.set()
        print("PHASES sampled peak GiB " + json.dumps({k: round(v, 2) for k, v in peaks.items()}),
              flush=True)
        print("PHASES high-water mark GiB at the end of each "
              + json.dumps({k: round(v, 2) for k, v in marks.items()}), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--make":
        make_model(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qtool-large"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=10240)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # built in a process of its own, and the calibration's peak read from its own rusage
    # (os.wait4), not RUSAGE_CHILDREN: that is the largest of all children, the builder's
    # too, and an exec'd child starts from the high-water mark of the process it was forked
    # from (a run that built the model in this process read 8.25 GiB for a calibration whose
    # own high-water mark was 6.92)
    subprocess.run([sys.executable, __file__, "--make", str(args.work), str(args.layers),
                    str(args.width)], check=True)
    model = args.work / "big.onnx"
    weights = (args.work / "big.onnx.data").stat().st_size
    out = args.work / "out"
    start = time.perf_counter()
    child_process = subprocess.Popen(
        [sys.executable, __file__, "--child", "calibrate", str(model), "-b", "onnxruntime",
         "--data", str(args.work / "calib.npz"), "--eval-data", str(args.work / "val.npz"),
         "-o", str(out), "--force", "-q"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    _, status, usage = os.wait4(child_process.pid, 0)
    child_process.returncode = os.waitstatus_to_exitcode(status)
    done = child_process
    seconds = time.perf_counter() - start
    peak = usage.ru_maxrss * 1024
    print(f"exit code {done.returncode}, {seconds:.0f} s (load average {os.getloadavg()[0]:.1f})")
    print(f"weights {weights / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB "
          f"= {peak / weights:.2f}x the weights")
    if done.returncode != 0:
        return
    import onnxruntime as ort

    files = sorted(p.name for p in out.iterdir())
    print("output files:", ", ".join(files))
    print(f"model.qdq.onnx {(out / 'model.qdq.onnx').stat().st_size} bytes, "
          f"model.qdq.onnx.data {(out / 'model.qdq.onnx.data').stat().st_size / 2**20:.0f} MiB")
    x = np.load(args.work / "val.npz")["x"]
    reference = ort.InferenceSession(str(model)).run(None, {"x": x})[0].astype(np.float64)
    quantized = ort.InferenceSession(str(out / "model.qdq.onnx")).run(None, {"x": x})[0]
    sqnr = 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - quantized) ** 2))
    print(f"the output runs from its path: held-out SQNR {sqnr:.1f} dB")


if __name__ == "__main__":
    main()
