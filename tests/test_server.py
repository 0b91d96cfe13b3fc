"""The HTTP server, driven live on a loopback port with the official ``openai`` client (and httpx for raw
bytes): every answer is checked against the engine's own ``Model.generate`` / ``create_chat_completion``,
the MiniLM embedder, or the context store called directly.
"""
from __future__ import annotations

import contextlib
import math
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
from threadpoolctl import threadpool_limits

from context_store import ContextStore
from context_store.prompt import build_context_prompt
from rocmforge.embedder import MiniLMEmbedder
from rocmforge.model import load
from rocmforge.sampler import SamplingParams
from rocmforge.server.app import Limits, LockedEmbedder, create_app
from rocmforge.server.batch_invariant import use_batch_invariant_backend
from rocmforge.server.scheduler import GenerationRequest, Scheduler, TextPiece
from live_server import live_server

KEY = "test-key"
N_CTX = 256
LIMITS = Limits(max_body_bytes=32_000, max_tokens=64, max_messages=8, max_embedding_inputs=8)
DOCS = {
    "wal.md": "SQLite's write-ahead log lets readers keep reading while one writer appends to the log.",
    "owls.md": "Owls hunt at night; their soft feathers make their flight almost silent.",
    "bees.md": "Bees dance to tell the hive where the flowers with nectar are.",
}


@pytest.fixture(scope="module")
def model(smollm2_path):
    model = load(smollm2_path, device="cpu", n_ctx=N_CTX, n_parallel=16)
    assert use_batch_invariant_backend(model)
    with threadpool_limits(1, user_api="blas"):  # as `rocmforge serve` does on 2 cores: a core for the event loop
        yield model


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    return LockedEmbedder(MiniLMEmbedder(minilm_dir))


@pytest.fixture(scope="module")
def store(tmp_path_factory, embedder):
    with ContextStore(tmp_path_factory.mktemp("ctx") / "ctx.db", embed=embedder) as store:
        yield store


@pytest.fixture(scope="module")
def base_url(model, embedder, store):
    app = create_app(model, max_batch=16, max_queue=8, api_key=KEY, embedder=embedder, store=store, limits=LIMITS,
                     workers=2)  # a batch of 32 prompt tokens runs as two parallel forwards of 16
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as http:
        yield http


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match[1])


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def stream_text(client: openai.OpenAI, prompt: str, max_tokens: int, **kw) -> tuple[str, str]:
    pieces, finish = [], None
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, stream=True, **kw):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


# --- batch invariance -------------------------------------------------------------------------------------
def last_logits(model, items: list[tuple[int, list[int]]]) -> np.ndarray:
    batch = model.kv.prepare(items)
    return model.ops.to_host(model.arch.forward(model.ctx, batch, rows=batch.last_rows))


def assert_logits_do_not_depend_on_the_batch(model) -> None:
    """A prompt and three decode steps give the same logits alone and in the middle of a batch of 12 other
    sequences (a rounding difference need not reach the logits at every step: on cpu-exact without the fixed
    kqv order, the first step here agrees and the next two do not)."""
    prompt = model.tokenize("The quick brown fox jumps over the lazy dog. " * 5)
    others = [model.tokenize(f"Another prompt, number {i}, about cats") for i in range(12)]
    seqs = [model.kv.new_sequence() for _ in range(14)]
    alone, batched, rest = seqs[0], seqs[1], seqs[2:]
    steps = [[42], [311], [1000]]
    try:
        alone_logits = [last_logits(model, [(alone, tokens)])[0] for tokens in [prompt, *steps]]
        last_logits(model, list(zip(rest, others)))
        batched_logits = [last_logits(model, [(s, [7]) for s in rest[:5]] + [(batched, prompt)] +
                                      [(s, [7]) for s in rest[5:]])[5]]
        batched_logits += [last_logits(model, [(s, [9]) for s in rest[:10]] + [(batched, tokens)] +
                                       [(s, [9]) for s in rest[10:]])[10] for tokens in steps]
    finally:
        for s in seqs:
            model.kv.free(s)
    for step, (a, b) in enumerate(zip(alone_logits, batched_logits)):
        assert np.array_equal(a, b), f"step {step}"


