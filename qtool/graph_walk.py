"""Walking a graph and its If/Loop/Scan bodies: every node, tensor, body, reader.

The ground floor that the planner, the Q/DQ writer, bias correction and the passes share:
onnx-graphsurgeon's ``Graph`` sees only its own nodes, and a body reads outer tensors by
name, so a walk that forgets the bodies misses readers.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Sequence

import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)


def walk(graph: gs.Graph, depth: int = 0):
    """``(depth, node)`` for every node of ``graph`` and of its subgraphs (depth > 0)."""
    for node in graph.nodes:
        yield depth, node
        for value in node.attrs.values():
            subgraphs = value if isinstance(value, list) else [value]
            for sub in subgraphs:
                if isinstance(sub, gs.Graph):
                    yield from walk(sub, depth + 1)


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """``graph`` and every If/Loop/Scan body in it (nested ones too), outermost first."""
    graphs = [graph]
    for _, node in walk(graph):
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    graphs.append(sub)
    return graphs


def all_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Every node of ``graph`` and of its bodies, each body's nodes after the node holding it.

    Body nodes read outer tensors by name (onnx-graphsurgeon shares the tensor objects), so
    one walk over this list sees every producer and consumer of every tensor.
    """
    return [node for _, node in walk(graph)]


def all_tensors(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """The tensors of ``graph`` and of its bodies, by name."""
    tensors: dict[str, gs.Tensor] = {}
    for sub in all_graphs(graph):
        for name, tensor in sub.tensors().items():
            tensors.setdefault(name, tensor)
    return tensors


def owner_graph(graph: gs.Graph, tensor: gs.Tensor, consumers: Sequence[gs.Node],
                graphs: Sequence[gs.Graph] | None = None) -> gs.Graph:
    """The (sub)graph where nodes reading ``tensor`` for ``consumers`` go.

    That is the body producing the tensor (or holding it as a body input), else the body
    holding every consumer, else ``graph`` itself: every body can read outer tensors.
    ``graphs`` is :func:`all_graphs` of ``graph`` when the caller has it already.
    """
    graphs = all_graphs(graph) if graphs is None else graphs
    for sub in graphs[1:]:
        if any(t is tensor for t in sub.inputs) or any(
            tensor is out for node in sub.nodes for out in node.outputs
        ):
            return sub
    if consumers:
        holders = [next((sub for sub in graphs[1:] if node in sub.nodes), graph)
                   for node in consumers]
        if all(h is holders[0] for h in holders):
            return holders[0]
    return graph


def name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name (``<op>_<index>`` for unnamed or repeated ones), in place.

    Nodes inside If/Loop/Scan bodies are named too (after the outer graph's nodes' indices).
    """
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(all_nodes(graph)):
        if not node.name or node.name in seen:
            base = f"{node.op}_{index}"
            candidate, suffix = base, 0
            while candidate in seen:
                suffix += 1
                candidate = f"{base}_{suffix}"
            node.name = candidate
            renamed += 1
        seen.add(node.name)
    if renamed:
        log.info("named %d unnamed or duplicate nodes", renamed)


def consumer_map(nodes: Iterable[gs.Node]) -> dict[str, list[tuple[gs.Node, int]]]:
    """Tensor name -> ``(node, input index)`` of every node of ``nodes`` that reads it."""
    uses: dict[str, list[tuple[gs.Node, int]]] = collections.defaultdict(list)
    for node in nodes:
        for index, tensor in enumerate(node.inputs):
            if tensor.name:
                uses[tensor.name].append((node, index))
    return uses
