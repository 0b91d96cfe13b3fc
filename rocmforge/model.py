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
from rocmforge.constraints import Constraint, Grammar, GrammarError, grammar_from
from rocmforge.engine import Generation, step_all
from rocmforge.gguf_file import GGUFFile
from rocmforge.hooked_model import HookedModel
from rocmforge.hooks import Hooks, hook_names
from rocmforge.kv_cache import KVCache
from rocmforge.logprobs import chat_logprobs, completion_logprobs
from rocmforge.registry import DEFAULT_MODEL, resolve
from rocmforge.sampler import SamplingParams
from rocmforge.tokenizer import Tokenizer
from rocmforge.tools import OfferedTools, assistant_message, forced_call_grammar, template_knows_tools, tool_messages
from rocmforge.weights import Weights

ARCHITECTURES: dict[str, ModuleType] = {"llama": llama, "qwen2": llama, "qwen3": llama, "gemma3": gemma3}
DEFAULT_N_CTX = 4096  # the KV cache is allocated lazily, but a smaller default keeps the worst case modest
KV_BLOCK_SIZE = 16
# Answers from a context store: without penalties a small instruct model loops ("a function that is passed to a
# function that is passed to ..." from SmolLM2-135M, greedy; 8 of 12 questions about the bundled notes). A mild
# repetition penalty over the last 64 tokens keeps it near the passages' words (1.3 made it fluent but off them),
# a frequency penalty grows with each repeat (1.1 alone still let "inner inner inner ..." through), and the loop
# guard bans a third occurrence of any 6-token span (a list answer still repeated one across its items); the chat
# template's end-of-turn token ends the answer, ANSWER_MAX_TOKENS leaves room for a few sentences. Explicit
# options win.
ANSWER_SAMPLING: dict[str, Any] = {"repeat_penalty": 1.1, "frequency_penalty": 0.3, "repeat_last_n": 64,
                                   "repeat_ngram": 6}
ANSWER_MAX_TOKENS = 256


