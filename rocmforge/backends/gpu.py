"""The GPU backend: ``rocmforge.backends.base.Backend`` on a ``Runtime`` (HIP or CUDA), one kernel per op.

Memory: ``prepare`` checks that weights + KV cache + 10% + 100 MB fit in free device memory, then makes two
arena allocations: every weight is a 256-byte aligned slice of the first (quantized blocks stay quantized:
the matmul kernels decode them on the fly), the KV cache pools are slices of the second. Activations come
from a caching pool (freed blocks are reused by size, never returned to the driver).

Decode graphs: ``graph_step(batch, step)`` runs a single-token forward once eagerly, captures it as a graph
and replays it for every later token. Everything that changes between tokens (token id, position, cache
slots) is read by the kernels from one small device buffer that is refreshed before each replay.

>>> from rocmforge.backends.gpu import GpuBackend, gpu_available
>>> gpu_available() in (True, False)
True
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from rocmforge.backends.runtime import Runtime, f32, i32, i64, ptr
from rocmforge.errors import DeviceError, UnsupportedError
from rocmforge.gguf_file import TensorRef
from rocmforge.kv_cache import Batch, KVCache, Segment

ALIGN = 256
MB = 1 << 20

# GGML types with a fused dequantize-and-multiply kernel; others are widened to float32 at load time
KERNEL_TYPES = {
    GGMLQuantizationType.F32: "f32", GGMLQuantizationType.F16: "f16", GGMLQuantizationType.BF16: "bf16",
    GGMLQuantizationType.Q4_0: "q4_0", GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q5_0: "q5_0",
    GGMLQuantizationType.Q5_1: "q5_1", GGMLQuantizationType.Q8_0: "q8_0", GGMLQuantizationType.Q4_K: "q4_k",
    GGMLQuantizationType.Q5_K: "q5_k", GGMLQuantizationType.Q6_K: "q6_k",
}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def gpu_available() -> bool:
    """True when a HIP or CUDA device can be opened."""
    from rocmforge.backends import cuda, hip
    return hip.available()[0] or cuda.available()[0]


class _Block:
    """One piece of device memory; handed back to its pool when the last array viewing it goes away."""

    __slots__ = ("pool", "address", "size")

    def __init__(self, pool: "_Pool | None", address: int, size: int):
        self.pool, self.address, self.size = pool, address, size

    def __del__(self) -> None:
        if self.pool is not None:
            self.pool.free_lists[self.size].append(self.address)


class _Pool:
    """Caching allocator: exact-size free lists of 256-byte multiples."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.free_lists: dict[int, list[int]] = defaultdict(list)

    def get(self, nbytes: int) -> _Block:
        size = _align(max(nbytes, 1))
        free = self.free_lists[size]
        return _Block(self, free.pop() if free else self.runtime.alloc(size), size)


class _Arena:
    """One allocation carved into 256-byte aligned slices, front to back."""

    def __init__(self, runtime: Runtime, nbytes: int):
        self.base, self.size, self.used = runtime.alloc(nbytes), nbytes, 0
        self.block = _Block(None, self.base, nbytes)

    def take(self, nbytes: int) -> int | None:
        if self.used + nbytes > self.size:
            return None
        address = self.base + self.used
        self.used += _align(nbytes)
        return address


class DeviceArray:
    """A float32 or int32 array in device memory (row-major); ``reshape`` and row slices are views."""

    def __init__(self, address: int, shape: tuple[int, ...], block: _Block, dtype: Any = np.float32):
        self.address, self.shape, self.block, self.dtype = address, tuple(int(s) for s in shape), block, np.dtype(dtype)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def reshape(self, *shape: Any) -> "DeviceArray":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1]))
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if int(np.prod(shape)) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return DeviceArray(self.address, shape, self.block, self.dtype)

    def rows(self, start: int, stop: int) -> "DeviceArray":
        """Rows ``start:stop`` of the first axis, as a view."""
        row = self.size // self.shape[0] * self.dtype.itemsize
        return DeviceArray(self.address + start * row, (stop - start, *self.shape[1:]), self.block, self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype.name})"


