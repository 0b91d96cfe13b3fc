"""Activation harvesting: stream chosen activations of a whole dataset to disk, in shards, resumably.

``harvest(model, source, names, out)`` tokenizes documents (a list of texts, a list of token lists, or a text
file with one document per line) lazily, cuts documents longer than ``piece_tokens`` into pieces, packs pieces
into batched forwards of at most ``batch_tokens`` tokens (``run_with_cache`` over many prompts; the forward
stops after the last layer a name needs), and appends each name's rows to a shard buffer. A shard is written
when it holds ``shard_tokens`` rows: ``shard-00000.safetensors`` (one tensor per name ``[rows, ...]`` plus
``tokens`` ``[rows]``), or with ``format="npy"`` one ``shard-00000.<name>.npy`` per name plus ``.tokens.npy``.

``index.json`` lists the finished shards, each with its pieces ``[document, first token, tokens, first row]``,
and how many pieces are done. Memory stays bounded by one shard plus one batch whatever the dataset size.

Crash safety: every file is written as ``<name>.partial`` and renamed when complete (a rename is atomic), the
index last; so after a kill (even ``kill -9``) the directory holds only whole shards, and running the same
command again deletes any ``.partial`` leftovers, skips the pieces the index says are done and carries on.

>>> import rocmforge  # doctest: +SKIP
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> index = harvest(model, ["The cat sat.", "Dogs bark."], ["blocks.15.hook_resid_post"], "acts")  # doctest: +SKIP
>>> index["shards"][0]["rows"]  # doctest: +SKIP
9
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from rocmforge.hooks import HookPoint

Source = Union[str, os.PathLike, Sequence[str], Sequence[Sequence[int]]]
FORMATS = ("safetensors", "npy")


def documents(model: Any, source: Source) -> Iterator[list[int]]:
    """Token lists of the documents in ``source``, one at a time (a file is read line by line)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as lines:
            for line in lines:
                text = line.rstrip("\n")
                if text.strip():
                    yield model.tokenize(text)
        return
    for doc in source:
        yield model.tokenize(doc) if isinstance(doc, str) else [int(t) for t in doc]


def pieces(docs: Iterable[list[int]], piece_tokens: int) -> Iterator[tuple[int, int, list[int]]]:
    """``(document, first token, tokens)`` with every document cut into runs of at most ``piece_tokens``.

    >>> list(pieces([[1, 2, 3], [4]], 2))
    [(0, 0, [1, 2]), (0, 2, [3]), (1, 0, [4])]
    """
    for doc, ids in enumerate(docs):
        for start in range(0, len(ids), piece_tokens):
            yield doc, start, ids[start:start + piece_tokens]


