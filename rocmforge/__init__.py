"""rocmforge: step-by-step GGUF LLM inference with a numpy path, GPU backends and research hooks.

The public API is ``load`` and ``Model`` (imported on first use, so ``import rocmforge.registry`` and the CLI's
light commands stay fast):

>>> import rocmforge
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=2, temperature=0)  # doctest: +SKIP
' Paris.'
"""
from __future__ import annotations

from typing import Any

__all__ = ["load", "Model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rocmforge import model

        return getattr(model, name)
    raise AttributeError(f"module 'rocmforge' has no attribute {name!r}")
