"""rocmforge: step-by-step GGUF LLM inference with a numpy path, GPU backends and research hooks.

The public API is ``load`` and ``Model`` (imported on first use, so ``import rocmforge.registry`` and the CLI's
light commands stay fast):

>>> import rocmforge
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=2, temperature=0)  # doctest: +SKIP
' Paris.'
"""
from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["load", "Model"]

# numba's thread pool for every CPU kernel (cpu-exact, the CPU encoder): OpenMP before TBB. A decode step hands
# ~100 calls to the pool; measured on a 2-core Xeon, an OpenMP hand-off costs ~4 us, TBB's 0.5-4 ms (numba's
# default order), so with TBB installed two threads decoded SmolLM2 only 6% faster than one, with OpenMP 36%.
# A user's NUMBA_THREADING_LAYER(_PRIORITY) wins; without libgomp numba goes on down the list.
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")
if "numba" in sys.modules:  # imported before us: its config read the environment already
    sys.modules["numba"].config.THREADING_LAYER_PRIORITY = os.environ["NUMBA_THREADING_LAYER_PRIORITY"].split()


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rocmforge import model

        return getattr(model, name)
    raise AttributeError(f"module 'rocmforge' has no attribute {name!r}")
