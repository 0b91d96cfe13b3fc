"""What both replica test modules share: the plain server they are compared with, its options, the 16 clients."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from live_server import live_server
from rocmforge.server.build import ServeOptions, build_app

KEY = "replica-key"
PROMPTS = [f"Write one sentence about {topic}." for topic in (
    "a lighthouse", "a robot", "a bookshop", "a dragon", "a river", "a violin", "a city", "a clock", "a garden",
    "a cat", "a train", "the moon", "a bridge", "a baker", "a kite", "a choir")]


@pytest.fixture(scope="module")
def options(smollm2_path) -> ServeOptions:
    return ServeOptions(model=str(smollm2_path), device="cpu", n_ctx=256, max_batch=16, api_key=KEY, threads=1,
                        embeddings=False)


@pytest.fixture(scope="module")
def no_end(smollm2_path) -> dict[str, float]:
    """logit_bias that bans the end-of-text tokens: every completion runs to max_tokens."""
    from rocmforge.gguf_file import GGUFFile
    from rocmforge.tokenizer import Tokenizer

    return {str(t): -100.0 for t in Tokenizer.from_gguf(GGUFFile(smollm2_path)).eot_ids}


@pytest.fixture(scope="module")
def plain_url(options):
    app, close = build_app(options)  # what `rocmforge serve` runs
    with live_server(app) as url:
        yield url
    close()


def completions(url: str, no_end: dict[str, float], max_tokens: int = 8) -> list[tuple[str, str]]:
    """16 concurrent openai clients, one greedy completion each: (text, replica that answered)."""
    def one(prompt: str) -> tuple[str, str]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
        raw = client.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                                          temperature=0, logit_bias=no_end)
        return raw.parse().choices[0].text, raw.headers.get("x-rocmforge-replica", "")

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def assert_two_replicas_give_the_plain_texts(replicas_url: str, plain_url: str, no_end: dict[str, float]) -> None:
    expected = [text for text, _ in completions(plain_url, no_end)]
    got = completions(replicas_url, no_end)
    assert [text for text, _ in got] == expected
    assert all(text.strip() for text in expected)
    assert {replica for _, replica in got} == {"engine0", "engine1"}  # both engines served
