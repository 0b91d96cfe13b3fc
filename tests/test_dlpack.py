"""The DLPack plumbing of DeviceArray on the CPU: a stand-in runtime whose "device memory" is host memory, so
the capsule a DeviceArray exports can be read back by the importer the GPU backend uses (the same C structs a
torch or CuPy consumer reads; tests/test_gpu_hooks.py does it with torch on a real GPU)."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from rocmforge.backends import dlpack
from rocmforge.backends.device_memory import Block, DeviceArray


class HostRuntime:
    name, device_id = "cuda", 0

    def synchronize(self) -> None:
        pass

    def copy_to_host(self, host: np.ndarray, address: int) -> None:
        host[...] = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_byte * host.nbytes).from_address(address)).view(
            host.dtype).reshape(host.shape)


class Producer:  # what torch.Tensor / cupy.ndarray look like to an importer
    def __init__(self, array: DeviceArray) -> None:
        self.array = array

    def __dlpack__(self, stream=None):
        return self.array.__dlpack__(stream=stream)


def _device(host: np.ndarray) -> DeviceArray:
    return DeviceArray(host.ctypes.data, host.shape, Block(None, host.ctypes.data, host.nbytes, HostRuntime()), host.dtype)


def test_an_exported_array_reads_back_as_the_same_memory_and_is_released_after():
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = _device(host)
    assert array.__dlpack_device__() == (dlpack.DL_CUDA, 0)
    before = len(dlpack._alive)
    back = dlpack.import_array(Producer(array), HostRuntime())
    assert (back.address, back.shape, back.dtype) == (array.address, (3, 4), np.float32)
    assert np.array_equal(back.numpy(), host) and np.array_equal(np.asarray(array), host)
    assert len(dlpack._alive) == before + 1  # the exporter keeps the array alive while the consumer holds it
    del back
    gc.collect()
    assert len(dlpack._alive) == before  # the consumer's view died: the deleter ran
    capsule = array.__dlpack__()
    assert len(dlpack._alive) == before + 1
    del capsule  # never consumed: the capsule's destructor releases it
    gc.collect()
    assert len(dlpack._alive) == before


def test_an_array_the_backend_cannot_use_is_one_clear_error_and_released():
    before = len(dlpack._alive)
    with pytest.raises(ValueError, match="not float32"):
        dlpack.import_array(Producer(_device(np.arange(4, dtype=np.int32))), HostRuntime())
    with pytest.raises(TypeError, match="DLPack array"):
        dlpack.import_array([1.0, 2.0], HostRuntime())
    gc.collect()
    assert len(dlpack._alive) == before
