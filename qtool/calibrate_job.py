"""The main job in memory (``qtool calibrate`` without its folder), as a list of named phases.

:func:`run` carries one :class:`Job` through :data:`PHASES`, in order; each phase is a small
function that reads what earlier phases left on the job and adds its own part:

    check -> load -> prepare -> cle -> smoothquant -> plan -> calibrate -> quantize
          -> search (float fallback, sensitivity) -> adaround -> bias correction
          -> adaround check -> tensor errors -> model files -> evaluate -> report
          -> kernel check -> floors -> warnings -> render

Judging data is ``--eval-data``, else a held-out split of the calibration data
(:mod:`qtool.analysis.holdout`); every choice (bias correction, AdaRound, SmoothQuant's
alpha, the fallback) is judged on it, by the task where one is given or recognised. The
folder around the job (atomic writes, ``--force``, ``-o NAME.onnx``) is
:mod:`qtool.workflow`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from qtool import progress
from qtool.errors import PlanError
from qtool.io import is_large, load, serialize
from qtool.options import ANALYSIS_LEVELS, AUTO_METHOD, CalibrateOptions
from qtool.passes.strip_qdq import float_input
from qtool.prepare import prepare
from qtool.samples import labelled_batches, load_samples

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
#: Rows the float fallback and the sensitivity judge each candidate on.
SEARCH_SAMPLES = 128


@dataclass
class Job:
    """One run of the main job: its inputs, and what each phase has made so far."""

    model: Any
    backend: str
    options: CalibrateOptions
    task: Any = None  # the task given (--task), judging --max-accuracy-drop and the ranking
    judge_task: Any = None  # the summary's task: given, else recognised (--task none: off)
    loaded: Any = None
    model_warnings: list[str] = field(default_factory=list)
    keep_external: bool = False
    graph: gs.Graph | None = None
    pass_reports: list = field(default_factory=list)
    calib_data: Any = None
    eval_samples: Any = None
    eval_path: Any = None
    judged_on: str = ""
    rules: Any = None
    smoothquant: Any = None
    blocks: Any = None
    plan: Any = None
    ranges: Mapping[str, Any] | None = None
    method_choice: Any = None
    result: Any = None
    analysis: Any = None
    rounded: Any = None
    rounded_layers: Any = None
    bias_correction: Any = None
    judged: Any = None  # the evaluation of the model kept, when a check evaluated it
    adaround_choice: dict | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    evaluation: Any = None
    report: dict[str, Any] = field(default_factory=dict)
    recorded: Any = None  # the held-out runs' outputs, for the kernel check to reuse
    float_bytes: bytes | None = None  # the float reference, serialized once

    def float_model(self):
        """The float reference of every comparison, as bytes (loaded and checked once).

        Over 2 GB, the file itself: onnxruntime reads its external data, and the weights
        are not loaded into Python a second time.
        """
        if is_large(self.loaded):
            return str(self.model)
        if self.float_bytes is None:  # the check, the evaluation and the kernel check
            self.float_bytes = serialize(load(self.model))
        return self.float_bytes

    def held_out(self):
        """Fresh batches of the judging data, with labels where it has them."""
        return labelled_batches(self.eval_samples, self.eval_path, self.options.batch_size)

    @property
    def searches(self) -> bool:
        """Whether a sensitivity or a float-fallback search was asked for."""
        o = self.options
        return o.sensitivity or o.target_sqnr is not None or o.max_accuracy_drop is not None


def check(job: Job) -> None:
    """Options that contradict each other fail before any work; the task is resolved."""
    from qtool.analysis.tasks import AUTO_TASK, NO_TASK, resolve_task

    options = job.options
    if options.analysis not in ANALYSIS_LEVELS:
        raise PlanError(f"unknown analysis level {options.analysis!r}",
                        f"choose one of: {', '.join(ANALYSIS_LEVELS)}")
    if options.analysis == "none" and (job.searches or options.layerwise):
        raise PlanError("--analysis none turns off the comparison, the sensitivity and the "
                        "float fallback", "drop --analysis none, or the flags that need them "
                        "(--layerwise, --sensitivity, --target-sqnr, --max-accuracy-drop)")
    job.task = resolve_task(options.task, options.task_options, options.task_decoder)
    job.judge_task = (job.task if job.task is not None or options.task == NO_TASK
                      else resolve_task(AUTO_TASK))
    if options.adaround:
        import qtool.qat  # noqa: F401  (fails fast, naming the extra, without torch)


def load_input(job: Job) -> None:
    """The float model (an input holding Q/DQ only with ``--requantize``)."""
    with progress.phase("load"):
        job.loaded = float_input(load(job.model), requantize=job.options.requantize)
        job.model_warnings = list(getattr(job.loaded, "load_warnings", ()))
        job.keep_external = getattr(job.loaded, "external_data", False)


def prepare_graph(job: Job) -> None:
    """Cleanup, BN folding, opset >= 13, fused activations; the data split; the rules."""
    from qtool.passes.opset import remember_examples

    with progress.phase("prepare"):
        job.graph, job.pass_reports = prepare(job.loaded)
        job.calib_data, job.eval_samples, job.eval_path, job.judged_on = split_data(
            job.graph, job.options)
        remember_examples(job.calib_data)
    job.rules = target_rules(job.backend, job.options)
    from qtool.bias_correction import correction_mode

    if correction_mode(job.options.bias_correction):  # not for "off" given as a string
        from qtool.passes.unshare import unshare_layer_constants

        unshare_layer_constants(job.graph)  # each layer's own bias, to correct (before planning)


def equalize_layers(job: Job) -> None:
    """Cross-layer equalization where it is on (by default: per-tensor weights)."""
    options = job.options
    if not (options.cle if options.cle is not None else not job.rules.per_channel_weights):
        return
    from qtool.passes.cle import batchnorm_statistics, equalize

    with progress.phase("cle"):
        job.graph, cle_reports = equalize(job.graph, job.calib_data,
                                          batch_size=options.batch_size,
                                          bn_stats=batchnorm_statistics(load(job.model)))
    job.pass_reports = [*job.pass_reports, *cle_reports]


def smooth(job: Job) -> None:
    """SmoothQuant as ``--smoothquant`` says, or where transformer blocks need it."""
    with progress.phase("smoothquant"):
        job.graph, job.smoothquant, job.blocks = _smoothquant(
            job.graph, job.rules, job.options, job.calib_data, job.eval_samples, job.eval_path)


def plan_tensors(job: Job) -> None:
    """Which tensors get Q/DQ, how, and which share scales (or the plan given)."""
    with progress.phase("plan"):
        job.plan = job.blocks.keep_float(job.smoothquant.keep_float(
            plan_for(job.graph, job.rules, job.options)))


def calibrate_ranges(job: Job) -> None:
    """Activation ranges: one observer method, or ``auto``'s pick per tensor."""
    from qtool.calibration import calibrate

    options = job.options
    with progress.phase("calibrate"):
        if options.method == AUTO_METHOD:
            from qtool.analysis.autoselect import select_ranges

            with analysis_executor(options) as executor:
                job.method_choice = select_ranges(
                    job.graph, job.plan, job.calib_data, batch_size=options.batch_size,
                    judge_data=None if job.eval_samples is job.calib_data else job.eval_samples,
                    memory_budget=options.memory_budget, executor=executor,
                )
            job.ranges = job.method_choice.ranges
        else:
            job.ranges = calibrate(
                job.graph, job.plan.activation_schemes(), job.calib_data,
                method=options.method, batch_size=options.batch_size, workers=options.workers,
                progress=options.progress, memory_budget=options.memory_budget,
                executor=options.executor,
            )


