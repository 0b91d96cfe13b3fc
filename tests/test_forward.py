"""The numpy forward against llama.cpp (fixtures from tests/fixtures/make_model_fixtures.py, llama-cpp-python
0.3.36, 2 threads, float32 KV cache). Token ids come from the fixtures, so tokenization cannot matter.

Tolerances come from llama.cpp's own noise floor, which the fixtures record: the same prompts run a second time
with flash attention on (``self_agreement`` and each prompt's ``flash_attn``). llama.cpp rounds activations to
8 bits before every quantized matmul (we round the same way, rocmforge.ops.matmul), and that rounding turns any
ulp of difference (a summation order, flash attention's online softmax) into whole quantization steps that
grow through the layers. Measured (2026-11-26, this 2-core x86 machine):

                                  llama.cpp flash on vs off     rocmforge vs llama.cpp (flash off)
  SmolLM2 greedy identical        7/20, common prefix 261/480   9/20, 291/480
  SmolLM2 top-10 max |diff|       0.79                          0.69
  Gemma-3 greedy identical        9/20, common prefix 300/480   11/20, 300/480
  Gemma-3 top-10 max |diff|       2.11                          1.37

So the issue's "greedy identical on >= 95% of prompts" is out of reach for any implementation that is not
bit-identical to llama.cpp's build: llama.cpp misses it against itself (35%, 45%). Instead we hold rocmforge to
llama.cpp's self-agreement minus a margin for our own spread (a 1-ulp nudge of the embeddings moves our counts
by about 2 prompts and 30 prefix tokens), and check that every disagreement is a near tie. A real bug (wrong
rope, mask, norm) gives gaps of several logits and common prefixes near zero, far outside these bounds.

On the tiny float32 models nothing is quantized on either side, so they must agree to ``TINY_RTOL``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import rocmforge

pytestmark = pytest.mark.model_text  # stored references: .ci/run repeats it under another BLAS kernel

FIXTURES = Path(__file__).parent / "fixtures" / "models"
TOP10_MARGIN = 0.5     # our largest top-10 logit difference may exceed llama.cpp's own (flash on vs off) by this
NEAR_TIE = 0.5         # llama.cpp's own top-1 flips (flash on vs off) happened at top-1/top-2 margins of 0.02-0.11
IDENTICAL_MARGIN = 4   # prompts: identical continuations may fall this far below llama.cpp's self-agreement
PREFIX_MARGIN = 0.2    # of all continuation tokens: the common-prefix total may fall this far below llama.cpp's
GREEDY_TIE = 0.75      # at a divergence, llama.cpp's token must be within this of our best logit
PPL_RTOL = 0.01        # the bound, on the mean over N_NUDGED runs (see the perplexity test)
LOGPROB_FACTOR = 2.5   # per-token log-prob differences: at most this times llama.cpp's own largest (0.39, 0.50)
N_NUDGED = 4
TINY_RTOL, TINY_ATOL = 1e-3, 1e-3


def _reference(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real(request):
    path = request.getfixturevalue("smollm2_path" if request.param.startswith("smollm2") else "gemma3_path")
    return request.param, rocmforge.load(path, device="cpu", n_ctx=1024), _reference(request.param)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_top1_and_top10_logits_match_llama_cpp(real):
    name, model, ref = real
    worst = 0.0
    for case in ref["prompts"]:
        logits = model.forward(case["ids"])[-1]
        # every token llama.cpp scores within NEAR_TIE of its own best is an acceptable top-1 (usually just one)
        best = case["top10_logits"][0]
        allowed = [t for t, v in zip(case["top10_ids"], case["top10_logits"]) if v >= best - NEAR_TIE]
        assert int(np.argmax(logits)) in allowed, (case["text"], allowed)
        diff = np.abs(logits[case["top10_ids"]] - np.array(case["top10_logits"])).max()
        worst = max(worst, float(diff))
    floor = ref["self_agreement"]["top10_max_abs_diff"]
    assert worst <= floor + TOP10_MARGIN, f"largest top-10 logit difference {worst:.3f} (llama.cpp's own {floor:.3f})"


def test_greedy_continuations_agree_with_llama_cpp_as_well_as_it_agrees_with_itself(real):
    """Teacher-forced argmax over llama.cpp's greedy continuation: equal at every step iff our greedy run is,
    and the first unequal step is where our free-running continuation would leave llama.cpp's."""
    name, model, ref = real
    identical = prefix = self_identical = self_prefix = 0
    for case in ref["prompts"]:
        ids, greedy = case["ids"], case["greedy"]
        logits = model.forward(ids + greedy[:-1])[len(ids) - 1:]
        ours = [int(t) for t in logits.argmax(-1)]
        identical += ours == greedy
        prefix += _common_prefix(ours, greedy)
        self_identical += case["flash_attn"]["greedy"] == greedy
        self_prefix += _common_prefix(case["flash_attn"]["greedy"], greedy)
        # every disagreement is a near tie of our own logits, not a wrong model
        gaps = logits.max(-1) - logits[np.arange(len(greedy)), greedy]
        assert gaps.max() <= GREEDY_TIE, (case["text"], int(gaps.argmax()), float(gaps.max()))
    assert self_identical == ref["self_agreement"]["greedy_identical"]  # the fixture's summary is its own data
    n_tokens = sum(len(case["greedy"]) for case in ref["prompts"])
    assert identical >= self_identical - IDENTICAL_MARGIN, f"{identical} identical; llama.cpp vs itself {self_identical}"
    assert prefix >= self_prefix - PREFIX_MARGIN * n_tokens, f"common prefix {prefix}; llama.cpp vs itself {self_prefix}"


