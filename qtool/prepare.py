"""Graph preparation: the passes every backend expects before planning.

Its own module, below the jobs that call it (calibrate, qat, inspect), so that none of them
imports another to reach it.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qtool.pipeline import PassReport, Pipeline

#: cleanup, BatchNorm folding, opset >= 13, spelled-out activations fused back into one op.
PREPARE_PASSES = ("cleanup", "fold_bn", "upgrade_opset", "fuse_activations")


def prepare(graph: gs.Graph) -> tuple[gs.Graph, list[PassReport]]:
    """Run the passes every backend expects first: cleanup, BN folding, opset >= 13."""
    return Pipeline(PREPARE_PASSES).run(graph)
