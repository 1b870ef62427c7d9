"""Decoders with a KV cache: find the cache, and calibrate on cache states the model made.

A decoder exported with ``past_key_values`` takes the keys and values of the tokens before
(``past_key_values.0.key``, ``past.0.value``, ``past_key_0``, ...) and returns them with the
new tokens appended (``present.0.key``, ...). Random or zero cache inputs calibrate nothing
real, and a user has token sequences, not cache tensors. So when the data holds the token
ids but not the cache inputs, :class:`DecoderSteps` runs the float decoder over each
sequence itself, as generation does: the first half of the sequence in one step with an
empty cache (the prompt), then one token per step, each step's ``present`` outputs fed back
as the next step's ``past`` inputs. Every step's feeds are one calibration sample, so the
cache inputs calibrate on real cache states, of every length the sequences reach.

Data that does hold the cache inputs (recorded by the user) is used as it is; their batch
axis is inferred or declared with ``--input-axis`` like any input's.

The past-length dim of a cache input is the dynamic dim that is neither the batch nor fixed
(named like ``past_sequence_length``, or ``-1``/unnamed): step 0 feeds it empty.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qtool.calibration.loader import InputSpec, Loader, Sample
from qtool.errors import DataError

#: Input names of the token ids, attention mask and positions (optimum / transformers names).
IDS_NAMES = ("input_ids", "decoder_input_ids", "ids", "tokens", "input")
MASK_NAMES = ("attention_mask", "decoder_attention_mask", "mask")
POSITION_NAMES = ("position_ids", "cache_position")
#: optimum's merged decoder: False runs the branch without a cache (the first step).
BRANCH_NAME = "use_cache_branch"
#: Random token sequences (no --data): how many, and how long.
RANDOM_SEQUENCES, RANDOM_LENGTH = 8, 8
#: Rows the float decoder runs at once while recording.
RECORD_BATCH = 16
#: Recorded samples kept in memory so that later passes do not rerun the decoder (bytes).
MEMO_BYTES = 256 << 20

_PAST = re.compile(r"past", re.IGNORECASE)
_LAYER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class CacheTensor:
    """One cache input and the output that returns it extended.

    Attributes:
        past: The input name (``past_key_values.0.key``).
        present: The output name (``present.0.key``).
        layer: The layer number read from the name (-1 if none).
        kind: ``key``, ``value`` or ``kv`` (both stacked in one tensor).
        past_axis: The axis that grows with the tokens (the past length).
    """

    past: str
    present: str
    layer: int
    kind: str
    past_axis: int


@dataclass(frozen=True)
class DecoderCache:
    """A decoder's cache inputs/outputs and the inputs that go with each step."""

    tensors: tuple[CacheTensor, ...]
    ids: str
    mask: str | None = None
    positions: tuple[str, ...] = ()
    branch: str | None = None

    @property
    def past_names(self) -> tuple[str, ...]:
        """The cache inputs' names."""
        return tuple(t.past for t in self.tensors)


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def _graph_io(model) -> tuple[dict[str, list], dict[str, list]]:
    """``(inputs, outputs)``: name -> dims (int, name or None), initializers left out."""
    import onnx_graphsurgeon as gs

    if isinstance(model, gs.Graph):  # read as it is: no export of a large graph

        def dims(tensor):
            shape = tensor.shape or []
            return [d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else None)
                    for d in shape]

        return ({t.name: dims(t) for t in model.inputs if not isinstance(t, gs.Constant)},
                {t.name: dims(t) for t in model.outputs})
    from qtool.io import load_model

    proto = load_model(model)
    initializers = {t.name for t in proto.graph.initializer}
    return ({v.name: _dims(v) for v in proto.graph.input if v.name not in initializers},
            {v.name: _dims(v) for v in proto.graph.output})


