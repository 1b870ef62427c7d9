r"""Compare a quantized model with its float model, streaming over the data.

Both models run in onnxruntime with graph optimizations off (the QDQ graph is simulated as
written). Each batch goes through both, updates running sums, and is dropped: memory does
not grow with the number of samples. The two sessions are open together only where that
is cheaper: while the batches' inputs and float outputs weigh less than the quantized
model's weights (at most :data:`HOLD_BYTES`), they are held, and when the data ends first,
the float session closes before the quantized one opens (a model of gigabytes is in memory
once, not twice); the sums are the same either way.

For an output with float values ``x`` and quantized values ``q`` (all elements of all
batches):

    SQNR (dB)          = 10 * log10( sum(x^2) / sum((x - q)^2) )     (None when q == x exactly)
    cosine similarity  = sum(x * q) / sqrt( sum(x^2) * sum(q^2) )   (1 when both are all zero)
    max abs error      = max |x - q|

For a classifier output (rank 2, more than one class) ``top-1 agreement`` is the fraction of
rows whose argmax is the same in both models, and with labels (a ``labels`` key in the data,
one integer per row) the top-1 accuracy of each model.

With a task (``task="ctc"``, ``"detect"``, ``"classify"``: :mod:`qtool.analysis.tasks`) the
task's own metric (CER and line accuracy after CTC decoding, mAP@0.5 against the float
model's detections, top-1) streams over the same batches and is reported beside the SQNR.

Every output is also judged in two slices along the axis where its ranges differ most
(:mod:`qtool.analysis.slices`): sigmoid scores concatenated with pixel boxes get their own
SQNR, which the whole output's hides.

``layerwise=True`` also compares every intermediate tensor the two graphs share by name (the
outputs of ordinary nodes of the quantized graph, which hold the error accumulated up to that
layer) and lists them worst SQNR first.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qtool.analysis.common import LABELS_KEY  # noqa: F401  (read from here too)
from qtool.analysis.slices import SliceSums
from qtool.analysis.tasks import Task, TaskResult, Top1Counts, resolve_task
from qtool.errors import DataError
from qtool.io import ModelSource, load_model, serialize

log = logging.getLogger(__name__)

_CHUNK = 1 << 15  # values per step of the error sums: float64 buffers stay in cache
#: Bytes of held rows (inputs and float outputs) that let the float session close before the
#: quantized one opens; below the quantized model's own weights only (a second session of a
#: small model costs less than the rows).
HOLD_BYTES = 256 * 2**20
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """``sum(a * b)`` of two 1-D float arrays, without BLAS.

    ``np.dot`` goes to (multi-threaded) OpenBLAS, whose threads spin on a busy machine:
    measured at 65 ns a value on 2 loaded cores, against 3 ns for ``einsum``'s own loop.
    """
    return float(np.einsum("i,i->", a, b))


class _ErrorSums:
    """Running sums of one tensor's float-vs-quantized error."""

    def __init__(self) -> None:
        # One partial sum per update, summed exactly (math.fsum) when read: the totals do
        # not depend on how the batches were grouped, so shards merged in any order give
        # the same bits as one pass.
        self.parts: dict[str, list[float]] = {"signal": [], "noise": [], "dot": [],
                                               "quant": []}
        self.max_abs = 0.0
        self.elements = 0

    @property
    def signal(self) -> float:
        """Sum of x^2."""
        return math.fsum(self.parts["signal"])

    @property
    def noise(self) -> float:
        """Sum of (x - q)^2."""
        return math.fsum(self.parts["noise"])

    @property
    def dot(self) -> float:
        """Sum of x q."""
        return math.fsum(self.parts["dot"])

    @property
    def quant(self) -> float:
        """Sum of q^2."""
        return math.fsum(self.parts["quant"])

    def merge(self, other: _ErrorSums) -> None:
        """Add another shard's sums."""
        for key, values in other.parts.items():
            self.parts[key].extend(values)
        self.max_abs = max(self.max_abs, other.max_abs)
        self.elements += other.elements

    def update(self, x: np.ndarray, q: np.ndarray) -> None:
        """Add one batch: float64 sums by dot products (:func:`dot`) over cache-sized chunks.

        Each chunk is converted to float64 once into reused buffers; the four sums are dot
        products (no squared temporaries), so the cost is about two passes over the values.
        """
        x = np.ascontiguousarray(x).reshape(-1)
        q = np.ascontiguousarray(q).reshape(-1)
        size = x.size
        self.elements += int(size)
        if size == 0:
            return
        chunk = min(_CHUNK, size)
        xb = np.empty(chunk)
        qb = np.empty(chunk)
        db = np.empty(chunk)
        signal = noise = cross = quant = 0.0
        worst = self.max_abs
        for first in range(0, size, chunk):
            n = min(chunk, size - first)
            xs, qs, ds = xb[:n], qb[:n], db[:n]
            np.copyto(xs, x[first : first + n], casting="unsafe")
            np.copyto(qs, q[first : first + n], casting="unsafe")
            np.subtract(xs, qs, out=ds)
            signal += dot(xs, xs)
            noise += dot(ds, ds)
            cross += dot(xs, qs)
            quant += dot(qs, qs)
            worst = max(worst, float(ds.max()), -float(ds.min()))
        for key, value in (("signal", signal), ("noise", noise), ("dot", cross),
                           ("quant", quant)):
            self.parts[key].append(value)
        self.max_abs = worst

    @property
    def sqnr_db(self) -> float | None:
        if self.noise == 0.0:
            return None
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        if self.signal == 0.0 and self.quant == 0.0:
            return 1.0
        if self.signal == 0.0 or self.quant == 0.0:
            return 0.0
        return self.dot / math.sqrt(self.signal * self.quant)


