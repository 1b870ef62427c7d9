"""Shared-scale groups whose members' ranges are too far apart: split them, never collapse.

The planner ties tensors to one scale with a union-find (a Concat's inputs and output, data
movement chains: :func:`qtool.planner.build_plan`), before any range is known. Once the
calibration has measured the ranges, a group whose union range leaves one member fewer than
:data:`MIN_LEVELS` quantization levels (at low widths, fewer than 1/8 of its levels:
:func:`min_levels`) would erase that member: a YOLO head's sigmoid scores
(0-1) concatenated with boxes in pixels (0-320) take two values at 8 bits, ``{0, 1.25}``.
:func:`split_wide_groups` (called by :func:`qtool.qdq.quantize`, where the group ranges are
united) decides per group, by what the engine runs:

* **16 bits** where the backend runs and describes 16-bit activations (snpe, qnn, academic:
  A16W8) and every member keeps :data:`MIN_LEVELS` at 16 bits: the group keeps one scale;
* else the sharing op is **kept float**: it reads its inputs unquantized (an input only it
  read is no longer quantized; others keep their own scale for their other readers), and a
  tensor that holds both ranges (its output, and what only moves that output's data) is not
  quantized either: its readers read the float tensor. The rest of the group keeps one
  scale per part that the ties still join. The op is listed in ``float_nodes``.

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
        action: ``16-bit`` or ``float``.
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
    float_nodes = dict(plan.float_nodes)
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
            parts, mixed, ops = _parts(graph, backend, members, bounds, scheme)
            dropped = []
            for m in members:
                entry = tensors[m]
                readers = tuple(c for c in entry.consumers if c not in ops)
                if m in mixed or (entry.consumers and not readers):
                    dropped.append(m)  # only the float op read it, or it holds both ranges
                    del tensors[m]
                else:
                    tensors[m] = dataclasses.replace(entry, consumers=readers)
            for part in parts:
                kept = [m for m in part if m in tensors]
                new_id = f"group{next_id}" if len(kept) > 1 else None
                next_id += len(kept) > 1
                for m in kept:
                    tensors[m] = dataclasses.replace(tensors[m], group=new_id)
            reason = (f"ranges {_spans(bounds, narrow)} leave {_levels(narrow)} at "
                      f"{scheme.bits} bits under one scale: {', '.join(sorted(ops))} "
                      "runs float, reading its inputs unquantized")
            if dropped:
                reason += f" ({', '.join(dropped)} no longer quantized)"
            for op in ops:
                float_nodes[op] = (f"its inputs' ranges are too far apart for one "
                                   f"{scheme.bits}-bit scale ({_levels(narrow)}): it runs "
                                   "float (shared-scale split after calibration)")
            # a reader of a tensor no longer quantized that reads no other quantized tensor
            # (an activation or its weight) runs float: say why
            still = {c for e in tensors.values() for c in e.consumers}
            for m in dropped:
                for reader in plan.tensors[m].consumers:
                    if reader not in ops and reader not in still:
                        float_nodes[reader] = (
                            f"reads {m}, which holds ranges too far apart for one "
                            f"{scheme.bits}-bit scale ({_levels(narrow)}): it runs float")
            splits.append(GroupSplit(group, "float", narrow, tuple(dropped), reason))
        for m in members:
            notes[m] = f"shared-scale group {group}: {splits[-1].reason}"
        log.info("shared-scale group %s: %s", group, splits[-1].reason)
    if not splits:
        return plan, []
    tensors = {n: e for n, e in tensors.items()
               if e.bias_inputs is None or all(b in tensors for b in e.bias_inputs)}
    return dataclasses.replace(plan, tensors=_single_groups_dropped(tensors), notes=notes,
                               float_nodes=float_nodes), splits


def _single_groups_dropped(tensors):
    counts: dict[str, int] = {}
    for entry in tensors.values():
        if entry.group is not None:
            counts[entry.group] = counts.get(entry.group, 0) + 1
    return {name: dataclasses.replace(entry, group=None)
            if entry.group is not None and counts[entry.group] < 2 else entry
            for name, entry in tensors.items()}


def member_levels(scheme, bounds: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Levels each member keeps under the union of ``bounds`` (see the module docstring)."""
    lo = min(b[0] for b in bounds.values())
    hi = max(b[1] for b in bounds.values())
    shared = float(scheme.qparams(lo, hi)[0])
    steps = scheme.qmax - scheme.qmin
    return {m: steps * float(scheme.qparams(*b)[0]) / shared for m, b in bounds.items()}


def min_levels(scheme) -> float:
    """Fewest levels a member may keep: :data:`MIN_LEVELS`, or at low widths 1/8 of all.

    At 8 bits and more a member keeps 32 levels; at 4 bits (15 steps) one 8x narrower than
    the union (under 2 levels) is erased, one as wide is not.
    """
    return min(MIN_LEVELS, (scheme.qmax - scheme.qmin) / 8)


def _narrow(scheme, bounds) -> dict[str, float]:
    floor = min_levels(scheme)
    return {m: v for m, v in member_levels(scheme, bounds).items() if v < floor}


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


def _parts(graph, backend, members, bounds,
           scheme) -> tuple[list[list[str]], set[str], set[str]]:
    """The group re-joined where a tie keeps both sides' levels; mixed tensors; cut ops.

    A sharing op joins its quantized inputs and outputs when none would keep fewer than
    :data:`MIN_LEVELS` under their union; otherwise it is cut (returned by name: it runs
    float) and its outputs hold values of both ranges: they, and the members tied to them by
    pass-through ops, are mixed. A pass-through op joins its data input and outputs when
    neither would keep fewer than :data:`MIN_LEVELS` under their union.
    """
    from qtool.graph_walk import all_nodes
    from qtool.planner import UnionFind

    inside = set(members)
    union = UnionFind()
    moves = UnionFind()  # pass-through ties only: what moves a mixed tensor's data
    for m in members:
        union.find(m)
        moves.find(m)
    cut_outputs: set[str] = set()
    cut_ops: set[str] = set()
    for node in all_nodes(graph):
        if node.op in backend.sharing_ops:
            side = [t.name for t in [*node.inputs, *node.outputs] if t.name in inside]
            if len(side) < 2:
                continue
            if _narrow(scheme, {m: bounds[m] for m in side}):  # the op would erase one
                cut_ops.add(node.name)
                cut_outputs.update(t.name for t in node.outputs if t.name in inside)
                continue
            for m in side[1:]:
                union.union(side[0], m)
        elif backend.passes_scale_through(node.op, node.attrs) and node.inputs:
            source = node.inputs[0].name
            for out in node.outputs:
                if source not in inside or out.name not in inside:
                    continue
                moves.union(source, out.name)
                if not _narrow(scheme, {source: bounds[source], out.name: bounds[out.name]}):
                    union.union(source, out.name)
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
    return result, mixed, cut_ops


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
