r"""Int32 biases: one quantization per consumer, and a bias scale that can hold the bias.

Engines that add the bias in the integer accumulator (``bias_mode="int32"``: acl, tvm,
onnxruntime) store it as int32 levels with ``scale = s_in * s_w`` and zero point 0.

* **Shared biases.** Exporters and cleanup's dedupe make several Convs read one bias
  initializer, but each consumer has its own ``s_in * s_w``. :func:`split_shared_biases` gives
  every weighted consumer after the first its own copy, ``<bias>_<node>``, so the planner
  plans one int32 bias per consumer (deterministic names, idempotent).
* **Collapsing scales.** An all-zero weight channel (a pruned filter, BN gamma 0) gets the
  minimum weight scale 2^-100 and an input that never fired the range (0, 0), so ``s_in * s_w``
  underflows and the bias is clipped to nothing (acl gave 4e-23 for a bias of 0.5). As
  onnxruntime's quantizer does (``_adjust_weight_scale_for_int32_bias``),
  :func:`adjust_weight_scales` raises such a channel's weight scale until

      s_in * s_w >= max(1.0001 * 2 * |b| / (2^32 - 2), MIN_SCALE)

  so the bias fits in int32 and the bias scale is a normal float32, never 0 or denormal.
  Raising the scale of an all-zero channel changes no weight; otherwise the caller is told.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from qtool.scheme import MIN_SCALE

#: Ops that take a bias as input 2 (the int32-bias layers).
BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
_INT32_RANGE = float(np.iinfo(np.int32).max) - float(np.iinfo(np.int32).min + 1)
_MARGIN = 1.0001


def split_shared_biases(graph: gs.Graph) -> int:
    """Give every Conv/ConvTranspose/Gemm that shares a bias initializer its own copy, in place.

    The first reader (in node order) keeps the original; each other weighted reader gets a
    Constant ``<bias>_<node name>`` holding the same array. Run after node naming.

    Returns:
        The number of copies made.
    """
    taken = set(graph.tensors())
    seen: set[str] = set()
    copies = 0
    for node in graph.nodes:
        if node.op not in BIAS_OPS or len(node.inputs) < 3:
            continue
        bias = node.inputs[2]
        if not isinstance(bias, gs.Constant) or not bias.name:
            continue
        if bias.name not in seen:
            seen.add(bias.name)
            continue
        name, suffix = f"{bias.name}_{node.name}", 0
        while name in taken:
            suffix += 1
            name = f"{bias.name}_{node.name}_{suffix}"
        taken.add(name)
        node.inputs[2] = gs.Constant(name, bias.values)
        copies += 1
    return copies


def required_bias_scale(bias: np.ndarray, per_channel: bool) -> np.ndarray:
    """The smallest ``s_in * s_w`` that holds ``bias`` in int32 (per channel or one value)."""
    amax = np.abs(np.asarray(bias, dtype=np.float64))
    if not per_channel:
        amax = np.asarray(amax.max() if amax.size else 0.0)
    return np.maximum(_MARGIN * 2.0 * amax / _INT32_RANGE, MIN_SCALE)


def adjust_weight_scales(
    input_scale: float, weight_scale: np.ndarray, bias: np.ndarray, power_of_two: bool = False
) -> np.ndarray:
    """Weight scales raised where ``input_scale * weight_scale`` cannot hold the bias.

    Args:
        input_scale: The activation scale ``s_in`` (float32).
        weight_scale: The weight scales, 0-d or one per output channel (float32). A grouped
            ConvTranspose's scales repeat once per group over the bias; the largest need of
            the repeats is taken.
        bias: The float bias.
        power_of_two: Round a raised scale up to a power of two (TVM's shifts).

    Returns:
        float32 scales of ``weight_scale``'s shape, each ``>=`` the original.
    """
    weight_scale = np.asarray(weight_scale, dtype=np.float32)
    need = required_bias_scale(bias, per_channel=weight_scale.ndim > 0)
    if weight_scale.ndim and need.shape[0] != weight_scale.shape[0]:
        need = need.reshape(-1, weight_scale.shape[0]).max(axis=0)
    s_in = np.float32(input_scale)
    raised = weight_scale.astype(np.float64).copy()
    flat_need, flat = need.reshape(-1), raised.reshape(-1)
    for i, want in enumerate(flat_need):
        if np.float32(s_in * np.float32(flat[i])) >= want:
            continue
        candidate = want / float(s_in)
        if power_of_two:
            candidate = 2.0 ** math.ceil(math.log2(candidate))
        value = np.float32(min(candidate, np.finfo(np.float32).max))
        while np.float32(s_in * value) < want and np.isfinite(value):
            value = np.nextafter(value, np.float32(np.inf)) if not power_of_two else value * 2
        flat[i] = float(value)
    return raised.reshape(weight_scale.shape).astype(np.float32)


__all__ = ["adjust_weight_scales", "required_bias_scale", "split_shared_biases"]
