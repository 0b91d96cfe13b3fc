"""GenerationPanel driven in plain pytest (no kernel): set widget values, click, check what it shows.

References are independent of the panel: ``Model.generate`` / ``create_chat_completion`` for the text, a
``Generation`` stepped by hand with a fresh ``Sampler`` for the probabilities, ``ContextStore.search`` for the
passages, and a plain forward for the logit lens.
"""
from __future__ import annotations

import re
import time

import numpy as np
import pytest

import rocmforge
from rocmforge.engine import step_all_forward
from rocmforge.errors import ContextOverflowError
from rocmforge.sampler import Sampler, SamplingParams, top_alternatives
from rocmforge.widgets import GenerationPanel
from rocmforge.widgets import render
from rocmforge.hooks import act_name
from rocmforge.widgets.inside import supports_hooks
from rocmforge.widgets.render import MAX_HEATMAP_POSITIONS as MAX_QUERY_ROWS
from rocmforge.widgets.prompting import cited_passages
from rocmforge.widgets.record import TokenStep

PROMPT = "The three primary colours are"
SETTINGS = dict(temperature=0.9, top_k=30, top_p=0.9, min_p=0.02, repeat_penalty=1.1, seed=11)


@pytest.fixture(scope="module")
def model(smollm2_path):
    return rocmforge.load(smollm2_path, device="cpu")


def _panel(model, store=None, prompt=PROMPT, max_new_tokens=12, mode="completion", **overrides):
    panel = GenerationPanel(model, store)
    settings = {**SETTINGS, **overrides}
    panel.prompt.value, panel.mode.value, panel.max_new_tokens.value = prompt, mode, max_new_tokens
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed"):
        getattr(panel, name).value = settings[name]
    return panel


def _streamed_texts(panel):
    """Every text the output widget showed, in order (observing its outputs trait like the frontend does)."""
    seen = []
    panel.output.observe(lambda change: seen.append("".join(o["text"] for o in change["new"])), names="outputs")
    return seen


def test_click_streams_the_text_model_generate_gives(model):
    panel = _panel(model)
    seen = _streamed_texts(panel)
    panel.generate_button.click()
    result = panel.wait(timeout=120)
    expected = model.generate(PROMPT, max_new_tokens=12, **SETTINGS)
    assert result.text == expected
    shown = [s for s in seen if s]
    assert shown[-1] == expected
    assert len(shown) > 1, "the text should arrive piece by piece, not at the end"
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:]))
    assert result.prompt_ids == model.tokenize(PROMPT)
    assert model.detokenize(result.token_ids) == expected  # no end-of-text token in a 12-token length stop
    assert result.finish_reason == "length" and len(result.tokens) == 12


def test_chat_mode_matches_create_chat_completion(model):
    question = "Name a fruit."
    panel = _panel(model, prompt=question, mode="chat", max_new_tokens=10)
    result = panel.generate(wait=True)
    out = model.create_chat_completion([{"role": "user", "content": question}], max_tokens=10, **SETTINGS)
    assert result.text == out["choices"][0]["message"]["content"]
    assert len(result.prompt_ids) == out["usage"]["prompt_tokens"]


def test_token_probabilities_are_the_samplers_distribution(model):
    panel = _panel(model, max_new_tokens=8)
    result = panel.generate(wait=True)
    params = SamplingParams(**SETTINGS)
    gen = model.start(PROMPT, max_new_tokens=8, **SETTINGS)
    sampler = Sampler(params)  # a second sampler: distribution() uses no random numbers
    try:
        for step in result.tokens:
            step_all_forward([gen])
            probs = sampler.distribution(gen.logits, gen.tokens)
            token = gen.step()
            assert step.token_id == token
            assert step.probability == probs[token]
            assert [(t, p) for t, _, p in step.alternatives] == top_alternatives(probs, 5)
            assert [text for _, text, _ in step.alternatives] == [model.tokenizer.token_text(t)
                                                                  for t, _ in top_alternatives(probs, 5)]
    finally:
        gen.close()
    assert result.probabilities == [s.probability for s in result.tokens]


def test_stats_and_token_view(model):
    panel = _panel(model, max_new_tokens=6)
    result = panel.generate(wait=True)
    s = result.stats
    assert s["n_generated"] == 6 and s["n_prompt"] == len(result.prompt_ids)
    assert 0 < s["ttft_s"] < s["total_s"] and s["tokens_per_s"] > 0
    assert f"{s['tokens_per_s']:.1f} tokens/s" in panel.stats.value
    assert f"time to first token {s['ttft_s']:.2f} s" in panel.stats.value
    assert panel.tokens.value.count('class="rf-token"') == 6
    assert panel.tokens.value == render.token_html(result.tokens)
    panel.token_index.value = 3  # selecting a token shows its alternatives
    step = result.tokens[3]
    assert panel.token_alternatives.value == render.alternatives_html(step, 3)
    assert f"{step.alternatives[0][2]:.4f}" in panel.token_alternatives.value
    assert panel.status.value == "<i>done</i>" and not panel.generate_button.disabled


