"""The PyTorch references of the four Mamba ops, for kernel_dispatch.py and the model's remote code.

The references live beside their kernels in samba_kernels (`selective_scan/naive.py`, `causal_conv1d/naive.py`);
the two modules imported here are links to those files, so that a saved model's folder, which is flat, carries
them (transformers copies a modeling file's relative imports) and runs where samba-hf is not installed.
"""

from .causal_conv1d_naive import causal_conv1d_ref, causal_conv1d_update_ref
from .selective_scan_naive import selective_scan_ref, selective_state_update_ref

__all__ = ["causal_conv1d_ref", "causal_conv1d_update_ref", "selective_scan_ref", "selective_state_update_ref"]
