"""After a correction judged to hurt: take it back, whole or for the layers behind a slice."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qtool.bias_correction.layers import set_values, target_of
from qtool.bias_correction.report import BiasCorrection
from qtool.io import load, serialize


def keep_what_helps(model, graph, uncorrected, corrected, report: BiasCorrection, verdicts,
                    batches, task, backend, ranges, **quantize_kwargs):
    """After a correction judged to hurt: the model to keep, and its verdict.

    Where the hurt slice is one input of a Concat that makes the output (a detector's score
    branch beside its boxes), the correction is tried again without the layers upstream of
    that input, and kept if that no longer hurts (``report.reverted_layers``); otherwise the
    uncorrected model is kept (``report.reverted``).

    Args:
        model: The float model the verdicts compare with.
        graph: The prepared float graph the correction started from.
        uncorrected: The :class:`qtool.qdq.QuantizedModel` without the correction.
        corrected: The one with it.
        report: The correction's report (its :meth:`BiasCorrection.judge` said it hurts).
        verdicts: ``(before, after)`` from :func:`qtool.bias_judge.judge`.
        batches: A callable giving the held-out batches again.
        task: The task the verdicts used, or None.
        backend: As the quantization took it.
        ranges: As the quantization took them.
        **quantize_kwargs: As the quantization took them.
    """
    from qtool.bias_judge import hurts, judge
    from qtool.qdq import quantize

    before, after = verdicts
    layers = None
    if before.task_drop is None and after.worst_at is not None:
        layers = layers_behind_slice(corrected.float_graph, set(report.layers), *after.worst_at)
    if not layers or len(layers) == len(report.layers):
        return uncorrected, before
    partial_graph = _restored(corrected.float_graph, graph, layers)
    partial = quantize(partial_graph, backend, ranges, plan=corrected.plan, **quantize_kwargs)
    (verdict,) = judge(model, [partial.graph], batches(), task)
    if hurts(before, verdict) is not None:
        return uncorrected, before
    report.reverted = False
    report.reverted_layers = sorted(layers)
    report.sqnr_db = {name: [report.sqnr_db[name][0], verdict.sqnr_db[name]]
                      for name in report.sqnr_db}
    report.slices = {name: [report.slices[name][0], list(verdict.slices[name])]
                     for name in report.slices}
    report.reason += f"; kept without the {len(layers)} layers upstream of that slice"
    return partial, verdict


def layers_behind_slice(graph: gs.Graph, layers: set[str], output: str, axis: int | None,
                        start: int, stop: int) -> set[str] | None:
    """The ``layers`` upstream of ``output[start:stop]`` along ``axis``.

    Traced where the output is a Concat along that axis with static sizes (None: the slice
    cannot be traced).
    """
    tensor = graph.tensors().get(output)
    if axis is None or tensor is None or not tensor.inputs:
        return None
    concat = tensor.inputs[0]
    rank = len(tensor.shape or ())
    if concat.op != "Concat" or not rank or int(concat.attrs.get("axis", 0)) % rank != axis:
        return None
    offset, sources = 0, []
    for member in concat.inputs:
        size = (member.shape or [None] * rank)[axis] if len(member.shape or ()) == rank else None
        if not isinstance(size, int):
            return None
        if offset < stop and start < offset + size:
            sources.append(member)
        offset += size
    found, stack, seen = set(), list(sources), set()
    while stack:
        item = stack.pop()
        for node in item.inputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.name in layers:
                found.add(node.name)
            stack.extend(node.inputs)
    return found


def _restored(corrected: gs.Graph, original: gs.Graph, layers: set[str]) -> gs.Graph:
    """A copy of ``corrected`` whose ``layers`` have their original biases (zero if added)."""
    copy = load(serialize(corrected), check=False)
    originals = original.tensors()
    for node in copy.nodes:
        if node.name not in layers:
            continue
        target, _ = target_of(node, {node.inputs[1].name})
        if target is None:
            continue
        bias = target.bias()
        old = originals.get(bias.name)
        values = np.zeros(bias.values.shape) if not isinstance(old, gs.Constant) else \
            np.broadcast_to(np.asarray(old.values).reshape(-1), (bias.values.size,))
        set_values(bias, values)
    return copy


