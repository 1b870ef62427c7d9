r"""Blockwise integer weights: the grid, the levels, and their ONNX storage.

A MatMul weight ``W`` of shape ``[K, N]`` (``K`` inputs, ``N`` outputs) is cut into blocks of
``block_size`` consecutive rows of one column; block ``b`` of column ``n`` has its own scale
``s[b, n]`` and zero point ``z[b, n]``::

    W[k, n] ~ s[k // B, n] * (q[k, n] - z[k // B, n])

* symmetric: ``q`` signed in ``[-2^(bits-1), 2^(bits-1) - 1]``, ``z = 0``;
* asymmetric: ``q`` unsigned in ``[0, 2^bits - 1]``, ``z`` an integer in the same range.

Storage (all little-endian bytes):

* ONNX INT4/UINT4 initializers pack two values per byte, the first (even index) in the low
  nibble (onnx ``numpy_helper.from_array`` does it);
* onnxruntime's ``MatMulNBits`` (com.microsoft) takes ``B`` as uint8 ``[N, n_blocks,
  block_size * bits / 8]`` (column ``n``'s blocks, each packed low nibble first, values
  unsigned: symmetric levels are stored ``+ 2^(bits-1)``), ``scales`` float ``[N * n_blocks]``
  and ``zero_points`` uint8 ``[N, ceil(n_blocks * bits / 8)]`` packed the same way (absent:
  ``2^(bits-1)``), as ``onnxruntime/quantization/matmul_nbits_quantizer.py`` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

#: Block sizes ``--block-size`` accepts (onnxruntime's kernels and TensorRT's INT4 both take
#: powers of two from 16; 32/64/128 are what the engines document).
BLOCK_SIZES = (32, 64, 128)
#: Weight widths ``--weight-only`` accepts.
WEIGHT_BITS = (4, 8)


@dataclass(frozen=True)
class BlockFormat:
    """How weights are cut and rounded: bits, rows per block, symmetric or not."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False

    @property
    def qmin(self) -> int:
        """The lowest level."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """The highest level."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def blocks(self, rows: int) -> int:
        """Blocks along ``rows`` input channels (the last one may be short)."""
        return -(-rows // self.block_size)


@dataclass
class BlockQuantized:
    """A weight in blocks: levels ``[K, N]`` and per-block ``scale``/``zero_point``."""

    levels: np.ndarray  # int16 [K, N]
    scale: np.ndarray  # float32 [n_blocks, N]
    zero_point: np.ndarray  # int16 [n_blocks, N] (zeros when symmetric)
    fmt: BlockFormat

    def dequantize(self) -> np.ndarray:
        """``s * (q - z)`` as float32 ``[K, N]``."""
        return dequantize(self.levels, self.scale, self.zero_point, self.fmt.block_size)


def expand(per_block: np.ndarray, rows: int, block_size: int) -> np.ndarray:
    """A ``[n_blocks, N]`` array repeated to one row per input channel ``[rows, N]``."""
    return np.repeat(per_block, block_size, axis=0)[:rows]


def dequantize(levels, scale, zero_point, block_size: int) -> np.ndarray:
    """``s * (q - z)`` of levels ``[K, N]`` with per-block ``scale``/``zero_point``."""
    rows = levels.shape[0]
    return (expand(scale, rows, block_size)
            * (levels.astype(np.float32) - expand(zero_point, rows, block_size))
            ).astype(np.float32)


def round_to_grid(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                  fmt: BlockFormat) -> np.ndarray:
    """Nearest levels of ``weight`` ``[K, N]`` on the grid (clipped to the format's range)."""
    rows = weight.shape[0]
    q = np.round(weight / expand(scale, rows, fmt.block_size)) + expand(zero_point, rows,
                                                                        fmt.block_size)
    return np.clip(q, fmt.qmin, fmt.qmax).astype(np.int16)


def onnx_type(fmt: BlockFormat) -> int:
    """The ONNX element type of the levels."""
    if fmt.bits == 4:
        return onnx.TensorProto.INT4 if fmt.symmetric else onnx.TensorProto.UINT4
    return onnx.TensorProto.INT8 if fmt.symmetric else onnx.TensorProto.UINT8


def integer_tensor(name: str, values: np.ndarray, data_type: int) -> onnx.TensorProto:
    """An initializer of type ``data_type``; INT4/UINT4 packed two per byte, low nibble first."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    return onnx.numpy_helper.from_array(np.asarray(values).astype(np_dtype), name)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values (last axis even) as bytes: element ``2i`` low, ``2i+1`` high."""
    values = np.asarray(values, dtype=np.uint8) & 0x0F
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits_arrays(quantized: BlockQuantized) -> dict[str, np.ndarray]:
    """``B``, ``scales`` and (asymmetric) ``zero_points`` of onnxruntime's MatMulNBits.

    ``K`` must be a multiple of the block size (callers keep other weights float).
    """
    fmt = quantized.fmt
    rows, cols = quantized.levels.shape
    n_blocks = fmt.blocks(rows)
    offset = 2 ** (fmt.bits - 1) if fmt.symmetric else 0
    unsigned = (quantized.levels.astype(np.int16) + offset).astype(np.uint8)  # [K, N]
    by_column = unsigned.T.reshape(cols, n_blocks, fmt.block_size)
    arrays = {"scales": quantized.scale.T.reshape(-1).astype(np.float32)}
    if fmt.bits == 4:
        arrays["B"] = pack_nibbles(by_column)
    else:
        arrays["B"] = by_column.astype(np.uint8)
    if not fmt.symmetric:
        zero = quantized.zero_point.T.astype(np.uint8)  # [N, n_blocks]
        if fmt.bits == 4:
            if n_blocks % 2:
                zero = np.concatenate([zero, np.zeros((cols, 1), np.uint8)], axis=1)
            zero = pack_nibbles(zero)
        arrays["zero_points"] = zero
    return arrays
