"""Data loaders: image folders, npz/npy, random inputs, and the input checks."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from qtool.calibration import calibrate, check_inputs, load_data
from qtool.calibration.data import ArrayData, ImageFolder, RandomData, model_inputs

from qtool.errors import DataError
from qtool.scheme import QuantScheme

DIGITS = "examples/digits_cnn.onnx"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def image_model(layout="NCHW", channels=3, size=(8, 8), batch="n") -> onnx.ModelProto:
    h, w = size
    shape = [batch, channels, h, w] if layout == "NCHW" else [batch, h, w, channels]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["y"])], "img", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def pixels(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def png_folder(tmp_path):
    folder = tmp_path / "png"
    (folder / "sub").mkdir(parents=True)
    arrays = {}
    for i in range(5):
        array = pixels(10, 12, i)  # height 10, width 12
        path = folder / ("sub" if i % 2 else "") / f"img{i}.png"
        Image.fromarray(array).save(path)
        arrays[path] = array
    (folder / "notes.txt").write_text("not an image")
    return folder, dict(sorted(arrays.items()))


MEAN, STD = (0.5, 0.25, 0.125), (0.5, 0.25, 2.0)


def expected(array, crop=(1, 2, 8, 8), bgr=False):
    top, left, h, w = crop
    x = array[top : top + h, left : left + w].astype(np.float32) / 255.0
    if bgr:
        x = x[:, :, ::-1]
    return (x - np.float32(MEAN)) / np.float32(STD)  # statistics in the output's channel order


def test_png_folder_center_crop_normalize_nchw(png_folder):
    folder, arrays = png_folder
    loader = ImageFolder(folder, 8, resize=10, mean=MEAN, std=STD, input_name="image")
    samples = list(loader)
    assert len(samples) == len(loader) == 5
    for sample, array in zip(samples, arrays.values(), strict=True):
        assert list(sample) == ["image"]
        got = sample["image"]
        assert got.shape == (1, 3, 8, 8) and got.dtype == np.float32
        np.testing.assert_allclose(got[0].transpose(1, 2, 0), expected(array), rtol=1e-6)


def test_png_folder_bgr_nhwc(png_folder):
    folder, arrays = png_folder
    loader = ImageFolder(folder, 8, resize=10, mean=MEAN, std=STD, bgr=True, layout="NHWC")
    first = next(iter(loader))["input"]
    assert first.shape == (1, 8, 8, 3)
    array = next(iter(arrays.values()))
    # BGR: channel 0 is blue, normalised with the first mean/std (given in output order)
    blue = array[1:9, 2:10, 2].astype(np.float32) / 255.0
    blue = (blue - np.float32(MEAN[0])) / np.float32(STD[0])
    np.testing.assert_allclose(first[0, :, :, 0], blue, rtol=1e-6)
    np.testing.assert_allclose(first[0], expected(array, bgr=True), rtol=1e-6)


def test_resize_shorter_side_then_crop(tmp_path):
    Image.fromarray(pixels(40, 60, 0)).save(tmp_path / "a.png")
    loader = ImageFolder(tmp_path, 16, mean=(0, 0, 0), std=(1, 1, 1))  # resize 18 -> 18x27
    image = Image.open(tmp_path / "a.png").convert("RGB").resize((27, 18), Image.BILINEAR)
    reference = np.asarray(image, dtype=np.float32)[1:17, 5:21] / 255.0
    np.testing.assert_allclose(next(iter(loader))["input"][0].transpose(1, 2, 0), reference)


def test_jpg_and_grayscale(tmp_path):
    for i, value in enumerate((40, 200)):
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(tmp_path / f"{i}.jpg")
    loader = ImageFolder(tmp_path, 8, channels=1, mean=(0.0,), std=(1.0,))
    values = [s["input"] for s in loader]
    assert values[0].shape == (1, 1, 8, 8)
    np.testing.assert_allclose(values[0], 40 / 255, atol=2 / 255)  # jpeg of a flat colour
    np.testing.assert_allclose(values[1], 200 / 255, atol=2 / 255)


def test_num_samples_and_seeded_shuffle(png_folder):
    folder, _ = png_folder
    plain = [s["input"] for s in ImageFolder(folder, 8, num_samples=3)]
    assert len(plain) == 3
    a = [s["input"] for s in ImageFolder(folder, 8, shuffle=True, seed=1)]
    b = [s["input"] for s in ImageFolder(folder, 8, shuffle=True, seed=1)]
    c = [s["input"] for s in ImageFolder(folder, 8, shuffle=True, seed=2)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    ordered = [s["input"] for s in ImageFolder(folder, 8)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, ordered, strict=True)) or \
        not all(np.array_equal(x, y) for x, y in zip(c, ordered, strict=True))
    assert sorted(x.sum() for x in a) == pytest.approx(sorted(x.sum() for x in ordered))


def test_empty_and_corrupted_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty", 8)
    with pytest.raises(DataError, match="no such folder"):
        ImageFolder(tmp_path / "missing", 8)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(pixels(8, 8, 0)).save(bad / "a.png")
    (bad / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    loader = ImageFolder(bad, 8)
    with pytest.raises(DataError, match=r"b\.jpg: cannot decode"):
        list(loader)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    Image.fromarray(pixels(64, 64, 1)).save(truncated / "c.png")
    data = (truncated / "c.png").read_bytes()
    (truncated / "c.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"c\.png"):
        list(ImageFolder(truncated, 8))


def test_npz_keyed_by_input_name_labels_ignored(tmp_path):
    x = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    y = -x
    np.savez(tmp_path / "d.npz", x=x, y=y, labels=np.arange(5))
    loader = ArrayData(tmp_path / "d.npz")
    samples = list(loader)
    assert len(samples) == 5 and set(samples[0]) == {"x", "y"}
    np.testing.assert_array_equal(samples[3]["x"], x[3:4])
    np.testing.assert_array_equal(samples[3]["y"], y[3:4])
    shuffled = list(ArrayData(tmp_path / "d.npz", shuffle=True, seed=3, num_samples=4))
    order = np.random.default_rng(3).permutation(5)[:4]
    assert [int(s["x"][0, 0]) // 4 for s in shuffled] == order.tolist()


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "uneven.npz", x=np.zeros((3, 2)), y=np.zeros((4, 2)))
    with pytest.raises(DataError, match="disagree"):
        ArrayData(tmp_path / "uneven.npz")
    np.savez(tmp_path / "labels_only.npz", labels=np.zeros(3))
    with pytest.raises(DataError, match="no input arrays"):
        ArrayData(tmp_path / "labels_only.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read"):
        ArrayData(tmp_path / "junk.npz")


def test_npy_single_input(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    loader = load_data(tmp_path / "x.npy", DIGITS)
    samples = list(loader)
    assert len(samples) == 6 and list(samples[0]) == ["input"]
    np.testing.assert_array_equal(np.concatenate([s["input"] for s in samples]), x)
    two = two_input_model()
    with pytest.raises(DataError, match="cannot feed a model with 2 inputs"):
        load_data(tmp_path / "x.npy", two)


def two_input_model():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, ["n", 4])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["a", "bf"], ["c"])]
    graph = helper.make_graph(nodes, "two", [a, b], [c])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_random_inputs_are_marked_and_warned(caplog):
    model = image_model(size=(None, None))  # symbolic height and width
    with caplog.at_level(logging.WARNING):
        loader = load_data(None, model, num_samples=3, dynamic_size=5)
    assert "unfit for real calibration" in caplog.text
    assert loader.fit_for_calibration is False
    samples = list(loader)
    assert len(samples) == 3 and samples[0]["image"].shape == (1, 3, 5, 5)
    assert samples[0]["image"].dtype == np.float32
    again = list(RandomData(model, num_samples=3, dynamic_size=5))
    assert np.array_equal(samples[2]["image"], again[2]["image"])  # seeded
    ints = list(RandomData(two_input_model(), num_samples=1))[0]
    assert ints["b"].dtype == np.int64 and ints["a"].shape == (1, 4)


def test_check_inputs_mismatches():
    model = image_model()
    good = {"image": np.zeros((1, 3, 8, 8), np.float32)}
    check_inputs(model, good)
    check_inputs(model, {"image": np.zeros((5, 3, 8, 8), np.float32)})  # rows are free
    cases = [
        ({"img": good["image"]}, "missing input.*image.*unknown name.*img"),
        ({**good, "extra": good["image"]}, "unknown name.*extra"),
        ({"image": np.zeros((3, 8, 8), np.float32)}, "rank 3.*expects rank 4"),
        ({"image": np.zeros((1, 3, 8, 8), np.float64)}, "float64.*expects float32"),
        ({"image": np.zeros((1, 3, 8, 9), np.float32)}, r"axis 3: 9 != 8"),
        ({"image": np.zeros((1, 1, 8, 8), np.float32)}, r"axis 1: 1 != 3"),
        ([good["image"]], "not a dict"),
    ]
    for sample, message in cases:
        with pytest.raises(DataError, match=message):
            check_inputs(model, sample)


def test_load_data_picks_the_loader(tmp_path, png_folder):
    folder, _ = png_folder
    loader = load_data(folder, image_model(size=(8, 8)))
    assert isinstance(loader, ImageFolder) and loader.input_name == "image"
    assert next(iter(loader))["image"].shape == (1, 3, 8, 8)
    nhwc = load_data(folder, image_model(layout="NHWC", size=(6, 7)))
    assert next(iter(nhwc))["image"].shape == (1, 6, 7, 3)
    assert isinstance(load_data("examples/digits_calib.npz", DIGITS), ArrayData)
    with pytest.raises(DataError, match="unknown data option.*colour"):
        load_data(folder, image_model(), colour="rgb")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DataError, match="unknown data format"):
        load_data(tmp_path / "data.csv", DIGITS)
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "nothing.npz", DIGITS)


def test_load_data_checks_the_first_sample(tmp_path, png_folder):
    folder, _ = png_folder
    np.savez(tmp_path / "wrong.npz", image=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match="missing input.*input"):
        load_data(tmp_path / "wrong.npz", DIGITS)
    np.savez(tmp_path / "small.npz", input=np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(DataError, match="axis 2: 4 != 8"):
        load_data(tmp_path / "small.npz", DIGITS)


def test_image_folder_calibrates_the_digits_model(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        digit = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        Image.fromarray(digit, "L").save(tmp_path / f"{i}.png")
    data = load_data(tmp_path, DIGITS, mean=(0.5,), std=(0.5,), resize=0)
    assert data.channels == 1 and data.size == (8, 8)
    ranges = calibrate(DIGITS, {"input": QuantScheme(), "logits": QuantScheme()}, data)
    stacked = np.concatenate([s["input"] for s in data])
    assert ranges["input"] == (float(stacked.min()), float(stacked.max()))
    assert np.isfinite(ranges["logits"]).all()


def test_model_inputs_skips_initializers():
    model = onnx.load(DIGITS)
    specs = model_inputs(model)
    assert [s.name for s in specs] == ["input"]
    assert specs[0].shape == (None, 1, 8, 8) and specs[0].dtype == np.float32


def test_public_names_through_qtool(png_folder, tmp_path):
    import qtool

    folder, _ = png_folder
    loader = qtool.data.image_folder(folder, size=8)
    assert isinstance(loader, ImageFolder) and len(loader) == 5
    np.savez(tmp_path / "a.npz", input=np.zeros((3, 1, 8, 8), np.float32))
    assert len(list(qtool.data.array_file(tmp_path / "a.npz"))) == 3
    assert qtool.data.random_inputs(DIGITS, num_samples=2).fit_for_calibration is False
    assert qtool.calibrate is calibrate


# -- inputs users have: lossless casts, scaling hints, models without a batch axis ---------


def token_model(dtype=TensorProto.INT64) -> onnx.ModelProto:
    """Token ids [batch, seq] -> an embedding Gather of a float table."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [50, 4],
                               np.arange(200, dtype=np.float32).tolist())
    ids = helper.make_tensor_value_info("ids", dtype, ["batch", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "tok",
                              [ids], [y], initializer=[table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_int32_token_ids_feed_an_int64_input(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50, (5, 6)).astype(np.int32)
    np.savez(tmp_path / "ids.npz", ids=ids)
    samples = list(load_data(tmp_path / "ids.npz", token_model()))
    assert [s["ids"].dtype for s in samples] == [np.int64] * 5
    np.testing.assert_array_equal(np.concatenate([s["ids"] for s in samples]), ids)
    # the other way only when every id fits: int64 ids beyond int32 are refused
    np.savez(tmp_path / "big.npz", ids=np.full((2, 6), 2**40, np.int64))
    with pytest.raises(DataError, match="int64, the model expects int32"):
        load_data(tmp_path / "big.npz", token_model(TensorProto.INT32))
    np.savez(tmp_path / "small.npz", ids=ids.astype(np.int64))
    assert next(iter(load_data(tmp_path / "small.npz", token_model(TensorProto.INT32))))[
        "ids"].dtype == np.int32
    # ids saved as floats are whole numbers: cast; 1.5 is not an id
    np.savez(tmp_path / "float_ids.npz", ids=ids.astype(np.float64))
    assert next(iter(load_data(tmp_path / "float_ids.npz", token_model())))["ids"].dtype == np.int64
    np.savez(tmp_path / "half.npz", ids=np.full((2, 6), 1.5))
    with pytest.raises(DataError, match="float64, the model expects int64"):
        load_data(tmp_path / "half.npz", token_model())
    # a 0/1 padding mask for a bool input, and back
    np.savez(tmp_path / "mask.npz", ids=np.tril(np.ones((6, 6), np.int64)))
    mask = next(iter(load_data(tmp_path / "mask.npz", token_model(TensorProto.BOOL))))["ids"]
    assert mask.dtype == np.bool_ and mask.sum() == 1
    np.savez(tmp_path / "bool.npz", ids=np.ones((2, 6), np.bool_))
    assert next(iter(load_data(tmp_path / "bool.npz", token_model())))["ids"].dtype == np.int64
    np.savez(tmp_path / "twos.npz", ids=np.full((2, 6), 2, np.int64))
    with pytest.raises(DataError, match="int64, the model expects bool"):
        load_data(tmp_path / "twos.npz", token_model(TensorProto.BOOL))


def test_float64_data_is_cast_with_a_note_when_values_change(tmp_path, caplog):
    exact = np.arange(2 * 3 * 8 * 8, dtype=np.float64).reshape(2, 3, 8, 8) / 4  # binary fractions
    np.savez(tmp_path / "exact.npz", image=exact)
    with caplog.at_level(logging.WARNING, logger="qtool"):
        samples = list(load_data(tmp_path / "exact.npz", image_model()))
    assert samples[0]["image"].dtype == np.float32 and not caplog.records
    np.testing.assert_array_equal(samples[1]["image"][0], exact[1].astype(np.float32))
    rounded = exact + 0.1  # 0.1 has no float32 twin
    np.savez(tmp_path / "rounded.npz", image=rounded)
    with caplog.at_level(logging.WARNING, logger="qtool"):
        samples = list(load_data(tmp_path / "rounded.npz", image_model()))
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1  # once per file and input, not per sample
    assert "float64 data cast to float32" in notes[0] and "relative" in notes[0]
    np.testing.assert_array_equal(samples[0]["image"][0], rounded[0].astype(np.float32))


def test_uint8_images_are_refused_with_how_to_scale(tmp_path):
    np.savez(tmp_path / "pixels.npz", image=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="uint8, the model expects float32") as error:
        load_data(tmp_path / "pixels.npz", image_model())
    assert "/ 255" in error.value.hint and "(x - mean) / std" in error.value.hint
    assert "image folder" in error.value.hint


def features_model(frames: int | str = "T", bins: int = 8) -> onnx.ModelProto:
    """An audio model without a batch axis: features [T, F] -> Conv1d(k=5) -> [T - 4, 4]."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, bins, 5],
                                np.random.default_rng(0).normal(size=4 * bins * 5).tolist())
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    feats = helper.make_tensor_value_info("feats", TensorProto.FLOAT, [frames, bins])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["frames", 4])
    nodes = [
        helper.make_node("Transpose", ["feats"], ["ft"], perm=[1, 0]),
        helper.make_node("Unsqueeze", ["ft", "axes"], ["x"]),
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Squeeze", ["c", "axes"], ["s"]),
        helper.make_node("Transpose", ["s"], ["y"], perm=[1, 0]),
    ]
    graph = helper.make_graph(nodes, "audio", [feats], [y], initializer=[weight, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("frames", ["T", 20])
def test_a_model_without_a_batch_axis_is_named_in_the_messages(tmp_path, frames):
    model = tmp_path / "audio.onnx"
    onnx.save(features_model(frames), model)
    clips = np.random.default_rng(1).normal(size=(3, 20, 8)).astype(np.float32)
    np.savez(tmp_path / "stacked.npz", feats=clips)  # one rank above the input
    with pytest.raises(DataError, match="rank 3") as error:
        load_data(tmp_path / "stacked.npz", model)
    assert "--input-axis feats=none" in error.value.hint
    # half a clip: its frames taken as rows, 1-frame runs for a 5-tap Conv (onnxruntime
    # fails), or fewer rows than a fixed [20, 8] "batch" (nothing runs)
    np.savez(tmp_path / "raw.npz", feats=clips[0, :10])
    raw = load_data(tmp_path / "raw.npz", model)
    scheme = {"y": QuantScheme()}
    with pytest.raises(DataError) as error:
        calibrate(model, scheme, raw, batch_size=4)
    assert "--input-axis feats=none" in error.value.hint
    # declared: each entry along axis 0 of the stacked file is one clip
    loader = load_data(tmp_path / "stacked.npz", model, axes={"feats": None})
    assert len(loader) == 3
    assert [s["feats"].shape for s in loader] == [(20, 8)] * 3
    ranges = calibrate(model, scheme, loader)
    session = __import__("onnxruntime").InferenceSession(model.read_bytes())
    outputs = np.stack([session.run(None, {"feats": clip})[0] for clip in clips])
    assert ranges["y"] == pytest.approx((outputs.min(), outputs.max()), rel=1e-6)


def test_summary_counts_clips_not_frames(tmp_path):
    from qtool.workflow import CalibrateOptions, quantize_model

    model = tmp_path / "audio.onnx"
    onnx.save(features_model(), model)
    clips = np.random.default_rng(2).normal(size=(4, 30, 8)).astype(np.float32)
    np.savez(tmp_path / "clips.npz", feats=clips)
    _, report = quantize_model(model, "onnxruntime", CalibrateOptions(
        data=tmp_path / "clips.npz", eval_data=tmp_path / "clips.npz",
        input_axes=(("feats", None),), bias_correction=False))
    assert report["calibration"]["samples"] == 4
    assert report["evaluation"]["samples"] == 4  # 4 clips, not their 120 frames
