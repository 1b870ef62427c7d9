"""Small decoders with a KV cache, exported as users export them, and their float runs.

``export_decoder`` wraps a ``transformers`` causal LM so that its cache is flat tensors
(``past_key_values.N.key`` in, ``present.N.key`` out: optimum's names) and exports it with
``torch.onnx.export`` (``dynamo=False``, the exporter KV-cache decoders are usually exported
with, or ``dynamo=True``). ``trained_llama`` is a tiny Llama-style decoder trained for a few
seconds on arithmetic sequences (``x_i = a + i * d mod V``): its next token is certain after
two tokens, so its logits are peaked and a quantized copy's argmax agreement means something
(random weights give near-uniform logits: they prove mechanics only).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

VOCAB = 16
LAYERS = 2


def _torch():
    import torch

    return torch


def tiny_gpt2(seed: int = 0):
    import transformers

    _torch().manual_seed(seed)
    config = transformers.GPT2Config(n_layer=LAYERS, n_head=2, n_embd=32, vocab_size=VOCAB,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0):
    import transformers

    _torch().manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2, hidden_size=32,
                                      intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=64, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=None)
    return transformers.LlamaForCausalLM(config).eval()


def arithmetic_sequences(count: int, length: int, seed: int) -> np.ndarray:
    """``[count, length]`` token ids ``a + i * d mod VOCAB``, ``d`` in 1..3."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, VOCAB, (count, 1))
    step = rng.integers(1, 4, (count, 1))
    return ((start + np.arange(length) * step) % VOCAB).astype(np.int64)


def trained_llama(steps: int = 80, seed: int = 0):
    """A tiny Llama trained on :func:`arithmetic_sequences` (about 3 s on one CPU thread)."""
    torch = _torch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend on a shared machine
    try:
        model = tiny_llama(seed).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
        for step in range(steps):
            ids = torch.from_numpy(arithmetic_sequences(32, 12, seed=1000 + step))
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


class _FlatCache(_torch().nn.Module):
    """The model with its cache as flat ``(key, value)`` tensors per layer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past):
        return self.step(input_ids, attention_mask, None, past)

    def step(self, input_ids, attention_mask, position_ids, past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


class _FlatCacheWithPositions(_FlatCache):
    """The same with a ``position_ids`` input, as optimum exports Llama."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return self.step(input_ids, attention_mask, position_ids, past)


