"""One token's sliding-window attention over a ring buffer of keys and values: the attention half of a
batch-1 decode step, with the token's RoPE and the ring's update, in two launches.

    ring_decode_attention(q, k, v, key_ring, value_ring, readable, tokens_seen, position, inv_freq,
                          rope_scale, scale) -> out (1, heads * head_dim)

q (1, heads * head_dim), k and v (1, kv_heads * head_dim): the token's projections, before RoPE (views of
any stride between rows). key_ring and value_ring (1, kv_heads, slots, head_dim): the last `slots` tokens'
rotated keys and values, slot s holding the latest token t with t = s (mod slots); the token's rotated key
and value are written at slot `tokens_seen % slots`, in place. readable (1, slots) bool: the slots the query
may read (written, inside the window, not padding); the new slot is read whatever it says. tokens_seen: a
0-dim int64 tensor, tokens before this one (the caller counts it up). position: (1, 1) int64, the token's
RoPE position. inv_freq (head_dim / 2,) float32 and rope_scale: RoPE's inverse frequencies and the
attention scaling of its type (rotate-half layout, as the model's `apply_rotary_pos_emb`). heads must be a
multiple of kv_heads (grouped-query attention).

It computes what the model's attention computes for the token (`ring_decode_attention_ref`): RoPE on q and
k, the cache update, softmax(q K^T scale) V over the readable slots. The first kernel splits the slots
between programs, each for one key/value head and its group of query heads (flash-decoding): it rotates
the query and the new key itself, reads its share of the ring (the new slot from registers, and writes it),
and leaves a partial softmax (max, sum, weighted values). The second combines each head's partials.
Statistics in float32. No gradients.
"""

import torch
import triton
import triton.language as tl

from .._common import cdiv, dependent_launch, gdc_launch_dependents, gdc_wait, next_power_of_2, use_triton
from .naive import ring_decode_attention_ref

# Slots per program of the first kernel, and per step of its loop. samba-421m's 2048-slot window over 12
# key/value heads gives 192 programs.
SPLIT_SLOTS = 128
TILE_SLOTS = 32


@triton.jit
def _rotated(x_ptr, heads, head_mask, cos, sin, HALF: tl.constexpr):
    """The two halves of rows `heads` of x (head_dim = 2 HALF) after rotate-half RoPE, in float32."""
    dims = tl.arange(0, HALF)
    first = tl.load(x_ptr + heads[:, None] * (2 * HALF) + dims[None, :], mask=head_mask[:, None], other=0.0)
    second = tl.load(x_ptr + heads[:, None] * (2 * HALF) + HALF + dims[None, :], mask=head_mask[:, None], other=0.0)
    first, second = first.to(tl.float32), second.to(tl.float32)
    return first * cos[None, :] - second * sin[None, :], second * cos[None, :] + first * sin[None, :]


