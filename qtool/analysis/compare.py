r"""``qtool compare``: a backend x method table and a bit-width sweep on one model.

**Backend x method** (as MQBench's table 10): for every backend and calibration method, the
model is planned by the backend's rules, calibrated with the method on the calibration data,
quantized, and judged on the evaluation data in onnxruntime: worst output SQNR in dB, and
top-1 accuracy when the data has labels. A cell that fails holds the error instead.

**Bit-width sweep** on one backend and method: FP32, W8A8, W4A8, W4A4 and ``mixed``, each with
its model size, bit operations per inference, SQNR and accuracy, so the cost/quality front
is visible. ``mixed`` is W4A4 with the most sensitive quarter of the layers (at least one;
ranked by :func:`qtool.analysis.layer_sensitivity` at W4A4) raised to W8A8.

How the costs are counted:

* **BOPs** (bit operations) per inference, batch 1: for every Conv, ConvTranspose, Gemm and
  MatMul with a constant weight, ``MACs * b_w * b_a`` with ``b_w`` the bits of its quantized
  weight and ``b_a`` those of its quantized activation input (32 for a float one). MACs come
  from onnx shape inference with the batch dim set to 1: ``numel(output) * numel(W) / C_out``
  for Conv (``numel(input) * numel(W) / C_in`` for ConvTranspose), ``numel(output) * K`` for
  Gemm and MatMul. Ops without weights (Add, pooling, activations) are not counted, as in
  the BOPs literature (UNIQ, Bayesian Bits); a layer whose shapes cannot be inferred counts 0.
* **Model size**: every float initializer of the prepared graph at its stored precision:
  quantized weights at their bit width, everything else (biases, int32 or float, and weights
  left float) at 32 bits. Integer initializers (shapes, indices) are not counted.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qtool import progress
from qtool.errors import QtoolError

log = logging.getLogger(__name__)

PRECISIONS = ("W8A8", "W4A8", "W4A4", "mixed")
MIXED = "mixed"
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_BITS = 32


@dataclass
class Cell:
    """One backend x method result."""

    backend: str
    method: str
    sqnr_db: float | None = None
    cosine: float | None = None
    accuracy: float | None = None
    error: str | None = None


@dataclass
class SweepRow:
    """One precision of the bit-width sweep."""

    precision: str
    size_bytes: int
    bops: int
    sqnr_db: float | None
    accuracy: float | None
    eight_bit_layers: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Comparison:
    """What :func:`compare` measured.

    Attributes:
        model: The model path as given.
        data: Calibration data, as given.
        eval_data: Evaluation data, as given.
        samples: Evaluation rows.
        float_accuracy: Top-1 accuracy of the float model (with labels).
        backends: Rows of the table.
        methods: Columns of the table.
        cells: One per backend and method, row by row.
        sweep_backend: Backend of the sweep (None: no sweep).
        sweep_method: Method of the sweep.
        sweep: FP32 first, then one row per precision.
    """

    model: str
    data: str
    eval_data: str
    samples: int
    float_accuracy: float | None
    backends: list[str]
    methods: list[str]
    cells: list[Cell]
    sweep_backend: str | None = None
    sweep_method: str | None = None
    sweep: list[SweepRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, floats rounded to 6 significant digits."""
        from qtool.analysis.evaluate import _rounded

        return _rounded(asdict(self))

    def cell(self, backend: str, method: str) -> Cell:
        """The cell of one backend and method."""
        return next(c for c in self.cells if c.backend == backend and c.method == method)

    def render(self, fmt: str = "text") -> str:
        """``text`` (aligned tables), ``markdown`` or ``json``."""
        import json

        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        markdown = fmt == "markdown"
        head = (f"{self.model}: output SQNR in dB"
                + (" (top-1 accuracy)" if self.float_accuracy is not None else "")
                + f" on {self.eval_data}, {self.samples} samples; calibrated on {self.data}")
        if self.float_accuracy is not None:
            head += f"; float accuracy {_pct(self.float_accuracy)}"
        rows = [["backend", *self.methods]]
        for backend in self.backends:
            rows.append([backend] + [_cell_text(self.cell(backend, m)) for m in self.methods])
        lines = [head, ""] + _render_table(rows, markdown)
        if self.sweep:
            lines += ["", f"bit-width sweep ({self.sweep_backend}, {self.sweep_method}); BOPs "
                      "= MACs x weight bits x activation bits of Conv/Gemm/MatMul, batch 1", ""]
            sweep = [["precision", "size (KiB)", "BOPs", "SQNR (dB)", "accuracy"]]
            for row in self.sweep:
                if row.error:
                    sweep.append([row.precision, "-", "-", f"error: {row.error}", "-"])
                    continue
                sweep.append([
                    row.precision, f"{row.size_bytes / 1024:.2f}", _si(row.bops),
                    _db(row.sqnr_db), _pct(row.accuracy),
                ])
            lines += _render_table(sweep, markdown)
            mixed = next((r for r in self.sweep if r.precision == MIXED and r.eight_bit_layers),
                         None)
            if mixed:
                lines += ["", "mixed: W4A4 with W8A8 at " + ", ".join(mixed.eight_bit_layers)]
        return "\n".join(lines) + "\n"


