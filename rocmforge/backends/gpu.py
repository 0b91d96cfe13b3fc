"""The GPU backend: ``rocmforge.backends.base.Backend`` on a ``Runtime`` (HIP or CUDA), one kernel per op.

Memory: ``prepare`` checks that weights + KV cache + 10% + 100 MB fit in free device memory, then makes two
arena allocations: every weight is a 256-byte aligned slice of the first (quantized blocks stay quantized:
the matmul kernels decode them on the fly), the KV cache pools are slices of the second. Activations come
from a caching pool (freed blocks are reused by size, never returned to the driver).

Fusion without changing the forward: decode matmuls are not launched at once but held as pending work, so
the ops that follow can join them: up to three matmuls of one input (q, k, v) become one launch, an RMSNorm
in front is folded in, a residual ``add`` behind it and a ``swiglu``/``geglu`` of a gate/up pair are folded
in too, and the rope of queries and keys shares one launch (with Gemma's per-head QK-norms and the cache
store inside it). A norm takes the residual ``add`` behind it into its launch (Gemma's sandwich norms); with
many rows, the norm in front of a matmul is folded into the activations' 8-bit quantization (``gpu_mma.py``).
Every other op, and every read of a result,
launches what is pending first, so results are the same as op-by-op execution (and every intermediate
the forward names is still written).

Decode graphs (``gpu_graphs.py``): ``graph_step`` replays one sequence's decode step, ``graph_step_batch`` a
whole batch's (one graph per batch-size bucket, sampling on the device). Kernel launches, the batched-decode
kernels and profiling are in ``gpu_launch.py``.

>>> from rocmforge.backends.gpu import GpuBackend, gpu_available
>>> gpu_available() in (True, False)
True
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from rocmforge.backends.device_memory import MB, Arena, Block, DeviceArray, Pool
from rocmforge.backends.gpu_graphs import ADJUST_CAPACITY, BUCKETS, DecodeGraphs, RowInputs, RowsGraph
from rocmforge.backends.gpu_hooks import GpuHookOps
from rocmforge.backends.gpu_launch import GpuLaunches
from rocmforge.backends.gpu_mma import GpuMatrixUnits
from rocmforge.backends.gpu_records import (ACT_NONE, KERNEL_TYPES, DecodeGraph, GpuWeight, PendingHeadNorms,
                                            PendingMatmuls, PendingNorm, PendingRope, activation_rounding,
                                            memory_needed, same_view)
from rocmforge.backends.runtime import Runtime, f32, i32, i64, ptr
from rocmforge.errors import DeviceError, UnsupportedError
from rocmforge.gguf_file import TensorRef
from rocmforge.kv_cache import Batch, KVCache

def gpu_available() -> bool:
    """True when a HIP or CUDA device can be opened."""
    from rocmforge.backends import cuda, hip
    return hip.available()[0] or cuda.available()[0]


class GpuBackend(GpuHookOps, GpuMatrixUnits, GpuLaunches, DecodeGraphs):
    """``Backend`` on a GPU runtime. Arrays are ``DeviceArray``; weights are ``GpuWeight``."""

    max_batch_rows = BUCKETS[-1]                 # sequences one graph_step_batch call takes
    device_sampling_capacity = ADJUST_CAPACITY   # adjusted logits per row its sampler takes

    def __init__(self, runtime: Runtime, round_activations: bool = True):
        """``round_activations=False`` multiplies unrounded float32 activations (faster, and a smooth function of
        the input: what to compare against the numpy path with its rounding switched off)."""
        self.rt = runtime
        self.round_activations = round_activations
        self.name = runtime.name
        self._pool = Pool(runtime)
        self._weights: Arena | None = None
        self._kv: Arena | None = None
        self._max_slots = 1 << 16  # key slots a decode graph can address; prepare() sets the real count
        self._uploads: list[tuple[np.ndarray, np.ndarray, DeviceArray]] = []  # small cache of host arrays on the device
        self._static: list[tuple[np.ndarray, DeviceArray]] = []  # batch arrays a graph reads from its inputs
        self._tables: dict[tuple, tuple[DeviceArray | None, DeviceArray]] = {}  # rope frequency tables (factors, table)
        self._capturing = False
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        self._row_graphs: dict[tuple[int, int], RowsGraph] = {}  # (bucket, id(cache)) -> graph
        self._rows: RowInputs | None = None  # set while a batched decode step is run and captured
        self._row_tickets: DeviceArray | None = None
        self._pending: PendingNorm | PendingHeadNorms | PendingMatmuls | PendingRope | None = None
        self._profile: list[tuple[str, str, Any, Any]] | None = None
        self.profile_label = ""
        self._tickets = self._empty((4096,), np.int32)  # per-head counters of the decode attention kernel
        self.rt.memset(self._tickets.address, 0, self._tickets.nbytes)

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
        self._weights, self._kv = Arena(self.rt, weights), Arena(self.rt, kv)
        self._max_slots = n_slots

    def _empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> DeviceArray:
        block = self._pool.get(math.prod(shape) * np.dtype(dtype).itemsize)
        return DeviceArray(block.address, shape, block, dtype)

    def zeros(self, shape: tuple[int, ...]) -> DeviceArray:
        nbytes = math.prod(shape) * 4
        address = self._kv.take(nbytes) if self._kv is not None else None  # the KV pools, after prepare()
        out = DeviceArray(address, shape, self._kv.block) if address is not None else self._empty(shape)
        self.rt.memset(out.address, 0, nbytes)
        return out

    def _upload(self, x: np.ndarray) -> DeviceArray:
        x = np.ascontiguousarray(x)
        out = self._empty(x.shape, x.dtype)
        self.rt.copy_to_device(out.address, x)
        return out

    def from_host(self, x: np.ndarray) -> DeviceArray:
        return self._upload(np.asarray(x, dtype=np.float32))

    def to_host(self, x: DeviceArray) -> np.ndarray:
        self._flush()
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
        dev = self._upload(np.asarray(host, dtype=np.int32))
        self._uploads = [(host, np.array(host), dev), *self._uploads[:15]]
        return dev

    # --- weights --------------------------------------------------------------------------------------------
    def _to_arena(self, data: np.ndarray) -> tuple[int, Block]:
        """Copy ``data`` into the weight arena -> (address, the block holding it). Without prepare() (single
        ops called from Python) it gets a pool block instead, which goes back to the pool with the weight."""
        data = np.ascontiguousarray(data)
        address = self._weights.take(data.nbytes) if self._weights is not None else None
        block = self._weights.block if address is not None else self._pool.get(data.nbytes)
        address = block.address if address is None else address
        self.rt.copy_to_device(address, data)
        return address, block

    def load_weight(self, tensor: TensorRef) -> GpuWeight:
        rows, cols = tensor.shape[0], int(np.prod(tensor.shape[1:]))
        if cols % 8:
            raise UnsupportedError(f"{tensor.name}: rows of {cols} values are not a multiple of 8")
        raw = np.asarray(tensor.raw)
        if tensor.ggml_type in KERNEL_TYPES:
            data, kind = raw.view(np.uint8).reshape(rows, -1), tensor.ggml_type
        else:  # no kernel for this format: widen once to float32
            data, kind = dequantize(raw, tensor.ggml_type).astype(np.float32).reshape(rows, cols), GGMLQuantizationType.F32
        act = activation_rounding(tensor.ggml_type) if self.round_activations else ACT_NONE
        address, block = self._to_arena(data)
        return GpuWeight(address, kind, (rows, cols), data.nbytes // rows, act, block)

    def load_vector(self, tensor: TensorRef) -> DeviceArray:
        data = dequantize(np.asarray(tensor.raw), tensor.ggml_type).astype(np.float32).reshape(tensor.shape)
        address, block = self._to_arena(data)
        return DeviceArray(address, data.shape, block)

    def load_embedding(self, tensor: TensorRef, tied: bool) -> GpuWeight:
        return self.load_weight(tensor)

    # --- matmul and its fusions -----------------------------------------------------------------------------
    def matmul(self, x: DeviceArray, weight: GpuWeight) -> DeviceArray:
        n_out, k = weight.shape
        m = x.size // k
        out = self._empty((m, n_out))
        group = self._pending
        first = group.items[0][0] if isinstance(group, PendingMatmuls) else None
        joins = (first is not None and group.m == m and same_view(group.x, x) and len(group.items) < 3
                 and (first.ggml_type, first.act) == (weight.ggml_type, weight.act) and group.sum is None
                 and group.glu is None)
        if not joins:
            # a batched decode step folds every row's norm (matvec_rows), whatever the number of rows
            folds = m == 1 or self._rows is not None or self._on_matrix_units(weight, m)
            norm = (group if isinstance(group, PendingNorm) and folds and same_view(group.out, x)
                    and group.sum is None else None)
            if norm is not None:
                self._pending = None  # folded into this matvec
            self._flush()
            group = self._pending = PendingMatmuls(x, m, norm, self.profile_label)
        group.items.append((weight, out))
        return out

    def linear(self, x: DeviceArray, weight: GpuWeight, bias: DeviceArray, gelu: bool = False,
               norm: tuple[DeviceArray, DeviceArray, DeviceArray, float] | None = None) -> DeviceArray:
        out = self.add(self.matmul(x, weight), bias)  # the add kernel broadcasts the bias over the rows
        if norm is not None:
            residual, norm_weight, norm_bias, eps = norm
            return self.layer_norm(out, norm_weight, norm_bias, eps, residual=residual)
        return self.gelu(out) if gelu else out

    def add(self, a: DeviceArray, b: DeviceArray) -> DeviceArray:
        g = self._pending
        if isinstance(g, PendingNorm) and g.sum is None:  # a residual behind a norm: the norm's launch adds it
            for mine, other in ((a, b), (b, a)):
                if same_view(mine, g.out) and other.size == mine.size and not same_view(other, mine):
                    g.add, g.sum = other, self._empty(a.shape)
                    return g.sum
        if isinstance(g, PendingMatmuls) and len(g.items) == 1 and g.sum is None and g.glu is None:
            y = g.items[0][1]
            for mine, other in ((a, b), (b, a)):
                if same_view(mine, y) and other.size == y.size and not same_view(other, y) and not (g.norm and same_view(other, g.norm.out)):
                    g.add, g.sum = other, self._empty(a.shape)
                    return g.sum
        out = self._empty(a.shape)
        self._launch("add", "add", self._elementwise_grid(a.size), 256,
                     [ptr(a.address), ptr(b.address), ptr(out.address), i64(a.size), i64(b.size)])
        return out

    def _gate(self, kernel: str, act: int, gate: DeviceArray, up: DeviceArray) -> DeviceArray:
        g = self._pending
        if (isinstance(g, PendingMatmuls) and (g.m == 1 or self._rows is not None) and len(g.items) == 2 and g.glu is None
                and same_view(gate, g.items[0][1]) and same_view(up, g.items[1][1])):
            g.glu = (act, self._empty(gate.shape))
            return g.glu[1]
        out = self._empty(gate.shape)
        self._launch(kernel, kernel, self._elementwise_grid(gate.size), 256,
                     [ptr(gate.address), ptr(up.address), ptr(out.address), i64(gate.size)])
        return out

    def swiglu(self, gate: DeviceArray, up: DeviceArray) -> DeviceArray:
        return self._gate("swiglu", 0, gate, up)

    def geglu(self, gate: DeviceArray, up: DeviceArray) -> DeviceArray:
        return self._gate("geglu", 1, gate, up)

    # --- norms, rope, elementwise ---------------------------------------------------------------------------
    def rms_norm(self, x: DeviceArray, weight: DeviceArray, eps: float) -> DeviceArray:
        out = self._empty(x.shape)
        norm = PendingNorm(x, weight, eps, out, self.profile_label)
        g = self._pending
        if len(x.shape) == 3 and isinstance(g, PendingHeadNorms) and len(g.norms) == 1 and g.norms[0].eps == eps:
            g.norms.append(norm)  # queries' and keys' QK-norms, both for the rope that follows
            return out
        self._flush()
        if len(x.shape) == 2 and x.size % 8 == 0:
            self._pending = norm  # a matvec may fold it in (one row), or the norm may add a residual
        elif len(x.shape) == 3:
            self._pending = PendingHeadNorms([norm], self.profile_label)  # the rope may normalize each head itself
        else:
            self._run_rms_norm(norm)
        return out

    def rope(self, x: DeviceArray, positions: np.ndarray, theta: float, neox: bool, n_rot: int,
             freq_factors: DeviceArray | None = None, freq_scale: float = 1.0) -> DeviceArray:
        n, heads, head_dim = x.shape
        inv_freq = self._inv_freq(theta, n_rot, freq_factors, freq_scale)
        pos = self._ints(positions)
        out = self._empty(x.shape)
        key = (pos.address, n, head_dim, n_rot, bool(neox), inv_freq.address)
        if self._fold_rope(x, out, key, pos, inv_freq):
            return out
        r = self._pending
        if isinstance(r, PendingHeadNorms):  # the rope kernel normalizes each head in front (QK-norm)
            norm = next((n for n in r.norms if same_view(n.out, x)), None)
            if norm is not None:
                self._pending = PendingRope(key, pos, inv_freq, self.profile_label, [(norm.x, out)], [norm],
                                            [n for n in r.norms if n is not norm])
                return out
        if isinstance(r, PendingRope) and r.key == key and len(r.parts) == 1:
            norm = next((n for n in r.spare_norms if same_view(n.out, x)), None)
            if norm is not None:
                r.spare_norms.remove(norm)
                r.parts.append((norm.x, out))
                r.norms.append(norm)
                return out
            if not r.spare_norms and not same_view(r.parts[0][1], x):
                r.parts.append((x, out))
                r.norms.append(None)
                return out
        self._flush()
        self._pending = PendingRope(key, pos, inv_freq, self.profile_label, [(x, out)], [None])
        return out

    def _fold_rope(self, x: DeviceArray, out: DeviceArray, key: tuple, pos: DeviceArray, inv_freq: DeviceArray) -> bool:
        """Let the pending decode q/k/v matvec rotate ``x`` (its q or k output) itself; True when it will."""
        g = self._pending
        n, head_dim, n_rot, neox = key[1], key[2], key[3], key[4]
        if not (isinstance(g, PendingMatmuls) and g.m == 1 and n == 1 and not neox and n_rot == head_dim and self._rows is None
                and g.glu is None and g.sum is None and g.store is None and g.rope_key in (None, key)):
            return False
        for j, (_, y) in enumerate(g.items[:2]):
            if same_view(y, x) and g.rope_outs[j] is None:
                g.rope_key, g.rope_tables, g.rope_outs[j] = key, (pos, inv_freq), out
                return True
        return False

    def _inv_freq(self, theta: float, n_rot: int, freq_factors: DeviceArray | None, freq_scale: float) -> DeviceArray:
        """theta^(-2i/n_rot) * freq_scale / factor_i in float64 on the device (cached; the rope kernel's table)."""
        key = (theta, n_rot, freq_factors.address if freq_factors is not None else 0, freq_scale)
        cached = self._tables.get(key)
        if cached is None or cached[0] is not freq_factors:  # the same factors object, not just its address
            inv = theta ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot) * freq_scale
            if freq_factors is not None:
                inv = inv / self.to_host(freq_factors).astype(np.float64)
            cached = self._tables[key] = (freq_factors, self._upload(inv))
        return cached[1]

    def scale(self, x: DeviceArray, factor: float) -> DeviceArray:
        out = self._empty(x.shape)
        self._launch("scale", "scale", self._elementwise_grid(x.size), 256,
                     [ptr(x.address), ptr(out.address), f32(factor), i64(x.size)])
        return out

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

    # --- encoder (BERT) ops -----------------------------------------------------------------------------------
    def layer_norm(self, x: DeviceArray, weight: DeviceArray, bias: DeviceArray, eps: float,
                   residual: DeviceArray | None = None) -> DeviceArray:
        if residual is not None:
            x = self.add(x, residual)
        d = x.shape[-1]
        out = self._empty(x.shape)
        self._launch("layer_norm", "layer_norm", (x.size // d,), 128,
                     [ptr(x.address), ptr(weight.address), ptr(bias.address), ptr(out.address), i32(d), f32(eps)])
        return out

    def gelu(self, x: DeviceArray) -> DeviceArray:
        out = self._empty(x.shape)
        self._launch("gelu", "gelu", self._elementwise_grid(x.size), 256, [ptr(x.address), ptr(out.address), i64(x.size)])
        return out

    def encoder_attention(self, q: DeviceArray, k: DeviceArray, v: DeviceArray, offsets: np.ndarray, n_heads: int,
                          scale: float) -> DeviceArray:
        d_head = q.shape[-1] // n_heads
        if d_head not in (32, 64):
            raise UnsupportedError(f"encoder attention has kernels for heads of 32 or 64 values, not {d_head}")
        longest = int(np.max(np.diff(offsets)))
        out = self._empty(q.shape)
        self._launch("encoder_attention", f"encoder_attention_{d_head}", (len(offsets) - 1, n_heads, -(-longest // 64)),
                     64, [ptr(q.address), ptr(k.address), ptr(v.address), ptr(self._ints(offsets).address),
                          i32(n_heads), f32(scale), ptr(out.address)])
        return out

    # --- tokens in, tokens out ------------------------------------------------------------------------------
    def embedding(self, table: GpuWeight, tokens: np.ndarray) -> DeviceArray:
        ids = self._ints(tokens)
        out = self._empty((len(tokens), table.shape[1]))
        self._launch("embedding", f"embed_{table.kernel_suffix}", (len(tokens),), 128,
                     [ptr(table.address), i64(table.row_bytes), ptr(ids.address), ptr(out.address),
                      i32(table.shape[1]), f32(1.0)])
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

    # --- rows -----------------------------------------------------------------------------------------------
    def take_rows(self, x: DeviceArray, rows: np.ndarray | slice) -> DeviceArray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(x.shape[0])
            if step == 1:
                return x.rows(start, stop)
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows)
        if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            return x.rows(int(rows[0]), int(rows[0]) + len(rows))  # contiguous: a view
        out = self._empty((len(rows), *x.shape[1:]))
        self._launch("take_rows", "take_rows", (len(rows),), 256,
                     [ptr(x.address), ptr(self._ints(rows).address), ptr(out.address), i32(x.size // x.shape[0])])
        return out

    def concat_rows(self, parts: list[DeviceArray]) -> DeviceArray:
        self._flush()
        out = self._empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
        offset = 0
        for part in parts:
            self.rt.copy(out.address + offset, part.address, part.nbytes)
            offset += part.nbytes
        return out

    def fused_block(self, family: str, ctx: Any, layer: int, resid: DeviceArray, batch: Batch) -> None:
        return None  # launches already fuse where the next op can join; a decode step is one replayed graph

    # --- attention ------------------------------------------------------------------------------------------
    def kv_write(self, cache: KVCache, layer: int, batch: Batch, k: DeviceArray, v: DeviceArray) -> None:
        k_pool, v_pool = cache.k[layer], cache.v[layer]
        slots = self._ints(batch.slots)
        g = self._pending
        if (isinstance(g, PendingMatmuls) and g.rope_outs[1] is not None and same_view(g.rope_outs[1], k) and len(g.items) == 3
                and same_view(g.items[2][1], v) and g.store is None and batch.n_tokens == 1):
            g.store = (k_pool, v_pool, slots)  # the q/k/v matvec writes the cache too
            return
        r = self._pending
        if (isinstance(r, PendingRope) and r.store is None and any(same_view(out, k) for _, out in r.parts)
                and k.shape[:2] == v.shape[:2] and r.key[2] == k.shape[2]):
            r.store, r.store_keys = (k_pool, v_pool, slots, v), k  # the rope kernel writes the cache too
            return
        self._launch("kv_store", "kv_store", (batch.n_tokens,), 128,
                     [ptr(k.address), ptr(v.address), ptr(k_pool.address), ptr(v_pool.address),
                      ptr(slots.address), i32(k.size // k.shape[0]), i32(v.size // v.shape[0])])

    def attention(self, q: DeviceArray, cache: KVCache, layer: int, batch: Batch, scale: float,
                  window: int | None, softcap: float | None) -> DeviceArray:
        n, heads, d = q.shape
        k_pool, v_pool = cache.k[layer], cache.v[layer]
        if v_pool.shape[2] != d or d > 256 or d % 4:
            raise UnsupportedError(f"GPU attention needs equal key/value head widths <= 256 (a multiple of 4), "
                                   f"got {d} and {v_pool.shape[2]}")
        if self._rows is not None:
            return self._attention_rows(q, k_pool, v_pool, scale, window, softcap)
        out = self._empty((n, heads, d))
        common = [i32(heads), i32(k_pool.shape[1]), i32(d), f32(scale), f32(softcap or 0.0), i32(window or 0)]
        kind = f"d{d}" if d in (64, 128, 256) else "any"
        for seg in batch.segments:
            t = seg.rows.stop - seg.rows.start
            pos, slots = self._ints(seg.positions), self._ints(seg.key_slots)
            qs, outs = q.rows(seg.rows.start, seg.rows.stop), out.rows(seg.rows.start, seg.rows.stop)
            head = [ptr(qs.address), ptr(k_pool.address), ptr(v_pool.address)]
            if t == 1:  # split-K flash-decode, merged by the last block of each head
                splits = 8 if heads >= 8 else 16  # blocks per head: enough of them to keep the SMs busy
                part_o, part_ml = self._empty((heads, splits, d)), self._empty((heads, splits, 2))
                self._launch("attention", f"attn_decode_{kind}", (splits, heads), 256 if d <= 128 else 128,
                             [*head, ptr(pos.address), ptr(slots.address), *common, ptr(part_o.address),
                              ptr(part_ml.address), ptr(self._tickets.address), ptr(outs.address)])
                continue
            warps, bkv = 256 // self.rt.warp_size, (32 if d <= 128 else 16)
            shared = (bkv * (d + 1) + bkv * d + warps * d) * 4
            self._launch("attention", f"attn_prefill_{kind}", (-(-t // warps), heads), 256,
                         [*head, ptr(outs.address), ptr(pos.address), ptr(slots.address), i32(t), *common, i32(bkv)],
                         shared)
        return out
