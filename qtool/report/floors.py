"""Floors on the task as well as on SQNR: every breach a WARNING, and exit 1 on request.

The SQNR floor (:mod:`qtool.report.sqnr_floor`: each output, each output slice, the
onnxruntime kernel path) and the task floors below are checked on the evaluation data of
every run; the task is the one given with ``--task`` or recognised from the outputs
(:func:`qtool.analysis.tasks.recognize`). Default task floors (:data:`TASK_FLOORS`):

* top-1 agreement with float >= 90 % (``classify``; per step for sequences, ``ctc``);
* mAP@0.5 against the float model's detections >= 90 % (``detect``; 80 % let a YOLOv8 whose
  box centres had lost half a grid cell pass at 82.8 %, where ModelOpt's file and qtool's
  other backends reach 93-98 %: issue 24);
* CER rise <= 2 points (``ctc``: against the labels, else the CER against float's decode).

Each breach names the output and the first quantized tensor where the error collapses
(found for that output on a few rows: :func:`qtool.analysis.collapse.first_collapse`).
``qtool calibrate --fail-on-floor`` exits 1 on any breach (``--fail-under-sqnr DB`` on the
SQNR ones, at that floor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qtool.report.sqnr_floor import (
    WARN_UNDER_SQNR,
    collapse_text,
    floor_warnings,
    sqnr_floor,
)

#: Default task floors: fractions for agreement and mAP, points for the CER rise.
TASK_FLOORS: dict[str, float] = {"top1_agreement": 0.90, "step_agreement": 0.90,
                                 "map50": 0.90, "cer_rise_pts": 2.0}

_LABELS = {"top1_agreement": "top-1 agreement with float",
           "step_agreement": "per-step top-1 agreement with float",
           "map50": "mAP@0.5 against the float detections"}


def task_floor(task: Mapping[str, Any] | None) -> dict[str, Any]:
    """The task check as it goes into report.json: ``{"floors", "below": [...]}``."""
    below: list[dict[str, Any]] = []
    if task:
        metrics = task.get("metrics", {})
        for key in ("top1_agreement", "step_agreement", "map50"):
            value = metrics.get(key)
            if isinstance(value, (int, float)) and value < TASK_FLOORS[key]:
                below.append({"task": task["task"], "output": task.get("output", ""),
                              "metric": key, "value": value, "floor": TASK_FLOORS[key]})
        drop = task.get("drop")
        if task["task"] == "ctc" and isinstance(drop, (int, float)) and (
                drop > TASK_FLOORS["cer_rise_pts"]):
            below.append({"task": "ctc", "output": task.get("output", ""),
                          "metric": "cer_rise_pts", "value": drop,
                          "floor": TASK_FLOORS["cer_rise_pts"]})
    return {"floors": dict(TASK_FLOORS), "below": below}


def task_warnings(check: Mapping[str, Any]) -> list[str]:
    """One warning per task floor breach, naming the output and where the error collapses."""
    warnings = []
    for entry in check["below"]:
        where = f" ({entry['output']})" if entry["output"] else ""
        if entry["metric"] == "cer_rise_pts":
            what = (f"CER rise {entry['value']:.2f} pts is over the +{entry['floor']:g} pts "
                    "floor")
        else:
            what = (f"{_LABELS[entry['metric']]} {100 * entry['value']:.2f}% is under the "
                    f"{100 * entry['floor']:g}% floor")
        warnings.append(f"task {entry['task']}{where}: {what}: the quantized model loses the "
                        "task; --max-accuracy-drop PTS keeps the most sensitive layers float"
                        + collapse_text(entry.get("collapse")))
    return warnings


def apply_floors(report: dict[str, Any], floor_db: float | None,
                 locate: Callable[[str, float], dict | None] | None = None) -> None:
    """Check every floor, locate the collapses, and add the warnings to ``report``.

    Sets ``report["sqnr_floor"]`` and ``report["task_floor"]``.

    Args:
        report: The run's report (its ``evaluation``, ``analysis``, ``ort_kernels``).
        floor_db: ``--fail-under-sqnr`` (None: :data:`WARN_UNDER_SQNR`).
        locate: ``locate(output, floor_db)``: where that output's error collapses (see
            :func:`qtool.analysis.collapse.first_collapse`), or None not to look.
    """
    floor = WARN_UNDER_SQNR if floor_db is None else floor_db
    evaluation = report.get("evaluation") or {}
    check = sqnr_floor(evaluation, report.get("analysis"), floor, report.get("ort_kernels"))
    tasks = task_floor(evaluation.get("task"))
    outputs = [o["name"] for o in evaluation.get("outputs", [])]
    found: dict[str, Any] = {}

    def collapse(output: str):
        if output not in outputs:  # a decoder's file, "all outputs": the worst output's
            ranked = sorted(evaluation.get("outputs", []),
                            key=lambda o: o["sqnr_db"] if isinstance(o["sqnr_db"], float)
                            else float("inf"))
            output = ranked[0]["name"] if ranked else ""
        if output and output not in found:
            found[output] = locate(output, floor) if locate is not None else None
        return found.get(output)

    if check["collapse"] is None:
        for entry in check["below"]:
            entry["collapse"] = collapse(entry["output"])
    for entry in tasks["below"]:
        entry["collapse"] = collapse(entry["output"])
    report["sqnr_floor"] = check
    report["task_floor"] = tasks
    report["warnings"] += floor_warnings(check) + task_warnings(tasks)


def breaches(report: Mapping[str, Any]) -> list[str]:
    """Every floor breach of a report in a few words (for ``--fail-on-floor``'s error)."""
    found = []
    for entry in (report.get("sqnr_floor") or {}).get("below", []):
        name = entry.get("slice") or entry["output"]
        found.append(f"{name} SQNR {entry['sqnr_db']:.2f} dB")
    for entry in (report.get("task_floor") or {}).get("below", []):
        value = entry["value"]
        shown = f"{value:.2f} pts" if entry["metric"] == "cer_rise_pts" else f"{100 * value:.2f}%"
        found.append(f"{entry['task']} {entry['metric']} {shown}")
    return found