def harvest(model: Any, source: Source, names: Sequence[str], out: str | os.PathLike, *, batch_tokens: int = 4096,
            shard_tokens: int = 1 << 16, piece_tokens: int | None = None, format: str = "safetensors",
            progress: bool = True) -> dict:
    """Write ``names``' activations of every token of ``source`` under ``out`` (module docstring); returns the index.

    ``piece_tokens`` (default: the model's context, at most ``batch_tokens``) bounds one document piece. Running it
    again on the same ``out`` resumes; a different ``names``/``format``/piece size there is an error.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    valid = set(model.hook_names())
    unknown = [n for n in names if n not in valid]
    if not names or unknown:
        raise KeyError(f"no hook point named {unknown or '(none given)'}; model.hook_names() lists them")
    block, n_blocks = model.kv.block_size, model.kv.n_blocks
    piece_tokens = min(piece_tokens or model.n_ctx, model.n_ctx, batch_tokens, n_blocks * block)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.partial"):
        stale.unlink()
    settings = {"names": list(names), "format": format, "piece_tokens": piece_tokens, "model": model.name}
    index = _read_index(out, settings)
    stop = _stop_layer(names, model.cfg.n_layers)
    bar = _progress(progress, index)
    buffers = _ShardBuffer(shard_tokens + batch_tokens)
    held: list[list[int]] = []  # pieces in the buffers: [document, first token, tokens, first row]
    rows = 0
    stream = pieces(documents(model, source), piece_tokens)
    for _ in range(index["pieces_done"]):  # resume: skip what the finished shards hold
        if next(stream, None) is None:
            break
    batch: list[tuple[int, int, list[int]]] = []
    tokens = blocks = 0  # in the batch being packed; each sequence takes whole KV cache blocks
    try:
        for piece in _then_none(stream):
            need = -(-len(piece[2]) // block) if piece is not None else 0
            if piece is not None and tokens + len(piece[2]) <= batch_tokens and blocks + need <= n_blocks:
                batch.append(piece)
                tokens, blocks = tokens + len(piece[2]), blocks + need
                continue
            if batch:
                rows = _run(model, batch, names, stop, buffers, held, rows)
                bar.update(sum(len(p[2]) for p in batch))
                if rows >= shard_tokens:
                    _write_shard(out, index, buffers, held, format)
                    held, rows = [], 0
            batch = [piece] if piece is not None else []
            tokens, blocks = (len(piece[2]), need) if piece is not None else (0, 0)
        if held:
            _write_shard(out, index, buffers, held, format)
    finally:
        bar.close()
    return index


def _then_none(stream: Iterator[Any]) -> Iterator[Any]:
    yield from stream
    yield None  # the end: run what is left in the batch


def _stop_layer(names: Sequence[str], n_layers: int) -> int | None:
    """The blocks the names need: ``None`` (the whole forward) if any name is after the last block."""
    layers = []
    for name in names:
        point = HookPoint(name)
        if point.layer is None and name != "hook_embed":
            return None
        layers.append(point.layer if point.layer is not None else 0)
    return max(layers) + 1


class _ShardBuffer:
    """One shard's rows per name, in arrays made once (``capacity`` rows) and filled in place: memory stays one
    shard whatever the dataset size, and writing needs no second copy."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.rows, self.arrays = capacity, 0, {}

    def append(self, name: str, values: np.ndarray) -> None:
        array = self.arrays.get(name)
        if array is None:
            array = self.arrays[name] = np.empty((self.capacity, *values.shape[1:]), values.dtype)
        array[self.rows:self.rows + len(values)] = values

    def take(self) -> dict[str, np.ndarray]:
        """The filled rows of every name (views), and the buffer starts over."""
        filled, self.rows = {name: a[:self.rows] for name, a in self.arrays.items()}, 0
        return filled


def _run(model: Any, batch: list[tuple[int, int, list[int]]], names: Sequence[str], stop: int | None,
         buffers: _ShardBuffer, held: list[list[int]], rows: int) -> int:
    _, cache = model.run_with_cache([p[2] for p in batch], names_filter=list(names), stop_at_layer=stop)
    for name in names:
        buffers.append(name, np.asarray(cache.flat(name)))
    buffers.append("tokens", np.concatenate([np.asarray(ids, np.int32) for _, _, ids in batch]))
    for doc, start, ids in batch:
        held.append([doc, start, len(ids), rows])
        rows += len(ids)
    buffers.rows = rows
    return rows


def _write_shard(out: Path, index: dict, buffers: _ShardBuffer, held: list[list[int]], format: str) -> None:
    number = len(index["shards"])
    tensors = buffers.take()
    stem = f"shard-{number:05d}"
    if format == "safetensors":
        from safetensors.numpy import save_file
        files = [f"{stem}.safetensors"]
        _atomic(out / files[0], lambda path: save_file(tensors, str(path)))
    else:
        files = []
        for name, array in tensors.items():
            files.append(f"{stem}.{name}.npy")
            _atomic(out / files[-1], lambda path, a=array: np.save(open(path, "wb"), a))
    index["shards"].append({"files": files, "rows": int(len(tensors["tokens"])), "pieces": held})
    index["pieces_done"] += len(held)
    _atomic(out / "index.json", lambda path: path.write_text(json.dumps(index, indent=1)))


def _atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` to ``path.partial``, flushed to disk, then renamed over ``path``."""
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_index(out: Path, settings: dict) -> dict:
    path = out / "index.json"
    if not path.exists():
        return {**settings, "shards": [], "pieces_done": 0}
    index = json.loads(path.read_text())
    for key, value in settings.items():
        if index.get(key) != value:
            raise ValueError(f"{out} holds a harvest with {key}={index.get(key)!r}, not {value!r}; "
                             "use another directory or the same settings")
    return index


def _progress(enabled: bool, index: dict) -> Any:
    from tqdm.auto import tqdm
    done = sum(s["rows"] for s in index["shards"])
    return tqdm(initial=done, unit="tok", desc="harvest", disable=not enabled, smoothing=0.1)
