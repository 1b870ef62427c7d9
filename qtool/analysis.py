r"""Accuracy analysis: where the quantization error comes from, and which layers to keep float.

For a float tensor ``x`` and its quantized counterpart ``q`` (all elements of all batches)

    SQNR (dB) = 10 * log10( sum(x^2) / sum((x - q)^2) ),   cosine = sum(x q) / |x| |q|

(:class:`qtool.evaluate` has the same definitions). Three measurements use them:

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
  float for ``k = 0, 1, 2, ...`` (greedy, one full evaluation per step) until the model meets
  the target: output SQNR ``>= target_sqnr`` dB and/or top-1 accuracy no more than
  ``max_accuracy_drop`` percentage points below the float model's (labels needed). Then each
  kept layer but the last is tried quantized again, in the same order, and stays quantized
  if the target still holds: no layer of the result can be quantized alone without missing
  the target. The result is the plan with those layers skipped
  (:meth:`qtool.plan.QuantPlan.skip`), each float node carrying the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qtool.errors import DataError, PlanError
from qtool.evaluate import LABELS_KEY, Evaluation, _ErrorSums, evaluate
from qtool.io import load_model, serialize

log = logging.getLogger(__name__)

#: Worst activations whose histograms go into the report.
HISTOGRAMS = 3
#: Bins of the streamed histograms, and at most this many bins shown.
HISTOGRAM_BINS = 1024
DISPLAY_BINS = 64

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]] | Sequence[Mapping[str, np.ndarray]]


@dataclass
class TensorError:
    """Accumulated error of one quantized tensor (see the module docstring).

    Attributes:
        tensor: Tensor name in the float graph.
        role: ``activation`` or ``weight``.
        consumers: Nodes that read the quantized value.
        sqnr_db: SQNR in dB; None when the values are equal.
        cosine: Cosine similarity.
        max_abs_error: Largest absolute difference.
    """

    tensor: str
    role: str
    consumers: list[str]
    sqnr_db: float | None
    cosine: float
    max_abs_error: float


@dataclass
class LayerSensitivity:
    """Model-output error when only one layer is quantized.

    Attributes:
        node: Node name.
        op: Its op type.
        tensors: The quantized tensors it reads (activations, weight, bias).
        sqnr_db: Worst output SQNR of the model with only this layer quantized.
        cosine: Worst output cosine.
        accuracy: Top-1 accuracy of that model (with labels).
    """

    node: str
    op: str
    tensors: list[str]
    sqnr_db: float | None
    cosine: float
    accuracy: float | None = None


@dataclass
class Histogram:
    """The float values of one activation over the data, and the clip range it got.

    Attributes:
        tensor: Tensor name.
        left: Left edge of the first bin.
        width: Bin width.
        counts: Counts per bin (at most :data:`DISPLAY_BINS`).
        min: Smallest value seen.
        max: Largest value seen.
        clip: ``[lo, hi]``: the range its scale and zero point represent.
        sqnr_db: Its accumulated SQNR.
    """

    tensor: str
    left: float
    width: float
    counts: list[int]
    min: float
    max: float
    clip: list[float]
    sqnr_db: float | None


@dataclass
class FallbackStep:
    """One step of the greedy search: which layers were float and what the model scored."""

    float_layers: list[str]
    sqnr_db: float | None
    accuracy_drop: float | None
    met: bool


@dataclass
class Fallback:
    """The result of :func:`float_fallback`.

    Attributes:
        target_sqnr_db: The SQNR target, or None.
        max_accuracy_drop: The accuracy target in percentage points, or None.
        float_layers: Layers kept float, in the order they were added.
        met: Whether the target was met (False: every layer float and still not met).
        steps: Every evaluation of the search.
        plan: The plan with ``float_layers`` skipped.
    """

    target_sqnr_db: float | None
    max_accuracy_drop: float | None
    float_layers: list[str]
    met: bool
    steps: list[FallbackStep]
    plan: Any = field(repr=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the plan is written separately as plan.json)."""
        data = dataclasses.asdict(self)
        data.pop("plan")
        return data


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
    """

    samples: int
    tensors: list[TensorError]
    layers: list[LayerSensitivity] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)
    fallback: Fallback | None = None
    method_choice: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, floats rounded to 6 significant digits (stable bytes)."""
        from qtool.evaluate import _rounded

        return _rounded({
            "samples": self.samples,
            "tensors": [dataclasses.asdict(t) for t in self.tensors],
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "histograms": [dataclasses.asdict(h) for h in self.histograms],
            "fallback": self.fallback.to_dict() if self.fallback else None,
            "method_choice": self.method_choice,
        })


