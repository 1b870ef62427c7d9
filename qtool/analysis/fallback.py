"""Float fallback: keep the most sensitive layers float, greedily, until a target is met.

The cost is bounded: the fully quantized model is judged first and the search stops there
when it meets the target (the layer sensitivity, one candidate per layer, is then never
computed); the float outputs are computed once (:class:`~qtool.analysis.reference.FloatReference`)
and every candidate runs over the same bounded slice of the judging data.

The accuracy target (``max_accuracy_drop``, points) is judged by the task's metric when a
task is given (:mod:`qtool.analysis.tasks`: CER rise for ``ctc``, 100 - mAP@0.5 against the
float detections for ``detect``, neither needs labels), else by the top-1 accuracy against
the labels; :attr:`Fallback.judged_by` says which.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qtool.analysis.common import Batches, db_text, sort_db
from qtool.analysis.reference import FloatReference
from qtool.analysis.sensitivity import LayerSensitivity, accuracy_drop, keep_float, model_sqnr
from qtool.errors import DataError, PlanError

log = logging.getLogger(__name__)

#: Activation bits the fallback tries before float, where the backend runs them (A16W8).
WIDE_ACTIVATION_BITS = 16


@dataclass
class FallbackStep:
    """One step of the search: which layers were float or 16-bit, what the model scored."""

    float_layers: list[str]
    sqnr_db: float | None
    accuracy_drop: float | None
    met: bool
    wide_layers: list[str] = field(default_factory=list)


@dataclass
class Fallback:
    """The result of :func:`float_fallback`.

    Attributes:
        target_sqnr_db: The SQNR target, or None.
        max_accuracy_drop: The accuracy target in percentage points, or None.
        float_layers: Layers kept float, in the order they were added.
        met: Whether the target was met (False: every layer float and still not met).
        wide_layers: Layers whose activation inputs were raised to
            :data:`WIDE_ACTIVATION_BITS` bits instead (8-bit weights kept), on backends that
            run them; tried before any layer is kept float.
        steps: Every evaluation of the search.
        cost: ``candidates`` evaluated and ``samples`` (rows) each was judged on.
        plan: The plan with ``float_layers`` skipped.
        judged_by: What the accuracy drop measured (e.g. ``CER against the float model's
            decode``), or None without an accuracy target.
    """

    target_sqnr_db: float | None
    max_accuracy_drop: float | None
    float_layers: list[str]
    met: bool
    steps: list[FallbackStep]
    cost: dict[str, int] = field(default_factory=dict)
    plan: Any = field(repr=False, default=None)
    wide_layers: list[str] = field(default_factory=list)
    judged_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the plan is written separately as plan.json)."""
        data = dataclasses.asdict(self)
        data.pop("plan")
        return data


