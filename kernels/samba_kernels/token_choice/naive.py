"""PyTorch reference of the greedy token choice of a decode step."""

import torch


def greedy_token_ref(logits, tokens, positions, length, unfinished=None, ends=None, pad=None) -> None:
    """Each row's next token, in place (arguments: `greedy_token_`'s): torch.argmax of its logits (the first
    maximal index, NaN above every number); where `ends` is given, a row that has finished takes `pad`, and a row
    whose chosen token is an end token finishes. Then positions and length count one token more."""
    chosen = logits.argmax(dim=-1)
    if ends is not None:
        ended = ends[chosen]
        chosen = torch.where(unfinished.bool(), chosen, pad.reshape(()))
        unfinished.masked_fill_(ended, 0)
    tokens.copy_(chosen.reshape(tokens.shape))
    positions.add_(1)
    length.add_(1)
