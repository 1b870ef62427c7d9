"""Bad input, property-based: mutated models and mutated calibration data.

Every case runs in a forked child process (:func:`isolated`) with a memory limit and a time
limit, so a crash in a C extension (onnx's checker, shape inference, onnxruntime) or a memory
bomb from a huge declared dim shows up as a failed case instead of killing the test run.
What a case must end in:

* the loader (:func:`qtool.io.load`, then prepare and a plan when it loads): a model that
  loads must be valid and go through prepare and planning; otherwise a
  :class:`~qtool.errors.QtoolError` subclass with a message;
* the lint (:func:`qtool.lint.lint_model`): findings (an error-level finding whenever the
  loader refused the model as invalid) or a QtoolError;
* the CLI (``qtool calibrate``/``lint``): one ``error:`` line, a QtoolError exit code (never
  70, the internal-error code), and no output file or folder.

Hypothesis runs derandomized with a bounded number of examples (CI runs the same cases).
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import resource
import traceback
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qtool.errors import (
    CalibrationError,
    DataError,
    InvalidModelError,
    ModelLoadError,
    QtoolError,
    UnsupportedModelError,
)

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits_cnn.onnx"
CHILD_TIMEOUT_S = 60
CHILD_MEMORY_BYTES = 2 * 2**30  # on top of what the parent already maps

FUZZ = settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


# ------------------------------------------------------------------ isolation


def _child(conn, fn, args):
    try:
        status = Path("/proc/self/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmSize:"))
        vm_kb = int(line.split()[1])
        limit = vm_kb * 1024 + CHILD_MEMORY_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError, StopIteration):
        pass
    try:
        value = fn(*args)
        conn.send(("ok", value, ""))
    except QtoolError as exc:
        conn.send(("qtool", type(exc).__name__, exc.message))
    except BaseException as exc:  # noqa: BLE001  (what the test must report)
        conn.send(("exception", type(exc).__name__, traceback.format_exc()[-2000:]))
    finally:
        conn.close()
        os._exit(0)


def isolated(fn, *args, timeout: float = CHILD_TIMEOUT_S):
    """Run ``fn(*args)`` in a forked child.

    Returns:
        ``(kind, value, detail)``: kind ``ok`` (value = the return value), ``qtool`` (value =
        the error class name, detail = its message), ``exception`` (any other exception:
        a qtool bug), ``crash`` (killed by a signal, value = the signal) or ``timeout``.
    """
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(child, fn, args))
    process.start()
    child.close()
    if not parent.poll(timeout):
        process.kill()
        process.join()
        return ("timeout", None, f"no answer within {timeout} s")
    try:
        result = parent.recv()
    except EOFError:
        result = None
    process.join(10)
    if result is None:
        return ("crash", -process.exitcode if process.exitcode else None, "child died")
    return result


# ------------------------------------------------------------------ the base model


def _base_model() -> onnx.ModelProto:
    return onnx.load(DIGITS)


BASE = _base_model().SerializeToString()


def _mutable() -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(BASE)
    return model


def _load_prepare_plan(data: bytes):
    """Load (checked), prepare and plan: the first steps of every command."""
    from qtool.io import load
    from qtool.planner import build_plan
    from qtool.prepare import prepare

    graph = load(data)
    graph, _ = prepare(graph)
    plan = build_plan(graph, "academic")
    return len(plan.tensors)


def _lint(data: bytes):
    from qtool.lint import lint_model

    result = lint_model(data)
    return [(f.rule_id, f.severity, f.message) for f in result.findings]


def _check_model_outcome(data: bytes, *, must_fail: bool = False) -> str:
    """Assert the loader and the lint behave on ``data``; return the loader's outcome kind."""
    kind, value, detail = isolated(_load_prepare_plan, data)
    assert kind in ("ok", "qtool"), f"loader: {kind} {value}\n{detail}"
    if kind == "qtool":
        assert detail and "Traceback" not in detail, value
    if kind == "ok":
        # Loaded means valid: the checker agrees (full check, as the loader ran it).
        assert not must_fail, "a broken model loaded as good"
        onnx.checker.check_model(onnx.load_from_string(data))
    lint_kind, findings, lint_detail = isolated(_lint, data)
    assert lint_kind in ("ok", "qtool"), f"lint: {lint_kind} {findings}\n{lint_detail}"
    if kind == "qtool" and value in ("InvalidModelError", "UnsupportedModelError"):
        assert lint_kind == "qtool" or any(s == "error" for _, s, _ in findings), (
            f"loader refused the model ({detail}) but lint found no error: {findings}"
        )
    return kind


