"""The jobs behind the CLI, as library functions: calibrate to a folder, evaluate, run a recipe.

``qtool calibrate`` is :func:`calibrate_to_folder`:

    load -> Pipeline(cleanup, fold_bn, upgrade_opset) -> build_plan (or a saved plan)
         -> split: judging data = --eval-data, else a held-out split of the calibration data
            (qtool.analysis.holdout)
         -> calibrate (streaming, onnxruntime; ``auto``: qtool.analysis.autoselect, judged
            on the judging data) -> quantize
         -> [float fallback to a target, sensitivity per layer: qtool.analysis, judged on a
            bounded slice of the judging data, float outputs computed once]
         -> analysis ``none`` | ``summary`` (outputs compared on the judging data, streamed)
            | ``full`` (summary + accumulated error per quantized tensor and histograms)
         -> [bias correction (qtool.bias_correction), learned rounding (qtool.qat.adaround)]
         -> files: quantized model + backend vendor files + plan.json + report.json
            + report.md + report.html

The output folder is written whole or not at all: its files go into a temporary sibling
folder which is renamed into place at the end, and an existing non-empty folder is only
replaced with ``force`` when qtool wrote it (:mod:`qtool.output`). ``-o NAME.onnx`` writes
the deployable model to that file and the other files beside it (``NAME.encodings``, ...).
The same inputs give the same bytes in every file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.calibrate_job import (  # noqa: F401  (the job's names, also read from here)
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    SEARCH_SAMPLES,
    advice_for_flags,
    backend_rules,
    display,
    plan_for,
    split_data,
    target_rules,
)
from qtool.errors import OutputError, RecipeError
from qtool.io import atomic_write_text, load, save
from qtool.options import ANALYSIS_LEVELS, AUTO_METHOD, CalibrateOptions  # noqa: F401
from qtool.output import (
    check_file_output,
    fill_folder,
    input_files,
    is_file_output,
    refuse_existing_file,
    staging_folder,
    write_beside,
)
from qtool.passes.strip_qdq import float_input
from qtool.pipeline import PassReport, Pipeline
from qtool.prepare import prepare
from qtool.samples import labelled_batches, load_samples

log = logging.getLogger(__name__)

RECIPE_KEYS = frozenset({"model", "output", "passes"})


def calibrate_options_from_recipe(
    source: str | os.PathLike | Mapping[str, Any], base: CalibrateOptions | None = None
) -> CalibrateOptions:
    """The options of a calibrate config (YAML/JSON file or mapping) over ``base``.

    The keys are :class:`CalibrateOptions`' fields, plus ``bits``, ``adaround`` as ``true``
    or ``{iterations: N}``, ``memory_budget`` in MB and ``preprocess`` as a mapping or a
    file (:data:`qtool.calibrate_config.KEYS`); ``model``, ``output`` and ``backend`` are
    read by :func:`qtool.calibrate_config.load_calibrate_config`. Paths in a file are
    relative to its folder.

    Example:
        >>> options = calibrate_options_from_recipe("calib.yaml")
        >>> calibrate_to_folder("model.onnx", "tensorrt", "out", options)

    Raises:
        RecipeError: An unknown key (the message lists the valid ones), a value of the wrong
            type or a bad value, or a file that does not parse.
    """
    from qtool.calibrate_config import load_calibrate_config

    return load_calibrate_config(source).options(base)


@dataclass
class CalibrationRun:
    """What :func:`calibrate_to_folder` wrote.

    Attributes:
        output: The folder written (or the plan file, for a plan-only run).
        files: File name -> bytes, as written.
        report: The report (None for a plan-only run).
        paths: For ``-o NAME.onnx``: folder file name -> the path it was written to.
    """

    output: Path
    files: dict[str, bytes] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    paths: dict[str, str] = field(default_factory=dict)


def default_output(model: str | os.PathLike, backend: str) -> Path:
    """``<model stem>-<backend>`` in the current folder."""
    return Path(f"{Path(model).stem}-{backend}")


def calibrate_to_folder(
    model: str | os.PathLike,
    backend: str,
    output: str | os.PathLike | None,
    options: CalibrateOptions = CalibrateOptions(),
    *,
    force: bool = False,
    save_plan: str | os.PathLike | None = None,
) -> CalibrationRun:
    """Quantize a model for a backend and write the output folder atomically.

    Args:
        model: The float ONNX file.
        backend: A registered backend name.
        output: The folder to write (default :func:`default_output`), or a ``NAME.onnx``
            file: the deployable model, with the other files beside it as ``NAME.<file>``.
        options: Data, method and plan options.
        force: Replace an existing output that qtool wrote (never anything else).
        save_plan: Only build the plan and write it to this JSON file; nothing else runs.

    Returns:
        What was written.

    Raises:
        OutputError: The output exists (without ``force``), holds files qtool did not
            write or the input model, or cannot be written; nothing is left behind.
        QtoolError: Any error of loading, planning, calibration or quantization.
    """
    if save_plan is not None:
        refuse_existing_file(save_plan, force=force, inputs=[model])
        graph, _ = prepare(float_input(load(model), requantize=options.requantize))
        plan = plan_for(graph, target_rules(backend, options), options)
        atomic_write_text(save_plan, plan.to_json())
        return CalibrationRun(Path(save_plan))
    from qtool import progress

    decoder = str(options.task_decoder).split(":")[0] if options.task_decoder else None
    inputs = input_files(model, options.data, options.eval_data, options.config, options.plan,
                         decoder)
    if is_file_output(output):
        check_file_output(output, force=force, inputs=inputs)
        files, report = quantize_model(model, backend, options)
        with progress.phase("write"):
            written = write_beside(output, files, force=force, inputs=inputs)
        return CalibrationRun(Path(output), files, report, written)
    folder = Path(output) if output is not None else default_output(model, backend)
    with staging_folder(folder, force=force, inputs=inputs) as staging:
        files, report = quantize_model(model, backend, options)
        with progress.phase("write"):
            fill_folder(staging, files)
    return CalibrationRun(folder, files, report)


def quantize_model(
    model: str | os.PathLike, backend: str, options: CalibrateOptions = CalibrateOptions()
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The main job in memory: the files of the output folder, and the report.

    Returns:
        ``(files, report)``: file name -> bytes (report.json and report.md included), and
        the report as a dict.
    """
    from qtool import calibrate_job, providers
    from qtool.passes.opset import checked_on

    # opset conversions (16-bit Q/DQ needs 21) are checked on the calibration samples
    with providers.use(providers.resolve(options.providers)), checked_on():
        return calibrate_job.run(model, backend, options)


