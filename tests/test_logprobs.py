"""logprobs / top_logprobs / echo / n, in-process (``Model.create_completion``, llama-cpp-python's shapes) and over
HTTP (OpenAI's shapes), checked against the log-softmax of ``Model.forward``'s logits computed here with numpy.
"""
from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest
from threadpoolctl import threadpool_limits

from rocmforge.kv_cache import KVCache
from rocmforge.model import load
from rocmforge.server.app import create_app
from rocmforge.server.batch_invariant import use_batch_invariant_backend
from test_server import live_server

PROMPT = "The capital of France is"


def numpy_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def model(smollm2_path):
    model = load(smollm2_path, device="cpu", n_ctx=256, n_parallel=8)
    assert use_batch_invariant_backend(model)
    with threadpool_limits(1, user_api="blas"):
        yield model


@pytest.fixture(scope="module")
def base_url(model):
    with live_server(create_app(model, max_batch=8)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=300)


def test_kv_fork_shares_whole_blocks_and_frees_them_with_the_last_holder():
    cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=4, head_dim_v=4, n_ctx=64, n_blocks=8, block_size=16)
    parent = cache.new_sequence()
    cache.prepare([(parent, list(range(40)))])  # 3 blocks, the last one partly written
    children = [cache.fork(parent, 39) for _ in range(2)]
    assert [cache.length(c) for c in children] == [32, 32]
    assert all(np.array_equal(cache.slots_of(c, 32), cache.slots_of(parent, 32)) for c in children)
    batch = cache.prepare([(children[0], [7] * 8)])  # the child writes past the shared blocks only
    assert not set(batch.slots.tolist()) & set(cache.slots_of(parent, 40).tolist())
    assert cache.n_free_blocks == 8 - 3 - 1
    cache.free(parent)
    assert cache.n_free_blocks == 8 - 2 - 1  # the parent's partial block is back; the shared two are not
    cache.free(children[0])
    cache.free(children[1])
    assert cache.n_free_blocks == 8


def test_echoed_prompt_logprobs_are_the_forwards_log_softmax(model):
    ids = model.tokenize(PROMPT)
    out = model.create_completion(PROMPT, max_tokens=3, temperature=0, logprobs=3, echo=True)
    choice = out["choices"][0]
    logprobs = choice["logprobs"]
    generated = model.tokenize(PROMPT + choice["text"][len(PROMPT):], add_bos=False)[len(ids):]
    all_ids = ids + generated
    expected = numpy_log_softmax(model.forward(all_ids))
    assert choice["text"].startswith(PROMPT)
    assert logprobs["tokens"] == [model.tokenizer.token_text(t) for t in all_ids][:len(logprobs["tokens"])]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for i in range(1, len(ids)):  # the prompt rows came from the same prefill: equal to float64 rounding
        assert logprobs["token_logprobs"][i] == pytest.approx(expected[i - 1, all_ids[i]], abs=1e-9)
        top = np.argsort(-expected[i - 1], kind="stable")[:3]
        assert list(logprobs["top_logprobs"][i]) == [model.tokenizer.token_text(t) for t in top]
    for i in range(len(ids), len(logprobs["tokens"])):
        # decoded one at a time: a forward of other shapes rounds otherwise (the numpy path's row results move
        # ~0.04 nats between a 6- and a 7-token prefill of this Q4_1 model), so only close
        assert logprobs["token_logprobs"][i] == pytest.approx(expected[i - 1, all_ids[i]], abs=0.06)
        assert logprobs["token_logprobs"][i] == max(logprobs["top_logprobs"][i].values())  # greedy
    assert logprobs["text_offset"][:3] == [0, 3, 11]


