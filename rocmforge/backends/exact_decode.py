"""cpu-exact's fused decode block: one token of one sequence through a whole block in ~9 numba calls (the four matmul
groups and the fused steps between them, ``rocmforge.exact.decode_steps``) instead of ~60 Python-level ops. Used
only when no hook is registered (``ExactCpuBackend.fused_block``); the numbers are the op-by-op forward's, bit for
bit (every step calls the same kernel with the same arguments), which ``tests/test_exact_decode.py`` checks.

What the block computes is what ``rocmforge.arch.llama.block`` and ``rocmforge.arch.gemma3.block`` say; ``FAMILIES``
holds the few per-family settings (rope base and window per layer, post-norms, the GLU). The matmuls skip the
per-call wrappers: for the in-place lane types (Q4_1, Q8_0, Q5_0) the preceding step rounds the activations and
the lane kernel is called directly (``RowMatmul``); other types round and multiply through their
``dot.MATMULS`` entry as the op-by-op path does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T

from rocmforge.exact import dot_q4_1, dot_q5_0, dot_q8_0
from rocmforge.exact.decode_steps import attention_step, glu_step, norm_step, residual_step
from rocmforge.exact.dot import MATMULS
from rocmforge.exact.dot_q8_0 import lane_corrections
from rocmforge.exact.geglu import gelu_table
from rocmforge.exact.lanes import Q5_0_BLOCK, Q8_0_BLOCK, interleave4
from rocmforge.exact.threads import split_rows
from rocmforge.kv_cache import Batch

_EMPTY = np.empty(0, dtype=np.float32)
# read-only like the norm weights it stands in for (views of the read-only file): one compiled signature of each
# step, not one per mix of absent and present norms (each loaded kernel costs memory)
_EMPTY.flags.writeable = False


class _Lane(NamedTuple):
    kernel: Any
    driver: Any
    offset: int          # the unsigned weight byte is the weight + offset (``lanes.BlockLayout``)
    minimums: bool       # Q4_1: the kernel takes the activation block sums ``s`` (q8_1), not corrections


# the in-place lane kernels, called directly with one activation row (their wrappers' arguments, built once)
LANES = {
    T.Q4_1: _Lane(dot_q4_1._matmul, dot_q4_1._matmul_parallel, 0, True),
    T.Q8_0: _Lane(dot_q8_0._matmul, dot_q8_0._matmul_parallel, Q8_0_BLOCK.offset, False),
    T.Q5_0: _Lane(dot_q5_0._matmul, dot_q5_0._matmul_parallel, Q5_0_BLOCK.offset, False),
}


class RowInput(NamedTuple):
    """One activation row ``x`` ``[1, k]`` and its q8 rounding (``qs``, ``d``, ``s``, ``corr`` for ``offset``; -1:
    not rounded, every array but ``x`` empty)."""

    x: np.ndarray
    qs: np.ndarray
    d: np.ndarray
    s: np.ndarray
    corr: np.ndarray
    offset: int


def row_input(k: int, offset: int) -> RowInput:
    """Fresh buffers for a row of ``k`` values rounded for ``offset`` (``RowMatmul.offset``)."""
    nb = k // 32 if offset >= 0 else 0
    return RowInput(np.empty((1, k), np.float32), np.empty((1, nb, 32), np.int8), np.empty((1, nb), np.float32),
                    np.empty((1, nb), np.float32), np.empty(nb * 8 if offset > 0 else 0, np.int32), offset)


class RowMatmul:
    """One activation row times a prepared weight (a group's, when several weights share it) -> ``[1, out]``."""

    def __init__(self, ggml_type: T, prepared: Any, n_in: int):
        self.ggml_type, self.prepared, self.n_in = ggml_type, prepared, n_in
        self.lane = LANES.get(ggml_type)
        self.offset = -1 if self.lane is None else self.lane.offset
        if self.lane is not None:
            self.n_out = prepared.n_out
            nb = n_in // 32  # decode's interleave4 layouts: the shared empty ones
            self._interleaved = tuple(interleave4(np.empty(shape, dtype)) for shape, dtype in
                                      (((1, nb, 32), np.int8), ((1, nb), np.float32), ((1, nb, 8), np.int32)))

    def __call__(self, row: RowInput) -> np.ndarray:
        if self.lane is None:
            matmul = MATMULS[self.ggml_type]
            return matmul.multiply(matmul.quantize(row.x), self.prepared)
        xi, xdi, corri = self._interleaved
        out = np.empty((1, self.n_out), dtype=np.float32)
        if self.lane.minimums:
            args = (self.prepared.raw, row.qs, row.d, row.s.T, xi, xdi, corri, out)
        else:
            corr = row.corr if row.offset == self.offset else lane_corrections(row.qs, self.offset)
            args = (self.prepared.raw, row.qs, row.d, corr, xi, xdi, corri, out)
        split_rows(self.lane.driver, self.lane.kernel, args, self.n_out, work=self.n_in * self.n_out)
        return out


@dataclass(frozen=True)
class Family:
    """What differs between the forwards of ``rocmforge.arch`` inside a block."""

    per_layer_rope: bool   # Gemma 3: local layers rotate with ``rope_base_local`` and attend within a window
    post_norms: bool       # Gemma 3: RMSNorm on each sublayer's output before the residual add
    neox: bool | None      # the rope layout, or None: the file's (``cfg.rope_neox``)


FAMILIES = {"llama": Family(per_layer_rope=False, post_norms=False, neox=None),
            "gemma3": Family(per_layer_rope=True, post_norms=True, neox=True)}


class _Group(NamedTuple):
    """Weights that multiply one input: its distinct products (one for a prepared group) and, per weight, which
    product and columns are its output."""

    products: tuple[RowMatmul, ...]
    outputs: tuple[tuple[int, slice | None], ...]
    offset: int  # how the input is rounded: for the first lane kernel (others form their own corrections)

    def __call__(self, row: RowInput) -> list[np.ndarray]:
        full = [product(row) for product in self.products]
        return [full[i] if rows is None else full[i][:, rows] for i, rows in self.outputs]


class _Layer(NamedTuple):
    """What one block's decode step reads that does not change between steps."""

    qkv: _Group
    attn_output: _Group
    gate_up: _Group
    down: _Group
    norms: tuple[np.ndarray, ...]  # attn_norm, q_norm, k_norm, post_attention_norm, ffn_norm, post_ffw_norm
    rope: tuple[float, Any, float]  # theta, freq_factors, freq_scale
    window: int                     # 0: the whole sequence
    step_key: tuple                 # what a step's rope table and key range depend on (``CpuBackend.per_batch``)
    neox: bool
    gelu: np.ndarray                # GeGLU's fp16 table; empty: SwiGLU
    made_for: tuple[Any, Any]       # (the config, the block's weights) it was made from: another is a new plan


class DecodeBlocks:
    """The fused decode block of one model's backend: per layer, its ``RowMatmul``s and settings (built at the
    first step)."""

    def __init__(self) -> None:
        self._layers: dict[int, _Layer] = {}

    def supports(self, family: str, cfg: Any, batch: Batch) -> bool:
        """One token of one sequence, a family with a fused form, no QKV bias or soft-capping (cpu-exact's
        op-by-op path refuses soft-capping with its own error)."""
        return (batch.n_tokens == 1 and family in FAMILIES and not cfg.qkv_bias and not cfg.attn_logit_softcap
                and not cfg.final_logit_softcap)

    def run(self, backend: Any, family: str, ctx: Any, layer: int, resid: np.ndarray, batch: Batch) -> np.ndarray:
        """Block ``layer`` of ``family`` on the residual ``[1, d_model]`` of a one-token ``batch``."""
        cfg, w = ctx.cfg, ctx.weights.blocks[layer]
        plan = self._layers.get(layer)
        if plan is None or plan.made_for[0] is not cfg or plan.made_for[1] is not w:
            plan = self._layers[layer] = _plan(w, cfg, FAMILIES[family], layer, ctx.weights.rope_freqs)
        eps = np.float32(cfg.norm_eps)
        attn_norm, q_norm, k_norm, post_attention_norm, ffn_norm, post_ffw_norm = plan.norms
        n_heads, n_kv, d_head, d_v = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim_v

        x = row_input(resid.shape[1], plan.qkv.offset)
        norm_step(resid, attn_norm, eps, *x)
        q, k, v = plan.qkv(x)

        cos_sin, first, last = backend.per_batch(batch.positions, plan.step_key,
                                                 lambda: _positions(backend, batch, plan, cfg.rope_dims))
        seg = batch.segments[0]
        z = row_input(n_heads * d_v, plan.attn_output.offset)
        attention_step(q.reshape(1, n_heads, d_head), k.reshape(1, n_kv, d_head), v.reshape(1, n_kv, d_v), q_norm,
                       k_norm, eps, cos_sin, plan.neox, cfg.rope_dims, ctx.kv.k[layer], ctx.kv.v[layer],
                       batch.slots[0], seg.key_slots, first, last, np.float32(cfg.attention_scale),
                       backend.kqv_batch_rows(1) >= 2, z.x.reshape(1, n_heads, d_v), *z[1:])
        (attn_out,) = plan.attn_output(z)

        resid_mid = np.empty_like(resid)
        h = row_input(resid.shape[1], plan.gate_up.offset)
        residual_step(resid, attn_out, post_attention_norm, ffn_norm, eps, resid_mid, *h)
        gate, up = plan.gate_up(h)
        act = row_input(gate.shape[1], plan.down.offset)
        glu_step(gate, up, plan.gelu, *act)
        (mlp_out,) = plan.down(act)

        resid_post = np.empty_like(resid)
        residual_step(resid_mid, mlp_out, post_ffw_norm, _EMPTY, eps, resid_post, *_NO_INPUT)
        return resid_post


_NO_INPUT = RowInput(np.empty((1, 0), np.float32), *row_input(0, -1)[1:])


def _positions(backend: Any, batch: Batch, plan: _Layer, n_rot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A step's rope table and the keys its query reads (``first``..``last``, as ``exact.attention.attention``)."""
    position, n_keys = int(batch.positions[0]), len(batch.segments[0].key_slots)
    first = max(position - plan.window + 1, 0) if plan.window else 0
    return (backend.rope_cos_sin(batch.positions, plan.rope[0], n_rot, plan.rope[1], plan.rope[2]),
            np.array([first], dtype=np.int64), np.array([min(position + 1, n_keys)], dtype=np.int64))


def _plan(w: dict, cfg: Any, fam: Family, layer: int, rope_freqs: Any) -> _Layer:
    by_prepared: dict[int, RowMatmul] = {}

    def group(*names: str) -> _Group:
        products: list[RowMatmul] = []
        outputs = []
        for name in names:
            weight = w[name]
            product = by_prepared.get(id(weight.prepared))
            if product is None:
                product = by_prepared[id(weight.prepared)] = RowMatmul(weight.ggml_type, weight.prepared,
                                                                        weight.shape[1])
            if product not in products:
                products.append(product)
            outputs.append((products.index(product), weight.rows))
        offset = next((p.offset for p in products if p.offset >= 0), -1)
        return _Group(tuple(products), tuple(outputs), offset)

    # as arch.llama / arch.gemma3 set them up
    sliding = fam.per_layer_rope and cfg.is_sliding(layer)
    theta = cfg.rope_base_for(layer) if fam.per_layer_rope else cfg.rope_base
    freq_scale = 1.0 / cfg.rope_scale_factor if (cfg.rope_scaling == "linear" and not sliding) else 1.0
    qk_norms = (w["attn_q_norm"], w["attn_k_norm"]) if cfg.qk_norm else (_EMPTY, _EMPTY)
    post_norms = (w["post_attention_norm"], w["post_ffw_norm"]) if fam.post_norms else (_EMPTY, _EMPTY)
    freq_factors = None if fam.per_layer_rope else rope_freqs
    window = cfg.sliding_window if sliding else 0
    return _Layer(group("attn_q", "attn_k", "attn_v"), group("attn_output"), group("ffn_gate", "ffn_up"),
                  group("ffn_down"), (w["attn_norm"], *qk_norms, post_norms[0], w["ffn_norm"], post_norms[1]),
                  (theta, freq_factors, freq_scale), window, ("decode", theta, id(freq_factors), freq_scale, window),
                  cfg.rope_neox if fam.neox is None else fam.neox,
                  gelu_table() if cfg.ffn_activation == "gelu_tanh" else _EMPTY, (cfg, w))