def compare(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    eval_data: str | os.PathLike | None = None,
    backends: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    sweep_backend: str | None = None,
    sweep_method: str | None = None,
    precisions: Sequence[str] = PRECISIONS,
    num_samples: int | None = None,
    batch_size: int = 32,
    workers: int = 1,
    executor: str | None = None,
) -> Comparison:
    """Fill the backend x method table and the bit-width sweep (see the module docstring).

    Args:
        model: The float ONNX file.
        data: Calibration data (.npz/.npy or image folder).
        eval_data: Evaluation data (labels from an .npz's ``labels``); default ``data``.
        backends: Rows (default: every registered backend).
        methods: Columns (default: every observer).
        sweep_backend: Backend of the sweep (default: the first row); "" for no sweep.
        sweep_method: Method of the sweep (default: the first column).
        precisions: Sweep rows after FP32: ``W<b>A<b>`` or ``mixed``.
        num_samples: At most this many samples of each data set.
        batch_size: Rows per onnxruntime run.
        workers: Cells computed in parallel (each worker loads the model and data by path).
        executor: Where the workers run: ``local`` processes (default) or ``ray``
            (:mod:`qtool.executor`). The table is the same either way: cells come back in
            grid order.

    Returns:
        The :class:`Comparison`.

    Raises:
        QtoolError: The model or data cannot be loaded (errors of single cells are kept in
            the cells).
    """
    from qtool import providers
    from qtool.analysis.evaluate import evaluate
    from qtool.backends import backend_names
    from qtool.calibration.observers import OBSERVERS
    from qtool.executor import get_executor
    from qtool.samples import labelled_batches

    backends = list(backends or backend_names())
    methods = list(methods or OBSERVERS)
    job = _CompareJob(str(model), str(data), None if eval_data is None else str(eval_data),
                      num_samples, batch_size, providers.current())
    graph, calib, evals, eval_path = _loaded(job)

    def batches():
        return labelled_batches(evals, eval_path, batch_size)

    grid = [(backend, method) for backend in backends for method in methods]
    done = get_executor(executor, workers).map_shared(
        _compare_cell, job, grid, desc="compare cells", progress=progress.active())
    cells = [cell for cell, _, _ in done]
    float_accuracy = next((f for _, f, _ in done if f is not None), None)
    samples = next((n for _, _, n in reversed(done) if n), 0)
    result = Comparison(str(model), str(data), str(eval_path), samples, float_accuracy,
                        backends, methods, cells)
    if sweep_backend == "" or not precisions:
        return result
    result.sweep_backend = sweep_backend or backends[0]
    result.sweep_method = sweep_method or methods[0]
    with progress.phase("bit-width sweep"):
        result.sweep = _sweep(graph, result.sweep_backend, result.sweep_method, precisions,
                              calib, batches, batch_size, evaluate)
    if result.float_accuracy is not None:
        result.sweep[0].accuracy = result.float_accuracy
    if not result.samples:
        result.samples = _count_rows(batches())
    return result


