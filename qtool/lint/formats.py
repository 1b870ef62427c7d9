"""Output formats of ``qtool lint``: text, JSON, SARIF 2.1.0 and JUnit XML.

Several models can be linted at once (a pre-commit hook passes every staged ``.onnx``):

* text: per model, one line per finding ``MODEL: SEVERITY RULE [name] node N: message``,
  then a count line.
* json: ``{"fail_on", "exit_code", "results": [{"model", "backend", "counts", "findings":
  [{rule_id, severity, message, node, tensor}]}]}``.
* sarif: SARIF 2.1.0 (OASIS), one run whose driver lists every rule; each result has the
  rule id, level, message, the model file as its physical location and the node or tensor as
  a logical location. GitHub code scanning reads it (``github/codeql-action/upload-sarif``).
* junit: one ``<testsuite>`` per model and one ``<testcase>`` per rule; findings at or above
  ``fail_on`` are its ``<failure>``, lower ones go to ``<system-out>``.

A model that cannot be read does not stop the others: it is a result with one
``QT000 unreadable-model`` error in every format, and the exit code is 2.

Every format is deterministic: findings are already sorted, no timestamps are written.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence

import qtool
from qtool.errors import QtoolError
from qtool.io import atomic_write_text
from qtool.lint.engine import UNREADABLE, lint_files
from qtool.lint.registry import _RANK, Finding, LintResult

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
FORMATS = ("text", "json", "sarif", "junit")


def lint_and_render(
    models: Sequence[str],
    *,
    backend: str | None = None,
    fmt: str = "text",
    fail_on: str = "error",
    output: str | None = None,
    on_error: Callable[[str, QtoolError], None] | None = None,
) -> tuple[str, int]:
    """Lint model files, render the findings, and write them to ``output`` if given.

    Args:
        models: The model files.
        backend: Check against this backend's rules too.
        fmt: One of :data:`FORMATS`.
        fail_on: Lowest severity that fails.
        output: Write the rendering here (atomically) instead of returning it only.
        on_error: Called for each model that cannot be read (it is linted as QT000).

    Returns:
        ``(rendered text, exit code)``: 0 clean, 1 findings at or above ``fail_on``, 2 when
        a model could not be read (the others are linted and rendered all the same).
    """
    results, _ = lint_files(models, backend=backend, on_error=on_error)
    text = format_results(results, fmt, fail_on=fail_on)
    if output is not None:
        atomic_write_text(output, text)
    return text, exit_code(results, fail_on)


def exit_code(results: Sequence[LintResult], fail_on: str = "error") -> int:
    """2 when a model could not be read (QT000), else 0 clean, 1 findings at ``fail_on``."""
    if any(f.rule_id == UNREADABLE for r in results for f in r.findings):
        return 2
    return max((r.exit_code(fail_on) for r in results), default=0)


def format_result(result: LintResult, fmt: str, *, fail_on: str = "error") -> str:
    """Render one lint result in one of :data:`FORMATS`."""
    return format_results([result], fmt, fail_on=fail_on)


def format_results(results: Sequence[LintResult], fmt: str, *, fail_on: str = "error") -> str:
    """Render lint results in one of :data:`FORMATS`."""
    renderers: dict[str, Callable[[Sequence[LintResult], str], str]] = {
        "text": to_text,
        "json": to_json,
        "sarif": to_sarif,
        "junit": to_junit,
    }
    return renderers[fmt](results, fail_on)


def to_text(results: Sequence[LintResult], fail_on: str = "error") -> str:
    """Human-readable lines and a count line per model."""
    lines = []
    for result in results:
        for f in result.findings:
            name = result.rules[f.rule_id].name if f.rule_id in result.rules else ""
            lines.append(
                f"{result.model}: {f.severity} {f.rule_id} [{name}] {_where(f)}{f.message}"
            )
        counts = result.counts()
        summary = ", ".join(f"{n} {sev}{'s' if n != 1 else ''}" for sev, n in counts.items())
        target = f" for {result.backend}" if result.backend else ""
        status = "fails" if result.exit_code(fail_on) else "passes"
        lines.append(f"{result.model}{target}: {summary} ({status} --fail-on {fail_on})")
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[LintResult], fail_on: str = "error") -> str:
    """A JSON document of the findings."""
    document = {
        "fail_on": fail_on,
        "exit_code": exit_code(results, fail_on),
        "results": [
            {
                "model": r.model,
                "backend": r.backend,
                "counts": r.counts(),
                "findings": [f.to_dict() for f in r.findings],
            }
            for r in results
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def to_sarif(results: Sequence[LintResult], fail_on: str = "error") -> str:
    """A SARIF 2.1.0 log with one run covering every model."""
    rules_by_id = {rule_id: r for result in results for rule_id, r in result.rules.items()}
    rule_ids = sorted(rules_by_id)
    rules = [
        {
            "id": r.id,
            "name": r.name,
            "shortDescription": {"text": r.summary},
            "defaultConfiguration": {"level": r.severity},
        }
        for r in (rules_by_id[i] for i in rule_ids)
    ]
    entries = []
    for result in results:
        for f in result.findings:
            location: dict = {
                "physicalLocation": {
                    "artifactLocation": {"uri": _uri(result.model)},
                    "region": {"startLine": 1},
                }
            }
            logical = []
            if f.node:
                logical.append({"name": f.node, "kind": "function", "fullyQualifiedName": f.node})
            if f.tensor:
                logical.append(
                    {"name": f.tensor, "kind": "variable", "fullyQualifiedName": f.tensor}
                )
            if logical:
                location["logicalLocations"] = logical
            entry = {
                "ruleId": f.rule_id,
                "level": f.severity,
                "message": {"text": f.message},
                "locations": [location],
            }
            if f.rule_id in rule_ids:
                entry["ruleIndex"] = rule_ids.index(f.rule_id)
            entries.append(entry)
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "qtool",
                        "version": qtool.__version__,
                        "rules": rules,
                    }
                },
                "results": entries,
            }
        ],
    }
    return json.dumps(log, indent=2) + "\n"


def to_junit(results: Sequence[LintResult], fail_on: str = "error") -> str:
    """JUnit XML: a suite per model, a case per rule, failed at or above ``fail_on``."""
    threshold = _RANK[fail_on]
    suites = ET.Element("testsuites", name="qtool lint")
    total_tests = total_failures = 0
    for result in results:
        by_rule: dict[str, list[Finding]] = {rule_id: [] for rule_id in result.rules}
        for f in result.findings:
            by_rule.setdefault(f.rule_id, []).append(f)
        failures = sum(
            any(_RANK[f.severity] >= threshold for f in found) for found in by_rule.values()
        )
        total_tests += len(by_rule)
        total_failures += failures
        name = f"qtool lint {result.model}" + (
            f" --backend {result.backend}" if result.backend else ""
        )
        suite = ET.SubElement(
            suites, "testsuite", name=name, tests=str(len(by_rule)), failures=str(failures),
            errors="0", skipped="0",
        )
        for rule_id, found in by_rule.items():
            rule_name = result.rules[rule_id].name if rule_id in result.rules else rule_id
            case = ET.SubElement(
                suite, "testcase", classname=f"qtool.lint.{rule_id}", name=rule_name
            )
            failing = [f for f in found if _RANK[f.severity] >= threshold]
            other = [f for f in found if _RANK[f.severity] < threshold]
            if failing:
                failure = ET.SubElement(
                    case, "failure", type=max((f.severity for f in failing), key=_RANK.get),
                    message=f"{len(failing)} finding(s) at or above {fail_on}",
                )
                failure.text = "\n".join(f"{f.severity}: {_where(f)}{f.message}" for f in failing)
            if other:
                out = ET.SubElement(case, "system-out")
                out.text = "\n".join(f"{f.severity}: {_where(f)}{f.message}" for f in other)
    suites.set("tests", str(total_tests))
    suites.set("failures", str(total_failures))
    ET.indent(suites)
    xml = ET.tostring(suites, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + xml + "\n"


def _where(f: Finding) -> str:
    if f.node:
        return f"node {f.node}: "
    if f.tensor:
        return f"tensor {f.tensor}: "
    return ""


def _uri(path: str) -> str:
    """A relative URI reference for the model path (forward slashes, spaces escaped)."""
    from urllib.parse import quote

    return quote(path.replace("\\", "/"))