def test_stop_ends_a_long_generation_within_one_token(model):
    panel = _panel(model, max_new_tokens=400, temperature=0.0)
    panel.generate_button.click()
    assert panel.running and panel.generate_button.disabled and not panel.stop_button.disabled  # click returned
    with pytest.raises(RuntimeError, match="already running"):
        panel.generate()
    deadline = time.monotonic() + 60
    while len(panel.output.outputs) == 0 or len(panel.output.outputs[0]["text"]) < 10:
        assert time.monotonic() < deadline and panel.running
        time.sleep(0.01)
    panel.stop_button.click()
    n_at_stop = len(panel.progress)
    result = panel.wait(timeout=30)
    assert result.finish_reason == "cancelled" and panel.status.value == "<i>stopped</i>"
    assert n_at_stop <= len(result.tokens) <= n_at_stop + 1
    # What it produced before stopping is the start of the uninterrupted greedy generation.
    full = model.start(PROMPT, max_new_tokens=len(result.tokens), **{**SETTINGS, "temperature": 0.0})
    assert [full.step() for _ in result.tokens] == result.token_ids
    full.close()


@pytest.fixture()
def store(tmp_path):
    from context_store import ContextStore
    from rocmforge.embedder import HashedNgramEmbedder
    with ContextStore(tmp_path / "ctx.db", embed=HashedNgramEmbedder()) as store:
        store.add_text("Paris is the capital of France and sits on the Seine.", source="france.txt")
        store.add_text("The primary colours of light are red, green and blue.", source="colours.txt")
        store.add_text("Llamas are domesticated South American camelids.", source="llamas.txt")
        yield store


@pytest.mark.slow
def test_context_passages_are_the_stores_search_and_go_into_the_prompt(model, store):
    panel = _panel(model, store=store, max_new_tokens=4)
    assert panel.use_context.value and not panel.use_context.disabled
    panel.k.value = 2
    result = panel.generate(wait=True)
    expected = store.search(PROMPT, k=2)
    assert [(h.chunk_id, h.score) for h in result.passages] == [(h.chunk_id, h.score) for h in expected]
    assert result.passages[0].source == "colours.txt"
    for i, hit in enumerate(expected, 1):
        assert f"[{i}] ({hit.source}) {' '.join(hit.text.split())}" in result.prompt
        assert f"{hit.source} · score {hit.score:.4f}" in panel.passages.value
    assert result.prompt_ids == model.tokenize(result.prompt)
    assert result.text == model.generate(PROMPT, max_new_tokens=4, context=store, k=2, frequency_penalty=0.0,
                                         repeat_ngram=0, **SETTINGS)
    assert result.cited == cited_passages(result.text, 2)

    panel.mode.value = "chat"
    result = panel.generate(wait=True)
    # the panel's sliders set every option; an answer's other defaults (ANSWER_SAMPLING) are off there
    out = model.create_chat_completion([{"role": "user", "content": PROMPT}], max_tokens=4, context=store, k=2,
                                       frequency_penalty=0.0, repeat_ngram=0, **SETTINGS)
    assert result.text == out["choices"][0]["message"]["content"]
    assert [c["chunk_id"] for c in out["citations"]] == [h.chunk_id for h in result.passages]

    panel.use_context.value = False
    assert panel.generate(wait=True).passages == []


def test_without_a_store_there_is_no_context_toggle(model):
    panel = GenerationPanel(model)
    assert panel.use_context.disabled and not panel.use_context.value
    assert panel.passages not in panel.widget.children


def test_cited_passages_are_marked():
    class Hit:
        def __init__(self, source):
            self.source, self.text, self.score = source, "text", 0.5
    html = render.passages_html([Hit("a.txt"), Hit("b.txt")], cited_passages("as [2] says", 2))
    assert html.count("✔ cited") == 1 and html.index("✔ cited") > html.index("b.txt")


def test_token_view_colours_by_probability_and_titles_the_alternatives():
    steps = [TokenStep(1, " a", 0.9, ((1, " a", 0.9), (2, " b", 0.1))), TokenStep(2, "\n", 0.1, ((1, " a", 0.9),))]
    html = render.token_html(steps)
    assert "hsl(108, 75%, 82%)" in html and "hsl(12, 75%, 82%)" in html
    assert 'title="p=0.9000\n&#x27; a&#x27; 0.9000\n&#x27; b&#x27; 0.1000"' in html
    assert "↵" in html