def find_cache(model) -> DecoderCache | None:
    """The KV cache of a decoder (path, ModelProto or gs.Graph), or None if it has none.

    A cache input has "past" in its name and an output named the same with "present"
    (``past_key_values.N.X`` -> ``present.N.X``, ``past_N`` -> ``present_N``), or, failing
    that, an output with "present" and the same layer number and key/value kind. A model
    with such inputs but no token ids (one of :data:`IDS_NAMES`: a streaming audio model's
    state) is not a decoder here: its data must hold the states.
    """
    inputs, outputs = _graph_io(model)
    tensors = []
    for name, dims in inputs.items():
        if not _PAST.search(name):
            continue
        present = _present_for(name, outputs)
        if present is None:
            continue
        layer = _LAYER.findall(name)
        tensors.append(CacheTensor(name, present, int(layer[0]) if layer else -1,
                                   _kind(name), past_axis(dims, outputs[present])))
    ids = next((n for n in IDS_NAMES if n in inputs), None)
    if not tensors or ids is None:
        return None
    return DecoderCache(
        tuple(tensors), ids,
        mask=next((n for n in MASK_NAMES if n in inputs), None),
        positions=tuple(n for n in POSITION_NAMES if n in inputs),
        branch=BRANCH_NAME if BRANCH_NAME in inputs else None,
    )


def _present_for(past: str, outputs: Mapping[str, list]) -> str | None:
    for guess in (past.replace("past_key_values", "present"), past.replace("past", "present"),
                  past.replace("past", "present_key_values")):
        if guess != past and guess in outputs:
            return guess
    layer, kind = _LAYER.findall(past), _kind(past)
    matches = [name for name in outputs if "present" in name.lower()
               and _LAYER.findall(name) == layer and _kind(name) == kind]
    return matches[0] if len(matches) == 1 else None


def _kind(name: str) -> str:
    """``key``, ``value`` or ``kv`` (both in one tensor), read from a cache tensor's name."""
    tail = re.sub(r"(past|present)_key_values", "", name.lower())
    if "key" in tail or re.search(r"(^|[._])k($|[._\d])", tail):
        return "key"
    if "value" in tail or re.search(r"(^|[._])v($|[._\d])", tail):
        return "value"
    return "kv"


def past_axis(past: Sequence[int | str | None], present: Sequence[int | str | None]) -> int:
    """The axis of a cache input that holds the past tokens.

    A dynamic dim named with "past" (``past_sequence_length``); else the one dynamic dim
    (after the first, the batch) whose size differs between the input and the output
    (``past`` vs ``past + sequence``, or two unnamed dims); else the last dynamic dim
    after the first; else axis -2 of ``[batch, heads, past, head_dim]``.
    """
    rank = len(past)
    named = [a for a, d in enumerate(past) if isinstance(d, str) and "past" in d.lower()]
    if named:
        return named[0]
    dynamic = [a for a, d in enumerate(past) if a > 0 and not isinstance(d, int)]
    differs = [a for a in dynamic
               if a < len(present) and (past[a] is None or present[a] != past[a])]
    if len(differs) == 1:
        return differs[0]
    if dynamic:
        return dynamic[-1]
    return max(rank - 2, 0)


# ------------------------------------------------------------------------------ data

def decoder_axes(cache: DecoderCache, model) -> dict[str, int]:
    """Batch axis 0 for the token ids, mask and positions, and the cache inputs' batch axis.

    ``torch.onnx.export(dynamo=True)`` names every dim apart (``input_ids [s56, s70]``,
    ``attention_mask [s43, s53]``), so the inferred batch (the name most inputs share at
    axis 0) misses the mask. A decoder's token inputs are ``[batch, tokens]``, and its
    cache inputs have the batch where the ids have theirs (axis 0 unless that name is
    elsewhere: a stacked ``[2, batch, heads, past, dim]`` cache has it at axis 1).
    """
    inputs, _ = _graph_io(model)
    axes = {name: 0 for name in (cache.ids, cache.mask, *cache.positions)
            if name and len(inputs.get(name, ())) == 2}
    batch = inputs[cache.ids][0] if inputs.get(cache.ids) else None
    for tensor in cache.tensors:
        dims = inputs[tensor.past]
        axes[tensor.past] = dims.index(batch) if isinstance(batch, str) and batch in dims else (
            1 if tensor.kind == "kv" and len(dims) == 5 else 0)
    return axes



