r"""Which CPU an int8 model is made for: x86 with VNNI/AMX, x86 without, or ARM.

It matters for one reason: onnxruntime's u8 x s8 kernels (MLAS) on x86 CPUs without VNNI
multiply with ``vpmaddubsw``, which adds pairs of products into a *saturating* int16, so
8-bit weights can overflow there and onnxruntime's own quantizer offers ``reduce_range``
(7-bit weights) for them. With VNNI (``vpdpbusd``, avx512_vnni / avx_vnni) or AMX the products
are summed in int32, and ARM's kernels widen (``sdot``/``udot``, ``smull``): 7 bits there only
cost accuracy (6.5 dB on a HardSwish classifier, issue 24).

Targets (``--target-cpu``): ``vnni`` (alias ``amx``), ``avx2`` (any x86 without VNNI, SSE
and AVX-512F included), ``arm``, and ``auto``: the CPU qtool runs on, read from the ``flags``
(x86) or ``Features`` (ARM) lines of ``/proc/cpuinfo``; the environment variable
``QTOOL_CPU_FLAGS`` (space-separated flags, e.g. ``"avx2 fma"`` or ``"fp asimd"``) replaces
them, for tests and for machines whose cpuinfo hides the flags. Unknown flags read as x86
without VNNI, the target where 8-bit weights can overflow (the safe guess).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import BackendError

#: The values ``--target-cpu`` takes.
TARGETS = ("auto", "vnni", "avx2", "arm")
#: Other names for a target.
ALIASES = {"amx": "vnni", "x86": "avx2", "avx512": "avx2", "aarch64": "arm", "arm64": "arm"}
#: Environment variable replacing /proc/cpuinfo's flags.
FLAGS_ENV = "QTOOL_CPU_FLAGS"

#: Flags of x86 CPUs whose int8 dot products sum in int32 (no int16 saturation).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
#: Flags only ARM CPUs report (the ``Features`` line).
ARM_FLAGS = frozenset({"asimd", "neon", "asimddp"})

_DESCRIPTIONS = {
    "vnni": "x86 with VNNI/AMX",
    "avx2": "x86 without VNNI",
    "arm": "ARM",
}


@dataclass(frozen=True)
class CpuTarget:
    """The CPU an int8 model is made for.

    Attributes:
        name: ``vnni``, ``avx2`` or ``arm``.
        detected: Read from this machine (``auto``) rather than named by the user.
        evidence: The flag that decided it (``avx512_vnni``), or why it is a guess.
    """

    name: str
    detected: bool
    evidence: str

    @property
    def saturates(self) -> bool:
        """u8 x s8 pair sums saturate int16 here (x86 without VNNI: ``vpmaddubsw``)."""
        return self.name == "avx2"

    @property
    def description(self) -> str:
        """``x86 with VNNI/AMX``, ``x86 without VNNI`` or ``ARM``."""
        return _DESCRIPTIONS[self.name]

    def source(self) -> str:
        """How the target was chosen, for notes: ``this CPU (avx512_vnni)`` or ``--target-cpu``."""
        if self.detected:
            return f"detected on this CPU ({self.evidence})"
        return f"--target-cpu {self.name}"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """This CPU's feature flags: ``$QTOOL_CPU_FLAGS`` if set, else /proc/cpuinfo (None: unread)."""
    injected = os.environ.get(FLAGS_ENV)
    if injected is not None:
        return frozenset(injected.split())
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key = line.partition(":")[0].strip().lower()
        if key in ("flags", "features"):
            flags.update(line.partition(":")[2].split())
    return frozenset(flags)


def detect(flags: Iterable[str] | None = None, machine: str | None = None) -> CpuTarget:
    """The target of the CPU with these flags (None: this CPU's, :func:`cpu_flags`)."""
    flag_set = cpu_flags() if flags is None else frozenset(flags)
    vnni = sorted((flag_set or frozenset()) & VNNI_FLAGS)
    if vnni:
        return CpuTarget("vnni", True, vnni[0])
    machine = (machine if machine is not None else platform.machine()).lower()
    if (flag_set or frozenset()) & ARM_FLAGS or (flags is None and machine in ("aarch64",
                                                                                "arm64")):
        return CpuTarget("arm", True, "ARM CPU")
    if not flag_set:
        return CpuTarget("avx2", True, "CPU flags unknown")
    return CpuTarget("avx2", True, "no avx512_vnni/avx_vnni/amx_int8 flag")


def resolve_target(name: str, flags: Iterable[str] | None = None) -> CpuTarget:
    """The target ``--target-cpu NAME`` stands for (``auto``: :func:`detect`).

    Raises:
        BackendError: Not a target name.
    """
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in TARGETS:
        raise BackendError(
            f"target CPU {name!r} is not one of {', '.join(TARGETS)} (or {', '.join(ALIASES)})",
            "e.g. --target-cpu vnni for x86 with VNNI/AMX, avx2 for older x86, arm for ARM",
        )
    if key == "auto":
        return detect(flags)
    return CpuTarget(key, False, "named")


def side_by_side_threads(sessions: int) -> int:
    """The intra-op threads for each of ``sessions`` onnxruntime sessions run side by side.

    The cores this process may use, shared out (at least 1 each). At batch 1 a second
    intra-op thread gains a conv net almost nothing while two single-thread sessions side by
    side take about 0.67x the time of running them in turn (the detector of issue #22); with
    more cores than sessions, each session gets its share rather than one thread.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(sessions, 1))


def runs_at_once(rows: int, runs: int) -> tuple[int, int | None]:
    """``(runs side by side, intra-op threads of each)`` for runs of ``rows`` rows each.

    One row a run: ``runs`` side by side, :func:`side_by_side_threads` each. More rows: one
    at a time with onnxruntime's default threads (``(1, None)``): the intra-op threads share
    a batch's work well there, and runs side by side only multiply the activations held
    (ResNet-18 at batch 8: the correction's float pass peaked 212 MB higher, no faster).
    """
    if rows == 1 and runs > 1:
        return runs, side_by_side_threads(runs)
    return 1, None


def in_order(pool, calls, at_once: int):
    """``(tag, result)`` of each ``(tag, call)`` in ``calls``, run on ``pool``, in their order.

    At most ``at_once`` calls are under way: the oldest result is given back before the next
    call starts, so what the caller does with it (store it, add it up) overlaps the runs
    after it, and a run's outputs reach the caller in data order whichever finished first.
    """
    from collections import deque

    pending: deque = deque()
    for tag, call in calls:
        pending.append((tag, pool.submit(call)))
        if len(pending) >= at_once:
            tag, future = pending.popleft()
            yield tag, future.result()
    while pending:
        tag, future = pending.popleft()
        yield tag, future.result()


__all__ = ["FLAGS_ENV", "TARGETS", "CpuTarget", "cpu_flags", "detect", "in_order",
           "resolve_target", "runs_at_once", "side_by_side_threads"]
