"""Split a kernel's output rows over the machine's cores: numba's parallel loop (OpenMP or TBB thread pool) runs
``kernel(*args, start, stop)`` on one slice of rows per thread. Only calls with enough work are split (a decode
step's smallest matmuls lose more to the hand-off than they gain). Every output is computed by one thread in
ggml's order, so the bits do not depend on the split.

llama.cpp splits its matmuls over ``n_threads`` the same way (by output rows); on the 2-core machines this project
measures on, that is 2. numba's thread count (``NUMBA_NUM_THREADS``, default: the cores) sets the split here.

>>> import numpy as np
>>> from numba import njit, prange
>>> @njit
... def fill(out, start, stop):
...     out[start:stop] = np.arange(start, stop)
>>> @njit(parallel=True)
... def fill_parallel(args, n_rows, n_slices):
...     for i in prange(n_slices):
...         fill(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)
>>> out = np.zeros(10)
>>> split_rows(fill_parallel, fill, (out,), 10, work=10**9)
>>> out.tolist() == list(range(10))
True
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba

# below this many multiply-adds a call runs on the calling thread alone (~15 us of kernel time)
MIN_SPLIT_WORK = 500_000


def split_rows(driver: Callable[..., Any], kernel: Callable[..., Any], args: tuple, n_rows: int, work: int) -> None:
    """Run ``kernel(*args, start, stop)`` over ``[0, n_rows)`` (output rows, or heads): through
    ``driver(args, n_rows, n_slices)`` (an ``@njit(parallel=True)`` loop calling ``kernel`` on slice ``i`` of
    ``n_slices``) with one slice per thread when ``work`` (multiply-adds) is large, else in one call here."""
    n_threads = numba.get_num_threads()
    if n_threads == 1 or work < MIN_SPLIT_WORK or n_rows < 2 * n_threads:
        kernel(*args, 0, n_rows)
    else:
        driver(args, n_rows, n_threads)