def _nudge(seed: int):
    """A hook that moves every embedding value by one float32 ulp up or down (seeded)."""
    def hook(act: np.ndarray, _hook) -> np.ndarray:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], act.shape)
        return (act * (1 + signs * 2.0 ** -23)).astype(np.float32)
    return hook


def test_perplexity_within_one_percent_of_llama_cpp(real):
    """Perplexity is a chaotic function of ulp-level details too: one-ulp nudges of the embeddings move Gemma's
    by 0.35% (standard deviation over 8 nudges), and llama.cpp's own flash-attention switch moves it by 0.41%.
    So the 1% bound applies to the mean over the plain run and ``N_NUDGED - 1`` nudged ones (the model's
    perplexity rather than one draw of that noise), and every single run must stay within twice the bound.
    Per-token log-probabilities of every run differ by at most ``LOGPROB_FACTOR`` times llama.cpp's own largest
    flash-on/off difference (ours differ in every matmul's summation order, not only in attention)."""
    name, model, ref = real
    ids = ref["perplexity"]["ids"]
    ratios = []
    for seed in range(N_NUDGED):
        with model.hooks([("hook_embed", _nudge(seed))] if seed else []):
            logits = model.forward(ids)
        logprobs = _log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]]
        ratios.append(float(np.exp(-logprobs.mean())) / ref["perplexity"]["ppl"])
        np.testing.assert_allclose(logprobs, ref["perplexity"]["logprobs"],
                                   atol=LOGPROB_FACTOR * ref["self_agreement"]["logprob_max_abs_diff"])
    assert abs(np.mean(ratios) - 1) < PPL_RTOL, ratios
    assert max(abs(r - 1) for r in ratios) < 2 * PPL_RTOL, ratios


@pytest.mark.parametrize("arch,seed", [("qwen2", 1), ("qwen3", 2)])
def test_tiny_qwen_models_match_llama_cpp(tmp_path, arch, seed):
    sys.path.insert(0, str(FIXTURES.parent))
    from make_model_fixtures import write_tiny_model

    path = write_tiny_model(tmp_path / f"tiny-{arch}.gguf", arch, seed)  # seeded: the bytes llama.cpp scored
    model = rocmforge.load(path, device="cpu")
    assert model.cfg.qkv_bias == (arch == "qwen2") and model.cfg.qk_norm == (arch == "qwen3")
    for case in _reference(f"tiny-{arch}")["cases"]:
        logits = model.forward(case["ids"])[case["positions"]]
        np.testing.assert_allclose(logits, case["logits"], rtol=TINY_RTOL, atol=TINY_ATOL)
