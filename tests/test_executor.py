"""qtool.executor: every executor returns results in task order, errors keep their kind and
hint, a killed Ray worker is retried with an unchanged result, an unreachable cluster is one
clear error."""

from __future__ import annotations

import socket

import executor_tasks
import pytest

from qtool.errors import DataError, ExecutorError
from qtool.executor import ProcessExecutor, SerialExecutor, get_executor


def test_serial_and_local_processes_return_results_in_task_order():
    tasks = list(range(7))
    expected = [x * x for x in tasks]
    assert SerialExecutor().map(executor_tasks.square, tasks) == expected
    assert ProcessExecutor(2).map(executor_tasks.square, tasks) == expected
    assert isinstance(get_executor("local", 1), SerialExecutor)
    assert isinstance(get_executor(None, 3), ProcessExecutor)


def test_a_task_error_keeps_its_kind_and_hint_across_processes():
    with pytest.raises(DataError) as caught:
        ProcessExecutor(2).map(executor_tasks.fail_on_three, list(range(6)))
    assert caught.value.message == "sample 3 is bad"
    assert caught.value.hint == "drop sample 3"


def test_unknown_executor_is_refused():
    with pytest.raises(ExecutorError, match="unknown executor 'dask'"):
        get_executor("dask", 2)


def test_an_unreachable_cluster_is_one_clear_error(monkeypatch):
    pytest.importorskip("ray")
    import ray

    from qtool.executor import RayExecutor

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ExecutorError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        RayExecutor(2)


@pytest.fixture(scope="module")
def ray_executor():
    ray = pytest.importorskip("ray")
    from qtool.executor import RayExecutor

    ray.cloudpickle.register_pickle_by_value(executor_tasks)
    executor = RayExecutor(2, address="")
    yield executor
    ray.shutdown()


def test_ray_returns_results_in_task_order_and_keeps_errors(ray_executor):
    tasks = list(range(9))
    assert ray_executor.map(executor_tasks.square, tasks) == [x * x for x in tasks]
    with pytest.raises(DataError) as caught:
        ray_executor.map(executor_tasks.fail_on_three, tasks)
    assert caught.value.hint == "drop sample 3"


def test_ray_retries_a_task_whose_worker_was_killed(ray_executor, tmp_path):
    marker = tmp_path / "killed"
    results = ray_executor.map(executor_tasks.die_once, [(str(marker), x) for x in range(4)])
    assert marker.exists(), "the worker running task 1 was never killed"
    assert results == [0, 10, 20, 30]
