"""One forward per architecture family: ``llama`` (llama, mistral, qwen2, qwen3) and ``gemma3``.

Each module exposes ``embed(ctx, tokens)``, ``block(ctx, layer, resid, batch)``, ``unembed(ctx, resid)`` and
``forward(ctx, batch, rows=None)`` composing them; ``rocmforge.arch.context`` holds what they share.
"""
