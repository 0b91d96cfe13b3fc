"""Answers from the bundled notes on the default path (README command 1): a dozen questions to the default model
with the store built as the README builds it; none may loop (a 6-token span of its tokens three times, what
SmolLM2-135M did under plain greedy decoding before ``ANSWER_SAMPLING``: 8 of these 12), and at least half must end
by themselves within ``ANSWER_MAX_TOKENS``."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import rocmforge
from rocmforge.cli.main import cli
from rocmforge.model import ANSWER_MAX_TOKENS, ANSWER_SAMPLING

QUESTIONS = [
    "How does the context store survive a crash?",
    "What is a hook point?",
    "How is the KV cache organised?",
    "Which quantization types are supported?",
    "What does the embedder compute?",
    "How do I add documents to the context store?",
    "What is activation patching?",
    "Why are weights kept quantized?",
    "How does hybrid search combine results?",
    "What happens when the index file is damaged?",
    "How are embeddings normalised?",
    "What is Q4_K?",
]


def repeated_span(ids: list[int], span: int = 6, times: int = 3) -> list[int] | None:
    """The first ``span``-token run that occurs ``times`` times in ``ids`` (overlaps count), or None.

    >>> repeated_span([1, 2, 1, 2, 1, 2, 1, 2], span=2)
    [1, 2]
    >>> repeated_span([1, 2, 3, 4], span=2) is None
    True
    """
    seen: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - span + 1):
        key = tuple(ids[i:i + span])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= times:
            return list(key)
    return None


def test_repeated_span_finds_the_loop_from_the_issue(smollm2_path):
    tokens = rocmforge.load(smollm2_path, device="cpu").tokenize
    looped = "A hook point is a function that is passed to a function that is passed to a function that is passed to a"
    assert repeated_span(tokens(looped, add_bos=False)) is not None
    assert repeated_span(tokens("A hook point names a tensor the forward passes through hooks.", add_bos=False)) is None


@pytest.mark.slow
def test_answers_from_the_bundled_notes_do_not_loop(smollm2_path, tmp_path, monkeypatch):
    """Checked on the tokens the model emitted (the sampler's loop guard works on those): a phrase emitted again
    under another split into tokens is not caught ("How are embeddings normalised?" repeats one 6-token phrase of
    its text three times that way)."""
    monkeypatch.delenv("ROCMFORGE_DEVICE", raising=False)
    db = tmp_path / "demo.db"
    added = CliRunner().invoke(cli, ["context", "--db", str(db), "add", "--bundled-docs"])
    assert added.exit_code == 0, added.output
    model = rocmforge.load(smollm2_path)
    ended = 0
    for i, question in enumerate(QUESTIONS):
        content, _ = model.context_prompt(question, str(db))
        prompt = model.apply_chat_template([{"role": "user", "content": content}])
        gen = model.start(prompt, max_new_tokens=ANSWER_MAX_TOKENS, temperature=0, **ANSWER_SAMPLING)
        text = "".join(gen.text_pieces())
        if i == 0:  # what create_chat_completion answers (README command 1's path)
            out = model.create_chat_completion([{"role": "user", "content": question}], context=str(db),
                                               temperature=0)
            assert out["choices"][0]["message"]["content"] == text
        loop = repeated_span(gen.tokens[gen.n_prompt:])
        assert loop is None, f"{question!r} -> {text!r} repeats {model.detokenize(loop)!r} three times"
        assert len(text.split()) >= 5, f"{question!r} -> {text!r}"
        ended += gen.finish_reason == "stop"
    assert ended >= 6, f"only {ended} of {len(QUESTIONS)} answers ended before the token limit"
