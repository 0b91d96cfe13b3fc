"""Split a kernel's output rows over the machine's cores with plain Python threads: the numba kernels are
``nogil``, so two threads run them at once. Only large calls are split (a decode step's small matmuls lose more to
the hand-off than they gain); every output is computed by one thread in ggml's order, so the bits do not depend on
the split.

llama.cpp splits its matmuls over ``n_threads`` the same way (by output rows); on the 2-core machines this project
measures on, that is 2.

>>> import numpy as np
>>> out = np.zeros(10)
>>> def fill(out, start, stop):
...     out[start:stop] = np.arange(start, stop)
>>> split_rows(fill, (out,), 10, work=10**9)
>>> out.tolist() == list(range(10))
True
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

N_THREADS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
# below this many multiply-adds a call runs on one thread (~0.1 ms of kernel time)
MIN_SPLIT_WORK = 4_000_000

_pool: ThreadPoolExecutor | None = None


def split_rows(kernel: Callable[..., Any], args: tuple, n_rows: int, work: int) -> None:
    """Run ``kernel(*args, start, stop)`` over ``[0, n_rows)``: in ``N_THREADS`` slices of rows when ``work``
    (multiply-adds) is large, else in one call."""
    global _pool
    if N_THREADS == 1 or work < MIN_SPLIT_WORK or n_rows < 2 * N_THREADS:
        kernel(*args, 0, n_rows)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(N_THREADS - 1, thread_name_prefix="rocmforge-exact")
    bounds = [n_rows * i // N_THREADS for i in range(N_THREADS + 1)]
    others = [_pool.submit(kernel, *args, start, stop) for start, stop in zip(bounds[1:-1], bounds[2:])]
    kernel(*args, bounds[0], bounds[1])
    for future in others:
        future.result()
