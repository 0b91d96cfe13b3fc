"""Weight matmul: activations ``[n, in]`` times a GGUF weight stored ``[out, in]`` (rows = output features).

llama.cpp does not multiply quantized weights with float32 activations: it first rounds each activation row to
the weight type's partner format ("vec_dot_type": 8-bit blocks of 32 with an fp16 scale for Q4_0..Q8_0, 8-bit
blocks of 256 with an f32 scale for K-quants, fp16/bf16 for F16/BF16 weights). ``round_activations`` applies
that rounding with llama.cpp's x86 arithmetic (multiplier ``127/amax``, round half to even, scale ``amax/127``
stored as fp16 for 32-blocks, ``1/(127/amax)`` in f32 for 256-blocks), so the numpy path computes what
llama.cpp computes (and the GPU kernels do the same). Any ulp of difference matters: the next layer's 8-bit
rounding turns it into a whole quantization step.

Q4_1/Q5_1 weights (``w = d*q + m``) pair with Q8_1 activations, which also store ``s = d*sum(q)`` as fp16, and
llama.cpp adds ``m * s`` per block instead of ``m * fp16(d)*sum(q)``: ``q8_1_sum_error`` is that difference,
and ``x_rounded @ W.T + q8_1_sum_error(x) @ block_minimums(W).T`` is llama.cpp's product (``quantized_matmul``
adds it; the CPU backend does not yet: its effect on logits is below llama.cpp's own noise floor, see
tests/test_forward.py, and it would cost a second rounding pass per matmul).

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
    q, scale = _quantize_blocks(x, block)
    if fp16_scale:
        scale = _fp16(scale)
    q *= scale
    return q.reshape(n, k)


# weight types whose activations llama.cpp rounds to Q8_1 (Q8_0 plus the fp16 block sum s = d*sum(q))
Q8_1_WEIGHTS = frozenset({T.Q4_1, T.Q5_1})
_Q4_1_BLOCK_BYTES = {T.Q4_1: 20, T.Q5_1: 24}  # both start with fp16 d, fp16 m


def q8_1_sum_error(x: np.ndarray) -> np.ndarray:
    """``[n, in/32]``: llama.cpp's fp16 block sum ``s`` minus the sum of the rounded activations of the block.

    >>> import numpy as np
    >>> x = np.linspace(-0.3, 1.0, 32, dtype=np.float32)[None]
    >>> float(q8_1_sum_error(x)[0, 0]) != 0.0  # fp16(d*sum(q)) is not fp16(d)*sum(q)
    True
    """
    q, scale = _quantize_blocks(x, 32)
    total = q.sum(axis=-1, keepdims=True)
    # llama.cpp: s = fp16(d * sum(q)) with d the f32 scale; the rounded block sums to fp16(d) * sum(q)
    return (_fp16(scale * total) - _fp16(scale) * total)[..., 0]


def block_minimums(raw: np.ndarray, ggml_type: T) -> np.ndarray:
    """The per-block offset ``m`` of Q4_1/Q5_1 rows (``[out, bytes]`` raw blocks) -> float32 ``[out, in/32]``."""
    rows = np.asarray(raw).reshape(raw.shape[0], -1, _Q4_1_BLOCK_BYTES[ggml_type])
    return np.ascontiguousarray(rows[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)


def _quantize_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x86 llama.cpp's 8-bit quantization of each ``block`` of a row: (integer values as float32, f32 scale)."""
    n, k = x.shape
    blocks = np.asarray(x, dtype=np.float32).reshape(n, k // block, block)
    amax = np.maximum.reduce(np.abs(blocks), axis=-1, keepdims=True)
    # multiplier 127/amax, rounded half to even (_mm256_round_ps / nearest_int), as quantize_row_q8_0/q8_1/q8_K
    # an all-zero block gets multiplier 127 instead of llama.cpp's 0: its values round to 0 either way, and
    # its scale (amax/127 = 0 below; 1/127 for q8_K, times q = 0) leaves the rounded block all zeros too
    inverse = np.float32(127) / np.where(amax > 0, amax, np.float32(1))
    q = np.multiply(blocks, inverse)
    np.rint(q, out=q)  # in place: this runs for every matmul input of every token
    if block == 256:  # quantize_row_q8_K keeps the exact reciprocal of its multiplier as the scale
        scale = np.float32(1) / inverse
    else:  # quantize_row_q8_0/q8_1: scale amax/127 (the caller rounds it to fp16)
        scale = amax / np.float32(127)
    return q, scale


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


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
    product = matmul(round_activations(x, ggml_type), dequantize_weight(raw, ggml_type))
    if ggml_type in Q8_1_WEIGHTS:
        product += q8_1_sum_error(x) @ block_minimums(raw, ggml_type).T
    return product
