r"""Does the Q/DQ reference hold in onnxruntime's integer kernels? Measured, and flagged by rule.

``model.qdq.onnx`` is judged with onnxruntime's graph optimizations off: every
DequantizeLinear runs in float, the pure Q/DQ simulation. With the default optimizations
onnxruntime fuses ``DQ -> op -> Q`` into integer kernels (QLinearConv, QGemm, ...), and on x86
CPUs without VNNI those multiply u8 x s8 with ``vpmaddubsw``, which sums pairs of products
into a *saturating* int16: with ``A`` activation levels (s8 activations are shifted to u8)
and weights up to ``|W|`` levels, a pair reaches ``2 * (A - 1) * |W|``, which overflows 32767
for 8-bit activations and 8-bit weights (255 * 127 * 2 = 64770). Hence two checks:

* **measured**: the output SQNR against the float model, simulated and in the kernels, on the
  first ``max_samples`` evaluation samples (this CPU; a loss over ``MAX_LOSS_DB`` warns);
* **rule**: :func:`saturation_risk` from the backend's schemes (any x86 CPU without VNNI). It
  warns only where the model is made for such a CPU: the target (:mod:`qtool.cpu`) is the
  ``onnxruntime`` backend's ``target_cpu`` option, else ``--target-cpu``, else the CPU qtool
  runs on. On a target with VNNI/AMX or on ARM it is a one-line note about other CPUs.

A QDQ model that onnxruntime cannot load or run with its default optimizations (a cubic
Resize that its uint8 kernel refuses, ...) is a WARNING naming the error, and, on the
``onnxruntime`` backend, whose deployable file it is, a failure of the run
(:meth:`KernelCheck.failure`; the CLI exits 1 after writing the files).

When the ``openvino`` package is importable, the same samples also run in OpenVINO's CPU
plugin (``INFERENCE_PRECISION_HINT=f32``, so that bf16 CPUs do not run the float parts in
bf16): :class:`OpenVinoCheck` gives its SQNR, which weighted layers run in u8/i8 and which
in f32, and fails the same way for the ``openvino`` backend.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qtool.analysis.recorded import RecordedRuns, model_key
from qtool.cpu import CpuTarget, resolve_target

#: A kernel run losing more than this (dB) against the simulation is reported.
MAX_LOSS_DB = 1.0
#: Rows the check compares (the first of the evaluation data).
MAX_SAMPLES = 64
_INT16_MAX = 32767


@dataclass
class KernelCheck:
    """Simulation vs onnxruntime's integer kernels for one quantized model.

    Attributes:
        samples: Rows compared (0: the check could not run).
        simulated_sqnr_db: Output SQNR vs float, optimizations off (None: exact).
        kernels_sqnr_db: Output SQNR vs float, default optimizations (None: exact).
        saturation_risk: The schemes overflow ``vpmaddubsw`` on x86 without VNNI.
        vnni: Whether this CPU has VNNI (None: unknown).
        error: Why onnxruntime could not load or run the model (with its default
            optimizations, or at all), or None.
        openvino: The OpenVINO CPU run (None: openvino is not installed).
        target: The CPU the model is made for (None: unknown, judged as x86 without VNNI).
    """

    samples: int
    simulated_sqnr_db: float | None
    kernels_sqnr_db: float | None
    saturation_risk: bool
    vnni: bool | None
    error: str | None = None
    openvino: OpenVinoCheck | None = None
    target: CpuTarget | None = None

    @property
    def saturates_on_target(self) -> bool:
        """The schemes overflow ``vpmaddubsw`` and the target CPU multiplies with it."""
        return self.saturation_risk and (self.target is None or self.target.saturates)

    @property
    def loss_db(self) -> float | None:
        """How much worse the kernels are than the simulation (dB), None if not measured."""
        if self.samples == 0 or self.error is not None:
            return None
        sim = math.inf if self.simulated_sqnr_db is None else self.simulated_sqnr_db
        ker = math.inf if self.kernels_sqnr_db is None else self.kernels_sqnr_db
        if math.isinf(sim) and math.isinf(ker):
            return 0.0
        return sim - ker

    def warnings(self, backend: str) -> list[str]:
        """Report lines: a measured loss, and the rule's flag."""
        lines = []
        loss = self.loss_db
        if loss is not None and loss > MAX_LOSS_DB:
            lines.append(
                f"onnxruntime's integer kernels (default optimizations) give "
                f"{_db(self.kernels_sqnr_db)} where the Q/DQ simulation gives "
                f"{_db(self.simulated_sqnr_db)}: model.qdq.onnx does not hold in onnxruntime "
                "on this CPU (use --backend onnxruntime, or reduce_range)"
            )
        if self.saturates_on_target:
            where = "" if self.target is None else (
                f" (the target CPU, {self.target.source()})")
            lines.append(
                f"{backend}'s 8-bit activations x 8-bit weights overflow onnxruntime's u8 x s8 "
                f"kernels on x86 CPUs without VNNI{where}: run model.qdq.onnx there with "
                f"optimizations off, or {_cure(backend)}"
            )
        return lines

    def notes(self, backend: str) -> list[str]:
        """Report notes: the overflow rule where the target CPU is safe from it.

        The onnxruntime backend's own note names its target and weights instead.
        """
        if not self.saturation_risk or self.saturates_on_target or backend == "onnxruntime":
            return []
        return [
            f"no u8 x s8 overflow on the target CPU ({self.target.description}, "
            f"{self.target.source()}); on x86 CPUs without VNNI {backend}'s 8-bit weights "
            f"would overflow onnxruntime's kernels: for those, {_cure(backend)} "
            "(--target-cpu avx2)"
        ]

    def failure_warnings(self) -> list[str]:
        """Report lines for an engine that could not load or run the QDQ model."""
        lines = []
        if self.error is not None:
            lines.append(
                f"model.qdq.onnx does not run in onnxruntime with its default optimizations: "
                f"{self.error} (the kernel check could not measure it; see ort_kernels.error)"
            )
        if self.openvino is not None:
            lines += self.openvino.warnings(self.simulated_sqnr_db)
        return lines

    def failure(self, backend: str) -> str | None:
        """Why the backend's own engine cannot run its deployable file, or None.

        Only for the backends whose deployable file is this QDQ model in that engine:
        ``onnxruntime`` (onnxruntime's default optimizations) and ``openvino``.
        """
        if backend == "onnxruntime" and self.error is not None:
            return f"onnxruntime cannot run model.qdq.onnx with its default optimizations: " \
                   f"{self.error}"
        if backend == "openvino" and self.openvino is not None and self.openvino.error:
            return f"OpenVINO's CPU plugin cannot run model.qdq.onnx: {self.openvino.error}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for report.json."""
        return {
            "samples": self.samples,
            "simulated_sqnr_db": _round(self.simulated_sqnr_db),
            "kernels_sqnr_db": _round(self.kernels_sqnr_db),
            "loss_db": _round(self.loss_db),
            "saturation_risk_without_vnni": self.saturation_risk,
            "cpu_vnni": self.vnni,
            "target_cpu": None if self.target is None else self.target.name,
            "error": self.error,
            "openvino": None if self.openvino is None else self.openvino.to_dict(),
        }


