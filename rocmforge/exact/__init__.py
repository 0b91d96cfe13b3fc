"""llama.cpp-exact CPU arithmetic: numba kernels that reproduce, bit for bit, what ggml's x86 CPU backend computes
(AVX2 + FMA + F16C build, LLAMAFILE tinyBLAS on, 2 threads, F32 KV cache, flash attention off).

Why: 8-bit activation rounding turns any ulp of difference into a whole quantization step, so a numpy forward
that is "as accurate" as llama.cpp still picks a different token on near-ties. Every kernel here follows ggml's
operation order: which values are rounded to float32, which are fused multiply-adds, how 8-lane SIMD
accumulators are laid out and in which order they are reduced.

One op per module: ``simd`` (fma, bit casts, ggml's horizontal sums and ``ggml_v_expf``), ``lanes`` (ggml's
8-lane integer block sums as LLVM vector code: ``vpdpbusd``), ``expf_lanes`` (``ggml_v_expf`` on 8 lanes),
``threads`` (large matmuls split over the cores), the activation roundings (``q8_activations``,
``q8_k_activations``), one ``dot_<type>`` per weight type (``dot.MATMULS`` maps a GGUF type to its exact matmul),
``dot_f32``, ``attention`` (its prefill inner loops in ``attention_lanes``), and the elementwise ops by name.
``rocmforge.backends.exact.ExactCpuBackend`` runs a model with them:
``rocmforge.load(name, device="cpu-exact")``.

The kernels are cached by numba (``cache=True``; ``compile_cache``: beside the sources, or under
``$ROCMFORGE_HOME/numba`` when the package directory is read-only), which re-checks only the file of the cached
function: after editing ``simd``, ``lanes``, ``expf_lanes``, ``attention_lanes`` or ``dot_f32`` (inlined into the
others), delete ``rocmforge/exact/__pycache__/*.nb[ic]``.
"""
from rocmforge.exact.compile_cache import configure

configure()  # before any kernel module defines a cached kernel
