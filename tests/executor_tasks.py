"""Task functions for test_executor (a module of their own so workers can import them)."""

import os
import signal
from pathlib import Path

from qtool.errors import DataError


def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise DataError(f"sample {x} is bad", "drop sample 3")
    return x


def die_once(task: tuple[str, int]) -> int:
    """SIGKILL this worker on the first attempt at task 1 (a marker file remembers it)."""
    marker, x = task
    if x == 1 and not Path(marker).exists():
        Path(marker).write_text("killed once")
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 10


def killing_minmax(marker: str):
    """A MinMax observer class whose first update SIGKILLs its worker once (marker file)."""
    from qtool.calibration.observers.minmax import MinMaxObserver

    class KillingMinMax(MinMaxObserver):
        def update(self, values):
            if not Path(marker).exists():
                Path(marker).write_text("killed once")
                os.kill(os.getpid(), signal.SIGKILL)
            return super().update(values)

    return KillingMinMax


def worker_pid(_: int) -> int:
    """The id of the process that ran the task."""
    return os.getpid()