# ------------------------------------------------------------------------------- layers


def layers_of(plan) -> dict[str, list[str]]:
    """Layer (consumer node) -> the quantized tensors it reads, in plan order."""
    layers: dict[str, list[str]] = {}
    for entry in plan.tensors.values():
        for node in entry.consumers:
            layers.setdefault(node, []).append(entry.tensor)
    return layers


def keep_float(plan, nodes: Sequence[str], reasons: Mapping[str, str] | None = None):
    """``plan`` with ``nodes`` skipped (exact names), each float node given its reason."""
    if not nodes:
        return plan
    skipped = plan.skip(*(f"name:{n}" for n in nodes))
    if not reasons:
        return skipped
    float_nodes = dict(skipped.float_nodes)
    for node in nodes:
        if node in reasons and node in float_nodes:
            float_nodes[node] = reasons[node]
    return dataclasses.replace(skipped, float_nodes=float_nodes)


def model_sqnr(evaluation: Evaluation) -> float | None:
    """The worst output SQNR of an evaluation (None: every output exact)."""
    values = [o.sqnr_db for o in evaluation.outputs if o.sqnr_db is not None]
    return min(values) if values else None


def accuracy_drop(evaluation: Evaluation) -> float | None:
    """Float minus quantized top-1 accuracy in percentage points (None without labels)."""
    accuracy = evaluation.accuracy
    if accuracy is None:
        return None
    return 100.0 * (accuracy[0] - accuracy[1])


def layer_sensitivity(float_graph, result, batches: Batches) -> list[LayerSensitivity]:
    """Quantize each layer alone and measure the model outputs (see the module docstring).

    Args:
        float_graph: The prepared float graph ``result`` was made from.
        result: The fully quantized :class:`qtool.qdq.QuantizedModel`.
        batches: Data batches (labels optional), re-iterable or a callable returning them.

    Returns:
        One entry per layer, worst (lowest SQNR) first; ties by node name.
    """
    from qtool.qdq import quantize

    plan = result.plan
    layers = layers_of(plan)
    union = {
        name: (float(qp.lo), float(qp.hi))
        for name, qp in result.qparams.items()
        if qp.role == "activation"
    }
    reference = load_model(float_graph)
    sensitivity = []
    for node, tensors in layers.items():
        alone = keep_float(plan, [n for n in layers if n != node])
        quantized = quantize(float_graph, result.backend, union, plan=alone,
                             weight_method=result.weight_method)
        evaluation = evaluate(reference, quantized.graph, _iterate(batches))
        cosine = min(o.cosine for o in evaluation.outputs)
        accuracy = evaluation.accuracy
        sensitivity.append(LayerSensitivity(
            node, plan.nodes.get(node, "?"), list(tensors), model_sqnr(evaluation), cosine,
            accuracy[1] if accuracy else None,
        ))
        log.debug("layer %s alone: %s dB", node, sensitivity[-1].sqnr_db)
    sensitivity.sort(key=lambda s: (_sort_db(s.sqnr_db), s.node))
    return sensitivity