def wants_recording(cache: DecoderCache, path) -> bool:
    """Whether the data at ``path`` lacks the cache inputs (then qtool records them)."""
    if path is None:
        return True
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return True
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as archive:
        names = set(archive.files)
    if cache.ids not in names:
        return False
    return not any(name in names for name in cache.past_names)


def token_sequences(path, cache: DecoderCache, num_samples: int | None,
                    seed: int, vocab: int | None) -> tuple[list[np.ndarray], bool]:
    """The token sequences to record on, and whether they are real data.

    An ``.npz`` holds ``[N, T]`` token ids under the ids input's name and, optionally,
    an ``[N, T]`` attention mask whose ones mark each sequence's tokens (padding removed).
    No path: :data:`RANDOM_SEQUENCES` random sequences (unfit for calibration).
    """
    if path is None:
        rng = np.random.default_rng(seed)
        count = num_samples or RANDOM_SEQUENCES
        high = max(1, min(vocab or 2, 1000))
        return [rng.integers(0, high, RANDOM_LENGTH) for _ in range(count)], False
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            ids, mask = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as archive:
                ids = archive[cache.ids]
                mask = archive[cache.mask] if cache.mask and cache.mask in archive.files else None
    except Exception as exc:  # numpy raises ValueError/OSError/zipfile errors
        raise DataError(f"{path}: cannot read the token ids ({exc})") from exc
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
        raise DataError(
            f"{path}: {cache.ids} has shape {ids.shape} ({ids.dtype}); a decoder with a KV "
            f"cache calibrates on [N, T] integer token ids",
            "give the token sequences (and their attention_mask for padding); qtool runs "
            "the decoder over them to record the cache inputs",
        )
    if mask is not None and np.shape(mask) != ids.shape:
        raise DataError(f"{path}: {cache.mask} has shape {np.shape(mask)}, the token ids "
                        f"{ids.shape}", "give one mask entry per token")
    sequences = []
    for row in range(ids.shape[0]):
        tokens = ids[row] if mask is None else ids[row][np.asarray(mask[row]) != 0]
        if tokens.size:
            sequences.append(tokens)
    if num_samples is not None:
        sequences = sequences[:num_samples]
    if not sequences:
        raise DataError(f"{path}: no token sequences (every mask is zero)")
    return sequences, True


