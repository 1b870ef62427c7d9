"""``fast`` (NNCF's FastBiasCorrection): one float pass, each layer's own error."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from qtool.bias_correction.layers import Target
from qtool.bias_correction.means import input_means
from qtool.io import load, serialize


def correct_fast(work, targets, result, batches, report) -> None:
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


