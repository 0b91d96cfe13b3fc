"""Device memory for the GPU backend: arrays, a caching pool for activations, and arenas for weights and KV.

``DeviceArray`` is what GPU ops take and return: an address, a shape and a dtype, plus the block of memory it
views (reshapes and row slices are views of the same block). Blocks from the pool go back to their pool when
the last view of them is gone; arena slices live as long as the arena. A ``DeviceArray`` speaks DLPack
(``torch.from_dlpack(a)``, ``cupy.from_dlpack(a)`` read it without a copy; ``rocmforge.backends.dlpack``) and
``a.numpy()`` copies it to the host.

>>> from rocmforge.backends.device_memory import ALIGN
>>> ALIGN
256
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from rocmforge.backends.runtime import Runtime

ALIGN = 256
MB = 1 << 20


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Block:
    """One piece of device memory; handed back to its pool when the last array viewing it goes away."""

    __slots__ = ("pool", "address", "size", "runtime")

    def __init__(self, pool: "Pool | None", address: int, size: int, runtime: Runtime | None = None):
        self.pool, self.address, self.size = pool, address, size
        self.runtime = pool.runtime if pool is not None else runtime

    def __del__(self) -> None:
        if self.pool is not None:
            self.pool.free_lists[self.size].append(self.address)


class Pool:
    """Caching allocator: exact-size free lists of 256-byte multiples."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.free_lists: dict[int, list[int]] = defaultdict(list)

    def get(self, nbytes: int) -> Block:
        size = align(max(nbytes, 1))
        free = self.free_lists[size]
        return Block(self, free.pop() if free else self.runtime.alloc(size), size)


class Arena:
    """One allocation carved into 256-byte aligned slices, front to back."""

    def __init__(self, runtime: Runtime, nbytes: int):
        self.base, self.size, self.used = runtime.alloc(nbytes), nbytes, 0
        self.block = Block(None, self.base, nbytes, runtime)

    def take(self, nbytes: int) -> int | None:
        if self.used + nbytes > self.size:
            return None
        address = self.base + self.used
        self.used += align(nbytes)
        return address


class DeviceArray:
    """A float32 or int32 array in device memory (row-major); ``reshape`` and row slices are views."""

    def __init__(self, address: int, shape: tuple[int, ...], block: Block, dtype: Any = np.float32):
        self.address, self.shape, self.block, self.dtype = address, tuple(int(s) for s in shape), block, np.dtype(dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # math.prod: ~10x faster than np.prod on a tuple, and this runs per op

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def reshape(self, *shape: Any) -> "DeviceArray":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return DeviceArray(self.address, shape, self.block, self.dtype)

    def rows(self, start: int, stop: int) -> "DeviceArray":
        """Rows ``start:stop`` of the first axis, as a view."""
        row = self.size // self.shape[0] * self.dtype.itemsize
        return DeviceArray(self.address + start * row, (stop - start, *self.shape[1:]), self.block, self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def numpy(self) -> np.ndarray:
        """A host copy (waits for the work queued before it)."""
        host = np.empty(self.shape, self.dtype)
        self.block.runtime.copy_to_host(host, self.address)
        return host

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = self.numpy()
        return host if dtype is None else host.astype(dtype)

    def __dlpack__(self, stream: Any = None, max_version: Any = None, dl_device: Any = None,
                   copy: bool | None = None) -> Any:
        from rocmforge.backends import dlpack
        return dlpack.export(self)

    def __dlpack_device__(self) -> tuple[int, int]:
        from rocmforge.backends import dlpack
        return dlpack.device_of(self)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype.name})"
