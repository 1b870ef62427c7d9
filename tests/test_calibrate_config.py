"""`qtool calibrate --config FILE`: the file's keys are the flags, flags win, errors exit 2."""

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
import yaml
from click.testing import CliRunner
from qtool.cli import main

from qtool.errors import RecipeError
from qtool.workflow import CalibrateOptions, calibrate_options_from_recipe

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
REPORTS = ("report.json", "report.md", "report.html", ".qtool-manifest.json")  # name the config

#: The run every config below describes: AdaRound (a few steps), CLE, no bias correction.
FLAGS = ("-b", "tensorrt", "--num-samples", "64", "--weight-bits", "4", "--cle",
         "--no-bias-correction", "--adaround", "--adaround-iters", "2")
CONFIG = {"backend": "tensorrt", "num_samples": 64, "weight_bits": 4, "cle": True,
          "bias_correction": False, "adaround": {"iterations": 2}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's project: the model and data in data/, configs in configs/, a cwd elsewhere."""
    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    for name in ("digits_cnn.onnx", "digits_calib.npz", "digits_val.npz"):
        shutil.copy(EXAMPLES / name, root / "data" / name)
    (root / "configs").mkdir()
    (root / "elsewhere").mkdir()
    return root


def _calibrate(cwd: Path, *args):
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, ["calibrate", *map(str, args), "-q"])
    finally:
        os.chdir(previous)
    return result


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _write(path: Path, spec: dict) -> Path:
    text = json.dumps(spec) if path.suffix == ".json" else yaml.safe_dump(spec)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def flag_run(project):
    data = project / "data"
    result = _calibrate(project, data / "digits_cnn.onnx", *FLAGS, "--data",
                        data / "digits_calib.npz", "--eval-data", data / "digits_val.npz",
                        "-o", project / "by-flags")
    assert result.exit_code == 0, result.output
    return project / "by-flags"


