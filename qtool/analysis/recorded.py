"""Outputs of the held-out runs, kept for a later check that runs the same model on the same rows.

The main job runs the float model and the Q/DQ simulation over the held-out rows in the bias
correction's check (or the ``evaluate`` phase), and the kernel check ran both again over the
first 64 of the same rows, only to compare them with onnxruntime's integer kernels. While a
:class:`RecordedRuns` is :meth:`~RecordedRuns.active`, every analysis session
(:func:`qtool.analysis.common.session`) keeps the outputs of its runs, keyed by the model's
bytes (:func:`model_key`) and the feeds' bytes, up to ``max_rows`` rows per model and
``budget`` bytes in all; :meth:`RecordedRuns.outputs` gives them back. The same model on the
same feeds in the same kind of session gives the same bits, so a check that reuses them
measures what it measured before.

The intra-op thread count is part of "the same kind of session": the held-out check runs its
sessions side by side with :func:`qtool.cpu.side_by_side_threads` each, and a model's runs are kept
only under one thread count (:meth:`RecordedRuns.threads_of`), which the kernel check then
opens its own session with for rows the record lacks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import numpy as np

_ACTIVE: ContextVar[RecordedRuns | None] = ContextVar("qtool_recorded_runs", default=None)


def model_key(model: Any) -> str:
    """What identifies a model's content: its bytes' digest, a file's path, a large graph's id.

    A model over 2 GB cannot be serialized; its key is the object's identity, which the
    :class:`RecordedRuns` that holds outputs under it keeps alive (so the id is not reused).
    """
    from qtool.io import is_large, serialize

    if isinstance(model, bytes):
        return "sha:" + hashlib.blake2b(model, digest_size=20).hexdigest()
    if isinstance(model, str | os.PathLike):
        return f"file:{os.path.abspath(model)}"
    if is_large(model):
        return f"object:{id(model)}"
    return model_key(serialize(model))


def feeds_key(feeds: Mapping[str, np.ndarray]) -> str:
    """The digest of a run's inputs (names, dtypes, shapes and values)."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.view(np.uint8).reshape(-1) if array.size else b"")
    return digest.hexdigest()


