"""``Model``: a GGUF model ready to run, with an API that feels like llama-cpp-python's ``Llama``.

>>> import rocmforge
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=4, temperature=0)  # doctest: +SKIP
' Paris. It is'
>>> out = model.create_chat_completion([{"role": "user", "content": "Hi!"}], max_tokens=8, seed=1)  # doctest: +SKIP
>>> out["choices"][0]["message"]["role"], out["usage"]["prompt_tokens"] > 0  # doctest: +SKIP
('assistant', True)
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from rocmforge.arch import gemma3, llama
from rocmforge.arch.context import ForwardContext
from rocmforge.backends.profiler import Profile, profile_model
from rocmforge.backends.select import backend_for_model
from rocmforge.chat import apply_chat_template
from rocmforge.engine import Generation
from rocmforge.gguf_file import GGUFFile
from rocmforge.hooked_model import HookedModel
from rocmforge.hooks import Hooks, hook_names
from rocmforge.kv_cache import KVCache
from rocmforge.registry import DEFAULT_MODEL, resolve
from rocmforge.sampler import SamplingParams
from rocmforge.tokenizer import Tokenizer
from rocmforge.weights import Weights

ARCHITECTURES: dict[str, ModuleType] = {"llama": llama, "qwen2": llama, "qwen3": llama, "gemma3": gemma3}
DEFAULT_N_CTX = 4096  # the KV cache is allocated lazily, but a smaller default keeps the worst case modest


class Model(HookedModel):
    """A loaded model: tokenizer, weights on a backend, a paged KV cache, hooks, and generation methods."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", n_ctx: int | None = None,
                 n_parallel: int = 1, n_threads: int | None = None):
        self.path = Path(path)
        self.gguf = GGUFFile(self.path)
        self.cfg = self.gguf.config
        self.name = self.path.stem
        self.arch = ARCHITECTURES[self.cfg.architecture]
        self.n_ctx = min(n_ctx or DEFAULT_N_CTX, self.cfg.context_length)
        block_size = 16
        n_blocks = -(-self.n_ctx // block_size) * n_parallel
        self.ops = backend_for_model(None if device == "auto" else device, self.gguf, n_blocks * block_size)
        self.device = self.ops.name
        if self.device == "cpu":
            # BLAS threads that spin-wait for each other collapse when the cores are shared (16x slower decode
            # measured on a busy 2-core machine), so like llama-cpp-python default to half the cores.
            threadpool_limits(n_threads or max(1, (os.cpu_count() or 2) // 2), user_api="blas")
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        self.weights = Weights.load(self.gguf, self.ops)
        self.kv = KVCache(self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim, self.cfg.head_dim_v,
                          self.n_ctx, n_blocks=n_blocks, block_size=block_size, ops=self.ops)
        self.hook_registry = Hooks(self.ops, valid_names=hook_names(self.cfg.n_layers))
        self.ctx = ForwardContext(self.cfg, self.weights, self.ops, self.kv, self.hook_registry)
        finish_load = getattr(self.ops, "finish_load", None)  # cpu-exact: release file pages, compile kernels once
        if finish_load is not None:
            finish_load(self)
        # How retrieved passages become the question's text (placeholders {context}, {question}); the result is
        # then the user turn of the chat template, or the raw prompt for completions. None: the store's default.
        self.context_template: str | None = None

    def __repr__(self) -> str:
        return f"Model({self.name!r}, architecture={self.cfg.architecture!r}, device={self.device!r}, n_ctx={self.n_ctx})"

    # --- tokens ----------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Text -> token ids (a BOS is added when the model file asks for one, unless ``add_bos`` says otherwise)."""
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``[len(ids), vocab]`` (float32) of every position of ``ids``, run as one fresh sequence."""
        seq = self.kv.new_sequence()
        try:
            batch = self.kv.prepare([(seq, list(ids))])
            return self.ops.to_host(self.arch.forward(self.ctx, batch))
        finally:
            self.kv.free(seq)

    def profile(self, prompt: str | Sequence[int], n_tokens: int = 4) -> Profile:
        """Where the time goes: the prefill of ``prompt`` and ``n_tokens`` greedy decode steps, every kernel
        timed (device events on a GPU, the wall clock around each op on the CPU) and labelled by layer.

        Steps run eagerly (no decode graph), so a GPU step takes longer than inside ``generate``.

        >>> p = rocmforge.load("smollm2-135m", device="cpu").profile("Hello", n_tokens=2)  # doctest: +SKIP
        >>> sorted(p.by_layer("decode 1"))[:2], p.by_kernel("decode 1")["matmul"][0]  # doctest: +SKIP
        (['embed', 'layer 0'], 211)
        >>> print(p.table(top=3)); p.plot("decode")  # doctest: +SKIP
        """
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return profile_model(self.ctx, self.arch, ids, n_tokens)

    # --- generation ------------------------------------------------------------------------------------------
    def start(self, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: Sequence[str] = (),
              **sampling: Any) -> Generation:
        """A ``Generation`` for ``prompt`` (text or token ids) that you drive with prefill/step/step_layer."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return Generation(self, ids, SamplingParams(**sampling), max_new_tokens, stop)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: Sequence[str] = (),
               context: Any = None, k: int = 3, **sampling: Any) -> Iterator[str]:
        """Yield the generated text piece by piece (sampling options as in ``SamplingParams``).

        ``context``: a context store (or the path of one); the prompt then becomes the question answered from
        its ``k`` best passages (``create_completion`` also returns which passages were cited).
        """
        if context is not None:
            prompt, _ = self.context_prompt(prompt, context, k)
        return self.start(prompt, max_new_tokens, stop, **sampling).text_pieces()

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: Sequence[str] = (),
                 context: Any = None, k: int = 3, **sampling: Any) -> str:
        """The generated continuation of ``prompt`` as one string (``context``/``k`` as in ``stream``)."""
        return "".join(self.stream(prompt, max_new_tokens, stop, context, k, **sampling))

    def context_prompt(self, question: str, context: Any, k: int = 3) -> tuple[str, list[dict]]:
        """(prompt answering ``question`` from the store's ``k`` best passages, citations of those passages)."""
        from context_store.prompt import DEFAULT_TEMPLATE, build_context_prompt

        if isinstance(context, (str, os.PathLike)):
            from context_store import ContextStore
            from rocmforge.embedder import default_embedder

            with ContextStore(context, embed=default_embedder()) as store:
                hits = store.search(question, k=k)
        else:
            hits = context.search(question, k=k)
        return build_context_prompt(question, hits, template=self.context_template or DEFAULT_TEMPLATE)

    # --- OpenAI-shaped results -------------------------------------------------------------------------------
    def create_completion(self, prompt: str | Sequence[int], max_tokens: int | None = 16, stream: bool = False,
                          stop: str | Sequence[str] | None = None, context: Any = None, k: int = 3,
                          **sampling: Any) -> dict | Iterator[dict]:
        """Like ``Llama.create_completion``: a ``text_completion`` dict, or an iterator of chunks with ``stream``.

        With ``context`` (a store or its path) the prompt is answered from the store and the result carries
        ``citations`` (chunk ids and sources of the passages in the prompt).
        """
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if context is not None:
            prompt, head["citations"] = self.context_prompt(prompt, context, k)
        gen = self._start_request(prompt, max_tokens, stop, sampling)
        if stream:
            return self._completion_chunks(gen, head)
        text = "".join(gen.text_pieces())
        return {**head, "choices": [{"text": text, "index": 0, "logprobs": None,
                                     "finish_reason": gen.finish_reason}], "usage": _usage(gen)}

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None, stream: bool = False,
                               stop: str | Sequence[str] | None = None, context: Any = None, k: int = 3,
                               **sampling: Any) -> dict | Iterator[dict]:
        """Like ``Llama.create_chat_completion``: the messages rendered with the model's chat template.

        With ``context`` the last user message is answered from the store; the result carries ``citations``.
        """
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name}
        if context is not None:
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            content, head["citations"] = self.context_prompt(messages[last]["content"], context, k)
            messages = [*messages[:last], {**messages[last], "content": content}, *messages[last + 1:]]
        prompt = self.apply_chat_template(messages)
        gen = self._start_request(self.tokenize(prompt), max_tokens, stop, sampling)
        if stream:
            return self._chat_chunks(gen, head)
        text = "".join(gen.text_pieces())
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": None, "finish_reason": gen.finish_reason}], "usage": _usage(gen)}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` under the model's chat template, ready for ``tokenize(prompt)``
        (which adds BOS when the file says so; a BOS the template wrote is dropped then, as llama.cpp does)."""
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt)

    def _start_request(self, prompt: str | Sequence[int], max_tokens: int | None,
                       stop: str | Sequence[str] | None, sampling: dict) -> Generation:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if max_tokens is None or max_tokens <= 0:  # llama-cpp-python: fill the rest of the context
            max_tokens = self.n_ctx - len(ids)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return Generation(self, ids, SamplingParams(**sampling), max_tokens, stops)

    def _completion_chunks(self, gen: Generation, head: dict) -> Iterator[dict]:
        for piece in gen.text_pieces():
            yield {**head, "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}]}
        yield {**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": gen.finish_reason}],
               "usage": _usage(gen)}

    def _chat_chunks(self, gen: Generation, head: dict) -> Iterator[dict]:
        head = {**head, "object": "chat.completion.chunk"}
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        for piece in gen.text_pieces():
            yield {**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": gen.finish_reason}],
               "usage": _usage(gen)}


def _usage(gen: Generation) -> dict[str, int]:
    # like llama-cpp-python, the end-of-generation token that stopped it is not counted as completion
    ended_on_eot = gen.n_generated > 0 and gen.tokens[-1] in gen.model.tokenizer.eot_ids
    completion = gen.n_generated - ended_on_eot
    return {"prompt_tokens": gen.n_prompt, "completion_tokens": completion,
            "total_tokens": gen.n_prompt + completion}


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str = "auto", n_ctx: int | None = None,
         n_parallel: int = 1, n_threads: int | None = None) -> Model:
    """Load a registry model by name (fetched once into the cache) or a local ``.gguf`` file.

    ``device``: "auto" (the GPU when one is usable, else numpy), "cuda", "hip" or "cpu" (``$ROCMFORGE_DEVICE``
    sets it for "auto"), or "cpu-exact": numpy + numba kernels that reproduce llama.cpp's x86 CPU arithmetic bit
    for bit (``rocmforge.backends.exact``; slower; Q4_1/Q5_0/Q8_0/Q4_K/Q6_K weights). ``n_ctx``: context window per
    sequence (default: the model's, capped at 4096). ``n_parallel``: how many full-length sequences the KV pool holds.
    ``n_threads``: BLAS threads on CPU (default: half the cores, as llama-cpp-python; set for the whole process).

    >>> import rocmforge
    >>> model = rocmforge.load("smollm2-135m", device="cpu")  # doctest: +SKIP
    >>> model.cfg.n_layers  # doctest: +SKIP
    30
    """
    return Model(resolve(name_or_path), device=device, n_ctx=n_ctx, n_parallel=n_parallel, n_threads=n_threads)