def float_fallback(
    float_graph,
    backend,
    plan,
    ranges: Mapping[str, Any],
    sensitivity: Sequence[LayerSensitivity] | Callable[[], Sequence[LayerSensitivity]],
    batches: Batches | None = None,
    *,
    target_sqnr: float | None = None,
    max_accuracy_drop: float | None = None,
    weight_method: str = "minmax",
    reference: FloatReference | None = None,
    max_samples: int | None = None,
    task=None,
    executor=None,
) -> Fallback:
    """Raise the most sensitive layers to 16-bit activations, else keep them float, greedily.

    On a backend that runs 16-bit activations (``qnn``, ``snpe``, ``academic``: A16W8 is
    their usual accuracy fallback) the layers are first given 16-bit activation inputs, worst
    first, until the target is met; only if every layer at 16 bits still misses it does the
    search keep layers float (the plain float fallback, as on every other backend).

    Args:
        float_graph: The prepared float graph.
        backend: Backend name or object.
        plan: The full plan.
        ranges: Calibrated activation ranges for ``plan``.
        sensitivity: From :func:`layer_sensitivity` (worst first), or a callable giving it,
            called only when the fully quantized model misses the target.
        batches: Data to judge the target on (with labels for ``max_accuracy_drop``); not
            needed with ``reference``.
        target_sqnr: Required worst output SQNR in dB.
        max_accuracy_drop: Allowed top-1 accuracy drop in percentage points.
        weight_method: Observer of the weight ranges.
        reference: Float outputs computed once, shared with the sensitivity.
        max_samples: Judge on at most this many rows of ``batches`` (None: all).
        task: The task (name or :class:`~qtool.analysis.tasks.Task`) whose metric judges
            ``max_accuracy_drop``; not needed with ``reference`` (its task judges).
        executor: A :class:`qtool.executor.Executor` whose workers judge the prefixes of
            the ranking in rounds (:func:`qtool.analysis.candidates.first_met`); None: here,
            one after the other. The layers chosen are the same either way.

    Returns:
        The :class:`Fallback`; ``met`` is False if even all layers float miss the target.

    Raises:
        PlanError: No target given.
        DataError: ``max_accuracy_drop`` without labels (top-1) or a task metric the data
            cannot define (no float detections).
    """
    from qtool.analysis.candidates import CandidateJob, first_met, judge_one
    from qtool.io import serialize
    from qtool.providers import current

    if target_sqnr is None and max_accuracy_drop is None:
        raise PlanError("float fallback needs a target", "give target_sqnr or max_accuracy_drop")
    if reference is None:
        reference = FloatReference(float_graph, batches, max_samples=max_samples, task=task)
    job = CandidateJob(serialize(float_graph), backend, ranges, weight_method, reference,
                       current())
    reasons: dict[str, str] = {}
    steps: list[FallbackStep] = []
    judged_by: list[str] = []  # what the drop measures, said by the first evaluation

    def candidate_plan(layers: Sequence[str], wide: Sequence[str] = ()):
        candidate = keep_float(plan, layers, reasons)
        if wide:
            candidate = with_activation_bits(candidate, wide, WIDE_ACTIVATION_BITS)
        return candidate

    def meets(evaluation) -> bool:
        sqnr, drop = model_sqnr(evaluation), accuracy_drop(evaluation)
        if max_accuracy_drop is not None and drop is None:
            raise _undefined_drop(evaluation)
        return (target_sqnr is None or sort_db(sqnr) >= target_sqnr) and (
            max_accuracy_drop is None or drop <= max_accuracy_drop + 1e-9
        )

    def record(layers: Sequence[str], wide: Sequence[str], evaluation) -> bool:
        met = meets(evaluation)
        sqnr, drop = model_sqnr(evaluation), accuracy_drop(evaluation)
        if max_accuracy_drop is not None and not judged_by:
            judged_by.append(evaluation.task.judged_by if evaluation.task is not None
                             else "top-1 accuracy drop against the labels")
        steps.append(FallbackStep(list(layers), sqnr, drop, met, list(wide)))
        log.info("fallback with %d float and %d 16-bit layer(s): %s dB, drop %s",
                 len(layers), len(wide), sqnr, drop)
        return met

    def judge(layers: list[str], wide: Sequence[str] = ()):
        candidate = candidate_plan(layers, wide)
        return record(layers, wide, judge_one(job, candidate, float_graph)), candidate

    def search(prefixes: list[list[str]], wide: bool, desc: str):
        """The first prefix that meets the target (index or None) and the last plan judged."""
        plans = [candidate_plan([], p) if wide else candidate_plan(p) for p in prefixes]
        index, seen = first_met(job, plans, meets, executor, desc=desc, graph=float_graph)
        for prefix, evaluation in zip(prefixes, seen, strict=False):
            record([] if wide else prefix, prefix if wide else [], evaluation)
        return index, plans[len(seen) - 1] if seen else None

    met, candidate = judge([])
    judged = judged_by[0] if judged_by else None
    if met:  # nothing to search: the fully quantized model meets the target already
        return Fallback(target_sqnr, max_accuracy_drop, [], True, steps, reference.cost(),
                        candidate, judged_by=judged)
    if callable(sensitivity):
        sensitivity = sensitivity()
    order = [s.node for s in sensitivity]
    reasons.update({
        s.node: (
            f"kept float to meet {_target_text(target_sqnr, max_accuracy_drop, judged)}: "
            f"quantized alone it gives {db_text(s.sqnr_db)} output SQNR"
            + ("" if s.task_drop is None else f" and a {s.task_drop:.2f} pts drop")
            + f" (rank {rank} of {len(order)})"
        )
        for rank, s in enumerate(sensitivity, start=1)
    })
    prefixes = [list(order[:k]) for k in range(1, len(order) + 1)]
    if _runs_wide(backend, plan):
        index, last = search(prefixes, True, "16-bit search")
        candidate = last if last is not None else candidate
        if index is not None:
            return Fallback(target_sqnr, max_accuracy_drop, [], True, steps,
                            reference.cost(), candidate, list(order[: index + 1]), judged)
    index, last = search(prefixes, False, "fallback search")
    candidate = last if last is not None else candidate
    if index is None:
        log.warning("the target %s is not met even with every layer float",
                    _target_text(target_sqnr, max_accuracy_drop, judged))
        return Fallback(target_sqnr, max_accuracy_drop, list(order), False, steps,
                        reference.cost(), candidate, judged_by=judged)
    k = index + 1
    # Prune: a layer added early may be unnecessary once later ones are float. The last one
    # added is needed (the prefix without it missed the target); try the others.
    kept = list(order[:k])
    for node in list(kept[:-1]):
        trial = [n for n in kept if n != node]
        trial_met, trial_plan = judge(trial)
        if trial_met:
            kept, candidate = trial, trial_plan
    return Fallback(target_sqnr, max_accuracy_drop, kept, True, steps, reference.cost(),
                    candidate, judged_by=judged)


