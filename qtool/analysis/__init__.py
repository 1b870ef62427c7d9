r"""Accuracy analysis: where the quantization error comes from, and which layers to keep float.

For a float tensor ``x`` and its quantized counterpart ``q`` (all elements of all batches)

    SQNR (dB) = 10 * log10( sum(x^2) / sum((x - q)^2) ),   cosine = sum(x q) / |x| |q|

(:mod:`qtool.analysis.evaluate` has the same definitions). Three measurements use them:

What runs is bounded: ``--analysis summary`` (the default) compares only the model outputs,
streamed over the evaluation data; ``--analysis full`` adds the accumulated error of every
quantized tensor below; ``none`` skips both. Every choice (the float fallback, ``--method
auto``) and the summary are judged on ``--eval-data``, or on a held-out split of the
calibration data (:mod:`~qtool.analysis.holdout`).

* **Accumulated error of a quantized tensor.** The float graph and the quantized graph run
  side by side in onnxruntime (optimizations off) over the data, batch by batch; for every
  planned activation ``t``, ``x`` is ``t`` in the float graph and ``q`` the output of its
  DequantizeLinear in the quantized graph: the rounding and clipping of ``t`` itself plus
  everything that went wrong upstream. Weights compare the initializer with its
  fake-quantized copy. Only running sums and a fixed-size histogram per activation are kept:
  memory does not grow with the data.
* **Sensitivity of a layer.** A layer is a node that reads at least one quantized tensor (a
  consumer in the plan). Its sensitivity is the SQNR of the model outputs (the worst output)
  when *only* that layer's inputs (activation, weight, int32 bias) are quantized, with the
  activation ranges the full plan gives them (members of a shared-scale group keep the
  group's union range). A low value means: this layer alone costs that much accuracy.
* **Float fallback.** Layers sorted by sensitivity, worst first; the ``k`` worst are kept
  float for ``k = 0, 1, 2, ...`` (greedy, one evaluation per step) until the model meets
  the target: output SQNR ``>= target_sqnr`` dB and/or top-1 accuracy no more than
  ``max_accuracy_drop`` percentage points below the float model's (labels needed; with a
  task, its drop: the CER rise, 100 - mAP@0.5, :mod:`~qtool.analysis.tasks`). Then each
  kept layer but the last is tried quantized again, in the same order, and stays quantized
  if the target still holds: no layer of the result can be quantized alone without missing
  the target. The result is the plan with those layers skipped
  (:meth:`qtool.plan.QuantPlan.skip`), each float node carrying the reason.

The family, one module per job:

* :mod:`~qtool.analysis.evaluate`: float vs quantized outputs (SQNR, cosine, top-1) on data;
* :mod:`~qtool.analysis.tasks`: task metrics beside SQNR (top-1, CER after CTC decoding,
  mAP@0.5 against the float detections) that judge the fallback with ``--task``;
* :mod:`~qtool.analysis.tensors`: accumulated error per quantized tensor, histograms;
* :mod:`~qtool.analysis.sensitivity`: each layer quantized alone;
* :mod:`~qtool.analysis.fallback`: the float fallback search to a target;
* :mod:`~qtool.analysis.autoselect`: ``--method auto``, the least-error observer per tensor;
* :mod:`~qtool.analysis.compare`: backend x method tables and precision sweeps;
* :mod:`~qtool.analysis.reference`: float outputs computed once, to judge many candidates;
* :mod:`~qtool.analysis.holdout`: the held-out split of the calibration data;
* :mod:`~qtool.analysis.result`: what one run measured, for report.json.
"""

from qtool.analysis.evaluate import Evaluation, evaluate, rebatch
from qtool.analysis.fallback import Fallback, FallbackStep, float_fallback
from qtool.analysis.reference import FloatReference
from qtool.analysis.result import Analysis
from qtool.analysis.sensitivity import (
    LayerSensitivity,
    accuracy_drop,
    keep_float,
    layer_sensitivity,
    layers_of,
    model_sqnr,
)
from qtool.analysis.tensors import Histogram, TensorError, clip_range, tensor_errors

__all__ = [
    "Analysis",
    "Evaluation",
    "Fallback",
    "FallbackStep",
    "FloatReference",
    "Histogram",
    "LayerSensitivity",
    "TensorError",
    "accuracy_drop",
    "clip_range",
    "evaluate",
    "float_fallback",
    "keep_float",
    "layer_sensitivity",
    "layers_of",
    "model_sqnr",
    "rebatch",
    "tensor_errors",
]
