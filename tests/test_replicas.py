"""``rocmforge serve --replicas``: the router and two CPU engines (Ray Serve's local testing mode: every deployment
in this process, no cluster) behind a live HTTP endpoint, checked with the ``openai`` client against the plain
server (the same ``build_app``); an engine that fails mid-request gives its clients a clear error."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from conftest import require_distributed
from live_server import live_server
from replica_clients import (KEY, assert_two_replicas_give_the_plain_texts, no_end, options,  # noqa: F401 (fixtures)
                             plain_url)

class HandleApp:
    """What Ray Serve's HTTP proxy does, in-process: each request (body read first) goes to the router's handle."""

    def __init__(self, handle):
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        from starlette.requests import Request

        body = await Request(scope, receive).body()
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # never a disconnect: the test clients stay

        response = await self.handle.remote(Request(scope, replay))
        await response(scope, replay, send)


@pytest.fixture(scope="module")
def replicas_url(options):
    require_distributed("ray")
    from ray import serve

    from rocmforge.server.replicas import APP_NAME, build_application

    handle = serve.run(build_application(options, 2, {"num_cpus": 1}), name=APP_NAME, route_prefix="/",
                       _local_testing_mode=True)
    with live_server(HandleApp(handle)) as url:
        yield url


def test_two_replicas_serve_16_clients_the_plain_servers_texts(replicas_url, plain_url, no_end) -> None:
    assert_two_replicas_give_the_plain_texts(replicas_url, plain_url, no_end)


def test_routes_auth_and_errors_are_the_plain_servers(replicas_url, plain_url) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [("GET", "/health", None, {}), ("GET", "/v1/models", None, {}), ("GET", "/v1/models", None, auth),
             ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, auth),
             ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, {"Authorization": "Bearer wrong"}),
             ("POST", "/v1/embeddings", {"input": "x"}, auth), ("GET", "/v1/context/search?q=x", None, auth),
             ("GET", "/no/such/route", None, auth)]
    for method, path, body, headers in cases:
        want = httpx.request(method, plain_url + path, json=body, headers=headers, timeout=120)
        got = httpx.request(method, replicas_url + path, json=body, headers=headers, timeout=120)
        assert (got.status_code, got.json()) == (want.status_code, want.json()), (method, path)
    too_big = httpx.post(f"{replicas_url}/v1/completions", content=b"x" * (2 << 20),
                         headers={**auth, "Content-Type": "application/json"}, timeout=120)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"


def test_a_conversation_stays_on_one_replica(replicas_url) -> None:
    client = openai.OpenAI(base_url=f"{replicas_url}/v1", api_key=KEY, max_retries=0, timeout=600)
    for opening in ("Tell me about owls.", "Tell me about bees.", "Tell me about rivers.", "Tell me about maps."):
        messages = [{"role": "user", "content": opening}]
        seen = set()
        for turn in range(3):
            raw = client.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=3,
                                                                   temperature=0)
            seen.add(raw.headers["x-rocmforge-replica"])
            messages += [{"role": "assistant", "content": raw.parse().choices[0].message.content},
                         {"role": "user", "content": f"And then? ({turn})"}]
        assert len(seen) == 1, opening
    from rocmforge.server.replicas import rendezvous_order

    pinned = next(f"s{i}" for i in range(100) if rendezvous_order(f"session:s{i}", 2)[0] == 1)
    for prompt in ("one", "two", "three"):
        raw = client.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=1,
                                                          extra_headers={"X-Session-ID": pinned})
        assert raw.headers["x-rocmforge-replica"] == "engine1"


def _dying_engine(stream_pieces: int):
    """A deployment that answers like an engine and dies mid-answer, as a killed replica looks to the router."""
    from ray import serve
    from ray.exceptions import ActorDiedError

    @serve.deployment(name="engine0")
    class DyingEngine:
        async def asgi(self, scope, body):
            stream = json.loads(body).get("stream", False)
            kind = b"text/event-stream" if stream else b"application/json"
            yield {"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]}
            piece = {"choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}]}
            for _ in range(stream_pieces if stream else 0):
                yield {"type": "http.response.body", "body": f"data: {json.dumps(piece)}\n\n".encode(),
                       "more_body": True}
            raise ActorDiedError()

    return DyingEngine


@pytest.fixture(scope="module")
def half_dead(options):
    """engine0 dies in every answer, engine1 is a real engine."""
    from ray import serve

    from rocmforge.server.replicas import EngineReplica, Router

    app = Router.bind(_dying_engine(2).bind(), EngineReplica.options(name="engine1").bind(options))
    handle = serve.run(app, name="half-dead", route_prefix="/half-dead", _local_testing_mode=True)
    with live_server(HandleApp(handle)) as url:
        yield url


def test_a_stream_cut_by_a_dying_engine_ends_with_an_error_event(half_dead, no_end, monkeypatch) -> None:
    from rocmforge.server import replicas as module
    from rocmforge.server.replicas import rendezvous_order

    monkeypatch.setattr(module, "DOWN_SECONDS", 0.0)  # engine0 keeps getting its sessions (the next test needs it)
    doomed = next(f"s{i}" for i in range(100) if rendezvous_order(f"session:s{i}", 2)[0] == 0)
    client = openai.OpenAI(base_url=f"{half_dead}/v1", api_key=KEY, max_retries=0, timeout=600)
    stream = client.completions.create(model="m", prompt="Count to ten:", max_tokens=8, temperature=0, stream=True,
                                       logit_bias=no_end, extra_headers={"X-Session-ID": doomed})
    texts = []
    with pytest.raises(openai.APIError, match="engine0 failed while answering"):
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts == ["x", "x"]  # what the engine sent before it died reached the client


def test_a_dying_engine_gives_clear_errors_and_the_other_keeps_serving(half_dead, no_end) -> None:
    """Plain and streaming requests on a dying engine fail with replica_failed (never a hang); the router then
    sends that engine's sessions to the other engine, which answers."""
    from rocmforge.server.replicas import rendezvous_order

    doomed = next(f"s{i}" for i in range(100) if rendezvous_order(f"session:s{i}", 2)[0] == 0)
    headers = {"Authorization": f"Bearer {KEY}", "X-Session-ID": doomed}
    body = {"prompt": "Count to ten:", "max_tokens": 4, "temperature": 0, "logit_bias": no_end}
    plain = httpx.post(f"{half_dead}/v1/completions", json=body, headers=headers, timeout=300)
    assert plain.status_code == 503 and plain.headers["x-rocmforge-replica"] == "engine0"
    error = plain.json()["error"]
    assert error["code"] == "replica_failed" and "engine0" in error["message"] and "retried" in error["message"]
    # engine0 is now marked down: its session goes to engine1, which answers in full
    client = openai.OpenAI(base_url=f"{half_dead}/v1", api_key=KEY, max_retries=0, timeout=600)
    raw = client.completions.with_raw_response.create(model="m", prompt="Hello", max_tokens=2, temperature=0,
                                                      extra_headers={"X-Session-ID": doomed})
    assert raw.headers["x-rocmforge-replica"] == "engine1" and raw.parse().choices[0].text
