"""``rocmforge serve --replicas`` on a real local Ray cluster (2 CPUs): two engines behind Ray Serve's proxy give the
plain server's texts to 16 ``openai`` clients, with its routes, auth and errors; a conversation stays on one engine;
one engine is killed with SIGKILL mid-run: its requests fail clearly, the other keeps serving, Ray starts a new one."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from replica_clients import (KEY, assert_two_replicas_give_the_plain_texts, no_end, options,  # noqa: F401 (fixtures)
                             plain_url)
from rocmforge.server.replica_routing import key_digest, rendezvous_order

@pytest.fixture(scope="module")
def replicas_url(ray_cluster, options):
    from ray import serve

    from rocmforge.server.replicas import APP_NAME, build_application

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(options, 2, {"num_cpus": 1}), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


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
        assert got.headers["x-rocmforge-replica"] in ("engine0", "engine1")
    too_big = httpx.post(f"{replicas_url}/v1/completions", content=b"x" * (2 << 20),
                         headers={**auth, "Content-Type": "application/json"}, timeout=120)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"


def _session_for(engine: int) -> str:
    return next(f"s{i}" for i in range(1000)
                if rendezvous_order(key_digest(f"session:s{i}"), ["engine0", "engine1"])[0] == f"engine{engine}")


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
    for engine in (0, 1):
        for prompt in ("one", "two", "three"):
            raw = client.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=1,
                                                              extra_headers={"X-Session-ID": _session_for(engine)})
            assert raw.headers["x-rocmforge-replica"] == f"engine{engine}"


def _pid_of(engine: str) -> int | None:
    """The process of the engine with that name, asked through Serve (each call reaches some engine)."""
    from ray import serve

    from rocmforge.server.replicas import APP_NAME

    handle = serve.get_deployment_handle("engine", app_name=APP_NAME)
    for _ in range(40):
        name, pid = handle.identity.remote().result(timeout_s=30)
        if name == engine:
            return pid
    return None


def _stream(url: str, session: str, no_end: dict[str, float], results: dict, started: threading.Event) -> None:
    """One streaming completion pinned by session: records its replica, text pieces, error and [DONE]."""
    record = results.setdefault(session, {"pieces": [], "error": None, "done": False})
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=300,
                          headers={"Authorization": f"Bearer {KEY}", "X-Session-ID": session},
                          json={"prompt": f"Count slowly from one, session {session}:", "max_tokens": 48,
                                "temperature": 0, "stream": True, "logit_bias": no_end}) as response:
            record["replica"] = response.headers.get("x-rocmforge-replica")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    record["done"] = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record["error"] = chunk["error"]
                else:
                    record["pieces"].append(chunk["choices"][0]["text"])
                    started.set()
    except httpx.HTTPError as exc:  # the only other acceptable end: a clear transport error, never a hang
        record["error"] = {"code": "transport", "message": repr(exc)}


def test_killing_a_replica_fails_its_requests_clearly_and_the_other_keeps_serving(replicas_url, no_end) -> None:
    victim = _pid_of("engine0")
    assert victim is not None
    doomed, spared = _session_for(0), _session_for(1)
    results: dict = {}
    started = {s: threading.Event() for s in (doomed, spared)}
    threads = [threading.Thread(target=_stream, args=(replicas_url, s, no_end, results, started[s]))
               for s in (doomed, spared)]
    plain: dict = {}
    waiting = threading.Thread(target=lambda: plain.update(r=httpx.post(
        f"{replicas_url}/v1/completions", timeout=300, headers={"Authorization": f"Bearer {KEY}",
                                                                "X-Session-ID": doomed},
        json={"prompt": "Say something long.", "max_tokens": 48, "temperature": 0, "logit_bias": no_end})))
    for t in threads:
        t.start()
    assert all(e.wait(240) for e in started.values()), "the streams did not start"
    waiting.start()
    time.sleep(1.0)  # the plain request is generating on engine0 now
    os.kill(victim, signal.SIGKILL)
    for t in [*threads, waiting]:
        t.join(300)
        assert not t.is_alive(), "a request hung after its replica died"
    lost, kept = results[doomed], results[spared]
    assert lost["replica"] == "engine0" and not lost["done"] and lost["error"]["code"] in ("replica_failed", "transport")
    assert kept["replica"] == "engine1" and kept["done"] and kept["error"] is None and kept["pieces"]
    response = plain["r"]
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "replica_failed" and "engine0" in response.json()["error"]["message"]
    # new requests, even those engine0 would take, are answered: by engine1 while Ray restarts engine0 (the killed
    # engine left Serve's router at its first failed call), or by the new engine0 once it is up
    client = openai.OpenAI(base_url=f"{replicas_url}/v1", api_key=KEY, max_retries=0, timeout=600)
    raw = client.completions.with_raw_response.create(model="m", prompt="Hello", max_tokens=2, temperature=0,
                                                      extra_headers={"X-Session-ID": doomed})
    assert raw.headers["x-rocmforge-replica"] in ("engine0", "engine1") and raw.parse().choices[0].text
    deadline = time.monotonic() + 240
    while True:  # Ray brings engine0 back as a new process
        try:
            if _pid_of("engine0") not in (None, victim):
                break
        except Exception:  # noqa: BLE001 - still restarting
            pass
        assert time.monotonic() < deadline, "Ray did not restart the killed replica"
        time.sleep(1)