def quantize_graph(job: Job) -> None:
    """The Q/DQ model of the plan and ranges (over 2 GB: the float weights released)."""
    with progress.phase("quantize"):
        job.result = _quantize(job, job.plan)
    options = job.options
    if is_large(job.graph) and not (job.searches or options.adaround
                                    or options.analysis == "full"):
        from qtool.io import release_weights

        # over 2 GB: the float weights stay in the model file, which every comparison below
        # gives onnxruntime as it is; no second copy is held in Python meanwhile
        release_weights(job.graph, job.result.float_graph)


def search(job: Job) -> None:
    """The float fallback to a target and the layer sensitivity, as asked."""
    with progress.phase("analysis"):
        job.analysis = _analyze(job.graph, job.rules, job.result, job.ranges,
                                job.eval_samples, job.eval_path, job.options, job.task)
        job.analysis.level, job.analysis.judged_on = job.options.analysis, job.judged_on
        fallback = job.analysis.fallback
        if fallback is not None and (fallback.float_layers or fallback.wide_layers):
            job.result = _quantize(job, fallback.plan)
        job.analysis.method_choice = (job.method_choice.to_dict() if job.method_choice
                                      else None)


def learn_rounding(job: Job) -> None:
    """AdaRound, on the uncorrected PTQ model.

    AdaRound's objective (the layer's output with everything upstream quantized) removes
    the mean error itself, and bias correction on top of it would correct that error twice
    (qtool/qat/adaround.py).
    """
    if not job.options.adaround:
        return
    from qtool.qat.adaround import AdaRoundOptions, adaround

    with progress.phase("adaround"), analysis_executor(job.options) as executor:
        job.rounded, job.rounded_layers = adaround(job.result, job.calib_data, AdaRoundOptions(
            iterations=job.options.adaround_iters, seed=job.options.seed), executor=executor)


