"""One-row matrix products of batch-1 decoding: Triton kernels (`kernel.py`) and their PyTorch references
(`naive.py`)."""

from .kernel import gated_matvec, matvec, matvec_add_, stacked_matvec
from .naive import gated_matvec_ref, matvec_add_ref, matvec_ref, stacked_matvec_ref

__all__ = [
    "gated_matvec",
    "gated_matvec_ref",
    "matvec",
    "matvec_add_",
    "matvec_add_ref",
    "matvec_ref",
    "stacked_matvec",
    "stacked_matvec_ref",
]
