"""The reference correction: one pass of the quantized prefix per layer depth (``staged``).

Each stage's layers are measured on the quantized model with every stage before it
corrected, and their corrected biases written into the quantized graph in place. It is also
the ``exact`` correction of graphs with subgraphs (whose bodies read outer-scope tensors, so
the graph cannot be cut into segments).
"""

from __future__ import annotations

import numpy as np

from qtool.bias_correction.layers import set_quantized_bias, stages
from qtool.bias_correction.means import channel_means


def correct_staged(work, targets, quantized, batches, report) -> None:
    """Stage by stage: each stage's layers corrected on the quantized model's own means."""
    axes = {t.output: t.axis for t in targets}
    float_means, report.samples = channel_means(work, list(axes), batches, axes)
    result = quantized()
    quantized_nodes = {n.name: n for n in result.graph.nodes}
    for stage in stages(work, targets):
        quant_means, _ = channel_means(result.graph, [t.output for t in stage], batches, axes)
        report.stages += 1
        for target in stage:
            delta = (float_means[target.output] - quant_means[target.output]) / target.divisor
            corrected = target.add(delta)
            holder = quantized_nodes[target.holder.name]
            if not set_quantized_bias(holder, target.index, corrected):
                result = quantized()
                quantized_nodes = {n.name: n for n in result.graph.nodes}
            report.layers[target.layer.name] = float(np.abs(delta).max())

