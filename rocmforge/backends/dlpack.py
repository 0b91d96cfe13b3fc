"""DLPack for device arrays: hand a ``DeviceArray`` to torch, CuPy or JAX without a copy, and take theirs back.

DLPack (https://dmlc.github.io/dlpack/) is a C struct in a PyCapsule: data pointer, device, dtype, shape,
strides. ``export`` builds one with ctypes for a ``DeviceArray`` and keeps the array (and so its memory block)
alive until the consumer calls the struct's deleter; ``import_array`` reads a capsule from any producer into a
``DeviceArray`` over the SAME memory, whose block calls the producer's deleter when the last view goes away.

Streams: the backend launches on one non-blocking stream. Exporting waits for that stream to finish (a consumer
on any stream then sees finished data); importing passes our stream to the producer, which by the DLPack
protocol makes our stream wait for its pending work, so nothing is copied and nothing is synchronized on the host.

>>> DL_CUDA, DL_ROCM
(2, 10)
"""
from __future__ import annotations

import ctypes
import itertools
from typing import Any

import numpy as np

DL_CPU, DL_CUDA, DL_ROCM = 1, 2, 10
DEVICE_TYPES = {"cuda": DL_CUDA, "hip": DL_ROCM}
_CODES = {"i": 0, "u": 1, "f": 2}  # kDLInt, kDLUInt, kDLFloat


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int), ("dtype", _DataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


_Deleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _Managed(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]


# Private prototypes (setting argtypes on ctypes.pythonapi's shared functions would change them for everyone).
# The capsule destructor gets the capsule while it is being freed: it reads it through raw pointers, never as an object.
_api = ctypes.pythonapi
_capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
    ("PyCapsule_New", _api))
_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", _api))
_set_name = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_SetName", _api))
_raw_is_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(("PyCapsule_IsValid", _api))
_raw_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(("PyCapsule_GetPointer", _api))

_alive: dict[int, tuple[Any, ...]] = {}  # manager_ctx -> (struct, shape array, the exported array)
_tickets = itertools.count(1)


@_Deleter
def _release(managed: int) -> None:
    ctx = _Managed.from_address(managed).manager_ctx
    _alive.pop(ctx, None)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_gone(capsule: int) -> None:
    # a capsule nobody consumed (still named "dltensor") owns its tensor: release it; a consumed one was renamed
    if _raw_is_valid(capsule, b"dltensor"):
        _release(_raw_pointer(capsule, b"dltensor"))


def device_of(array: Any) -> tuple[int, int]:
    """``(DLPack device type, device id)`` of a ``DeviceArray`` (its runtime decides)."""
    runtime = array.block.runtime
    return DEVICE_TYPES[runtime.name], int(getattr(runtime, "device_id", 0))


def export(array: Any) -> Any:
    """A ``dltensor`` capsule viewing ``array`` (a ``DeviceArray``) after its stream has finished."""
    runtime = array.block.runtime
    runtime.synchronize()
    ticket = next(_tickets)
    shape = (ctypes.c_int64 * max(1, len(array.shape)))(*array.shape)
    managed = _Managed()
    managed.dl_tensor.data = array.address
    managed.dl_tensor.device = _Device(*device_of(array))
    managed.dl_tensor.ndim = len(array.shape)
    managed.dl_tensor.dtype = _DataType(_CODES[array.dtype.kind], array.dtype.itemsize * 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None  # row-major
    managed.manager_ctx = ticket
    managed.deleter = _release
    _alive[ticket] = (managed, shape, array)
    return _capsule_new(ctypes.addressof(managed), b"dltensor", ctypes.cast(_capsule_gone, ctypes.c_void_p))


class ForeignBlock:
    """Memory another library owns, viewed through DLPack; its deleter runs when the last view is gone."""

    __slots__ = ("pool", "address", "size", "runtime", "_managed", "_capsule")

    def __init__(self, address: int, size: int, runtime: Any, managed: int, capsule: Any) -> None:
        self.pool, self.address, self.size, self.runtime = None, address, size, runtime
        self._managed, self._capsule = managed, capsule

    def __del__(self) -> None:
        deleter = _Managed.from_address(self._managed).deleter
        if deleter:
            deleter(self._managed)


def import_array(obj: Any, runtime: Any, expect_shape: tuple[int, ...] | None = None) -> Any:
    """A ``DeviceArray`` over the memory of ``obj`` (anything with ``__dlpack__``: torch, CuPy, JAX arrays).

    The producer orders its pending work before our stream's next work (we pass our stream), so no copy and no
    host synchronization. Needs a row-major float32 array on this device; anything else is one clear error.
    """
    from rocmforge.backends.device_memory import DeviceArray
    if isinstance(obj, DeviceArray):
        return obj
    if not hasattr(obj, "__dlpack__"):
        raise TypeError(f"a hook returned {type(obj).__name__}; on a GPU backend return a DLPack array "
                        "(torch, cupy, jax) or the DeviceArray it was given")
    stream = getattr(runtime, "_stream", None)
    try:
        capsule = obj.__dlpack__(stream=int(stream) if stream is not None else None)
    except (TypeError, BufferError):
        runtime.synchronize()
        capsule = obj.__dlpack__()
    managed_address = _pointer(capsule, b"dltensor")
    tensor = _Managed.from_address(managed_address).dl_tensor
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    dtype = (tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes)
    where = (tensor.device.device_type, tensor.device.device_id)
    mine = (DEVICE_TYPES[runtime.name], int(getattr(runtime, "device_id", 0)))
    problem = None
    if dtype != (2, 32, 1):
        problem = f"dtype code/bits/lanes {dtype}, not float32"
    elif where != mine:
        problem = f"device {where}, not this backend's {mine}"
    elif tensor.strides and list(tensor.strides[i] for i in range(tensor.ndim)) != _row_major(shape):
        problem = "a strided view (make it contiguous first)"
    if problem is not None:
        _Managed.from_address(managed_address).deleter(managed_address)
        _set_name(capsule, b"used_dltensor")
        raise ValueError(f"a hook returned an array the GPU backend cannot use in place: {problem}")
    _set_name(capsule, b"used_dltensor")  # ours now: the block calls the deleter
    address = int(tensor.data or 0) + int(tensor.byte_offset)
    nbytes = int(np.prod(shape)) * 4
    block = ForeignBlock(address, nbytes, runtime, managed_address, capsule)
    return DeviceArray(address, expect_shape or shape, block)


def _row_major(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]
