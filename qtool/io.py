"""Reading and writing ONNX models: the one module that touches protobuf files directly.

Everything else works on an onnx-graphsurgeon ``Graph``. Writes are atomic (a temporary file
in the target folder, then ``os.replace``) and deterministic (same graph, same bytes), and a
model over 2 GB goes out with its weights in one external data file beside it.

Protobuf cannot hold a message over 2 GB, so a model whose tensors exceed
:data:`LARGE_MODEL_BYTES` is never serialized whole: it is written as a small model file plus
one data file, tensor by tensor from the Graph (:func:`external_files`, :func:`save`), and
onnxruntime gets it as a path to such a pair in a temporary folder (:func:`session_source`),
which it loads with its external data. Loading reads the data file into the tensors once.
"""

from __future__ import annotations

import atexit
import io as pyio
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnx_graphsurgeon as gs
from google.protobuf.descriptor import FieldDescriptor
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from qtool.errors import InvalidModelError, ModelLoadError, OutputError, UnsupportedModelError
from qtool.memory import trim_heap

log = logging.getLogger(__name__)

# onnx-graphsurgeon prints its warnings ("[W] Found distinct Nodes that share the same
# name", ...) to stdout, where they corrupt `qtool inspect --format json` and `qtool lint
# --format sarif`. qtool reports problems itself (errors, lint findings); silence gs's printer.
G_LOGGER.severity = G_LOGGER.CRITICAL

MIN_OPSET = 11
MAX_OPSET = 21
DEFAULT_DOMAINS = ("", "ai.onnx")
_TWO_GB = 2**31 - 1
#: Tensor bytes above which a model goes to files with external data instead of one protobuf
#: (protobuf's 2 GB limit, less room for the graph itself); tests lower it.
LARGE_MODEL_BYTES = _TWO_GB - 2**24
#: Tensors smaller than this stay inside the model file when it is written with external data.
EXTERNAL_MIN_BYTES = 1024
#: Offsets of tensors in a data file are multiples of this (a page: onnxruntime can map them).
EXTERNAL_ALIGNMENT = 4096
#: Largest tensor (bytes) a model may ask for with a static shape; see check_tensor_sizes.
MAX_TENSOR_BYTES = 2**32

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | gs.Graph


def load_model(source: ModelSource, *, external_data: bool = True) -> onnx.ModelProto:
    """Read a model from a path, bytes or a ModelProto, with its external data loaded.

    Args:
        source: A file path, the serialized bytes, a ModelProto or a graphsurgeon Graph.
        external_data: Read the external data files into the tensors (False: their paths
            are checked, the tensors keep pointing at them; for a model's inputs and outputs).

    Returns:
        The ModelProto, external tensors loaded into memory; for a Graph over
        :data:`LARGE_MODEL_BYTES`, its structure only (the big tensors point at a file
        that does not exist: give the Graph itself to :func:`session_source` to run it).

    Raises:
        ModelLoadError: The file is missing, not ONNX, truncated, or its external data is
            missing or points outside the model's folder.
    """
    if isinstance(source, gs.Graph):
        if is_large(source):  # the structure only: its big tensors point at no file
            return _skeleton(source, UNWRITTEN_DATA)[0]
        return to_model(source)
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray)):
        model = _parse(bytes(source), "<bytes>")
        if _external_tensors(model):
            raise ModelLoadError(
                "model given as bytes refers to external data files",
                "load it from its path so the data files next to it can be found",
            )
        return model
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file", "check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an ONNX file", "give the .onnx file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from exc
    model = _parse(data, str(path))
    external = _external_tensors(model)
    if external:
        _check_external_paths(path.parent.resolve(), external, str(path))
        if external_data:
            _load_external_data(model, path.parent.resolve(), str(path))
        _HAD_EXTERNAL_DATA.add(id(model))
    return model


#: ids of the protos :func:`load_model` read external data into (read by :func:`load`).
_HAD_EXTERNAL_DATA: set[int] = set()


