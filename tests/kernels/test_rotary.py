"""Rotary embeddings (samba_kernels.rotary) against an independent float64 rotation, forward and gradients, on the
model's transposed layout and others; the errors, the outputs' layout and the paths that take the reference."""

import math

import pytest
import torch

import samba_kernels
from samba_kernels.rotary import kernel as rotary_kernel

from .common import DEVICE, forbid_kernels_on_the_cpu, gen, randn

F32, BF16 = torch.float32, torch.bfloat16
# One rounding of a float32 result to bf16: within one ulp, 2**-7 of the value (half that on a GPU, which rounds to
# nearest; Triton's interpreter truncates).
ONE_ROUNDING = {F32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=2**-7, atol=1e-5)}


def cos_sin(g, kind, cos_batch, length, head_dim, dtype):
    """cos and sin (cos_batch, length, head_dim) in `dtype`, of float64 angles: "rope", positions (shifted per batch
    row) x inverse frequencies, the same in both halves as the model's; "random", a random angle per element, so
    the halves differ (the kernel must not assume they are equal)."""
    if kind == "rope":
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        positions = torch.arange(length, dtype=torch.float64) + 5.0 * torch.arange(cos_batch)[:, None]
        freqs = positions[..., None] * inv_freq
        theta = torch.cat((freqs, freqs), dim=-1)
    else:
        theta = torch.rand(cos_batch, length, head_dim, generator=g, dtype=torch.float64) * 2 * math.pi
    return theta.cos().to(dtype).to(DEVICE), theta.sin().to(dtype).to(DEVICE)


def rotated(x, cos, sin):
    """x (batch, heads, length, head_dim) rotated in float64, written out per half: with h = head_dim / 2,
    out[i] = x[i] cos[i] - x[i + h] sin[i] and out[i + h] = x[i + h] cos[i + h] + x[i] sin[i + h]."""
    x, c, s = x.double(), cos.double()[:, None], sin.double()[:, None]
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * c[..., :h] - x2 * s[..., :h], x2 * c[..., h:] + x1 * s[..., h:]), dim=-1)


def queries_and_keys(g, layout, batch, heads, kv_heads, length, head_dim, dtype):
    """q (batch, heads, length, head_dim) and k (batch, kv_heads, ...) in one of the layouts the op takes:
    "transposed", views of (batch, length, heads, head_dim) projections (the model's); "contiguous"; "fused", views
    of one (batch, length, (heads + kv_heads) x head_dim) projection; "strided", a last dimension of stride 2."""
    if layout == "transposed":
        q = randn(g, batch, length, heads, head_dim).transpose(1, 2)
        k = randn(g, batch, length, kv_heads, head_dim).transpose(1, 2)
    elif layout == "contiguous":
        q, k = randn(g, batch, heads, length, head_dim), randn(g, batch, kv_heads, length, head_dim)
    elif layout == "fused":
        qk = randn(g, batch, length, heads + kv_heads, head_dim).transpose(1, 2)
        q, k = qk[:, :heads], qk[:, heads:]
    else:
        q = randn(g, batch, heads, length, 2 * head_dim)[..., ::2]
        k = randn(g, batch, kv_heads, length, 2 * head_dim)[..., ::2]
    return q.to(dtype), k.to(dtype)


CASES = {
    # name: (batch, heads, kv_heads, length, head_dim, cos_batch, layout, dtype, cos dtype, angles)
    "model-layout": (2, 4, 2, 7, 16, 1, "transposed", F32, F32, "rope"),
    "cos-per-batch": (2, 4, 2, 33, 16, 2, "transposed", F32, F32, "random"),
    "contiguous-head-24": (1, 3, 1, 33, 24, 1, "contiguous", F32, F32, "random"),
    "fused-qkv": (2, 4, 2, 7, 24, 2, "fused", F32, F32, "rope"),
    "strided-last-dim": (1, 2, 2, 5, 16, 1, "strided", F32, F32, "random"),
    "two-token-blocks": (1, 2, 1, 300, 16, 1, "transposed", F32, F32, "rope"),  # BLOCK_L 256 at head_dim 16
    "bf16-model-layout": (2, 4, 2, 33, 16, 1, "transposed", BF16, BF16, "random"),
    "bf16-contiguous-head-24": (2, 4, 2, 7, 24, 2, "contiguous", BF16, BF16, "rope"),
    "bf16-float32-cos": (1, 4, 2, 7, 16, 1, "transposed", BF16, F32, "random"),
}


@pytest.mark.parametrize("case", CASES)
def test_rotary_embedding_matches_a_float64_rotation(case):
    batch, heads, kv_heads, length, head_dim, cos_batch, layout, dtype, cos_dtype, angles = CASES[case]
    g = gen(len(case))
    q, k = queries_and_keys(g, layout, batch, heads, kv_heads, length, head_dim, dtype)
    cos, sin = cos_sin(g, angles, cos_batch, length, head_dim, cos_dtype)
    q_out, k_out = samba_kernels.rotary_embedding(q, k, cos, sin)
    for out, x in ((q_out, q), (k_out, k)):
        assert out.shape == x.shape and out.dtype == dtype
        torch.testing.assert_close(out.double(), rotated(x, cos, sin), **ONE_ROUNDING[dtype])


