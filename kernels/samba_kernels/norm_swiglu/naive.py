"""PyTorch references of RMSNorm (normalised in float32, returned in the output dtype), of SwiGLU's gate,
silu(gate) * up, and of the float32 residual add: the model's formulas, the path of CPU tensors, of gradients and of
torch.compile (whose kernels fuse them), and the oracle of the kernel tests beside float64 computations."""

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x / sqrt(mean(x ** 2, last dimension) + eps) * weight, in float32 (F.rms_norm), rounded to `out_dtype`."""
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(out_dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the inputs' dtype (each op rounds)."""
    return F.silu(gate) * up


def residual_add_ref(residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """residual + update in float32 (the add promotes a 16-bit update itself, without a cast copy)."""
    return residual.float() + update