def load(source: ModelSource, *, check: bool = True) -> gs.Graph:
    """Load a model as an onnx-graphsurgeon Graph.

    Args:
        source: A file path, the serialized bytes, a ModelProto or a Graph (returned as is).
        check: Run onnx.checker and refuse opsets outside 11..21 and nodes of unknown domains.

    Returns:
        The graph; its ``opset`` is the default-domain opset of the model.

    Raises:
        ModelLoadError: The source cannot be read as ONNX.
        InvalidModelError: The checker rejects the model.
        UnsupportedModelError: Opset or domain out of qtool's range.
    """
    if isinstance(source, gs.Graph):
        return source
    model, lazy = _load_for_graph(source)
    external_data = id(model) in _HAD_EXTERNAL_DATA
    _HAD_EXTERNAL_DATA.discard(id(model))
    model, negative = symbolic_dims(model, copy=model is source)
    if model.functions:
        # torch's dynamo exporter (and others) wrap blocks in model-local functions; inline
        # them so that every op is a plain node qtool can see, quantize and check.
        model = onnx.inliner.inline_local_functions(model)
    if check:
        check_supported(model)
        check_model(model)
        trim_heap()  # the checker and shape inference each parsed a copy of the weights
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:  # graphsurgeon raises bare exceptions on malformed graphs
        raise InvalidModelError(f"cannot import the graph: {exc}") from exc
    if lazy:
        _read_external_tensors(graph, Path(source).parent.resolve())
    graph.load_warnings = []  # what a report on this model must say (read by the workflow)
    # a model read with external data is written with it (qtool.workflow)
    graph.external_data = external_data
    if negative:
        message = (f"{len(negative)} dim(s) written as a value <= 0 ({', '.join(negative[:4])}"
                   f"{', ...' if len(negative) > 4 else ''}) are treated as dynamic")
        log.info(message)
        graph.load_warnings.append(message)
    return graph


def _load_for_graph(source: ModelSource) -> tuple[onnx.ModelProto, bool]:
    """``(model, lazy)``: lazy when its external data is over :data:`LARGE_MODEL_BYTES`.

    A lazy model's tensors still point at the data files; :func:`load` reads them into the
    Graph's arrays (:func:`_read_external_tensors`) instead of into protobuf.
    """
    if not isinstance(source, str | os.PathLike):
        return load_model(source), False
    model = load_model(source, external_data=False)
    if id(model) not in _HAD_EXTERNAL_DATA:
        return model, False
    if is_large(model):
        return model, True
    _load_external_data(model, Path(source).parent.resolve(), str(source))
    return model, False


def _read_external_tensors(graph: gs.Graph, base: Path) -> None:
    """Read every Constant that points at external data into a numpy array, one at a time.

    Straight from the data file into the array (``numpy.fromfile``): the weights are held
    once, never as protobuf bytes and an array both.
    """
    for const in _graph_constants(graph):
        values = const._values
        if not isinstance(values, LazyValues):
            continue
        tensor = values.tensor
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        path = base / info["location"]
        offset = int(info.get("offset", 0) or 0)
        array = np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                            offset=offset)
        if array.size != count:
            raise ModelLoadError(f"{path}: external data for tensor {tensor.name} is truncated",
                                 "copy the whole data file next to the model")
        const._values = array.astype(dtype, copy=False).reshape(tuple(tensor.dims))
        _FILE_ORIGINS[id(const._values)] = (weakref.ref(const._values), tensor, path)


#: id(array) -> (weak reference to it, its TensorProto, its data file): the arrays
#: :func:`_read_external_tensors` read, which :func:`release_weights` can drop again.
_FILE_ORIGINS: dict[int, tuple] = {}


