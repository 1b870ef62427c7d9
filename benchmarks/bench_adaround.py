"""Wall time of ``qtool calibrate --adaround`` on a ResNet-18 (timing only, not accuracy).

torchvision's resnet18 with random weights (accuracy needs trained weights; the time does
not depend on them), exported as users export it (``torch.onnx.export``, ``dynamo=False``,
defaults: batch 1), calibrated on 32 crops of scikit-learn's two sample photos at 224x224,
with the default AdaRound budget (200 steps per layer) unless ``--iterations`` says
otherwise. Prints each phase's time, then AdaRound's wall and CPU time (all threads) with
the load average: on a shared machine the CPU time is the number that does not depend on the
others. ``--threads`` sets torch's threads (onnxruntime takes the cores).

    python benchmarks/bench_adaround.py --threads 2 [--iterations 200] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

IMAGES = 32
SIZE = 224


def export_resnet18(path: Path) -> None:
    """torchvision resnet18 (random weights, seed 0) to ONNX as a user exports it."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still the norm
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False)


def write_images(folder: Path) -> None:
    """32 seeded crops of scikit-learn's sample photos, resized to 224x224 PNGs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(IMAGES):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        side = int(rng.integers(SIZE, min(height, width) + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        crop.resize((SIZE, SIZE), Image.BILINEAR).save(folder / f"{index:02d}.png")


def main() -> int:
    """Export, write the images, run calibrate with AdaRound, print the times."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--backend", default="tensorrt")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from qtool import progress
    from qtool.workflow import CalibrateOptions, calibrate_to_folder

    work = args.work or Path(tempfile.mkdtemp(prefix="qtool-adaround-"))
    work.mkdir(parents=True, exist_ok=True)
    model, images = work / "resnet18.onnx", work / "images"
    if not model.exists():
        export_resnet18(model)
    if not images.exists():
        write_images(images)
    # The images judge too (no held-out split): AdaRound learns on all 32.
    options = CalibrateOptions(data=images, eval_data=images, analysis="none",
                               bias_correction=False, kernel_check=False, adaround=True,
                               adaround_iters=args.iterations)
    import importlib

    module = importlib.import_module("qtool.qat.adaround")  # qtool.qat.adaround: a function

    learn, spent = module.adaround, {}

    def timed(*call_args, **kwargs):  # wall and CPU (all threads) of the learned rounding
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return learn(*call_args, **kwargs)
        finally:
            spent["wall"] = time.perf_counter() - wall
            spent["cpu"] = time.process_time() - cpu

    module.adaround = timed
    load = os.getloadavg()[0]
    with progress.shown(True):
        calibrate_to_folder(model, args.backend, work / "out", options, force=True)
    print(f"adaround, {args.iterations} steps per layer, {args.threads} threads: "
          f"{spent['wall']:.1f} s wall, {spent['cpu']:.1f} s CPU; load average "
          f"{load:.2f} before, {os.getloadavg()[0]:.2f} after", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
