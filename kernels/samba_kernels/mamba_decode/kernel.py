"""One token of a Mamba mixer between its in_proj and out_proj, in two launches: the Mamba half of a
batch-1 decode step.

    mamba_decode_step(x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                      dt_proj_bias, A_log, D) -> y (1, dim)

x, z (1, dim): in_proj's two halves for the new token (views of any stride); conv_state (1, dim, S >= W - 1)
and ssm_state (1, dim, d_state) are updated in place; conv_weight (dim, W); x_proj_weight
(rank + 2 d_state, dim); dt_proj_weight (dim, rank). It computes what the mixer's modules compute
(`mamba_decode_step_ref`):

    xc = causal_conv1d_update(x, conv_state, conv_weight, conv_bias, "silu")
    dt_low, B, C = split(xc @ x_proj_weight.T, [rank, d_state, d_state])
    y = selective_state_update(ssm_state, xc, dt_low @ dt_proj_weight.T + dt_proj_bias, -exp(A_log), B, C, D,
                               z, dt_softplus=True)

Left to the compiler, those are x_proj, dt_proj and several small elementwise kernels, each a launch of a
few µs whatever it reads. Here the first kernel computes x_proj's rows, each program recomputing the
convolution of every channel for itself (a few KB from the L2, against a launch), and the second
computes, for its channels, dt_proj's rows, the state update and the shift of the convolution's state.
Both launch as programmatic dependents where samba_kernels' decode kernels do (`dependent_launch`),
loading their parameters (weights, biases, D) before the wait. Intermediates stay in float32. No gradients.
"""

import torch
import triton
import triton.language as tl

from .._common import cdiv, dependent_launch, gdc_launch_dependents, gdc_wait, next_power_of_2, use_triton
from .naive import mamba_decode_step_ref