class FileValues(LazyValues):
    """A tensor's values left in the model's data file, read again on each access."""

    def __init__(self, tensor: onnx.TensorProto, path: Path):
        super().__init__(tensor)
        self.path = path

    def load(self) -> np.ndarray:
        """The values, from the data file."""
        info = {e.key: e.value for e in self.tensor.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        return np.fromfile(self.path, dtype=dtype, offset=int(info.get("offset", 0) or 0),
                           count=int(np.prod(self.tensor.dims, dtype=np.int64))
                           ).reshape(tuple(self.tensor.dims))


def release_weights(*graphs: gs.Graph) -> int:
    """Drop the arrays a large model's Constants read from its data file (unchanged since).

    They point at the file again (:class:`FileValues`, read on access).

    After quantization, the float weights of a model over 2 GB are needed only by the
    sessions that read the model file itself; holding them in Python too would cost one
    more copy of every weight through the evaluation.

    Returns:
        Bytes of arrays dropped (each counted once).
    """
    dropped: dict[int, int] = {}
    for graph in graphs:
        for const in _graph_constants(graph):
            values = const._values
            origin = _FILE_ORIGINS.get(id(values))
            if origin is None or origin[0]() is not values:
                continue
            dropped[id(values)] = values.nbytes
            const._values = FileValues(origin[1], origin[2])
    for key in dropped:
        _FILE_ORIGINS.pop(key, None)
    return sum(dropped.values())


def symbolic_dims(model: onnx.ModelProto, *, copy: bool = True
                  ) -> tuple[onnx.ModelProto, list[str]]:
    """Dims of graph inputs, outputs and value_info written as ``-1`` or ``0``, made symbolic.

    Some exporters (paddle2onnx among them) write a dynamic dim as ``dim_value: -1`` instead
    of a ``dim_param``. Each becomes the symbolic dim ``dynamic`` (one name for all of them,
    as :func:`qtool.calibration.data.infer_batch_axes` reads an unnamed dynamic dim, so that
    ``input [-1, -1]`` and ``state [2, -1, 128]`` keep matching batch axes).

    Args:
        model: The model.
        copy: Rewrite a copy (the caller's proto is left alone) rather than ``model`` itself.

    Returns:
        ``(model, dims)``: the model (``model`` itself when nothing was written so) and the
        dims rewritten, as ``tensor[axis]``.
    """
    graph = model.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    found = [(v.name, axis) for v in values if v.type.HasField("tensor_type")
             for axis, d in enumerate(v.type.tensor_type.shape.dim)
             if d.HasField("dim_value") and d.dim_value <= 0]
    if not found:
        return model, []
    if copy:
        fresh = onnx.ModelProto()
        fresh.CopyFrom(model)
        model = fresh
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.dim_param = "dynamic"
    shown = [f"{name}[{axis}]" for name, axis in found
             if name in {i.name for i in graph.input} | {o.name for o in graph.output}]
    return model, shown or [f"{name}[{axis}]" for name, axis in found]


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's opset of the default ONNX domain, or None if it imports none."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    return None


def check_supported(model: onnx.ModelProto) -> None:
    """Refuse what qtool cannot process: opsets outside 11..21, nodes of other domains.

    Raises:
        UnsupportedModelError: With the offending opset or node named.
    """
    opset = default_opset(model)
    if opset is None:
        raise UnsupportedModelError("the model imports no opset of the default ONNX domain")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}",
            "re-export the model at an opset between 11 and 21, or convert it with "
            "onnx.version_converter",
        )
    for node in _all_nodes(model.graph):
        if node.domain not in DEFAULT_DOMAINS:
            raise UnsupportedModelError(
                f"node {node.name or '<unnamed>'} ({node.op_type}) is in domain "
                f"'{node.domain}', which qtool cannot quantize or run through",
                "export the model with standard ONNX ops only",
            )


