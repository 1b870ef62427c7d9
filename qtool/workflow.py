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

import onnx_graphsurgeon as gs

from qtool.errors import OutputError, PlanError, RecipeError
from qtool.io import atomic_write_text, is_large, load, model_files, save, serialize
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

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
#: Rows the float fallback and the sensitivity judge each candidate on.
SEARCH_SAMPLES = 128
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
        plan = _build_plan(graph, _target_rules(backend, options), options)
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
    from qtool import providers
    from qtool.passes.opset import checked_on

    # opset conversions (16-bit Q/DQ needs 21) are checked on the calibration samples
    with providers.use(providers.resolve(options.providers)), checked_on():
        return _quantize_model(model, backend, options)


def _quantize_model(model, backend: str, options: CalibrateOptions):
    from qtool import progress
    from qtool.analysis.evaluate import evaluate
    from qtool.backends.base import QDQ_MODEL_FILE
    from qtool.calibration import calibrate
    from qtool.passes.opset import remember_examples
    from qtool.qdq import quantize
    from qtool.report import build_report, to_json, to_markdown
    from qtool.report.html import render_html

    if options.analysis not in ANALYSIS_LEVELS:
        raise PlanError(f"unknown analysis level {options.analysis!r}",
                        f"choose one of: {', '.join(ANALYSIS_LEVELS)}")
    searches = (options.sensitivity or options.target_sqnr is not None
                or options.max_accuracy_drop is not None)
    if options.analysis == "none" and (searches or options.layerwise):
        raise PlanError("--analysis none turns off the comparison, the sensitivity and the "
                        "float fallback", "drop --analysis none, or the flags that need them "
                        "(--layerwise, --sensitivity, --target-sqnr, --max-accuracy-drop)")
    from qtool.analysis.tasks import AUTO_TASK, NO_TASK, resolve_task

    task = resolve_task(options.task, options.task_options, options.task_decoder)
    # the summary's task: the one given, else the one the outputs look like (--task none: off)
    judge_task = task if task is not None or options.task == NO_TASK else resolve_task(AUTO_TASK)
    if options.adaround:
        import qtool.qat  # noqa: F401  (fails fast, naming the extra, without torch)
    with progress.phase("load"):
        loaded = float_input(load(model), requantize=options.requantize)
        model_warnings = list(getattr(loaded, "load_warnings", ()))
        keep_external = getattr(loaded, "external_data", False)
        # the float reference of every comparison: over 2 GB, the file itself (onnxruntime
        # reads its external data; the weights are not loaded into Python a second time)
        float_model = (lambda: str(model)) if is_large(loaded) else (lambda: load(model))
    with progress.phase("prepare"):
        graph, pass_reports = prepare(loaded)
        calib_data, eval_samples, eval_path, judged_on = _split_data(graph, options)
        remember_examples(calib_data)
    rules = _target_rules(backend, options)
    if options.bias_correction:
        from qtool.passes.unshare import unshare_layer_constants

        unshare_layer_constants(graph)  # each layer's own bias, to correct (before planning)
    if options.cle if options.cle is not None else not rules.per_channel_weights:
        from qtool.passes.cle import batchnorm_statistics, equalize

        with progress.phase("cle"):
            graph, cle_reports = equalize(graph, calib_data, batch_size=options.batch_size,
                                          bn_stats=batchnorm_statistics(load(model)))
        pass_reports = [*pass_reports, *cle_reports]
    with progress.phase("smoothquant"):
        graph, smoothquant, blocks = _smoothquant(graph, rules, options, calib_data,
                                                  eval_samples, eval_path)
    with progress.phase("plan"):
        plan = blocks.keep_float(smoothquant.keep_float(_build_plan(graph, rules, options)))
    with progress.phase("calibrate"):
        method_choice = None
        if options.method == AUTO_METHOD:
            from qtool.analysis.autoselect import select_ranges

            method_choice = select_ranges(
                graph, plan, calib_data, batch_size=options.batch_size,
                judge_data=None if eval_samples is calib_data else eval_samples,
                memory_budget=options.memory_budget,
            )
            ranges = method_choice.ranges
        else:
            ranges = calibrate(
                graph, plan.activation_schemes(), calib_data, method=options.method,
                batch_size=options.batch_size, workers=options.workers,
                progress=options.progress, memory_budget=options.memory_budget,
                executor=options.executor,
            )
    with progress.phase("quantize"):
        result = quantize(graph, rules, ranges, plan=plan, weight_method=options.weight_method,
                          activation_method=options.method)

    if is_large(graph) and not (searches or options.adaround or options.analysis == "full"):
        from qtool.io import release_weights

        # over 2 GB: the float weights stay in the model file, which every comparison below
        # gives onnxruntime as it is; no second copy is held in Python meanwhile
        release_weights(graph, result.float_graph)
    with progress.phase("analysis"):
        analysis = _analyze(graph, rules, result, ranges, eval_samples, eval_path, options,
                            task)
        analysis.level, analysis.judged_on = options.analysis, judged_on
        if analysis.fallback is not None and (analysis.fallback.float_layers
                                              or analysis.fallback.wide_layers):
            result = quantize(graph, rules, ranges, plan=analysis.fallback.plan,
                              weight_method=options.weight_method,
                              activation_method=options.method)
    rounded = rounded_layers = None
    if options.adaround:
        from qtool.qat.adaround import AdaRoundOptions, adaround

        # learned on the uncorrected PTQ model: AdaRound's objective (the layer's output with
        # everything upstream quantized) removes the mean error itself, and bias correction
        # on top of it would correct that error twice (qtool/qat/adaround.py)
        with progress.phase("adaround"):
            rounded, rounded_layers = adaround(result, calib_data, AdaRoundOptions(
                iterations=options.adaround_iters, seed=options.seed))
    from qtool.bias_correction import (
        DEFAULT_MAX_SAMPLES,
        correct_biases,
        correction_mode,
        spread,
    )

    bias_correction = None
    judged = None  # the evaluation of the model kept, when the correction was judged
    if correction_mode(options.bias_correction) and is_large(graph):
        # it runs a copy of the float graph per segment: over 2 GB, memory the run has not
        model_warnings.append("bias correction skipped: the model is over 2 GB (its runs "
                              "would each hold a copy of the weights)")
    elif correction_mode(options.bias_correction):
        with progress.phase("bias correction"):
            uncorrected = result
            result, bias_correction = correct_biases(
                graph, rules, ranges, result.plan,
                _batches(spread(calib_data, DEFAULT_MAX_SAMPLES), None, options.batch_size),
                weight_method=options.weight_method, activation_method=options.method,
                mode=correction_mode(options.bias_correction),
                max_samples=DEFAULT_MAX_SAMPLES, memory_budget=options.memory_budget,
            )
        if bias_correction.layers and options.analysis != "none":
            # Judged on the held-out data like every other choice: the means come from the
            # calibration data, and on few samples they can overfit it (a pretrained
            # orientation classifier lost 36 dB). Judged by the task, else by the worst
            # output slice: 0-1 scores beside 0-320 pixel boxes do not show in the whole
            # output's SQNR (qtool.bias_judge). The better model is kept.
            from qtool.bias_correction import keep_what_helps
            from qtool.bias_judge import judge

            reference_model = float_model()

            def held_out():
                return labelled_batches(eval_samples, eval_path, options.batch_size)

            with progress.phase("bias correction check"):
                verdicts = judge(reference_model, [uncorrected.graph, result.graph], held_out(),
                                 judge_task)
                kept = verdicts[1]
                if bias_correction.judge(*verdicts):
                    result, kept = keep_what_helps(
                        reference_model, graph, uncorrected, result, bias_correction, verdicts,
                        held_out, judge_task, rules, ranges,
                        weight_method=options.weight_method,
                        activation_method=options.method)
                    if not bias_correction.worse():
                        result.warnings.append(f"bias correction: {bias_correction.reason}")
                judged = kept.evaluation  # the model kept, evaluated on the held-out data
    rounding = adaround_choice = None
    if rounded is not None:
        with progress.phase("adaround check"):
            corrected = bias_correction is not None and bias_correction.layers and (
                not bias_correction.reverted)
            result, judged, adaround_choice = _keep_better_rounding(
                model, result, judged, rounded, eval_samples, eval_path, options, judge_task,
                "the bias-corrected model" if corrected else "the PTQ model")
        if adaround_choice["kept"]:
            bias_correction = None  # not stacked on AdaRound: the model written has none
        rounding = rounded_layers
    analysis.method_choice = method_choice.to_dict() if method_choice else None
    if options.analysis == "full":
        with progress.phase("tensor errors"):
            analysis.samples, analysis.tensors, analysis.histograms = _tensor_errors(
                graph, result, calib_data, options.batch_size, options.memory_budget
            )
    files = dict(result.files())
    if keep_external or is_large(result.graph):
        # a model given with external data keeps it: model.qdq.onnx + model.qdq.onnx.data
        files.update(model_files(result.graph, QDQ_MODEL_FILE, external=True))
    else:
        qdq_bytes = serialize(result.graph)
        if qdq_bytes not in files.values():  # e.g. SNPE ships the float model + encodings
            files[QDQ_MODEL_FILE] = qdq_bytes
        del qdq_bytes

    if options.analysis == "none":
        from qtool.analysis.evaluate import Evaluation

        evaluation = Evaluation(0, [])
    else:
        with progress.phase("evaluate"):
            if judged is not None and not options.layerwise:
                evaluation = judged  # the model written was just evaluated on this data
            else:
                evaluation = evaluate(
                    float_model(),
                    result.graph,
                    labelled_batches(eval_samples, eval_path, options.batch_size),
                    layerwise=options.layerwise, task=judge_task,
                )
    report = build_report(
        model=_display(model),
        backend=backend,
        options=options,
        calibration_samples=len(calib_data),
        passes=pass_reports,
        plan=result.plan,
        evaluation=evaluation,
        eval_data=judged_on,
        files=files,
        analysis=analysis,
        bias_correction=bias_correction,
        held_out=eval_samples is not calib_data,
    )
    _count_shape_nodes(graph, report)
    preprocessing = calib_data.to_dict() if hasattr(calib_data, "to_dict") else None
    if preprocessing is not None:  # an image folder: the preprocessing applied
        report["calibration"]["preprocessing"] = preprocessing
    report["backend_options"] = dict(rules.options)
    report["transformer"] = {"blocks": blocks.to_dict(), "smoothquant": smoothquant.to_dict()}
    report["warnings"] += result.warnings
    report["notes"] = _target_notes(rules)
    if options.kernel_check and options.analysis != "none":
        from qtool.analysis.kernels import check_kernels
        from qtool.cpu import resolve_target

        kernels = check_kernels(
            result.graph, float_model(),
            labelled_batches(eval_samples, eval_path, options.batch_size), rules,
            target=resolve_target(rules.options.get("target_cpu", options.target_cpu)),
        )
        report["ort_kernels"] = kernels.to_dict()
        report["warnings"] += kernels.warnings(rules.name) + kernels.failure_warnings()
        report["notes"] += kernels.notes(rules.name)
        report["kernel_failure"] = kernels.failure(rules.name)
    _check_floors(report, graph, result, eval_samples, eval_path, options)
    if rounding is not None:
        report["adaround"] = {"iterations": options.adaround_iters,
                              "layers": [r.to_dict() for r in rounding], **adaround_choice}
    from qtool.planner import coverage_warning

    coverage = coverage_warning(graph, result.plan)
    report["warnings"] += model_warnings + ([coverage] if coverage else [])
    report["warnings"] = advice_for_flags(report["warnings"], rules)
    files[REPORT_JSON] = to_json(report).encode("utf-8")
    files[REPORT_MD] = to_markdown(report).encode("utf-8")
    files[REPORT_HTML] = render_html(report).encode("utf-8")
    return dict(sorted(files.items())), report


