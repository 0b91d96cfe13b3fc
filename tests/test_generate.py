"""Generation on the real SmolLM2: the cached decode path agrees with the full forward, batching changes nothing,
the API returns llama-cpp-python-shaped results, and limits raise typed errors with the numbers."""
from __future__ import annotations

import numpy as np
import pytest

import rocmforge
from rocmforge.backends.cpu import CpuBackend
from rocmforge.engine import step_all
from rocmforge.errors import ContextOverflowError

pytestmark = pytest.mark.model_text  # stored references: .ci/run repeats it under another BLAS kernel

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(smollm2_path):
    return rocmforge.load(smollm2_path, device="cpu", n_ctx=256, n_parallel=4)


@pytest.fixture
def smooth(model):
    """The model with llama.cpp's 8-bit activation rounding off for one test: comparing two computation orders
    (cached decode vs one full pass) needs a smooth function, not one where a flipped rounding moves logits by ~1."""
    rounding = model.ops
    model.ops = model.ctx.ops = CpuBackend(round_activations=False)
    yield model
    model.ops = model.ctx.ops = rounding


def test_greedy_decode_with_kv_cache_matches_full_forward(smooth):
    model = smooth
    gen = model.start(PROMPT, max_new_tokens=6, temperature=0)
    tokens = [t for t in iter(gen.step, None)]
    ids = model.tokenize(PROMPT)
    assert len(tokens) == 6 and gen.finish_reason == "length"
    full = model.forward(ids + tokens[:-1])  # no cache: every position recomputed in one pass
    assert [int(i) for i in full[len(ids) - 1:].argmax(-1)] == tokens
    # the logits of the last cached step equal the full forward's at that position
    np.testing.assert_allclose(gen.logits, full[-1], rtol=1e-3, atol=1e-3)
    gen.close()
    assert model.kv.sequences == []


def test_step_layer_walks_the_layers_and_gives_the_prefill_logits(model):  # same shapes as prefill: bit-equal
    reference = model.start(PROMPT, temperature=0).prefill()
    gen = model.start(PROMPT, temperature=0)
    ran = [gen.step_layer() for _ in range(model.cfg.n_layers)]
    assert ran == list(range(model.cfg.n_layers))
    assert gen.state.layer is None and gen.state.kv_length == len(model.tokenize(PROMPT))
    np.testing.assert_array_equal(gen.state.logits, reference)
    assert gen.step_layer() == 0  # samples the next token and starts its forward
    assert gen.state.layer == 1 and gen.state.resid.shape == (1, model.cfg.d_model)
    for g in list(model.kv.sequences):
        model.kv.free(g)


def test_batched_steps_give_each_sequence_its_solo_tokens(smooth):
    model = smooth
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3,"]
    solo = [model.generate(p, max_new_tokens=5, temperature=0) for p in prompts]
    gens = [model.start(p, max_new_tokens=5, temperature=0) for p in prompts]
    while not all(g.finished for g in gens):
        step_all(gens)  # one forward for all four sequences per tick (the first one prefills all prompts)
    assert [model.detokenize(g.tokens[g.n_prompt:]) for g in gens] == solo
    for g in gens:
        g.close()


def test_same_seed_same_text_and_stream_joins_to_generate(model):
    a = model.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=42)
    b = "".join(model.stream(PROMPT, max_new_tokens=12, temperature=1.0, seed=42))
    assert a == b
    others = {model.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=s) for s in range(5)}
    assert len(others) > 1  # different seeds do sample differently


def test_completion_dict_and_stream_chunks(model):
    out = model.create_completion(PROMPT, max_tokens=4, temperature=0)
    assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    chunks = list(model.create_completion(PROMPT, max_tokens=4, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_text_and_reports_stop(model):
    full = model.generate(PROMPT, max_new_tokens=8, temperature=0)
    assert "." in full
    out = model.create_completion(PROMPT, max_tokens=8, temperature=0, stop=".")
    assert out["choices"][0]["text"] == full[: full.index(".")]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_chat_completion_ends_on_end_of_turn(model):
    # The bare question sends SmolLM2-135M (llama.cpp too) into a French list that never ends; this one closes.
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = model.create_chat_completion(question, max_tokens=40, temperature=0)
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"  # <|im_end|> ended it before max_tokens
    chunks = list(model.create_chat_completion(question, max_tokens=40, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]


def test_context_overflow_names_the_numbers(model):
    with pytest.raises(ContextOverflowError, match="300 tokens but the context window is 256"):
        model.start(list(range(300)))
    gen = model.start(list(range(250)), max_new_tokens=50, temperature=0)
    text = "".join(gen.text_pieces())
    assert gen.finish_reason == "length" and gen.n_generated == 7  # 250 + 6 fed = 256 positions, 7th has no room
    assert isinstance(text, str)
    with pytest.raises(ContextOverflowError, match="257 positions"):
        model.forward(list(range(257)))
