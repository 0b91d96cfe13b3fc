"""``rocmforge.ops.dispatch``: each op on the CPU is its numpy twin; on a GPU (skipped without one) the kernel
agrees with the twin on fresh random inputs within the float32 tolerances of tests/test_gpu_kernels.py."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from rocmforge.errors import DeviceError
from rocmforge.ops import dispatch
from rocmforge.ops.attention import attention
from rocmforge.ops.embedding import quantized_embedding
from rocmforge.ops.matmul import quantized_matmul
from rocmforge.ops.rms_norm import rms_norm
from rocmforge.ops.rope import rope
from rocmforge.ops.softcap import softcap
from rocmforge.ops.softmax import softmax
from rocmforge.ops.swiglu import swiglu

rng = np.random.default_rng()


def f32(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape and np.all(np.isfinite(got))
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def cases() -> dict[str, tuple]:
    """op name -> (arguments, the twin's result), fresh each call."""
    raw = quantize(f32(96, 256), Q.Q8_0)
    x, w, h = f32(3, 256), f32(256), f32(5, 4, 64)
    q, k, v = f32(6, 4, 64), f32(20, 2, 64), f32(20, 2, 64)
    positions, tokens = np.arange(14, 20), rng.integers(0, 96, 7)
    return {
        "quantized_matmul": ((x, raw, Q.Q8_0), quantized_matmul(x, raw, Q.Q8_0)),
        "embedding": ((raw, Q.Q8_0, tokens), quantized_embedding(raw, Q.Q8_0, tokens)),
        "rms_norm": ((x, w, 1e-5), rms_norm(x, w, 1e-5)),
        "rope": ((h, positions[:5], 10000.0, False), rope(h, positions[:5], 10000.0, False)),
        "attention": ((q, k, v, positions, 0.125), attention(q, k, v, positions, 0.125)),
        "softmax": ((x,), softmax(x)),
        "swiglu": ((x, x[::-1].copy()), swiglu(x, x[::-1])),
        "softcap": ((x * 40, 30.0), softcap(x * 40, 30.0)),
    }


def test_on_the_cpu_each_op_is_its_numpy_twin():
    for name, (args, ref) in cases().items():
        assert np.array_equal(getattr(dispatch, name)(*args, device="cpu"), ref), name
    assert dispatch.backend("cpu").name == "cpu"


def test_a_missing_gpu_is_a_device_error_naming_it():
    from rocmforge.backends import cuda
    ok, why = cuda.available()
    if ok:
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(DeviceError, match="device='cuda' requested but"):
        dispatch.rms_norm(f32(1, 8), f32(8), 1e-5, device="cuda")


@pytest.mark.gpu
def test_on_a_gpu_each_op_runs_its_kernel_and_matches_the_twin():
    from rocmforge.backends.select import choose_device
    device = choose_device("auto")[0]
    if device == "cpu":
        pytest.skip(f"no GPU: {choose_device('auto')[1]}")
    assert dispatch.backend(device).name == device
    for name, (args, ref) in cases().items():
        # the decode kernel (one query) and the prefill kernel (several) both come back right
        assert rel_err(getattr(dispatch, name)(*args, device=device), ref) < 2e-5, name
    q, k, v = f32(1, 4, 64), f32(9, 2, 64), f32(9, 2, 64)
    assert rel_err(dispatch.attention(q, k, v, np.array([8]), 0.125, device=device),
                   attention(q, k, v, np.array([8]), 0.125)) < 1e-5
    with pytest.raises(ValueError, match="last positions"):
        dispatch.attention(q, k, v, np.array([3]), 0.125, device=device)
