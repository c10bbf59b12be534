"""Rotate-half rotary position embeddings on queries and keys: the Triton kernel (`kernel.py`) and its PyTorch
reference (`naive.py`)."""

from .kernel import rotary_embedding
from .naive import rotary_embedding_ref

__all__ = ["rotary_embedding", "rotary_embedding_ref"]