class DecoderSteps(Loader):
    """Samples recorded by running the float decoder over token sequences (module docstring).

    Sequences of one length run together, :data:`RECORD_BATCH` at a time; the samples come
    step by step (one row per sequence), so that the rows of one step batch together.
    ``num_samples`` counts sequences; ``len()`` counts steps (samples).

    Attributes:
        fit_for_calibration: False for random token sequences.
    """

    def __init__(self, model: bytes, cache: DecoderCache, sequences: Sequence[np.ndarray],
                 specs: Sequence[InputSpec], *, real: bool = True):
        super().__init__(None, False, 0)
        self.model = model
        self.cache = cache
        self.sequences = [np.asarray(s) for s in sequences]
        self.specs = list(specs)
        fed = {cache.ids, cache.mask, cache.branch, *cache.positions, *cache.past_names}
        missing = [s.name for s in self.specs if s.name not in fed]
        if missing:  # an encoder-decoder's encoder_hidden_states: nothing here to record it
            raise DataError(
                f"cannot record the KV cache: no value for input(s) {', '.join(missing)}",
                "give the cache inputs (and these) in the calibration .npz, recorded from the "
                "float model",
            )
        self.fit_for_calibration = real
        self._memo: list[Sample] | None = None
        self._session = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_memo"], state["_session"] = None, None  # a worker records its own
        return state

    def _total(self) -> int:
        return sum(1 + len(s) - prefill_length(len(s)) for s in self.sequences)

    def __iter__(self) -> Iterator[Sample]:
        start, stop = self.window or (0, self._total())
        source = self._memo if self._memo is not None else self._record()
        for index, sample in enumerate(source):
            if index >= stop:
                return
            if index >= start:
                yield sample

    def _record(self) -> Iterator[Sample]:
        kept: list[Sample] | None = [] if self.window is None else None
        size = 0
        for sample in self._steps():
            if kept is not None:
                size += sum(a.nbytes for a in sample.values())
                kept = kept if size <= MEMO_BYTES else None
                if kept is not None:
                    kept.append(sample)
            yield sample
        if kept is not None:
            self._memo = kept

    def _steps(self) -> Iterator[Sample]:
        import onnxruntime as ort

        if self._session is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(self.model, options,
                                                 providers=["CPUExecutionProvider"])
        by_length: dict[int, list[np.ndarray]] = {}
        for tokens in self.sequences:
            by_length.setdefault(len(tokens), []).append(tokens)
        for length in sorted(by_length, reverse=True):
            group = by_length[length]
            for first in range(0, len(group), RECORD_BATCH):
                yield from self._run(np.stack(group[first:first + RECORD_BATCH]))

    def _run(self, tokens: np.ndarray) -> Iterator[Sample]:
        specs = {s.name: s for s in self.specs}
        rows, length = tokens.shape
        cache = self.cache
        past = {t.past: _empty(specs[t.past], t.past_axis, rows) for t in cache.tensors}
        outputs = [t.present for t in cache.tensors]
        prefill = prefill_length(length)
        spans = [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]
        for start, stop in spans:
            feeds = {cache.ids: tokens[:, start:stop].astype(specs[cache.ids].dtype)}
            if cache.mask:
                feeds[cache.mask] = np.ones((rows, stop), specs[cache.mask].dtype)
            for name in cache.positions:
                shape = (rows, stop - start) if len(specs[name].shape) == 2 else (stop - start,)
                feeds[name] = np.broadcast_to(np.arange(start, stop), shape).astype(
                    specs[name].dtype)
            if cache.branch:
                feeds[cache.branch] = np.array([start > 0], specs[cache.branch].dtype)
            feeds.update(past)
            try:
                present = self._session.run(outputs, feeds)
            except Exception as exc:  # onnxruntime raises its own error types
                raise DataError(f"the float decoder fails on the step over tokens "
                                f"{start}..{stop - 1}: {exc}".splitlines()[0],
                                "check the cache inputs' shapes in the model") from exc
            for row in range(rows):
                yield {name: _row(value, specs[name], row) for name, value in feeds.items()}
            past = {t.past: value for t, value in zip(cache.tensors, present, strict=True)}