@dataclass
class OutputMetrics:
    """Float-vs-quantized error of one graph output.

    Attributes:
        name: Output tensor name.
        sqnr_db: Signal to quantization noise ratio in dB; None when the outputs are equal.
        cosine: Cosine similarity of the flattened outputs.
        max_abs_error: Largest absolute difference.
        top1_agreement: Fraction of rows with the same argmax (classifier outputs only).
        float_accuracy: Top-1 accuracy of the float model (with labels, classifier only).
        quant_accuracy: Top-1 accuracy of the quantized model (with labels, classifier only).
        slices: The two slices of an output whose ranges differ along an axis, each with
            its SQNR (:mod:`qtool.analysis.slices`); empty when judged whole.
    """

    name: str
    sqnr_db: float | None
    cosine: float
    max_abs_error: float
    top1_agreement: float | None = None
    float_accuracy: float | None = None
    quant_accuracy: float | None = None
    slices: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LayerMetrics:
    """Float-vs-quantized error of one intermediate tensor (``--layerwise``)."""

    tensor: str
    op: str
    sqnr_db: float | None
    cosine: float
    max_abs_error: float


@dataclass
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        samples: Number of rows (first-axis entries) evaluated.
        outputs: One entry per graph output, in graph order.
        layers: Per-tensor metrics, worst SQNR first (empty unless ``layerwise``).
        labelled: Whether the data had labels.
        task: The task metric (``task=``), or None.
    """

    samples: int
    outputs: list[OutputMetrics]
    layers: list[LayerMetrics] = field(default_factory=list)
    labelled: bool = False
    task: TaskResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with floats rounded to 6 significant digits (stable report bytes)."""
        return _rounded(asdict(self))

    def render(self, fmt: str = "text") -> str:
        """A text table (outputs, accuracy, layers worst first) or JSON."""
        import json

        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        from qtool.report.markdown import evaluation_table

        return evaluation_table(self.to_dict())

    @property
    def accuracy(self) -> tuple[float, float] | None:
        """``(float, quantized)`` top-1 accuracy of the first classifier output with labels."""
        for out in self.outputs:
            if out.float_accuracy is not None and out.quant_accuracy is not None:
                return out.float_accuracy, out.quant_accuracy
        return None


@dataclass
class Tally:
    """The running sums of one :func:`tally`: mergeable across shards of the data.

    Attributes:
        output_names: The compared outputs, in the quantized model's order.
        layers_shared: Intermediate tensor -> (quantized name, op), with ``layerwise``.
        sums: Error sums per output and shared tensor.
        classifiers: Top-1 counts per classifier output.
        samples: Rows seen.
        labelled: Whether the data had labels.
        task: The task's running metric (:mod:`qtool.analysis.tasks`), or None.
        slices: Per-entry sums of each output (:mod:`qtool.analysis.slices`).
    """

    output_names: list[str]
    layers_shared: dict[str, tuple[str, str]]
    sums: dict[str, _ErrorSums]
    classifiers: dict[str, Top1Counts]
    samples: int = 0
    labelled: bool = False
    task: Any = None
    slices: dict[str, SliceSums] = field(default_factory=dict)

    def merge(self, other: Tally) -> None:
        """Add the sums of another shard (merge shards in their data order)."""
        for name, sums in other.sums.items():
            self.sums[name].merge(sums)
        for name, counts in other.classifiers.items():
            self.classifiers.setdefault(name, Top1Counts()).merge(counts)
        for name, sums in other.slices.items():
            self.slices.setdefault(name, SliceSums()).merge(sums)
        self.samples += other.samples
        self.labelled = self.labelled or other.labelled
        if other.task is not None:
            if self.task is None:
                self.task = other.task
            else:
                self.task.merge(other.task)

    def evaluation(self) -> Evaluation:
        """The metrics of the sums.

        Raises:
            DataError: No sample was seen.
        """
        if self.samples == 0:
            raise DataError("the evaluation data is empty", "give at least one sample")
        outputs = output_metrics(self.output_names, self.sums, self.classifiers, self.labelled)
        for out in outputs:
            if out.name in self.slices:
                result = self.slices[out.name].result(out.sqnr_db)
                out.slices = [s.to_dict() for s in result.slices]
        layers = [
            LayerMetrics(name, op, self.sums[name].sqnr_db, self.sums[name].cosine,
                         self.sums[name].max_abs)
            for name, (_, op) in self.layers_shared.items()
        ]
        layers.sort(key=lambda m: (math.inf if m.sqnr_db is None else m.sqnr_db, m.tensor))
        task = self.task.result() if self.task is not None else None
        return Evaluation(self.samples, outputs, layers, self.labelled, task)


