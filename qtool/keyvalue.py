"""``KEY=VALUE`` option lists (``--backend-option``, ``--task-option``) or their mapping form."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def option_pairs(items: Mapping[str, Any] | Iterable[str]) -> list[tuple[str, Any]]:
    """``(key, value)`` pairs of a mapping, or of ``KEY=VALUE`` texts (both sides stripped).

    Raises:
        ValueError: A text without ``=`` or with an empty key; the error's argument is the item.
    """
    if isinstance(items, Mapping):
        return [(str(k), v) for k, v in items.items()]
    pairs: list[tuple[str, Any]] = []
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(item)
        pairs.append((key.strip(), value.strip()))
    return pairs
