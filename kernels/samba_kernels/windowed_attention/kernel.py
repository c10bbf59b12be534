"""Causal sliding-window attention: an own Triton forward where no gradient is needed, torch's
flex_attention (compiled once) for training on CUDA, an exact eager reference elsewhere.

    windowed_attention(query, key, value, window, scale=None, seq_idx=None) -> (batch, heads, len_q, head_dim)

query (batch, heads, len_q, head_dim); key, value (batch, kv_heads, len_kv, head_dim) with
heads % kv_heads == 0 (grouped-query attention) and len_q <= len_kv. Queries are aligned to the END
of the keys: query i sits at position p = len_kv - len_q + i and sees keys p - window + 1 .. p (itself
and the window - 1 keys before it), so a chunk that continues from cached keys works as well as a
full sequence. Differentiable in query, key and value (through flex or the reference).

Where no gradient is needed (prefill, evaluation; head_dim a power of two from 16 to 256; fewer than
2**31 elements per batch entry, i.e. up to about a million tokens of 16 x 128 in one piece), the op runs
`_window_fwd_kernel` (custom op `samba_kernels::windowed_attention_fwd`): on CUDA, and on CPU tensors
under TRITON_INTERPRET=1 like the other ops. Each tile of queries walks the keys it may see in three
ranges, the bulk of the window unmasked and only the window's two edges masked, with no block-index
lookups; it is faster than flex compiled for the exact shape, in the same run, at 16K tokens and at batch
8 x 4K (benchmarks/results/kernels.md).

For training on CUDA the op calls a compiled flex_attention (forward and backward; created on first
use and reused) with a BlockMask built once per (len_q, len_kv, window, device) and cached, so
fully-masked key blocks are skipped. It compiles for the first shape and once more with symbolic
lengths at the second (automatic dynamic shapes), so inputs of every length share it: compiled per
shape, the ninth length would hit dynamo's recompile limit and fall back to flex's unfused path, which
materialises the whole score matrix (docs/performance-notes.md: a 64K-token prefill chunk). Called inside
a torch.compile'd model, it is traced into the model's graph (flex_attention and the block mask,
without the caches). CPU (and any other device) tensors that need gradients take the eager reference
with an explicit boolean mask, computed in float32 (flex has no CPU backward).

Rows of packed documents (`seq_idx`, a whole sequence) take flex on CUDA with or without gradients, with a block
mask built from the window's band of blocks, every block partial (`_document_block_mask`), and the reference
elsewhere.
"""

import functools
import math

import torch
import triton
import triton.language as tl
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .._common import cdiv, use_triton
from .naive import check_inputs, windowed_attention_ref


