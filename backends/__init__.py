"""Backends: one module per inference engine, its rules (data) and its emitter.

Installed as ``qtool.backends``. The registry is the explicit tuple :data:`MODULES`; each
module holds one :class:`~qtool.backends.base.Backend` named ``BACKEND``. ``qnn`` (HTP:
per-channel weights, 16-bit activations) shares ``snpe``'s encodings file and placement.

Example:
    >>> from qtool.backends import backend_names, get_backend
    >>> get_backend("fbgemm", reduce_range=False).activation_scheme.bits
    8
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qtool.backends import (
    academic,
    acl,
    fbgemm,
    onnxruntime,
    openvino,
    qnn,
    snpe,
    tensorrt,
    tvm,
)
from qtool.backends.base import Backend

from qtool.errors import BackendError

#: The backends, in the order ``--backend`` lists them.
MODULES = (academic, tensorrt, acl, tvm, snpe, qnn, fbgemm, onnxruntime, openvino)

#: Other names for a backend's rules: alias -> backend name.
ALIASES: dict[str, str] = {}

_BY_NAME = {module.BACKEND.name: module.BACKEND for module in MODULES}


def backend_names() -> list[str]:
    """Every name ``get_backend`` accepts, aliases after the backend they alias."""
    names = []
    for name in _BY_NAME:
        names.append(name)
        names += [alias for alias, target in ALIASES.items() if target == name]
    return names


def get_backend(name: str, **options: Any) -> Backend:
    """The backend called ``name``, with ``options`` applied (e.g. ``reduce_range=True``).

    Raises:
        BackendError: Unknown name (the message lists the known ones) or option.
    """
    key = name.lower() if isinstance(name, str) else name
    target = ALIASES.get(key, key)
    backend = _BY_NAME.get(target)
    if backend is None:
        raise BackendError(
            f"unknown backend {name!r}", f"choose one of: {', '.join(backend_names())}"
        )
    if key != target:
        backend = dataclasses.replace(backend, name=key)
    return backend.with_options(**options) if options else backend


def resolve_backend(backend: str | Backend) -> Backend:
    """A Backend as is, or the one a name stands for."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        return get_backend(backend)
    raise BackendError(f"{backend!r} is neither a backend name nor a Backend")


__all__ = ["ALIASES", "MODULES", "Backend", "backend_names", "get_backend", "resolve_backend"]
