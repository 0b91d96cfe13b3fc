"""KV cache as a pool of fixed-size blocks plus one block table per sequence (paged attention).

Every layer has a key pool and a value pool of ``n_blocks * block_size`` slots (``[slot, kv_head, d_head]``),
allocated once through the backend (``ops.zeros``; on numpy untouched pages cost no memory). A sequence owns a
list of blocks; position ``p`` of the sequence lives in slot ``table[p // block_size] * block_size + p % block_size``.
Several sequences share the pool, so the server can batch them and free a finished one's blocks at once.
``fork`` starts a sequence on another's full prompt blocks (``n`` > 1 choices read one prompt's keys): a shared
block is never written again (writes go past it), and goes back to the pool when its last holder lets go.

``KVCache.prepare`` turns "these new tokens for these sequences" into a ``Batch``: it reserves slots, checks the
context limit (raising ``ContextOverflowError`` with the numbers), and records where each token's keys go and
which slots each sequence reads.

>>> cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=4, head_dim_v=4, n_ctx=32, block_size=16)
>>> seq = cache.new_sequence()
>>> batch = cache.prepare([(seq, [5, 6, 7])])
>>> batch.positions.tolist(), cache.length(seq)
([0, 1, 2], 3)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import numpy as np

from rocmforge.errors import ContextOverflowError


@dataclass(frozen=True)
class Segment:
    """The tokens of one sequence inside a batch."""

    seq_id: int
    rows: slice               # rows of this sequence in the batch's flat token list
    positions: np.ndarray     # [t] positions of its new tokens
    key_slots: np.ndarray     # [L] pool slots of its keys/values for positions 0..L-1 (after this batch)


@dataclass(frozen=True)
class Batch:
    """A flat list of new tokens that may belong to several sequences (each sequence's tokens contiguous)."""

    tokens: np.ndarray        # [n] token ids
    positions: np.ndarray     # [n] position of each token in its sequence
    slots: np.ndarray         # [n] pool slot where each token's key and value are written
    segments: tuple[Segment, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def last_rows(self) -> np.ndarray:
        """Row of each sequence's last token: the rows whose logits generation needs."""
        return np.array([seg.rows.stop - 1 for seg in self.segments], dtype=np.int64)


@dataclass
class _SequenceState:
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    # every slot of ``blocks`` in order, kept alongside them: a decode step reads it instead of recomputing it.
    # Only ever replaced (grown by concatenation, cut by slicing), never written, so slices handed out stay valid.
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class KVCache:
    """Block pool shared by sequences; ``k[layer]`` / ``v[layer]`` are ``[n_slots, kv_head, d_head]`` arrays."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, head_dim_v: int, n_ctx: int,
                 n_blocks: int | None = None, block_size: int = 16, ops: Any = None):
        self.n_ctx, self.block_size = n_ctx, block_size
        self.n_blocks = n_blocks if n_blocks is not None else -(-n_ctx // block_size)
        n_slots = self.n_blocks * block_size
        zeros = ops.zeros if ops is not None else (lambda shape: np.zeros(shape, np.float32))
        self.k = [zeros((n_slots, n_kv_heads, head_dim)) for _ in range(n_layers)]
        self.v = [zeros((n_slots, n_kv_heads, head_dim_v)) for _ in range(n_layers)]
        self._free = list(range(self.n_blocks - 1, -1, -1))  # pop() hands out low blocks first
        self._seqs: dict[int, _SequenceState] = {}
        self._extra_holders: dict[int, int] = {}  # block -> holders beyond the first (blocks shared by fork)
        self._ids = count()

    # --- sequences -------------------------------------------------------------------------------------------
    def new_sequence(self) -> int:
        """Start an empty sequence and return its id."""
        seq_id = next(self._ids)
        self._seqs[seq_id] = _SequenceState()
        return seq_id

    def fork(self, seq_id: int, n_positions: int) -> int:
        """A new sequence holding the same blocks as ``seq_id`` for its first ``n_positions`` positions, rounded
        down to whole blocks (the rest it runs itself); returns its id (``length(child)`` says where it starts).

        >>> cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=4, head_dim_v=4, n_ctx=64, block_size=16)
        >>> parent = cache.new_sequence(); _ = cache.prepare([(parent, list(range(40)))])
        >>> child = cache.fork(parent, 39); cache.length(child), cache.n_free_blocks
        (32, 1)
        """
        parent = self._seqs[seq_id]
        n_blocks = min(n_positions, parent.length) // self.block_size
        shared = parent.blocks[:n_blocks]
        for block in shared:
            self._extra_holders[block] = self._extra_holders.get(block, 0) + 1
        child = self.new_sequence()
        self._seqs[child] = _SequenceState(list(shared), n_blocks * self.block_size,
                                           parent.slots[:n_blocks * self.block_size])
        return child

    def free(self, seq_id: int) -> None:
        """Give a sequence's blocks back to the pool and forget it."""
        state = self._seqs.pop(seq_id)
        self._release(state.blocks)

    def _release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            holders = self._extra_holders.pop(block, 0)
            if holders > 1:
                self._extra_holders[block] = holders - 1
            elif holders == 0:
                self._free.append(block)

    def length(self, seq_id: int) -> int:
        """Number of positions cached for a sequence."""
        return self._seqs[seq_id].length

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget positions ``length..`` of a sequence (their blocks go back to the pool)."""
        state = self._seqs[seq_id]
        keep = -(-length // self.block_size)
        self._release(state.blocks[keep:])
        del state.blocks[keep:]
        state.slots = state.slots[:keep * self.block_size]
        state.length = min(state.length, length)

    @property
    def n_free_blocks(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> list[int]:
        return list(self._seqs)

    # --- batches ---------------------------------------------------------------------------------------------
    def blocks_of(self, seq_id: int) -> list[int]:
        """The pool blocks of a sequence in position order (its block table; do not modify)."""
        return self._seqs[seq_id].blocks

    def slots_of(self, seq_id: int, stop: int, start: int = 0) -> np.ndarray:
        """Pool slots of positions ``start..stop-1`` of a sequence."""
        return self._seqs[seq_id].slots[start:stop]

    def prepare(self, new_tokens: Sequence[tuple[int, Sequence[int]]]) -> Batch:
        """Reserve cache slots for new tokens of one or more sequences and describe them as a ``Batch``.

        Raises ``ContextOverflowError`` (reserving nothing) if a sequence would exceed ``n_ctx`` or the pool is full.
        """
        needed_blocks = 0
        for seq_id, tokens in new_tokens:
            state = self._seqs[seq_id]
            new_length = state.length + len(tokens)
            if new_length > self.n_ctx:
                raise ContextOverflowError(
                    f"sequence needs {new_length} positions ({state.length} cached + {len(tokens)} new) "
                    f"but the context window is {self.n_ctx}")
            needed_blocks += -(-new_length // self.block_size) - len(state.blocks)
        if needed_blocks > len(self._free):
            raise ContextOverflowError(
                f"KV cache pool is full: {needed_blocks} more blocks of {self.block_size} positions needed, "
                f"{len(self._free)} free of {self.n_blocks}")

        # Python lists first and one array each at the end: a decode tick of many one-token sequences would
        # otherwise spend most of its host time making tiny arrays. Segment positions are views of the batch's.
        tokens_out: list[int] = []
        positions_out: list[int] = []
        slots_out, spans = [], []
        for seq_id, tokens in new_tokens:
            state = self._seqs[seq_id]
            start, stop = state.length, state.length + len(tokens)
            while len(state.blocks) * self.block_size < stop:
                block = self._free.pop()
                state.blocks.append(block)
                state.slots = np.concatenate([state.slots, np.arange(block * self.block_size,
                                                                     (block + 1) * self.block_size)])
            state.length = stop
            spans.append((seq_id, len(tokens_out), start, stop))
            tokens_out.extend(tokens)
            positions_out.extend(range(start, stop))
            slots_out.append(state.slots[start:stop])
        positions = np.array(positions_out, dtype=np.int64)
        segments = tuple(Segment(seq_id, slice(row, row + stop - start), positions[row:row + stop - start],
                                 self.slots_of(seq_id, stop)) for seq_id, row, start, stop in spans)
        return Batch(np.array(tokens_out, dtype=np.int64), positions, np.concatenate(slots_out), segments)