def _all_nodes(graph: onnx.GraphProto):
    """Every node of ``graph``, including those inside If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def expose_outputs(model: onnx.ModelProto, names) -> dict[str, str]:
    """Make tensors readable as graph outputs, in place, those inside If/Loop/Scan bodies too.

    A tensor of a body leaves it as one more output of its If/Loop/Scan node, level by level
    up to the main graph: Loop and Scan stack its values over the iterations (a scan
    output), and an If branch that does not produce it gives an empty tensor instead.

    Args:
        model: The model, changed in place.
        names: Tensor names.

    Returns:
        ``{tensor: graph output holding its values}`` for every name found.
    """
    wanted = list(dict.fromkeys(names))
    types = _elem_types(model)
    found = _expose(model.graph, wanted, types, top=True)
    existing = {o.name for o in model.graph.output}
    for name in wanted:
        if name in found and found[name] not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=found[name]))
            existing.add(found[name])
    return {name: found[name] for name in wanted if name in found}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed value (subgraphs included), from shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference cannot follow: types stay unknown
        inferred = model
    types: dict[str, int] = {}
    stack = [inferred.graph]
    while stack:
        graph = stack.pop()
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type"):
                types[value.name] = value.type.tensor_type.elem_type
        for node in graph.node:
            for attr in node.attribute:
                stack.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    return types


def _expose(graph: onnx.GraphProto, wanted: list[str], types: dict[str, int], *,
            top: bool) -> dict[str, str]:
    """``{tensor: name in this graph's scope}`` for the wanted tensors here or in bodies."""
    here = {o for node in graph.node for o in node.output if o}
    if not top:
        here |= {i.name for i in graph.input}
    found = {name: name for name in wanted if name in here}
    rest = [name for name in wanted if name not in here]
    for index, node in enumerate(graph.node):
        rest = [name for name in rest if name not in found]
        bodies = [attr for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH]
        if not rest or not bodies:
            continue
        inner = {attr.name: _expose(attr.g, rest, types, top=False) for attr in bodies}
        for name in [n for n in rest if any(n in found_in for found_in in inner.values())]:
            out = f"{name}__{node.name or node.op_type + str(index)}_exposed"
            elem = types.get(name, onnx.TensorProto.FLOAT)
            for attr in bodies:
                source = inner[attr.name].get(name)
                if source is None:  # an If branch without it: an empty tensor of its type
                    source = f"{out}_{attr.name}_empty"
                    attr.g.node.append(onnx.helper.make_node(
                        "Constant", [], [source],
                        value=onnx.helper.make_tensor(source, elem, [0], [])))
                attr.g.output.append(onnx.helper.make_tensor_value_info(source, elem, None))
            for attr in node.attribute:
                if attr.name in ("scan_output_axes", "scan_output_directions"):
                    attr.ints.append(0)
            node.output.append(out)
            found[name] = out
    return found


def check_model(model: onnx.ModelProto) -> None:
    """Run onnx.checker, then strict shape inference, on the model.

    The checker alone passes nodes whose attributes no runtime accepts (a Conv with
    ``kernel_shape`` 0, a Reshape to an impossible shape): strict shape inference (with the
    exporter's ``value_info`` left out, so a stale traced shape is no reason to refuse) finds
    those before onnxruntime fails on them in the middle of a run.

    Raises:
        InvalidModelError: With the checker's or shape inference's first line.
    """
    check_initializer_data(model)  # before is_large, which trusts the dims
    if is_large(model):
        return  # neither takes a >2 GB proto in memory
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise InvalidModelError(f"the ONNX checker rejects the model: {first}") from exc
    except Exception as exc:  # the C++ checker can raise other error types on odd protos
        raise InvalidModelError(f"the ONNX checker rejects the model: {exc}") from exc
    probe = model
    if model.graph.value_info:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.ClearField("value_info")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, check_type=True, strict_mode=True)
    except Exception as exc:  # InferenceError, or a checker error raised from inside it
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        first = lines[0] if lines else type(exc).__name__
        raise InvalidModelError(f"ONNX shape inference rejects the model: {first}") from exc
    check_tensor_sizes(inferred)


#: Typed data fields and how many of their entries one element takes.
_TYPED_FIELDS = {"float_data": 1, "int32_data": 1, "int64_data": 1, "double_data": 1,
                 "uint64_data": 1, "string_data": 1}
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
                if hasattr(onnx.TensorProto, n)}


def check_initializer_data(model: onnx.ModelProto) -> None:
    """Refuse a constant whose data does not fill its dims (the checker does not look).

    A weight whose dims say ``(2147483648, 1, 3, 3)`` over 72 values would otherwise fail
    inside a pass, as a bug would. Tensors with external data are read and checked later.

    Raises:
        InvalidModelError: Naming the tensor, its dims and how many values it holds.
    """
    tensors = list(model.graph.initializer) + [
        attr.t for node in model.graph.node if node.op_type == "Constant"
        for attr in node.attribute if attr.HasField("t")]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        expected = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        held = _values_held(tensor)
        if held is not None and held != expected:
            raise InvalidModelError(
                f"tensor {tensor.name or '(unnamed)'}: dims {list(tensor.dims)} need "
                f"{expected} values but the file holds {held}",
                "re-export the model; the file was truncated or edited",
            )


def _values_held(tensor: onnx.TensorProto) -> int | None:
    """How many elements the tensor's data holds (None: a layout this check does not read)."""
    packed = tensor.data_type in _PACKED_4BIT
    if tensor.HasField("raw_data"):
        if packed:
            return None  # two per byte, the last byte maybe half used
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return None
        return len(tensor.raw_data) // itemsize if itemsize else None
    if packed:
        return None
    for name, per in _TYPED_FIELDS.items():
        count = len(getattr(tensor, name))
        if count:
            return count // (2 if tensor.data_type in _COMPLEX else per)
    return 0