# ------------------------------------------------------------------ byte-level mutations


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused(data):
    kind = _check_model_outcome(data)
    assert kind == "qtool"


@FUZZ
@given(st.integers(min_value=0, max_value=len(BASE) - 1))
def test_truncated_files_are_refused(length):
    _check_model_outcome(BASE[:length], must_fail=True)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_flipped_bytes_never_crash(flips):
    data = bytearray(BASE)
    for position, value in flips:
        data[position] = value
    _check_model_outcome(bytes(data))


# ------------------------------------------------------------------ structural mutations


def _wrong_dtype(model, draw):
    target = draw(st.sampled_from(["initializer", "input", "output"]))
    dtype = draw(st.sampled_from([0, TensorProto.STRING, TensorProto.BOOL, TensorProto.INT8,
                                  TensorProto.DOUBLE, TensorProto.COMPLEX64, 17, 99, 1000]))
    if target == "initializer":
        init = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
        init.data_type = dtype
    else:
        values = model.graph.input if target == "input" else model.graph.output
        values[0].type.tensor_type.elem_type = dtype


def _dangling_edge(model, draw):
    node = model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
    node.input[draw(st.integers(0, len(node.input) - 1))] = "ghost_tensor"


def _cycle(model, draw):
    nodes = model.graph.node
    first = draw(st.integers(0, len(nodes) - 2))
    later = draw(st.integers(first + 1, len(nodes) - 1))
    nodes[first].input[0] = nodes[later].output[0]


def _duplicate_name(model, draw):
    kind = draw(st.sampled_from(["output", "initializer", "node"]))
    nodes = model.graph.node
    if kind == "output":
        nodes[1].output[0] = nodes[0].output[0]
    elif kind == "initializer":
        model.graph.initializer[1].name = model.graph.initializer[0].name
    else:  # duplicate node names are legal ONNX: must load and plan
        for node in nodes:
            node.name = "same"


def _huge_dims(model, draw):
    dim = draw(st.sampled_from([2**31, 2**40, 2**62, -1, -(2**40)]))
    target = draw(st.sampled_from(["initializer", "input", "output"]))
    if target == "initializer":
        init = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
        init.dims[0] = dim
    else:
        values = model.graph.input if target == "input" else model.graph.output
        values[0].type.tensor_type.shape.dim[-1].dim_value = dim


def _bad_opset(model, draw):
    model.opset_import[0].version = draw(st.sampled_from([-1, 0, 1, 7, 10, 22, 99, 2**40]))


def _foreign_domain(model, draw):
    node = model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
    node.domain = draw(st.sampled_from(["com.vendor", "ai.onnx.ml", "com.microsoft"]))


def _bad_attribute(model, draw):
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.append(draw(st.sampled_from([
        helper.make_attribute("kernel_shape", [0, 0]),
        helper.make_attribute("strides", [-1, -1]),
        helper.make_attribute("pads", [1]),
        helper.make_attribute("group", 0),
        helper.make_attribute("group", 7),
        helper.make_attribute("dilations", "x"),
        helper.make_attribute("no_such_attribute", 1.5),
    ])))


def _raw_data_mismatch(model, draw):
    init = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
    values = numpy_helper.to_array(init)
    init.ClearField("float_data")
    init.raw_data = values.tobytes()[: draw(st.integers(0, max(0, values.nbytes - 1)))]


