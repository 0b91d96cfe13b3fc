"""GGUF weight type -> its llama.cpp-exact matmul: how raw blocks are prepared once at load, how the float32
activations are rounded (once per activation, shared by every weight that reads it with the same format), and
the kernel that multiplies the two. A type missing here has no exact kernel: ``ExactCpuBackend`` refuses it.

To add a type, write its kernel module beside ``dot_q4_1.py`` and add one line. Q8_0, Q5_0 and Q4_1 read the raw
blocks in place from the memory-mapped file (``in_place``: no copy; ``lanes.BlockLayout``); Q2_K, Q3_K and Q5_K share
``k_quant_lanes`` (their ``dot_q*_k`` modules unpack the blocks); F32, F16 and BF16 share ``dot_float``.

``unsupported_types(gguf)`` says which matrices of a file have no exact kernel (what ``device="auto"`` asks
before it picks cpu-exact).

>>> from gguf import GGMLQuantizationType as T
>>> sorted(t.name for t in MATMULS)
['BF16', 'F16', 'F32', 'IQ4_NL', 'Q2_K', 'Q3_K', 'Q4_0', 'Q4_1', 'Q4_K', 'Q5_0', 'Q5_1', 'Q5_K', 'Q6_K', 'Q8_0']
>>> supports(T.Q8_0), supports(T.IQ2_XXS)
(True, False)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from rocmforge.exact.dot_float import matmul_float, prepare_float, round_bf16, round_f16
from rocmforge.exact.dot_iq4_nl import matmul_iq4_nl, split_iq4_nl
from rocmforge.exact.dot_q2_k import split_q2_k
from rocmforge.exact.dot_q3_k import split_q3_k
from rocmforge.exact.dot_q4_0 import matmul_q4_0, split_q4_0
from rocmforge.exact.dot_q4_1 import matmul_q4_1, split_q4_1
from rocmforge.exact.dot_q4_k import matmul_q4_k, split_q4_k
from rocmforge.exact.dot_q5_0 import matmul_q5_0, split_q5_0
from rocmforge.exact.dot_q5_1 import matmul_q5_1, split_q5_1
from rocmforge.exact.dot_q5_k import split_q5_k
from rocmforge.exact.dot_q6_k import matmul_q6_k, split_q6_k
from rocmforge.exact.dot_q8_0 import matmul_q8_0, split_q8_0
from rocmforge.exact.k_quant_lanes import matmul_k_quant
from rocmforge.exact.q8_activations import quantize_q8
from rocmforge.exact.q8_k_activations import quantize_q8_k


@dataclass(frozen=True)
class ExactMatmul:
    prepare: Callable[[np.ndarray], Any]        # raw GGUF rows [out, bytes] -> what ``multiply`` reads
    quantize: Callable[[np.ndarray], Any]       # float32 activations [n, in] -> what ``multiply`` reads
    multiply: Callable[[Any, Any], np.ndarray]  # (quantized activations, prepared weight) -> float32 [n, out]
    in_place: bool = False  # ``prepare`` keeps the raw rows (memory-mapped file pages): they must stay mapped


def _as_is(x: np.ndarray) -> np.ndarray:
    return x


_Q8_0 = partial(quantize_q8, with_sum=False)
_Q8_1 = partial(quantize_q8, with_sum=True)

MATMULS: dict[T, ExactMatmul] = {
    T.Q4_0: ExactMatmul(split_q4_0, _Q8_0, matmul_q4_0),
    T.Q4_1: ExactMatmul(split_q4_1, _Q8_1, matmul_q4_1, in_place=True),
    T.IQ4_NL: ExactMatmul(split_iq4_nl, _Q8_0, matmul_iq4_nl),
    T.Q8_0: ExactMatmul(split_q8_0, _Q8_0, matmul_q8_0, in_place=True),
    T.Q5_0: ExactMatmul(split_q5_0, _Q8_0, matmul_q5_0, in_place=True),
    T.Q4_K: ExactMatmul(split_q4_k, quantize_q8_k, matmul_q4_k),
    T.Q6_K: ExactMatmul(split_q6_k, quantize_q8_k, matmul_q6_k),
    T.Q5_1: ExactMatmul(split_q5_1, _Q8_1, matmul_q5_1),
    T.Q5_K: ExactMatmul(split_q5_k, quantize_q8_k, matmul_k_quant),
    T.Q3_K: ExactMatmul(split_q3_k, quantize_q8_k, matmul_k_quant),
    T.Q2_K: ExactMatmul(split_q2_k, quantize_q8_k, matmul_k_quant),
    T.F32: ExactMatmul(prepare_float(T.F32), _as_is, matmul_float),
    T.F16: ExactMatmul(prepare_float(T.F16), round_f16, matmul_float),
    T.BF16: ExactMatmul(prepare_float(T.BF16), round_bf16, matmul_float),
}


def supports(ggml_type: T) -> bool:
    """Whether weights of ``ggml_type`` have a llama.cpp-exact matmul."""
    return ggml_type in MATMULS


def unsupported_types(gguf: Any) -> list[str]:
    """The type names (sorted) of the matrices in ``gguf`` (a ``GGUFFile``) that ``device="cpu-exact"`` cannot
    multiply; empty when it runs the whole file. A separate ``token_embd`` is only looked up (any type gguf can
    dequantize); a tied one is also the output matrix, so its type counts."""
    tied = "output.weight" not in gguf.tensors
    return sorted({ref.ggml_type.name for name, ref in gguf.tensors.items()
                   if len(ref.shape) > 1 and (tied or name != "token_embd.weight") and not supports(ref.ggml_type)})
