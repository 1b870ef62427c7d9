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
beside it sees, so the layers go in *stages*: a stage holds the layers with no uncorrected
weighted layer upstream, and one pass of the quantized model over the data corrects all of
them. The cost is one pass of the float model plus one pass per stage (the depth in weighted
layers, not their number), each running only the nodes its layers depend on; the quantized
graph's biases are updated in place between stages. Memory is one batch plus a sum and a
count per channel. Measured: 1.9x the time of a run without it on a ResNet-18 (18 stages, 64
samples of 32x32), +0.8 s on the digits CNN.

Int32 biases are re-quantized from the corrected float bias with the layer's ``s_in * s_w``,
so the residual mean error is below half a bias step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qtool.graph_walk import name_nodes
from qtool.io import load, load_model, serialize

log = logging.getLogger(__name__)

LAYERS = frozenset({"Conv", "Gemm"})  # and MatMul followed by an Add of a constant


@dataclass
class BiasCorrection:
    """What :func:`correct_biases` did.

    Attributes:
        layers: Corrected layer name -> largest absolute bias change.
        stages: The depth in corrected layers (``staged``: passes of the quantized model).
        samples: Rows of calibration data used.
        sqnr_db: Output name -> ``[without, with]`` the correction, on the evaluation data
            (filled by :meth:`measure`).
        reverted: The correction made the judged metric worse on the evaluation data, so the
            model written is the uncorrected one.
        mode: ``exact``, ``fast`` (or ``staged``, the reference passes).
        skipped: Layer name -> why its bias was not corrected.
        judged_by: ``task <name>``, ``worst output slice``, or ``output SQNR``.
        slices: Output -> ``[[slice, dB without], [slice, dB with]]``: its worst slice.
        reason: Why the correction was reverted, whole or in part (None: kept).
        reverted_layers: Layers whose correction was taken back (the rest kept).
    """

    layers: dict[str, float] = field(default_factory=dict)
    stages: int = 0
    samples: int = 0
    sqnr_db: dict[str, list] = field(default_factory=dict)
    reverted: bool = False
    mode: str = "exact"
    skipped: dict[str, str] = field(default_factory=dict)
    judged_by: str = ""
    slices: dict[str, list] = field(default_factory=dict)
    reason: str | None = None
    reverted_layers: list[str] = field(default_factory=list)

    def measure(self, without, with_) -> None:
        """Record each output's SQNR without and with the correction (two Evaluations)."""
        self.sqnr_db = {
            a.name: [a.sqnr_db, b.sqnr_db]
            for a, b in zip(without.outputs, with_.outputs, strict=True)
        }

    def judge(self, without, with_) -> bool:
        r"""Record two :class:`qtool.bias_judge.Verdict`\ s; True if the correction hurts."""
        from qtool.bias_judge import hurts

        self.sqnr_db = {name: [without.sqnr_db[name], with_.sqnr_db[name]]
                        for name in without.sqnr_db}
        self.slices = {name: [list(without.slices[name]), list(with_.slices[name])]
                       for name in without.slices}
        by_task = without.task_drop is not None and with_.task_drop is not None
        self.judged_by = "task" if by_task else "worst output slice"
        self.reason = hurts(without, with_)
        self.reverted = self.reason is not None
        return self.reverted

    def worse(self, tolerance_db: float = 0.05) -> list[str]:
        """Outputs whose SQNR the correction lowered by more than ``tolerance_db``."""
        return [name for name, (a, b) in self.sqnr_db.items()
                if b is not None and (a is None or b < a - tolerance_db)]

    def to_dict(self) -> dict[str, Any]:
        """For report.json (floats rounded to 6 significant digits: stable bytes)."""
        from qtool.analysis.evaluate import _rounded

        return _rounded({"mode": self.mode, "layers": dict(self.layers),
                         "stages": self.stages, "samples": self.samples,
                         "skipped": dict(self.skipped), "sqnr_db": dict(self.sqnr_db),
                         "judged_by": self.judged_by, "slices": dict(self.slices),
                         "reverted": self.reverted, "reason": self.reason,
                         "reverted_layers": list(self.reverted_layers)})