def _drop_things(model, draw):
    what = draw(st.sampled_from(["outputs", "inputs", "nodes", "initializers", "op_type"]))
    if what == "outputs":
        del model.graph.output[:]
    elif what == "inputs":
        del model.graph.input[:]
    elif what == "nodes":
        del model.graph.node[:]
    elif what == "initializers":
        del model.graph.initializer[:]
    else:
        model.graph.node[0].op_type = "NoSuchOp"


MUTATIONS = {
    "wrong_dtype": _wrong_dtype,
    "dangling_edge": _dangling_edge,
    "cycle": _cycle,
    "duplicate_name": _duplicate_name,
    "huge_dims": _huge_dims,
    "bad_opset": _bad_opset,
    "foreign_domain": _foreign_domain,
    "bad_attribute": _bad_attribute,
    "raw_data_mismatch": _raw_data_mismatch,
    "drop_things": _drop_things,
}
#: Mutations that always make the model invalid (must never load as good).
ALWAYS_INVALID = {"dangling_edge", "cycle", "bad_opset", "foreign_domain", "raw_data_mismatch"}


@FUZZ
@given(st.data())
def test_structurally_broken_models(data):
    names = data.draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3))
    model = _mutable()
    for name in sorted(names, key=lambda n: n == "drop_things"):  # dropping comes last
        MUTATIONS[name](model, data.draw)
    blob = model.SerializeToString()
    _check_model_outcome(blob, must_fail=bool(set(names) & ALWAYS_INVALID))


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_mutation_once(name):
    """Every mutation kind alone, with hypothesis's simplest draws (a readable failure)."""

    @settings(FUZZ, max_examples=5)
    @given(st.data())
    def run(data):
        model = _mutable()
        MUTATIONS[name](model, data.draw)
        _check_model_outcome(model.SerializeToString(), must_fail=name in ALWAYS_INVALID)

    run()