@triton.jit
def _partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    key_ring_ptr,
    value_ring_ptr,
    readable_ptr,
    tokens_seen_ptr,
    position_ptr,
    inv_freq_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_out_ptr,
    rope_scale,
    scale,
    slots,
    stride_kh,
    stride_ks,
    stride_vh,
    stride_vs,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HALF: tl.constexpr,
    SPLIT: tl.constexpr,
    TILE: tl.constexpr,
    PDL: tl.constexpr,
):
    kv_head, split = tl.program_id(0), tl.program_id(1)
    if PDL:  # everything it reads may be written by the kernels before it
        gdc_launch_dependents()
        gdc_wait()
    splits = tl.num_programs(1)
    group = tl.arange(0, BLOCK_G)
    group_mask = group < GROUP
    heads = kv_head * GROUP + group
    half = tl.arange(0, HALF)
    angle = tl.load(position_ptr).to(tl.float32) * tl.load(inv_freq_ptr + half)
    cos, sin = tl.cos(angle) * rope_scale, tl.sin(angle) * rope_scale
    q1, q2 = _rotated(q_ptr, heads, group_mask, cos, sin, HALF)  # (BLOCK_G, HALF) each
    one = tl.full((1,), kv_head, tl.int32)
    k1, k2 = _rotated(k_ptr, one, one == kv_head, cos, sin, HALF)  # (1, HALF): the new key, rotated
    v_new = tl.load(v_ptr + kv_head * 2 * HALF + tl.arange(0, 2 * HALF)).to(tl.float32)
    new_slot = (tl.load(tokens_seen_ptr) % slots).to(tl.int32)

    running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, 2 * HALF), tl.float32)
    dims = tl.arange(0, 2 * HALF)
    for start in tl.static_range(0, SPLIT, TILE):
        slot = split * SPLIT + start + tl.arange(0, TILE)
        ring_mask = slot < slots
        new_mask = slot == new_slot
        key_rows_ptr = key_ring_ptr + kv_head * stride_kh + slot[:, None] * stride_ks
        key1 = tl.load(key_rows_ptr + half[None, :], mask=ring_mask[:, None], other=0.0).to(tl.float32)
        key2 = tl.load(key_rows_ptr + HALF + half[None, :], mask=ring_mask[:, None], other=0.0).to(tl.float32)
        key1 = tl.where(new_mask[:, None], k1, key1)
        key2 = tl.where(new_mask[:, None], k2, key2)
        values = tl.load(
            value_ring_ptr + kv_head * stride_vh + slot[:, None] * stride_vs + dims[None, :],
            mask=ring_mask[:, None],
            other=0.0,
        ).to(tl.float32)
        values = tl.where(new_mask[:, None], v_new[None, :], values)
        # (BLOCK_G, TILE) scores, summed over the two halves of the head
        scores = tl.sum(q1[:, None, :] * key1[None, :, :], axis=2) + tl.sum(q2[:, None, :] * key2[None, :, :], axis=2)
        visible_mask = ring_mask & ((tl.load(readable_ptr + slot, mask=ring_mask, other=0) != 0) | new_mask)
        scores = tl.where(visible_mask[None, :], scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no visible slot yet: nothing to rescale
        weights = tl.exp(scores - shift[:, None])
        correction = tl.exp(running_max - shift)
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
        running_max = new_max
    part_off = (kv_head * splits + split) * BLOCK_G + group
    tl.store(part_max_ptr + part_off, running_max)
    tl.store(part_sum_ptr + part_off, running_sum)
    tl.store(part_out_ptr + part_off[:, None] * 2 * HALF + dims[None, :], acc)
    # The program whose slots hold the new one writes it; no other program reads that slot.
    if (new_slot >= split * SPLIT) & (new_slot < split * SPLIT + SPLIT):
        key_row_ptr = key_ring_ptr + kv_head * stride_kh + new_slot * stride_ks
        tl.store(key_row_ptr + tl.arange(0, HALF)[None, :], k1.to(key_ring_ptr.dtype.element_ty))
        tl.store(key_row_ptr + HALF + tl.arange(0, HALF)[None, :], k2.to(key_ring_ptr.dtype.element_ty))
        tl.store(
            value_ring_ptr + kv_head * stride_vh + new_slot * stride_vs + dims,
            v_new.to(value_ring_ptr.dtype.element_ty),
        )


@triton.jit
def _combine_kernel(
    part_max_ptr,
    part_sum_ptr,
    part_out_ptr,
    out_ptr,
    splits,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    head = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    kv_head, member = head // GROUP, head % GROUP
    split = tl.arange(0, BLOCK_SPLITS)
    split_mask = split < splits
    part_off = (kv_head * splits + split) * BLOCK_G + member
    maxima = tl.load(part_max_ptr + part_off, mask=split_mask, other=float("-inf"))
    overall = tl.max(maxima, axis=0)
    weights = tl.where(split_mask, tl.exp(maxima - overall), 0.0)
    total = tl.sum(weights * tl.load(part_sum_ptr + part_off, mask=split_mask, other=0.0), axis=0)
    dims = tl.arange(0, HEAD_DIM)
    outs = tl.load(part_out_ptr + part_off[:, None] * HEAD_DIM + dims[None, :], mask=split_mask[:, None], other=0.0)
    result = tl.sum(weights[:, None] * outs, axis=0) / total
    tl.store(out_ptr + head * HEAD_DIM + dims, result.to(out_ptr.dtype.element_ty))


def ring_decode_attention(q, k, v, key_ring, value_ring, readable, tokens_seen, position, inv_freq, rope_scale, scale):
    """One token's attention over a ring buffer (semantics: `ring_decode_attention_ref`; see the module docstring),
    without gradients: the Triton kernels where `use_triton(q)`, the reference elsewhere.

    Args:
        q (torch.Tensor): the token's query projection before RoPE, one row `[1, heads * head_dim]`.
        k, v (torch.Tensor): its key and value projections, `[1, kv_heads * head_dim]`; heads a multiple of
            kv_heads.
        key_ring, value_ring (torch.Tensor): `[1, kv_heads, slots, head_dim]`, contiguous along head_dim (a power
            of two); the rotated keys and the values of the last `slots` tokens, updated in place at slot
            `tokens_seen % slots`.
        readable (torch.Tensor): `[1, slots]` bool, the slots the query may read besides the new one.
        tokens_seen (torch.Tensor): 0-dim int64, the tokens before this one.
        position (torch.Tensor): `[1, 1]` int64, the token's RoPE position.
        inv_freq (torch.Tensor): `[head_dim / 2]` float32, RoPE's inverse frequencies; rope_scale (float): its
            attention scaling.
        scale (float): the scores' scale.

    Returns:
        `[1, heads * head_dim]` in q's dtype.
    """
    batch, kv_heads, slots, head_dim = key_ring.shape
    heads = q.shape[-1] // head_dim
    if (
        batch != 1
        or q.shape[:-1].numel() != 1
        or heads % kv_heads
        or head_dim % 2
        or value_ring.shape != key_ring.shape
    ):
        raise ValueError(
            f"ring_decode_attention: one row of q {tuple(q.shape)} over rings {tuple(key_ring.shape)} "
            f"and {tuple(value_ring.shape)} (batch 1, heads a multiple of kv_heads, even head_dim)"
        )
    if readable.shape != (1, slots) or k.shape[-1] != kv_heads * head_dim or v.shape[-1] != kv_heads * head_dim:
        raise ValueError(
            f"ring_decode_attention: k {tuple(k.shape)}, v {tuple(v.shape)} and readable "
            f"{tuple(readable.shape)} do not match rings {tuple(key_ring.shape)}"
        )
    if not use_triton(q):
        return ring_decode_attention_ref(
            q, k, v, key_ring, value_ring, readable, tokens_seen, position, inv_freq, rope_scale, scale
        )
    if head_dim & (head_dim - 1) or key_ring.stride(-1) != 1 or value_ring.stride(-1) != 1:
        raise ValueError(
            f"ring_decode_attention: the kernel takes a power-of-two head_dim ({head_dim}) and rings "
            "contiguous along head_dim"
        )
    group = heads // kv_heads
    block_g = next_power_of_2(group)
    splits = cdiv(slots, SPLIT_SLOTS)
    part_max = q.new_empty(kv_heads * splits * block_g, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_out = q.new_empty(kv_heads * splits * block_g, head_dim, dtype=torch.float32)
    q, k, v = (t.reshape(-1).contiguous() for t in (q, k, v))
    readable = readable.reshape(-1)
    _partial_kernel[(kv_heads, splits)](
        q,
        k,
        v,
        key_ring,
        value_ring,
        readable,
        tokens_seen,
        position,
        inv_freq.contiguous(),
        part_max,
        part_sum,
        part_out,
        float(rope_scale),
        float(scale),
        slots,
        key_ring.stride(1),
        key_ring.stride(2),
        value_ring.stride(1),
        value_ring.stride(2),
        GROUP=group,
        BLOCK_G=block_g,
        HALF=head_dim // 2,
        SPLIT=SPLIT_SLOTS,
        TILE=min(TILE_SLOTS, SPLIT_SLOTS),
        num_warps=4,
        **dependent_launch(q),
    )
    out = q.new_empty(1, heads * head_dim)
    _combine_kernel[(heads,)](
        part_max,
        part_sum,
        part_out,
        out,
        splits,
        GROUP=group,
        BLOCK_G=block_g,
        HEAD_DIM=head_dim,
        BLOCK_SPLITS=next_power_of_2(splits),
        num_warps=4,
        **dependent_launch(q),
    )
    return out
