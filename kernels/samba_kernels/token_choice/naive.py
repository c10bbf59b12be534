"""PyTorch reference of the greedy token choice of a decode step."""

import torch


def greedy_token_ref(
    logits, tokens, positions, length, unfinished=None, ends=None, pad=None, blocked=None, allowed_from=None
) -> None:
    """Each row's next token, in place (arguments: `greedy_token_`'s): torch.argmax of its logits (the first
    maximal index, NaN above every number), the `blocked` tokens at -inf while length < allowed_from; where `ends`
    is given, a row that has finished takes `pad`, and a row whose chosen token is an end token finishes. Then
    positions count one token more."""
    if blocked is not None:
        logits = torch.where((length < allowed_from) & blocked, float("-inf"), logits)
    chosen = logits.argmax(dim=-1)
    if ends is not None:
        ended = ends[chosen]
        chosen = torch.where(unfinished.bool(), chosen, pad.reshape(()))
        unfinished.masked_fill_(ended, 0)
    tokens.copy_(chosen.reshape(tokens.shape))
    positions.add_(1)
