"""The Gemma 3 forward (Gemma Team, 2025).

Differences from llama, each visible below:
- embeddings are multiplied by sqrt(d_model);
- RMSNorm both before and after each sublayer ("sandwich" norms: ``post_attention_norm``, ``post_ffw_norm``);
- QK-norm: RMSNorm on each query and key head before RoPE (NeoX layout);
- five sliding-window layers (rope base 10,000, window ``cfg.sliding_window``) per global layer (rope base
  ``cfg.rope_base``, full context);
- GeGLU feed-forward (tanh-approximated GELU); optional final logit soft-capping.
GGUF norm weights already include Gemma's "+1", so they are used as stored (as llama.cpp does).

Hook names and shapes are the same as in ``rocmforge.arch.llama``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rocmforge.arch.context import ForwardContext, attend
from rocmforge.kv_cache import Batch


def embed(ctx: ForwardContext, tokens: np.ndarray) -> Any:
    """Token ids ``[n]`` -> residual stream ``[n, d_model]``, scaled by sqrt(d_model)."""
    x = ctx.ops.scale(ctx.ops.embedding(ctx.weights.token_embd, tokens), ctx.cfg.embedding_scale)
    return ctx.hooks("hook_embed", x)


def block(ctx: ForwardContext, layer: int, resid: Any, batch: Batch) -> Any:
    """One Gemma 3 block on the residual stream ``[n, d_model]`` of ``batch``."""
    hooks = ctx.hooks
    if not hooks.active:  # nothing to look at inside: the backend may run the whole block fused (same numbers)
        fused = ctx.ops.fused_block("gemma3", ctx, layer, resid, batch)
        if fused is not None:
            return fused
    p = f"blocks.{layer}"
    resid = hooks(f"{p}.hook_resid_pre", resid)
    resid = hooks(f"{p}.hook_resid_mid", ctx.ops.add(resid, attn(ctx, layer, resid, batch)))
    return hooks(f"{p}.hook_resid_post", ctx.ops.add(resid, mlp(ctx, layer, resid)))


def attn(ctx: ForwardContext, layer: int, resid: Any, batch: Batch) -> Any:
    """The attention sublayer, with QK-norm and the layer's own rope base and window: residual stream
    ``[n, d_model]`` -> ``hook_attn_out`` (post-norm applied). Its own function so that its intermediates are freed
    before the MLP runs."""
    cfg, ops, hooks, w = ctx.cfg, ctx.ops, ctx.hooks, ctx.weights.blocks[layer]
    p, n, eps = f"blocks.{layer}", resid.shape[0], cfg.norm_eps
    sliding = cfg.is_sliding(layer)
    x = hooks(f"{p}.ln1.hook_normalized", ops.rms_norm(resid, w["attn_norm"], eps))
    q = hooks(f"{p}.attn.hook_q", ops.matmul(x, w["attn_q"]).reshape(n, cfg.n_heads, cfg.head_dim))
    k = hooks(f"{p}.attn.hook_k", ops.matmul(x, w["attn_k"]).reshape(n, cfg.n_kv_heads, cfg.head_dim))
    v = hooks(f"{p}.attn.hook_v", ops.matmul(x, w["attn_v"]).reshape(n, cfg.n_kv_heads, cfg.head_dim_v))
    q, k = ops.rms_norm(q, w["attn_q_norm"], eps), ops.rms_norm(k, w["attn_k_norm"], eps)
    theta = cfg.rope_base_for(layer)
    freq_scale = 1.0 / cfg.rope_scale_factor if (cfg.rope_scaling == "linear" and not sliding) else 1.0
    q = hooks(f"{p}.attn.hook_rot_q", ops.rope(q, batch.positions, theta, True, cfg.rope_dims, None, freq_scale))
    k = hooks(f"{p}.attn.hook_rot_k", ops.rope(k, batch.positions, theta, True, cfg.rope_dims, None, freq_scale))
    window = cfg.sliding_window if sliding else None
    softcap = cfg.attn_logit_softcap or None
    z = hooks(f"{p}.attn.hook_z", attend(ctx, layer, q, k, v, batch, window, softcap))
    attn_out = ops.matmul(z.reshape(n, cfg.n_heads * cfg.head_dim_v), w["attn_output"])
    return hooks(f"{p}.hook_attn_out", ops.rms_norm(attn_out, w["post_attention_norm"], eps))


def mlp(ctx: ForwardContext, layer: int, resid: Any) -> Any:
    """The GeGLU feed-forward sublayer: residual stream ``[n, d_model]`` -> ``hook_mlp_out`` (post-norm applied).
    The gate is not kept past the GLU (a prefill's largest activations: ``[n, d_ff]``)."""
    cfg, ops, hooks, w = ctx.cfg, ctx.ops, ctx.hooks, ctx.weights.blocks[layer]
    p, eps = f"blocks.{layer}", cfg.norm_eps
    x = hooks(f"{p}.ln2.hook_normalized", ops.rms_norm(resid, w["ffn_norm"], eps))
    act = hooks(f"{p}.mlp.hook_post", ops.geglu(hooks(f"{p}.mlp.hook_pre", ops.matmul(x, w["ffn_gate"])),
                                                ops.matmul(x, w["ffn_up"])))
    mlp_out = ops.rms_norm(ops.matmul(act, w["ffn_down"]), w["post_ffw_norm"], eps)
    return hooks(f"{p}.hook_mlp_out", mlp_out)


def unembed(ctx: ForwardContext, resid: Any) -> Any:
    """Residual stream ``[n, d_model]`` -> logits ``[n, vocab]`` through the tied embedding."""
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
