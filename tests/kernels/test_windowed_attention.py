"""Sliding-window attention (samba_kernels.windowed_attention) against an explicit per-query softmax."""

import pytest
import torch

import samba_kernels
from samba_kernels.windowed_attention import kernel as window_kernel

from .common import DEVICE, gen, randn


def _explicit_window_attention(q, k, v, window):
    """Softmax attention written out: query i (aligned to the end of the keys) sees keys j with
    0 <= pos(i) - j < window; kv heads shared by consecutive query heads."""
    lq, lk, rep = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // rep].double(), v[:, h // rep].double()
        for i in range(lq):
            pos = lk - lq + i
            lo = max(0, pos - window + 1)
            s = q[:, h, i : i + 1].double() @ kh[:, lo : pos + 1].transpose(-1, -2) / q.shape[-1] ** 0.5
            out[:, h, i] = (torch.softmax(s, dim=-1) @ vh[:, lo : pos + 1])[:, 0]
    return out


@pytest.mark.parametrize(
    "heads, kv_heads, len_q, len_kv, window", [(2, 2, 9, 9, 4), (4, 2, 5, 12, 3), (3, 1, 1, 7, 16)]
)
def test_windowed_attention_matches_explicit_softmax(heads, kv_heads, len_q, len_kv, window):
    g = gen(heads + len_q)
    q = randn(g, 2, heads, len_q, 16).requires_grad_()  # flex needs head_dim >= 16
    k, v = randn(g, 2, kv_heads, len_kv, 16).requires_grad_(), randn(g, 2, kv_heads, len_kv, 16).requires_grad_()
    out = samba_kernels.windowed_attention(q, k, v, window)
    ref = _explicit_window_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), window)
    torch.testing.assert_close(
        out.detach().cpu().double(),
        ref,
        rtol=1e-3 if DEVICE == "cuda" else 1e-5,
        atol=1e-3 if DEVICE == "cuda" else 1e-5,
    )
    # Gradients against the float64 autograd of the same explicit softmax.
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    dy = randn(g, *out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    grads_ref = torch.autograd.grad(
        _explicit_window_attention(q64, k64, v64, window), (q64, k64, v64), dy.cpu().double()
    )
    for gr, gr_ref in zip(grads, grads_ref):
        assert gr.shape == gr_ref.shape
        torch.testing.assert_close(
            gr.cpu().double(), gr_ref, rtol=2e-3 if DEVICE == "cuda" else 1e-5, atol=2e-3 if DEVICE == "cuda" else 1e-5
        )
    with pytest.raises(ValueError):
        samba_kernels.windowed_attention(q, k, v, 0)


@pytest.mark.parametrize(
    "heads, kv_heads, len_q, len_kv, window, head_dim, memory",
    [
        (2, 1, 400, 400, 300, 16, "contiguous"),  # a tile's keys in the unmasked bulk, trailing edge, diagonal
        (2, 2, 70, 333, 200, 32, "contiguous"),  # a chunk continuing cached keys
        (2, 2, 70, 333, 200, 32, "model's"),  # the same, (batch, tokens, heads, head_dim) memory as the prefill's
        (4, 2, 130, 130, 5, 16, "contiguous"),  # a window narrower than a tile of keys
        (1, 1, 1, 50, 64, 16, "contiguous"),  # one query
    ],
)
def test_windowed_attention_forward_kernel(monkeypatch, heads, kv_heads, len_q, len_kv, window, head_dim, memory):
    """Without gradients the op runs its own Triton forward (never flex nor the reference), on inputs of either
    memory layout (the chunked prefill's joined keys are laid out as the model's projections)."""
    module = window_kernel

    def other_path(*args, **kwargs):
        raise AssertionError("the forward kernel should have run")

    monkeypatch.setattr(module, "windowed_attention_ref", other_path)
    monkeypatch.setattr(module, "_compiled_flex", other_path)
    g = gen(len_q + window)

    def inputs(heads, length):
        if memory == "model's":
            return randn(g, 2, length, heads, head_dim).transpose(1, 2)
        return randn(g, 2, heads, length, head_dim)

    q, k, v = inputs(heads, len_q), inputs(kv_heads, len_kv), inputs(kv_heads, len_kv)
    with torch.no_grad():
        out = samba_kernels.windowed_attention(q, k, v, window)
    ref = _explicit_window_attention(q.cpu(), k.cpu(), v.cpu(), window)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def test_windowed_attention_head_dim_without_a_kernel_tile():
    """A head_dim that is not a power of two has no tile of the forward kernel: flex or the reference
    answer instead, exactly."""
    g = gen(5)
    q, k, v = (randn(g, 1, 2, 140, 24) for _ in range(3))
    with torch.no_grad():
        out = samba_kernels.windowed_attention(q, k, v, 50)
    ref = _explicit_window_attention(q.cpu(), k.cpu(), v.cpu(), 50)
    torch.testing.assert_close(
        out.cpu().double(), ref, rtol=1e-3 if DEVICE == "cuda" else 1e-5, atol=1e-3 if DEVICE == "cuda" else 1e-5
    )


def test_windowed_attention_forward_kernel_only_takes_int32_offsets():
    """The kernel's offsets within a batch entry are int32: a tensor reaching past 2**31 elements
    (a million tokens of 16 heads x 128 in one piece) goes to the other path. Shapes only (meta)."""
    module = window_kernel
    fits = module._offsets_fit_int32
    assert fits(torch.empty(8, 16, 65536, 128, device="meta"))  # the batch offset is int64 in the kernel
    assert not fits(torch.empty(1, 16, 2**20 + 1, 128, device="meta"))
    # the model's layout: (batch, length, heads, head_dim) memory seen as (batch, heads, length, head_dim)
    assert fits(torch.empty(1, 2**20, 16, 128, device="meta").transpose(1, 2))
    assert not fits(torch.empty(1, 2**20 + 1, 16, 128, device="meta").transpose(1, 2))
    # a strided head_dim is made contiguous before the launch: the copy's offsets count
    assert not fits(torch.empty((), device="meta").expand(1, 16, 2**20 + 1, 128))  # broadcast: all strides 0
    assert fits(torch.empty(1, 16, 128, 2**20, device="meta").transpose(2, 3))


def test_windowed_attention_forward_kernel_traces_into_a_graph():
    """Inside torch.compile(fullgraph=True) the forward kernel is one custom op, whose fake output
    (shape and layout) matches the real one."""
    g = gen(3)
    # (batch, len, heads, head_dim) memory seen as (batch, heads, len, head_dim), as the model passes it
    q, k, v = (randn(g, 2, 150, 2, 16).transpose(1, 2) for _ in range(3))
    compiled = torch.compile(
        lambda q, k, v: samba_kernels.windowed_attention(q, k, v, 40), fullgraph=True, backend="aot_eager"
    )
    with torch.no_grad():
        out = compiled(q, k, v)
    assert out.stride() == q.stride()
    ref = _explicit_window_attention(q.cpu(), k.cpu(), v.cpu(), 40)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="flex_attention runs on CUDA only")
