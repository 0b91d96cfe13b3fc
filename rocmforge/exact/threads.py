"""Split a kernel's output rows over the machine's cores: numba's parallel loop (OpenMP or TBB thread pool) runs
``kernel(*args, start, stop)`` on one slice of rows per thread. Only calls with enough work are split (a decode
step's smallest matmuls lose more to the hand-off than they gain), and only while splitting is the faster way
(not on a machine whose other jobs keep a core busy). Every output is computed by one thread in ggml's order, so
the bits do not depend on the split.

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

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numba

# below this many multiply-adds a call runs on the calling thread alone (~8 us of kernel time; numba's OpenMP pool
# hands a slice over in ~4 us): SmolLM2's attention output (576x576) splits, decoding ~3% faster on 2 cores
MIN_SPLIT_WORK = 250_000
# an elementwise op's work per element in those units (a rounding, table lookup or rotation: ~0.5 ns)
ELEMENT_WORK = 16


@dataclass
class _Kind:
    """What calls of one kernel and size have taken lately (seconds per multiply-add), each way."""

    serial: deque[float] = field(default_factory=lambda: deque(maxlen=4))
    parallel: deque[float] = field(default_factory=lambda: deque(maxlen=4))
    explore_every: int = 16   # calls between tries of the slower way; doubled while it stays slower
    calls: int = 0


_kinds: dict[tuple[Any, int], _Kind] = {}
_threads: list[int] = []


def _num_threads() -> int:
    """numba's thread count, asked once: ``numba.get_num_threads()`` takes ~14 us (it checks the pool under a
    lock), 90 calls a decode step. A later ``numba.set_num_threads`` changes only how many slices a call is cut
    into, never a result."""
    if not _threads:
        _threads.append(numba.get_num_threads())
    return _threads[0]


def split_rows(driver: Callable[..., Any], kernel: Callable[..., Any], args: tuple, n_rows: int, work: int) -> None:
    """Run ``kernel(*args, start, stop)`` over ``[0, n_rows)`` (output rows, or heads): in one call on this thread,
    or through ``driver(args, n_rows, n_slices)`` (an ``@njit(parallel=True)`` loop calling ``kernel`` on slice
    ``i`` of ``n_slices``) with one slice per thread, when ``work`` (multiply-adds) is large and that has been the
    faster way for calls of this kind and size lately.

    On a busy machine a parallel call waits for a thread the OS has not scheduled (one other busy process on the
    2 cores made calls 25x slower and decode 4x), so the way is chosen by the best of the last few timings of each
    (one stall does not count), and the slower way is tried again after 16, 32, ... 1024 calls."""
    if work < MIN_SPLIT_WORK or n_rows < 4:  # decode-sized calls: no thread bookkeeping at all (~1 us a call)
        kernel(*args, 0, n_rows)
        return
    n_threads = _num_threads()
    if n_threads == 1 or n_rows < 2 * n_threads:
        kernel(*args, 0, n_rows)
        return
    kind = _kinds.setdefault((driver, work.bit_length()), _Kind())
    kind.calls += 1
    warming_up = len(kind.parallel) < 2 or not kind.serial  # the first parallel call also starts the thread pool
    if warming_up:
        use_parallel = faster = len(kind.parallel) < 2
    else:
        faster = min(kind.parallel) <= min(kind.serial)
        use_parallel = faster != (kind.calls % kind.explore_every == 0)
    start = time.perf_counter()
    if use_parallel:
        driver(args, n_rows, n_threads)
    else:
        kernel(*args, 0, n_rows)
    (kind.parallel if use_parallel else kind.serial).append((time.perf_counter() - start) / work)
    if not warming_up and use_parallel != faster:  # a try of the slower way
        still_slower = (min(kind.parallel) <= min(kind.serial)) == faster
        kind.explore_every = min(2 * kind.explore_every, 1024) if still_slower else 16
