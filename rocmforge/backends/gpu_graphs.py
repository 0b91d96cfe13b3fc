"""Decode steps as replayed device graphs: one sequence (``graph_step``) or a whole batch of sequences
(``graph_step_batch``), so a token costs one graph launch instead of hundreds of kernel launches from Python.

Batched decode: one graph per bucket of rows (``BUCKETS``; a live batch is padded up to the next one with
copies of its first row, which compute and store exactly what that row does). Everything that changes between
tokens lives in one int32 device buffer the host refills before each replay: each row's token, position, cache
slot, block table and sampling settings (``rocmforge.sampler.DeviceRow``). Each bucket is two graphs: the
forward, then the sampling kernel. Between the two replays the host computes the grammar masks of constrained
rows (while the device runs the forward) and uploads them, so the mask is applied on the device too and only the
rows' token ids come back. Kernels whose result for a row could depend on the rows around
it are not used here (see ``rocmforge.backends.gpu_launch``): a sequence's logits are the same bits alone as
inside a batch of 64, and so is its text.

>>> from rocmforge.backends.gpu_graphs import BUCKETS, bucket_for
>>> bucket_for(5), BUCKETS[-1]
(8, 128)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from rocmforge.backends.device_memory import DeviceArray, Pool
from rocmforge.backends.gpu_records import DecodeGraph
from rocmforge.errors import DeviceError
from rocmforge.kv_cache import Batch, KVCache, Segment

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ADJUST_CAPACITY = 128  # adjusted logits (bias, penalties) per row the device sampler takes; more: host sampling
MAX_HEADS = 1024        # attention ticket counters per row


def bucket_for(rows: int) -> int:
    """The captured batch size a batch of ``rows`` sequences is padded to."""
    for bucket in BUCKETS:
        if bucket >= rows:
            return bucket
    raise DeviceError(f"a batched decode step takes at most {BUCKETS[-1]} sequences, got {rows}")


@dataclass
class RowInputs:
    """Device views of a batched step's inputs (what its kernels read), plus the cache geometry."""

    tokens: DeviceArray
    positions: DeviceArray
    slots: DeviceArray
    iparams: DeviceArray     # [rows, 2] top_k, number of adjusted ids
    fparams: DeviceArray     # [rows, 8] float32: the DeviceRow floats, then the uniform draw
    tables: DeviceArray      # [rows, max_blocks] block table of each row
    adjust_ids: DeviceArray  # [rows, ADJUST_CAPACITY]
    adjust: DeviceArray      # [rows, ADJUST_CAPACITY, 2] float32: bias, count in the penalty window
    tickets: DeviceArray     # attention merge counters, [rows * MAX_HEADS], zero between launches
    block_size: int
    n_ctx: int
    masks: DeviceArray | None = None  # [rows, 1 + vocab / 32]: a flag (0: no grammar), the packed allowed tokens


@dataclass
class RowsGraph:
    """A captured batched decode step of ``rows`` rows: its input buffer (device + host), the batch the forward
    was captured with (its arrays stand for the inputs), and the two graphs (forward, sampling) with their
    private memory, the logits between them and the output."""

    rows: int
    buffer: DeviceArray
    host: np.ndarray
    offsets: dict[str, int]
    inputs: RowInputs
    batch: Batch
    pool: Pool
    executable: Any = None          # the forward
    sampling: Any = None            # the sampling kernel
    logits: DeviceArray | None = None
    output: DeviceArray | None = None
    table_key: tuple = field(default_factory=tuple)
    masks_host: np.ndarray | None = None  # [rows, 1 + vocab / 32], what ``inputs.masks`` was last filled with