def kv_pool_size(context_length: int, n_ctx: int | None, n_parallel: int) -> tuple[int, int]:
    """``(n_ctx, n_blocks)`` of the KV pool ``load(n_ctx=, n_parallel=)`` makes for a model of ``context_length``.

    >>> kv_pool_size(8192, 100, 2)
    (100, 14)
    """
    n_ctx = min(n_ctx or DEFAULT_N_CTX, context_length)
    return n_ctx, -(-n_ctx // KV_BLOCK_SIZE) * n_parallel


class Model(HookedModel):
    """A loaded model: tokenizer, weights on a backend, a paged KV cache, hooks, and generation methods."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", n_ctx: int | None = None,
                 n_parallel: int = 1, n_threads: int | None = None):
        self.path = Path(path)
        self.gguf = GGUFFile(self.path)
        self.cfg = self.gguf.config
        self.name = self.path.stem
        self.arch = ARCHITECTURES[self.cfg.architecture]
        self.n_ctx, n_blocks = kv_pool_size(self.cfg.context_length, n_ctx, n_parallel)
        self.ops = backend_for_model(None if device == "auto" else device, self.gguf, n_blocks * KV_BLOCK_SIZE)
        self.device = self.ops.name
        if self.device == "cpu":
            # BLAS threads that spin-wait for each other collapse when the cores are shared (16x slower decode
            # measured on a busy 2-core machine), so like llama-cpp-python default to half the cores.
            threadpool_limits(n_threads or max(1, (os.cpu_count() or 2) // 2), user_api="blas")
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        self.weights = Weights.load(self.gguf, self.ops)
        self.kv = KVCache(self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim, self.cfg.head_dim_v,
                          self.n_ctx, n_blocks=n_blocks, block_size=KV_BLOCK_SIZE, ops=self.ops)
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
    def start(self, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: Sequence[str] = (), *,
              logprobs: int | None = None, score_prompt: bool = False, json_schema: Any = None,
              grammar: Grammar | str | None = None, **sampling: Any) -> Generation:
        """A ``Generation`` for ``prompt`` (text or token ids) that you drive with prefill/step/step_layer.

        ``json_schema`` (a dict, JSON text or pydantic model class) or ``grammar`` (Lark or GBNF text, or a
        ``constraints.Grammar``) limit the output to what they allow; ``logprobs``/``score_prompt`` as in
        ``Generation``.
        """
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        found = grammar_from(json_schema, grammar)
        return Generation(self, ids, SamplingParams(**sampling), max_new_tokens, stop, logprobs=logprobs,
                          score_prompt=score_prompt, constraint=self._constraint(found))

    def _constraint(self, grammar: Grammar | None) -> Constraint | None:
        return Constraint(self.tokenizer, grammar) if grammar is not None else None

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: Sequence[str] = (),
               context: Any = None, k: int = 3, **options: Any) -> Iterator[str]:
        """Yield the generated text piece by piece (sampling options as in ``SamplingParams``; ``json_schema`` and
        ``grammar`` as in ``start``).

        ``context``: a context store (or the path of one); the prompt then becomes the question answered from
        its ``k`` best passages (``create_completion`` also returns which passages were cited).
        """
        if context is not None:
            prompt, _ = self.context_prompt(prompt, context, k)
            options = {**ANSWER_SAMPLING, **options}
        return self.start(prompt, max_new_tokens, stop, **options).text_pieces()

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, stop: Sequence[str] = (),
                 context: Any = None, k: int = 3, **options: Any) -> str:
        """The generated continuation of ``prompt`` as one string (``context``/``k`` as in ``stream``).

        >>> model.generate("A person:", max_new_tokens=40, temperature=0,
        ...                json_schema={"type": "object", "properties": {"age": {"type": "integer"}},
        ...                             "required": ["age"]})  # doctest: +SKIP
        '{"age": 25}'
        """
        return "".join(self.stream(prompt, max_new_tokens, stop, context, k, **options))

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
                          stop: str | Sequence[str] | None = None, context: Any = None, k: int = 3, *,
                          logprobs: int | None = None, echo: bool = False, n: int = 1,
                          grammar: Grammar | str | None = None, response_format: Any = None,
                          **sampling: Any) -> dict | Iterator[dict]:
        """Like ``Llama.create_completion``: a ``text_completion`` dict, or an iterator of chunks with ``stream``.

        ``logprobs``: each token's log-probability and that many alternatives (``choices[i]["logprobs"]``:
        ``tokens``, ``text_offset``, ``token_logprobs``, ``top_logprobs``); with ``echo`` the prompt's text and
        its tokens' log-probabilities come first (lm-evaluation-harness scores answers this way). ``n`` choices
        share the prompt's KV blocks. ``grammar``/``response_format`` constrain the text (``constraints``).
        With ``context`` (a store or its path) the prompt is answered from the store (``ANSWER_SAMPLING`` for the
        options not given) and the result carries ``citations`` (chunk ids and sources of the passages in the prompt).

        >>> out = model.create_completion("1 + 1 =", max_tokens=1, temperature=0, logprobs=2, echo=True)  # doctest: +SKIP
        >>> out["choices"][0]["logprobs"]["tokens"], out["choices"][0]["logprobs"]["token_logprobs"][0]  # doctest: +SKIP
        (['1', ' +', ' ', '1', ' =', ' ', '2'], None)
        """
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if context is not None:
            prompt, head["citations"] = self.context_prompt(prompt, context, k)
            sampling = {**ANSWER_SAMPLING, **sampling}
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        prompt_text = prompt if isinstance(prompt, str) else self.detokenize(ids)
        gens = self._start_choices(ids, max_tokens, stop, sampling, n, logprobs, echo and logprobs is not None,
                                   grammar_from(grammar=grammar, response_format=response_format))
        if stream:
            return self._completion_chunks(gens, head, prompt_text if echo else "")

        texts = _run_choices(gens)
        choices = []
        for i, (gen, text) in enumerate(zip(gens, texts)):
            entries = None
            if logprobs is not None:
                scored = [ids[0], *gen.prompt_logprobs] if echo else []
                entries = completion_logprobs(self.tokenizer, scored + gen.token_logprobs,
                                              0 if echo else len(prompt_text))
            choices.append({"text": prompt_text + text if echo else text, "index": i, "logprobs": entries,
                            "finish_reason": gen.finish_reason})
        return {**head, "choices": choices, "usage": _usage(gens)}

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None, stream: bool = False,
                               stop: str | Sequence[str] | None = None, context: Any = None, k: int = 3, *,
                               logprobs: bool = False, top_logprobs: int | None = None, n: int = 1,
                               response_format: Any = None, grammar: Grammar | str | None = None,
                               tools: list[dict] | None = None, tool_choice: Any = None,
                               **sampling: Any) -> dict | Iterator[dict]:
        """Like ``Llama.create_chat_completion``: the messages rendered with the model's chat template.

        ``logprobs``/``top_logprobs``: ``choices[i]["logprobs"]["content"]`` per token (OpenAI's chat shape).
        ``response_format``/``grammar`` constrain the answer; ``tools``/``tool_choice`` as in ``rocmforge.tools``
        (a call comes back as ``message["tool_calls"]`` with finish_reason "tool_calls").
        With ``context`` the last user message is answered from the store (``ANSWER_SAMPLING`` for the options not
        given, ``ANSWER_MAX_TOKENS`` when ``max_tokens`` is None); the result carries ``citations``.
        """
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name}
        if context is not None:
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            content, head["citations"] = self.context_prompt(messages[last]["content"], context, k)
            messages = [*messages[:last], {**messages[last], "content": content}, *messages[last + 1:]]
            sampling = {**ANSWER_SAMPLING, **sampling}
            max_tokens = ANSWER_MAX_TOKENS if max_tokens is None else max_tokens
        prompt, found, tools = self.chat_prompt(messages, tools, tool_choice, response_format, grammar)
        gens = self._start_choices(self.tokenize(prompt), max_tokens, stop, sampling, n,
                                   (top_logprobs or 0) if logprobs else None, False, found)
        if stream:
            return self._chat_chunks(gens, head, tools)
        texts = _run_choices(gens)
        choices = []
        for i, (gen, text) in enumerate(zip(gens, texts)):
            message, finish = assistant_message(text, gen.finish_reason, tools)
            choices.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(self.tokenizer, gen.token_logprobs) if logprobs else None,
                            "finish_reason": finish})
        return {**head, "choices": choices, "usage": _usage(gens)}

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: Any = None,
                    response_format: Any = None, grammar: Grammar | str | None = None
                    ) -> tuple[str, Grammar | None, OfferedTools | None]:
        """(prompt text, the grammar the answer must follow or None, the tools the answer may call and their call
        syntax, or None) for a chat request; raises ``GrammarError`` (a ``ValueError``) on a bad schema, grammar or
        tool."""
        found = grammar_from(grammar=grammar, response_format=response_format)
        if not tools or tool_choice == "none":
            return self.apply_chat_template(messages), found, None
        template = self.tokenizer.chat_template
        offered = OfferedTools.of(tools, template)
        knows_tools = template_knows_tools(template)
        messages = tool_messages(messages, tools, knows_tools)
        forced = forced_call_grammar(offered, tool_choice, self._special_id)
        if forced is not None and found is not None:
            raise GrammarError("a forced tool call and a response_format or grammar cannot both apply")
        prompt = apply_chat_template(self.tokenizer, messages, tools=tools) if knows_tools else \
            self.apply_chat_template(messages)
        return prompt, forced or found, offered

    def _special_id(self, text: str) -> int | None:
        """The id of the special token spelled ``text`` (``[TOOL_CALLS]``), or None when the vocabulary has none."""
        ids = self.tokenizer.encode(text, add_bos=False, special=True)
        return ids[0] if len(ids) == 1 and self.tokenizer.is_special(ids[0]) else None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` under the model's chat template, ready for ``tokenize(prompt)``
        (which adds BOS when the file says so; a BOS the template wrote is dropped then, as llama.cpp does)."""
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt)

    def _start_choices(self, ids: list[int], max_tokens: int | None, stop: str | Sequence[str] | None,
                       sampling: dict, n: int, logprobs: int | None, score_prompt: bool,
                       grammar: Grammar | None) -> list[Generation]:
        """``n`` generations of one prompt: the first runs the prompt, the others read its KV blocks. Seeded
        choices take seeds ``seed, seed + 1, ...`` so that they differ."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_tokens is None or max_tokens <= 0:  # llama-cpp-python: fill the rest of the context
            max_tokens = self.n_ctx - len(ids)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        seed = sampling.get("seed")
        gens: list[Generation] = []
        for i in range(n):
            params = SamplingParams(**{**sampling, **({"seed": seed + i} if seed is not None else {})})
            gens.append(Generation(self, ids, params, max_tokens, stops, logprobs=logprobs,
                                   score_prompt=score_prompt, constraint=self._constraint(grammar),
                                   share_prompt_of=gens[0] if gens else None))
            if n > 1 and i == 0:
                gens[0].prefill()
        return gens

    def _completion_chunks(self, gens: list[Generation], head: dict, echo_text: str) -> Iterator[dict]:
        def chunk(i: int, text: str, entries: list | None, finish: str | None) -> dict:
            logprobs = completion_logprobs(self.tokenizer, entries) if entries is not None else None
            return {**head, "choices": [{"text": text, "index": i, "logprobs": logprobs, "finish_reason": finish}]}

        if echo_text:
            for i, gen in enumerate(gens):
                gen.prefill()  # the prompt's log-probabilities come from its prefill
                entries = [gen.tokens[0], *gen.prompt_logprobs] if gen.n_logprobs is not None else None
                yield chunk(i, echo_text, entries, None)
        for i, text in _stream_choices(gens):
            gen = gens[i]
            yield chunk(i, text, gen.take_logprobs() if gen.n_logprobs is not None else None, None)
        for i, gen in enumerate(gens):
            yield {**chunk(i, "", gen.take_logprobs() if gen.n_logprobs is not None else None, gen.finish_reason),
                   **({"usage": _usage(gens)} if i == len(gens) - 1 else {})}

    def _chat_chunks(self, gens: list[Generation], head: dict, tools: OfferedTools | None) -> Iterator[dict]:
        head = {**head, "object": "chat.completion.chunk"}

        def chunk(i: int, delta: dict, finish: str | None) -> dict:
            gen = gens[i]
            logprobs = chat_logprobs(self.tokenizer, gen.take_logprobs()) if gen.n_logprobs is not None else None
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        for i in range(len(gens)):
            yield chunk(i, {"role": "assistant"}, None)
        texts = [""] * len(gens)
        for i, text in _stream_choices(gens):
            if tools:  # a tool call is only known whole: hold the text back until the end
                texts[i] += text
            else:
                yield chunk(i, {"content": text}, None)
        for i, gen in enumerate(gens):
            delta, finish = {}, gen.finish_reason
            if tools:
                message, finish = assistant_message(texts[i], finish, tools)
                delta = {"content": message["content"]} if message.get("content") else {}
                if "tool_calls" in message:
                    delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(message["tool_calls"])]
            yield {**chunk(i, delta, finish), **({"usage": _usage(gens)} if i == len(gens) - 1 else {})}


def _stream_choices(gens: list[Generation]) -> Iterator[tuple[int, str]]:
    """(choice index, new text) as the choices advance together, one batched forward per token."""
    try:
        while active := [i for i, g in enumerate(gens) if not g.finished]:
            for i, token in zip(active, step_all([gens[i] for i in active])):
                text = gens[i].text_of(token)
                if text:
                    yield i, text
        for i, gen in enumerate(gens):
            rest = gen.rest_of_text()
            if rest:
                yield i, rest
    finally:
        for gen in reversed(gens):
            gen.close()


def _run_choices(gens: list[Generation]) -> list[str]:
    texts = [""] * len(gens)
    for i, text in _stream_choices(gens):
        texts[i] += text
    return texts


def _usage(gens: list[Generation]) -> dict[str, int]:
    # like llama-cpp-python, the end-of-generation token that stopped a choice is not counted as completion
    eot = gens[0].model.tokenizer.eot_ids
    completion = sum(g.n_generated - (g.n_generated > 0 and g.tokens[-1] in eot) for g in gens)
    n_prompt = gens[0].n_prompt
    return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}


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