def test_windowed_attention_flex_matches_reference_bf16():
    g = gen(7)
    q = randn(g, 2, 4, 300, 64).to(torch.bfloat16).requires_grad_()
    k, v = (randn(g, 2, 2, 520, 64).to(torch.bfloat16).requires_grad_() for _ in range(2))
    out = samba_kernels.windowed_attention(q, k, v, 128)
    ref = samba_kernels.windowed_attention_ref(q, k, v, 128)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    dy = torch.randn_like(out)
    for gr, gr_ref in zip(torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy)):
        torch.testing.assert_close(gr.float(), gr_ref.float(), rtol=5e-2, atol=5e-2)


def test_compiled_flex_serves_prompts_of_any_length_with_two_compilations():
    """The CUDA path's compiled flex_attention, run here through inductor's CPU backend: a compilation
    per length would hit dynamo's recompile limit after eight lengths of chunked prefill and fall
    back to flex's unfused path (the whole score matrix in memory). It compiles for the first length
    and once more for symbolic lengths, first chunks and continued ones alike, and stays exact
    against the explicit softmax."""
    from torch._dynamo.utils import counters

    from samba_kernels.windowed_attention.kernel import _block_mask, _compiled_flex

    torch._dynamo.reset()
    counters.clear()
    window, g = 64, gen(11)
    for len_q, continued in ((128, False), (256, False), (200, True), (384, True)):
        len_kv = len_q + window - 1 if continued else len_q  # a first chunk, or one continuing cached keys
        q, k, v = (randn(g, 1, 2, n, 16).cpu() for n in (len_q, len_kv, len_kv))
        out = _compiled_flex()(q, k, v, block_mask=_block_mask(len_q, len_kv, window, "cpu"))
        torch.testing.assert_close(out.double(), _explicit_window_attention(q, k, v, window), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] <= 2


