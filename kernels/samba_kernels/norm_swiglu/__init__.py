"""The decoder layer's elementwise ops on the residual stream's side, each one Triton kernel for inference: RMSNorm
with its cast to the layers' dtype, SwiGLU's silu(gate) * up and the float32 residual add (`kernel.py`), with their
PyTorch references (`naive.py`)."""

from .kernel import residual_add, rms_norm, swiglu
from .naive import residual_add_ref, rms_norm_ref, swiglu_ref

__all__ = ["residual_add", "residual_add_ref", "rms_norm", "rms_norm_ref", "swiglu", "swiglu_ref"]
