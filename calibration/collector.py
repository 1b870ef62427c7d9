"""The collector: stream calibration data through the float graph in onnxruntime.

One ``InferenceSession`` of the float graph, with the tensors to observe added as graph
outputs and only those fetched, runs batch by batch. Each batch's outputs go to every
observer at once and are dropped before the next batch runs, so memory is one batch of the
observed tensors plus the observers' fixed-size state, whatever the number of samples.

Batching (:mod:`qtool.calibration.batching`, shared with every phase that runs the model):
samples (``dict[input, ndarray]``) are concatenated along each input's batch axis into
batches of ``batch_size`` rows; a sample whose other dims differ from the pending ones
(dynamic shapes) starts a new batch. A model with a fixed batch dim ``B`` runs batches of
exactly ``B``; a remainder of fewer than ``B`` rows is dropped with a warning.

Memory by budget: a batch whose observed tensors would exceed ``memory_budget`` bytes is run
as micro-batches of ``m`` rows, ``m = max(1, floor(budget / bytes per row))`` (bytes per row
measured on the first row the session runs), split into near-equal parts. The observers see
the same values either way (MinMax and the histograms give the same bits; MeanStd and Norm
equal to float64 rounding), and peak memory follows the float model, not the number of
observed tensors. onnxruntime holds about twice the budget (the outputs, and the
intermediate tensors they are computed in): on MobileNet-V2 at batch 8 the session peaks
108 / 167 / 272 / 507 MB above the model for budgets of 16 / 64 / 128 MB / unlimited, hence
the default of 64 MB. A model with a fixed batch dim, or with an input whose samples are
not on axis 0 (recurrent state, scalars), runs its batches whole.

After the first batch of a given input shape, the session writes the observed tensors into
output buffers bound once (onnxruntime IO binding) instead of allocating them per run.
Batches of one row (a model with a fixed batch of 1) run two at a time in one process, each
run with half the cores and its own bound buffers, and are observed in data order: at
batch 1 a second intra-op thread gains a conv net little, a second run beside it much
(issue #22; :func:`qtool.cpu.runs_at_once`).
Observed tensors that are graph inputs are read from the feeds, initializers once from the
model; tensors inside If/Loop/Scan bodies leave them as extra outputs of their node
(:func:`qtool.io.expose_outputs`). NaN, or Inf in a tensor no mask constant reaches
(:mod:`qtool.masks`), raises :class:`qtool.errors.CalibrationError` naming the tensor and the
sample; mask values (attention masks' ``-inf`` and ``finfo.min``) are left out of the ranges
and counted (logged). With ``workers > 1`` (or ``executor="ray"``) data that
a loader reads from a path is split into row windows on batch boundaries, each observed by
its own worker (:mod:`qtool.executor`: local processes or Ray), and the observers are merged
in window order; a plain iterable of samples is dealt batch by batch to local processes
instead (see :func:`calibrate`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qtool.calibration.batching import (  # noqa: F401  (re-exported for callers)
    DEFAULT_BATCH_SIZE,
    Batch,
    batches,
    resolve_batch_size,
    row_windows,
)
from qtool.calibration.data import check_inputs, no_batch_axis_hint, specs_of
from qtool.calibration.observers import NonFiniteError, Observer, get_observer

from qtool import progress as qtool_progress
from qtool import providers
from qtool.cpu import runs_at_once
from qtool.errors import CalibrationError, DataError, InvalidModelError, QtoolError
from qtool.io import release
from qtool.masks import proto_mask_flow
from qtool.memory import trim_heap
from qtool.scheme import QuantScheme

log = logging.getLogger(__name__)

#: Bytes of observed tensors one onnxruntime run may produce (``--memory-budget``).
DEFAULT_MEMORY_BUDGET = 64 * 2**20
#: Runs of the calibration session at once in one process, at batches of one row.
SIDE_BY_SIDE = 2
# Graph optimizations of the calibration session. "all" (onnxruntime's default) adds layout
# changes and fusions: fastest on CPU, ranges equal to the unoptimized graph's up to float32
# rounding. "disable" runs every node as written, exactly as the QDQ model is judged.
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
DEFAULT_OPTIMIZATION = "all"


@dataclass(frozen=True)
class ObservePlan:
    """Where each observed tensor comes from: session outputs, feeds, or constants."""

    model_bytes: bytes | str  # a str: the path of a model with external data (over 2 GB)
    outputs: tuple[str, ...]
    feeds: tuple[str, ...]
    constants: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)  # output -> tensor in a body
    # tensors a mask constant reaches (qtool.masks): Inf there is a mask, elsewhere an error
    mask_tensors: frozenset[str] = frozenset()


def plan_observation(model, tensors: Iterable[str]) -> ObservePlan:
    """Add the tensors to observe as graph outputs and serialize the model once.

    Args:
        model: Path, ModelProto or Graph of the float model.
        tensors: Names of the tensors to observe.

    Raises:
        CalibrationError: A tensor the graph does not have.
    """
    from qtool.io import is_large, load, load_model, session_source

    spilled = None
    if not isinstance(model, bytes | onnx.ModelProto) and is_large(
            graph_of := model if isinstance(model, gs.Graph) else load(model, check=False)):
        # over 2 GB: the weights go to a temporary data file once, straight from the graph;
        # only the small model file is parsed and given the observed outputs here
        spilled = Path(session_source(graph_of))
        del graph_of
        proto = onnx.load(str(spilled), load_external_data=False)
    else:
        proto = load_model(model)
    if proto is model:
        # the caller's proto: copy it before adding outputs. A path or a Graph gives a fresh
        # proto already, and one more copy of every weight would only raise the peak memory.
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    graph = proto.graph
    masks = proto_mask_flow(graph).tensors
    initializers = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input} - set(initializers)
    produced = {name for node in graph.node for name in node.output if name}
    existing_outputs = {o.name for o in graph.output}
    outputs, feeds, constants, in_bodies = [], [], {}, []
    for name in dict.fromkeys(tensors):
        if name in inputs:
            feeds.append(name)
        elif name in initializers:
            constants[name] = onnx.numpy_helper.to_array(
                initializers[name], base_dir=str(spilled.parent) if spilled else "")
        elif name in produced:
            outputs.append(name)
            if name not in existing_outputs:
                graph.output.append(onnx.ValueInfoProto(name=name))
        else:
            in_bodies.append(name)
    aliases = {}
    if in_bodies:
        from qtool.io import expose_outputs

        exposed = expose_outputs(proto, in_bodies)
        missing = [name for name in in_bodies if name not in exposed]
        if missing:
            raise CalibrationError(
                f"tensor {missing[0]} to calibrate is not in the model",
                "the plan and the model disagree: build the plan from this model",
            )
        aliases = {out: name for name, out in exposed.items()}
        outputs.extend(exposed.values())
    if spilled is not None:
        from qtool.io import atomic_write_bytes

        atomic_write_bytes(spilled, proto.SerializeToString())
        return ObservePlan(str(spilled), tuple(outputs), tuple(feeds), constants, aliases)
    return ObservePlan(proto.SerializeToString(), tuple(outputs), tuple(feeds), constants,
                       aliases, masks & (set(outputs) | set(feeds) | set(constants)
                                         | set(aliases.values())))


def make_session(model_bytes: bytes | str, *, intra_op_threads: int | None = None,
                 optimization: str | None = None):
    """A CPU onnxruntime session with the given threads and optimization level."""
    import onnxruntime as ort

    optimization = optimization or DEFAULT_OPTIMIZATION
    if optimization not in OPTIMIZATION_LEVELS:
        raise CalibrationError(
            f"unknown optimization level {optimization!r}",
            f"choose one of: {', '.join(OPTIMIZATION_LEVELS)}",
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if intra_op_threads:
        options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # onnxruntime's memory pattern plans one block for all of a run's tensors by their
    # lifetimes; with every observed tensor an output, plain runs of MobileNet-V2 (batch 8)
    # peaked 210 MB higher with it than without, at the same speed (14 MB with IO binding)
    options.enable_mem_pattern = False
    # onnxruntime's intra-op threads spin after each run by default, and take the cores the
    # observers' numpy work needs between runs: on 2 shared cores ResNet-50's calibration
    # (MinMax, MSE, auto) took 1.4-1.6x the wall time with spinning at load 4-5, 1.0-1.3x
    # at load 3, and 1.4-1.6x the CPU time
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return open_session(model_bytes, options, "calibrate it")


def open_session(model_bytes: bytes | str, options, purpose: str):
    """An onnxruntime session on qtool's execution providers (:mod:`qtool.providers`).

    Every phase opens its sessions so: a model onnxruntime cannot load is one clear error.

    Args:
        model_bytes: The serialized model, or the path of one with external data
            (:func:`qtool.io.session_source`).
        options: The ``onnxruntime.SessionOptions``.
        purpose: What the session is for, for the message ("calibrate it").

    Raises:
        InvalidModelError: onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model_bytes, options, providers=providers.current())
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InvalidModelError(
            f"onnxruntime cannot load the model to {purpose}: {_first_line(exc)}",
            "qtool runs models in onnxruntime: the model must run there",
        ) from exc


