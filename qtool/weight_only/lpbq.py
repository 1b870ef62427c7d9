r"""QNN's LPBQ (low-power blockwise quantization), as AIMET exports it.

Blockwise int4 weights whose block scales are themselves quantized: per output channel ``n``
a float scale ``f_n``, per block an integer ``i[b, n]`` in ``1 .. 2^(bw - cbw)``::

    f_n     = max_b s[b, n] / 2^(bw - cbw)          (bw = 8 decompressed, cbw = 4 compressed)
    i[b, n] = clip(round(s[b, n] / f_n), 1, 2^(bw - cbw))
    s'[b,n] = i[b, n] * f_n                          W ~ s' * q,  q in [-8, 7]

(``aimet_onnx/lpbq_utils.py``: ``grouped_dynamic_quantize``; the weights are rounded on the
compressed scales ``s'``). The encoding (format 1.0.0, ``GroupedBlockQuantizeDequantize.
_export_1_0_0_encodings``) of a MatMul weight ``[K, N]`` (channel axis 1, block axis 0)::

    {"name": w, "enc_type": "LPBQ", "dtype": "INT", "bw": 8, "compressed_bw": 4,
     "is_sym": true, "block_size": B, "scale": [f_n] * N, "offset": [-128] * N,
     "per_block_int_scale": i.flatten()  # [K / B, N], row-major}
"""

from __future__ import annotations

import numpy as np

DECOMPRESSED_BITS = 8


def compress_scales(scale: np.ndarray, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(per_channel f [N], per_block_int i [n_blocks, N])`` of block scales ``[n_blocks, N]``."""
    levels = 2 ** (DECOMPRESSED_BITS - bits)
    per_channel = (scale.max(axis=0) / levels).astype(np.float32)
    per_channel = np.maximum(per_channel, np.float32(1e-12))
    ints = np.clip(np.round(scale / per_channel), 1, levels).astype(np.int64)
    return per_channel, ints


def lpbq_grid(grid, bits: int = 4):
    """A symmetric grid ``(scale, zero)`` with its scales replaced by their LPBQ values."""
    scale, zero = grid
    per_channel, ints = compress_scales(scale, bits)
    return (ints * per_channel).astype(np.float32), zero


def encoding(name: str, scale: np.ndarray, block_size: int, bits: int = 4) -> dict:
    """The 1.0.0 param encoding of one weight with (already compressed) block scales."""
    per_channel, ints = compress_scales(scale, bits)
    return {
        "name": name,
        "enc_type": "LPBQ",
        "dtype": "INT",
        "bw": DECOMPRESSED_BITS,
        "compressed_bw": bits,
        "is_sym": True,
        "block_size": block_size,
        "scale": [float(f) for f in per_channel],
        "offset": [-(2 ** (DECOMPRESSED_BITS - 1))] * len(per_channel),
        "per_block_int_scale": [int(i) for i in ints.reshape(-1)],
    }


def encodings_file(params: list[dict]) -> dict:
    """AIMET's 1.0.0 encodings: param encodings only (weight-only: activations stay float)."""
    return {
        "version": "1.0.0",
        "activation_encodings": [],
        "param_encodings": sorted(params, key=lambda e: e["name"]),
        "quantizer_args": {
            "activation_bitwidth": 16, "dtype": "int", "is_symmetric": True,
            "param_bitwidth": 4, "per_channel_quantization": True,
            "quant_scheme": "post_training_tf",
        },
    }
