"""Sensitivity of each layer: the model outputs with only that layer quantized.

The float outputs are computed once (:class:`qtool.analysis.reference.FloatReference`);
each layer then costs one quantization and one run of its candidate over the judged rows.
Layers are ranked worst first: by the task metric's drop when a task judges
(:mod:`qtool.analysis.tasks`; ties, such as the many layers that lose nothing, by SQNR), else
by the output SQNR.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qtool.analysis.common import Batches, sort_db
from qtool.analysis.evaluate import Evaluation
from qtool.analysis.reference import FloatReference

log = logging.getLogger(__name__)


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
        task_drop: Points that model loses on the task (CER rise, 100 - mAP, accuracy
            drop; :mod:`qtool.analysis.tasks`), when a task judges.
    """

    node: str
    op: str
    tensors: list[str]
    sqnr_db: float | None
    cosine: float
    accuracy: float | None = None
    task_drop: float | None = None


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
    """Points lost: the task's drop with a task, else float minus quantized top-1 accuracy.

    None where the data cannot tell (top-1 without labels).
    """
    if evaluation.task is not None:
        return evaluation.task.drop
    accuracy = evaluation.accuracy
    if accuracy is None:
        return None
    return 100.0 * (accuracy[0] - accuracy[1])


def layer_sensitivity(float_graph, result, batches: Batches | None = None, *,
                      reference: FloatReference | None = None,
                      max_samples: int | None = None, task=None,
                      executor=None) -> list[LayerSensitivity]:
    """Quantize each layer alone and measure the model outputs (see the module docstring).

    Args:
        float_graph: The prepared float graph ``result`` was made from.
        result: The fully quantized :class:`qtool.qdq.QuantizedModel`.
        batches: Data batches (labels optional), re-iterable or a callable returning them;
            not needed with ``reference``.
        reference: Float outputs computed once, shared with other searches.
        max_samples: Judge on at most this many rows of ``batches`` (None: all).
        task: A task (name or :class:`~qtool.analysis.tasks.Task`) to rank by; not needed
            with ``reference`` (its task judges).
        executor: A :class:`qtool.executor.Executor` whose workers judge the layers
            (:mod:`qtool.analysis.candidates`); None: here, one after the other. The
            result is the same either way.

    Returns:
        One entry per layer, worst first (largest task drop, then lowest SQNR); ties by
        node name.
    """
    from qtool.analysis.candidates import CandidateJob, judge_plans
    from qtool.io import serialize
    from qtool.providers import current

    if reference is None:
        reference = FloatReference(float_graph, batches, max_samples=max_samples, task=task)
    plan = result.plan
    layers = layers_of(plan)
    union = {
        name: (float(qp.lo), float(qp.hi))
        for name, qp in result.qparams.items()
        if qp.role == "activation"
    }
    job = CandidateJob(serialize(float_graph), result.backend, union, result.weight_method,
                       reference, current())
    alone = [keep_float(plan, [n for n in layers if n != node]) for node in layers]
    evaluations = judge_plans(job, alone, executor, desc="sensitivity", graph=float_graph)
    sensitivity = []
    for (node, tensors), evaluation in zip(layers.items(), evaluations, strict=True):
        cosine = min(o.cosine for o in evaluation.outputs)
        accuracy = evaluation.accuracy
        sensitivity.append(LayerSensitivity(
            node, plan.nodes.get(node, "?"), list(tensors), model_sqnr(evaluation), cosine,
            accuracy[1] if accuracy else None,
            evaluation.task.drop if evaluation.task is not None else None,
        ))
        log.debug("layer %s alone: %s dB", node, sensitivity[-1].sqnr_db)
    sensitivity.sort(key=lambda s: (-(s.task_drop or 0.0), sort_db(s.sqnr_db), s.node))
    return sensitivity
