"""PyTorch references of the one-row products: F.linear, and SwiGLU's first half."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def matvec_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def stacked_matvec_ref(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(F.linear(x, w) for w in weights)


def gated_matvec_ref(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    return F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)