@pytest.mark.parametrize("threads", [1, 2])
def test_a_sequences_logits_do_not_depend_on_its_batch(model, threads):
    with threadpool_limits(threads, user_api="blas"):
        assert_logits_do_not_depend_on_the_batch(model)


def test_cpu_exact_serves_batch_invariant_too(smollm2_path, gemma3_path):
    exact = load(smollm2_path, device="cpu-exact", n_ctx=N_CTX, n_parallel=16)
    assert use_batch_invariant_backend(exact) and exact.ops.name == "cpu-exact"
    assert_logits_do_not_depend_on_the_batch(exact)
    # Gemma's K-quant weights switch llama.cpp kernels with the row count: no invariant twin, nothing swapped
    gemma = load(gemma3_path, device="cpu-exact", n_ctx=N_CTX)
    ops = gemma.ops
    assert not use_batch_invariant_backend(gemma) and gemma.ops is ops


# --- generation --------------------------------------------------------------------------------------------
def test_completion_is_the_engines_greedy_text(client, model):
    prompt = "The capital of France is"
    expected = model.generate(prompt, max_new_tokens=6, temperature=0)
    r = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(model.tokenize(prompt)) and r.usage.completion_tokens == 6
    assert r.object == "text_completion" and r.model == model.name


def test_chat_completion_is_the_engines_chat(client, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    expected = model.create_chat_completion(messages, max_tokens=24, temperature=0)
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == expected["choices"][0]["finish_reason"] == "stop"  # ended by itself
    assert r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == expected["usage"]


def test_streams_join_to_the_whole_text_and_end_with_done(client, http, model):
    prompt = "Once upon a time"
    whole = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    text, finish = stream_text(client, prompt, 8, temperature=0)
    assert text == whole and finish == "length"

    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=5, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=5, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    raw = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_string_ends_with_stop_and_is_not_emitted(client, model):
    prompt = "Count: one, two, three, four,"
    full = model.generate(prompt, max_new_tokens=12, temperature=0)
    stop = full[len(full) // 2:len(full) // 2 + 3]  # text the greedy continuation certainly produces
    r = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_seeded_sampling_repeats_and_differs_by_seed(client):
    kw = dict(model="m", prompt="My favourite animal is", max_tokens=8, temperature=1.0, top_p=1.0,
              extra_body={"top_k": 0, "min_p": 0.0})
    runs = {seed: [client.completions.create(**kw, seed=seed).choices[0].text for _ in range(2)]
            for seed in (1, 2, 3)}
    assert all(a == b for a, b in runs.values())
    assert len({texts[0] for texts in runs.values()}) > 1  # three seeds, full vocabulary: not all the same


@pytest.mark.slow
def test_16_concurrent_streams_each_equal_the_request_alone(client, http):
    prompts = [f"Fact {i}: the {word} is" for i, word in enumerate(
        ["sun", "moon", "sea", "river", "forest", "city", "desert", "mountain", "island", "cloud", "storm",
         "garden", "bridge", "train", "library", "violin"])]
    alone = [stream_text(client, p, 6, temperature=0) for p in prompts]
    seeded = dict(temperature=0.9, top_p=1.0, extra_body={"top_k": 0, "min_p": 0.0})
    alone_seeded = [stream_text(client, p, 6, seed=i, **seeded) for i, p in enumerate(prompts[:4])]
    batches_before = metric(http, "rocmforge_batch_size_count") - metric(http, 'rocmforge_batch_size_bucket{le="4"}')

    start = threading.Barrier(20)
    together: dict[int, tuple[str, str]] = {}

    def run(i: int) -> None:
        start.wait()
        if i < 16:
            together[i] = stream_text(client, prompts[i], 6, temperature=0)
        else:
            together[i] = stream_text(client, prompts[i - 16], 6, seed=i - 16, **seeded)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert [together[i] for i in range(16)] == alone
    assert [together[16 + i] for i in range(4)] == alone_seeded
    big = metric(http, "rocmforge_batch_size_count") - metric(http, 'rocmforge_batch_size_bucket{le="4"}')
    assert big > batches_before, "no forward pass ran more than 4 sequences together"


def no_end(model) -> dict[str, int]:
    """A logit_bias that bans the end-of-generation tokens, so a request runs to its max_tokens."""
    return {str(t): -100 for t in model.tokenizer.eot_ids}


def test_cancelled_stream_frees_its_kv_blocks(client, http, model):
    total = metric(http, "rocmforge_kv_blocks_total")
    generated_before = metric(http, "rocmforge_completion_tokens_total")
    stream = client.completions.create(model="m", prompt="Once upon a time", max_tokens=64, temperature=0,
                                       logit_bias=no_end(model), stream=True)
    for _, _chunk in zip(range(2), stream):
        pass
    assert metric(http, "rocmforge_active_sequences") == 1
    assert metric(http, "rocmforge_kv_blocks_free") < total
    stream.close()
    deadline = time.monotonic() + 60
    while metric(http, "rocmforge_active_sequences") > 0:
        assert time.monotonic() < deadline, "the cancelled sequence is still running"
        time.sleep(0.1)
    assert metric(http, "rocmforge_kv_blocks_free") == total
    assert metric(http, "rocmforge_completion_tokens_total") == generated_before  # it never finished


def test_a_client_that_leaves_a_plain_request_frees_its_blocks(base_url, http, model):
    total = metric(http, "rocmforge_kv_blocks_total")
    generated_before = metric(http, "rocmforge_completion_tokens_total")
    body = {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "logit_bias": no_end(model)}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection mid-generation
        httpx.post(f"{base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 60
    while metric(http, "rocmforge_active_sequences") > 0:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.1)
    assert metric(http, "rocmforge_kv_blocks_free") == total
    assert metric(http, "rocmforge_completion_tokens_total") == generated_before


def tokens_of(events: list) -> int:
    return sum(isinstance(e, TextPiece) for e in events)


def test_a_long_prompt_alone_reaches_the_cache_chunk_by_chunk(model):
    # alone, its first chunks want no logits; their forwards must still run (they were once skipped, so the
    # prediction read a cache holding only the last chunk)
    scheduler = Scheduler(model, max_batch=1, chunk_size=32, prefill_budget=32)
    long_ids = model.tokenize("The old map showed " + "rivers and roads and hills, " * 12)
    events: list = []
    request = GenerationRequest(long_ids, SamplingParams(temperature=0), max_tokens=1, emit=events.append)
    scheduler.start()
    try:
        scheduler.submit(request)
        assert request.done.wait(300)
    finally:
        scheduler.stop()
    assert len(long_ids) > 64
    text = next(e.text for e in events if isinstance(e, TextPiece))
    assert model.tokenize(text, add_bos=False)[0] == int(np.argmax(model.forward(long_ids)[-1]))


@pytest.mark.parametrize("chunk", [32, 1024])
def test_a_long_prompt_is_prefilled_between_decode_steps(model, http, chunk):
    # A scheduler of its own on the module's (idle) model, driven through its public API.
    assert metric(http, "rocmforge_active_sequences") == 0
    scheduler = Scheduler(model, max_batch=2, chunk_size=chunk, prefill_budget=chunk)
    events: list[tuple[str, object]] = []
    greedy = SamplingParams(temperature=0, logit_bias={t: -math.inf for t in model.tokenizer.eot_ids})
    running = GenerationRequest(model.tokenize("Once upon a time"), greedy, max_tokens=40,
                                emit=lambda e: events.append(("running", e)))
    long_ids = model.tokenize("The old map showed " + "rivers and roads and hills, " * 24)
    long = GenerationRequest(long_ids, SamplingParams(temperature=0), max_tokens=1,
                             emit=lambda e: events.append(("long", e)))
    scheduler.start()
    try:
        scheduler.submit(running)
        deadline = time.monotonic() + 120
        while tokens_of([e for who, e in events if who == "running"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        arrival = len(events)
        scheduler.submit(long)
        assert long.done.wait(300) and running.done.wait(300)
    finally:
        scheduler.stop()
    first_long = next(i for i, (who, _) in enumerate(events) if who == "long")
    decoded_meanwhile = tokens_of([e for who, e in events[arrival:first_long] if who == "running"])
    n_chunks = -(-len(long_ids) // chunk)
    assert len(long_ids) > 128
    if n_chunks > 1:  # one decode step of the running stream per prompt chunk
        assert decoded_meanwhile >= n_chunks - 1
    else:  # the whole prompt in one forward: at most the tick in flight and the one with the prompt
        assert decoded_meanwhile <= 2
    first_token = model.tokenize(next(e.text for who, e in events if who == "long" and isinstance(e, TextPiece)),
                                 add_bos=False)[0]
    assert first_token == int(np.argmax(model.forward(long_ids)[-1]))  # chunked prefill, same prediction


# --- embeddings and context --------------------------------------------------------------------------------
def test_embeddings_are_minilms(client, http, embedder):
    texts = ["a cat sleeps in the sun", "stock markets fell today"]
    expected = embedder(texts)
    r = client.embeddings.create(model="minilm-l6", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert r.usage.prompt_tokens == int(embedder.inner.encoder.tokenize(texts)[1].sum())
    as_floats = http.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "float"}).json()
    np.testing.assert_allclose(as_floats["data"][0]["embedding"], expected[0], atol=1e-6)


def test_context_add_search_answer_delete(client, http, store, model):
    ids = {}
    for source, text in DOCS.items():
        r = http.post("/v1/context/documents", json={"text": text, "source": source, "metadata": {"kind": "note"}})
        assert r.status_code == 200, r.text
        ids[source] = r.json()["id"]
    for mode in ("hybrid", "vector", "keyword"):
        hits = http.get("/v1/context/search", params={"q": "how do owls fly so quietly", "k": 2, "mode": mode})
        assert hits.json()["data"][0]["document_id"] == ids["owls.md"], mode

    question = "Why can readers read during a write?"
    expected_prompt, _ = build_context_prompt(question, store.search(question, k=2))
    r = client.completions.create(model="m", prompt=question, max_tokens=4, temperature=0,
                                  extra_body={"context": {"k": 2}})
    citations = r.model_extra["citations"]
    assert citations[0]["document_id"] == ids["wal.md"] and citations[0]["source"] == "wal.md"
    assert r.usage.prompt_tokens == len(model.tokenize(expected_prompt))

    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                          max_tokens=4, temperature=0, extra_body={"context": {"k": 1}})
    assert [c["document_id"] for c in chat.model_extra["citations"]] == [ids["wal.md"]]

    assert http.delete(f"/v1/context/documents/{ids['owls.md']}").json()["deleted"] is True
    assert_error(http.delete(f"/v1/context/documents/{ids['owls.md']}"), 404)
    hits = http.get("/v1/context/search", params={"q": "owls flight feathers", "k": 3}).json()["data"]
    assert ids["owls.md"] not in {h["document_id"] for h in hits}


def test_context_writes_and_searches_while_a_generation_streams(client, http):
    prompt = "The history of the printing press"
    alone, _ = stream_text(client, prompt, 24, temperature=0)
    result: dict[str, str] = {}
    streamer = threading.Thread(target=lambda: result.update(text=stream_text(client, prompt, 24, temperature=0)[0]))
    streamer.start()
    added = [http.post("/v1/context/documents", json={"text": f"Note {i}: printing spread across Europe in "
                                                              f"the {1450 + i}s.", "source": f"n{i}"})
             for i in range(3)]
    found = http.get("/v1/context/search", params={"q": "printing Europe", "k": 3, "mode": "keyword"})
    streamer.join(300)
    assert all(a.status_code == 200 for a in added)
    assert {h["source"] for h in found.json()["data"]} == {"n0", "n1", "n2"}
    assert result["text"] == alone


# --- plain routes and errors ------------------------------------------------------------------------------
def test_models_health_ready_metrics(client, http, base_url, model):
    assert [m.id for m in client.models.list().data] == [model.name, "minilm-l6"]
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}  # no key needed
    assert http.get("/ready").status_code == 200
    before = metric(http, 'rocmforge_requests_total{route="/v1/completions",status="200"}')
    client.completions.create(model="m", prompt="Hi", max_tokens=1, temperature=0)
    assert metric(http, 'rocmforge_requests_total{route="/v1/completions",status="200"}') == before + 1
    text = http.get("/metrics").text
    for name in ("rocmforge_queue_depth", "rocmforge_time_to_first_token_seconds_count",
                 "rocmforge_prompt_tokens_total", "rocmforge_batch_size_bucket"):
        assert name in text


def test_auth(base_url):
    body = {"prompt": "Hi", "max_tokens": 1}
    assert_error(httpx.post(f"{base_url}/v1/completions", json=body), 401)
    assert_error(httpx.post(f"{base_url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.get(f"{base_url}/metrics"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_bad_requests_are_400_in_openais_shape(http):
    assert_error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                 400)
    assert_error(http.post("/v1/completions", json={"max_tokens": 3}), 400, param="prompt")
    assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400, param="max_tokens")
    assert_error(http.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400, param="temperature")
    assert_error(http.post("/v1/completions", json={"prompt": "x", "n": 0}), 400, param="n")
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(http.post("/v1/chat/completions", json={"messages": []}), 400, param="messages")
    assert_error(http.get("/v1/context/search", params={"k": 2}), 400, param="q")


def test_limits(http, model):
    error = assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 65}), 400,
                         param="max_tokens")
    assert "64" in error["message"]
    long_prompt = "word " * 400
    n_prompt = len(model.tokenize(long_prompt))
    error = assert_error(http.post("/v1/completions", json={"prompt": long_prompt}), 400, param="prompt")
    assert error["code"] == "context_length_exceeded"
    assert str(N_CTX) in error["message"] and str(n_prompt) in error["message"]
    messages = [{"role": "user", "content": "hi"}] * 9
    assert_error(http.post("/v1/chat/completions", json={"messages": messages}), 400, param="messages")
    big = http.post("/v1/completions", json={"prompt": "x" * 40_000})
    assert_error(big, 413)

    def chunked():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)
    assert_error(http.post("/v1/embeddings", json={"input": ["a"] * 9}), 400, param="input")


