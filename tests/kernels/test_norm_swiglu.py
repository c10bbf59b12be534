"""RMSNorm, SwiGLU and the float32 residual add (samba_kernels.norm_swiglu) against float64 computations, in float32 and bf16, at odd sizes and
strides; the paths that take the references (gradients recorded, torch.compile, CPU tensors without the
interpreter), and the errors."""

import pytest
import torch

import samba_kernels
from samba_kernels.norm_swiglu import kernel as norm_swiglu_kernel

from .common import DEVICE, gen, randn

F32, BF16 = torch.float32, torch.bfloat16
# One rounding of a float32 result: within one ulp of the output dtype (Triton's interpreter truncates to bf16).
ONE_ROUNDING = {F32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=2**-7, atol=1e-5)}


def rms_norm_float64(x, weight, eps):
    x, weight = x.double(), weight.double()
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize(
    "shape, in_dtype, out_dtype, strided",
    [
        ((3, 5, 24), F32, F32, False),
        ((2, 7, 40), F32, BF16, False),  # the float32 residual stream into bf16 layers; hidden not a power of two
        ((9, 16), BF16, BF16, False),
        ((4, 6, 40), F32, BF16, True),  # rows of a larger tensor
        ((0, 24), F32, F32, False),
    ],
)
def test_rms_norm_matches_float64(shape, in_dtype, out_dtype, strided):
    g = gen(1)
    x = randn(g, *shape[:-1], 2 * shape[-1] if strided else shape[-1]).to(in_dtype) * 3
    x = x[..., : shape[-1]] if strided else x
    weight = (1 + 0.3 * randn(g, shape[-1])).to(out_dtype)
    out = samba_kernels.rms_norm(x, weight, 1e-5, out_dtype)
    assert out.shape == x.shape and out.dtype == out_dtype and out.is_contiguous()
    expected = rms_norm_float64(x, weight, 1e-5).to(out_dtype)
    torch.testing.assert_close(out, expected, **ONE_ROUNDING[out_dtype])
    torch.testing.assert_close(
        samba_kernels.rms_norm_ref(x, weight, 1e-5, out_dtype), expected, **ONE_ROUNDING[out_dtype]
    )


def test_rms_norm_defaults_to_the_weights_dtype():
    g = gen(2)
    x, weight = randn(g, 3, 24), randn(g, 24).to(BF16)
    assert samba_kernels.rms_norm(x, weight, 1e-6).dtype == BF16


@pytest.mark.parametrize("shape, dtype", [((3, 5, 24), F32), ((2, 3, 1000), BF16), ((0, 8), F32)])
def test_swiglu_matches_float64(shape, dtype):
    g = gen(3)
    gate, up = (randn(g, *shape).to(dtype) * 3 for _ in range(2))
    out = samba_kernels.swiglu(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype
    expected = (torch.nn.functional.silu(gate.double()) * up.double()).to(dtype)
    torch.testing.assert_close(out, expected, **ONE_ROUNDING[dtype])


def test_swiglu_reads_strided_inputs():
    g = gen(4)
    gate, up = randn(g, 6, 10).t(), randn(g, 10, 12)[:, ::2]
    torch.testing.assert_close(samba_kernels.swiglu(gate, up), samba_kernels.swiglu_ref(gate, up), **ONE_ROUNDING[F32])


@pytest.mark.parametrize(
    "shape, residual_dtype, update_dtype", [((3, 5, 24), F32, BF16), ((2, 7, 1000), F32, F32), ((0, 8), F32, BF16)]
)
def test_residual_add_sums_in_float32(shape, residual_dtype, update_dtype):
    g = gen(8)
    residual, update = randn(g, *shape).to(residual_dtype) * 3, randn(g, *shape).to(update_dtype)
    out = samba_kernels.residual_add(residual, update)
    assert out.shape == residual.shape and out.dtype == F32
    # float32 sums of values that float32 holds exactly: one rounding of the float64 sum
    torch.testing.assert_close(out, (residual.double() + update.double()).float(), rtol=0, atol=0)


def test_residual_add_of_strided_broadcast_or_16_bit_residuals_takes_the_reference(monkeypatch):
    g = gen(9)
    residual, update = randn(g, 6, 10).t(), randn(g, 10, 6).to(BF16)
    torch.testing.assert_close(samba_kernels.residual_add(residual, update), residual + update.float(), rtol=0, atol=0)
    residual, update = randn(g, 4, 6), randn(g, 6)
    torch.testing.assert_close(samba_kernels.residual_add(residual, update), residual + update, rtol=0, atol=0)
    monkeypatch.setattr(norm_swiglu_kernel, "_residual_add_kernel", NoKernel())
    residual, update = randn(g, 4, 6).to(BF16), randn(g, 4, 6).to(BF16)
    torch.testing.assert_close(samba_kernels.residual_add(residual, update), residual.float() + update, rtol=0, atol=0)


class NoKernel:
    def __getitem__(self, grid):
        pytest.fail("a kernel was launched")


@pytest.mark.parametrize("path", ["gradients", "torch.compile", "cpu-without-interpreter"])
def test_reference_paths_launch_no_kernel(monkeypatch, path):
    monkeypatch.setattr(norm_swiglu_kernel, "_rms_norm_kernel", NoKernel())
    monkeypatch.setattr(norm_swiglu_kernel, "_swiglu_kernel", NoKernel())
    monkeypatch.setattr(norm_swiglu_kernel, "_residual_add_kernel", NoKernel())
    device = DEVICE
    if path == "torch.compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif path == "cpu-without-interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(norm_swiglu_kernel, "use_triton", lambda x: x.is_cuda)
        device = "cpu"
    g = gen(5)
    x, weight, gate, up = (randn(g, *shape).to(device) for shape in ((3, 24), (24,), (3, 10), (3, 10)))
    if path == "gradients":
        x.requires_grad_()
        gate.requires_grad_()
    out = samba_kernels.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(out, samba_kernels.rms_norm_ref(x, weight, 1e-5, weight.dtype), rtol=0, atol=0)
    torch.testing.assert_close(samba_kernels.swiglu(gate, up), samba_kernels.swiglu_ref(gate, up), rtol=0, atol=0)
    summed = samba_kernels.residual_add(x, weight.expand_as(x).contiguous())
    torch.testing.assert_close(summed, x + weight, rtol=0, atol=0)
    if path == "gradients":
        assert out.requires_grad and summed.requires_grad


def test_bad_shapes_are_refused():
    g = gen(6)
    with pytest.raises(ValueError, match="last dimension"):
        samba_kernels.rms_norm(randn(g, 3, 24), randn(g, 23), 1e-5)
    with pytest.raises(ValueError, match="same shape"):
        samba_kernels.swiglu(randn(g, 3, 8), randn(g, 3, 9))


def test_swiglu_of_mixed_dtypes_promotes_as_the_formula_does():
    g = gen(7)
    gate, up = randn(g, 3, 8).to(BF16), randn(g, 3, 8)
    out = samba_kernels.swiglu(gate, up)
    assert out.dtype == F32
    torch.testing.assert_close(out, samba_kernels.swiglu_ref(gate, up), rtol=0, atol=0)