@pytest.mark.slow
def test_inside_view_patterns_and_logit_lens(model):
    if not supports_hooks(model):
        pytest.skip("Model.run_with_cache is not available yet (hooks API)")
    long_prompt = " ".join([PROMPT] * 12)  # longer than the 48 query rows the view keeps
    panel = _panel(model, prompt=long_prompt, max_new_tokens=3, temperature=0.0)
    result = panel.generate(wait=True)
    view = panel.look_inside()
    ids = result.prompt_ids + result.token_ids
    n = len(ids)
    assert n > MAX_QUERY_ROWS
    assert view.n_layers == model.cfg.n_layers and view.n_heads == model.cfg.n_heads
    _, cache = model.run_with_cache(ids, names_filter=act_name("pattern", 2))
    np.testing.assert_array_equal(view.pattern(layer=2, head=1), cache["pattern", 2][1][-MAX_QUERY_ROWS:])
    pattern = view.pattern(layer=2, head=1)
    np.testing.assert_allclose(pattern.sum(axis=-1), 1.0, rtol=1e-5)
    queries = np.arange(n - MAX_QUERY_ROWS, n)[:, None]
    assert np.all(pattern[np.arange(n)[None, :] > queries] == 0)  # causal: no query looks ahead
    logits = model.forward(ids)[-1]
    assert view.lens[-1][0] == "final" and view.lens[-1][1] == int(np.argmax(logits))
    assert len(view.lens) == model.cfg.n_layers + 1
    panel.layer.value, panel.head.value = 2, 1
    assert panel.attention.value == render.attention_html(pattern, view.labels, "layer 2, head 1")
    assert f"(last {MAX_QUERY_ROWS} of {n} positions)" in panel.attention.value
    assert panel.attention.value.count("<tr>") == MAX_QUERY_ROWS + 1
    assert panel.logit_lens.value.count("<tr>") == model.cfg.n_layers + 2  # header + one per stage


def test_attention_table_shows_the_last_positions_shaded_relative_to_the_largest():
    n = MAX_QUERY_ROWS + 2
    pattern = np.tril(np.ones((n, n)))
    pattern /= pattern.sum(axis=1, keepdims=True)  # query i spreads evenly over keys 0..i
    html = render.attention_html(pattern[-MAX_QUERY_ROWS:], [f"t{i}" for i in range(n)], "layer 0, head 0")
    assert f"(last {MAX_QUERY_ROWS} of {n} positions)" in html and html.count("<tr>") == MAX_QUERY_ROWS + 1
    last_row = html.split("<tr>")[-1]
    assert re.findall(r'title="([0-9.]+)"', last_row) == [f"{w:.4f}" for w in pattern[-1, 2:]]
    darkest = pattern[-MAX_QUERY_ROWS:, 2:].max()  # key 2 seen by query 2 (1/3)
    assert f"darkest = {darkest:.3f}" in html and "rgba(30,90,200,1.000)" in html


def test_a_prompt_longer_than_the_context_is_reported_and_the_panel_recovers(model):
    panel = _panel(model, prompt="word " * (model.n_ctx + 10))
    panel.generate_button.click()  # a click has no caller to raise to: the status line says what happened
    with pytest.raises(ContextOverflowError, match="context window"):
        panel.wait(timeout=60)
    assert panel.status.value.startswith("<b style='color:#b00'>error:</b>") and "context window" in panel.status.value
    assert not panel.generate_button.disabled and panel.stop_button.disabled and panel.result is None
    panel.prompt.value = PROMPT
    assert panel.generate(wait=True).text == model.generate(PROMPT, max_new_tokens=12, **SETTINGS)


class _WithoutHooks:
    """The model with its hook API hidden, as an engine without hooks would be."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        if name in ("run_with_cache", "hooks"):
            raise AttributeError(name)
        return getattr(self._model, name)


def test_without_hooks_the_inside_view_says_so_and_generation_still_works(model):
    panel = _panel(_WithoutHooks(model), max_new_tokens=3)
    assert panel.inside_button.disabled and "no hooks" in panel.attention.value
    assert panel.generate(wait=True).text == model.generate(PROMPT, max_new_tokens=3, **SETTINGS)
    assert panel.inside_button.disabled  # still, after the run re-enabled the other buttons
    with pytest.raises(RuntimeError, match="run_with_cache"):
        panel.look_inside()