def run_error(exc: BaseException, where: str) -> QtoolError:
    """The clear error for an onnxruntime run that failed (every phase maps failures so).

    An allocation failure is the model's doing (a tensor sized from the data or from a
    constant subgraph): :class:`InvalidModelError`; anything else is taken as data the model
    does not accept: :class:`DataError`. onnxruntime's first line names the node.

    Args:
        exc: What onnxruntime raised.
        where: Which run, e.g. "on the samples 0..15".
    """
    text = str(exc)
    if any(word in text.lower() for word in ("alloc", "bad_alloc", "out of memory")):
        return InvalidModelError(
            f"onnxruntime cannot allocate the memory the model asks for {where}: "
            f"{_first_line(exc)}",
            "a tensor of the model is sized beyond this machine's memory (a ConstantOfShape, "
            "Expand or Tile?): check the shapes that feed it, or lower --batch-size",
        )
    return DataError(
        f"onnxruntime cannot run the model {where}: {_first_line(exc)}",
        "check that the data fits the model's inputs (a dynamic dim may accept only some "
        "sizes)",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_budget(specs, fixed: bool, memory_budget: int | None) -> int | None:
    """The memory budget a collector may split batches by, or None (whole batches).

    Micro-batches slice axis 0 of every input: not for a model that fixes its batch, nor for
    inputs whose samples lie along another axis (recurrent state) or that are no batch at
    all (scalars).
    """
    sliceable = all(s.batch_axis == 0 for s in specs)
    return memory_budget if sliceable and not fixed else None


class RowBudget:
    """Splits batches into runs whose fetched tensors stay under a byte budget.

    The first run is one row; :meth:`measure` records what a row fetched, and later runs
    take ``m = max(1, budget // bytes per row)`` rows, as near-equal slices of axis 0.

    Args:
        budget: Bytes per run (None: whole batches).
    """

    def __init__(self, budget: int | None):
        self.budget = budget
        self.row_bytes: float | None = None

    def measure(self, values: Iterable[np.ndarray], rows: int) -> None:
        """Record the bytes of one run's fetched tensors (the first run only)."""
        if self.row_bytes is None:
            self.row_bytes = sum(int(v.nbytes) for v in values) / max(rows, 1)

    def spans(self, rows: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` row spans of one batch of ``rows`` rows, within the budget.

        Lazy: the span after the first measuring run is sized once :meth:`measure` ran.
        """
        if self.budget is None or rows <= 1:
            yield 0, rows
            return
        first = 0
        if self.row_bytes is None:
            yield 0, 1
            first = 1
        micro = max(1, int(self.budget // max(self.row_bytes or 1.0, 1.0)))
        parts = -(-(rows - first) // micro)
        size = max(1, -(-(rows - first) // max(parts, 1)))
        for start in range(first, rows, size):
            yield start, min(start + size, rows)


class Collector:
    """One session and the observers it feeds.

    Args:
        plan: What to fetch (from :func:`plan_observation`).
        observers: Observer per tensor name.
        intra_op_threads: onnxruntime intra-op threads (None: onnxruntime's default).
        optimization: Session graph optimization level (see :data:`OPTIMIZATION_LEVELS`).
        memory_budget: Bytes of observed tensors per session run; larger batches run as
            micro-batches (None: whole batches; see the module docstring).
        side_by_side: Runs of the session at once (threads; onnxruntime releases the GIL):
            the observers take each run's tensors in data order, the run after it already
            under way. Each run has its own bound output buffers. Call :meth:`finish` after
            the last batch.
    """

    def __init__(self, plan: ObservePlan, observers: Mapping[str, Observer], *,
                 intra_op_threads: int | None = None, optimization: str | None = None,
                 memory_budget: int | None = None, side_by_side: int = 1):
        self.plan = plan
        self.observers = dict(observers)
        self.intra_op_threads = intra_op_threads
        self.optimization = optimization or DEFAULT_OPTIMIZATION
        self.budget = RowBudget(memory_budget)
        self.side_by_side = max(1, side_by_side)
        self._session = None
        self._bound: list = [None] * self.side_by_side  # per slot of runs side by side
        self._slot = 0
        self._pending: collections.deque = collections.deque()
        self._pool = None

    def observe_constants(self) -> None:
        """Feed initializers that are observed (once, they do not change with the data)."""
        for name, array in self.plan.constants.items():
            self._feed(name, array, None)

    def run(self, batch: Batch) -> None:
        """Run one batch and feed every observed tensor to its observer; keep nothing."""
        if self._session is None:
            self._session = make_session(self.plan.model_bytes,
                                         intra_op_threads=self.intra_op_threads,
                                         optimization=self.optimization)
            # onnxruntime holds its own copy of the weights now: the serialized model (as
            # big as the weights) would only add to the peak memory of every batch after.
            self.plan = replace(self.plan, model_bytes=b"")
            trim_heap()  # onnxruntime's parse of the model is freed too
        for part in self._parts(batch):
            if (self.side_by_side == 1 or not self.plan.outputs
                    or self.budget.row_bytes is None):  # the first run sizes the micro-batches
                self._drain()
                self._run_part(part)
            else:
                self._submit(part)

    def finish(self, observe: bool = True) -> None:
        """Observe the runs still under way (runs side by side); the threads end.

        ``observe`` False (after an error): the runs are waited for and dropped.
        """
        try:
            if observe:
                self._drain()
        finally:
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _submit(self, batch: Batch) -> None:
        """Start ``batch``'s run beside the ones under way; observe the oldest when full.

        A slot's buffers are written again only after the run that last filled them was
        observed (the oldest of ``side_by_side`` runs is observed before the next starts).
        """
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.side_by_side)
        slot, self._slot = self._slot, (self._slot + 1) % self.side_by_side
        self._pending.append((batch, self._pool.submit(self._outputs, batch.feeds, slot)))
        if len(self._pending) >= self.side_by_side:
            self._observe_oldest()

    def _drain(self) -> None:
        while self._pending:
            self._observe_oldest()

    def _observe_oldest(self) -> None:
        batch, future = self._pending.popleft()
        try:
            values = future.result()
        except Exception as exc:  # onnxruntime raises its own exception types
            raise run_error(exc, f"on the samples {batch.first}.."
                                 f"{batch.first + batch.rows - 1}") from exc
        self._observe(batch, values)

    def _parts(self, batch: Batch) -> Iterator[Batch]:
        """The batch as micro-batches whose observed tensors fit the memory budget."""
        if not self.plan.outputs:
            yield batch
            return
        for start, stop in self.budget.spans(batch.rows):
            yield batch if stop - start == batch.rows else _rows(batch, start, stop)

    def _run_part(self, batch: Batch) -> None:
        values = []
        if self.plan.outputs:
            try:
                values = self._outputs(batch.feeds)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise run_error(exc, f"on the samples {batch.first}.."
                                     f"{batch.first + batch.rows - 1}") from exc
        self._observe(batch, values)

    def _observe(self, batch: Batch, values: list[np.ndarray]) -> None:
        if self.plan.outputs:
            self.budget.measure(values, batch.rows)
            for name, value in zip(self.plan.outputs, values, strict=True):
                self._feed(self.plan.aliases.get(name, name), value, batch)
        for name in self.plan.feeds:
            self._feed(name, batch.feeds[name], batch)

    def _outputs(self, feeds: dict[str, np.ndarray], slot: int = 0) -> list[np.ndarray]:
        """The observed tensors of one batch.

        The first batch of each input shape runs plainly; the next ones write into output
        buffers bound once (onnxruntime's IO binding), which saves allocating and copying
        every observed tensor per batch. The buffers are overwritten by the next batch, so
        the memory held is one batch of outputs whatever the number of samples.
        """
        signature = tuple((name, array.shape) for name, array in feeds.items())
        bound = self._bound[slot]
        if bound is not None and bound[0] == signature:
            binding, buffers = bound[1], bound[2]
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            try:
                self._session.run_with_iobinding(binding)
                return buffers
            except Exception:  # output shapes that depend on values: run plainly from now on
                self._bound[slot] = None
        self._bound[slot] = bound = None  # free the bound buffers before the plain run
        values = self._session.run(list(self.plan.outputs), feeds)
        if all(isinstance(v, np.ndarray) and v.dtype.kind in "fiub" for v in values):
            binding = self._session.io_binding()
            for name, value in zip(self.plan.outputs, values, strict=True):
                binding.bind_output(name, "cpu", 0, value.dtype, value.shape,
                                    value.ctypes.data)
            self._bound[slot] = (signature, binding, values)
        return values

    def _feed(self, name: str, value: np.ndarray, batch: Batch | None) -> None:
        if value.size == 0:
            return  # a tensor of an If branch that did not run
        observer = self.observers[name]
        infinite = getattr(observer, "infinite", 0)  # anything with update() may observe
        try:
            observer.update(value)
        except NonFiniteError as exc:
            raise NonFiniteError(name, exc.kind, _where(value, batch)) from None
        if (getattr(observer, "infinite", 0) > infinite
                and name not in self.plan.mask_tensors):
            # no mask constant reaches this tensor: the Inf is an overflow, not a mask
            raise NonFiniteError(name, "Inf", _where(value, batch))


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start .. stop - 1`` of a batch (views: slices of axis 0 stay contiguous)."""
    return Batch(batch.first + start, stop - start,
                 {name: array[start:stop] for name, array in batch.feeds.items()})


def _where(value: np.ndarray, batch: Batch | None) -> str:
    """Which sample produced the non-finite value (rows along axis 0 when it is the batch)."""
    if batch is None:
        return "(an initializer)"
    if value.ndim and value.shape[0] == batch.rows:
        bad = ~np.isfinite(value.reshape(batch.rows, -1)).all(axis=1)
        return f"at sample {batch.first + int(np.flatnonzero(bad)[0])}"
    return f"in the batch of samples {batch.first}..{batch.first + batch.rows - 1}"


def calibrate(model, schemes: Mapping[str, QuantScheme], data: Iterable[Mapping[str, np.ndarray]],
              *, method="minmax", batch_size: int | None = None, num_samples: int | None = None,
              workers: int = 1, intra_op_threads: int | None = None,
              progress: bool | None = None, optimization: str | None = None,
              executor: str | None = None,
              memory_budget: int | None = DEFAULT_MEMORY_BUDGET) -> dict[str, tuple]:
    """Observe the float model's activations over the data and return their clip ranges.

    Args:
        model: Path, ModelProto or Graph of the float (prepared) model.
        schemes: The tensors to observe and the scheme each range is for.
        data: Iterable of samples ``dict[input_name, ndarray]`` (see ``qtool.calibration.data``).
        method: Observer name (``minmax``, ``mse``, ``kld``, ``quantile``, ``norm``,
            ``meanstd``, ``ema_minmax``), an observer class, or ``Cls.with_args(...)``; not
            an instance.
        batch_size: Rows per session run (default 16; a fixed batch dim wins).
        num_samples: Use at most this many samples.
        workers: Processes to split the batches over; their observers are merged. The result
            equals one process exactly for MinMax and the histogram methods, and to float64
            rounding for MeanStd and Norm.
        intra_op_threads: onnxruntime intra-op threads per process (default: onnxruntime's
            choice with one worker, cores / workers with several).
        progress: Show a progress bar; None shows one when stderr is a terminal.
        optimization: onnxruntime graph optimization level of the calibration session
            (:data:`OPTIMIZATION_LEVELS`; default :data:`DEFAULT_OPTIMIZATION`). "disable"
            computes every tensor exactly as the QDQ model run with optimizations off does.
        executor: Where ``workers > 1`` run: ``local`` processes (default) or ``ray``
            (:mod:`qtool.executor`). Data given as a path-backed loader is split into
            ``workers`` row windows on batch boundaries, each observed where the executor runs
            it (the loader travels as its path and window), and the observers are merged in
            window order: the same ranges, bit for bit, as one process for MinMax, EMA MinMax
            and the histogram methods.
        memory_budget: Bytes of observed tensors per onnxruntime run (default 64 MB);
            bigger batches run as micro-batches (see the module docstring). None: whole
            batches.

    Returns:
        ``{tensor: (lo, hi)}`` per observed tensor (floats, or arrays for per-channel schemes);
        a tensor inside an If branch that no sample took has none (a warning is logged).

    Raises:
        DataError: The data does not fit the model (checked on the first sample, before any
            session is built) or is empty.
        CalibrationError: NaN/Inf in an activation (naming tensor and sample), an unknown
            tensor or method.
    """
    ctor = get_observer(method)
    if workers < 1:
        raise CalibrationError(f"workers={workers}: must be at least 1")
    specs = specs_of(data, model)
    stream = checked_samples(data, specs)
    observers = {name: ctor(scheme, name) for name, scheme in schemes.items()}
    if not observers:
        return {}
    plan = plan_observation(model, observers)
    try:
        return _calibrate(plan, data, specs, stream, observers, ctor, schemes, method=method,
                          batch_size=batch_size, num_samples=num_samples, workers=workers,
                          intra_op_threads=intra_op_threads, progress=progress,
                          optimization=optimization, executor=executor,
                          memory_budget=memory_budget)
    finally:
        release(plan.model_bytes)  # a temporary model with external data: removed


def _calibrate(plan, data, specs, stream, observers, ctor, schemes, *, method, batch_size,
               num_samples, workers, intra_op_threads, progress, optimization, executor,
               memory_budget):
    plan_aliases = set(plan.aliases.values())
    trim_heap()  # the proto copy that was serialized is freed
    size, fixed = resolve_batch_size(specs, batch_size)
    budget = run_budget(specs, fixed, memory_budget)
    stream = batches(stream, specs, size, fixed=fixed,
                     num_samples=num_samples)
    total = _length(data, num_samples)
    if workers > 1 or executor == "ray":
        shards = _shards(data, total, size, workers) if total else None
        if shards is not None:
            _calibrate_shards(plan, ctor, schemes, observers, shards, specs, size, fixed,
                              budget, optimization or DEFAULT_OPTIMIZATION, executor,
                              workers, intra_op_threads, progress)
            return _ranges(observers, plan_aliases)
        if executor == "ray":
            raise CalibrationError(
                "--executor ray needs data qtool can split by rows (an .npz/.npy file, an "
                "image folder or random inputs)", "give the data as a path",
            )
    with _progress_bar(total, progress) as bar:
        if workers == 1:
            # without threads given, batches of one row: two runs side by side, each with
            # half the cores (at batch 1 a second intra-op thread gains a conv net little, a
            # second run much)
            side, threads = (runs_at_once(size, SIDE_BY_SIDE) if intra_op_threads is None
                             else (1, intra_op_threads))
            collector = Collector(plan, observers, optimization=optimization,
                                  intra_op_threads=threads, memory_budget=budget,
                                  side_by_side=side)
            del plan  # the collector drops the serialized model once its session exists
            collector.observe_constants()
            ran = 0
            try:
                for batch in stream:
                    try:
                        collector.run(batch)
                    except DataError as exc:
                        if ran:
                            raise
                        # the first batch fails: a [T, F] model fed rows of its T axis?
                        raise DataError(exc.message,
                                        exc.hint + no_batch_axis_hint(specs)) from exc
                    ran += batch.rows
                    bar.update(batch.rows)
            except BaseException:
                collector.finish(observe=False)
                raise
            collector.finish()
            if not ran and fixed:
                raise DataError(
                    f"no calibration batch ran: the model fixes the batch dim to {size} and "
                    "the data has fewer samples", f"give at least {size} samples"
                    + no_batch_axis_hint(specs))
        else:
            threads = intra_op_threads or max(1, (os.cpu_count() or 1) // workers)
            _run_workers(plan, ctor, schemes, observers, stream, workers, threads, bar,
                         optimization or DEFAULT_OPTIMIZATION, budget)
    return _ranges(observers, plan_aliases)


def _ranges(observers: Mapping[str, Observer], plan_aliases) -> dict[str, tuple]:
    ranges = {}
    masked = {name: o.masked for name, o in observers.items() if getattr(o, "masked", 0)}
    if masked:
        log.info("left %d mask value(s) (+-inf or |x| >= 1e30: attention masks) out of the "
                 "ranges of %d tensor(s): %s", sum(masked.values()), len(masked),
                 ", ".join(f"{name} ({count})" for name, count in masked.items()))
    for name, observer in observers.items():
        try:
            ranges[name] = _as_range(observer.range())
        except CalibrationError:
            if name not in plan_aliases:
                raise
            # inside an If branch the data never took: no range (the plan keeps it float)
            log.info("tensor %s (inside a subgraph body) was never computed on the "
                     "calibration data: it gets no range", name)
    return ranges


# -- shards on an executor (local processes or Ray) ----------------------------------------


@dataclass(frozen=True)
class _Shared:
    """What every shard task needs, sent once per worker (Ray: once to the object store)."""

    plan: ObservePlan
    ctor: Any
    schemes: dict[str, QuantScheme]
    optimization: str
    providers: tuple[str, ...]
    threads: int | None


@dataclass(frozen=True)
class _ShardTask:
    """One shard: rows ``start .. stop - 1`` of the data, as a loader that reads only those.

    The loader travels as a description (a path and a row window); the worker opens the file.
    """

    index: int
    data: Any
    specs: list
    batch_size: int
    fixed: bool
    budget: int | None


def _shards(data, total: int, batch_size: int, workers: int) -> list[tuple[int, Any]] | None:
    """``workers`` contiguous row windows of ``data`` on batch boundaries, or None.

    Windows start at multiples of the batch size, so every shard runs exactly the batches
    one process would: per-batch statistics (``ema_minmax``) merge to the same value.
    """
    if not hasattr(data, "shard"):
        return None
    return [(start, data.shard(start, stop))
            for start, stop in row_windows(total, batch_size, workers)]


def _calibrate_shards(plan, ctor, schemes, observers, shards, specs, size, fixed, budget,
                      optimization, executor, workers, intra_op_threads, progress) -> None:
    """Observe each shard where the executor runs it; merge the observers in shard order."""
    from qtool.executor import get_executor

    threads = intra_op_threads or max(1, (os.cpu_count() or 1) // workers)
    shared = _Shared(plan, ctor, dict(schemes), optimization, providers.current(), threads)
    tasks = [_ShardTask(i, window, list(specs), size, fixed, budget)
             for i, (_, window) in enumerate(shards)]
    runner = get_executor(executor, workers)
    results = runner.map_shared(_observe_shard, shared, tasks, desc="calibration shards",
                                progress=progress)
    for shard in results:  # fixed order: the same merge whatever finished first
        for name, observer in shard.items():
            observers[name].merge(observer)


def _observe_shard(shared: _Shared, task: _ShardTask) -> dict[str, Observer]:
    observers = {name: shared.ctor(scheme, name) for name, scheme in shared.schemes.items()}
    with providers.use(shared.providers):
        collector = Collector(shared.plan, observers, intra_op_threads=shared.threads,
                              optimization=shared.optimization, memory_budget=task.budget)
        if task.index == 0:
            collector.observe_constants()
        for batch in batches(iter(task.data), task.specs, task.batch_size, fixed=task.fixed):
            collector.run(batch)
    return observers


def checked_samples(data: Iterable[Mapping[str, np.ndarray]], specs) -> Iterator:
    """The samples of ``data``, the first one checked against the model right away.

    So a data set that does not fit the model fails before any session is built.

    Raises:
        DataError: The data is empty, or its first sample does not fit the model's inputs.
    """
    stream = iter(data)
    head = next(stream, None)
    if head is None:
        raise DataError("the calibration data is empty", "give at least one sample")
    check_inputs(specs, head)
    return itertools.chain([head], stream)


def _as_range(lo_hi) -> tuple:
    lo, hi = lo_hi
    if np.ndim(lo) == 0:
        return float(lo), float(hi)
    return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


def _length(data, num_samples: int | None) -> int | None:
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        return num_samples
    return min(total, num_samples) if num_samples is not None else total


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def _progress_bar(total: int | None, progress: bool | None):
    if progress is None and qtool_progress.active():  # the CLI decided (qtool.progress)
        return qtool_progress.bar(total=total, desc="calibrating", unit="sample")
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="calibrating", leave=False)


# -- worker processes --------------------------------------------------------------------


def _run_workers(plan: ObservePlan, ctor: Callable[..., Observer],
                 schemes: Mapping[str, QuantScheme], observers: dict[str, Observer],
                 stream: Iterator[Batch], workers: int, threads: int, bar,
                 optimization: str, memory_budget: int | None = None) -> None:
    """Deal batches to spawned processes and merge their observers into ``observers``."""
    context = multiprocessing.get_context("spawn")
    tasks = context.Queue(maxsize=2 * workers)
    results = context.Queue()
    processes = [
        context.Process(target=_worker, args=(index, plan, ctor, dict(schemes), threads,
                                              optimization, tasks, results,
                                              providers.current(), memory_budget),
                        daemon=True)
        for index in range(workers)
    ]
    _start_quietly(processes)
    shards: dict[int, dict[str, Observer]] = {}
    try:
        for batch in stream:
            _put(tasks, batch, processes, results, shards)
            bar.update(batch.rows)
        for _ in processes:
            _put(tasks, None, processes, results, shards)
        while len(shards) < workers:
            _receive(results, shards, processes, timeout=None)
    except BaseException:
        for process in processes:  # interrupted or failed: nothing left to wait for
            if process.is_alive():
                process.terminate()
        raise
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    for index in sorted(shards):
        for name, observer in shards[index].items():
            observers[name].merge(observer)


def _put(tasks, item, processes, results, shards) -> None:
    while True:
        try:
            tasks.put(item, timeout=0.5)
            return
        except queue.Full:
            _receive(results, shards, processes, timeout=0)


def _receive(results, shards, processes, timeout) -> None:
    """Take one worker result; re-raise a worker's error; notice a dead worker."""
    try:
        index, status, payload = results.get(timeout=timeout if timeout else 1.0)
    except queue.Empty:
        dead = [p for i, p in enumerate(processes) if i not in shards and not p.is_alive()]
        if dead:
            raise CalibrationError(
                f"a calibration worker died (exit code {dead[0].exitcode})",
                "retry with workers=1 to see the error",
            ) from None
        return
    if status == "error":
        cls, message, hint = payload
        error = cls.__new__(cls)
        QtoolError.__init__(error, message, hint)
        raise error
    shards[index] = payload


def _worker(index: int, plan: ObservePlan, ctor, schemes, threads: int, optimization: str,
            tasks, results, session_providers=providers.DEFAULT,
            memory_budget: int | None = None) -> None:
    # SIGINT is blocked here (the mask inherited from _start_quietly): Ctrl-C reaches the
    # main process alone, which stops the workers; no worker prints a KeyboardInterrupt.
    observers = {name: ctor(scheme, name) for name, scheme in schemes.items()}
    with providers.use(session_providers):
        collector = Collector(plan, observers, intra_op_threads=threads,
                              optimization=optimization, memory_budget=memory_budget)
        try:
            if index == 0:
                collector.observe_constants()
            while (batch := tasks.get()) is not None:
                collector.run(batch)
        except QtoolError as exc:
            results.put((index, "error", (CalibrationError if type(exc) is NonFiniteError
                                          else type(exc), exc.message, exc.hint)))
            return
    results.put((index, "ok", observers))


def _start_quietly(processes) -> None:
    """Start worker processes with SIGINT blocked, which they inherit (main thread only).

    Blocked, not ignored: a Ctrl-C while the workers start stays pending in this process
    and is raised here when the mask is restored (ignoring it lost it, and a run interrupted
    while its workers started under load went on to the end). The workers keep the mask
    through fork and exec, so Ctrl-C reaches the main process alone.
    """
    if threading.current_thread() is not threading.main_thread():
        for process in processes:
            process.start()
        return
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no masks; ignore for the start
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for process in processes:
                process.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for process in processes:
            process.start()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a pending Ctrl-C raises here
    except BaseException:  # another thread took the Ctrl-C, or a start failed
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for process in processes:
            if process.is_alive():
                process.terminate()
        raise


class ChannelAbsMax:
    """Largest ``|x|`` of each channel (the last axis) over every row seen.

    SmoothQuant's activation statistic (:mod:`qtool.passes.smoothquant`); starts empty.
    """

    def __init__(self):
        self.values: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        """Fold one batch in (all axes but the last are rows)."""
        x = np.asarray(x)
        if x.ndim == 0:
            return
        if not np.isfinite(x).all():
            raise NonFiniteError("", "NaN/Inf")
        current = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0).astype(np.float64)
        self.values = current if self.values is None else np.maximum(self.values, current)


def channel_absmax(model, tensors: Iterable[str], data: Iterable[Mapping[str, np.ndarray]], *,
                   batch_size: int | None = None,
                   memory_budget: int | None = DEFAULT_MEMORY_BUDGET) -> dict[str, np.ndarray]:
    """``{tensor: max |x| per channel of its last axis}`` of the float model over the data.

    One onnxruntime session, streamed batch by batch like :func:`calibrate` (nothing but
    one vector per tensor is kept).

    Raises:
        DataError: The data does not fit the model.
        CalibrationError: NaN/Inf in an observed tensor.
    """
    specs = specs_of(data, model)
    stream = checked_samples(data, specs)
    stats = {name: ChannelAbsMax() for name in dict.fromkeys(tensors)}
    if not stats:
        return {}
    plan = plan_observation(model, stats)
    size, fixed = resolve_batch_size(specs, batch_size)
    try:
        collector = Collector(plan, stats,
                              memory_budget=run_budget(specs, fixed, memory_budget))
        collector.observe_constants()
        for batch in batches(stream, specs, size, fixed=fixed):
            collector.run(batch)
    finally:
        release(plan.model_bytes)
    return {name: stat.values for name, stat in stats.items() if stat.values is not None}
