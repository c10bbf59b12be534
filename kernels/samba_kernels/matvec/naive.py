"""PyTorch references of the one-row products: F.linear, after F.rms_norm where the kernel fuses the norm, and
SwiGLU's first half."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def rms_normalized(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The reference of the kernels' NORM: x RMS-normalised in float32 and scaled by norm_weight (x itself
    where norm_weight is None), in `dtype`."""
    if norm_weight is None:
        return x
    return F.rms_norm(x.float(), norm_weight.shape, norm_weight.float(), eps).to(dtype)


def matvec_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    return F.linear(rms_normalized(x, norm_weight, eps, weight.dtype), weight, bias)


def matvec_add_ref(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return residual.add_(F.linear(x, weight, bias).to(residual.dtype))


def stacked_matvec_ref(
    x: torch.Tensor, weights: Sequence[torch.Tensor], *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5
) -> tuple[torch.Tensor, ...]:
    x = rms_normalized(x, norm_weight, eps, weights[0].dtype)
    return tuple(F.linear(x, w) for w in weights)


def gated_matvec_ref(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    x = rms_normalized(x, norm_weight, eps, gate_weight.dtype)
    return F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)
