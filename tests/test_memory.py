"""qtool.memory.trim_heap gives the holes that freed copies of a model leave back to the OS."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
from qtool.memory import trim_heap

def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

# 64 MB in 4 KB blocks (each a malloc of its own, like protobuf's copy of a model), then one
# block kept above them so that free() cannot shrink the heap from its top by itself
blocks = [bytes(4096) + bytes([i % 251]) for i in range(16384)]
keep = bytes(4096) + b"keep"
before = rss_mb()
del blocks
freed = rss_mb()
trimmed = trim_heap()
print(before, freed, rss_mb(), trimmed)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, glibc only")
def test_trim_heap_returns_the_holes_of_freed_copies():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    before, freed, after = map(float, out[:3])
    if out[3] != "True":
        pytest.skip("no glibc malloc_trim here")
    assert freed > before - 16, "free() alone returned the memory: the probe proves nothing"
    assert after < freed - 48, (before, freed, after)
