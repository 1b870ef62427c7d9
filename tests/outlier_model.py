"""The trained digits CNN with one layer made deliberately hard to quantize.

Output channel ``CHANNEL`` of ``/res/res.0/res.0.0/Conv`` (weights and bias) is scaled by
``FACTOR`` and the matching input channel of the next conv, ``/res/res.2/res.2.0/Conv``, by
``1 / FACTOR``. ReLU is positively homogeneous, so the float model computes the same function,
but the activation between the two convs now has one channel ``FACTOR`` times larger than the
others: one per-tensor 8-bit scale for that tensor flattens every other channel, and the
compensated weights of res.2 lose their precision. Both problems sit in the inputs of one
layer, res.2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qtool.io import load
from qtool.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CALIB = ROOT / "examples" / "digits_calib.npz"
VAL = ROOT / "examples" / "digits_val.npz"
PRODUCER = "/res/res.0/res.0.0/Conv"
HARD_LAYER = "/res/res.2/res.2.0/Conv"
OUTLIER_TENSOR = "/res/res.1/Relu_output_0"
CHANNEL = 3
FACTOR = 60.0


def outlier_graph():
    """The prepared digits graph with the outlier channel (see the module docstring)."""
    graph, _ = prepare(load(DIGITS))
    nodes = {n.name: n for n in graph.nodes}
    producer, consumer = nodes[PRODUCER], nodes[HARD_LAYER]
    weight = np.array(producer.inputs[1].values, dtype=np.float32)
    bias = np.array(producer.inputs[2].values, dtype=np.float32)
    weight[CHANNEL] *= FACTOR
    bias[CHANNEL] *= FACTOR
    producer.inputs[1].values = weight
    producer.inputs[2].values = bias
    next_weight = np.array(consumer.inputs[1].values, dtype=np.float32)
    next_weight[:, CHANNEL] /= FACTOR
    consumer.inputs[1].values = next_weight
    return graph
