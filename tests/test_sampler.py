"""The sampler against a float64 reference written here with plain loops and sorts.

The reference follows llama.cpp's chain (logit bias -> penalties -> top-k -> top-p -> min-p ->
temperature) one token at a time, so it shares no code or tricks (partition, logit-space min-p,
vectorized penalties) with rocmforge/sampler.py.
"""
from __future__ import annotations

import dataclasses
import doctest
import math

import numpy as np
import pytest

import rocmforge.sampler
from rocmforge.sampler import Sampler, SamplingParams, StopMatcher, top_alternatives

OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # every filter off: plain softmax


def reference_distribution(logits, history, params: SamplingParams) -> list[float]:
    x = [float(v) for v in logits]
    for token, bias in params.logit_bias.items():
        x[token] += bias

    if params.repeat_last_n == -1:
        window = list(history)
    elif params.repeat_last_n == 0:
        window = []
    else:
        window = list(history)[-params.repeat_last_n:]
    counts: dict[int, int] = {}
    for token in window:
        counts[token] = counts.get(token, 0) + 1
    for token, count in counts.items():
        if x[token] > 0:
            x[token] = x[token] / params.repeat_penalty
        else:
            x[token] = x[token] * params.repeat_penalty
        x[token] -= count * params.frequency_penalty + params.presence_penalty

    alive = [i for i in range(len(x)) if x[i] != -math.inf]
    if params.temperature == 0:
        best = max(alive, key=lambda i: (x[i], -i))  # first index among equal maxima
        return [1.0 if i == best else 0.0 for i in range(len(x))]

    if 0 < params.top_k < len(alive):
        kth_value = sorted((x[i] for i in alive), reverse=True)[params.top_k - 1]
        alive = [i for i in alive if x[i] >= kth_value]

    def softmax(ids, scale=1.0):
        top = max(x[i] for i in ids)
        weights = {i: math.exp((x[i] - top) * scale) for i in ids}
        total = sum(weights.values())
        return {i: w / total for i, w in weights.items()}

    if params.top_p < 1.0:
        p = softmax(alive)
        cumulative, boundary = 0.0, None
        for i in sorted(alive, key=lambda i: -p[i]):
            cumulative += p[i]
            if cumulative >= params.top_p:
                boundary = p[i]
                break
        if boundary is not None:
            alive = [i for i in alive if p[i] >= boundary]

    if params.min_p > 0.0:
        p = softmax(alive)
        p_max = max(p.values())
        alive = [i for i in alive if p[i] >= params.min_p * p_max]

    final = softmax(alive, scale=1.0 / params.temperature)
    return [final.get(i, 0.0) for i in range(len(x))]


def random_logits(vocab: int, seed: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


def assert_matches_reference(logits, history, params):
    before = logits.copy()
    got = Sampler(params).distribution(logits, history)
    np.testing.assert_array_equal(logits, before)  # the caller's logits are never modified
    want = np.array(reference_distribution(logits, history, params))
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    return got


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 1.7, 5.0])
def test_temperature_alone(temperature):
    logits = random_logits(200, seed=1)
    got = assert_matches_reference(logits, [], SamplingParams(**{**OFF, "temperature": temperature}))
    assert np.count_nonzero(got) == 200


def test_greedy_is_argmax_of_biased_and_penalized_logits():
    logits = np.array([1.0, 5.0, 4.0, -2.0, 4.9], dtype=np.float32)
    params = SamplingParams(temperature=0, repeat_penalty=1.5, logit_bias={3: 6.5})
    # token 1: 5.0 / 1.5 = 3.33; token 3: -2 + 6.5 = 4.5; token 4 (4.9) wins.
    sampler = Sampler(params)
    assert sampler.sample(logits, history=[1, 1]) == 4
    got = assert_matches_reference(logits, [1, 1], params)
    assert got.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    # ties: the first index, like np.argmax and llama.cpp's greedy sampler
    assert Sampler(SamplingParams(temperature=0)).sample(np.array([2.0, 7.0, 7.0], dtype=np.float32), []) == 1


