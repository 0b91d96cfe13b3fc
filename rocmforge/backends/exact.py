"""``device="cpu-exact"``: the CPU backend with llama.cpp's own arithmetic, bit for bit (``rocmforge.exact``).

The default CPU backend is as accurate as llama.cpp but not identical to it (BLAS sums in another order), and the
8-bit activation rounding turns those ulps into different tokens on near-ties. This backend reproduces the
x86 build's (AVX2, FMA, F16C, llamafile, 2 threads, F32 KV cache, flash attention off) operation order instead:
quantized weights stay as their raw GGUF blocks and multiply 8-bit activations through ``rocmforge.exact.dot``,
and norm, rope, attention and the SwiGLU gate use the ``rocmforge.exact`` kernels. Decode runs at about
llama.cpp's own speed (integer SIMD lanes, 2 threads; ~2x the default CPU path), prefill 1.2-1.9x llama.cpp's
(attention on many keys per SIMD pass, two activation rows per AVX-512 register; BENCHMARKS.md).

Only what differs from ``CpuBackend`` is overridden here (adds, scaling, the KV cache and lookups are already
exact in numpy). A weight type without an exact kernel in ``rocmforge.exact.dot.MATMULS`` is refused at load
(``UnsupportedError``); Gemma's GeGLU is ggml's fp16 lookup table (``rocmforge.exact.geglu``).

>>> import rocmforge
>>> model = rocmforge.load("smollm2-135m", device="cpu-exact")  # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=4, temperature=0)  # doctest: +SKIP
"""
from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from rocmforge.backends.cpu import CpuBackend
from rocmforge.backends.exact_decode import DecodeBlocks
from rocmforge.errors import UnsupportedError
from rocmforge.exact import attention as exact_attention
from rocmforge.exact.compile_cache import compile_once, drop_file_pages, release_compiler_pages
from rocmforge.exact.dot import MATMULS, unsupported_types
from rocmforge.exact.geglu import geglu
from rocmforge.exact.rms_norm import rms_norm
from rocmforge.exact.rope import rope_table, rotate
from rocmforge.exact.swiglu import swiglu
from rocmforge.gguf_file import TensorRef
from rocmforge.kv_cache import Batch, KVCache, Segment
from rocmforge.ops.embedding import quantized_embedding


# llama.cpp computes a batch in ubatches of this many rows (n_ubatch: its default, and the fixtures' setting)
UBATCH = 512
# from this many activation rows a grouped weight read in place is multiplied alone (``ExactWeight.alone``)
ALONE_FROM_ROWS = 8


@dataclass(frozen=True)
class ExactWeight:
    """A weight kept as its raw GGUF blocks (``raw``) plus what its exact kernel reads (``prepared``). In a group
    of weights that multiply the same activation, ``prepared`` is the whole group's and ``rows`` this weight's
    outputs in it; for a kernel that reads the blocks in place, ``alone`` is this weight by itself (its rows of the
    group's blocks, not copied)."""

    raw: np.ndarray
    prepared: Any
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    rows: slice | None = None
    alone: ExactWeight | None = None


