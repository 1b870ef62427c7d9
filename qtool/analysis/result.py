"""What one analysis measured, as it goes into report.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qtool.analysis.fallback import Fallback
from qtool.analysis.sensitivity import LayerSensitivity
from qtool.analysis.tensors import Histogram, TensorError


@dataclass
class Analysis:
    """Everything :func:`analyze` measured; ``to_dict`` goes into report.json.

    Attributes:
        samples: Rows of data analysed.
        tensors: Accumulated error per quantized tensor, graph order.
        layers: Sensitivity per layer, worst first (empty unless asked).
        histograms: Histograms of the worst activations.
        fallback: The float fallback, if a target was given.
        method_choice: ``--method auto``'s choice per tensor, if used.
        level: The ``--analysis`` level that ran (``none``, ``summary``, ``full``).
        judged_on: The data every choice and the summary were judged on.
        search: The cost of the fallback / sensitivity search (candidates evaluated, rows
            each), if one ran.
    """

    samples: int
    tensors: list[TensorError]
    layers: list[LayerSensitivity] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)
    fallback: Fallback | None = None
    method_choice: dict[str, Any] | None = None
    level: str = "full"
    judged_on: str | None = None
    search: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, floats rounded to 6 significant digits (stable bytes)."""
        from qtool.analysis.evaluate import _rounded

        return _rounded({
            "level": self.level,
            "judged_on": self.judged_on,
            "samples": self.samples,
            "tensors": [dataclasses.asdict(t) for t in self.tensors],
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "histograms": [dataclasses.asdict(h) for h in self.histograms],
            "fallback": self.fallback.to_dict() if self.fallback else None,
            "method_choice": self.method_choice,
            "search": self.search,
        })
