"""cpu-exact's fused decode block (``backends/exact_decode.py``) against the op-by-op forward it replaces: the same
logits bit for bit, step after step, on both real models, with sliding windows, with sequences whose cache slots are
not contiguous, and on the server's batch-invariant backend (tinyBLAS's kqv order). A registered hook (which
returns nothing, so changes nothing) is what sends the forward op by op. The other weight types' fused steps are
checked against llama.cpp itself by ``test_exact_types.py``'s tiny models (their decode logits, bit for bit).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import rocmforge
import rocmforge.backends.exact_decode as exact_decode
from rocmforge.server.batch_invariant import use_batch_invariant_backend

PROMPTS = ([1, 504, 3458, 282, 4649, 314], [1, 28, 5263, 2088, 30, 4021, 35, 260, 8190])


def _decode(model, prompts: list[list[int]], n_steps: int, op_by_op: bool) -> list[np.ndarray]:
    """Prefill each prompt as its own sequence, then ``n_steps`` greedy steps of each in turn (their blocks of
    cache slots interleave); every step's logits."""
    handle = model.ctx.hooks.add("blocks.0.hook_resid_pre", lambda act, hook: None) if op_by_op else None
    seqs = [model.kv.new_sequence() for _ in prompts]
    try:
        pending, out = [list(p) for p in prompts], []
        for _ in range(n_steps + 1):
            for i, seq in enumerate(seqs):
                batch = model.kv.prepare([(seq, pending[i])])
                logits = model.ops.to_host(model.arch.forward(model.ctx, batch, rows=batch.last_rows))[0].copy()
                out.append(logits)
                pending[i] = [int(np.argmax(logits))]
        return out
    finally:
        for seq in seqs:
            model.kv.free(seq)
        if handle is not None:
            handle.remove()


def _fused_equals_op_by_op(model, prompts, n_steps: int, monkeypatch) -> None:
    calls = []
    run = exact_decode.DecodeBlocks.run
    monkeypatch.setattr(exact_decode.DecodeBlocks, "run", lambda self, *a: calls.append(1) or run(self, *a))
    fused = _decode(model, prompts, n_steps, op_by_op=False)
    assert len(calls) == len(prompts) * n_steps * model.cfg.n_layers  # every decode step's blocks ran fused
    reference = _decode(model, prompts, n_steps, op_by_op=True)
    assert len(calls) == len(prompts) * n_steps * model.cfg.n_layers  # and none with the hook registered
    for step, (a, b) in enumerate(zip(fused, reference)):
        assert np.array_equal(a, b), f"step {step}: max difference {np.abs(a - b).max()}"


@pytest.mark.slow
def test_smollm2_fused_decode_is_the_op_by_op_forward(smollm2_path, monkeypatch):
    model = rocmforge.load(smollm2_path, device="cpu-exact", n_ctx=128)
    _fused_equals_op_by_op(model, PROMPTS, 20, monkeypatch)


@pytest.mark.slow
def test_gemma3_fused_decode_with_sliding_windows(gemma3_path, monkeypatch):
    """Gemma's local layers attend within a window: 6 positions here (512 in the file), so the decode steps cross
    it; its global layers, post-norms, QK-norm and GeGLU are in every step."""
    model = rocmforge.load(gemma3_path, device="cpu-exact", n_ctx=128)
    model.ctx.cfg = dataclasses.replace(model.cfg, sliding_window=6)
    _fused_equals_op_by_op(model, PROMPTS, 8, monkeypatch)


@pytest.mark.slow
def test_batch_invariant_backend_fuses_with_tinyblas_order(smollm2_path, monkeypatch):
    """The server's backend takes tinyBLAS's kqv order for every row: its fused steps must too."""
    model = rocmforge.load(smollm2_path, device="cpu-exact", n_ctx=128)
    assert use_batch_invariant_backend(model)
    _fused_equals_op_by_op(model, PROMPTS[:1], 6, monkeypatch)