def correct(job: Job) -> None:
    """Bias correction, judged on the held-out data by the task or the worst output slice.

    The means come from the calibration data, and on few samples they can overfit it (a
    pretrained orientation classifier lost 36 dB); 0-1 scores beside 0-320 pixel boxes do
    not show in the whole output's SQNR (qtool.bias_judge). The better model is kept.
    """
    from qtool.bias_correction import (
        DEFAULT_MAX_SAMPLES,
        MORE_SAMPLES,
        correct_biases,
        correction_mode,
        more_rows,
        spread,
    )

    options = job.options
    mode = correction_mode(options.bias_correction)
    if not mode:
        return
    if job.blocks is not None and not job.blocks.corrects_biases(options.bias_correction):
        return  # the report's transformer section says why
    if is_large(job.graph):
        # it runs a copy of the float graph per segment: over 2 GB, memory the run has not
        job.model_warnings.append("bias correction skipped: the model is over 2 GB (its "
                                  "runs would each hold a copy of the weights)")
        return
    with progress.phase("bias correction"):
        uncorrected = job.result
        first = spread(job.calib_data, DEFAULT_MAX_SAMPLES)
        more = more_rows(job.calib_data, first, MORE_SAMPLES)  # read where rows are small
        job.result, job.bias_correction = correct_biases(
            job.graph, job.rules, job.ranges, job.result.plan,
            batches_of(first, None, options.batch_size),
            weight_method=options.weight_method, activation_method=options.method,
            mode=mode, max_samples=DEFAULT_MAX_SAMPLES, memory_budget=options.memory_budget,
            more_batches=None if more is None else batches_of(more, None, options.batch_size),
        )
    correction = job.bias_correction
    if not correction.layers or options.analysis == "none":
        return
    from qtool.bias_correction import keep_what_helps
    from qtool.bias_judge import judge

    reference = job.float_model()
    with progress.phase("bias correction check"), held_out_runs(job).active():
        verdicts = judge(reference, [uncorrected.graph, job.result.graph], job.held_out(),
                         job.judge_task)
        kept = verdicts[1]
        if correction.judge(*verdicts):
            job.result, kept = keep_what_helps(
                reference, job.graph, uncorrected, job.result, correction, verdicts,
                job.held_out, job.judge_task, job.rules, job.ranges,
                weight_method=options.weight_method, activation_method=options.method)
            if not correction.worse():
                job.result.warnings.append(f"bias correction: {correction.reason}")
        job.judged = kept.evaluation  # the model kept, evaluated on the held-out data


