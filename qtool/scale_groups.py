"""Shared-scale groups whose members' ranges are too far apart: split them, never collapse.

The planner ties tensors to one scale with a union-find (a Concat's inputs and output, data
movement chains: :func:`qtool.planner.build_plan`), before any range is known. Once the
calibration has measured the ranges, a group whose union range leaves one member fewer than
:data:`MIN_LEVELS` quantization levels would erase that member: a YOLO head's sigmoid scores
(0-1) concatenated with boxes in pixels (0-320) take two values at 8 bits, ``{0, 1.25}``.
:func:`split_wide_groups` decides per group, by what the engine runs:

* **16 bits** where the backend runs and describes 16-bit activations (snpe, qnn, academic:
  A16W8) and every member keeps :data:`MIN_LEVELS` at 16 bits: the group keeps one scale;
* else **requantize**: the group is split where the tie joins ranges too far apart (a
  Concat input and its output): each part gets its own scale, and the engine requantizes
  the narrow member into the op (onnxruntime's QLinearConcat, TensorRT and TVM take one
  scale per Concat input);
* and where a tensor that holds slices of both ranges (the Concat's output, and what only
  moves its data) is itself quantized, it is **kept float**: its readers read the float
  tensor, so the op runs float in the engine.

Levels of a member ``t`` under the group's range ``g`` are ``(qmax - qmin) * s_t / s_g``,
``s`` the scale the scheme gives each range. The plan's ``notes`` say, per member, which
choice was made and why.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import onnx_graphsurgeon as gs

from qtool.plan import QuantPlan

log = logging.getLogger(__name__)

#: Fewest quantization levels a member of a shared-scale group may keep (5 bits): below it
#: the member's values round to a handful of steps (sigmoid scores beside pixel boxes).
MIN_LEVELS = 32

#: Activation width tried before splitting, where the engine runs it.
WIDE_BITS = 16


@dataclass(frozen=True)
class GroupSplit:
    """What was done to one shared-scale group.

    Attributes:
        group: The group id in the plan built before calibration.
        action: ``16-bit``, ``requantize`` or ``float``.
        narrow: The member(s) the shared scale would erase, with the levels they would keep.
        float_tensors: Tensors no longer quantized (their readers read float values).
        reason: One line for the report.
    """

    group: str
    action: str
    narrow: dict[str, float]
    float_tensors: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for report.json."""
        return {"group": self.group, "action": self.action,
                "narrow": {k: round(v, 3) for k, v in self.narrow.items()},
                "float_tensors": list(self.float_tensors), "reason": self.reason}


def split_wide_groups(graph: gs.Graph, plan: QuantPlan, ranges: Mapping[str, Any],
                      backend) -> tuple[QuantPlan, list[GroupSplit]]:
    """``plan`` with every too-wide shared-scale group made safe (module docstring).

    Args:
        graph: The float graph the plan was built on.
        plan: The plan; groups of two or more activations are checked.
        ranges: Calibrated ``(lo, hi)`` per activation (pinned ranges win).
        backend: Backend name or :class:`qtool.backends.base.Backend`.

    Returns:
        ``(plan, splits)``; the plan is ``plan`` itself when no group is too wide.
    """
    from qtool.backends import resolve_backend

    backend = resolve_backend(backend)
    tensors = dict(plan.tensors)
    notes = dict(plan.notes)
    splits: list[GroupSplit] = []
    next_id = _next_group_index(plan)
    for group, members in plan.groups.items():
        bounds = {m: _range(tensors[m], ranges) for m in members}
        if any(b is None for b in bounds.values()):
            continue  # a member calibration never saw: quantize() reports it
        scheme = tensors[members[0]].scheme
        narrow = _narrow(scheme, bounds)
        if not narrow:
            continue
        wide = scheme.with_(bits=WIDE_BITS)
        if _runs_wide(backend, scheme.bits) and not _narrow(wide, bounds):
            for m in members:
                tensors[m] = dataclasses.replace(tensors[m], scheme=wide)
            reason = (f"ranges {_spans(bounds, narrow)} leave {_levels(narrow)} at "
                      f"{scheme.bits} bits under one scale: {WIDE_BITS}-bit activations "
                      f"({backend.name} runs them)")
            splits.append(GroupSplit(group, f"{WIDE_BITS}-bit", narrow, (), reason))
        else:
            parts, mixed = _parts(graph, backend, members, bounds, scheme)
            dropped = tuple(m for m in members if m in mixed)
            for part in parts:
                kept = [m for m in part if m not in mixed]
                new_id = f"group{next_id}" if len(kept) > 1 else None
                next_id += len(kept) > 1
                for m in kept:
                    tensors[m] = dataclasses.replace(tensors[m], group=new_id)
            for m in dropped:
                del tensors[m]
            action = "float" if dropped else "requantize"
            reason = (f"ranges {_spans(bounds, narrow)} leave {_levels(narrow)} at "
                      f"{scheme.bits} bits under one scale: split into {len(parts)} scales "
                      "(the engine requantizes at the op)")
            if dropped:
                reason += (f"; {', '.join(dropped)} holds both ranges and stays float "
                           "(its readers run float)")
            splits.append(GroupSplit(group, action, narrow, dropped, reason))
        for m in members:
            notes[m] = f"shared-scale group {group}: {splits[-1].reason}"
        log.info("shared-scale group %s: %s", group, splits[-1].reason)
    if not splits:
        return plan, []
    tensors = {n: e for n, e in tensors.items()
               if e.bias_inputs is None or all(b in tensors for b in e.bias_inputs)}
    return dataclasses.replace(plan, tensors=tensors, notes=notes), splits


