"""``rocmforge bench``: prefill and decode speed of a model on a device, llama-bench style.

The prompt is seeded random token ids and end-of-generation tokens are banned, so every run decodes
exactly ``n_gen`` tokens whatever the model would have said.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import click
import numpy as np

from rocmforge.cli.types import DEVICE
from rocmforge.registry import DEFAULT_MODEL


def measure_speed(model, n_prompt: int = 512, n_gen: int = 128, reps: int = 3,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best-of-``reps`` prefill tok/s (one ``n_prompt`` prompt) and decode tok/s (``n_gen`` tokens after one token),
    timed by ``clock`` (wall time; ``time.process_time`` for this process's CPU time, steadier on a shared machine).

    >>> import rocmforge
    >>> speed = measure_speed(rocmforge.load(device="cpu", n_ctx=64), n_prompt=16, n_gen=4, reps=1)  # doctest: +SKIP
    >>> sorted(speed)  # doctest: +SKIP
    ['decode_tok_s', 'decode_tokens', 'prefill_tok_s']
    """
    vocab = model.cfg.vocab_size
    ids = [int(i) for i in np.random.default_rng(0).integers(min(1000, vocab // 2), min(vocab, 30000), n_prompt)]
    ban = {t: float("-inf") for t in model.tokenizer.eot_ids}
    prefill, decode, produced = [], [], 0
    for _ in range(reps):
        gen = model.start(ids, max_new_tokens=1, temperature=0)
        start = clock()
        gen.prefill()
        prefill.append(n_prompt / (clock() - start))
        gen.close()
        gen = model.start(ids[:1], max_new_tokens=n_gen + 1, temperature=0, logit_bias=ban)
        gen.step()  # the one-token prefill and the first sample are not decode
        start = clock()
        produced = sum(1 for _ in iter(gen.step, None))
        decode.append(produced / (clock() - start))
        gen.close()
    return {"prefill_tok_s": max(prefill), "decode_tok_s": max(decode), "decode_tokens": produced}


@click.command()
@click.option("-m", "--model", "model_name", default=DEFAULT_MODEL, show_default=True, help="Registry name or .gguf path.")
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("-p", "--n-prompt", default=512, show_default=True, type=click.IntRange(1),
              help="Prompt tokens for the prefill test.")
@click.option("-n", "--n-gen", default=128, show_default=True, type=click.IntRange(1),
              help="Tokens for the decode test.")
@click.option("-r", "--reps", default=3, show_default=True, type=click.IntRange(1),
              help="Repetitions; the best is reported.")
def bench(model_name: str, device: str, n_prompt: int, n_gen: int, reps: int) -> None:
    """Prefill (ppN) and decode (tgN) tokens per second of MODEL on DEVICE."""
    import rocmforge

    model = rocmforge.load(model_name, device=device, n_ctx=n_prompt + n_gen + 8)
    speed = measure_speed(model, n_prompt, n_gen, reps)
    click.echo(f"model {model.path.name}  device {model.ops.name}")
    click.echo(f"pp{n_prompt}  {speed['prefill_tok_s']:9.1f} tok/s")
    click.echo(f"tg{n_gen}  {speed['decode_tok_s']:9.1f} tok/s")
