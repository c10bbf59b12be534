"""One token's attention over a ring buffer (samba_kernels.decode_attention) against float64 attention over the
window, rotary embedding applied as the model applies it."""

import pytest
import torch

import samba_kernels
from samba_kernels.decode_attention import ring_decode_attention_ref

from .common import DEVICE


def randn(*shape, generator=None):
    return torch.randn(*shape, generator=generator)


def rotated(x, position, inv_freq):
    angle = (position * inv_freq.float()).double()  # the angle in float32, as the model computes it
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    first, second = x.double().chunk(2, dim=-1)
    return x.double() * cos + torch.cat([-second, first], dim=-1) * sin


@pytest.mark.parametrize(
    "heads, kv_heads, slots, tokens_seen", [(4, 2, 40, 17), (4, 4, 300, 1234), (6, 2, 64, 0), (6, 2, 200, 777)]
)
def test_ring_decode_attention_matches_float64_attention_over_the_window(heads, kv_heads, slots, tokens_seen):
    """The token's rotated key and value land at slot tokens_seen % slots, which becomes readable; its query
    attends to the readable slots and itself; rotary embedding as the model applies it."""
    g = torch.Generator().manual_seed(heads * slots + tokens_seen)
    head_dim = 16
    q, k, v = (randn(1, n * head_dim, generator=g) for n in (heads, kv_heads, kv_heads))
    key_ring, value_ring = (
        randn(1, kv_heads, slots, head_dim, generator=g),
        randn(1, kv_heads, slots, head_dim, generator=g),
    )
    readable = torch.rand(1, slots, generator=g) < 0.7
    position, inv_freq = torch.tensor([[tokens_seen + 3]]), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    slot = tokens_seen % slots
    expected_keys, expected_values = key_ring.double().clone(), value_ring.double().clone()
    expected_keys[0, :, slot] = rotated(k.view(kv_heads, head_dim), tokens_seen + 3, inv_freq)
    expected_values[0, :, slot] = v.view(kv_heads, head_dim).double()
    visible = readable[0].clone()
    visible[slot] = True
    group = heads // kv_heads
    scores = (
        torch.einsum(
            "hd,hsd->hs",
            rotated(q.view(heads, head_dim), tokens_seen + 3, inv_freq),
            expected_keys[0].repeat_interleave(group, 0),
        )
        * head_dim**-0.5
    )
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    expected = torch.einsum("hs,hsd->hd", probs, expected_values[0].repeat_interleave(group, 0)).reshape(1, -1)
    for attention in (samba_kernels.ring_decode_attention, ring_decode_attention_ref):
        keys, values = key_ring.clone().to(DEVICE), value_ring.clone().to(DEVICE)
        token = [t.to(DEVICE) for t in (q, k, v)]
        where = [t.clone().to(DEVICE) for t in (readable, torch.tensor(tokens_seen), position, inv_freq)]
        with torch.no_grad():
            out = attention(*token, keys, values, *where, 1.0, head_dim**-0.5)
        torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(keys.double().cpu(), expected_keys, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values.double().cpu(), expected_values)
        assert torch.equal(where[0][0].cpu(), visible), attention  # the new slot is readable from now on


def test_a_kept_count_of_finished_programs_serves_call_after_call():
    """The last program of each key/value head combines its partials and sets the count back to 0, so one count
    serves every call (a captured step keeps one): calls after the first give the reference's output too."""
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, slots, head_dim = 4, 2, 200, 16  # 4 programs per key/value head
    rings = [randn(1, kv_heads, slots, head_dim, generator=g) for _ in range(2)]
    readable = torch.ones(1, slots, dtype=torch.bool)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    finished = torch.zeros(kv_heads, dtype=torch.int32, device=DEVICE)
    kernel_rings, reference_rings = [r.clone().to(DEVICE) for r in rings], [r.clone() for r in rings]
    for seen in range(slots, slots + 3):
        token = [randn(1, n * head_dim, generator=g) for n in (heads, kv_heads, kv_heads)]
        where = (readable, torch.tensor(seen), torch.tensor([[seen]]), inv_freq, 1.0, head_dim**-0.5)
        with torch.no_grad():
            out = samba_kernels.ring_decode_attention(
                *(t.to(DEVICE) for t in token), *kernel_rings, *(w.to(DEVICE) if torch.is_tensor(w) else w for w in where),
                finished,
            )  # fmt: skip
            expected = ring_decode_attention_ref(*token, *reference_rings, *where)
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
        assert finished.tolist() == [0, 0]
    with pytest.raises(ValueError, match="finished"):
        samba_kernels.ring_decode_attention(
            *(t.to(DEVICE) for t in token), *kernel_rings, *(w.to(DEVICE) if torch.is_tensor(w) else w for w in where),
            torch.zeros(kv_heads, device=DEVICE),
        )  # fmt: skip
