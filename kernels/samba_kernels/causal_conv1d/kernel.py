"""Depthwise causal conv1d in Triton (forward, backward, decode update).

Each program computes a (BLOCK_D channels, BLOCK_L positions) tile; the width-W taps are unrolled.
Positions are "padded": position p < 0 reads the initial states, which belong to the first
document of `seq_idx`. The backward runs in two kernels: the first recomputes the pre-activation
(rather than saving it) and writes the gradient at the output, dout times the activation's
derivative, with per-program partial sums of dweight and dbias (summed with torch: deterministic);
the second gathers dx from that gradient at the W outputs that read each input.
"""

import torch
import triton
import triton.language as tl

from .._common import block_size, cdiv, contiguous, eager_autograd, silu_grad, use_triton
from .naive import causal_conv1d_ref, causal_conv1d_update_ref


@triton.jit
def _seq_at(seq_idx_ptr, b, L, p):
    # Document of padded position p; the initial states (p < 0) belong to the first one.
    return tl.load(seq_idx_ptr + b * L + tl.minimum(tl.maximum(p, 0), L - 1))


@triton.jit
def _load_padded(x_ptr, init_ptr, b, d, d_mask, p, dim, L, s_ib, s_id, s_il, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """x at padded positions p (BLOCK_L,) for channels d, as fp32 (BLOCK_D, BLOCK_L)."""
    v = tl.load(
        x_ptr + (b * dim + d[:, None]) * L + p[None, :],
        mask=d_mask[:, None] & ((p >= 0) & (p < L))[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_INIT:  # the reference rounds the initial states to x's dtype
        h_mask = d_mask[:, None] & ((p < 0) & (p >= 1 - W))[None, :]
        h = tl.load(init_ptr + b * s_ib + d[:, None] * s_id + (p + W - 1)[None, :] * s_il, mask=h_mask, other=0.0)
        v += h.to(x_ptr.dtype.element_ty).to(tl.float32)
    return v


@triton.jit
def _conv_pre(
    x_ptr,
    init_ptr,
    seq_idx_ptr,
    weight_ptr,
    bias_ptr,
    b,
    d,
    d_mask,
    s,
    dim,
    L,
    s_ib,
    s_id,
    s_il,
    W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """(pre-activation output at positions s (BLOCK_L,), fp32 (BLOCK_D, BLOCK_L); the W inputs it read,
    tap k's at s - (W - 1) + k, zero across a document boundary)."""
    acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    taps = ()
    if HAS_SEQ:
        seq_s = _seq_at(seq_idx_ptr, b, L, s)
    for k in tl.static_range(W):
        p = s - (W - 1) + k
        v = _load_padded(x_ptr, init_ptr, b, d, d_mask, p, dim, L, s_ib, s_id, s_il, W, HAS_INIT)
        if HAS_SEQ:  # never read across a document boundary
            v = tl.where((_seq_at(seq_idx_ptr, b, L, p) == seq_s)[None, :], v, 0.0)
        acc += tl.load(weight_ptr + d * W + k, mask=d_mask, other=0.0).to(tl.float32)[:, None] * v
        taps = taps + (v,)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[:, None]
    return acc, taps


@triton.jit
def _conv_fwd_kernel(
    x_ptr,
    init_ptr,
    seq_idx_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    dim,
    L,
    s_ib,
    s_id,
    s_il,
    W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    s = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    acc, _ = _conv_pre(
        x_ptr,
        init_ptr,
        seq_idx_ptr,
        weight_ptr,
        bias_ptr,
        b,
        d,
        d_mask,
        s,
        dim,
        L,
        s_ib,
        s_id,
        s_il,
        W,
        BLOCK_D,
        BLOCK_L,
        HAS_INIT,
        HAS_SEQ,
        HAS_BIAS,
    )
    if SILU:
        acc *= tl.sigmoid(acc)
    tl.store(out_ptr + (b * dim + d[:, None]) * L + s[None, :], acc, mask=d_mask[:, None] & (s < L)[None, :])


@triton.jit
def _conv_bwd_out_kernel(
    x_ptr,
    init_ptr,
    seq_idx_ptr,
    weight_ptr,
    bias_ptr,
    dout_ptr,
    g_out_ptr,
    dweight_part_ptr,
    dbias_part_ptr,
    dim,
    L,
    s_ib,
    s_id,
    s_il,
    W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    """The gradient at the pre-activation of outputs s, float32, and this program's sums over its
    positions of dweight (dim, W) and dbias (dim,), in row (batch, position block) of the partials."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    s = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    s_mask = d_mask[:, None] & (s < L)[None, :]
    tile_off = (b * dim + d[:, None]) * L + s[None, :]
    g = tl.load(dout_ptr + tile_off, mask=s_mask, other=0.0).to(tl.float32)
    pre, taps = _conv_pre(
        x_ptr,
        init_ptr,
        seq_idx_ptr,
        weight_ptr,
        bias_ptr,
        b,
        d,
        d_mask,
        s,
        dim,
        L,
        s_ib,
        s_id,
        s_il,
        W,
        BLOCK_D,
        BLOCK_L,
        HAS_INIT,
        HAS_SEQ,
        HAS_BIAS,
    )
    if SILU:
        g *= silu_grad(pre)
    tl.store(g_out_ptr + tile_off, g, mask=s_mask)
    part = b * tl.num_programs(2) + tl.program_id(2)  # this program's row of the partials
    for k in tl.static_range(W):
        tl.store(dweight_part_ptr + (part * dim + d) * W + k, tl.sum(g * taps[k], axis=1), mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part * dim + d, tl.sum(g, axis=1), mask=d_mask)


@triton.jit
def _conv_bwd_in_kernel(
    x_ptr,
    init_ptr,
    seq_idx_ptr,
    weight_ptr,
    bias_ptr,
    g_out_ptr,
    dx_ptr,
    dinit_ptr,
    dim,
    L,
    s_ib,
    s_id,
    s_il,
    W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    """dx at padded input positions p in [1 - W, L): dx for p >= 0, dinit for p < 0, from the
    gradient at the W outputs that read p. (x, bias and their flags: the launcher's common arguments.)"""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    p = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L) - (W - 1)
    row_off = (b * dim + d[:, None]) * L
    if HAS_SEQ:
        seq_p = _seq_at(seq_idx_ptr, b, L, p)
    dxp = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    for k in tl.static_range(W):
        s = p + (W - 1 - k)  # the output that reads input p through tap k
        g = tl.load(g_out_ptr + row_off + s[None, :], mask=d_mask[:, None] & ((s >= 0) & (s < L))[None, :], other=0.0)
        if HAS_SEQ:
            g = tl.where((_seq_at(seq_idx_ptr, b, L, s) == seq_p)[None, :], g, 0.0)
        dxp += tl.load(weight_ptr + d * W + k, mask=d_mask, other=0.0).to(tl.float32)[:, None] * g
    tl.store(dx_ptr + row_off + p[None, :], dxp, mask=d_mask[:, None] & ((p >= 0) & (p < L))[None, :])
    if HAS_INIT:
        tl.store(
            dinit_ptr + b * s_ib + d[:, None] * s_id + (p + W - 1)[None, :] * s_il,
            dxp,
            mask=d_mask[:, None] & (p < 0)[None, :],
        )


def _tiles(dim, n_positions):
    """(BLOCK_D channels, BLOCK_L positions) of a program over n_positions."""
    return block_size(dim, 16), block_size(n_positions, 64)


def _conv_launch(kernel, x, weight, bias, seq_idx, init, activation, n_positions, *extra):
    """Launches `kernel` over (batch, channel blocks, blocks of n_positions) of contiguous x."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    batch, dim, L = x.shape
    W = weight.shape[-1]
    BLOCK_D, BLOCK_L = _tiles(dim, n_positions)
    grid = (batch, cdiv(dim, BLOCK_D), cdiv(n_positions, BLOCK_L))
    strides = init.stride() if init is not None else (0, 0, 0)
    kernel[grid](
        x,
        x if init is None else init,
        x if seq_idx is None else seq_idx,
        weight,
        x if bias is None else bias,
        *extra,
        dim,
        L,
        *strides,
        W=W,
        BLOCK_D=BLOCK_D,
        BLOCK_L=BLOCK_L,
        HAS_INIT=init is not None,
        HAS_SEQ=seq_idx is not None,
        HAS_BIAS=bias is not None,
        SILU=activation is not None,
        num_warps=4,
    )


def _conv_forward(x, weight, bias, seq_idx, init, activation):
    out = torch.empty_like(x)
    _conv_launch(_conv_fwd_kernel, x, weight, bias, seq_idx, init, activation, x.shape[-1], out)
    return out


# torch.compile sees the kernels as custom ops, eager calls as an autograd.Function (see selective_scan/kernel.py).
def _conv_fwd_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    return _conv_forward(x, weight, bias, seq_idx, initial_states, activation)


_conv_fwd_op = torch.library.custom_op("samba_kernels::causal_conv1d_fwd", _conv_fwd_impl, mutates_args=())


@_conv_fwd_op.register_fake
def _(x, weight, bias, seq_idx, initial_states, activation):
    return torch.empty_like(x)


def _conv_bwd_outputs(x, weight, init):
    """Uninitialised (dx, dweight, dbias, dinitial_states) of the backward's shapes (the op returns its own
    dweight and dbias, summed from partials)."""
    f32 = dict(dtype=torch.float32, device=x.device)
    dinit = torch.empty(0, **f32) if init is None else torch.empty(init.shape, **f32)
    return [torch.empty_like(x), torch.empty(weight.shape, **f32), torch.empty(weight.shape[0], **f32), dinit]


def _conv_bwd_impl(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    activation: str | None,
) -> list[torch.Tensor]:
    """(dx, dweight, dbias, dinitial_states), the last three in float32; dinitial_states empty when absent."""
    batch, dim, L = x.shape
    W = weight.shape[-1]
    dx, _, _, dinit = _conv_bwd_outputs(x, weight, initial_states)
    g_out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    parts = batch * cdiv(L, _tiles(dim, L)[1])  # (batch, position block) rows of the partial sums
    dweight_part = torch.empty(parts, dim, W, dtype=torch.float32, device=x.device)
    dbias_part = torch.zeros(parts, dim, dtype=torch.float32, device=x.device)
    _conv_launch(
        _conv_bwd_out_kernel,
        x,
        weight,
        bias,
        seq_idx,
        initial_states,
        activation,
        L,
        dout,
        g_out,
        dweight_part,
        dbias_part,
    )
    _conv_launch(
        _conv_bwd_in_kernel,
        x,
        weight,
        bias,
        seq_idx,
        initial_states,
        activation,
        L + W - 1,
        g_out,
        dx,
        dx if initial_states is None else dinit,
    )
    return [dx, dweight_part.sum(0), dbias_part.sum(0), dinit]


_conv_bwd_op = torch.library.custom_op("samba_kernels::causal_conv1d_bwd", _conv_bwd_impl, mutates_args=())


@_conv_bwd_op.register_fake
def _(dout, x, weight, bias, seq_idx, initial_states, activation):
    return _conv_bwd_outputs(x, weight, initial_states)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, init, ctx.activation = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, init)


def _conv_grads(ctx, dout, backward):
    """The inputs' gradients, the backward's kernels launched by `backward` (the custom op or its implementation)."""
    x, weight, bias, seq_idx, init = ctx.saved_tensors
    dx, dweight, dbias, dinit = backward(contiguous(dout), x, weight, bias, seq_idx, init, ctx.activation)
    return (
        dx,
        dweight.to(weight.dtype),
        None if bias is None else dbias.to(bias.dtype),
        None,
        None if init is None else dinit.to(init.dtype),
        None,
    )


_conv_fwd_op.register_autograd(
    lambda ctx, dout: _conv_grads(ctx, dout, _conv_bwd_op), setup_context=_conv_setup_context
)
_EagerConv = eager_autograd(
    "_EagerConv", _conv_fwd_impl, _conv_setup_context, lambda ctx, dout: _conv_grads(ctx, dout, _conv_bwd_impl)
)


def causal_conv1d_fn(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, activation=None
):
    """Depthwise causal convolution (semantics: `causal_conv1d_ref`), differentiable in x, weight, bias and
    initial_states: the Triton kernels where `use_triton(x)`, the reference elsewhere.

    Args:
        x (torch.Tensor): inputs of shape `[batch, dim, length]`, float32, bfloat16 or float16.
        weight (torch.Tensor): taps of shape `[dim, width]`, any float dtype; tap `width - 1` reads the current
            position.
        bias (torch.Tensor | None): shape `[dim]`.
        seq_idx (torch.Tensor | None): document of each position, shape `[batch, length]`, integer; a position
            never reads an input of another document.
        initial_states (torch.Tensor | None): the `width - 1` inputs before position 0, shape
            `[batch, dim, width - 1]`; they belong to the first document.
        return_final_states (bool): also return the last `width - 1` inputs, shape `[batch, dim, width - 1]`, in
            x's dtype (the next chunk's initial_states).
        activation (str | None): None, or "silu" / "swish" applied to the output.

    Returns:
        out of x's shape and dtype, or (out, final_states).
    """
    if not use_triton(x):
        return causal_conv1d_ref(x, weight, bias, seq_idx, initial_states, return_final_states, activation)
    W = weight.shape[-1]
    init = initial_states.contiguous() if initial_states is not None and W > 1 else None
    conv = _conv_fwd_op if torch.compiler.is_compiling() else _EagerConv.apply
    out = conv(
        contiguous(x),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
        init,
        activation,
    )
    if not return_final_states:
        return out
    if x.shape[-1] >= W - 1:  # the last W - 1 inputs (a copy: a view would keep all of x alive in a cache)
        return out, x[:, :, x.shape[-1] - (W - 1) :].clone(memory_format=torch.contiguous_format)
    history = x.new_zeros(x.shape[0], x.shape[1], W - 1) if init is None else init.to(x.dtype)
    return out, torch.cat([history, x], dim=-1)[:, :, x.shape[-1] :]


def _conv_update(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """Output of contiguous x (batch, dim, length); shifts x into `conv_state`."""
    W, S = weight.shape[-1], conv_state.shape[-1]
    # The state's last W - 1 columns are the convolution's initial states (read in place, strided).
    out = _conv_forward(x, weight, bias, None, conv_state[:, :, S - W + 1 :] if W > 1 else None, activation)
    conv_state.copy_(torch.cat([conv_state.to(x.dtype), x], dim=-1)[:, :, -S:])
    return out


_conv_update_op = torch.library.custom_op(
    "samba_kernels::causal_conv1d_update", _conv_update, mutates_args=("conv_state",)
)


@_conv_update_op.register_fake
def _(x, conv_state, weight, bias, activation):
    return torch.empty_like(x)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Decode step(s) of the causal convolution (semantics: `causal_conv1d_update_ref`), without gradients.

    Args:
        x (torch.Tensor): the new inputs, shape `[batch, dim]` (one step) or `[batch, dim, length]`.
        conv_state (torch.Tensor): the latest inputs, shape `[batch, dim, state_len]` with
            `state_len >= width - 1`, oldest first; updated in place (no new tensor, so safe in CUDA graphs).
        weight (torch.Tensor): shape `[dim, width]`.
        bias (torch.Tensor | None): shape `[dim]`.
        activation (str | None): None, or "silu" / "swish".

    Returns:
        out of x's shape and dtype.
    """
    if not use_triton(x):
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    W, S = weight.shape[-1], conv_state.shape[-1]
    if S < W - 1:
        raise ValueError(f"conv_state holds {S} steps, the convolution needs at least {W - 1}")
    xs = (x.unsqueeze(-1) if x.dim() == 2 else x).contiguous()
    update = _conv_update_op if torch.compiler.is_compiling() else _conv_update  # see selective_state_update
    out = update(xs, conv_state, weight.contiguous(), None if bias is None else bias.contiguous(), activation)
    return out.squeeze(-1) if x.dim() == 2 else out
