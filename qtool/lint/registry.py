"""The lint rule registry: findings, rules, the context a rule sees, results.

Rule modules (:mod:`qtool.lint.rules`) import :func:`rule`, :class:`Finding` and
:class:`LintContext` from here; nothing here imports a rule back, so the registry has no
cycle. :mod:`qtool.lint.engine` imports the rules (which registers them) and runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)


SEVERITIES = ("note", "warning", "error")


_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


@dataclass(frozen=True, order=True)
class Finding:
    """One problem found in a model.

    Attributes:
        rule_id: The rule's id, e.g. ``QT104``.
        severity: ``error``, ``warning`` or ``note``.
        message: What is wrong, naming the node or tensor, and what to do.
        node: Name of the node it concerns, if any.
        tensor: Name of the tensor it concerns, if any.
    """

    rule_id: str
    severity: str
    message: str
    node: str | None = None
    tensor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the JSON format."""
        return asdict(self)


@dataclass(frozen=True)
class Rule:
    """A registered lint rule."""

    id: str
    name: str
    severity: str
    summary: str
    check: Callable[[LintContext], Iterable[Finding]]

    def finding(
        self,
        message: str,
        *,
        node: str | None = None,
        tensor: str | None = None,
        severity: str | None = None,
    ) -> Finding:
        """A finding of this rule (at its default severity unless given)."""
        return Finding(self.id, severity or self.severity, message, node, tensor)


_RULES: dict[str, Rule] = {}


def rule(rule_id: str, name: str, severity: str, summary: str):
    """Register ``check(context) -> Iterable[Finding]`` as a lint rule.

    The decorated function receives the :class:`LintContext`; it makes findings with
    ``context.rule.finding(...)`` so the rule id and default severity come from here.
    """
    if severity not in _RANK:
        raise ValueError(f"severity {severity!r} is not one of {SEVERITIES}")

    def decorate(fn: Callable[[LintContext], Iterable[Finding]]):
        if rule_id in _RULES and _RULES[rule_id].check is not fn:
            raise ValueError(f"lint rule {rule_id} registered twice")
        _RULES[rule_id] = Rule(rule_id, name, severity, summary, fn)
        return fn

    return decorate


@dataclass
class LintContext:
    """What a rule sees.

    Attributes:
        model: The model as loaded (external data in memory).
        graph: The model as a graph, or None when onnx-graphsurgeon cannot import it.
        backend: The backend name given with ``--backend``, or None.
        checker_error: The ONNX checker's complaint, or None when the model is valid.
        rule: The rule now running (set by :func:`lint_model`).
    """

    model: onnx.ModelProto
    graph: gs.Graph | None
    backend: str | None = None
    checker_error: str | None = None
    rule: Rule | None = None

    @property
    def is_qdq(self) -> bool:
        """The model already holds QuantizeLinear or DequantizeLinear nodes."""
        qdq = ("QuantizeLinear", "DequantizeLinear")
        return any(n.op_type in qdq for n in self.model.graph.node)


@dataclass
class LintResult:
    """All findings for one model, sorted by rule id then location."""

    model: str
    backend: str | None
    findings: list[Finding] = field(default_factory=list)
    rules: dict[str, Rule] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Number of findings per severity."""
        return {s: sum(f.severity == s for f in self.findings) for s in reversed(SEVERITIES)}

    def exit_code(self, fail_on: str = "error") -> int:
        """0 when no finding is at or above ``fail_on``, else 1."""
        threshold = _RANK[fail_on]
        return int(any(_RANK[f.severity] >= threshold for f in self.findings))