@triton.jit
def _conv_parameters(
    conv_weight_ptr,
    conv_bias_ptr,
    channels,
    channel_mask,
    WIDTH: tl.constexpr,
    BLOCK_W: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr,
):
    """The convolution's weights (channels x taps) and bias for `channels`, in float32. Parameters: no
    kernel of the step writes them, so they may load before the wait."""
    taps = tl.arange(0, BLOCK_W)
    weights = tl.load(
        conv_weight_ptr + channels[:, None] * WIDTH + taps[None, :],
        mask=channel_mask[:, None] & (taps < WIDTH)[None, :],
        other=0.0,
    ).to(tl.float32)
    bias = tl.zeros(channels.shape, tl.float32)
    if HAS_CONV_BIAS:
        bias += tl.load(conv_bias_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    return weights, bias


@triton.jit
def _conv_silu(
    x_ptr,
    conv_state_ptr,
    weights,
    bias,
    channels,
    channel_mask,
    S,
    stride_x,
    stride_sd,
    stride_ss,
    WIDTH: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """silu of the causal convolution's output for `channels`: tap t reads the state's input
    S - WIDTH + 1 + t, the last tap reads x."""
    taps = tl.arange(0, BLOCK_W)
    past = tl.load(
        conv_state_ptr + channels[:, None] * stride_sd + (S - WIDTH + 1 + taps)[None, :] * stride_ss,
        mask=channel_mask[:, None] & (taps < WIDTH - 1)[None, :],
        other=0.0,
    )
    newest = tl.load(x_ptr + channels * stride_x, mask=channel_mask, other=0.0)
    window = tl.where((taps == WIDTH - 1)[None, :], newest[:, None].to(tl.float32), past.to(tl.float32))
    out = tl.sum(weights * window, axis=1) + bias
    return out * tl.sigmoid(out)


@triton.jit
def _project_kernel(
    x_ptr,
    conv_state_ptr,
    conv_weight_ptr,
    conv_bias_ptr,
    x_proj_weight_ptr,
    projected_ptr,
    dim,
    rows,
    S,
    stride_x,
    stride_sd,
    stride_ss,
    stride_w,
    WIDTH: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """projected[rows] = silu(conv(x)) @ x_proj_weight.T, in float32."""
    out_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = out_rows < rows
    w_rows_ptr = x_proj_weight_ptr + out_rows.to(tl.int64) * stride_w
    channels = tl.arange(0, BLOCK_K)
    channel_mask = channels < dim
    w = tl.load(w_rows_ptr[:, None] + channels[None, :], mask=row_mask[:, None] & channel_mask[None, :], other=0.0)
    conv_w, conv_b = _conv_parameters(
        conv_weight_ptr, conv_bias_ptr, channels, channel_mask, WIDTH, BLOCK_W, HAS_CONV_BIAS
    )
    if PDL:  # the parameters above do not depend on the kernels before; x and the state do
        gdc_launch_dependents()
        gdc_wait()
    xc = _conv_silu(
        x_ptr,
        conv_state_ptr,
        conv_w,
        conv_b,
        channels,
        channel_mask,
        S,
        stride_x,
        stride_sd,
        stride_ss,
        WIDTH,
        BLOCK_W,
    )
    acc = w.to(tl.float32) * xc[None, :]
    for k0 in range(BLOCK_K, dim, BLOCK_K):
        channels = k0 + tl.arange(0, BLOCK_K)
        channel_mask = channels < dim
        w = tl.load(w_rows_ptr[:, None] + channels[None, :], mask=row_mask[:, None] & channel_mask[None, :], other=0.0)
        conv_w, conv_b = _conv_parameters(
            conv_weight_ptr, conv_bias_ptr, channels, channel_mask, WIDTH, BLOCK_W, HAS_CONV_BIAS
        )
        xc = _conv_silu(
            x_ptr,
            conv_state_ptr,
            conv_w,
            conv_b,
            channels,
            channel_mask,
            S,
            stride_x,
            stride_sd,
            stride_ss,
            WIDTH,
            BLOCK_W,
        )
        acc += w.to(tl.float32) * xc[None, :]
    tl.store(projected_ptr + out_rows, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def _state_kernel(
    x_ptr,
    z_ptr,
    conv_state_ptr,
    conv_weight_ptr,
    conv_bias_ptr,
    projected_ptr,
    dt_weight_ptr,
    dt_bias_ptr,
    A_log_ptr,
    D_ptr,
    ssm_state_ptr,
    y_ptr,
    dim,
    S,
    rank,
    d_state,
    stride_x,
    stride_z,
    stride_sd,
    stride_ss,
    stride_hd,
    stride_hn,
    stride_dt,
    WIDTH: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_STATE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """For BLOCK_D channels: dt = softplus(dt_proj), the state update, y * silu(z), the conv state's shift."""
    channels = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = channels < dim
    ranks = tl.arange(0, BLOCK_R)
    states = tl.arange(0, BLOCK_STATE)
    state_mask = channel_mask[:, None] & (states < d_state)[None, :]
    w_dt = tl.load(
        dt_weight_ptr + channels[:, None] * stride_dt + ranks[None, :],
        mask=channel_mask[:, None] & (ranks < rank)[None, :],
        other=0.0,
    ).to(tl.float32)
    A = -tl.exp(
        tl.load(A_log_ptr + channels[:, None] * d_state + states[None, :], mask=state_mask, other=0.0).to(tl.float32)
    )
    b_dt = tl.load(dt_bias_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    skip = tl.load(D_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    conv_w, conv_b = _conv_parameters(
        conv_weight_ptr, conv_bias_ptr, channels, channel_mask, WIDTH, BLOCK_W, HAS_CONV_BIAS
    )
    if PDL:  # as in _project_kernel: parameters before the wait
        gdc_launch_dependents()
        gdc_wait()
    dt_low = tl.load(projected_ptr + ranks, mask=ranks < rank, other=0.0)
    dt = tl.sum(w_dt * dt_low[None, :], axis=1) + b_dt
    dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus, as torch computes it
    xc = _conv_silu(
        x_ptr,
        conv_state_ptr,
        conv_w,
        conv_b,
        channels,
        channel_mask,
        S,
        stride_x,
        stride_sd,
        stride_ss,
        WIDTH,
        BLOCK_W,
    )
    B = tl.load(projected_ptr + rank + states, mask=states < d_state, other=0.0)
    C = tl.load(projected_ptr + rank + d_state + states, mask=states < d_state, other=0.0)
    h_ptr = ssm_state_ptr + channels[:, None] * stride_hd + states[None, :] * stride_hn
    h = tl.load(h_ptr, mask=state_mask, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * xc)[:, None] * B[None, :]
    tl.store(h_ptr, h.to(ssm_state_ptr.dtype.element_ty), mask=state_mask)
    out = tl.sum(h * C[None, :], axis=1) + skip * xc
    gate = tl.load(z_ptr + channels * stride_z, mask=channel_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + channels, (out * gate * tl.sigmoid(gate)).to(y_ptr.dtype.element_ty), mask=channel_mask)
    # The conv state moves one step: each column takes the next one's input, the last takes x. Every
    # thread's reads of the old state (above, and the shifted columns here) finish before any write.
    slots = tl.arange(0, BLOCK_S)
    shifted = tl.load(
        conv_state_ptr + channels[:, None] * stride_sd + (slots[None, :] + 1) * stride_ss,
        mask=channel_mask[:, None] & (slots[None, :] + 1 < S),
        other=0.0,
    )
    newest = tl.load(x_ptr + channels * stride_x, mask=channel_mask, other=0.0)
    shifted = tl.where(slots[None, :] == S - 1, newest[:, None].to(shifted.dtype), shifted)
    tl.debug_barrier()
    tl.store(
        conv_state_ptr + channels[:, None] * stride_sd + slots[None, :] * stride_ss,
        shifted,
        mask=channel_mask[:, None] & (slots[None, :] < S),
    )


# Tiles: the fastest of 15 pairs in the decode engine's captured samba-421m step on the H200 (419.9 against 434.0 µs
# a step with the tiles before, docs/performance-notes.md, Decoding). x_proj's rows take one K step where the mixer
# is at most 4096 channels wide, so that every load issues right after the wait (each program recomputes the
# convolution of every channel), two rows a program; the state update takes 16 channels per program (3072
# channels: 192 programs).
PROJECT_TILE = dict(BLOCK_N=2, BLOCK_K=4096, num_warps=16)
STATE_TILE = dict(BLOCK_D=16, num_warps=4)


def _launch(
    x: torch.Tensor,
    z: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    dim, width, S = x.shape[-1], conv_weight.shape[-1], conv_state.shape[-1]
    rank, d_state = dt_proj_weight.shape[1], A_log.shape[1]
    projected = x.new_empty(rank + 2 * d_state, dtype=torch.float32)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    conv_weight, A_log, D = conv_weight.contiguous(), A_log.contiguous(), D.contiguous()
    x_proj_weight, dt_proj_weight = (
        w if w.stride(-1) == 1 else w.contiguous() for w in (x_proj_weight, dt_proj_weight)
    )
    conv = dict(
        WIDTH=width, BLOCK_W=next_power_of_2(width), HAS_CONV_BIAS=conv_bias is not None, **dependent_launch(x)
    )
    bias = conv_weight if conv_bias is None else conv_bias  # without a bias: any pointer, never read
    project, state = PROJECT_TILE, STATE_TILE
    _project_kernel[(cdiv(rank + 2 * d_state, project["BLOCK_N"]),)](
        x,
        conv_state,
        conv_weight,
        bias,
        x_proj_weight,
        projected,
        dim,
        rank + 2 * d_state,
        S,
        x.stride(-1),
        conv_state.stride(1),
        conv_state.stride(2),
        x_proj_weight.stride(0),
        BLOCK_N=project["BLOCK_N"],
        BLOCK_K=min(project["BLOCK_K"], next_power_of_2(dim)),
        num_warps=project["num_warps"],
        **conv,
    )
    _state_kernel[(cdiv(dim, state["BLOCK_D"]),)](
        x,
        z,
        conv_state,
        conv_weight,
        bias,
        projected,
        dt_proj_weight,
        dt_proj_bias,
        A_log,
        D,
        ssm_state,
        y,
        dim,
        S,
        rank,
        d_state,
        x.stride(-1),
        z.stride(-1),
        conv_state.stride(1),
        conv_state.stride(2),
        ssm_state.stride(1),
        ssm_state.stride(2),
        dt_proj_weight.stride(0),
        BLOCK_D=state["BLOCK_D"],
        BLOCK_R=next_power_of_2(rank),
        BLOCK_STATE=next_power_of_2(d_state),
        BLOCK_S=next_power_of_2(S),
        num_warps=state["num_warps"],
        **conv,
    )
    return y


_mamba_decode_step = torch.library.custom_op(
    "samba_kernels::mamba_decode_step", _launch, mutates_args=("conv_state", "ssm_state")
)


@_mamba_decode_step.register_fake
def _(x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def mamba_decode_step(
    x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D
):
    """One token of a Mamba mixer between in_proj and out_proj (semantics: `mamba_decode_step_ref`; see the
    module docstring), without gradients: the Triton kernels where `use_triton(x)`, the reference elsewhere.

    Args:
        x, z (torch.Tensor): in_proj's two halves for the new token, shape `[1, dim]`, any strides.
        conv_state (torch.Tensor): the convolution's latest inputs, shape `[1, dim, S]` with `S >= width - 1`;
            updated in place.
        ssm_state (torch.Tensor): shape `[1, dim, d_state]`, any float dtype (float32 in the caches); updated in
            place.
        conv_weight (torch.Tensor): shape `[dim, width]`; conv_bias: `[dim]` or None.
        x_proj_weight (torch.Tensor): shape `[rank + 2 d_state, dim]`.
        dt_proj_weight (torch.Tensor): shape `[dim, rank]`; dt_proj_bias: `[dim]`.
        A_log (torch.Tensor): shape `[dim, d_state]` (A = -exp(A_log)); D: `[dim]`.

    Returns:
        y of shape `[1, dim]` in x's dtype: out_proj's input.
    """
    dim, width = conv_weight.shape
    rank, d_state = dt_proj_weight.shape[1], A_log.shape[1]
    expected = {
        "x": (x, (1, dim)),
        "z": (z, (1, dim)),
        "conv_state": (conv_state, (1, dim, conv_state.shape[-1])),
        "ssm_state": (ssm_state, (1, dim, d_state)),
        "x_proj_weight": (x_proj_weight, (rank + 2 * d_state, dim)),
        "dt_proj_weight": (dt_proj_weight, (dim, rank)),
        "dt_proj_bias": (dt_proj_bias, (dim,)),
        "A_log": (A_log, (dim, d_state)),
        "D": (D, (dim,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"mamba_decode_step: {name} has shape {tuple(tensor.shape)}, expected {shape} (one row "
                f"of a mixer with {dim} channels, convolution width {width}, dt rank {rank}, d_state "
                f"{d_state}); use causal_conv1d_update and selective_state_update for batches"
            )
    if conv_state.shape[-1] < width - 1:
        raise ValueError(f"conv_state holds {conv_state.shape[-1]} steps, the convolution needs at least {width - 1}")
    if not use_triton(x):
        return mamba_decode_step_ref(
            x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D
        )
    inputs = (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise ValueError("mamba_decode_step has no backward: call it without gradients (decoding)")
    # Only the compiler needs the custom op (see selective_state_update).
    step = _mamba_decode_step if torch.compiler.is_compiling() else _launch
    return step(
        x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D
    )