MODES = ("exact", "fast", "off")
#: What ``--bias-correction`` (or ``bias_correction: true``) means.
DEFAULT_MODE = "exact"
#: Rows of calibration data the correction reads by default: the channel means have
#: converged there (benchmarks/bench_bias_correction.py measures where).
DEFAULT_MAX_SAMPLES = 64


def spread(samples, count: int):
    """At most ``count`` of ``samples``, evenly spread over them.

    The first, then about every k-th: data sorted by class or by source still gives each
    to the means.

    ``samples`` without a length are returned as they are (the cap then takes the first
    rows).
    """
    try:
        total = len(samples)
    except TypeError:
        return samples
    if total <= count:
        return samples
    from qtool.analysis.holdout import Subset

    indices = sorted({int(i) for i in np.linspace(0, total - 1, count)})
    return Subset(samples, indices)


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
                   memory_budget: int | None = None):
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
        target, why = _target(node, quantized_weights)
        if target is not None:
            targets.append(target)
        elif why:
            report.skipped[node.name] = why
    if not targets:
        return quantize(work, backend, ranges, plan=plan, weight_method=weight_method,
                        activation_method=activation_method), report
    # a layer without a bias gets a zero one now, planned like the others (an int32 bias on
    # the engines that add it in the accumulator), so correcting it changes only its values
    plan = _plan_biases(plan, backend, [t for t in targets if t.bias_added()])
    batches = _capped(batches, max_samples, work)

    def quantized():
        return quantize(work, backend, ranges, plan=plan, weight_method=weight_method,
                        activation_method=activation_method)

    if mode == "fast":
        _fast(work, targets, quantized(), batches, report)
    elif mode == "staged" or _has_bodies(work):  # outer-scope reads in bodies: no cuts
        _exact(work, targets, quantized, batches, report)
    else:
        _incremental(work, targets, quantized(), batches, report, memory_budget)
    # the final model comes out of quantize() like any other, from the corrected float graph
    result = quantized()
    log.info("bias correction (%s): %d layers in %d stages", mode, len(report.layers),
             report.stages)
    return result, report


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
        target, _ = _target(node, {node.inputs[1].name})
        if target is None:
            continue
        bias = target.bias()
        old = originals.get(bias.name)
        values = np.zeros(bias.values.shape) if not isinstance(old, gs.Constant) else \
            np.broadcast_to(np.asarray(old.values).reshape(-1), (bias.values.size,))
        _set(bias, values)
    return copy


def _exact(work, targets, quantized, batches, report) -> None:
    """Stage by stage: each stage's layers corrected on the quantized model's own means."""
    axes = {t.output: t.axis for t in targets}
    float_means, report.samples = channel_means(work, list(axes), batches, axes)
    result = quantized()
    quantized_nodes = {n.name: n for n in result.graph.nodes}
    for stage in _stages(work, targets):
        quant_means, _ = channel_means(result.graph, [t.output for t in stage], batches, axes)
        report.stages += 1
        for target in stage:
            delta = (float_means[target.output] - quant_means[target.output]) / target.divisor
            corrected = target.add(delta)
            holder = quantized_nodes[target.holder.name]
            if not _set_quantized_bias(holder, target.index, corrected):
                result = quantized()
                quantized_nodes = {n.name: n for n in result.graph.nodes}
            report.layers[target.layer.name] = float(np.abs(delta).max())


def _has_bodies(graph: gs.Graph) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(
        v[0], gs.Graph)) for n in graph.nodes for v in n.attrs.values())


