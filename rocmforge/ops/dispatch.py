"""Every op on its own, on the CPU or a GPU: ``dispatch.<op>(<the twin's arguments>, device=...)``.

One rule for every op here: the function takes the numpy twin's arguments (host arrays) plus ``device``
("cpu", "cuda", "hip" or "auto", as ``rocmforge.load`` takes it). On the CPU it calls the twin in
``rocmforge/ops/<op>.py``; on a GPU it uploads the inputs, runs the kernel through the same ``GpuBackend`` method a
model's forward calls, and copies the result back, so a notebook can run both and compare. Forcing a GPU that is
not there raises ``DeviceError`` naming what is missing.

The backend of each device is made once and kept: ``backend(device)`` gives it, for timing a kernel without the
copies (keep the inputs on the device with ``from_host`` and call its methods).

>>> import numpy as np
>>> from rocmforge.ops import dispatch
>>> x = np.array([[3.0, 4.0]], np.float32)
>>> dispatch.rms_norm(x, np.ones(2, np.float32), 0.0, device="cpu").astype(float).round(4).tolist()
[[0.8485, 1.1314]]
"""
from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quant_shape_from_byte_shape

from rocmforge.backends.select import choose_device, select_backend
from rocmforge.gguf_file import TensorRef
from rocmforge.kv_cache import KVCache
from rocmforge.ops import add as add_twin
from rocmforge.ops import attention as attention_twin
from rocmforge.ops import embedding as embedding_twin
from rocmforge.ops import geglu as geglu_twin
from rocmforge.ops import matmul as matmul_twin
from rocmforge.ops import rms_norm as rms_norm_twin
from rocmforge.ops import rope as rope_twin
from rocmforge.ops import softcap as softcap_twin
from rocmforge.ops import softmax as softmax_twin
from rocmforge.ops import swiglu as swiglu_twin

_backends: dict[str, Any] = {}


def backend(device: str = "auto") -> Any:
    """The backend ``device`` resolves to, made on first use and kept (a ``GpuBackend`` or the ``CpuBackend``)."""
    name, _ = choose_device(device)
    if name not in _backends:
        _backends[name] = select_backend(name)
    return _backends[name]


def _gpu(device: str) -> Any:
    """The GPU backend for ``device``, or None when it resolves to the CPU."""
    ops = backend(device)
    return None if ops.name == "cpu" else ops


def _weight(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> TensorRef:
    raw = np.asarray(raw)
    shape = quant_shape_from_byte_shape(raw.shape, ggml_type) if raw.dtype == np.uint8 else raw.shape
    return TensorRef(f"dispatch.{ggml_type.name}", ggml_type, tuple(shape), raw, raw.nbytes)


def quantized_matmul(x: np.ndarray, raw: np.ndarray, ggml_type: GGMLQuantizationType,
                     device: str = "cpu") -> np.ndarray:
    """``x @ W.T`` for GGUF blocks ``raw`` (``[out, bytes]``), activations rounded as llama.cpp does -> ``[n, out]``."""
    gpu = _gpu(device)
    if gpu is None:
        return matmul_twin.quantized_matmul(x, raw, ggml_type)
    return gpu.to_host(gpu.matmul(gpu.from_host(x), gpu.load_weight(_weight(raw, ggml_type))))


def embedding(raw: np.ndarray, ggml_type: GGMLQuantizationType, tokens: np.ndarray,
              device: str = "cpu") -> np.ndarray:
    """Rows ``tokens`` of a GGUF token table, dequantized -> ``[len(tokens), d]``."""
    gpu = _gpu(device)
    if gpu is None:
        return embedding_twin.quantized_embedding(raw, ggml_type, tokens)
    return gpu.to_host(gpu.embedding(gpu.load_embedding(_weight(raw, ggml_type), tied=False), np.asarray(tokens)))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, device: str = "cpu") -> np.ndarray:
    """RMSNorm of the last axis times ``weight``."""
    gpu = _gpu(device)
    if gpu is None:
        return rms_norm_twin.rms_norm(x, weight, eps)
    return gpu.to_host(gpu.rms_norm(gpu.from_host(x), gpu.from_host(weight), eps))


