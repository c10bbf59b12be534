"""The greedy token choice of a decode step, with its end-of-sequence rule, minimum length and position count, as
one Triton kernel (`kernel.py`), and its PyTorch reference (`naive.py`)."""

from .kernel import greedy_token_
from .naive import greedy_token_ref

__all__ = ["greedy_token_", "greedy_token_ref"]
