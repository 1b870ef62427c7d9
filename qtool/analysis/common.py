"""What the analysis modules share: batches, sessions with extra outputs, feeds."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from qtool.errors import DataError, PlanError

#: The key of the labels array in a data file (``.npz``); not a model input.
LABELS_KEY = "labels"

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]] | Sequence[Mapping[str, np.ndarray]]


def iterate_batches(batches: Batches) -> Iterable[Mapping[str, np.ndarray]]:
    """The batches: called when ``batches`` is a callable (fresh batches each time)."""
    return batches() if callable(batches) else batches


def sort_db(value: float | None) -> float:
    """An SQNR as a sort key (None, meaning exact, sorts last)."""
    return math.inf if value is None else value


def db_text(value: float | None) -> str:
    """An SQNR for messages (None: ``exact``)."""
    return "exact" if value is None else f"{value:.2f} dB"


def initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of initializer ``name`` of ``proto`` (or of one of its subgraph bodies)."""
    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        for init in graph.initializer:
            if init.name == name:
                return onnx.numpy_helper.to_array(init)
        for node in graph.node:
            for attr in node.attribute:
                stack.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
                if node.op_type == "Constant" and node.output[0] == name and attr.name == "value":
                    return onnx.numpy_helper.to_array(attr.t)
    raise PlanError(f"weight {name} is not an initializer of the float model")


def fetchable(proto: onnx.ModelProto, names: Sequence[str]) -> tuple[bytes, dict[str, str]]:
    """The model with ``names`` readable as graph outputs (in bodies too), serialized.

    Returns:
        ``(model bytes, {tensor: output name to fetch})``.
    """
    from qtool.io import expose_outputs

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    fetch = expose_outputs(copy, names)
    return copy.SerializeToString(), fetch


def exposed(proto: onnx.ModelProto, names: Sequence[str]) -> bytes:
    """The model with ``names`` added as graph outputs, serialized."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy.SerializeToString()


def session_options(optimized: bool, intra_op_threads: int | None = None):
    """The options of an analysis session in onnxruntime: quiet, no memory arena.

    ``optimized``: every graph optimization (the float model as the calibration runs it),
    else none (the pure Q/DQ simulation). ``intra_op_threads``: None, onnxruntime's default.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    # no arena: each intermediate tensor goes back to malloc when its last reader ran, so a
    # session holds only the live tensors of a run (the arena keeps its high-water mark)
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = False
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    return options


def session(model_bytes: bytes | str, intra_op_threads: int | None = None,
            key: str | None = None):
    """A session with graph optimizations off (the pure Q/DQ simulation), no memory arena.

    ``intra_op_threads``: onnxruntime's threads per run (None: its default). While a
    :class:`qtool.analysis.recorded.RecordedRuns` is active, the session's runs are kept in it
    under ``key`` (None: the digest of ``model_bytes``, or its path).
    """
    from qtool.analysis.recorded import recording
    from qtool.calibration.collector import open_session

    opened = open_session(model_bytes, session_options(False, intra_op_threads), "analyse it")
    # the kernel check reuses the runs, rerunning missing rows with the same thread count
    return recording(opened, model_bytes, key, intra_op_threads or None)


def run(session, fetch: Sequence[str], feeds: Mapping[str, np.ndarray], where: str) -> list:
    """``session.run`` with onnxruntime's failures as clear errors (naming node and batch).

    An empty ``fetch`` fetches nothing (onnxruntime would return every graph output).

    Raises:
        InvalidModelError: onnxruntime cannot allocate what the model asks for.
        DataError: The model does not run on the data.
    """
    from qtool.calibration.collector import run_error

    if not fetch:
        return []
    try:
        return session.run(list(fetch), dict(feeds))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise run_error(exc, where) from exc


def feeds_of(batch: Mapping[str, np.ndarray], inputs: Sequence[str], index: int):
    """The model inputs of one batch (float64 arrays as float32); a missing input is a DataError."""
    feeds = {}
    for name in inputs:
        if name not in batch:
            raise DataError(
                f"batch {index} has no array for input {name!r} (it has: "
                f"{', '.join(sorted(k for k in batch if k != LABELS_KEY)) or 'nothing'})",
                "key the arrays by the model's input names",
            )
        array = np.asarray(batch[name])
        feeds[name] = array.astype(np.float32) if array.dtype == np.float64 else array
    return feeds
