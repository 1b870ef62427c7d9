"""``qtool calibrate --weight-only``: weight-only quantization to an output folder.

    load -> prepare (cleanup, fold_bn, opset >= 13; opset 21 for DequantizeLinear forms)
         -> split: --eval-data, else a held-out split of the calibration data
         -> quantize_layers (qtool.weight_only.quantize): stats streamed, rounding, rewrite
         -> evaluate the written model against the float one on the held-out data
         -> files: the model (and QNN's encodings), report.json, report.md

The output folder is written whole or not at all (:mod:`qtool.output`), like every run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtool.errors import DataError, PrecisionError, WeightOnlyError
from qtool.weight_only.formats import BLOCK_SIZES, WEIGHT_BITS, BlockFormat
from qtool.weight_only.quantize import (
    DATA_AWARE,
    DATA_FREE_ALGORITHM,
    DEFAULT_ALGORITHM,
    quantize_layers,
)
from qtool.weight_only.targets import target_for

#: The deployable model's file name per form.
MODEL_FILES = {"matmulnbits": "model.onnx", "dq": "model.qdq.onnx", "lpbq": "model.onnx"}
DQ_OPSET = 21


@dataclass(frozen=True)
class WeightOnlyOptions:
    """Options of :func:`weight_only_to_folder` (the ``--weight-only`` flags).

    Attributes:
        bits: Weight bits (4 or 8).
        block_size: Input channels per block (32, 64, 128).
        algorithm: ``rtn``, ``hqq``, ``gptq`` or ``awq``
            (:data:`qtool.weight_only.quantize.ALGORITHMS`); None: ``awq`` with ``data``,
            ``hqq`` (data-free) without.
        backend_options: ``KEY=VALUE`` texts or a mapping (onnxruntime: ``format``,
            ``symmetric``).
        data, eval_data, num_samples, batch_size, seed, input_axes, preprocess,
        memory_budget: As in :class:`qtool.workflow.CalibrateOptions`.
        analysis: ``none`` skips the comparison with the float model.
    """

    bits: int = 4
    block_size: int = 32
    algorithm: str | None = None
    backend_options: Any = ()
    data: str | os.PathLike | None = None
    eval_data: str | os.PathLike | None = None
    num_samples: int | None = None
    batch_size: int = 32
    seed: int = 0
    input_axes: tuple[tuple[str, int | None], ...] = ()
    preprocess: Any = None
    memory_budget: int | None = 64 * 2**20
    analysis: str = "summary"


def quantize_weights(model, backend: str, options: WeightOnlyOptions = WeightOnlyOptions()):
    """``(files, report)`` of a weight-only run, in memory."""
    from qtool.analysis.evaluate import evaluate
    from qtool.calibrate_job import split_data
    from qtool.io import load, serialize
    from qtool.keyvalue import option_pairs
    from qtool.passes.opset import ensure_opset
    from qtool.prepare import prepare
    from qtool.samples import labelled_batches

    if options.bits not in WEIGHT_BITS:
        raise WeightOnlyError(f"--weight-bits {options.bits} with --weight-only",
                              f"use one of: {', '.join(map(str, WEIGHT_BITS))}")
    if options.block_size not in BLOCK_SIZES:
        raise WeightOnlyError(f"--block-size {options.block_size}",
                              f"use one of: {', '.join(map(str, BLOCK_SIZES))}")
    try:
        backend_options = dict(option_pairs(options.backend_options))
    except ValueError as exc:
        raise WeightOnlyError(f"--backend-option {exc.args[0]!r} is not KEY=VALUE") from exc
    target, form, symmetric = target_for(backend, options.bits, backend_options)
    algorithm = options.algorithm or (DEFAULT_ALGORITHM if options.data is not None
                                      else DATA_FREE_ALGORITHM)
    if algorithm in DATA_AWARE and options.data is None:
        raise DataError(f"--weight-algorithm {algorithm} needs calibration data",
                        "give --data, or use --weight-algorithm rtn or hqq")
    fmt = BlockFormat(options.bits, options.block_size, symmetric)
    graph, passes = prepare(load(model))
    if form in ("dq", "lpbq"):
        graph = ensure_opset(graph, DQ_OPSET)
    if algorithm in DATA_AWARE or options.analysis != "none":
        calib, held_out, eval_path, judged_on = split_data(graph, options)
    else:
        calib = held_out = eval_path = judged_on = None
    float_graph = graph.copy()
    layers, kept, quantized = quantize_layers(
        graph, fmt, form, algorithm, calib, batch_size=options.batch_size,
        memory_budget=options.memory_budget)
    files = {MODEL_FILES[form]: serialize(graph)}
    if form == "lpbq":
        files.update(_qnn_files(graph, float_graph, quantized, fmt))
    report: dict[str, Any] = {
        "model": Path(model).as_posix() if isinstance(model, (str, os.PathLike)) else "<graph>",
        "backend": target.backend,
        "mode": "weight-only",
        "weights": {"bits": fmt.bits, "block_size": fmt.block_size, "symmetric": symmetric,
                    "form": form, "algorithm": algorithm},
        "passes": [p.name for p in passes if getattr(p, "changed", True)],
        "layers": [layer.to_dict() for layer in layers],
        "kept_float": kept,
    }
    if options.analysis != "none":
        model_file = files[MODEL_FILES[form]]
        evaluation = evaluate(float_graph, model_file,
                              labelled_batches(held_out, eval_path, options.batch_size))
        report["evaluation"] = {"data": judged_on, **evaluation.to_dict()}
    files["report.json"] = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
    files["report.md"] = _markdown(report).encode()
    return dict(sorted(files.items())), report


def _qnn_files(graph, float_graph, quantized, fmt) -> dict[str, bytes]:
    """QNN's files: the float model on the LPBQ grid, its encodings, the INT4 QDQ reference.

    ``model.onnx`` has the dequantized weights (what the converter quantizes with the
    encodings gives back the same levels); ``model.qdq.onnx`` is the DequantizeLinear graph
    built by :func:`quantize_weights`.
    """
    from qtool.io import serialize
    from qtool.weight_only.emit import replace_layer
    from qtool.weight_only.layers import find_layers
    from qtool.weight_only.lpbq import encoding, encodings_file

    qdq = serialize(graph)
    graph_float = float_graph.copy()
    layers, _ = find_layers(graph_float, fmt.block_size)
    params = []
    for layer in layers:
        result = quantized.get(layer.name)
        if result is None:
            continue
        # the weight the converter quantizes with the encoding: already on its grid
        replace_layer(graph_float, layer, result, "float")
        params.append(encoding(f"{layer.name}_weight_dequantized", result.scale,
                               fmt.block_size, fmt.bits))
    graph_float.cleanup().toposort()
    encodings = encodings_file(params)
    return {"model.onnx": serialize(graph_float), "model.qdq.onnx": qdq,
            "model.encodings": (json.dumps(encodings, indent=2) + "\n").encode()}


def _markdown(report: dict[str, Any]) -> str:
    weights = report["weights"]
    lines = [f"# qtool weight-only: {report['model']} for {report['backend']}", "",
             f"{weights['bits']}-bit weights, blocks of {weights['block_size']}, "
             f"{'symmetric' if weights['symmetric'] else 'asymmetric'}, form "
             f"{weights['form']}, algorithm {weights['algorithm']}; activations float.", ""]
    for out in report.get("evaluation", {}).get("outputs", []):
        lines.append(f"- output {out['name']}: SQNR {out['sqnr_db']} dB on "
                     f"{report['evaluation']['data']}")
    lines += ["", "| layer | K | N | output error | RTN error | AWQ alpha | input scaling |",
              "|---|---|---|---|---|---|---|"]
    for layer in report["layers"]:
        lines.append(f"| {layer['node']} | {layer['k']} | {layer['n']} | "
                     f"{layer.get('output_error', '')} | {layer.get('rtn_output_error', '')} | "
                     f"{layer.get('awq_alpha', '')} | {layer.get('input_scaling', '')} |")
    for node, reason in report["kept_float"].items():
        lines.append(f"\nkept float: {node}: {reason}")
    return "\n".join(lines) + "\n"


@dataclass
class SpecialRun:
    """What a ``--weight-only`` or ``--precision fp8`` run wrote, and its summary line."""

    output: Path
    files: dict
    report: dict
    paths: dict
    summary: str


#: CalibrateOptions fields (flag) the int8 flow reads and these jobs do not.
_COMMON_UNUSED = {"plan": "--plan", "adaround": "--adaround", "sensitivity": "--sensitivity",
                  "target_sqnr": "--target-sqnr", "max_accuracy_drop": "--max-accuracy-drop",
                  "skip": "--skip", "workers": "--workers", "act_bits": "--act-bits",
                  "task": "--task", "fail_under_sqnr": "--fail-under-sqnr"}
WEIGHT_ONLY_UNUSED = {**_COMMON_UNUSED, "method": "--method",
                      "weight_method": "--weight-method"}
FP8_UNUSED = {**_COMMON_UNUSED, "weight_bits": "--weight-bits/--bits",
              "weight_method": "--weight-method"}


def _refuse_unused(options, unused: dict[str, str], mode: str) -> None:
    """A flag of the int8 flow given to a job that would ignore it is an error, not a no-op."""
    from qtool.options import CalibrateOptions

    defaults = CalibrateOptions()
    for name, flag in unused.items():
        if getattr(options, name) != getattr(defaults, name):
            error = WeightOnlyError if mode == "--weight-only" else PrecisionError
            raise error(f"{flag} does not apply to {mode}",
                        f"drop {flag}, or run without {mode}")
    if mode != "--weight-only" and options.method == "auto":
        raise PrecisionError("--method auto does not apply to --precision fp8",
                             "give a method such as minmax, mse or quantile")


def run_special(model, backend: str, output, options, *, force: bool, weight_only: bool,
                block_size: int, algorithm: str | None, precision: str) -> SpecialRun:
    """The CLI's ``--weight-only`` / ``--precision fp8`` job (``options``: CalibrateOptions).

    Raises:
        WeightOnlyError: Both flags, or flags of the int8 flow that do not apply.
    """
    from dataclasses import replace

    from qtool.output import (
        check_file_output,
        fill_folder,
        is_file_output,
        staging_folder,
        write_beside,
    )
    from qtool.workflow import default_output

    if weight_only and precision == "fp8":
        raise WeightOnlyError("--weight-only and --precision fp8 together",
                              "choose one: int4/int8 weights with float activations, or "
                              "FP8 weights and activations")
    _refuse_unused(options, WEIGHT_ONLY_UNUSED if weight_only else FP8_UNUSED,
                   "--weight-only" if weight_only else "--precision fp8")
    if weight_only:
        wo = WeightOnlyOptions(
            bits=options.weight_bits or 4, block_size=block_size, algorithm=algorithm,
            backend_options=options.backend_options, data=options.data,
            eval_data=options.eval_data, num_samples=options.num_samples,
            batch_size=options.batch_size, seed=options.seed, input_axes=options.input_axes,
            preprocess=options.preprocess, memory_budget=options.memory_budget,
            analysis=options.analysis)

        def job():
            return quantize_weights(model, backend, wo)
    else:
        from qtool.fp8 import quantize_fp8

        def job():
            return quantize_fp8(model, backend, replace(options))
    if is_file_output(output):
        check_file_output(output, force=force, inputs=[model])
        files, report = job()
        paths = write_beside(output, files, force=force, inputs=[model])
        where = Path(output)
    else:
        where = Path(output) if output is not None else default_output(model, backend)
        with staging_folder(where, force=force, inputs=[model]) as staging:
            files, report = job()
            fill_folder(staging, files)
        paths = {}
    sqnr = [f"{o['name']} {o['sqnr_db']} dB"
            for o in report.get("evaluation", {}).get("outputs", [])]
    kind = (f"weight-only int{report['weights']['bits']} ({report['weights']['algorithm']}, "
            f"{report['weights']['form']})" if weight_only else "fp8 E4M3 Q/DQ")
    summary = (f"{kind} for {backend} -> {where}"
               + (f"\n  SQNR: {', '.join(sqnr)}" if sqnr else "")
               + f"\n  files: {', '.join(sorted(paths.values()) or sorted(files))}")
    return SpecialRun(where, files, report, paths, summary)
