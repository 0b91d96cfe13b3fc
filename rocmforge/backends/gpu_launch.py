"""Kernel launches of the GPU backend (``rocmforge.backends.gpu``): one kernel call, the pending fused work
(matmul groups, a norm, a rope) turned into launches, the batched-decode kernels, and per-kernel profiling.

``GpuLaunches`` is a mixin of ``GpuBackend``: it reads the backend's runtime (``self.rt``), pools and pending
work. In a batched decode step (``self._rows`` set, see ``rocmforge.backends.gpu_graphs``) every matmul runs as
``matvec_rows_*`` (each weight value read once for all rows, an RMSNorm in front folded in; a row's result the
same whatever the batch) and
attention as one ``attn_decode_rows_*`` launch over the paged cache of every row.

>>> from rocmforge.backends.gpu_launch import ROWS_STAGE_BYTES
>>> ROWS_STAGE_BYTES
47104
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rocmforge.backends.device_memory import DeviceArray
from rocmforge.backends.gpu_records import (ACT_NONE, MATVEC_WARPS, PendingHeadNorms, PendingMatmuls, PendingNorm,
                                            PendingRope, same_view)
from rocmforge.backends.runtime import f32, i32, i64, ptr

ROWS_STAGE_BYTES = 46 * 1024  # staged token rows per matvec_rows block: under the 48 KB a launch gets without opting in
ROWS_CHUNK = 16               # at most this many rows staged at once (RF_ROWS in kernels/matmul.hip)
SPLIT = 64                    # keys per attention slice in a batched decode step (RF_SPLIT in kernels/attention.hip)


class GpuLaunches:
    """Launching kernels for ``GpuBackend`` (a mixin; see the module docstring)."""

    def _launch(self, op: str, kernel: str, grid: tuple[int, ...], block: int, args: list[Any], shared: int = 0) -> None:
        self._flush()
        self._run(op, kernel, grid, block, args, shared, self.profile_label)

    def _run(self, op: str, kernel: str, grid: tuple[int, ...], block: int, args: list[Any], shared: int,
             label: str) -> None:
        function = self.rt.function(op, kernel)
        if shared > 48 * 1024:
            self.rt.set_max_dynamic_shared(function, shared)
        grid3 = (*grid, 1, 1)[:3]
        if self._profile is None:
            self.rt.launch(function, grid3, (block, 1, 1), args, shared)
            return
        start, end = self.rt.event(), self.rt.event()
        self.rt.record(start)
        self.rt.launch(function, grid3, (block, 1, 1), args, shared)
        self.rt.record(end)
        self._profile.append((label, kernel, start, end))

    def _elementwise_grid(self, n: int) -> tuple[int]:
        return (max(1, min(-(-n // 256), 4096)),)

    def _flush(self) -> None:
        """Launch the pending work (see the module docstring)."""
        pending, self._pending = self._pending, None
        if isinstance(pending, PendingNorm):
            self._run_rms_norm(pending)
        elif isinstance(pending, PendingHeadNorms):
            for norm in pending.norms:
                self._run_rms_norm(norm)
        elif isinstance(pending, PendingMatmuls):
            self._run_matmuls(pending)
        elif isinstance(pending, PendingRope):
            for norm in pending.spare_norms:
                self._run_rms_norm(norm)
            self._run_rope(pending)

    def _run_matmuls(self, g: PendingMatmuls) -> None:
        weight, y = g.items[0]
        n_out, k = weight.shape
        suffix, add, total = weight.kernel_suffix, ptr(g.add.address if g.add else 0), ptr(g.sum.address if g.sum else 0)
        if self._rows is not None:  # a batched decode step: one kernel for any number of rows (batch invariance)
            self._run_rows_matmuls(g)
            return
        if self._on_matrix_units(weight, g.m):
            self._run_mma(g)
            return
        if g.m > 1 and k % 32 == 0:
            x = g.x
            if weight.act != ACT_NONE:  # llama.cpp's rounding of the activations, once for the group
                x = self._empty(g.x.shape)
                self._run("matmul", "round_activations", self._elementwise_grid(g.x.size // 8), 256,
                          [ptr(g.x.address), ptr(x.address), i64(g.x.size), i32(weight.act)], 0, g.label)
            for w, out in g.items:
                n_out = w.shape[0]
                # 32-token tiles when 64-token ones would leave multiprocessors idle
                tile = 32 if -(-n_out // 64) * -(-g.m // 64) < 2 * getattr(self.rt, "multiprocessors", 64) else 64
                self._run("matmul", f"matmul_m32_{suffix}" if tile == 32 else f"matmul_{suffix}",
                          (-(-n_out // 64), -(-g.m // tile)), 256,
                          [ptr(w.address), i64(w.row_bytes), ptr(x.address), ptr(out.address), i32(g.m), i32(n_out),
                           i32(k), add, total], 0, g.label)
            return
        # with a norm folded in, the kernel reads the norm's input and writes the norm's output itself
        x = g.norm.x if g.norm else g.x
        norm = [ptr(g.norm.weight.address), f32(g.norm.eps), ptr(g.norm.out.address)] if g.norm else [ptr(0), f32(0.0), ptr(0)]
        block, shared = MATVEC_WARPS * self.rt.warp_size, k * 4  # the staged input row
        if g.glu is not None:
            (w_gate, gate), (w_up, up) = g.items
            act, out = g.glu
            per_warp = self._rows_per_warp(n_out)
            self._run("matmul", f"matvec_glu_{suffix}", (-(-n_out // (MATVEC_WARPS * per_warp)),), block,
                      [ptr(x.address), i32(k), i32(weight.act), *norm, ptr(w_gate.address), ptr(w_up.address),
                       i64(w_gate.row_bytes), ptr(gate.address), ptr(up.address), ptr(out.address), i32(n_out), i32(act),
                       i32(per_warp)], shared, g.label)
            return
        for row in range(g.m):  # g.m > 1 only for rows not a multiple of 32 long (never in the supported models)
            mats = []
            for w, out in g.items:
                mats += [ptr(w.address), i64(w.row_bytes), ptr(out.address + row * w.shape[0] * 4), i32(w.shape[0])]
            mats += [ptr(0), i64(0), ptr(0), i32(0)] * (3 - len(g.items))  # unused matrix slots: no rows
            rows = sum(w.shape[0] for w, _ in g.items)
            offset = row * n_out * 4
            rope = [ptr(0), ptr(0), i32(0), ptr(0), ptr(0), ptr(0), ptr(0), ptr(0)]
            if g.rope_key is not None:
                (pos, inv_freq), (q_rot, k_rot) = g.rope_tables, g.rope_outs
                k_pool, v_pool, slots = g.store or (None, None, None)
                rope = [ptr(pos.address), ptr(inv_freq.address), i32(g.rope_key[2])] + [
                    ptr(a.address if a is not None else 0) for a in (q_rot, k_rot, k_pool, v_pool, slots)]
            per_warp = self._rows_per_warp(rows)
            self._run("matmul", f"matvec_{suffix}", (-(-rows // (MATVEC_WARPS * per_warp)),), block,
                      [ptr(x.address + row * k * 4), i32(k), i32(weight.act), *norm, *mats,
                       ptr(g.add.address + offset if g.add else 0), ptr(g.sum.address + offset if g.sum else 0),
                       i32(per_warp), *rope], shared, g.label)

    def _rows_per_warp(self, rows: int) -> int:
        """Output rows per warp: one until there would be more than 16 blocks per multiprocessor, more for tall
        matrices (the unembedding), whose blocks would otherwise each stage the input for just four rows."""
        sms = getattr(self.rt, "multiprocessors", 64)
        return max(1, min(16, rows // (MATVEC_WARPS * 16 * sms)))

    def _run_rms_norm(self, norm: PendingNorm) -> None:
        x, d = norm.x, norm.x.shape[-1]
        block = min(256, -(-d // self.rt.warp_size) * self.rt.warp_size)
        self._run("rms_norm", "rms_norm", (x.size // d,), block,
                  [ptr(x.address), ptr(norm.weight.address), ptr(norm.out.address), i32(d), f32(norm.eps),
                   ptr(norm.add.address if norm.add else 0), ptr(norm.sum.address if norm.sum else 0)], 0, norm.label)

    def _run_rope(self, r: PendingRope) -> None:
        n, head_dim, n_rot, neox = r.key[1], r.key[2], r.key[3], r.key[4]
        parts = [(x, y, norm) for (x, y), norm in zip(r.parts, r.norms)]
        store = [ptr(0), ptr(0), ptr(0), ptr(0), i32(0)]
        if r.store is not None:  # the keys go second: the kernel stores tensor b into the cache
            k_pool, v_pool, slots, v = r.store
            keys = next(p for p in parts if same_view(p[1], r.store_keys))
            parts = [p for p in parts if p is not keys] + [keys]
            store = [ptr(k_pool.address), ptr(v_pool.address), ptr(slots.address), ptr(v.address), i32(v.shape[-1])]
        (xa, ya, norm_a), (xb, yb, norm_b) = (parts[0] if len(parts) == 2 else (None, None, None)), parts[-1]
        heads_a = xa.shape[1] if xa is not None else 0
        norms = [ptr(a.address) if a is not None else ptr(0) for nm in (norm_a, norm_b)
                 for a in ((nm.weight, nm.out) if nm is not None else (None, None))]
        eps = next((nm.eps for nm in (norm_a, norm_b) if nm is not None), 0.0)
        self._run("rope", "rope", (n, heads_a + xb.shape[1]), max(self.rt.warp_size, min(256, n_rot // 2)),
                  [ptr(xa.address if xa is not None else 0), ptr(ya.address if ya is not None else 0), i32(heads_a),
                   ptr(xb.address), ptr(yb.address), i32(xb.shape[1]), ptr(r.positions.address), i32(head_dim),
                   i32(n_rot), i32(int(neox)), ptr(r.inv_freq.address), *store, *norms, f32(eps)], 0, r.label)

    def profile(self, run: Callable[[], Any]) -> tuple[Any, list[tuple[str, str, float]]]:
        """Run ``run()`` eagerly with an event pair around every kernel -> ``(its result, [(label, kernel, ms)])``.

        ``label`` is ``self.profile_label`` when the op was called (a caller sets it per layer). A spin kernel
        runs first so the launches queue up behind it and each event pair brackets device time only.
        """
        self._flush()
        self.rt.synchronize()
        self._run("spin", "spin", (1,), self.rt.warp_size, [i64(100_000_000)], 0, "")  # ~50-70 ms at 1.4-2 GHz
        self._profile = []
        try:
            result = run()
            self._flush()
            self.rt.synchronize()
            return result, [(label, kernel, self.rt.elapsed_ms(s, e)) for label, kernel, s, e in self._profile]
        finally:
            self._profile = None

    # --- batched decode --------------------------------------------------------------------------------------
    def _run_rows_matmuls(self, g: PendingMatmuls) -> None:
        """A matmul group of a batched decode step as one ``matvec_rows`` launch (with the RMSNorm in front folded in)."""
        weight = g.items[0][0]
        k, m = weight.shape[1], g.m
        chunk = max(1, min(ROWS_CHUNK, ROWS_STAGE_BYTES // (k * 4)))
        chunks = -(-m // chunk)  # side by side on grid.y: every block stages one chunk
        rows = sum(w.shape[0] for w, _ in g.items) if g.glu is None else weight.shape[0]
        # about 16 blocks per multiprocessor over the whole grid, at most 16 output rows per warp
        sms = getattr(self.rt, "multiprocessors", 64)
        per_warp = max(1, min(16, -(-rows // (MATVEC_WARPS * max(1, 16 * sms // chunks)))))
        grid = (-(-rows // (MATVEC_WARPS * per_warp)), chunks)
        block, shared = MATVEC_WARPS * self.rt.warp_size, chunk * k * 4
        norm = [ptr(g.norm.weight.address), f32(g.norm.eps), ptr(g.norm.out.address)] if g.norm else [ptr(0), f32(0.0), ptr(0)]
        common = [ptr((g.norm.x if g.norm else g.x).address), i32(m), i32(k), i32(weight.act), *norm]
        if g.glu is not None:
            (w_gate, gate), (w_up, up) = g.items
            act, out = g.glu
            self._run("matmul", f"matvec_rows_glu_{weight.kernel_suffix}", grid, block,
                      [*common, ptr(w_gate.address), ptr(w_up.address), i64(w_gate.row_bytes), ptr(gate.address),
                       ptr(up.address), ptr(out.address), i32(weight.shape[0]), i32(act), i32(per_warp), i32(chunk)],
                      shared, g.label)
            return
        mats = []
        for w, out in g.items:
            mats += [ptr(w.address), i64(w.row_bytes), ptr(out.address), i32(w.shape[0])]
        mats += [ptr(0), i64(0), ptr(0), i32(0)] * (3 - len(g.items))
        self._run("matmul", f"matvec_rows_{weight.kernel_suffix}", grid, block,
                  [*common, *mats, ptr(g.add.address if g.add else 0), ptr(g.sum.address if g.sum else 0),
                   i32(per_warp), i32(chunk)], shared, g.label)

    def _attention_rows(self, q: DeviceArray, k_pool: DeviceArray, v_pool: DeviceArray, scale: float,
                        window: int | None, softcap: float | None) -> DeviceArray:
        """Attention of every row of a batched decode step (one query each) over its own paged cache, one launch."""
        rows = self._rows
        n, heads, d = q.shape
        out = self._empty((n, heads, d))
        splits = -(-rows.n_ctx // SPLIT)
        part_o, part_ml = self._empty((n, heads, splits, d)), self._empty((n, heads, splits, 2))
        kind = f"d{d}" if d in (64, 128, 256) else "any"
        # about 16 blocks per multiprocessor; each block walks its row's slices blockIdx.x, + gridDim.x, ...
        blocks = max(1, min(splits, -(-16 * getattr(self.rt, "multiprocessors", 64) // (n * heads))))
        self._launch("attention", f"attn_decode_rows_{kind}", (blocks, heads, n), 64,
                     [ptr(q.address), ptr(k_pool.address), ptr(v_pool.address), ptr(rows.positions.address),
                      ptr(rows.tables.address), i32(rows.tables.shape[1]), i32(rows.block_size), i32(heads),
                      i32(k_pool.shape[1]), i32(d), f32(scale), f32(softcap or 0.0), i32(window or 0), i32(splits),
                      ptr(part_o.address), ptr(part_ml.address), ptr(rows.tickets.address), ptr(out.address)])
        return out

    def _sample_rows(self, logits: DeviceArray, rows: Any) -> DeviceArray:
        """The next token of every row, sampled on the device (``kernels/sample_rows.hip``); ``rows.masks``
        (``[rows, 1 + vocab / 32]``: a flag, then the grammar's packed bitmask) may be None: no grammar."""
        n, vocab = logits.shape
        out = self._empty((n,), np.int32)
        masks = rows.masks
        self._launch("sample_rows", "sample_rows", (n,), 1024,
                     [ptr(logits.address), i32(vocab), ptr(rows.fparams.address), ptr(rows.iparams.address),
                      ptr(rows.adjust_ids.address), ptr(rows.adjust.address), i32(rows.adjust_ids.shape[1]),
                      ptr(masks.address if masks is not None else 0), i32(masks.shape[1] if masks is not None else 0),
                      ptr(out.address)])
        return out