def advice_for_flags(lines: list[str], rules) -> list[str]:
    """The warnings without advice that contradicts the flags given.

    "quantize with --backend onnxruntime" on an onnxruntime run can only mean the options
    that made it differ from onnxruntime's defaults (``reduce_range=false``): the advice
    names those instead, or goes where no option was changed.
    """
    import re

    from qtool.backends import get_backend

    defaults = get_backend(rules.name).options
    changed = [f"--backend-option {key}={str(value).lower()}"
               for key, value in rules.options.items() if defaults.get(key) != value]
    own = rf"(?:quantize with|use) --backend {re.escape(rules.name)}\b"
    if changed:
        return [re.sub(own, "quantize without " + " ".join(changed), line) for line in lines]
    return [re.sub(rf"(?:,? or |; )?{own}(?:, or )?", "", line) for line in lines]


def _keep_better_rounding(model, result, judged, rounded, eval_samples, eval_path,
                          options: CalibrateOptions, task, against: str):
    """``(model, its evaluation or None, report fields)`` with or without AdaRound.

    AdaRound's model is kept unless an output's SQNR on the evaluation data is lower than
    that of ``result`` (the model written without ``--adaround``, named ``against``), so
    ``--adaround`` is never worse there; without analysis it is kept unjudged.
    """
    from qtool.analysis.evaluate import evaluate

    if options.analysis == "none":
        return rounded, None, {"kept": True, "compared_with": None}

    def scored(candidate):
        return evaluate(load(model), candidate.graph,
                        labelled_batches(eval_samples, eval_path, options.batch_size),
                        task=task)

    without = judged if judged is not None else scored(result)
    learned = scored(rounded)
    sqnr = {a.name: [a.sqnr_db, b.sqnr_db]
            for a, b in zip(without.outputs, learned.outputs, strict=True)}
    kept = not any(b is not None and (a is None or b < a) for a, b in sqnr.values())
    fields = {"kept": kept, "compared_with": against, "sqnr_db": sqnr}
    return (rounded, learned, fields) if kept else (result, without, fields)


