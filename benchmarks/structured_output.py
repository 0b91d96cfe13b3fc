"""Decode speed with a JSON-schema constraint vs without: tokens/s of the same model, prompt and sampler; the
ratio is what to read.

Each round starts both generations (sampled at temperature 0.8, end tokens banned through logit_bias in both, so
both make every token; the schema asks for at least 40 items, so the grammar never finishes first), prefills
them, then times ``--tokens`` decode steps of each, the two alternating token by token (which goes first swaps
every token), so a busy spell on a shared machine hits both alike. The constrained one computes llguidance's
token mask each step, applied by the sampler on the host or by the sampling kernel on a GPU. Also reports the
mask's own cost per token. Works with any ``device`` (``--device cuda`` on a GPU machine, with a shape twin from
benchmarks/shape_twin.py as the model).

    python benchmarks/structured_output.py [--model smollm2-135m] [--device cpu] [--tokens 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone

from rocmforge.constraints import Constraint, Grammar
from rocmforge.model import load

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"], "properties": {"items": {
    "type": "array", "minItems": 40, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "quantity", "note"],
        "properties": {"name": {"type": "string", "maxLength": 24}, "quantity": {"type": "integer"},
                       "note": {"type": "string", "maxLength": 48}}}}}}
PROMPT = "A shopping list as JSON, with a note for each item:"


def decode_rates(model, n_tokens: int, seed: int) -> tuple[float, float]:
    """(unconstrained, json schema) decode tokens/s of one round, the two generations stepping in turn."""
    ban_end = {t: float("-inf") for t in model.tokenizer.eot_ids}
    gens = [model.start(PROMPT, max_new_tokens=n_tokens + 1, temperature=0.8, seed=seed, logit_bias=ban_end,
                        json_schema=schema) for schema in (None, SCHEMA)]
    try:
        for gen in gens:
            gen.prefill()
            gen.step()  # the first token comes from the prefill's logits: time whole decode steps only
        seconds, made = [0.0, 0.0], [0, 0]
        for i in range(n_tokens):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                if gens[which].finished:  # the JSON closed early: only the steps that made a token count
                    continue
                start = time.perf_counter()
                gens[which].step()
                seconds[which] += time.perf_counter() - start
                made[which] += 1
        return made[0] / seconds[0], made[1] / seconds[1]
    finally:
        for gen in gens:
            gen.close()


def mask_microseconds(model, n_tokens: int) -> float:
    """Mean cost of mask() + accept() along a text the schema allows."""
    text = json.dumps({"items": [{"name": f"item {i}", "quantity": i, "note": "fresh and cheap"}
                                 for i in range(40)]}, separators=(",", ":"))
    ids = model.tokenize(text, add_bos=False)[:n_tokens]
    constraint = Constraint(model.tokenizer, Grammar.json_schema(SCHEMA))
    start = time.perf_counter()
    for token in ids:
        constraint.mask()
        constraint.accept(token)
    return (time.perf_counter() - start) / len(ids) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = load(args.model, device=args.device, n_ctx=512)
    decode_rates(model, 8, 0)  # warm-up: kernels, the llguidance tokenizer, a decode graph on GPU
    rates: dict[str, list[float]] = {"unconstrained": [], "json schema": []}
    for r in range(args.rounds):
        free, constrained = decode_rates(model, args.tokens, r)
        rates["unconstrained"].append(free)
        rates["json schema"].append(constrained)
    free, constrained = statistics.median(rates["unconstrained"]), statistics.median(rates["json schema"])
    mask_us = mask_microseconds(model, 200)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(json.dumps({"model": model.name, "device": model.device, "rates": rates, "mask_us": mask_us}))
    print(f"\n{model.name} on {model.device}, {args.tokens} decode tokens x {args.rounds} rounds, {when}\n")
    print("| mode | tok/s (median) | rounds |")
    print("|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    print(f"\nratio json schema / unconstrained: {constrained / free:.3f}; mask + accept: {mask_us:.0f} us/token")


if __name__ == "__main__":
    main()
