"""Where qtool's parallel jobs run: in this process, in local processes, or on a Ray cluster.

Every parallel job in qtool (calibration shards, evaluation shards, compare cells, ...) is a
list of independent tasks mapped by one module-level function. A task is a small picklable
description (a model path, a shard's row range, a backend name), never a batch of arrays: a
worker opens the model and its shard of the data itself, so the driver ships kilobytes. Results
come back **in task order** whatever order the tasks finished in, so what the caller merges
from them is merged in a fixed order and the output bytes do not depend on where the tasks ran.

Three executors share :class:`Executor`'s one method, :meth:`Executor.map`:

* :class:`SerialExecutor` (``workers=1``): runs the tasks here, one after the other;
* :class:`ProcessExecutor` (``--executor local``, the default with ``--workers N > 1``):
  spawned processes on this machine; Ctrl-C stops them quietly;
* :class:`RayExecutor` (``--executor ray``, ``pip install "qtool[ray]"``): Ray tasks. The
  cluster is the one ``RAY_ADDRESS`` names, as Ray's own tools read it (e.g. a KubeRay head
  or ``ray start --head``); without it a local Ray is started with ``workers`` CPUs. A task
  whose worker dies (killed, out of memory, node lost) is retried by Ray up to
  :data:`RAY_MAX_RETRIES` times; tasks are pure, so a retry gives the same result.
"""

from __future__ import annotations

import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from qtool.errors import ExecutorError, QtoolError

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("local", "ray")
#: Retries of a Ray task whose worker died (system failures; a QtoolError is not retried).
RAY_MAX_RETRIES = 3


class Executor(ABC):
    """Runs ``fn(task)`` for every task and returns the results in task order."""

    name: str = ""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ExecutorError(f"workers={workers}: must be at least 1")
        self.workers = workers

    def close(self) -> None:
        """Release what :meth:`map` kept for the next call (worker processes)."""
        return None  # serial and Ray executors keep nothing

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def map_shared(self, fn: Callable[[Any, T], R], shared: Any, tasks: Sequence[T], *,
                   desc: str = "tasks", progress: bool | None = None) -> list[R]:
        """``[fn(shared, task) for task in tasks]``, ``shared`` being what every task reads.

        ``shared`` (a model, a plan) goes with each task to local processes, and once to
        Ray's object store on Ray.
        """
        return self.map(_with_shared, [(fn, shared, task) for task in tasks], desc=desc,
                        progress=progress)

    @abstractmethod
    def map(self, fn: Callable[[T], R], tasks: Sequence[T], *, desc: str = "tasks",
            progress: bool | None = None) -> list[R]:
        """``[fn(task) for task in tasks]``, run where this executor runs things.

        Args:
            fn: A module-level function (it is pickled by reference).
            tasks: Picklable task descriptions.
            desc: What the progress bar counts.
            progress: Show a bar of finished tasks (None: when stderr is a terminal).

        Raises:
            QtoolError: The first task's error (in task order), as the task raised it.
            ExecutorError: A worker died and could not be retried, or the cluster is gone.
        """


def _with_shared(item):
    fn, shared, task = item
    if type(shared).__name__ == "ObjectRef":  # Ray resolves only top-level refs by itself
        import ray

        shared = ray.get(shared)
    return fn(shared, task)


class SerialExecutor(Executor):
    """The tasks one after the other in this process."""

    name = "serial"

    def map(self, fn, tasks, *, desc="tasks", progress=None):
        """See :meth:`Executor.map`."""
        results = []
        with progress_bar(len(tasks), desc, progress) as bar:
            for task in tasks:
                results.append(fn(task))
                bar.update(1)
        return results