def float_fallback(
    float_graph,
    backend,
    plan,
    ranges: Mapping[str, Any],
    sensitivity: Sequence[LayerSensitivity],
    batches: Batches,
    *,
    target_sqnr: float | None = None,
    max_accuracy_drop: float | None = None,
    weight_method: str = "minmax",
) -> Fallback:
    """Keep the most sensitive layers float, greedily, until the target is met.

    Args:
        float_graph: The prepared float graph.
        backend: Backend name or object.
        plan: The full plan.
        ranges: Calibrated activation ranges for ``plan``.
        sensitivity: From :func:`layer_sensitivity` (worst first).
        batches: Data to judge the target on (with labels for ``max_accuracy_drop``).
        target_sqnr: Required worst output SQNR in dB.
        max_accuracy_drop: Allowed top-1 accuracy drop in percentage points.
        weight_method: Observer of the weight ranges.

    Returns:
        The :class:`Fallback`; ``met`` is False if even all layers float miss the target.

    Raises:
        PlanError: No target given.
        DataError: ``max_accuracy_drop`` without labels in the data.
    """
    from qtool.qdq import quantize

    if target_sqnr is None and max_accuracy_drop is None:
        raise PlanError("float fallback needs a target", "give target_sqnr or max_accuracy_drop")
    reference = load_model(float_graph)
    order = [s.node for s in sensitivity]
    reasons = {
        s.node: (
            f"kept float to meet {_target_text(target_sqnr, max_accuracy_drop)}: quantized "
            f"alone it gives {_db_text(s.sqnr_db)} output SQNR (rank {rank} of {len(order)})"
        )
        for rank, s in enumerate(sensitivity, start=1)
    }
    steps: list[FallbackStep] = []

    def judge(layers: list[str]):
        candidate = keep_float(plan, layers, reasons)
        quantized = quantize(float_graph, backend, ranges, plan=candidate,
                             weight_method=weight_method)
        evaluation = evaluate(reference, quantized.graph, _iterate(batches))
        sqnr, drop = model_sqnr(evaluation), accuracy_drop(evaluation)
        if max_accuracy_drop is not None and drop is None:
            raise DataError(
                "--max-accuracy-drop needs labels in the evaluation data",
                "give an .npz with a 'labels' array (one class per sample), or use "
                "--target-sqnr",
            )
        met = (target_sqnr is None or _sort_db(sqnr) >= target_sqnr) and (
            max_accuracy_drop is None or drop <= max_accuracy_drop + 1e-9
        )
        steps.append(FallbackStep(list(layers), sqnr, drop, met))
        log.info("fallback with %d float layer(s): %s dB, drop %s", len(layers), sqnr, drop)
        return met, candidate

    for k in range(len(order) + 1):
        met, candidate = judge(order[:k])
        if met:
            break
    else:
        log.warning("the target %s is not met even with every layer float",
                    _target_text(target_sqnr, max_accuracy_drop))
        return Fallback(target_sqnr, max_accuracy_drop, list(order), False, steps, candidate)
    # Prune: a layer added early may be unnecessary once later ones are float. The last one
    # added is needed (the prefix without it missed the target); try the others.
    kept = list(order[:k])
    for node in list(kept[:-1]):
        trial = [n for n in kept if n != node]
        trial_met, trial_plan = judge(trial)
        if trial_met:
            kept, candidate = trial, trial_plan
    return Fallback(target_sqnr, max_accuracy_drop, kept, True, steps, candidate)


# ------------------------------------------------------------------------ tensor errors


def tensor_errors(
    float_graph, result, batches: Batches, *, histograms: int = HISTOGRAMS
) -> tuple[int, list[TensorError], list[Histogram]]:
    """Accumulated error of every quantized activation and weight (see the module docstring).

    Args:
        float_graph: The prepared float graph.
        result: The :class:`qtool.qdq.QuantizedModel` to judge.
        batches: Data batches.
        histograms: How many of the worst activations get a histogram.

    Returns:
        ``(samples, errors, histograms)``: errors in plan order, histograms worst first.
    """
    from qtool.calibration.observers import HistogramObserver

    plan = result.plan
    activations = [e for e in plan.entries("activation")]
    float_proto = load_model(float_graph)
    quant_proto = load_model(serialize(result.graph))
    inputs = [i.name for i in float_proto.graph.input
              if i.name not in {t.name for t in float_proto.graph.initializer}]
    float_fetch = [e.tensor for e in activations if e.tensor not in inputs]
    quant_fetch = [f"{e.tensor}_dequantized" for e in activations]
    float_session = _session(_exposed(float_proto, float_fetch))
    quant_session = _session(_exposed(quant_proto, quant_fetch))
    sums = {e.tensor: _ErrorSums() for e in activations}
    observed = {e.tensor: HistogramObserver(None, e.tensor, bins=HISTOGRAM_BINS)
                for e in activations}
    samples = 0
    for index, batch in enumerate(_iterate(batches)):
        feeds = _feeds(batch, inputs, index)
        samples += int(next(iter(feeds.values())).shape[0])
        float_values = dict(zip(float_fetch, float_session.run(float_fetch, feeds), strict=True))
        float_values.update({n: feeds[n] for n in inputs})
        quant_values = quant_session.run(quant_fetch, feeds) if quant_fetch else []
        for entry, q in zip(activations, quant_values, strict=True):
            x = float_values[entry.tensor]
            sums[entry.tensor].update(x, q)
            observed[entry.tensor].update(x)
    if samples == 0:
        raise DataError("the analysis data is empty", "give at least one sample")

    errors = []
    for entry in plan.tensors.values():
        if entry.role == "bias":
            continue
        if entry.role == "weight":
            s = _ErrorSums()
            qp = result.qparams[entry.tensor]
            values = np.asarray(_initializer(float_proto, entry.tensor), dtype=np.float32)
            s.update(values, entry.scheme.fake_quantize(values, qp.scale, qp.zero_point))
        else:
            s = sums[entry.tensor]
        errors.append(TensorError(entry.tensor, entry.role, list(entry.consumers), s.sqnr_db,
                                  s.cosine, s.max_abs))
    worst = sorted(
        (e for e in errors if e.role == "activation"),
        key=lambda e: (_sort_db(e.sqnr_db), e.tensor),
    )[:histograms]
    shown = [_histogram(observed[e.tensor], result.qparams[e.tensor], e.sqnr_db) for e in worst]
    return samples, errors, shown


