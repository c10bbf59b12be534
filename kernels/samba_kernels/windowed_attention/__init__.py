"""Causal sliding-window attention: a Triton forward and compiled flex_attention (`kernel.py`), and the PyTorch
reference (`naive.py`)."""

from .kernel import windowed_attention
from .naive import window_mask, windowed_attention_ref

__all__ = ["window_mask", "windowed_attention", "windowed_attention_ref"]
