"""NVIDIA runtime through cuda-python (``cuda.bindings``): the CUDA driver API plus NVRTC.

The kernels are the same HIP-flavoured sources as on AMD; ``kernels/prelude.h`` maps the few differing names.
Every call returns ``(err, *outs)``; ``_check`` turns a non-success code into ``DeviceError``.

>>> from rocmforge.backends.cuda import available
>>> isinstance(available()[0], bool)
True
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from rocmforge.backends.runtime import Runtime, pack_args
from rocmforge.errors import DeviceError


def available() -> tuple[bool, str]:
    """(True, device description) when cuda-python, libcuda and a device are all present; else (False, what's missing)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return False, "cuda-python is not installed (pip install rocmforge[gpu-nvidia])"
    try:
        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            return False, f"cuInit failed: {err.name}"
        err, count = driver.cuDeviceGetCount()
    except Exception as exc:  # the bindings raise when libcuda.so.1 cannot be loaded
        return False, f"the CUDA driver (libcuda.so.1) could not be loaded: {exc}"
    if err != driver.CUresult.CUDA_SUCCESS or count == 0:
        return False, "the CUDA driver found no device"
    return True, f"{count} CUDA device(s)"


def _check(result: tuple, what: str) -> Any:
    err, *outs = result
    if int(err) != 0:
        raise DeviceError(f"{what} failed: {getattr(err, 'name', err)}")
    return outs[0] if len(outs) == 1 else (tuple(outs) if outs else None)


class CudaRuntime(Runtime):
    """Device 0 through its primary context and one non-blocking stream."""

    name = "cuda"

    def __init__(self, device: int = 0):
        super().__init__()
        ok, why = available()
        if not ok:
            raise DeviceError(f"device='cuda' requested but {why}")
        from cuda.bindings import driver, nvrtc
        self._drv, self._nvrtc = driver, nvrtc
        self._device = _check(driver.cuDeviceGet(device), "cuDeviceGet")
        self._context = _check(driver.cuDevicePrimaryCtxRetain(self._device), "cuDevicePrimaryCtxRetain")
        _check(driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
        attr = driver.CUdevice_attribute
        get = lambda a: _check(driver.cuDeviceGetAttribute(a, self._device), "cuDeviceGetAttribute")  # noqa: E731
        self.warp_size = get(attr.CU_DEVICE_ATTRIBUTE_WARP_SIZE)
        major = get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        minor = get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        self.multiprocessors = get(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        self.arch = f"sm_{major}{minor}"
        name = _check(driver.cuDeviceGetName(256, self._device), "cuDeviceGetName")
        self.device_name = name.split(b"\0", 1)[0].decode()
        self._stream = _check(driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")

    # --- memory -------------------------------------------------------------------------------------------
    def mem_info(self) -> tuple[int, int]:
        free, total = _check(self._drv.cuMemGetInfo(), "cuMemGetInfo")
        return int(free), int(total)

    def alloc(self, nbytes: int) -> int:
        return int(_check(self._drv.cuMemAlloc(max(1, nbytes)), f"cuMemAlloc({nbytes} bytes)"))

    def free(self, address: int) -> None:
        _check(self._drv.cuMemFree(address), "cuMemFree")

    def copy_to_device(self, address: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        # from pageable memory (every numpy array) the driver stages the source before returning, so the caller may
        # drop it at once and no stream synchronization is needed (CUDA's "API synchronization behavior")
        _check(self._drv.cuMemcpyHtoDAsync(address, host.ctypes.data, host.nbytes, self._stream), "cuMemcpyHtoDAsync")

    def copy_to_host(self, host: np.ndarray, address: int) -> None:
        _check(self._drv.cuMemcpyDtoHAsync(host.ctypes.data, address, host.nbytes, self._stream), "cuMemcpyDtoHAsync")
        self.synchronize()

    def memset(self, address: int, byte: int, nbytes: int) -> None:
        _check(self._drv.cuMemsetD8Async(address, byte, nbytes, self._stream), "cuMemsetD8Async")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        _check(self._drv.cuMemcpyDtoDAsync(dst, src, nbytes, self._stream), "cuMemcpyDtoDAsync")

    # --- kernels ------------------------------------------------------------------------------------------
    def compile_options(self) -> list[str]:
        return [*super().compile_options(), f"--gpu-architecture={self.arch}", "-default-device", "--std=c++17"]

    def _compile(self, source: str, name: str, options: list[str]) -> bytes:
        nv = self._nvrtc
        prog = _check(nv.nvrtcCreateProgram(source.encode(), f"{name}.hip".encode(), 0, [], []), "nvrtcCreateProgram")
        (err,) = nv.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        if int(err) != 0:
            size = _check(nv.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nv.nvrtcGetProgramLog(prog, log)
            raise DeviceError(f"NVRTC could not compile kernels/{name}.hip:\n{log.decode(errors='replace')}")
        size = _check(nv.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nv.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        nv.nvrtcDestroyProgram(prog)
        return cubin

    def _load_module(self, code: bytes) -> Any:
        return _check(self._drv.cuModuleLoadData(code), "cuModuleLoadData")

    def _get_function(self, module: Any, name: str) -> Any:
        return _check(self._drv.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")

    def set_max_dynamic_shared(self, function: Any, nbytes: int) -> None:
        attr = self._drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _check(self._drv.cuFuncSetAttribute(function, attr, nbytes), "cuFuncSetAttribute")

    def launch(self, function: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[Any],
               shared_bytes: int = 0) -> None:
        params, _keep = pack_args(args)
        _check(self._drv.cuLaunchKernel(function, *grid, *block, shared_bytes, self._stream,
                                        ctypes.addressof(params), 0), "cuLaunchKernel")

    # --- ordering and timing ------------------------------------------------------------------------------
    def synchronize(self) -> None:
        _check(self._drv.cuStreamSynchronize(self._stream), "cuStreamSynchronize")

    def event(self) -> Any:
        return _check(self._drv.cuEventCreate(self._drv.CUevent_flags.CU_EVENT_DEFAULT), "cuEventCreate")

    def record(self, event: Any) -> None:
        _check(self._drv.cuEventRecord(event, self._stream), "cuEventRecord")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        _check(self._drv.cuEventSynchronize(end), "cuEventSynchronize")
        return float(_check(self._drv.cuEventElapsedTime(start, end), "cuEventElapsedTime"))

    # --- graphs -------------------------------------------------------------------------------------------
    def begin_capture(self) -> None:
        mode = self._drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        _check(self._drv.cuStreamBeginCapture(self._stream, mode), "cuStreamBeginCapture")

    def end_capture(self) -> Any:
        graph = _check(self._drv.cuStreamEndCapture(self._stream), "cuStreamEndCapture")
        return _check(self._drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def replay(self, graph: Any) -> None:
        _check(self._drv.cuGraphLaunch(graph, self._stream), "cuGraphLaunch")
