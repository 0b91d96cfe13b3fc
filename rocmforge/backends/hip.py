"""AMD runtime through hip-python (``from hip import hip, hiprtc``): the HIP module API plus hiprtc.

It mirrors ``rocmforge.backends.cuda`` call for call; the differences are the ones listed in
``shared/notes/measured-here.md``: no explicit context, arguments packed through ``extra``, ``--offload-arch``
compiler option, and ``hipGraphInstantiateWithFlags``. This path runs the same kernel sources as the NVIDIA
one but has not been run on AMD hardware here.

>>> from rocmforge.backends.hip import available
>>> isinstance(available()[0], bool)
True
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rocmforge.backends.runtime import Runtime
from rocmforge.errors import DeviceError


def available() -> tuple[bool, str]:
    """(True, description) when hip-python, libamdhip64.so and a device are present; else (False, what's missing)."""
    try:
        from hip import hip
    except ImportError:
        return False, "hip-python is not installed (pip install rocmforge[gpu-amd])"
    if not hip.has_symbol("hipMalloc"):
        return False, "the HIP runtime library libamdhip64.so could not be loaded"
    err, count = hip.hipGetDeviceCount()
    if int(err) != 0 or count == 0:
        return False, "the HIP runtime found no device"
    return True, f"{count} HIP device(s)"


def _check(result: Any, what: str) -> Any:
    err, *outs = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise DeviceError(f"{what} failed: {getattr(err, 'name', err)}")
    return outs[0] if len(outs) == 1 else (tuple(outs) if outs else None)


def default_wave_size(arch: str) -> int:
    """The wavefront width the compiler uses for ``arch`` when not told otherwise: 32 on RDNA (gfx10, gfx11,
    gfx12), 64 on GCN and CDNA. Only for compiling without a device; a device reports its own.

    >>> default_wave_size("gfx90a"), default_wave_size("gfx1030")
    (64, 32)
    """
    return 32 if arch.startswith(("gfx10", "gfx11", "gfx12")) else 64


class HipRuntime(Runtime):
    """Device 0 and one non-blocking stream."""

    name = "hip"

    @classmethod
    def for_compiling(cls, arch: str) -> HipRuntime:
        """A runtime that only compiles (hiprtc, same options and disk cache) for ``arch``, with no device:
        ``rocmforge.backends.hip_offline`` checks every kernel for AMD targets this way on machines without one.
        Memory, launches and module loading need a real ``HipRuntime()``.
        """
        from hip import hiprtc
        runtime = cls.__new__(cls)
        Runtime.__init__(runtime)
        runtime._hip, runtime._rtc = None, hiprtc
        runtime.arch, runtime.warp_size = arch, default_wave_size(arch)
        runtime.device_name = f"{arch} (compile only, no device)"
        return runtime

    def __init__(self, device: int = 0):
        super().__init__()
        ok, why = available()
        if not ok:
            raise DeviceError(f"device='hip' requested but {why}")
        from hip import hip, hiprtc
        self._hip, self._rtc = hip, hiprtc
        _check(hip.hipSetDevice(device), "hipSetDevice")
        attr = hip.hipDeviceAttribute_t
        get = lambda a: _check(hip.hipDeviceGetAttribute(a, device), "hipDeviceGetAttribute")  # noqa: E731
        self.warp_size = get(attr.hipDeviceAttributeWarpSize)
        self.multiprocessors = get(attr.hipDeviceAttributeMultiprocessorCount)
        props = _check(hip.hipGetDeviceProperties(device), "hipGetDeviceProperties")
        self.arch = props.gcnArchName.decode() if isinstance(props.gcnArchName, bytes) else str(props.gcnArchName)
        self.device_name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        self._stream = _check(hip.hipStreamCreateWithFlags(hip.hipStreamNonBlocking), "hipStreamCreateWithFlags")

    # --- memory -------------------------------------------------------------------------------------------
    def mem_info(self) -> tuple[int, int]:
        free, total = _check(self._hip.hipMemGetInfo(), "hipMemGetInfo")
        return int(free), int(total)

    def alloc(self, nbytes: int) -> int:
        return int(_check(self._hip.hipMalloc(max(1, nbytes)), f"hipMalloc({nbytes} bytes)"))

    def free(self, address: int) -> None:
        _check(self._hip.hipFree(address), "hipFree")

    def copy_to_device(self, address: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        _check(self._hip.hipMemcpyHtoDAsync(address, host.ctypes.data, host.nbytes, self._stream), "hipMemcpyHtoDAsync")
        self.synchronize()  # pageable source: the caller may drop it once we return

    def copy_to_host(self, host: np.ndarray, address: int) -> None:
        _check(self._hip.hipMemcpyDtoHAsync(host.ctypes.data, address, host.nbytes, self._stream), "hipMemcpyDtoHAsync")
        self.synchronize()

    def memset(self, address: int, byte: int, nbytes: int) -> None:
        _check(self._hip.hipMemsetD8Async(address, byte, nbytes, self._stream), "hipMemsetD8Async")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        _check(self._hip.hipMemcpyDtoDAsync(dst, src, nbytes, self._stream), "hipMemcpyDtoDAsync")

    # --- kernels ------------------------------------------------------------------------------------------
    def compile_options(self) -> list[str]:
        return [*super().compile_options(), f"--offload-arch={self.arch}", "-O3", "-std=c++17"]

    def _compile(self, source: str, name: str, options: list[str]) -> bytes:
        rtc = self._rtc
        prog = _check(rtc.hiprtcCreateProgram(source.encode(), f"{name}.hip".encode(), 0, [], []), "hiprtcCreateProgram")
        try:
            (err,) = rtc.hiprtcCompileProgram(prog, len(options), [o.encode() for o in options])
            if int(err) != 0:
                size = _check(rtc.hiprtcGetProgramLogSize(prog), "hiprtcGetProgramLogSize")
                log = bytearray(size)
                rtc.hiprtcGetProgramLog(prog, log)
                raise DeviceError(f"hiprtc could not compile kernels/{name}.hip:\n{log.decode(errors='replace')}")
            size = _check(rtc.hiprtcGetCodeSize(prog), "hiprtcGetCodeSize")
            code = bytearray(size)
            _check(rtc.hiprtcGetCode(prog, code), "hiprtcGetCode")
            return bytes(code)
        finally:
            rtc.hiprtcDestroyProgram(prog.createRef())  # takes hiprtcProgram*: the handle itself would crash

    def _load_module(self, code: bytes) -> Any:
        return _check(self._hip.hipModuleLoadData(code), "hipModuleLoadData")

    def _get_function(self, module: Any, name: str) -> Any:
        return _check(self._hip.hipModuleGetFunction(module, name.encode()), f"hipModuleGetFunction({name})")

    def set_max_dynamic_shared(self, function: Any, nbytes: int) -> None:
        attr = self._hip.hipFuncAttribute.hipFuncAttributeMaxDynamicSharedMemorySize
        _check(self._hip.hipFuncSetAttribute(function, attr, nbytes), "hipFuncSetAttribute")

    def launch(self, function: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[Any],
               shared_bytes: int = 0) -> None:
        # hip-python packs a tuple of ctypes values into HIP_LAUNCH_PARAM_BUFFER_POINTER with natural alignment
        _check(self._hip.hipModuleLaunchKernel(function, *grid, *block, shared_bytes, self._stream,
                                               None, tuple(args)), "hipModuleLaunchKernel")

    # --- ordering and timing ------------------------------------------------------------------------------
    def synchronize(self) -> None:
        _check(self._hip.hipStreamSynchronize(self._stream), "hipStreamSynchronize")

    def event(self) -> Any:
        return _check(self._hip.hipEventCreateWithFlags(self._hip.hipEventDefault), "hipEventCreateWithFlags")

    def record(self, event: Any) -> None:
        _check(self._hip.hipEventRecord(event, self._stream), "hipEventRecord")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        _check(self._hip.hipEventSynchronize(end), "hipEventSynchronize")
        return float(_check(self._hip.hipEventElapsedTime(start, end), "hipEventElapsedTime"))

    # --- graphs -------------------------------------------------------------------------------------------
    def begin_capture(self) -> None:
        mode = self._hip.hipStreamCaptureMode.hipStreamCaptureModeRelaxed
        _check(self._hip.hipStreamBeginCapture(self._stream, mode), "hipStreamBeginCapture")

    def end_capture(self) -> Any:
        graph = _check(self._hip.hipStreamEndCapture(self._stream), "hipStreamEndCapture")
        return _check(self._hip.hipGraphInstantiateWithFlags(graph, 0), "hipGraphInstantiateWithFlags")

    def replay(self, graph: Any) -> None:
        _check(self._hip.hipGraphLaunch(graph, self._stream), "hipGraphLaunch")
