"""The Mamba mixer's decode step (samba_kernels.mamba_decode) against the PyTorch references of the mixer's ops."""

import pytest
import torch

import samba_kernels
from samba_kernels.mamba_decode import kernel as decode_kernel

from .common import TOL, gen, randn


def _mamba_decode_inputs(g, dim, width, state_len, rank, d_state, conv_bias=True):
    xz = randn(g, 1, 2 * dim)  # in_proj's output: x and z are strided views of one row
    weights = dict(
        conv_weight=randn(g, dim, width),
        conv_bias=randn(g, dim) if conv_bias else None,
        x_proj_weight=randn(g, rank + 2 * d_state, dim) * 0.2,
        dt_proj_weight=randn(g, dim, rank) * 0.3,
        dt_proj_bias=randn(g, dim) - 1.0,
        A_log=randn(g, dim, d_state).abs().log1p(),
        D=randn(g, dim),
    )
    return xz[:, :dim], xz[:, dim:], randn(g, 1, dim, state_len), randn(g, 1, dim, d_state), weights


# (dim, width, state_len, rank, d_state): sizes that are not powers of two, a state longer than the
# convolution needs (a static cache's), no conv bias.
@pytest.mark.parametrize(
    "dim, width, state_len, rank, d_state, conv_bias",
    [(40, 4, 3, 5, 6, True), (70, 3, 5, 3, 16, False), (24, 2, 1, 4, 4, True)],
)
def test_mamba_decode_step_matches_the_mixer_ops_over_several_steps(
    monkeypatch, dim, width, state_len, rank, d_state, conv_bias
):
    """Against conv update, x_proj, dt_proj and the state update of the PyTorch references, step after step:
    the output, the convolution's state (shifted in place) and the SSM state. x_proj's K steps are 32 wide,
    so that the wider mixers take several."""
    monkeypatch.setitem(decode_kernel.PROJECT_TILE, "BLOCK_K", 32)
    g = gen(19)
    x, z, conv_state, ssm_state, weights = _mamba_decode_inputs(g, dim, width, state_len, rank, d_state, conv_bias)
    ref_conv_state, ref_ssm_state = conv_state.clone(), ssm_state.clone()
    with torch.no_grad():
        for _ in range(3):
            y = samba_kernels.mamba_decode_step(x, z, conv_state, ssm_state, **weights)
            expected = samba_kernels.mamba_decode_step_ref(x, z, ref_conv_state, ref_ssm_state, **weights)
            torch.testing.assert_close(y, expected, **TOL)
            torch.testing.assert_close(conv_state, ref_conv_state, rtol=0, atol=0)
            torch.testing.assert_close(ssm_state, ref_ssm_state, **TOL)
            x, z = x.roll(1, -1), z * 0.5


def test_mamba_decode_step_traces_into_a_graph_and_refuses_what_it_cannot_do():
    g = gen(20)
    x, z, conv_state, ssm_state, weights = _mamba_decode_inputs(g, 16, 4, 3, 4, 4)
    ref_conv_state, ref_ssm_state = conv_state.clone(), ssm_state.clone()
    with torch.no_grad():
        step = torch.compile(samba_kernels.mamba_decode_step, fullgraph=True, backend="aot_eager")
        y = step(x, z, conv_state, ssm_state, **weights)
    expected = samba_kernels.mamba_decode_step_ref(x, z, ref_conv_state, ref_ssm_state, **weights)
    torch.testing.assert_close(y, expected, **TOL)
    torch.testing.assert_close(ssm_state, ref_ssm_state, **TOL)  # the compiled op mutates the states
    op = decode_kernel._mamba_decode_step
    results = torch.library.opcheck(op, (x, z, conv_state, ssm_state, *weights.values()))
    assert set(results.values()) == {"SUCCESS"}, results
    with pytest.raises(ValueError, match="x has shape"):
        samba_kernels.mamba_decode_step(x.expand(2, -1), z, conv_state, ssm_state, **weights)
    with pytest.raises(ValueError, match="needs at least 3"):
        samba_kernels.mamba_decode_step(x, z, conv_state[..., :2], ssm_state, **weights)
    with pytest.raises(ValueError, match="no backward"):
        samba_kernels.mamba_decode_step(x.requires_grad_(), z, conv_state, ssm_state, **weights)