def _incremental(work, targets, result, batches, report, memory_budget=None) -> None:
    """Exact correction in one pass of the quantized model, layer after layer.

    The quantized graph runs in segments, each ending at the next layer to correct (graph
    order), on the tensors the segments before it left (every batch kept, only the tensors
    a later node reads; beyond ``memory_budget`` bytes they go to files). A layer's mean
    error is measured with every layer before it already corrected, and its correction is a
    per-channel constant added to its output: the stored output is shifted by it, as the
    corrected bias would have, before any later node reads it. Same corrections as the
    stage-by-stage passes (every layer upstream of one comes before it in graph order), at
    the cost of one quantized pass.
    """
    from qtool.analysis.common import feeds_of, iterate_batches

    axes = {t.output: t.axis for t in targets}
    float_means, report.samples = channel_means(work, list(axes), batches, axes,
                                                optimized=True)
    report.stages = len(_stages(work, targets))
    proto = load_model(result.graph)
    graph_proto = proto.graph
    initializers = {t.name: t for t in graph_proto.initializer}
    nodes = list(graph_proto.node)
    holders = {t.holder.name: t for t in targets}
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = index
    graph_inputs = [i.name for i in graph_proto.input if i.name not in initializers]
    with _Store(memory_budget) as store:
        for index, batch in enumerate(iterate_batches(batches)):
            for name, value in feeds_of(batch, graph_inputs, index).items():
                store.append(name, value)
            store.batches += 1
        start, remaining = 0, len(holders)
        for end, node in enumerate(nodes):
            target = holders.get(node.name)
            if target is None:
                continue
            output = node.output[0]  # the quantized graph may rename a graph output's producer
            # a graph output quantized after the layer: measured as the model gives it (after
            # its Q/DQ), as the stage-by-stage passes do
            tail = _output_quantizer(nodes, end, output, target.output)
            measured = tail[-1].output[0] if tail else output
            segment = nodes[start:end + 1] + tail
            produced = {o for n in segment for o in n.output}
            needed = list(dict.fromkeys(
                name for n in segment for name in n.input
                if name and name not in produced and name not in initializers))
            keep = [o for o in dict.fromkeys(o for n in segment for o in n.output)
                    if o and (last_use.get(o, -1) > end or o in (output, measured))]
            _run_segment(proto, segment, needed, keep, initializers, store)
            for name in needed:
                if last_use.get(name, -1) <= end:
                    store.drop(name)
            start = end + 1
            quant_mean = _mean_along(store.values(measured), target.axis)
            if measured != output:
                store.drop(measured)
            delta = (float_means[target.output] - quant_mean) / target.divisor
            target.add(delta)
            if last_use.get(output, -1) > end:
                shift = delta * target.divisor
                store.shift(output, lambda v, s=shift, a=target.axis: v + _along(
                    s, a, v.ndim).astype(v.dtype))
            else:
                store.drop(output)
            report.layers[target.layer.name] = float(np.abs(delta).max())
            remaining -= 1
            if not remaining:
                break


def _output_quantizer(nodes, index: int, output: str, graph_output: str) -> list:
    """The Q and DQ nodes after ``nodes[index]`` that make ``output`` the graph output.

    ``graph_output`` is the layer's output name in the float graph; [] where the quantized
    graph does not quantize it so.
    """
    if output == graph_output:
        return []
    chain, tensor = [], output
    for node in nodes[index + 1:]:
        if (node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input
                and node.input[0] == tensor):
            chain.append(node)
            tensor = node.output[0]
            if tensor == graph_output:
                return chain
    return []


