"""The greedy token choice of a decode step in one launch:

    greedy_token_(logits, tokens, positions, length, unfinished=None, ends=None, pad=None, blocked=None,
                  allowed_from=None) -> None

logits (batch, vocab): the last position's scores, any float dtype. Each row's token is the first index of its
maximum, NaN counting above every number (torch.argmax's rule). Where `blocked` (vocab,) bool is given, its tokens
score -inf while the sequence length `length` (0-dim int64, read only) is below `allowed_from` (0-dim int64), as
transformers' MinLengthLogitsProcessor and MinNewTokensLengthLogitsProcessor do. Where `ends` (vocab,) bool is
given, a row whose `unfinished` flag (batch,) int64 is 0 takes the token `pad` (0-dim int64), and a row whose chosen
token is an end token has its flag set to 0, as transformers' greedy loop does. tokens (batch, 1) int64 receive the
tokens and positions (batch, 1) int64 count one token more (the caller counts `length`: every row reads it). All in
place, so a CUDA graph of a decode step holds it.

PyTorch takes six to eight launches for this after the head's product (a cast, the argmax, the end-of-sequence
bookkeeping, the counters): about 31 µs of a 4K-context batch-1 step of samba-421m on the H200
(docs/performance-notes.md, Decoding). Here one program per row walks the row in BLOCK-wide tiles, the next tile's
loads issued before the current one is reduced, keeping each lane's best score and its first index, then reduces
across lanes.
"""

import triton
import triton.language as tl

from .._common import dependent_launch, gdc_launch_dependents, gdc_wait, next_power_of_2, use_triton
from .naive import greedy_token_ref

BLOCK = 8192  # the widest tile: 16 warps, 16 scores per thread
WARPS = 16


@triton.jit
def _scores(row_ptr, start, vocab, blocked_ptr, blocking, MIN_LENGTH: tl.constexpr, BLOCK: tl.constexpr):
    """Scores start.. of the row in float32: -inf past the vocabulary, and at blocked tokens while `blocking`."""
    index = start + tl.arange(0, BLOCK)
    in_row = index < vocab
    scores = tl.load(row_ptr + index, mask=in_row, other=float("-inf")).to(tl.float32)
    if MIN_LENGTH:
        blocked = tl.load(blocked_ptr + index, mask=tl.where(blocking, in_row, False), other=0) != 0
        scores = tl.where(blocked, float("-inf"), scores)
    return scores


