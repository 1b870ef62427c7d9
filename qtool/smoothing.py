"""SmoothQuant in ``qtool calibrate``: when to apply it, and with which alpha.

``--smoothquant ALPHA`` applies :func:`qtool.passes.smoothquant.smooth` with that alpha to
every activation a MatMul/Gemm reads. ``--smoothquant`` alone searches alpha over
:data:`ALPHAS`: each candidate graph is planned, calibrated and quantized as the run would,
and the one whose quantized outputs are closest to float on the judging data (held out from
calibration) wins. Without the flag, a graph with transformer blocks
(:mod:`qtool.transformer_patterns`) where some MatMul input has outlier channels
(``max / median`` of the channels' largest magnitudes above :data:`OUTLIER_RATIO`) gets the
same search, with "not smoothed" as one more candidate: the default never does worse than no
smoothing on the judging data. ``--smoothquant off`` turns it off.

Which activations: in a transformer, the input of every linear layer (``1/s`` folded where
exact, else an explicit ``Mul``), as NNCF's transformer mode does; the outliers of one
tensor are not the only error that smoothing removes: all-MiniLM-L6-v2 on ``-b onnxruntime``
at alpha 0.8 scores 25.0 dB so, 20.1 dB smoothing only its 4 outlier inputs (the previous
default). Elsewhere (an MLP, a CNN's head) only the inputs with outlier channels take a
``Mul``; the others are smoothed where ``1/s`` folds, so no float op is added where there is
nothing to gain.

The plan keeps SmoothQuant's explicit ``Mul`` nodes float, and the report says what was
smoothed, where ``1/s`` went and each candidate's score.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qtool.errors import PlanError
from qtool.passes.smoothquant import Smoothing, channel_ratio, smooth, smoothing_targets

log = logging.getLogger(__name__)

#: The alphas searched: the SmoothQuant paper's range and 0.9 (NNCF's transformer mode uses
#: 0.95; all-MiniLM-L6-v2 peaks at 0.8: 0.6 23.4, 0.7 24.1, 0.8 25.0, 0.9 23.7, 0.95 23.0 dB).
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: ``max / median`` channel ratio above which an activation has outlier channels.
OUTLIER_RATIO = 20.0
#: The score margin (dB) the default needs over "not smoothed" to apply SmoothQuant.
MIN_GAIN_DB = 0.1
#: ``--smoothquant`` values: search alpha, turn the default off.
SEARCH, OFF = "search", "off"

#: Scores a candidate graph: ``(graph, mul nodes to keep float) -> dB`` (higher is better).
Scorer = Callable[[gs.Graph, tuple[str, ...]], float]


@dataclass
class SmoothQuantChoice:
    """What was decided, for the plan and the report.

    Attributes:
        mode: ``alpha`` (given), ``search`` (``--smoothquant``) or ``default``.
        alpha: The alpha applied, or None (not applied).
        reason: Why, in one sentence.
        scores: Candidate (alpha, or ``off``) -> judging score in dB.
        smoothings: What the pass did.
        outlier_tensors: Activations with outlier channels (ratio), default mode.
    """

    mode: str
    alpha: float | None
    reason: str
    scores: dict[str, float] = field(default_factory=dict)
    smoothings: list[Smoothing] = field(default_factory=list)
    outlier_tensors: dict[str, float] = field(default_factory=dict)

    @property
    def float_muls(self) -> tuple[str, ...]:
        """The explicit Mul nodes the plan keeps float."""
        return tuple(s.mul for s in self.smoothings if s.mul)

    def keep_float(self, plan):
        """``plan`` with SmoothQuant's Mul nodes float (see :func:`keep_float`)."""
        return keep_float(plan, self.float_muls)

    def to_dict(self) -> dict:
        """Plain dict for the report."""
        return {"mode": self.mode, "alpha": self.alpha, "reason": self.reason,
                "scores_db": {k: round(v, 3) for k, v in self.scores.items()},
                "outlier_tensors": {k: round(v, 2) for k, v in self.outlier_tensors.items()},
                "smoothed": [s.to_dict() for s in self.smoothings]}


def keep_float(plan, muls):
    """``plan`` with the Mul nodes ``muls`` float, the reason in its ``float_nodes``."""
    if not muls:
        return plan
    plan = plan.skip(*(f"name:{name}" for name in muls))
    reason = ("SmoothQuant's 1/s: kept float, quantizing its input would bring the outlier "
              "channels back")
    return dataclasses.replace(plan, float_nodes={**plan.float_nodes,
                                                  **dict.fromkeys(muls, reason)})