@pytest.mark.parametrize("k", [1, 2, 5, 40, 199, 200, 1000])
def test_top_k_alone(k):
    got = assert_matches_reference(random_logits(200, seed=2), [], SamplingParams(**{**OFF, "top_k": k}))
    assert np.count_nonzero(got) == min(k, 200)


def test_top_k_keeps_ties_at_the_boundary():
    logits = np.array([3.0, 1.0, 2.0, 2.0, 0.5, 2.0], dtype=np.float32)
    got = assert_matches_reference(logits, [], SamplingParams(**{**OFF, "top_k": 2}))
    assert np.flatnonzero(got).tolist() == [0, 2, 3, 5]


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.95, 0.999])
def test_top_p_alone(top_p):
    got = assert_matches_reference(random_logits(300, seed=3), [], SamplingParams(**{**OFF, "top_p": top_p}))
    kept = np.sort(np.exp(random_logits(300, seed=3).astype(np.float64)))[::-1]
    kept /= kept.sum()
    # the kept set is exactly the smallest head whose probability reaches top_p
    n = int(np.searchsorted(np.cumsum(kept), top_p)) + 1
    assert np.count_nonzero(got) == n


def test_top_p_on_a_large_vocabulary_with_a_flat_tail():
    # a flat distribution makes the nucleus larger than the first sorted head the sampler tries
    logits = random_logits(5000, seed=4, scale=0.3)
    got = assert_matches_reference(logits, [], SamplingParams(**{**OFF, "top_p": 0.9}))
    assert 1000 < np.count_nonzero(got) < 5000


def test_top_p_ties_and_keep_at_least_one():
    uniform4 = np.zeros(4, dtype=np.float32)  # p = 0.25 each: the boundary token ties with all
    got = assert_matches_reference(uniform4, [], SamplingParams(**{**OFF, "top_p": 0.5}))
    assert got.tolist() == [0.25] * 4
    logits = np.array([5.0, 0.0, 1.0], dtype=np.float32)
    got = assert_matches_reference(logits, [], SamplingParams(**{**OFF, "top_p": 1e-6}))
    assert got.tolist() == [1.0, 0.0, 0.0]
    two_best = np.array([4.0, 4.0, 1.0, 0.0], dtype=np.float32)
    got = assert_matches_reference(two_best, [], SamplingParams(**{**OFF, "top_p": 0.2}))
    assert np.flatnonzero(got).tolist() == [0, 1]


@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.2, 0.5, 1.0])
def test_min_p_alone(min_p):
    logits = random_logits(300, seed=5)
    got = assert_matches_reference(logits, [], SamplingParams(**{**OFF, "min_p": min_p}))
    p = np.exp(logits.astype(np.float64) - logits.max())
    assert np.count_nonzero(got) == np.count_nonzero(p >= min_p)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -1.0, 0.0, 3.0, 1.0], dtype=np.float32)
    params = SamplingParams(**{**OFF, "repeat_penalty": 2.0})
    got = assert_matches_reference(logits, [0, 1, 2, 0, 0], params)
    penalized = np.array([1.0, -2.0, 0.0, 3.0, 1.0])  # the count does not matter for repeat_penalty
    np.testing.assert_allclose(got, np.exp(penalized) / np.exp(penalized).sum(), rtol=1e-12)


