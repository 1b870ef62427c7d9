"""Judging many candidate plans, in this process or through the executor.

The layer sensitivity (one candidate per layer) and the float fallback's prefix search (one
candidate per prefix of the ranking) each quantize the float graph with a candidate plan and
compare it with the kept float outputs (:class:`~qtool.analysis.reference.FloatReference`).
The candidates are independent, so they run as executor tasks (:mod:`qtool.executor`: local
processes or Ray) when more than one worker is given.

What a task ships: the float model as bytes, the backend, the ranges and the reference (its
bounded slice of inputs and float outputs), once per *chunk* of candidates, not per
candidate: a chunk per worker keeps the driver from pickling the reference hundreds of times.
Results come back in candidate order, each computed exactly as in one process (the same
quantize, the same session settings, the same running sums), so the searches pick the same
layers and the report has the same bytes whatever ``workers`` is.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateJob:
    """What every candidate reads: the float model, the backend, ranges and the reference."""

    float_model: bytes
    backend: Any
    ranges: Mapping[str, Any]
    weight_method: str
    reference: Any
    providers: tuple[str, ...] = ()


def judge_plans(job: CandidateJob, plans: Sequence[Any], executor=None, *,
                desc: str = "candidates", graph=None) -> list:
    """The :class:`~qtool.analysis.evaluate.Evaluation` of each plan, in plan order.

    Args:
        job: The shared inputs.
        plans: Candidate plans.
        executor: A :class:`qtool.executor.Executor`; None or one worker: here, in order.
        desc: What a progress bar counts.
        graph: The float graph itself, to judge here without reloading ``job.float_model``.

    The reference's candidate count grows by ``len(plans)`` either way.
    """
    if not plans:
        return []
    workers = getattr(executor, "workers", 1) if executor is not None else 1
    if workers > 1 and len(plans) > 1 and _picklable(job):
        size = -(-len(plans) // workers)
        chunks = [list(plans[i : i + size]) for i in range(0, len(plans), size)]
        parts = executor.map_shared(_judge_chunk, job, chunks, desc=desc)
        job.reference.candidates += len(plans)
        return [evaluation for part in parts for evaluation in part]
    from qtool import progress

    return _judge_chunk(job, progress.bar(list(plans), desc=desc, unit="candidate"), graph)


def judge_one(job: CandidateJob, plan, graph=None):
    """The evaluation of one plan, here (no progress bar, no executor)."""
    return _judge_chunk(job, [plan], graph)[0]


def _judge_chunk(job: CandidateJob, plans, graph=None) -> list:
    from qtool import providers
    from qtool.io import load
    from qtool.qdq import quantize

    graph = load(job.float_model) if graph is None else graph
    with providers.use(job.providers or None):
        return [
            job.reference.evaluate(quantize(graph, job.backend, job.ranges, plan=plan,
                                            weight_method=job.weight_method).graph)
            for plan in plans
        ]


def first_met(job: CandidateJob, plans: Sequence[Any], met: Callable[[Any], bool],
              executor=None, *, desc: str = "candidates",
              graph=None) -> tuple[int | None, list]:
    """Judge ``plans`` in order until one meets ``met``; in rounds of ``workers`` candidates.

    Returns:
        ``(index of the first plan met, or None; evaluations of plans[:index + 1]``, or of
        every plan when none is met``)``: what one process judging them one by one would
        have seen. Candidates judged past the first met one in a parallel round are
        dropped (and not counted), so the result does not depend on ``workers``.
    """
    from qtool import progress

    workers = getattr(executor, "workers", 1) if executor is not None else 1
    seen: list = []
    if workers <= 1:
        for index, plan in enumerate(progress.bar(list(plans), desc=desc, unit="step")):
            seen.extend(_judge_chunk(job, [plan], graph))
            if met(seen[-1]):
                return index, seen
        return None, seen
    for start in range(0, len(plans), workers):
        before = job.reference.candidates
        evaluations = judge_plans(job, plans[start : start + workers], executor, desc=desc,
                                  graph=graph)
        for offset, evaluation in enumerate(evaluations):
            seen.append(evaluation)
            if met(evaluation):
                job.reference.candidates = before + offset + 1
                return start + offset, seen
    return None, seen


def _picklable(job: CandidateJob) -> bool:
    """Whether the job can go to other processes (a task decoder loaded from a file cannot)."""
    try:
        pickle.dumps(job.reference.task)
        pickle.dumps(job.backend)
    except Exception as exc:  # pickle raises several types for unpicklable objects
        log.info("judging candidates in this process: %s cannot be sent to workers (%s)",
                 "the task" if "task" in str(exc).lower() else "the job", exc)
        return False
    return True
