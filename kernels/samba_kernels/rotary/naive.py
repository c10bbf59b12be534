"""PyTorch reference of rotate-half (GPT-NeoX) rotary position embeddings on queries and keys.

Exactly the model's formula, in the inputs' dtype (each op rounds, as in the model's eager path): the path of
CPU tensors and of torch.compile (whose kernels fuse it), the reference of gradients for cos and sin, and the
oracle of the kernel tests beside an independent float64 rotation.
"""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(-x2, x1) of the two halves x1, x2 of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q cos + rotate_half(q) sin, k cos + rotate_half(k) sin), cos and sin broadcast over the heads.
    Arguments and result: `rotary_embedding`'s."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