def member_levels(scheme, bounds: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Levels each member keeps under the union of ``bounds`` (see the module docstring)."""
    lo = min(b[0] for b in bounds.values())
    hi = max(b[1] for b in bounds.values())
    shared = float(scheme.qparams(lo, hi)[0])
    steps = scheme.qmax - scheme.qmin
    return {m: steps * float(scheme.qparams(*b)[0]) / shared for m, b in bounds.items()}


def _narrow(scheme, bounds) -> dict[str, float]:
    return {m: v for m, v in member_levels(scheme, bounds).items() if v < MIN_LEVELS}


def _runs_wide(backend, bits: int) -> bool:
    files = backend.file_activation_bits
    return (bits < WIDE_BITS and WIDE_BITS in backend.activation_bits_supported
            and (files is None or WIDE_BITS in files))


def _range(entry, ranges) -> tuple[float, float] | None:
    if entry.pinned_range is not None:
        return entry.pinned_range
    value = ranges.get(entry.tensor)
    if value is None:
        return None
    lo, hi = float(value[0]), float(value[1])
    return min(lo, hi), max(lo, hi)


def _parts(graph, backend, members, bounds, scheme) -> tuple[list[list[str]], set[str]]:
    """The group re-joined only where a tie keeps both sides' levels, and its mixed tensors.

    A tie (an input and output of a sharing op, the data input and outputs of a pass-through
    op) joins two members when neither would keep fewer than :data:`MIN_LEVELS` under their
    union. A sharing op's output whose tie to a narrower input was cut holds values of both
    ranges; it, and the members tied to it by pass-through ops, are mixed.
    """
    from qtool.planner import _UnionFind, all_nodes

    inside = set(members)
    union = _UnionFind()
    moves = _UnionFind()  # pass-through ties only: what moves a mixed tensor's data
    for m in members:
        union.find(m)
        moves.find(m)
    cut_outputs: set[str] = set()
    for node in all_nodes(graph):
        if node.op in backend.sharing_ops:
            outputs = [t.name for t in node.outputs if t.name in inside]
            ties = [(t.name, o) for t in node.inputs if t.name in inside for o in outputs]
        elif backend.passes_scale_through(node.op, node.attrs) and node.inputs:
            ties = [(node.inputs[0].name, t.name) for t in node.outputs]
        else:
            continue
        for a, b in ties:
            if a not in inside or b not in inside:
                continue
            if node.op not in backend.sharing_ops:
                moves.union(a, b)
            if _narrow(scheme, {a: bounds[a], b: bounds[b]}):
                if node.op in backend.sharing_ops:
                    cut_outputs.add(b)
                continue
            union.union(a, b)
    parts: dict[str, list[str]] = {}
    for m in members:
        parts.setdefault(union.find(m), []).append(m)
    mixed = {m for m in members if moves.find(m) in {moves.find(o) for o in cut_outputs}}
    result = []
    for part in parts.values():
        # Ties can chain (a ~ b ~ c with a, c far apart): such a part is not shared at all.
        if len(part) > 1 and _narrow(scheme, {m: bounds[m] for m in part}):
            result += [[m] for m in part]
        else:
            result.append(part)
    return result, mixed


def _next_group_index(plan: QuantPlan) -> int:
    indices = [int(g[5:]) for g in plan.groups if g.startswith("group") and g[5:].isdigit()]
    return max(indices, default=-1) + 1


def _spans(bounds, narrow) -> str:
    widest = max(bounds, key=lambda m: bounds[m][1] - bounds[m][0])
    shown = [widest] + [m for m in narrow if m != widest][:2]
    return ", ".join(f"{m} [{bounds[m][0]:.3g}, {bounds[m][1]:.3g}]" for m in shown)


def _levels(narrow) -> str:
    worst = min(narrow, key=narrow.get)
    return f"{worst} {narrow[worst]:.1f} levels"