@triton.jit
def _attend_keys(
    acc,
    l_i,
    m_i,
    q,
    k_tile_ptr,
    v_tile_ptr,
    pos,
    key_lo,
    key_hi,
    len_kv,
    window,
    qk_scale,
    stride_kn,
    stride_vn,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over the keys [key_lo, key_hi) (multiples of BLOCK_N). MASKED blocks apply the
    window and the key count; the others are known to be wholly visible to every row."""
    block_keys = tl.arange(0, BLOCK_N)
    for start in range(key_lo, key_hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        keys = start + block_keys
        if MASKED:
            k = tl.load(k_tile_ptr + start * stride_kn, mask=keys[None, :] < len_kv, other=0.0)
        else:
            k = tl.load(k_tile_ptr + start * stride_kn)
        scores = tl.dot(q, k, input_precision=PRECISION)
        if MASKED:
            visible = (keys[None, :] <= pos[:, None]) & (pos[:, None] - keys[None, :] < window)
            # A large negative number, not -inf: a row that sees nothing in this block gets a finite
            # maximum, and its terms vanish (alpha = 0) at the first block where it sees a key.
            scores = scores * qk_scale + tl.where(visible, 0.0, -1.0e6)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            scores -= m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
            scores = scores * qk_scale - m_new[:, None]
        p = tl.math.exp2(scores)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_tile_ptr + start * stride_vn, mask=keys[:, None] < len_kv, other=0.0)
        else:
            v = tl.load(v_tile_ptr + start * stride_vn)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["len_q", "len_kv", "window"])  # one compilation for all lengths
def _window_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    qk_scale,
    len_q,
    len_kv,
    window,
    heads,
    group,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (BLOCK_M queries, batch x head). Query i sits at key position
    len_kv - len_q + i. The keys it may see split into three ranges of BLOCK_N-aligned blocks: those
    every row of the tile sees (no mask: most of the window), the trailing edge of the window and the
    diagonal (masked)."""
    block_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    block_keys = tl.arange(0, BLOCK_N)
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :],
        mask=rows[:, None] < len_q,
        other=0.0,
    )
    kv_head = h // group  # the key and value head of query head h
    k_tile_ptr = (
        k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh + block_keys[None, :] * stride_kn + dims[:, None]
    )
    v_tile_ptr = (
        v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh + block_keys[:, None] * stride_vn + dims[None, :]
    )
    first = len_kv - len_q + block_m * BLOCK_M  # the tile's first and last query positions
    last = first + BLOCK_M - 1
    pos = first + tl.arange(0, BLOCK_M)
    diag_lo = (first // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N) * BLOCK_N, diag_lo)
    edge_lo = (tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _attend_keys(
        acc,
        l_i,
        m_i,
        q,
        k_tile_ptr,
        v_tile_ptr,
        pos,
        full_lo,
        diag_lo,
        len_kv,
        window,
        qk_scale,
        stride_kn,
        stride_vn,
        BLOCK_N,
        False,
        PRECISION,
    )
    acc, l_i, m_i = _attend_keys(
        acc,
        l_i,
        m_i,
        q,
        k_tile_ptr,
        v_tile_ptr,
        pos,
        edge_lo,
        full_lo,
        len_kv,
        window,
        qk_scale,
        stride_kn,
        stride_vn,
        BLOCK_N,
        True,
        PRECISION,
    )
    acc, l_i, m_i = _attend_keys(
        acc,
        l_i,
        m_i,
        q,
        k_tile_ptr,
        v_tile_ptr,
        pos,
        diag_lo,
        tl.minimum(last + 1, len_kv),
        len_kv,
        window,
        qk_scale,
        stride_kn,
        stride_vn,
        BLOCK_N,
        True,
        PRECISION,
    )
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=rows[:, None] < len_q,
    )


def _tile(head_dim: int) -> dict:
    """(BLOCK_M, BLOCK_N, warps, stages): the best of a sweep at head_dim 128
    (docs/performance-notes.md, Sliding-window attention); smaller tiles at 256 keep the accumulator in registers."""
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _new_output(query: torch.Tensor) -> torch.Tensor:
    """query's layout where its head_dim is contiguous (the model's (batch, len, heads, head_dim) memory
    then needs no copy after the output's transpose), else a contiguous tensor."""
    return (
        torch.empty_like(query)
        if query.stride(-1) == 1
        else torch.empty(query.shape, dtype=query.dtype, device=query.device)
    )


def _launch_window_fwd(query, key, value, window: int, scale: float | None, tile: dict) -> torch.Tensor:
    batch, heads, len_q, head_dim = query.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    out = _new_output(query)
    scale = head_dim**-0.5 if scale is None else scale
    _window_fwd_kernel[(cdiv(len_q, tile["BLOCK_M"]), batch * heads)](
        q,
        k,
        v,
        out,
        scale * 1.4426950408889634,
        len_q,
        k.shape[2],
        window,
        heads,
        heads // k.shape[1],
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        HEAD_DIM=head_dim,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **tile,
    )  # softmax in fp32
    return out


@torch.library.custom_op("samba_kernels::windowed_attention_fwd", mutates_args=())
def _window_fwd(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, scale: float | None
) -> torch.Tensor:
    return _launch_window_fwd(query, key, value, window, scale, _tile(query.shape[-1]))


@_window_fwd.register_fake
def _(query, key, value, window, scale):
    return _new_output(query)


def _offsets_fit_int32(x: torch.Tensor) -> bool:
    """Whether every element of one batch entry of x lies within int32 of its start: the kernel
    computes those offsets in int32 (int64 ones made it slower, docs/performance-notes.md; only the batch offset is
    int64). A tensor whose head_dim is strided reaches the kernel as a contiguous copy."""
    if x.stride(-1) != 1:
        return math.prod(x.shape[1:]) <= 2**31
    return sum((size - 1) * stride for size, stride in zip(x.shape[1:], x.stride()[1:])) < 2**31


def _kernel_fits(query, key, value) -> bool:
    """The Triton forward: no gradient asked for, a power-of-two head_dim it has tiles for, offsets in
    int32 (a single unchunked sequence of a million tokens or more takes flex instead)."""
    head_dim = query.shape[-1]
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return (
        not needs_grad
        and 16 <= head_dim <= 256
        and head_dim & (head_dim - 1) == 0
        and use_triton(query)
        and all(_offsets_fit_int32(x) for x in (query, key, value))
    )


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=None)


