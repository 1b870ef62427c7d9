"""Stored activations of the one-pass correction, in memory up to a budget, then in files."""

from __future__ import annotations

import numpy as np


class Store:
    """Each stored tensor's value per batch; past ``budget`` bytes in memory, in files.

    A value that does not fit goes to an ``.npy`` file of a temporary folder and is read
    back one batch at a time, so memory holds the budget plus one batch.
    """

    def __init__(self, budget: int | None):
        self.budget = budget
        self.held = 0
        self.batches = 0
        self.items: dict[str, list] = {}
        self.folder = None
        self.files = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        if self.folder is not None:
            self.folder.cleanup()
        return False

    def append(self, name: str, value: np.ndarray) -> None:
        """Store one more batch of ``name`` (in a file past the budget)."""
        value = np.asarray(value)
        if self.budget is not None and self.held + value.nbytes > self.budget:
            import tempfile
            from pathlib import Path

            if self.folder is None:
                self.folder = tempfile.TemporaryDirectory(prefix="qtool-bias-")
            self.files += 1
            path = Path(self.folder.name) / f"{self.files}.npy"
            np.save(path, value)
            self.items.setdefault(name, []).append(path)
        else:
            self.held += value.nbytes
            self.items.setdefault(name, []).append(value)

    def count(self, name: str) -> int:
        """Batches stored under ``name``."""
        return len(self.items[name])

    def get(self, name: str, index: int) -> np.ndarray:
        """Batch ``index`` of ``name``."""
        item = self.items[name][index]
        return item if isinstance(item, np.ndarray) else np.load(item)

    def values(self, name: str):
        """Every batch of ``name``, one at a time."""
        return (self.get(name, i) for i in range(self.count(name)))

    def dtype(self, name: str):
        """The dtype of ``name``."""
        return self.get(name, 0).dtype

    def shift(self, name: str, change) -> None:
        """Replace every batch of ``name`` by ``change(batch)``."""
        for index, item in enumerate(self.items[name]):
            if isinstance(item, np.ndarray):
                self.items[name][index] = change(item)
            else:
                np.save(item, change(np.load(item)))

    def drop(self, name: str) -> None:
        """Forget ``name`` (and delete its files)."""
        for item in self.items.pop(name, ()):
            if isinstance(item, np.ndarray):
                self.held -= item.nbytes
            else:
                item.unlink()


