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

``harvest_on_ray`` (``rocmforge harvest --workers N``) runs the same batches on Ray Data actors and writes the same
files from this process, in the same order; either resumes the other's directory.

>>> import rocmforge  # doctest: +SKIP
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> index = harvest(model, ["The cat sat.", "Dogs bark."], ["blocks.15.hook_resid_post"], "acts")  # doctest: +SKIP
>>> index["shards"][0]["rows"]  # doctest: +SKIP
9
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from rocmforge.hooks import HookPoint, hook_names

Source = Union[str, os.PathLike, Sequence[str], Sequence[Sequence[int]]]
Piece = tuple[int, int, list[int]]  # (document, first token, tokens)
FORMATS = ("safetensors", "npy")


@dataclass(frozen=True)
class Packing:
    """What cutting and packing a dataset needs of a model: its tokenizer, hook names and KV pool, not its weights.

    ``Packing.of(model)`` reads a loaded model; ``Packing.of_file(path, n_ctx, n_parallel)`` reads only the GGUF's
    tokenizer and header, for the Ray driver, whose actors load the weights.
    """

    tokenize: Callable[[str], list[int]]
    n_layers: int
    n_ctx: int
    block_size: int
    n_blocks: int
    model_name: str

    @classmethod
    def of(cls, model: Any) -> "Packing":
        return cls(model.tokenize, model.cfg.n_layers, model.n_ctx, model.kv.block_size, model.kv.n_blocks,
                   model.name)

    @classmethod
    def of_file(cls, path: str | os.PathLike, n_ctx: int | None, n_parallel: int) -> "Packing":
        from rocmforge.gguf_file import GGUFFile
        from rocmforge.model import KV_BLOCK_SIZE, kv_pool_size
        from rocmforge.tokenizer import Tokenizer

        gguf = GGUFFile(path)
        tokenizer = Tokenizer.from_gguf(gguf)
        n_ctx, n_blocks = kv_pool_size(gguf.config.context_length, n_ctx, n_parallel)
        return cls(lambda text: tokenizer.encode(text, add_bos=None, special=True), gguf.config.n_layers, n_ctx,
                   KV_BLOCK_SIZE, n_blocks, Path(path).stem)


