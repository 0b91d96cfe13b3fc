"""The numpy backend: each op is the reference twin in ``rocmforge.ops``; weights are dequantized to float32
once at load time so every matmul is one BLAS call. Activations are rounded the way llama.cpp rounds them for
each weight type (``rocmforge.ops.matmul.round_activations``) so the numbers match llama.cpp's.

Why float32 weights: numpy has no fast path for int8/f16 matrix products, and dequantizing blocks on the fly
in numpy costs more per token than reading f32 weights (see BENCHMARKS.md, "CPU generation", for speed and RSS).
An embedding table that is not also the output projection stays quantized and memory-mapped; only the rows a
batch looks up are dequantized.
"""
from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from rocmforge.gguf_file import TensorRef
from rocmforge.kv_cache import Batch, KVCache, Segment
from rocmforge.ops.add import add
from rocmforge.ops.attention import attention, attention_mix, attention_scores
from rocmforge.ops.edit_rows import edit_rows
from rocmforge.ops.embedding import embedding, quantized_embedding
from rocmforge.ops.encoder_attention import encoder_attention
from rocmforge.ops.geglu import geglu
from rocmforge.ops.gelu import gelu
from rocmforge.ops.layer_norm import layer_norm
from rocmforge.ops.linear import linear
from rocmforge.ops.matmul import ACTIVATION_FORMAT, dequantize_weight, matmul, round_activations
from rocmforge.ops.rms_norm import rms_norm
from rocmforge.ops.rope import rope_tables, rotate
from rocmforge.ops.softcap import softcap
from rocmforge.ops.softmax import softmax
from rocmforge.ops.swiglu import swiglu


@dataclass(frozen=True)
class CpuWeight:
    """A weight matrix dequantized to float32, remembering its GGUF type (which sets the activation rounding).

    Weights that multiply the same activation (``rocmforge.weights.SHARED_INPUT``) share one ``group`` matrix:
    ``matrix`` is then the view ``group[rows]``.
    """

    matrix: np.ndarray                 # [out, in] float32
    ggml_type: GGMLQuantizationType
    group: np.ndarray | None = None    # [sum of the group's out, in] float32
    rows: slice | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.matrix.shape


_LOAD_ROWS = 8192