class _Store:
    """Each stored tensor's value per batch; past ``budget`` bytes in memory, in files.

    A value that does not fit goes to an ``.npy`` file of a temporary folder and is read
    back one batch at a time, so memory holds the budget plus one batch.
    """

    def __init__(self, budget: int | None):
        self.budget = budget
        self.held = 0
        self.batches = 0
        self.items: dict[str, list] = {}
        self.folder = None
        self.files = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        if self.folder is not None:
            self.folder.cleanup()
        return False

    def append(self, name: str, value: np.ndarray) -> None:
        value = np.asarray(value)
        if self.budget is not None and self.held + value.nbytes > self.budget:
            import tempfile
            from pathlib import Path

            if self.folder is None:
                self.folder = tempfile.TemporaryDirectory(prefix="qtool-bias-")
            self.files += 1
            path = Path(self.folder.name) / f"{self.files}.npy"
            np.save(path, value)
            self.items.setdefault(name, []).append(path)
        else:
            self.held += value.nbytes
            self.items.setdefault(name, []).append(value)

    def count(self, name: str) -> int:
        return len(self.items[name])

    def get(self, name: str, index: int) -> np.ndarray:
        item = self.items[name][index]
        return item if isinstance(item, np.ndarray) else np.load(item)

    def values(self, name: str):
        return (self.get(name, i) for i in range(self.count(name)))

    def dtype(self, name: str):
        return self.get(name, 0).dtype

    def shift(self, name: str, change) -> None:
        for index, item in enumerate(self.items[name]):
            if isinstance(item, np.ndarray):
                self.items[name][index] = change(item)
            else:
                np.save(item, change(np.load(item)))

    def drop(self, name: str) -> None:
        for item in self.items.pop(name, ()):
            if isinstance(item, np.ndarray):
                self.held -= item.nbytes
            else:
                item.unlink()


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def _channel_sums(value: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """Per-channel sums along ``axis`` (float64 accumulation, no float64 copy) and count."""
    value = np.asarray(value)
    axis %= value.ndim
    others = tuple(a for a in range(value.ndim) if a != axis)
    return value.sum(axis=others, dtype=np.float64), value.size // value.shape[axis]


def _mean_along(values, axis: int) -> np.ndarray:
    sums, count = 0.0, 0
    for value in values:
        total, n = _channel_sums(value, axis)
        sums, count = sums + total, count + n
    return sums / count


def _run_segment(proto, segment, needed, keep, initializers, store: _Store) -> None:
    """Run ``segment`` (node protos) on every stored batch; store ``keep``'s values."""
    import onnx

    from qtool.analysis.common import session

    used = {name for n in segment for name in n.input}
    graph = onnx.helper.make_graph(
        segment, "segment",
        [onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(store.dtype(name)), None)
         for name in needed],
        [onnx.ValueInfoProto(name=name) for name in keep],
        [initializers[name] for name in sorted(used & initializers.keys())],
    )
    model = onnx.helper.make_model(graph, opset_imports=proto.opset_import,
                                   ir_version=proto.ir_version)
    run = session(model.SerializeToString())
    for index in range(store.batches):
        values = run.run(keep, {name: store.get(name, index) for name in needed})
        for name, value in zip(keep, values, strict=True):
            store.append(name, value)


def _fast(work, targets, result, batches, report) -> None:
    """One float pass for each layer's mean input; each layer's own error on it.

    The layers are linear in their input, so the float layer on the mean input is the mean
    of the float layer's output, exactly; the quantized layer (its quantized weights and
    bias) on the same mean input gives its own mean error. Unlike NNCF, the mean input does
    not go through the layer's input quantizer: rounding the mean is not the mean of the
    rounded values (a tensor of many small values rounds to zeros: silero-vad's encoder
    got a 13.1 shift for an exact 3.5, and the model 0 dB). The error a layer inherits from
    upstream (noise rectified by a ReLU) is not seen: ``exact`` sees it.
    """
    inputs = sorted({t.layer.inputs[0].name for t in targets})
    means, report.samples = input_means(work, inputs, batches)
    report.stages = 1
    chains: dict[str, Target] = {}
    for target in targets:
        if _quantized_input(result.graph, target) is None:
            report.skipped[target.layer.name] = "its input is not read through Q/DQ alone"
        else:
            chains[target.layer.name] = target
    if not chains:
        return
    kept = list(chains.values())
    float_out = _run_layers(work, kept, means, lambda g, t: t.layer.inputs[0].name)
    quant_out = _run_layers(result.graph, kept, means, lambda g, t: t.layer.inputs[0].name)
    for target in kept:
        error = float_out[target.output] - quant_out[target.output]
        axis = target.axis % error.ndim
        delta = np.moveaxis(error, axis, 0).reshape(error.shape[axis], -1).mean(axis=1)
        delta = delta / target.divisor
        target.add(delta)
        report.layers[target.layer.name] = float(np.abs(delta).max())


def _quantized_input(graph: gs.Graph, target: Target) -> str | None:
    """The float tensor the quantized layer reads through Q/DQ nodes, if it has that name."""
    node = next((n for n in graph.nodes if n.name == target.layer.name), None)
    if node is None:
        return None
    tensor = node.inputs[0]
    while tensor.inputs and tensor.inputs[0].op in ("QuantizeLinear", "DequantizeLinear"):
        tensor = tensor.inputs[0].inputs[0]
    return tensor.name if tensor.name == target.layer.inputs[0].name else None


