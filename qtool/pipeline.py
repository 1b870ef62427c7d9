"""Named graph passes and the pipeline that runs them.

A pass is a plain function ``Graph -> Graph`` registered under a name, so that a recipe can
name it. While it runs it may call :func:`note` to say what it changed ("20
BatchNormalization folded"); the pipeline also records the op histogram before and after,
so every pass is reported as changed or not even when it says nothing. After each pass the
pipeline checks the graph's invariants (every input produced, acyclic, opset unchanged unless
the pass says otherwise) and wraps failures with the pass's name.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from qtool.errors import PassError, QtoolError, RecipeError

log = logging.getLogger(__name__)

PassFn = Callable[..., gs.Graph]


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: its name, function, options (with defaults) and one-line summary."""

    name: str
    fn: PassFn
    options: Mapping[str, Any]
    summary: str
    changes_opset: bool = False


_REGISTRY: dict[str, PassInfo] = {}
_NOTES: contextvars.ContextVar[list[tuple[str, bool]] | None] = contextvars.ContextVar(
    "notes", default=None
)


def register_pass(name: str, *, changes_opset: bool = False) -> Callable[[PassFn], PassFn]:
    """Register ``fn(graph, **options) -> graph`` as the pass ``name``.

    Keyword-only parameters with defaults become the pass's recipe options.
    """

    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"pass {name!r} registered twice")
        params = list(inspect.signature(fn).parameters.values())[1:]
        options = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = PassInfo(name, fn, options, summary, changes_opset)
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return decorate


def note(message: str, *, changed: bool = True) -> None:
    """Record what the running pass did; shown in its :class:`PassReport`.

    Args:
        message: What happened, e.g. "20 BatchNormalization folded".
        changed: False for notes that say why nothing was done ("already at opset 13").
    """
    notes = _NOTES.get()
    if notes is not None:
        notes.append((message, changed))
    log.info(message)


def available_passes() -> dict[str, PassInfo]:
    """All registered passes by name (importing qtool.passes registers the built-in ones)."""
    import qtool.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> PassInfo:
    """The pass registered as ``name``.

    Raises:
        RecipeError: No such pass; the message lists the known ones.
    """
    passes = available_passes()
    if name not in passes:
        raise RecipeError(f"unknown pass {name!r}", f"known passes: {', '.join(passes)}")
    return passes[name]


@dataclass
class PassReport:
    """What one pass did."""

    name: str
    changed: bool
    notes: list[str] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: the notes, or the op-count difference when the pass left none."""
        if self.notes:
            return f"{self.name}: " + "; ".join(self.notes)
        if not self.changed:
            return f"{self.name}: no change"
        delta = {
            op: self.ops_after.get(op, 0) - self.ops_before.get(op, 0)
            for op in sorted(set(self.ops_before) | set(self.ops_after))
        }
        parts = [f"{op} {d:+d}" for op, d in delta.items() if d]
        return f"{self.name}: " + (", ".join(parts) if parts else "graph rewritten")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for reports."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Step:
    """One pass of a pipeline with its options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


class Pipeline:
    """An ordered list of passes.

    Example:
        >>> pipe = Pipeline(["cleanup", ("fold_bn", {}), "upgrade_opset"])
        >>> graph, reports = pipe.run(graph)
    """

    def __init__(self, steps: Iterable[str | Step | tuple[str, Mapping[str, Any]] | PassFn]):
        self.steps: tuple[Step, ...] = tuple(_to_step(s) for s in steps)
        for step in self.steps:
            _check_options(get_pass(step.name), step.options)

    def __repr__(self) -> str:
        return f"Pipeline({[s.name for s in self.steps]})"

    @classmethod
    def from_recipe(cls, source: str | Path | Mapping[str, Any]) -> Pipeline:
        """Build a pipeline from a recipe file (YAML or JSON) or an already parsed mapping.

        The recipe is ``{"passes": [name | {name: {option: value}}, ...]}``; other top-level
        keys are for the caller (``qtool run`` reads ``model``/``output``), and are checked
        there.
        """
        recipe = load_recipe(source) if not isinstance(source, Mapping) else source
        passes = recipe.get("passes")
        if not isinstance(passes, list) or not passes:
            raise RecipeError("the recipe has no 'passes' list")
        steps = []
        for item in passes:
            if isinstance(item, str):
                steps.append(Step(item))
            elif isinstance(item, Mapping) and len(item) == 1:
                (name, options), = item.items()
                if options is not None and not isinstance(options, Mapping):
                    raise RecipeError(f"options of pass {name!r} must be a mapping")
                steps.append(Step(str(name), dict(options or {})))
            else:
                raise RecipeError(
                    f"recipe entry {item!r} is neither a pass name nor {{name: {{options}}}}"
                )
        return cls(steps)

    def run(self, graph: gs.Graph) -> tuple[gs.Graph, list[PassReport]]:
        """Run every pass in order.

        Returns:
            The final graph and one report per pass.

        Raises:
            PassError: A pass failed or left the graph broken; the message names it.
        """
        reports = []
        for step in self.steps:
            graph, report = run_pass(graph, step.name, **step.options)
            reports.append(report)
        return graph, reports


