"""Grammar masks on the GPU path, checked on the CPU: ``GpuBackend.graph_step_batch`` and ``engine.step_all`` over a
stand-in runtime whose device memory is host memory, whose graphs record and replay launches and copies, and which
runs the ``sample_rows`` kernel as its numpy twin (``rocmforge/ops/sample_rows.py``, itself tested against the host
sampler in ``test_sample_rows.py``). Every launch's arguments are checked against the kernel's declaration in
``kernels/<op>.hip`` (count, pointer / int / long / float). This proves the host side — the mask buffer's layout,
the per-row flags, padding rows, masks computed between the forward and the sampling replay, flags cleared after —
without a GPU; ``test_gpu_batched.py`` runs the real kernel against the host sampler on one."""
from __future__ import annotations

import ctypes
import re
from types import SimpleNamespace

import numpy as np

from kernels import kernel_source
from rocmforge.backends.gpu import GpuBackend
from rocmforge.engine import Generation, step_all
from rocmforge.hooks import Hooks
from rocmforge.kv_cache import KVCache
from rocmforge.ops.sample_rows import sample_rows
from rocmforge.sampler import Sampler, SamplingParams
from tests.test_sample_rows import EveryThirdToken, mirror_samplers, pack

C_TYPES = {ctypes.c_void_p: "pointer", ctypes.c_int: "int", ctypes.c_int64: "long", ctypes.c_float: "float"}


def host_view(address: int, count: int, dtype) -> np.ndarray:
    """``count`` values of ``dtype`` at a (host) address, as a writable numpy view."""
    dtype = np.dtype(dtype)
    return np.frombuffer((ctypes.c_byte * (count * dtype.itemsize)).from_address(address), dtype)


def declared_kinds(op: str, kernel: str) -> list[str]:
    """The parameter kinds of ``kernel`` in ``kernels/<op>.hip``: pointer, int, long or float."""
    found = re.search(rf'extern "C" __global__ void (?:\w+\(\d+\)\s*)?{kernel}\((.*?)\)\s*\{{', kernel_source(op), re.S)
    assert found, f"{kernel} is not declared in kernels/{op}.hip"
    return ["pointer" if "*" in p else p.split()[-2] for p in found[1].split(",")]


class HostRuntime:
    """The ``Runtime`` calls the GPU backend makes, on host memory; ``sample_rows`` runs as its numpy twin."""

    name, arch, warp_size, device_name = "cuda", "host", 32, "host memory"

    def __init__(self):
        self._buffers: dict[int, np.ndarray] = {}
        self._capture: list | None = None
        self.launched: list[str] = []

    def alloc(self, nbytes: int) -> int:
        buffer = np.zeros(nbytes, np.uint8)
        self._buffers[buffer.ctypes.data] = buffer
        return buffer.ctypes.data

    def memset(self, address: int, byte: int, nbytes: int) -> None:
        self._do(lambda: ctypes.memset(address, byte, nbytes))

    def copy_to_device(self, address: int, host: np.ndarray) -> None:
        source = np.array(host)  # a copy now: the caller may reuse its array, as with a real pageable copy
        self._do(lambda: ctypes.memmove(address, source.ctypes.data, source.nbytes))

    def copy_to_host(self, host: np.ndarray, address: int) -> None:
        ctypes.memmove(host.ctypes.data, address, host.nbytes)

    def function(self, op: str, kernel: str) -> tuple[str, str]:
        return op, kernel

    def launch(self, function, grid, block, args, shared_bytes=0) -> None:
        op, kernel = function
        kinds = [C_TYPES[type(a)] for a in args]
        assert kinds == declared_kinds(op, kernel), f"{kernel}: launched with {kinds}"
        values = [(a.value or 0) if isinstance(a, ctypes.c_void_p) else a.value for a in args]  # null: None
        self._do(lambda: self._run(kernel, grid, values))

    def _run(self, kernel: str, grid, values: list) -> None:
        self.launched.append(kernel)
        assert kernel == "sample_rows", f"the stand-in runtime runs sample_rows only, not {kernel}"
        logits, n, fparams, iparams, adjust_ids, adjust, cap, masks, stride, out = values
        rows = grid[0]
        mask_words = host_view(masks, rows * stride, np.int32).reshape(rows, stride) if masks else None
        host_view(out, rows, np.int32)[:] = sample_rows(
            host_view(logits, rows * n, np.float32).reshape(rows, n),
            host_view(fparams, rows * 8, np.float32).reshape(rows, 8),
            host_view(iparams, rows * 2, np.int32).reshape(rows, 2),
            host_view(adjust_ids, rows * cap, np.int32).reshape(rows, cap),
            host_view(adjust, rows * cap * 2, np.float32).reshape(rows, cap, 2), mask_words)

    def _do(self, work) -> None:
        if self._capture is not None:
            self._capture.append(work)
        else:
            work()

    def begin_capture(self) -> None:
        self._capture = []

    def end_capture(self) -> list:
        graph, self._capture = self._capture, None
        return graph

    def replay(self, graph: list) -> None:
        for work in graph:
            work()