def _packed_rows(g, batch, length, heads, kv_heads, head_dim=16):
    """q, k, v of rows of packed documents and their seq_idx: documents of random lengths, starts differing
    between rows."""
    q = randn(g, batch, heads, length, head_dim).requires_grad_()
    k = randn(g, batch, kv_heads, length, head_dim).requires_grad_()
    v = randn(g, batch, kv_heads, length, head_dim).requires_grad_()
    starts = torch.rand(batch, length, generator=g, device=DEVICE) < 0.08
    starts[:, 0] = False
    return q, k, v, starts.cumsum(dim=1).to(torch.int32)


@pytest.mark.parametrize("heads, kv_heads, length, window", [(2, 2, 40, 6), (4, 2, 33, 50)])
def test_windowed_attention_over_packed_documents_equals_each_document_alone(heads, kv_heads, length, window):
    """With seq_idx, each document's output and gradients are those of the document attended alone."""
    g = gen(length + window)
    q, k, v, seq_idx = _packed_rows(g, 2, length, heads, kv_heads)
    out = samba_kernels.windowed_attention(q, k, v, window, seq_idx=seq_idx)
    grad = randn(g, *out.shape)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    for b in range(2):
        for document in seq_idx[b].unique():
            span = (seq_idx[b] == document).nonzero()[:, 0]
            piece = slice(int(span[0]), int(span[-1]) + 1)
            alone = [x[b : b + 1, :, piece].detach().requires_grad_() for x in (q, k, v)]
            out_alone = samba_kernels.windowed_attention(*alone, window)
            torch.testing.assert_close(out[b : b + 1, :, piece], out_alone)
            grads_alone = torch.autograd.grad(out_alone, alone, grad[b : b + 1, :, piece])
            for full, one in zip((dq, dk, dv), grads_alone):
                torch.testing.assert_close(full[b : b + 1, :, piece], one)


def test_windowed_attention_refuses_documents_that_continue_cached_keys():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="packed documents cannot continue cached keys"):
        samba_kernels.windowed_attention(q, k, k, 4, seq_idx=torch.zeros(1, 9, dtype=torch.int32))


@pytest.mark.parametrize("length, window", [(300, 100), (700, 128), (520, 300)])
def test_document_block_mask_lists_the_windows_band_of_blocks(length, window):
    """The band built from block indices lists exactly the blocks create_block_mask finds for the window alone
    (it evaluates the mask at every pair: the independent account), none of them full (a document may start
    inside any), and flex with it equals the reference (unfused flex on the CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g = gen(length)
    q, k, v, seq_idx = (x.detach().cpu() for x in _packed_rows(g, 1, length, 2, 2))
    mask = window_kernel._document_block_mask(seq_idx, window)
    window_alone = create_block_mask(
        lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < window), 1, None, length, length, "cpu"
    )
    assert mask.full_kv_num_blocks is None
    torch.testing.assert_close(mask.to_dense(), window_alone.to_dense())
    out = flex_attention(q, k, v, block_mask=mask)
    torch.testing.assert_close(out, samba_kernels.windowed_attention_ref(q, k, v, window, seq_idx=seq_idx))
