"""The QDQ ONNX graph into torch through onnx2torch, with learnable fake-quant modules.

:func:`to_torch` rewrites a copy of the quantized graph (``QuantizedModel.graph``) before
onnx2torch sees it, into nodes of the private domain ``qtool_qat`` whose converters (registered
with onnx2torch's ``add_converter``) hand over modules built here:

* each activation ``QuantizeLinear -> DequantizeLinear`` pair becomes one ``FakeQuantize``
  node: the algorithm's activation quantizer, initialised from the pair's scale and zero
  point. Members of a shared-scale group (plan ``group``) get the same module, so they share
  one parameter;
* each Conv / Gemm with a constant weight becomes a ``QuantConv`` / ``QuantGemm`` node
  (:class:`qtool.qat.bn.QuantConv`, :class:`qtool.qat.bn.QuantLinear`): the weight stored as
  integers + DequantizeLinear becomes a float parameter (the float graph's value, not the
  rounded one) with the algorithm's weight quantizer; an int32 bias becomes a float bias
  rounded to the ``s_in * s_w`` grid; float layers (skipped by the plan) keep a float weight;
* any other consumer of a quantized weight (MatMul) reads a ``QuantWeight`` node.

With ``bn_graph`` (the float model prepared without ``fold_bn``) and ``bn_strategy`` 1-4, a
Conv whose weight was folded from a BatchNormalization (the ``fold_bn`` pass names it
``<w>_bnfold`` and keeps the Conv's node name) gets the raw weight and the BN back, trained
by that strategy; the fold is checked against the folded graph's values.

Everything else is onnx2torch's own conversion. The model is returned in train mode, as
onnx2torch returns it: call ``.eval()`` to evaluate.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx2torch import convert
from onnx2torch.node_converters.registry import add_converter, get_converter
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from torch import nn

from qtool.errors import PlanError
from qtool.io import load, to_model
from qtool.qat.bn import QuantConv, QuantLinear, QuantWeight, _BiasRounding
from qtool.qat.fake_quant import FakeQuantize, get_algorithm

log = logging.getLogger(__name__)

#: Domain of the rewritten nodes; private to the import (never written to a file).
DOMAIN = "qtool_qat"
_OPS = ("FakeQuantize", "QuantConv", "QuantGemm", "QuantWeight")
#: Relative tolerance of the check that raw weights + BN fold to the graph's folded weights.
FOLD_RTOL = 1e-4


@dataclass
class _Build:
    modules: dict[str, nn.Module] = field(default_factory=dict)


_BUILD: contextvars.ContextVar[_Build] = contextvars.ContextVar("qtool_qat_build")


def _prebuilt(node, graph) -> OperationConverterResult:
    """onnx2torch converter of the ``qtool_qat`` nodes: the module built for its key."""
    module = _BUILD.get().modules[node.attributes["key"]]
    return OperationConverterResult(
        torch_module=module,
        onnx_mapping=OnnxMapping(inputs=node.input_values, outputs=node.output_values),
    )


for _op in _OPS:
    add_converter(operation_type=_op, version=1, domain=DOMAIN)(_prebuilt)

#: Default-domain schema versions that only widened the type lists (int4, float8, bfloat16):
#: onnx2torch's converter of the version before serves them (4-bit QDQ needs opset 21).
TYPE_ONLY_VERSIONS = {
    "Flatten": (21,),
    "Reshape": (19, 21),
    "Transpose": (21,),
    "Unsqueeze": (21,),
    "Identity": (19, 21),
    "Cast": (19, 21),
    "Shape": (19, 21),
    "Constant": (19, 21),
    "ConstantOfShape": (20, 21),
    "Pad": (21,),
}


def _register_type_only_versions() -> None:
    for op, versions in TYPE_ONLY_VERSIONS.items():
        for version in versions:
            try:
                get_converter(operation_type=op, version=version)
                continue  # onnx2torch has it
            except NotImplementedError:
                pass
            try:
                previous = get_converter(operation_type=op, version=version - 1)
            except NotImplementedError:
                continue
            add_converter(operation_type=op, version=version)(previous)


_register_type_only_versions()


class QatModel(nn.Module):
    """The imported model: the onnx2torch GraphModule plus handles on its quantized parts.

    Call it with the ONNX inputs in graph order (tensors); train it with any loop.

    Attributes:
        graph_module: The torch.fx GraphModule from onnx2torch.
        source: The :class:`qtool.qdq.QuantizedModel` it was imported from.
        algorithm: QAT algorithm name.
        bn_strategy: MQBench BN folding strategy (0-4).
        activation_quantizers: Planned activation tensor -> its fake-quant (shared per group).
        weights: Weight initializer name -> :class:`QuantWeight`.
        layers: ONNX node name -> :class:`QuantConv` / :class:`QuantLinear`.
        input_names: ONNX input names, in order.
    """

    def __init__(self, graph_module, source, algorithm: str, bn_strategy: int,
                 activation_quantizers, weights, layers, input_names):
        super().__init__()
        self.graph_module = graph_module
        self.source = source
        self.algorithm = algorithm
        self.bn_strategy = bn_strategy
        self.activation_quantizers = dict(activation_quantizers)
        self.weights = dict(weights)
        self.layers = dict(layers)
        self.input_names = list(input_names)

    def forward(self, *inputs):
        """The model's outputs for its ONNX inputs (tensors, graph order)."""
        return self.graph_module(*inputs)

    def prepare_inputs(self, batch) -> tuple[torch.Tensor, ...]:
        """Model inputs from a tensor, an array, a tuple of them or a dict by input name."""
        if isinstance(batch, Mapping):
            missing = [n for n in self.input_names if n not in batch]
            if missing:
                raise PlanError(f"batch lacks model input(s) {', '.join(missing)}")
            batch = [batch[n] for n in self.input_names]
        elif not isinstance(batch, (tuple, list)):
            batch = [batch]
        return tuple(torch.as_tensor(np.asarray(b)) if not torch.is_tensor(b) else b
                     for b in batch)

    def activations(self, *inputs) -> dict[str, torch.Tensor]:
        """Run the model and return every quantized activation (fake-quant output) by tensor.

        Keys are the planned tensor names, values what the exported graph's
        ``DequantizeLinear`` of that tensor computes.
        """
        targets = {
            f"{DOMAIN}/" + f"{tensor}_FakeQuantize".replace(".", "/"): tensor
            for tensor in self.activation_quantizers
        }
        found: dict[str, torch.Tensor] = {}

        class _Recorder(torch.fx.Interpreter):
            def call_module(self, target, args, kwargs):
                out = super().call_module(target, args, kwargs)
                if target in targets:
                    found[targets[target]] = out
                return out

        _Recorder(self.graph_module).run(*inputs)
        return found

    def quantizers(self) -> list[FakeQuantize]:
        """Every fake-quant module once (activations, then weights)."""
        seen: dict[int, FakeQuantize] = {}
        for q in self.activation_quantizers.values():
            seen.setdefault(id(q), q)
        for w in self.weights.values():
            if w.quantizer is not None:
                seen.setdefault(id(w.quantizer), w.quantizer)
        return list(seen.values())

    def set_quantization(self, enabled: bool) -> QatModel:
        """Turn every fake-quant on or off (off: the float model); returns self."""
        for q in self.quantizers():
            q.enabled = enabled
        return self


