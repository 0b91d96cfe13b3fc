"""The llama family forward: Llama 2/3, Mistral, SmolLM2, Qwen2 (QKV bias), Qwen3 (QK-norm).

Pre-norm decoder (Touvron et al., 2023), per block:
    x = x + W_o · attention(rope(W_q · rms(x)), rope(W_k · rms(x)), W_v · rms(x))
    x = x + W_down · (silu(W_gate · rms(x)) * W_up · rms(x))
then logits = W_out · rms(x). Attention uses grouped-query heads and the paged KV cache (``ctx.kv``).

Every intermediate goes through ``ctx.hooks(name, x)`` under its TransformerLens name; shapes are
``[pos, d_model]`` for the residual stream and ``[pos, head, d_head]`` for q/k/v/z.

>>> from rocmforge import load
>>> model = load("smollm2-135m")  # doctest: +SKIP
>>> model.forward(model.tokenize("The capital of France is")).shape  # doctest: +SKIP
(5, 49152)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rocmforge.arch.context import ForwardContext, attend
from rocmforge.kv_cache import Batch


def embed(ctx: ForwardContext, tokens: np.ndarray) -> Any:
    """Token ids ``[n]`` -> residual stream ``[n, d_model]``."""
    return ctx.hooks("hook_embed", ctx.ops.embedding(ctx.weights.token_embd, tokens))


def block(ctx: ForwardContext, layer: int, resid: Any, batch: Batch) -> Any:
    """One transformer block on the residual stream ``[n, d_model]`` of ``batch``."""
    hooks = ctx.hooks
    if not hooks.active:  # nothing to look at inside: the backend may run the whole block fused (same numbers)
        fused = ctx.ops.fused_block("llama", ctx, layer, resid, batch)
        if fused is not None:
            return fused
    p = f"blocks.{layer}"
    resid = hooks(f"{p}.hook_resid_pre", resid)
    resid = hooks(f"{p}.hook_resid_mid", ctx.ops.add(resid, attn(ctx, layer, resid, batch)))
    return hooks(f"{p}.hook_resid_post", ctx.ops.add(resid, mlp(ctx, layer, resid)))


def attn(ctx: ForwardContext, layer: int, resid: Any, batch: Batch) -> Any:
    """The attention sublayer: residual stream ``[n, d_model]`` -> ``hook_attn_out``. Its own function so that its
    intermediates are freed before the MLP runs (they were 8 MiB of a 512-token prefill's peak)."""
    cfg, ops, hooks, w = ctx.cfg, ctx.ops, ctx.hooks, ctx.weights.blocks[layer]
    p, n = f"blocks.{layer}", resid.shape[0]
    x = hooks(f"{p}.ln1.hook_normalized", ops.rms_norm(resid, w["attn_norm"], cfg.norm_eps))
    q, k, v = ops.matmul(x, w["attn_q"]), ops.matmul(x, w["attn_k"]), ops.matmul(x, w["attn_v"])
    if cfg.qkv_bias:
        q, k, v = ops.add(q, w["attn_q_bias"]), ops.add(k, w["attn_k_bias"]), ops.add(v, w["attn_v_bias"])
    q = hooks(f"{p}.attn.hook_q", q.reshape(n, cfg.n_heads, cfg.head_dim))
    k = hooks(f"{p}.attn.hook_k", k.reshape(n, cfg.n_kv_heads, cfg.head_dim))
    v = hooks(f"{p}.attn.hook_v", v.reshape(n, cfg.n_kv_heads, cfg.head_dim_v))
    if cfg.qk_norm:
        q, k = ops.rms_norm(q, w["attn_q_norm"], cfg.norm_eps), ops.rms_norm(k, w["attn_k_norm"], cfg.norm_eps)
    q = hooks(f"{p}.attn.hook_rot_q", _rope(ctx, q, batch))
    k = hooks(f"{p}.attn.hook_rot_k", _rope(ctx, k, batch))
    z = hooks(f"{p}.attn.hook_z", attend(ctx, layer, q, k, v, batch, window=None, softcap=None))
    return hooks(f"{p}.hook_attn_out", ops.matmul(z.reshape(n, cfg.n_heads * cfg.head_dim_v), w["attn_output"]))


def mlp(ctx: ForwardContext, layer: int, resid: Any) -> Any:
    """The SwiGLU feed-forward sublayer: residual stream ``[n, d_model]`` -> ``hook_mlp_out``. The gate is not
    kept past the GLU (a prefill's largest activations: ``[n, d_ff]``)."""
    cfg, ops, hooks, w = ctx.cfg, ctx.ops, ctx.hooks, ctx.weights.blocks[layer]
    p = f"blocks.{layer}"
    x = hooks(f"{p}.ln2.hook_normalized", ops.rms_norm(resid, w["ffn_norm"], cfg.norm_eps))
    act = hooks(f"{p}.mlp.hook_post", ops.swiglu(hooks(f"{p}.mlp.hook_pre", ops.matmul(x, w["ffn_gate"])),
                                                 ops.matmul(x, w["ffn_up"])))
    return hooks(f"{p}.hook_mlp_out", ops.matmul(act, w["ffn_down"]))


def unembed(ctx: ForwardContext, resid: Any) -> Any:
    """Residual stream ``[n, d_model]`` -> logits ``[n, vocab]``."""
    cfg, ops = ctx.cfg, ctx.ops
    x = ctx.hooks("ln_final.hook_normalized", ops.rms_norm(resid, ctx.weights.output_norm, cfg.norm_eps))
    logits = ops.matmul(x, ctx.weights.output)
    if cfg.final_logit_softcap:
        logits = ops.softcap(logits, cfg.final_logit_softcap)
    return ctx.hooks("hook_logits", logits)


def forward(ctx: ForwardContext, batch: Batch, rows: np.ndarray | None = None) -> Any:
    """Run ``batch`` through every layer; logits of ``rows`` only (all rows when None) -> ``[len(rows), vocab]``."""
    resid = embed(ctx, batch.tokens)
    for layer in range(ctx.cfg.n_layers):
        resid = block(ctx, layer, resid, batch)
    return unembed(ctx, resid if rows is None else ctx.ops.take_rows(resid, rows))


def _rope(ctx: ForwardContext, x: Any, batch: Batch) -> Any:
    cfg = ctx.cfg
    freq_scale = 1.0 / cfg.rope_scale_factor if cfg.rope_scaling == "linear" else 1.0
    return ctx.ops.rope(x, batch.positions, cfg.rope_base, cfg.rope_neox, cfg.rope_dims,
                        ctx.weights.rope_freqs, freq_scale)
