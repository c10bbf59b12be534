"""One token's sliding-window attention over a ring buffer, for batch-1 decoding: Triton kernels (`kernel.py`) and
their PyTorch reference (`naive.py`)."""

from .kernel import ring_decode_attention
from .naive import ring_decode_attention_ref

__all__ = ["ring_decode_attention", "ring_decode_attention_ref"]
