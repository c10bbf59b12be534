"""One token's sliding-window attention over a ring buffer of keys and values: the attention half of a
batch-1 decode step, with the token's RoPE and the ring's update, in one launch.

    ring_decode_attention(q, k, v, key_ring, value_ring, readable, tokens_seen, position, inv_freq,
                          rope_scale, scale, finished=None) -> out (1, heads * head_dim)

q (1, heads * head_dim), k and v (1, kv_heads * head_dim): the token's projections, before RoPE (views of
any stride between rows). key_ring and value_ring (1, kv_heads, slots, head_dim): the last `slots` tokens'
rotated keys and values, slot s holding the latest token t with t = s (mod slots); the token's rotated key
and value are written at slot `tokens_seen % slots`, in place. readable (1, slots) bool: the slots the query
may read (written, inside the window, not padding); the new slot is read whatever it says, and set in place (it
holds a token from now on). tokens_seen: a 0-dim int64 tensor, tokens before this one (the caller counts it up).
position: (1, 1) int64, the token's RoPE position. inv_freq (head_dim / 2,) float32 and rope_scale: RoPE's
inverse frequencies and the attention scaling of its type (rotate-half layout, as the model's
`apply_rotary_pos_emb`). heads must be a multiple of kv_heads (grouped-query attention).

It computes what the model's attention computes for the token (`ring_decode_attention_ref`): RoPE on q and
k, the cache update, softmax(q K^T scale) V over the readable slots. The kernel splits the slots
between programs, each for one key/value head and its group of query heads (flash-decoding): it rotates
the query and the new key itself, reads its share of the ring (the new slot from registers, and writes it),
and leaves a partial softmax (max, sum, weighted values) for each query head of the group, from the keys and
values it loaded once. The last program of a key/value head to finish (a counter each program adds to) combines
its group's partials into the output: a separate combine kernel cost a launch of its own in the decode step's
chain (`finished`: the counts, kept by a caller that captures the call). Statistics in float32. No gradients.

Launched as a programmatic dependent (`dependent_launch`), the kernel reads its share of the rings before
it waits for the kernels ahead of it: the rings' writer (this kernel, at the tokens before) must have finished
when the kernel ahead began. In the decode engine's step it has: every step begins with ordinary launches.
"""

import torch
import triton
import triton.language as tl

from .._common import cdiv, dependent_launch, gdc_launch_dependents, gdc_wait, next_power_of_2, use_triton
from .naive import ring_decode_attention_ref

# Slots per program of the first kernel (one tile, no loop: samba-421m's 2048-slot window over 12 key/value heads
# gives 384 programs), and its warps: the fastest of the decode-attention case's sweep on the H200 (10.95 µs a call
# against 13.38 with four warps; benchmarks/results/kernels.md).
SPLIT_SLOTS = 64
WARPS = 2


