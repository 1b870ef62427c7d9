"""Recognise transformer blocks in a graph: attention, LayerNorm, GELU, residual Adds.

What is found decides the transformer-aware defaults of ``qtool calibrate`` (the plan and
report say which were applied and why):

* **attention**: ``MatMul -> [Mul/Div by a constant] -> [Add mask] -> Softmax -> MatMul``
  (the scores ``Q K^T``, scaled and masked, then ``P V``);
* **LayerNorm**: one ``LayerNormalization`` node, or the decomposition exporters write below
  opset 17 (``ReduceMean`` of ``x``, ``Sub``, a square, ``ReduceMean``, ``Sqrt``/``Pow``,
  ``Div``): a ``Sub(x, ReduceMean(x))`` whose output also feeds a ``Div``;
* **GELU**: a ``Gelu`` node (opset 20), ``Erf`` (exact GELU as exporters write it) or the
  tanh approximation's ``Tanh`` beside a cube;
* **residual Adds**: an ``Add`` of two computed tensors one of which is the input of a
  LayerNorm or attention block upstream (a skip connection that a LayerNorm reads);
* **attention-mask Adds**: the ``Add`` of a computed mask to the scores before Softmax. The
  mask holds ``-inf`` or the lowest float where a token is padding (a mask, not a range: an
  8-bit scale for it is meaningless and ``-inf`` has none), so the plan keeps these Adds float,
  with the Softmax they feed (:meth:`TransformerBlocks.keep_float`).

When attention and LayerNorm are both found, the plan quantizes only what feeds the
MatMul/Gemm layers (their weights and activation inputs) and keeps the arithmetic between them
float (:data:`FLOAT_OPS`: the residual stream's Adds, the bias Adds, GELU's and LayerNorm's
Muls, the attention's scale and mask, Softmax): the residual stream carries the outlier
channels of a trained transformer, and one 8-bit scale per residual Add flattens every other
channel (all-MiniLM-L6-v2 on ``-b onnxruntime``: 8.1 dB quantizing every Add, 17.8 dB with
the Adds float). NNCF's transformer mode keeps the same ops float. When some MatMul input
has outlier channels, SmoothQuant (:mod:`qtool.smoothing`) is tried on every MatMul input.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

_SCALE_OPS = ("Mul", "Div")
#: Why the default bias correction (``exact``) is not run on a transformer (the report says).
NO_BIAS_CORRECTION = (
    "transformer: the default bias correction is not run (all-MiniLM-L6-v2: it took 3.4-4.2 dB "
    "off the pooled embedding on onnxruntime, tensorrt and qnn, and 32 held-out sentences "
    "could not tell; NNCF's transformer mode leaves that model's biases as they are); "
    "--bias-correction fast still corrects")
#: Ops a transformer's plan keeps float (see the module docstring).
FLOAT_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Erf", "Tanh", "Gelu", "Sigmoid",
             "Softmax", "LayerNormalization", "Pow", "Sqrt", "ReduceMean")
_MASK_OPS = ("Add", "Where")


@dataclass(frozen=True)
class TransformerBlocks:
    """What :func:`find_transformer_blocks` counted.

    Attributes:
        attention: Softmax nodes between two MatMuls (one per attention head group).
        layernorm: LayerNorms, as one op or decomposed.
        gelu: GELU activations.
        residual_adds: Adds of two computed tensors that a LayerNorm reads.
        mask_adds: Adds of a computed attention mask to the scores, before Softmax.
    """

    attention: tuple[str, ...] = ()
    layernorm: tuple[str, ...] = ()
    gelu: tuple[str, ...] = ()
    residual_adds: tuple[str, ...] = ()
    mask_adds: tuple[str, ...] = ()

    def keep_float(self, plan):
        """``plan`` with the attention-mask Adds and a transformer's arithmetic float.

        The arithmetic is :data:`FLOAT_OPS` between the MatMuls; the reasons go into
        ``float_nodes``.
        """
        import dataclasses

        reasons = {}
        if self.is_transformer:
            quantized_readers = {c for e in plan.tensors.values() for c in e.consumers}
            reasons = {name: ("transformer: only MatMul/Gemm inputs are quantized; the "
                              "residual stream, GELU, LayerNorm and Softmax arithmetic stay "
                              "float (outlier channels)")
                       for name, op in plan.nodes.items()
                       if op in FLOAT_OPS and name in quantized_readers}
        mask_reason = ("attention mask Add: the mask holds -inf / the lowest float at "
                       "padding (a mask, not a range); kept float with the Softmax it feeds")
        reasons.update({n: mask_reason for n in self.mask_adds if n in plan.nodes})
        if not reasons:
            return plan
        plan = plan.skip(*(f"name:{n}" for n in reasons))
        return dataclasses.replace(plan, float_nodes={**plan.float_nodes, **reasons})

    def corrects_biases(self, setting) -> bool:
        """Whether ``--bias-correction`` runs here.

        ``setting`` as the options hold it; the default (``True``, exact) does not run on a
        transformer (:data:`NO_BIAS_CORRECTION`).
        """
        return not (self.is_transformer and setting is True)

    def bias_correction_note(self, setting) -> str | None:
        """For the report: why the bias correction did not run (None: it ran, or was off)."""
        from qtool.bias_correction import correction_mode

        if not correction_mode(setting) or self.corrects_biases(setting):
            return None
        return NO_BIAS_CORRECTION

    @property
    def is_transformer(self) -> bool:
        """Attention and LayerNorm both found: a transformer encoder or decoder."""
        return bool(self.attention) and bool(self.layernorm)

    def to_dict(self) -> dict:
        """Counts for the report."""
        return {"attention": len(self.attention), "layernorm": len(self.layernorm),
                "gelu": len(self.gelu), "residual_adds": len(self.residual_adds),
                "mask_adds": len(self.mask_adds)}


def find_transformer_blocks(graph: gs.Graph) -> TransformerBlocks:
    """Count attention blocks, LayerNorms, GELUs and residual Adds of ``graph``."""
    attention, layernorm, gelu, residual, masks = [], [], [], [], []
    norm_inputs: set[int] = set()
    for node in graph.nodes:
        if node.op == "Softmax" and _is_attention(node):
            attention.append(node.name)
            masks.extend(_mask_adds(node))
        elif node.op == "LayerNormalization" or _is_decomposed_layernorm(node):
            layernorm.append(node.name)
            norm_inputs.add(id(node.inputs[0]))
        elif node.op in ("Gelu", "Erf") or (node.op == "Tanh" and _near_cube(node)):
            gelu.append(node.name)
    for node in graph.nodes:
        if (node.op == "Add" and len(node.inputs) == 2
                and not any(isinstance(t, gs.Constant) for t in node.inputs)
                and id(node.outputs[0]) in norm_inputs):
            residual.append(node.name)
    return TransformerBlocks(tuple(attention), tuple(layernorm), tuple(gelu), tuple(residual),
                             tuple(dict.fromkeys(masks)))


def _producer(tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _is_attention(softmax: gs.Node) -> bool:
    """MatMul upstream (through a scale, a mask, a Cast) and MatMul downstream."""
    node = _producer(softmax.inputs[0])
    for _ in range(4):
        if node is None:
            return False
        if node.op == "MatMul":
            break
        if node.op not in (*_SCALE_OPS, *_MASK_OPS, "Cast"):
            return False
        node = _producer(node.inputs[0])
    else:
        return False
    readers = list(softmax.outputs[0].outputs)
    for _ in range(3):  # Softmax -> [Cast | Dropout | Where(IsNaN(p), 0, p)] -> MatMul
        if any(r.op == "MatMul" for r in readers):
            return True
        readers = [c for r in readers if r.op in ("Cast", "Dropout", "Where")
                   for c in r.outputs[0].outputs]
    return False


def _mask_adds(softmax: gs.Node) -> list[str]:
    """The Adds of two computed tensors between the scores' MatMul and ``softmax``."""
    found, node = [], _producer(softmax.inputs[0])
    while node is not None and node.op != "MatMul":
        if node.op == "Add" and not any(isinstance(t, gs.Constant) for t in node.inputs):
            found.append(node.name)
        node = _producer(node.inputs[0])
    return found


def _is_decomposed_layernorm(node: gs.Node) -> bool:
    """``Sub(x, ReduceMean(x))`` whose result is later divided by its root mean square."""
    if node.op != "Sub" or len(node.inputs) != 2:
        return False
    mean = _producer(node.inputs[1])
    if mean is None or mean.op != "ReduceMean" or mean.inputs[0] is not node.inputs[0]:
        return False
    return any(r.op == "Div" for r in node.outputs[0].outputs)


def _near_cube(tanh: gs.Node) -> bool:
    """The tanh GELU: ``tanh(c (x + 0.044715 x^3))``, a Pow(.., 3) or Mul(x, x*x) upstream."""
    stack, seen = [tanh], 0
    while stack and seen < 8:
        node = stack.pop()
        seen += 1
        if node.op == "Pow" and isinstance(node.inputs[1], gs.Constant):
            return True
        stack.extend(p for t in node.inputs for p in t.inputs)
    return False
