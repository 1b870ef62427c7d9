"""A fitted MLP block (256 -> 512 -> 256, GELU) whose inputs' channel scales spread 0.1..10.

Built the way training leaves such a block, in closed form so that it costs milliseconds:
the first layer reads the *normalised* input (its rows are ``A[k] / scale_k``, so every input
channel matters to the output whatever its scale: the layout activation-aware rounding is
for), and the second layer is the least-squares fit of a teacher function on the hidden
features. Seeded: the same
bytes on every run. Exported as MatMul + Add (what ``MatMulNBitsQuantizer`` takes) or Gemm.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IN, HIDDEN, OUT = 256, 512, 256


def channel_scales() -> np.ndarray:
    """Per input channel scale, log-spaced 0.1 .. 10, shuffled over the channels."""
    scales = np.logspace(-1, 1, IN).astype(np.float32)
    return scales[np.random.default_rng(7).permutation(IN)]


def inputs(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, IN)) * channel_scales()).astype(np.float32)


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def fitted_weights(rows: int = 4096):
    """``(w1 [256, 512], b1, w2 [512, 256], b2)`` of the block.

    The target is a teacher of this shape on the normalised input, ``t = gelu(x / scale @ A
    + c) @ B + d``; the first layer reads the raw input (``w1 = A / scale``) and the second
    is fitted by ridge least squares on the hidden features of ``rows`` samples.
    """
    rng = np.random.default_rng(0)
    scales = channel_scales().astype(np.float64)
    a = rng.standard_normal((IN, HIDDEN)) / np.sqrt(IN)
    c = 0.1 * rng.standard_normal(HIDDEN)
    b = rng.standard_normal((HIDDEN, OUT)) / np.sqrt(HIDDEN)
    d = 0.1 * rng.standard_normal(OUT)
    x = inputs(rows, seed=1).astype(np.float64)
    w1 = a / scales[:, None]
    hidden = _gelu(x @ w1 + c)
    target = hidden @ b + d
    features = np.concatenate([hidden, np.ones((rows, 1))], axis=1)
    solution = np.linalg.solve(features.T @ features + 1e-2 * np.eye(HIDDEN + 1),
                               features.T @ target)
    w2, b2 = solution[:-1], solution[-1]
    return [v.astype(np.float32) for v in (w1, c, w2, b2)]


def mlp_onnx(opset: int = 17, gemm: bool = False) -> bytes:
    """The block as ONNX: ``x [batch, 256] -> y [batch, 256]``, GELU written with Erf."""
    w1, b1, w2, b2 = fitted_weights()
    init = [numpy_helper.from_array(w1.T.copy() if gemm else w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2.T.copy() if gemm else w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
            numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    if gemm:
        first = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1)]
        second = [helper.make_node("Gemm", ["g", "w2", "b2"], ["y"], name="fc2", transB=1)]
    else:
        first = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
                 helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias")]
        second = [helper.make_node("MatMul", ["g", "w2"], ["y0"], name="fc2"),
                  helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias")]
    gelu = [helper.make_node("Div", ["h", "sqrt2"], ["h_s"], name="gelu_div"),
            helper.make_node("Erf", ["h_s"], ["h_e"], name="gelu_erf"),
            helper.make_node("Add", ["h_e", "one"], ["h_p"], name="gelu_add"),
            helper.make_node("Mul", ["h", "h_p"], ["h_m"], name="gelu_mul"),
            helper.make_node("Mul", ["h_m", "half"], ["g"], name="gelu_half")]
    graph = helper.make_graph(
        first + gelu + second, "mlp_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