def clip_range(qp) -> tuple[float, float]:
    """The range a per-tensor scale and zero point represent: ``s(qmin - z) .. s(qmax - z)``."""
    scale, zero_point = float(qp.scale), int(qp.zero_point)
    return scale * (qp.scheme.qmin - zero_point), scale * (qp.scheme.qmax - zero_point)


def _histogram(observer, qp, sqnr_db) -> Histogram:
    """The observer's histogram merged into at most :data:`DISPLAY_BINS` bins."""
    counts = observer.counts[0]
    nonzero = np.flatnonzero(counts)
    first, last = int(nonzero[0]), int(nonzero[-1])
    factor = max(1, math.ceil((last - first + 1) / DISPLAY_BINS))
    used = counts[first : last + 1]
    padded = np.zeros(math.ceil(len(used) / factor) * factor, dtype=np.int64)
    padded[: len(used)] = used
    merged = padded.reshape(-1, factor).sum(axis=1)
    width = observer.width(0)
    left = float(observer.edges_left(0)[first])
    lo, hi = clip_range(qp)
    return Histogram(qp.tensor, left, width * factor, [int(c) for c in merged],
                     float(observer.min_val[0]), float(observer.max_val[0]), [lo, hi], sqnr_db)


# ---------------------------------------------------------------------------- helpers


def _iterate(batches: Batches) -> Iterable[Mapping[str, np.ndarray]]:
    return batches() if callable(batches) else batches


def _sort_db(value: float | None) -> float:
    return math.inf if value is None else value


def _db_text(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f} dB"


def _target_text(target_sqnr: float | None, max_accuracy_drop: float | None) -> str:
    parts = []
    if target_sqnr is not None:
        parts.append(f"output SQNR >= {target_sqnr:g} dB")
    if max_accuracy_drop is not None:
        parts.append(f"accuracy drop <= {max_accuracy_drop:g} pts")
    return " and ".join(parts)


def _initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    for init in proto.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    raise PlanError(f"weight {name} is not an initializer of the float model")


def _exposed(proto: onnx.ModelProto, names: Sequence[str]) -> bytes:
    """The model with ``names`` added as graph outputs, serialized."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy.SerializeToString()


def _session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _feeds(batch: Mapping[str, np.ndarray], inputs: Sequence[str], index: int):
    feeds = {}
    for name in inputs:
        if name not in batch:
            raise DataError(
                f"batch {index} has no array for input {name!r} (it has: "
                f"{', '.join(sorted(k for k in batch if k != LABELS_KEY)) or 'nothing'})",
                "key the arrays by the model's input names",
            )
        array = np.asarray(batch[name])
        feeds[name] = array.astype(np.float32) if array.dtype == np.float64 else array
    return feeds


__all__ = [
    "Analysis",
    "Fallback",
    "FallbackStep",
    "Histogram",
    "LayerSensitivity",
    "TensorError",
    "clip_range",
    "float_fallback",
    "keep_float",
    "layer_sensitivity",
    "layers_of",
    "tensor_errors",
]
