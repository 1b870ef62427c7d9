"""Stored activations of the one-pass correction, in memory up to a budget, then in files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Spilled:
    """One batch of a tensor past the budget: ``shape`` and ``dtype`` at ``offset`` of ``path``."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self) -> np.ndarray:
        """The batch, read into memory."""
        count = int(np.prod(self.shape, dtype=np.int64))
        return np.fromfile(self.path, self.dtype, count, offset=self.offset).reshape(self.shape)

    def write(self, value: np.ndarray) -> None:
        """Overwrite the batch in its file (same shape and dtype).

        A plain positioned write, not a memory map: flushing a map synced it to the disk,
        8.6 of the detector's 46 s; the page cache serves the next read all the same.
        """
        value = np.asarray(value, dtype=self.dtype)
        if value.shape != tuple(self.shape):
            raise ValueError(f"shape {value.shape} written over {self.shape}")
        with open(self.path, "r+b") as out:
            out.seek(self.offset)
            np.ascontiguousarray(value).tofile(out)


class Store:
    """Each stored tensor's value per batch; past ``budget`` bytes in memory, in files.

    A batch that does not fit is appended to its tensor's one raw file in a temporary
    folder and read back one batch at a time, so memory holds the budget plus one batch.
    One file per tensor, not per batch: a detector's 416x416 maps at batch 1 spilled about
    9,000 ``.npy`` files over 64 rows, whose creation and removal took a quarter of the
    correction's time.
    """

    def __init__(self, budget: int | None):
        self.budget = budget
        self.held = 0
        self.batches = 0
        self.items: dict[str, list] = {}
        self.folder = None
        self.files: dict[str, Path] = {}
        self.spilled_files = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        if self.folder is not None:
            self.folder.cleanup()
        return False

    def append(self, name: str, value: np.ndarray) -> None:
        """Store one more batch of ``name`` (in its file past the budget)."""
        value = np.asarray(value)
        if self.budget is not None and self.held + value.nbytes > self.budget:
            path = self._file(name)
            with open(path, "ab") as out:
                offset = out.tell()
                np.ascontiguousarray(value).tofile(out)  # from the array's memory, no copy
            self.items.setdefault(name, []).append(
                Spilled(path, offset, value.shape, value.dtype))
        else:
            self.held += value.nbytes
            self.items.setdefault(name, []).append(value)

    def _file(self, name: str) -> Path:
        if self.folder is None:
            import tempfile

            self.folder = tempfile.TemporaryDirectory(prefix="qtool-bias-")
        if name not in self.files:
            self.spilled_files += 1
            self.files[name] = Path(self.folder.name) / f"{self.spilled_files}.bin"
        return self.files[name]

    def count(self, name: str) -> int:
        """Batches stored under ``name``."""
        return len(self.items[name])

    def get(self, name: str, index: int) -> np.ndarray:
        """Batch ``index`` of ``name``."""
        item = self.items[name][index]
        return item if isinstance(item, np.ndarray) else item.read()

    def values(self, name: str):
        """Every batch of ``name``, one at a time."""
        return (self.get(name, i) for i in range(self.count(name)))

    def dtype(self, name: str):
        """The dtype of ``name``."""
        item = self.items[name][0]
        return item.dtype

    def shift(self, name: str, change) -> None:
        """Replace every batch of ``name`` by ``change(batch)``."""
        for index, item in enumerate(self.items[name]):
            if isinstance(item, np.ndarray):
                self.items[name][index] = change(item)
            else:
                item.write(change(item.read()))

    def drop(self, name: str) -> None:
        """Forget ``name`` (and delete its file)."""
        for item in self.items.pop(name, ()):
            if isinstance(item, np.ndarray):
                self.held -= item.nbytes
        path = self.files.pop(name, None)
        if path is not None:
            path.unlink()
