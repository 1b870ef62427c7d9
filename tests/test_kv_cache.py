"""Decoders with a KV cache (issue 25): found, calibrated on the cache states they make, run.

The decoders are ``transformers`` GPT-2 and Llama configs exported with flat
``past_key_values.N.key`` inputs and ``present.N.key`` outputs (tests/kv_decoders.py). The
random-weight ones prove the mechanics on every backend; the accuracy claim is made on a tiny
Llama trained for a few seconds on arithmetic sequences, whose logits are peaked.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
from kv_decoders import (  # noqa: E402  (after the skip: it builds transformers models)
    LAYERS,
    VOCAB,
    Decoder,
    arithmetic_sequences,
    export_decoder,
    merged_decoder,
    tiny_gpt2,
    tiny_llama,
    trained_llama,
)
from qtool.backends import backend_names

from qtool.errors import DataError
from qtool.kv_cache import DecoderSteps, decoder_axes, find_cache, past_axis, prefill_length
from qtool.options import CalibrateOptions
from qtool.samples import load_samples
from qtool.workflow import quantize_model

CACHE_INPUTS = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
CACHE_OUTPUTS = [name.replace("past_key_values", "present") for name in CACHE_INPUTS]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoders")
    paths = {}
    for name, make in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        paths[name] = folder / f"{name}.onnx"
        export_decoder(make(), paths[name])
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("trained") / "llama.onnx"
    export_decoder(trained_llama(), path)
    return path


def _token_file(path, count: int, length: int, seed: int, **extra) -> str:
    np.savez(path, input_ids=arithmetic_sequences(count, length, seed), **extra)
    return str(path)


def _qdq(files) -> onnx.ModelProto:
    return onnx.load_from_string(files["model.qdq.onnx"])


# ------------------------------------------------------------------------------ finding it

@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_cache_is_found_with_its_past_axis(decoders, name):
    cache = find_cache(str(decoders[name]))
    assert cache is not None
    assert [t.past for t in cache.tensors] == CACHE_INPUTS
    assert [t.present for t in cache.tensors] == CACHE_OUTPUTS
    assert [(t.layer, t.kind) for t in cache.tensors] == [
        (0, "key"), (0, "value"), (1, "key"), (1, "value")]
    assert {t.past_axis for t in cache.tensors} == {2}  # [batch, heads, past, head_dim]
    assert (cache.ids, cache.mask, cache.positions) == ("input_ids", "attention_mask", ())


def test_a_model_without_cache_is_not_a_decoder(decoders):
    model = onnx.load(str(decoders["gpt2"]))
    for value in list(model.graph.input):
        if value.name.startswith("past"):
            value.name = value.name.replace("past", "cached")
    assert find_cache(model) is None


@pytest.mark.parametrize("past, present, axis", [
    (["batch_size", 2, "past_sequence_length", 16], ["batch_size", 2, "total", 16], 2),
    (["s0", 2, "s1", 16], ["s0", 2, "s1 + s2", 16], 2),      # dynamo's names
    ([None, 4, None, 8], [None, 4, None, 8], 2),              # -1 / unnamed dims
    (["batch", "past_len", 4, 8], ["batch", "len", 4, 8], 1),  # [batch, past, heads, dim]
    ([1, 4, 7, 8], [1, 4, 8, 8], 2),                         # fixed: [.., past, dim]
])
def test_the_past_axis_is_recognised(past, present, axis):
    assert past_axis(past, present) == axis


def test_cache_names_of_other_exporters_pair_up():
    from onnx import TensorProto, helper

    def value(name, dims):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    # past_key_0 / present_key_0 (older onnxruntime exports), past.0 stacked k and v
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              value("past_key_0", ["b", 2, "past", 8]), value("past_value_0", ["b", 2, "past", 8]),
              value("past.1", [2, "b", 2, "past", 8])]
    outputs = [value("logits", ["b", "s", 10]), value("present_key_0", ["b", 2, "t", 8]),
               value("present_value_0", ["b", 2, "t", 8]), value("present.1", [2, "b", 2, "t", 8])]
    nodes = [helper.make_node("Identity", [i.name], [o.name])
             for i, o in zip(inputs[1:], outputs[1:], strict=True)]
    nodes.append(helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT))
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))
    cache = find_cache(model)
    # the batch where the ids have theirs ("b"): axis 1 of the stacked [2, b, heads, past, dim]
    assert decoder_axes(cache, model) == {"input_ids": 0, "past_key_0": 0, "past_value_0": 0,
                                          "past.1": 1}
    assert [(t.past, t.present, t.layer, t.kind, t.past_axis) for t in cache.tensors] == [
        ("past_key_0", "present_key_0", 0, "key", 2),
        ("past_value_0", "present_value_0", 0, "value", 2),
        ("past.1", "present.1", 1, "kv", 3),
    ]


def test_a_decoder_with_inputs_qtool_cannot_make_is_refused_up_front(tmp_path):
    from onnx import TensorProto, helper

    def value(name, dims, kind=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, kind, dims)

    inputs = [value("input_ids", ["b", "s"], TensorProto.INT64),
              value("encoder_hidden_states", ["b", 5, 8]),
              value("past_key_values.0.key", ["b", 2, "past", 8])]
    outputs = [value("logits", ["b", 5, 8]), value("present.0.key", ["b", 2, "t", 8])]
    nodes = [helper.make_node("Identity", ["encoder_hidden_states"], ["logits"]),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))
    with pytest.raises(DataError, match="no value for input.s. encoder_hidden_states"):
        load_samples(_token_file(tmp_path / "t.npz", 2, 4, 0), model, None, 0)


# ------------------------------------------------------------------------------ recording

def test_recorded_samples_hold_the_float_models_own_cache(decoders, tmp_path):
    """Each step's cache inputs are the float model's keys/values of the tokens before."""
    data = _token_file(tmp_path / "tokens.npz", 5, 7, seed=3)
    samples = load_samples(data, onnx.load(str(decoders["gpt2"])), None, 0)
    assert isinstance(samples, DecoderSteps) and samples.fit_for_calibration
    rows = list(samples)
    prefill = prefill_length(7)
    assert len(rows) == len(samples) == 5 * (1 + 7 - prefill)
    decoder = Decoder(decoders["gpt2"])
    ids = arithmetic_sequences(5, 7, 3)
    for index, sample in enumerate(rows):  # step by step, the 5 sequences in each step
        row, step = index % 5, index // 5
        past = sample[CACHE_INPUTS[0]].shape[2]
        seen = sample["input_ids"].shape[1]
        assert past == (0 if step == 0 else prefill + step - 1)
        assert sample["attention_mask"].shape == (1, past + seen)
        np.testing.assert_array_equal(sample["input_ids"][0], ids[row, past:past + seen])
        if past == 0:
            assert seen == prefill
            continue
        _, present = decoder.run(ids[row:row + 1, :past], None, 0)  # one call, no cache
        for name, expected in zip(CACHE_INPUTS, present, strict=True):
            np.testing.assert_allclose(sample[name], expected, rtol=1e-4, atol=1e-5)


def test_calibration_ranges_are_those_of_recorded_cache_states(decoders, tmp_path):
    """qnn quantizes the cache inputs themselves: their ranges are the float model's keys
    and values over the calibration sequences (all but each one's last token)."""
    count, length = 12, 9
    data = _token_file(tmp_path / "calib.npz", count, length, seed=1)
    evaluation = _token_file(tmp_path / "eval.npz", 4, length, seed=2)
    files, _ = quantize_model(str(decoders["llama"]), "qnn", CalibrateOptions(
        data=data, eval_data=evaluation, bias_correction=False, analysis="none"))
    qdq = _qdq(files)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    quantizers = {n.input[0]: n for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    _, present = Decoder(decoders["llama"]).run(
        arithmetic_sequences(count, length, 1)[:, :length - 1], None, 0)
    for name, keys in zip(CACHE_INPUTS, present, strict=True):
        node = quantizers[name]
        scale, zero = float(values[node.input[1]]), int(values[node.input[2]])
        info = np.iinfo(values[node.input[2]].dtype)
        lo, hi = (info.min - zero) * scale, (info.max - zero) * scale
        assert abs(lo - min(keys.min(), 0)) <= 1.01 * scale, name
        assert abs(hi - max(keys.max(), 0)) <= 1.01 * scale, name


def test_position_ids_are_counted_on_from_the_past_length(tmp_path):
    """Exported with a position_ids input (as optimum exports Llama), the recorded cache is
    the one the export without it records: positions past .. past + new - 1."""
    model = tiny_llama(seed=3)
    plain, positioned = tmp_path / "plain.onnx", tmp_path / "positions.onnx"
    export_decoder(model, plain)
    export_decoder(model, positioned, positions=True)
    assert find_cache(str(positioned)).positions == ("position_ids",)
    data = _token_file(tmp_path / "tokens.npz", 3, 6, seed=5)
    expected = list(load_samples(data, onnx.load(str(plain)), None, 0))
    recorded = list(load_samples(data, onnx.load(str(positioned)), None, 0))
    assert len(recorded) == len(expected)
    for want, got in zip(expected, recorded, strict=True):
        past, seen = got[CACHE_INPUTS[0]].shape[2], got["input_ids"].shape[1]
        np.testing.assert_array_equal(got["position_ids"], [np.arange(past, past + seen)])
        for name in CACHE_INPUTS:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_data_with_the_cache_inputs_is_used_as_given(decoders, tmp_path):
    ids = arithmetic_sequences(6, 4, 0)
    _, present = Decoder(decoders["gpt2"]).run(ids[:, :3], None, 0)
    path = tmp_path / "recorded.npz"
    np.savez(path, input_ids=ids[:, 3:], attention_mask=np.ones((6, 4), np.int64),
             **dict(zip(CACHE_INPUTS, present, strict=True)))
    samples = load_samples(str(path), onnx.load(str(decoders["gpt2"])), None, 0)
    assert not isinstance(samples, DecoderSteps)
    first = next(iter(samples))
    np.testing.assert_array_equal(first[CACHE_INPUTS[1]], present[1][:1])


def test_token_ids_that_are_not_integers_are_refused(decoders, tmp_path):
    path = tmp_path / "floats.npz"
    np.savez(path, input_ids=np.random.default_rng(0).standard_normal((4, 5)))
    with pytest.raises(DataError, match=r"\[N, T\] integer token ids"):
        load_samples(str(path), onnx.load(str(decoders["gpt2"])), None, 0)


# ------------------------------------------------------------------------------ every backend

def _reaches_quantizer(graph: onnx.GraphProto, tensor: str, depth: int = 8) -> bool:
    """Whether a QuantizeLinear reads ``tensor`` or a tensor moved from it (Concat,
    Transpose, Reshape, Expand, a Mul by a constant), read off the QDQ file."""
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    moving = {"Concat", "Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity",
              "Cast", "Slice", "Gather", "Tile"}
    clipped = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Clip"}
    frontier = {tensor}
    for _ in range(depth + 1):
        frontier |= {clipped[t] for t in frontier if t in clipped}  # fbgemm's 7-bit Clip
        following = set()
        for node in graph.node:
            inputs = [i for i in node.input if i in frontier]
            if not inputs:
                continue
            if node.op_type == "QuantizeLinear":
                return True
            others = [i for i in node.input if i not in frontier and i]
            if node.op_type in moving or all(i in constants for i in others):
                following.add(node.output[0])
        frontier = following
    return False


@pytest.mark.parametrize("backend", backend_names())
def test_every_backend_calibrates_the_decoder_and_says_what_its_cache_gets(
        decoders, tmp_path, backend):
    data = _token_file(tmp_path / "calib.npz", 8, 8, seed=1)
    files, report = quantize_model(str(decoders["gpt2"]), backend, CalibrateOptions(
        data=data, bias_correction=False, analysis="none", kernel_check=False))
    notes = report["plan"]["notes"]
    qdq = _qdq(files)
    producer = {o: n for n in qdq.graph.node for o in n.output}

    def dequantized(name):  # a graph output written by a DequantizeLinear (via Identity)
        node = producer.get(name)
        while node is not None and node.op_type == "Identity":
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    for name in CACHE_INPUTS + CACHE_OUTPUTS:
        note = notes[name]
        assert note.startswith("KV cache"), note
        if ": quantized," in note:  # the tensor itself: read by a Q (input) or made by a DQ
            assert _reaches_quantizer(qdq.graph, name, depth=0) or dequantized(name), note
        elif "quantized inside the model as" in note:
            inside = note.split(" as ")[1].split(" (")[0]
            assert _reaches_quantizer(qdq.graph, inside, depth=0), note
        else:
            assert "kept float" in note and not _reaches_quantizer(qdq.graph, name), note
    # the QDQ model generates with its own cache (random weights: mechanics only)
    logits = Decoder_from_bytes(files["model.qdq.onnx"], tmp_path).stepwise_logits(
        arithmetic_sequences(3, 8, 9), 4)
    assert logits.shape == (3, 8, VOCAB) and np.isfinite(logits).all()


def Decoder_from_bytes(model: bytes, folder) -> Decoder:  # noqa: N802  (a constructor)
    path = folder / "model.qdq.onnx"
    path.write_bytes(model)
    return Decoder(path)


def test_a_decoder_calibrates_without_data_on_random_token_sequences(decoders):
    """Before issue 25 random inputs failed inside onnxruntime (a mask of the wrong length)."""
    files, report = quantize_model(str(decoders["llama"]), "onnxruntime", CalibrateOptions(
        bias_correction=False, analysis="none", kernel_check=False))
    assert "model.qdq.onnx" in files and report["plan"]["notes"]


# ------------------------------------------------------------------------------ fidelity

@pytest.mark.parametrize("backend", ["onnxruntime", "qnn"])
def test_the_quantized_decoder_generates_as_the_float_one(trained, tmp_path, backend):
    """Step by step with its own cache, the quantized trained decoder predicts the next
    token as the float one does: the float model's accuracy on the held-out sequences is
    the reference (and must be high, so that agreement is not chance: 1/16)."""
    data = _token_file(tmp_path / "calib.npz", 32, 12, seed=11)
    evaluation = _token_file(tmp_path / "eval.npz", 8, 12, seed=12)
    files, _ = quantize_model(str(trained), backend, CalibrateOptions(
        data=data, eval_data=evaluation, analysis="none", kernel_check=False))
    held_out = arithmetic_sequences(64, 12, seed=13)
    target = held_out[:, 2:]  # certain from the third token on
    float_model = Decoder(trained)
    quantized = Decoder_from_bytes(files["model.qdq.onnx"], tmp_path)
    float_logits = float_model.stepwise_logits(held_out, 4)[:, 1:-1]
    own_cache = quantized.stepwise_logits(held_out, 4)[:, 1:-1]
    float_cache = quantized.stepwise_logits(held_out, 4, cache_from=float_model)[:, 1:-1]
    float_accuracy = (float_logits.argmax(-1) == target).mean()
    quant_accuracy = (own_cache.argmax(-1) == target).mean()
    agreement = (float_logits.argmax(-1) == own_cache.argmax(-1)).mean()
    assert float_accuracy >= 0.9
    assert quant_accuracy >= float_accuracy - 0.02
    assert agreement >= 0.97

    def sqnr(logits):
        return 10 * np.log10(np.sum(float_logits ** 2) / np.sum((logits - float_logits) ** 2))

    # one 8-bit quantizer of a full-range signal: 6.02 * 8 - 1.25 dB; N of them in a chain
    # add N noises (-10 log10 N), and 6 dB leave room for ranges wider than the signal
    qdq = _qdq(files)
    weights = {t.name for t in qdq.graph.initializer}
    activations = sum(n.op_type == "QuantizeLinear" and n.input[0] not in weights
                      for n in qdq.graph.node)
    assert sqnr(own_cache) >= 6.02 * 8 - 1.25 - 10 * np.log10(activations) - 6
    # the quantized cache it writes costs little beside the float cache (no compounding)
    assert sqnr(own_cache) >= sqnr(float_cache) - 3


def test_padded_sequences_record_their_tokens_only(decoders, tmp_path):
    """A mask's zeros are padding: each sequence runs over its own tokens, grouped by
    length, so no step ever feeds a pad token or a zero mask."""
    ids = arithmetic_sequences(3, 7, seed=4)
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    mask[2, 4:] = 0
    path = tmp_path / "padded.npz"
    np.savez(path, input_ids=ids, attention_mask=mask)
    rows = list(load_samples(str(path), onnx.load(str(decoders["llama"])), None, 0))
    assert len(rows) == sum(1 + n - prefill_length(n) for n in (5, 7, 4))
    for sample in rows:
        assert sample["attention_mask"].all()
        past = sample[CACHE_INPUTS[0]].shape[2]
        fed = sample["input_ids"][0]
        assert any(np.array_equal(ids[r, past:past + len(fed)], fed)
                   and past + len(fed) <= mask[r].sum() for r in range(3))


def test_workers_record_and_calibrate_the_same_bytes(decoders, tmp_path):
    data = _token_file(tmp_path / "calib.npz", 8, 8, seed=1)
    one, two = (quantize_model(str(decoders["llama"]), "qnn", CalibrateOptions(
        data=data, bias_correction=False, analysis="none", kernel_check=False,
        workers=workers))[0]["model.qdq.onnx"] for workers in (1, 2))
    assert one == two


@pytest.fixture(scope="module")
def dynamo_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("dynamo") / "llama.onnx"
    export_decoder(tiny_llama(), path, dynamo=True)
    return path


def test_a_dynamo_export_calibrates_and_generates(dynamo_llama, tmp_path):
    """dynamo=True names every dim apart (input_ids [s56, s70], attention_mask [s43, s53]):
    the mask's batch axis is still axis 0, the past axis the one that grows."""
    cache = find_cache(str(dynamo_llama))
    assert [t.past for t in cache.tensors] == CACHE_INPUTS
    assert {t.past_axis for t in cache.tensors} == {2}
    data = _token_file(tmp_path / "calib.npz", 8, 8, seed=1)
    samples = load_samples(data, onnx.load(str(dynamo_llama)), None, 0)
    assert {s.name: s.batch_axis for s in samples.specs}["attention_mask"] == 0
    files, report = quantize_model(str(dynamo_llama), "onnxruntime", CalibrateOptions(
        data=data, bias_correction=False, kernel_check=False))
    assert set(report["plan"]["notes"]) >= set(CACHE_INPUTS + CACHE_OUTPUTS)
    float_logits = Decoder(dynamo_llama).stepwise_logits(arithmetic_sequences(4, 8, 9), 4)
    quant_logits = Decoder_from_bytes(files["model.qdq.onnx"], tmp_path).stepwise_logits(
        arithmetic_sequences(4, 8, 9), 4)
    assert quant_logits.shape == float_logits.shape and np.isfinite(quant_logits).all()


def test_a_merged_decoder_calibrates_both_branches(trained, tmp_path):
    """optimum's merged decoder: the first step runs the branch without a cache
    (use_cache_branch False), the others the branch with it; both are calibrated, and the
    quantized model generates as the float one."""
    merged = tmp_path / "merged.onnx"
    onnx.save(merged_decoder(onnx.load(str(trained))), str(merged))
    assert find_cache(str(merged)).branch == "use_cache_branch"
    data = _token_file(tmp_path / "calib.npz", 16, 10, seed=11)
    rows = list(load_samples(data, onnx.load(str(merged)), None, 0))
    assert [bool(r["use_cache_branch"][0]) for r in rows] == [
        r[CACHE_INPUTS[0]].shape[2] > 0 for r in rows]
    files, report = quantize_model(str(merged), "onnxruntime", CalibrateOptions(
        data=data, bias_correction=False, analysis="none", kernel_check=False))
    branches = onnx.load_from_string(files["model.qdq.onnx"]).graph.node[-1].attribute
    quantizers = {a.name: sum(n.op_type == "QuantizeLinear" for n in a.g.node) for a in branches}
    assert quantizers["then_branch"] > 0 and quantizers["then_branch"] == quantizers["else_branch"]
    notes = report["plan"]["notes"]
    assert all("quantized inside the model as" in notes[n] for n in CACHE_INPUTS + CACHE_OUTPUTS)
    held_out = arithmetic_sequences(32, 12, seed=13)
    float_logits = Decoder(merged).stepwise_logits(held_out, 4)
    quant_logits = Decoder_from_bytes(files["model.qdq.onnx"], tmp_path).stepwise_logits(
        held_out, 4)
    assert (float_logits.argmax(-1) == quant_logits.argmax(-1))[:, 2:].mean() >= 0.97
