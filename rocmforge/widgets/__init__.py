"""Jupyter widgets for rocmforge: ``GenerationPanel`` (generate, stream, inspect tokens, look inside the model).

>>> from rocmforge.widgets import GenerationPanel  # doctest: +SKIP
>>> GenerationPanel(rocmforge.load())  # doctest: +SKIP
"""
from rocmforge.widgets.panel import GenerationPanel

__all__ = ["GenerationPanel"]