def with_activation_bits(plan, layers: Sequence[str], bits: int):
    """``plan`` with the activation inputs of ``layers`` at ``bits`` (weights unchanged).

    An activation that ``layers`` share with other layers takes the new bits: it is one
    tensor with one scale. So does every member of its shared-scale group (a Concat's
    inputs and output): one scale is one scheme.
    """
    chosen = set(layers)
    raised = {name for name, entry in plan.tensors.items()
              if entry.role == "activation" and chosen & set(entry.consumers)}
    groups = {plan.tensors[name].group for name in raised} - {None}
    raised |= {name for name, entry in plan.tensors.items()
               if entry.role == "activation" and entry.group in groups}
    tensors = {
        name: dataclasses.replace(entry, scheme=entry.scheme.with_(bits=bits))
        if name in raised else entry
        for name, entry in plan.tensors.items()
    }
    return dataclasses.replace(plan, tensors=tensors)


def _runs_wide(backend, plan) -> bool:
    """Whether the backend runs 16-bit activations and the plan's are narrower."""
    from qtool.backends import resolve_backend

    supported = resolve_backend(backend).activation_bits_supported
    narrower = any(e.scheme.bits < WIDE_ACTIVATION_BITS for e in plan.entries("activation"))
    return WIDE_ACTIVATION_BITS in supported and narrower


def _undefined_drop(evaluation) -> DataError:
    """The error for an accuracy target the judging data cannot measure."""
    task = evaluation.task
    if task is not None and task.task == "detect":
        return DataError("--max-accuracy-drop: the float model detects nothing on the "
                         "judging data, so mAP@0.5 is undefined",
                         "give judging data with objects (--eval-data), or lower min_score")
    if task is not None and task.task == "ctc":
        return DataError("--max-accuracy-drop: no characters to measure a CER against (the "
                         "float model decodes empty lines, or the label lines are empty)",
                         "check the blank index (--task-option blank=) and the labels")
    return DataError(
        "--max-accuracy-drop needs labels in the evaluation data",
        "give an .npz with a 'labels' array (one class per sample), use --target-sqnr, or "
        "a task that needs none (--task ctc, --task detect)",
    )


def _target_text(target_sqnr: float | None, max_accuracy_drop: float | None,
                 judged_by: str | None = None) -> str:
    parts = []
    if target_sqnr is not None:
        parts.append(f"output SQNR >= {target_sqnr:g} dB")
    if max_accuracy_drop is not None:
        metric = f" ({judged_by})" if judged_by else ""
        parts.append(f"accuracy drop <= {max_accuracy_drop:g} pts{metric}")
    return " and ".join(parts)
