"""What a long run is doing: one line per phase with its time, and a bar for long loops.

Library code marks its phases and loops; whether anything appears is decided once, by the
caller (the CLI), for a block of work::

    with progress.shown(None):           # None: only when stderr is a terminal
        with progress.phase("calibrate"):
            for batch in progress.bar(batches, total=n, desc="calibrating", unit="sample"):
                ...

prints ``  calibrate        2.31 s`` on stderr when the phase ends, and a tqdm bar (removed
when done) while it runs. ``shown(False)`` (``--quiet``) silences both; outside any
``shown`` block nothing is printed, so library users see nothing they did not ask for.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

_state: contextvars.ContextVar[TextIO | None] = contextvars.ContextVar(
    "qtool_progress", default=None
)
PHASE_WIDTH = 16


@contextlib.contextmanager
def shown(enabled: bool | None, stream: TextIO | None = None) -> Iterator[bool]:
    """Show phases and bars in this block: True always, None on a terminal, False never.

    Args:
        enabled: True, False, or None for "when ``stream`` is a terminal".
        stream: Where to print (default: ``sys.stderr`` at the time of the call).

    Yields:
        Whether progress is shown.
    """
    stream = stream if stream is not None else sys.stderr
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    token = _state.set(stream if enabled else None)
    try:
        yield bool(enabled)
    finally:
        _state.reset(token)


def active() -> bool:
    """Whether progress is shown here."""
    return _state.get() is not None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a phase and print ``name  <seconds> s`` when it ends (not when it fails)."""
    start = time.perf_counter()
    yield
    stream = _state.get()
    if stream is not None:
        from tqdm import tqdm

        seconds = time.perf_counter() - start
        tqdm.write(f"  {name:<{PHASE_WIDTH}} {seconds:7.2f} s", file=stream)  # above any bar
        stream.flush()


class _NoBar:
    """A bar that shows nothing (progress off)."""

    def __init__(self, iterable: Iterable | None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, n: int = 1) -> None:
        """Nothing to advance."""

    def close(self) -> None:
        """Nothing to close."""


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
        unit: str = "it") -> Any:
    """A tqdm bar over ``iterable`` (or advanced with ``update``) when progress is shown.

    Without progress, a stand-in with the same ``__iter__``/``update``/``close`` and
    context-manager use. The bar is removed from the terminal when it closes.
    """
    stream = _state.get()
    if stream is None:
        return _NoBar(iterable)
    from tqdm import tqdm

    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=stream,
                dynamic_ncols=True)
