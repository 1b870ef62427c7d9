"""Image-folder preprocessing: visible in --help and the report, settable, checked against the
model. References are computed here with PIL and numpy from the formula in
qtool/calibration/images.py's docstring, and read back from the engine's own file (TensorRT's
dynamic_range.json: amax = max |x| of the input).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from qtool.calibration import load_data
from qtool.calibration.images import Preprocessing
from qtool.cli import main
from test_data import image_model

from qtool.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_cnn.onnx"  # input (?, 1, 8, 8)
FLAGS = ("--resize", "--crop", "--mean", "--std", "--scale", "--layout", "--color",
         "--preprocess")


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gray")
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(6):
        array = rng.integers(0, 256, (12, 10), dtype=np.uint8)
        Image.fromarray(array, "L").save(folder / f"{i}.png")
        arrays.append(array)
    return folder, arrays


def _reference(array: np.ndarray, resize: int, size=(8, 8)) -> np.ndarray:
    """Resize the shorter side, centre crop, as PIL does it (0..255 floats)."""
    image = Image.fromarray(array, "L")
    w, h = image.size
    ratio = resize / min(w, h)
    new_w, new_h = max(size[1], round(w * ratio)), max(size[0], round(h * ratio))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size[1]) // 2, (new_h - size[0]) // 2
    image = image.crop((left, top, left + size[1], top + size[0]))
    return np.asarray(image, dtype=np.float32)


def test_help_lists_the_preprocessing_flags():
    for command in ("calibrate", "evaluate"):
        text = CliRunner().invoke(main, [command, "--help"]).stdout
        for flag in FLAGS:
            assert flag in text, (command, flag)


def test_defaults_follow_a_gray_model(gray_folder):
    folder, arrays = gray_folder
    data = load_data(folder, DIGITS)
    assert data.to_dict() == {"input": "input", "color": "gray", "resize": 9, "crop": [8, 8],
                              "scale": float(np.float32(1 / 255)), "mean": [0.0], "std": [1.0],
                              "layout": "NCHW"}
    for sample, array in zip(data, arrays, strict=True):  # plain [0, 1] pixels, no ImageNet
        np.testing.assert_allclose(sample["input"][0, 0], _reference(array, 9) / 255, rtol=1e-6)


def test_colour_model_defaults_to_imagenet(tmp_path):
    Image.fromarray(np.full((9, 9, 3), 200, np.uint8)).save(tmp_path / "a.png")
    data = load_data(tmp_path, image_model(layout="NHWC"))
    info = data.to_dict()
    assert info["color"] == "rgb" and info["layout"] == "NHWC" and info["crop"] == [8, 8]
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406])
    got = next(iter(data))["image"]
    assert got.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(got[0, 0, 0], (200 / 255 - np.array([0.485, 0.456, 0.406]))
                               / np.array([0.229, 0.224, 0.225]), rtol=1e-5)


def test_flags_reach_the_data_and_the_report(tmp_path, gray_folder):
    folder, arrays = gray_folder
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "calibrate", str(DIGITS), "-b", "tensorrt", "--data", str(folder), "-o", str(out),
        "--resize", "0", "--scale", "1", "--mean", "128", "--std", "64", "--color", "gray",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["preprocessing"] == {
        "input": "input", "color": "gray", "resize": 0, "crop": [8, 8], "scale": 1.0,
        "mean": [128.0], "std": [64.0], "layout": "NCHW",
    }
    # resize 0: straight to 8x8; x = (pixel * 1 - 128) / 64
    x = [(np.asarray(Image.fromarray(a, "L").resize((8, 8), Image.BILINEAR), np.float32) - 128)
         / 64 for a in arrays]
    amax = json.loads((out / "dynamic_range.json").read_text())["input"]
    amax = amax if isinstance(amax, (int, float)) else max(abs(v) for v in amax)
    assert amax == pytest.approx(float(np.abs(np.stack(x)).max()), rel=1e-6)


def test_preprocess_file_and_flag_override(tmp_path, gray_folder):
    folder, arrays = gray_folder
    recipe = tmp_path / "pre.yaml"
    recipe.write_text("preprocess:\n  resize: 10\n  mean: 0.5\n  std: 0.25\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "calibrate", str(DIGITS), "-b", "tvm", "--data", str(folder), "-o", str(out),
        "--preprocess", str(recipe), "--std", "0.5", "-q",
    ])
    assert result.exit_code == 0, result.output
    pre = json.loads((out / "report.json").read_text())["calibration"]["preprocessing"]
    assert (pre["resize"], pre["mean"], pre["std"]) == (10, [0.5], [0.5])
    with pytest.raises(DataError, match="unknown key.*colour"):
        Preprocessing.from_mapping({"colour": "rgb"})


@pytest.mark.parametrize("flags, message", [
    (["--color", "rgb"], "gives 3 channel"),
    (["--crop", "16"], "does not fit input input"),
    (["--layout", "NHWC"], "8 channels"),
    (["--mean", "0.1,0.2"], "2 values for 1 channel"),
])
def test_mismatches_with_the_model_are_refused(tmp_path, gray_folder, flags, message):
    folder, _ = gray_folder
    result = CliRunner().invoke(main, ["calibrate", str(DIGITS), "-b", "tvm", "--data",
                                       str(folder), "-o", str(tmp_path / "o"), *flags])
    assert result.exit_code == 6, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_evaluate_takes_the_same_flags(tmp_path, gray_folder):
    folder, _ = gray_folder
    result = CliRunner().invoke(main, ["evaluate", str(DIGITS), str(DIGITS), "--data",
                                       str(folder), "--resize", "0", "--format", "json"])
    assert result.exit_code == 0, result.output
    (output,) = json.loads(result.stdout)["outputs"]
    assert output["max_abs_error"] == 0.0