def check_tensor_sizes(model: onnx.ModelProto, limit: int = MAX_TENSOR_BYTES) -> None:
    """Refuse a tensor whose static shape would take more than ``limit`` bytes.

    A ``ConstantOfShape`` (or ``Expand``, ``Tile``, ``Range``) fed by constants can ask
    onnxruntime for tens of gigabytes from a file of a few hundred bytes; the run then dies
    in the middle of a phase. Shape inference knows those sizes before anything runs.

    Args:
        model: The model with inferred ``value_info``.
        limit: Largest size in bytes accepted for one tensor.

    Raises:
        InvalidModelError: Naming the tensor, its producer, its shape and size.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    for value in (*model.graph.value_info, *model.graph.output):
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        if not dims or not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        size = itemsize
        for d in dims:
            size *= int(d.dim_value)
        if size > limit:
            node = producers.get(value.name)
            where = f" by node {node.name or '<unnamed>'} ({node.op_type})" if node else ""
            shape = "x".join(str(d.dim_value) for d in dims)
            raise InvalidModelError(
                f"tensor {value.name} produced{where} would take {size / 2**30:.1f} GiB "
                f"({shape}), over qtool's limit of {limit / 2**30:.0f} GiB for one tensor",
                "the model asks for an allocation no run can make; fix the shape that "
                "feeds it and re-export the model",
            )


def to_model(graph: gs.Graph | onnx.ModelProto) -> onnx.ModelProto:
    """Export a Graph to a ModelProto with the lowest IR version its opset needs.

    The lowest IR version keeps the file loadable by older runtimes and makes the export
    independent of the installed onnx release, so the bytes do not drift between machines.
    """
    if isinstance(graph, onnx.ModelProto):
        return graph
    model = gs.export_onnx(graph, do_type_check=True)
    ir_version = 7
    for entry in model.opset_import:
        try:
            opset = onnx.helper.make_opsetid(entry.domain, entry.version)
            ir_version = max(ir_version, onnx.helper.find_min_ir_version_for([opset]))
        except ValueError:  # a custom domain: no IR requirement of its own
            continue
    model.ir_version = ir_version
    # graphsurgeon stamps its own producer; keep the exporter's name for provenance.
    model.producer_name = graph.producer_name or "qtool"
    model.producer_version = graph.producer_version or ""
    return model


def tensor_bytes(model: gs.Graph | onnx.ModelProto) -> int:
    """Bytes of the model's tensor data (initializers, Constant nodes, subgraphs).

    Counted from the shapes and types: nothing is copied or serialized to count them.
    """
    if isinstance(model, gs.Graph):
        return sum(_constant_nbytes(c) for c in _graph_constants(model))
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 1
        count = 1
        for d in tensor.dims:
            count *= int(d)
        total += count * itemsize
    return total


def is_large(model: gs.Graph | onnx.ModelProto) -> bool:
    """Whether ``model`` must go to files with external data (see :data:`LARGE_MODEL_BYTES`)."""
    return tensor_bytes(model) > LARGE_MODEL_BYTES


def serialize(graph: gs.Graph | onnx.ModelProto) -> bytes:
    """Deterministic bytes of a model under 2 GB.

    Raises:
        OutputError: The model is over :data:`LARGE_MODEL_BYTES` (use :func:`session_source`
            to run it, :func:`external_files` or :func:`save` to write it).
    """
    if is_large(graph):
        raise OutputError(
            f"the model holds {tensor_bytes(graph) / 2**30:.2f} GiB of tensors, more than one "
            "protobuf message can", "it is written with external data; this step needs that")
    return to_model(graph).SerializeToString(deterministic=True)


def session_source(graph: gs.Graph | onnx.ModelProto) -> bytes | str:
    """What ``onnxruntime.InferenceSession`` (and :func:`load`) should be given for a model.

    The serialized bytes; over :data:`LARGE_MODEL_BYTES`, the path (``str``) of the model
    written with its external data into a temporary folder, which :func:`release` removes
    (and which is removed at exit in any case).
    """
    if not is_large(graph):
        return to_model(graph).SerializeToString(deterministic=True)
    folder = Path(tempfile.mkdtemp(prefix="qtool-large-"))
    _SPILLED.add(str(folder))
    path = folder / "model.onnx"
    for name, data in external_files(graph, path.name).items():
        if isinstance(data, bytes):
            (folder / name).write_bytes(data)
        else:
            with open(folder / name, "wb") as handle:
                data(handle)
    return str(path)


def release(source: bytes | str) -> None:
    """Remove the temporary folder of a :func:`session_source` path (bytes: nothing)."""
    if isinstance(source, str) and str(Path(source).parent) in _SPILLED:
        _SPILLED.discard(str(Path(source).parent))
        shutil.rmtree(Path(source).parent, ignore_errors=True)


_SPILLED: set[str] = set()


@atexit.register
def _remove_spilled() -> None:
    for folder in list(_SPILLED):
        shutil.rmtree(folder, ignore_errors=True)


def external_files(graph: gs.Graph | onnx.ModelProto, name: str) -> dict[str, Any]:
    """The files of a model written with external data: ``{name: bytes, name.data: writer}``.

    The model file holds the graph and the small tensors; every tensor of at least
    :data:`EXTERNAL_MIN_BYTES` goes to ``<name>.data`` in graph order, each at an offset
    aligned to :data:`EXTERNAL_ALIGNMENT` (so the same graph gives the same bytes). The data
    file is given as a callable ``writer(handle)`` that streams the tensors one at a time
    into a binary file object: the weights are never held twice.
    """
    data_name = f"{name}.data"
    if isinstance(graph, onnx.ModelProto):
        graph = gs.import_onnx(graph)
    model, layout, end = _skeleton(graph, data_name)
    model_bytes = model.SerializeToString(deterministic=True)
    del model

    def write_data(handle) -> None:
        for const, start, _ in layout:
            handle.seek(start)  # past the end: the gap reads as zeros
            handle.write(_constant_bytes(const))
        handle.truncate(end)

    return {name: model_bytes, data_name: write_data}


#: Where the tensors of a :func:`load_model` skeleton point: a file no one writes.
UNWRITTEN_DATA = "qtool-tensors-not-written.data"


def _skeleton(graph: gs.Graph, data_name: str):
    """``(model, layout, size)``: the model with its big tensors pointing at ``data_name``.

    ``layout`` is ``[(constant, offset, length)]`` in graph order; ``size`` the data file's.
    """
    constants = [c for c in _graph_constants(graph) if _constant_nbytes(c) >= EXTERNAL_MIN_BYTES]
    layout, offset = [], 0
    for const in constants:
        size = _constant_nbytes(const)
        layout.append((const, offset, size))
        offset += -(-size // EXTERNAL_ALIGNMENT) * EXTERNAL_ALIGNMENT
    swapped = []
    try:
        for const, start, size in layout:
            stub = onnx.TensorProto(name=const.name, data_type=_onnx_dtype(const),
                                    dims=list(const.shape),
                                    data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(start)),
                               ("length", str(size))):
                stub.external_data.add(key=key, value=value)
            swapped.append((const, const._values))
            const._values = LazyValues(stub)
        model = to_model(graph)
    finally:
        for const, values in reversed(swapped):
            const._values = values
    return model, layout, offset


def _graph_constants(graph: gs.Graph) -> list[gs.Constant]:
    """Every Constant of ``graph`` and its subgraphs, once each, in a stable order."""
    seen: dict[int, gs.Constant] = {}
    stack = [graph]
    while stack:
        current = stack.pop(0)
        for tensor in current.tensors().values():
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen[id(tensor)] = tensor
        for node in current.nodes:
            for attr in node.attrs.values():
                if isinstance(attr, gs.Graph):
                    stack.append(attr)
                elif isinstance(attr, gs.Constant) and id(attr) not in seen:
                    seen[id(attr)] = attr
    return list(seen.values())


def _constant_nbytes(const: gs.Constant) -> int:
    values = const._values
    nbytes = getattr(values, "nbytes", None)
    return int(nbytes) if nbytes is not None else 0


def _onnx_dtype(const: gs.Constant) -> int:
    if isinstance(const._values, LazyValues):  # FileValues too
        return int(const._values.tensor.data_type)
    return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(const.values).dtype)


def _constant_bytes(const: gs.Constant) -> bytes:
    """The tensor's raw little-endian bytes, as ONNX stores them (one tensor at a time)."""
    values = const._values
    if isinstance(values, LazyValues) and not isinstance(values, FileValues) \
            and values.tensor.HasField("raw_data"):
        return values.tensor.raw_data
    return np.ascontiguousarray(const.values).tobytes()