def test_engine_failure_is_500_and_the_server_keeps_serving(client, http, model, monkeypatch):
    def broken_forward(*args, **kwargs):
        raise RuntimeError("simulated kernel fault")

    monkeypatch.setattr(model, "arch", SimpleNamespace(forward=broken_forward))
    error = assert_error(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 500)
    assert "simulated kernel fault" in error["message"]
    failed = http.post("/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True})
    assert_error(failed, 500)
    monkeypatch.undo()
    assert client.completions.create(model="m", prompt="Hi", max_tokens=2, temperature=0).usage.completion_tokens >= 1
    assert metric(http, "rocmforge_engine_errors_total") == 2
    assert metric(http, "rocmforge_kv_blocks_free") == metric(http, "rocmforge_kv_blocks_total")


def test_queue_full_is_429_with_retry_after(model, base_url, http):
    # A second server on the same (idle) model with one slot and no queue; the module's server stays idle.
    assert metric(http, "rocmforge_active_sequences") == 0
    app = create_app(model, max_batch=1, max_queue=0, limits=LIMITS)
    with live_server(app) as url:
        busy = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        stream = busy.completions.create(model="m", prompt="Once upon a time", max_tokens=60, temperature=0,
                                         logit_bias=no_end(model), stream=True)
        next(iter(stream))
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
        assert_error(refused, 429)
        assert int(refused.headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            busy.completions.create(model="m", prompt="Hi", max_tokens=1)
        stream.close()


def test_rocmforge_serve_command(smollm2_path, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "rocmforge.cli.main", "serve", "-m", str(smollm2_path),
                             "--port", str(port), "--api-key", KEY, "--max-batch", "2", "--n-ctx", "128",
                             "--no-embeddings", "--context", str(tmp_path / "ctx.db")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (log.seek(0), log.read())[1]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "rocmforge serve did not come up"
            time.sleep(0.2)
        assert_error(httpx.get(f"{url}/v1/models"), 401)
        cli = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        r = cli.completions.create(model="m", prompt="The capital of France is", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3 and r.choices[0].text.strip()
        assert [m.id for m in cli.models.list().data] == [smollm2_path.stem, "minilm-l6"]  # --context loads MiniLM
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