@dataclass
class OpenVinoCheck:
    """The QDQ model compiled by OpenVINO's CPU plugin (f32 inference precision).

    Attributes:
        sqnr_db: Output SQNR vs float on the kernel check's samples (None: exact).
        int8_layers: Weighted layers (Convolution, FullyConnected, MatMul, Deconvolution)
            whose runtime precision is u8/i8.
        float_layers: Weighted layers that run in f32 (e.g. weights with a zero point).
        error: Why OpenVINO could not compile or run the model, or None.
        version: OpenVINO's version.
    """

    sqnr_db: float | None = None
    int8_layers: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    error: str | None = None
    version: str = ""

    def loss_db(self, simulated_sqnr_db: float | None) -> float | None:
        """How much worse OpenVINO is than the simulation (dB); None if not measured."""
        if self.error is not None:
            return None
        sim = math.inf if simulated_sqnr_db is None else simulated_sqnr_db
        ov = math.inf if self.sqnr_db is None else self.sqnr_db
        return 0.0 if math.isinf(sim) and math.isinf(ov) else sim - ov

    def warnings(self, simulated_sqnr_db: float | None) -> list[str]:
        """A failure to compile or run, or a loss over ``MAX_LOSS_DB`` against the simulation."""
        if self.error is not None:
            return [f"OpenVINO's CPU plugin cannot run model.qdq.onnx: {self.error}"]
        loss = self.loss_db(simulated_sqnr_db)
        if loss is not None and loss > MAX_LOSS_DB:
            return [f"OpenVINO CPU (f32 inference precision) gives {_db(self.sqnr_db)} where "
                    f"the Q/DQ simulation gives {_db(simulated_sqnr_db)}: model.qdq.onnx "
                    "does not hold in OpenVINO (use --backend openvino)"]
        return []

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for report.json."""
        return {
            "version": self.version,
            "sqnr_db": _round(self.sqnr_db),
            "int8_layers": len(self.int8_layers),
            "float_layers": sorted(self.float_layers),
            "error": self.error,
        }


def saturation_risk(backend) -> bool:
    """Whether ``vpmaddubsw`` (u8 x s8 pairs into int16) can overflow with these schemes.

    Unsigned weights run u8 x u8 kernels (widened, no saturation) and are never at risk.
    """
    weights, acts = backend.weight_scheme, backend.activation_scheme
    if not weights.signed or weights.bits > 8 or acts.bits > 8:
        return False
    weight_max = max(abs(weights.qmin), abs(weights.qmax))
    return 2 * (acts.qmax - acts.qmin) * weight_max > _INT16_MAX


def check_kernels(
    quant_model: Any,
    float_model: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    backend,
    max_samples: int = MAX_SAMPLES,
    target: CpuTarget | None = None,
    openvino: bool = True,
    recorded: RecordedRuns | None = None,
) -> KernelCheck:
    """Run the QDQ model with optimizations off and on, and the float model, on a few samples.

    Args:
        quant_model: The QDQ model (anything qtool.io.serialize takes).
        float_model: The float model with the same inputs and outputs.
        batches: Feed dicts (extra keys such as ``labels`` are ignored).
        backend: The :class:`qtool.backends.base.Backend` the model was made for.
        max_samples: Stop after this many rows.
        target: The CPU the model is made for (None: the backend's ``target_cpu`` option,
            else this CPU).
        openvino: Also compile and run the model in OpenVINO CPU, when it is importable
            (the OpenVINO row; a compile costs about a second on a small model).
        recorded: Outputs of the float model and the simulation that an evaluation kept on
            the same rows (:mod:`qtool.analysis.recorded`): those rows run only in the
            integer kernels (and OpenVINO); the two sessions open only for rows it lacks.

    Returns:
        The :class:`KernelCheck` (``samples == 0`` and ``error`` set if a session failed).
    """
    from qtool.backends.onnxruntime import cpu_has_vnni
    from qtool.io import is_large, serialize

    risk, vnni = saturation_risk(backend), cpu_has_vnni()
    if target is None:
        target = resolve_target(backend.options.get("target_cpu", "auto"))
    if recorded is not None and not isinstance(quant_model, bytes | str | os.PathLike) \
            and not is_large(quant_model):
        quant_model = serialize(quant_model)  # once: its key, the kernels, OpenVINO
    float_runs = _Runs(float_model, recorded)
    simulated_runs = _Runs(quant_model, recorded)
    try:
        # the float model and the simulation open only for rows the record lacks
        names = float_runs.input_names()
        simulated_runs.input_names()
    except Exception as exc:  # onnxruntime raises its own exception types
        return KernelCheck(0, None, None, risk, vnni, _first_line(exc), target=target)
    error = None
    try:
        kernels = _session(quant_model, True)
    except Exception as exc:  # the deployable file does not load with the optimizations
        kernels, error = None, _first_line(exc)
    openvino = _openvino(quant_model) if openvino else None
    # (signal, noise) for simulated, kernels, OpenVINO
    sums = {"simulated": [0.0, 0.0], "kernels": [0.0, 0.0], "openvino": [0.0, 0.0]}
    rows = 0
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in names}
        try:
            expected = float_runs.run(feeds)
            runs = {"simulated": simulated_runs.run(feeds)}
        except Exception as exc:  # onnxruntime raises its own exception types
            return KernelCheck(0, None, None, risk, vnni, _first_line(exc), target=target)
        if kernels is not None:
            try:
                runs["kernels"] = kernels.run(None, feeds)
            except Exception as exc:  # onnxruntime raises its own exception types
                kernels, error = None, _first_line(exc)
        if openvino is not None and openvino[1].error is None:
            try:
                runs["openvino"] = _run_openvino(openvino[0], feeds, len(expected))
            except Exception as exc:  # openvino raises its own exception types
                openvino[1].error = _first_line(exc)
        for key, outputs in runs.items():
            for x, q in zip(expected, outputs, strict=True):
                x = np.asarray(x, dtype=np.float64)
                sums[key][0] += float((x**2).sum())
                sums[key][1] += float(((x - np.asarray(q, dtype=np.float64)) ** 2).sum())
        rows += int(next(iter(feeds.values())).shape[0]) if feeds else 1
        if rows >= max_samples:
            break
    sqnr = {key: None if noise == 0 else 10 * math.log10(signal / noise) if signal > 0
            else -math.inf for key, (signal, noise) in sums.items()}
    ov_check = None
    if openvino is not None:
        ov_check = openvino[1]
        if ov_check.error is None:
            ov_check.sqnr_db = sqnr["openvino"]
    return KernelCheck(rows, sqnr["simulated"], None if error else sqnr["kernels"], risk, vnni,
                       error, ov_check, target)


#: OpenVINO runtime layer types that carry weights (what "runs in int8" is judged on).
OPENVINO_WEIGHTED_LAYERS = frozenset(
    {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm"}
)


def openvino_layers(compiled: Any) -> tuple[list[str], list[str]]:
    """``(int8, f32)``: names of the weighted layers by their runtime precision.

    Read from ``compiled.get_runtime_model()``: each op's ``layerType`` and
    ``runtimePrecision`` (u8/i8 when the CPU plugin runs it in integers).
    """
    int8, f32 = [], []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info:
            continue
        if str(info["layerType"].astype(str)) not in OPENVINO_WEIGHTED_LAYERS:
            continue
        precision = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info \
            else ""
        (int8 if precision in ("u8", "i8") else f32).append(op.get_friendly_name())
    return int8, f32


def engines_markdown(kernels: Mapping[str, Any] | None) -> list[str]:
    """report.md's "Deployed engines" table from report.json's ``ort_kernels``.

    One row per engine the QDQ model ran in: the simulation, onnxruntime's integer kernels,
    and OpenVINO CPU when it was measured (its row says how many weighted layers run in int8).
    """
    if not kernels:
        return []
    sim = kernels.get("simulated_sqnr_db")
    rows = [("Q/DQ simulation (onnxruntime, optimizations off)", _cell(sim), "")]
    error = kernels.get("error")
    rows.append(("onnxruntime integer kernels (default optimizations)",
                 "failed" if error else _cell(kernels.get("kernels_sqnr_db")), error or ""))
    openvino = kernels.get("openvino")
    if openvino:
        floats = openvino.get("float_layers") or []
        note = openvino.get("error") or (
            f"{openvino['int8_layers']} weighted layers in u8/i8, {len(floats)} in f32"
            + (f" ({', '.join(floats[:3])}{', ...' if len(floats) > 3 else ''})"
               if floats else ""))
        rows.append((f"OpenVINO {openvino.get('version', '').split('-')[0]} CPU "
                     "(INFERENCE_PRECISION_HINT=f32)",
                     "failed" if openvino.get("error") else _cell(openvino.get("sqnr_db")),
                     note))
    lines = ["## Deployed engines", "",
             f"model.qdq.onnx on {kernels.get('samples', 0)} evaluation samples, output SQNR "
             "against the float model.", "", "| engine | SQNR (dB) | note |", "|---|---|---|"]
    lines += [f"| {engine} | {value} | {note} |" for engine, value, note in rows]
    return lines + [""]


def _cell(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f}"


def _openvino(quant_model: Any):
    """``(compiled model, OpenVinoCheck)`` for the QDQ model, or None without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return None
    from qtool.backends.openvino import COMPILE_CONFIG
    from qtool.io import serialize

    check = OpenVinoCheck(version=ov.get_version())
    data = quant_model if isinstance(quant_model, bytes) else serialize(quant_model)
    try:
        core = ov.Core()
        compiled = core.compile_model(ov.convert_model(io.BytesIO(data)), "CPU",
                                      dict(COMPILE_CONFIG))
        check.int8_layers, check.float_layers = openvino_layers(compiled)
    except Exception as exc:  # openvino raises its own exception types
        check.error = _first_line(exc)
        return None, check
    return compiled, check