@dataclass(frozen=True)
class _CompareJob:
    """What every compare cell reads: paths and settings, never arrays (workers load them)."""

    model: str
    data: str
    eval_data: str | None
    num_samples: int | None
    batch_size: int
    providers: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def _loaded(job: _CompareJob):
    """``(prepared graph, calibration, evaluation samples, labels path)``: once a process."""
    from qtool.io import load
    from qtool.prepare import prepare
    from qtool.samples import load_samples

    graph, _ = prepare(load(job.model))
    calib = load_samples(job.data, graph, job.num_samples, seed=0)
    eval_path = job.eval_data if job.eval_data is not None else job.data
    evals = (calib if job.eval_data is None
             else load_samples(eval_path, graph, job.num_samples, seed=0))
    return graph, calib, evals, eval_path


def _compare_cell(job: _CompareJob, key: tuple[str, str]) -> tuple[Cell, float | None, int]:
    """``(cell, float accuracy, samples)`` where the executor runs it (errors in the cell)."""
    from qtool import providers
    from qtool.analysis.sensitivity import model_sqnr
    from qtool.samples import labelled_batches

    backend, method = key
    cell = Cell(backend, method)
    try:
        with providers.use(job.providers), progress.phase(f"{backend} x {method}"):
            graph, calib, evals, eval_path = _loaded(job)
            plan = _plan(graph, backend, None)
            evaluation = _quantize_and_evaluate(
                graph, backend, plan, method, calib,
                lambda: labelled_batches(evals, eval_path, job.batch_size), job.batch_size)
    except QtoolError as exc:
        cell.error = exc.message
        log.warning("%s x %s: %s", backend, method, exc.message)
        return cell, None, 0
    cell.sqnr_db = model_sqnr(evaluation)
    cell.cosine = min(o.cosine for o in evaluation.outputs)
    float_accuracy = None
    if evaluation.accuracy:
        float_accuracy, cell.accuracy = evaluation.accuracy
    return cell, float_accuracy, evaluation.samples


def _sweep(graph, backend, method, precisions, calib, batches, batch_size, evaluate):
    from qtool.analysis.sensitivity import layer_sensitivity, model_sqnr

    base = _plan(graph, backend, None)
    macs = layer_macs(graph)
    float_size, float_bops = model_cost(graph, None, macs)
    rows = [SweepRow("FP32", float_size, float_bops, None, None)]
    for precision in precisions:
        try:
            eight_bit: list[str] = []
            if precision == MIXED:
                plan = base.with_precision("W4A4")
                ranges = _ranges(graph, plan, method, calib, batch_size)
                from qtool.qdq import quantize

                low = quantize(graph, backend, ranges, plan=plan)
                ranked = layer_sensitivity(graph, low, batches)
                eight_bit = [s.node for s in ranked[: max(1, math.ceil(len(ranked) / 4))]]
                plan = with_layer_bits(plan, eight_bit, 8, 8)
            else:
                plan = base.with_precision(precision)
            evaluation = _quantize_and_evaluate(graph, backend, plan, method, calib, batches,
                                                batch_size)
        except QtoolError as exc:
            rows.append(SweepRow(precision, 0, 0, None, None, error=exc.message))
            continue
        size, bops = model_cost(graph, plan, macs)
        accuracy = evaluation.accuracy
        rows.append(SweepRow(precision, size, bops, model_sqnr(evaluation),
                             accuracy[1] if accuracy else None, eight_bit))
    return rows


def with_layer_bits(plan, layers: Sequence[str], weight_bits: int, act_bits: int):
    """``plan`` with the weights and activation inputs of ``layers`` at the given bits.

    An activation read by one of ``layers`` and by other layers takes the new bits (it is
    one tensor with one scale). Biases keep their 32 bits.
    """
    import dataclasses

    chosen = set(layers)
    tensors = {}
    for name, entry in plan.tensors.items():
        bits = {"weight": weight_bits, "activation": act_bits}.get(entry.role)
        if bits is not None and chosen & set(entry.consumers):
            entry = dataclasses.replace(entry, scheme=entry.scheme.with_(bits=bits))
        tensors[name] = entry
    return dataclasses.replace(plan, tensors=tensors)


