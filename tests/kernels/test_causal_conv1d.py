"""The causal convolution and its decode update (samba_kernels.causal_conv1d) against the PyTorch references, on
fresh random inputs, forward and gradients."""

import pytest
import torch

import samba_kernels
from samba_kernels.causal_conv1d import kernel as conv_kernel

from .common import TOL, assert_grads_match, forbid_kernels_on_the_cpu, gen, randn, random_seq_idx

CONV_CASES = {
    # name: (batch, dim, length, width, activation, seq_idx, initial_states, bias, return_final_states)
    "silu-everything": (2, 5, 19, 4, "silu", True, True, True, True),
    "plain-width-3": (1, 37, 7, 3, None, False, False, False, False),
    "shorter-than-width": (2, 3, 2, 4, "silu", False, True, True, True),
    "length-1": (1, 4, 1, 2, None, True, True, False, True),
    "long": (1, 3, 130, 4, "silu", True, False, True, False),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_causal_conv1d_matches_reference(case):
    batch, dim, length, width, activation, seq, init, bias, final = CONV_CASES[case]
    g = gen(len(case))
    tensors = dict(x=randn(g, batch, dim, length), weight=randn(g, dim, width) * 0.5)
    if bias:
        tensors["bias"] = randn(g, dim)
    if init:
        tensors["initial_states"] = randn(g, batch, dim, width - 1)
    tensors = {k: v.requires_grad_() for k, v in tensors.items()}
    kwargs = dict(
        activation=activation,
        return_final_states=final,
        seq_idx=random_seq_idx(g, batch, length, cuts=(1,) if length > 1 else ()) if seq else None,
    )
    out = samba_kernels.causal_conv1d_fn(**tensors, **kwargs)
    out_ref = samba_kernels.causal_conv1d_ref(**tensors, **kwargs)
    assert_grads_match(out, out_ref, list(tensors.values()), g)


@pytest.mark.parametrize("extra_state, length", [(0, None), (2, None), (3, 3)])
def test_causal_conv1d_update_matches_reference(extra_state, length):
    g = gen(extra_state)
    batch, dim, width = 2, 5, 4
    x = randn(g, batch, dim) if length is None else randn(g, batch, dim, length)
    weight, bias = randn(g, dim, width), randn(g, dim)
    state = randn(g, batch, dim, width - 1 + extra_state)
    state_ref, ptr = state.clone(), state.data_ptr()
    out = samba_kernels.causal_conv1d_update(x, state, weight, bias, activation="silu")
    out_ref = samba_kernels.causal_conv1d_update_ref(x, state_ref, weight, bias, activation="silu")
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)
    assert state.data_ptr() == ptr
    with pytest.raises(ValueError):
        samba_kernels.causal_conv1d_update(x, state[:, :, :2], weight)


def test_cpu_without_interpreter_takes_the_reference(monkeypatch):
    forbid_kernels_on_the_cpu(monkeypatch, conv_kernel, "_conv_forward")
    g = gen(5)
    x, w = torch.randn(1, 3, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(samba_kernels.causal_conv1d_fn(x, w), samba_kernels.causal_conv1d_ref(x, w))


def test_custom_op_registrations():
    """torch.library.opcheck: schema, fake (shape) implementations, autograd registration and
    AOT dispatch of the convolution's custom ops, on the Triton kernels."""
    g = gen(12)
    seq_idx = random_seq_idx(g, 2, 9)
    u, w = randn(g, 2, 5, 9).requires_grad_(), randn(g, 5, 4).requires_grad_()
    cases = {
        conv_kernel._conv_fwd_op: (u, w, randn(g, 5), seq_idx, randn(g, 2, 5, 3), "silu"),
        conv_kernel._conv_update_op: (randn(g, 2, 5, 1), randn(g, 2, 5, 4), w.detach(), None, "silu"),
    }
    for op, args in cases.items():
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)
