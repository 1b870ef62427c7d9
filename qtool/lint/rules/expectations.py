"""What a backend expects of a quantized graph, read once from its description.

The lint rules never branch on a backend's name: they compare the graph with these values,
which come from the backend module's data (its weight and activation schemes, per-channel
weights or not, the ops whose inputs and outputs share one scale). Without a backend, the
rules every backend shares apply: Concat inputs and output share one scale, and ops that only
move data keep their input's scale (``qtool.backends.base``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qtool.scheme import QuantScheme


@dataclass(frozen=True)
class BackendExpectations:
    """A backend's rules, as the lint needs them.

    Attributes:
        name: Backend name.
        weight: Scheme of weights.
        per_channel_weights: Weights carry one scale per output channel.
        activation: Scheme of activations.
        static_shapes: The engine compiles for fixed input shapes.
        per_channel_ops: Weighted ops that get per-channel weights (None: all of them).
    """

    name: str
    weight: QuantScheme
    per_channel_weights: bool
    activation: QuantScheme
    static_shapes: bool = False
    per_channel_ops: frozenset[str] | None = None


@functools.cache
def backend_expectations(name: str) -> BackendExpectations:
    """The expectations of the registered backend ``name``.

    Raises:
        BackendError: No such backend.
    """
    from qtool.backends import get_backend

    backend = get_backend(name)
    return BackendExpectations(
        name=name,
        weight=backend.weight_scheme,
        per_channel_weights=bool(backend.per_channel_weights),
        activation=backend.activation_scheme,
        static_shapes=bool(getattr(backend, "static_shapes", False)),
        per_channel_ops=backend.per_channel_ops,
    )


def shares_scale(op: str, attrs: Mapping[str, Any], backend: str | None) -> bool:
    """True when ``op``'s quantized inputs and outputs must share one scale and zero point."""
    from qtool.backends import base

    if backend is not None:
        from qtool.backends import get_backend

        rules = get_backend(backend)
        return op in rules.sharing_ops or rules.passes_scale_through(op, attrs)
    if op in base.SHARING_OPS:
        return True
    required = base.PASS_THROUGH_OPS.get(op)
    if required is None:
        return False
    for key, value in required.items():
        actual = attrs.get(key, base.ATTRIBUTE_DEFAULTS.get((op, key)))
        if isinstance(actual, bytes):
            actual = actual.decode()
        if actual != value:
            return False
    return True
