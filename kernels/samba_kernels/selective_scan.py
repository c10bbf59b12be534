"""Mamba-1 selective scan in Triton, forward and backward, and its one-step decode form.

Chunked-parallel: one program owns BLOCK_D channels of one (batch, group) and all d_state, and
walks time in tiles of T steps. A tile's inputs (u, delta, z: (BLOCK_D, T); B, C: (d_state, T))
are loaded coalesced along time; the recurrence h_t = a_t h_{t-1} + b_t with a_t = exp(dt_t A)
and b_t = dt_t u_t B_t is solved inside the tile by `tl.associative_scan` over (a, b) pairs, in
(BLOCK_D, d_state, T) registers, then shifted by the state carried in from the previous tile.
A new document of `seq_idx` zeroes a_t. The forward saves the state entering each tile; the
backward walks the tiles in reverse, recomputes the tile's states from that checkpoint, and
solves the adjoint q_t = C_t g_t + a_{t+1} q_{t+1} with a reversed associative scan. Sums over
channels (dB, dC) and over batch (dA, dD, ddelta_bias) are written as per-program partials and
reduced with torch afterwards: no atomics, deterministic.
"""

import torch
import triton
import triton.language as tl

from ._common import block_size, use_triton
from .reference import selective_scan_ref, selective_state_update_ref

CHUNK = 8  # the time tile under Triton's interpreter (CPU tensors), where a scan step is a Python loop

# Tile shapes on a GPU: (BLOCK_D, T, num_warps). The training forward and the backward share T (the
# checkpoint spacing). BLOCK_D is halved (down to MIN_BLOCK_D) while too few programs fill the GPU.
# BLOCK_D * d_state >= 32 * num_warps keeps every warp on distinct (state, channel) pairs (time stays in-thread).
# Defaults: the fastest of benchmarks/kernels.py's sweep on an H200 (bf16, batch 8, dim 3072, length 4096).
GPU_FWD = dict(BLOCK_D=8, T=8, num_warps=2)  # forward without saving checkpoints
GPU_TRAIN = dict(T=16, fwd=dict(BLOCK_D=16, num_warps=4), bwd=dict(BLOCK_D=16, num_warps=4))
MIN_BLOCK_D, MIN_PROGRAMS = 4, 4 * 132
LOG2E = 1.4426950408889634