def evaluate(
    float_model: ModelSource,
    quant_model: ModelSource,
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    layerwise: bool = False,
    intra_op_threads: int | None = None,
    task: str | Task | None = None,
) -> Evaluation:
    """Run both models over ``data`` and measure how far the quantized outputs drift.

    Args:
        float_model: The float reference (path, bytes, ModelProto or Graph).
        quant_model: The quantized (QDQ) model with the same inputs and outputs.
        data: Batches: dicts from input name to an array whose first axis is the batch (a
            single sample without the batch axis is accepted too). An optional ``labels``
            entry holds one class index per row.
        layerwise: Also compare the intermediate tensors both graphs share by name.
        intra_op_threads: onnxruntime threads per session (None: onnxruntime's default).
        task: A task name or :class:`~qtool.analysis.tasks.Task` whose metric to add
            (labels, when the data has them: one class per row for ``classify``, an int
            array ``[rows, L]`` padded with -1 for ``ctc``).

    Returns:
        The metrics.

    Raises:
        DataError: No data, a missing input, or arrays that do not fit the model's inputs.
    """
    return tally(float_model, quant_model, data, layerwise=layerwise,
                 intra_op_threads=intra_op_threads, task=task).evaluation()


def tally(
    float_model: ModelSource,
    quant_model: ModelSource,
    data: Iterable[Mapping[str, np.ndarray]],
    *,
    layerwise: bool = False,
    intra_op_threads: int | None = None,
    task: str | Task | None = None,
) -> Tally:
    """The running sums of :func:`evaluate` over ``data``, before they become metrics.

    Shards of the data tallied apart and merged in data order (:meth:`Tally.merge`) give
    the same metrics, bit for bit, as one pass.

    Raises:
        DataError: A missing input, or arrays that do not fit the model's inputs.
        TaskError: The task's options do not fit the model's outputs.
    """
    # a model file is given to onnxruntime as a path, which reads its external data itself:
    # a model over 2 GB is then never held in protobuf (only its inputs and outputs are read)
    float_path = _path_of(float_model) if not layerwise else None
    quant_path = _path_of(quant_model) if not layerwise else None
    float_proto = load_model(float_model, external_data=float_path is None)
    quant_proto = load_model(quant_model, external_data=quant_path is None)
    input_specs = _input_specs(quant_proto)
    output_names = [o.name for o in quant_proto.graph.output]
    task = resolve_task(task)
    if task is not None:
        task.check_outputs(output_ranks(quant_proto))
    metric = task.metric() if task is not None else None
    float_outputs = {o.name for o in float_proto.graph.output}
    missing = [n for n in output_names if n not in float_outputs]
    if missing:
        raise DataError(
            f"the float model has no output {missing[0]!r} that the quantized model has",
            "compare a quantized model with the float model it was made from",
        )
    layers_shared: dict[str, tuple[str, str]] = {}
    if layerwise:
        layers_shared = _shared_layer_tensors(float_proto, quant_proto, set(output_names))
        float_proto = _with_outputs(float_proto, list(layers_shared))
        quant_proto = _with_outputs(quant_proto, sorted({q for q, _ in layers_shared.values()}))
    # the float session first; the quantized one opens when the held rows outgrow what a
    # second session would cost (the quantized weights), else after the float one is closed
    if layerwise:  # the protos have the shared layers as outputs
        float_session = _session(float_proto, intra_op_threads)
        quant_source: Any = quant_proto
    else:
        float_session = _session(float_path or _graph_or(float_model, float_proto),
                                 intra_op_threads)
        quant_source = quant_path or _graph_or(quant_model, quant_proto)
    hold_limit = min(HOLD_BYTES, _weight_bytes(quant_model, quant_proto))
    fetch = output_names + list(layers_shared)
    quant_fetch = output_names + [q for q, _ in layers_shared.values()]

    from qtool.calibration.batching import batch_rows
    from qtool.calibration.data import model_inputs

    # each input's batch axis, to count samples: as the data was loaded (--input-axis), else
    # as the model's dims say
    batch_specs = getattr(data, "specs", None) or model_inputs(quant_proto)
    sums = {name: _ErrorSums() for name in fetch}
    classifiers: dict[str, Top1Counts] = {}
    slices = {name: SliceSums() for name in output_names}
    samples = 0
    labelled = False

    def compare(float_values, quant_values, labels, rows) -> None:
        for name, x, q in zip(fetch, float_values, quant_values, strict=True):
            if x.shape != q.shape:
                raise DataError(f"output {name}: float shape {x.shape}, quantized {q.shape}")
            sums[name].update(x, q)
            if name in slices:
                slices[name].update(x, q)
            if name in layers_shared or not _is_classifier(x):
                continue
            classifiers.setdefault(name, Top1Counts()).update(x, q, labels)
        if metric is not None:
            count = len(output_names)
            metric.update(dict(zip(output_names, float_values[:count], strict=True)),
                          dict(zip(output_names, quant_values[:count], strict=True)), labels,
                          rows)

    def run(session, names, feeds, index) -> list:
        try:
            return session.run(names, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            from qtool.calibration.collector import run_error

            raise run_error(exc, f"on evaluation batch {index}") from exc

    quant_session = None
    held: list[tuple] = []  # (index, feeds, labels, rows, float values) before quant_session
    held_bytes = 0

    def run_held() -> None:
        for index, feeds, labels, rows, float_values in held:
            compare(float_values, run(quant_session, quant_fetch, feeds, index), labels, rows)
        held.clear()

    for index, batch in enumerate(data):
        feeds, labels = _feeds(batch, input_specs, index)
        labelled = labelled or labels is not None
        float_values = run(float_session, fetch, feeds, index)
        rows = batch_rows(feeds, batch_specs)
        if labels is not None and labels.shape[0] != rows:
            raise DataError(
                f"batch {index}: {labels.shape[0]} labels for {rows} inputs",
                "give one label per sample under the 'labels' key",
            )
        samples += rows
        if quant_session is None:
            size = _nbytes(feeds.values()) + _nbytes(float_values)
            if held_bytes + size <= hold_limit:
                held.append((index, feeds, labels, rows, float_values))
                held_bytes += size
                continue
            quant_session = _session(quant_source, intra_op_threads)
            run_held()
        compare(float_values, run(quant_session, quant_fetch, feeds, index), labels, rows)
    if quant_session is None:  # every row held: one session at a time
        del float_session
        quant_session = _session(quant_source, intra_op_threads)
        run_held()
    return Tally(output_names, layers_shared, sums, classifiers, samples, labelled, metric,
                 slices)


def _nbytes(arrays) -> int:
    return sum(int(np.asarray(a).nbytes) for a in arrays)


def _weight_bytes(model, proto: onnx.ModelProto) -> int:
    """The quantized model's tensor bytes (what its session holds beside the float one's).

    Counted from shapes and types (a proto read without its external data counts too).
    """
    from qtool.io import tensor_bytes

    return tensor_bytes(model if isinstance(model, gs.Graph) else proto)


def output_ranks(model: onnx.ModelProto) -> dict[str, int | None]:
    """Each graph output's rank (None where the model does not say)."""
    ranks = {}
    for out in model.graph.output:
        tensor = out.type.tensor_type
        ranks[out.name] = len(tensor.shape.dim) if tensor.HasField("shape") else None
    return ranks


def output_metrics(names, sums, classifiers, labelled: bool) -> list[OutputMetrics]:
    """The :class:`OutputMetrics` of ``names`` from their running sums and top-1 counts."""
    outputs = []
    for name in names:
        s = sums[name]
        metrics = OutputMetrics(name, s.sqnr_db, s.cosine, s.max_abs)
        counts = classifiers.get(name)
        if counts is not None and counts.rows:
            metrics.top1_agreement = counts.agree / counts.rows
            if labelled and counts.labelled:
                metrics.float_accuracy = counts.float_correct / counts.rows
                metrics.quant_accuracy = counts.quant_correct / counts.rows
        outputs.append(metrics)
    return outputs


def rebatch(
    samples: Iterable[Mapping[str, np.ndarray]], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Group batches (or single samples with a batch axis of 1) into batches of ``batch_size``.

    Each key's arrays are concatenated along the first axis; at most ``batch_size`` rows are
    held at a time.
    """
    pending: list[Mapping[str, np.ndarray]] = []
    rows = 0
    for item in samples:
        pending.append(item)
        rows += int(np.shape(next(iter(item.values())))[0]) if item else 0
        if rows >= batch_size:
            yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            pending, rows = [], 0
    if pending:
        yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}


def _is_classifier(x: np.ndarray) -> bool:
    return x.ndim == 2 and x.shape[1] > 1


def _input_specs(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    initializers = {t.name for t in model.graph.initializer}
    specs = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        specs[inp.name] = dims
    return specs


def _feeds(
    batch: Mapping[str, np.ndarray], specs: Mapping[str, list], index: int
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    labels = batch.get(LABELS_KEY)
    feeds = {}
    for name, dims in specs.items():
        if name not in batch:
            raise DataError(
                f"batch {index} has no array for input {name!r} (it has: "
                f"{', '.join(sorted(batch)) or 'nothing'})",
                "key the arrays by the model's input names",
            )
        array = np.asarray(batch[name])
        if array.ndim == len(dims) - 1:
            array = array[None]
        if array.ndim != len(dims) or any(
            isinstance(d, int) and d > 0 and d != s
            for d, s in zip(dims, array.shape, strict=True)
        ):
            shown = ["?" if not isinstance(d, int) else str(d) for d in dims]
            raise DataError(
                f"input {name!r} expects shape [{', '.join(shown)}], the data has "
                f"{list(array.shape)}",
                "resize or reshape the data to the model's input",
            )
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        feeds[name] = array
    if labels is not None:  # one class per row, or a row of indices per row (-1: padding)
        labels = np.asarray(labels)
        labels = (labels.reshape(labels.shape[0], -1) if labels.ndim >= 2 and labels.shape[1:]
                  != (1,) else labels.reshape(-1)).astype(np.int64)
    return feeds, labels


def _shared_layer_tensors(
    float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto, outputs: set[str]
) -> dict[str, tuple[str, str]]:
    """Tensors produced by ordinary nodes in both graphs.

    Returns:
        Float tensor name -> (name to fetch from the quantized graph, op of its producer). The
        fetched name is the DequantizeLinear output when the tensor goes through Q -> DQ (the
        value the next layer sees, quantization error included), else the tensor itself.
    """
    float_graph = gs.import_onnx(onnx.shape_inference.infer_shapes(float_proto))
    quant_graph = gs.import_onnx(onnx.shape_inference.infer_shapes(quant_proto))
    float_produced = {
        out.name
        for node in float_graph.nodes
        for out in node.outputs
        if node.op not in _QDQ_OPS and out.dtype in (np.float32, np.float16)
    }
    shared = {}
    for node in quant_graph.nodes:
        if node.op in _QDQ_OPS:
            continue
        for out in node.outputs:
            if out.name in float_produced and out.name not in outputs:
                shared[out.name] = (_dequantized_name(out), node.op)
    if not shared:
        log.warning("the two graphs share no intermediate tensor names; no layerwise metrics")
    return shared


def _dequantized_name(tensor: gs.Variable) -> str:
    for q in tensor.outputs:
        if q.op != "QuantizeLinear":
            continue
        for dq in q.outputs[0].outputs:
            if dq.op == "DequantizeLinear":
                return dq.outputs[0].name
    return tensor.name


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model with ``names`` appended to its graph outputs (dtypes inferred)."""
    if not names:
        return model
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    tensors = graph.tensors()
    for name in names:
        graph.outputs.append(tensors[name])
    return onnx.load_from_string(serialize(graph))


def _graph_or(model, proto):
    """A Graph goes to its session as it is (over 2 GB its proto holds no weights)."""
    return model if isinstance(model, gs.Graph) else proto


def _path_of(model) -> str | None:
    return str(model) if isinstance(model, str | os.PathLike) else None


def _session(model: onnx.ModelProto | gs.Graph | str, intra_op_threads: int | None):
    from qtool.analysis.common import session
    from qtool.analysis.recorded import source_key
    from qtool.io import release, session_source

    # a path goes to onnxruntime as it is; a model over 2 GB: a temporary file pair
    source = model if isinstance(model, str) else session_source(model)
    try:
        return session(source, intra_op_threads, source_key(model, source))
    finally:
        release(source)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
