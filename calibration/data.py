"""Calibration data: plain iterables of samples, each a ``dict[input_name, ndarray]``.

A sample holds one example per input with the input's full rank, the batch axis first and
of size 1 (a loader may also yield several rows at once; the collector batches rows). The
loaders stream: nothing reads the whole data set up front except ``.npz`` archives, whose
members numpy reads whole.

* :class:`ImageFolder` (in :mod:`qtool.calibration.images`) - jpg/png/bmp files
  (recursively, sorted): resize the shorter side, centre crop, scale, ``(x - mean) / std``,
  RGB, BGR or gray, NCHW or NHWC.
* :class:`ArrayData` - ``.npz`` arrays keyed by input name (the key ``labels`` is kept for
  evaluation and ignored here) or one ``.npy`` for a single-input model; rows are samples.
  Arrays are cast to the input's dtype where nothing a model reads is lost (:func:`conform`:
  int32 token ids for an int64 input; float64 to float32, noted when values round).
* :class:`RandomData` - standard-normal inputs shaped from the model; ``fit_for_calibration``
  is False and a warning is logged: ranges from it say nothing about real data.

:func:`check_inputs` compares a sample with the model's inputs (names, rank, dtype, fixed
dims) and :func:`load_data` picks the loader for a path.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from qtool.calibration.loader import InputSpec, Loader, Sample  # noqa: F401  (read from here too)

from qtool.errors import DataError

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
IMAGE_NAMES = ("ImageFolder", "IMAGE_SUFFIXES", "IMAGENET_MEAN", "IMAGENET_STD")

#: The name of a dynamic dim written without a name (or as -1 or 0): one name for all.
DYNAMIC_DIM = "dynamic"


def model_inputs(model, axes: Mapping[str, int | None] | None = None) -> list[InputSpec]:
    """The real inputs of a model (initializers listed as inputs are left out).

    A dim written as a value <= 0 (``-1``, as some exporters write a dynamic dim) is dynamic.
    Each input's batch axis is inferred (:func:`infer_batch_axes`) unless ``axes`` gives it.

    Args:
        model: A path, ModelProto or onnx-graphsurgeon Graph.
        axes: Input name -> batch axis (None: no batch axis) overriding the inferred ones.

    Raises:
        DataError: ``axes`` names an input the model does not have, or an axis out of range.
    """
    from qtool.io import load_model

    proto = load_model(model)
    initializers = {t.name for t in proto.graph.initializer}
    dims: dict[str, list[int | str | None]] = {}
    dtypes: dict[str, np.dtype] = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtypes[value.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims[value.name] = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0
            else (d.dim_param or None)
            for d in tensor_type.shape.dim
        ]
    batch_axes = infer_batch_axes(dims)
    for name, axis in (axes or {}).items():
        if name not in dims:
            raise DataError(f"batch axis given for {name!r}, which is not a model input",
                            f"the model's inputs are: {', '.join(dims)}")
        if axis is not None and not 0 <= axis < len(dims[name]):
            raise DataError(f"batch axis {axis} of input {name!r} is out of range: it has "
                            f"rank {len(dims[name])}", "give an axis from 0, or 'none'")
        batch_axes[name] = axis
    return [
        InputSpec(name, dtypes[name],
                  tuple(d if isinstance(d, int) else None for d in shape), batch_axes[name])
        for name, shape in dims.items()
    ]


def infer_batch_axes(dims: Mapping[str, Sequence[int | str | None]]) -> dict[str, int | None]:
    """The batch axis of each input, from its dims (ints, symbolic names or None).

    * A scalar (rank 0) has no batch axis.
    * The batch is, in this order: the symbolic name most inputs have at axis 0 (an
      unnamed dynamic dim, or one written as -1 or 0, counts as the name ``dynamic``); a
      symbolic name with "batch" in it; axis 0 when every input has the same fixed size
      there (``torch.onnx.export``'s default batch 1); the symbolic name most inputs
      share; the fixed size every input has somewhere (1 preferred).
    * Each input's batch axis is where it has that name or size; an input without it is
      not a batch (``state [2, batch, 128]`` has axis 1, ``sr []`` none).
    """
    named = {
        name: [DYNAMIC_DIM if d is None else d for d in shape]
        for name, shape in dims.items()
    }
    symbolic = Counter(s for shape in named.values() for s in {d for d in shape
                                                               if isinstance(d, str)})
    at_zero = Counter(shape[0] for shape in named.values() if shape and isinstance(shape[0], str))
    ranked = [shape for shape in named.values() if shape]
    firsts = {shape[0] for shape in ranked}
    batch_named = sorted(s for s in symbolic if "batch" in s.lower())
    batch: int | str | None = None
    if at_zero:
        batch = _most_common(at_zero)
    elif batch_named:
        batch = _most_common(Counter({s: symbolic[s] for s in batch_named}))
    elif len(firsts) == 1:
        batch = firsts.pop()
    elif symbolic:
        batch = _most_common(symbolic)
    elif ranked:
        common = set.intersection(*({d for d in shape if isinstance(d, int)}
                                    for shape in ranked))
        batch = 1 if 1 in common else min(common, default=None)
    axes: dict[str, int | None] = {}
    for name, shape in named.items():
        if not shape:
            axes[name] = None
        elif batch is not None and batch in shape:
            axes[name] = shape.index(batch)
        else:
            axes[name] = None if isinstance(batch, str) else 0
    return axes


def _most_common(counts: Counter):
    best = max(counts.values())
    return min((k for k, v in counts.items() if v == best), key=str)


def check_inputs(model, sample: Mapping[str, np.ndarray]) -> None:
    """Check one sample against the model's inputs before any work starts.

    The batch axis is not compared with a fixed batch dim: the collector batches.

    Raises:
        DataError: A missing or unknown input name, or a rank, dtype or fixed-dim mismatch.
    """
    specs = {s.name: s for s in (model if _is_specs(model) else model_inputs(model))}
    if not isinstance(sample, Mapping):
        raise DataError(
            f"a calibration sample is a {type(sample).__name__}, not a dict of input arrays",
            f"yield dicts keyed by the model's inputs: {', '.join(specs)}",
        )
    missing = sorted(set(specs) - set(sample))
    unknown = sorted(set(sample) - set(specs))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown name(s) {', '.join(unknown)}")
        raise DataError(
            f"calibration data does not match the model: {'; '.join(parts)}",
            f"the model's inputs are: {', '.join(specs)}",
        )
    for name, spec in specs.items():
        array = np.asarray(sample[name])
        if array.ndim != len(spec.shape):
            raise DataError(
                f"input {name}: data has rank {array.ndim} {array.shape}, the model expects "
                f"rank {len(spec.shape)} {_show(spec.shape)}",
                _rank_hint(spec, array.ndim),
            )
        if array.dtype != spec.dtype:
            raise DataError(
                f"input {name}: data is {array.dtype}, the model expects {spec.dtype}",
                cast_hint(array.dtype, spec.dtype),
            )
        for axis, (have, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if axis != spec.batch_axis and want is not None and have != want:
                raise DataError(
                    f"input {name}: data shape {array.shape} does not fit the model's "
                    f"{_show(spec.shape)} (axis {axis}: {have} != {want})",
                    "resize or crop the data to the model's input size",
                )


def _rank_hint(spec: InputSpec, rank: int | None = None) -> str:
    if spec.batch_axis is None:
        return "this input is not a batch of samples: give it with the model's exact rank"
    if rank == len(spec.shape) + 1:
        # data one rank above the input: samples stacked on a new axis 0 of a model that takes
        # one sample at a time ([T, F] audio features)
        return (f"the model's input {spec.name} {_show(spec.shape)} may have no batch axis "
                f"(one sample per run, such as [T, F] features): say so with --input-axis "
                f"{spec.name}=none, and axis 0 of the data counts the samples")
    return (f"samples keep the batch axis (axis {spec.batch_axis} of {spec.name}, size 1 for "
            f"one example); if {spec.name} has no batch axis, give --input-axis "
            f"{spec.name}=none")


def no_batch_axis_hint(specs: Sequence[InputSpec]) -> str:
    """The ``--input-axis NAME=none`` advice for inputs whose axis 0 was taken as the batch.

    A model without a batch axis (``[T, F]`` features) fails inside onnxruntime when qtool
    feeds it rows of its axis 0, or leaves nothing to run when that axis is fixed: the
    message of such a failure ends with this. Empty when every input's axis was declared
    or none is on axis 0.
    """
    names = [s.name for s in specs if s.batch_axis == 0 and len(s.shape) >= 2]
    if not names:
        return ""
    flags = " ".join(f"--input-axis {n}=none" for n in names)
    return (f"; if axis 0 of {', '.join(names)} is not a batch of samples (a [T, F] input "
            f"that takes one sample per run), say so: {flags}")


def cast_hint(have: np.dtype, want: np.dtype) -> str:
    """How to convert data of dtype ``have`` for an input of dtype ``want``."""
    have, want = np.dtype(have), np.dtype(want)
    if np.issubdtype(want, np.floating) and have == np.uint8:
        return (f"uint8 data is usually an image in 0..255: scale it as the model was trained "
                f"(e.g. x.astype(np.{want}) / 255, then the model's normalization "
                f"(x - mean) / std), or give the image folder, which qtool preprocesses")
    if np.issubdtype(want, np.floating) and np.issubdtype(have, np.integer):
        return (f"{have} data must be scaled to the model's float range (e.g. 16-bit PCM "
                f"audio: x.astype(np.{want}) / 32768), as the model was trained")
    return f"convert the data with .astype(np.{want})"


def conform(array: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, str | None]:
    """``array`` in the input's dtype where the cast loses nothing a model would read.

    * integers to another integer type (int32 token ids for an int64 input) whose range
      holds every value;
    * floats to another float type (float64 to float32): the cast rounds, so the note says
      by how much when values change;
    * integral floats (ids saved as floats) to an integer type that holds them;
    * 0/1 numbers to bool, and bool to integers (padding masks).

    Anything else (uint8 pixels for a float input: they need scaling) is returned as is, for
    :func:`check_inputs` to refuse with :func:`cast_hint`.

    Returns:
        ``(array, note)``: the note says what changed (None when nothing did).
    """
    want = spec.dtype
    if array.dtype == want:
        return array, None
    if want == np.bool_:  # a 0/1 mask for a bool input
        if np.issubdtype(array.dtype, np.number) and np.isin(array, (0, 1)).all():
            return array.astype(np.bool_), None
        return array, None
    if array.dtype == np.bool_:
        return (array.astype(want), None) if np.issubdtype(want, np.integer) else (array, None)
    if np.issubdtype(want, np.integer):
        if np.issubdtype(array.dtype, np.integer) or (
                np.issubdtype(array.dtype, np.floating) and array.size
                and np.isfinite(array).all() and (np.round(array) == array).all()):
            info = np.iinfo(want)
            if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
                return array.astype(want), None
        return array, None
    if np.issubdtype(want, np.floating) and np.issubdtype(array.dtype, np.floating):
        cast = array.astype(want)
        if array.size == 0 or np.array_equal(cast.astype(array.dtype), array, equal_nan=True):
            return cast, None
        with np.errstate(all="ignore"):
            change = np.abs(cast.astype(np.float64) - array) / np.maximum(np.abs(array), 1e-30)
        return cast, (f"input {spec.name}: {array.dtype} data cast to {want} for the model "
                      f"(values change by up to {float(np.nanmax(change)):.1e} relative)")
    return array, None


def _is_specs(model) -> bool:
    return isinstance(model, (list, tuple)) and all(isinstance(s, InputSpec) for s in model)


def _show(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


class ArrayData(Loader):
    """Samples from ``.npz`` arrays keyed by input name, or from one ``.npy`` array.

    Each array holds the samples along its input's batch axis (axis 0 unless ``specs`` say
    otherwise: ``state [2, N, 128]`` holds N samples along axis 1); all arrays must agree on
    how many. An input without a batch axis (a scalar such as a sample rate) is stored with
    the model's rank and goes with every sample, or with one more leading axis holding one
    value per sample. An ``.npy`` file is memory-mapped, so only the rows in use are read.

    Args:
        path: The ``.npz`` or ``.npy`` file.
        input_name: The input a ``.npy`` array feeds (required for ``.npy``).
        num_samples: Use at most this many rows.
        shuffle: Shuffle the rows (seeded).
        seed: Shuffle seed.
        specs: The model's inputs (:func:`model_inputs`), for their batch axes and ranks.

    Raises:
        DataError: Missing or unreadable file, no arrays, or arrays of different lengths.
    """

    def __init__(self, path, *, input_name: str | None = None, num_samples: int | None = None,
                 shuffle: bool = False, seed: int = 0,
                 specs: Sequence[InputSpec] | None = None):
        super().__init__(num_samples, shuffle, seed)
        self.path = Path(path)
        self._options = {"input_name": input_name, "num_samples": num_samples,
                         "shuffle": shuffle, "seed": seed, "specs": specs}
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file", "give an .npz or .npy file")
        try:
            if self.path.suffix.lower() == ".npy":
                if input_name is None:
                    raise DataError(f"{self.path}: an .npy file needs the input name it feeds")
                self.arrays = {input_name: np.load(self.path, mmap_mode="r")}
            else:
                with np.load(self.path, allow_pickle=False) as archive:
                    self.arrays = {k: archive[k] for k in archive.files if k != LABELS_KEY}
        except DataError:
            raise
        except Exception as exc:  # numpy raises ValueError/OSError/zipfile errors
            raise DataError(f"{self.path}: cannot read the arrays ({exc})") from exc
        if not self.arrays:
            raise DataError(f"{self.path}: no input arrays in the file")
        known = {s.name: s for s in specs or ()}
        # name -> axis holding the samples; None: the same value for every sample
        self.axes: dict[str, int | None] = {}
        for name, array in self.arrays.items():
            spec = known.get(name)
            if spec is None:
                self.axes[name] = 0
            elif spec.batch_axis is not None:
                self.axes[name] = spec.batch_axis
            else:
                self.axes[name] = 0 if array.ndim == len(spec.shape) + 1 else None
        lengths = {k: v.shape[self.axes[k]] if self.axes[k] is not None and
                   v.ndim > self.axes[k] else 0
                   for k, v in self.arrays.items() if self.axes[k] is not None or not known}
        if not lengths:
            lengths = {"(every input)": 1}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise DataError(
                f"{self.path}: arrays disagree on the number of samples or are empty "
                f"({', '.join(f'{k}: {n}' for k, n in lengths.items())})",
                "each array holds the samples along its input's batch axis (axis 0 unless "
                "declared, e.g. --input-axis state=1)",
            )
        self.rows = next(iter(lengths.values()))
        self.specs = list(specs) if specs else None
        self._shared = {k: v for k, v in self.arrays.items() if self.axes[k] is None}
        self._per_sample = {k: v for k, v in self.arrays.items() if k in known
                            and known[k].batch_axis is None and self.axes[k] == 0}
        self._known = known

    def _total(self) -> int:
        return self.rows

    def __reduce__(self):
        # A worker (another process, a Ray node) reopens the file: arrays never travel.
        return _reopen_arrays, (str(self.path), self._options, self.window)

    def __iter__(self) -> Iterator[Sample]:
        for index in self._order(self.rows):
            sample = {}
            for name, array in self.arrays.items():
                axis = self.axes[name]
                if name in self._shared:
                    sample[name] = np.asarray(array)
                elif name in self._per_sample:
                    sample[name] = np.asarray(array[index], order="C")
                else:
                    rows = [slice(None)] * array.ndim
                    rows[axis] = slice(index, index + 1)
                    sample[name] = np.ascontiguousarray(array[tuple(rows)])
                if name in self._known and sample[name].dtype != self._known[name].dtype:
                    sample[name], note = conform(sample[name], self._known[name])
                    if note and (str(self.path), name) not in _NOTED:
                        _NOTED.add((str(self.path), name))  # once per file and input
                        log.warning("note: %s", note)
            yield sample


_NOTED: set[tuple[str, str]] = set()


def _reopen_arrays(path: str, options: dict, window: tuple[int, int] | None) -> ArrayData:
    data = ArrayData(path, **options)
    data.window = window
    return data


class RandomData(Loader):
    """Standard-normal samples shaped from the model: for smoke tests, not calibration.

    Dynamic dims other than the batch axis get ``dynamic_size``; the batch axis gets 1 and an
    input without one (a scalar) keeps its own shape and one value for every sample. Integer
    inputs get zeros.

    Attributes:
        fit_for_calibration: Always False: ranges from random data are meaningless.
    """

    fit_for_calibration = False

    def __init__(self, model, *, num_samples: int = 16, dynamic_size: int = 1,
                 seed: int = 0, shuffle: bool = False):
        super().__init__(num_samples, shuffle, seed)
        self.specs = list(model) if _is_specs(model) else model_inputs(model)
        self.dynamic_size = dynamic_size
        log.warning(
            "calibrating with random inputs: the ranges are unfit for real calibration; "
            "give an image folder or an .npz file"
        )

    def _total(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[Sample]:
        rng = np.random.default_rng(self.seed)
        shared: dict[str, np.ndarray] = {}  # inputs that are not a batch: one value for all
        start, stop = self.window or (0, self.num_samples)
        for index in range(min(stop, self.num_samples)):
            sample = dict(shared)
            for spec in self.specs:
                if spec.name in shared:
                    continue
                shape = [1 if axis == spec.batch_axis else self.dynamic_size if d is None else d
                         for axis, d in enumerate(spec.shape)]
                if np.issubdtype(spec.dtype, np.floating):
                    sample[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                else:
                    sample[spec.name] = np.zeros(shape, dtype=spec.dtype)
                if spec.batch_axis is None:
                    shared[spec.name] = sample[spec.name]
            if index >= start:  # a shard draws the samples before it too: the same stream
                yield sample


def image_folder(path, size, **options: Any):
    """An :class:`ImageFolder` (``qtool.data.image_folder("calib/", size=224)``)."""
    from qtool.calibration.images import ImageFolder

    return ImageFolder(path, size, **options)


def __getattr__(name: str):
    # The image loader lives in qtool.calibration.images (which imports this module).
    if name in IMAGE_NAMES:
        from qtool.calibration import images

        return getattr(images, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def array_file(path, **options: Any) -> ArrayData:
    """An :class:`ArrayData` over an ``.npz`` (or ``.npy`` with ``input_name``)."""
    return ArrayData(path, **options)


def random_inputs(model, **options: Any) -> RandomData:
    """A :class:`RandomData` for smoke tests (logs that it is unfit for calibration)."""
    return RandomData(model, **options)


def load_data(path: str | os.PathLike | None, model, *,
              axes: Mapping[str, int | None] | None = None, **options: Any):
    """The loader for a path: a folder of images, an ``.npz``/``.npy`` file, or None (random).

    Args:
        path: Folder, ``.npz``, ``.npy``, or None for random inputs (a warning is logged).
        model: The model (path, ModelProto or Graph) the data feeds; gives input names,
            image size and layout defaults.
        axes: Input name -> batch axis (None: not a batch), overriding the inferred ones
            (see :func:`model_inputs`).
        **options: Options of the chosen loader (``num_samples``, ``shuffle``, ``seed`` for
            all; ``size`` or ``crop``, ``resize``, ``mean``, ``std``, ``scale``, ``layout``,
            ``color`` for images: :mod:`qtool.calibration.images`).

    Returns:
        An iterable of samples; its ``specs`` are the model's inputs with their batch axes.

    Raises:
        DataError: Unknown path kind, an option the loader does not take, or a data set
            that does not fit the model (checked on its first sample).
    """
    specs = model_inputs(model, axes)
    if path is None:
        loader = _construct(RandomData, specs, options)
    else:
        path = Path(path)
        if path.is_dir():
            from qtool.calibration.images import ImageFolder, image_defaults

            loader = _construct(ImageFolder, path, image_defaults(specs, path, options))
        elif path.suffix.lower() == ".npz":
            loader = _construct(ArrayData, path, {"specs": specs, **options})
        elif path.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise DataError(
                    f"{path}: one .npy array cannot feed a model with {len(specs)} inputs",
                    "give an .npz with one array per input: " + ", ".join(s.name for s in specs),
                )
            loader = _construct(ArrayData, path,
                                {"input_name": specs[0].name, "specs": specs, **options})
        elif not path.exists():
            raise DataError(f"{path}: no such file or folder")
        else:
            raise DataError(
                f"{path}: unknown data format", "give an image folder, an .npz or an .npy file"
            )
    first = next(iter(loader), None)
    if first is None:
        raise DataError(f"{path}: the data set is empty")
    check_inputs(specs, first)
    loader.specs = specs
    return loader


def specs_of(data, model) -> list[InputSpec]:
    """The input specs a data set was loaded for (its ``specs``), else the model's own."""
    specs = getattr(data, "specs", None)
    return list(specs) if specs else model_inputs(model)


def _construct(cls, first, options: Mapping[str, Any]):
    import inspect

    accepted = set(list(inspect.signature(cls.__init__).parameters)[2:])
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(
            f"unknown data option(s) {', '.join(unknown)} for {cls.__name__}",
            f"it takes: {', '.join(sorted(accepted))}",
        )
    return cls(first, **options)
