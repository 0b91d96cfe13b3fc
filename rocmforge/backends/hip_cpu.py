"""The GPU backend's kernels on the CPU: a ``Runtime`` on AMD's HIP CPU Runtime (HIP-CPU, header-only, vendored
under ``third_party/hip-cpu``), for checking kernels and the whole GPU backend where there is no GPU.

Each ``kernels/<op>.hip`` is compiled by g++ with the same prelude and ``-DRF_WARP=64`` into a shared library:
HIP-CPU runs every block's threads as fibers on one CPU thread with a wavefront of 64 lanes, so what runs is the
AMD (CDNA, wave 64) side of every ``#if`` in the kernels — shuffles, ``__syncthreads``, shared memory, atomics —
with the same launch geometry the GPU gets. It checks meaning, not speed or hardware limits (registers, scratch,
occupancy: ``hip_offline`` reports those from hipcc). Device memory is host memory; "graphs" record the
launches of a capture and replay them in order. Slow: tests use small shapes.

Needs g++ (C++17) and TBB (``apt-get install libtbb-dev``: the parallel algorithms HIP-CPU runs blocks with).

>>> from rocmforge.backends.hip_cpu import available
>>> isinstance(available()[0], bool)
True
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rocmforge.backends.runtime import Runtime, cache_dir, pack_args
from rocmforge.errors import DeviceError

HEADERS = Path(__file__).resolve().parents[2] / "third_party" / "hip-cpu"
WAVE = 64                   # HIP-CPU's warpSize (a constant there)
SHARED_BYTES = 256 << 10    # dynamic shared memory each block may ask for (more than any GPU gives)
_BOUNDS = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"
_KERNEL = re.compile(rf'extern\s+"C"\s+__global__\s+{_BOUNDS}void\s+{_BOUNDS}(\w+)\s*\(')
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]")

# Device functions HIP-CPU leaves out, written as the GPU defines them (bit casts).
_MISSING = """
#include <cstring>
__device__ inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
__device__ inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
__device__ inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
__device__ inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
#define __align__(n) __attribute__((aligned(n)))
static unsigned char* rf_dynamic_shared() {
    alignas(256) static thread_local unsigned char shared[RF_HIP_CPU_SHARED_BYTES];
    return shared;
}
// the integer overloads of min/max CUDA and HIP give device code (an unsigned one must not go through int)
#define RF_MIN_MAX(T) \
    __device__ inline T min(T a, T b) { return a < b ? a : b; } \
    __device__ inline T max(T a, T b) { return a > b ? a : b; }
