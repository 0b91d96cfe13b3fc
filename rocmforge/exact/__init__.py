"""llama.cpp-exact CPU arithmetic: numba kernels that reproduce, bit for bit, what ggml's x86 CPU backend computes
(AVX2 + FMA + F16C build, LLAMAFILE tinyBLAS on, 2 threads, F32 KV cache, flash attention off).

Why: 8-bit activation rounding turns any ulp of difference into a whole quantization step, so a numpy forward
that is "as accurate" as llama.cpp still picks a different token on near-ties. Every kernel here follows ggml's
operation order: which values are rounded to float32, which are fused multiply-adds, how 8-lane SIMD
accumulators are laid out and in which order they are reduced.

One op per module: ``simd`` (fma, bit casts, ggml's horizontal sums and ``ggml_v_expf``), ``q8_activations``,
``dot_q4_1``, ``dot_q8_0``, ``dot_f32``, ``rms_norm``, ``rope``, ``soft_max``, ``swiglu``; ``dot.MATMULS`` maps a
GGUF weight type to its exact matmul. ``rocmforge.backends.exact.ExactCpuBackend`` runs a model with them:
``rocmforge.load(name, device="cpu-exact")``.
"""