def test_yaml_config_writes_the_bytes_of_the_same_flags(project, flag_run):
    config = _write(project / "configs" / "calib.yaml", {
        **CONFIG, "model": "../data/digits_cnn.onnx", "data": "../data/digits_calib.npz",
        "eval_data": "../data/digits_val.npz", "output": "../by-config",
    })
    # Run from another folder: the paths are the config's folder's, not the cwd's.
    result = _calibrate(project / "elsewhere", "--config", config)
    assert result.exit_code == 0, result.output
    out = project / "by-config"
    mine, theirs = _files(out), _files(flag_run)
    assert mine.keys() == theirs.keys()
    for name in mine.keys() - set(REPORTS):
        assert mine[name] == theirs[name], name
    report, reference = (json.loads((d / "report.json").read_text()) for d in (out, flag_run))
    assert report["config"] == config.as_posix() and reference["config"] is None
    assert report["options"] == reference["options"]
    assert {k: v for k, v in report.items() if k != "config"} == {
        k: v for k, v in reference.items() if k != "config"}
    # The options took effect: CLE ran, AdaRound ran 2 steps, no bias correction.
    assert report["options"]["adaround"] == {"iterations": 2}
    assert report["adaround"]["iterations"] == 2 and report["adaround"]["layers"]
    assert any(line.startswith("cle:") for line in report["passes"])
    assert "bias_correction" not in report
    assert f"From {config.as_posix()}" in (out / "report.md").read_text()
    qdq = onnx.load(str(out / "model.qdq.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) > 0


def test_json_config_and_flags_over_it(project, flag_run):
    folder = project / "configs" / "json"
    folder.mkdir()
    config = _write(folder / "calib.json", {
        **CONFIG, "method": "mse", "num_samples": 32,
        "adaround": {"enabled": False, "iterations": 2},
        "model": "../../data/digits_cnn.onnx", "data": "../../data/digits_calib.npz",
        "eval_data": "../../data/digits_val.npz", "output": "../../unused",
    })
    from_file = calibrate_options_from_recipe(config)
    assert (from_file.method, from_file.num_samples, from_file.adaround) == ("mse", 32, False)
    result = _calibrate(project / "elsewhere", "--config", config, "--method", "minmax",
                        "--num-samples", "64", "--adaround", "-o", project / "overridden")
    assert result.exit_code == 0, result.output
    assert not (project / "unused").exists()
    mine, theirs = _files(project / "overridden"), _files(flag_run)
    for name in mine.keys() - set(REPORTS):
        assert mine[name] == theirs[name], name
    report = json.loads((project / "overridden" / "report.json").read_text())
    assert report["options"]["method"] == "minmax" and report["calibration"]["method"] == "minmax"
    assert report["options"]["adaround"] == {"iterations": 2}


def test_the_reports_options_are_a_config_of_the_same_run(project, flag_run):
    report = json.loads((flag_run / "report.json").read_text())
    options = calibrate_options_from_recipe(report["options"])
    assert options == CalibrateOptions(
        data=str(project / "data" / "digits_calib.npz"),
        eval_data=str(project / "data" / "digits_val.npz"), num_samples=64, weight_bits=4,
        cle=True, bias_correction=False, adaround=True, adaround_iters=2, backend_options={},
    )


def test_python_mapping_keys_to_options():
    options = calibrate_options_from_recipe({
        "bits": 6, "act_bits": 8, "method": "entropy", "memory_budget": 2, "skip": "Gemm",
        "adaround": True, "preprocess": {"resize": 0, "mean": [0.5]},
        "backend_options": {"reduce_range": False}, "input_axes": {"state": 1, "sr": None},
        "providers": ["cuda", "cpu"], "target_sqnr": 30, "executor": "local",
    })
    assert (options.weight_bits, options.act_bits) == (6, 8)
    assert options.method == "kld" and options.memory_budget == 2 * 2**20
    assert options.skip == ("Gemm",) and options.adaround and options.adaround_iters == 200
    assert (options.preprocess.resize, options.preprocess.mean) == (0, (0.5,))
    assert options.backend_options == {"reduce_range": False}
    assert options.input_axes == (("state", 1), ("sr", None))
    assert options.providers == "cuda,cpu" and options.target_sqnr == 30.0


def test_flags_merge_key_by_key_into_the_files_mappings():
    from qtool.calibration.images import Preprocessing

    from qtool.calibrate_config import load_calibrate_config

    config = load_calibrate_config({
        "backend_options": {"reduce_range": False, "activations": "int8"},
        "preprocess": {"resize": 0, "color": "gray"}, "bits": 4, "batch_size": 8,
    })
    flags = CalibrateOptions(backend_options=("activations=uint8",), weight_bits=8,
                             preprocess=Preprocessing(color="rgb"), batch_size=16)
    options = config.options(flags, given={"backend_options", "weight_bits", "color"})
    assert options.backend_options == {"reduce_range": False, "activations": "uint8"}
    assert (options.weight_bits, options.act_bits) == (8, 4)
    assert (options.preprocess.resize, options.preprocess.color) == (0, "rgb")
    assert options.batch_size == 8  # --batch-size not given: the file's


@pytest.mark.parametrize(("spec", "names"), [
    ({"methd": "mse"}, ["unknown key 'methd' (did you mean 'method'?)", "valid keys:",
                        "adaround"]),
    ({"batch_size": "big"}, ["'batch_size'", "an integer >= 1", "'big'"]),
    ({"batch_size": True}, ["'batch_size'", "an integer >= 1"]),
    ({"cle": "yes please"}, ["'cle'", "true or false"]),
    ({"method": "fancy"}, ["'method'", "one of:", "minmax", "auto", "entropy"]),
    ({"backend": "tpu"}, ["'backend'", "tensorrt", "snpe"]),
    ({"adaround": {"iters": 5}}, ["'adaround'", "unknown key(s) iters", "iterations"]),
    ({"adaround": {"iterations": 0}}, ["'adaround'", "iterations: an integer >= 1"]),
    ({"weight_bits": 1}, ["'weight_bits'", "from 2 to 16"]),
    ({"data": "missing.npz"}, ["'data'", "no such file or folder", "missing.npz"]),
    ({"preprocess": {"zoom": 2}}, ["'preprocess'", "unknown key(s) zoom", "resize"]),
])
def test_bad_configs_exit_2_with_one_error_and_a_hint(project, spec, names):
    config = _write(project / "configs" / "bad.yaml",
                    {"model": "../data/digits_cnn.onnx", "backend": "snpe", **spec})
    result = _calibrate(project, "--config", config)
    assert result.exit_code == 2, result.output
    error, hint = result.stderr.splitlines()
    assert error.startswith(f"error: {config.as_posix()}: ") and hint.startswith("hint: ")
    for name in names:
        assert name in result.stderr, name
    with pytest.raises(RecipeError):
        calibrate_options_from_recipe(config)


def test_a_config_that_does_not_parse_and_no_model(project):
    broken = project / "configs" / "broken.yaml"
    broken.write_text("backend: [snpe\n", encoding="utf-8")
    result = _calibrate(project, "--config", broken)
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    no_model = _write(project / "configs" / "nomodel.json", {"backend": "snpe"})
    result = _calibrate(project, "--config", no_model)
    assert result.exit_code == 2 and "give MODEL, or a --config with a 'model' key" in (
        result.output)


def _docs_yaml_blocks() -> dict[str, str]:
    """docs/cli.md's YAML blocks that start with ``# NAME.yaml``, by file name."""
    import re

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n# (\S+\.yaml)\b.*?\n(.*?)```", text, flags=re.S)
    return dict(blocks)


def test_the_docs_config_has_every_key_and_its_defaults(tmp_path, monkeypatch):
    from qtool.calibration.images import Preprocessing

    from qtool.calibrate_config import KEYS, load_calibrate_config
    from qtool.workflow import backend_rules

    blocks = _docs_yaml_blocks()
    spec = yaml.safe_load(blocks["calib.yaml"])
    assert list(spec) == list(KEYS)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "data" / "calib").mkdir(parents=True)
    shutil.copy(EXAMPLES / "digits_cnn.onnx", tmp_path / "models" / "resnet18.onnx")
    shutil.copy(EXAMPLES / "digits_val.npz", tmp_path / "data" / "val.npz")
    config = load_calibrate_config(spec)
    assert (config.model, config.backend) == (os.path.join("models", "resnet18.onnx"), "snpe")
    # Every value the docs call the default is CalibrateOptions' default.
    assert config.options() == CalibrateOptions(
        data=os.path.join("data", "calib"), eval_data=os.path.join("data", "val.npz"),
        backend_options={"encoding_version": "1.0.0"}, providers="cpu",
        preprocess=Preprocessing(resize=0, mean=(0.5,) * 3, std=(0.5,) * 3),
    )
    backend_rules("snpe", config.options().backend_options)  # the options are snpe's
    for name in ("tensorrt.yaml", "qnn.yaml", "fbgemm.yaml"):
        engine = load_calibrate_config(yaml.safe_load(blocks[name]))
        assert engine.backend == name.removesuffix(".yaml")
        backend_rules(engine.backend, engine.options().backend_options)


def test_model_and_flags_on_the_command_line_win_over_the_file(project, tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="only_conv")], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [weight])
    tiny = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tiny)
    config = _write(project / "configs" / "plan.yaml",
                    {"model": "../data/digits_cnn.onnx", "backend": "snpe", "weight_bits": 4})
    # the tiny conv's channels are under TensorRT's int8 minimum: int8_conv_rule off
    result = _calibrate(tmp_path, tiny, "--config", config, "-b", "tensorrt",
                        "--backend-option", "int8_conv_rule=false", "--save-plan",
                        tmp_path / "plan.json")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["backend"] == "tensorrt"
    assert set(plan["tensors"]) >= {"x", "w"}  # the tiny model's, not the config's
    assert plan["tensors"]["w"]["scheme"]["bits"] == 4  # the file's weight_bits stays
