"""Learned scales, zero points and weights back into the ONNX QDQ graph and the backend's files.

:func:`export` builds a new :class:`qtool.qdq.QuantizedModel` from a trained
:class:`qtool.qat.QatModel`:

* the float graph (the one the plan was made for, BN folded) gets every trained layer's
  deployed weight and bias: with BN kept, ``w_fold = w * s`` and
  ``b_fold = (b - mu) * s + beta`` with the running statistics (MQBench Eq. 4); with DoReFa,
  the tanh-normalised weight the layer actually uses. Quantized weights (and int32 biases)
  are written as torch rounded them, on the grid, so the integers computed from them are
  exactly torch's levels (float64 re-division of a latent weight could break a tie the
  other way); vendor formats that ship the float model (SNPE) then re-quantize exactly;
* every planned tensor gets its quantizer's effective scale and zero point (powers of two
  stay powers of two); an int32 bias gets ``s_in * s_w`` (float32 product), as
  :func:`qtool.qdq.compute_qparams` computes it;
* Q/DQ go in by the same code as post-training quantization, so the QDQ graph, the plan and
  the backend's emitter (``.files()`` / ``.save()``) work unchanged.

In eval mode the torch model computes the same fake quantization with the same float32
numbers and integer levels, so the exported model agrees with it up to float summation
order (an activation on a rounding boundary can land one step away).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
import torch

from qtool.errors import PlanError
from qtool.io import to_model
from qtool.passes.opset import ensure_opset
from qtool.qdq import QuantizedModel, TensorQParams, insert_qdq, qdq_opset

log = logging.getLogger(__name__)


def export(model) -> QuantizedModel:
    """The trained model as a quantized model for the same backend and plan.

    Args:
        model: A :class:`qtool.qat.QatModel` (unwrap DistributedDataParallel with
            ``.module`` first).

    Returns:
        The :class:`qtool.qdq.QuantizedModel`; ``.save(folder)`` writes the backend's
        files and ``plan.json``.
    """
    model = getattr(model, "module", model)  # DDP
    source = model.source
    plan = source.plan
    float_graph = gs.import_onnx(to_model(source.float_graph))
    tensors = float_graph.tensors()
    nodes = {n.name: n for n in float_graph.nodes}
    written: set[str] = set()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for name, layer in model.layers.items():
            weight, bias = layer.deployed()
            node = nodes[name]
            _set_values(tensors, node.inputs[1].name, weight, written)
            if bias is not None:
                if len(node.inputs) < 3 or not node.inputs[2].name:
                    raise PlanError(f"{node.op} {name}: the float graph has no bias to write")
                _set_values(tensors, node.inputs[2].name, bias, written)
        for name, weight in model.weights.items():
            if name not in written:
                _set_values(tensors, name, weight(), written)
    model.train(was_training)

    qparams: dict[str, TensorQParams] = {}
    for entry in plan.entries("activation"):
        quantizer = model.activation_quantizers[entry.tensor]
        qparams[entry.tensor] = _tensor_qparams(entry, "activation", quantizer)
    for entry in plan.entries("weight"):
        quantizer = model.weights[entry.tensor].quantizer
        qparams[entry.tensor] = _tensor_qparams(entry, "weight", quantizer)
    for entry in plan.entries("bias"):
        act, weight = (qparams[name] for name in entry.bias_inputs)
        channels = np.asarray(tensors[entry.tensor].values).shape[0]
        weight_scale = weight.scale
        if weight_scale.ndim:
            weight_scale = np.tile(weight_scale, channels // weight_scale.shape[0])
        scale = (act.scale * weight_scale).astype(np.float32)
        scheme = entry.scheme.with_(per_channel_axis=0 if scale.ndim else None)
        qparams[entry.tensor] = TensorQParams(
            entry.tensor, "bias", scheme, scale, np.zeros(scale.shape, dtype=np.int64)
        )

    qdq = ensure_opset(gs.import_onnx(to_model(float_graph)), qdq_opset(plan))
    insert_qdq(qdq, plan, qparams,
               quantize_graph_outputs=source.backend.placement.quantize_outputs)
    qdq.cleanup().toposort()
    log.info("exported QAT model (%s): %d scales", model.algorithm, len(qparams))
    return QuantizedModel(qdq, float_graph, plan, source.backend, qparams, source.weight_method)


def _tensor_qparams(entry, role: str, quantizer) -> TensorQParams:
    scale, zero_point = quantizer.qparams()
    lo = (entry.scheme.qmin - zero_point.astype(np.float64)) * scale
    hi = (entry.scheme.qmax - zero_point.astype(np.float64)) * scale
    if scale.ndim == 0:
        lo, hi = float(lo), float(hi)
    return TensorQParams(entry.tensor, role, entry.scheme, scale, zero_point, lo, hi, entry.group)


def _set_values(tensors, name: str, values: torch.Tensor, written: set[str]) -> None:
    tensor = tensors[name]
    old = np.asarray(tensor.values)
    new = values.detach().cpu().numpy()
    if new.shape != old.shape:
        raise PlanError(f"trained {name} has shape {new.shape}, the graph {old.shape}")
    tensor.values = new.astype(old.dtype)
    written.add(name)


__all__ = ["export"]