def _run_layers(graph: gs.Graph, targets: list[Target], means: Mapping[str, np.ndarray],
                input_of) -> dict[str, np.ndarray]:
    """Each target's holder output with its layer fed the mean input, in one session.

    The graph is cut at each layer: a new graph input per float tensor (``input_of`` names
    it, the key of ``means``) replaces what the layer reads (past its input's Q/DQ), so a
    layer's output that is also another layer's input stays connected.
    """
    from qtool.analysis.common import session

    copy = load(serialize(graph), check=False)
    tensors = copy.tensors()
    nodes = {n.name: n for n in copy.nodes}
    feeds: dict[str, np.ndarray] = {}
    cut: dict[str, gs.Variable] = {}
    outputs = []
    names = [input_of(copy, target) for target in targets]  # before any cut
    for target, name in zip(targets, names, strict=True):
        layer = nodes[target.layer.name]
        if name not in cut:
            cut[name] = gs.Variable(f"{name}__bias_correction_input", dtype=np.float32,
                                    shape=list(means[name].shape))
            feeds[cut[name].name] = means[name].astype(np.float32)
        layer.inputs[0] = cut[name]
        if all(t is not tensors[target.output] for t in outputs):
            outputs.append(tensors[target.output])
    for tensor in copy.tensors().values():  # fixed batch sizes in shapes do not hold here
        if isinstance(tensor, gs.Variable) and tensor.name not in feeds:
            tensor.shape = None
    copy.inputs = list(cut.values())
    copy.outputs = outputs
    copy.cleanup(remove_unused_graph_inputs=True)
    run = session(serialize(copy))
    names = [t.name for t in copy.outputs]
    live = {i.name for i in copy.inputs}
    return dict(zip(names, run.run(names, {k: v for k, v in feeds.items() if k in live}),
                    strict=True))


def input_means(graph, names: list[str], batches) -> tuple[dict[str, np.ndarray], int]:
    """Each tensor's mean over its first axis (the rows), shape ``(1, ...)``, in float64.

    A tensor whose shape changes between batches (a variable width) gets its per-channel
    mean (axis 1) spread over the first batch's shape instead.
    """
    from qtool.analysis.common import exposed, feeds_of, iterate_batches
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    proto = load_model(_pruned(graph, names))
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    specs = model_inputs(proto)
    run = _float_session(exposed(proto, names))
    sums: dict[str, np.ndarray] = {}
    channel_sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    channel_counts: dict[str, int] = dict.fromkeys(names, 0)
    ragged: set[str] = set()
    rows = 0
    for index, batch in enumerate(iterate_batches(batches)):
        feeds = feeds_of(batch, inputs, index)
        rows += batch_rows(feeds, specs)
        for name, value in zip(names, run.run(names, feeds), strict=True):
            value = np.asarray(value, dtype=np.float64)
            total = value.sum(axis=0, keepdims=True)
            if name not in sums:
                sums[name] = total
            elif sums[name].shape == total.shape and name not in ragged:
                sums[name] += total
            else:
                ragged.add(name)
            counts[name] += value.shape[0]
            axis = 1 if value.ndim > 1 else 0
            per_channel = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
            channel_sums[name] = channel_sums.get(name, 0.0) + per_channel.sum(axis=1)
            channel_counts[name] += per_channel.shape[1]
    means = {}
    for name in names:
        if name in ragged:
            channel = channel_sums[name] / channel_counts[name]
            shape = [1] * sums[name].ndim
            shape[1 if len(shape) > 1 else 0] = channel.size
            means[name] = np.broadcast_to(channel.reshape(shape), sums[name].shape).copy()
        else:
            means[name] = sums[name] / counts[name]
    return means, rows


def _capped(batches, max_samples: int | None, graph):
    """``batches`` stopped once ``max_samples`` rows were given (whole batches)."""
    if max_samples is None:
        return batches
    from qtool.analysis.common import iterate_batches
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    specs = model_inputs(graph)

    def capped():
        rows = 0
        for batch in iterate_batches(batches):
            if rows >= max_samples:
                return
            rows += batch_rows(batch, specs)
            yield batch

    return capped


