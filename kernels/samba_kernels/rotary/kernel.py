"""Rotate-half (GPT-NeoX) rotary position embeddings on queries and keys in one Triton kernel.

The model's PyTorch formula, q cos + rotate_half(q) sin on (batch, heads, length, head_dim) views of the
projections' (batch, length, heads, head_dim) outputs, runs as a negation, a concatenation, two broadcast products
and a sum, none of them vectorised over those strides: about 37 ms of the 340 ms of a 128K-token prefill on the
H200 (docs/performance-notes.md, Prefill). Here one launch reads q and k once and writes them once.

One program rotates a tile of BLOCK_L tokens of HEADS heads, of q or of k, loading each half of the head dimension
as its own (BLOCK_L, HEADS, BLOCK_H) block: out1 = x1 cos1 - x2 sin1, out2 = x2 cos2 + x1 sin2, in float32, rounded
once. The heads share the program's cos and sin tiles, and consecutive programs take the other heads of the same
token block, so those tiles come from L2 after the first.
The gradient is the transposed rotation, by the opposite angle: the same kernel with the halves of sin swapped and
negated (BACKWARD). There is no gradient for cos and sin (the reference has one).

torch.compile runs the reference, whose ops inductor fuses into one kernel itself: no custom op.
"""

import torch
import triton
import triton.language as tl

from .._common import cdiv, next_power_of_2, use_triton
from .naive import rotary_embedding_ref

