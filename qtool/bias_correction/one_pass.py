"""``exact`` in one pass: the quantized graph in segments, each ending at a layer to correct."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from qtool.bias_correction.layers import stages
from qtool.bias_correction.means import UnitSums, mean_error, unit_channel_sums
from qtool.bias_correction.store import Store
from qtool.cpu import in_order, runs_at_once
from qtool.io import load_model

#: Batches of one row a segment runs at once (threads of one session, each run with its
#: share of the cores): two batch-1 runs side by side take about 0.67x the time of one after
#: the other (:func:`qtool.cpu.runs_at_once`).
SIDE_BY_SIDE = 2


def correct_one_pass(work, targets, result, batches, report, memory_budget=None) -> None:
    """Exact correction in one pass of the quantized model, layer after layer.

    The quantized graph runs in segments, each ending at the next layer to correct (graph
    order), on the tensors the segments before it left (every batch kept, only the tensors
    a later node reads; beyond ``memory_budget`` bytes they go to files). A layer's mean
    error is measured with every layer before it already corrected, and its correction is a
    per-channel constant added to its output: the stored output is shifted by it, as the
    corrected bias would have, before any later node reads it. Same corrections as the
    stage-by-stage passes (every layer upstream of one comes before it in graph order), at
    the cost of one quantized pass.

    Each layer's standard error of its mean error (over the rows, per channel) goes to
    ``report.noise``, over the shift's size: near 1 or above, the rows were too few.
    """
    from qtool.analysis.common import feeds_of, iterate_batches

    axes = {t.output: t.axis for t in targets}
    float_sums, rows_of = unit_channel_sums(work, list(axes), batches, axes)
    report.samples = sum(rows_of)
    report.stages = len(stages(work, targets))
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
    with Store(memory_budget) as store, ThreadPoolExecutor(SIDE_BY_SIDE) as pool:
        side = None  # (runs at once, threads each): batches of one row go side by side
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
            if side is None:
                side = runs_at_once(max(rows_of), SIDE_BY_SIDE)
            _run_segment(proto, segment, needed, keep, initializers, store, pool, side)
            for name in needed:
                if last_use.get(name, -1) <= end:
                    store.drop(name)
            start = end + 1
            delta, error = mean_error(float_sums[target.output],
                                      _unit_sums(store, measured, target.axis, rows_of))
            noise = _noise(delta, error)
            del float_sums[target.output]
            if measured != output:
                store.drop(measured)
            report.noise[target.layer.name] = noise
            delta = delta / target.divisor
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


def _unit_sums(store: Store, name: str, axis: int, rows_of: list[int]) -> UnitSums:
    sums = UnitSums()
    for value, rows in zip(store.values(name), rows_of, strict=True):
        sums.add(value, axis, rows)
    return sums


def _noise(delta: np.ndarray, error: np.ndarray) -> float:
    """The mean error's standard error over its size, root mean square over channels."""
    size = float(np.sqrt(np.mean(np.square(delta))))
    spread = float(np.sqrt(np.mean(np.square(error))))
    if not np.isfinite(spread):
        return 0.0  # one unit: no spread to see, nothing to gain from more rows
    return spread / size if size > 0 else 0.0  # no shift: nothing to gain either


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


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def _run_segment(proto, segment, needed, keep, initializers, store: Store, pool,
                 side: tuple[int, int | None]) -> None:
    """Run ``segment`` (node protos) on every stored batch; store ``keep``'s values.

    ``pool``: a thread pool of :data:`SIDE_BY_SIDE` threads, where the batches run;
    ``side``: how many at once, and each run's intra-op threads
    (:func:`qtool.cpu.runs_at_once`).
    """
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
    # batches side by side, each run with its share of the cores: at batch 1 a second
    # intra-op thread gains a conv net little, a second run beside it much (issue #22)
    at_once, threads = side
    run = session(model.SerializeToString(), threads)
    calls = ((index, partial(run.run, keep, {name: store.get(name, index) for name in needed}))
             for index in range(store.batches))
    for _, values in in_order(pool, calls, at_once):
        for name, value in zip(keep, values, strict=True):
            store.append(name, value)  # batch order, whichever run finished first
