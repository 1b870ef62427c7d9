"""The ``upgrade_opset`` pass: raise the default-domain opset, proven numerically unchanged.

QDQ needs opset 13 for per-channel DequantizeLinear (the ``axis`` attribute), so quantization
starts from a graph at opset >= 13. The conversion is onnx's ``version_converter``; afterwards
the converted model and the original are run in onnxruntime (graph optimizations off) on the
same inputs and every output must agree to ``RTOL`` relative to the output's largest
magnitude::

    max |y_new - y_old| <= RTOL * max |y_old|

The inputs are what the model accepts: inside :func:`checked_on` (the calibration workflow
opens it and :func:`remember_examples` fills it with the first calibration samples) the
samples themselves; otherwise random inputs with the graph's fixed dims and each symbolic dim
set to 1, then to 2. Random dims of 1 and 2 are not what every model takes: a detector whose
feature pyramid concatenates upsampled maps runs only at multiples of its stride (a YOLOv8
export with dynamic height and width fails at 1x1 with "Non concat axis dimensions must
match"), so the samples are used wherever the run has them.

otherwise the pass raises :class:`~qtool.errors.PassError` and leaves the model alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qtool.errors import PassError, RecipeError
from qtool.io import MAX_OPSET, MIN_OPSET, load, to_model
from qtool.pipeline import note, register_pass

log = logging.getLogger(__name__)

RTOL = 1e-5
DYNAMIC_DIM_VALUES = (1, 2)
#: Samples the check runs on when the run has them (each one onnxruntime run per model).
EXAMPLES_CHECKED = 2

#: The samples of the current :func:`checked_on` block (a list the block's owner fills).
_EXAMPLES: ContextVar[list[dict[str, np.ndarray]] | None] = ContextVar(
    "opset_check_examples", default=None)


@contextlib.contextmanager
def checked_on(samples: Iterable[Mapping[str, np.ndarray]] = ()) -> Iterator[None]:
    """Check every conversion inside the block on samples rather than on random inputs.

    ``samples`` may be empty and given later by :func:`remember_examples`.
    """
    token = _EXAMPLES.set([])
    try:
        remember_examples(samples)
        yield
    finally:
        _EXAMPLES.reset(token)


def remember_examples(samples: Iterable[Mapping[str, np.ndarray]]) -> None:
    """Give the enclosing :func:`checked_on` block its samples.

    The first :data:`EXAMPLES_CHECKED` of ``samples`` are kept; outside such a block this
    does nothing.
    """
    examples = _EXAMPLES.get()
    if examples is None or len(examples) >= EXAMPLES_CHECKED:
        return
    for sample in itertools.islice(iter(samples), EXAMPLES_CHECKED - len(examples)):
        examples.append({name: np.asarray(value) for name, value in sample.items()})


@register_pass("upgrade_opset", changes_opset=True)
def upgrade_opset(graph: gs.Graph, *, target: int = 13) -> gs.Graph:
    """Raise the default-domain opset to at least ``target`` (numerically checked)."""
    if not isinstance(target, int) or not MIN_OPSET <= target <= MAX_OPSET:
        raise RecipeError(
            f"upgrade_opset: target {target!r} is not an opset in {MIN_OPSET}..{MAX_OPSET}",
            "give an integer target such as 13",
        )
    if graph.opset >= target:
        note(f"already at opset {graph.opset}", changed=False)
        return graph
    before = graph.opset
    graph = ensure_opset(graph, target)
    note(f"opset {before} -> {graph.opset}, outputs checked equal in onnxruntime")
    return graph


def ensure_opset(graph: gs.Graph, minimum: int) -> gs.Graph:
    """``graph`` itself if its opset is >= ``minimum``, else a converted, checked copy.

    Raises:
        PassError: onnx cannot convert the model, or the converted model's outputs differ.
    """
    if graph.opset >= minimum:
        return graph
    original = to_model(graph)
    try:
        converted = onnx.version_converter.convert_version(original, minimum)
        onnx.checker.check_model(converted)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PassError(
            f"upgrade_opset: onnx cannot convert the model from opset {graph.opset} to "
            f"{minimum}: {first}",
            f"re-export the model at opset {minimum} or later",
        ) from exc
    converted.producer_name = original.producer_name
    converted.producer_version = original.producer_version
    _check_same_outputs(original, converted, graph.opset, minimum)
    return load(converted, check=False).cleanup().toposort()


def _check_same_outputs(
    original: onnx.ModelProto, converted: onnx.ModelProto, old: int, new: int
) -> None:
    for feeds in _check_feeds(original):
        try:
            expected = _run(original, feeds)
        except Exception as exc:
            raise PassError(
                f"upgrade_opset: the opset {old} model does not run in onnxruntime, so the "
                f"conversion to {new} cannot be checked: {str(exc).splitlines()[0]}",
                "fix the model so onnxruntime runs it",
            ) from exc
        try:
            got = _run(converted, feeds)
        except Exception as exc:
            raise PassError(
                f"upgrade_opset: the model converted to opset {new} does not run in "
                f"onnxruntime: {str(exc).splitlines()[0]}",
                f"re-export the model at opset {new} or later",
            ) from exc
        for out, a, b in zip(original.graph.output, expected, got, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape or a.dtype != b.dtype:
                raise PassError(
                    f"upgrade_opset: output {out.name} changed from {a.dtype}{list(a.shape)} "
                    f"to {b.dtype}{list(b.shape)} when converting opset {old} to {new}",
                    f"re-export the model at opset {new} or later",
                )
            if not _close(a, b):
                raise PassError(
                    f"upgrade_opset: output {out.name} differs after converting opset {old} "
                    f"to {new}",
                    f"re-export the model at opset {new} or later",
                )


def _check_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """The inputs the check runs on.

    The samples of the current :func:`checked_on` block where it has them (an input a
    sample lacks is random, its symbolic dims 1), else random inputs at two sizes.
    """
    examples = _EXAMPLES.get() or []
    if not examples:
        return [random_feeds(model, v, seed=v) for v in DYNAMIC_DIM_VALUES]
    initializers = {t.name for t in model.graph.initializer}
    result = []
    for i, sample in enumerate(examples):
        filler = random_feeds(model, 1, seed=i)
        feeds = {}
        for inp in model.graph.input:
            if inp.name in initializers:
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            value = sample.get(inp.name)
            feeds[inp.name] = (filler[inp.name] if value is None
                               else np.ascontiguousarray(value, dtype=dtype))
        result.append(feeds)
    return result


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind not in "fc":
        return bool(np.array_equal(a, b))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not np.array_equal(np.isfinite(a64), np.isfinite(b64)):
        return False
    finite = np.isfinite(a64)
    if not finite.any():
        return bool(np.array_equal(a64, b64, equal_nan=True))
    scale = max(float(np.abs(a64[finite]).max()), 1e-12)
    return float(np.abs(a64[finite] - b64[finite]).max()) <= RTOL * scale


def random_feeds(model: onnx.ModelProto, dim_value: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input, each symbolic or unknown dim set to ``dim_value``.

    Floats are standard normal, integers in [0, dim_value), booleans random.
    """
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tensor_type = inp.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        dims = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dim_value
            for d in tensor_type.shape.dim
        ]
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind in "iu":
            feeds[inp.name] = rng.integers(0, max(dim_value, 1), size=dims).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 2, size=dims).astype(dtype)
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)
