"""FBGEMM / x86 (PyTorch's server CPU backend): graph 3, asymmetric uint8 activations.

Rules: weights per-channel asymmetric int8 (FBGEMM's kernels take per-channel zero points),
activations per-tensor asymmetric uint8, bias float (FBGEMM adds it in float), Q/DQ on every
input of every quantizable op including both inputs of Add (MQBench Fig. 4(c)).

Option ``reduce_range`` (default True, as PyTorch's ``get_default_qconfig("fbgemm")``):
activations use 7 bits, levels 0..127 stored in uint8, so that ``vpmaddubsw`` (u8 x s8 pairs
summed into a saturating int16) cannot overflow on CPUs without VNNI: 127 * 128 * 2 = 32512
<= 32767 (engines.md section 4.4). ``reduce_range=false`` gives full 8-bit activations for
CPUs with VNNI; on others their integer kernels saturate (the digits CNN drops from 33 to
17 dB in onnxruntime's kernels).

Files: ``model.qdq.onnx`` (the QDQ graph).

OpenVINO runs this file too, with two differences from the simulation: the asymmetric
weights keep its convolutions in f32, and the Clip that emulates 7-bit activations, where it
follows a MaxPool, meets an OpenVINO CPU defect (37-51 LSB errors measured with OpenVINO
2026.4; a random-weight resnet18 gave 18.6 dB where the simulation gives 35.7). The report
warns when the graph has that pattern (:func:`maxpool_clips`).
"""

from __future__ import annotations

import dataclasses

from qtool.backends.base import GRAPH_3, Backend, qdq_model_file

from qtool.scheme import QuantScheme

ACTIVATIONS = QuantScheme(bits=8, signed=False, symmetric=False)
REDUCED_RANGE_ACTIVATIONS = QuantScheme(bits=7, signed=False, symmetric=False)


def maxpool_clips(graph) -> list[str]:
    """Names of the Clip nodes that read a MaxPool's output (OpenVINO CPU miscomputes them)."""
    return sorted(
        node.name for node in graph.nodes
        if node.op == "Clip" and node.inputs and node.inputs[0].inputs
        and node.inputs[0].inputs[0].op == "MaxPool"
    )


def emit(result) -> dict[str, bytes]:
    """The QDQ model; a warning in the report when it has OpenVINO's MaxPool + Clip pattern."""
    clips = maxpool_clips(result.graph)
    if clips:
        warning = (
            f"{len(clips)} Clip(s) after a MaxPool ({clips[0]}{', ...' if len(clips) > 1 else ''}"
            "): OpenVINO's CPU plugin miscomputes this pattern (errors of tens of levels), so "
            "do not deploy this model.qdq.onnx with OpenVINO; quantize with --backend openvino "
            "for it, or set reduce_range=false (no Clip) on a CPU with VNNI"
        )
        if warning not in result.warnings:
            result.warnings.append(warning)
    return qdq_model_file(result)


def configure(backend: Backend) -> Backend:
    """Apply ``reduce_range``: 7-bit unsigned activations."""
    scheme = REDUCED_RANGE_ACTIVATIONS if backend.options["reduce_range"] else ACTIVATIONS
    return dataclasses.replace(backend, activation_scheme=scheme)


BACKEND = Backend(
    name="fbgemm",
    summary="per-channel asymmetric int8 weights, asymmetric uint8 activations, 7-bit "
    "(reduce_range) by default (graph 3)",
    weight_scheme=QuantScheme(bits=8, signed=True, symmetric=False),
    per_channel_weights=True,
    activation_scheme=REDUCED_RANGE_ACTIVATIONS,
    bias_mode="float",
    placement=GRAPH_3,
    emitter=emit,
    options={"reduce_range": True},
    configure=configure,
)
