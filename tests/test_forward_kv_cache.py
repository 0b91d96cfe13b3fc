"""The paged KV cache: slots follow the block tables, the pool is shared and reused, limits name the numbers."""
from __future__ import annotations

import numpy as np
import pytest

from rocmforge.backends.cpu import CpuBackend
from rocmforge.errors import ContextOverflowError
from rocmforge.kv_cache import KVCache


def _cache(n_ctx: int = 40, n_blocks: int | None = None) -> KVCache:
    return KVCache(n_layers=2, n_kv_heads=1, head_dim=4, head_dim_v=4, n_ctx=n_ctx, n_blocks=n_blocks, block_size=8)


def test_two_sequences_interleave_blocks_and_slots_follow_their_tables():
    cache = _cache(n_blocks=6)
    a, b = cache.new_sequence(), cache.new_sequence()
    batch = cache.prepare([(a, list(range(10))), (b, list(range(3)))])
    assert batch.n_tokens == 13 and batch.last_rows.tolist() == [9, 12]
    assert batch.positions.tolist() == list(range(10)) + [0, 1, 2]
    # a holds blocks 0 and 1, b holds block 2: slot = block * 8 + offset
    assert batch.slots.tolist() == list(range(10)) + [16, 17, 18]
    step = cache.prepare([(b, [7]), (a, [7])])
    assert step.slots.tolist() == [19, 10] and step.positions.tolist() == [3, 10]
    assert step.segments[1].key_slots.tolist() == list(range(11))  # a reads all its positions 0..10
    assert cache.length(a) == 11 and cache.length(b) == 4


def test_freed_blocks_are_reused_and_truncate_returns_blocks():
    cache = _cache(n_blocks=4)
    a = cache.new_sequence()
    cache.prepare([(a, list(range(20)))])  # 3 blocks
    assert cache.n_free_blocks == 1
    cache.truncate(a, 8)
    assert cache.n_free_blocks == 3 and cache.length(a) == 8
    cache.free(a)
    b = cache.new_sequence()
    assert cache.prepare([(b, [1])]).slots.tolist() == [0]  # the lowest block again
    assert cache.sequences == [b]


def test_context_and_pool_limits_raise_with_numbers_and_reserve_nothing():
    cache = _cache(n_ctx=16, n_blocks=3)
    a = cache.new_sequence()
    cache.prepare([(a, list(range(10)))])
    with pytest.raises(ContextOverflowError, match="needs 17 positions \\(10 cached \\+ 7 new\\).*window is 16"):
        cache.prepare([(a, list(range(7)))])
    b = cache.new_sequence()
    with pytest.raises(ContextOverflowError, match="2 more blocks of 8 positions needed, 1 free of 3"):
        cache.prepare([(b, list(range(16)))])
    assert cache.length(a) == 10 and cache.length(b) == 0 and cache.n_free_blocks == 1


def test_pool_storage_is_per_layer_and_written_where_the_batch_says():
    cache = _cache()
    a = cache.new_sequence()
    batch = cache.prepare([(a, [1, 2, 3])])
    k = np.arange(12, dtype=np.float32).reshape(3, 1, 4)
    CpuBackend().kv_write(cache, 1, batch, k, -k)
    assert np.array_equal(cache.k[1][batch.slots], k) and np.array_equal(cache.v[1][batch.slots], -k)
    assert not cache.k[0].any()
