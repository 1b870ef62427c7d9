"""The quantization plan: which tensors get QuantizeLinear/DequantizeLinear, how, and why not.

A plan is data. :func:`qtool.planner.build_plan` writes it from a graph and a backend's rules;
the user can print it, save it as JSON, edit it (skip nodes, force bits, pin ranges) and hand
it back to :func:`qtool.qdq.quantize`.

Each :class:`TensorPlan` entry is one tensor with

* ``role``: ``activation`` (range from calibration), ``weight`` (range from the initializer,
  quantized offline) or ``bias`` (int32, scale ``s_in * s_w`` of its ``bias_inputs``);
* ``scheme``: a :class:`qtool.scheme.QuantScheme`;
* ``consumers``: the nodes that read the quantized value (others keep reading the float
  tensor, so one tensor can feed a quantized Conv and a float Add);
* ``group``: activations in one group share one scale and zero point, computed from the
  union of their ranges (Concat inputs and output, and data-movement chains);
* ``pinned_range``: a user-fixed ``(lo, hi)`` that replaces calibration.

``float_nodes`` maps node names to the reason they stay float; ``nodes`` holds every node's
op type so that edits by op type work on a saved plan without the graph. ``notes`` (written
only when there are any) says per tensor why its quantization differs from the backend's
rules, e.g. a shared-scale group split after calibration (:mod:`qtool.scale_groups`).

JSON layout (``to_json``; unknown keys are rejected by ``from_json``)::

    {"format": "qtool-plan/1", "backend": "tensorrt", "placement_graph": 2,
     "tensors": {"input": {"role": "activation", "scheme": {...}, "consumers": ["conv1"],
                           "group": null, "pinned_range": null, "bias_inputs": null}, ...},
     "float_nodes": {"/Softmax": "Softmax has no int8 kernel ..."},
     "nodes": {"conv1": "Conv", ...}}
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qtool.errors import PlanError
from qtool.scheme import QuantScheme

FORMAT = "qtool-plan/1"
ROLES = ("activation", "weight", "bias")
_PRECISION = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is quantized.

    Attributes:
        tensor: Tensor name in the float graph.
        role: ``activation``, ``weight`` or ``bias``.
        scheme: Its quantization scheme.
        consumers: Names of the nodes that read the quantized tensor.
        group: Shared-scale group id, or None.
        pinned_range: User-fixed ``(lo, hi)``; calibration is not needed for it.
        bias_inputs: For a bias: the ``(activation, weight)`` tensors whose scales multiply.
    """

    tensor: str
    role: str
    scheme: QuantScheme
    consumers: tuple[str, ...]
    group: str | None = None
    pinned_range: tuple[float, float] | None = None
    bias_inputs: tuple[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (the tensor name is the key outside)."""
        return {
            "role": self.role,
            "scheme": self.scheme.to_dict(),
            "consumers": list(self.consumers),
            "group": self.group,
            "pinned_range": list(self.pinned_range) if self.pinned_range else None,
            "bias_inputs": list(self.bias_inputs) if self.bias_inputs else None,
        }

    @classmethod
    def from_dict(cls, tensor: str, data: Mapping[str, Any]) -> TensorPlan:
        """Inverse of :meth:`to_dict`.

        Raises:
            PlanError: Unknown or missing keys, or values of the wrong kind.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"tensor {tensor}: its entry must be an object")
        _check_keys(data, {f.name for f in dataclasses.fields(cls)} - {"tensor"}, tensor)
        role = data["role"]
        if role not in ROLES:
            raise PlanError(f"tensor {tensor}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(data["scheme"], Mapping):
            raise PlanError(f"tensor {tensor}: scheme must be an object")
        consumers = data["consumers"]
        if not isinstance(consumers, list) or not all(isinstance(c, str) for c in consumers):
            raise PlanError(f"tensor {tensor}: consumers must be a list of node names")
        group = data["group"]
        if group is not None and not isinstance(group, str):
            raise PlanError(f"tensor {tensor}: group must be a string or null")
        pinned = data["pinned_range"]
        if pinned is not None:
            pinned = _check_range(tensor, pinned)
        bias_inputs = data["bias_inputs"]
        if bias_inputs is not None:
            if (
                role != "bias"
                or not isinstance(bias_inputs, list)
                or len(bias_inputs) != 2
                or not all(isinstance(b, str) for b in bias_inputs)
            ):
                raise PlanError(
                    f"tensor {tensor}: bias_inputs must be [activation, weight] on a bias"
                )
            bias_inputs = tuple(bias_inputs)
        elif role == "bias":
            raise PlanError(f"tensor {tensor}: a bias needs bias_inputs [activation, weight]")
        return cls(
            tensor=tensor,
            role=role,
            scheme=QuantScheme.from_dict(dict(data["scheme"])),
            consumers=tuple(consumers),
            group=group,
            pinned_range=pinned,
            bias_inputs=bias_inputs,
        )


@dataclass(frozen=True)
class QuantPlan:
    """Where and how a graph is quantized for one backend (see the module docstring).

    Edits (:meth:`skip`, :meth:`with_bits`, :meth:`pin_range`) return a new plan.

    Attributes:
        backend: Backend name the plan was built for.
        placement_graph: MQBench graph number of that backend (1, 2 or 3).
        tensors: Entries by tensor name, in graph order.
        float_nodes: Node name -> why it stays float.
        nodes: Every node's op type, by node name.
        notes: Tensor name -> why its quantization departs from the rules (a split group).
    """

    backend: str
    placement_graph: int
    tensors: Mapping[str, TensorPlan]
    float_nodes: Mapping[str, str] = field(default_factory=dict)
    nodes: Mapping[str, str] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self._validate()

    # ----------------------------------------------------------------------------- queries

    def activation_schemes(self) -> dict[str, QuantScheme]:
        """Activations that need a calibrated range (pinned ones do not), with their schemes."""
        return {
            name: entry.scheme
            for name, entry in self.tensors.items()
            if entry.role == "activation" and entry.pinned_range is None
        }

    def entries(self, role: str) -> list[TensorPlan]:
        """Entries of one role, in graph order."""
        if role not in ROLES:
            raise PlanError(f"role {role!r} is not one of {', '.join(ROLES)}")
        return [e for e in self.tensors.values() if e.role == role]

    @property
    def groups(self) -> dict[str, list[str]]:
        """Shared-scale groups: group id -> member tensors (graph order)."""
        groups: dict[str, list[str]] = {}
        for entry in self.tensors.values():
            if entry.group is not None:
                groups.setdefault(entry.group, []).append(entry.tensor)
        return groups

    def summary(self) -> str:
        """A printable table: one line per quantized tensor, then the float nodes."""
        lines = [f"plan for {self.backend} (MQBench graph {self.placement_graph})"]
        for entry in self.tensors.values():
            s = entry.scheme
            kind = (
                f"{'s' if s.signed else 'u'}{s.bits} "
                f"{'sym' if s.symmetric else 'asym'}"
                f"{' narrow' if s.narrow_range else ''}{' pot' if s.power_of_two else ''}"
                f"{f' axis={s.per_channel_axis}' if s.per_channel else ''}"
            )
            extra = f" group={entry.group}" if entry.group else ""
            if entry.pinned_range:
                extra += f" pinned={list(entry.pinned_range)}"
            lines.append(
                f"  {entry.role:<10} {entry.tensor}  [{kind}]{extra}  -> "
                + ", ".join(entry.consumers)
            )
        if self.float_nodes:
            lines.append("float nodes:")
            lines += [f"  {name}: {why}" for name, why in self.float_nodes.items()]
        if self.notes:
            lines.append("notes:")
            lines += [f"  {name}: {why}" for name, why in self.notes.items()]
        return "\n".join(lines)

    __str__ = summary

    # ------------------------------------------------------------------------------- edits

    def skip(self, *patterns: str) -> QuantPlan:
        """Keep the matching nodes in float.

        Each pattern is an exact node name, an op type, or a regular expression over node
        names (``re.fullmatch``), tried in that order; ``name:``, ``op:`` and ``re:``
        prefixes force one kind. A skipped node reads float inputs; its weights and bias are
        not quantized.

        Raises:
            PlanError: A pattern matches no node.
        """
        skipped: dict[str, str] = {}
        for pattern in patterns:
            matched = self.match_nodes(pattern)
            if not matched:
                raise PlanError(
                    f"skip pattern {pattern!r} matches no node",
                    "give a node name, an op type (e.g. Conv) or a regex over node names",
                )
            for name in matched:
                skipped.setdefault(name, f"skipped by user ({pattern!r})")
        tensors: dict[str, TensorPlan] = {}
        for name, entry in self.tensors.items():
            consumers = tuple(c for c in entry.consumers if c not in skipped)
            if consumers or not entry.consumers:  # a quantized graph output has no readers
                tensors[name] = dataclasses.replace(entry, consumers=consumers)
        tensors = {
            name: entry
            for name, entry in tensors.items()
            if entry.bias_inputs is None or all(b in tensors for b in entry.bias_inputs)
        }
        had_quantized_input = {c for e in self.tensors.values() for c in e.consumers}
        float_nodes = dict(self.float_nodes)
        for name, why in skipped.items():
            if name in had_quantized_input:
                float_nodes[name] = why
        return dataclasses.replace(
            self, tensors=_drop_single_groups(tensors), float_nodes=float_nodes
        )

    def match_nodes(self, pattern: str) -> list[str]:
        """Node names a skip pattern matches (see :meth:`skip`)."""
        kind, _, rest = pattern.partition(":")
        if rest and kind in ("name", "op", "re"):
            pattern = rest
        else:
            kind = ""
        if kind in ("", "name") and pattern in self.nodes:
            return [pattern]
        if kind in ("", "op"):
            by_op = [n for n, op in self.nodes.items() if op == pattern]
            if by_op or kind == "op":
                return by_op
        if kind in ("", "re"):
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                if kind == "re":
                    raise PlanError(f"skip pattern {pattern!r} is not a regex: {exc}") from exc
                return []
            return [n for n in self.nodes if regex.fullmatch(n)]
        return []

    def with_bits(self, weight_bits: int | None = None, act_bits: int | None = None) -> QuantPlan:
        """Force the bit width of every weight and/or activation (bias stays 32-bit)."""
        changes = {"weight": weight_bits, "activation": act_bits}
        tensors = {
            name: (
                dataclasses.replace(entry, scheme=entry.scheme.with_(bits=changes[entry.role]))
                if changes.get(entry.role) is not None
                else entry
            )
            for name, entry in self.tensors.items()
        }
        return dataclasses.replace(self, tensors=tensors)

    def with_precision(self, precision: str) -> QuantPlan:
        """Force bits written as ``W<bits>A<bits>``, e.g. ``"W4A8"`` or ``"W4A4"``."""
        weight_bits, act_bits = parse_precision(precision)
        return self.with_bits(weight_bits, act_bits)

    def pin_range(self, tensor: str, lo: float, hi: float) -> QuantPlan:
        """Fix the range of an activation or weight; calibration then skips it.

        Raises:
            PlanError: The tensor is not in the plan, is a bias, or the range is invalid.
        """
        entry = self.tensors.get(tensor)
        if entry is None:
            raise PlanError(
                f"cannot pin tensor {tensor}: it is not quantized in this plan",
                "pin one of the plan's activations or weights (print the plan to see them)",
            )
        if entry.role == "bias":
            raise PlanError(f"cannot pin bias {tensor}: its scale is s_in * s_w")
        pinned = _check_range(tensor, [lo, hi])
        tensors = dict(self.tensors)
        tensors[tensor] = dataclasses.replace(entry, pinned_range=pinned)
        return dataclasses.replace(self, tensors=tensors)

    # -------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (see the module docstring for the layout)."""
        data = {
            "format": FORMAT,
            "backend": self.backend,
            "placement_graph": self.placement_graph,
            "tensors": {name: entry.to_dict() for name, entry in self.tensors.items()},
            "float_nodes": dict(self.float_nodes),
            "nodes": dict(self.nodes),
        }
        if self.notes:
            data["notes"] = dict(self.notes)
        return data

    def to_json(self) -> str:
        """Deterministic JSON text (same plan, same bytes)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantPlan:
        """Inverse of :meth:`to_dict`.

        Raises:
            PlanError: Unknown or missing keys, a wrong format tag, inconsistent references.
        """
        if not isinstance(data, Mapping):
            raise PlanError("a plan is a JSON object")
        _check_keys(
            data, {"format", "backend", "placement_graph", "tensors", "float_nodes", "nodes"},
            "plan", optional={"notes"},
        )
        if data["format"] != FORMAT:
            raise PlanError(f"plan format {data['format']!r} is not {FORMAT!r}")
        for key in ("tensors", "float_nodes", "nodes", "notes"):
            if not isinstance(data.get(key, {}), Mapping):
                raise PlanError(f"plan: {key} must be an object")
        placement_graph = data["placement_graph"]
        if not isinstance(placement_graph, int) or isinstance(placement_graph, bool):
            raise PlanError(f"plan: placement_graph {placement_graph!r} must be 1, 2 or 3")
        return cls(
            backend=str(data["backend"]),
            placement_graph=placement_graph,
            tensors={
                name: TensorPlan.from_dict(name, entry) for name, entry in data["tensors"].items()
            },
            float_nodes={str(k): str(v) for k, v in data["float_nodes"].items()},
            nodes={str(k): str(v) for k, v in data["nodes"].items()},
            notes={str(k): str(v) for k, v in data.get("notes", {}).items()},
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> QuantPlan:
        """Read a plan written by :meth:`to_json`.

        Raises:
            PlanError: The text is not JSON or not a valid plan.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    # ------------------------------------------------------------------------ internals

    def _validate(self) -> None:
        if self.placement_graph not in (1, 2, 3):
            raise PlanError(f"placement_graph {self.placement_graph} is not 1, 2 or 3")
        for name, entry in self.tensors.items():
            if entry.tensor != name:
                raise PlanError(f"plan entry {name} describes tensor {entry.tensor}")
            for consumer in entry.consumers:
                if self.nodes and consumer not in self.nodes:
                    raise PlanError(f"tensor {name}: consumer {consumer} is not a node of the plan")
            if entry.role == "activation" and entry.scheme.per_channel:
                raise PlanError(f"activation {name} cannot be per channel")
            if entry.bias_inputs:
                act, weight = entry.bias_inputs
                if self.tensors.get(act, None) is None or self.tensors[act].role != "activation":
                    raise PlanError(f"bias {name}: {act} is not a quantized activation")
                if self.tensors.get(weight, None) is None or self.tensors[weight].role != "weight":
                    raise PlanError(f"bias {name}: {weight} is not a quantized weight")
        for group, members in self.groups.items():
            roles = {self.tensors[m].role for m in members}
            schemes = {self.tensors[m].scheme for m in members}
            if roles != {"activation"} or len(schemes) != 1:
                raise PlanError(
                    f"group {group}: members {', '.join(members)} must be activations of one "
                    "scheme"
                )


def parse_precision(precision: str) -> tuple[int, int]:
    """``"W4A8"`` -> ``(4, 8)``.

    Raises:
        PlanError: Not of the form W<bits>A<bits>.
    """
    match = _PRECISION.match(precision.strip())
    if not match:
        raise PlanError(f"precision {precision!r} is not W<bits>A<bits>", "e.g. W8A8, W4A8, W4A4")
    return int(match.group(1)), int(match.group(2))


def _drop_single_groups(tensors: Mapping[str, TensorPlan]) -> dict[str, TensorPlan]:
    counts: dict[str, int] = {}
    for entry in tensors.values():
        if entry.group is not None:
            counts[entry.group] = counts.get(entry.group, 0) + 1
    return {
        name: (
            dataclasses.replace(entry, group=None)
            if entry.group is not None and counts[entry.group] < 2
            else entry
        )
        for name, entry in tensors.items()
    }


def _check_keys(data: Mapping[str, Any], known: Iterable[str], where: str,
                optional: Iterable[str] = ()) -> None:
    known = set(known)
    unknown = sorted(set(data) - known - set(optional))
    if unknown:
        raise PlanError(
            f"{where}: unknown key(s) {', '.join(unknown)}",
            f"known keys: {', '.join(sorted(known))}",
        )
    missing = sorted(known - set(data))
    if missing:
        raise PlanError(f"{where}: missing key(s) {', '.join(missing)}")


def _check_range(tensor: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise PlanError(f"tensor {tensor}: a range is [lo, hi]")
    try:
        lo, hi = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise PlanError(f"tensor {tensor}: range {value!r} is not two numbers") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise PlanError(f"tensor {tensor}: range [{lo}, {hi}] must be finite with lo <= hi")
    return lo, hi