def keep_rounding(job: Job) -> None:
    """AdaRound's model is kept only where it is not worse than the model without it."""
    if job.rounded is None:
        return
    correction = job.bias_correction
    with progress.phase("adaround check"):
        corrected = correction is not None and correction.layers and not correction.reverted
        job.result, job.judged, job.adaround_choice = _keep_better_rounding(
            job.model, job.result, job.judged, job.rounded, job.eval_samples, job.eval_path,
            job.options, job.judge_task,
            "the bias-corrected model" if corrected else "the PTQ model")
    if job.adaround_choice["kept"]:
        job.bias_correction = None  # not stacked on AdaRound: the model written has none


def tensor_errors(job: Job) -> None:
    """``--analysis full``: the accumulated error of every quantized tensor, histograms."""
    if job.options.analysis != "full":
        return
    with progress.phase("tensor errors"):
        job.analysis.samples, job.analysis.tensors, job.analysis.histograms = _tensor_errors(
            job.graph, job.result, job.calib_data, job.options.batch_size,
            job.options.memory_budget)


def model_files(job: Job) -> None:
    """The backend's files and the Q/DQ model (with external data where the input had it)."""
    from qtool.backends.base import QDQ_MODEL_FILE
    from qtool.io import model_files as external_files

    job.files = dict(job.result.files())
    if job.keep_external or is_large(job.result.graph):
        # a model given with external data keeps it: model.qdq.onnx + model.qdq.onnx.data
        job.files.update(external_files(job.result.graph, QDQ_MODEL_FILE, external=True))
        return
    qdq_bytes = serialize(job.result.graph)
    if qdq_bytes not in job.files.values():  # e.g. SNPE ships the float model + encodings
        job.files[QDQ_MODEL_FILE] = qdq_bytes


def held_out_runs(job: Job):
    """Where the evaluations on the held-out data keep their outputs for the kernel check.

    Only the rows the kernel check runs, within ``--memory-budget``; without the kernel
    check, nothing is kept.
    """
    from qtool.analysis.kernels import MAX_SAMPLES
    from qtool.analysis.recorded import RecordedRuns

    options = job.options
    if job.recorded is None:
        rows = MAX_SAMPLES if options.kernel_check and options.analysis != "none" else 0
        job.recorded = RecordedRuns(options.memory_budget, rows)
    return job.recorded


def evaluate_outputs(job: Job) -> None:
    """The written model against float on the judging data (reused where a check ran it)."""
    from qtool.analysis.evaluate import Evaluation, evaluate

    if job.options.analysis == "none":
        job.evaluation = Evaluation(0, [])
        return
    with progress.phase("evaluate"):
        if job.judged is not None and not job.options.layerwise:
            job.evaluation = job.judged  # the model written was just evaluated on this data
            return
        with held_out_runs(job).active():
            job.evaluation = evaluate(job.float_model(), job.result.graph, job.held_out(),
                                      layerwise=job.options.layerwise, task=job.judge_task)


def build(job: Job) -> None:
    """The report: options, passes, plan, evaluation, analysis, what each pass did."""
    from qtool.report import build_report

    options = job.options
    job.report = report = build_report(
        model=display(job.model), backend=job.backend, options=options,
        calibration_samples=len(job.calib_data), passes=job.pass_reports,
        plan=job.result.plan, evaluation=job.evaluation, eval_data=job.judged_on,
        files=job.files, analysis=job.analysis, bias_correction=job.bias_correction,
        held_out=job.eval_samples is not job.calib_data,
    )
    _count_shape_nodes(job.graph, report)
    calib = job.calib_data
    preprocessing = calib.to_dict() if hasattr(calib, "to_dict") else None
    if preprocessing is not None:  # an image folder: the preprocessing applied
        report["calibration"]["preprocessing"] = preprocessing
    report["backend_options"] = dict(job.rules.options)
    report["transformer"] = {"blocks": job.blocks.to_dict(),
                             "smoothquant": job.smoothquant.to_dict(),
                             "bias_correction": job.blocks.bias_correction_note(
                                 options.bias_correction)}
    report["warnings"] += job.result.warnings
    report["notes"] = _target_notes(job.rules)
    if job.adaround_choice is not None:
        report["adaround"] = {"iterations": options.adaround_iters,
                              "layers": [r.to_dict() for r in job.rounded_layers],
                              **job.adaround_choice}


