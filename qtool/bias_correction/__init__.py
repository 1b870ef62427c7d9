r"""Empirical bias correction of quantized layers.

Nagel et al. 2019; AIMET's empirical bias correction, NNCF's FastBiasCorrection.

Quantizing a layer's weights (and everything upstream) shifts the mean of its output: the
rounding errors of a channel's weights do not cancel, and the next layers read a biased
input. For each Conv/Gemm (or MatMul + Add of a constant) whose weight is quantized, in
topological order, with every layer upstream already corrected, the per-channel mean of the
error on the calibration data

    delta_c = E[y_float_c] - E[y_quant_c]     (mean over rows and spatial positions)

is added to the layer's bias (a zero bias is created where the layer has none), so that the
corrected quantized model has the float model's mean at every corrected layer's output.
Correcting a layer changes what its downstream layers see, not what any layer upstream or
beside it sees. The modes (:data:`MODES`):

* ``exact`` (:mod:`.one_pass`): the quantized graph runs once, in segments that each end at
  the next layer to correct, on the activations the segments before it stored
  (:mod:`.store`); each layer is measured with every layer before it corrected. Graphs with
  subgraphs go stage by stage instead (:mod:`.staged`: one pass of the quantized prefix per
  layer depth, the reference the benchmark measures against).
* ``fast`` (:mod:`.fast`): one float pass for each layer's mean input; each layer's own
  weight error on it (NNCF's FastBiasCorrection).

The rows read (:mod:`.rows`), the per-channel means (:mod:`.means`), the layers and their
biases (:mod:`.layers`), and the revert of a correction the held-out judge finds hurts
(:mod:`.revert`) have their own modules; :class:`BiasCorrection` (:mod:`.report`) is what
report.json records. Int32 biases are re-quantized from the corrected float bias with the
layer's ``s_in * s_w``, so the residual mean error is below half a bias step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qtool.bias_correction.fast import correct_fast
from qtool.bias_correction.layers import has_bodies, plan_biases, target_of
from qtool.bias_correction.means import channel_means, input_means
from qtool.bias_correction.one_pass import correct_one_pass
from qtool.bias_correction.report import BiasCorrection
from qtool.bias_correction.revert import keep_what_helps, layers_behind_slice
from qtool.bias_correction.rows import (
    DEFAULT_MAX_SAMPLES,
    MORE_SAMPLES,
    capped,
    more_rows,
    spread,
    with_more,
)
from qtool.bias_correction.staged import correct_staged
from qtool.graph_walk import name_nodes
from qtool.io import load, serialize

log = logging.getLogger(__name__)
MODES = ("exact", "fast", "off")
#: What ``--bias-correction`` (or ``bias_correction: true``) means.
DEFAULT_MODE = "exact"

__all__ = ["DEFAULT_MAX_SAMPLES", "DEFAULT_MODE", "MODES", "MORE_SAMPLES", "BiasCorrection",
           "channel_means", "correct_biases", "correction_mode", "input_means",
           "keep_what_helps", "layers_behind_slice", "more_rows", "spread"]


def correction_mode(value: bool | str | None) -> str | None:
    """The mode an option value asks for (True: the default; False, None, ``off``: None).

    Raises:
        PlanError: An unknown mode.
    """
    from qtool.errors import PlanError

    if value is True:
        return DEFAULT_MODE
    if value in (False, None, "off"):
        return None
    if value not in MODES:
        raise PlanError(f"unknown bias correction mode {value!r}",
                        f"choose one of: {', '.join(MODES)}")
    return value


def correct_biases(graph: gs.Graph, backend, ranges: Mapping[str, Any], plan,
                   batches: Callable[[], Iterable[Mapping[str, np.ndarray]]], *,
                   weight_method: str = "minmax", activation_method: str | None = None,
                   mode: str = "exact", max_samples: int | None = None,
                   memory_budget: int | None = None,
                   more_batches: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None):
    """Quantize ``graph`` with the biases corrected (see the module docstring).

    Args:
        graph: The prepared float graph; not modified (a corrected copy is quantized).
        backend: Backend name or object.
        ranges: Activation ranges from calibration.
        plan: The plan to apply.
        batches: Calibration data: a callable giving fresh batches on every call.
        weight_method: Observer for the weight ranges.
        activation_method: The calibration method (named in vendor files).
        mode: ``exact`` (one pass of the quantized prefix per layer depth) or ``fast`` (one
            float pass; each layer's own error on its mean input).
        max_samples: Read at most this many rows (whole batches; None: all).
        memory_budget: Bytes of stored activations ``exact`` keeps in memory; the rest goes
            to temporary files (None: no limit).
        more_batches: Further rows read after ``batches`` where each row is small, up to
            :data:`~qtool.bias_correction.rows.MORE_ELEMENTS` input elements
            (:func:`~qtool.bias_correction.rows.more_rows` picks them; None: none).

    Returns:
        ``(result, report)``: the :class:`qtool.qdq.QuantizedModel` of the corrected graph
        and a :class:`BiasCorrection`.
    """
    from qtool.backends import resolve_backend
    from qtool.qdq import quantize

    if mode not in ("fast", "exact", "staged"):
        raise ValueError(f"bias correction mode {mode!r}: fast or exact")
    backend = resolve_backend(backend)
    work = load(serialize(graph), check=False)  # prepared and checked already
    name_nodes(work)
    quantized_weights = {e.tensor for e in plan.entries("weight")}
    report = BiasCorrection(mode=mode)
    targets = []
    for node in work.nodes:
        target, why = target_of(node, quantized_weights)
        if target is not None:
            targets.append(target)
        elif why:
            report.skipped[node.name] = why
    if not targets:
        return quantize(work, backend, ranges, plan=plan, weight_method=weight_method,
                        activation_method=activation_method), report
    # a layer without a bias gets a zero one now, planned like the others (an int32 bias on
    # the engines that add it in the accumulator), so correcting it changes only its values
    plan = plan_biases(plan, backend, [t for t in targets if t.bias_added()])
    batches = with_more(capped(batches, max_samples, work), more_batches, work)

    def quantized():
        return quantize(work, backend, ranges, plan=plan, weight_method=weight_method,
                        activation_method=activation_method)

    if mode == "fast":
        correct_fast(work, targets, quantized(), batches, report)
    elif mode == "staged" or has_bodies(work):  # outer-scope reads in bodies: no cuts
        correct_staged(work, targets, quantized, batches, report)
    else:
        correct_one_pass(work, targets, quantized(), batches, report, memory_budget)
    # the final model comes out of quantize() like any other, from the corrected float graph
    result = quantized()
    log.info("bias correction (%s): %d layers in %d stages", mode, len(report.layers),
             report.stages)
    return result, report


