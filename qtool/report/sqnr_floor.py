"""Never silently wrong: outputs whose SQNR on the evaluation data is below a floor.

Every run checks each output's SQNR against a floor: ``--fail-under-sqnr DB`` when given,
else :data:`WARN_UNDER_SQNR`. An output below it becomes a warning in the summary, report.md
and report.html, naming the first quantized tensor (graph order) whose accumulated SQNR on
the calibration data is already below the floor: where the error collapses. With
``--fail-under-sqnr`` the CLI also exits with :data:`FAIL_EXIT`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Floor (dB) of the warning when no ``--fail-under-sqnr`` is given.
WARN_UNDER_SQNR = 10.0

#: Exit code of ``qtool calibrate --fail-under-sqnr`` when an output is below the floor.
FAIL_EXIT = 1


def sqnr_floor(evaluation: Mapping[str, Any], analysis: Mapping[str, Any] | None,
               floor: float) -> dict[str, Any]:
    """The check as it goes into report.json.

    Args:
        evaluation: The report's ``evaluation`` section.
        analysis: The report's ``analysis`` section (its ``tensors`` in graph order), or None.
        floor: The floor in dB.

    Returns:
        ``{"floor_db", "below": [{"output", "sqnr_db"}], "collapse": {"tensor", "sqnr_db"}
        or None}``.
    """
    below = [
        {"output": out["name"], "sqnr_db": out["sqnr_db"]}
        for out in evaluation.get("outputs", [])
        if out["sqnr_db"] is not None and out["sqnr_db"] < floor
    ]
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


def floor_warnings(check: Mapping[str, Any]) -> list[str]:
    """One warning per output below the floor, naming where the error collapses."""
    warnings = []
    for entry in check["below"]:
        text = (f"output {entry['output']}: SQNR {entry['sqnr_db']:.2f} dB on the evaluation "
                f"data is below {check['floor_db']:g} dB: the quantized model is likely useless")
        if check["collapse"] is not None:
            text += (f"; the error first collapses at {check['collapse']['tensor']} "
                     f"({check['collapse']['sqnr_db']:.2f} dB): keep its readers float "
                     "(--skip), or try --cle, another --method or a per-channel backend")
        warnings.append(text)
    return warnings
