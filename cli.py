"""The qtool command line (installed as ``qtool.cli``; console script ``qtool``).

This module only parses options and prints: each command calls one library function. A
:class:`~qtool.errors.QtoolError` becomes two lines on stderr (``error: ...`` and
``hint: ...``) and the error's exit code; a traceback appears only with ``--debug``.
"""

from __future__ import annotations

import logging
import signal
import threading
import traceback

import click

import qtool
from qtool.errors import QtoolError
from qtool.options import METHOD_ALIASES

INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE: an exception qtool did not expect (a bug)
INTERRUPTED_EXIT = 130  # the shell's code for a run stopped by Ctrl-C (128 + SIGINT)
COMPARE_FAILED_EXIT = 1  # `qtool compare`: the table is printed, but a cell failed
_DEBUG_KEY = "qtool.debug"
_ERROR_EXIT_KEY = "qtool.error_exit"


def _backend_names() -> list[str]:
    from qtool.backends import backend_names

    return list(backend_names())


def _observer_names() -> list[str]:
    from qtool.calibration.observers import OBSERVERS

    return list(OBSERVERS)


def _method_choices(auto: bool = True) -> list[str]:
    return [*_observer_names(), *(["auto"] if auto else []), *METHOD_ALIASES]


def _canonical_method(_ctx, _param, value):
    """Map onnxruntime's/ModelOpt's method names onto qtool's (entropy: kld, ...)."""
    if isinstance(value, tuple):
        return tuple(METHOD_ALIASES.get(v, v) for v in value)
    return METHOD_ALIASES.get(value, value)


_ALIAS_HELP = " Aliases: entropy = kld, percentile = quantile."


def _exit_on_sigterm(signum, frame) -> None:
    # Python's default for SIGTERM is to die on the spot: no `finally`, no context manager
    # exit, so a staging folder (.out.*.tmp) would stay behind. As SystemExit the stack
    # unwinds and removes it; the exit code is the shell's for a TERM (128 + 15).
    raise SystemExit(128 + signum)