class RecordedRuns:
    """Outputs of analysis sessions' runs, by model and feeds (see the module docstring).

    Args:
        budget: Bytes of outputs kept in all (None: no limit); a run that does not fit is
            not kept (the check runs it again).
        max_rows: Rows kept per model (the kernel check's sample count).
    """

    def __init__(self, budget: int | None, max_rows: int) -> None:
        self.budget = budget
        self.max_rows = max_rows
        self.bytes = 0
        self._outputs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self._rows: dict[str, int] = {}
        self._models: dict[str, Any] = {}  # the objects behind "object:" keys, kept alive
        self._threads: dict[str, int | None] = {}  # each model's runs: one thread count
        self._lock = threading.Lock()  # sessions run side by side add from their threads
        # the last feeds' digest: one batch runs in several sessions (float, candidates)
        self._last: tuple[list, str] | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[RecordedRuns]:
        """Record the runs of the analysis sessions opened inside the ``with`` block."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def keep_alive(self, key: str, model: Any) -> None:
        """Hold the object behind an ``object:`` key while outputs are kept under it."""
        if key.startswith("object:"):
            self._models[key] = model

    def threads_of(self, key: str) -> int | None:
        """The intra-op threads the kept runs of model ``key`` ran with (None: the default)."""
        return self._threads.get(key)

    def add(self, key: str, feeds: Mapping[str, np.ndarray], names: Sequence[str],
            values: Sequence[np.ndarray], threads: int | None = None) -> None:
        """Keep one run's outputs (copies), within the row and byte limits.

        ``threads``: the session's intra-op threads (None: onnxruntime's default). A model's
        runs are kept under the first thread count only: a check that reruns missing rows
        with that count gets the bits of the rows it reuses.
        """
        with self._lock:
            self._add(key, feeds, names, values, threads)

    def _add(self, key, feeds, names, values, threads) -> None:
        if self._threads.setdefault(key, threads) != threads:
            return
        rows = _rows(feeds)
        if self._rows.get(key, 0) + rows > self.max_rows:
            return
        size = sum(int(np.asarray(v).nbytes) for v in values)
        if self.budget is not None and self.bytes + size > self.budget:
            return
        slot = self._outputs.setdefault((key, self._feeds_key(feeds)), {})
        fresh = [name for name in names if name not in slot]
        if not fresh:
            return
        if not slot.keys() - set(fresh):  # a new (model, feeds) pair: its rows count
            self._rows[key] = self._rows.get(key, 0) + rows
        for name, value in zip(names, values, strict=True):
            if name in fresh:
                slot[name] = np.array(value, copy=True)
                self.bytes += int(slot[name].nbytes)

    def outputs(self, key: str, feeds: Mapping[str, np.ndarray],
                names: Sequence[str]) -> list[np.ndarray] | None:
        """The kept outputs ``names`` of the model ``key`` on ``feeds``, or None."""
        with self._lock:
            slot = self._outputs.get((key, self._feeds_key(feeds)))
        if slot is None or any(name not in slot for name in names):
            return None
        return [slot[name] for name in names]


    def _feeds_key(self, feeds: Mapping[str, np.ndarray]) -> str:
        """:func:`feeds_key`, not computed again for the same arrays as the last call's."""
        arrays = sorted(feeds.items(), key=lambda item: item[0])
        if self._last is not None and len(self._last[0]) == len(arrays) and all(
                name == last_name and array is last
                for (name, array), (last_name, last) in zip(arrays, self._last[0], strict=True)):
            return self._last[1]
        key = feeds_key(feeds)
        self._last = (arrays, key)  # the arrays held: their ids are not reused meanwhile
        return key


class RecordingSession:
    """An onnxruntime session whose runs are kept in the active :class:`RecordedRuns`."""

    def __init__(self, session: Any, key: str, record: RecordedRuns,
                 threads: int | None = None) -> None:
        self._session = session
        self._key = key
        self._record = record
        self._threads = threads
        self._all = [o.name for o in session.get_outputs()]

    def run(self, fetch, feeds, *args, **kwargs):
        """``session.run``, its outputs kept."""
        values = self._session.run(fetch, feeds, *args, **kwargs)
        self._record.add(self._key, feeds, list(fetch) if fetch else self._all, values,
                         self._threads)
        return values

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def recording(session: Any, model: Any, key: str | None = None,
              threads: int | None = None) -> Any:
    """``session``, recording its runs when a :class:`RecordedRuns` is active.

    Args:
        session: The onnxruntime session of ``model``.
        model: What the session was made from (bytes or a path), for its key.
        key: The key to use instead (the caller knows the model object behind a temporary
            file).
        threads: The session's intra-op threads (None: onnxruntime's default), kept with
            the runs (:meth:`RecordedRuns.threads_of`).
    """
    record = _ACTIVE.get()
    # the kernel check's simulation runs on the CPU: only such runs give its bits
    if record is None or not record.max_rows or session.get_providers() != [
            "CPUExecutionProvider"]:
        return session
    return RecordingSession(session, key or model_key(model), record, threads)


def source_key(model: Any, source: bytes | str) -> str | None:
    """The key of a session made from ``source`` = ``qtool.io.session_source(model)``.

    A model over 2 GB goes to onnxruntime as a temporary file, whose path names nothing: its
    key is the model object's, kept alive by the active :class:`RecordedRuns`. None when no
    runs are recorded.
    """
    record = _ACTIVE.get()
    if record is None:
        return None
    if isinstance(source, bytes) or isinstance(model, str | os.PathLike):
        return model_key(source)
    key = model_key(model)
    record.keep_alive(key, model)
    return key


def _rows(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1


__all__ = ["RecordedRuns", "RecordingSession", "feeds_key", "model_key", "recording",
           "source_key"]
