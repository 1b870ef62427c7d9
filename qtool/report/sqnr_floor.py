"""Never silently wrong: outputs, and slices of outputs, whose SQNR is below a floor.

Every run checks each output's SQNR on the evaluation data against a floor:
``--fail-under-sqnr DB`` when given, else :data:`WARN_UNDER_SQNR`; and each output's slices
(:mod:`qtool.analysis.slices`: the side of the axis where ranges differ most, e.g. sigmoid
scores beside pixel boxes), and the SQNR in onnxruntime's integer kernels
(:mod:`qtool.analysis.kernels`) when the simulation itself is above the floor. An entry
below it becomes a warning in the summary, report.md and report.html, naming where the
error collapses: the first quantized tensor (graph order) whose accumulated SQNR on the
calibration data is already below the floor (``--analysis full``), else the one found for
that output on a few evaluation rows (:func:`qtool.analysis.collapse.first_collapse`).
With ``--fail-under-sqnr`` (or ``--fail-on-floor``) the CLI also exits with
:data:`FAIL_EXIT`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Floor (dB) of the warning when no ``--fail-under-sqnr`` is given.
WARN_UNDER_SQNR = 10.0

#: Exit code of ``qtool calibrate --fail-under-sqnr`` when an output is below the floor.
FAIL_EXIT = 1

KERNELS = "onnxruntime kernels"


def sqnr_floor(evaluation: Mapping[str, Any], analysis: Mapping[str, Any] | None,
               floor: float, kernels: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The check as it goes into report.json.

    Args:
        evaluation: The report's ``evaluation`` section.
        analysis: The report's ``analysis`` section (its ``tensors`` in graph order), or None.
        floor: The floor in dB.
        kernels: The report's ``ort_kernels`` section, or None.

    Returns:
        ``{"floor_db", "below": [{"output", "sqnr_db"}, {"output", "slice", "sqnr_db"},
        {"output", "path", "sqnr_db"}], "collapse": {"tensor", "sqnr_db"} or None}``: a
        whole output, a slice of one (when the whole is above the floor), the kernel path.
    """
    below = []
    outputs = evaluation.get("outputs", [])
    for out in outputs:
        if out["sqnr_db"] is not None and _below(out["sqnr_db"], floor):
            below.append({"output": out["name"], "sqnr_db": out["sqnr_db"]})
            continue
        for part in out.get("slices", ()):
            if part["sqnr_db"] is not None and _below(part["sqnr_db"], floor):
                below.append({"output": out["name"], "slice": slice_label(out["name"], part),
                              "sqnr_db": part["sqnr_db"]})
    if kernels and not below and outputs:
        measured = kernels.get("kernels_sqnr_db")
        if isinstance(measured, (int, float)) and _below(measured, floor):
            name = outputs[0]["name"] if len(outputs) == 1 else "all outputs"
            below.append({"output": name, "path": KERNELS, "sqnr_db": measured})
    collapse = None
    if below and analysis:
        first = next(
            (t for t in analysis.get("tensors", []) if t["role"] == "activation"
             and t["sqnr_db"] is not None and t["sqnr_db"] < floor),
            None,
        )
        if first is not None:
            collapse = {"tensor": first["tensor"], "sqnr_db": first["sqnr_db"]}
    return {"floor_db": floor, "below": below, "collapse": collapse}


def slice_label(output: str, part: Mapping[str, Any]) -> str:
    """``output[:, 4:7]``: the slice of an evaluation's ``slices`` entry."""
    index = [":"] * int(part["axis"]) + [f"{part['start']}:{part['stop']}"]
    return f"{output}[{', '.join(index)}]"


def floor_warnings(check: Mapping[str, Any]) -> list[str]:
    """One warning per entry below the floor, naming where the error collapses."""
    warnings = []
    for entry in check["below"]:
        if "slice" in entry:
            what = (f"output slice {entry['slice']}: SQNR {entry['sqnr_db']:.2f} dB on the "
                    "evaluation data (the whole output's SQNR hides it)")
        elif "path" in entry:
            what = (f"output {entry['output']}: SQNR {entry['sqnr_db']:.2f} dB in "
                    f"{entry['path']} (default optimizations; the Q/DQ simulation is above)")
        else:
            what = (f"output {entry['output']}: SQNR {entry['sqnr_db']:.2f} dB on the "
                    "evaluation data")
        text = f"{what} is below {check['floor_db']:g} dB: the quantized model is likely useless"
        warnings.append(text + collapse_text(entry.get("collapse") or check["collapse"]))
    return warnings


def collapse_text(collapse: Mapping[str, Any] | None) -> str:
    """The warning's tail naming where the error collapses (empty when unknown)."""
    if collapse is None:
        return ""
    db = collapse["sqnr_db"]
    shown = "exact" if db is None else f"{db:.2f} dB"
    where = "first collapses at" if collapse.get("below_floor", True) else "is worst at"
    return (f"; the error {where} {collapse['tensor']} ({shown}): keep its readers float "
            "(--skip), or try --cle, another --method or a per-channel backend")


def _below(value: Any, floor: float) -> bool:
    return isinstance(value, (int, float)) and value < floor
