"""Reading and writing ONNX models: the one module that touches protobuf files directly.

Everything else works on an onnx-graphsurgeon ``Graph``. Writes are atomic (a temporary file
in the target folder, then ``os.replace``) and deterministic (same graph, same bytes), and a
model over 2 GB goes out with its weights in one external data file beside it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
import onnx.inliner
import onnx_graphsurgeon as gs
from google.protobuf.descriptor import FieldDescriptor
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
#: Largest tensor (bytes) a model may ask for with a static shape; see check_tensor_sizes.
MAX_TENSOR_BYTES = 2**32

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | gs.Graph


def load_model(source: ModelSource) -> onnx.ModelProto:
    """Read a model from a path, bytes or a ModelProto, with its external data loaded.

    Args:
        source: A file path, the serialized bytes, a ModelProto or a graphsurgeon Graph.

    Returns:
        The ModelProto, external tensors loaded into memory.

    Raises:
        ModelLoadError: The file is missing, not ONNX, truncated, or its external data is
            missing or points outside the model's folder.
    """
    if isinstance(source, gs.Graph):
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
        _load_external_data(model, path.parent.resolve(), external, str(path))
    return model


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
    model = load_model(source)
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
    graph.load_warnings = []  # what a report on this model must say (read by the workflow)
    if negative:
        message = (f"{len(negative)} dim(s) written as a value <= 0 ({', '.join(negative[:4])}"
                   f"{', ...' if len(negative) > 4 else ''}) are treated as dynamic")
        log.info(message)
        graph.load_warnings.append(message)
    return graph


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
    if model.ByteSize() > _TWO_GB:
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


def serialize(graph: gs.Graph | onnx.ModelProto) -> bytes:
    """Deterministic bytes of a model under 2 GB."""
    return to_model(graph).SerializeToString(deterministic=True)


def save(graph: gs.Graph | onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write a model atomically; over 2 GB, with one external data file ``<name>.data``.

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
    model = to_model(graph)
    if model.ByteSize() <= _TWO_GB:
        atomic_write_bytes(path, model.SerializeToString(deterministic=True))
        return path
    data_name = path.name + ".data"
    external = onnx.ModelProto()
    external.CopyFrom(model)
    onnx.external_data_helper.convert_model_to_external_data(
        external, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
    )
    with tempfile.TemporaryDirectory(dir=folder, prefix=".qtool-") as tmp:
        tmp_model = Path(tmp) / path.name
        onnx.save_model(external, tmp_model)  # writes tmp/<name> and tmp/<name>.data
        os.replace(Path(tmp) / data_name, folder / data_name)
        os.replace(tmp_model, path)
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


def _load_external_data(
    model: onnx.ModelProto, base: Path, tensors: list[onnx.TensorProto], name: str
) -> None:
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
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise ModelLoadError(f"{name}: cannot read external data ({exc})") from exc