class ProcessExecutor(Executor):
    """Spawned processes on this machine (``spawn``: safe with onnxruntime's threads).

    Inside a ``with`` block the processes started by the first :meth:`map` are kept for the
    next ones (a search that maps round after round pays the start-up, imports included,
    once) until the block ends or a map fails; outside one, each map stops its processes.
    """

    name = "local"

    def __init__(self, workers: int = 1):
        super().__init__(workers)
        self._pool = None
        self._keep = False

    def __enter__(self):
        self._keep = True
        return self

    def __exit__(self, *exc) -> bool:
        self._keep = False
        self.close()
        return False

    def map(self, fn, tasks, *, desc="tasks", progress=None):
        """See :meth:`Executor.map`."""
        import concurrent.futures as cf

        if not tasks:
            return []
        pool = self._open()
        futures = [pool.submit(fn, task) for task in tasks]
        try:
            with progress_bar(len(tasks), desc, progress) as bar:
                for future in cf.as_completed(futures):
                    bar.update(1)
                    if future.exception() is not None:
                        break
            results = [_result(future) for future in futures]
        except BaseException:
            self._kill()  # Ctrl-C or a failed task: nothing keeps running
            raise
        if not self._keep:
            self.close()
        return results

    def close(self) -> None:
        """Stop the processes (idle ones exit at once)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _open(self):
        if self._pool is None:
            import concurrent.futures as cf
            import multiprocessing

            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_quiet_worker)
        return self._pool

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """Ray tasks on the cluster ``RAY_ADDRESS`` names, or on a local Ray."""

    name = "ray"

    def __init__(self, workers: int = 1, address: str | None = None):
        super().__init__(workers)
        try:
            import ray
        except ImportError as exc:
            raise ExecutorError(
                "--executor ray needs Ray, which is not installed",
                "pip install 'qtool[ray]'",
            ) from exc
        self._ray = ray
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": "ERROR"}
            if self.address:
                _check_reachable(self.address)
                kwargs["address"] = self.address
            else:
                # A local Ray stays on the loopback interface.
                kwargs.update(num_cpus=workers, _node_ip_address="127.0.0.1")
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "a local Ray"
                raise ExecutorError(
                    f"cannot reach the Ray cluster at {where}: {exc}",
                    "check RAY_ADDRESS (e.g. ray://head:10001 or the head's IP:6379) and that "
                    "`ray status` works from this machine",
                ) from exc

    def map_shared(self, fn, shared, tasks, *, desc="tasks", progress=None):
        """See :meth:`Executor.map_shared`: ``shared`` goes to the object store once."""
        ref = self._ray.put(shared)
        return self.map(_with_shared, [(fn, ref, task) for task in tasks], desc=desc,
                        progress=progress)

    def map(self, fn, tasks, *, desc="tasks", progress=None):
        """See :meth:`Executor.map`; at most ``workers`` tasks are in flight at once."""
        ray = self._ray
        if not tasks:
            return []
        remote = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES, retry_exceptions=False)(fn)
        refs: list[Any] = [None] * len(tasks)
        index_of: dict[Any, int] = {}
        pending: list[Any] = []
        next_task = 0
        try:
            with progress_bar(len(tasks), desc, progress) as bar:
                while next_task < len(tasks) or pending:
                    while next_task < len(tasks) and len(pending) < self.workers:
                        ref = remote.remote(tasks[next_task])
                        refs[next_task] = ref
                        index_of[ref] = next_task
                        pending.append(ref)
                        next_task += 1
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        self._get(ref, index_of[ref])  # the first failure stops the map
                        bar.update(1)
            return [self._get(ref, i) for i, ref in enumerate(refs)]
        except BaseException:
            for ref in refs:
                if ref is not None:
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:  # already finished, or the cluster is gone
                        pass
            raise

    def _get(self, ref, index: int):
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if hasattr(exc, "cause") else None
            if isinstance(cause, QtoolError):
                raise cause from None
            raise ExecutorError(f"task {index} failed on the Ray cluster: {cause or exc}",
                                "rerun with --executor local to see the error") from exc
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as exc:
            raise ExecutorError(
                f"task {index}: its Ray worker died {RAY_MAX_RETRIES + 1} times ({exc})",
                "check the workers' memory (`ray status`) and that they can read the model "
                "and data paths",
            ) from exc


def get_executor(name: str | None = None, workers: int = 1) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``) with ``workers`` workers.

    ``local`` with one worker runs the tasks in this process.
    """
    name = name or "local"
    if name == "ray":
        return RayExecutor(workers)
    if name == "local":
        return SerialExecutor(1) if workers == 1 else ProcessExecutor(workers)
    raise ExecutorError(f"unknown executor {name!r}", f"choose one of {', '.join(EXECUTORS)}")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once a ``host:port`` (or ``ray://host:port``) that nothing answers on.

    Ray itself retries an unreachable address for a minute before giving up.
    """
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc})",
            "check RAY_ADDRESS and that the head node is up (`ray status` on it)",
        ) from exc


def _result(future):
    error = future.exception()
    if error is None:
        return future.result()
    if isinstance(error, QtoolError):
        raise error
    import concurrent.futures.process as cfp

    if isinstance(error, cfp.BrokenProcessPool):
        raise ExecutorError("a worker process died (killed, or out of memory)",
                            "retry with fewer --workers, or --workers 1 to see the error")
    raise error


def _quiet_worker() -> None:
    # Ctrl-C goes to the whole process group: the main process handles it (one line, no
    # traceback) and stops the workers; the workers themselves ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def progress_bar(total: int | None, desc: str, progress: bool | None):
    """A bar counting finished tasks where qtool shows progress (:mod:`qtool.progress`).

    ``progress=False`` silences it whatever :func:`qtool.progress.shown` says.
    """
    if progress is False:
        return _Silent()
    from qtool import progress as shown

    return shown.bar(total=total, desc=desc, unit="task")