@triton.jit
def _rotated(x_ptr, head, cos, sin, HALF: tl.constexpr):
    """The two halves of row `head` of x (head_dim = 2 HALF) after rotate-half RoPE, in float32."""
    half = tl.arange(0, HALF)
    first = tl.load(x_ptr + head * 2 * HALF + half).to(tl.float32)
    second = tl.load(x_ptr + head * 2 * HALF + HALF + half).to(tl.float32)
    return first * cos - second * sin, second * cos + first * sin


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
    finished_ptr,
    out_ptr,
    rope_scale,
    scale,
    slots,
    stride_kh,
    stride_ks,
    stride_vh,
    stride_vs,
    GROUP: tl.constexpr,
    HALF: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    kv_head, split = tl.program_id(0), tl.program_id(1)
    splits = tl.num_programs(1)
    slot = split * SPLIT + tl.arange(0, SPLIT)
    ring_mask = slot < slots
    half = tl.arange(0, HALF)
    dims = tl.arange(0, 2 * HALF)
    # The rings' slots, before the wait: only this kernel writes them, at earlier tokens, and a step begins with
    # ordinary launches (the engine's), so those writes have finished. The new token's slot is replaced below.
    key_rows_ptr = key_ring_ptr + kv_head * stride_kh + slot[:, None] * stride_ks
    key1_raw = tl.load(key_rows_ptr + half[None, :], mask=ring_mask[:, None], other=0.0)
    key2_raw = tl.load(key_rows_ptr + HALF + half[None, :], mask=ring_mask[:, None], other=0.0)
    value_rows_ptr = value_ring_ptr + kv_head * stride_vh + slot[:, None] * stride_vs
    values_raw = tl.load(value_rows_ptr + dims[None, :], mask=ring_mask[:, None], other=0.0)
    if PDL:  # q, k, v, the mask and the counters are written by the kernels before it
        gdc_launch_dependents()
        gdc_wait()
    angle = tl.load(position_ptr).to(tl.float32) * tl.load(inv_freq_ptr + half)
    cos, sin = tl.cos(angle) * rope_scale, tl.sin(angle) * rope_scale
    k1, k2 = _rotated(k_ptr, kv_head, cos, sin, HALF)  # the new key, rotated
    v_new = tl.load(v_ptr + kv_head * 2 * HALF + dims).to(tl.float32)
    new_slot = (tl.load(tokens_seen_ptr) % slots).to(tl.int32)
    is_new = slot == new_slot
    key1 = tl.where(is_new[:, None], k1[None, :], key1_raw.to(tl.float32))
    key2 = tl.where(is_new[:, None], k2[None, :], key2_raw.to(tl.float32))
    values = tl.where(is_new[:, None], v_new[None, :], values_raw.to(tl.float32))
    visible = ring_mask & ((tl.load(readable_ptr + slot, mask=ring_mask, other=0) != 0) | is_new)
    # Scores in base 2 (exp2 is the hardware's); the combine reads the maxima in the same base.
    scale2 = scale * 1.4426950408889634
    for member in range(GROUP):  # the group's query heads share the keys and values loaded above
        head = kv_head * GROUP + member
        q1, q2 = _rotated(q_ptr, head, cos * scale2, sin * scale2, HALF)
        scores = tl.sum(key1 * q1[None, :], axis=1) + tl.sum(key2 * q2[None, :], axis=1)
        scores = tl.where(visible, scores, float("-inf"))
        top = tl.max(scores, axis=0)
        shift = tl.where(top == float("-inf"), 0.0, top)  # no visible slot: weights 0, sum 0
        weights = tl.exp2(scores - shift)
        part = head * splits + split
        tl.store(part_max_ptr + part, top)
        tl.store(part_sum_ptr + part, tl.sum(weights, axis=0))
        tl.store(part_out_ptr + part * 2 * HALF + dims, tl.sum(weights[:, None] * values, axis=0))
    # The program whose slots hold the new one writes it; no other program reads that slot from the ring.
    if (new_slot >= split * SPLIT) & (new_slot < split * SPLIT + SPLIT):
        key_row_ptr = key_ring_ptr + kv_head * stride_kh + new_slot * stride_ks
        tl.store(key_row_ptr + half, k1.to(key_ring_ptr.dtype.element_ty))
        tl.store(key_row_ptr + HALF + half, k2.to(key_ring_ptr.dtype.element_ty))
        tl.store(
            value_ring_ptr + kv_head * stride_vh + new_slot * stride_vs + dims,
            v_new.to(value_ring_ptr.dtype.element_ty),
        )
        tl.store(readable_ptr + new_slot, 1)  # every layer's program of the slot stores the same
    # Every thread's partials are stored before the count (the barrier); the count's release and acquire order
    # them before the last program's loads, which bypass L1 (".cg"), where no stale line can be.
    tl.debug_barrier()
    if tl.atomic_add(finished_ptr + kv_head, 1, sem="acq_rel", scope="gpu") == splits - 1:
        tl.store(finished_ptr + kv_head, 0)  # ready for the next call (a CUDA graph replays this one)
        for member in range(GROUP):
            _combine(part_max_ptr, part_sum_ptr, part_out_ptr, out_ptr, kv_head * GROUP + member, splits,
                     2 * HALF, BLOCK_SPLITS)  # fmt: skip


