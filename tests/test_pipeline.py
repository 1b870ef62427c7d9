"""Pipeline: built from Python, YAML and JSON; reports what each pass changed; enforces the
pass contract (errors named after the pass, invariants, opset)."""

from __future__ import annotations

import json

import onnx_graphsurgeon as gs
import pytest
from models import assert_close, random_inputs, run, torch_model

import qtool
from qtool.errors import PassError, RecipeError
from qtool.passes.fold_bn import fold_bn
from qtool.pipeline import Pipeline, available_passes, op_histogram, register_pass, run_pass

PREPARE = ["cleanup", "fold_bn", "upgrade_opset"]


@pytest.fixture
def temporary_passes():
    """Register passes for one test, removing them afterwards."""
    registry = qtool.pipeline._REGISTRY
    before = set(registry)
    yield register_pass
    for name in set(registry) - before:
        del registry[name]


def assert_prepared(model, graph, reports, target=13):
    assert [r.name for r in reports] == ["cleanup", "fold_bn", "upgrade_opset"]
    assert "BatchNormalization" not in op_histogram(graph)
    assert graph.opset == target
    for batch in (1, 2):
        feeds = random_inputs(model, batch=batch)
        assert_close(run(model, feeds), run(graph, feeds))


def test_builtin_passes_are_registered_with_their_options():
    passes = available_passes()
    assert {"cleanup", "fold_bn", "fuse_affine", "upgrade_opset"} <= set(passes)
    assert passes["upgrade_opset"].options == {"target": 13}
    assert passes["upgrade_opset"].changes_opset
    assert passes["fold_bn"].options == {} and not passes["fold_bn"].changes_opset


def test_pipeline_from_a_python_list_reports_what_changed():
    model = torch_model("resnet", 11)
    graph, reports = Pipeline(PREPARE).run(qtool.load(model))
    assert_prepared(model, graph, reports)
    summaries = [r.summary() for r in reports]
    assert summaries[1] == "fold_bn: 6 BatchNormalization folded"
    assert summaries[2] == "upgrade_opset: opset 11 -> 13, outputs checked equal in onnxruntime"
    assert all(r.changed for r in reports[1:])
    assert reports[1].ops_before["BatchNormalization"] == 6
    assert "BatchNormalization" not in reports[1].ops_after
    assert reports[1].to_dict()["notes"] == ["6 BatchNormalization folded"]


def test_a_pass_that_changes_nothing_says_so():
    graph, _ = Pipeline(["fold_bn"]).run(qtool.load(torch_model("resnet", 13)))
    graph, reports = Pipeline([fold_bn, "fuse_affine"]).run(graph)  # a function is a step too
    assert [r.summary() for r in reports] == ["fold_bn: no change", "fuse_affine: no change"]
    assert not any(r.changed for r in reports)


def test_pipeline_from_yaml_recipe(tmp_path):
    recipe = tmp_path / "prepare.yaml"
    recipe.write_text(
        "model: in.onnx\npasses:\n  - cleanup\n  - fold_bn\n  - upgrade_opset:\n      target: 17\n"
    )
    pipe = Pipeline.from_recipe(recipe)
    assert [(s.name, dict(s.options)) for s in pipe.steps] == [
        ("cleanup", {}), ("fold_bn", {}), ("upgrade_opset", {"target": 17})
    ]
    model = torch_model("convtranspose", 11)
    graph, reports = pipe.run(qtool.load(model))
    assert_prepared(model, graph, reports, target=17)


def test_pipeline_from_json_recipe_and_mapping(tmp_path):
    recipe = {"passes": ["cleanup", {"fold_bn": None}, {"upgrade_opset": {"target": 13}}]}
    path = tmp_path / "prepare.json"
    path.write_text(json.dumps(recipe))
    model = torch_model("attention", 11)
    for source in (path, str(path), recipe):
        graph, reports = Pipeline.from_recipe(source).run(qtool.load(model))
        assert_prepared(model, graph, reports)


@pytest.mark.parametrize(
    "recipe,match",
    [
        ({"passes": ["cleanup", "fold_batchnorm"]}, "unknown pass 'fold_batchnorm'"),
        ({"passes": [{"upgrade_opset": {"traget": 13}}]}, "upgrade_opset has no option traget"),
        ({"passes": [{"fold_bn": {"epsilon": 1}}]}, "fold_bn has no option epsilon"),
        ({"passes": [{"upgrade_opset": 13}]}, "options of pass 'upgrade_opset' must be a mapping"),
        ({"passes": [["cleanup"]]}, "neither a pass name"),
        ({"passes": []}, "no 'passes' list"),
        ({"model": "x.onnx"}, "no 'passes' list"),
    ],
)
def test_bad_recipes_raise_recipe_error(recipe, match):
    with pytest.raises(RecipeError, match=match):
        Pipeline.from_recipe(recipe)


def test_unknown_pass_or_option_from_python_raises_recipe_error():
    with pytest.raises(RecipeError, match="unknown pass 'nope'") as info:
        Pipeline(["cleanup", "nope"])
    assert "fold_bn" in info.value.hint  # the hint lists the known passes
    with pytest.raises(RecipeError, match="cleanup has no option fold") as info:
        Pipeline([("cleanup", {"fold": False})])
    assert "fold_constants" in info.value.hint


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("bad.yaml", "passes: [cleanup\n", "does not parse"),
        ("bad.json", '{"passes": ["cleanup",]}', "does not parse"),
        ("list.yaml", "- cleanup\n", "is a mapping"),
    ],
)
def test_unreadable_recipe_files_raise_recipe_error(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        Pipeline.from_recipe(path)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Pipeline.from_recipe(tmp_path / "missing.yaml")


def test_a_failing_pass_is_wrapped_in_pass_error_naming_it(temporary_passes):
    @temporary_passes("test_explodes")
    def explodes(graph: gs.Graph) -> gs.Graph:
        raise ZeroDivisionError("boom")

    with pytest.raises(PassError, match="pass test_explodes failed: ZeroDivisionError: boom"):
        Pipeline(["cleanup", "test_explodes"]).run(qtool.load(torch_model("resnet", 13)))


def test_invariants_catch_a_dangling_input(temporary_passes):
    @temporary_passes("test_drops_producer")
    def drops_producer(graph: gs.Graph) -> gs.Graph:
        relu = next(n for n in graph.nodes if n.op == "Relu")
        graph.nodes.remove(relu)  # its consumers now read a tensor nothing produces
        return graph

    graph = qtool.load(torch_model("resnet", 13))
    relu_out = next(n for n in graph.nodes if n.op == "Relu").outputs[0].name
    with pytest.raises(PassError, match=f"after pass test_drops_producer: input {relu_out} "):
        run_pass(graph, "test_drops_producer")


def test_invariants_catch_an_undeclared_opset_change_and_a_non_graph(temporary_passes):
    @temporary_passes("test_bumps_opset")
    def bumps_opset(graph: gs.Graph) -> gs.Graph:
        graph.opset = 17
        return graph

    @temporary_passes("test_returns_none")
    def returns_none(graph: gs.Graph):
        return None

    graph = qtool.load(torch_model("resnet", 13))
    with pytest.raises(PassError, match="pass test_bumps_opset changed the opset from 13 to 17"):
        run_pass(graph, "test_bumps_opset")
    with pytest.raises(PassError, match="pass test_returns_none returned NoneType"):
        run_pass(graph, "test_returns_none")
