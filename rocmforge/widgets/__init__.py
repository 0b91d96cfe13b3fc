"""Jupyter widgets for rocmforge: ``GenerationPanel`` (generate, stream, inspect tokens, look inside the model).

>>> import rocmforge
>>> from rocmforge.widgets import GenerationPanel
>>> GenerationPanel(rocmforge.load())  # doctest: +SKIP
GenerationPanel('SmolLM2-135M-Instruct.Q4_1', store=False)
"""
from rocmforge.widgets.panel import GenerationPanel

__all__ = ["GenerationPanel"]