def documents(tokenize: Callable[[str], list[int]], source: Source) -> Iterator[list[int]]:
    """Token lists of the documents in ``source``, one at a time (a file is read line by line)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as lines:
            for line in lines:
                text = line.rstrip("\n")
                if text.strip():
                    yield tokenize(text)
        return
    for doc in source:
        yield tokenize(doc) if isinstance(doc, str) else [int(t) for t in doc]


def pieces(docs: Iterable[list[int]], piece_tokens: int) -> Iterator[Piece]:
    """``(document, first token, tokens)`` with every document cut into runs of at most ``piece_tokens``.

    >>> list(pieces([[1, 2, 3], [4]], 2))
    [(0, 0, [1, 2]), (0, 2, [3]), (1, 0, [4])]
    """
    for doc, ids in enumerate(docs):
        for start in range(0, len(ids), piece_tokens):
            yield doc, start, ids[start:start + piece_tokens]


def batches(stream: Iterable[Piece], batch_tokens: int, block_size: int, n_blocks: int) -> Iterator[list[Piece]]:
    """Consecutive pieces packed into forwards of at most ``batch_tokens`` tokens and ``n_blocks`` KV blocks
    (each sequence takes whole blocks of ``block_size``).

    >>> [[p[0] for p in b] for b in batches([(0, 0, [1, 2]), (1, 0, [3]), (2, 0, [4, 5])], 3, 16, 8)]
    [[0, 1], [2]]
    """
    batch: list[Piece] = []
    tokens = blocks = 0
    for piece in stream:
        need = -(-len(piece[2]) // block_size)
        if batch and (tokens + len(piece[2]) > batch_tokens or blocks + need > n_blocks):
            yield batch
            batch, tokens, blocks = [], 0, 0
        batch.append(piece)
        tokens, blocks = tokens + len(piece[2]), blocks + need
    if batch:
        yield batch


def harvest(model: Any, source: Source, names: Sequence[str], out: str | os.PathLike, *, batch_tokens: int = 4096,
            shard_tokens: int = 1 << 16, piece_tokens: int | None = None, format: str = "safetensors",
            progress: bool = True) -> dict:
    """Write ``names``' activations of every token of ``source`` under ``out`` (module docstring); returns the index.

    ``piece_tokens`` (default: the model's context, at most ``batch_tokens``) bounds one document piece. Running it
    again on the same ``out`` resumes; a different ``names``/``format``/piece size there is an error.
    """
    shards, todo = open_shards(Packing.of(model), source, names, out, batch_tokens=batch_tokens,
                               shard_tokens=shard_tokens, piece_tokens=piece_tokens, format=format, progress=progress)
    stop = stop_layer(names, model.cfg.n_layers)
    try:
        for batch in todo:
            shards.add(batch, activations(model, batch, names, stop))
        return shards.finish()
    finally:
        shards.close()


def open_shards(packing: Packing, source: Source, names: Sequence[str], out: str | os.PathLike, *, batch_tokens: int,
          shard_tokens: int, piece_tokens: int | None, format: str, progress: bool
          ) -> tuple["Shards", Iterator[list[Piece]]]:
    """Check the arguments, open ``out`` (resuming what its index holds) and the batches still to run, in order."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    valid = set(hook_names(packing.n_layers))
    unknown = [n for n in names if n not in valid]
    if not names or unknown:
        raise KeyError(f"no hook point named {unknown or '(none given)'}; model.hook_names() lists them")
    piece_tokens = min(piece_tokens or packing.n_ctx, packing.n_ctx, batch_tokens,
                       packing.n_blocks * packing.block_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.partial"):
        stale.unlink()
    settings = {"names": list(names), "format": format, "piece_tokens": piece_tokens, "model": packing.model_name}
    shards = Shards(out, _read_index(out, settings), list(names), shard_tokens, batch_tokens, format, progress)
    stream = pieces(documents(packing.tokenize, source), piece_tokens)
    for _ in range(shards.index["pieces_done"]):  # resume: skip what the finished shards hold
        if next(stream, None) is None:
            break
    return shards, batches(stream, batch_tokens, packing.block_size, packing.n_blocks)


def activations(model: Any, batch: Sequence[Piece], names: Sequence[str], stop: int | None) -> dict[str, np.ndarray]:
    """One batched forward: every name's rows, piece after piece, and the ``tokens``."""
    _, cache = model.run_with_cache([p[2] for p in batch], names_filter=list(names), stop_at_layer=stop)
    rows = {name: np.asarray(cache.flat(name)) for name in names}
    rows["tokens"] = np.concatenate([np.asarray(ids, np.int32) for _, _, ids in batch])
    return rows


def stop_layer(names: Sequence[str], n_layers: int) -> int | None:
    """The blocks the names need: ``None`` (the whole forward) if any name is after the last block."""
    layers = []
    for name in names:
        point = HookPoint(name)
        if point.layer is None and name != "hook_embed":
            return None
        layers.append(point.layer if point.layer is not None else 0)
    return max(layers) + 1


class HarvestWorker:
    """A Ray Data actor: loads the model once, then runs batches (rows ``batch``, ``pieces`` as JSON) and answers each
    batch's ``activations`` as safetensors bytes."""

    def __init__(self, model: str, device: str, n_ctx: int | None, n_parallel: int, names: list[str]) -> None:
        from rocmforge.model import load

        self.model = load(model, device=device, n_ctx=n_ctx, n_parallel=n_parallel)
        self.names, self.stop = names, stop_layer(names, self.model.cfg.n_layers)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from safetensors.numpy import save

        done = [save(activations(self.model, json.loads(str(batch)), self.names, self.stop))
                for batch in rows["pieces"]]
        return {"batch": rows["batch"], "activations": np.array(done, dtype=object)}


def harvest_on_ray(model: str, source: Source, names: Sequence[str], out: str | os.PathLike, workers: int, *,
                   device: str = "auto", n_ctx: int | None = None, n_parallel: int = 1, batch_tokens: int = 4096,
                   shard_tokens: int = 1 << 16, piece_tokens: int | None = None, format: str = "safetensors",
                   progress: bool = True) -> dict:
    """``harvest`` on Ray Data: the forwards as ``map_batches`` over ``workers`` actors (one per GPU, else one CPU
    each) holding ``load(model, device, n_ctx, n_parallel)``; this process packs the same batches and writes the
    same shards and index, byte for byte, as ``harvest`` on that model.

    This process holds the token ids of what is left to run (as JSON, ~6 bytes a token) and no weights; resuming
    works as for ``harvest`` (either may resume the other's directory): whole shards stay, the rest is run again.
    """
    from safetensors.numpy import load

    from rocmforge.batch_jobs import ray_actor_options
    from rocmforge.registry import resolve

    path = resolve(model)
    shards, todo = open_shards(Packing.of_file(path, n_ctx, n_parallel), source, names, out,
                               batch_tokens=batch_tokens, shard_tokens=shard_tokens, piece_tokens=piece_tokens,
                               format=format, progress=progress)
    todo = [json.dumps(batch) for batch in todo]  # compact: a Python list holds ~36 bytes a token, this ~6
    try:
        if todo:
            import ray

            options = ray_actor_options(device, workers)
            dataset = ray.data.from_items([{"batch": i, "pieces": batch} for i, batch in enumerate(todo)])
            results = dataset.map_batches(HarvestWorker, batch_size=1, **options, fn_constructor_kwargs={
                "model": str(path), "device": device, "n_ctx": n_ctx, "n_parallel": n_parallel, "names": list(names)})
            results.context.execution_options.preserve_order = True
            waiting: dict[int, bytes] = {}  # a batch that came early (should order not be kept) waits its turn
            written = 0
            for row in results.iter_rows():
                waiting[int(row["batch"])] = row["activations"]
                while written in waiting:
                    shards.add(json.loads(todo[written]), load(waiting.pop(written)))
                    written += 1
            if written != len(todo):
                raise RuntimeError(f"Ray Data returned {written} of {len(todo)} batches; the shards so far are kept")
        return shards.finish()
    finally:
        shards.close()


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


class Shards:
    """The output directory: its index, the shard being filled, and writing each shard once it holds
    ``shard_tokens`` rows (files first, then the index, each renamed into place)."""

    def __init__(self, out: Path, index: dict, names: list[str], shard_tokens: int, batch_tokens: int, format: str,
                 progress: bool) -> None:
        self.out, self.index, self.names, self.format, self.shard_tokens = out, index, names, format, shard_tokens
        self.buffers = _ShardBuffer(shard_tokens + batch_tokens)
        self.held: list[list[int]] = []  # pieces in the buffers: [document, first token, tokens, first row]
        self.bar = _progress(progress, index)

    def add(self, batch: Sequence[Piece], rows: dict[str, np.ndarray]) -> None:
        """A batch's ``activations`` (in the order the batches were packed)."""
        for name in [*self.names, "tokens"]:  # this order, whatever order ``rows`` came in: the npy file list
            self.buffers.append(name, rows[name])
        for doc, first, ids in batch:
            self.held.append([doc, first, len(ids), self.buffers.rows])
            self.buffers.rows += len(ids)
        self.bar.update(sum(len(p[2]) for p in batch))
        if self.buffers.rows >= self.shard_tokens:
            self._write()

    def finish(self) -> dict:
        """Write the last (short) shard; the index."""
        if self.held:
            self._write()
        return self.index

    def close(self) -> None:
        self.bar.close()

    def _write(self) -> None:
        number = len(self.index["shards"])
        tensors = self.buffers.take()
        stem = f"shard-{number:05d}"
        if self.format == "safetensors":
            from safetensors.numpy import save_file
            files = [f"{stem}.safetensors"]
            _atomic(self.out / files[0], lambda path: save_file(tensors, str(path)))
        else:
            files = []
            for name, array in tensors.items():
                files.append(f"{stem}.{name}.npy")
                _atomic(self.out / files[-1], lambda path, a=array: np.save(open(path, "wb"), a))
        self.index["shards"].append({"files": files, "rows": int(len(tensors["tokens"])), "pieces": self.held})
        self.index["pieces_done"] += len(self.held)
        self.held = []
        _atomic(self.out / "index.json", lambda path: path.write_text(json.dumps(self.index, indent=1)))


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
