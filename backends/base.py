"""The Backend description: one inference engine's quantization rules as data, plus its emitter.

A backend says *what* an engine runs in integers and *how* the integers look:

* ``weight_scheme`` / ``activation_scheme``: bits, signed, symmetric, narrow range, power of
  two. Per-channel weights are a flag (``per_channel_weights``), limited to some op types by
  ``per_channel_ops`` (AMCT takes a scale vector for Conv only): the axis depends on the op
  (Conv 0, ConvTranspose 1, Gemm by ``transB``, MatMul the last axis) and the planner picks it.
* ``bias_mode``: ``"int32"`` (bias stored as int32 with scale ``s_in * s_w``, zero point 0) or
  ``"float"`` (the engine adds a float bias itself).
* ``placement``: where QuantizeLinear/DequantizeLinear go, MQBench's Fig. 4 graphs written as op
  sets (see :class:`Placement`).
* ``pass_through``: ops that only move data and keep their input's scale (Reshape, Transpose,
  MaxPool, ...), and ``sharing_ops`` whose inputs and output share one scale (Concat). The
  planner joins both with one union-find; no op is special-cased anywhere else.
* ``options``: typed options with their defaults (FBGEMM's ``reduce_range``, the TensorRT cache
  header's version). :meth:`Backend.with_options` validates them and lets the backend module's
  ``configure`` hook turn them into rules; :meth:`Backend.parse_options` reads them from
  ``KEY=VALUE`` text (``--backend-option``, recipes).
* ``emitter``: ``emit(result) -> {file name: bytes}``, the engine's files for a
  :class:`qtool.qdq.QuantizedModel`.

A new engine is one module in ``backends/`` holding one :class:`Backend` named ``BACKEND`` and
its emitter, plus one entry in the registry tuple of ``backends/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from qtool.errors import BackendError
from qtool.keyvalue import option_pairs
from qtool.scheme import QuantScheme

#: What an emitter reads: a :class:`qtool.qdq.QuantizedModel`. Not imported, even for type
#: checking: the backends are the rules qtool.qdq and qtool.planner read, one floor below them.
QuantizedResult = Any

#: Ops with a weight input (index 1) that engines run as integer matrix products.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

#: Ops that only move or select data: their output keeps the input's scale and zero point,
#: mapped to the attribute values under which that holds (Resize only in nearest mode).
PASS_THROUGH_OPS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "Reshape": {},
        "Transpose": {},
        "Flatten": {},
        "Squeeze": {},
        "Unsqueeze": {},
        "MaxPool": {},
        "Slice": {},
        "Split": {},
        "Pad": {},
        "Identity": {},
        "Resize": {"mode": "nearest"},
    }
)

#: Default values of the attributes PASS_THROUGH_OPS conditions on (ONNX defaults).
ATTRIBUTE_DEFAULTS: Mapping[tuple[str, str], Any] = MappingProxyType(
    {("Resize", "mode"): "nearest"}
)

#: Ops whose inputs and output must all share one scale and zero point.
SHARING_OPS = frozenset({"Concat"})

#: Pointwise activations every engine fuses into the op before them: not float, not quantized.
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish"})


@dataclass(frozen=True)
class Placement:
    """Where Q/DQ pairs go, as op sets (MQBench Fig. 4, engines.md section 2.4).

    Attributes:
        graph: MQBench's graph number: 1 academic (inputs of weighted ops only), 2 TensorRT
            (also pooling inputs and the shortcut of a residual Add), 3 every quantizable op.
        weighted_ops: Ops whose activation inputs are quantized and whose constant weight
            (input 1) is quantized offline.
        activation_ops: Ops all of whose activation inputs are quantized.
        shortcut_ops: Elementwise ops fused into the producer of one input (TensorRT's
            Conv+Add fusion): every activation input is quantized except the last one produced
            by a ``fusable_producers`` op that feeds nothing else.
        fusable_producers: Ops a ``shortcut_ops`` node can fuse into.
        requires_weight: A weighted op without a constant weight stays float (ACL/AMCT
            quantizes layers with weights only).
        quantize_outputs: Converter placement (SNPE/QNN, AIMET): instead of op inputs, the
            graph inputs and every op output carrying activations are quantized, and every
            reader takes the quantized value; a data-movement op's output keeps its input's
            quantizer, and an op whose output only feeds a fused activation (Conv+Relu) is
            quantized after the activation. See :func:`qtool.planner.build_plan`.
        activation_attributes: ``activation_ops`` whose kernel takes only some attribute
            values: op -> attribute -> allowed values (see :meth:`runs_quantized`).
        quantize_weighted_outputs: Also quantize the output of every weighted op (after the
            Relu/Clip fused into it), read quantized by all its readers: onnxruntime fuses
            ``DQ -> Conv -> Q`` into QLinearConv only with that Q, so this keeps every
            weighted op an integer kernel while ``activation_ops`` stays empty (no Q/DQ of
            their own on Add, Mul, HardSwish, ...; those fuse where their neighbours are
            quantized anyway). A sharing op (Concat) then ties its inputs' scales only when
            its output is quantized.
        kernel_ops: With ``quantize_weighted_outputs``: ops the engine runs as integer kernels
            when their inputs and output are quantized (onnxruntime's QLinearSigmoid,
            QLinearMul, ...). One whose output is quantized gets its inputs quantized too
            when each is quantized already or is the output of such an op whose own inputs
            are (SiLU's ``x * Sigmoid(x)`` after a Conv): the chain runs in integers, as
            fast as the engine goes, with no Q/DQ where the op is read in float.
        weighted_kernel: ``rule(node) -> reason or None``: why the engine has no integer
            kernel for this weighted node (TensorRT: a Conv with too few channels); such a
            node stays float, with the reason in the plan. None: every one has a kernel.
        residual_shortcuts_only: A ``shortcut_ops`` node is quantized only when it is a
            residual Add (two activation inputs computed from different tensors); an Add of
            a constant or of one tensor's elementwise results (a detector's box decoding)
            stays float in its producer's epilogue (:mod:`qtool.residual_add`).
    """

    graph: int
    weighted_ops: frozenset[str] = WEIGHTED_OPS
    activation_ops: frozenset[str] = frozenset()
    shortcut_ops: frozenset[str] = frozenset()
    fusable_producers: frozenset[str] = frozenset()
    requires_weight: bool = False
    quantize_outputs: bool = False
    activation_attributes: Mapping[str, Mapping[str, frozenset]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    quantize_weighted_outputs: bool = False
    kernel_ops: frozenset[str] = frozenset()
    weighted_kernel: Callable[[Any], str | None] | None = None
    residual_shortcuts_only: bool = False

    def runs_quantized(self, op: str, attrs: Mapping[str, Any]) -> bool:
        """Whether an ``activation_ops`` node with ``attrs`` gets quantized inputs.

        ``activation_attributes`` maps an op to the attribute values its engine's integer
        kernel takes (onnxruntime's uint8 Resize: not cubic); a node with any other value
        runs in float.
        """
        for key, allowed in self.activation_attributes.get(op, {}).items():
            actual = attrs.get(key, ATTRIBUTE_DEFAULTS.get((op, key)))
            if isinstance(actual, bytes):
                actual = actual.decode()
            if actual not in allowed:
                return False
        return True

    @property
    def quantizable_ops(self) -> frozenset[str]:
        """Every op type that gets at least one quantized input under this placement."""
        return self.weighted_ops | self.activation_ops | self.shortcut_ops


#: Fig. 4(a): only the inputs of Conv/ConvTranspose/Gemm/MatMul and their weights.
GRAPH_1 = Placement(graph=1)

#: Fig. 4(b): TensorRT. Weighted-op inputs, pooling inputs, and the shortcut of a residual
#: Add (the conv branch is fused into the conv's output and stays float).
GRAPH_2 = Placement(
    graph=2,
    activation_ops=frozenset({"AveragePool", "GlobalAveragePool"}),
    shortcut_ops=frozenset({"Add"}),
    fusable_producers=WEIGHTED_OPS,
    residual_shortcuts_only=True,
)

#: Fig. 4(c): FBGEMM, TVM, SNPE. Every input of every quantizable op, all Add inputs included.
GRAPH_3 = Placement(
    graph=3,
    activation_ops=frozenset(
        {"Add", "Sum", "Mul", "Concat", "AveragePool", "GlobalAveragePool"}
    ),
)

BIAS_MODES = ("float", "int32")


def _no_configuration(backend: Backend) -> Backend:
    return backend


@dataclass(frozen=True)
class Backend:
    """One inference engine's rules and emitter.

    Attributes:
        name: Registry name (``--backend``).
        summary: One line for ``--help`` and reports.
        weight_scheme: Scheme of weights; its ``per_channel_axis`` is ignored, see
            ``per_channel_weights``.
        per_channel_weights: One scale per output channel (axis chosen per op by the planner).
        activation_scheme: Scheme of activations (always per tensor).
        bias_mode: ``"int32"`` or ``"float"``.
        placement: Where Q/DQ go.
        emitter: ``emitter(result) -> {file name: bytes}``.
        pass_through: Data-movement ops (op -> attribute values required) keeping the scale.
        sharing_ops: Ops whose inputs and output share one scale.
        fused_activations: Activations fused into the op before them.
        options: Option names and their current values (defaults in the module's BACKEND).
        configure: Hook turning ``options`` into rules; returns the configured backend.
        activation_bits_supported: Activation bit widths the engine runs; ``quantize``
            refuses a plan with others (9 to 16 bits are stored as int16/uint16 at opset 21).
        per_channel_ops: Weighted ops whose weights are per channel when
            ``per_channel_weights`` is set (None: all of them).
        file_activation_bits: Activation widths the engine's files can describe (None: any); the
            simulation runs any width, the emitter and ``qtool calibrate`` refuse others.
    """

    name: str
    summary: str
    weight_scheme: QuantScheme
    per_channel_weights: bool
    activation_scheme: QuantScheme
    bias_mode: str
    placement: Placement
    emitter: Callable[[QuantizedResult], dict[str, bytes]]
    pass_through: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: PASS_THROUGH_OPS)
    sharing_ops: frozenset[str] = SHARING_OPS
    fused_activations: frozenset[str] = FUSED_ACTIVATIONS
    options: Mapping[str, Any] = field(default_factory=dict)
    configure: Callable[[Backend], Backend] = _no_configuration
    activation_bits_supported: frozenset[int] = frozenset(range(2, 9))
    per_channel_ops: frozenset[str] | None = None
    file_activation_bits: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.bias_mode not in BIAS_MODES:
            raise BackendError(
                f"backend {self.name}: bias_mode {self.bias_mode!r} is not one of {BIAS_MODES}"
            )
        if self.activation_scheme.per_channel:
            raise BackendError(f"backend {self.name}: activations must be per tensor")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def placement_graph(self) -> int:
        """MQBench graph number (1, 2 or 3)."""
        return self.placement.graph

    @property
    def quantizable_ops(self) -> frozenset[str]:
        """Op types that get quantized inputs."""
        return self.placement.quantizable_ops

    def weight_per_channel(self, op: str) -> bool:
        """Whether the weight of an ``op`` node gets one scale per output channel."""
        return self.per_channel_weights and (
            self.per_channel_ops is None or op in self.per_channel_ops
        )

    def check_plan(self, plan) -> None:
        """Refuse a plan whose activation widths the engine's files cannot describe.

        Raises:
            BackendError: An activation of a width outside ``file_activation_bits``.
        """
        if self.file_activation_bits is None:
            return
        widths = sorted({e.scheme.bits for e in plan.entries("activation")})
        bad = [w for w in widths if w not in self.file_activation_bits]
        if bad:
            allowed = ", ".join(str(b) for b in self.file_activation_bits)
            raise BackendError(
                f"backend {self.name} cannot describe {bad[0]}-bit activations "
                f"(its files hold {allowed}-bit ones only)",
                f"use --act-bits {self.file_activation_bits[0]}, or a backend that runs "
                f"{bad[0]}-bit activations",
            )

    def emit(self, result: QuantizedResult) -> dict[str, bytes]:
        """The engine's files for a quantized model: ``{file name: bytes}``."""
        return self.emitter(result)

    def option_choice(self, key: str, table: Mapping[str, Any], hint: str) -> Any:
        """``table[option key]``: an option whose value names one of a table's entries.

        Raises:
            BackendError: The value is not a key of ``table`` (the message lists them).
        """
        value = self.options[key]
        if value not in table:
            raise BackendError(
                f"backend {self.name}: {key}={value!r} is not one of {', '.join(table)}", hint)
        return table[value]

    def with_options(self, **options: Any) -> Backend:
        """A copy with some options changed, validated against the known ones.

        Raises:
            BackendError: An unknown option, or a value of the wrong type.
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise BackendError(
                f"backend {self.name} has no option {', '.join(unknown)}", f"its options: {known}"
            )
        for key, value in options.items():
            expected = type(self.options[key])
            if type(value) is not expected:
                raise BackendError(
                    f"backend {self.name}: option {key}={value!r} must be {expected.__name__}"
                )
        merged = {**self.options, **options}
        return self.configure(dataclasses.replace(self, options=merged))

    def check_activation_bits(self, bits: int, tensor: str | None = None) -> None:
        """Refuse an activation bit width this engine cannot run.

        Raises:
            BackendError: ``bits`` is not in ``activation_bits_supported``.
        """
        if bits in self.activation_bits_supported:
            return
        where = f" ({tensor})" if tensor else ""
        raise BackendError(
            f"backend {self.name} cannot run {bits}-bit activations{where}",
            f"use --act-bits {_bit_ranges(self.activation_bits_supported)} with {self.name}, "
            f"or a backend that runs {bits}-bit activations",
        )
    def parse_options(self, items: Mapping[str, str] | list[str] | tuple[str, ...]) -> dict:
        """Typed option values from text: ``["reduce_range=false", ...]`` or a mapping.

        Values are read as the type of the option's default: ``true/false/1/0/yes/no`` for
        booleans, decimal integers, numbers, or the text itself. Non-text values of a mapping
        (a YAML recipe) are passed through and checked by :meth:`with_options`.

        Raises:
            BackendError: An item without ``=``, an unknown key (the message lists the
                backend's options), or a value that does not read as the option's type.
        """
        try:
            pairs = option_pairs(items)
        except ValueError as exc:
            raise BackendError(
                f"backend option {exc.args[0]!r} is not KEY=VALUE",
                f"e.g. --backend-option {next(iter(self.options), 'key')}=VALUE",
            ) from None
        parsed: dict[str, Any] = {}
        for key, value in pairs:
            if key not in self.options:
                known = ", ".join(
                    f"{k} (default {_show(v)})" for k, v in sorted(self.options.items())
                ) or "none"
                raise BackendError(
                    f"backend {self.name} has no option {key}", f"its options: {known}"
                )
            parsed[key] = _read_option(self.name, key, value, type(self.options[key]))
        return parsed

    def passes_scale_through(self, op: str, attrs: Mapping[str, Any]) -> bool:
        """True if ``op`` with ``attrs`` only moves data (its output keeps the input scale)."""
        required = self.pass_through.get(op)
        if required is None:
            return False
        for key, value in required.items():
            actual = attrs.get(key, ATTRIBUTE_DEFAULTS.get((op, key)))
            if isinstance(actual, bytes):
                actual = actual.decode()
            if actual != value:
                return False
        return True


def _bit_ranges(bits: frozenset[int]) -> str:
    """``{2, ..., 8, 16}`` as ``"2-8 or 16"``."""
    runs: list[list[int]] = []
    for value in sorted(bits):
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return " or ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _read_option(backend: str, key: str, value: Any, kind: type) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
        if kind in (int, float):
            return kind(text)
    except ValueError:
        raise BackendError(
            f"backend {backend}: option {key}={value!r} must be {kind.__name__}",
            "booleans: true/false" if kind is bool else f"give a {kind.__name__}",
        ) from None
    return text


# ----------------------------------------------------------------- helpers for emitters

QDQ_MODEL_FILE = "model.qdq.onnx"


def qdq_model_file(result: QuantizedResult) -> dict[str, bytes]:
    """``{"model.qdq.onnx": bytes}``: the QDQ graph, serialized deterministically.

    Over 2 GB, ``model.qdq.onnx.data`` goes beside it (:func:`qtool.io.model_files`).
    """
    from qtool.io import model_files

    return model_files(result.graph, QDQ_MODEL_FILE)


def json_bytes(data: Any) -> bytes:
    """Deterministic JSON (insertion order, two-space indent, trailing newline)."""
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def scalar(value: Any) -> float:
    """A 0-d or 1-element array as a Python float (exactly the float32 value)."""
    return float(np.asarray(value, dtype=np.float32).reshape(-1)[0])
