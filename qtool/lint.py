"""Graph lint: is a float model ready for a backend, and is a QDQ model valid for it?

A rule is one function ``check(context) -> Iterable[Finding]`` registered with :func:`rule`
under an id (``QT0xx`` for float-model readiness, ``QT1xx`` for QDQ validity), a short name, a
default severity and a one-line summary. The rules live in :mod:`qtool.lint_rules`, one
module per family; adding a rule means adding one decorated function there.

Severities are SARIF's levels, ordered ``note < warning < error``. :func:`lint_model` runs
every rule and returns a :class:`LintResult`; its exit code is 0 when no finding reaches the
``fail_on`` level and 1 otherwise (the CLI uses 2 when lint could not run at all).

The lint works on any ONNX model, including QDQ models made by other tools: it reads the
model as a protobuf (so that an invalid graph is a finding, not a crash) and as an
onnx-graphsurgeon graph for the rules that follow edges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from qtool.errors import QtoolError
from qtool.io import ModelSource, load_model

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


def available_rules() -> dict[str, Rule]:
    """Every lint rule by id (importing qtool.lint_rules registers the built-in ones)."""
    import qtool.lint_rules  # noqa: F401  (registers the rules)

    return dict(sorted(_RULES.items()))


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


def lint_model(
    source: ModelSource, *, backend: str | None = None, name: str | None = None
) -> LintResult:
    """Run every lint rule on a model.

    Args:
        source: The model (path, bytes, ModelProto or Graph).
        backend: Check against this backend's rules too (schemes, shared scales, float ops).
        name: How to name the model in the output (default: the path as given).

    Returns:
        The findings.

    Raises:
        ModelLoadError: The file is missing or not ONNX (lint cannot run).
        BackendError: Unknown backend.
    """
    if backend is not None:
        from qtool.backends import get_backend

        get_backend(backend)  # refuse an unknown name before reading anything
    model = load_model(source)
    checker_error = _checker_error(model)
    graph = None
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:  # a graph the checker already flagged; rules needing edges skip
        log.debug("graphsurgeon cannot import the model: %s", exc)
        checker_error = checker_error or f"onnx-graphsurgeon cannot import the graph: {exc}"
    context = LintContext(model, graph, backend, checker_error)
    rules = available_rules()
    findings: set[Finding] = set()
    for lint_rule in rules.values():
        context.rule = lint_rule
        try:
            findings.update(lint_rule.check(context))
        except QtoolError as exc:  # e.g. the passes a backend rule needs reject the graph
            findings.add(
                lint_rule.finding(
                    f"rule {lint_rule.id} ({lint_rule.name}) could not check this model: "
                    f"{exc.message}",
                    severity="warning",
                )
            )
        except Exception as exc:  # a rule tripping over an odd graph must not hide the others
            log.debug("rule %s failed", lint_rule.id, exc_info=True)
            findings.add(
                lint_rule.finding(
                    f"rule {lint_rule.id} ({lint_rule.name}) could not check this model: "
                    f"{type(exc).__name__}: {exc}",
                    severity="note",
                )
            )
    display = name if name is not None else (str(source) if _is_path(source) else "<model>")
    ordered = sorted(findings, key=lambda f: (f.rule_id, f.node or "", f.tensor or "", f.message))
    return LintResult(display, backend, ordered, rules)


def _checker_error(model: onnx.ModelProto) -> str | None:
    from qtool.io import check_model

    try:
        check_model(model)
    except QtoolError as exc:
        return exc.message
    return None


def _is_path(source: Any) -> bool:
    import os

    return isinstance(source, (str, os.PathLike))