def _plan_biases(plan, backend, targets: list[Target]):
    """``plan`` with an int32 entry for each layer's added bias, as the planner plans one.

    Only where the backend adds biases in the accumulator and the layer's input and weight
    are quantized.
    """
    import dataclasses

    from qtool.plan import TensorPlan
    from qtool.scheme import QuantScheme

    if backend.bias_mode != "int32" or not targets:
        return plan
    tensors = dict(plan.tensors)
    added = {}
    for target in targets:
        layer = target.layer
        data, weight = layer.inputs[0].name, layer.inputs[1].name
        entry = tensors.get(data)
        if entry is None or entry.role != "activation" or layer.name not in entry.consumers:
            continue
        bias = target.bias()
        added.setdefault(weight, []).append(TensorPlan(
            bias.name, "bias",
            QuantScheme(bits=32, signed=True, symmetric=True,
                        per_channel_axis=0 if tensors[weight].scheme.per_channel else None),
            (layer.name,), bias_inputs=(data, weight)))
    ordered = {}
    for name, entry in tensors.items():  # each bias right after its weight (graph order)
        ordered[name] = entry
        for bias in added.get(name, ()):
            ordered[bias.tensor] = bias
    return dataclasses.replace(plan, tensors=ordered)


def channel_means(graph, names: list[str], batches, axes: Mapping[str, int] | None = None,
                  optimized: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """Per-channel mean of each tensor over the data, streamed in float64.

    The channel axis is ``axes[name]`` (default 1: NCHW and (rows, features)).
    ``optimized``: run with onnxruntime's graph optimizations (a float model: as the
    calibration runs it; a Q/DQ model needs them off to stay a simulation).

    Only the nodes the tensors depend on run: an early stage costs a fraction of a pass.
    """
    from qtool.analysis.common import exposed, feeds_of, iterate_batches, session
    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    proto = load_model(_pruned(graph, names))
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    specs = model_inputs(proto)
    run = _float_session(exposed(proto, names)) if optimized else session(exposed(proto, names))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    rows = 0
    # the batches already fit the model (its fixed batch size, each input's batch axis)
    for index, batch in enumerate(iterate_batches(batches)):
        feeds = feeds_of(batch, [i.name for i in inputs], index)
        rows += batch_rows(feeds, specs)
        for name, value in zip(names, run.run(names, feeds), strict=True):
            total, count = _channel_sums(value, (axes or {}).get(name, 1))
            sums[name] = sums.get(name, 0.0) + total
            counts[name] += count
    return {name: sums[name] / counts[name] for name in names}, rows


def _float_session(model_bytes: bytes):
    """A session for the float model, optimized as the calibration's (no memory arena)."""
    import onnxruntime as ort

    from qtool.calibration.collector import open_session

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = False
    return open_session(model_bytes, options, "correct the biases")


def _pruned(graph, names: list[str]) -> gs.Graph:
    """A copy of ``graph`` with ``names`` as its outputs and only the nodes they need."""
    copy = load(serialize(graph), check=False)
    tensors = copy.tensors()
    inputs = list(copy.inputs)
    copy.outputs = [tensors[name] for name in names]
    copy.cleanup(remove_unused_graph_inputs=False)
    copy.inputs = inputs
    return copy


def _stages(graph: gs.Graph, targets: list[Target]) -> list[list[Target]]:
    """Targets grouped by how many corrected layers lie upstream (graph order within)."""
    layer_of = {id(t.layer): t for t in targets}
    depth: dict[str, int] = {}  # tensor -> weighted layers on the longest path to it
    stage_of: dict[int, int] = {}
    for node in graph.nodes:  # topological order
        level = max((depth.get(t.name, 0) for t in node.inputs), default=0)
        if id(node) in layer_of:
            stage_of[id(node)] = level
            level += 1
        for out in node.outputs:
            depth[out.name] = level
    stages: dict[int, list[Target]] = {}
    for target in targets:
        stages.setdefault(stage_of[id(target.layer)], []).append(target)
    return [stages[k] for k in sorted(stages)]


@dataclass
class Target:
    """One layer to correct: the weighted node, where its bias lives, how to read its output.

    Conv/Gemm hold their bias as input 2 (Gemm's scaled by ``beta``: the divisor), channel
    axis 1. A MatMul with a constant weight followed by an Add of a constant (a Linear layer
    as exporters write it for 3-D inputs) holds it in the Add; the channel is the last axis.
    """

    layer: gs.Node
    holder: gs.Node
    index: int
    axis: int
    divisor: float = 1.0
    added: bool = False

    @property
    def output(self) -> str:
        """The tensor whose mean is corrected."""
        return self.holder.outputs[0].name

    def bias_added(self) -> bool:
        """The layer had no bias: a zero one was made for it."""
        return self.added

    def bias(self) -> gs.Constant:
        """The bias constant."""
        return self.holder.inputs[self.index]

    def add(self, delta: np.ndarray) -> np.ndarray:
        """Add ``delta`` to the bias (in the float graph); returns the new bias, flat."""
        bias = self.bias()
        corrected = np.asarray(bias.values, dtype=np.float64).reshape(-1) + delta
        _set(bias, corrected)
        return corrected


def _target(node: gs.Node, quantized_weights: set[str]) -> tuple[Target | None, str | None]:
    """The node as a layer to correct, or None and why not (None: not a weighted layer)."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None, None
    if node.inputs[1].name not in quantized_weights:
        return None, None
    if node.op in LAYERS:
        why = _bias_problem(node)
        if why:
            return None, why
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        added = len(node.inputs) < 3
        channels = _channels(node)
        if added:
            node.inputs.append(gs.Constant(f"{node.name}_bias",
                                           np.zeros(channels, node.inputs[1].values.dtype)))
        elif node.inputs[2].values.size != channels:  # Gemm's broadcast C: one value
            old = node.inputs[2]
            node.inputs[2] = gs.Constant(old.name, np.broadcast_to(
                old.values.reshape(-1), (channels,)).astype(old.values.dtype))
        return Target(node, node, 2, 1, beta, added), None
    if node.op != "MatMul" or node.inputs[1].values.ndim != 2 or len(node.outputs[0].outputs) != 1:
        return None, None
    add = node.outputs[0].outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None, "no Add of a constant after it"
    index = 1 if add.inputs[0] is node.outputs[0] else 0
    bias = add.inputs[index]
    channels = node.inputs[1].values.shape[1]
    if not isinstance(bias, gs.Constant):
        return None, "its Add's other input is not a constant"
    if len(bias.outputs) != 1:
        return None, f"its bias {bias.name} is shared with other nodes"
    if bias.values.size != channels or bias.values.shape[-1:] != (channels,):
        return None, f"its bias {bias.name} has shape {list(bias.values.shape)}"
    return Target(node, add, index, -1), None


def _channels(node: gs.Node) -> int:
    w = node.inputs[1].values
    return w.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) else w.shape[1]


def _bias_problem(node: gs.Node) -> str | None:
    """Why the layer's bias cannot be corrected, or None.

    Correctable: a 1-D constant bias read only by the layer, a single broadcast value, or
    none (one is then added).
    """
    if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) == 0.0:
        return "Gemm with beta 0"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA"
    if len(node.inputs) > 2:
        bias = node.inputs[2]
        if not isinstance(bias, gs.Constant):
            return "its bias is not a constant"
        if len(bias.outputs) != 1:
            # cleanup merges identical initializers; one value cannot serve two corrections
            return f"its bias {bias.name} is shared with other layers"
        if bias.values.size not in (1, _channels(node)) or bias.values.size != max(
                bias.values.shape, default=1):
            return f"its bias has shape {list(bias.values.shape)}"
    return None


def _set(constant: gs.Constant, values: np.ndarray) -> None:
    old = np.asarray(constant.values)
    constant.values = np.asarray(values).reshape(old.shape).astype(old.dtype)


def _set_quantized_bias(node: gs.Node, index: int, values: np.ndarray) -> bool:
    """Write a corrected bias into the quantized graph's layer; False if it cannot."""
    if index >= len(node.inputs):
        return False
    bias = node.inputs[index]
    if isinstance(bias, gs.Constant):
        _set(bias, values)
        return True
    producer = bias.inputs[0] if bias.inputs else None
    if producer is None or producer.op != "DequantizeLinear" or not all(
        isinstance(t, gs.Constant) for t in producer.inputs
    ):
        return False
    integers, scale = producer.inputs[0], np.asarray(producer.inputs[1].values, np.float64)
    info = np.iinfo(integers.values.dtype)
    _set(integers, np.clip(np.round(values / scale), info.min, info.max))
    return True
