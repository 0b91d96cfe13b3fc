"""Logits -> next token: penalties, logit bias, top-k, top-p, min-p, temperature, seeded draw.

The chain follows llama.cpp's default sampler chain (``common/sampling.cpp``), so the same
settings mean the same thing here as in llama.cpp and llama-cpp-python:

    logit bias -> penalties -> top-k -> top-p -> min-p -> temperature -> draw

Consequences of that order worth knowing:

* Bias comes before penalties (llama.cpp adds its logit-bias sampler first in the chain), so a
  repetition penalty divides an already biased logit.
* top-p and min-p look at the temperature-1 distribution of the tokens that survived the step
  before; temperature only reshapes what survives. temperature 0 is greedy: the argmax of the
  biased, penalized logits (every filter keeps the most likely token, so the chain agrees).
* Ties at a top-k or top-p boundary are kept together: both filters keep every token at least
  as likely as the boundary token, so the result never depends on sort order.

Each ``Sampler`` owns its ``numpy.random.Generator`` seeded from ``SamplingParams.seed``: a
sequence draws the same tokens whether it runs alone or in a batch with others.

>>> import numpy as np
>>> logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
>>> sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0, seed=7))
>>> sampler.distribution(logits, history=[]).round(4).tolist()
[0.625, 0.375, 0.0, 0.0]
>>> sampler.sample(logits, history=[]) in (0, 1)
True
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults are llama-cpp-python's.

    temperature: 0 means greedy. top_k: 0 disables. top_p: 1 disables. min_p: 0 disables.
    repeat_penalty (1 disables) divides positive and multiplies non-positive logits of tokens seen
    in the last ``repeat_last_n`` tokens of history (0: no penalties, -1: the whole history);
    frequency_penalty and presence_penalty subtract ``count * frequency + presence`` over the
    same window (llama.cpp semantics). repeat_ngram (0: off) bans a token that would make the last
    ``repeat_ngram`` tokens a span already seen twice in the history (a loop guard; not in llama.cpp).
    logit_bias maps token id -> value added to its logit;
    ``-inf`` bans a token. seed: None picks a random seed (``Sampler.seed`` tells which).

    >>> SamplingParams(temperature=0).temperature
    0
    >>> SamplingParams(top_p=1.5)
    Traceback (most recent call last):
    ...
    ValueError: top_p must be in (0, 1], got 1.5
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_ngram: int = 0
    logit_bias: Mapping[int, float] = field(default_factory=dict, hash=False)
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0", self.temperature),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables)", self.top_k),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p),
            (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0, "repeat_penalty must be > 0", self.repeat_penalty),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1 (-1: whole history)", self.repeat_last_n),
            (math.isfinite(self.frequency_penalty), "frequency_penalty must be finite", self.frequency_penalty),
            (math.isfinite(self.presence_penalty), "presence_penalty must be finite", self.presence_penalty),
            (self.repeat_ngram >= 0 and self.repeat_ngram != 1, "repeat_ngram must be 0 (off) or >= 2",
             self.repeat_ngram),
            (self.seed is None or self.seed >= 0, "seed must be a non-negative integer or None", self.seed),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ValueError(f"{message}, got {value}")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, (int, np.integer)) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if math.isnan(bias) or bias == math.inf:
                raise ValueError(f"logit_bias[{token}] must be finite or -inf, got {bias}")


@dataclass(frozen=True)
class DeviceRow:
    """One sequence's sampling settings for its next token, in the form a device sampling kernel reads
    (``kernels/sample.hip``, ``sample_rows``): the same chain as ``Sampler.sample`` with the random draw made here.

    ``ids`` are the token ids whose logit is adjusted, each once, with their logit bias and their count in the
    penalty window (0: bias only); ``uniform`` is the draw in [0, 1) (0 when greedy).
    """

    top_k: int
    floats: tuple[float, float, float, float, float, float]  # temperature, top_p, min_p, repeat, frequency, presence
    ids: np.ndarray
    bias: np.ndarray
    counts: np.ndarray
    uniform: float = 0.0


class Sampler:
    """Picks tokens for one sequence; holds its own seeded random generator and buffers.

    Use one Sampler per sequence (and per thread): that is what makes seeds reproducible.

    >>> import numpy as np
    >>> logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    >>> Sampler(SamplingParams(temperature=0)).sample(logits, history=[])
    1
    >>> Sampler(SamplingParams(temperature=0, repeat_penalty=4.0)).sample(logits, history=[1])
    2
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(64)
        self.rng = np.random.default_rng(self.seed)
        self._bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias))
        self._bias_values = np.fromiter(params.logit_bias.values(), dtype=np.float64, count=len(params.logit_bias))
        # Reused float64 buffers: fresh vocab-sized temporaries each token cost more than the
        # arithmetic (the allocator maps and unmaps them).
        self._logits = np.empty(0)
        self._scratch = np.empty(0)
        self._device_row: DeviceRow | None = None  # device_row() without penalties: the same every token

    def distribution(self, logits: np.ndarray, history: Sequence[int], mask: np.ndarray | None = None) -> np.ndarray:
        """The float64 probabilities over the vocabulary that ``sample`` draws from.

        ``history`` is every token id of the sequence so far (prompt and generated); penalties
        look at its last ``repeat_last_n``.

        >>> import numpy as np
        >>> p = Sampler(SamplingParams(temperature=2.0, top_k=2, min_p=0.0)).distribution(
        ...     np.array([0.0, 2.0, 4.0], dtype=np.float32), history=[])
        >>> p.round(4).tolist()
        [0.0, 0.2689, 0.7311]
        """
        ids, probs = self._candidates(logits, history, mask)
        full = np.zeros(len(logits), dtype=np.float64)
        full[ids] = probs
        return full

    def sample(self, logits: np.ndarray, history: Sequence[int], mask: np.ndarray | None = None) -> int:
        """Draw the next token id from ``distribution(logits, history, mask)`` (argmax when greedy).

        ``mask``: the allowed tokens as a packed int32 bitmask ``[ceil(vocab / 32)]`` (bit ``t % 32`` of word
        ``t // 32``; ``constraints.Constraint.mask()`` makes one); the others are banned before the chain runs.
        """
        ids, probs = self._candidates(logits, history, mask)
        return self._pick(ids, probs)

    def sample_from(self, probs: np.ndarray) -> int:
        """Draw from a distribution already computed by ``distribution``.

        Given the same generator state it returns what ``sample`` would have, so a UI can show the
        probabilities and still get the token the sampler would pick.
        """
        ids = np.flatnonzero(probs > 0)
        return self._pick(ids, probs[ids])

    def device_row(self, history: Sequence[int], vocab_size: int, capacity: int) -> DeviceRow | None:
        """This token's settings for a device sampler (``uniform`` still 0: see ``draw``); None when more than
        ``capacity`` ids are adjusted, a biased id is outside the vocabulary (``sample`` on the host says so) or the
        ``repeat_ngram`` loop guard is on.

        >>> row = Sampler(SamplingParams(temperature=0, logit_bias={3: -1.0})).device_row([3, 3], 10, 8)
        >>> row.ids.tolist(), row.bias.tolist(), row.counts.tolist()
        ([3], [-1.0], [0.0])
        """
        p = self.params
        if p.repeat_ngram:  # the loop guard reads the whole history: host only
            return None
        neutral = p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
        if neutral or p.repeat_last_n == 0:  # the same every token: made once
            if self._device_row is None:
                self._device_row = self._device_row_from(self._bias_ids, self._bias_values.astype(np.float32),
                                                         np.zeros(len(self._bias_ids), np.float32), vocab_size, capacity)
            return self._device_row
        ids, bias, counts = self._bias_ids, self._bias_values.astype(np.float32), np.zeros(len(self._bias_ids), np.float32)
        if len(history):
            window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
            seen, seen_counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
            merged = np.union1d(ids, seen)
            merged_bias, merged_counts = np.zeros(len(merged), np.float32), np.zeros(len(merged), np.float32)
            merged_bias[np.searchsorted(merged, ids)] = bias
            merged_counts[np.searchsorted(merged, seen)] = seen_counts
            ids, bias, counts = merged, merged_bias, merged_counts
        return self._device_row_from(ids, bias, counts, vocab_size, capacity)

    def _device_row_from(self, ids: np.ndarray, bias: np.ndarray, counts: np.ndarray, vocab_size: int,
                         capacity: int) -> DeviceRow | None:
        p = self.params
        if len(ids) > capacity or (len(self._bias_ids) and self._bias_ids.max() >= vocab_size):
            return None
        floats = (p.temperature, p.top_p, p.min_p, p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
        return DeviceRow(p.top_k, floats, ids.astype(np.int32), bias, counts)

    def draw(self, row: DeviceRow) -> DeviceRow:
        """``row`` with this token's uniform number, drawn exactly as ``sample`` draws it (none when greedy)."""
        return replace(row, uniform=self.rng.random()) if self.params.temperature > 0 else row

    def _pick(self, ids: np.ndarray, probs: np.ndarray) -> int:
        if self.params.temperature == 0:
            return int(ids[np.argmax(probs)])  # greedy uses no random numbers
        # Exactly one uniform number per token, inverse CDF over survivors in token-id order:
        # the generator's stream never depends on how many tokens survived.
        cdf = np.cumsum(probs)
        index = np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")
        return int(ids[min(index, len(cdf) - 1)])

    def _candidates(self, logits: np.ndarray, history: Sequence[int],
                    mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Surviving token ids (ascending) and their final probabilities."""
        p = self.params
        if len(self._logits) != len(logits):
            self._logits, self._scratch = np.empty(len(logits)), np.empty(len(logits))
        x, scratch = self._logits, self._scratch
        np.copyto(x, logits)  # the caller's logits stay untouched
        self._add_bias(x)
        self._penalize(x, history)
        if p.repeat_ngram:
            _ban_third_repeat(x, history, p.repeat_ngram)
        grammar_ids = None
        if mask is not None:
            allowed = np.unpackbits(mask.view(np.uint8), count=len(x), bitorder="little").view(bool)
            if np.count_nonzero(allowed) < len(x):  # the chain runs on the allowed tokens only: a partition
                grammar_ids = np.flatnonzero(allowed)  # over many equal -inf values is several times slower
                x, scratch = x[grammar_ids], np.empty(len(grammar_ids))
                if len(x) == 0:
                    _check_alive(-math.inf)
        if p.temperature == 0:
            best = int(np.argmax(x))
            _check_alive(x[best])
            return np.array([best if grammar_ids is None else grammar_ids[best]]), np.array([1.0])

        ids = _top_k(x, p.top_k, scratch)
        z = x[ids]
        if grammar_ids is not None:
            ids = grammar_ids[ids]
        if p.top_p < 1.0:
            keep = _top_p_mask(z, p.top_p)
            ids, z = ids[keep], z[keep]
        if p.min_p > 0.0:
            keep = z >= z.max() + math.log(p.min_p)  # p_i >= min_p * p_max, in logit space
            ids, z = ids[keep], z[keep]
        return ids, _softmax(z / p.temperature)

    def _add_bias(self, x: np.ndarray) -> None:
        if len(self._bias_ids) == 0:
            return
        if self._bias_ids.max() >= len(x):
            raise ValueError(f"logit_bias token id {int(self._bias_ids.max())} is outside the vocabulary of {len(x)}")
        x[self._bias_ids] += self._bias_values

    def _penalize(self, x: np.ndarray, history: Sequence[int]) -> None:
        p = self.params
        neutral = p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
        if neutral or p.repeat_last_n == 0 or len(history) == 0:
            return
        window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
        ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
        seen = x[ids]
        # Dividing a negative logit would make the token *more* likely; llama.cpp multiplies it.
        seen = np.where(seen <= 0, seen * p.repeat_penalty, seen / p.repeat_penalty)
        x[ids] = seen - (counts * p.frequency_penalty + p.presence_penalty)


def _ban_third_repeat(x: np.ndarray, history: Sequence[int], n: int) -> None:
    """Ban (-inf) every token that would end an ``n``-token span already in ``history`` twice: a loop guard that
    still lets a model copy a phrase of its prompt once, or say it twice.

    >>> x = np.zeros(4)
    >>> _ban_third_repeat(x, [1, 2, 3, 1, 2, 3, 1, 2], 3)
    >>> x.tolist()
    [0.0, 0.0, 0.0, -inf]
    """
    if len(history) < n:
        return
    tail = tuple(history[len(history) - n + 1:])
    seen: dict[int, int] = {}
    last = tail[-1]
    for i in range(len(history) - n + 1):
        if history[i + n - 2] == last and tuple(history[i:i + n - 1]) == tail:
            following = history[i + n - 1]
            seen[following] = seen.get(following, 0) + 1
    banned = [token for token, count in seen.items() if count >= 2]
    if banned:
        x[banned] = -math.inf


def _check_alive(best_logit: float) -> None:
    if best_logit == -math.inf:
        raise ValueError("every token is banned (all logits are -inf after logit_bias and the grammar's mask)")


def _top_k(x: np.ndarray, k: int, scratch: np.ndarray) -> np.ndarray:
    """Ids of the k largest finite logits, plus any tied with the k-th (ascending ids)."""
    kth = -np.inf
    if 0 < k < len(x):
        np.copyto(scratch, x)
        scratch.partition(len(x) - k)  # O(vocab), no sort
        kth = scratch[len(x) - k]
    ids = np.flatnonzero(x >= kth) if kth > -np.inf else np.flatnonzero(x > -np.inf)
    if len(ids) == 0:
        _check_alive(-math.inf)
    return ids


def _top_p_mask(z: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the most likely tokens until their probability reaches top_p (at least one).

    Only the head of the distribution is sorted: the m most likely tokens, with m growing
    until their cumulative probability crosses top_p.
    """
    probs = _softmax(z)
    m = min(64, len(probs))
    while True:
        head = np.sort(np.partition(probs, len(probs) - m)[len(probs) - m:])[::-1]
        cumulative = np.cumsum(head)
        cut = int(np.searchsorted(cumulative, top_p, side="left"))  # first index with sum >= top_p
        if cut < m or m == len(probs):
            break
        m = min(4 * m, len(probs))
    boundary = head[min(cut, m - 1)]
    return probs >= boundary


def _softmax(z: np.ndarray) -> np.ndarray:
    e = z - z.max()
    np.exp(e, out=e)  # in place: one vocab-sized temporary instead of three
    e /= e.sum()
    return e


def top_alternatives(probs: np.ndarray, n: int = 5) -> list[tuple[int, float]]:
    """The n most likely tokens with nonzero probability, most likely first (ties: lower id first).

    >>> import numpy as np
    >>> top_alternatives(np.array([0.1, 0.0, 0.6, 0.3]), n=2)
    [(2, 0.6), (3, 0.3)]
    """
    nonzero = np.flatnonzero(probs > 0)
    if n <= 0:
        return []
    if len(nonzero) > n:
        values = probs[nonzero]
        nth = np.partition(values, len(values) - n)[len(values) - n]
        nonzero = nonzero[values >= nth]
    order = np.lexsort((nonzero, -probs[nonzero]))[:n]
    return [(int(t), float(probs[t])) for t in nonzero[order]]


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    ``feed(piece)`` returns ``(text_safe_to_emit, stopped)``. Text that could be the start of a
    stop string is held back until the next piece shows whether it is; once a stop string matches,
    the text before it is returned with ``stopped=True`` and the stop string itself is dropped
    (``matched`` names it). At the end of a generation without a stop, ``flush()`` returns what is
    still held. Empty stop strings are ignored.

    >>> m = StopMatcher(["</s>", "\\nUser:"])
    >>> m.feed("Hello <"), m.feed("/"), m.feed("s> more")
    (('Hello ', False), ('', False), ('', True))
    >>> m = StopMatcher(["</s>"])
    >>> m.feed("a <"), m.feed("b"), m.flush()
    (('a ', False), ('<b', False), '')
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops: tuple[str, ...] = tuple(s for s in stops if s)
        self.matched: str | None = None
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.matched is not None:
            return "", True
        text = self._held + piece
        hits = [(text.find(stop), stop) for stop in self.stops]
        hits = [hit for hit in hits if hit[0] >= 0]
        if hits:
            start, self.matched = min(hits)
            self._held = ""
            return text[:start], True
        held = self._partial_stop_length(text)
        self._held = text[len(text) - held:] if held else ""
        return text[: len(text) - held], False

    def flush(self) -> str:
        """Release the held text (the generation ended without a stop string)."""
        text, self._held = self._held, ""
        return text

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the beginning of some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