@pytest.mark.parametrize("last_n", [-1, 0, 1, 3, 64])
def test_penalty_window(last_n):
    logits = random_logits(50, seed=6)
    history = [7, 7, 3, 9, 9, 9, 12, 3, 40]
    params = SamplingParams(**{**OFF, "repeat_penalty": 1.3, "frequency_penalty": 0.4,
                               "presence_penalty": 0.25, "repeat_last_n": last_n})
    got = assert_matches_reference(logits, history, params)
    plain = Sampler(SamplingParams(**OFF)).distribution(logits, history)
    window = set(history if last_n == -1 else history[len(history) - last_n:] if last_n else [])
    shift = np.log(got) - np.log(plain)  # the same for every token the penalties left alone
    changed = set(np.flatnonzero(np.abs(shift - shift[0]) > 1e-9).tolist())  # token 0 is never seen
    assert changed == window


def test_frequency_and_presence_penalties_are_count_based():
    logits = np.zeros(6, dtype=np.float32)
    params = SamplingParams(**{**OFF, "frequency_penalty": 0.5, "presence_penalty": 1.0})
    got = assert_matches_reference(logits, [1, 2, 2, 3, 3, 3], params)
    expected = np.array([0.0, -1.5, -2.0, -2.5, 0.0, 0.0])  # -(count * 0.5 + 1.0) for seen tokens
    np.testing.assert_allclose(got, np.exp(expected) / np.exp(expected).sum(), rtol=1e-12)
    negative = SamplingParams(**{**OFF, "frequency_penalty": -0.3, "presence_penalty": -0.2})
    assert_matches_reference(random_logits(30, seed=7), [4, 4, 5, 29], negative)


def test_logit_bias_adds_and_bans():
    logits = random_logits(20, seed=8)
    params = SamplingParams(**{**OFF, "logit_bias": {0: 5.0, 3: -2.5, 7: -math.inf, 19: -math.inf}})
    got = assert_matches_reference(logits, [], params)
    assert got[7] == 0.0 and got[19] == 0.0 and np.count_nonzero(got) == 18
    for k in (17, 18, 19):  # k beyond the unbanned tokens: the k-th largest logit is -inf
        got = assert_matches_reference(logits, [], dataclasses.replace(params, top_k=k))
        assert np.count_nonzero(got) == min(k, 18)
    greedy = SamplingParams(temperature=0, logit_bias={int(np.argmax(logits)): -math.inf})
    assert Sampler(greedy).sample(logits, []) == int(np.argsort(logits)[-2])


def test_logit_bias_comes_before_penalties_as_in_llama_cpp():
    logits = np.array([2.0, 1.0, 0.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repeat_penalty=2.0, logit_bias={0: 2.0, 1: -3.0})
    # bias first: token 0 -> (2 + 2) / 2 = 2, token 1 -> (1 - 3) * 2 = -4; penalty first would give 3 and -2.5
    biased = SamplingParams(**{**OFF, "repeat_penalty": 2.0, "logit_bias": {0: 2.0, 1: -3.0}})
    got = assert_matches_reference(logits, [0, 1], biased)
    want = np.exp([2.0, -4.0, 0.0]) / np.exp([2.0, -4.0, 0.0]).sum()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert Sampler(params).sample(logits, [0, 1]) == 0


def test_banning_every_token_or_a_token_outside_the_vocabulary_is_a_clear_error():
    logits = np.zeros(3, dtype=np.float32)
    ban_all = {0: -math.inf, 1: -math.inf, 2: -math.inf}
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="every token is banned"):
            Sampler(SamplingParams(temperature=temperature, logit_bias=ban_all)).sample(logits, [])
    with pytest.raises(ValueError, match="outside the vocabulary of 3"):
        Sampler(SamplingParams(logit_bias={3: 1.0})).sample(logits, [])