TILE = 4096  # elements of q or k per program: BLOCK_L tokens x HEADS x head_dim (padded to a power of two)
HEADS = 2  # heads per program, which share its cos and sin tiles (10% faster than one on the H200; four no faster)


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    b,
    t,
    first,
    n_heads,
    L,
    s_xb,
    s_xl,
    s_xh,
    c1,
    c2,
    s1,
    s2,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEADS: tl.constexpr,
):
    """Rotates x[b, t, first : first + HEADS] (tokens t (BLOCK_L,), int64) by the float32 (BLOCK_L, 1, BLOCK_H)
    tiles of cos and sin into out, contiguous (batch, L, n_heads, 2 HALF)."""
    heads = first + tl.arange(0, HEADS).to(tl.int64)
    d = tl.arange(0, BLOCK_H)
    mask = (t < L)[:, None, None] & (heads < n_heads)[None, :, None] & (d < HALF)[None, None, :]
    x_off = b * s_xb + t[:, None, None] * s_xl + heads[None, :, None] * s_xh + d[None, None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    out_off = ((b * L + t[:, None, None]) * n_heads + heads[None, :, None]) * (2 * HALF) + d[None, None, :]
    tl.store(out_ptr + out_off, (x1 * c1 - x2 * s1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_off + HALF, (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    L,
    n_blocks,
    H,
    KH,
    s_qb,
    s_ql,
    s_qh,
    s_kb,
    s_kl,
    s_kh,
    s_cb,
    s_cl,
    s_sb,
    s_sl,
    HALF: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEADS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """q (batch, L, H, 2 HALF) and k (batch, L, KH, 2 HALF), rotated into contiguous outputs of their shapes; cos
    and sin (batch or 1, L, 2 HALF), broadcast where their batch stride is 0. Program pid takes head group
    pid % groups (those of q, then those of k, HEADS heads each) of token block pid // groups (batch-major)."""
    q_groups = tl.cdiv(H, HEADS)
    groups = q_groups + tl.cdiv(KH, HEADS)
    pid = tl.program_id(0)
    group = pid % groups
    block = pid // groups
    b = (block // n_blocks).to(tl.int64)  # int64 offsets: batch x length x heads x head_dim passes 2**31
    t = (block % n_blocks) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    d = tl.arange(0, BLOCK_H)
    mask = (t < L)[:, None] & (d < HALF)[None, :]
    cos_off = b * s_cb + t[:, None] * s_cl + d[None, :]
    sin_off = b * s_sb + t[:, None] * s_sl + d[None, :]
    c1 = tl.load(cos_ptr + cos_off, mask=mask, other=0.0).to(tl.float32)[:, None, :]  # broadcast over the heads
    c2 = tl.load(cos_ptr + cos_off + HALF, mask=mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(sin_ptr + sin_off, mask=mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(sin_ptr + sin_off + HALF, mask=mask, other=0.0).to(tl.float32)[:, None, :]
    if BACKWARD:  # the transpose: dx1 = g1 cos1 + g2 sin2, dx2 = g2 cos2 - g1 sin1
        s1, s2 = -s2, -s1
    # Each branch loads and stores its own tensor (the two may differ in strides and dtype).
    if group < q_groups:
        _rotate_heads(
            q_ptr, q_out_ptr, b, t, group * HEADS, H, L, s_qb, s_ql, s_qh, c1, c2, s1, s2, HALF, BLOCK_H, HEADS
        )
    else:
        first = (group - q_groups) * HEADS
        _rotate_heads(k_ptr, k_out_ptr, b, t, first, KH, L, s_kb, s_kl, s_kh, c1, c2, s1, s2, HALF, BLOCK_H, HEADS)


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (batch, length, heads, head_dim) and k (batch, length, kv_heads, head_dim), rotated (by the opposite
    angle where `backward`) into new contiguous tensors of their shapes. All four inputs have stride(-1) == 1."""
    batch, L, H, D = q.shape
    KH = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if batch * L == 0:
        return q_out, k_out
    BLOCK_H = next_power_of_2(D // 2)
    BLOCK_L = min(max(TILE // (2 * BLOCK_H * HEADS), 1), next_power_of_2(L))
    n_blocks = cdiv(L, BLOCK_L)
    groups = cdiv(H, HEADS) + cdiv(KH, HEADS)
    broadcast = cos.shape[0] == 1  # one cos and sin for the whole batch: batch stride 0
    _rotary_kernel[(batch * n_blocks * groups,)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        L,
        n_blocks,
        H,
        KH,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        0 if broadcast else cos.stride(0),
        cos.stride(1),
        0 if broadcast else sin.stride(0),
        sin.stride(1),
        HALF=D // 2,
        BLOCK_L=BLOCK_L,
        BLOCK_H=BLOCK_H,
        HEADS=HEADS,
        BACKWARD=backward,
        num_warps=4,
    )
    return q_out, k_out


class _RotaryEmbedding(torch.autograd.Function):
    """`_rotate` on (batch, length, heads, head_dim) views; the backward rotates the gradients back."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(_unit_stride(dq_out), _unit_stride(dk_out), cos, sin, backward=True)
        return dq, dk, None, None


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x where its last dimension is contiguous (the kernel's one requirement on strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"rotary_embedding: q {tuple(q.shape)} and k {tuple(k.shape)} must be (batch, heads, length, head_dim)"
        )
    batch, _, L, D = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"rotary_embedding: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, length and head_dim"
        )
    if D % 2:
        raise ValueError(f"rotary_embedding: head_dim must be even (rotate-half pairs its halves), got {D}")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1:] != (L, D):
        raise ValueError(
            f"rotary_embedding: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
            f"(1 or batch, length, head_dim) = (1 or {batch}, {L}, {D})"
        )


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embeddings of queries and keys (semantics: `rotary_embedding_ref`), differentiable in q
    and k: one Triton kernel where `use_triton(q)` outside torch.compile, the reference elsewhere.

    Args:
        q (torch.Tensor): queries, shape `[batch, heads, length, head_dim]`, head_dim even; any strides (typically
            the transpose of a `[batch, length, heads, head_dim]` projection).
        k (torch.Tensor): keys, shape `[batch, kv_heads, length, head_dim]`, any strides.
        cos, sin (torch.Tensor): shape `[1 or batch, length, head_dim]` (broadcast over the heads, and over the
            batch where it is 1), any float dtype; no gradient reaches them on the kernel's path.

    Returns:
        (q_out, k_out) of q's and k's shapes and dtypes, computed in float32 and rounded once: transposed views of
        contiguous `[batch, length, heads, head_dim]` tensors, the layout the PyTorch formula gives for transposed
        inputs.
    """
    _check(q, k, cos, sin)
    if torch.compiler.is_compiling() or not use_triton(q):
        return rotary_embedding_ref(q, k, cos, sin)
    grad = torch.is_grad_enabled()
    if grad and (cos.requires_grad or sin.requires_grad):
        raise ValueError(
            "rotary_embedding's kernel has no gradient for cos and sin: use rotary_embedding_ref where they need one"
        )
    q_t, k_t = _unit_stride(q.transpose(1, 2)), _unit_stride(k.transpose(1, 2))
    cos, sin = _unit_stride(cos), _unit_stride(sin)
    if grad and (q.requires_grad or k.requires_grad):
        q_out, k_out = _RotaryEmbedding.apply(q_t, k_t, cos, sin)
    else:
        q_out, k_out = _rotate(q_t, k_t, cos, sin, backward=False)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)
