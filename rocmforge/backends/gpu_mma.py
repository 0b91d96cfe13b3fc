"""Many-row matmuls on the matrix units, mixed into ``GpuBackend``: prefill (and any large batch) of the integer
GGML formats as int8 tile products (``kernels/matmul_mma.hip``), with llama.cpp's arithmetic: the activations
rounded to 8-bit blocks exactly as ``rocmforge.ops.matmul.round_activations`` does, integer dot products per
block, scales applied after. The float32 tiles of ``kernels/matmul.hip`` remain for float weights and for
unrounded activations (``round_activations=False``).

>>> from gguf import GGMLQuantizationType as T
>>> T.Q4_K in MMA_TYPES, T.F16 in MMA_TYPES
(True, False)
"""
from __future__ import annotations

import numpy as np

from rocmforge.backends.gpu_records import ACT_Q8_32, ACT_Q8_256, MMA_TYPES, GpuWeight, PendingMatmuls
from rocmforge.backends.runtime import f32, i32, i64, ptr


class GpuMatrixUnits:
    """Mixin of ``GpuBackend`` (uses its ``rt``, ``_empty``, ``_run`` and ``_elementwise_grid``)."""

    @staticmethod
    def _on_matrix_units(weight: GpuWeight, m: int) -> bool:
        """Whether ``m`` rows times ``weight`` run as int8 tile products (llama.cpp's 8-bit activations)."""
        return (m > 1 and weight.shape[1] % 32 == 0 and weight.ggml_type in MMA_TYPES
                and weight.act in (ACT_Q8_32, ACT_Q8_256))

    def _run_mma(self, g: PendingMatmuls) -> None:
        """Many rows on the matrix units (kernels/matmul_mma.hip): the input rounded to int8 blocks once for the
        group (an RMSNorm in front folded in), then one launch of int8 tile products for its matrices, the residual
        add fused as in the float tiles."""
        weight = g.items[0][0]
        k = weight.shape[1]
        xq, xd, xs = self._empty((g.m, k), np.int8), self._empty((g.m, k // 32)), self._empty((g.m, k // 32))
        quantized = [ptr(xq.address), ptr(xd.address), ptr(xs.address)]
        if g.norm is not None:  # the norm's block size, so its sums are the same
            block = min(256, -(-k // self.rt.warp_size) * self.rt.warp_size)
            self._run("matmul_mma", "quantize_q8_norm", (g.m,), block,
                      [ptr(g.norm.x.address), ptr(g.norm.weight.address), f32(g.norm.eps), ptr(g.norm.out.address),
                       *quantized, i32(k), i32(weight.act)], 0, g.label)
        else:
            self._run("matmul_mma", "quantize_q8", self._elementwise_grid(g.x.size // 8), 256,
                      [ptr(g.x.address), *quantized, i64(g.x.size), i32(weight.act)], 0, g.label)
        mats = []
        for w, out in g.items:
            mats += [ptr(w.address), i64(w.row_bytes), ptr(out.address), i32(w.shape[0])]
        mats += [ptr(0), i64(0), ptr(0), i32(0)] * (3 - len(g.items))  # unused matrix slots: no rows
        tiles = sum(-(-w.shape[0] // 64) for w, _ in g.items)
        # 32-token tiles when 64-token ones would leave multiprocessors idle
        rows = 32 if tiles * -(-g.m // 64) < 2 * getattr(self.rt, "multiprocessors", 64) else 64
        self._run("matmul_mma", f"mma_m32_{weight.kernel_suffix}" if rows == 32 else f"mma_{weight.kernel_suffix}",
                  (tiles, -(-g.m // rows)), 128,
                  [ptr(xq.address), ptr(xd.address), ptr(xs.address), i32(g.m), i32(k), *mats,
                   ptr(g.add.address if g.add else 0), ptr(g.sum.address if g.sum else 0)], 0, g.label)