@triton.jit
def _lin(a1, b1, a2, b2):
    # Composition of x -> a1 x + b1 then x -> a2 x + b2 (earlier step first).
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _coords(dim, L, N, groups, dpg, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # A program never straddles two B/C groups, so B_t and C_t are (d_state, T) tiles.
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
def _softplus_dt(delta, off, mask, bias_v, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, dt) of delta at `off` (T, BLOCK_D); dt is 0 where masked (a = 1, b = 0: a no-op step)."""
    dt_raw = tl.load(delta + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias_v[None, :]
    dt = dt_raw
    if SOFTPLUS:
        dt = tl.where(dt_raw > 20.0, dt_raw, tl.log(1.0 + tl.exp(tl.minimum(dt_raw, 20.0))))
    return dt_raw, tl.where(mask, dt, 0.0)


@triton.jit
def _keep(seq_idx, b, L, t, valid):
    """(T,) 1.0 where step t continues the document of step t - 1, 0.0 where a new one starts."""
    cur = tl.load(seq_idx + b * L + t, mask=valid, other=0)
    prev = tl.load(seq_idx + b * L + tl.maximum(t - 1, 0), mask=valid, other=0)
    return (cur == prev).to(tl.float32)


@triton.jit
def _fwd_tile(u, delta, B, C, z, seq_idx, b, L, row, bc_row, bias_v, d_mask, n_mask, t,
              HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The inputs of the steps t (T,): u, dt_raw, dt, z (T, BLOCK_D), B, C (T, BLOCK_N), keep (T,);
    zeros outside [0, L)."""
    t_mask = (t >= 0) & (t < L)
    m2 = t_mask[:, None] & d_mask[None, :]
    off = row[None, :] + t[:, None]
    u_t = tl.load(u + off, mask=m2, other=0.0).to(tl.float32)
    dt_raw, dt = _softplus_dt(delta, off, m2, bias_v, HAS_BIAS, SOFTPLUS)
    tn_mask = t_mask[:, None] & n_mask[None, :]
    B_t = tl.load(B + bc_row[None, :] + t[:, None], mask=tn_mask, other=0.0).to(tl.float32)
    C_t = tl.load(C + bc_row[None, :] + t[:, None], mask=tn_mask, other=0.0).to(tl.float32)
    z_t = tl.load(z + off, mask=m2, other=0.0).to(tl.float32) if HAS_Z else u_t
    keep = _keep(seq_idx, b, L, t, t_mask) if HAS_SEQ else t_mask.to(tl.float32)
    return u_t, dt_raw, dt, B_t, C_t, z_t, keep


# Tiles are laid out (T, d_state, BLOCK_D): Triton's default layout spreads the last axes over lanes and
# warps, so each thread holds whole columns of time and the scans over time run inside a thread.
@triton.jit
def _scan_fwd_kernel(u, delta, A, B, C, D, z, delta_bias, seq_idx, init, last, ckpt, out,
                     dim, L, N, groups, dpg, n_tiles, s_hb, s_hd, s_hn,
                     T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                     SAVE_CKPT: tl.constexpr):
    b, d, d_mask, n, n_mask, row, bc_row = _coords(dim, L, N, groups, dpg, BLOCK_D, BLOCK_N)
    nd_mask = n_mask[:, None] & d_mask[None, :]
    A2 = tl.load(A + d[None, :] * N + n[:, None], mask=nd_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    bias_v = tl.load(delta_bias + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    D_v = tl.load(D + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    h_off = b * s_hb + d[None, :] * s_hd + n[:, None] * s_hn
    if HAS_INIT:
        h = tl.load(init + h_off, mask=nd_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    ckpt_off = (b * dim + d[None, :]) * n_tiles * N + n[:, None]
    tt = tl.arange(0, T)
    # Software prefetch: the loads of tile i + 1 are issued before tile i is computed.
    u_n, dtr_n, dt_n, B_n, C_n, z_n, k_n = _fwd_tile(u, delta, B, C, z, seq_idx, b, L, row, bc_row, bias_v, d_mask,
                                                     n_mask, tt, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ)
    for i in range(n_tiles):
        if SAVE_CKPT:  # the state entering each tile, for the backward
            tl.store(ckpt + ckpt_off + i * N, h, mask=nd_mask)
        u_t, dt, B_t, C_t, z_t, keep = u_n, dt_n, B_n, C_n, z_n, k_n
        t = i * T + tt
        m2 = (t < L)[:, None] & d_mask[None, :]
        off = row[None, :] + t[:, None]  # (T, BLOCK_D)
        u_n, dtr_n, dt_n, B_n, C_n, z_n, k_n = _fwd_tile(u, delta, B, C, z, seq_idx, b, L, row, bc_row, bias_v, d_mask,
                                                         n_mask, t + T, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        a = tl.exp2(dt[:, None, :] * A2[None, :, :])  # (T, BLOCK_N, BLOCK_D)
        if HAS_SEQ:
            a = a * keep[:, None, None]
        bb = (dt * u_t)[:, None, :] * B_t[:, :, None]
        a, bb = tl.associative_scan((a, bb), axis=0, combine_fn=_lin)
        hs = a * h[None, :, :] + bb  # the state after each step
        y = tl.sum(hs * C_t[:, :, None], axis=1)
        if HAS_D:
            y += D_v[None, :] * u_t
        if HAS_Z:
            y *= z_t * tl.sigmoid(z_t)
        tl.store(out + off, y, mask=m2)
        # Padded steps (t >= L) are no-ops, so the last row is the state after step min(L, t0 + T) - 1.
        h = tl.sum(tl.where((tt == T - 1)[:, None, None], hs, 0.0), axis=0)
    # `last` may be `init` itself (decode): each element is read above before it is written here.
    tl.store(last + h_off, h, mask=nd_mask)


@triton.jit
def _scan_bwd_kernel(u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt, dlast, dout,
                     du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part, dinit,
                     n_rows, dim, L, N, groups, dpg, n_tiles,
                     T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                     HAS_DLAST: tl.constexpr):
    b, d, d_mask, n, n_mask, row, bc_row = _coords(dim, L, N, groups, dpg, BLOCK_D, BLOCK_N)
    nd_mask = n_mask[:, None] & d_mask[None, :]
    A_v = tl.load(A + d[None, :] * N + n[:, None], mask=nd_mask, other=0.0).to(tl.float32)
    A2 = A_v * 1.4426950408889634
    bias_v = tl.load(delta_bias + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    D_v = tl.load(D + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    state_off = (b * dim + d[None, :]) * N + n[:, None]  # (batch, dim, d_state) tensors, as (BLOCK_N, BLOCK_D)
    ckpt_off = (b * dim + d[None, :]) * n_tiles * N + n[:, None]
    # This program's rows of the (channel blocks, batch * groups, d_state, length) partials of dB, dC.
    part_row = ((tl.program_id(1).to(tl.int64) * n_rows + tl.program_id(0)) * N + n) * L
    if HAS_DLAST:  # q: the adjoint of the state after the step just past the tile
        q = tl.load(dlast + state_off, mask=nd_mask, other=0.0).to(tl.float32)
    else:
        q = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    tt = tl.arange(0, T)
    t_n = (n_tiles - 1) * T + tt
    u_n, dtr_n, dt_n, B_n, C_n, z_n, k_n = _fwd_tile(u, delta, B, C, z, seq_idx, b, L, row, bc_row, bias_v, d_mask,
                                                     n_mask, t_n, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ)
    g_n = tl.load(dout + row[None, :] + t_n[:, None], mask=(t_n < L)[:, None] & d_mask[None, :], other=0.0)
    h0_n = tl.load(ckpt + ckpt_off + (n_tiles - 1) * N, mask=nd_mask, other=0.0)
    for i_rev in range(n_tiles):
        i = n_tiles - 1 - i_rev
        t = i * T + tt
        t_mask = t < L
        m2 = t_mask[:, None] & d_mask[None, :]
        tn_mask = t_mask[:, None] & n_mask[None, :]
        off = row[None, :] + t[:, None]
        u_t, dt_raw, dt, B_t, C_t, z_t, keep, g, h0 = u_n, dtr_n, dt_n, B_n, C_n, z_n, k_n, g_n.to(tl.float32), h0_n
        # Prefetch the previous tile (i - 1; masked off past the start).
        t_p = t - T
        u_n, dtr_n, dt_n, B_n, C_n, z_n, k_n = _fwd_tile(u, delta, B, C, z, seq_idx, b, L, row, bc_row, bias_v,
                                                         d_mask, n_mask, t_p, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        g_n = tl.load(dout + row[None, :] + t_p[:, None], mask=((t_p >= 0) & (t_p < L))[:, None] & d_mask[None, :],
                      other=0.0)
        h0_n = tl.load(ckpt + ckpt_off + tl.maximum(i - 1, 0) * N, mask=nd_mask, other=0.0)
        a = tl.exp2(dt[:, None, :] * A2[None, :, :])
        if HAS_SEQ:
            a = a * keep[:, None, None]
        dtu = dt * u_t
        bb = dtu[:, None, :] * B_t[:, :, None]
        ac, bc = tl.associative_scan((a, bb), axis=0, combine_fn=_lin)
        hs = ac * h0[None, :, :] + bc
        hp = hs - bb  # a_t h_{t-1}: the derivative of h_t in dt_t A
        if HAS_Z:  # out = y silu(z): recompute y for dz, then g becomes dL/dy
            y = tl.sum(hs * C_t[:, :, None], axis=1) + D_v[None, :] * u_t
            sz = tl.sigmoid(z_t)
            tl.store(dz + off, g * y * sz * (1.0 + z_t * (1.0 - sz)), mask=m2)
            g = g * z_t * sz
        # a_{t+1}: the decay of the next step (1 past the end: q_{L-1} = C g + dlast).
        t1_mask = (t + 1) < L
        m1 = t1_mask[:, None] & d_mask[None, :]
        _, dt1 = _softplus_dt(delta, off + 1, m1, bias_v, HAS_BIAS, SOFTPLUS)
        an = tl.exp2(dt1[:, None, :] * A2[None, :, :])
        if HAS_SEQ:
            an = an * _keep(seq_idx, b, L, t + 1, t1_mask)[:, None, None]
        qa, qb = tl.associative_scan((an, g[:, None, :] * C_t[:, :, None]), axis=0, combine_fn=_lin, reverse=True)
        qs = qa * q[None, :, :] + qb  # dL/dh_t
        q = tl.sum(tl.where((tt == 0)[:, None, None], qs, 0.0), axis=0)
        dexp = qs * hp  # adjoint of dt_t A
        dA_acc += tl.sum(dexp * dt[:, None, :], axis=0)
        qB = tl.sum(qs * B_t[:, :, None], axis=1)  # adjoint of dt_t u_t, (T, BLOCK_D)
        ddt = tl.sum(dexp * A_v[None, :, :], axis=1) + qB * u_t
        if SOFTPLUS:
            ddt *= tl.sigmoid(dt_raw)
        ddt = tl.where(m2, ddt, 0.0)
        du_t = qB * dt
        if HAS_D:
            du_t += g * D_v[None, :]
            dD_acc += tl.sum(g * u_t, axis=0)
        dbias_acc += tl.sum(ddt, axis=0)
        tl.store(du + off, du_t, mask=m2)
        tl.store(ddelta + off, ddt, mask=m2)
        p_off = part_row[None, :] + t[:, None]  # (T, BLOCK_N)
        tl.store(dB_part + p_off, tl.sum(qs * dtu[:, None, :], axis=2), mask=tn_mask)
        tl.store(dC_part + p_off, tl.sum(g[:, None, :] * hs, axis=2), mask=tn_mask)
    if HAS_INIT:  # h_0 = a_0 h_init + b_0
        _, dt0 = _softplus_dt(delta, row[None, :] + tl.zeros([1, 1], dtype=tl.int64), d_mask[None, :], bias_v,
                              HAS_BIAS, SOFTPLUS)
        tl.store(dinit + state_off, q * tl.exp2(dt0 * A2), mask=nd_mask)
    tl.store(dA_part + state_off, dA_acc, mask=nd_mask)
    if HAS_D:
        tl.store(dD_part + b * dim + d, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_part + b * dim + d, dbias_acc, mask=d_mask)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _grouped(BC: torch.Tensor) -> torch.Tensor:
    return (BC if BC.dim() == 4 else BC.unsqueeze(1)).contiguous()


def _block_d(cap, n_rows, dpg, on_gpu):
    bd = block_size(dpg, cap)
    while on_gpu and bd > MIN_BLOCK_D and n_rows * triton.cdiv(dpg, bd) < MIN_PROGRAMS:
        bd //= 2
    return bd


def _configs(u, B, N, train):
    """(groups, dims per group, forward launch meta, backward launch meta or None) of a scan over u."""
    batch, dim, L = u.shape
    groups = B.shape[1]
    if dim % groups != 0:
        raise ValueError(f"dim ({dim}) must be divisible by the number of B/C groups ({groups})")
    dpg, n_rows, BLOCK_N = dim // groups, batch * groups, block_size(N, 256)
    if not u.is_cuda:  # the interpreter: one small tile shape
        meta = dict(T=max(2, min(CHUNK, triton.next_power_of_2(L))), BLOCK_D=block_size(dpg, 4),
                    BLOCK_N=BLOCK_N, num_warps=1)
        return groups, dpg, meta, dict(meta) if train else None

    def meta(c, T):  # T shrinks for short sequences (decode: one step)
        bd = _block_d(c["BLOCK_D"], n_rows, dpg, True)
        warps = max(1, min(c["num_warps"], bd * BLOCK_N // 32))  # no warp spread over time
        return dict(T=max(2, min(T, triton.next_power_of_2(L))), BLOCK_D=bd, BLOCK_N=BLOCK_N, num_warps=warps)

    if not train:
        return groups, dpg, meta(GPU_FWD, GPU_FWD["T"]), None
    T = GPU_TRAIN["T"]
    return groups, dpg, meta(GPU_TRAIN["fwd"], T), meta(GPU_TRAIN["bwd"], T)


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, seq_idx, last, save_ckpt):
    """Launches the forward on contiguous u, delta, z (batch, dim, length) and B, C (batch, groups,
    d_state, length); writes the final state into `last` (which may be `initial_state`).
    Returns (out, checkpoints, backward launch meta or None)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    groups, dpg, meta, bwd_meta = _configs(u, B, N, save_ckpt)
    if initial_state is not None and initial_state.stride() != last.stride():
        raise ValueError("initial_state and the last state must have the same strides")
    n_tiles = triton.cdiv(L, meta["T"])
    ckpt = u.new_empty((batch, dim, n_tiles, N) if save_ckpt else (1,), dtype=torch.float32)
    out = torch.empty_like(u)
    grid = (batch * groups, triton.cdiv(dpg, meta["BLOCK_D"]))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, u if D is None else D, u if z is None else z,
        u if delta_bias is None else delta_bias, u if seq_idx is None else seq_idx,
        last if initial_state is None else initial_state, last, ckpt, out,
        dim, L, N, groups, dpg, n_tiles, *last.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        HAS_SEQ=seq_idx is not None, HAS_INIT=initial_state is not None, SAVE_CKPT=save_ckpt, **meta,
    )
    return out, ckpt, bwd_meta


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
        out, ckpt, ctx.bwd_meta = _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                                seq_idx, last, save_ckpt=any(ctx.needs_input_grad))
        ctx.softplus, ctx.has_init = delta_softplus, initial_state is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt = ctx.saved_tensors
        batch, dim, L = u.shape
        N, groups, meta = A.shape[1], B.shape[1], ctx.bwd_meta
        dpg = dim // groups
        n_dblocks = triton.cdiv(dpg, meta["BLOCK_D"])
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dA_part = torch.empty(batch, dim, N, **f32)
        dB_part = torch.empty(n_dblocks, batch * groups, N, L, **f32)
        dC_part = torch.empty(n_dblocks, batch * groups, N, L, **f32)
        dD_part = torch.empty(batch, dim, **f32) if D is not None else None
        dbias_part = torch.empty(batch, dim, **f32) if delta_bias is not None else None
        dinit = torch.empty(batch, dim, N, **f32) if ctx.has_init else None
        dlast = None if dlast is None else dlast.float().contiguous()
        _scan_bwd_kernel[(batch * groups, n_dblocks)](
            u, delta, A, B, C, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias, u if seq_idx is None else seq_idx, ckpt,
            ckpt if dlast is None else dlast, dout.contiguous(),
            du, ddelta, u if dz is None else dz, dA_part, dB_part, dC_part,
            dA_part if dD_part is None else dD_part, dA_part if dbias_part is None else dbias_part,
            ckpt if dinit is None else dinit,
            batch * groups, dim, L, N, groups, dpg, ckpt.shape[2],
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.softplus,
            HAS_SEQ=seq_idx is not None, HAS_INIT=ctx.has_init, HAS_DLAST=dlast is not None, **meta,
        )
        B_shape, C_shape = ctx.shapes
        dB = dB_part.sum(0) if n_dblocks > 1 else dB_part[0]
        dC = dC_part.sum(0) if n_dblocks > 1 else dC_part[0]
        return (
            du, ddelta, dA_part.sum(0).to(A.dtype), dB.reshape(B_shape).to(B.dtype), dC.reshape(C_shape).to(C.dtype),
            None if D is None else dD_part.sum(0).to(D.dtype), dz,
            None if delta_bias is None else dbias_part.sum(0).to(delta_bias.dtype),
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
    y, _, _ = _scan_forward(col(x), col(dt), A.contiguous(), col(B), col(C), _contiguous(D), col(z),
                            _contiguous(dt_bias), dt_softplus, state, None, state, save_ckpt=False)
    return y.squeeze(-1)
