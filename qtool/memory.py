"""Give freed heap memory back to the operating system (glibc only; a no-op elsewhere).

Checking, serializing and parsing a model each make a full copy of its weights as many
small allocations. Once freed, glibc keeps those pages mapped as holes in the heap, and the
big allocations that follow (onnxruntime's session, a batch of observed tensors) rarely fit
them: the process's RSS carries one or two dead copies of the weights. ``malloc_trim``
returns them (on ResNet-18 calibration: peak RSS 426 -> about 380 MB). Dask's workers do
the same for the same reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only: musl has no malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Return freed heap pages to the OS; True where it could (Linux with glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
