"""Mamba-1 selective scan in Triton, forward and backward, and its one-step decode form.

One program owns a block of channels of one (batch, group) and walks time sequentially with the
(BLOCK_D, d_state) state in fp32 registers. The forward saves the state every CHUNK steps; the
backward walks the chunks in reverse, recomputes the chunk's states from its checkpoint into a
per-program scratch buffer, then runs the adjoint recurrence backwards through the chunk.
Sums over channels (dB, dC) or over batch and time (dA, dD, ddelta_bias) go through fp32 atomics.
"""

import torch
import triton
import triton.language as tl

from ._common import block_size, silu_grad, use_triton
from .reference import selective_scan_ref, selective_state_update_ref

CHUNK = 64  # steps between the forward's state checkpoints


@triton.jit
def _coords(dim, L, N, groups, dpg, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # A program never straddles two B/C groups, so B_t and C_t are vectors over the state.
    pid_bg = tl.program_id(0).to(tl.int64)
    b = pid_bg // groups
    j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = j < dpg
    d = (pid_bg % groups) * dpg + j
    n = tl.arange(0, BLOCK_N)
    n_mask = n < N
    row = (b * dim + d) * L  # offset of channel d in (batch, dim, length) tensors
    bc_row = (pid_bg * N + n) * L  # offset of state n in (batch, groups, d_state, length) tensors
    return b, d, d_mask, n, n_mask, row, bc_row


@triton.jit
def _step_inputs(u, delta, bias_v, seq_idx, b, L, row, t, d_mask, HAS_BIAS: tl.constexpr,
                 SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr):
    u_t = tl.load(u + row + t, mask=d_mask, other=0.0).to(tl.float32)
    dt_raw = tl.load(delta + row + t, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias_v
    dt = dt_raw
    if SOFTPLUS:  # inline: under the interpreter every device-function call is costly
        dt = tl.where(dt_raw > 20.0, dt_raw, tl.log(1.0 + tl.exp(tl.minimum(dt_raw, 20.0))))
    keep = 1.0  # 0 where a new document starts: the state before it is dropped
    if HAS_SEQ:
        cur = tl.load(seq_idx + b * L + t)
        prev = tl.load(seq_idx + b * L + tl.maximum(t - 1, 0))
        keep = (cur == prev).to(tl.float32)
    return u_t, dt_raw, dt, keep


@triton.jit
def _advance(h, A2, dt, u_t, B_t, keep):
    # h_t = exp(dt A) h_{t-1} + dt u_t B_t, with A2 = A log2(e) for exp2.
    return tl.exp2(dt[:, None] * A2) * (h * keep) + (dt * u_t)[:, None] * B_t[None, :]


@triton.jit
def _scan_fwd_kernel(u, delta, A, B, C, D, z, delta_bias, seq_idx, init, last, ckpt, out,
                     dim, L, N, groups, dpg, n_chunks, s_hb, s_hd, s_hn,
                     CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                     SAVE_CKPT: tl.constexpr):
    b, d, d_mask, n, n_mask, row, bc_row = _coords(dim, L, N, groups, dpg, BLOCK_D, BLOCK_N)
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A2 = tl.load(A + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    bias_v = tl.load(delta_bias + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    D_v = tl.load(D + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    h_off = b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn
    if HAS_INIT:
        h = tl.load(init + h_off, mask=dn_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    ckpt_off = (b * dim + d[:, None]) * n_chunks * N + n[None, :]
    for t in range(L):
        if SAVE_CKPT:
            if t % CHUNK == 0:  # the state entering each chunk, for the backward
                tl.store(ckpt + ckpt_off + (t // CHUNK) * N, h, mask=dn_mask)
        u_t, dt_raw, dt, keep = _step_inputs(u, delta, bias_v, seq_idx, b, L, row, t, d_mask,
                                             HAS_BIAS, SOFTPLUS, HAS_SEQ)
        B_t = tl.load(B + bc_row + t, mask=n_mask, other=0.0).to(tl.float32)
        C_t = tl.load(C + bc_row + t, mask=n_mask, other=0.0).to(tl.float32)
        h = _advance(h, A2, dt, u_t, B_t, keep)
        y = tl.sum(h * C_t[None, :], axis=1) + D_v * u_t
        if HAS_Z:
            z_t = tl.load(z + row + t, mask=d_mask, other=0.0).to(tl.float32)
            y *= z_t * tl.sigmoid(z_t)
        tl.store(out + row + t, y, mask=d_mask)
    # `last` may be `init` itself (decode): each element is read above before it is written here.
    tl.store(last + h_off, h, mask=dn_mask)


@triton.jit
def _scan_bwd_kernel(u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt, dlast, dout, scratch,
                     du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit,
                     dim, L, N, groups, dpg, n_chunks, s_hb, s_hd, s_hn,
                     CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                     HAS_DLAST: tl.constexpr):
    b, d, d_mask, n, n_mask, row, bc_row = _coords(dim, L, N, groups, dpg, BLOCK_D, BLOCK_N)
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A_v = tl.load(A + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A_v * 1.4426950408889634
    bias_v = tl.load(delta_bias + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    D_v = tl.load(D + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    h_off = b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn
    ckpt_off = (b * dim + d[:, None]) * n_chunks * N + n[None, :]
    # This program's private scratch: slot 0 the chunk's entering state, slot i + 1 the state after step i.
    pid = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    step = BLOCK_D * BLOCK_N
    scr = scratch + pid * (CHUNK + 1) * step + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    if HAS_DLAST:
        dh = tl.load(dlast + h_off, mask=dn_mask, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # adjoint of the state after step t
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c_rev in range(n_chunks):
        t0 = (n_chunks - 1 - c_rev) * CHUNK
        n_t = tl.minimum(L - t0, CHUNK)
        h = tl.load(ckpt + ckpt_off + (t0 // CHUNK) * N, mask=dn_mask, other=0.0)
        tl.store(scr, h)
        for i in range(n_t):
            u_t, dt_raw, dt, keep = _step_inputs(u, delta, bias_v, seq_idx, b, L, row, t0 + i, d_mask,
                                                 HAS_BIAS, SOFTPLUS, HAS_SEQ)
            B_t = tl.load(B + bc_row + t0 + i, mask=n_mask, other=0.0).to(tl.float32)
            h = _advance(h, A2, dt, u_t, B_t, keep)
            tl.store(scr + (i + 1) * step, h)
        tl.debug_barrier()
        for i_rev in range(n_t):
            i = n_t - 1 - i_rev
            t = t0 + i
            u_t, dt_raw, dt, keep = _step_inputs(u, delta, bias_v, seq_idx, b, L, row, t, d_mask,
                                                 HAS_BIAS, SOFTPLUS, HAS_SEQ)
            B_t = tl.load(B + bc_row + t, mask=n_mask, other=0.0).to(tl.float32)
            C_t = tl.load(C + bc_row + t, mask=n_mask, other=0.0).to(tl.float32)
            h_prev = tl.load(scr + i * step) * keep
            h_t = tl.load(scr + (i + 1) * step)
            g = tl.load(dout + row + t, mask=d_mask, other=0.0).to(tl.float32)
            if HAS_Z:  # out = y silu(z): recompute y for dz, then g becomes dL/dy
                z_t = tl.load(z + row + t, mask=d_mask, other=0.0).to(tl.float32)
                y = tl.sum(h_t * C_t[None, :], axis=1) + D_v * u_t
                tl.store(dz + row + t, g * y * silu_grad(z_t), mask=d_mask)
                g = g * z_t * tl.sigmoid(z_t)
            tl.atomic_add(dC + bc_row + t, tl.sum(g[:, None] * h_t, axis=0), mask=n_mask)
            dh += g[:, None] * C_t[None, :]
            d_dtu = tl.sum(dh * B_t[None, :], axis=1)  # adjoint of dt * u
            du_t = d_dtu * dt + g * D_v
            ddt = d_dtu * u_t
            tl.atomic_add(dB + bc_row + t, tl.sum(dh * (dt * u_t)[:, None], axis=0), mask=n_mask)
            decay = tl.exp2(dt[:, None] * A2)
            d_exp = dh * h_prev * decay  # adjoint of dt * A
            ddt += tl.sum(d_exp * A_v, axis=1)
            dA_acc += d_exp * dt[:, None]
            dh = dh * decay * keep
            if SOFTPLUS:
                ddt *= tl.sigmoid(dt_raw)
            dD_acc += g * u_t
            dbias_acc += ddt
            tl.store(du + row + t, du_t, mask=d_mask)
            tl.store(ddelta + row + t, ddt, mask=d_mask)
        tl.debug_barrier()  # the scratch is rewritten by the next chunk
    if HAS_INIT:
        tl.store(dinit + h_off, dh, mask=dn_mask)
    tl.atomic_add(dA + d[:, None] * N + n[None, :], dA_acc, mask=dn_mask)
    if HAS_D:
        tl.atomic_add(dD + d, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.atomic_add(ddelta_bias + d, dbias_acc, mask=d_mask)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _grouped(BC: torch.Tensor) -> torch.Tensor:
    return (BC if BC.dim() == 4 else BC.unsqueeze(1)).contiguous()


def _launch_args(u, B, N):
    """Grid, block sizes and the (groups, dims per group) of a scan over u (batch, dim, length)."""
    batch, dim, _ = u.shape
    groups = B.shape[1]
    if dim % groups != 0:
        raise ValueError(f"dim ({dim}) must be divisible by the number of B/C groups ({groups})")
    dpg = dim // groups
    BLOCK_D, BLOCK_N = block_size(dpg, 32), block_size(N, 256)
    grid = (batch * groups, triton.cdiv(dpg, BLOCK_D))
    return grid, groups, dpg, dict(BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, CHUNK=CHUNK, num_warps=4)


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, seq_idx, last, save_ckpt):
    """Launches the forward on contiguous u, delta, z (batch, dim, length) and B, C (batch, groups,
    d_state, length); writes the final state into `last` (which may be `initial_state`)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    grid, groups, dpg, meta = _launch_args(u, B, N)
    if initial_state is not None and initial_state.stride() != last.stride():
        raise ValueError("initial_state and the last state must have the same strides")
    n_chunks = triton.cdiv(L, CHUNK)
    ckpt = u.new_empty((batch, dim, n_chunks, N) if save_ckpt else (1,), dtype=torch.float32)
    out = torch.empty_like(u)
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, u if D is None else D, u if z is None else z,
        u if delta_bias is None else delta_bias, u if seq_idx is None else seq_idx,
        last if initial_state is None else initial_state, last, ckpt, out,
        dim, L, N, groups, dpg, n_chunks, *last.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        HAS_SEQ=seq_idx is not None, HAS_INIT=initial_state is not None, SAVE_CKPT=save_ckpt, **meta,
    )
    return out, ckpt


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx):
        if (B.dim() == 4) != (C.dim() == 4) or (B.dim() == 4 and B.shape[1] != C.shape[1]):
            raise ValueError("B and C must have the same number of groups")
        ctx.shapes = B.shape, C.shape
        u, delta, A, D, z, delta_bias = map(_contiguous, (u, delta, A, D, z, delta_bias))
        B, C = _grouped(B), _grouped(C)
        seq_idx = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        initial_state = None if initial_state is None else initial_state.float().contiguous()
        last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
        out, ckpt = _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                                  last, save_ckpt=any(ctx.needs_input_grad))
        ctx.softplus, ctx.has_init = delta_softplus, initial_state is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt = ctx.saved_tensors
        batch, dim, L = u.shape
        N = A.shape[1]
        grid, groups, dpg, meta = _launch_args(u, B, N)
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dA, dB, dC = torch.zeros(A.shape, **f32), torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        dD, dbias = torch.zeros(dim, **f32), torch.zeros(dim, **f32)
        dinit = torch.empty(batch, dim, N, **f32) if ctx.has_init else None
        scratch = torch.empty(grid[0] * grid[1] * (CHUNK + 1) * meta["BLOCK_D"] * meta["BLOCK_N"], **f32)
        dlast = None if dlast is None else dlast.float().contiguous()
        _scan_bwd_kernel[grid](
            u, delta, A, B, C, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias, u if seq_idx is None else seq_idx, ckpt,
            ckpt if dlast is None else dlast, dout.contiguous(), scratch,
            du, ddelta, dA, dB, dC, dD, u if dz is None else dz, dbias, ckpt if dinit is None else dinit,
            dim, L, N, groups, dpg, ckpt.shape[2], dim * N, N, 1,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            HAS_SEQ=seq_idx is not None, HAS_INIT=ctx.has_init, HAS_DLAST=dlast is not None, **meta,
        )
        B_shape, C_shape = ctx.shapes
        return (
            du, ddelta, dA.to(A.dtype), dB.reshape(B_shape).to(B.dtype), dC.reshape(C_shape).to(C.dtype),
            None if D is None else dD.to(D.dtype), dz, None if delta_bias is None else dbias.to(delta_bias.dtype),
            None, dinit, None,
        )


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None, seq_idx=None):
    """Mamba-1 selective scan (semantics: `reference.selective_scan_ref`), differentiable in every
    tensor input including `initial_state` (and through the returned last state)."""
    if not use_triton(u):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state=initial_state, seq_idx=seq_idx)
    y, last = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx)
    return (y, last) if return_last_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step of the scan: updates `state` (batch, dim, d_state) in place (no new state is
    allocated, so it is safe under CUDA graphs) and returns y (batch, dim).
    x, dt, z: (batch, dim); B, C: (batch, d_state) or (batch, groups, d_state)."""
    if not use_triton(x):
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    col = lambda t: None if t is None else t.unsqueeze(-1).contiguous()  # noqa: E731 (a one-step sequence)
    B, C = (BC if BC.dim() == 3 else BC.unsqueeze(1) for BC in (B, C))
    y, _ = _scan_forward(col(x), col(dt), A.contiguous(), col(B), col(C), _contiguous(D), col(z),
                         _contiguous(dt_bias), dt_softplus, state, None, state, save_ckpt=False)
    return y.squeeze(-1)