RF_MIN_MAX(int) RF_MIN_MAX(unsigned) RF_MIN_MAX(long) RF_MIN_MAX(unsigned long) RF_MIN_MAX(long long)
RF_MIN_MAX(unsigned long long)
"""

# Launch any kernel from a void*[] of argument addresses (what cuLaunchKernel takes): the kernel's own parameter
# types say how to read each one.
_LAUNCHER = """
#include <utility>
#include <type_traits>
template <typename... P, std::size_t... I>
static void rf_launch(void (*kernel)(P...), const unsigned* dims, unsigned shared, void** args,
                      std::index_sequence<I...>) {
    hipLaunchKernelGGL(kernel, dim3(dims[0], dims[1], dims[2]), dim3(dims[3], dims[4], dims[5]), shared, nullptr,
                       *static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
    hipDeviceSynchronize();
}
template <typename... P>
static void rf_launch(void (*kernel)(P...), const unsigned* dims, unsigned shared, void** args) {
    rf_launch(kernel, dims, shared, args, std::index_sequence_for<P...>{});
}
"""




def _harness_id() -> str:
    """Changes whenever the code around the kernels does (this module's text, the HIP-CPU headers): compiled
    libraries are cached by source and options, so this goes into the options."""
    digest = hashlib.sha256((_MISSING + _LAUNCHER + _DYNAMIC_SHARED.pattern).encode())
    for header in sorted(HEADERS.rglob("*.h*")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:12]


def available() -> tuple[bool, str]:
    """(True, description) when g++, TBB and the vendored HIP-CPU headers are here; else (False, what's missing)."""
    if not (HEADERS / "include" / "hip" / "hip_runtime.h").exists():
        return False, f"the HIP-CPU headers are not at {HEADERS} (a source checkout has them)"
    if shutil.which("g++") is None:
        return False, "g++ is not installed"
    if not Path("/usr/include/tbb/tbb.h").exists() and not Path("/usr/include/oneapi/tbb.h").exists():
        return False, "TBB is not installed (apt-get install libtbb-dev)"
    return True, "HIP-CPU (kernels on the CPU, wave 64)"


def kernel_names(preprocessed: str) -> list[str]:
    """The ``extern "C" __global__`` kernels of a preprocessed source (macro-made ones included).

    >>> kernel_names('extern "C" __global__ void __launch_bounds__(256) k(int n) {}')
    ['k']
    """
    return _KERNEL.findall(preprocessed)


class HipCpuRuntime(Runtime):
    """One emulated device: host memory, g++-compiled kernels, launches that return when the kernel is done."""

    name = "hip-cpu"
    arch = "x86_64-wave64"
    warp_size = WAVE

    def __init__(self) -> None:
        super().__init__()
        ok, why = available()
        if not ok:
            raise DeviceError(f"the HIP CPU runtime is unavailable: {why}")
        self.device_name = "HIP-CPU (emulated, wave 64)"
        self.multiprocessors = os.cpu_count() or 1  # blocks run side by side on the CPU's threads
        self._buffers: dict[int, np.ndarray] = {}
        self._capture: list[tuple[Any, ...]] | None = None
        self._libraries = tempfile.mkdtemp(prefix="rocmforge-hip-cpu-")
        self._harness = _harness_id()

    # --- memory -------------------------------------------------------------------------------------------
    def mem_info(self) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def alloc(self, nbytes: int) -> int:
        buffer = np.empty(max(1, nbytes) + 256, dtype=np.uint8)
        address = buffer.ctypes.data + (-buffer.ctypes.data) % 256  # the GPU's allocation alignment
        self._buffers[address] = buffer
        return address

    def free(self, address: int) -> None:
        del self._buffers[address]

    def copy_to_device(self, address: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        self._run(("copy", address, host.copy(), host.nbytes))

    def copy_to_host(self, host: np.ndarray, address: int) -> None:
        ctypes.memmove(host.ctypes.data, address, host.nbytes)

    def memset(self, address: int, byte: int, nbytes: int) -> None:
        self._run(("memset", address, byte, nbytes))

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self._run(("move", dst, src, nbytes))

    # --- kernels ------------------------------------------------------------------------------------------
    def compile_options(self) -> list[str]:
        # -O0: each kernel file then compiles in seconds, and tests run small shapes
        return [*super().compile_options(), f"-DRF_HIP_CPU_HARNESS={self._harness}",
                f"-DRF_HIP_CPU_SHARED_BYTES={SHARED_BYTES}", "-DHIP_CPU_FIBER_STACK=65536",
                "-std=c++17", "-O0", "-fPIC", "-w"]

    def _compile(self, source: str, name: str, options: list[str]) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            kernel = Path(tmp) / f"{name}.hip"
            # a block's dynamic shared memory: one buffer per CPU thread (HIP-CPU runs a block's lanes as fibers
            # of one thread). GCC miscompiles `extern thread_local T name[]`, so the declaration becomes a pointer.
            kernel.write_text(_DYNAMIC_SHARED.sub(r"\1* \2 = (\1*)rf_dynamic_shared()", source))
            flags = [o for o in options if o.startswith("-D")]
            expanded = _gxx(["-E", "-P", "-x", "c++", "-D__HIP__", *flags, str(kernel)], name).decode()
            launchers = "".join(f'extern "C" void rf_launch_{k}(const unsigned* d, unsigned s, void** a) '
                                f"{{ rf_launch({k}, d, s, a); }}\n" for k in kernel_names(expanded))
            unit = Path(tmp) / f"{name}.cpp"
            unit.write_text(f'#include "rf_hip_cpu.h"\n#include "{kernel.name}"\n{_LAUNCHER}{launchers}')
            library = Path(tmp) / f"{name}.so"
            _gxx([*options, "-shared", f"-I{self._precompiled(options)}", str(unit), "-o", str(library),
                  "-ltbb", "-lpthread"], name)
            return library.read_bytes()

    def _precompiled(self, options: list[str]) -> Path:
        """A folder with ``rf_hip_cpu.h`` (HIP-CPU plus ``_MISSING``) precompiled for ``options``: most of a
        kernel file's compile time is these headers."""
        key = hashlib.sha256("\0".join(options).encode()).hexdigest()[:16]
        folder = cache_dir() / self.name / f"pch-{key}"
        if not (folder / "rf_hip_cpu.h.gch").exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # renamed into place: parallel runs never see half
                header = Path(tmp) / "rf_hip_cpu.h"
                header.write_text(f"#include <hip/hip_runtime.h>\n{_MISSING}")
                _gxx([*options, f"-I{HEADERS / 'include'}", f"-I{HEADERS / 'src' / 'include'}", "-x", "c++-header",
                      str(header), "-o", f"{header}.gch"], "rf_hip_cpu.h")
                os.replace(header, folder / "rf_hip_cpu.h")
                os.replace(f"{header}.gch", folder / "rf_hip_cpu.h.gch")
        return folder

    def _load_module(self, code: bytes) -> Any:
        fd, path = tempfile.mkstemp(suffix=".so", dir=self._libraries)
        with os.fdopen(fd, "wb") as out:
            out.write(code)
        return ctypes.CDLL(path)

    def _get_function(self, module: Any, name: str) -> Any:
        try:
            function = getattr(module, f"rf_launch_{name}")
        except AttributeError:
            raise DeviceError(f"no kernel named {name} in the compiled module") from None
        function.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_uint, ctypes.c_void_p]
        function.restype = None
        return function

    def set_max_dynamic_shared(self, function: Any, nbytes: int) -> None:
        if nbytes > SHARED_BYTES:
            raise DeviceError(f"a kernel asks for {nbytes} bytes of shared memory; HIP-CPU here gives {SHARED_BYTES}")

    def launch(self, function: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[Any],
               shared_bytes: int = 0) -> None:
        values = [type(a).from_buffer_copy(a) for a in args]  # a graph replays the values it was captured with
        self._run(("launch", function, (*grid, *block), shared_bytes, values))

    # --- ordering and timing: every operation is done when its call returns --------------------------------
    def synchronize(self) -> None:
        pass

    def event(self) -> Any:
        return [0.0]

    def record(self, event: Any) -> None:
        event[0] = time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return (end[0] - start[0]) * 1e3

    # --- graphs: the captured operations, replayed in order ------------------------------------------------
    def begin_capture(self) -> None:
        self._capture = []

    def end_capture(self) -> Any:
        graph, self._capture = self._capture, None
        return graph

    def replay(self, graph: Any) -> None:
        for operation in graph:
            _execute(operation)

    def _run(self, operation: tuple[Any, ...]) -> None:
        if self._capture is not None:
            self._capture.append(operation)
        else:
            _execute(operation)


def _execute(operation: tuple[Any, ...]) -> None:
    kind, *rest = operation
    if kind == "launch":
        function, dims, shared_bytes, values = rest
        array, _ = pack_args(values)
        function((ctypes.c_uint * 6)(*dims), shared_bytes, ctypes.cast(array, ctypes.c_void_p))
    elif kind == "copy":
        address, host, nbytes = rest
        ctypes.memmove(address, host.ctypes.data, nbytes)
    elif kind == "memset":
        address, byte, nbytes = rest
        ctypes.memset(address, byte, nbytes)
    else:
        dst, src, nbytes = rest
        ctypes.memmove(dst, src, nbytes)


def _gxx(arguments: list[str], name: str) -> bytes:
    done = subprocess.run(["g++", *arguments], capture_output=True)
    if done.returncode != 0:
        raise DeviceError(f"g++ could not compile kernels/{name}.hip for HIP-CPU:\n{done.stderr.decode()[-4000:]}")
    return done.stdout