def _run_openvino(compiled: Any, feeds: Mapping[str, np.ndarray], outputs: int) -> list:
    result = compiled(dict(feeds))
    return [np.asarray(result[compiled.output(i)]) for i in range(outputs)]


def _cure(backend: str) -> str:
    """What avoids the overflow: 7-bit weights of the onnxruntime backend."""
    if backend == "onnxruntime":
        return "keep reduce_range on (drop --backend-option reduce_range=false)"
    return "quantize with --backend onnxruntime"


class _Runs:
    """One model's outputs with optimizations off: kept ones where recorded, else run.

    Its session opens at the first row the record lacks (never, when it has them all).
    """

    def __init__(self, model: Any, recorded: RecordedRuns | None) -> None:
        self.model = model
        self.recorded = recorded
        self.session = None
        self.key = model_key(model) if recorded is not None else None
        # the record's runs of this model ran with these threads: missing rows alike
        self.threads = recorded.threads_of(self.key) if recorded is not None else None
        self.outputs: list[str] | None = None

    def input_names(self) -> set[str]:
        """The model's inputs (its graph's, or its session's when it could not be read)."""
        if self.recorded is None:
            self.session = _session(self.model, False)
        if self.session is not None:
            self.outputs = [o.name for o in self.session.get_outputs()]
            return {i.name for i in self.session.get_inputs()}
        self.outputs, inputs = _graph_names(self.model)
        return inputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list:
        if self.recorded is not None:
            kept = self.recorded.outputs(self.key, feeds, self.outputs)
            if kept is not None:
                return kept
        if self.session is None:
            self.session = _session(self.model, False, self.threads)
        return self.session.run(None, feeds)


