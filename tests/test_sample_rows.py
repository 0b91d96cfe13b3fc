"""``rocmforge/ops/sample_rows.py``, the numpy twin of the device sampling kernel (``kernels/sample_rows.hip``),
against the host sampler (``Sampler.sample(mask=)``) on the same logits, history, grammar mask and uniform draw.
The GPU side of the same comparison is in ``test_gpu_batched.py``."""
from __future__ import annotations

import numpy as np
import pytest

from rocmforge.constraints import unpack_mask
from rocmforge.ops.sample_rows import sample_rows
from rocmforge.sampler import DeviceRow, Sampler, SamplingParams

SAMPLING = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    SamplingParams(temperature=1.3, top_k=0, top_p=0.5, min_p=0.0),
    SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.9, top_k=100, top_p=0.9, min_p=0.01, repeat_penalty=1.3, frequency_penalty=0.4,
                   presence_penalty=0.2, logit_bias={7: 5.0, 11: -np.inf, 4095: 2.5}),
    SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=8, logit_bias={3: 1.5}),
]


def mirror_samplers(generations) -> list[Sampler]:
    """A fresh sampler per generation, seeded as its own and past the draw its first (host-sampled) token took."""
    mirrors = []
    for g in generations:
        mirror = Sampler(g.params)
        mirror.rng = np.random.default_rng(g.sampler.seed)
        if g.params.temperature > 0:
            mirror.rng.random()
        mirrors.append(mirror)
    return mirrors


class FixedDraw:
    """Stands in for a sampler's generator: every draw is ``u``."""

    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


def pack(allowed: np.ndarray) -> np.ndarray:
    """One bool per token -> the packed int32 bitmask ``Sampler.sample(mask=)`` takes."""
    bits = np.packbits(allowed, bitorder="little")
    return np.pad(bits, (0, -len(bits) % 4)).view(np.int32)


class EveryThirdToken:
    """A stand-in grammar: after h accepted tokens it allows the ids t with (t + h) % 3 == 0 (a third of the
    vocabulary, a different third each step), and never finishes."""

    done, accepting = False, False

    def __init__(self, vocab: int):
        self.vocab, self.accepted = vocab, []

    def mask(self) -> np.ndarray:
        return pack((np.arange(self.vocab) + len(self.accepted)) % 3 == 0)

    def accept(self, token: int) -> None:
        assert (token + len(self.accepted)) % 3 == 0, "a token the mask did not allow"
        self.accepted.append(token)


def kernel_inputs(rows: list[DeviceRow], masks: list[np.ndarray | None], vocab: int,
                  cap: int = 128) -> tuple[np.ndarray, ...]:
    """The sampling kernel's arrays for these rows: fparams, iparams, adjust ids, adjust, masks (flag + words)."""
    n = len(rows)
    fparams = np.array([(*r.floats, r.uniform, 0.0) for r in rows], np.float32)
    iparams = np.array([(r.top_k, len(r.ids)) for r in rows], np.int32)
    ids, adjust = np.zeros((n, cap), np.int32), np.zeros((n, cap, 2), np.float32)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)], adjust[i, :len(r.ids), 0], adjust[i, :len(r.ids), 1] = r.ids, r.bias, r.counts
    words = np.zeros((n, 1 + (vocab + 31) // 32), np.int32)
    for i, mask in enumerate(masks):
        if mask is not None:
            words[i, 0], words[i, 1:] = 1, mask
    return fparams, iparams, ids, adjust, words


def random_mask(rng: np.random.Generator, vocab: int, kind: str) -> np.ndarray | None:
    """No grammar, a dense mask, a grammar allowing 3 tokens (fewer than top_k), or one allowing one token."""
    if kind == "none":
        return None
    allowed = np.zeros(vocab, bool)
    count = {"dense": vocab // 2, "three": 3, "one": 1}[kind]
    allowed[rng.choice(vocab, count, replace=False)] = True
    return pack(allowed)


def case(rng: np.random.Generator, vocab: int, n_rows: int) -> tuple[np.ndarray, list, list, list]:
    """Logits (with ties), each row's settings + draw, mask, and the host sampler's token."""
    logits = (rng.standard_normal((n_rows, vocab)) * 3).astype(np.float32)
    logits[:, 100:103] = logits[:, 100:101]
    rows, masks, expected = [], [], []
    for i in range(n_rows):
        params, u = SAMPLING[i % len(SAMPLING)], float(rng.random())
        history = list(rng.integers(0, vocab, 20))
        mask = random_mask(rng, vocab, ("none", "dense", "three", "one")[i % 4])
        host = Sampler(params)
        host.rng = FixedDraw(u)
        expected.append(host.sample(logits[i], history, mask))
        device = Sampler(params)
        device.rng = FixedDraw(u)
        rows.append(device.draw(device.device_row(history, vocab, 128)))
        masks.append(mask)
    return logits, rows, masks, expected


def test_twin_picks_the_host_samplers_token_under_masks():
    """Every setting with no mask, half the vocabulary, 3 tokens (fewer than top_k) and 1 token allowed."""
    rng = np.random.default_rng(0)
    logits, rows, masks, expected = case(rng, 5000, 8 * len(SAMPLING))
    got = sample_rows(logits, *kernel_inputs(rows, masks, 5000))
    assert got.tolist() == expected
    for token, mask in zip(got, masks):
        if mask is not None:
            assert unpack_mask(mask, 5000)[token]


def test_mask_comes_before_the_filters():
    """top_k=1 over a mask that bans the best token keeps the best *allowed* token: the mask is applied first."""
    logits = np.array([[5.0, 4.0, 3.0, 2.0]], np.float32)
    row = Sampler(SamplingParams(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0)).device_row([], 4, 8)
    mask = pack(np.array([False, False, True, True]))
    assert sample_rows(logits, *kernel_inputs([row], [mask], 4)).tolist() == [2]


def test_a_row_with_nothing_allowed_gives_minus_one_as_the_host_raises():
    logits = np.zeros((2, 40), np.float32)
    row = Sampler(SamplingParams(temperature=0.8, seed=1)).device_row([], 40, 8)
    nothing, some = pack(np.zeros(40, bool)), pack(np.arange(40) == 33)
    assert sample_rows(logits, *kernel_inputs([row, row], [nothing, some], 40)).tolist() == [-1, 33]
    with pytest.raises(ValueError, match="every token is banned"):
        Sampler(SamplingParams(temperature=0.8)).sample(logits[0], [], nothing)


def test_rows_without_the_flag_ignore_their_mask_words():
    logits = np.array([[0.0, 9.0, 1.0]], np.float32)
    row = Sampler(SamplingParams(temperature=0)).device_row([], 3, 8)
    inputs = list(kernel_inputs([row], [pack(np.array([True, False, True]))], 3))
    assert sample_rows(logits, *inputs).tolist() == [2]
    inputs[-1][0, 0] = 0
    assert sample_rows(logits, *inputs).tolist() == [1]
