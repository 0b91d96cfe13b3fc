"""The hook edits in one op: rewrite a block of columns in chosen rows, ``keep * x + take * src``.

Zero ablation is ``keep=0`` without ``src``; mean ablation and patching copy ``src`` rows (``keep=0, take=1``);
steering adds a vector (``keep=1``, every row reading source row 0); scaling a head is ``keep=factor`` on the
head's columns. The GPU twin is ``kernels/edit_rows.hip``. Edits ``x`` in place and returns it.

>>> import numpy as np
>>> x = np.ones((3, 4), np.float32)
>>> edit_rows(x, np.array([0, 2]), col0=1, n_cols=2, keep=0.0).tolist()
[[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]]
>>> edit_rows(x, np.array([1]), 0, 4, keep=1.0, src=np.full((1, 4), 2, np.float32), src_rows=np.array([0])).tolist()[1]
[3.0, 3.0, 3.0, 3.0]
"""
from __future__ import annotations

import numpy as np


def edit_rows(x: np.ndarray, rows: np.ndarray, col0: int, n_cols: int, keep: float, src: np.ndarray | None = None,
              src_rows: np.ndarray | None = None, src_col0: int = 0, take: float = 1.0) -> np.ndarray:
    """``x[rows, col0:col0+n_cols] = keep * x[...] + take * src[src_rows, src_col0:src_col0+n_cols]`` on ``[n, width]``
    arrays (``keep == 0`` does not read ``x``; no ``src`` adds nothing)."""
    cols = slice(col0, col0 + n_cols)
    value = np.zeros((len(rows), n_cols), np.float32) if keep == 0 else np.float32(keep) * x[rows, cols]
    if src is not None:
        value = value + np.float32(take) * src[src_rows, src_col0:src_col0 + n_cols]
    x[rows, cols] = value
    return x