def kernel_check(job: Job) -> None:
    """The Q/DQ model in onnxruntime's integer kernels (and OpenVINO's) against the simulation."""
    options = job.options
    if not options.kernel_check or options.analysis == "none":
        return
    from qtool.analysis.kernels import check_kernels
    from qtool.cpu import resolve_target

    rules = job.rules
    kernels = check_kernels(
        job.result.graph, job.float_model(), job.held_out(), rules,
        target=resolve_target(rules.options.get("target_cpu", options.target_cpu)),
        # OpenVINO's row on its own backend, and on the others with --analysis full: its
        # compile costs more than the rest of a small model's job
        openvino=rules.name == "openvino" or options.analysis == "full",
        recorded=job.recorded,  # the float model's and the simulation's runs, kept
    )
    job.recorded = None
    report = job.report
    report["ort_kernels"] = kernels.to_dict()
    report["warnings"] += kernels.warnings(rules.name) + kernels.failure_warnings()
    report["notes"] += kernels.notes(rules.name)
    report["kernel_failure"] = kernels.failure(rules.name)


def floors(job: Job) -> None:
    """SQNR and task floors, each breach located for its output."""
    _check_floors(job.report, job.graph, job.result, job.eval_samples, job.eval_path,
                  job.options)


def warnings(job: Job) -> None:
    """The model's own warnings and the coverage warning, without advice the flags contradict."""
    from qtool.planner import coverage_warning

    report = job.report
    coverage = coverage_warning(job.graph, job.result.plan)
    report["warnings"] += job.model_warnings + ([coverage] if coverage else [])
    report["warnings"] = advice_for_flags(report["warnings"], job.rules)


def render(job: Job) -> None:
    """report.json, report.md and report.html beside the model files."""
    from qtool.report import to_json, to_markdown
    from qtool.report.html import render_html

    job.files[REPORT_JSON] = to_json(job.report).encode("utf-8")
    job.files[REPORT_MD] = to_markdown(job.report).encode("utf-8")
    job.files[REPORT_HTML] = render_html(job.report).encode("utf-8")


#: The job's phases, in order (each reads what the earlier ones left on the :class:`Job`).
PHASES: tuple[tuple[str, Callable[[Job], None]], ...] = (
    ("check", check),
    ("load", load_input),
    ("prepare", prepare_graph),
    ("cle", equalize_layers),
    ("smoothquant", smooth),
    ("plan", plan_tensors),
    ("calibrate", calibrate_ranges),
    ("quantize", quantize_graph),
    ("search", search),
    ("adaround", learn_rounding),
    ("bias correction", correct),
    ("adaround check", keep_rounding),
    ("tensor errors", tensor_errors),
    ("model files", model_files),
    ("evaluate", evaluate_outputs),
    ("report", build),
    ("kernel check", kernel_check),
    ("floors", floors),
    ("warnings", warnings),
    ("render", render),
)


def run(model, backend: str, options: CalibrateOptions) -> tuple[dict[str, bytes], dict]:
    """``(files, report)`` of the main job: :data:`PHASES` over one :class:`Job`."""
    job = Job(model, backend, options)
    for _, phase in PHASES:
        phase(job)
    return dict(sorted(job.files.items())), job.report


def _quantize(job: Job, plan):
    from qtool.qdq import quantize

    return quantize(job.graph, job.rules, job.ranges, plan=plan,
                    weight_method=job.options.weight_method,
                    activation_method=job.options.method)


