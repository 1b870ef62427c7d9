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
* :class:`RandomData` - standard-normal inputs shaped from the model; ``fit_for_calibration``
  is False and a warning is logged: ranges from it say nothing about real data.

:func:`check_inputs` compares a sample with the model's inputs (names, rank, dtype, fixed
dims) and :func:`load_data` picks the loader for a path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qtool.errors import DataError

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
IMAGE_NAMES = ("ImageFolder", "IMAGE_SUFFIXES", "IMAGENET_MEAN", "IMAGENET_STD")

Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and shape (None for a symbolic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


def model_inputs(model) -> list[InputSpec]:
    """The real inputs of a model (initializers listed as inputs are left out).

    Args:
        model: A path, ModelProto or onnx-graphsurgeon Graph.
    """
    from qtool.io import load_model

    proto = load_model(model)
    initializers = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
        )
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def check_inputs(model, sample: Mapping[str, np.ndarray]) -> None:
    """Check one sample against the model's inputs before any work starts.

    The batch axis (axis 0) is not compared with a fixed batch dim: the collector batches.

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
                "samples keep the batch axis first (size 1 for one example)",
            )
        if array.dtype != spec.dtype:
            raise DataError(
                f"input {name}: data is {array.dtype}, the model expects {spec.dtype}",
                f"convert the data with .astype(np.{spec.dtype})",
            )
        for axis, (have, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if axis > 0 and want is not None and have != want:
                raise DataError(
                    f"input {name}: data shape {array.shape} does not fit the model's "
                    f"{_show(spec.shape)} (axis {axis}: {have} != {want})",
                    "resize or crop the data to the model's input size",
                )


def _is_specs(model) -> bool:
    return isinstance(model, (list, tuple)) and all(isinstance(s, InputSpec) for s in model)


def _show(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


class _Loader:
    """Shared ``num_samples`` limit and seeded shuffle over an indexable collection."""

    def __init__(self, num_samples: int | None, shuffle: bool, seed: int):
        if num_samples is not None and num_samples < 1:
            raise DataError(f"num_samples={num_samples}: must be a positive number")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed

    def _order(self, total: int) -> np.ndarray:
        order = np.arange(total)
        if self.shuffle:
            order = np.random.default_rng(self.seed).permutation(total)
        return order[: self.num_samples] if self.num_samples is not None else order

    def __len__(self) -> int:
        return len(self._order(self._total()))

    def _total(self) -> int:
        raise NotImplementedError


class ArrayData(_Loader):
    """Samples from ``.npz`` arrays keyed by input name, or from one ``.npy`` array.

    Every array's first axis indexes the samples; all arrays must agree on its length. An
    ``.npy`` file is memory-mapped, so only the rows in use are read.

    Args:
        path: The ``.npz`` or ``.npy`` file.
        input_name: The input a ``.npy`` array feeds (required for ``.npy``).
        num_samples: Use at most this many rows.
        shuffle: Shuffle the rows (seeded).
        seed: Shuffle seed.

    Raises:
        DataError: Missing or unreadable file, no arrays, or arrays of different lengths.
    """

    def __init__(self, path, *, input_name: str | None = None, num_samples: int | None = None,
                 shuffle: bool = False, seed: int = 0):
        super().__init__(num_samples, shuffle, seed)
        self.path = Path(path)
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
        lengths = {k: (v.shape[0] if v.ndim else 0) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise DataError(
                f"{self.path}: arrays disagree on the number of samples or are empty "
                f"({', '.join(f'{k}: {n}' for k, n in lengths.items())})",
                "the first axis of every array indexes the samples",
            )
        self.rows = next(iter(lengths.values()))

    def _total(self) -> int:
        return self.rows

    def __iter__(self) -> Iterator[Sample]:
        for index in self._order(self.rows):
            yield {k: np.ascontiguousarray(v[index : index + 1]) for k, v in self.arrays.items()}


class RandomData(_Loader):
    """Standard-normal samples shaped from the model: for smoke tests, not calibration.

    Symbolic dims other than the batch get ``dynamic_size``. Integer inputs get zeros.

    Attributes:
        fit_for_calibration: Always False: ranges from random data are meaningless.
    """

    fit_for_calibration = False

    def __init__(self, model, *, num_samples: int = 16, dynamic_size: int = 1,
                 seed: int = 0, shuffle: bool = False):
        super().__init__(num_samples, shuffle, seed)
        self.specs = model if _is_specs(model) else model_inputs(model)
        self.dynamic_size = dynamic_size
        log.warning(
            "calibrating with random inputs: the ranges are unfit for real calibration; "
            "give an image folder or an .npz file"
        )

    def _total(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[Sample]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.num_samples):
            sample = {}
            for spec in self.specs:
                shape = [1] + [d if d is not None else self.dynamic_size for d in spec.shape[1:]]
                if np.issubdtype(spec.dtype, np.floating):
                    sample[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                else:
                    sample[spec.name] = np.zeros(shape, dtype=spec.dtype)
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


def load_data(path: str | os.PathLike | None, model, **options: Any):
    """The loader for a path: a folder of images, an ``.npz``/``.npy`` file, or None (random).

    Args:
        path: Folder, ``.npz``, ``.npy``, or None for random inputs (a warning is logged).
        model: The model (path, ModelProto or Graph) the data feeds; gives input names,
            image size and layout defaults.
        **options: Options of the chosen loader (``num_samples``, ``shuffle``, ``seed`` for
            all; ``size`` or ``crop``, ``resize``, ``mean``, ``std``, ``scale``, ``layout``,
            ``color`` for images: :mod:`qtool.calibration.images`).

    Returns:
        An iterable of samples.

    Raises:
        DataError: Unknown path kind, an option the loader does not take, or a data set
            that does not fit the model (checked on its first sample).
    """
    specs = model_inputs(model)
    if path is None:
        loader = _construct(RandomData, specs, options)
    else:
        path = Path(path)
        if path.is_dir():
            from qtool.calibration.images import ImageFolder, image_defaults

            loader = _construct(ImageFolder, path, image_defaults(specs, path, options))
        elif path.suffix.lower() == ".npz":
            loader = _construct(ArrayData, path, options)
        elif path.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise DataError(
                    f"{path}: one .npy array cannot feed a model with {len(specs)} inputs",
                    "give an .npz with one array per input: " + ", ".join(s.name for s in specs),
                )
            loader = _construct(ArrayData, path, {"input_name": specs[0].name, **options})
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
    return loader


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
