"""PyTorch reference of a decode step's embedding lookup."""

import torch


def embedding_rows_ref(weight: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = weight[tokens[i]] in out's dtype, in place (arguments: `embedding_rows_`'s)."""
    out.copy_(weight.index_select(0, tokens.reshape(-1)))