@pytest.mark.parametrize(
    "layout, dtype, cos_batch", [("transposed", F32, 1), ("contiguous", F32, 2), ("transposed", BF16, 2)]
)
def test_rotary_embedding_gradients_match_float64_autograd(layout, dtype, cos_batch):
    g = gen(7)
    batch, heads, kv_heads, length, head_dim = 2, 4, 2, 33, 24
    q, k = queries_and_keys(g, layout, batch, heads, kv_heads, length, head_dim, dtype)
    q, k = q.requires_grad_(), k.requires_grad_()
    cos, sin = cos_sin(g, "random", cos_batch, length, head_dim, dtype)
    outs = samba_kernels.rotary_embedding(q, k, cos, sin)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    outs64 = rotated(q64, cos, sin), rotated(k64, cos, sin)
    cotangents = [randn(g, *o.shape).to(dtype) for o in outs]  # contiguous: strided in the kernel's token-major view
    grads = torch.autograd.grad(outs, (q, k), cotangents)
    grads64 = torch.autograd.grad(outs64, (q64, k64), [c.double() for c in cotangents])
    for gr, gr64, x in zip(grads, grads64, (q, k)):
        assert gr.shape == x.shape and gr.dtype == dtype
        torch.testing.assert_close(gr.double(), gr64, **ONE_ROUNDING[dtype])


def test_rotary_embedding_gradient_of_q_alone():
    g = gen(8)
    q, k = queries_and_keys(g, "transposed", 1, 2, 1, 9, 16, F32)
    q.requires_grad_()
    cos, sin = cos_sin(g, "random", 1, 9, 16, F32)
    q_out, _ = samba_kernels.rotary_embedding(q, k, cos, sin)
    cotangent = randn(g, *q_out.shape)
    (grad,) = torch.autograd.grad(q_out, q, cotangent)
    q64 = q.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(rotated(q64, cos, sin), q64, cotangent.double())
    torch.testing.assert_close(grad.double(), grad64, **ONE_ROUNDING[F32])


def test_reference_matches_a_float64_rotation():
    g = gen(9)
    q, k = queries_and_keys(g, "transposed", 2, 4, 2, 7, 24, torch.float64)
    cos, sin = cos_sin(g, "random", 2, 7, 24, torch.float64)
    for out, x in zip(samba_kernels.rotary_embedding_ref(q, k, cos, sin), (q, k)):
        torch.testing.assert_close(out, rotated(x, cos, sin), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
def test_outputs_are_transposed_views_of_token_major_tensors(layout):
    g = gen(10)
    q, k = queries_and_keys(g, layout, 2, 4, 2, 5, 16, F32)
    cos, sin = cos_sin(g, "rope", 1, 5, 16, F32)
    q_out, k_out = samba_kernels.rotary_embedding(q, k, cos, sin)
    assert q_out.transpose(1, 2).is_contiguous() and k_out.transpose(1, 2).is_contiguous()
    empty = samba_kernels.rotary_embedding(q[:, :, :0], k[:, :, :0], cos[:, :0], sin[:, :0])
    assert [e.shape for e in empty] == [(2, 4, 0, 16), (2, 2, 0, 16)]


def test_cos_requiring_grad_is_refused():
    g = gen(11)
    q, k = queries_and_keys(g, "transposed", 1, 2, 1, 5, 16, F32)
    cos, sin = cos_sin(g, "rope", 1, 5, 16, F32)
    with pytest.raises(ValueError, match="no gradient for cos and sin.*rotary_embedding_ref"):
        samba_kernels.rotary_embedding(q, k, cos.requires_grad_(), sin)
    with torch.no_grad():  # no gradient asked for: the kernel runs
        samba_kernels.rotary_embedding(q, k, cos, sin)


@pytest.mark.parametrize(
    "q_shape, k_shape, cos_shape, match",
    [
        ((1, 2, 5, 15), (1, 1, 5, 15), (1, 5, 15), "even"),
        ((1, 2, 5, 16), (1, 1, 6, 16), (1, 5, 16), "agree"),
        ((2, 2, 5, 16), (1, 1, 5, 16), (1, 5, 16), "agree"),
        ((1, 2, 5, 16), (1, 1, 5, 8), (1, 5, 16), "agree"),
        ((2, 2, 5, 16), (2, 1, 5, 16), (3, 5, 16), "cos"),
        ((1, 2, 5, 16), (1, 1, 5, 16), (5, 16), "cos"),
        ((2, 5, 16), (2, 5, 16), (5, 16), "batch, heads, length, head_dim"),
    ],
)
def test_bad_shapes_are_refused(q_shape, k_shape, cos_shape, match):
    q, k = torch.zeros(q_shape, device=DEVICE), torch.zeros(k_shape, device=DEVICE)
    cos = torch.zeros(cos_shape, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        samba_kernels.rotary_embedding(q, k, cos, cos)


@pytest.mark.parametrize("path", ["cpu-without-interpreter", "torch.compile"])
def test_reference_paths_launch_no_kernel(monkeypatch, path):
    if path == "cpu-without-interpreter":
        forbid_kernels_on_the_cpu(monkeypatch, rotary_kernel, "_rotate")
        device = "cpu"
    else:
        monkeypatch.setattr(rotary_kernel, "_rotate", lambda *args: pytest.fail("a kernel was launched"))
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        device = DEVICE
    g = gen(12)
    q, k = queries_and_keys(g, "transposed", 1, 2, 1, 5, 16, F32)
    cos, sin = cos_sin(g, "rope", 1, 5, 16, F32)
    q, k, cos, sin = (t.to(device) for t in (q, k, cos, sin))
    outs = samba_kernels.rotary_embedding(q, k, cos.requires_grad_(), sin)  # the reference has cos's gradient
    for out, ref in zip(outs, samba_kernels.rotary_embedding_ref(q, k, cos, sin)):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
