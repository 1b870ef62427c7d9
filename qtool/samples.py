"""The job's data: samples loaded from a path (or random), and batches with their labels.

Below the jobs that use it (:mod:`qtool.workflow`, :mod:`qtool.analysis.compare`), so that
none of them imports another for its data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qtool.errors import DataError

#: Random inputs drawn when no data is given (a smoke test; the report says so).
RANDOM_SAMPLES = 16


def load_samples(path, graph: gs.Graph, num_samples: int | None, seed: int,
                 preprocess: Any = None, *, axes: Mapping[str, int | None] | None = None):
    """The samples of a data path (None: seeded random inputs shaped from ``graph``).

    ``preprocess`` (a :class:`qtool.calibration.images.Preprocessing` or a dict of its
    keys) applies to an image folder only; ``axes`` declares inputs' batch axes (see
    :func:`qtool.calibration.data.model_inputs`).
    """
    from qtool.calibration.data import load_data

    axes = dict(axes or {})
    recorded = _decoder_samples(path, graph, num_samples, seed, axes)
    if recorded is not None:
        return recorded
    if path is None:
        return load_data(None, graph, axes=axes, num_samples=num_samples or RANDOM_SAMPLES,
                         seed=seed)
    options = {}
    if preprocess is not None and Path(path).is_dir():
        from qtool.calibration.images import Preprocessing

        if not isinstance(preprocess, Preprocessing):
            preprocess = Preprocessing.from_mapping(preprocess)
        options = preprocess.options()
    return load_data(path, graph, axes=axes, num_samples=num_samples, **options)


def _decoder_samples(path, graph, num_samples, seed, axes):
    """A KV-cache decoder's samples recorded over token sequences (:mod:`qtool.kv_cache`).

    None unless the model has cache inputs and the data lacks them (token ids only, or no
    data): data that holds the cache inputs loads as any other, with the decoder's batch
    axes (:func:`qtool.kv_cache.decoder_axes`) unless ``--input-axis`` declares them.
    """
    from qtool.kv_cache import decoder_axes, find_cache, recorded_samples, wants_recording

    cache = find_cache(graph)
    if cache is None:
        return None
    axes.update({**decoder_axes(cache, graph), **dict(axes)})
    if not wants_recording(cache, path):
        return None
    from qtool.calibration.data import model_inputs

    return recorded_samples(path, graph, cache, model_inputs(graph, axes), num_samples, seed)


def labelled_batches(samples, path, batch_size: int) -> Iterator[dict]:
    """Evaluation batches of ``samples`` (loaded from ``path``), with labels if it has any.

    An .npz's ``labels`` array rides along under the key ``labels``, row for row (the
    loaders keep the file's order). The batches are what the model accepts: its fixed batch
    size, each input's batch axis (:func:`qtool.calibration.batching.batches`).
    """
    from qtool.analysis.common import LABELS_KEY
    from qtool.calibration.batching import batches, resolve_batch_size

    labels = _labels(path)
    indices = getattr(samples, "indices", None)  # a held-out split: labels by source position
    needed = (indices[-1] + 1 if indices else 0) if indices is not None else len(samples)
    if labels is not None and len(labels) < needed:
        raise DataError(
            f"{path}: {len(labels)} labels for {needed} samples",
            "give one label per sample under the 'labels' key",
        )

    first = (getattr(samples, "window", None) or (0, 0))[0]  # a shard: labels from its start

    def with_labels() -> Iterator[dict]:
        for index, sample in enumerate(samples):
            if labels is None:
                yield sample
            else:
                row = indices[index] if indices is not None else first + index
                yield {**sample, LABELS_KEY: labels[row : row + 1]}

    specs = samples.specs
    size, fixed = resolve_batch_size(specs, batch_size)
    extra = (LABELS_KEY,) if labels is not None else ()
    joined = batches(with_labels(), specs, size, fixed=fixed, extra=extra)
    return _SpecBatches(({**batch.feeds, **batch.extra} for batch in joined), specs)


class _SpecBatches:
    """Batch dicts (one pass) that carry the input specs they were batched by.

    The evaluation counts samples along each input's batch axis as the data was loaded
    (``--input-axis feats=none``: 8 clips, not the 8000 rows of their axis 0).
    """

    def __init__(self, stream: Iterator[dict], specs):
        self._stream = stream
        self.specs = specs

    def __iter__(self) -> Iterator[dict]:
        return self._stream


def _labels(path) -> np.ndarray | None:
    from qtool.analysis.common import LABELS_KEY

    if path is None or Path(path).suffix.lower() != ".npz":
        return None
    with np.load(path, allow_pickle=False) as archive:
        if LABELS_KEY not in archive.files:
            return None
        labels = np.asarray(archive[LABELS_KEY])
        if labels.ndim >= 2 and labels.shape[1:] != (1,):  # CTC lines: [N, L], -1 padding
            return labels.reshape(labels.shape[0], -1).astype(np.int64)
        return labels.reshape(-1).astype(np.int64)
