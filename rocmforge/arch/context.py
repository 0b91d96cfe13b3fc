"""What every architecture's forward needs (``ForwardContext``) and the attention step they share (``attend``).

``ctx.hooks`` is any callable ``(name, x) -> x`` with ``.active`` (False when nothing is registered, so the
forward never pays for hooks it does not have) and ``.wants(name)``; ``rocmforge.hooks.Hooks`` is the real one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rocmforge.config import ModelConfig
from rocmforge.hooks import Hooks
from rocmforge.kv_cache import Batch, KVCache
from rocmforge.weights import Weights


@dataclass
class ForwardContext:
    cfg: ModelConfig
    weights: Weights
    ops: Any                 # a rocmforge.backends.base.Backend
    kv: KVCache
    hooks: Any = field(default_factory=Hooks)


def attend(ctx: ForwardContext, layer: int, q: Any, k: Any, v: Any, batch: Batch,
           window: int | None, softcap: float | None) -> Any:
    """Store this batch's keys/values in the cache, then attend: ``q`` ``[n, head, d]`` -> ``z`` ``[n, head, d_v]``.

    The scores and pattern (``[head, q_pos, k_pos]``, one sequence at a time) are materialized only when a hook
    wants them; otherwise the backend's fused attention runs.
    """
    ops, hooks, prefix = ctx.ops, ctx.hooks, f"blocks.{layer}.attn"
    ops.kv_write(ctx.kv, layer, batch, k, v)
    scale = ctx.cfg.attention_scale
    if not (hooks.active and (hooks.wants(f"{prefix}.hook_attn_scores") or hooks.wants(f"{prefix}.hook_pattern"))):
        return ops.attention(q, ctx.kv, layer, batch, scale, window, softcap)
    parts = []
    for seg in batch.segments:
        scores = hooks(f"{prefix}.hook_attn_scores",
                       ops.attention_scores(ops.take_rows(q, seg.rows), ctx.kv, layer, seg, scale, window, softcap))
        pattern = hooks(f"{prefix}.hook_pattern", ops.softmax(scores))
        parts.append(ops.attention_mix(pattern, ctx.kv, layer, seg))
    return parts[0] if len(parts) == 1 else ops.concat_rows(parts)
