"""The report of ``qtool calibrate``: a JSON document, its markdown rendering, a summary table.

The JSON report holds what was done and how well it went:

* ``model``, ``backend``, ``qtool_version``;
* ``config``: the ``--config`` file the options came from (None: flags only), and
  ``options``: the effective options as config keys (:func:`qtool.calibrate_config.
  recipe_options`; not workers, executor, memory budget: they do not change the files);
* ``calibration``: method, weight method, data source, sample count, and ``random_inputs``
  (true when no data was given: the ranges are then unfit for deployment);
* ``passes``: one line per preparation pass;
* ``plan``: how many tensors are quantized, and every node left float with the reason;
* ``evaluation``: per-output SQNR / cosine / max abs error / top-1 agreement (and accuracy
  with labels) on the evaluation data, ``held_out`` saying whether that data differs from the
  calibration data; per-layer SQNR when asked; ``task``: the task metric (``--task``:
  :mod:`qtool.analysis.tasks`), or null;
* ``analysis`` (:mod:`qtool.analysis`, on the calibration data): accumulated SQNR / cosine of
  every quantized tensor, histograms of the worst activations with their clip ranges, and
  when asked the sensitivity of each layer quantized alone, the float fallback search and
  ``--method auto``'s choice per tensor;
* ``bias_correction``: the layers whose bias was corrected (with ``--bias-correction``);
* ``sqnr_floor``: the outputs (and output slices, and the kernel path) whose SQNR is below
  the floor, and ``task_floor``: the task metrics below theirs (:mod:`qtool.report.floors`,
  added by :func:`qtool.report.floors.apply_floors` once the kernel check ran);
* ``files``: the SHA-256 of every other file written;
* ``warnings``: what a reader must know before trusting the numbers.

No timestamps, absolute paths or host names go in: the same run gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import qtool


def build_report(
    *,
    model: str,
    backend: str,
    options: Any,
    calibration_samples: int,
    passes: Sequence[Any],
    plan: Any,
    evaluation: Any,
    eval_data: str | None,
    files: Mapping[str, bytes],
    analysis: Any = None,
    bias_correction: Any = None,
    held_out: bool | None = None,
) -> dict[str, Any]:
    """The report of one ``qtool calibrate`` run (see the module docstring for its keys).

    Args:
        model: The model path as given.
        backend: Backend name.
        options: The run's :class:`qtool.options.CalibrateOptions`.
        calibration_samples: Number of calibration samples used.
        passes: The preparation passes' :class:`qtool.pipeline.PassReport` list.
        plan: The :class:`qtool.plan.QuantPlan` applied.
        evaluation: The :class:`qtool.analysis.evaluate.Evaluation` on the evaluation data.
        eval_data: The evaluation data path as given (None: random inputs).
        files: The other files of the output folder, by name.
        analysis: The :class:`qtool.analysis.Analysis` of the run, or None.
        bias_correction: The :class:`qtool.bias_correction.BiasCorrection`, or None.
        held_out: Whether the evaluation data differs from the calibration data (None:
            whether ``--eval-data`` was given; a held-out split of the data counts too).
    """
    random_inputs = options.data is None
    if held_out is None:
        held_out = options.eval_data is not None
    warnings = []
    if random_inputs:
        warnings.append(
            "calibrated on random inputs (no --data): the ranges and the numbers below say "
            "nothing about real data; do not deploy this model"
        )
    elif not held_out:
        warnings.append("evaluated on the calibration data: give --eval-data for held-out numbers")
    fallback = analysis.fallback if analysis is not None else None
    if fallback is not None and not fallback.met:
        warnings.append("the fallback target was not met even with every layer float")
    if fallback is not None and fallback.max_accuracy_drop is not None:
        warnings.append(
            "the float fallback was chosen on the evaluation data: its accuracy is not a "
            "held-out number"
        )
    from qtool.calibrate_config import recipe_options

    config = getattr(options, "config", None)
    report = {
        "qtool_version": qtool.__version__,
        "model": model,
        "backend": backend,
        "config": None if config is None else Path(config).as_posix(),
        "options": recipe_options(options),
        "calibration": {
            "method": options.method,
            "weight_method": options.weight_method,
            "data": "random inputs" if random_inputs else str(options.data),
            "samples": calibration_samples,
            "random_inputs": random_inputs,
            "batch_size": options.batch_size,
            "seed": options.seed,
        },
        "passes": [p.summary() for p in passes],
        "plan": {
            "quantized_tensors": len(plan.tensors),
            "activations": len(plan.entries("activation")),
            "weights": len(plan.entries("weight")),
            "biases": len(plan.entries("bias")),
            "float_nodes": dict(sorted(plan.float_nodes.items())),
            **({"notes": dict(plan.notes)} if getattr(plan, "notes", None) else {}),
        },
        "evaluation": {
            "data": eval_data if eval_data is not None else "random inputs",
            "held_out": held_out,
            **evaluation.to_dict(),
        },
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
        "warnings": warnings,
    }
    if analysis is not None:
        report["analysis"] = analysis.to_dict()
    if bias_correction is not None:
        report["bias_correction"] = bias_correction.to_dict()
        for name in bias_correction.worse():
            without, with_ = bias_correction.sqnr_db[name]
            outcome = ("the uncorrected model was kept" if bias_correction.reverted
                       else "rerun with --no-bias-correction")
            warnings.append(
                f"bias correction lowered output {name}'s SQNR on the evaluation data from "
                f"{'exact' if without is None else f'{without:.2f} dB'} to {with_:.2f} dB: "
                f"{outcome}"
            )
    return report


def to_json(report: Mapping[str, Any]) -> str:
    """The report as stable JSON text."""
    return json.dumps(report, indent=2, sort_keys=False) + "\n"
