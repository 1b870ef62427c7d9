"""qtool.executor: every executor returns results in task order, errors keep their kind and
hint, a killed Ray worker is retried with an unchanged result, an unreachable cluster is one
clear error."""

from __future__ import annotations

import socket
from pathlib import Path

import executor_tasks
import pytest

from qtool.errors import DataError, ExecutorError
from qtool.executor import ProcessExecutor, SerialExecutor, get_executor

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "examples" / "digits_cnn.onnx")
CALIB = str(ROOT / "examples" / "digits_calib.npz")
VAL = str(ROOT / "examples" / "digits_val.npz")


def test_serial_and_local_processes_return_results_in_task_order():
    tasks = list(range(7))
    expected = [x * x for x in tasks]
    assert SerialExecutor().map(executor_tasks.square, tasks) == expected
    assert ProcessExecutor(2).map(executor_tasks.square, tasks) == expected
    assert isinstance(get_executor("local", 1), SerialExecutor)
    assert isinstance(get_executor(None, 3), ProcessExecutor)


def test_local_processes_are_kept_inside_a_with_block_and_stopped_after():
    import os

    with ProcessExecutor(2) as executor:
        first = set(executor.map(executor_tasks.worker_pid, list(range(6))))
        second = set(executor.map(executor_tasks.worker_pid, list(range(6))))
        processes = list(executor._pool._processes.values())
    assert os.getpid() not in first and 1 <= len(first) <= 2
    assert first | second <= {p.pid for p in processes}  # the same workers ran both maps
    assert executor._pool is None and not any(p.is_alive() for p in processes)
    once = ProcessExecutor(2)
    once.map(executor_tasks.worker_pid, [0, 1])
    assert once._pool is None  # outside a with block a map leaves no process behind


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


def _calibrate_folder(tmp_path, name, *extra):
    from click.testing import CliRunner
    from qtool.cli import main

    out = tmp_path / name
    result = CliRunner().invoke(main, ["calibrate", DIGITS, "-b", "snpe", "--data", CALIB,
                                       "--num-samples", "96", "--batch-size", "16", "-o",
                                       str(out), "-q", *extra])
    assert result.exit_code == 0, result.output
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


@pytest.mark.parametrize("method", ["minmax", "kld"])
def test_calibrate_on_ray_writes_the_same_bytes_as_one_process(ray_executor, tmp_path, method):
    one = _calibrate_folder(tmp_path, "one", "--method", method)
    on_ray = _calibrate_folder(tmp_path, "ray", "--method", method, "--executor", "ray",
                               "--workers", "2")
    local = _calibrate_folder(tmp_path, "local", "--method", method, "--workers", "2")
    assert on_ray == one and local == one


def test_evaluate_on_ray_gives_the_same_metrics(ray_executor, tmp_path):
    from click.testing import CliRunner
    from qtool.cli import main

    files = _calibrate_folder(tmp_path, "q")
    quant = tmp_path / "q" / "model.qdq.onnx"
    assert files["model.qdq.onnx"] == quant.read_bytes()

    def metrics(*where):
        result = CliRunner().invoke(main, ["evaluate", DIGITS, str(quant), "--data", VAL,
                                           "--batch-size", "32", "--layerwise", "--format",
                                           "json", *where])
        assert result.exit_code == 0, result.output
        return result.stdout

    serial = metrics()
    assert '"float_accuracy"' in serial  # the labels followed each window's rows
    assert metrics("--workers", "3", "--executor", "ray") == serial
    assert metrics("--workers", "2") == serial


def test_compare_on_ray_gives_the_same_table(ray_executor):
    from qtool.analysis.compare import compare

    def table(**where):
        result = compare(DIGITS, CALIB, eval_data=VAL, backends=["tensorrt", "snpe"],
                         methods=["minmax", "mse"], sweep_backend="", num_samples=48, **where)
        return result.render("json")

    serial = table()
    assert table(workers=2, executor="ray") == serial
    assert table(workers=2) == serial


def test_a_calibration_worker_killed_on_ray_is_retried(ray_executor, tmp_path):
    from qtool.calibration import calibrate, load_data

    from qtool import load
    from qtool.planner import build_plan
    from qtool.prepare import prepare

    graph, _ = prepare(load(DIGITS))
    schemes = build_plan(graph, "tensorrt").activation_schemes()
    data = load_data(CALIB, graph, num_samples=64)
    alone = calibrate(graph, schemes, data, method="minmax", batch_size=16)
    marker = tmp_path / "killed"
    killing = executor_tasks.killing_minmax(str(marker))
    sharded = calibrate(graph, schemes, data, method=killing, batch_size=16, workers=2,
                        executor="ray")
    assert marker.exists(), "no calibration worker was killed"
    assert sharded == alone


def test_ray_retries_a_task_whose_worker_was_killed(ray_executor, tmp_path):
    marker = tmp_path / "killed"
    results = ray_executor.map(executor_tasks.die_once, [(str(marker), x) for x in range(4)])
    assert marker.exists(), "the worker running task 1 was never killed"
    assert results == [0, 10, 20, 30]