@triton.jit
def _combine(part_max_ptr, part_sum_ptr, part_out_ptr, out_ptr, head, splits, HEAD_DIM: tl.constexpr,
             BLOCK_SPLITS: tl.constexpr):  # fmt: skip
    """out[head] = the softmax-weighted values of all the head's splits, from their partials."""
    split = tl.arange(0, BLOCK_SPLITS)
    split_mask = split < splits
    part = head * splits + split
    maxima = tl.load(part_max_ptr + part, mask=split_mask, other=float("-inf"), cache_modifier=".cg")
    weights = tl.where(split_mask, tl.exp2(maxima - tl.max(maxima, axis=0)), 0.0)
    sums = tl.load(part_sum_ptr + part, mask=split_mask, other=0.0, cache_modifier=".cg")
    total = tl.sum(weights * sums, axis=0)
    dims = tl.arange(0, HEAD_DIM)
    outs = tl.load(
        part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_mask[:, None], other=0.0,
        cache_modifier=".cg",
    )  # fmt: skip
    result = tl.sum(weights[:, None] * outs, axis=0) / total
    tl.store(out_ptr + head * HEAD_DIM + dims, result.to(out_ptr.dtype.element_ty))


def ring_decode_attention(
    q, k, v, key_ring, value_ring, readable, tokens_seen, position, inv_freq, rope_scale, scale, finished=None
):
    """One token's attention over a ring buffer (semantics: `ring_decode_attention_ref`; see the module docstring),
    without gradients: the Triton kernels where `use_triton(q)`, the reference elsewhere.

    Args:
        q (torch.Tensor): the token's query projection before RoPE, one row `[1, heads * head_dim]`.
        k, v (torch.Tensor): its key and value projections, `[1, kv_heads * head_dim]`; heads a multiple of
            kv_heads.
        key_ring, value_ring (torch.Tensor): `[1, kv_heads, slots, head_dim]`, contiguous along head_dim (a power
            of two); the rotated keys and the values of the last `slots` tokens, updated in place at slot
            `tokens_seen % slots`.
        readable (torch.Tensor): `[1, slots]` bool, the slots the query may read besides the new one; the new
            one is set, in place.
        tokens_seen (torch.Tensor): 0-dim int64, the tokens before this one.
        position (torch.Tensor): `[1, 1]` int64, the token's RoPE position.
        inv_freq (torch.Tensor): `[head_dim / 2]` float32, RoPE's inverse frequencies; rope_scale (float): its
            attention scaling.
        scale (float): the scores' scale.
        finished (torch.Tensor | None): `[kv_heads]` int32 zeros, the kernel's count of finished programs per
            key/value head, which its last program sets back to 0: a caller that captures the call in a CUDA graph
            keeps one (calls one after another on one stream may share it). None: a new one per call.

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
    if finished is None:
        finished = torch.zeros(kv_heads, dtype=torch.int32, device=q.device)
    elif finished.shape != (kv_heads,) or finished.dtype != torch.int32:
        raise ValueError(f"ring_decode_attention: finished must be ({kv_heads},) int32 zeros, got "
                         f"{tuple(finished.shape)} {finished.dtype}")  # fmt: skip
    return _launch(
        q, k, v, key_ring, value_ring, readable, tokens_seen, position, inv_freq, rope_scale, scale, finished
    )


def _launch(
    q, k, v, key_ring, value_ring, readable, tokens_seen, position, inv_freq, rope_scale, scale, finished,
    split_slots=SPLIT_SLOTS, num_warps=WARPS,
):  # fmt: skip
    """The kernel's launch (the tiling as arguments, for benchmarks/kernels.py's sweep)."""
    _, kv_heads, slots, head_dim = key_ring.shape
    heads = q.shape[-1] // head_dim
    splits = cdiv(slots, split_slots)
    part_max = q.new_empty(heads * splits, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_out = q.new_empty(heads * splits, head_dim, dtype=torch.float32)
    q, k, v = (t.reshape(-1).contiguous() for t in (q, k, v))
    out = q.new_empty(1, heads * head_dim)
    _partial_kernel[(kv_heads, splits)](
        q,
        k,
        v,
        key_ring,
        value_ring,
        readable.reshape(-1),
        tokens_seen,
        position,
        inv_freq.contiguous(),
        part_max,
        part_sum,
        part_out,
        finished,
        out,
        float(rope_scale),
        float(scale),
        slots,
        key_ring.stride(1),
        key_ring.stride(2),
        value_ring.stride(1),
        value_ring.stride(2),
        GROUP=heads // kv_heads,
        HALF=head_dim // 2,
        SPLIT=split_slots,
        BLOCK_SPLITS=next_power_of_2(splits),
        num_warps=num_warps,
        **dependent_launch(q),
    )
    return out
