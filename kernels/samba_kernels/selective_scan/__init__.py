"""Mamba-1 selective scan and its one-step decode form: Triton kernels (`kernel.py`) and their PyTorch references
(`naive.py`)."""

from .kernel import forced_layout, selective_scan_fn, selective_state_update
from .naive import selective_scan_ref, selective_state_update_ref

__all__ = [
    "forced_layout",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
