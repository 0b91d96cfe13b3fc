"""The small GPU runtime interface that the GPU backend is written against.

Two implementations mirror each other: ``rocmforge.backends.hip`` (hip-python: hiprtc + hipModule*, AMD ROCm)
and ``rocmforge.backends.cuda`` (cuda-python: NVRTC + cuModule*, NVIDIA). They differ only in context setup,
argument packing, compiler options and graph instantiation; everything else (the on-disk cache of compiled
kernels, module bookkeeping, argument helpers) lives here.

Device pointers are plain ``int`` addresses everywhere. Kernel arguments are ctypes values built with
``ptr``/``i32``/``i64``/``f32`` so the packing is explicit about sizes on both runtimes.

>>> from rocmforge.backends.runtime import i32, f32
>>> [type(a).__name__ for a in (i32(3), f32(0.5))]
['c_int', 'c_float']
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from kernels import kernel_source
from rocmforge.registry import home


def ptr(address: int) -> ctypes.c_void_p:
    """A device pointer argument (0 is a null pointer)."""
    return ctypes.c_void_p(address)


def i32(value: int) -> ctypes.c_int:
    return ctypes.c_int(value)


def i64(value: int) -> ctypes.c_int64:
    """A 64-bit integer argument (``long`` in the kernels: 64 bits on Linux for both compilers)."""
    return ctypes.c_int64(value)


def f32(value: float) -> ctypes.c_float:
    return ctypes.c_float(value)


def pack_args(args: list[Any]) -> tuple[ctypes.Array, list[Any]]:
    """A ``void*[]`` holding the address of each ctypes argument (what kernelParams expects).

    Returns the array and the list that keeps the arguments alive until the launch call returns.
    """
    array = (ctypes.c_void_p * max(1, len(args)))(*[ctypes.addressof(a) for a in args])
    return array, args


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$ROCMFORGE_HOME/kernels/<runtime>/<arch>/``."""
    return home() / "kernels"


class Runtime(ABC):
    """One GPU: memory, compiled kernels, launches on one stream, events and graphs."""

    name: str            # "hip" or "cuda"
    arch: str            # compiler target: "sm_90", "gfx942:sramecc+:xnack-", ...
    warp_size: int       # 32 on NVIDIA and RDNA wave32, 64 on CDNA / wave64
    device_name: str

    def __init__(self) -> None:
        self._modules: dict[str, Any] = {}
        self._functions: dict[tuple[str, str], Any] = {}

    # --- memory -------------------------------------------------------------------------------------------
    @abstractmethod
    def mem_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes."""

    @abstractmethod
    def alloc(self, nbytes: int) -> int: ...

    @abstractmethod
    def free(self, address: int) -> None: ...

    @abstractmethod
    def copy_to_device(self, address: int, host: np.ndarray) -> None:
        """Copy a C-contiguous host array to ``address`` (ordered on the runtime's stream)."""

    @abstractmethod
    def copy_to_host(self, host: np.ndarray, address: int) -> None:
        """Copy ``host.nbytes`` bytes from ``address`` into ``host``; returns when the data is there."""

    @abstractmethod
    def memset(self, address: int, byte: int, nbytes: int) -> None: ...

    @abstractmethod
    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device copy, ordered on the stream."""

    # --- kernels ------------------------------------------------------------------------------------------
    @abstractmethod
    def _compile(self, source: str, name: str, options: list[str]) -> bytes:
        """Source -> code object for this device (cubin / hsaco)."""

    @abstractmethod
    def _load_module(self, code: bytes) -> Any: ...

    @abstractmethod
    def _get_function(self, module: Any, name: str) -> Any: ...

    @abstractmethod
    def set_max_dynamic_shared(self, function: Any, nbytes: int) -> None:
        """Allow a kernel more than the default 48 KB of dynamic shared memory."""

    @abstractmethod
    def launch(self, function: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[Any],
               shared_bytes: int = 0) -> None: ...

    def compile_options(self) -> list[str]:
        """Options that select this device; ``-DRF_WARP`` tells the kernels the warp size."""
        return [f"-DRF_WARP={self.warp_size}"]

    def compile(self, source: str, name: str) -> bytes:
        """Compile ``source`` once per (source hash, arch, options); later runs read the cached code object."""
        options = self.compile_options()
        key = hashlib.sha256("\0".join([source, self.name, self.arch, *options]).encode()).hexdigest()[:32]
        cache = cache_dir() / self.name / self.arch.replace(":", "_") / f"{name}-{key}.bin"
        if cache.exists():
            return cache.read_bytes()
        code = self._compile(source, name, options)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, delete=False) as tmp:  # atomic for parallel runs
            tmp.write(code)
        os.replace(tmp.name, cache)
        return code

    def function(self, op: str, kernel: str) -> Any:
        """Kernel ``kernel`` from ``kernels/<op>.hip`` (compiled and loaded on first use)."""
        key = (op, kernel)
        if key not in self._functions:
            if op not in self._modules:
                self._modules[op] = self._load_module(self.compile(kernel_source(op), op))
            self._functions[key] = self._get_function(self._modules[op], kernel)
        return self._functions[key]

    # --- ordering and timing ------------------------------------------------------------------------------
    @abstractmethod
    def synchronize(self) -> None: ...

    @abstractmethod
    def event(self) -> Any:
        """A new timing event."""

    @abstractmethod
    def record(self, event: Any) -> None: ...

    @abstractmethod
    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded events (waits for ``end``)."""

    # --- graphs -------------------------------------------------------------------------------------------
    @abstractmethod
    def begin_capture(self) -> None:
        """Record the stream's work from here into a graph instead of running it."""

    @abstractmethod
    def end_capture(self) -> Any:
        """Stop recording; returns an executable graph."""

    @abstractmethod
    def replay(self, graph: Any) -> None: ...
