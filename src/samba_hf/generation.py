"""Generation helpers: the memory a cache holds."""

import torch
from transformers.cache_utils import Cache


def cache_tensors(cache: Cache) -> list[torch.Tensor]:
    """Every tensor a transformers cache holds: keys/values of attention layers, conv and recurrent
    states of Mamba layers."""
    tensors = []
    for layer in cache.layers:
        for name in ("keys", "values"):
            if isinstance(getattr(layer, name, None), torch.Tensor):
                tensors.append(getattr(layer, name))
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            tensors.extend(t for t in states.values() if isinstance(t, torch.Tensor))
    return tensors


def cache_nbytes(cache: Cache) -> int:
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))