def test_n_choices_share_the_prompt_and_equal_separate_seeded_requests(model):
    prompt = "Once upon a time, in a land far away, there lived a"  # > 1 block: followers fork whole blocks
    together = model.create_completion(prompt, max_tokens=8, n=3, seed=11, temperature=0.9)
    alone = [model.create_completion(prompt, max_tokens=8, seed=11 + i, temperature=0.9)["choices"][0]["text"]
             for i in range(3)]
    assert [c["text"] for c in together["choices"]] == alone
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    assert len(set(alone)) > 1
    assert together["usage"]["prompt_tokens"] == len(model.tokenize(prompt))
    assert model.kv.n_free_blocks == model.kv.n_blocks


def test_chat_logprobs_stream_and_whole_agree(model):
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = model.create_chat_completion(messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = whole["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content).startswith(whole["choices"][0]["message"]["content"])
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] == e["top_logprobs"][0]["logprob"] for e in content)
    streamed = [e for chunk in model.create_chat_completion(messages, max_tokens=6, temperature=0, logprobs=True,
                                                              top_logprobs=2, stream=True)
                for e in (chunk["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert streamed == content


def test_server_echo_logprobs_for_a_batch_of_token_prompts_equal_the_model(http_client, model):
    prompts = [model.tokenize(PROMPT, add_bos=False), model.tokenize("Two plus two is", add_bos=False)]
    r = http_client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 1, "temperature": 0,
                                                  "logprobs": 1, "echo": True})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for ids, choice in zip(prompts, choices):
        local = model.create_completion(ids, max_tokens=1, temperature=0, logprobs=1, echo=True)["choices"][0]
        assert choice["text"] == local["text"]
        assert choice["logprobs"]["tokens"] == local["logprobs"]["tokens"]
        np.testing.assert_allclose(np.array(choice["logprobs"]["token_logprobs"][1:], dtype=float),
                                   np.array(local["logprobs"]["token_logprobs"][1:], dtype=float), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def http_client(base_url):
    with httpx.Client(base_url=base_url, timeout=300) as http:
        yield http


def test_server_n_and_logprobs_through_the_openai_client(client, model):
    out = client.completions.create(model=model.name, prompt=PROMPT, max_tokens=5, n=3, seed=4, temperature=1.0,
                                    logprobs=2)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    for i, choice in enumerate(sorted(out.choices, key=lambda c: c.index)):
        alone = model.create_completion(PROMPT, max_tokens=5, seed=4 + i, temperature=1.0, logprobs=2)["choices"][0]
        assert choice.text == alone["text"]
        np.testing.assert_allclose(choice.logprobs.token_logprobs, alone["logprobs"]["token_logprobs"], atol=1e-5)
    chat = client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3
    assert model.kv.n_free_blocks == model.kv.n_blocks


def test_server_streams_logprobs_with_each_choice(http_client, model):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True, "n": 2, "stream": True}
    chunks = []
    with http_client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    whole = http_client.post("/v1/completions", json={**body, "stream": False, "n": 1}).json()["choices"][0]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == whole["text"]
        tokens = [lp for c in mine for lp in c["logprobs"]["token_logprobs"]]
        assert tokens[0] is None
        np.testing.assert_allclose(tokens[1:], whole["logprobs"]["token_logprobs"][1:], atol=1e-5)
        assert mine[-1]["finish_reason"] == "length"


def test_tokenizer_endpoints_are_vllms(http_client, model):
    ids = http_client.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"]
    assert ids == model.tokenize("Hello world", add_bos=False)
    assert http_client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello world"}
    info = http_client.get("/tokenizer_info").json()
    assert info["eos_token"] == model.tokenizer.token_text(model.tokenizer.eos_id)
    r = http_client.post("/detokenize", json={"tokens": [10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_bad_logprobs_n_and_empty_prompts_are_400(http_client):
    for body, param in [({"prompt": "x", "logprobs": 21}, "logprobs"), ({"prompt": "x", "n": 0}, "n"),
                        ({"prompt": "x", "n": 17}, "n"), ({"prompt": []}, "prompt"), ({"prompt": [[1], []]}, "prompt")]:
        r = http_client.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