def cache_shape(model) -> tuple[int, int]:
    """``(kv heads, head dim)`` of a model's cache."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads, config.hidden_size // config.num_attention_heads


def export_decoder(model, path, *, dynamo: bool = False, opset: int = 17,
                   positions: bool = False) -> None:
    """Export with ``past_key_values.N.key/value`` inputs and ``present.N.key/value`` outputs
    (and a ``position_ids`` input with ``positions``, ``dynamo=False`` only)."""
    torch = _torch()
    heads, dim = cache_shape(model)
    ids = torch.randint(0, VOCAB, (1, 3))
    past = [torch.randn(1, heads, 4, dim) for _ in range(2 * LAYERS)]
    mask = torch.ones(1, 7, dtype=torch.int64)
    cache_in = [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    cache_out = [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    inputs = ["input_ids", "attention_mask", *cache_in]
    outputs = ["logits", *cache_out]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on transformers' cache code
        if dynamo:
            from torch.export import Dim

            shapes = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, {0: Dim.DYNAMIC, 1: Dim.DYNAMIC},
                      tuple({0: Dim.DYNAMIC, 2: Dim.DYNAMIC} for _ in cache_in))
            torch.onnx.export(_FlatCache(model), (ids, mask, *past), str(path),
                              input_names=inputs, output_names=outputs,
                              dynamic_shapes=shapes, opset_version=max(opset, 18),
                              dynamo=True, external_data=False, optimize=True)
            return
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
                "logits": {0: "batch_size", 1: "sequence_length"}}
        axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in cache_in})
        axes.update({name: {0: "batch_size", 2: "past_sequence_length + sequence_length"}
                     for name in cache_out})
        wrapper, args = _FlatCache(model), (ids, mask, *past)
        if positions:
            wrapper, args = _FlatCacheWithPositions(model), (ids, mask, torch.arange(4, 7)[None],
                                                             *past)
            inputs.insert(2, "position_ids")
            axes["position_ids"] = {0: "batch_size", 1: "sequence_length"}
        torch.onnx.export(wrapper, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)


def merged_decoder(model: onnx.ModelProto) -> onnx.ModelProto:
    """optimum's merged-decoder layout: ``If(use_cache_branch)`` over a branch with the cache
    and one without, here two renamed copies of the exported body (with an empty cache
    both compute the same; optimum's no-cache branch is a second export)."""
    graph = model.graph

    def branch(prefix: str) -> onnx.GraphProto:
        body = copy.deepcopy(graph)
        renamed: dict[str, str] = {}  # the branch's own tensors get the prefix
        for init in body.initializer:
            renamed[init.name] = init.name = prefix + init.name
        for node in body.node:
            node.name = prefix + node.name
            for index, name in enumerate(node.output):
                renamed[name] = node.output[index] = prefix + name
        for node in body.node:
            for index, name in enumerate(node.input):
                node.input[index] = renamed.get(name) or name
        outputs = [helper.make_tensor_value_info(renamed[o.name], o.type.tensor_type.elem_type,
                                                 None) for o in graph.output]
        return helper.make_graph(list(body.node), prefix + "branch", [], outputs,
                                 list(body.initializer))

    condition = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in graph.output],
                            name="optimum::if", then_branch=branch("with_past/"),
                            else_branch=branch("no_past/"))
    merged = helper.make_model(
        helper.make_graph([node], "merged", [*graph.input, condition], list(graph.output)),
        opset_imports=model.opset_import)
    merged.ir_version = model.ir_version
    onnx.checker.check_model(merged)
    return merged


class Decoder:
    """An exported decoder in onnxruntime, run as generation runs it: with its own cache."""

    def __init__(self, path):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.cache_inputs = [n for n in inputs if n.startswith("past_key_values")]
        self.cache_outputs = [o.name for o in self.session.get_outputs()
                              if o.name.startswith("present")]
        self.branch = "use_cache_branch" in inputs  # a merged decoder
        first = inputs[self.cache_inputs[0]]
        self.heads, self.dim = first.shape[1], first.shape[3]

    def run(self, ids: np.ndarray, past: list[np.ndarray] | None, past_length: int):
        """``(logits, present)`` of one step over ``ids [B, S]`` after ``past_length`` tokens."""
        rows = ids.shape[0]
        if past is None:
            past = [np.zeros((rows, self.heads, 0, self.dim), np.float32)] * len(self.cache_inputs)
        feeds = {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((rows, past_length + ids.shape[1]), np.int64),
                 **dict(zip(self.cache_inputs, past, strict=True))}
        if self.branch:
            feeds["use_cache_branch"] = np.array([past_length > 0])
        logits, *present = self.session.run(["logits", *self.cache_outputs], feeds)
        return logits, present

    def stepwise_logits(self, ids: np.ndarray, prefill: int,
                        cache_from: Decoder | None = None) -> np.ndarray:
        """Logits of every position: ``prefill`` tokens at once, then one per step, each
        step reading the cache this model wrote (or the one ``cache_from`` wrote over the
        same tokens: the float cache, to tell the cache's share of the error)."""
        source = cache_from or self
        logits, past = self.run(ids[:, :prefill], None, 0)
        if cache_from is not None:
            _, past = source.run(ids[:, :prefill], None, 0)
        steps = [logits]
        for t in range(prefill, ids.shape[1]):
            logits, present = self.run(ids[:, t:t + 1], past, t)
            if cache_from is not None:
                _, present = source.run(ids[:, t:t + 1], past, t)
            past = present
            steps.append(logits)
        return np.concatenate(steps, axis=1)
