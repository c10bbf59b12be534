"""The one-row products (samba_kernels.matvec) against float64 products: plain, stacked, gated, RMS-norm-fused
and residual-updating; and their dependent launches."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import samba_kernels
from samba_kernels import _common
from samba_kernels.matvec import kernel as matvec_kernel

from .common import DEVICE, TOL, gen, randn


@pytest.mark.parametrize(
    "N, K, bias, dtype",
    [(37, 100, True, torch.float32), (1030, 5, False, torch.float32), (130, 2500, True, torch.bfloat16)],
)
def test_matvec_matches_a_float64_product(N, K, bias, dtype):
    g = gen(13)
    x, w = randn(g, 1, 1, K).to(dtype), randn(g, N, K).to(dtype)
    b = randn(g, N).to(dtype) if bias else None
    with torch.no_grad():
        out = samba_kernels.matvec(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == (1, 1, N) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), ref, **tol)


def test_one_row_kernels_launch_as_dependents_only_where_inductor_does_on_sm90(monkeypatch):
    """PDL follows torch.compile's switch, on CUDA devices of compute capability 9 or more, never in the
    interpreter or before Triton 3.4 (the launch itself is checked on the H200: benchmarks/generate.md)."""
    from torch._inductor import config

    common = _common
    on_gpu = SimpleNamespace(is_cuda=True, device=0)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[0])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    serial = {"PDL": False}  # without launch_pdl, which Triton before 3.4 refuses
    # torch's own patch: monkeypatch's undo would leave the config without the option for the tests after
    with config.patch({"triton.enable_pdl": False}):
        assert common.dependent_launch(on_gpu) == serial
    with config.patch({"triton.enable_pdl": True}):
        assert common.dependent_launch(on_gpu) == {"PDL": True, "launch_pdl": True}
        capability[0] = (8, 0)
        assert common.dependent_launch(on_gpu) == serial
        capability[0] = (9, 0)
        assert common.dependent_launch(torch.zeros(1)) == serial
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert common.dependent_launch(on_gpu) == serial
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(common, "gdc_wait", None)  # Triton before 3.4
        assert common.dependent_launch(on_gpu) == serial


def test_matvec_reads_a_strided_row_and_traces_into_a_graph():
    """A row whose elements are strided (a transposed slice, as the Mamba mixer's x_proj input behind the
    PyTorch decode ops), inside torch.compile(fullgraph=True): one custom op, the fake output's shape,
    F.linear's values; the stacked and gated products read it too."""
    g = gen(14)
    x, w, b = randn(g, 1, 24, 3)[:, :, -1:].transpose(1, 2), randn(g, 10, 24), randn(g, 10)
    assert x.reshape(-1).stride() == (3,)
    with torch.no_grad():
        torch.testing.assert_close(
            samba_kernels.stacked_matvec(x, [w, b[:, None] * w])[1], F.linear(x, b[:, None] * w), **TOL
        )
        torch.testing.assert_close(samba_kernels.gated_matvec(x, w, w), F.silu(F.linear(x, w)) * F.linear(x, w), **TOL)
    compiled = torch.compile(samba_kernels.matvec, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b), **TOL)
    op = matvec_kernel._matvec
    for args in ((x, [w], b, False), (x, [w, w[:3]], None, False), (x, [w, w], None, True)):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