def model_files(graph: gs.Graph | onnx.ModelProto, name: str, *,
                external: bool | None = None) -> dict[str, bytes]:
    """A model as a run's output holds it: one file, or two with external data.

    ``{name: bytes}``, or ``{name: model bytes, name + ".data": tensor bytes}`` (see
    :func:`external_files`).

    Args:
        graph: The model.
        name: Its file name.
        external: Write the tensors to the data file (None: when the model is large).
    """
    if not (is_large(graph) if external is None else external):
        return {name: to_model(graph).SerializeToString(deterministic=True)}
    files = external_files(graph, name)
    buffer = pyio.BytesIO()
    files[f"{name}.data"](buffer)
    return {name: files[name], f"{name}.data": buffer.getvalue()}


def relocate_external(model_bytes: bytes, location: str) -> bytes:
    """The model file of :func:`external_files` pointing at another data file name."""
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return model.SerializeToString(deterministic=True)


def save(graph: gs.Graph | onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write a model atomically; over :data:`LARGE_MODEL_BYTES`, with external data.

    The data file ``<name>.data`` is written (atomically) first, so that a reader never sees
    the model without its data.

    Args:
        graph: A Graph or a ModelProto.
        path: The .onnx file to write. Its folder must exist.

    Returns:
        The path written.

    Raises:
        OutputError: The folder does not exist or is not writable.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{folder}: folder does not exist", "create it first")
    if not is_large(graph):
        atomic_write_bytes(path, to_model(graph).SerializeToString(deterministic=True))
        return path
    files = external_files(graph, path.name)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".qtool-") as tmp:
        staged = Path(tmp) / f"{path.name}.data"
        with open(staged, "wb") as handle:
            files[staged.name](handle)
        os.chmod(staged, 0o644)
        os.replace(staged, folder / staged.name)
        atomic_write_bytes(path, files[path.name])
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A reader sees the old file or the new one, never a partial write.

    Raises:
        OutputError: The folder cannot be written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write here ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{name}: the file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError, or a RuntimeWarning-turned-error
        raise ModelLoadError(f"{name}: not an ONNX model (protobuf parse failed)") from exc
    if not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(f"{name}: not an ONNX model (no graph or no opset import)")
    bad = _undecodable_text(model)
    if bad is not None:
        raise ModelLoadError(
            f"{name}: not a valid ONNX model (the string {bad} is not UTF-8)",
            "the file is corrupted; export the model again",
        )
    return model