class _Arena:
    """Weight matrices carved one after another out of large blocks. numpy asks the kernel for transparent huge
    pages on allocations of 4 MB and more, which most single weights are not; a decode step streams every weight
    once, and with 4 KiB pages it spent ~10% longer (TLB misses; BENCHMARKS.md, "CPU generation")."""

    BLOCK = 16 << 20  # floats (64 MiB); only the pages written become resident
    ALIGN = 16        # floats (64 bytes: a cache line) at the start of each matrix

    def __init__(self) -> None:
        self._free = np.empty(0, dtype=np.float32)

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        if size > self._free.size:
            block = np.empty(max(size, self.BLOCK) + self.ALIGN, dtype=np.float32)
            self._free = block[(-block.ctypes.data // 4) % self.ALIGN:]
        matrix = self._free[:size].reshape(shape)
        self._free = self._free[-(-size // self.ALIGN) * self.ALIGN:]
        return matrix


class CpuBackend:
    """numpy float32 implementation of ``rocmforge.backends.base.Backend``."""

    name = "cpu"

    def __init__(self, round_activations: bool = True):
        """``round_activations=False`` multiplies unrounded float32 activations: not llama.cpp's numbers, but a
        smooth function of the input (8-bit rounding turns float-summation-order noise into logit changes of
        up to ~1), which is what tests comparing two computation orders need."""
        self.round_activations = round_activations
        self._last_rounding: tuple[np.ndarray, object, np.ndarray] | None = None  # (x, format, rounded x)
        self._last_group: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (x, group, x @ group.T)
        # values computed once for the batch being run (its rope tables): (its positions array, {key: value})
        self._batch_values: tuple[np.ndarray | None, dict] = (None, {})
        self._arena = _Arena()

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        """float32 zeros; from 128 KiB on (the KV pools) an anonymous memory map, whose pages become resident only
        when written. (np.zeros may be given heap memory that calloc must clear, all of it resident at once:
        glibc serves allocations up to 32 MiB from the heap once large arrays have come and gone.)"""
        size = int(np.prod(shape))
        if size * 4 < 128 << 10:
            return np.zeros(shape, dtype=np.float32)
        pages = mmap.mmap(-1, size * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # a forked child gets a copy
        return np.frombuffer(pages, dtype=np.float32).reshape(shape)

    def from_host(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return x

    # --- what hooks need (the GPU's twins are in gpu_hooks.py) ----------------------------------------------
    def flush(self) -> None:
        """Nothing is held back on the CPU."""

    def snapshot(self, x: np.ndarray) -> np.ndarray:
        """A copy: the forward may update a buffer (the residual stream) in place later."""
        return np.array(x, copy=True)

    def copy(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, copy=True)

    def fresh_zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    def edit_rows(self, x: np.ndarray, rows: np.ndarray, col0: int, n_cols: int, keep: float,
                  src: np.ndarray | None = None, src_rows: np.ndarray | None = None, src_col0: int = 0,
                  take: float = 1.0) -> np.ndarray:
        return edit_rows(x, rows, col0, n_cols, keep, src, rows if src_rows is None else src_rows, src_col0, take)

    def as_array(self, obj: object, shape: tuple[int, ...]) -> np.ndarray:
        """A hook's result (numpy, or any CPU DLPack array such as a torch tensor) as float32 ``shape``."""
        array = np.from_dlpack(obj) if hasattr(obj, "__dlpack__") else np.asarray(obj)
        array = np.asarray(array, dtype=np.float32)
        if array.shape != tuple(shape):
            raise ValueError(f"a hook returned shape {array.shape}, expected {tuple(shape)}")
        return array

    def load_weight(self, tensor: TensorRef) -> CpuWeight:
        matrix = self._arena.empty(tensor.shape)
        _dequantize_into(matrix, tensor)
        return CpuWeight(matrix, tensor.ggml_type)

    def load_weight_group(self, tensors: list[TensorRef]) -> list[CpuWeight]:
        """Weights that multiply the same activation, stored as one matrix (separately if they round it
        differently): a decode step then reads them in one matrix-vector product."""
        if len({ACTIVATION_FORMAT.get(t.ggml_type, t.ggml_type) for t in tensors}) > 1:
            return [self.load_weight(t) for t in tensors]
        group = self._arena.empty((sum(t.shape[0] for t in tensors), tensors[0].shape[1]))
        weights, start = [], 0
        for tensor in tensors:
            rows = slice(start, start + tensor.shape[0])
            _dequantize_into(group[rows], tensor)
            weights.append(CpuWeight(group[rows], tensor.ggml_type, group, rows))
            start = rows.stop
        return weights

    def load_vector(self, tensor: TensorRef) -> np.ndarray:
        return dequantize_weight(tensor.raw, tensor.ggml_type).reshape(tensor.shape)

    def load_embedding(self, tensor: TensorRef, tied: bool) -> CpuWeight | TensorRef:
        return self.load_weight(tensor) if tied else tensor

    def embedding(self, table: CpuWeight | TensorRef, tokens: np.ndarray) -> np.ndarray:
        if isinstance(table, TensorRef):
            return quantized_embedding(table.raw, table.ggml_type, tokens)
        return embedding(table.matrix, tokens)

    def matmul(self, x: np.ndarray, weight: CpuWeight) -> np.ndarray:
        if self.round_activations:
            x = self._rounded(x, weight.ggml_type)
        if weight.group is None or x.shape[0] != 1:
            return matmul(x, weight.matrix)
        # one row (a decode step): multiply the whole group once and hand each weight its columns. A
        # matrix-vector product gives each output the same bits whatever rows surround it; a matrix product
        # (several rows) does not, so there every weight keeps its own call and prefill bits stay as they were.
        last = self._last_group
        if last is None or last[0] is not x or last[1] is not weight.group:
            last = self._last_group = (x, weight.group, matmul(x, weight.group))
        return last[2][:, weight.rows]

    def linear(self, x: np.ndarray, weight: CpuWeight, bias: np.ndarray, gelu: bool = False,
               norm: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None = None) -> np.ndarray:
        if self.round_activations:  # llama.cpp's rounded activations: the matmul twin, then the bias (and the rest)
            out = add(self.matmul(x, weight), bias)
            if norm is not None:
                return layer_norm(out, *norm[1:], residual=norm[0])
            return self.gelu(out) if gelu else out
        return linear(x, weight.matrix, bias, gelu, norm)

    def _rounded(self, x: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
        # q/k/v (and gate/up) multiply the same x: round it once per activation format, not once per weight
        fmt = ACTIVATION_FORMAT.get(ggml_type, ggml_type)
        last = self._last_rounding
        if last is not None and last[0] is x and last[1] == fmt:
            return last[2]
        rounded = round_activations(x, ggml_type)
        self._last_rounding = (x, fmt, rounded)
        return rounded

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return add(a, b)

    def scale(self, x: np.ndarray, factor: float) -> np.ndarray:
        return x * np.float32(factor)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return rms_norm(x, weight, eps)

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                   residual: np.ndarray | None = None) -> np.ndarray:
        return layer_norm(x, weight, bias, eps, residual)

    def gelu(self, x: np.ndarray) -> np.ndarray:
        return gelu(x)

    def encoder_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, offsets: np.ndarray, n_heads: int,
                          scale: float) -> np.ndarray:
        return encoder_attention(q, k, v, offsets, n_heads, scale)

    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float, neox: bool, n_rot: int,
             freq_factors: np.ndarray | None = None, freq_scale: float = 1.0) -> np.ndarray:
        tables = self.per_batch(positions, (theta, n_rot, id(freq_factors), freq_scale),
                                 lambda: rope_tables(positions * freq_scale, n_rot, theta, freq_factors))
        return rotate(x, *tables, neox, n_rot)

    def per_batch(self, positions: np.ndarray, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` once per batch and ``key`` (every layer rotates q and k at the same positions). A Batch's
        positions array is never written, so holding it and comparing identity is safe. The server runs several
        batches in threads at once: the slot is read once, so a check and its use always see the same batch."""
        held = self._batch_values
        if held[0] is not positions:
            held = self._batch_values = (positions, {})
        value = held[1].get(key)
        if value is None:
            value = held[1][key] = make()
        return value

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return swiglu(gate, up)

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return geglu(gate, up)

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        return softcap(x, cap)

    def take_rows(self, x: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        return x[rows]

    def concat_rows(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=0)

    def kv_write(self, cache: KVCache, layer: int, batch: Batch, k: np.ndarray, v: np.ndarray) -> None:
        cache.k[layer][batch.slots] = k
        cache.v[layer][batch.slots] = v

    def attention(self, q: np.ndarray, cache: KVCache, layer: int, batch: Batch, scale: float,
                  window: int | None, softcap: float | None) -> np.ndarray:
        z = np.empty(q.shape[:2] + (cache.v[layer].shape[-1],), dtype=np.float32)
        for seg in batch.segments:
            z[seg.rows] = attention(q[seg.rows], cache.k[layer][seg.key_slots], cache.v[layer][seg.key_slots],
                                    seg.positions, scale, window, softcap)
        return z

    def attention_scores(self, q: np.ndarray, cache: KVCache, layer: int, segment: Segment, scale: float,
                         window: int | None, softcap: float | None) -> np.ndarray:
        return attention_scores(q, cache.k[layer][segment.key_slots], segment.positions, scale, window, softcap)

    def softmax(self, x: np.ndarray) -> np.ndarray:
        return softmax(x)

    def attention_mix(self, pattern: np.ndarray, cache: KVCache, layer: int, segment: Segment) -> np.ndarray:
        return attention_mix(pattern, cache.v[layer][segment.key_slots])

    def fused_block(self, family: str, ctx: Any, layer: int, resid: np.ndarray, batch: Batch) -> None:
        return None  # numpy's ops are the block

    def graph_step(self, batch: Batch, step: Callable[[], np.ndarray]) -> np.ndarray:
        return step()  # nothing to capture: numpy has no launch cost to save


def _dequantize_into(out: np.ndarray, tensor: TensorRef) -> None:
    # a few thousand rows at a time: gguf's dequantize makes several temporaries the size of its output, which
    # for Gemma's 262144 x 640 embedding would add ~2 GB to the peak RSS
    raw = tensor.raw.reshape(tensor.shape[0], -1)
    for start in range(0, tensor.shape[0], _LOAD_ROWS):
        stop = start + _LOAD_ROWS
        out[start:stop] = dequantize_weight(raw[start:stop], tensor.ggml_type).reshape(-1, tensor.shape[1])
    _drop_file_pages(tensor.raw)


_libc = ctypes.CDLL(None, use_errno=True)


def _drop_file_pages(raw: np.ndarray) -> None:
    """Take the file pages behind a read-only memory-mapped tensor out of this process's RSS (they stay in the
    page cache and come back if read again): once dequantized, the float32 copy is what the forward reads."""
    if not isinstance(raw, np.memmap) or raw.flags.writeable:
        return  # anonymous or writable memory would lose its contents
    first = -(-raw.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
    last = (raw.ctypes.data + raw.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)
