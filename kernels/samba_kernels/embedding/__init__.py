"""A decode step's embedding lookup as one Triton kernel (`kernel.py`), and its PyTorch reference (`naive.py`)."""

from .kernel import embedding_rows_
from .naive import embedding_rows_ref

__all__ = ["embedding_rows_", "embedding_rows_ref"]