def prefill_length(length: int) -> int:
    """Tokens of a sequence the first step takes at once (the prompt): half, at least 1."""
    return max(1, length // 2)


def _empty(spec: InputSpec, axis: int, rows: int) -> np.ndarray:
    shape = []
    for index, dim in enumerate(spec.shape):
        if index == spec.batch_axis:
            shape.append(rows)
        elif index == axis:
            shape.append(0)
        elif dim is None:
            raise DataError(
                f"cannot record the KV cache: input {spec.name} has a dynamic dim {index} "
                f"besides the batch and the past length",
                "give the cache inputs in the calibration .npz, recorded from the float model",
            )
        else:
            shape.append(dim)
    return np.zeros(shape, spec.dtype)


def _row(value: np.ndarray, spec: InputSpec, row: int) -> np.ndarray:
    axis = spec.batch_axis
    if axis is None:
        return value
    index = [slice(None)] * value.ndim
    index[axis] = slice(row, row + 1)
    return np.ascontiguousarray(value[tuple(index)])


def recorded_samples(path, graph, cache: DecoderCache, specs: Sequence[InputSpec],
                     num_samples: int | None, seed: int) -> DecoderSteps:
    """A :class:`DecoderSteps` over the token sequences at ``path`` (None: random ones)."""
    import onnx_graphsurgeon as gs

    proto = gs.export_onnx(graph) if isinstance(graph, gs.Graph) else graph
    if not isinstance(proto, onnx.ModelProto):
        from qtool.io import load_model

        proto = load_model(proto)
    if path is None:
        import logging

        logging.getLogger(__name__).warning(
            "calibrating a decoder on random token sequences: the ranges are unfit for real "
            "calibration; give an .npz of token ids")
    sequences, real = token_sequences(path, cache, num_samples, seed, _vocab(proto))
    return DecoderSteps(proto.SerializeToString(), cache, sequences, specs, real=real)


def _vocab(proto: onnx.ModelProto) -> int | None:
    for output in proto.graph.output:
        dims = _dims(output)
        if "logit" in output.name.lower() and dims and isinstance(dims[-1], int):
            return dims[-1]
    return None


# ------------------------------------------------------------------------------ the plan

def cache_notes(plan, graph) -> dict[str, str]:
    """For each cache tensor, whether the plan quantizes it or keeps it float, and why.

    A cache input is quantized when the plan has it; otherwise, the note names the first
    quantized tensor computed from it (the full keys after the Concat with the new token's,
    read by the attention MatMul), or says that it stays float on this backend.
    """
    cache = find_cache(graph)
    if cache is None:
        return {}
    import onnx_graphsurgeon as gs

    if not isinstance(graph, gs.Graph):
        from qtool.io import load_model

        graph = gs.import_onnx(load_model(graph))
    tensors = graph.tensors()
    notes = {}
    for entry in cache.tensors:
        for name, side in ((entry.past, "input"), (entry.present, "output")):
            what = f"KV cache {side} (layer {entry.layer} {entry.kind})"
            planned = plan.tensors.get(name)
            if planned is not None:
                notes[name] = f"{what}: quantized, {_scheme(planned.scheme)}"
                continue
            near = _quantized_near(tensors.get(name), plan.tensors)
            if near is not None:
                notes[name] = (f"{what}: float at the model's {side}; the cache is "
                               f"quantized inside the model as {near} "
                               f"({_scheme(plan.tensors[near].scheme)})")
            else:
                notes[name] = (f"{what}: kept float (backend {plan.backend} places no "
                               f"quantization on it or the tensors computed from it)")
    return notes


def _scheme(scheme) -> str:
    return f"{scheme.bits}-bit {'int' if scheme.signed else 'uint'}"


#: Ops that move or repeat the cache without computing on it (GQA's repeat_kv: Expand).
_MOVING = frozenset({"Concat", "Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze",
                     "Identity", "Cast", "Slice", "Gather", "Tile"})


def _quantized_near(tensor, planned: Mapping, depth: int = 8) -> str | None:
    """A quantized activation computed from ``tensor`` alone, at most ``depth`` nodes on.

    Through the Concat with the new tokens' keys, Transpose, Reshape, GQA's Expand, a Mul
    by a constant (the attention scale).
    """
    import onnx_graphsurgeon as gs

    frontier = _branch_outputs(tensor) if tensor is not None else []
    for _ in range(depth + 1):
        following = []
        for current in frontier:
            entry = planned.get(current.name)
            if entry is not None and entry.role == "activation":
                return current.name
            for node in current.outputs:
                others = [i for i in node.inputs if i is not current]
                if node.op in _MOVING or all(isinstance(i, gs.Constant) for i in others):
                    following.extend(o for o in node.outputs[:1] if o not in following)
        frontier = following
    return None


def _branch_outputs(tensor) -> list:
    """``tensor``, or the tensors the branches return in its place if an If makes it.

    A merged decoder's outputs come from its ``If(use_cache_branch)``.
    """
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "If":
        return [tensor]
    index = producer.outputs.index(tensor)
    return [branch.outputs[index] for key in ("then_branch", "else_branch")
            if (branch := producer.attrs.get(key)) is not None and len(branch.outputs) > index]


def with_cache_notes(plan, graph):
    """``plan`` with :func:`cache_notes` added to its notes (the plan itself otherwise)."""
    notes = cache_notes(plan, graph)
    if not notes:
        return plan
    return dataclasses.replace(plan, notes={**plan.notes, **notes})
