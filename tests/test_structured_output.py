"""Structured output: llguidance's token masks checked against a brute-force scan of the vocabulary, the sampler
under a mask against numpy, JSON schemas / GBNF grammars / tool calls in-process and over HTTP, and the openai
SDK's ``beta.chat.completions.parse`` with a pydantic model on 20 prompts.
"""
from __future__ import annotations

import json
import re

import httpx
import numpy as np
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits

from rocmforge.constraints import Constraint, Grammar, GrammarError, grammar_from, unpack_mask
from rocmforge.model import load
from rocmforge.sampler import Sampler, SamplingParams
from rocmforge.server.app import create_app
from rocmforge.server.batch_invariant import use_batch_invariant_backend
from test_server import live_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class City(BaseModel):
    """Bounded fields: a 135M model can ramble inside a string until max_tokens; the schema stops it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)
    population: int = Field(ge=0, le=100_000_000)


@pytest.fixture(scope="module")
def model(smollm2_path):
    model = load(smollm2_path, device="cpu", n_ctx=512, n_parallel=4)
    assert use_batch_invariant_backend(model)
    with threadpool_limits(1, user_api="blas"):
        yield model


@pytest.fixture(scope="module")
def base_url(model):
    with live_server(create_app(model, max_batch=4)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=300)


def brute_force_allowed(tokenizer, words: list[bytes]) -> set[int]:
    """Every token whose bytes are a nonempty prefix of one of ``words`` (ordinary tokens only)."""
    return {t for t in range(tokenizer.vocab_size) if not tokenizer.is_special(t)
            and (b := tokenizer.token_bytes(t)) and any(w.startswith(b) for w in words)}


def test_the_mask_is_exactly_the_tokens_that_continue_the_grammar(model):
    tok = model.tokenizer
    constraint = Constraint(tok, Grammar.lark('root ::= "yes" | "no" | "maybe"'))
    assert set(constraint.allowed_ids().tolist()) == brute_force_allowed(tok, [b"yes", b"no", b"maybe"])
    constraint.accept(tok.encode("ma", add_bos=False)[0])  # "ma" is one token
    rest = brute_force_allowed(tok, [b"ybe"])
    assert set(constraint.allowed_ids().tolist()) == rest
    for t in tok.encode("ybe", add_bos=False):
        constraint.accept(t)
    assert constraint.done and set(constraint.allowed_ids().tolist()) == set(tok.eot_ids)


def test_sampling_under_a_mask_is_numpys_choice_among_the_allowed(model):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(model.tokenizer.vocab_size).astype(np.float32)
    constraint = Constraint(model.tokenizer, Grammar.regex("[0-9]+"))
    mask = constraint.mask()
    allowed = unpack_mask(mask, len(logits))
    assert set(np.flatnonzero(allowed).tolist()) == set(constraint.allowed_ids().tolist())
    assert Sampler(SamplingParams(temperature=0)).sample(logits, [], mask) == int(np.argmax(np.where(allowed, logits, -np.inf)))
    p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)).distribution(logits, [], mask)
    expected = np.where(allowed, np.exp(logits.astype(np.float64) - logits[allowed].max()), 0.0)
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-9, atol=1e-15)
    draws = {Sampler(SamplingParams(seed=s, temperature=1.5)).sample(logits, [], mask) for s in range(30)}
    assert all(allowed[t] for t in draws) and len(draws) > 1


def test_generate_with_a_json_schema_gives_valid_json(model):
    schema = City.model_json_schema()
    for prompt in ["A city in Japan:", "Describe Paris:", "Biggest city:"]:
        text = model.generate(prompt, max_new_tokens=60, temperature=0.7, seed=1, json_schema=City)
        City.model_validate_json(text)
    text = model.generate("Numbers:", max_new_tokens=40, temperature=0, json_schema=json.dumps(
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}))
    assert 2 <= len(json.loads(text)) <= 3
    assert schema["required"] == ["name", "country", "population"]


def test_gbnf_and_lark_grammars_and_bad_ones(model):
    gbnf = 'root ::= answer "." \nanswer ::= "yes" | "no"'
    assert model.generate("Is the sky blue? Answer:", max_new_tokens=5, temperature=0, grammar=gbnf) in ("yes.", "no.")
    lark = 'start: NUMBER " apples"\nNUMBER: /[1-9][0-9]?/'
    assert re.fullmatch(r"[1-9][0-9]? apples", model.generate("I ate", max_new_tokens=8, temperature=0.8, seed=3,
                                                                grammar=lark))
    with pytest.raises(GrammarError, match="invalid grammar"):
        grammar_from(grammar="root ::= (")
    with pytest.raises(GrammarError, match="not both"):
        grammar_from(json_schema={"type": "object"}, grammar="root ::= \"x\"")


def test_openai_sdk_parse_returns_a_valid_object_on_20_prompts(client, model):
    countries = ["France", "Japan", "Brazil", "Kenya", "Canada", "India", "Italy", "Egypt", "Peru", "Norway",
                 "Spain", "China", "Chile", "Ghana", "Mexico", "Greece", "Turkey", "Vietnam", "Poland", "Cuba"]
    for i, country in enumerate(countries):
        completion = client.beta.chat.completions.parse(
            model=model.name, messages=[{"role": "user", "content": f"Give a big city in {country} as JSON."}],
            response_format=City, max_tokens=60, temperature=0.7, seed=i)
        city = completion.choices[0].message.parsed
        assert isinstance(city, City), completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "stop"


def test_json_object_streamed_joins_to_json(client, model):
    # a presence penalty keeps greedy decoding from repeating a key until max_tokens
    stream = client.chat.completions.create(model=model.name, response_format={"type": "json_object"},
                                            messages=[{"role": "user", "content": "Answer in JSON: is water wet?"}],
                                            max_tokens=80, temperature=0, presence_penalty=1.5, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert isinstance(json.loads(text), dict)


def test_tool_call_round_trip(client, model):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=model.name, messages=messages, tools=[WEATHER],
                                           tool_choice="required", max_tokens=60, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    second = client.chat.completions.create(model=model.name, messages=messages, tools=[WEATHER], max_tokens=30,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    named = client.chat.completions.create(model=model.name, messages=messages[:1], tools=[WEATHER], max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0, stream=True)
    calls = [c for chunk in named for c in (chunk.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"


def test_bad_structured_requests_are_400(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for body, param in [
            ({"prompt": "x", "grammar": "root ::= ("}, "grammar"),
            ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
            ({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tools"),
        ]:
            route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = http.post(route, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