def _graph_names(model: Any) -> tuple[list[str], set[str]]:
    """``(outputs in order, inputs)`` of a model: a path, bytes, a proto or a Graph."""
    import onnx
    import onnx_graphsurgeon as gs

    if isinstance(model, gs.Graph):
        return [t.name for t in model.outputs], {t.name for t in model.inputs}
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    elif isinstance(model, str | os.PathLike):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    return ([o.name for o in graph.output],
            {i.name for i in graph.input if i.name not in weights})


def _session(model: Any, optimize: bool, threads: int | None = None):
    """A CPU session: optimized (the integer kernels) or not (the simulation, float).

    ``threads``: its intra-op threads (None: onnxruntime's default).
    """
    import onnxruntime as ort

    from qtool.io import release, session_source

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    data = (model if isinstance(model, bytes) else str(model)
            if isinstance(model, str | os.PathLike) else session_source(model))
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    finally:
        release(data)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _db(value: float | None) -> str:
    return "exact outputs" if value is None else f"{value:.1f} dB"


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return round(value, 3) + 0.0  # no -0.0 in report.json


__all__ = ["MAX_LOSS_DB", "MAX_SAMPLES", "KernelCheck", "OpenVinoCheck", "check_kernels",
           "engines_markdown", "openvino_layers", "saturation_risk"]
