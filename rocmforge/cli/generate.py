"""``rocmforge generate "prompt"`` streams a continuation; ``rocmforge chat`` is an interactive chat."""
from __future__ import annotations

import sys
from typing import Any

import click

from rocmforge.cli.types import DEVICE
from rocmforge.registry import DEFAULT_MODEL


def _sampling_options(fn: Any) -> Any:
    options = [
        click.option("-m", "--model", "model_name", default=DEFAULT_MODEL, show_default=True,
                     help="Registry name or path to a .gguf file."),
        click.option("--device", default="auto", show_default=True, type=DEVICE,
                     help="auto, cpu, cpu-exact (llama.cpp's CPU numbers bit for bit), cuda or hip."),
        click.option("-n", "--max-tokens", "max_tokens", type=click.IntRange(min=1), default=None,
                     help="Tokens to generate (default 128; an answer from --context: up to 256, it ends itself)."),
        click.option("--temp", "temperature", type=click.FloatRange(min=0, max=100), default=0.8, show_default=True,
                     help="Temperature (0: greedy)."),
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True,
                     help="Keep the k most likely tokens (0: off)."),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.95, show_default=True,
                     help="Nucleus sampling mass (1: off)."),
        click.option("--min-p", type=click.FloatRange(min=0, max=1), default=0.05, show_default=True,
                     help="Drop tokens below min_p * p_max (0: off)."),
        click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True, max=100), default=None,
                     help="Penalty on the last 64 tokens (default 1: off; with --context the answer defaults of "
                          "rocmforge.model.ANSWER_SAMPLING)."),
        click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed for reproducible sampling."),
        click.option("--context", "context_db", type=click.Path(dir_okay=False), default=None,
                     help="Answer from this context store (SQLite file)."),
        click.option("-k", "n_hits", type=click.IntRange(min=1, max=50), default=3, show_default=True,
                     help="Context chunks to retrieve."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _sampling(opts: dict) -> dict:
    keys = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")
    # options left unset (None) take the model's defaults: plain ones, or ANSWER_SAMPLING with --context
    return {k: opts[k] for k in keys if opts[k] is not None}


def _json_schema(ctx: click.Context, param: click.Parameter, value: str | None) -> dict | None:
    """--json-schema: inline JSON or @FILE, checked here so a bad one is one line and exit code 2."""
    if value is None:
        return None
    import json
    from pathlib import Path

    try:
        schema = json.loads(Path(value[1:]).read_text() if value.startswith("@") else value)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"not a JSON schema: {exc}") from None
    if not isinstance(schema, dict):
        raise click.BadParameter("a JSON schema is a JSON object")
    return schema


@click.command()
@click.argument("prompt")
@_sampling_options
@click.option("--json-schema", callback=_json_schema, default=None,
              help="Constrain the output to JSON matching this schema (inline JSON or @file.json).")
@click.option("--grammar", "grammar_file", type=click.File(), default=None,
              help="Constrain the output to this grammar (a GBNF or Lark file).")
def generate(prompt: str, model_name: str, device: str, max_tokens: int, context_db: str | None, n_hits: int,
             json_schema: dict | None, grammar_file: Any, **opts: Any) -> None:
    """Continue PROMPT with the model and stream the text to stdout."""
    from rocmforge.constraints import GrammarError, grammar_from
    from rocmforge.model import load

    try:
        grammar = grammar_from(json_schema, grammar_file.read() if grammar_file else None)
    except GrammarError as exc:
        raise click.UsageError(str(exc)) from None
    model = load(model_name, device=device)
    if context_db is None:
        _write(model.stream(prompt, max_new_tokens=max_tokens or 128, grammar=grammar, **_sampling(opts)))
        return
    # Answer from the store: the question and its passages go in as a chat turn, streamed as it is generated.
    chunks = model.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
                                          context=context_db, k=n_hits, **_sampling(opts))
    first = next(chunks)
    _write(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    for citation in first.get("citations", []):
        click.echo(f"[{citation['n']}] {citation['source']} (chunk {citation['chunk_id']}, "
                   f"chars {citation['start']}-{citation['end']})")


def _write(pieces: Any) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@click.command()
@click.option("--system", default=None, help="A system message to start the conversation with.")
@_sampling_options
def chat(system: str | None, model_name: str, device: str, max_tokens: int, context_db: str | None, n_hits: int,
         **opts: Any) -> None:
    """Chat with the model in the terminal, using its own chat template (empty line or Ctrl-D ends)."""
    from rocmforge.model import load

    model = load(model_name, device=device)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    click.echo(f"{model.name} on {model.device}. Empty line or Ctrl-D to quit.", err=True)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        reply = []
        extra = {"context": context_db, "k": n_hits} if context_db else {}
        limit = max_tokens or (None if context_db else 128)  # None: an answer's own default length
        for chunk in model.create_chat_completion(messages, max_tokens=limit, stream=True, **extra,
                                                  **_sampling(opts)):
            piece = chunk["choices"][0]["delta"].get("content", "")
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
