"""Rotary position embedding (Su et al., 2021), in llama.cpp's two layouts.

``neox=False`` rotates adjacent pairs (x0, x1), (x2, x3), ... (llama.cpp's "normal" mode, used for llama
whose GGUF converter permuted the q/k weights); ``neox=True`` rotates (x_i, x_{i+n/2}) (GPT-NeoX, Qwen, Gemma).
Only the first ``n_rot`` dimensions of each head rotate; the rest pass through.

``rope`` = ``rotate(x, *rope_tables(...))``: the tables depend only on the positions, so a forward that rotates
q and k in every layer can compute them once per batch (the CPU backend does).
"""
from __future__ import annotations

import numpy as np


def rope_angles(positions: np.ndarray, n_rot: int, theta: float,
                freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Angles ``[n, n_rot/2]``: position * theta^(-2i/n_rot), each frequency divided by its factor (llama3 scaling)."""
    inv_freq = theta ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    return np.outer(positions.astype(np.float64), inv_freq)


def rope_tables(positions: np.ndarray, n_rot: int, theta: float,
                freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(cos, sin)``, each ``[n, 1, n_rot/2]`` (broadcast over heads), of ``rope_angles``."""
    angles = rope_angles(positions, n_rot, theta, freq_factors)[:, None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool, n_rot: int) -> np.ndarray:
    """Rotate the first ``n_rot`` dims of each head of ``x`` (``[n, heads, d_head]``) by the ``rope_tables``."""
    rotated = x[..., :n_rot]
    if neox:
        first, second = rotated[..., : n_rot // 2], rotated[..., n_rot // 2:]
    else:
        first, second = rotated[..., 0::2], rotated[..., 1::2]
    new_first = first * cos - second * sin
    new_second = first * sin + second * cos
    out = np.empty_like(x)
    if neox:
        out[..., : n_rot // 2], out[..., n_rot // 2: n_rot] = new_first, new_second
    else:
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = new_first, new_second
    if n_rot < x.shape[-1]:
        out[..., n_rot:] = x[..., n_rot:]
    return out


def rope(x: np.ndarray, positions: np.ndarray, theta: float, neox: bool,
         n_rot: int | None = None, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Rotate ``x`` (``[n, heads, d_head]``) for the token positions ``positions`` (``[n]``).

    >>> import numpy as np
    >>> x = np.ones((1, 1, 2), np.float32)
    >>> rope(x, np.array([0]), 10000.0, neox=False).tolist()  # position 0 is the identity
    [[[1.0, 1.0]]]
    """
    n_rot = x.shape[-1] if n_rot is None else n_rot
    return rotate(x, *rope_tables(positions, n_rot, theta, freq_factors), neox, n_rot)
