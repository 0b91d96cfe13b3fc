"""Weight matmul: activations ``[n, in]`` times a GGUF weight stored ``[out, in]`` (rows = output features).

llama.cpp does not multiply quantized weights with float32 activations: it first rounds each activation row to
the weight type's partner format ("vec_dot_type": 8-bit blocks of 32 with an fp16 scale for Q4_0..Q8_0, 8-bit
blocks of 256 with an f32 scale for K-quants, fp16/bf16 for F16/BF16 weights). ``round_activations`` applies
that rounding, so the numpy path computes what llama.cpp computes (and the GPU kernels do the same).

Two forms of the op:
- ``matmul(x, weight)``: float32 ``x @ weight.T`` (the CPU backend keeps weights dequantized, so BLAS does this).
- ``quantized_matmul(x, raw, ggml_type)``: llama.cpp's semantics end to end, the reference twin of the GPU's
  fused dequantize-and-multiply kernels: activations rounded as above, raw GGUF blocks dequantized by
  ``gguf.quants.dequantize`` (never rewritten here).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

# weight type -> (block size, scale stored as fp16) of the 8-bit format llama.cpp rounds activations to
_Q8_0 = (32, True)
_Q8_K = (256, False)
ACTIVATION_FORMAT: dict[T, tuple[int, bool]] = {
    T.Q4_0: _Q8_0, T.Q4_1: _Q8_0, T.Q5_0: _Q8_0, T.Q5_1: _Q8_0, T.Q8_0: _Q8_0, T.IQ4_NL: _Q8_0, T.MXFP4: _Q8_0,
    T.Q2_K: _Q8_K, T.Q3_K: _Q8_K, T.Q4_K: _Q8_K, T.Q5_K: _Q8_K, T.Q6_K: _Q8_K, T.IQ4_XS: _Q8_K,
    T.IQ2_XXS: _Q8_K, T.IQ2_XS: _Q8_K, T.IQ2_S: _Q8_K, T.IQ3_XXS: _Q8_K, T.IQ3_S: _Q8_K, T.IQ1_S: _Q8_K,
    T.IQ1_M: _Q8_K, T.TQ1_0: _Q8_K, T.TQ2_0: _Q8_K,
}


def round_activations(x: np.ndarray, ggml_type: T) -> np.ndarray:
    """``x`` ``[n, in]`` as llama.cpp's CPU matmul sees it next to a ``ggml_type`` weight (float32 result).

    >>> import numpy as np
    >>> round_activations(np.array([[1.0] + [0.003] * 31], np.float32), T.Q8_0)[0, :2].tolist()  # fp16 scale
    [0.99993896484375, 0.0]
    """
    if ggml_type == T.F16:
        return x.astype(np.float16).astype(np.float32)
    if ggml_type == T.BF16:
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
        return rounded.view(np.float32)
    if ggml_type not in ACTIVATION_FORMAT:
        return x
    block, fp16_scale = ACTIVATION_FORMAT[ggml_type]
    n, k = x.shape
    blocks = x.reshape(n, k // block, block)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.rint(blocks * inverse)
    if fp16_scale:
        scale = scale.astype(np.float16).astype(np.float32)
    return (q * scale).reshape(n, k).astype(np.float32, copy=False)


def matmul(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x @ weight.T``: ``[n, in] x [out, in] -> [n, out]`` in float32.

    >>> import numpy as np
    >>> matmul(np.ones((1, 2), np.float32), np.array([[1, 2], [3, 4]], np.float32)).tolist()
    [[3.0, 7.0]]
    """
    return x @ weight.T


def dequantize_weight(raw: np.ndarray, ggml_type: T) -> np.ndarray:
    """GGUF blocks (rows of bytes, or plain F32/F16 elements) -> float32 ``[out, in]``."""
    return np.ascontiguousarray(dequantize(np.asarray(raw), ggml_type), dtype=np.float32)


def quantized_matmul(x: np.ndarray, raw: np.ndarray, ggml_type: T) -> np.ndarray:
    """llama.cpp's ``x @ W.T`` for a GGUF weight: rounded activations times the dequantized blocks.

    >>> import numpy as np
    >>> from gguf.quants import quantize
    >>> w = np.arange(64, dtype=np.float32).reshape(2, 32) / 64
    >>> raw = quantize(w, T.Q8_0)
    >>> np.allclose(quantized_matmul(np.ones((1, 32), np.float32), raw, T.Q8_0), w.sum(1), atol=0.2)
    True
    """
    return matmul(round_activations(x, ggml_type), dequantize_weight(raw, ggml_type))
