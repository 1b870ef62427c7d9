"""Which onnxruntime execution providers qtool's sessions run on.

Every session qtool creates (calibration, analysis, evaluation, auto-method, compare) asks
:func:`current` for its providers. The default is the CPU; :func:`use` sets others for a
block of work, e.g. ``with providers.use(resolve("cuda,cpu")): ...``. Names are
onnxruntime's (``CUDAExecutionProvider``) or short (``cuda``, ``tensorrt``, ``cpu``), in
order of preference; each must be available in the installed onnxruntime.

Ranges do not depend on the provider beyond float rounding: the same observers see the same
activations, computed by another kernel library.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

from qtool.errors import ProviderError

CPU = "CPUExecutionProvider"
DEFAULT = (CPU,)
_SUFFIX = "ExecutionProvider"
_current: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "qtool_providers", default=DEFAULT
)


def _short(name: str) -> str:
    return name[: -len(_SUFFIX)].lower() if name.endswith(_SUFFIX) else name.lower()


def resolve(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Onnxruntime provider names from ``"cuda,cpu"``, a list, or None (the CPU).

    Raises:
        ProviderError: A name onnxruntime does not know, or one not available in the
            installed onnxruntime; the message lists the available ones.
    """
    import onnxruntime as ort

    if spec is None:
        return DEFAULT
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    available = list(ort.get_available_providers())
    known = {_short(p): p for p in ort.get_all_providers()}
    known.update({_short(p): p for p in available})
    shown = ", ".join(_short(p) for p in available)
    if not names:
        raise ProviderError("no execution provider given", f"available: {shown}")
    resolved = []
    for name in names:
        full = known.get(_short(name))
        if full is None:
            raise ProviderError(f"unknown execution provider {name!r}", f"available: {shown}")
        if full not in available:
            raise ProviderError(
                f"execution provider {name!r} ({full}) is not available in this onnxruntime",
                f"available: {shown} (GPU providers need onnxruntime-gpu)",
            )
        if full not in resolved:
            resolved.append(full)
    return tuple(resolved)


def current() -> tuple[str, ...]:
    """The providers sessions use now (the CPU unless :func:`use` set others)."""
    return _current.get()


@contextlib.contextmanager
def use(providers: Sequence[str] | None) -> Iterator[tuple[str, ...]]:
    """Run a block with these providers (already resolved; None keeps the current ones)."""
    if providers is None:
        yield current()
        return
    token = _current.set(tuple(providers))
    try:
        yield tuple(providers)
    finally:
        _current.reset(token)
