"""Loading and saving: every source kind, external data (and its path checks), deterministic and
atomic writes, and one clear error class per kind of bad input with no output left behind."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from models import assert_close, random_inputs, run, torch_model
from onnx import TensorProto, helper

import qtool
from qtool.errors import InvalidModelError, ModelLoadError, OutputError, UnsupportedModelError
from qtool.io import default_opset, load, load_model, save, serialize
from qtool.pipeline import Pipeline


def outputs_of(source, model: onnx.ModelProto, batch: int = 2):
    feeds = random_inputs(model, batch=batch)
    return run(model, feeds), run(load(source), feeds)


def prepare_file(src, dst) -> None:
    """What a user's job does: load, prepare, save. Used to show no output is left on errors."""
    graph, _ = Pipeline(["cleanup", "fold_bn"]).run(load(src))
    save(graph, dst)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "resnet.onnx"
    onnx.save_model(torch_model("resnet", 13), path)
    return path


# --- sources ---------------------------------------------------------------------------------


def test_load_from_path_bytes_and_model_proto_agree(model_path):
    model = torch_model("resnet", 13)
    graphs = [load(model_path), load(str(model_path)), load(model_path.read_bytes()), load(model)]
    expected = serialize(graphs[0])
    assert all(serialize(g) == expected for g in graphs)
    assert all(g.opset == 13 for g in graphs)
    assert load(graphs[0]) is graphs[0]
    reference, got = outputs_of(model_path, model)
    assert_close(reference, got)


def test_load_keeps_the_dynamic_batch_dim(model_path):
    graph = load(model_path)
    assert graph.inputs[0].shape == ["batch", 3, 16, 16]
    model = torch_model("resnet", 13)
    for batch in (1, 4):
        reference, got = outputs_of(graph, model, batch)
        assert_close(reference, got)


def save_external(model: onnx.ModelProto, folder, location="weights.bin") -> os.PathLike:
    folder.mkdir(exist_ok=True)
    path = folder / "model.onnx"
    model = edited(model, lambda m: None)  # save_model moves the tensors out of its argument
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True,
        location=location, size_threshold=0,
    )
    return path


def test_external_data_model_loads_and_runs(tmp_path, monkeypatch):
    model = torch_model("mobilenet_v2", 13)
    path = save_external(model, tmp_path / "ext")
    assert (tmp_path / "ext" / "weights.bin").stat().st_size > 10_000
    assert path.stat().st_size < 10_000  # the weights really are outside the .onnx
    monkeypatch.chdir(tmp_path)  # loading must not depend on the working directory
    proto = load_model(path)
    assert all(t.data_location == TensorProto.DEFAULT for t in proto.graph.initializer)
    reference, got = outputs_of(path, model)
    assert_close(reference, got)
    with pytest.raises(ModelLoadError, match="refers to external data"):
        load(path.read_bytes())


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "../outside.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    model = torch_model("resnet", 13)
    path = save_external(model, tmp_path / "ext")
    (tmp_path / "outside.bin").write_bytes((tmp_path / "ext" / "weights.bin").read_bytes())
    proto = onnx.load_model(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, path)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load(path)


def test_missing_external_data_file_is_reported(tmp_path):
    path = save_external(torch_model("resnet", 13), tmp_path / "ext")
    (tmp_path / "ext" / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match="external data file 'weights.bin' .* is missing"):
        load(path)


# --- saving ----------------------------------------------------------------------------------


def test_save_is_deterministic_and_round_trips(tmp_path, model_path):
    graph = load(model_path)
    first = save(graph, tmp_path / "a.onnx")
    second = save(load(model_path), tmp_path / "b.onnx")
    assert first.read_bytes() == second.read_bytes() == serialize(graph)
    save(load(first), tmp_path / "c.onnx")  # load -> save is a fixed point
    assert (tmp_path / "c.onnx").read_bytes() == first.read_bytes()
    reference, got = outputs_of(first, torch_model("resnet", 13))
    assert_close(reference, got)


def test_save_leaves_no_temporary_files(tmp_path, model_path):
    out = tmp_path / "out"
    out.mkdir()
    save(load(model_path), out / "m.onnx")
    save(load(model_path), out / "m.onnx")  # overwrite
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]


def test_a_failing_save_keeps_the_old_file(tmp_path, model_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old contents")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qtool.io.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save(load(model_path), out)
    assert out.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "resnet.onnx"]


def test_an_unexportable_graph_writes_nothing(tmp_path):
    x = gs.Variable("x", dtype=np.float32, shape=[1, 3])
    y = gs.Variable("y")  # no dtype: the exporter's type check refuses the graph
    graph = gs.Graph(nodes=[gs.Node("Relu", inputs=[x], outputs=[y])], inputs=[x], outputs=[y],
                     opset=13)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old contents")
    with pytest.raises(Exception):  # noqa: B017  (graphsurgeon's own error type)
        save(graph, out)
    assert out.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_save_into_a_missing_folder_is_an_output_error(tmp_path, model_path):
    with pytest.raises(OutputError, match="folder does not exist"):
        save(load(model_path), tmp_path / "nope" / "m.onnx")


