"""``rocmforge serve --replicas``'s routing pieces in-process: ``ProxyFront`` (what Ray's proxy runs in front of its
routing) over a stand-in for the proxy, behind a live HTTP endpoint, and ``AffinityRouter``'s ranking. The whole
path (Ray's proxy, two engines, a killed engine) is ``test_replicas_cluster.py``."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from conftest import require_distributed
from live_server import live_server

require_distributed("ray")

from ray.serve._private.common import RequestMetadata  # noqa: E402 - after the check that Ray is installed
from ray.serve.request_router import PendingRequest  # noqa: E402

from rocmforge.server import replica_routing  # noqa: E402
from rocmforge.server.replica_routing import (AffinityRouter, ProxyFront, affinity_key, key_digest,  # noqa: E402
                                              rendezvous_order)


class StandInProxy:
    """Answers like Ray's proxy: records what reached it; ``dies_after`` stream events, the engine "dies" (the
    proxy logs it and ends the response unfinished) and the router had noted ``engine1`` for the request."""

    def __init__(self, dies_after: int | None = None, stream: bool = False):
        self.dies_after, self.stream, self.seen = dies_after, stream, []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:  # the whole body, as the engine reads it
            message = await receive()
            body, more = body + message["body"], message.get("more_body", False)
        headers = dict(scope["headers"])
        self.seen.append((headers.get(b"x-session-id", b"").decode(), body, headers[b"x-request-id"].decode(),
                          [k for k, _ in scope["headers"]].count(b"x-session-id")))
        replica_routing._ROUTED[headers[b"x-request-id"].decode()] = "engine1"  # AffinityRouter.on_request_routed
        if self.dies_after is None:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"whole"})
            return
        if self.stream:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"x-rocmforge-replica", b"engine1")]})
            piece = {"choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}]}
            for _ in range(self.dies_after):
                await send({"type": "http.response.body", "body": f"data: {json.dumps(piece)}\n\n".encode(),
                            "more_body": True})


def test_the_front_hands_serve_the_affinity_key_and_the_body_as_it_came() -> None:
    proxy = StandInProxy()
    with live_server(ProxyFront(proxy)) as url:
        chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]}
        answers = [httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30),
                   httpx.post(f"{url}/v1/completions", json={"prompt": "p" * 300}, timeout=30),
                   httpx.post(f"{url}/v1/completions", json={"prompt": "q"}, headers={"X-Session-ID": "alice"},
                              timeout=30),
                   httpx.get(f"{url}/v1/models", timeout=30)]
    assert [(a.status_code, a.text) for a in answers] == [(200, "whole")] * 4
    keys = [affinity_key({}, json.dumps(chat).encode()), "prompt:" + "p" * 256, "session:alice", None]
    assert keys[0] == "chat:" + json.dumps(chat["messages"][:2], sort_keys=True)
    sent = [chat, {"prompt": "p" * 300}, {"prompt": "q"}, None]
    for (session, body, request_id, n_headers), key, payload in zip(proxy.seen, keys, sent):
        assert session == (key_digest(key) if key else "") and n_headers == (key is not None)
        assert (json.loads(body) if body else None) == payload
    request_ids = {request_id for _, _, request_id, _ in proxy.seen}
    assert len(request_ids) == 4 and not request_ids & set(replica_routing._ROUTED)  # each note read and dropped


def test_the_clients_request_id_is_kept() -> None:
    proxy = StandInProxy()
    with live_server(ProxyFront(proxy)) as url:
        answer = httpx.get(f"{url}/v1/models", headers={"X-Request-ID": "mine"}, timeout=30)
    assert answer.status_code == 200 and proxy.seen[0][2] == "mine"

def test_a_long_body_reaches_the_app_whole() -> None:
    """The front reads no further than the limit for the key; the rest follows as it came (the engine's own
    check answers 413: the cluster test sees it; another app on the proxy gets its whole upload)."""
    proxy = StandInProxy()
    with live_server(ProxyFront(proxy)) as url:
        httpx.post(f"{url}/v1/completions", content=b"x" * (3 << 20), timeout=60)
    assert proxy.seen[0][1] == b"x" * (3 << 20)

def test_an_engine_that_dies_before_answering_gives_a_clear_503() -> None:
    with live_server(ProxyFront(StandInProxy(dies_after=0))) as url:
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=30)
    assert response.status_code == 503 and response.headers["x-rocmforge-replica"] == "engine1"
    error = response.json()["error"]
    assert error["code"] == "replica_failed" and "engine1" in error["message"] and "retried" in error["message"]


def test_a_stream_cut_by_a_dying_engine_ends_with_an_error_event() -> None:
    with live_server(ProxyFront(StandInProxy(dies_after=2, stream=True))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
        texts = []
        with pytest.raises(openai.APIError, match="engine1 failed while answering"):
            for chunk in client.completions.create(model="m", prompt="Count:", max_tokens=8, stream=True):
                texts.append(chunk.choices[0].text)
    assert texts == ["x", "x"]  # what the engine sent before it died reached the client


class FakeReplica:
    def __init__(self, name: str):
        self.replica_metadata = {"name": name}


def _choose(candidates: list[FakeReplica], session: str) -> tuple[list[list[str]], bool]:
    """AffinityRouter's ranks for a request with this session id (its state is not used), and its backoff flag."""
    async def run():
        request = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id="r", internal_request_id="i",
                                                                               session_id=session))
        ranks = await AffinityRouter.choose_replicas(None, candidates, request)
        return [[r.replica_metadata["name"] for r in rank] for rank in ranks], request.routing_context.should_backoff

    return asyncio.run(run())


def test_the_router_ranks_engines_by_rendezvous_hashing_of_the_key() -> None:
    engines = [FakeReplica(f"engine{i}") for i in range(4)]
    for i in range(20):
        digest = key_digest(f"session:s{i}")
        ranks, backoff = _choose(engines, digest)
        order = rendezvous_order(digest, [f"engine{j}" for j in range(4)])
        assert ranks == [[name] for name in order] and backoff
        assert _choose(engines[::-1], digest)[0] == ranks  # whatever order Serve lists them in
        down = [e for e in engines if e.replica_metadata["name"] != order[0]]
        assert _choose(down, digest)[0] == [[name] for name in order[1:]]  # only the dead engine's keys move
    assert {_choose(engines, key_digest(f"k{i}"))[0][0][0] for i in range(40)} == {f"engine{i}" for i in range(4)}


def test_a_request_without_a_key_may_go_to_any_engine() -> None:
    engines = [FakeReplica("engine0"), FakeReplica("engine1")]
    assert _choose(engines, "") == ([["engine0", "engine1"]], False)  # Serve takes the shortest queue
