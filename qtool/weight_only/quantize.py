"""Weight-only quantization of a graph: find the layers, measure, scale, round, rewrite.

    layers (MatMul/Gemm, constant weights)          qtool.weight_only.layers
    -> stats of their inputs, streamed (gptq, awq)  qtool.weight_only.stats
    -> awq: input scales searched, folded           qtool.weight_only.awq / emit
    -> grid per block, rounding                     rtn | hqq | gptq (| lpbq scales)
    -> each layer rewritten in the target's form    qtool.weight_only.emit

Algorithms (``--weight-algorithm``): ``rtn`` (min/max grid, nearest level: the baseline of
onnxruntime's ``MatMulNBitsQuantizer``), ``hqq`` (data-free grid refit), ``gptq`` (grid
searched on the activation-weighted error, then GPTQ rounding), ``awq`` (activation-aware
scales, then GPTQ rounding on the scaled weights: the default, best on held-out data in
``benchmarks/bench_weight_only.py``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qtool.errors import WeightOnlyError
from qtool.weight_only import awq as awq_search
from qtool.weight_only.emit import replace_layer, scale_input
from qtool.weight_only.formats import BlockFormat, BlockQuantized
from qtool.weight_only.gptq import gptq
from qtool.weight_only.hqq import hqq
from qtool.weight_only.layers import Layer, find_layers
from qtool.weight_only.lpbq import lpbq_grid
from qtool.weight_only.rtn import rtn, search_grid, weighted_error

log = logging.getLogger(__name__)

ALGORITHMS = ("rtn", "hqq", "gptq", "awq")
DEFAULT_ALGORITHM = "awq"
#: Without calibration data.
DATA_FREE_ALGORITHM = "hqq"
DATA_AWARE = frozenset({"gptq", "awq"})


@dataclass
class LayerReport:
    """What happened to one layer."""

    node: str
    k: int
    n: int
    algorithm: str
    output_error: float | None = None  # tr(dW^T H dW) on the calibration data
    rtn_output_error: float | None = None  # the same for plain min/max RTN, unscaled
    awq_alpha: float | None = None
    input_scaling: str | None = None

    def to_dict(self) -> dict:
        """The fields that are set, floats rounded (stable report bytes)."""
        return {k: (round(v, 6) if isinstance(v, float) else v)
                for k, v in asdict(self).items() if v is not None}


def quantize_layers(graph: gs.Graph, fmt: BlockFormat, form: str, algorithm: str,
                    data=None, *, batch_size: int | None = None,
                    memory_budget: int | None = None):
    """Rewrite ``graph`` in place; return ``(layers, {kept node: reason}, quantized)``.

    Args:
        graph: The prepared float graph (opset 21 for the ``dq`` and ``lpbq`` forms).
        fmt: Bits, block size, symmetry.
        form: ``matmulnbits``, ``dq`` or ``lpbq``.
        algorithm: One of :data:`ALGORITHMS`.
        data: Calibration samples (needed by ``gptq`` and ``awq``).
        batch_size: Rows per onnxruntime run of the statistics.
        memory_budget: Bytes of fetched tensors per run.

    Returns:
        The per-layer reports, the nodes kept float with the reason, and the quantized
        weight of each layer by node name (for the vendor files).
    """
    if algorithm not in ALGORITHMS:
        raise WeightOnlyError(f"unknown weight algorithm {algorithm!r}",
                              f"choose one of: {', '.join(ALGORITHMS)}")
    layers, kept = find_layers(graph, fmt.block_size)
    if not layers:
        raise WeightOnlyError(
            "no MatMul/Gemm with a constant weight whose input channels are a multiple of "
            f"the block size {fmt.block_size}",
            "try a smaller --block-size; the model's MatMuls: "
            + ("; ".join(f"{k}: {v}" for k, v in list(kept.items())[:3]) or "none"))
    stats = {}
    if algorithm in DATA_AWARE:
        from qtool.weight_only.stats import collect_stats

        stats = collect_stats(graph, {layer.input.name: layer.channels for layer in layers},
                              data, batch_size=batch_size, memory_budget=memory_budget)
    hessians = {name: s.hessian for name, s in stats.items()}
    inputs = {layer.name: layer.input.name for layer in layers}  # AWQ may insert a Mul
    reports = {layer.name: LayerReport(layer.name, *layer.weight.shape, algorithm)
               for layer in layers}
    for layer in layers:  # the baseline, before any scaling
        hessian = hessians.get(layer.input.name)
        if hessian is not None:
            plain = rtn(layer.weight, fmt, _grid(layer.weight, fmt, form, None, shrink=False))
            reports[layer.name].rtn_output_error = weighted_error(
                layer.weight, plain.dequantize(), hessian)
    rounded: dict[str, tuple] = {}
    if algorithm == "awq":
        _scale_inputs(graph, layers, stats, hessians, fmt, form, reports, rounded)
    quantized = {}
    for layer in layers:
        hessian = hessians.get(inputs[layer.name])
        source, result = rounded.get(layer.name, (None, None))
        if source is not layer.weight:  # not rounded yet, or column-scaled by a fold since
            result = _round(layer.weight, fmt, form, algorithm, hessian)
        report = reports[layer.name]
        if hessian is not None:
            # in the scaled coordinates, which leave the output error unchanged
            report.output_error = weighted_error(layer.weight, result.dequantize(), hessian)
        replace_layer(graph, layer, result, "dq" if form == "lpbq" else form)
        quantized[layer.name] = result
    graph.cleanup().toposort()
    return [reports[layer.name] for layer in layers], kept, quantized


def _grid(weight, fmt, form, importance, *, shrink=True):
    grid = search_grid(weight, fmt, importance, shrink=shrink)
    return lpbq_grid(grid, fmt.bits) if form == "lpbq" else grid


def _round(weight: np.ndarray, fmt: BlockFormat, form: str, algorithm: str,
           hessian: np.ndarray | None) -> BlockQuantized:
    if algorithm == "rtn":
        return rtn(weight, fmt, _grid(weight, fmt, form, None, shrink=False))
    if algorithm == "hqq":
        result = hqq(weight, fmt)
        if form == "lpbq":  # the refit scales compressed, the weights rounded on them
            result = rtn(weight, fmt, lpbq_grid((result.scale, result.zero_point), fmt.bits))
        return result
    grid = _grid(weight, fmt, form, np.diag(hessian).astype(np.float32))
    return gptq(weight, hessian, fmt, grid)  # awq: on the scaled weights


def _scale_inputs(graph, layers: list[Layer], stats, hessians, fmt, form, reports,
                  rounded) -> None:
    """AWQ: one scale vector per input tensor, searched, applied to weights and input.

    The alpha is searched with RTN (cheap); the scaling is then kept only if GPTQ on the
    scaled weights gives a lower output error than GPTQ on the plain ones (random-init
    transformers without outlier channels lost up to 10 dB to an RTN-chosen scaling). Both
    GPTQ results land in ``rounded`` (node -> (weight it was computed from, levels)).
    """
    groups: dict[str, list[Layer]] = defaultdict(list)
    for layer in layers:
        groups[layer.input.name].append(layer)
    by_output = {layer.node.outputs[0].name: layer for layer in layers}
    for name, group in groups.items():
        hessian = hessians[name]
        choice = awq_search.search_scales([layer.weight for layer in group], hessian,
                                          stats[name].mean_abs, fmt)
        if choice.alpha == 0.0:
            continue
        s = choice.scales
        scaled_hessian = hessian / np.outer(s, s)
        plain, scaled, plain_error, scaled_error = {}, {}, 0.0, 0.0
        for layer in group:
            weight = (layer.weight * s[:, None]).astype(np.float32)
            plain[layer.name] = (layer.weight, _round(layer.weight, fmt, form, "gptq", hessian))
            scaled[layer.name] = (weight, _round(weight, fmt, form, "gptq", scaled_hessian))
            plain_error += weighted_error(layer.weight, plain[layer.name][1].dequantize(),
                                          hessian)
            scaled_error += weighted_error(weight, scaled[layer.name][1].dequantize(),
                                           scaled_hessian)
        if scaled_error >= plain_error:
            rounded.update(plain)
            log.info("awq: %s keeps its scale (alpha %.2f does not lower GPTQ's error)",
                     name, choice.alpha)
            continue
        how = scale_input(graph, group[0].input, group, (1.0 / s).astype(np.float32),
                          by_output)
        hessians[name] = scaled_hessian
        for layer in group:
            layer.weight = scaled[layer.name][0]
            rounded[layer.name] = scaled[layer.name]
            reports[layer.name].awq_alpha = choice.alpha
            reports[layer.name].input_scaling = how
        log.info("awq: %s scaled with alpha %.2f (%s)", name, choice.alpha, how)