def batches_of(samples, path, batch_size: int):
    """A callable giving fresh batches of ``samples`` (labels from ``path``) on every call."""
    return lambda: labelled_batches(samples, path, batch_size)


def display(path) -> str:
    """A path as the report names it."""
    return Path(path).as_posix()


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
        plan = blocks.keep_float(keep_float(plan_for(candidate, rules, options), float_muls))
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
        return first_collapse(graph, result, batches_of(eval_samples, eval_path,
                                                      options.batch_size), output, floor)

    apply_floors(report, options.fail_under_sqnr,
                 locate if options.analysis != "none" else None)


def _count_shape_nodes(graph: gs.Graph, report: dict[str, Any]) -> None:
    """The report lists float nodes that compute on activations; shape arithmetic is counted."""
    from qtool.inspection import split_float_nodes

    computing, shape = split_float_nodes(graph, report["plan"]["float_nodes"])
    report["plan"]["float_nodes"] = computing
    report["plan"]["shape_nodes"] = len(shape)


def split_data(graph, options: CalibrateOptions):
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
        return samples, eval_samples, options.eval_data, display(options.eval_data)
    if options.data is None:
        return samples, samples, None, "random inputs (the calibration data)"
    parts = holdout.split(samples)
    if parts is None:
        return samples, samples, options.data, display(options.data)
    calib, held = parts
    return calib, held, options.data, holdout.describe(held, len(samples),
                                                       display(options.data))


def _analyze(graph, backend, result, ranges, eval_samples, eval_path, options, task=None):
    """Float fallback and sensitivity as the options ask, judged on the evaluation samples.

    The float outputs of a bounded slice (:data:`SEARCH_SAMPLES` rows) are computed once
    and shared by the sensitivity and every fallback candidate; the sensitivity runs only
    when asked or when the fully quantized model misses the target. With a ``task`` its
    metric judges the accuracy target and ranks the layers.
    """
    from qtool.analysis import Analysis
    from qtool.analysis.reference import FloatReference

    analysis = Analysis(samples=0, tensors=[])
    wants_fallback = options.target_sqnr is not None or options.max_accuracy_drop is not None
    if not (options.sensitivity or wants_fallback):
        return analysis
    reference = FloatReference(graph, batches_of(eval_samples, eval_path, options.batch_size),
                               max_samples=SEARCH_SAMPLES, task=task)
    # --workers: the candidates (one per layer, one per prefix of the ranking) are judged
    # by the executor's workers, with the same result as here
    with analysis_executor(options) as executor:
        return _search(analysis, graph, backend, result, ranges, reference, options, executor,
                       wants_fallback)


def analysis_executor(options: CalibrateOptions):
    """The executor of the analyses (``--workers``, ``--executor``); close it after use.

    One worker: this process. Several: local processes or Ray, kept for the analysis' rounds.
    """
    from qtool.executor import SerialExecutor, get_executor

    return (get_executor(options.executor, options.workers) if options.workers > 1
            else SerialExecutor())


def _search(analysis, graph, backend, result, ranges, reference, options, executor,
            wants_fallback):
    from qtool.analysis import float_fallback, layer_sensitivity

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

    return tensor_errors(graph, result, batches_of(calib_data, None, batch_size),
                         memory_budget=memory_budget)


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


def target_rules(backend, options: CalibrateOptions):
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


def plan_for(graph: gs.Graph, backend, options: CalibrateOptions):
    """A new plan for the options (``--skip``, ``--bits``), or the plan file ``--plan`` names."""
    from qtool.planner import build_plan

    if options.plan is None:
        plan = build_plan(graph, backend, skip=options.skip, weight_bits=options.weight_bits,
                          act_bits=options.act_bits)
        backend_rules(backend).check_plan(plan)  # widths its files cannot hold: before calibrating
        from qtool.kv_cache import with_cache_notes

        return with_cache_notes(plan, graph)  # a decoder's plan says what its cache gets
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