def test_error_messages_name_the_problem():
    cases = {
        "dangling_edge": (_dangling_edge, InvalidModelError, "ghost_tensor"),
        "bad_opset": (_bad_opset, UnsupportedModelError, "opset"),
        "foreign_domain": (_foreign_domain, UnsupportedModelError, "domain"),
    }
    for name, (mutate, error, word) in cases.items():
        model = _mutable()
        mutate(model, lambda strategy: _first(strategy))
        kind, value, detail = isolated(_load_prepare_plan, model.SerializeToString())
        assert (kind, value) == ("qtool", error.__name__), (name, kind, value, detail)
        assert word in detail, (name, detail)
    # Regression: the checker passes a Conv with kernel_shape 0; onnxruntime then failed in
    # the middle of calibration (internal error). Strict shape inference refuses it at load.
    model = _mutable()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("kernel_shape", [0, 0]))
    kind, value, detail = isolated(_load_prepare_plan, model.SerializeToString())
    assert (kind, value) == ("qtool", InvalidModelError.__name__), (kind, value, detail)
    assert "kernel_shape" in detail and conv.name in detail
    kind, value, detail = isolated(_load_prepare_plan, BASE[: len(BASE) // 2])
    assert (kind, value) == ("qtool", ModelLoadError.__name__)
    assert "not an ONNX model" in detail


def test_names_that_are_not_utf8_are_refused_at_load(tmp_path):
    """Regression (found by the CLI fuzz): one flipped byte in a node name. Protobuf parses
    it without complaint and returns the name as bytes; the checker passed it and
    graphsurgeon's export failed later with UnicodeDecodeError (exit 70)."""
    model = _mutable()
    name = model.graph.node[1].name.encode()
    raw = bytearray(BASE)
    raw[BASE.index(name)] = 0x80
    kind, value, detail = isolated(_load_prepare_plan, bytes(raw))
    assert (kind, value) == ("qtool", ModelLoadError.__name__), (kind, value, detail)
    assert "NodeProto." in detail and "not UTF-8" in detail, detail
    (tmp_path / "model.onnx").write_bytes(bytes(raw))
    kind, value, detail = isolated(
        _cli, ["calibrate", "model.onnx", "-b", "tensorrt", "-o", "out", "-q"], str(tmp_path)
    )
    assert kind == "ok", (kind, value, detail)
    code, output = value
    assert code == ModelLoadError.exit_code and "UTF-8" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def _first(strategy):
    """The simplest value of a strategy (what hypothesis shrinks towards)."""
    from hypothesis import find

    return find(strategy, lambda _: True, settings=settings(database=None, max_examples=10))


# ------------------------------------------------------------------ the CLI on broken models


def _cli(args: list[str], cwd: str):
    from click.testing import CliRunner
    from qtool.cli import main

    os.chdir(cwd)
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    return result.exit_code, result.output


@settings(FUZZ, max_examples=12)
@given(st.data())
def test_cli_on_broken_models_leaves_nothing(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("cli")
    mode = data.draw(st.sampled_from(["truncate", "flip", "mutate"]))
    if mode == "truncate":
        blob = BASE[: data.draw(st.integers(0, len(BASE) - 1))]
    elif mode == "flip":
        raw = bytearray(BASE)
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(BASE) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(raw)
    else:
        model = _mutable()
        MUTATIONS[data.draw(st.sampled_from(sorted(MUTATIONS)))](model, data.draw)
        blob = model.SerializeToString()
    (folder / "model.onnx").write_bytes(blob)
    before = sorted(p.name for p in folder.iterdir())
    kind, value, detail = isolated(
        _cli, ["calibrate", "model.onnx", "-b", "tensorrt", "-o", "out", "-q"], str(folder)
    )
    assert kind == "ok", (kind, value, detail)
    code, output = value
    assert code != 70 and code != 1, output
    if code != 0:
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in output, output
        assert sorted(p.name for p in folder.iterdir()) == before, "output left behind"
    kind, value, detail = isolated(_cli, ["lint", "model.onnx"], str(folder))
    assert kind == "ok", (kind, value, detail)
    assert value[0] in (0, 1, 2), value[1]
    kind, value, detail = isolated(_cli, ["inspect", "model.onnx"], str(folder))
    assert kind == "ok", (kind, value, detail)
    assert value[0] == 0 or (value[0] in (3, 4) and "error: " in value[1]), value[1]
    assert sorted(p.name for p in folder.iterdir()) in (before, sorted(before + ["out"]))


def _external_model(folder: Path, location: str) -> Path:
    model = _mutable()
    init = model.graph.initializer[0]
    values = numpy_helper.to_array(init)
    init.ClearField("float_data")
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(values.nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "../secret.bin",
                                      "sub/../../secret.bin"])
@pytest.mark.parametrize("command", ["calibrate", "lint", "inspect"])
def test_cli_refuses_external_data_outside_the_folder(tmp_path, location, command):
    (tmp_path / "secret.bin").write_bytes(np.zeros(4096, np.float32).tobytes())
    path = _external_model(tmp_path / "model", location)
    args = {
        "calibrate": ["calibrate", str(path), "-b", "snpe", "-o", "out"],
        "lint": ["lint", str(path)],
        "inspect": ["inspect", str(path)],
    }[command]
    before = sorted(p.name for p in tmp_path.iterdir())
    kind, value, detail = isolated(_cli, args, str(tmp_path))
    assert kind == "ok", (kind, value, detail)
    code, output = value
    assert code == (2 if command == "lint" else ModelLoadError.exit_code), output
    assert "outside the model's folder" in output and location in output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------ calibration data


def _quantize_with(model: str, data_path: str):
    from qtool.workflow import CalibrateOptions, quantize_model

    files, report = quantize_model(model, "academic", CalibrateOptions(data=data_path))
    return sorted(files)


def _rows(count=4, shape=(1, 8, 8), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(dtype)


BAD_ARRAYS = {
    "nan": lambda: np.where(np.arange(4 * 64).reshape(4, 1, 8, 8) == 70, np.nan, _rows()),
    "inf": lambda: np.where(np.arange(4 * 64).reshape(4, 1, 8, 8) == 3, np.inf, _rows()),
    "neg_inf": lambda: np.full((4, 1, 8, 8), -np.inf, np.float32),
    "wrong_shape": lambda: _rows(shape=(1, 7, 8)),
    "wrong_rank": lambda: _rows(shape=(8, 8)),
    "wrong_channels": lambda: _rows(shape=(3, 8, 8)),
    "int_dtype": lambda: (_rows() * 10).astype(np.int32),
    "complex_dtype": lambda: _rows().astype(np.complex64),
    "string_dtype": lambda: np.array([["a"] * 64] * 4).reshape(4, 1, 8, 8),
    "bool_dtype": lambda: _rows() > 0,
    "empty": lambda: np.zeros((0, 1, 8, 8), np.float32),
    "scalar": lambda: np.float32(1.0),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_bad_calibration_arrays(tmp_path, case, suffix):
    array = np.asarray(BAD_ARRAYS[case]())
    path = tmp_path / f"calib{suffix}"
    if suffix == ".npz":
        np.savez(path, input=array)
    else:
        np.save(path, array)
    kind, value, detail = isolated(_quantize_with, str(DIGITS), str(path))
    assert (kind, value) in (("qtool", "DataError"), ("qtool", "CalibrationError")), (
        case, kind, value, detail
    )
    assert detail and "Traceback" not in detail
    if case in ("nan", "inf", "neg_inf"):
        assert "NaN" in detail or "Inf" in detail or "finite" in detail, detail


def _write_npz_variant(path: Path, variant: str) -> None:
    if variant == "wrong_key":
        np.savez(path, images=_rows())
    elif variant == "extra_key":
        np.savez(path, input=_rows(), other=_rows())
    elif variant == "no_arrays":
        np.savez(path)
    elif variant == "pickled":
        np.save(path.with_suffix(".npy"), np.array([{"a": 1}] * 4, dtype=object))
        os.replace(path.with_suffix(".npy"), path)
    elif variant == "truncated":
        buffer = io.BytesIO()
        np.savez(buffer, input=_rows())
        path.write_bytes(buffer.getvalue()[:200])
    elif variant == "garbage":
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)


@pytest.mark.parametrize("variant", ["wrong_key", "no_arrays", "pickled", "truncated", "garbage"])
def test_bad_npz_files(tmp_path, variant):
    path = tmp_path / "calib.npz"
    _write_npz_variant(path, variant)
    kind, value, detail = isolated(_quantize_with, str(DIGITS), str(path))
    assert (kind, value) == ("qtool", "DataError"), (variant, kind, value, detail)
    assert str(path.name) in detail or "calib" in detail, detail


def test_extra_npz_key_is_ignored_or_refused_clearly(tmp_path):
    path = tmp_path / "calib.npz"
    _write_npz_variant(path, "extra_key")
    kind, value, detail = isolated(_quantize_with, str(DIGITS), str(path))
    assert kind == "ok" or (kind, value) == ("qtool", "DataError"), (kind, value, detail)


def _png(size=(8, 8), mode="L", seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else len(mode)
    pixels = rng.integers(0, 255, (*size, channels), dtype=np.uint8).squeeze()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode if channels > 1 else None).save(buffer, format="PNG")
    return buffer.getvalue()


@FUZZ
@given(st.data())
def test_corrupted_image_folders(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("images")
    good = data.draw(st.integers(0, 3))
    for i in range(good):
        (folder / f"good{i}.png").write_bytes(_png(seed=i))
    png = _png(seed=9)
    corruption = data.draw(st.sampled_from(["random", "truncated", "empty", "flipped", "text"]))
    if corruption == "random":
        blob = data.draw(st.binary(min_size=0, max_size=512))
    elif corruption == "truncated":
        blob = png[: data.draw(st.integers(0, len(png) - 1))]
    elif corruption == "empty":
        blob = b""
    elif corruption == "flipped":
        raw = bytearray(png)
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(8, len(png) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(raw)
    else:
        blob = b"this is not an image\n"
    name = data.draw(st.sampled_from(["bad.png", "bad.jpg", "bad.bmp", "a/bad.jpeg"]))
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_bytes(blob)
    kind, value, detail = isolated(_quantize_with, str(DIGITS), str(folder))
    # A flipped byte can leave a decodable image: then the run succeeds.
    assert kind == "ok" or value in ("DataError", "CalibrationError"), (kind, value, detail)
    if kind == "qtool":
        assert "Traceback" not in detail and detail


@pytest.mark.parametrize("layout", ["empty", "no_images", "only_hidden", "nested_empty"])
def test_empty_image_folders(tmp_path, layout):
    folder = tmp_path / "calib"
    folder.mkdir()
    if layout == "no_images":
        (folder / "readme.txt").write_text("no images here")
    elif layout == "only_hidden":
        (folder / ".DS_Store").write_bytes(b"\0" * 16)
    elif layout == "nested_empty":
        (folder / "a" / "b").mkdir(parents=True)
    kind, value, detail = isolated(_quantize_with, str(DIGITS), str(folder))
    assert (kind, value) == ("qtool", "DataError"), (layout, kind, value, detail)
    assert "calib" in detail


def test_nan_weights_are_a_clear_error(tmp_path):
    model = _mutable()
    init = max(model.graph.initializer, key=lambda t: len(numpy_helper.to_array(t).ravel()))
    values = numpy_helper.to_array(init).copy()
    values.ravel()[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    path = tmp_path / "nan.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "calib.npz", input=_rows())
    kind, value, detail = isolated(_quantize_with, str(path), str(tmp_path / "calib.npz"))
    assert kind == "qtool" and value in (CalibrationError.__name__, DataError.__name__,
                                         "PlanError", "PassError"), (kind, value, detail)
    assert "NaN" in detail or "finite" in detail, detail


def _float64_model(path: Path) -> None:
    model = _mutable()
    for index, tensor in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32:
            model.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(values.astype(np.float64), tensor.name)
            )
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    path.write_bytes(model.SerializeToString())


def test_model_onnxruntime_cannot_run_is_a_clear_error(tmp_path):
    """Regression: a valid float64 model (no CPU Conv kernel for double) was an internal
    error (exit 70) from the calibration session; it must be a QtoolError, nothing written."""
    _float64_model(tmp_path / "double.onnx")
    kind, value, detail = isolated(
        _cli, ["calibrate", "double.onnx", "-b", "tensorrt", "-o", "out"], str(tmp_path)
    )
    assert kind == "ok", (kind, value, detail)
    code, output = value
    assert code in (3, 4, 7), output
    assert "error: " in output and "onnxruntime" in output and "Conv" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["double.onnx"]


def _cli_stdout(args: list[str], cwd: str):
    from click.testing import CliRunner
    from qtool.cli import main

    os.chdir(cwd)
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    return result.exit_code, result.stdout


@pytest.mark.parametrize("args", [["inspect", "dup.onnx", "--format", "json"],
                                  ["lint", "dup.onnx", "--format", "sarif"],
                                  ["lint", "dup.onnx", "--format", "json", "-b", "tensorrt"]])
def test_machine_readable_output_stays_clean_on_odd_models(tmp_path, args):
    """Regression: onnx-graphsurgeon printed "[W] Found distinct Nodes that share the same
    name" (and more) to stdout, breaking the JSON/SARIF a CI job parses."""
    import json

    model = _mutable()
    for node in model.graph.node:  # legal ONNX, but every gs pass warns about it
        node.name = "same"
    (tmp_path / "dup.onnx").write_bytes(model.SerializeToString())
    kind, value, detail = isolated(_cli_stdout, args, str(tmp_path))
    assert kind == "ok", (kind, value, detail)
    code, stdout = value
    assert code in (0, 1), stdout
    json.loads(stdout)


@pytest.mark.parametrize("command", ["evaluate", "calibrate"])
def test_data_the_model_cannot_run_on_is_a_data_error(tmp_path, command):
    """Regression: the detector's dims are dynamic, but its FPN adds need sizes divisible
    by 8; a 33x47 sample made onnxruntime fail mid-run, which escaped as an internal error."""
    import zoo

    (tmp_path / "detector.onnx").write_bytes(zoo.zoo_bytes("detector", 13))
    np.savez(tmp_path / "odd.npz", input=np.zeros((2, 3, 33, 47), np.float32))
    args = {
        "evaluate": ["evaluate", "detector.onnx", "detector.onnx", "--data", "odd.npz"],
        "calibrate": ["calibrate", "detector.onnx", "-b", "fbgemm", "--data", "odd.npz",
                      "-o", "out"],
    }[command]
    kind, value, detail = isolated(_cli, args, str(tmp_path))
    assert kind == "ok", (kind, value, detail)
    code, output = value
    assert code == DataError.exit_code, output
    assert "error: " in output and "onnxruntime" in output, output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ edited plans


@functools.cache
def _digits_plan_setup():
    from qtool.calibration import calibrate

    from qtool.io import load
    from qtool.planner import build_plan
    from qtool.prepare import prepare

    graph, _ = prepare(load(str(DIGITS)))
    plan = build_plan(graph, "tensorrt")
    data = [{"input": row[None]} for row in _rows(count=4)]
    ranges = calibrate(graph, plan.activation_schemes(), data)
    return graph, plan.to_dict(), ranges


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


@settings(FUZZ, max_examples=80)
@given(st.data())
def test_edited_plans_are_plan_errors(data):
    """A hand-edited plan (``--plan``) with any value anywhere: PlanError, or a valid plan."""
    import copy
    import json

    from qtool.errors import PlanError
    from qtool.plan import QuantPlan
    from qtool.qdq import quantize

    graph, original, ranges = _digits_plan_setup()
    plan = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(plan) if p]
        path = data.draw(st.sampled_from(paths))
        parent = plan
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(JSON_VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(JSON_VALUES)
    text = json.dumps(plan)
    try:
        loaded = QuantPlan.from_json(text)
        quantize(graph, "tensorrt", ranges, plan=loaded)
    except PlanError as exc:
        assert exc.message
    except QtoolError as exc:  # e.g. a BackendError for an edited backend name
        assert exc.message


@pytest.mark.parametrize("edit", ["bits_null", "entry_null", "placement_text", "signed_text"])
def test_cli_refuses_a_mistyped_plan(tmp_path, edit):
    """Regression: a plan edited by hand with a wrong JSON type (``"bits": null``, an entry
    ``null``, ``"placement_graph": "2"``) escaped as TypeError/ValueError (exit 70)."""
    import json

    _, original, _ = _digits_plan_setup()
    plan = json.loads(json.dumps(original))
    name = next(iter(plan["tensors"]))
    if edit == "bits_null":
        plan["tensors"][name]["scheme"]["bits"] = None
    elif edit == "entry_null":
        plan["tensors"][name] = None
    elif edit == "placement_text":
        plan["placement_graph"] = "2"
    else:
        plan["tensors"][name]["scheme"]["signed"] = "yes"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = ["calibrate", str(DIGITS), "-b", "tensorrt", "--plan", "plan.json", "-o", "out"]
    kind, value, detail = isolated(_cli, args, str(tmp_path))
    assert kind == "ok", (kind, value, detail)
    code, output = value
    assert code == 2 and "error: " in output and "plan" in output, output
    assert not (tmp_path / "out").exists()
