"""The greedy token choice of a decode step in one launch:

    greedy_token_(logits, tokens, positions, length, unfinished=None, ends=None, pad=None, blocked=None,
                  allowed_from=None, finished=None) -> None

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
(docs/performance-notes.md, Decoding). Here each row is split between programs (SPAN logits each); a program walks
its share in BLOCK-wide tiles, the next tile's loads issued before the current one is reduced, keeping each lane's
best score and its first index, and leaves its share's best (and first NaN); the last program of the row to finish
(a count each program adds to: `finished`) chooses from them and applies the end-of-sequence rule.
"""

import torch
import triton
import triton.language as tl

from .._common import cdiv, dependent_launch, gdc_launch_dependents, gdc_wait, next_power_of_2, use_triton
from .naive import greedy_token_ref

# A row's share per program: samba-421m's 32000 logits over 16 programs, each one tile (a single program walking
# the row took 9.1 µs of the captured step on the H200, docs/performance-notes.md). BLOCK: the widest tile, at 16
# scores a thread (16 warps at 8192).
SPAN = 2048
BLOCK = 8192
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
    part_top_ptr,
    part_token_ptr,
    part_nan_ptr,
    finished_ptr,
    vocab,
    span,
    stride_logits,
    stride_tokens,
    stride_positions,
    EOS: tl.constexpr,
    MIN_LENGTH: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    row, split = tl.program_id(0), tl.program_id(1)
    if PDL:  # the logits are the kernel ahead's output
        gdc_launch_dependents()
        gdc_wait()
    row_ptr = logits_ptr + row.to(tl.int64) * stride_logits
    blocking = False
    if MIN_LENGTH:
        blocking = tl.load(length_ptr) < tl.load(allowed_from_ptr)
    # this program's share of the row: [first, end)
    first = split * span
    end = tl.minimum(first + span, vocab)
    lane = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = first + lane  # a share of -inf only: its first index, as torch.argmax
    first_nan = vocab
    scores = _scores(row_ptr, first, end, blocked_ptr, blocking, MIN_LENGTH, BLOCK)
    for start in range(first, end, BLOCK):
        next_scores = _scores(row_ptr, start + BLOCK, end, blocked_ptr, blocking, MIN_LENGTH, BLOCK)
        index = start + lane
        first_nan = tl.minimum(first_nan, tl.min(tl.where(scores != scores, index, vocab)))
        better = scores > best  # strictly: a lane keeps the first index of its maximum
        best = tl.where(better, scores, best)
        best_index = tl.where(better, index, best_index)
        scores = next_scores
    top = tl.max(best)
    token = tl.min(tl.where(best == top, best_index, vocab))
    if not SPLIT:
        _store_choice(row, token, first_nan, vocab, tokens_ptr, positions_ptr, unfinished_ptr, ends_ptr, pad_ptr,
                      stride_tokens, stride_positions, EOS)  # fmt: skip
    else:  # the shares' partials; the last program of the row to finish chooses from them
        splits = tl.num_programs(1)
        part = row * splits + split
        tl.store(part_top_ptr + part, top)
        tl.store(part_token_ptr + part, token)
        tl.store(part_nan_ptr + part, first_nan)
        # the partials are stored before the count (the barrier); the count's release and acquire order them before
        # the last program's loads, which bypass L1 (".cg"), where no stale line can be
        tl.debug_barrier()
        if tl.atomic_add(finished_ptr + row, 1, sem="acq_rel", scope="gpu") == splits - 1:
            tl.store(finished_ptr + row, 0)  # ready for the next call (a CUDA graph replays this one)
            share = tl.arange(0, BLOCK_SPLITS)
            share_mask = share < splits
            parts = row * splits + share
            tops = tl.load(part_top_ptr + parts, mask=share_mask, other=float("-inf"), cache_modifier=".cg")
            chosen = tl.load(part_token_ptr + parts, mask=share_mask, other=vocab, cache_modifier=".cg")
            nans = tl.load(part_nan_ptr + parts, mask=share_mask, other=vocab, cache_modifier=".cg")
            top = tl.max(tops)
            token = tl.min(tl.where(tops == top, chosen, vocab))
            _store_choice(row, token, tl.min(nans), vocab, tokens_ptr, positions_ptr, unfinished_ptr, ends_ptr,
                          pad_ptr, stride_tokens, stride_positions, EOS)  # fmt: skip


@triton.jit
def _store_choice(row, token, first_nan, vocab, tokens_ptr, positions_ptr, unfinished_ptr, ends_ptr, pad_ptr,
                  stride_tokens, stride_positions, EOS: tl.constexpr):  # fmt: skip
    """The row's token (the first NaN's index where it has one) after the end-of-sequence rule, and its position."""
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
    logits, tokens, positions, length, unfinished=None, ends=None, pad=None, blocked=None, allowed_from=None,
    finished=None,
) -> None:  # fmt: skip
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
        finished (torch.Tensor | None): `[batch]` int32 zeros, the kernel's count of finished programs per row,
            which its last program sets back to 0: a caller that captures the call in a CUDA graph keeps one. None:
            a new one per call.
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
    if finished is None:
        finished = torch.zeros(batch, dtype=torch.int32, device=logits.device)
    elif finished.shape != (batch,) or finished.dtype != torch.int32:
        raise ValueError(f"greedy_token_: finished must be ({batch},) int32 zeros, got {tuple(finished.shape)} "
                         f"{finished.dtype}")  # fmt: skip
    _launch(logits, tokens, positions, length, unfinished, ends, pad, blocked, allowed_from, finished)


def _launch(
    logits, tokens, positions, length, unfinished, ends, pad, blocked, allowed_from, finished, span=None,
    num_warps=None,
):  # fmt: skip
    """The kernel's launch (a row's share per program and the warps as arguments, for a benchmark's comparison)."""
    batch, vocab = logits.shape
    eos, min_length = ends is not None, blocked is not None
    span = span or SPAN
    splits = cdiv(vocab, span)
    block = min(BLOCK, next_power_of_2(min(span, vocab)))
    part_top = logits.new_empty(batch * splits, dtype=torch.float32)
    part_token = logits.new_empty(batch * splits, dtype=torch.int32)
    part_nan = torch.empty_like(part_token)
    unused = tokens  # the kernel's pointers it does not read
    _greedy_token_kernel[(batch, splits)](
        logits,
        tokens,
        positions,
        length,
        unfinished if eos else unused,
        ends if eos else unused,
        pad if eos else unused,
        blocked if min_length else unused,
        allowed_from if min_length else unused,
        part_top,
        part_token,
        part_nan,
        finished,
        vocab,
        span,
        logits.stride(0),
        tokens.stride(0),
        positions.stride(0),
        EOS=eos,
        MIN_LENGTH=min_length,
        SPLIT=splits > 1,
        BLOCK=block,
        BLOCK_SPLITS=next_power_of_2(splits),
        num_warps=num_warps or max(1, min(WARPS, block // 512)),
        **dependent_launch(logits),
    )
