"""The decoder layer's elementwise ops on the residual stream's side, each one Triton kernel for inference: RMSNorm
with its cast to the layers' dtype, and SwiGLU's silu(gate) * up (`kernel.py`), with their PyTorch references
(`naive.py`)."""

from .kernel import rms_norm, swiglu
from .naive import rms_norm_ref, swiglu_ref

__all__ = ["rms_norm", "rms_norm_ref", "swiglu", "swiglu_ref"]
