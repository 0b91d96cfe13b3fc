"""``rocmforge serve --replicas`` on a real local Ray cluster (2 CPUs): two engines behind Ray Serve's proxy give the
plain server's texts to 16 ``openai`` clients; one engine is killed with SIGKILL mid-run: its requests fail clearly,
the other keeps serving, Ray starts a new one."""
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


def _session_for(engine: int) -> str:
    from rocmforge.server.replicas import rendezvous_order

    return next(f"s{i}" for i in range(1000) if rendezvous_order(f"session:s{i}", 2)[0] == engine)


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
    from ray import serve

    from rocmforge.server.replicas import APP_NAME

    engine0 = serve.get_deployment_handle("engine0", app_name=APP_NAME)
    victim = engine0.pid.remote().result(timeout_s=60)
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
    # new requests, even those engine0 would take, are served while Ray restarts it
    client = openai.OpenAI(base_url=f"{replicas_url}/v1", api_key=KEY, max_retries=0, timeout=600)
    raw = client.completions.with_raw_response.create(model="m", prompt="Hello", max_tokens=2, temperature=0,
                                                      extra_headers={"X-Session-ID": doomed})
    assert raw.headers["x-rocmforge-replica"] == "engine1" and raw.parse().choices[0].text
    deadline = time.monotonic() + 240
    while True:  # Ray brings engine0 back as a new process
        try:
            if engine0.pid.remote().result(timeout_s=30) != victim:
                break
        except Exception:  # noqa: BLE001 - still restarting
            pass
        assert time.monotonic() < deadline, "Ray did not restart the killed replica"
        time.sleep(1)
