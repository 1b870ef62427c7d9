"""Where an output's error collapses, found cheaply for one output (the floors' warnings).

``--analysis full`` measures the accumulated error of every quantized tensor on all the
calibration data. A floor breach in summary mode needs only the tensors the breaching output
depends on, on a few rows: :func:`first_collapse` runs the float and the quantized graphs on
at most :data:`ROWS` rows of the evaluation data, fetches the quantized activations the
output reads (directly or through other nodes) and their float values, and returns the first
one in graph order whose SQNR (``10 * log10(sum x^2 / sum (x - q)^2)``) is below the floor,
else the worst of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qtool.analysis.common import feeds_of, fetchable, iterate_batches, run, session, sort_db
from qtool.analysis.evaluate import _ErrorSums
from qtool.io import load_model, serialize

#: Rows of the evaluation data the search runs on.
ROWS = 32


def upstream_tensors(graph: gs.Graph, output: str) -> set[str]:
    """Names of ``output`` and every tensor it is computed from."""
    tensors = graph.tensors()
    seen: set[str] = set()
    stack = [tensors[output]] if output in tensors else []
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        for node in tensor.inputs:
            stack.extend(node.inputs)
    return seen


def first_collapse(float_graph: gs.Graph, result, batches: Iterable[Mapping[str, np.ndarray]],
                   output: str, floor_db: float, rows: int = ROWS) -> dict[str, Any] | None:
    """The first quantized activation feeding ``output`` whose SQNR is below ``floor_db``.

    Args:
        float_graph: The prepared float graph.
        result: The :class:`qtool.qdq.QuantizedModel`.
        batches: Evaluation batches (a callable giving them, or an iterable).
        output: The graph output that breached a floor.
        floor_db: The SQNR floor.
        rows: Batches are run until this many rows are seen.

    Returns:
        ``{"tensor", "sqnr_db", "below_floor"}`` (``below_floor`` False: none is below the
        floor and this is the worst), or None when no quantized activation feeds it.
    """
    upstream = upstream_tensors(float_graph, output)
    float_proto = load_model(float_graph)
    quant_proto = load_model(serialize(result.graph))
    inputs = [i.name for i in float_proto.graph.input
              if i.name not in {t.name for t in float_proto.graph.initializer}]
    wanted = [e.tensor for e in result.plan.entries("activation") if e.tensor in upstream]
    quant_bytes, quant_names = fetchable(quant_proto, [f"{t}_dequantized" for t in wanted])
    wanted = [t for t in wanted if f"{t}_dequantized" in quant_names]
    if not wanted:
        return None
    float_bytes, float_names = fetchable(float_proto, [t for t in wanted if t not in inputs])
    float_fetch = [float_names[t] for t in wanted if t not in inputs]
    quant_fetch = [quant_names[f"{t}_dequantized"] for t in wanted]
    float_session, quant_session = session(float_bytes), session(quant_bytes)
    sums = {t: _ErrorSums() for t in wanted}
    seen = 0
    for index, batch in enumerate(iterate_batches(batches)):
        if seen >= rows:
            break
        feeds = feeds_of(batch, inputs, index)
        seen += int(np.shape(next(iter(feeds.values())))[0]) if feeds else 1  # whole batches
        where = f"on evaluation batch {index} (collapse search)"
        values = dict(zip([t for t in wanted if t not in inputs],
                          run(float_session, float_fetch, feeds, where), strict=True))
        values.update({n: feeds[n] for n in inputs})
        for tensor, q in zip(wanted, run(quant_session, quant_fetch, feeds, where),
                             strict=True):
            if np.size(values[tensor]) and np.size(q):
                sums[tensor].update(values[tensor], q)
    measured = [(t, sums[t].sqnr_db) for t in wanted if sums[t].elements]
    if not measured:
        return None
    for tensor, sqnr in measured:
        if sqnr is not None and sqnr < floor_db:
            return {"tensor": tensor, "sqnr_db": sqnr, "below_floor": True}
    tensor, sqnr = min(measured, key=lambda m: (sort_db(m[1]), m[0]))
    return {"tensor": tensor, "sqnr_db": sqnr, "below_floor": False}