def render_report(run_folder: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """``qtool report``: write the HTML page of a saved run from its report.json.

    Args:
        run_folder: A folder written by ``qtool calibrate``, or the ``NAME.onnx`` of a run
            written with ``-o NAME.onnx`` (its report is ``NAME.report.json``).
        output: The HTML file (default: ``report.html`` in the run folder, or
            ``NAME.report.html``).

    Returns:
        The path written.

    Raises:
        OutputError: The folder has no readable report.json, or the page cannot be written.
    """
    import json

    from qtool.report.html import render_html

    folder = Path(run_folder)
    source = folder / REPORT_JSON
    default_html = folder / REPORT_HTML
    if is_file_output(folder):  # -o NAME.onnx: NAME.report.json beside it
        stem = folder.name[: -len(".onnx")]
        source = folder.with_name(f"{stem}.{REPORT_JSON}")
        default_html = folder.with_name(f"{stem}.{REPORT_HTML}")
    try:
        report = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OutputError(
            f"{source}: cannot read the run's report ({exc.strerror})",
            "give a folder written by qtool calibrate",
        ) from exc
    except json.JSONDecodeError as exc:
        raise OutputError(f"{source}: not valid JSON ({exc})",
                          "rerun qtool calibrate to write it again") from exc
    if not isinstance(report, dict) or not {"model", "backend", "calibration", "plan"} <= set(
        report
    ):
        raise OutputError(f"{source}: not a qtool report",
                          "give a folder written by qtool calibrate")
    target = Path(output) if output is not None else default_html
    try:
        atomic_write_text(target, render_html(report))
    except OutputError as exc:  # io's hint offers a --force that `qtool report` lacks
        raise OutputError(exc.message, "choose a writable path with -o") from exc
    return target


def evaluate_files(
    float_model: str | os.PathLike,
    quant_model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    layerwise: bool = False,
    num_samples: int | None = None,
    batch_size: int = 32,
    preprocess: Any = None,
    providers: str | tuple[str, ...] | None = None,
    input_axes: Mapping[str, int | None] | None = None,
    workers: int = 1,
    executor: str | None = None,
    task: Any = None,
    task_options: Mapping[str, Any] | tuple[str, ...] = (),
    task_decoder: str | None = None,
):
    """``qtool evaluate``: compare two model files on a data set (labels from an .npz).

    ``preprocess`` applies to an image folder; ``providers`` are the onnxruntime execution
    providers (default: the CPU); ``input_axes`` declares inputs' batch axes
    (``--input-axis``); others are inferred. With ``workers > 1`` (or ``executor="ray"``)
    row windows of the data are evaluated where the executor runs them
    (:mod:`qtool.executor`) and their sums merged in data order: the same metrics, bit for
    bit, as one pass. ``task`` (``classify``, ``ctc``, ``detect``) with its options and
    decoder adds the task's metric (:mod:`qtool.analysis.tasks`).

    Returns:
        A :class:`qtool.analysis.evaluate.Evaluation`.

    Raises:
        TaskError: An unknown task or option, or a decoder that does not load.
    """
    from qtool import providers as session_providers
    from qtool.analysis.tasks import resolve_task
    from qtool.executor import get_executor

    with session_providers.use(session_providers.resolve(providers)):
        job = _EvaluateJob(str(float_model), str(quant_model), str(data), layerwise,
                           num_samples, batch_size, preprocess,
                           tuple(sorted((input_axes or {}).items())),
                           session_providers.current(),
                           resolve_task(task, task_options, task_decoder))
        samples = job.samples()
        windows = [(0, len(samples))]
        if (workers > 1 or executor == "ray") and hasattr(samples, "shard"):
            from qtool.calibration.batching import row_windows

            windows = row_windows(len(samples), batch_size, workers)
        tallies = get_executor(executor, workers).map_shared(
            _evaluate_window, job, windows, desc="evaluation shards")
    total = tallies[0]
    for part in tallies[1:]:  # data order: the same sums as one pass
        total.merge(part)
    return total.evaluation()


@dataclass(frozen=True)
class _EvaluateJob:
    """What every evaluation shard reads: paths and settings (workers load the files)."""

    float_model: str
    quant_model: str
    data: str
    layerwise: bool
    num_samples: int | None
    batch_size: int
    preprocess: Any
    input_axes: tuple
    providers: tuple[str, ...]
    task: Any = None

    def samples(self):
        """The data set, loaded from its path (a worker loads its own)."""
        return load_samples(self.data, load(self.float_model), self.num_samples, seed=0,
                            preprocess=self.preprocess, axes=dict(self.input_axes))


def _evaluate_window(job: _EvaluateJob, window: tuple[int, int]):
    from qtool import providers as session_providers
    from qtool.analysis.evaluate import tally

    with session_providers.use(job.providers):
        samples = job.samples()
        if window != (0, len(samples)):
            samples = samples.shard(*window)
        batches = labelled_batches(samples, job.data, job.batch_size)
        return tally(load(job.float_model), load(job.quant_model, check=False), batches,
                     layerwise=job.layerwise, task=job.task)


@dataclass
class RecipeRun:
    """What :func:`run_recipe` did: the file written and one report per pass."""

    model: Path
    output: Path
    reports: list[PassReport]

    def render(self) -> str:
        """One line per pass, then where the model went."""
        lines = [r.summary() for r in self.reports]
        lines.append(f"wrote {self.output}")
        return "\n".join(lines) + "\n"


def run_recipe(
    recipe: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
) -> RecipeRun:
    """``qtool run``: run a recipe's passes on a model and save the result.

    The recipe's ``model`` and ``output`` are relative to the recipe's folder; the
    arguments, relative to the current folder, override them. Without an output the model
    is written beside the input as ``<stem>.out.onnx``. An existing output file is replaced
    only with ``force``, and the input model never.

    Raises:
        RecipeError: Unknown top-level keys, no model, or a bad pass list.
        OutputError: The output exists (without ``force``) or is the input model.
    """
    from qtool.pipeline import load_recipe

    recipe_path = Path(recipe)
    spec = load_recipe(recipe_path)
    unknown = sorted(set(spec) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(
            f"{recipe_path}: unknown recipe key(s) {', '.join(unknown)}",
            f"a recipe has: {', '.join(sorted(RECIPE_KEYS))}",
        )
    pipeline = Pipeline.from_recipe(spec)
    base = recipe_path.parent
    if model is not None:
        model_path = Path(model)
    elif spec.get("model"):
        model_path = base / str(spec["model"])
    else:
        raise RecipeError(f"{recipe_path}: no model", "give MODEL or a 'model' key")
    if output is not None:
        output_path = Path(output)
    elif spec.get("output"):
        output_path = base / str(spec["output"])
    else:
        output_path = model_path.with_name(model_path.stem + ".out.onnx")
    refuse_existing_file(output_path, force=force, inputs=[model_path])
    graph, reports = pipeline.run(load(model_path))
    save(graph, output_path)
    return RecipeRun(model_path, output_path, reports)


def describe_passes() -> str:
    """Every registered pass with its options and summary, one per line."""
    from qtool.pipeline import available_passes

    lines = []
    for name, info in available_passes().items():
        options = ", ".join(f"{k}={v!r}" for k, v in info.options.items())
        lines.append(f"{name}({options}): {info.summary}")
    return "\n".join(lines) + "\n"

