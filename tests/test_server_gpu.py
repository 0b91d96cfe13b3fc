"""The scheduler on a GPU backend: plain decode rows go through the replayed batched graph with sampling on the
device (``Scheduler._decode_on_device``), everything else through ``forward`` in the same tick. Six concurrent
requests get the texts they get alone (greedy and seeded), rows with logprobs or a grammar still work beside
them, and the graph is captured once per batch-size bucket. Runs on a GPU, else on HIP-CPU
(``tests/gpu_runtimes.py``) with a tiny model; skipped with the reason otherwise."""
from __future__ import annotations

import re

import pytest
from gguf import GGMLQuantizationType as Q

from rocmforge.constraints import Constraint, Grammar
from rocmforge.model import load
from rocmforge.sampler import SamplingParams
from rocmforge.server.scheduler import Failed, Finished, GenerationRequest, Scheduler, TextPiece
from tests.gpu_runtimes import gpu_device
from tests.tiny_gguf import write_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    device = gpu_device()
    path = write_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", d_model=256, n_heads=4, n_kv_heads=2,
                       d_ff=512, vocab=1000, n_layers=3, weight_type=Q.Q4_1, seed=5, tokenizer=True)
    return load(path, device=device, n_ctx=128, n_parallel=12)


def run(scheduler: Scheduler, prompts: list[list[int]], params: list[SamplingParams], max_tokens: int = 5,
        **request_options) -> list[tuple[list[str], object]]:
    """Submit every request at once; returns each one's text pieces and its last event."""
    events: list[list] = [[] for _ in prompts]
    requests = [GenerationRequest(p, sp, max_tokens, events[i].append, **request_options)
                for i, (p, sp) in enumerate(zip(prompts, params))]
    for request in requests:
        scheduler.submit(request)
    for request in requests:
        assert request.done.wait(600)
    return [([e.text for e in ev if isinstance(e, TextPiece)], ev[-1]) for ev in events]


def test_concurrent_decode_on_the_device_equals_each_request_alone(model, monkeypatch):
    ops = model.ops
    calls: list[int] = []
    original = ops.graph_step_batch

    def counting(batch, *args, **kwargs):
        calls.append(len(batch.segments))
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(ops, "graph_step_batch", counting)
    prompts = [[1] + [20 + 37 * i + j for j in range(3 + 9 * i)] for i in range(6)]
    params = [SamplingParams(temperature=0) if i % 2 == 0 else
              SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=i) for i in range(6)]
    scheduler = Scheduler(model, max_batch=6, chunk_size=16, prefill_budget=64)
    scheduler.start()
    try:
        alone = [run(scheduler, [p], [sp])[0] for p, sp in zip(prompts, params)]
        solo_calls = len(calls)
        together = run(scheduler, prompts, params)
    finally:
        scheduler.stop()
    assert solo_calls > 0 and max(calls[solo_calls:]) > 1  # the device graph ran, and with several rows
    for (text, last), (text_alone, last_alone) in zip(together, alone):
        assert isinstance(last, Finished) and isinstance(last_alone, Finished)
        assert "".join(text) == "".join(text_alone) and last.completion_tokens == last_alone.completion_tokens


def test_logprob_and_grammar_rows_run_beside_device_rows(model, monkeypatch):
    masked: list[int] = []  # rows of the device steps that carried grammar masks
    original = model.ops.graph_step_batch

    def recording(batch, forward, cache, rows, masks=None):
        if masks is not None:
            masked.append(len(batch.segments))
        return original(batch, forward, cache, rows, masks)

    monkeypatch.setattr(model.ops, "graph_step_batch", recording)
    scheduler = Scheduler(model, max_batch=6, chunk_size=16)
    scheduler.start()
    try:
        plain = run(scheduler, [[1, 40, 41, 42]] * 3, [SamplingParams(temperature=0)] * 3)
        events: list = []
        scored = GenerationRequest([1, 40, 41, 42], SamplingParams(temperature=0), 5, events.append, logprobs=2)
        grammar: list = []
        constraint = Constraint(model.tokenizer, Grammar.regex("[a-z]{1,12}"))
        constrained = GenerationRequest([1, 50, 51], SamplingParams(temperature=0), 5, grammar.append,
                                        constraint=constraint)
        for request in (scored, constrained):
            scheduler.submit(request)
        mixed = run(scheduler, [[1, 40, 41, 42]] * 3, [SamplingParams(temperature=0)] * 3)
        assert scored.done.wait(600) and constrained.done.wait(600)
    finally:
        scheduler.stop()
    assert mixed == plain
    assert not any(isinstance(e, Failed) for e in events + grammar)
    pieces = [e for e in events if isinstance(e, TextPiece)]
    assert pieces and all(len(p.logprobs) >= 1 for p in pieces)  # the eager rows still carry logprobs
    assert masked  # the grammar row decoded on the device, under its mask
    assert re.fullmatch("[a-z]{1,12}", "".join(e.text for e in grammar if isinstance(e, TextPiece)))