def rope(x: np.ndarray, positions: np.ndarray, theta: float, neox: bool, n_rot: int | None = None,
         freq_factors: np.ndarray | None = None, device: str = "cpu") -> np.ndarray:
    """Rotary embedding of ``x`` ``[n, heads, d_head]`` at ``positions`` ``[n]``."""
    gpu = _gpu(device)
    if gpu is None:
        return rope_twin.rope(x, positions, theta, neox, n_rot, freq_factors)
    factors = gpu.from_host(freq_factors) if freq_factors is not None else None
    return gpu.to_host(gpu.rope(gpu.from_host(x), np.asarray(positions), theta, neox, n_rot or x.shape[-1], factors))


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, q_positions: np.ndarray, scale: float,
              window: int | None = None, softcap: float | None = None, device: str = "cpu") -> np.ndarray:
    """Causal attention of one sequence: ``[t, H, d]`` queries over ``[L, H_kv, d]`` keys/values -> ``[t, H, d_v]``.

    On a GPU the keys and values go into a paged KV cache first, as in a model; the queries must then be the last
    ``t`` positions (``q_positions == arange(L - t, L)``): one query is the split-K decode kernel, several the
    flash-attention prefill kernel.
    """
    gpu = _gpu(device)
    if gpu is None:
        return attention_twin.attention(q, keys, values, q_positions, scale, window, softcap)
    t, n_keys = len(q), len(keys)
    if not np.array_equal(q_positions, np.arange(n_keys - t, n_keys)):
        raise ValueError(f"on a GPU the {t} queries must sit at the last positions of the {n_keys} keys")
    cache = KVCache(1, keys.shape[1], keys.shape[2], values.shape[2], n_ctx=n_keys, block_size=16, ops=gpu)
    seq = cache.new_sequence()
    for rows in (slice(0, n_keys - t), slice(n_keys - t, n_keys)):  # earlier keys, then the queries' own
        if rows.stop > rows.start:
            batch = cache.prepare([(seq, [0] * (rows.stop - rows.start))])
            gpu.kv_write(cache, 0, batch, gpu.from_host(keys[rows]), gpu.from_host(values[rows]))
    return gpu.to_host(gpu.attention(gpu.from_host(q), cache, 0, batch, scale, window, softcap))


def softmax(x: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Softmax of the last axis."""
    gpu = _gpu(device)
    return softmax_twin.softmax(x) if gpu is None else gpu.to_host(gpu.softmax(gpu.from_host(x)))


def swiglu(gate: np.ndarray, up: np.ndarray, device: str = "cpu") -> np.ndarray:
    """``silu(gate) * up``."""
    gpu = _gpu(device)
    return swiglu_twin.swiglu(gate, up) if gpu is None else gpu.to_host(gpu.swiglu(gpu.from_host(gate), gpu.from_host(up)))


def geglu(gate: np.ndarray, up: np.ndarray, device: str = "cpu") -> np.ndarray:
    """``gelu_tanh(gate) * up``."""
    gpu = _gpu(device)
    return geglu_twin.geglu(gate, up) if gpu is None else gpu.to_host(gpu.geglu(gpu.from_host(gate), gpu.from_host(up)))


def add(a: np.ndarray, b: np.ndarray, device: str = "cpu") -> np.ndarray:
    """``a + b``; ``b`` may be a vector broadcast over rows."""
    gpu = _gpu(device)
    return add_twin.add(a, b) if gpu is None else gpu.to_host(gpu.add(gpu.from_host(a), gpu.from_host(b)))


def softcap(x: np.ndarray, cap: float, device: str = "cpu") -> np.ndarray:
    """``cap * tanh(x / cap)``."""
    gpu = _gpu(device)
    return softcap_twin.softcap(x, cap) if gpu is None else gpu.to_host(gpu.softcap(gpu.from_host(x), cap))
