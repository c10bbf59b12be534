"""A Mamba mixer's token between its in_proj and out_proj, for batch-1 decoding: Triton kernels (`kernel.py`) and
their PyTorch reference (`naive.py`)."""

from .kernel import mamba_decode_step
from .naive import mamba_decode_step_ref

__all__ = ["mamba_decode_step", "mamba_decode_step_ref"]