class QtoolGroup(click.Group):
    """A group that turns QtoolError into ``error:``/``hint:`` lines and an exit code."""

    def main(self, *args, **kwargs):
        """Run the CLI with SIGTERM turned into SystemExit (the handler is put back after)."""
        if threading.current_thread() is not threading.main_thread():
            return super().main(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return super().main(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def invoke(self, ctx: click.Context):
        """Run the command; report a QtoolError (or an unexpected error) and exit."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            if ctx.meta.get(_DEBUG_KEY):
                click.echo(traceback.format_exc(), err=True, nl=False)
            click.echo("interrupted: nothing written", err=True)
            ctx.exit(INTERRUPTED_EXIT)
        except QtoolError as exc:
            if ctx.meta.get(_DEBUG_KEY):
                click.echo(traceback.format_exc(), err=True, nl=False)
            click.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(ctx.meta.get(_ERROR_EXIT_KEY, exc.exit_code))
        except Exception as exc:
            if ctx.meta.get(_DEBUG_KEY):
                raise
            click.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
            click.echo("hint: this is a bug in qtool; rerun with --debug and report it", err=True)
            ctx.exit(ctx.meta.get(_ERROR_EXIT_KEY, INTERNAL_ERROR_EXIT))


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_DEBUG_KEY] = True
    _configure_logging(bool(ctx.meta.get(_DEBUG_KEY)))
    return value


def debug_option(fn):
    """``--debug``: tracebacks and debug logging."""
    return click.option(
        "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
        help="Show debug logs, and a traceback on errors.",
    )(fn)


class _StderrHandler(logging.Handler):
    """Log records to the current stderr (resolved per record, as click.echo does)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _configure_logging(debug: bool) -> None:
    root = logging.getLogger("qtool")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


EXISTING_FILE = click.Path(exists=True, dir_okay=False, readable=True)


def _input_axes(_ctx, _param, values) -> tuple[tuple[str, int | None], ...]:
    """``--input-axis NAME=AXIS`` (AXIS an integer, or ``none`` for an input that is no batch)."""
    axes = []
    for value in values:
        name, sep, axis = value.partition("=")
        if not sep or not name or not (axis.isdigit() or axis.lower() == "none"):
            raise click.BadParameter(f"{value!r}: give NAME=AXIS, e.g. state=1 or sr=none")
        axes.append((name, None if axis.lower() == "none" else int(axis)))
    return tuple(axes)


def input_axis_option(fn):
    """``--input-axis``: declare an input's batch axis."""
    return click.option(
        "--input-axis", "input_axes", multiple=True, metavar="NAME=AXIS", callback=_input_axes,
        help="The axis of input NAME that indexes samples (e.g. state=1), or 'none' for an "
             "input that is not a batch (its one value goes with every sample). Default: "
             "inferred from the model's dims. Repeatable.",
    )(fn)
EXISTING_PATH = click.Path(exists=True, readable=True)


def provider_option(fn):
    """``--provider``: onnxruntime execution providers of every session, in order."""
    return click.option(
        "--provider", "provider", metavar="EP[,EP...]",
        help="onnxruntime execution providers of every session, in order of preference, "
             "e.g. cuda,cpu (default: cpu). Ranges do not depend on it beyond float rounding.",
    )(fn)


def preprocess_options(fn):
    """Image-folder preprocessing flags (they override a --preprocess file's keys)."""
    options = [
        click.option("--preprocess", "preprocess_file", type=EXISTING_FILE, metavar="FILE",
                     help="Image preprocessing recipe (YAML/JSON) with the keys resize, crop, "
                          "mean, std, scale, layout, color; the flags below override it."),
        click.option("--resize", type=click.IntRange(min=0),
                     help="Images: shorter side before the centre crop (0: straight to the "
                          "crop; default crop/0.875)."),
        click.option("--crop", metavar="H[xW]",
                     help="Images: centre crop size (default: the model's fixed input size)."),
        click.option("--mean", metavar="M[,M,M]",
                     help="Images: per-channel mean after --scale (default: ImageNet's for "
                          "colour, 0 for gray)."),
        click.option("--std", metavar="S[,S,S]",
                     help="Images: per-channel std (default: ImageNet's for colour, 1 for gray)."),
        click.option("--scale", type=float,
                     help="Images: factor on the 0..255 pixels before mean/std (default 1/255)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
                     help="Images: tensor layout (default: from the model's channel axis)."),
        click.option("--color", type=click.Choice(["rgb", "bgr", "gray"], case_sensitive=False),
                     help="Images: colour (default: gray for a 1-channel input, else rgb)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _preprocessing(preprocess_file, **flags):
    """The --preprocess file's settings with the flags over them (None: nothing given)."""
    from qtool.calibration.images import Preprocessing

    given = {k: v for k, v in flags.items() if v is not None}
    if preprocess_file is None and not given:
        return None
    base = Preprocessing()
    if preprocess_file is not None:
        from qtool.pipeline import load_recipe

        spec = load_recipe(preprocess_file)
        base = Preprocessing.from_mapping(spec.get("preprocess", spec), str(preprocess_file))
    return Preprocessing.from_mapping(given, "the preprocessing flags").over(base)


def parallel_options(work: str):
    """``--workers N`` and ``--executor local|ray`` (docs/parallel.md) for a parallel job."""

    def decorate(fn):
        from qtool.executor import EXECUTORS

        fn = click.option(
            "--executor", default="local", show_default=True, type=click.Choice(EXECUTORS),
            help="Where the workers run: local processes, or Ray (pip install 'qtool[ray]'; "
                 "the cluster RAY_ADDRESS names, else a local Ray). The output is the same, "
                 "byte for byte.")(fn)
        return click.option("--workers", default=1, show_default=True,
                            type=click.IntRange(min=1),
                            help=f"Workers that {work} in parallel.")(fn)

    return decorate


def task_options(fn):
    """``--task``, ``--task-option KEY=VALUE`` and ``--task-decoder`` (qtool.analysis.tasks)."""
    from qtool.analysis.tasks import TASK_NAMES

    fn = click.option("--task-decoder", metavar="FILE.py[:FUNCTION]",
                      help="--task detect: a Python file whose decode(outputs) returns one "
                           "(boxes[K,4] xyxy, scores[K], classes[K]) per image.")(fn)
    fn = click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE",
                      help="A task option, e.g. blank=0, layout=tnc, output=NAME (ctc); "
                           "boxes=OUT, scores=OUT, classes=OUT, min_score=0.3 (detect). "
                           "Repeatable.")(fn)
    return click.option("--task", type=click.Choice(TASK_NAMES),
                        help="Judge by the task beside SQNR: classify (top-1), ctc (CER and "
                             "line accuracy of greedy CTC decoding), detect (mAP@0.5 against "
                             "the float model's detections).")(fn)


def _quiet_option(fn):
    return click.option("--quiet", "-q", is_flag=True,
                        help="Print nothing on success: no progress, no summary.")(fn)


@click.group(cls=QtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(qtool.__version__, prog_name="qtool")
@debug_option
def main() -> None:
    """Quantize ONNX models by the rules of an inference engine.

    \b
    Example:
      qtool calibrate model.onnx --backend snpe --data calib.npz -o out/
      qtool lint model.onnx --backend tensorrt --format sarif -o lint.sarif
    """  # noqa: D301  (click reads \b as a no-rewrap marker)


#: ``--bias-correction``'s default: qtool.bias_correction.DEFAULT_MODE (not imported here:
#: the CLI starts without numpy and onnx-graphsurgeon; a test checks they agree).
BIAS_CORRECTION_DEFAULT = "exact"


def _bias_correction(mode: str | None, off: bool) -> bool | str:
    """The option value: True for the default (not given), False for off, else the mode.

    A mode given by name stays a string: the default does not run where qtool judged it
    harmful (transformers), ``--bias-correction exact`` runs there all the same.
    """
    if off or mode == "off":
        return False
    return True if mode is None else mode


@main.command()
@click.argument("model", required=False, type=EXISTING_FILE)
@click.option("--config", "config_path", type=EXISTING_FILE, metavar="FILE",
              help="Calibrate config (YAML/JSON): these options as keys (backend, data, method, "
                   "cle, bias_correction, adaround, ...; docs/cli.md), model and output; paths "
                   "relative to its folder. Flags given here override it.")
@click.option("--backend", "-b", type=click.Choice(_backend_names()),
              help="Inference engine whose rules place and shape the quantization (required, "
                   "here or in --config).")
@click.option("--backend-option", "backend_options", multiple=True, metavar="KEY=VALUE",
              help="A backend option, e.g. reduce_range=false (fbgemm, onnxruntime), "
                   "activations=int8 (onnxruntime), version=10000 (tensorrt). Repeatable.")
@click.option("--target-cpu", default="auto", show_default=True,
              type=click.Choice(["auto", "vnni", "amx", "avx2", "arm"]),
              help="The CPU the model is made for: vnni (x86 with VNNI/AMX), avx2 (x86 "
                   "without VNNI: the onnxruntime backend gives 7-bit weights there), arm; "
                   "auto: this CPU. The summary notes the target assumed.")
@click.option("--data", "data_path", type=EXISTING_PATH,
              help="Calibration data: .npz/.npy or an image folder. Without it: random inputs "
                   "(smoke tests only, the ranges are unfit for deployment).")
@click.option("--eval-data", "eval_path", type=EXISTING_PATH,
              help="Held-out data to compare float and quantized outputs on and to judge every "
                   "choice (auto, fallback) on (labels from the 'labels' key of an .npz). "
                   "Default: every 8th calibration sample (at most 128), held out.")
@click.option("--method", default="minmax", show_default=True,
              type=click.Choice(_method_choices()), callback=_canonical_method,
              help="Observer that sets activation ranges; auto: per tensor, the observer whose "
                   "range quantizes it with the least error (shared-scale groups together)."
                   + _ALIAS_HELP)
@click.option("--weight-method", default="minmax", show_default=True,
              type=click.Choice(_method_choices(auto=False)), callback=_canonical_method,
              help="Observer that sets weight ranges." + _ALIAS_HELP)
@click.option("--num-samples", type=click.IntRange(min=1), help="Use at most this many samples.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Samples per onnxruntime run.")
@input_axis_option
@click.option("--bits", type=click.IntRange(2, 16), help="Bits of weights and activations.")
@click.option("--weight-bits", type=click.IntRange(2, 16), help="Bits of weights (over --bits).")
@click.option("--act-bits", type=click.IntRange(2, 16), help="Bits of activations (over --bits).")
@click.option("--skip", multiple=True, metavar="NAME|OP|REGEX",
              help="Keep matching nodes float: a node name, an op type or a regex. Repeatable.")
@click.option("--plan", "plan_path", type=EXISTING_FILE,
              help="Use this (edited) plan JSON instead of the backend's placement.")
@click.option("--save-plan", "save_plan_path", type=click.Path(dir_okay=False, writable=True),
              help="Only write the backend's plan JSON to this file (edit it, pass it to --plan).")
@parallel_options("calibrate row windows of the data and run the analyses (sensitivity, fallback, "
                  "--method auto, --adaround)")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of random inputs.")
@click.option("-o", "--output", type=click.Path(),
              help="Output folder (default: <model>-<backend>/ in the current folder), or "
                   "NAME.onnx: the deployable model there, the other files beside it as "
                   "NAME.<file> (NAME.encodings, NAME.report.html, ...).")
@click.option("--force", is_flag=True,
              help="Replace an output qtool wrote (a folder or files listed in its manifest), "
                   "or an existing --save-plan file; anything else is never replaced.")
@click.option("--layerwise/--no-layerwise", default=False,
              help="Add per-tensor SQNR (worst first) to the report.")
@click.option("--sensitivity/--no-sensitivity", default=False,
              help="Measure each layer quantized alone (one pass over the data per layer) and "
                   "rank the layers in the report.")
@click.option("--target-sqnr", type=float, metavar="DB",
              help="Keep the most sensitive layers float, one by one, until the output SQNR on "
                   "the evaluation data (or held-out split) reaches DB.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0.0), metavar="PTS",
              help="Keep the most sensitive layers float until the top-1 accuracy on the "
                   "evaluation data (needs 'labels') is at most PTS points below float; with "
                   "--task, until its drop is: CER rise (ctc), 100 - mAP@0.5 (detect), "
                   "100 - top-1 agreement (classify without labels).")
@task_options
@click.option("--cle/--no-cle", default=None,
              help="Cross-layer equalization (Conv/Gemm pairs through ReLU) and high-bias "
                   "absorption before planning: evens per-channel weight ranges for per-tensor "
                   "backends. Default: on for backends with per-tensor weights (academic, tvm, "
                   "snpe), off for the others.")
@click.option("--bias-correction", type=click.Choice(["exact", "fast", "off"]),
              is_flag=False, flag_value=BIAS_CORRECTION_DEFAULT, default=None,
              help="Add each quantized layer's mean output error on the calibration data to "
                   "its bias: exact (one pass of the quantized model, layer after layer) or "
                   "fast (each layer's own error on its mean input, as NNCF's). "
                   f"[default: {BIAS_CORRECTION_DEFAULT}, except in transformers, where it "
                   "is off unless named]")
@click.option("--no-bias-correction", is_flag=True, help="Same as --bias-correction off.")
@click.option("--smoothquant", "smoothquant", is_flag=False, flag_value="search", default=None,
              metavar="[ALPHA|off]",
              help="SmoothQuant: move activation outlier channels into the MatMul/Gemm weights "
                   "(alpha in [0, 1]; without a value, alpha is judged on held-out data). "
                   "Default: on where transformer blocks read outlier channels; 'off' never.")
@click.option("--fail-under-sqnr", type=float, metavar="DB",
              help="Exit 1 when an output's (or output slice's) SQNR on the evaluation data is "
                   "below DB (the report always warns below 10 dB, or below DB when given).")
@click.option("--fail-on-floor", is_flag=True,
              help="Exit 1 on any floor breach the summary warns about: SQNR of an output, "
                   "an output slice or the kernel path, or the task's floor (top-1 agreement "
                   "90%, mAP@0.5 vs float 80%, CER rise 2 pts).")
@click.option("--requantize", is_flag=True,
              help="Accept a model that already holds QuantizeLinear/DequantizeLinear pairs: "
                   "strip them back to float (weights keep their quantized values) and "
                   "quantize again. Without it such a model is refused.")
@click.option("--adaround/--no-adaround", default=False,
              help="Learn the rounding of Conv/Gemm weights on the calibration data (AdaRound; "
                   "needs the qat extra).")
@click.option("--adaround-iters", default=200, show_default=True, type=click.IntRange(min=1),
              metavar="N", help="AdaRound optimisation steps per layer.")
@click.option("--analysis", "analysis_level", default="summary", show_default=True,
              type=click.Choice(["none", "summary", "full"]),
              help="After quantizing: nothing; compare the outputs on the evaluation data "
                   "(streamed); or also the error of every quantized tensor and histograms.")
@click.option("--memory-budget", default=64, show_default=True, type=click.IntRange(min=1),
              metavar="MB", help="MB of observed tensors per onnxruntime run of the "
                                 "calibration; bigger batches run as micro-batches. Also "
                                 "the activations bias correction keeps in memory.")
@click.option("--weight-only", is_flag=True,
              help="Quantize only MatMul/Gemm weights, blockwise (int4 by default; "
                   "--weight-bits 8); activations stay float. See docs/cli.md.")
@click.option("--block-size", default=128, show_default=True,
              type=click.Choice(["32", "64", "128"]), help="--weight-only: input channels "
                                                          "per block.")
@click.option("--weight-algorithm", type=click.Choice(["rtn", "hqq", "gptq", "awq"]),
              help="--weight-only rounding (default: awq with --data, else hqq).")
@click.option("--precision", type=click.Choice(["int8", "fp8"]), default="int8",
              show_default=True, help="fp8: E4M3FN Q/DQ (opset 19) for tensorrt, and for "
                                      "onnxruntime as a simulation.")
@preprocess_options
@provider_option
@_quiet_option
@debug_option
@click.pass_context
def calibrate(ctx, model, backend, backend_options, target_cpu, data_path, eval_path, method,
              weight_method, num_samples, batch_size, bits, weight_bits, act_bits, skip, plan_path,
              save_plan_path, workers, executor, seed, output, force, layerwise, sensitivity,
              target_sqnr, max_accuracy_drop, task, task_options, task_decoder, cle,
              bias_correction, no_bias_correction, fail_under_sqnr, fail_on_floor, adaround,
              adaround_iters,
              analysis_level, memory_budget, quiet, provider, preprocess_file, input_axes=(),
              config_path=None, requantize=False, weight_only=False, block_size="128",
              weight_algorithm=None, precision="int8", smoothquant=None, **image_flags):
    """Quantize MODEL for a backend: calibrate, write the model, vendor files and a report.

    The output folder gets the quantized model, the backend's files (encodings, calibration
    cache, ...), plan.json, report.json, report.md and report.html; it is written whole or
    not at all. On a terminal each phase prints its time and long ones show a bar.

    \b
    Example:
      qtool calibrate examples/digits_cnn.onnx --backend snpe \\
          --data examples/digits_calib.npz --eval-data examples/digits_val.npz -o out/
      qtool calibrate examples/digits_cnn.onnx --backend tensorrt --method auto \\
          --data examples/digits_calib.npz --target-sqnr 35 -o out/
      qtool calibrate model.onnx -b snpe --data images/ --resize 0 --mean 0.5 \\
          --std 0.5 -o model.int8.onnx   # + model.int8.encodings, ...
      qtool calibrate --config calib.yaml --method mse   # the file's options, mse
    """  # noqa: D301  (click reads \b as a no-rewrap marker)
    from qtool import progress
    from qtool.report import summary_table
    from qtool.workflow import CalibrateOptions, calibrate_to_folder

    options = CalibrateOptions(
        data=data_path, eval_data=eval_path, method=method, weight_method=weight_method,
        num_samples=num_samples, batch_size=batch_size,
        weight_bits=weight_bits or bits, act_bits=act_bits or bits, skip=tuple(skip),
        plan=plan_path, workers=workers, executor=executor, seed=seed, layerwise=layerwise,
        progress=False if quiet else None, sensitivity=sensitivity, target_sqnr=target_sqnr,
        max_accuracy_drop=max_accuracy_drop, providers=provider,
        task=task, task_options=tuple(task_options), task_decoder=task_decoder,
        preprocess=_preprocessing(preprocess_file, **image_flags),
        backend_options=tuple(backend_options), target_cpu=target_cpu,
        adaround=adaround, adaround_iters=adaround_iters,
        cle=cle, bias_correction=_bias_correction(bias_correction, no_bias_correction),
        fail_under_sqnr=fail_under_sqnr,
        input_axes=input_axes,
        analysis=analysis_level, memory_budget=memory_budget * 2**20,
        requantize=requantize,
        smoothquant=smoothquant,
    )
    if config_path is not None:
        from qtool.calibrate_config import load_calibrate_config

        config = load_calibrate_config(config_path)
        options = config.options(options, _given_parameters(ctx))
        model, backend = model or config.model, backend or config.backend
        output = output if output is not None else config.output
    if model is None:
        raise click.UsageError("give MODEL, or a --config with a 'model' key")
    if backend is None:
        raise click.UsageError("give --backend, or a --config with a 'backend' key")
    if weight_only or precision == "fp8":  # their own jobs (qtool.weight_only, qtool.fp8)
        from qtool.weight_only.run import run_special

        result = run_special(model, backend, output, options, force=force, weight_only=weight_only,
                             block_size=int(block_size), algorithm=weight_algorithm,
                             precision=precision)
        if not quiet:
            click.echo(result.summary)
        return
    with progress.shown(False if quiet else None):
        result = calibrate_to_folder(model, backend, output, options, force=force,
                                     save_plan=save_plan_path)
    if not quiet:
        if result.report is None:
            click.echo(f"plan written to {result.output}")
        else:
            click.echo(_with_paths(summary_table(result.report, str(result.output)),
                                   result.paths), nl=False)
    failure = (result.report or {}).get("kernel_failure")
    if failure:  # the deployable file does not run in the engine it was made for
        click.echo(f"error: {failure}", err=True)
        click.echo("hint: the files were written; report the model, or keep the op that "
                   "fails float with --skip", err=True)
        ctx.exit(1)
    below = (result.report or {}).get("sqnr_floor", {}).get("below")
    if options.fail_under_sqnr is not None and below:
        from qtool.report.sqnr_floor import FAIL_EXIT

        names = ", ".join(f"{b.get('slice') or b['output']} ({b['sqnr_db']:.2f} dB)"
                          for b in below)
        click.echo(f"error: SQNR below --fail-under-sqnr {options.fail_under_sqnr:g} dB: "
                   f"{names}", err=True)
        ctx.exit(FAIL_EXIT)
    if fail_on_floor and result.report is not None:
        from qtool.report.floors import breaches
        from qtool.report.sqnr_floor import FAIL_EXIT

        found = breaches(result.report)
        if found:
            click.echo(f"error: below the floors (--fail-on-floor): {'; '.join(found)}",
                       err=True)
            ctx.exit(FAIL_EXIT)


def _given_parameters(ctx: click.Context) -> set[str]:
    """The parameters given on the command line (or the environment), not defaulted."""
    from click.core import ParameterSource

    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name for name in ctx.params if ctx.get_parameter_source(name) in given}


def _with_paths(summary: str, paths) -> str:
    """For ``-o NAME.onnx``: the summary's files line names the files written."""
    if not paths:
        return summary
    lines = summary.splitlines()
    shown = "  files: " + ", ".join(sorted(paths.values()))
    lines = [shown if line.startswith("  files: ") else line for line in lines]
    return "\n".join(lines) + "\n"


@main.command()
@click.argument("models", metavar="MODEL...", nargs=-1, required=True, type=click.Path())
@click.option("--backend", "-b", type=click.Choice(_backend_names()),
              help="Also check the backend's rules (schemes, shared scales, float ops).")
@click.option("--format", "fmt", default="text", show_default=True,
              type=click.Choice(["text", "json", "sarif", "junit"]), help="Output format.")
@click.option("--fail-on", default="error", show_default=True,
              type=click.Choice(["error", "warning", "note"]),
              help="Exit 1 when a finding is at or above this severity.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the report to this file instead of stdout.")
@debug_option
@click.pass_context
def lint(ctx, models, backend, fmt, fail_on, output):
    """Check models: float readiness and QDQ validity. Exit 0 clean, 1 findings, 2 cannot run.

    A model that cannot be read does not stop the others: it is a QT000 error in the
    output (every format, so a SARIF upload still happens) and the exit code is 2.

    Float models are checked for what stops quantization (invalid graph, opset, custom
    domains, dynamic dims, NaN/Inf or unused weights, and with --backend the nodes it would
    leave float); QDQ models, from qtool or other tools, for Q/DQ structure, shared Concat
    scales and, with --backend, the backend's zero points, integer types and scale forms.

    \b
    Example:
      qtool lint model.onnx --backend tensorrt --format sarif -o qtool.sarif
    """  # noqa: D301  (click reads \b as a no-rewrap marker)
    from qtool.lint.formats import lint_and_render

    def unreadable(model: str, exc: QtoolError) -> None:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)

    ctx.meta[_ERROR_EXIT_KEY] = 2
    text, code = lint_and_render(models, backend=backend, fmt=fmt, fail_on=fail_on, output=output,
                                 on_error=unreadable)
    if output is None:
        click.echo(text, nl=False)
    ctx.exit(code)


@main.command()
@click.argument("model", type=EXISTING_FILE)
@click.option("--backend", "-b", "backends", multiple=True, type=click.Choice(_backend_names()),
              help="Only these backends (repeatable; default: all).")
@click.option("--format", "fmt", default="text", show_default=True,
              type=click.Choice(["text", "json"]), help="Output format.")
@debug_option
def inspect(model, backends, fmt):
    """Show MODEL's opset, inputs/outputs, op histogram and what each backend would quantize.

    \b
    Example:
      qtool inspect examples/digits_cnn.onnx
    """  # noqa: D301  (click reads \b as a no-rewrap marker)
    from qtool.inspection import inspect_model

    click.echo(inspect_model(model, backends=backends or None).render(fmt), nl=False)


@main.command()
@click.argument("float_model", metavar="FLOAT", type=EXISTING_FILE)
@click.argument("quant_model", metavar="QUANT", type=EXISTING_FILE)
@click.option("--data", "data_path", required=True, type=EXISTING_PATH,
              help="Evaluation data: .npz/.npy (labels from the 'labels' key) or image folder.")
@click.option("--layerwise", is_flag=True, help="Per-tensor SQNR, worst layers first.")
@task_options
@click.option("--num-samples", type=click.IntRange(min=1), help="Use at most this many samples.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Samples per onnxruntime run.")
@input_axis_option
@parallel_options("evaluate row windows of the data")
@click.option("--format", "fmt", default="text", show_default=True,
              type=click.Choice(["text", "json"]), help="Output format.")
@preprocess_options
@provider_option
@debug_option
def evaluate(float_model, quant_model, data_path, layerwise, task, task_options, task_decoder,
             num_samples, batch_size, workers, executor, fmt, provider, preprocess_file,
             input_axes=(), **image_flags):
    """Compare QUANT with FLOAT: SQNR, cosine, max abs error, top-1 agreement per output.

    With --task, the task's metric beside them: top-1 (classify), CER and line accuracy
    after greedy CTC decoding (ctc; labels: an int array [N, L] padded with -1), mAP@0.5
    against the float model's detections (detect).

    \b
    Example:
      qtool evaluate examples/digits_cnn.onnx out/model.qdq.onnx \\
          --data examples/digits_val.npz --layerwise
    """  # noqa: D301  (click reads \b as a no-rewrap marker)
    from qtool.workflow import evaluate_files

    evaluation = evaluate_files(float_model, quant_model, data_path, layerwise=layerwise,
                                num_samples=num_samples, batch_size=batch_size,
                                preprocess=_preprocessing(preprocess_file, **image_flags),
                                providers=provider, input_axes=dict(input_axes),
                                workers=workers, executor=executor, task=task,
                                task_options=tuple(task_options), task_decoder=task_decoder)
    click.echo(evaluation.render(fmt), nl=False)


@main.command()
@click.argument("run_folder", metavar="RUN_FOLDER|NAME.onnx",
                type=click.Path(exists=True, readable=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="HTML file to write (default: RUN_FOLDER/report.html, or NAME.report.html).")
@debug_option
def report(run_folder, output):
    """Render the HTML report of a saved `qtool calibrate` run from its report.json.

    RUN_FOLDER is the folder of the run, or NAME.onnx for a run written with -o NAME.onnx.

    \b
    Example:
      qtool report out/ -o out/report.html
    """  # noqa: D301  (click reads \b as a no-rewrap marker)
    from qtool.workflow import render_report

    click.echo(f"wrote {render_report(run_folder, output)}")


@main.command()
@click.argument("model", type=EXISTING_FILE)
@click.option("--data", "data_path", required=True, type=EXISTING_PATH,
              help="Calibration data: .npz/.npy or an image folder.")
@click.option("--eval-data", "eval_path", type=EXISTING_PATH,
              help="Evaluation data (accuracy from the 'labels' key of an .npz). Default: --data.")
@click.option("--backend", "-b", "backends", multiple=True, type=click.Choice(_backend_names()),
              help="Rows of the table (repeatable; default: all backends).")
@click.option("--method", "-m", "methods", multiple=True,
              type=click.Choice(_method_choices()), callback=_canonical_method,
              help="Columns of the table (repeatable; default: every observer)." + _ALIAS_HELP)
@click.option("--sweep-backend", type=click.Choice(_backend_names()),
              help="Backend of the bit-width sweep (default: the first row).")
@click.option("--sweep-method", type=click.Choice(_method_choices()),
              callback=_canonical_method,
              help="Method of the bit-width sweep (default: the first column).")
@click.option("--no-sweep", is_flag=True, help="Skip the bit-width sweep.")
@click.option("--num-samples", type=click.IntRange(min=1), help="Use at most this many samples.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Samples per onnxruntime run.")
@parallel_options("compute cells of the table")
@click.option("--format", "fmt", default="text", show_default=True,
              type=click.Choice(["text", "markdown", "json"]), help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the table to this file instead of stdout.")
@provider_option
@_quiet_option
@debug_option
def compare(model, data_path, eval_path, backends, methods, sweep_backend, sweep_method,
            no_sweep, num_samples, batch_size, workers, executor, fmt, output, provider, quiet):
    """Compare backends x calibration methods on MODEL, then sweep bit widths.

    Each cell is the worst output SQNR in dB (and top-1 accuracy with labels) of the model
    quantized for that backend with that method. The sweep (W8A8, W4A8, W4A4, mixed) adds
    model size and bit operations per inference (MACs x weight bits x activation bits).

    \b
    Example:
      qtool compare examples/digits_cnn.onnx --data examples/digits_calib.npz \\
          --eval-data examples/digits_val.npz -b tensorrt -b snpe -m minmax -m mse
    """  # noqa: D301  (click reads \b as a no-rewrap marker)
    from qtool import progress, providers
    from qtool.analysis.compare import compare as compare_models
    from qtool.io import atomic_write_text

    with providers.use(providers.resolve(provider)), progress.shown(False if quiet else None):
        result = compare_models(
            model, data_path, eval_data=eval_path, backends=backends or None,
            methods=methods or None, sweep_backend="" if no_sweep else sweep_backend,
            sweep_method=sweep_method, num_samples=num_samples, batch_size=batch_size,
            workers=workers, executor=executor,
        )
    text = result.render(fmt)
    if output is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(output, text)
    failed = [(f"{c.backend} x {c.method}", c.error) for c in result.cells if c.error]
    failed += [(f"sweep {r.precision}", r.error) for r in result.sweep or () if r.error]
    if failed:
        where, message = failed[0]
        click.echo(f"error: {len(failed)} cell(s) failed; {where}: {message}", err=True)
        click.echo("hint: rerun `qtool calibrate` with that backend and method and --debug",
                   err=True)
        click.get_current_context().exit(COMPARE_FAILED_EXIT)


@main.command()
@click.argument("model", type=EXISTING_FILE)
@click.option("--backend", "-b", required=True, type=click.Choice(_backend_names()))
@click.option("--data", "data_path", required=True, type=EXISTING_FILE,
              help=".npz: one array per model input; optional 'labels' (else distils the float "
              "model).")
@click.option("--algorithm", "-a", default="lsq", show_default=True,
              type=click.Choice(["lsq", "lsq+", "pact", "dorefa", "dsq"]))
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-5, show_default=True,
              type=click.FloatRange(min=0.0, min_open=True),
              help="Peak learning rate of the weights (small: the model is pretrained).")
@click.option("--quant-lr", default=1e-3, show_default=True,
              type=click.FloatRange(min=0.0, min_open=True),
              help="Peak learning rate of the quantizer parameters, relative to each one's size.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--bn-strategy", default=0, show_default=True, type=click.IntRange(0, 4),
              help="MQBench BN folding strategy (1-4 keep the model's BN for training).")
@click.option("--recalibrate-bn", is_flag=True, help="Re-estimate BN statistics after PTQ.")
@click.option("--method", default="minmax", show_default=True,
              type=click.Choice(_method_choices(auto=False)), callback=_canonical_method,
              help="Calibration that initialises the scales." + _ALIAS_HELP)
@click.option("--weight-bits", type=click.IntRange(2, 16))
@click.option("--act-bits", type=click.IntRange(2, 16))
@click.option("--eval-data", "eval_path", type=EXISTING_FILE,
              help="Held-out .npz that picks the best epoch and scores the report (top-1 too "
                   "with 'labels'). Default: --holdout of the training data.")
@click.option("--holdout", default=0.1, show_default=True,
              type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              help="Without --eval-data, the fraction of the training samples held out.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True,
              help="Replace an output folder qtool wrote (never one with other files).")
@debug_option
def qat(model, backend, data_path, algorithm, epochs, lr, quant_lr, batch_size, bn_strategy,
        recalibrate_bn, method, weight_bits, act_bits, eval_path, holdout, output, force):
    """Quantization-aware training of MODEL for a backend, exported through its emitter.

    Needs the qat extra (pip install "qtool[qat]").

    \b
    Example:
      qtool qat examples/digits_cnn.onnx -b tvm -a lsq --weight-bits 4 --act-bits 4 \\
          --data train.npz --eval-data examples/digits_val.npz --epochs 10 -o out-qat/
    """  # noqa: D301  (click reads \b as a no-rewrap marker)
    from qtool.qat import QatOptions, qat_to_folder  # QtoolError 'pip install "qtool[qat]"'

    options = QatOptions(algorithm=algorithm, epochs=epochs, lr=lr, quant_lr=quant_lr,
                         batch_size=batch_size, bn_strategy=bn_strategy,
                         recalibrate_bn=recalibrate_bn, method=method, weight_bits=weight_bits,
                         act_bits=act_bits, eval_data=eval_path, holdout=holdout)
    folder, report = qat_to_folder(model, backend, data_path, output, options, force=force)
    accuracy = report.get("accuracy")
    click.echo(f"wrote {folder}" + (f" (top-1 float {accuracy['float']:.3f}, ptq "
               f"{accuracy['ptq']:.3f}, qat {accuracy['qat']:.3f})" if accuracy else ""))
    held = report["held_out"]
    click.echo(f"held-out SQNR ({held['data']}): ptq {held['ptq']['sqnr_db']:.2f} dB, exported "
               f"{held['qat']['sqnr_db']:.2f} dB; "
               + (f"best epoch {held['best_epoch']}" if held["improved"]
                  else "training did not improve on PTQ, the PTQ model was written"))


@main.command()
@click.argument("recipe", required=False, type=EXISTING_FILE)
@click.argument("model", required=False, type=EXISTING_FILE)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output .onnx file (over the recipe's 'output').")
@click.option("--force", is_flag=True, help="Replace an existing output file (never MODEL).")
@click.option("--list-passes", is_flag=True, help="List the passes and their options, then exit.")
@debug_option
def run(recipe, model, output, force, list_passes):
    """Run the pass pipeline of a RECIPE (YAML/JSON) on a model.

    The recipe has 'passes' (names, or {name: {option: value}}) and optionally 'model'
    and 'output' (paths relative to the recipe's folder); MODEL and -o override them.
    Without an output the result goes beside the model as <stem>.out.onnx.

    \b
    Example recipe (prepare.yaml):
      model: model.onnx
      output: model.prepared.onnx
      passes: [cleanup, fold_bn, {upgrade_opset: {target: 13}}]

    \b
    Example:
      qtool run prepare.yaml
      qtool run prepare.yaml other.onnx -o other.prepared.onnx
    """  # noqa: D301  (click reads \b as a no-rewrap marker)
    from qtool.workflow import describe_passes, run_recipe

    if list_passes:
        click.echo(describe_passes(), nl=False)
        return
    if recipe is None:
        raise click.UsageError("give a RECIPE file (or --list-passes)")
    result = run_recipe(recipe, model=model, output=output, force=force)
    click.echo(result.render(), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