def _smoothquant(graph, rules, options: CalibrateOptions, calib_data, eval_samples, eval_path):
    """SmoothQuant as ``options.smoothquant`` says (:mod:`qtool.smoothing`).

    Returns:
        ``(graph, choice, transformer blocks)``.
    """
    from qtool.smoothing import choose_smoothing, parse_smoothquant
    from qtool.transformer_patterns import find_transformer_blocks

    setting = parse_smoothquant(options.smoothquant)
    if options.plan is not None and setting is None:
        setting = "off"  # a saved plan names the nodes of the unsmoothed graph
    blocks = find_transformer_blocks(graph)

    def stats(tensors):
        from qtool.calibration.collector import channel_absmax

        return channel_absmax(graph, tensors, calib_data, batch_size=options.batch_size,
                              memory_budget=options.memory_budget)

    return (*choose_smoothing(graph, setting, stats,
                              _candidate_scorer(graph, rules, options, calib_data,
                                                eval_samples, eval_path, blocks),
                              transformer=blocks.is_transformer), blocks)


def _candidate_scorer(reference, rules, options: CalibrateOptions, calib_data, eval_samples,
                      eval_path, blocks):
    """Scores a candidate float graph for :mod:`qtool.smoothing`.

    The score is the worst output SQNR (dB) of the candidate quantized the run's way (plan,
    calibration, quantization), on at most :data:`SEARCH_SAMPLES` judging rows.
    """
    import itertools

    from qtool.analysis.evaluate import evaluate
    from qtool.calibration import calibrate
    from qtool.qdq import quantize
    from qtool.smoothing import keep_float

    method = "minmax" if options.method == AUTO_METHOD else options.method
    judged = -(-SEARCH_SAMPLES // max(options.batch_size, 1))

    def score(candidate: gs.Graph, float_muls: tuple[str, ...]) -> float:
        plan = blocks.keep_float(keep_float(_build_plan(candidate, rules, options), float_muls))
        ranges = calibrate(candidate, plan.activation_schemes(), calib_data, method=method,
                           batch_size=options.batch_size, memory_budget=options.memory_budget)
        result = quantize(candidate, rules, ranges, plan=plan,
                          weight_method=options.weight_method, activation_method=method)
        batches = itertools.islice(
            labelled_batches(eval_samples, eval_path, options.batch_size), judged)
        evaluation = evaluate(reference, result.graph, batches)
        return min((o.sqnr_db if o.sqnr_db is not None else 200.0)
                   for o in evaluation.outputs)

    return score


def _check_floors(report, graph, result, eval_samples, eval_path, options) -> None:
    """SQNR and task floors (qtool.report.floors), each breach located for its output."""
    from qtool.analysis.collapse import first_collapse
    from qtool.report.floors import apply_floors

    def locate(output: str, floor: float):
        return first_collapse(graph, result, _batches(eval_samples, eval_path,
                                                      options.batch_size), output, floor)

    apply_floors(report, options.fail_under_sqnr,
                 locate if options.analysis != "none" else None)


def _count_shape_nodes(graph: gs.Graph, report: dict[str, Any]) -> None:
    """The report lists float nodes that compute on activations; shape arithmetic is counted."""
    from qtool.inspection import split_float_nodes

    computing, shape = split_float_nodes(graph, report["plan"]["float_nodes"])
    report["plan"]["float_nodes"] = computing
    report["plan"]["shape_nodes"] = len(shape)


def _split_data(graph, options: CalibrateOptions):
    """``(calibration, evaluation samples, labels path, how the report names them)``.

    The evaluation samples judge every choice and the summary: ``--eval-data``, else a
    held-out split of the calibration data (:mod:`qtool.analysis.holdout`), else (random
    inputs, or a single sample) the calibration data itself.
    """
    from qtool.analysis import holdout

    axes = dict(options.input_axes)
    samples = load_samples(options.data, graph, options.num_samples, options.seed,
                           options.preprocess, axes=axes)
    if options.eval_data is not None:
        eval_samples = load_samples(options.eval_data, graph, options.num_samples, options.seed,
                                    options.preprocess, axes=axes)
        return samples, eval_samples, options.eval_data, _display(options.eval_data)
    if options.data is None:
        return samples, samples, None, "random inputs (the calibration data)"
    parts = holdout.split(samples)
    if parts is None:
        return samples, samples, options.data, _display(options.data)
    calib, held = parts
    return calib, held, options.data, holdout.describe(held, len(samples),
                                                       _display(options.data))


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


def _analyze(graph, backend, result, ranges, eval_samples, eval_path, options, task=None):
    """Float fallback and sensitivity as the options ask, judged on the evaluation samples.

    The float outputs of a bounded slice (:data:`SEARCH_SAMPLES` rows) are computed once
    and shared by the sensitivity and every fallback candidate; the sensitivity runs only
    when asked or when the fully quantized model misses the target. With a ``task`` its
    metric judges the accuracy target and ranks the layers.
    """
    from qtool.analysis import Analysis, float_fallback, layer_sensitivity
    from qtool.analysis.reference import FloatReference

    analysis = Analysis(samples=0, tensors=[])
    wants_fallback = options.target_sqnr is not None or options.max_accuracy_drop is not None
    if not (options.sensitivity or wants_fallback):
        return analysis
    from qtool.executor import get_executor

    reference = FloatReference(graph, _batches(eval_samples, eval_path, options.batch_size),
                               max_samples=SEARCH_SAMPLES, task=task)
    # --workers: the candidates (one per layer, one per prefix of the ranking) are judged
    # by the executor's workers, with the same result as here
    executor = get_executor(options.executor, options.workers) if options.workers > 1 else None

    def sensitivity():
        if not analysis.layers:
            analysis.layers = layer_sensitivity(graph, result, reference=reference,
                                                executor=executor)
        return analysis.layers

    if options.sensitivity:
        sensitivity()
    if wants_fallback:
        analysis.fallback = float_fallback(
            graph, backend, result.plan, ranges, sensitivity, reference=reference,
            target_sqnr=options.target_sqnr, max_accuracy_drop=options.max_accuracy_drop,
            weight_method=options.weight_method, executor=executor,
        )
    analysis.search = reference.cost()  # wall time only in the log: report bytes are stable
    log.info("analysis search: %d candidate(s) on %d sample(s) in %.1f s",
             reference.candidates, reference.samples, reference.seconds)
    return analysis


def _tensor_errors(graph, result, calib_data, batch_size: int, memory_budget: int | None):
    from qtool.analysis.tensors import tensor_errors

    return tensor_errors(graph, result, _batches(calib_data, None, batch_size),
                         memory_budget=memory_budget)


def _batches(samples, path, batch_size: int):
    """A callable giving fresh batches of ``samples`` (labels from ``path``) on every call."""
    return lambda: labelled_batches(samples, path, batch_size)


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


def backend_rules(backend, backend_options: Mapping[str, Any] | tuple[str, ...] = ()):
    """The Backend for a name (or Backend) with ``backend_options`` applied.

    Raises:
        BackendError: Unknown backend, option key (the message lists its options) or value.
    """
    from qtool.backends import resolve_backend

    rules = resolve_backend(backend)
    if not backend_options:
        return rules
    return rules.with_options(**rules.parse_options(backend_options))


def _target_rules(backend, options: CalibrateOptions):
    """:func:`backend_rules` with ``--target-cpu`` given to a backend that has the option."""
    rules = backend_rules(backend, options.backend_options)
    if "target_cpu" in rules.options:  # configured again: ``auto`` reads the CPU now
        named = options.target_cpu if options.target_cpu != "auto" else None
        rules = rules.with_options(target_cpu=named or rules.options["target_cpu"])
    elif options.target_cpu != "auto":
        from qtool.cpu import resolve_target

        resolve_target(options.target_cpu)  # a wrong name fails before any work
    return rules


def _target_notes(rules) -> list[str]:
    """The summary's note on the CPU a backend with a ``target_cpu`` option was made for."""
    if "target_cpu" not in rules.options:
        return []
    from qtool.backends.onnxruntime import target_note

    return [target_note(rules)]


def _build_plan(graph: gs.Graph, backend, options: CalibrateOptions):
    from qtool.planner import build_plan

    if options.plan is None:
        plan = build_plan(graph, backend, skip=options.skip, weight_bits=options.weight_bits,
                          act_bits=options.act_bits)
        backend_rules(backend).check_plan(plan)  # widths its files cannot hold: before calibrating
        return plan
    if options.skip or options.weight_bits or options.act_bits:
        raise PlanError(
            "--skip and --bits shape a new plan; they cannot change a plan given with --plan",
            "edit the plan file instead, or drop --plan",
        )
    from qtool.plan import QuantPlan

    path = Path(options.plan)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"{path}: cannot read the plan ({exc.strerror})") from exc
    return QuantPlan.from_json(text)


def _display(path) -> str:
    return Path(path).as_posix()