# The decode engine writes each step's tokens to the next column of one buffer: 8-byte steps, which would compile a
# kernel for each 16-byte alignment.
@triton.jit(do_not_specialize_on_alignment=["tokens_ptr"])
def _greedy_token_kernel(
    logits_ptr,
    tokens_ptr,
    positions_ptr,
    length_ptr,
    unfinished_ptr,
    ends_ptr,
    pad_ptr,
    blocked_ptr,
    allowed_from_ptr,
    vocab,
    stride_logits,
    stride_tokens,
    stride_positions,
    EOS: tl.constexpr,
    MIN_LENGTH: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    if PDL:  # the logits are the kernel ahead's output
        gdc_launch_dependents()
        gdc_wait()
    row_ptr = logits_ptr + row.to(tl.int64) * stride_logits
    blocking = False
    if MIN_LENGTH:
        blocking = tl.load(length_ptr) < tl.load(allowed_from_ptr)
    lane = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = lane  # a row of -inf only: index 0, as torch.argmax
    first_nan = vocab
    scores = _scores(row_ptr, 0, vocab, blocked_ptr, blocking, MIN_LENGTH, BLOCK)
    for start in range(0, vocab, BLOCK):
        next_scores = _scores(row_ptr, start + BLOCK, vocab, blocked_ptr, blocking, MIN_LENGTH, BLOCK)
        index = start + lane
        first_nan = tl.minimum(first_nan, tl.min(tl.where(scores != scores, index, vocab)))
        better = scores > best  # strictly: a lane keeps the first index of its maximum
        best = tl.where(better, scores, best)
        best_index = tl.where(better, index, best_index)
        scores = next_scores
    top = tl.max(best)
    token = tl.min(tl.where(best == top, best_index, vocab))
    token = tl.where(first_nan < vocab, first_nan, token).to(tl.int64)
    if EOS:
        unfinished = tl.load(unfinished_ptr + row)
        ended = tl.load(ends_ptr + token) != 0
        token = tl.where(unfinished != 0, token, tl.load(pad_ptr))
        tl.store(unfinished_ptr + row, tl.where(ended, 0, unfinished))
    tl.store(tokens_ptr + row * stride_tokens, token)
    position_ptr = positions_ptr + row * stride_positions
    tl.store(position_ptr, tl.load(position_ptr) + 1)


def greedy_token_(
    logits, tokens, positions, length, unfinished=None, ends=None, pad=None, blocked=None, allowed_from=None
) -> None:
    """The greedy token choice of a decode step, in place (semantics: `greedy_token_ref`; see the module
    docstring): the Triton kernel where `use_triton(logits)`, the reference elsewhere.

    Args:
        logits (torch.Tensor): `[batch, vocab]` scores, contiguous along the vocabulary.
        tokens (torch.Tensor): `[batch, 1]` int64, written.
        positions (torch.Tensor): `[batch, 1]` int64, counted up by one.
        length (torch.Tensor): 0-dim int64, the sequence length before this token (read only).
        unfinished (torch.Tensor | None): `[batch]` int64 flags, 1 for a row still generating; with `ends` and
            `pad`, or all three None.
        ends (torch.Tensor | None): `[vocab]` bool, the tokens that end a row.
        pad (torch.Tensor | None): 0-dim int64, the token of a finished row.
        blocked (torch.Tensor | None): `[vocab]` bool, tokens not chosen while `length < allowed_from`; with
            `allowed_from` (0-dim int64), or both None.
    """
    batch, vocab = logits.shape
    eos, min_length = ends is not None, blocked is not None
    if (unfinished is not None, pad is not None) != (eos, eos) or (allowed_from is not None) != min_length:
        raise ValueError(
            "greedy_token_: give unfinished, ends and pad together (end-of-sequence) or none of them, and blocked "
            "with allowed_from (a minimum length) or neither"
        )
    if tokens.shape != (batch, 1) or positions.shape != (batch, 1) or length.shape != ():
        raise ValueError(
            f"greedy_token_: tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must be "
            f"({batch}, 1) for logits {tuple(logits.shape)}, length 0-dim (got {tuple(length.shape)})"
        )
    if (eos and (unfinished.shape != (batch,) or ends.shape != (vocab,) or pad.numel() != 1)) or (
        min_length and (blocked.shape != (vocab,) or allowed_from.numel() != 1)
    ):
        raise ValueError(
            f"greedy_token_: unfinished must be ({batch},), ends and blocked ({vocab},), pad and allowed_from one "
            "number each"
        )
    if not use_triton(logits):
        greedy_token_ref(logits, tokens, positions, length, unfinished, ends, pad, blocked, allowed_from)
        return
    if logits.stride(-1) != 1:
        raise ValueError("greedy_token_: the kernel takes logits contiguous along the vocabulary")
    unused = tokens  # the kernel's pointers it does not read
    _greedy_token_kernel[(batch,)](
        logits,
        tokens,
        positions,
        length,
        unfinished if eos else unused,
        ends if eos else unused,
        pad if eos else unused,
        blocked if min_length else unused,
        allowed_from if min_length else unused,
        vocab,
        logits.stride(0),
        tokens.stride(0),
        positions.stride(0),
        EOS=eos,
        MIN_LENGTH=min_length,
        BLOCK=min(BLOCK, next_power_of_2(vocab)),
        num_warps=WARPS,
        **dependent_launch(logits),
    )
