"""Plain records of the GPU backend (``rocmforge.backends.gpu``): the GGML formats that have kernels, how
activations are rounded next to each, weights as they sit on the device, a captured decode graph, and the work
held back for fusion (an RMSNorm, a group of matmuls, a rope) that the next ops may fold into one launch.

>>> from gguf import GGMLQuantizationType
>>> from rocmforge.backends.gpu_records import activation_rounding, ACT_Q8_32
>>> activation_rounding(GGMLQuantizationType.Q4_1) == ACT_Q8_32
True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from rocmforge.backends.device_memory import Block, DeviceArray, Pool, align
from rocmforge.ops.matmul import ACTIVATION_FORMAT

# GGML types with a fused dequantize-and-multiply kernel; others are widened to float32 at load time
KERNEL_TYPES = {
    GGMLQuantizationType.F32: "f32", GGMLQuantizationType.F16: "f16", GGMLQuantizationType.BF16: "bf16",
    GGMLQuantizationType.Q4_0: "q4_0", GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q5_0: "q5_0",
    GGMLQuantizationType.Q5_1: "q5_1", GGMLQuantizationType.Q8_0: "q8_0", GGMLQuantizationType.Q4_K: "q4_k",
    GGMLQuantizationType.Q5_K: "q5_k", GGMLQuantizationType.Q6_K: "q6_k",
}
# types whose many-row matmuls run as int8 tile products (kernels/matmul_mma.hip): w = d * q + m with small q
MMA_TYPES = frozenset({
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
})
MATVEC_WARPS = 4  # warps per matvec block; each warp reduces rows_per_warp output rows
# how the kernels round activations next to each weight type, as llama.cpp and the numpy twin do
# (rocmforge.ops.matmul.round_activations); the codes are ACT_* in kernels/quant.h
ACT_NONE, ACT_Q8_32, ACT_Q8_256, ACT_F16, ACT_BF16 = range(5)


def activation_rounding(ggml_type: GGMLQuantizationType) -> int:
    if ggml_type == GGMLQuantizationType.F16:
        return ACT_F16
    if ggml_type == GGMLQuantizationType.BF16:
        return ACT_BF16
    if ggml_type in ACTIVATION_FORMAT:
        return ACT_Q8_32 if ACTIVATION_FORMAT[ggml_type][0] == 32 else ACT_Q8_256
    return ACT_NONE


def memory_needed(gguf: Any, n_slots: int) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) a model needs on the device with ``n_slots`` cache positions."""
    cfg = gguf.config
    weights = 0
    for ref in gguf.tensors.values():
        widened = len(ref.shape) == 1 or ref.ggml_type not in KERNEL_TYPES  # stored as float32
        weights += align(ref.n_elements * 4 if widened else ref.n_bytes)
    kv = cfg.n_layers * (align(n_slots * cfg.n_kv_heads * cfg.head_dim * 4) + align(n_slots * cfg.n_kv_heads * cfg.head_dim_v * 4))
    return weights, kv


def same_view(a: DeviceArray, b: DeviceArray) -> bool:
    return a.address == b.address and a.size == b.size


@dataclass
class GpuWeight:
    """A weight matrix ``[rows, cols]`` kept in its GGML block format inside the weight arena."""

    address: int
    ggml_type: GGMLQuantizationType  # the stored format (float32 when widened at load)
    shape: tuple[int, int]
    row_bytes: int
    act: int                         # activation rounding of the file's type (ACT_*)
    memory: Block                    # what holds it: the arena, or (no arena) a pool block freed with the weight

    @property
    def kernel_suffix(self) -> str:
        return KERNEL_TYPES[self.ggml_type]


@dataclass
class DecodeGraph:
    """A captured decode step: its executable graph, private memory, output, and input buffer."""

    inputs: DeviceArray            # int32: token, position, slot, segment position, key slots
    pool: Pool
    host: np.ndarray               # the host side of ``inputs``, refilled before each replay
    executable: Any = None
    output: DeviceArray | None = None


@dataclass
class PendingNorm:
    """An RMSNorm of one row waiting to be folded into the matvec that reads it."""

    x: DeviceArray
    weight: DeviceArray
    eps: float
    out: DeviceArray
    label: str
    add: DeviceArray | None = None  # a residual added behind the norm ...
    sum: DeviceArray | None = None  # ... into this (one launch for both)


@dataclass
class PendingMatmuls:
    """Matmuls of one input waiting to launch together, with what the following ops folded into them."""

    x: DeviceArray
    m: int
    norm: PendingNorm | None
    label: str
    items: list[tuple[GpuWeight, DeviceArray]] = field(default_factory=list)
    add: DeviceArray | None = None        # residual added behind the single matmul ...
    sum: DeviceArray | None = None        # ... into this
    glu: tuple[int, DeviceArray] | None = None  # (0 SiLU / 1 GELU, act(gate) * up) of a gate/up pair
    # decode q/k/v: the normal rope of q and k (outputs per item) and the KV-cache store, done by the matvec
    rope_key: tuple | None = None
    rope_tables: tuple[DeviceArray, DeviceArray] | None = None   # positions, inv_freq
    rope_outs: list[DeviceArray | None] = field(default_factory=lambda: [None, None])
    store: tuple[DeviceArray, DeviceArray, DeviceArray] | None = None  # k_pool, v_pool, slots


@dataclass
class PendingHeadNorms:
    """RMSNorms of each head of up to two ``[tokens, heads, head_dim]`` tensors (Gemma's QK-norm) waiting for the
    rope that reads them to do them in its own launch."""

    norms: list[PendingNorm]
    label: str


@dataclass
class PendingRope:
    """Rotations of up to two tensors (queries, keys) with the same positions and frequencies."""

    key: tuple
    positions: DeviceArray
    inv_freq: DeviceArray
    label: str
    parts: list[tuple[DeviceArray, DeviceArray]] = field(default_factory=list)  # (kernel input, rotated output)
    norms: list[PendingNorm | None] = field(default_factory=list)  # per part: a head norm done in front of it
    spare_norms: list[PendingNorm] = field(default_factory=list)   # head norms no part has claimed yet: run first
    store: tuple[DeviceArray, DeviceArray, DeviceArray, DeviceArray] | None = None  # k_pool, v_pool, slots, v
    store_keys: DeviceArray | None = None  # which rotated output is the keys