# --- bad input -------------------------------------------------------------------------------


def edited(model: onnx.ModelProto, edit) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    edit(copy)
    return copy


def set_opset(version):
    def edit(model):
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = version

    return edit


def add_custom_domain_node(model):
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.domain = "com.example"
    relu.op_type = "FancyRelu"
    model.opset_import.append(helper.make_opsetid("com.example", 1))


def dangle_an_input(model):
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.input[0] = "nothing_makes_this"


def truncated(fraction):
    def make(data: bytes) -> bytes:
        return data[: int(len(data) * fraction)]

    return make


BAD_FILES = {
    "empty": (lambda data: b"", ModelLoadError, "the file is empty"),
    "random_bytes": (
        lambda data: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        ModelLoadError, "not an ONNX model",
    ),
    "text": (lambda data: b"name: resnet\nlayers: 18\n" * 20, ModelLoadError, "not an ONNX model"),
    "truncated_10": (truncated(0.1), ModelLoadError, "not an ONNX model"),
    "truncated_50": (truncated(0.5), ModelLoadError, "not an ONNX model"),
    "truncated_99": (truncated(0.99), ModelLoadError, "not an ONNX model"),
    "truncated_1_byte": (lambda data: data[:-1], ModelLoadError, "not an ONNX model"),
    "opset_9": (set_opset(9), UnsupportedModelError, "opset 9 is outside the supported range"),
    "opset_23": (set_opset(23), UnsupportedModelError, "opset 23 is outside the supported range"),
    "custom_domain": (add_custom_domain_node, UnsupportedModelError, "domain 'com.example'"),
    "dangling_input": (dangle_an_input, InvalidModelError, "checker rejects the model"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_raises_its_own_error_and_leaves_no_output(tmp_path, case):
    make, error, match = BAD_FILES[case]
    model = torch_model("resnet", 13)
    data = model.SerializeToString()
    if case.startswith(("opset", "custom", "dangling")):
        data = edited(model, make).SerializeToString()
    else:
        data = make(data)
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(error, match=match) as info:
        prepare_file(src, out / "prepared.onnx")
    assert str(src) in str(info.value) or error is not ModelLoadError
    assert info.value.hint  # every error says what to do
    assert list(out.iterdir()) == []
    with pytest.raises(error):
        load(data)  # the same verdict for bytes


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match="is a folder"):
        load(tmp_path)


def test_check_false_skips_the_support_checks():
    model = edited(torch_model("resnet", 13), set_opset(23))
    graph = load(model, check=False)
    assert graph.opset == 23
    assert default_opset(model) == 23


def test_a_custom_domain_node_inside_a_subgraph_is_refused():
    branch = helper.make_graph(
        [helper.make_node("FancyRelu", ["x"], ["b"], domain="com.example")], "branch", [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                     helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedModelError, match="FancyRelu.*domain 'com.example'"):
        load(model)


def test_model_local_functions_are_inlined_on_load():
    # Exporters such as torch's dynamo wrap blocks in model-local functions.
    twice = helper.make_function(
        "local", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
        [helper.make_opsetid("", 13)],
    )
    graph = helper.make_graph(
        [helper.make_node("Twice", ["a"], ["b"], domain="local")], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("local", 1)],
        functions=[twice],
    )
    loaded = load(model)
    assert [n.op for n in loaded.nodes] == ["Add"]
    x = np.array([1.5, -2.0], dtype=np.float32)
    np.testing.assert_array_equal(run(loaded, {"a": x})[0], 2 * x)


@pytest.mark.parametrize("field", ["raw", "typed"])
def test_a_weight_whose_data_does_not_fill_its_dims_is_an_invalid_model(field):
    """dims (2**31, 1, 3, 3) over 72 values: refused on load (it failed inside cleanup, and
    the dims made the model look over 2 GB, which skipped the checker)."""
    values = np.arange(72, dtype=np.float32)
    weight = (helper.make_tensor("w", TensorProto.FLOAT, [8, 1, 3, 3], values.tobytes(), raw=True)
              if field == "raw" else
              helper.make_tensor("w", TensorProto.FLOAT, [8, 1, 3, 3], values.tolist()))
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 1, 4, 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 8, 4, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert load(model.SerializeToString()) is not None  # whole: accepted
    model.graph.initializer[0].dims[0] = 2**31
    with pytest.raises(InvalidModelError, match=r"tensor w: dims \[2147483648, 1, 3, 3\] need "
                       r"19327352832 values but the file holds 72"):
        load(model.SerializeToString())