def to_torch(
    result,
    algorithm: str = "lsq",
    *,
    bn_graph=None,
    bn_strategy: int = 0,
) -> QatModel:
    """Import a quantized model into torch for QAT.

    Args:
        result: The :class:`qtool.qdq.QuantizedModel` (QDQ graph, float graph, plan,
            scales and zero points).
        algorithm: ``lsq``, ``lsq+``, ``pact``, ``dorefa`` or ``dsq``.
        bn_graph: The float model prepared *without* BN folding (path, ModelProto or
            gs.Graph, e.g. ``Pipeline(["cleanup", "upgrade_opset"])``'s output); needed for
            strategies 1-4.
        bn_strategy: MQBench folding strategy 0-4 (:data:`qtool.qat.bn.BN_STRATEGIES`).

    Returns:
        The :class:`QatModel`, in train mode.

    Raises:
        PlanError: Unknown algorithm or strategy, a strategy 1-4 without ``bn_graph``, a
            BN graph that does not fold to the quantized graph, or an op QAT cannot train
            (ConvTranspose with a quantized weight, Gemm with transA).
    """
    algo = get_algorithm(algorithm)
    if bn_strategy not in range(5):
        raise PlanError(f"BN folding strategy {bn_strategy} is not one of 0-4")
    if bn_strategy and bn_graph is None:
        raise PlanError(
            f"BN folding strategy {bn_strategy} needs the BN of the float model",
            "pass bn_graph=<the float model, prepared without fold_bn>, or use strategy 0",
        )
    bn_nodes = _bn_layers(load(bn_graph) if bn_graph is not None else None)
    plan, qparams = result.plan, result.qparams
    opset = result.graph.opset
    narrow = sorted({e.scheme.bits for e in plan.entries("activation")
                     if e.scheme.bits < e.scheme.storage_bits(opset)})
    if narrow:
        log.warning(
            "the QDQ graph (opset %d) stores %s-bit activations in wider integer types: "
            "onnxruntime saturates them at the storage limits, torch at the %s-bit range, so "
            "the two differ where values exceed the range; quantize at opset 21 (INT4) for a "
            "faithful simulation", opset, "/".join(map(str, narrow)), "/".join(map(str, narrow)))
    graph = gs.import_onnx(to_model(result.graph))
    float_tensors = result.float_graph.tensors()
    build = _Build()

    # activations: one module per shared group
    activation_quantizers: dict[str, FakeQuantize] = {}
    by_group: dict[str, FakeQuantize] = {}
    tensors = graph.tensors()
    for entry in plan.entries("activation"):
        key = entry.group or entry.tensor
        if key not in by_group:
            qp = qparams[entry.tensor]
            by_group[key] = algo.activation(entry.scheme, qp.scale, qp.zero_point)
        quantizer = activation_quantizers[entry.tensor] = by_group[key]
        tensor = tensors[entry.tensor]
        if not any(n.op == "QuantizeLinear" for n in tensor.outputs):  # a quantized graph
            tensor = tensors.get(f"{entry.tensor}_float", tensor)  # output (qtool.qdq)
        _replace_pairs(graph, tensor, quantizer, build, name=entry.tensor)

    # weights, and the layers that read them
    weight_entries = {e.tensor: e for e in plan.entries("weight")}
    bias_entries = {e.tensor: e for e in plan.entries("bias")}
    weight_of = {c: e.tensor for e in weight_entries.values() for c in e.consumers}
    bias_of = {c: e.tensor for e in bias_entries.values() for c in e.consumers}
    weights: dict[str, QuantWeight] = {}
    layers: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op not in ("Conv", "Gemm", "ConvTranspose", "MatMul") or len(node.inputs) < 2:
            continue
        weight_name = weight_of.get(node.name)
        if weight_name is None and isinstance(node.inputs[1], gs.Constant):
            weight_name = node.inputs[1].name
        if weight_name is None:
            continue
        entry = weight_entries.get(weight_name)
        if node.op in ("ConvTranspose", "MatMul") or (
            node.op == "Gemm" and int(node.attrs.get("transA", 0))
        ):
            if entry is not None and node.op == "ConvTranspose":
                raise PlanError(f"ConvTranspose {node.name}: QAT of its quantized weight is not "
                                "supported", "skip the node in the plan (--skip)")
            continue
        if entry is None and not all(isinstance(t, gs.Constant) or not t.name
                                     for t in node.inputs[1:]):
            continue  # a float layer with computed parameters: onnx2torch's own converter
        bn = bn_nodes.get(node.name) if bn_strategy and entry is not None else None
        folded = np.asarray(float_tensors[weight_name].values, dtype=np.float32)
        raw = _check_fold(node.name, bn, folded) if bn is not None else folded
        if weight_name not in weights:
            quantizer = None
            if entry is not None:
                qp = qparams[weight_name]
                quantizer = algo.weight(entry.scheme, qp.scale, qp.zero_point,
                                        init=torch.as_tensor(folded))
            weights[weight_name] = QuantWeight(weight_name, raw, quantizer)
        weight = weights[weight_name]
        bias, rounding = _bias_of(node, bn, float_tensors, bias_entries.get(
            bias_of.get(node.name)), activation_quantizers, weight)
        if node.op == "Conv":
            layer = QuantConv(weight, bias, dict(node.attrs), bn=_bn_module(bn),
                              strategy=bn_strategy if bn is not None else 0,
                              bias_rounding=rounding, name=node.name)
        else:
            layer = QuantLinear(weight, bias, dict(node.attrs), bias_rounding=rounding,
                                name=node.name)
        layers[node.name] = build.modules[f"layer:{node.name}"] = layer
        node.op, node.domain = ("QuantConv" if node.op == "Conv" else "QuantGemm"), DOMAIN
        node.attrs = {"key": f"layer:{node.name}"}
        while len(node.inputs) > 1:
            node.inputs.pop()

    # the other readers of a quantized weight (MatMul ...): a QuantWeight node
    for node in list(graph.nodes):
        name = weight_of.get(node.name)
        if name is None or node.name in layers:
            continue
        dequantize = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
        if dequantize is None or dequantize.op != "DequantizeLinear":
            continue
        entry, qp = weight_entries[name], qparams[name]
        values = np.asarray(float_tensors[name].values, dtype=np.float32)
        if name not in weights:
            weights[name] = QuantWeight(name, values, algo.weight(
                entry.scheme, qp.scale, qp.zero_point, init=torch.as_tensor(values)))
        build.modules[f"weight:{name}"] = weights[name]
        dequantize.op, dequantize.domain = "QuantWeight", DOMAIN
        dequantize.attrs = {"key": f"weight:{name}"}
        dequantize.inputs.clear()

    graph.cleanup().toposort()
    graph.fold_constants(should_exclude_node=lambda n: n.domain == DOMAIN).cleanup()
    model = to_model(graph)
    # onnx2torch reads value_info shapes (e.g. GlobalAveragePool's "known input shape"):
    # keep only those that carry a shape.
    known = [v for v in model.graph.value_info if v.type.tensor_type.HasField("shape")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(known)
    if all(o.domain != DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    token = _BUILD.set(build)
    try:
        graph_module = convert(model)
    finally:
        _BUILD.reset(token)
    log.info("imported for QAT (%s, BN strategy %d): %d activation quantizers, %d weights",
             algo.name, bn_strategy, len(by_group), len(weights))
    return QatModel(graph_module, result, algo.name, bn_strategy, activation_quantizers,
                    weights, layers, [t.name for t in graph.inputs])


# ------------------------------------------------------------------------------ helpers


def _replace_pairs(graph: gs.Graph, tensor: gs.Tensor, quantizer: FakeQuantize,
                   build: _Build, name: str) -> None:
    """Every QuantizeLinear of ``tensor`` (planned as ``name``) and its DQs -> one FakeQuantize."""
    key = f"activation:{name}"
    build.modules[key] = quantizer
    q_nodes = [n for n in tensor.outputs if n.op == "QuantizeLinear"]
    # levels narrower than their storage (fbgemm's 7-bit reduce_range) go through a Clip to
    # the levels' range first (qtool.qdq._clip_to_levels): the FakeQuantize clamps there too
    for clip in [n for n in tensor.outputs
                 if n.op == "Clip" and n.outputs[0].name == f"{tensor.name}_clipped"]:
        q_nodes += [n for n in clip.outputs[0].outputs if n.op == "QuantizeLinear"]
        clip.inputs.clear()
    for q_node in q_nodes:
        quantized = q_node.outputs[0]
        for dq_node in [n for n in quantized.outputs if n.op == "DequantizeLinear"]:
            out = dq_node.outputs[0]
            out.shape, out.dtype = tensor.shape, tensor.dtype or out.dtype
            dq_node.inputs.clear()
            dq_node.outputs.clear()
            graph.nodes.append(gs.Node("FakeQuantize", f"{name}_FakeQuantize", {"key": key},
                                       inputs=[tensor], outputs=[out], domain=DOMAIN))
        q_node.inputs.clear()
        q_node.outputs.clear()


def _bias_of(node, bn, float_tensors, bias_entry, activation_quantizers, weight):
    """The layer's float bias (raw when BN is kept) and its int32 rounding, if any."""
    bias_input = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    rounding = None
    values = None
    if bias_input is not None:
        if isinstance(bias_input, gs.Constant):
            values = bias_input.values
        elif bias_entry is not None:
            values = float_tensors[bias_entry.tensor].values
            act, _ = bias_entry.bias_inputs
            rounding = _BiasRounding(activation_quantizers[act], weight.quantizer)
        else:
            raise PlanError(f"{node.op} {node.name}: its bias is not a constant")
    if bn is not None:
        values = bn["bias"]
    if values is None:
        return None, rounding
    return torch.as_tensor(np.asarray(values, dtype=np.float32)), rounding


def _bn_layers(graph: gs.Graph | None) -> dict[str, dict]:
    """Conv node name -> its raw weight/bias and the BatchNormalization after it."""
    if graph is None:
        return {}
    found = {}
    for node in graph.nodes:
        if node.op != "Conv" or not isinstance(node.inputs[1], gs.Constant) or \
                node.inputs[1].values.ndim not in (3, 4, 5):
            continue
        out = node.outputs[0]
        if len(out.outputs) != 1 or out in graph.outputs:
            continue
        bn = out.outputs[0]
        params = bn.inputs[1:5]
        if bn.op != "BatchNormalization" or not all(isinstance(p, gs.Constant) for p in params):
            continue
        has_bias = len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant)
        gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float32) for p in params)
        found[node.name] = {
            "weight": np.asarray(node.inputs[1].values, dtype=np.float32),
            "bias": np.asarray(node.inputs[2].values, np.float32) if has_bias else None,
            "gamma": gamma, "beta": beta, "mean": mean, "var": var,
            "eps": float(bn.attrs.get("epsilon", 1e-5)),
        }
    return found


