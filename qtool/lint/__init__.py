"""Graph lint: is a float model ready for a backend, and is a QDQ model valid for it?

* :mod:`~qtool.lint.registry`: findings, rules and the :func:`~qtool.lint.registry.rule`
  decorator (what rule modules import);
* :mod:`~qtool.lint.rules`: the built-in rules, one module per family;
* :mod:`~qtool.lint.engine`: :func:`lint_model` runs every rule on a model;
* :mod:`~qtool.lint.formats`: text, JSON, SARIF and JUnit output of ``qtool lint``.
"""

from qtool.lint.engine import available_rules, lint_model
from qtool.lint.formats import FORMATS, format_result, lint_and_render
from qtool.lint.registry import SEVERITIES, Finding, LintContext, LintResult, Rule, rule

__all__ = [
    "FORMATS",
    "SEVERITIES",
    "Finding",
    "LintContext",
    "LintResult",
    "Rule",
    "available_rules",
    "format_result",
    "lint_and_render",
    "lint_model",
    "rule",
]
