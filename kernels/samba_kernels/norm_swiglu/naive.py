"""PyTorch references of RMSNorm (normalised in float32, returned in the output dtype) and of SwiGLU's gate,
silu(gate) * up: the model's formulas, the path of CPU tensors, of gradients and of torch.compile (whose kernels
fuse them), and the oracle of the kernel tests beside float64 computations."""

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x / sqrt(mean(x ** 2, last dimension) + eps) * weight, in float32 (F.rms_norm), rounded to `out_dtype`."""
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(out_dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the inputs' dtype (each op rounds)."""
    return F.silu(gate) * up