def _undecodable_text(message) -> str | None:
    """The first string field holding bytes that are not UTF-8 (name and value), or None.

    Protobuf parses such bytes without complaint (ONNX is proto2) and hands them back as
    ``bytes``: a corrupted node name then breaks onnx-graphsurgeon's export much later, far
    from the load that should have refused it.
    """
    stack = [message]
    while stack:
        current = stack.pop()
        # only string and message fields are read: ListFields would copy every tensor's
        # raw_data into a Python bytes object (the whole model's weights, once more)
        for field in current.DESCRIPTOR.fields:
            if field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
                continue
            if _is_repeated(field):
                values = getattr(current, field.name)
            elif current.HasField(field.name):
                values = (getattr(current, field.name),)
            else:
                continue
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                stack.extend(values)
                continue
            bad = next((item for item in values if isinstance(item, bytes)), None)
            if bad is not None:
                return f"{current.DESCRIPTOR.name}.{field.name} {bad[:60]!r}"
    return None


def _is_repeated(field) -> bool:
    # FieldDescriptor.label is deprecated in newer protobuf in favour of is_repeated
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in onnx.external_data_helper._get_all_tensors(model)
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]


def _check_external_paths(base: Path, tensors: list[onnx.TensorProto], name: str) -> None:
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or base not in target.parents:
            raise ModelLoadError(
                f"{name}: tensor {tensor.name} points to external data '{location}' outside "
                "the model's folder",
                "refusing to read it; keep the data file next to the model",
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{name}: external data file '{location}' for tensor {tensor.name} is missing",
                "copy the data file next to the model",
            )


def _load_external_data(model: onnx.ModelProto, base: Path, name: str) -> None:
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise ModelLoadError(f"{name}: cannot read external data ({exc})") from exc
