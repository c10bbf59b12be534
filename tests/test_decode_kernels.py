"""The decode engine's one-row kernels against float64 references, in Triton's interpreter on the CPU:
norm-fused and residual-updating products, and one token's attention over a ring buffer."""

import pytest
import torch
import torch.nn.functional as F

import samba_kernels
from samba_kernels.decode_attention import ring_decode_attention_ref

pytestmark = pytest.mark.skipif(not samba_kernels.use_triton(torch.empty(0)), reason="TRITON_INTERPRET is off")


def randn(*shape, dtype=torch.float32, generator=None):
    return torch.randn(*shape, generator=generator).to(dtype)


def reference_norm(x, norm_weight, eps=1e-5):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_fused_products_match_float64(dtype):
    g = torch.Generator().manual_seed(0)
    x, norm_weight = randn(1, 1, 200, generator=g) * 3, 1 + 0.1 * randn(200, generator=g)
    q, k = randn(48, 200, dtype=dtype, generator=g), randn(24, 200, dtype=dtype, generator=g)
    gate, up = randn(40, 200, dtype=dtype, generator=g), randn(40, 200, dtype=dtype, generator=g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    normed = reference_norm(x, norm_weight.to(dtype))
    with torch.no_grad():
        out = samba_kernels.matvec(x, q, norm_weight=norm_weight.to(dtype))
        stacked = samba_kernels.stacked_matvec(x, [q, k], norm_weight=norm_weight.to(dtype))
        gated = samba_kernels.gated_matvec(x, gate, up, norm_weight=norm_weight.to(dtype))
    assert out.dtype == dtype and out.shape == (1, 1, 48)
    torch.testing.assert_close(out.double(), normed @ q.double().T, **tol)
    torch.testing.assert_close(stacked[1].double(), normed @ k.double().T, **tol)
    expected = F.silu(normed @ gate.double().T) * (normed @ up.double().T)
    torch.testing.assert_close(gated.double(), expected, **tol)


@pytest.mark.parametrize("bias", [False, True])
def test_matvec_add_updates_the_residual_in_place(bias):
    g = torch.Generator().manual_seed(1)
    residual, x = randn(1, 96, generator=g), randn(1, 130, dtype=torch.bfloat16, generator=g)
    w, b = randn(96, 130, dtype=torch.bfloat16, generator=g), randn(96, dtype=torch.bfloat16, generator=g)
    expected = residual.double() + x.double() @ w.double().T + (b.double() if bias else 0)
    with torch.no_grad():
        returned = samba_kernels.matvec_add_(residual, x, w, b if bias else None)
    assert returned is residual
    torch.testing.assert_close(residual.double(), expected, rtol=1e-4, atol=1e-4)


def rotated(x, position, inv_freq):
    angle = (position * inv_freq.float()).double()  # the angle in float32, as the model computes it
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    first, second = x.double().chunk(2, dim=-1)
    return x.double() * cos + torch.cat([-second, first], dim=-1) * sin


@pytest.mark.parametrize("heads, kv_heads, slots, tokens_seen", [(4, 2, 40, 17), (4, 4, 300, 1234), (6, 2, 64, 0)])
def test_ring_decode_attention_matches_float64_attention_over_the_window(heads, kv_heads, slots, tokens_seen):
    """The token's rotated key and value land at slot tokens_seen % slots; its query attends to the readable
    slots and itself; rotary embedding as the model applies it."""
    g = torch.Generator().manual_seed(heads * slots + tokens_seen)
    head_dim = 16
    q, k, v = (randn(1, n * head_dim, generator=g) for n in (heads, kv_heads, kv_heads))
    key_ring, value_ring = randn(1, kv_heads, slots, head_dim, generator=g), randn(1, kv_heads, slots, head_dim, generator=g)
    readable = torch.rand(1, slots, generator=g) < 0.7
    position, inv_freq = torch.tensor([[tokens_seen + 3]]), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    slot = tokens_seen % slots
    expected_keys, expected_values = key_ring.double().clone(), value_ring.double().clone()
    expected_keys[0, :, slot] = rotated(k.view(kv_heads, head_dim), tokens_seen + 3, inv_freq)
    expected_values[0, :, slot] = v.view(kv_heads, head_dim).double()
    visible = readable[0].clone()
    visible[slot] = True
    group = heads // kv_heads
    scores = torch.einsum("hd,hsd->hs", rotated(q.view(heads, head_dim), tokens_seen + 3, inv_freq),
                          expected_keys[0].repeat_interleave(group, 0)) * head_dim**-0.5  # fmt: skip
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    expected = torch.einsum("hs,hsd->hd", probs, expected_values[0].repeat_interleave(group, 0)).reshape(1, -1)
    for attention in (samba_kernels.ring_decode_attention, ring_decode_attention_ref):
        keys, values = key_ring.clone(), value_ring.clone()
        with torch.no_grad():
            out = attention(q, k, v, keys, values, readable, torch.tensor(tokens_seen), position, inv_freq, 1.0,
                            head_dim**-0.5)  # fmt: skip
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(keys.double(), expected_keys, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values.double(), expected_values)