def layer_macs(graph: gs.Graph) -> dict[str, int]:
    """Multiply-accumulates per inference (batch 1) of each weighted layer, by node name."""
    from qtool.io import to_model

    proto = to_model(graph)
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    try:
        inferred = gs.import_onnx(onnx.shape_inference.infer_shapes(proto))
    except Exception as exc:  # onnx raises its own inference errors
        log.warning("shape inference failed (%s): BOPs count 0", exc)
        return {}
    macs = {}
    for node in inferred.nodes:
        if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant):
            continue
        out = node.outputs[0].shape
        inp = node.inputs[0].shape
        w = weight.shape
        if not _known(out) or not _known(inp):
            macs[node.name] = 0
            continue
        numel_w = int(np.prod(w))
        if node.op == "Conv":
            macs[node.name] = int(np.prod(out)) * numel_w // int(w[0])
        elif node.op == "ConvTranspose":
            macs[node.name] = int(np.prod(inp)) * numel_w // int(w[0])
        elif node.op == "Gemm":
            k = int(w[1] if node.attrs.get("transB", 0) else w[0])
            macs[node.name] = int(np.prod(out)) * k
        else:
            macs[node.name] = int(np.prod(out)) * int(w[-2] if len(w) >= 2 else w[0])
    return macs


def model_cost(graph: gs.Graph, plan, macs: dict[str, int]) -> tuple[int, int]:
    """``(size in bytes, BOPs per inference)`` of ``graph`` under ``plan`` (None: all float)."""
    entries = plan.tensors if plan is not None else {}
    bits = 0
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        values = tensor.values
        if not np.issubdtype(np.asarray(values).dtype, np.floating):
            continue
        entry = entries.get(tensor.name)
        width = entry.scheme.bits if entry is not None and entry.role == "weight" else FLOAT_BITS
        bits += int(np.prod(tensor.shape)) * width
    bops = 0
    for node in graph.nodes:
        if node.name not in macs:
            continue
        weight = entries.get(node.inputs[1].name)
        w_bits = weight.scheme.bits if weight is not None and node.name in weight.consumers \
            else FLOAT_BITS
        act = entries.get(node.inputs[0].name)
        a_bits = act.scheme.bits if act is not None and node.name in act.consumers \
            else FLOAT_BITS
        bops += macs[node.name] * w_bits * a_bits
    return math.ceil(bits / 8), bops


def _plan(graph, backend, precision):
    from qtool.planner import build_plan

    plan = build_plan(graph, backend)
    return plan.with_precision(precision) if precision else plan


def _ranges(graph, plan, method, calib, batch_size):
    from qtool.calibration import calibrate

    if method == "auto":
        from qtool.analysis.autoselect import select_ranges

        return select_ranges(graph, plan, calib, batch_size=batch_size).ranges
    return calibrate(graph, plan.activation_schemes(), calib, method=method,
                     batch_size=batch_size)


def _quantize_and_evaluate(graph, backend, plan, method, calib, batches, batch_size):
    from qtool.analysis.evaluate import evaluate
    from qtool.io import load_model
    from qtool.qdq import quantize

    ranges = _ranges(graph, plan, method, calib, batch_size)
    quantized = quantize(graph, backend, ranges, plan=plan)
    return evaluate(load_model(graph), quantized.graph, batches())


def _count_rows(batches) -> int:
    return sum(int(np.shape(next(iter(b.values())))[0]) for b in batches)


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _render_table(rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return out + ["| " + " | ".join(r) + " |" for r in rows[1:]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _cell_text(cell: Cell) -> str:
    if cell.error:
        return "error"
    text = _db(cell.sqnr_db)
    return f"{text} ({_pct(cell.accuracy)})" if cell.accuracy is not None else text


def _si(count: int) -> str:
    """``count`` with a k/M/G/T suffix, 4 significant digits."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= factor:
            return f"{count / factor:.4g}{suffix}"
    return str(count)


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}%"


__all__ = ["Comparison", "PRECISIONS", "compare", "layer_macs", "model_cost", "with_layer_bits"]