# The rows of one to three weights of odd sizes (the last ones straddling a program's rows), in one launch
@pytest.mark.parametrize("rows", [(37,), (40, 3), (130, 24, 24)])
def test_stacked_matvec_matches_float64_products(rows):
    g = gen(15)
    x, weights = randn(g, 1, 1, 2500), [randn(g, n, 2500) for n in rows]
    with torch.no_grad():
        outs = samba_kernels.stacked_matvec(x, weights)
    assert [o.shape for o in outs] == [(1, 1, n) for n in rows]
    for out, w in zip(outs, weights):
        torch.testing.assert_close(out.double(), F.linear(x.double(), w.double()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_matvec_matches_a_float64_swiglu_half(dtype):
    g = gen(16)
    x, gate, up = randn(g, 1, 1, 300).to(dtype), randn(g, 257, 300).to(dtype), randn(g, 257, 300).to(dtype)
    with torch.no_grad():
        out = samba_kernels.gated_matvec(x, gate, up)
    ref = F.silu(F.linear(x.double(), gate.double())) * F.linear(x.double(), up.double())
    assert out.shape == (1, 1, 257) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.double(), ref, **tol)


def test_matvec_refuses_what_it_cannot_do():
    w = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        samba_kernels.matvec(torch.zeros(2, 4, device=DEVICE), w)
    with pytest.raises(ValueError, match="does not match"):
        samba_kernels.matvec(torch.zeros(1, 5, device=DEVICE), w)
    with pytest.raises(ValueError, match="no backward"):
        samba_kernels.matvec(torch.zeros(1, 4, device=DEVICE), w.requires_grad_())
    with torch.no_grad():
        with pytest.raises(ValueError, match="one to three"):
            samba_kernels.stacked_matvec(torch.zeros(1, 4, device=DEVICE), [w] * 4)
        with pytest.raises(ValueError, match="same shape"):
            samba_kernels.gated_matvec(torch.zeros(1, 4, device=DEVICE), w, w[:2])
        with pytest.raises(ValueError, match="does not match"):
            samba_kernels.stacked_matvec(torch.zeros(1, 4, device=DEVICE), [w, torch.zeros(3, 5, device=DEVICE)])


def test_a_norm_fused_product_refuses_to_be_traced_whole():
    """The norm-fused variants have no custom op: a whole-graph trace gets the refusal, not a wrong graph."""
    w, norm_weight = torch.zeros(3, 4, device=DEVICE), torch.ones(4, device=DEVICE)
    traced = torch.compile(
        lambda x: samba_kernels.matvec(x, w, norm_weight=norm_weight), fullgraph=True, backend="eager"
    )
    with torch.no_grad(), pytest.raises(Exception, match="runs eagerly only"):
        traced(torch.zeros(1, 4, device=DEVICE))


def reference_norm(x, norm_weight, eps=1e-5):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_fused_products_match_float64(dtype):
    g = gen(30)
    x, norm_weight = randn(g, 1, 1, 200) * 3, 1 + 0.1 * randn(g, 200)
    q, k, gate, up = (randn(g, rows, 200).to(dtype) for rows in (48, 24, 40, 40))
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
    g = gen(31)
    residual, x = randn(g, 1, 96), randn(g, 1, 130).to(torch.bfloat16)
    w, b = randn(g, 96, 130).to(torch.bfloat16), randn(g, 96).to(torch.bfloat16)
    expected = residual.double() + x.double() @ w.double().T + (b.double() if bias else 0)
    with torch.no_grad():
        returned = samba_kernels.matvec_add_(residual, x, w, b if bias else None)
    assert returned is residual
    torch.testing.assert_close(residual.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("programs", [1, 3, 64])
def test_every_kind_of_product_walks_its_row_tiles_and_column_blocks(monkeypatch, programs):
    """Narrow column blocks (K = 200 in four blocks of 64, the last partial) and few programs (each walking several
    tiles of rows, the last tile partial), or more programs than tiles: plain, stacked, gated, norm-fused and
    residual products against float64."""
    monkeypatch.setattr(matvec_kernel, "MAX_BLOCK_K", 64)
    monkeypatch.setattr(matvec_kernel, "INTERPRETER_PROGRAMS", programs)
    if DEVICE == "cuda":
        monkeypatch.setattr(matvec_kernel, "PROGRAMS_PER_SM", 1)
    g = gen(32 + programs)
    x, norm_weight, bias = randn(g, 1, 200), 1 + 0.1 * randn(g, 200), randn(g, 37)
    w, k, gate, up = (randn(g, rows, 200) for rows in (37, 6, 29, 29))
    normed = reference_norm(x, norm_weight)
    residual = randn(g, 1, 37)
    expected_residual = residual.double() + x.double() @ w.double().T
    tol = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(samba_kernels.matvec(x, w, bias).double(), F.linear(x, w, bias).double(), **tol)
        stacked = samba_kernels.stacked_matvec(x, [w, k], norm_weight=norm_weight)
        gated = samba_kernels.gated_matvec(x, gate, up, norm_weight=norm_weight)
        samba_kernels.matvec_add_(residual, x, w)
    torch.testing.assert_close(stacked[0].double(), normed @ w.double().T, **tol)
    torch.testing.assert_close(stacked[1].double(), normed @ k.double().T, **tol)
    expected_gated = F.silu(normed @ gate.double().T) * (normed @ up.double().T)
    torch.testing.assert_close(gated.double(), expected_gated, rtol=1e-4, atol=1e-4)  # a product of two sums
    torch.testing.assert_close(residual.double(), expected_residual, **tol)