class DecodeGraphs:
    """Captured decode steps for ``GpuBackend`` (a mixin; see the module docstring)."""

    # --- one sequence -----------------------------------------------------------------------------------------
    def graph_step(self, batch: Batch, step: Callable[[], DeviceArray]) -> DeviceArray:
        """Run ``step()`` (one forward over ``batch``) as a replayed device graph.

        Only a single sequence decoding one token is graphed; anything else runs ``step()`` eagerly. The first
        call runs eagerly once (compiling kernels, filling the pools), then captures; later calls replay. The
        returned array is the graph's own output buffer: read it before the next call.
        """
        if batch.n_tokens != 1 or len(batch.segments) != 1:
            return step()
        key = (batch.n_tokens, len(batch.segments))
        graph = self._graphs.get(key)
        if graph is None:
            graph = DecodeGraph(inputs=self._empty((4 + self._max_slots,), np.int32), pool=Pool(self.rt),
                                host=np.empty(4 + self._max_slots, np.int32))
            self._stage(batch, graph)
            # the forward reads its batch arrays from the graph's input buffer (``_ints``)
            seg = batch.segments[0]
            views = [graph.inputs.rows(i, i + 1) for i in range(4)] + [graph.inputs.rows(4, 4 + len(seg.key_slots))]
            self._static = list(zip([batch.tokens, batch.positions, batch.slots, seg.positions, seg.key_slots], views))
            step()  # warm-up; writing this token's K/V twice is harmless
            self._flush()
            outer, self._pool, self._capturing = self._pool, graph.pool, True
            try:
                self.rt.begin_capture()
                graph.output = step()
                self._flush()
                graph.executable = self.rt.end_capture()
            finally:
                self._pool, self._capturing, self._pending = outer, False, None
            self._graphs[key] = graph
        else:
            self._stage(batch, graph)
        self.rt.replay(graph.executable)
        self._static = []
        return graph.output

    def replay_ms(self, n: int = 100) -> float:
        """Device milliseconds per replay of the captured decode graph (its kernels alone, no host work)."""
        graph = self._graphs[(1, 1)]
        start, end = self.rt.event(), self.rt.event()
        self.rt.record(start)
        for _ in range(n):
            self.rt.replay(graph.executable)
        self.rt.record(end)
        return self.rt.elapsed_ms(start, end) / n

    def _stage(self, batch: Batch, graph: DecodeGraph) -> None:
        """Write this token's id, position, cache slot and key slots into the graph's input buffer."""
        seg = batch.segments[0]
        n = 4 + len(seg.key_slots)
        if n > graph.inputs.size:
            raise DeviceError(f"decode graph inputs hold {graph.inputs.size - 4} key slots, {len(seg.key_slots)} needed")
        host = graph.host  # filled in place: this runs between two replays, on the decode loop's critical path
        host[0], host[1], host[2], host[3] = batch.tokens[0], batch.positions[0], batch.slots[0], seg.positions[0]
        host[4:n] = seg.key_slots
        self.rt.copy_to_device(graph.inputs.address, host[:n])

    # --- a batch of sequences -------------------------------------------------------------------------------
    def graph_step_batch(self, batch: Batch, forward: Callable[[Batch], DeviceArray], cache: KVCache,
                         rows: Sequence[Any],
                         masks: Callable[[], Sequence[np.ndarray | None]] | None = None) -> np.ndarray:
        """One decode token for every sequence of ``batch`` (one token each) and its sampled successor, as
        replayed graphs -> the next token id of each row (int32; -1 where every token is banned).

        ``forward(b)`` runs the model over a batch ``b`` and returns its logits (one row per sequence);
        ``rows[i]`` is row i's ``rocmforge.sampler.DeviceRow``. ``masks()``, called while the device runs the
        forward, gives each row's grammar mask (packed int32 bitmask, ``rocmforge.constraints``) or None; the
        sampling kernel bans what a mask does not allow. The first call for a bucket runs eagerly once, then
        captures; later calls refill the inputs and replay.
        """
        n = len(batch.segments)
        if batch.n_tokens != n:
            raise DeviceError("graph_step_batch takes one new token per sequence (decode steps only)")
        bucket = bucket_for(n)
        key = (bucket, id(cache))  # the graph holds this cache's pool addresses
        graph = self._row_graphs.get(key)
        fresh = graph is None
        if fresh:
            graph = self._new_rows_graph(bucket, cache)
        self._fill_rows(graph, batch, cache, rows)
        if fresh:
            self._capture_rows(graph, forward)
            self._row_graphs[key] = graph
        self.rt.replay(graph.executable)
        self._fill_masks(graph, n, masks() if masks is not None else None)  # while the forward runs
        self.rt.replay(graph.sampling)
        out = np.empty(bucket, np.int32)
        self.rt.copy_to_host(out, graph.output.address)
        return out[:n]

    def _new_rows_graph(self, bucket: int, cache: KVCache) -> RowsGraph:
        max_blocks = -(-cache.n_ctx // cache.block_size)
        shapes = {"tokens": (bucket,), "positions": (bucket,), "slots": (bucket,), "iparams": (bucket, 2),
                  "fparams": (bucket, 8), "tables": (bucket, max_blocks), "adjust_ids": (bucket, ADJUST_CAPACITY),
                  "adjust": (bucket, ADJUST_CAPACITY, 2)}
        offsets, total = {}, 0
        for name, shape in shapes.items():
            offsets[name], total = total, total + int(np.prod(shape))
        offsets["end"] = total
        buffer = self._empty((total,), np.int32)
        host = np.zeros(total, np.int32)
        if self._row_tickets is None:
            self._row_tickets = self._empty((BUCKETS[-1] * MAX_HEADS,), np.int32)
            self.rt.memset(self._row_tickets.address, 0, self._row_tickets.nbytes)
        views = {name: DeviceArray(buffer.address + offsets[name] * 4, shape, buffer.block,
                                   np.float32 if name in ("fparams", "adjust") else np.int32)
                 for name, shape in shapes.items()}
        inputs = RowInputs(**views, tickets=self._row_tickets, block_size=cache.block_size, n_ctx=cache.n_ctx)
        empty = np.zeros(0, np.int64)
        stand_in = Batch(np.zeros(bucket, np.int64), np.zeros(bucket, np.int64), np.zeros(bucket, np.int64),
                         tuple(Segment(-1, slice(i, i + 1), empty, empty) for i in range(bucket)))
        return RowsGraph(bucket, buffer, host, offsets, inputs, stand_in, Pool(self.rt))

    def _fill_rows(self, graph: RowsGraph, batch: Batch, cache: KVCache, rows: Sequence[Any]) -> None:
        """Write this step's inputs into the graph's buffer; rows past the batch repeat its first row."""
        n, bucket, off, host = len(batch.segments), graph.rows, graph.offsets, graph.host
        source = np.where(np.arange(bucket) < n, np.arange(bucket), 0)
        for name, values in (("tokens", batch.tokens), ("positions", batch.positions), ("slots", batch.slots)):
            host[off[name]:off[name] + bucket] = values[source]
        rows = [rows[i] for i in source]
        iparams = host[off["iparams"]:off["fparams"]].reshape(bucket, 2)
        fparams = host[off["fparams"]:off["tables"]].view(np.float32).reshape(bucket, 8)
        iparams[:] = [(r.top_k, len(r.ids)) for r in rows]
        fparams[:, :6] = [r.floats for r in rows]
        fparams[:, 6] = [r.uniform for r in rows]
        upload_end = off["tables"]
        seq_ids = [batch.segments[i].seq_id for i in source]
        key = tuple((s, len(cache.blocks_of(s)), cache.blocks_of(s)[-1]) for s in seq_ids)
        if key != graph.table_key:  # a row changed or grew a block: the tables go up too
            tables = host[off["tables"]:off["adjust_ids"]].reshape(bucket, -1)
            for i, s in enumerate(seq_ids):
                blocks = cache.blocks_of(s)
                tables[i, :len(blocks)] = blocks
            graph.table_key, upload_end = key, off["adjust_ids"]
        if any(len(r.ids) for r in rows):
            ids = host[off["adjust_ids"]:off["adjust"]].reshape(bucket, -1)
            adjust = host[off["adjust"]:off["end"]].view(np.float32).reshape(bucket, -1, 2)
            for i, r in enumerate(rows):
                ids[i, :len(r.ids)], adjust[i, :len(r.ids), 0], adjust[i, :len(r.ids), 1] = r.ids, r.bias, r.counts
            self.rt.copy_to_device(graph.buffer.address + off["adjust_ids"] * 4, host[off["adjust_ids"]:off["end"]])
        self.rt.copy_to_device(graph.buffer.address, host[:upload_end])

    def _fill_masks(self, graph: RowsGraph, n: int, masks: Sequence[np.ndarray | None] | None) -> None:
        """Upload this step's grammar masks (rows past the batch repeat its first row's); clear the flags after
        a step that had some."""
        host = graph.masks_host
        if not any(m is not None for m in masks or ()):
            if host[:, 0].any():
                host[:, 0] = 0
                self.rt.copy_to_device(graph.inputs.masks.address, host)
            return
        for i in range(graph.rows):
            mask = masks[i if i < n else 0]
            host[i, 0] = mask is not None
            if mask is not None:  # a tokenizer smaller than the model's vocabulary: the ids past it are banned
                host[i, 1:1 + len(mask)], host[i, 1 + len(mask):] = mask, 0
        self.rt.copy_to_device(graph.inputs.masks.address, host)

    def forward_rows(self, batch: Batch, forward: Callable[[Batch], DeviceArray], cache: KVCache) -> np.ndarray:
        """The logits ``[rows, vocab]`` of a batched decode step, run eagerly with the kernels its graph replays
        (what the batch-invariance test compares; the graph itself returns token ids only)."""
        graph = self._new_rows_graph(bucket_for(len(batch.segments)), cache)
        greedy = SimpleNamespace(top_k=0, floats=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0), ids=(), uniform=0.0)
        self._fill_rows(graph, batch, cache, [greedy] * len(batch.segments))
        self._enter_rows(graph)
        try:
            return self.to_host(forward(graph.batch))[:len(batch.segments)]
        finally:
            self._rows, self._static = None, []

    def _enter_rows(self, graph: RowsGraph) -> None:
        """From here the forward reads the graph's inputs and runs the batched-decode kernels."""
        stand_in, inputs = graph.batch, graph.inputs
        self._static = [(stand_in.tokens, inputs.tokens), (stand_in.positions, inputs.positions),
                        (stand_in.slots, inputs.slots)]
        self._rows = inputs

    def _capture_rows(self, graph: RowsGraph, forward: Callable[[Batch], DeviceArray]) -> None:
        stand_in, inputs = graph.batch, graph.inputs
        self._enter_rows(graph)
        try:
            logits = forward(stand_in)  # warm-up: compiles, fills the pools; same K/V as the replay
            self._flush()
            words = 1 + -(-logits.shape[1] // 32)
            graph.masks_host = np.zeros((graph.rows, words), np.int32)
            inputs.masks = self._empty(graph.masks_host.shape, np.int32)
            self.rt.copy_to_device(inputs.masks.address, graph.masks_host)
            self._sample_rows(logits, inputs)
            self._flush()
            outer, self._pool, self._capturing = self._pool, graph.pool, True
            try:
                self.rt.begin_capture()
                graph.logits = forward(stand_in)  # kept alive: the sampling graph reads it
                self._flush()
                graph.executable = self.rt.end_capture()
                self.rt.begin_capture()
                graph.output = self._sample_rows(graph.logits, inputs)
                self._flush()
                graph.sampling = self.rt.end_capture()
            finally:
                self._pool, self._capturing, self._pending = outer, False, None
        finally:
            self._rows, self._static = None, []