@functools.lru_cache(maxsize=64)
def _block_mask(len_q: int, len_kv: int, window: int, device: str):
    # A tensor, not an int: compiled flex guards on the ints a mask function closes over, so a prefill's
    # first chunk (offset 0) and its continuations (offset window - 1) would compile separately.
    offset = torch.tensor(len_kv - len_q, device=device)

    def sliding_window(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        return (kv_idx <= q_pos) & (q_pos - kv_idx < window)

    return create_block_mask(sliding_window, B=None, H=None, Q_LEN=len_q, KV_LEN=len_kv, device=device)


FLEX_BLOCK = 128  # flex_attention's default block size, the block masks' tiles


def _document_block_mask(seq_idx: torch.Tensor, window: int) -> BlockMask:
    """The window's BlockMask over rows of packed documents (seq_idx (batch, length)): each block of queries
    reaches its band of key blocks, every one partial (a document may start inside any of them), and the mask
    compares the documents too. Built from the band's block indices, in O(blocks^2): create_block_mask would
    evaluate the mask at every (query, key) pair, O(length^2)."""
    length, device = seq_idx.shape[1], seq_idx.device
    blocks = cdiv(length, FLEX_BLOCK)
    q_block = torch.arange(blocks, device=device, dtype=torch.int32)
    first = torch.clamp(torch.div(q_block * FLEX_BLOCK - window + 1, FLEX_BLOCK, rounding_mode="floor"), min=0)
    kv_num_blocks = (q_block - first + 1).to(torch.int32)
    kv_indices = torch.clamp(first[:, None] + q_block[None, :], max=blocks - 1).to(torch.int32)

    def window_in_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window) & (seq_idx[b, q_idx] == seq_idx[b, kv_idx])

    return BlockMask.from_kv_blocks(
        kv_num_blocks[None, None], kv_indices[None, None], BLOCK_SIZE=FLEX_BLOCK, mask_mod=window_in_document,
        seq_lengths=(length, length),
    )  # fmt: skip


def windowed_attention(query, key, value, window, scale=None, kernel_options=None, seq_idx=None):
    """Causal sliding-window attention (semantics: `windowed_attention_ref`; paths: the module docstring),
    differentiable in query, key and value.

    Args:
        query (torch.Tensor): shape `[batch, heads, len_q, head_dim]`, float32, bfloat16 or float16; any strides.
        key, value (torch.Tensor): shape `[batch, kv_heads, len_kv, head_dim]` with `heads % kv_heads == 0`
            (grouped-query attention) and `len_q <= len_kv`; query's dtype.
        window (int): keys each query sees, itself included: query i, at position `len_kv - len_q + i`, sees
            the keys at positions `p - window + 1 .. p`.
        scale (float | None): the scores' scale, `head_dim ** -0.5` where None.
        kernel_options (dict | None): passed to flex_attention where it runs (CUDA, gradients needed or documents;
            e.g. block sizes), ignored elsewhere.
        seq_idx (torch.Tensor | None): shape `[batch, length]`, the document of each token of rows of packed
            documents (a query sees only keys of its own document); only for a whole sequence (`len_q == len_kv`).
            On CUDA it runs flex, with or without gradients.

    Returns:
        query's shape and dtype.
    """
    check_inputs(query, key, value, window, seq_idx)
    if seq_idx is None and _kernel_fits(query, key, value):
        return _window_fwd(query, key, value, int(window), scale)
    if not query.is_cuda:
        return windowed_attention_ref(query, key, value, window, scale, seq_idx)
    # Inside a caller's torch.compile, its graph compiles flex and the mask itself: the host-side
    # caches (the compiled function, the block masks) are for eager callers.
    compiling = torch.compiler.is_compiling()
    attend = flex_attention if compiling else _compiled_flex()
    if seq_idx is not None:
        mask = _document_block_mask(seq_idx, int(window))
    else:
        mask = (_block_mask.__wrapped__ if compiling else _block_mask)(
            query.shape[2], key.shape[2], int(window), str(query.device)
        )
    return attend(
        query,
        key,
        value,
        block_mask=mask,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
        kernel_options=kernel_options,
    )
