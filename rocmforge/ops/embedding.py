"""Token embedding lookup: one row of the ``[vocab, d]`` table per token id.

``embedding`` reads a float32 table; ``quantized_embedding`` dequantizes only the looked-up rows of the raw
GGUF blocks (the twin of the GPU's quantized lookup kernel, and what the CPU uses when the table is not
also needed as the output projection).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize


def embedding(table: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Rows ``table[tokens]``: ``[vocab, d]``, ``[n]`` -> ``[n, d]`` float32.

    >>> import numpy as np
    >>> embedding(np.eye(3, dtype=np.float32), np.array([2, 0])).tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    return np.ascontiguousarray(table[tokens], dtype=np.float32)


def quantized_embedding(raw: np.ndarray, ggml_type: GGMLQuantizationType, tokens: np.ndarray) -> np.ndarray:
    """Dequantize just the rows ``raw[tokens]`` of a GGUF table stored as one row of blocks per token."""
    return np.ascontiguousarray(dequantize(np.asarray(raw)[tokens], ggml_type), dtype=np.float32)
