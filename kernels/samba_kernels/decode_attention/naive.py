"""PyTorch reference of one token's sliding-window attention over a ring buffer of keys and values."""

import torch


def ring_decode_attention_ref(
    q, k, v, key_ring, value_ring, readable, tokens_seen, position, inv_freq, rope_scale, scale
):
    """What the model's attention computes for one token: RoPE on q and k, the ring's update and the new slot's
    readable flag (in place), and softmax(q K^T scale) V over the readable slots and the new one. Arguments and result: `ring_decode_attention`'s."""
    _, kv_heads, slots, head_dim = key_ring.shape
    heads = q.shape[-1] // head_dim
    angle = position.reshape(()).float() * inv_freq.float()
    cos, sin = torch.cat([angle.cos(), angle.cos()]) * rope_scale, torch.cat([angle.sin(), angle.sin()]) * rope_scale

    def rotate(x, n):
        x = x.reshape(n, head_dim).float()
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    # The slot as a tensor, never a Python int: the step stays one graph (compiled or captured) at every token.
    slot = torch.as_tensor(tokens_seen, device=q.device).reshape(1).long() % slots
    key_ring[0].index_copy_(1, slot, rotate(k, kv_heads).unsqueeze(1).to(key_ring.dtype))
    value_ring[0].index_copy_(1, slot, v.reshape(kv_heads, 1, head_dim).to(value_ring.dtype))
    readable[0].index_fill_(0, slot, True)
    visible = readable[0].bool()
    keys = key_ring[0].float().repeat_interleave(heads // kv_heads, dim=0)  # (heads, slots, head_dim)
    values = value_ring[0].float().repeat_interleave(heads // kv_heads, dim=0)
    scores = torch.einsum("hd,hsd->hs", rotate(q, heads), keys) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hs,hsd->hd", probs, values).reshape(1, heads * head_dim).to(q.dtype)
