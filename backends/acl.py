"""Huawei Ascend (ACL / AMCT): graph 1 on layers with weights, plus an AMCT record file.

Rules: Conv weights per output channel symmetric int8 (``offset_w`` must be 0; AMCT takes a
``scale_w`` vector only for channel-wise Conv, so ConvTranspose/Gemm/MatMul weights are per
tensor, one ``scale_w``), activations per
tensor asymmetric int8, bias int32 with ``scale = scale_d * scale_w`` (the Ascend cube unit
adds it in int32), Q/DQ only on the input and weight of Conv/ConvTranspose/Gemm/MatMul that
have a constant weight (MQBench Fig. 4(a); a MatMul of two activations stays float).

The record (AMCT's ``scale_offset_record_onnx.proto``, protobuf text format) has one entry
per quantized layer, keyed by the **node name**; AMCT quantizes data as
``q = round(x / scale_d) + offset_d`` (so ``offset_d`` is the int8 zero point)::

    record {
      key: "conv1"
      value {
        scale_d: 0.0123
        offset_d: -128
        scale_w: 0.001      # repeated: one per output channel (Conv), else one
        offset_w: 0         # repeated, as scale_w
      }
    }

Floats are written as the shortest text that reads back to the same float32.

Files: ``model.qdq.onnx`` and ``record.txt``.
"""

from __future__ import annotations

import json

import numpy as np
from qtool.backends.base import GRAPH_1, Backend, Placement, qdq_model_file, scalar

from qtool.scheme import QuantScheme


def _float(value: float) -> str:
    return str(np.float32(value))


def record(result) -> str:
    """The AMCT record text: one entry per node with a quantized input and weight."""
    lines = []
    weights = {}
    for entry in result.plan.entries("weight"):
        for node in entry.consumers:
            weights.setdefault(node, entry)
    from qtool.graph_walk import all_nodes

    by_name = {n.name: n for n in all_nodes(result.float_graph)}  # If/Loop/Scan bodies too
    for node_name in result.plan.nodes:
        weight = weights.get(node_name)
        if weight is None:
            continue
        node = by_name[node_name]
        data = result.qparams.get(node.inputs[0].name)
        if data is None:
            continue
        w = result.qparams[weight.tensor]
        lines.append("record {")
        lines.append(f"  key: {json.dumps(node_name, ensure_ascii=False)}")
        lines.append("  value {")
        lines.append(f"    scale_d: {_float(scalar(data.scale))}")
        lines.append(f"    offset_d: {int(data.zero_point.reshape(-1)[0])}")
        for scale in w.scale.reshape(-1):
            lines.append(f"    scale_w: {_float(scale)}")
        for offset in w.zero_point.reshape(-1):
            lines.append(f"    offset_w: {int(offset)}")
        lines.append("  }")
        lines.append("}")
    return "\n".join(lines) + "\n"


def emit(result) -> dict[str, bytes]:
    """QDQ model and AMCT record."""
    files = qdq_model_file(result)
    files["record.txt"] = record(result).encode("utf-8")
    return files


BACKEND = Backend(
    name="acl",
    summary="per-channel symmetric Conv weights, asymmetric int8 activations, layers with weights "
    "only (graph 1) + AMCT record",
    weight_scheme=QuantScheme(bits=8, signed=True, symmetric=True),
    per_channel_weights=True,
    per_channel_ops=frozenset({"Conv"}),
    activation_scheme=QuantScheme(bits=8, signed=True, symmetric=False),
    bias_mode="int32",
    placement=Placement(graph=GRAPH_1.graph, requires_weight=True),
    emitter=emit,
)
