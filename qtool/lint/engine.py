"""Graph lint: is a float model ready for a backend, and is a QDQ model valid for it?

A rule is one function ``check(context) -> Iterable[Finding]`` registered with :func:`rule`
under an id (``QT0xx`` for float-model readiness, ``QT1xx`` for QDQ validity), a short name, a
default severity and a one-line summary. The rules live in :mod:`qtool.lint.rules`, one
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import onnx
import onnx_graphsurgeon as gs

import qtool.lint.rules  # noqa: F401  (registers the built-in rules)
from qtool.errors import BackendError, QtoolError
from qtool.io import ModelSource, load_model
from qtool.lint.registry import _RULES, Finding, LintContext, LintResult, Rule, rule

log = logging.getLogger(__name__)


UNREADABLE = "QT000"


@rule(UNREADABLE, "unreadable-model", "error", "The file cannot be read as an ONNX model.")
def unreadable_model(ctx: LintContext) -> Iterator[Finding]:
    """A model that loaded is readable: :func:`lint_files` reports the ones that did not."""
    return iter(())


def available_rules() -> dict[str, Rule]:
    """Every lint rule by id (the built-in ones are registered on import)."""
    return dict(sorted(_RULES.items()))


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


def lint_files(
    models: Sequence[ModelSource], *, backend: str | None = None,
    on_error: Callable[[str, QtoolError], None] | None = None,
) -> tuple[list[LintResult], bool]:
    """Lint several models; one that cannot be read does not stop the others.

    An unreadable model (missing, not ONNX, truncated, unsafe) becomes a result with one
    ``QT000 unreadable-model`` error, so every output format records it.

    Args:
        models: The model files.
        backend: As for :func:`lint_model`.
        on_error: Called with the model and the error for each unreadable one.

    Returns:
        ``(results in the order given, whether some model could not be read)``.

    Raises:
        BackendError: Unknown backend (nothing is linted).
    """
    if backend is not None:
        from qtool.backends import get_backend

        get_backend(backend)
    results, unreadable = [], False
    for model in models:
        try:
            results.append(lint_model(model, backend=backend))
        except BackendError:
            raise
        except QtoolError as exc:
            unreadable = True
            if on_error is not None:
                on_error(str(model), exc)
            finding = _RULES[UNREADABLE].finding(
                exc.message + (f" ({exc.hint})" if exc.hint else "")
            )
            name = str(model) if _is_path(model) else "<model>"
            results.append(LintResult(name, backend, [finding], available_rules()))
    return results, unreadable


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
