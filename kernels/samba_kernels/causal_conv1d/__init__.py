"""Depthwise causal conv1d: Triton kernels (`kernel.py`) and their PyTorch references (`naive.py`)."""

from .kernel import causal_conv1d_fn, causal_conv1d_update
from .naive import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref"]