def parse_smoothquant(value) -> float | str | None:
    """``--smoothquant``'s value: None (default), ``search``, ``off`` or an alpha in [0, 1].

    Raises:
        PlanError: Anything else.
    """
    if value is None or value in (SEARCH, OFF):
        return value
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = float("nan")
    if not 0.0 <= alpha <= 1.0:
        raise PlanError(f"--smoothquant {value!r}: not an alpha in [0, 1]",
                        "give an alpha such as 0.5, nothing (to search it), or 'off'")
    return alpha


def choose_smoothing(graph: gs.Graph, setting, channel_stats: Callable[[list[str]], Mapping],
                     score: Scorer, *, transformer: bool) -> tuple[gs.Graph, SmoothQuantChoice]:
    """Apply SmoothQuant as ``setting`` says (see the module docstring).

    Args:
        graph: The prepared float graph (not changed; a smoothed copy is returned).
        setting: :func:`parse_smoothquant`'s value.
        channel_stats: ``tensors -> {tensor: max |x| per channel}`` on the calibration data.
        score: Judges a candidate graph (quantized the run's way) on the judging data.
        transformer: The graph has transformer blocks (the default's precondition).

    Returns:
        ``(graph, choice)``: the graph to quantize (``graph`` itself when not smoothed).
    """
    if setting == OFF:
        return graph, SmoothQuantChoice("off", None, "--smoothquant off")
    from qtool.graph_walk import name_nodes

    name_nodes(graph)  # the report names the readers and the nodes 1/s went into
    targets = list(smoothing_targets(graph))
    if setting is None and not transformer:
        return graph, SmoothQuantChoice("default", None, "no transformer blocks found")
    if not targets:
        return graph, SmoothQuantChoice(_mode(setting), None,
                                        "no MatMul/Gemm reads an activation")
    stats = channel_stats(targets)
    ratios = {name: channel_ratio(stats[name]) for name in targets if name in stats}
    outliers = {n: r for n, r in ratios.items() if r > OUTLIER_RATIO}
    if setting is None and not outliers:
        return graph, SmoothQuantChoice(
            "default", None, f"no MatMul input has outlier channels (max/median channel "
            f"ratio {max(ratios.values(), default=0):.1f} <= {OUTLIER_RATIO:g})")
    # In a transformer every linear layer's input is smoothed, with an explicit Mul where 1/s
    # does not fold (NNCF's transformer mode does the same): all-MiniLM-L6-v2, alpha 0.8 on
    # -b onnxruntime, 25.0 dB against 20.1 smoothing only the 4 outlier inputs.
    explicit = None if transformer else outliers
    if isinstance(setting, float):
        smoothed, done = smooth(graph.copy(), stats, setting, explicit=explicit)
        return smoothed, SmoothQuantChoice("alpha", setting, f"--smoothquant {setting:g}",
                                           smoothings=done, outlier_tensors=outliers)
    return _search(graph, stats, score, default=setting is None, outliers=outliers,
                   explicit=explicit)


def _search(graph, stats, score: Scorer, *, default: bool, outliers, explicit):
    """The best of :data:`ALPHAS` (and, for the default, of not smoothing) by ``score``.

    ``explicit``: the activations that may take an explicit ``Mul`` (None: all); the others
    are smoothed only where ``1/s`` folds.
    """
    scores: dict[str, float] = {}
    best = (None, -np.inf, graph, [])
    if default:
        scores["off"] = score(graph, ())
        best = (None, scores["off"] + MIN_GAIN_DB, graph, [])
    for alpha in ALPHAS:
        candidate, done = smooth(graph.copy(), stats, alpha, explicit=explicit)
        value = score(candidate, tuple(s.mul for s in done if s.mul))
        scores[f"{alpha:g}"] = value
        log.info("smoothquant alpha %g: %.2f dB", alpha, value)
        if value > best[1]:
            best = (alpha, value, candidate, done)
    alpha, _, chosen, done = best
    mode = "default" if default else SEARCH
    if alpha is None:
        reason = (f"{len(outliers)} MatMul input(s) with outlier channels, but no alpha beat "
                  f"the unsmoothed model on the judging data by {MIN_GAIN_DB:g} dB")
    else:
        why = (f"{len(outliers)} MatMul input(s) of transformer blocks have outlier channels "
               f"(max/median channel ratio > {OUTLIER_RATIO:g}); " if default else "")
        reason = f"{why}alpha {alpha:g} scored best on the judging data"
    return chosen, SmoothQuantChoice(mode, alpha, reason, scores, list(done), outliers)


def _mode(setting) -> str:
    return "default" if setting is None else SEARCH if setting == SEARCH else "alpha"
