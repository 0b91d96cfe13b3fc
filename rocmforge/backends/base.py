"""The Backend protocol: every op an architecture's forward calls, on the backend's own array type.

An architecture module (``rocmforge.arch.llama``, ``rocmforge.arch.gemma3``) calls only these methods, through
``ctx.ops``; the CPU backend implements them with the numpy twins in ``rocmforge.ops``, a GPU backend with the
kernels in ``kernels/``. Tests compare the two op by op.

Conventions
- ``Array`` is the backend's activation type (``np.ndarray`` float32 on CPU, a device array on GPU). It must offer
  ``.shape`` and ``.reshape(...)`` (a view); everything else goes through the methods here.
- Activations are row-major ``[n_tokens, features]``; attention tensors are ``[n_tokens, head, d_head]``.
- ``Weight`` is whatever ``load_weight`` returns (f32 matrix on CPU, quantized blocks on GPU); rows are output
  features, as GGUF stores them, so ``matmul(x, w)`` is ``x @ w.T``.
- Attention reads and writes the paged KV cache (``rocmforge.kv_cache``): ``kv_write`` stores the new keys and
  values at ``batch.slots``; ``attention`` is the fused path used when no hook wants the scores/pattern; the
  explicit path ``attention_scores`` -> ``softmax`` -> ``attention_mix`` runs per sequence (``Segment``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from rocmforge.gguf_file import TensorRef
from rocmforge.kv_cache import Batch, KVCache, Segment

Array = Any
Weight = Any


class Backend(Protocol):
    name: str  # "cpu", "cuda", "hip"

    # --- memory --------------------------------------------------------------------------------------------
    def zeros(self, shape: tuple[int, ...]) -> Array: ...
    def from_host(self, x: np.ndarray) -> Array: ...
    def to_host(self, x: Array) -> np.ndarray: ...

    # --- weights -------------------------------------------------------------------------------------------
    def load_weight(self, tensor: TensorRef) -> Weight:
        """A matrix ``[out, in]`` that ``matmul`` multiplies with."""
    def load_vector(self, tensor: TensorRef) -> Array:
        """A 1-D float32 tensor (norm weights, biases, rope frequency factors)."""
    def load_embedding(self, tensor: TensorRef, tied: bool) -> Weight:
        """The token table; ``tied`` means it is also the output projection (used with ``matmul``)."""

    # --- ops -----------------------------------------------------------------------------------------------
    def embedding(self, table: Weight, tokens: np.ndarray) -> Array: ...
    def matmul(self, x: Array, weight: Weight) -> Array: ...
    def linear(self, x: Array, weight: Weight, bias: Array, gelu: bool = False,
               norm: tuple[Array, Array, Array, float] | None = None) -> Array:
        """``matmul(x, weight)`` plus a bias vector on every row (an encoder's biased projections); ``gelu``: then
        the exact GELU of every value (``gelu`` below); ``norm=(residual, weight, bias, eps)``: then
        ``layer_norm(..., residual=residual)`` (a post-norm encoder's projection back into its residual stream)."""
    def add(self, a: Array, b: Array) -> Array:
        """Elementwise ``a + b``; ``b`` may be a bias vector broadcast over rows."""
    def scale(self, x: Array, factor: float) -> Array: ...
    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """Normalize the last axis (``[n, d]`` or per head ``[n, head, d_head]``)."""
    def rope(self, x: Array, positions: np.ndarray, theta: float, neox: bool, n_rot: int,
             freq_factors: Array | None = None, freq_scale: float = 1.0) -> Array: ...
    def swiglu(self, gate: Array, up: Array) -> Array: ...
    def geglu(self, gate: Array, up: Array) -> Array: ...
    def softcap(self, x: Array, cap: float) -> Array: ...
    def take_rows(self, x: Array, rows: np.ndarray | slice) -> Array: ...
    def layer_norm(self, x: Array, weight: Array, bias: Array, eps: float, residual: Array | None = None) -> Array:
        """Encoders (BERT): zero mean, unit variance over the last axis of ``x`` (of ``x + residual`` if given),
        then ``* weight + bias``."""
    def gelu(self, x: Array) -> Array:
        """The exact (erf) GELU, elementwise."""
    def encoder_attention(self, q: Array, k: Array, v: Array, offsets: np.ndarray, n_heads: int,
                          scale: float) -> Array:
        """Bidirectional attention over packed sequences (``offsets``: where each starts) -> ``[n, heads * d]``."""
    def concat_rows(self, parts: list[Array]) -> Array: ...

    # --- attention over the paged KV cache ------------------------------------------------------------------
    def kv_write(self, cache: KVCache, layer: int, batch: Batch, k: Array, v: Array) -> None: ...
    def attention(self, q: Array, cache: KVCache, layer: int, batch: Batch, scale: float,
                  window: int | None, softcap: float | None) -> Array:
        """Causal attention of every query in ``batch`` over its own sequence's cached keys -> ``[n, head, d_v]``."""
    def attention_scores(self, q: Array, cache: KVCache, layer: int, segment: Segment, scale: float,
                         window: int | None, softcap: float | None) -> Array:
        """Masked scores ``[head, t, L]`` of one sequence's queries ``q`` (``[t, head, d]``)."""
    def softmax(self, x: Array) -> Array: ...
    def attention_mix(self, pattern: Array, cache: KVCache, layer: int, segment: Segment) -> Array:
        """``pattern`` ``[head, t, L]`` times the sequence's cached values -> ``[t, head, d_v]``."""

    # --- running a whole block or step ----------------------------------------------------------------------
    def fused_block(self, family: str, ctx: Any, layer: int, resid: Array, batch: Batch) -> Array | None:
        """Block ``layer`` of a ``rocmforge.arch`` ``family`` ("llama", "gemma3") on ``resid`` in the backend's own
        fused form, the same numbers as the forward's ops; None when it has none for this batch (the forward then
        runs op by op). Called only while no hook is registered."""
    def graph_step(self, batch: Batch, step: Callable[[], Array]) -> Array:
        """``step()`` (one forward over ``batch``), which a backend may capture once and replay for later
        batches of the same shape (the GPU's decode graph); the CPU simply calls it."""