@pytest.mark.parametrize("case", range(12))
def test_all_options_combined(case):
    rng = np.random.default_rng(100 + case)
    vocab = 120
    params = SamplingParams(
        temperature=float(rng.choice([0.0, 0.3, 0.8, 1.0, 2.5])),
        top_k=int(rng.choice([0, 1, 5, 40, 500])),
        top_p=float(rng.choice([1.0, 0.95, 0.7, 0.3])),
        min_p=float(rng.choice([0.0, 0.05, 0.2])),
        repeat_penalty=float(rng.choice([1.0, 1.1, 1.8])),
        repeat_last_n=int(rng.choice([-1, 0, 8, 64])),
        frequency_penalty=float(rng.choice([0.0, 0.3])),
        presence_penalty=float(rng.choice([0.0, 0.6])),
        logit_bias={int(t): float(b) for t, b in zip(rng.integers(0, vocab, 4), [3.0, -1.0, -math.inf, 0.5])},
        seed=case,
    )
    history = rng.integers(0, vocab, 40).tolist()
    assert_matches_reference(random_logits(vocab, seed=200 + case), history, params)


def test_llama_cpp_defaults_on_a_real_sized_vocabulary():
    logits = random_logits(49152, seed=9, scale=4.0)
    history = np.random.default_rng(9).integers(0, 49152, 300).tolist()
    assert_matches_reference(logits, history, SamplingParams(repeat_penalty=1.1))
    assert_matches_reference(logits, history, SamplingParams(top_k=0, top_p=0.9, min_p=0.0))


def test_same_seed_same_tokens_and_batching_does_not_matter():
    logits = [random_logits(500, seed=s, scale=1.0) for s in range(50)]
    params = SamplingParams(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0)

    def run(sampler):
        return [sampler.sample(step, []) for step in logits]

    alone = run(Sampler(dataclasses.replace(params, seed=42)))
    assert alone == run(Sampler(dataclasses.replace(params, seed=42)))
    assert alone != run(Sampler(dataclasses.replace(params, seed=43)))
    # interleave two sequences step by step, as a batched decode would
    a, b = Sampler(dataclasses.replace(params, seed=42)), Sampler(dataclasses.replace(params, seed=7))
    interleaved = [(a.sample(step, []), b.sample(step, [])) for step in logits]
    assert [pair[0] for pair in interleaved] == alone
    assert [pair[1] for pair in interleaved] == run(Sampler(dataclasses.replace(params, seed=7)))
    unseeded = Sampler(params)
    assert run(Sampler(dataclasses.replace(params, seed=unseeded.seed))) == run(unseeded)


@pytest.mark.parametrize("temperature", [0.0, 0.9, 0.001])
def test_sample_from_the_shown_distribution_picks_what_sample_picks(temperature):
    # At 0.001 the spread-out steps leave one token with nonzero probability among several
    # survivors, and the flat steps need real draws: the two random streams must stay in step.
    params = SamplingParams(temperature=temperature, seed=11)
    shown, direct = Sampler(params), Sampler(params)
    for step in range(40):
        logits = random_logits(1000, seed=300 + step, scale=3.0 if step % 2 else 3e-4)
        assert shown.sample_from(shown.distribution(logits, [])) == direct.sample(logits, [])


def test_empirical_frequencies_match_the_distribution():
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.97, min_p=0.01, seed=1234)
    logits = random_logits(64, seed=10, scale=1.5)
    sampler = Sampler(params)
    probs = sampler.distribution(logits, [])
    draws = np.array([sampler.sample(logits, []) for _ in range(20_000)])
    assert set(np.unique(draws)) <= set(np.flatnonzero(probs))
    expected = probs * len(draws)
    bins = expected >= 5
    observed = np.bincount(draws, minlength=len(probs))
    chi2 = float((((observed - expected) ** 2)[bins] / expected[bins]).sum())
    df = int(bins.sum()) - 1
    # Wilson-Hilferty 99.9% quantile of chi-square(df); z(0.999) = 3.090
    critical = df * (1 - 2 / (9 * df) + 3.090 * math.sqrt(2 / (9 * df))) ** 3
    assert df >= 5 and chi2 < critical
    # and the test has power: a wrong distribution (no temperature) fails it
    wrong = Sampler(dataclasses.replace(params, temperature=1.0)).distribution(logits, []) * len(draws)
    assert float((((observed - wrong) ** 2)[bins] / wrong[bins]).sum()) > critical


