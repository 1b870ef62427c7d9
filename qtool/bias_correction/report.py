"""What a bias correction did: the record report.json and the workflow read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BiasCorrection:
    """What :func:`correct_biases` did.

    Attributes:
        layers: Corrected layer name -> largest absolute bias change.
        stages: The depth in corrected layers (``staged``: passes of the quantized model).
        samples: Rows of calibration data used.
        sqnr_db: Output name -> ``[without, with]`` the correction, on the evaluation data
            (filled by :meth:`measure`).
        reverted: The correction made the judged metric worse on the evaluation data, so the
            model written is the uncorrected one.
        mode: ``exact``, ``fast`` (or ``staged``, the reference passes).
        skipped: Layer name -> why its bias was not corrected.
        judged_by: ``task <name>``, ``worst output slice``, or ``output SQNR``.
        slices: Output -> ``[[slice, dB without], [slice, dB with]]``: its worst slice.
        reason: Why the correction was reverted, whole or in part (None: kept).
        reverted_layers: Layers whose correction was taken back (the rest kept).
        noise: Layer -> standard error of its mean error over the shift's size (``exact``:
            where the rows are too few, near 1 or above).
    """

    layers: dict[str, float] = field(default_factory=dict)
    stages: int = 0
    samples: int = 0
    sqnr_db: dict[str, list] = field(default_factory=dict)
    reverted: bool = False
    mode: str = "exact"
    skipped: dict[str, str] = field(default_factory=dict)
    judged_by: str = ""
    slices: dict[str, list] = field(default_factory=dict)
    reason: str | None = None
    reverted_layers: list[str] = field(default_factory=list)
    noise: dict[str, float] = field(default_factory=dict)

    def measure(self, without, with_) -> None:
        """Record each output's SQNR without and with the correction (two Evaluations)."""
        self.sqnr_db = {
            a.name: [a.sqnr_db, b.sqnr_db]
            for a, b in zip(without.outputs, with_.outputs, strict=True)
        }

    def judge(self, without, with_) -> bool:
        r"""Record two :class:`qtool.bias_judge.Verdict`\ s; True if the correction hurts."""
        from qtool.bias_judge import hurts

        self.sqnr_db = {name: [without.sqnr_db[name], with_.sqnr_db[name]]
                        for name in without.sqnr_db}
        self.slices = {name: [list(without.slices[name]), list(with_.slices[name])]
                       for name in without.slices}
        by_task = without.task_drop is not None and with_.task_drop is not None
        self.judged_by = "task" if by_task else "worst output slice"
        self.reason = hurts(without, with_)
        self.reverted = self.reason is not None
        return self.reverted

    def worse(self, tolerance_db: float = 0.05) -> list[str]:
        """Outputs whose SQNR the correction lowered by more than ``tolerance_db``."""
        return [name for name, (a, b) in self.sqnr_db.items()
                if b is not None and (a is None or b < a - tolerance_db)]

    def to_dict(self) -> dict[str, Any]:
        """For report.json (floats rounded to 6 significant digits: stable bytes)."""
        from qtool.analysis.evaluate import _rounded

        return _rounded({"mode": self.mode, "layers": dict(self.layers),
                         "stages": self.stages, "samples": self.samples,
                         "skipped": dict(self.skipped), "sqnr_db": dict(self.sqnr_db),
                         "judged_by": self.judged_by, "slices": dict(self.slices),
                         "reverted": self.reverted, "reason": self.reason,
                         "reverted_layers": list(self.reverted_layers),
                         "noise": dict(self.noise)})