def _check_fold(name: str, bn: dict, folded: np.ndarray) -> np.ndarray:
    s = bn["gamma"].astype(np.float64) / np.sqrt(bn["var"].astype(np.float64) + bn["eps"])
    expected = bn["weight"] * s.reshape((-1,) + (1,) * (bn["weight"].ndim - 1))
    if expected.shape != folded.shape or not np.allclose(
        expected, folded, rtol=FOLD_RTOL, atol=FOLD_RTOL * float(np.abs(folded).max() or 1.0)
    ):
        raise PlanError(
            f"Conv {name}: its weight and BatchNormalization in bn_graph do not fold to the "
            "quantized graph's weight",
            "give bn_graph from the same float model the quantized graph was made from",
        )
    return bn["weight"]


def _bn_module(bn: dict | None) -> nn.Module | None:
    if bn is None:
        return None
    spatial = bn["weight"].ndim - 2
    kind = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial]
    module = kind(bn["gamma"].size, eps=bn["eps"])
    with torch.no_grad():
        module.weight.copy_(torch.as_tensor(bn["gamma"]))
        module.bias.copy_(torch.as_tensor(bn["beta"]))
        module.running_mean.copy_(torch.as_tensor(bn["mean"]))
        module.running_var.copy_(torch.as_tensor(bn["var"]))
    return module


__all__ = ["DOMAIN", "QatModel", "to_torch"]