class TableArch:
    """A model whose logits are whatever the test wrote into ``logits`` (rows in batch order)."""

    def __init__(self, ops: GpuBackend, vocab: int):
        self.logits = ops._empty((8, vocab))
        self.host = host_view(self.logits.address, 8 * vocab, np.float32).reshape(8, vocab)

    def forward(self, ctx, batch, rows) -> object:
        return self.logits.rows(0, len(rows))


def stand_in_model(vocab: int = 300):
    ops = GpuBackend(HostRuntime())
    arch = TableArch(ops, vocab)
    kv = KVCache(1, 1, 4, 4, 64, n_blocks=16, block_size=16, ops=ops)
    ctx = SimpleNamespace(hooks=Hooks(ops))
    model = SimpleNamespace(ops=ops, ctx=ctx, kv=kv, arch=arch, cfg=SimpleNamespace(vocab_size=vocab), n_ctx=64,
                            tokenizer=SimpleNamespace(eot_ids=set(), incremental_decoder=lambda: None))
    return model, ops, arch, kv


def test_graph_step_batch_bans_what_each_rows_mask_does_not_allow_then_clears_the_flags():
    """Three rows (padded to four): a greedy row under a mask, a greedy row without one, a sampled row under a
    one-token mask; then a step without masks samples unmasked again."""
    vocab = 300
    model, ops, arch, kv = stand_in_model(vocab)
    seqs = [kv.new_sequence() for _ in range(3)]
    for s in seqs:
        kv.prepare([(s, [1, 2, 3])])
    rng = np.random.default_rng(0)
    arch.host[:] = rng.standard_normal((8, vocab)).astype(np.float32)
    best = arch.host[:3].argmax(axis=1)
    allowed = np.ones(vocab, bool)
    allowed[best[0]] = False
    only = np.arange(vocab) == 17
    greedy, sampled = Sampler(SamplingParams(temperature=0)), Sampler(SamplingParams(temperature=0.8, seed=3))
    rows = [greedy.device_row([], vocab, 128), greedy.device_row([], vocab, 128),
            sampled.draw(sampled.device_row([], vocab, 128))]
    calls = []

    def masks():
        calls.append(ops.rt.launched.count("sample_rows"))
        return [pack(allowed), None, pack(only)]

    forward = lambda b: arch.forward(None, b, b.last_rows)  # noqa: E731
    tokens = ops.graph_step_batch(kv.prepare([(s, [4]) for s in seqs]), forward, kv, rows, masks)
    masked_best = int(np.flatnonzero(allowed)[arch.host[0, allowed].argmax()])
    assert tokens.tolist() == [masked_best, best[1], 17]
    assert calls == [1]  # after the capture's warm-up sample, before the replayed one
    for s in seqs:
        kv.truncate(s, kv.length(s) - 1)
    tokens = ops.graph_step_batch(kv.prepare([(s, [4]) for s in seqs]), forward, kv, rows[:2] + rows[:1])
    assert tokens.tolist() == [best[0], best[1], best[2]]
    assert ops.rt.launched.count("sample_rows") == 3  # warm-up + two replays: no host sampling in between


def test_step_all_keeps_constrained_generations_on_the_device_path():
    """Two constrained generations beside a free one: every decode tick goes through graph_step_batch (only ids
    come back) and each token equals the host sampler's under the same mask and draw."""
    vocab = 300
    model, ops, arch, kv = stand_in_model(vocab)
    rng = np.random.default_rng(1)
    settings = [dict(temperature=0), dict(temperature=0.8, seed=5), dict(temperature=1.0, top_k=0, top_p=0.9, seed=6)]
    constraints = [EveryThirdToken(vocab), EveryThirdToken(vocab), None]
    gens = [Generation(model, [1 + i, 2, 3], SamplingParams(**s), 10, constraint=c)
            for i, (s, c) in enumerate(zip(settings, constraints))]
    arch.host[:] = rng.standard_normal((8, vocab)).astype(np.float32)
    step_all(gens)  # the prompts: eager forward, host sampling
    mirrors = mirror_samplers(gens)
    for _ in range(5):
        arch.host[:] = (rng.standard_normal((8, vocab)) * 3).astype(np.float32)
        masks = [c.mask() if c is not None else None for c in constraints]
        expected = [m.sample(arch.host[i], g.tokens, mask)
                    for i, (m, g, mask) in enumerate(zip(mirrors, gens, masks))]
        assert step_all(gens) == expected
        assert all(g.logits is None for g in gens)
    assert all(len(c.accepted) == 6 for c in constraints[:2])
    assert ops.rt.launched.count("sample_rows") == 6  # the capture's warm-up, then one per tick