class ExactCpuBackend(CpuBackend):
    """``CpuBackend`` with every op that rounds differently replaced by its ``rocmforge.exact`` kernel."""

    name = "cpu-exact"

    def __init__(self) -> None:
        super().__init__(round_activations=True)
        # values made from the last activation x, kept while x lives (``_remember``): (x, (quantize function,
        # result)) and (x, (the group's prepared weight, x @ W.T))
        self._last_quantized: tuple[weakref.ref, tuple[Any, Any], object] | None = None
        self._last_group: tuple[weakref.ref, tuple[Any, np.ndarray], object] | None = None
        self._decode = DecodeBlocks()

    def finish_load(self, model: Any) -> None:
        """Compile (once per set of weight types, with a line and a progress bar on a terminal) or load the
        kernels ``model`` needs before its first request (``rocmforge.exact.compile_cache``): an 8-row prefill (the
        tiled and lane kernels) and a one-row decode step; then drop LLVM's code pages."""
        types = sorted({ref.ggml_type.name for ref in model.gguf.tensors.values()})

        def run() -> None:
            seq = model.kv.new_sequence()
            try:
                for ids in ([0] * 8, [0]):
                    batch = model.kv.prepare([(seq, ids)])
                    model.arch.forward(model.ctx, batch, rows=batch.last_rows)
            finally:
                model.kv.free(seq)

        compile_once([type(self).__name__, model.cfg.architecture, *types], run)
        release_compiler_pages()  # SmolLM2's peak RSS: 292 -> 275 MiB, 221 MiB resident afterwards

    def load_weight(self, tensor: TensorRef) -> ExactWeight:
        kernel = MATMULS.get(tensor.ggml_type)
        if kernel is None:
            raise UnsupportedError(
                f"device='cpu-exact' has no llama.cpp-exact matmul for {tensor.ggml_type.name} weights "
                f"({tensor.name}); exact types: {', '.join(sorted(t.name for t in MATMULS))}. Use device='cpu'.")
        prepared = kernel.prepare(tensor.raw)
        if not kernel.in_place:  # the kernel reads its own copy: the file's pages are not needed again
            release_pages(tensor.raw)
        return ExactWeight(tensor.raw, prepared, tensor.ggml_type, tuple(tensor.shape))

    def load_weight_group(self, tensors: list[TensorRef]) -> list[ExactWeight]:
        """q/k/v (gate/up) of one type are prepared as one weight: a step multiplies them in one call, large
        enough to split over the cores. Each output row is computed alone, so its bits do not change."""
        # kernels chosen by row count (Q4_0 repacked from 8, tinyBLAS from 4) must see each weight's own rows
        if len({t.ggml_type for t in tensors}) > 1 or any(t.shape[0] % 8 for t in tensors):
            return [self.load_weight(t) for t in tensors]
        raw = np.concatenate([t.raw for t in tensors])
        raw.flags.writeable = False  # as the file's own blocks: the in-place kernels compile one signature, not two
        stacked = TensorRef("+".join(t.name for t in tensors), tensors[0].ggml_type,
                            (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), raw,
                            sum(t.n_bytes for t in tensors))
        group = self.load_weight(stacked)
        for t in tensors:
            release_pages(t.raw)
        bounds = np.cumsum([0] + [t.shape[0] for t in tensors])
        kernel = MATMULS[tensors[0].ggml_type]
        return [ExactWeight(t.raw, group.prepared, t.ggml_type, tuple(t.shape), slice(start, stop),
                            ExactWeight(t.raw, kernel.prepare(raw[start:stop]), t.ggml_type, tuple(t.shape))
                            if kernel.in_place else None)
                for t, start, stop in zip(tensors, bounds[:-1], bounds[1:])]

    def load_embedding(self, tensor: TensorRef, tied: bool) -> ExactWeight | TensorRef:
        return self.load_weight(tensor) if tied else tensor

    def embedding(self, table: ExactWeight | TensorRef, tokens: np.ndarray) -> np.ndarray:
        # ggml's get_rows dequantizes a row as d * q in float32, which is what gguf's dequantize computes
        return quantized_embedding(table.raw, table.ggml_type, tokens)

    def matmul(self, x: np.ndarray, weight: ExactWeight) -> np.ndarray:
        if weight.rows is None:
            return self._multiply(x, weight)
        if weight.alone is not None and x.shape[0] >= ALONE_FROM_ROWS:
            # a prefill's product is large enough to split over the cores by itself, and the group's product plus
            # a copy of each weight's columns were the largest arrays of a prefill (gate/up: 12 MiB at 512 rows)
            return self._multiply(x, weight.alone)
        last = self._last_group
        if last is None or last[0]() is not x or last[1][0] is not weight.prepared:
            last = self._remember("_last_group", x, (weight.prepared, self._multiply(x, weight)))
        product = last[1][1]
        if weight.rows.stop == product.shape[1]:  # the group's last weight: nothing will ask for the product again
            self._last_group = None
        return np.ascontiguousarray(product[:, weight.rows])

    def _multiply(self, x: np.ndarray, weight: ExactWeight) -> np.ndarray:
        kernel = MATMULS[weight.ggml_type]
        if x.shape[0] <= UBATCH:
            return kernel.multiply(self._quantized(x, kernel.quantize), weight.prepared)
        # a kernel may depend on how many rows llama.cpp multiplies at once (K-quants: tiled from 8 rows on)
        return np.concatenate([kernel.multiply(kernel.quantize(np.ascontiguousarray(x[start:start + UBATCH])),
                                               weight.prepared) for start in range(0, x.shape[0], UBATCH)])

    def _quantized(self, x: np.ndarray, quantize: Any) -> Any:
        # q/k/v (and gate/up) read the same x: round it once per activation format
        last = self._last_quantized
        if last is not None and last[0]() is x and last[1][0] == quantize:
            return last[1][1]
        result = quantize(np.ascontiguousarray(x, dtype=np.float32))
        return self._remember("_last_quantized", x, (quantize, result))[1][1]

    def _remember(self, slot: str, x: np.ndarray, value: tuple) -> tuple:
        """Keep ``value`` (made from activation ``x``) in ``slot`` while ``x`` lives, for the next op that reads the
        same ``x``; once the forward lets go of ``x`` the value goes too (they held 15 MiB after a 512-token
        SmolLM2 prefill)."""
        key = object()  # what the finalizer holds: the entry itself would keep ``value`` alive as long as ``x``
        entry = (weakref.ref(x), value, key)
        setattr(self, slot, entry)
        weakref.finalize(x, self._forget, slot, key)
        return entry

    def _forget(self, slot: str, key: object) -> None:
        entry = getattr(self, slot)
        if entry is not None and entry[2] is key:
            setattr(self, slot, None)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return rms_norm(x, weight, eps)

    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float, neox: bool, n_rot: int,
             freq_factors: np.ndarray | None = None, freq_scale: float = 1.0) -> np.ndarray:
        return rotate(x, self.rope_cos_sin(positions, theta, n_rot, freq_factors, freq_scale), neox, n_rot)

    def rope_cos_sin(self, positions: np.ndarray, theta: float, n_rot: int, freq_factors: np.ndarray | None,
                     freq_scale: float) -> np.ndarray:
        """ggml's cos/sin table for ``positions`` (``exact.rope.rope_table``), made once per batch."""
        return self.per_batch(positions, (theta, n_rot, id(freq_factors), freq_scale),
                               lambda: rope_table(positions, theta, n_rot, freq_factors, freq_scale))

    def fused_block(self, family: str, ctx: Any, layer: int, resid: np.ndarray, batch: Batch) -> np.ndarray | None:
        """A one-token decode step's block as a few numba calls (``backends.exact_decode``), the same bits as the
        op-by-op forward; None for anything else."""
        if not self._decode.supports(family, ctx.cfg, batch):
            return None
        return self._decode.run(self, family, ctx, layer, resid, batch)

    def kqv_batch_rows(self, ubatch_rows: int) -> int:
        """The query rows of the llama.cpp ubatch whose kqv order a row follows: with one, ``ggml_vec_dot_f32``'s;
        from two on, tinyBLAS's."""
        return ubatch_rows

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return swiglu(gate, up)

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return geglu(gate, up)

    def attention(self, q: np.ndarray, cache: KVCache, layer: int, batch: Batch, scale: float,
                  window: int | None, softcap: float | None) -> np.ndarray:
        refuse_softcap(softcap)
        n = q.shape[0]
        z = np.empty(q.shape[:2] + (cache.v[layer].shape[-1],), dtype=np.float32)
        for seg in batch.segments:
            keys, values = cache.k[layer][seg.key_slots], cache.v[layer][seg.key_slots]
            # each query row is computed as in its llama.cpp ubatch, whose row count picks the kqv kernel
            cuts = [seg.rows.start, *range((seg.rows.start // UBATCH + 1) * UBATCH, seg.rows.stop, UBATCH),
                    seg.rows.stop]
            for start, stop in zip(cuts, cuts[1:]):
                ubatch_rows = min(UBATCH, n - start // UBATCH * UBATCH)
                positions = seg.positions[start - seg.rows.start:stop - seg.rows.start]
                z[start:stop] = exact_attention.attention(q[start:stop], keys, values, positions, scale, window,
                                                          batch_rows=self.kqv_batch_rows(ubatch_rows))
        return z

    def attention_scores(self, q: np.ndarray, cache: KVCache, layer: int, segment: Segment, scale: float,
                         window: int | None, softcap: float | None) -> np.ndarray:
        refuse_softcap(softcap)
        return exact_attention.attention_scores(q, cache.k[layer][segment.key_slots], segment.positions, scale,
                                                window)

    def softmax(self, x: np.ndarray) -> np.ndarray:
        return exact_attention.attention_softmax(x)

    def attention_mix(self, pattern: np.ndarray, cache: KVCache, layer: int, segment: Segment) -> np.ndarray:
        return exact_attention.attention_mix(pattern, cache.v[layer][segment.key_slots], batch_rows=pattern.shape[1])


def release_pages(raw: np.ndarray) -> None:
    """Drop the memory-mapped file pages under ``raw`` from this process (``madvise(MADV_DONTNEED)``: a read-only
    file mapping just forgets them; a later read faults them back in). Called once a weight is prepared, so the
    file and the kernels' copy are never resident together: Gemma's peak RSS 1206 -> ~500 MiB."""
    owner = raw
    while owner is not None and not isinstance(owner, mmap.mmap):
        owner = getattr(owner, "base", None)
    if owner is None:  # not a file mapping (a test's array, a stacked copy): MADV_DONTNEED would zero it
        return
    page = mmap.PAGESIZE
    # only the pages wholly inside: one shared with a neighbour the forward reads (a norm vector, a weight read in
    # place) would be faulted back, and the kernel maps up to 64 KiB of cached pages around each fault
    start = -(-raw.ctypes.data // page) * page
    stop = (raw.ctypes.data + raw.nbytes) // page * page
    if stop > start:
        drop_file_pages(start, stop)


def coverage(gguf: Any) -> tuple[bool, str]:
    """(True, why) when this backend runs every matrix and attention of ``gguf`` (a ``GGUFFile``); else (False, what
    it lacks). ``device="auto"`` without a GPU asks this before choosing cpu-exact over numpy."""
    missing = unsupported_types(gguf)
    if missing:
        return False, f"cpu-exact has no exact matmul for {', '.join(missing)}"
    if gguf.config.attn_logit_softcap:
        return False, "cpu-exact has no exact attention logit soft-capping"
    types = sorted({ref.ggml_type.name for ref in gguf.tensors.values() if len(ref.shape) > 1})
    return True, f"cpu-exact covers every weight type ({', '.join(types)})"


def refuse_softcap(softcap: float | None) -> None:
    """UnsupportedError when attention logit soft-capping is asked for: cpu-exact has no kernel for it."""
    if softcap is not None:
        raise UnsupportedError("device='cpu-exact' has no exact attention logit soft-capping; use device='cpu'")