def test_top_alternatives():
    probs = np.array([0.05, 0.3, 0.0, 0.3, 0.2, 0.15])
    assert top_alternatives(probs, n=3) == [(1, 0.3), (3, 0.3), (4, 0.2)]
    assert top_alternatives(probs, n=0) == []
    assert top_alternatives(probs, n=10) == [(1, 0.3), (3, 0.3), (4, 0.2), (5, 0.15), (0, 0.05)]
    sampler = Sampler(SamplingParams(**OFF))
    small = sampler.distribution(random_logits(10, seed=12), [])  # one sampler, two vocab sizes
    big = sampler.distribution(random_logits(262144, seed=12), [])
    assert top_alternatives(small, n=1)[0][0] == int(np.argmax(random_logits(10, seed=12)))
    want = sorted(range(len(big)), key=lambda i: -big[i])[:5]
    assert [t for t, _ in top_alternatives(big)] == want


def test_stop_matcher_across_piece_boundaries():
    m = StopMatcher(["###", "\nUser:"])
    pieces = ["Hi", " there\n", "Us", "e", "r: next"]
    out = [m.feed(p) for p in pieces]
    assert out == [("Hi", False), (" there", False), ("", False), ("", False), ("", True)]
    assert m.matched == "\nUser:" and m.feed("more") == ("", True)


def test_stop_matcher_releases_false_alarms_and_flushes():
    m = StopMatcher(["abc"])
    assert m.feed("xab") == ("x", False)
    assert m.feed("ab") == ("ab", False)  # "abab": the first "ab" cannot start "abc" any more
    assert m.feed("x") == ("abx", False)
    assert m.feed("a") == ("", False)
    assert m.flush() == "a" and m.flush() == ""


def test_stop_matcher_earliest_stop_wins_and_whole_piece_stops():
    m = StopMatcher(["world", "lo w", ""])
    assert m.feed("hello world") == ("hel", True) and m.matched == "lo w"
    m = StopMatcher(["END"])
    assert m.feed("END and more") == ("", True)
    text = "".join(StopMatcher([]).feed(p)[0] for p in ["a", "b"])
    assert text == "ab"


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.01), dict(min_p=1.5),
    dict(repeat_penalty=0.0), dict(repeat_last_n=-2), dict(seed=-1), dict(frequency_penalty=math.nan),
    dict(logit_bias={-1: 1.0}), dict(logit_bias={"5": 1.0}), dict(logit_bias={5: math.inf}),
])
def test_invalid_params_raise_with_the_field_named(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_params_are_frozen_and_hashable():
    params = SamplingParams(seed=3, logit_bias={1: 2.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 4
    assert hash(params) == hash(SamplingParams(seed=3, logit_bias={1: 2.0}))


def test_docstring_examples_run():
    result = doctest.testmod(rocmforge.sampler)
    assert result.attempted >= 8 and result.failed == 0


def test_repeat_ngram_bans_only_a_third_repeat():
    """The loop guard: a span may occur twice (a phrase copied from the prompt, or said again), not a third time."""
    logits = np.array([0.0, 0.5, 0.2, 3.0, 1.0], dtype=np.float32)  # token 3 always wins, token 4 next
    guard = Sampler(SamplingParams(temperature=0, repeat_ngram=3))
    assert guard.sample(logits, [1, 2, 3, 1, 2]) == 3          # "1 2 3" a second time: allowed
    assert guard.sample(logits, [1, 2, 3, 1, 2, 3, 1, 2]) == 4  # a third time: banned
    assert Sampler(SamplingParams(temperature=0)).sample(logits, [1, 2, 3, 1, 2, 3, 1, 2]) == 3
    with pytest.raises(ValueError, match="repeat_ngram"):
        SamplingParams(repeat_ngram=1)