@dataclass
class GpuWeight:
    """A weight matrix ``[rows, cols]`` kept in its GGML block format inside the weight arena."""

    address: int
    ggml_type: GGMLQuantizationType
    shape: tuple[int, int]
    row_bytes: int

    @property
    def kernel_suffix(self) -> str:
        return KERNEL_TYPES[self.ggml_type]


@dataclass
class _Graph:
    """A captured decode step: its executable graph, private memory, output, and input buffer layout."""

    inputs: DeviceArray            # int32: token, position, slot, segment position, key slots...
    pool: _Pool
    executable: Any = None
    output: DeviceArray | None = None
    keep: list[Any] = field(default_factory=list)


def memory_needed(gguf: Any, n_slots: int) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) a model needs on the device with ``n_slots`` cache positions."""
    cfg = gguf.config
    weights = 0
    for ref in gguf.tensors.values():
        if len(ref.shape) == 1 or ref.ggml_type not in KERNEL_TYPES:
            weights += _align(ref.n_elements * 4)  # widened to float32
        else:
            weights += _align(ref.n_bytes)
    kv = cfg.n_layers * _align(n_slots * cfg.n_kv_heads * (cfg.head_dim + cfg.head_dim_v) * 4) + 2 * ALIGN * cfg.n_layers
    return weights, kv


class GpuBackend:
    """``Backend`` on a GPU runtime. Arrays are ``DeviceArray``; weights are ``GpuWeight``."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.name = runtime.name
        self._pool = _Pool(runtime)
        self._weights: _Arena | None = None
        self._kv: _Arena | None = None
        self._uploads: list[tuple[np.ndarray, np.ndarray, DeviceArray]] = []  # small cache of host int arrays
        self._static: list[tuple[np.ndarray, DeviceArray]] = []   # batch arrays a graph reads from its inputs
        self._capturing = False
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._profile: list[tuple[str, str, Any, Any]] | None = None
        self.profile_label = ""
        self._max_slots = 1 << 16  # key slots a decode graph can address; prepare() sets the real count
        sms = getattr(runtime, "multiprocessors", 64)
        self.decode_splits = 32 if sms >= 64 else 16

    # --- memory ---------------------------------------------------------------------------------------------
    def prepare(self, gguf: Any, n_slots: int) -> None:
        """Check free memory, then allocate the weight and KV arenas; raises ``DeviceError`` with the numbers."""
        weights, kv = memory_needed(gguf, n_slots)
        need = int((weights + kv) * 1.1) + 100 * MB
        free, total = self.rt.mem_info()
        if need > free:
            raise DeviceError(
                f"not enough GPU memory on {self.rt.device_name}: need {need / MB:.0f} MiB (weights {weights / MB:.0f} "
                f"+ KV cache {kv / MB:.0f} + 10% + 100 MiB) but only {free / MB:.0f} of {total / MB:.0f} MiB are free")
        self._weights, self._kv = _Arena(self.rt, weights), _Arena(self.rt, kv)
        self._max_slots = n_slots

    def _empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> DeviceArray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        block = self._pool.get(nbytes)
        return DeviceArray(block.address, shape, block, dtype)

    def zeros(self, shape: tuple[int, ...]) -> DeviceArray:
        nbytes = int(np.prod(shape)) * 4
        address = self._kv.take(nbytes) if self._kv is not None else None  # the KV pools, after prepare()
        out = DeviceArray(address, shape, self._kv.block) if address is not None else self._empty(shape)
        self.rt.memset(out.address, 0, nbytes)
        return out

    def from_host(self, x: np.ndarray) -> DeviceArray:
        x = np.ascontiguousarray(x, dtype=np.int32 if np.issubdtype(np.asarray(x).dtype, np.integer) else np.float32)
        out = self._empty(x.shape, x.dtype)
        self.rt.copy_to_device(out.address, x)
        return out

    def to_host(self, x: DeviceArray) -> np.ndarray:
        host = np.empty(x.shape, x.dtype)
        self.rt.copy_to_host(host, x.address)
        return host

    def _ints(self, host: np.ndarray) -> DeviceArray:
        """Device int32 copy of a small host index array (positions, slots), cached while unchanged."""
        for src, dev in self._static:
            if src is host:
                return dev
        if self._capturing:
            raise DeviceError("a decode graph read a host array that is not one of its batch inputs")
        for src, copy, dev in self._uploads:
            if src is host and np.array_equal(copy, host):
                return dev
        dev = self.from_host(np.asarray(host, dtype=np.int32))
        self._uploads = [(host, np.array(host), dev), *self._uploads[:15]]
        return dev

    # --- weights --------------------------------------------------------------------------------------------
    def _to_arena(self, data: np.ndarray) -> int:
        data = np.ascontiguousarray(data)
        address = self._weights.take(data.nbytes) if self._weights is not None else None
        if address is None:  # no prepare(): the weight gets its own allocation
            block = self._pool.get(data.nbytes)
            block.pool = None  # weights live as long as the backend
            address = block.address
        self.rt.copy_to_device(address, data)
        return address

    def load_weight(self, tensor: TensorRef) -> GpuWeight:
        rows, cols = tensor.shape[0], int(np.prod(tensor.shape[1:]))
        if cols % 8:
            raise UnsupportedError(f"{tensor.name}: rows of {cols} values are not a multiple of 8")
        raw = np.asarray(tensor.raw)
        if tensor.ggml_type in KERNEL_TYPES:
            data, kind = raw.view(np.uint8).reshape(rows, -1), tensor.ggml_type
        else:  # no kernel for this format: widen once to float32
            data, kind = dequantize(raw, tensor.ggml_type).astype(np.float32).reshape(rows, cols), GGMLQuantizationType.F32
        return GpuWeight(self._to_arena(data), kind, (rows, cols), data.nbytes // rows)

    def load_vector(self, tensor: TensorRef) -> DeviceArray:
        data = dequantize(np.asarray(tensor.raw), tensor.ggml_type).astype(np.float32).reshape(tensor.shape)
        return DeviceArray(self._to_arena(data), data.shape, _Block(None, 0, 0))

    def load_embedding(self, tensor: TensorRef, tied: bool) -> GpuWeight:
        return self.load_weight(tensor)

    # --- launching ------------------------------------------------------------------------------------------
    def _launch(self, op: str, kernel: str, grid: tuple[int, ...], block: int, args: list[Any], shared: int = 0) -> None:
        function = self.rt.function(op, kernel)
        grid3 = (*grid, 1, 1)[:3]
        if self._profile is None:
            self.rt.launch(function, grid3, (block, 1, 1), args, shared)
            return
        start, end = self.rt.event(), self.rt.event()
        self.rt.record(start)
        self.rt.launch(function, grid3, (block, 1, 1), args, shared)
        self.rt.record(end)
        self._profile.append((self.profile_label, kernel, start, end))

    def _elementwise_grid(self, n: int) -> tuple[int]:
        return (max(1, min(-(-n // 256), 4096)),)

    # --- ops ------------------------------------------------------------------------------------------------
    def embedding(self, table: GpuWeight, tokens: np.ndarray) -> DeviceArray:
        ids = self._ints(tokens)
        out = self._empty((len(tokens), table.shape[1]))
        self._launch("embedding", f"embed_{table.kernel_suffix}", (len(tokens),), 128,
                     [ptr(table.address), i64(table.row_bytes), ptr(ids.address), ptr(out.address),
                      i32(table.shape[1]), f32(1.0)])
        return out

    def matmul(self, x: DeviceArray, weight: GpuWeight) -> DeviceArray:
        n_out, k = weight.shape
        m = x.size // k
        out = self._empty((m, n_out))
        self._matmul_into(x, weight, out, m, None)
        return out

    def _matmul_into(self, x: DeviceArray, weight: GpuWeight, out: DeviceArray, m: int, add: DeviceArray | None) -> None:
        n_out, k = weight.shape
        suffix, add_ptr = weight.kernel_suffix, ptr(add.address if add is not None else 0)
        if m == 1 or k % 32:
            rows_per_block = 4
            for row in range(m):  # K % 32 != 0 only for unusual float weights; decode has m == 1
                self._launch("matmul", f"matvec_{suffix}", (-(-n_out // rows_per_block),), rows_per_block * self.rt.warp_size,
                             [ptr(weight.address), i64(weight.row_bytes), ptr(x.address + row * k * 4),
                              ptr(out.address + row * n_out * 4), i32(n_out), i32(k),
                              ptr(add.address + row * n_out * 4) if add is not None else add_ptr])
            return
        self._launch("matmul", f"matmul_{suffix}", (-(-n_out // 64), -(-m // 64)), 256,
                     [ptr(weight.address), i64(weight.row_bytes), ptr(x.address), ptr(out.address),
                      i32(m), i32(n_out), i32(k), add_ptr])

    def add(self, a: DeviceArray, b: DeviceArray) -> DeviceArray:
        out = self._empty(a.shape)
        self._launch("add", "add", self._elementwise_grid(a.size), 256,
                     [ptr(a.address), ptr(b.address), ptr(out.address), i64(a.size), i64(b.size)])
        return out

    def scale(self, x: DeviceArray, factor: float) -> DeviceArray:
        out = self._empty(x.shape)
        self._launch("scale", "scale", self._elementwise_grid(x.size), 256,
                     [ptr(x.address), ptr(out.address), f32(factor), i64(x.size)])
        return out

    def rms_norm(self, x: DeviceArray, weight: DeviceArray, eps: float) -> DeviceArray:
        d = x.shape[-1]
        out = self._empty(x.shape)
        block = min(256, -(-d // self.rt.warp_size) * self.rt.warp_size)
        self._launch("rms_norm", "rms_norm", (x.size // d,), block,
                     [ptr(x.address), ptr(weight.address), ptr(out.address), i32(d), f32(eps)])
        return out

    def rope(self, x: DeviceArray, positions: np.ndarray, theta: float, neox: bool, n_rot: int,
             freq_factors: DeviceArray | None = None, freq_scale: float = 1.0) -> DeviceArray:
        n, heads, head_dim = x.shape
        pos = self._ints(positions)
        out = self._empty(x.shape)
        self._launch("rope", "rope", (n, heads), max(self.rt.warp_size, min(256, head_dim // 2)),
                     [ptr(x.address), ptr(out.address), ptr(pos.address), i32(heads), i32(head_dim), i32(n_rot),
                      f32(theta), i32(int(neox)), ptr(freq_factors.address if freq_factors is not None else 0),
                      f32(freq_scale)])
        return out

    def _gate(self, kernel: str, gate: DeviceArray, up: DeviceArray) -> DeviceArray:
        out = self._empty(gate.shape)
        self._launch(kernel, kernel, self._elementwise_grid(gate.size), 256,
                     [ptr(gate.address), ptr(up.address), ptr(out.address), i64(gate.size)])
        return out

    def swiglu(self, gate: DeviceArray, up: DeviceArray) -> DeviceArray:
        return self._gate("swiglu", gate, up)

    def geglu(self, gate: DeviceArray, up: DeviceArray) -> DeviceArray:
        return self._gate("geglu", gate, up)

    def softcap(self, x: DeviceArray, cap: float) -> DeviceArray:
        out = self._empty(x.shape)
        self._launch("softcap", "softcap", self._elementwise_grid(x.size), 256,
                     [ptr(x.address), ptr(out.address), f32(cap), i64(x.size)])
        return out

    def softmax(self, x: DeviceArray) -> DeviceArray:
        d = x.shape[-1]
        out = self._empty(x.shape)
        self._launch("softmax", "softmax", (x.size // d,), 256, [ptr(x.address), ptr(out.address), i32(d)])
        return out

    def argmax(self, x: DeviceArray) -> DeviceArray:
        """Index of the largest value of each row (first on ties), as int32 ``[rows]``."""
        d = x.shape[-1]
        out = self._empty((x.size // d,), np.int32)
        self._launch("argmax", "argmax", (x.size // d,), 1024, [ptr(x.address), i32(d), ptr(out.address)])
        return out

    def sample(self, logits: DeviceArray, top_k: int, top_p: float, temperature: float, uniform: float) -> int:
        """One token drawn from a ``[vocab]`` row by top-k then top-p at ``temperature``, using ``uniform`` in [0, 1)."""
        u = self.from_host(np.array([uniform], np.float32))
        out = self._empty((1,), np.int32)
        self._launch("sample", "sample_top_k_top_p", (1,), 1024,
                     [ptr(logits.address), i32(logits.shape[-1]), i32(top_k), f32(top_p), f32(temperature),
                      ptr(u.address), ptr(out.address)])
        return int(self.to_host(out)[0])

    def take_rows(self, x: DeviceArray, rows: np.ndarray | slice) -> DeviceArray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(x.shape[0])
            if step == 1:
                return x.rows(start, stop)
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows)
        if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            return x.rows(int(rows[0]), int(rows[0]) + len(rows))  # contiguous: a view
        width = x.size // x.shape[0]
        out = self._empty((len(rows), *x.shape[1:]))
        self._launch("take_rows", "take_rows", (len(rows),), 256,
                     [ptr(x.address), ptr(self._ints(rows).address), ptr(out.address), i32(width)])
        return out

    def concat_rows(self, parts: list[DeviceArray]) -> DeviceArray:
        out = self._empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
        offset = 0
        for part in parts:
            self.rt.copy(out.address + offset, part.address, part.nbytes)
            offset += part.nbytes
        return out

    # --- attention ------------------------------------------------------------------------------------------
    def kv_write(self, cache: KVCache, layer: int, batch: Batch, k: DeviceArray, v: DeviceArray) -> None:
        k_pool, v_pool = cache.k[layer], cache.v[layer]
        row_k, row_v = k.size // k.shape[0], v.size // v.shape[0]
        self._launch("kv_store", "kv_store", (batch.n_tokens,), 128,
                     [ptr(k.address), ptr(v.address), ptr(k_pool.address), ptr(v_pool.address),
                      ptr(self._ints(batch.slots).address), i32(row_k), i32(row_v)])

    def attention(self, q: DeviceArray, cache: KVCache, layer: int, batch: Batch, scale: float,
                  window: int | None, softcap: float | None) -> DeviceArray:
        n, heads, d = q.shape
        k_pool, v_pool = cache.k[layer], cache.v[layer]
        kv_heads = k_pool.shape[1]
        if v_pool.shape[2] != d or d > 256:
            raise UnsupportedError(f"GPU attention needs equal key/value head widths <= 256, got {d} and {v_pool.shape[2]}")
        out = self._empty((n, heads, d))
        common = [i32(heads), i32(kv_heads), i32(d), f32(scale), f32(softcap or 0.0), i32(window or 0)]
        for seg in batch.segments:
            t = seg.rows.stop - seg.rows.start
            pos, slots = self._ints(seg.positions), self._ints(seg.key_slots)
            qs, outs = q.rows(seg.rows.start, seg.rows.stop), out.rows(seg.rows.start, seg.rows.stop)
            if t == 1:
                self._decode_attention(qs, outs, k_pool, v_pool, pos, slots, common, heads, d)
                continue
            warps, bkv = 4, (32 if d <= 128 else 16)
            shared = (bkv * (d + 1) + bkv * d + warps * d) * 4
            self._launch("attention", "attn_prefill", (-(-t // warps), heads), warps * self.rt.warp_size,
                         [ptr(qs.address), ptr(k_pool.address), ptr(v_pool.address), ptr(outs.address),
                          ptr(pos.address), ptr(slots.address), i32(t), *common, i32(bkv)], shared)
        return out

    def _decode_attention(self, q, out, k_pool, v_pool, pos, slots, common, heads, d) -> None:
        splits = self.decode_splits
        part_o, part_ml = self._empty((heads, splits, d)), self._empty((heads, splits, 2))
        self._launch("attention", "attn_decode_partial", (splits, heads), 4 * self.rt.warp_size,
                     [ptr(q.address), ptr(k_pool.address), ptr(v_pool.address), ptr(pos.address),
                      ptr(slots.address), *common, ptr(part_o.address), ptr(part_ml.address)])
        self._launch("attention", "attn_decode_combine", (heads,), max(d, self.rt.warp_size),
                     [ptr(part_o.address), ptr(part_ml.address), ptr(out.address), i32(splits), i32(d)])

    # The hook path (scores and pattern materialized) is for inspection, not speed: it runs the numpy twins
    # on host copies of the one sequence's cached keys/values.
    def attention_scores(self, q: DeviceArray, cache: KVCache, layer: int, segment: Segment, scale: float,
                         window: int | None, softcap: float | None) -> DeviceArray:
        from rocmforge.ops.attention import attention_scores
        keys = self.to_host(cache.k[layer])[segment.key_slots]
        return self.from_host(attention_scores(self.to_host(q), keys, segment.positions, scale, window, softcap))

    def attention_mix(self, pattern: DeviceArray, cache: KVCache, layer: int, segment: Segment) -> DeviceArray:
        from rocmforge.ops.attention import attention_mix
        values = self.to_host(cache.v[layer])[segment.key_slots]
        return self.from_host(attention_mix(self.to_host(pattern), values))

    # --- decode graphs --------------------------------------------------------------------------------------
    def graph_step(self, batch: Batch, step: Callable[[], DeviceArray]) -> DeviceArray:
        """Run ``step()`` (one forward over ``batch``) as a replayed device graph.

        Only a single sequence decoding one token is graphed; anything else runs ``step()`` eagerly. The first
        call runs eagerly once (compiling kernels, filling the pools), then captures; later calls replay. The
        returned array is the graph's own output buffer: read it before the next call.
        """
        if batch.n_tokens != 1 or len(batch.segments) != 1:
            return step()
        key = (batch.n_tokens, len(batch.segments))
        graph = self._graphs.get(key)
        if graph is None:
            graph = _Graph(inputs=self._empty((4 + self._max_slots,), np.int32), pool=_Pool(self.rt))
            self._stage(batch, graph)
            step()  # warm-up; writing this token's K/V twice is harmless
            self._stage(batch, graph)
            outer, self._pool, self._capturing = self._pool, graph.pool, True
            try:
                self.rt.begin_capture()
                graph.output = step()
                graph.executable = self.rt.end_capture()
            finally:
                self._pool, self._capturing = outer, False
            self._graphs[key] = graph
        else:
            self._stage(batch, graph)
        self.rt.replay(graph.executable)
        self._static = []
        return graph.output

    def _stage(self, batch: Batch, graph: _Graph) -> None:
        seg = batch.segments[0]
        host = np.concatenate([batch.tokens, batch.positions, batch.slots, seg.positions, seg.key_slots]).astype(np.int32)
        if len(host) > graph.inputs.size:
            raise DeviceError(f"decode graph inputs hold {graph.inputs.size - 4} key slots, {len(seg.key_slots)} needed")
        self.rt.copy_to_device(graph.inputs.address, host)
        views = [graph.inputs.rows(i, i + 1) for i in range(4)] + [graph.inputs.rows(4, 4 + len(seg.key_slots))]
        self._static = list(zip([batch.tokens, batch.positions, batch.slots, seg.positions, seg.key_slots], views))

    # --- profiling ------------------------------------------------------------------------------------------
    def profile(self, run: Callable[[], Any]) -> list[tuple[str, str, float]]:
        """Run ``run()`` eagerly with an event pair around every kernel -> ``[(label, kernel, ms)]``.

        ``label`` is ``self.profile_label`` at launch time (a caller can set it per layer, e.g. from a hook).
        """
        self._profile = []
        try:
            run()
            self.rt.synchronize()
            return [(label, kernel, self.rt.elapsed_ms(s, e)) for label, kernel, s, e in self._profile]
        finally:
            self._profile = None