def run_pass(graph: gs.Graph, name: str, **options: Any) -> tuple[gs.Graph, PassReport]:
    """Run one registered pass with the pipeline's contract (notes, invariants, errors)."""
    info = get_pass(name)
    _check_options(info, options)
    before = op_histogram(graph)
    opset_before = graph.opset
    notes: list[tuple[str, bool]] = []
    token = _NOTES.set(notes)
    try:
        result = info.fn(graph, **options)
    except QtoolError:
        raise
    except Exception as exc:
        raise PassError(f"pass {name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        _NOTES.reset(token)
    if not isinstance(result, gs.Graph):
        raise PassError(f"pass {name} returned {type(result).__name__}, not a Graph")
    check_invariants(result, name)
    if result.opset != opset_before and not info.changes_opset:
        raise PassError(f"pass {name} changed the opset from {opset_before} to {result.opset}")
    after = op_histogram(result)
    changed = any(flag for _, flag in notes) or before != after
    report = PassReport(name, changed, [message for message, _ in notes], before, after)
    log.info(report.summary())
    return result, report


def op_histogram(graph: gs.Graph) -> dict[str, int]:
    """Number of nodes per op type."""
    return dict(sorted(collections.Counter(n.op for n in graph.nodes).items()))


def check_invariants(graph: gs.Graph, pass_name: str) -> None:
    """Every node input is produced (graph input, constant or node output) and names are unique.

    Raises:
        PassError: Naming the pass and the first broken tensor.
    """
    produced = {t.name for t in graph.inputs}
    tensors = graph.tensors()
    for tensor in tensors.values():
        if isinstance(tensor, gs.Constant):
            produced.add(tensor.name)
    outputs_seen: set[str] = set()
    for node in graph.nodes:
        for out in node.outputs:
            if out.name in outputs_seen:
                raise PassError(f"after pass {pass_name}: tensor {out.name} produced twice")
            outputs_seen.add(out.name)
    produced |= outputs_seen
    for node in graph.nodes:
        for inp in node.inputs:
            if inp.name and inp.name not in produced:
                raise PassError(
                    f"after pass {pass_name}: input {inp.name} of node {node.name} "
                    "is produced by nothing"
                )
    for out in graph.outputs:
        if out.name not in produced:
            raise PassError(f"after pass {pass_name}: graph output {out.name} is not produced")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON recipe file into a dict.

    Raises:
        RecipeError: The file is missing or does not parse.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})", "check the path") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise RecipeError(f"{path}: recipe does not parse: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with a 'passes' list")
    return data


def _to_step(item: Any) -> Step:
    if isinstance(item, Step):
        return item
    if isinstance(item, str):
        return Step(item)
    if callable(item) and hasattr(item, "pass_name"):
        return Step(item.pass_name)
    if isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str):
        return Step(item[0], dict(item[1] or {}))
    raise RecipeError(f"cannot make a pipeline step of {item!r}", "give a pass name")


def _check_options(info: PassInfo, options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        known = ", ".join(info.options) or "none"
        raise RecipeError(
            f"pass {info.name} has no option {', '.join(unknown)}", f"its options: {known}"
        )
