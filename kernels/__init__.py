"""GPU kernel sources: ``prelude.h`` (warp size, shuffles, half types for HIP and CUDA), ``quant.h`` (GGML block
formats) and one ``<op>.hip`` per op, the twin of ``rocmforge/ops/<op>.py``.

Sources are read with importlib.resources so they are found after a plain ``pip install .`` as well.

>>> from kernels import kernel_source
>>> "rms_norm" in kernel_source("rms_norm")
True
"""
from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

_INCLUDE = re.compile(r'^#include "([\w.]+)"$', re.MULTILINE)


def _read(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


def _inline_includes(text: str) -> str:
    # run-time compilers get one self-contained string, so local includes are pasted in
    return _INCLUDE.sub(lambda match: _inline_includes(_read(match[1])), text)


@cache
def kernel_source(op: str) -> str:
    """The full source of ``kernels/<op>.hip``: the prelude, then the op with its includes inlined."""
    return _read("prelude.h") + "\n" + _inline_includes(_read(f"{op}.hip"))
