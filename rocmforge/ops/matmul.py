"""Weight matmul: activations ``[n, in]`` times a GGUF weight stored ``[out, in]`` (rows = output features).

Two forms of the same op:
- ``matmul(x, weight)``: ``weight`` already dequantized to float32 (what the CPU backend keeps in memory,
  so BLAS sgemm/sgemv does the work).
- ``quantized_matmul(x, raw, ggml_type)``: the reference twin of the GPU's fused dequantize-and-multiply
  kernels: the raw GGUF blocks go in, dequantized by ``gguf.quants.dequantize`` (never rewritten here).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize


def matmul(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x @ weight.T``: ``[n, in] x [out, in] -> [n, out]`` in float32.

    >>> import numpy as np
    >>> matmul(np.ones((1, 2), np.float32), np.array([[1, 2], [3, 4]], np.float32)).tolist()
    [[3.0, 7.0]]
    """
    return x @ weight.T


def dequantize_weight(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """GGUF blocks (rows of bytes, or plain F32/F16 elements) -> float32 ``[out, in]``."""
    return np.ascontiguousarray(dequantize(np.asarray(raw), ggml_type), dtype=np.float32)


def quantized_matmul(x: np.ndarray, raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """``x @ dequantize(raw).T``: the numpy twin of the GPU fused dequantize-and-multiply kernel.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import quantize
    >>> w = np.arange(64, dtype=np.float32).reshape(2, 32) / 64
    >>> raw = quantize(w, T.Q8_0)
    >>> np.allclose(quantized_matmul(np.ones((1, 32), np.float32), raw, T.Q8_0), w.sum(1), atol=0.2)
    True
    """
    return matmul(x, dequantize_weight(raw, ggml_type))
