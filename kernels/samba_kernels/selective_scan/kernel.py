"""Mamba-1 selective scan in Triton, forward and backward, and its one-step decode form.

One program owns BLOCK_D channels of one (batch, group) and walks time in tiles of T steps. The
channels are spread over lanes and each thread holds a run of time of its channels, so the tile's
inputs (u, delta, z, dout: (BLOCK_D, T)) load as wide vectors and every per-channel operation stays
inside a thread: the recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t u_t B_t) is a
`tl.associative_scan` over time within the thread, and the states are visited one at a time (a
loop over d_state), so y_t = sum_n C_t[n] h_t[n] accumulates in registers without a sum across
threads. Between tiles the states (and the backward's adjoints) stay in registers: state n is
column n of a (BLOCK_D, T) tile, so T >= d_state.

The training forward saves the state entering each of the backward's tiles; the backward walks them in reverse,
recomputes each state's trajectory from that checkpoint and solves the adjoint
q_t = C_t g_t + a_{t+1} q_{t+1} with a scan of the time-reversed tile. Sums over channels (dB, dC) and over batch
(dA, dD, ddelta_bias) are written as per-program partials and reduced with torch afterwards: no
atomics, deterministic. A new document of `seq_idx` zeroes a_t.

The forward has a second layout where there are enough channels to fill the GPU
(`_scan_fwd_lanes_kernel`, for inference and training): a channel's states in one lane (or split over two or
four), with a tile of steps in the thread, so the recurrence is one multiply-add per state and step.

Where batch x channels cannot fill the GPU (a long sequence at batch 1 or 2), the scan splits the sequence into
chunks that run in parallel. `_chunk_summary_kernel` scans each chunk from a zero state and keeps its end state
and its decay, exp(A sum dt) (zero where a document starts inside it). The state entering chunk c is then
h_c = decay_{c-1} h_{c-1} + end_{c-1}, composed at the start of each chunk's program from the summaries of the
chunks before it, and the lanes forward scans every chunk again from its entering state. The backward splits the
same way in reverse: the adjoint that leaves chunk c through its first step, from zero, is
p = a_t (p + C_t g_t) over the chunk's steps taken backwards, and the tile backward starts each chunk from the
adjoints of the chunks after it. A split costs a second exponential per (step, channel, state) on all chunks but
one; the cost model of `_forward_layout` weighs it against the lanes that would idle without it.
"""

import contextlib
import contextvars
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .._common import block_size, cdiv, contiguous, eager_autograd, next_power_of_2, use_triton
from .naive import selective_scan_ref, selective_state_update_ref

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x LOG2E)
CHUNK = 8  # the time tile under Triton's interpreter (CPU tensors), where a scan step is a Python loop

# Tile shapes on a GPU: (BLOCK_D channels, spread over the lanes of num_warps warps) x (T steps).
# The training forward and the backward share T (the checkpoint spacing). BLOCK_D is halved (down to
# MIN_BLOCK_D) while fewer than PROGRAMS_PER_SM programs per SM fill the GPU. Defaults: the fastest of sweeps at
# batch 8, length 4096 (docs/performance-notes.md, Selective scan).
# NU: states per iteration of the loop over d_state (unrolled; more independent work, more registers).
# maxnreg: a register cap. The forwards' NU 8 fits 128 registers without spilling (offline sm_90
# compile), so 16 one-warp programs share an SM; NU 16 took 167 (12 per SM): 3% faster at samba-421m's
# shape, 19% slower at samba-1.3b's, whose 2048 programs then need a second, mostly idle wave. The
# backward's caps: at 168 (its NU 4 would take more) it spills a few loop-invariant values outside the state
# loop, at 128 a few inside it (offline sm_90 compiles).
GPU_FWD = dict(BLOCK_D=16, T=16, NU=8, num_warps=1, maxnreg=128)  # forward without saving checkpoints
GPU_TRAIN = dict(
    T=16, fwd=dict(BLOCK_D=16, NU=8, num_warps=1, maxnreg=128), bwd=dict(BLOCK_D=16, NU=4, num_warps=1, maxnreg=168)
)
MIN_BLOCK_D, PROGRAMS_PER_SM = 1, 8
# Each of the backward's programs walks the whole sequence, so a grid with more warps than the GPU holds at once
# runs a second, mostly idle wave. Its register cap is the largest of BWD_REGISTER_CAPS under which every warp
# is resident at once (168: 12 warps per SM, 128: 16), else the first. Where BLOCK_D is halved (small batches),
# a channel's steps spread over more lanes and NU 4 spills: NU is BWD_SMALL_BLOCK_NU there. At each shape of
# docs/performance-notes.md the rule picks the fastest of six (NU, cap) pairs.
BWD_REGISTER_CAPS = (168, 128)
BWD_SMALL_BLOCK_NU = 1
# Where there are enough channels, the forward runs _scan_fwd_lanes_kernel: one warp on BLOCK_D channels, a
# thread's steps in tiles of T 8 (16-byte loads); for training it saves a checkpoint every T_backward / T tiles.
# With BLOCK_D 32 a lane holds one channel's states; with 16 or 8, two or four lanes split them and the channel's
# per-step work, so a warp takes more than a half or a quarter of the time. LANE_COST: a warp's time per step at
# each BLOCK_D relative to 32 (bf16, docs/performance-notes.md). Each SM sub-partition runs its warps in
# turn, so the forward takes about LANE_COST x ceil(warps / sub-partitions) per step; of the BLOCK_D that give
# every sub-partition a warp, the one with the least of that is used. Fewer channels (batch-1 prefill) keep
# _scan_fwd_kernel, whose lanes share the steps of fewer channels, or split the sequence (below).
LANES = dict(T=8, num_warps=1)
LANE_COST = {32: 1.0, 16: 0.56, 8: 0.48}
# y's sum over the states, per BLOCK_D: the partial sums it takes (chains of multiply-adds between them). BLOCK_D 32,
# bound by issue and the MUFU pipe together, takes two chains; 16 and 8, which wait on latency, a tree of adds
# (more instructions, shorter dependences): docs/performance-notes.md.
LANE_Y_PARTS = {32: 2, 16: 16, 8: 16}
# The split scan's cost model, in LANE_COST's unit (a BLOCK_D-32 warp's time per step):
# - STEPS_COST: _scan_fwd_kernel's time per step where it runs (batches too small for the lanes forward);
# - SUMMARY_COST: _chunk_summary_kernel's warp time per step at each BLOCK_D (a lanes step without C, y and z);
# - SPLIT_OVERHEAD: a split's fixed cost in steps (a second launch; each chunk composes its entering state);
# - MIN_CHUNK, BWD_MIN_CHUNK: the shortest chunks, in steps, of the forward and the backward; MAX_CHUNKS bounds
#   the composition, whose work grows with the square of the number of chunks.
# The forward takes the cheapest of: the unsplit forward (lanes where it fills the GPU, else steps) and every
# split into n chunks that fills it. The values are the first estimates, whose picks the kernels benchmark
# measured (benchmarks/results/kernels.md; the fitted ones: docs/performance-notes.md);
# benchmarks/scan_split_calibration.py measures every layout and prints fitted values.
STEPS_COST = 0.6
SUMMARY_COST = {32: 0.8, 16: 0.45, 8: 0.4}
SPLIT_OVERHEAD = 64
MIN_CHUNK, BWD_MIN_CHUNK, MAX_CHUNKS = 256, 512, 64
# The backward splits sequences of BWD_SPLIT_MIN_LENGTH steps or more where, unsplit, its programs would fill a
# third of PROGRAMS_PER_SM per SM or less (batch 1 and 2 at the model's widths): into the power of two of chunks
# at or above what makes PROGRAMS_PER_SM programs per SM. GPU time of fwd+bwd on the H200 in bf16 (torch.profiler,
# commit 5141dde; docs/performance-notes.md): 1 x 3072 x 4K 1.20 ms unsplit, 0.84 in 8 chunks; 2 x 4K 1.87 against
# 1.67 in 4; 1 x 16K 4.70 against 3.20 in 8; 8 x 4K 5.27 unsplit, 5.43 in 2 chunks. Chunk counts that are not
# powers of two were slower (benchmarks/results/scan_split_calibration.json).
BWD_SPLIT_MIN_LENGTH = 4096
SUB_PARTITIONS_PER_SM = 4  # warp schedulers per SM (every NVIDIA architecture since Volta)
# CPU tensors (the interpreter) plan their launches as the GPU the constants were measured on would
# (benchmarks/results/kernels.md): 132 SMs.
INTERPRETER_SMS = 132


def _sm_count(device: torch.device) -> int:
    """The SMs that a launch on `device` may fill."""
    return _cuda_sm_count(device) if device.type == "cuda" else INTERPRETER_SMS


@functools.cache
def _cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclasses.dataclass(frozen=True)
class _Forced:
    forward: str | None
    block_d: int | None
    chunk_length: int | None
    backward_chunk_length: int | None


_FORCED = contextvars.ContextVar("samba_kernels.selective_scan.forced_layout", default=None)


@contextlib.contextmanager
def forced_layout(
    forward: str | None = None,
    *,
    block_d: int | None = None,
    chunk_length: int | None = None,
    backward_chunk_length: int | None = None,
):
    """Within the block, scans launch the given layout instead of the cost model's choice (for benchmarks and
    tests; the results do not change, only the kernels that compute them).

    forward: "steps" (`_scan_fwd_kernel`) or "lanes" (`_scan_fwd_lanes_kernel`); None leaves it to the cost
        model, which also decides whatever of the following is left as None.
    block_d: the lanes forward's BLOCK_D, one of LANE_COST's keys.
    chunk_length: the lanes forward's chunk length in steps, rounded up to a whole number of its tiles; a
        length of the sequence or more is one chunk (no split).
    backward_chunk_length: the backward's chunk length in steps, rounded up to a whole number of its tiles.

        with selective_scan.forced_layout("lanes", block_d=32, chunk_length=4096, backward_chunk_length=4096):
            y = selective_scan_fn(...)
    """
    if forward not in (None, "steps", "lanes"):
        raise ValueError(f"forward must be None, 'steps' or 'lanes', got {forward!r}")
    if forward == "steps" and (block_d is not None or chunk_length is not None):
        raise ValueError("block_d and chunk_length choose the lanes forward's layout: force forward='lanes'")
    if block_d is not None and block_d not in LANE_COST:
        raise ValueError(f"block_d must be one of {sorted(LANE_COST)}, got {block_d}")
    for name, length in (("chunk_length", chunk_length), ("backward_chunk_length", backward_chunk_length)):
        if length is not None and length < 1:
            raise ValueError(f"{name} must be a positive number of steps, got {length}")
    token = _FORCED.set(_Forced(forward, block_d, chunk_length, backward_chunk_length))
    try:
        yield
    finally:
        _FORCED.reset(token)


def _lanes_block(n_rows, dpg, sms):
    """BLOCK_D of the lanes forward over n_rows x dpg channels, or None where no BLOCK_D fills `sms` SMs."""
    slots = SUB_PARTITIONS_PER_SM * sms
    warps = {bd: n_rows * cdiv(dpg, bd) for bd in LANE_COST}
    time = {bd: cost * cdiv(warps[bd], slots) for bd, cost in LANE_COST.items() if warps[bd] >= slots}
    return min(time, key=time.get, default=None)


def _chunks(L, chunk_length, align):
    """(chunk length rounded up to `align`, number of chunks) of a sequence of L steps."""
    chunk = cdiv(min(chunk_length, L), align) * align
    return chunk, cdiv(L, chunk)


def _summary_block(n_rows, dpg, chunks, slots):
    """(cost per step, BLOCK_D) of _chunk_summary_kernel over `chunks` chunks: the cheapest BLOCK_D of those that
    fill the GPU, else the one with the most warps."""
    warps = {bd: n_rows * cdiv(dpg, bd) * chunks for bd in SUMMARY_COST}
    costs = {bd: (SUMMARY_COST[bd] * cdiv(warps[bd], slots), bd) for bd in SUMMARY_COST if warps[bd] >= slots}
    return min(costs.values(), default=(SUMMARY_COST[min(SUMMARY_COST)], min(SUMMARY_COST)))


def _forward_cost(n_rows, dpg, L, kernel, block_d, chunk, slots):
    """The cost model's time of a forward of L steps over n_rows x dpg channels on `slots` SM sub-partitions, in
    LANE_COST's unit: `kernel` "steps", or "lanes" at BLOCK_D `block_d` in chunks of `chunk` steps."""
    if kernel == "steps":
        return STEPS_COST * L
    chunks = cdiv(L, chunk)
    cost = LANE_COST[block_d] * cdiv(n_rows * cdiv(dpg, block_d) * chunks, slots) * min(chunk, L)
    if chunks > 1:
        cost += _summary_block(n_rows, dpg, chunks - 1, slots)[0] * chunk + SPLIT_OVERHEAD
    return cost


@functools.cache
def _best_split(n_rows, dpg, L, align, slots, block_d):
    """(cost, BLOCK_D, chunk length) of the cheapest split forward of L steps that fills the GPU (BLOCK_D
    `block_d`, or any where None), or None where L is too short to split. Cached: a script that changes the
    cost model's constants calls _best_split.cache_clear() (and _gpu_plan's)."""
    splits = set()
    for wanted in range(2, min(MAX_CHUNKS, L // MIN_CHUNK) + 1):
        chunk, chunks = _chunks(L, cdiv(L, wanted), align)
        for bd in LANE_COST if block_d is None else (block_d,):
            if chunks > 1 and n_rows * cdiv(dpg, bd) * chunks >= slots:
                splits.add((_forward_cost(n_rows, dpg, L, "lanes", bd, chunk, slots), bd, chunk))
    return min(splits, key=lambda split: (split[0], -split[2]), default=None)  # at equal cost, fewer chunks


def _forward_layout(n_rows, dpg, L, align, sms):
    """(kernel, BLOCK_D of the lanes forward, chunk length) of the forward on `sms` SMs: see STEPS_COST and
    forced_layout."""
    slots = SUB_PARTITIONS_PER_SM * sms
    forced = _FORCED.get() or _Forced(None, None, None, None)
    if forced.forward == "steps":
        return "steps", None, L
    if forced.chunk_length is not None:  # a forced split (or none): the BLOCK_D forced, else the cheapest for it
        chunk = _chunks(L, forced.chunk_length, align)[0]
        cost = lambda bd: _forward_cost(n_rows, dpg, L, "lanes", bd, chunk, slots)  # noqa: E731
        return "lanes", forced.block_d or min(LANE_COST, key=cost), chunk
    block = forced.block_d or _lanes_block(n_rows, dpg, sms)
    if block is not None:
        unsplit = ("lanes", block, L)
    elif forced.forward == "lanes":  # the lanes forward that fills the GPU least badly
        return "lanes", min(LANE_COST), L
    else:
        unsplit = ("steps", None, L)
    split = _best_split(n_rows, dpg, L, align, slots, forced.block_d)
    if split is None or _forward_cost(n_rows, dpg, L, *unsplit, slots) <= split[0]:
        return unsplit
    return "lanes", split[1], split[2]


def _backward_chunk(n_rows, dpg, L, cap, sms):
    """The backward's chunk length in steps before its rounding to whole tiles (L: no split), for BLOCK_D `cap`
    on `sms` SMs."""
    forced = _FORCED.get()
    if forced is not None and forced.backward_chunk_length is not None:
        return forced.backward_chunk_length
    wanted = cdiv(PROGRAMS_PER_SM * sms, n_rows * cdiv(dpg, cap))
    if wanted < 3 or L < BWD_SPLIT_MIN_LENGTH:
        return L
    n = min(next_power_of_2(wanted), L // BWD_MIN_CHUNK, MAX_CHUNKS)
    return L if n < 2 else cdiv(L, n)


@triton.jit
def _lin(a1, b1, a2, b2):
    # Composition of x -> a1 x + b1 then x -> a2 x + b2 (earlier step first).
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _coords(dim, L, N, groups, dpg, BLOCK_D: tl.constexpr):
    """(batch, channels d (BLOCK_D,), their mask, offsets of d in (batch, dim, length) tensors, offset
    of this (batch, group)'s state 0 in (batch, groups, d_state, length) tensors)."""
    pid_bg = tl.program_id(0).to(tl.int64)  # a program never straddles two B/C groups
    b = pid_bg // groups
    j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d = (pid_bg % groups) * dpg + j
    return b, d, j < dpg, (b * dim + d) * L, pid_bg * N * L


@triton.jit
def _channel_params(delta_bias_ptr, D_ptr, d, d_mask, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """delta_bias and D of channels d (BLOCK_D,) in float32, 0.0 where absent."""
    bias_v = tl.load(delta_bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    D_v = tl.load(D_ptr + d, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else 0.0
    return bias_v, D_v


@triton.jit
def _dt(delta_raw, mask, bias_v, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias) in float32 of a loaded (BLOCK_D, T) tile of delta; 0 where masked
    (a = 1, b = 0: a no-op step)."""
    dt = delta_raw.to(tl.float32)
    if HAS_BIAS:
        dt += bias_v[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask, dt, 0.0)


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], with log1p(e) = 2 atanh(s) summed as
    its series in s = e / (2 + e) <= 1/3, to s^13 / 13 (the next term is below float32's precision). Two MUFU
    operations and ~15 instructions: tl.log's range reduction and polynomial took ~25."""
    e = tl.exp2(-tl.abs(x) * LOG2E)
    s = e / (2.0 + e)
    s2 = s * s
    series = 1.0 / 13.0
    for k in tl.static_range(5, -1, -1):  # Horner in s^2: 1/11, 1/9, ..., 1/1
        series = series * s2 + 1.0 / (2 * k + 1)
    return tl.maximum(x, 0.0) + 2.0 * s * series


@triton.jit
def _gate(y, z):
    """y silu(z) as y z / (1 + exp2(-z LOG2E)): tl.sigmoid's exp and separate products took 19 more of the 738
    instructions of a BLOCK_D 16 lanes tile (sm_90)."""
    return y * z / (1.0 + tl.exp2(z * -LOG2E))


@triton.jit
def _keep(seq_idx_ptr, b, L, t, t_mask):
    """(T,) 1.0 where step t continues the document of step t - 1, 0.0 where a new one starts."""
    cur = tl.load(seq_idx_ptr + b * L + t, mask=t_mask, other=0)
    prev = tl.load(seq_idx_ptr + b * L + tl.maximum(t - 1, 0), mask=t_mask, other=0)
    return (cur == prev).to(tl.float32)


@triton.jit
def _in_range(d_mask, t, L):
    """(BLOCK_D, T) mask of the channels d and the steps t inside [0, L)."""
    return d_mask[:, None] & ((t >= 0) & (t < L))[None, :]


@triton.jit
def _loads(u_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, t, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The per-channel inputs of steps t (T,) as stored: u, delta, z (BLOCK_D, T), zeros outside [0, L),
    and keep (T,). The forwards load a tile ahead and convert (`_values`) only in the next iteration: work
    on the loaded values in the same iteration would wait for the load."""
    t_mask = (t >= 0) & (t < L)
    tile_mask = d_mask[:, None] & t_mask[None, :]
    tile_off = row_off[:, None] + t[None, :]
    u_raw = tl.load(u_ptr + tile_off, mask=tile_mask, other=0.0)
    delta_raw = tl.load(delta_ptr + tile_off, mask=tile_mask, other=0.0)
    z_raw = tl.load(z_ptr + tile_off, mask=tile_mask, other=0.0) if HAS_Z else u_raw
    keep = _keep(seq_idx_ptr, b, L, t, t_mask) if HAS_SEQ else t_mask.to(tl.float32)
    return u_raw, delta_raw, z_raw, keep


@triton.jit
def _values(u_raw, delta_raw, z_raw, d_mask, t, L, bias_v, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u, dt, z (BLOCK_D, T) in float32 of `_loads`' tiles of steps t."""
    return (
        u_raw.to(tl.float32),
        _dt(delta_raw, _in_range(d_mask, t, L), bias_v, HAS_BIAS, SOFTPLUS),
        z_raw.to(tl.float32),
    )


@triton.jit
def _tile(
    u_ptr,
    delta_ptr,
    z_ptr,
    seq_idx_ptr,
    b,
    L,
    row_off,
    d_mask,
    bias_v,
    t,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
):
    """u, dt, z (BLOCK_D, T) in float32 and keep (T,) of steps t, loaded and converted at once."""
    u_raw, delta_raw, z_raw, keep = _loads(
        u_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, t, HAS_Z, HAS_SEQ
    )
    u_t, dt, z_t = _values(u_raw, delta_raw, z_raw, d_mask, t, L, bias_v, HAS_BIAS, SOFTPLUS)
    return u_t, dt, z_t, keep


@triton.jit
def _decay(dt, A2_n, keep, HAS_SEQ: tl.constexpr):
    a = tl.exp2(dt * A2_n[:, None])
    if HAS_SEQ:
        a = a * keep[None, :]
    return a


@triton.jit
def _trajectory(decay, b, h0):
    """The states after each step of a (BLOCK_D, T) tile, h_t = decay_t h_{t-1} + b_t from h0 (BLOCK_D,). h0 enters
    as part of the first step's b, so the scan's products of decays are only used inside it (and their final
    multiply-adds drop out)."""
    first = (tl.arange(0, b.shape[1]) == 0)[None, :]
    _, h = tl.associative_scan((decay, tl.where(first, decay * h0[:, None] + b, b)), axis=1, combine_fn=_lin)
    return h


@triton.jit
def _col(x, tt, n):
    """Column n of a (BLOCK_D, T) tile: a register pick where n is known at compile time."""
    return tl.sum(tl.where((tt == n)[None, :], x, 0.0), axis=1)


@triton.jit
def _scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    delta_bias_ptr,
    seq_idx_ptr,
    init_ptr,
    last_ptr,
    ckpt_ptr,
    out_ptr,
    dim,
    L,
    groups,
    dpg,
    n_tiles,
    s_hb,
    s_hd,
    s_hn,
    N: tl.constexpr,
    NU: tl.constexpr,
    T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    HAS_INIT: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
):
    b, d, d_mask, row_off, bc_off = _coords(dim, L, N, groups, dpg, BLOCK_D)
    bias_v, D_v = _channel_params(delta_bias_ptr, D_ptr, d, d_mask, HAS_BIAS, HAS_D)
    tt = tl.arange(0, T)
    # The states of each channel live in registers, state n in column n of a (BLOCK_D, T) tile (T >= N).
    st_off = b * s_hb + d[:, None] * s_hd + tt[None, :] * s_hn
    st_mask = d_mask[:, None] & (tt < N)[None, :]
    if HAS_INIT:
        h = tl.load(init_ptr + st_off, mask=st_mask, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, T], dtype=tl.float32)
    ckpt_tiles_ptr = ckpt_ptr + (b * dim + d[:, None]) * n_tiles * N + tt[None, :]
    # Software prefetch: the loads of tile i + 1 are issued before tile i is computed.
    u_raw, delta_raw, z_raw, k_n = _loads(
        u_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, tt, HAS_Z, HAS_SEQ
    )
    for i in range(n_tiles):
        if SAVE_CKPT:  # the states entering each tile, for the backward
            tl.store(ckpt_tiles_ptr + i * N, h, mask=st_mask)
        t = i * T + tt
        t_mask = t < L
        u_t, dt, z_t = _values(u_raw, delta_raw, z_raw, d_mask, t, L, bias_v, HAS_BIAS, SOFTPLUS)
        keep = k_n
        u_raw, delta_raw, z_raw, k_n = _loads(
            u_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, t + T, HAS_Z, HAS_SEQ
        )
        dtu = dt * u_t
        y = D_v[:, None] * u_t if HAS_D else tl.zeros([BLOCK_D, T], dtype=tl.float32)
        for n0 in range(0, N, NU):  # NU states at a time: enough independent work, not all N live at once
            for k in tl.static_range(NU):
                n = n0 + k
                A2_n = tl.load(A_ptr + d * N + n, mask=d_mask, other=0.0).to(tl.float32) * LOG2E
                B_n = tl.load(B_ptr + bc_off + n * L + t, mask=t_mask, other=0.0).to(tl.float32)
                C_n = tl.load(C_ptr + bc_off + n * L + t, mask=t_mask, other=0.0).to(tl.float32)
                hs = _trajectory(_decay(dt, A2_n, keep, HAS_SEQ), dtu * B_n[None, :], _col(h, tt, n))
                y += hs * C_n[None, :]
                # Padded steps (t >= L) are no-ops, so the last column is the state after step min(L, t0 + T) - 1.
                h = tl.where((tt == n)[None, :], _col(hs, tt, T - 1)[:, None], h)
        if HAS_Z:
            y = _gate(y, z_t)
        tl.store(out_ptr + row_off[:, None] + t[None, :], y, mask=d_mask[:, None] & t_mask[None, :])
    # `last` may be `init` itself (decode): it was read above, before this write.
    tl.store(last_ptr + st_off, h, mask=st_mask)


@triton.jit
def _scan_fwd_lanes_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    delta_bias_ptr,
    seq_idx_ptr,
    init_ptr,
    last_ptr,
    ckpt_ptr,
    out_ptr,
    ends_ptr,
    decays_ptr,
    dim,
    L,
    groups,
    dpg,
    n_tiles,
    chunk_tiles,
    s_hb,
    s_hd,
    s_hn,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    HAS_INIT: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
    CKPT_EVERY: tl.constexpr,
    Y_PARTS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """The forward with a channel's states in one lane (BLOCK_D 32: one warp) or split over two or four (BLOCK_D 16
    or 8): a thread holds its states of the channel and the tile's steps (T), so each step is one multiply-add per
    state (the steps are unrolled; picking step s of a tile is a register pick) and y's sum over the states stays
    in the thread or the lanes of its channel.
    B and C of the tile are the same for every channel; Triton's layout conversion hands them to each lane
    through shared memory. _scan_fwd_kernel's arguments and results; the backward's tiles span CKPT_EVERY
    of these, so the checkpoints are the states entering every CKPT_EVERY-th tile.
    Program axis 2 walks chunk c of the sequence (chunk_tiles tiles); where SPLIT (more than one chunk), `ends` and
    `decays` (batch, dim, chunks, d_state) hold _chunk_summary_kernel's summaries of every chunk but the last."""
    b, d, d_mask, row_off, bc_off = _coords(dim, L, N, groups, dpg, BLOCK_D)
    c = tl.program_id(2)
    n_chunks = tl.num_programs(2)
    bias_v, D_v = _channel_params(delta_bias_ptr, D_ptr, d, d_mask, HAS_BIAS, HAS_D)
    nn = tl.arange(0, BLOCK_N)
    tt = tl.arange(0, T)
    st_mask = d_mask[:, None] & (nn < N)[None, :]
    st_off = b * s_hb + d[:, None] * s_hd + nn[None, :] * s_hn
    A2 = tl.load(A_ptr + d[:, None] * N + nn[None, :], mask=st_mask, other=0.0).to(tl.float32) * LOG2E
    if HAS_INIT:
        h = tl.load(init_ptr + st_off, mask=st_mask, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if SPLIT:  # compiled out of unsplit launches, whose registers it would crowd (offline sm_90 compile)
        # The state entering chunk c: each earlier chunk's end state from zero, carried through the chunks after it.
        summary_off = (b * dim + d[:, None]) * n_chunks * N + nn[None, :]
        for j in range(c):
            h = tl.load(decays_ptr + summary_off + j * N, mask=st_mask, other=0.0) * h + tl.load(
                ends_ptr + summary_off + j * N, mask=st_mask, other=0.0
            )
    # B and C of a tile in one (2 BLOCK_N, T) load, row 2n from B[n] and row 2n + 1 from C[n]: each step's
    # B and C then reach the lanes in one layout conversion.
    rr = tl.arange(0, 2 * BLOCK_N)
    bc_rows_ptr = tl.where((rr % 2 == 0)[:, None], B_ptr, C_ptr) + bc_off + (rr // 2)[:, None] * L
    bc_mask = ((rr // 2) < N)[:, None]
    ckpt_tiles_ptr = ckpt_ptr + (b * dim + d[:, None]) * tl.cdiv(n_tiles, CKPT_EVERY) * N + nn[None, :]
    first = c * chunk_tiles
    # Software prefetch of tile i + 1's inputs as stored, converted in the next iteration (see `_loads`).
    t_next = first * T + tt
    u_raw, delta_raw, z_raw, k_n = _loads(
        u_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, t_next, HAS_Z, HAS_SEQ
    )
    BC_raw = tl.load(bc_rows_ptr + t_next[None, :], mask=bc_mask & (t_next < L)[None, :], other=0.0)
    for i in range(first, tl.minimum(first + chunk_tiles, n_tiles)):
        if SAVE_CKPT:
            tl.store(ckpt_tiles_ptr + (i // CKPT_EVERY) * N, h, mask=st_mask & (i % CKPT_EVERY == 0))
        t = i * T + tt
        t_mask = t < L
        u_t, dt, z_t = _values(u_raw, delta_raw, z_raw, d_mask, t, L, bias_v, HAS_BIAS, SOFTPLUS)
        keep, BC_t = k_n, BC_raw.to(tl.float32)
        u_raw, delta_raw, z_raw, k_n = _loads(
            u_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, t + T, HAS_Z, HAS_SEQ
        )
        BC_raw = tl.load(bc_rows_ptr + (t + T)[None, :], mask=bc_mask & (t + T < L)[None, :], other=0.0)
        dtu = dt * u_t
        if HAS_SEQ:
            keep_t = tl.broadcast_to(keep[None, :], [BLOCK_D, T])
        y = D_v[:, None] * u_t if HAS_D else tl.zeros([BLOCK_D, T], dtype=tl.float32)
        for step in tl.static_range(T):
            B_s, C_s = tl.split(tl.reshape(_col(BC_t, tt, step), (BLOCK_N, 2)))
            a = tl.exp2(_col(dt, tt, step)[:, None] * A2)
            if HAS_SEQ:
                a *= _col(keep_t, tt, step)[:, None]
            h = a * h + _col(dtu, tt, step)[:, None] * B_s[None, :]
            # y's sum over the states in Y_PARTS partial sums (see LANE_Y_PARTS)
            hC = tl.reshape(h * C_s[None, :], (BLOCK_D, Y_PARTS, BLOCK_N // Y_PARTS))
            y_step = tl.sum(tl.sum(hC, axis=2), axis=1)
            y = tl.where((tt == step)[None, :], y + y_step[:, None], y)
        if HAS_Z:
            y = _gate(y, z_t)
        tl.store(out_ptr + row_off[:, None] + t[None, :], y, mask=d_mask[:, None] & t_mask[None, :])
    if c == n_chunks - 1:
        tl.store(last_ptr + st_off, h, mask=st_mask)


@triton.jit
def _chunk_summary_kernel(
    x_ptr,
    delta_ptr,
    V_ptr,
    z_ptr,
    A_ptr,
    delta_bias_ptr,
    seq_idx_ptr,
    ends_ptr,
    decays_ptr,
    dim,
    L,
    groups,
    dpg,
    n_tiles,
    chunk_tiles,
    n_chunks,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """A chunk's summary for the split scan, in the lanes forward's layout: from a zero state, its end state
    h = a_t h + dt_t u_t B_t over its steps (x = u, V = B), or with REVERSE the adjoint that leaves it through its
    first step, p = a_t (p + g_t C_t) over its steps taken backwards (x = dout, V = C, g = dout silu(z)); and its
    decay prod_t a_t = exp(A sum dt), zero where a document starts inside it (or at its first step).
    Program axis 2 walks chunks 0 .. n_chunks - 2 (forward: the last chunk's end is no other chunk's input) or,
    with REVERSE, 1 .. n_chunks - 1 (the first chunk's adjoint is the initial state's gradient). Writes both as
    (batch, dim, n_chunks, d_state) float32."""
    b, d, d_mask, row_off, bc_off = _coords(dim, L, N, groups, dpg, BLOCK_D)
    c = tl.program_id(2) + (1 if REVERSE else 0)
    bias_v, _ = _channel_params(delta_bias_ptr, delta_bias_ptr, d, d_mask, HAS_BIAS, False)
    nn = tl.arange(0, BLOCK_N)
    tt = tl.arange(0, T)
    st_mask = d_mask[:, None] & (nn < N)[None, :]
    A2 = tl.load(A_ptr + d[:, None] * N + nn[None, :], mask=st_mask, other=0.0).to(tl.float32) * LOG2E
    v_rows_ptr = V_ptr + bc_off + nn[:, None] * L
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    kept = tl.full([T], 1.0, dtype=tl.float32)  # 0 at steps where a document starts
    first = c * chunk_tiles
    count = tl.minimum(chunk_tiles, n_tiles - first)
    # Software prefetch of the next tile's inputs, as in the lanes forward.
    t_next = (first + count - 1 if REVERSE else first) * T + tt
    x_raw, delta_raw, z_raw, k_n = _loads(
        x_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, t_next, HAS_Z, HAS_SEQ
    )
    V_raw = tl.load(v_rows_ptr + t_next[None, :], mask=(nn < N)[:, None] & (t_next < L)[None, :], other=0.0)
    for k in range(count):
        t = t_next
        x_t, dt, z_t = _values(x_raw, delta_raw, z_raw, d_mask, t, L, bias_v, HAS_BIAS, SOFTPLUS)
        keep, V_t = k_n, V_raw.to(tl.float32)
        t_next = t - T if REVERSE else t + T
        x_raw, delta_raw, z_raw, k_n = _loads(
            x_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, t_next, HAS_Z, HAS_SEQ
        )
        V_raw = tl.load(
            v_rows_ptr + t_next[None, :],
            mask=(nn < N)[:, None] & (t_next >= 0)[None, :] & (t_next < L)[None, :],
            other=0.0,
        )
        if REVERSE:
            if HAS_Z:
                x_t = _gate(x_t, z_t)
        else:
            x_t = dt * x_t
        if HAS_SEQ:
            kept = tl.minimum(kept, keep)
            keep_t = tl.broadcast_to(keep[None, :], [BLOCK_D, T])
        for j in tl.static_range(T):
            step = T - 1 - j if REVERSE else j
            a = tl.exp2(_col(dt, tt, step)[:, None] * A2)
            if HAS_SEQ:
                a *= _col(keep_t, tt, step)[:, None]
            xv = _col(x_t, tt, step)[:, None] * _col(V_t, tt, step)[None, :]
            h = a * (h + xv) if REVERSE else a * h + xv
        dt_sum += tl.sum(dt, axis=1)
    decay = tl.exp2(dt_sum[:, None] * A2)
    if HAS_SEQ:
        decay *= tl.min(kept, axis=0)
    summary_off = ((b * dim + d[:, None]) * n_chunks + c) * N + nn[None, :]
    tl.store(ends_ptr + summary_off, h, mask=st_mask)
    tl.store(decays_ptr + summary_off, decay, mask=st_mask)


@triton.jit
def _adjoint(decay_next, c, q_after):
    """q_t = c_t + decay_next_t q_{t+1} over a tile's steps, from q_after (BLOCK_D,) past its end.
    A forward scan of the time-reversed tile: Triton lowers `reverse=True` scans with two permutations
    across all lanes (about 160 shuffles for a 16 x 16 tile in sm_90 SASS), tl.flip only moves what
    crosses lanes (28). q_after enters as part of the last step's c (as h0 in `_trajectory`)."""
    last = (tl.arange(0, c.shape[1]) == c.shape[1] - 1)[None, :]
    c = tl.where(last, c + decay_next * q_after[:, None], c)  # q_after folded into the last step
    _, q = tl.associative_scan((tl.flip(decay_next, 1), tl.flip(c, 1)), axis=1, combine_fn=_lin)
    return tl.flip(q, 1)


@triton.jit
def _bwd_tile(
    u_ptr,
    delta_ptr,
    z_ptr,
    dout_ptr,
    seq_idx_ptr,
    b,
    L,
    row_off,
    d_mask,
    bias_v,
    t,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
):
    """The backward's inputs of steps t: `_tile`'s, dt and keep of steps t + 1 (a_{t+1} carries the
    adjoint back; 1 past the end: q_{L-1} = C g + dlast) and dout."""
    u_t, dt, z_t, keep = _tile(
        u_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, bias_v, t, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ
    )
    _, dt1, _, keep1 = _tile(
        u_ptr, delta_ptr, z_ptr, seq_idx_ptr, b, L, row_off, d_mask, bias_v, t + 1, False, HAS_BIAS, SOFTPLUS, HAS_SEQ
    )
    g = tl.load(dout_ptr + row_off[:, None] + t[None, :], mask=_in_range(d_mask, t, L), other=0.0).to(tl.float32)
    return u_t, dt, z_t, keep, dt1, keep1, g


@triton.jit
def _channel_sums(x, BLOCK_D: tl.constexpr, T: tl.constexpr, THREAD_STEPS: tl.constexpr):
    """Sums over the channels (axis 0) of a (BLOCK_D, T) tile, as (sums, their steps): tl.sum's butterfly would
    pass every value across lanes at each of log2(BLOCK_D) rounds, this halves them (a reduce-scatter). Each
    round pairs the channels that differ in one bit: of its run of THREAD_STEPS steps (the ones a thread holds),
    a channel keeps one half, sends its partner the other half (`tl.flip` of the pair: one shuffle a value)
    and adds what it receives. Rounds left once the runs are down to one step sum with tl.sum."""
    ROUNDS: tl.constexpr = min(BLOCK_D.bit_length(), THREAD_STEPS.bit_length()) - 1
    RUNS: tl.constexpr = T // THREAD_STEPS
    for k in tl.static_range(ROUNDS):  # (channels above bit k, bit k, below it, runs, halves, half-run)
        pairs = tl.reshape(x, (BLOCK_D // (2 << k), 2, 1 << k, RUNS, 2, THREAD_STEPS >> (k + 1)))
        lo, hi = tl.split(tl.permute(pairs, (0, 1, 2, 3, 5, 4)))
        first = (tl.arange(0, 2) == 0)[None, :, None, None, None]
        x = tl.where(first, lo, hi) + tl.flip(tl.where(first, hi, lo), 1)
    # channel d now holds its half-runs' sums over the channels that match it below bit ROUNDS
    x = tl.sum(tl.reshape(x, (BLOCK_D >> ROUNDS, 1 << ROUNDS, RUNS, THREAD_STEPS >> ROUNDS)), axis=0)
    low_bits = tl.arange(0, 1 << ROUNDS)[:, None, None]
    steps = tl.arange(0, RUNS)[None, :, None] * THREAD_STEPS + tl.arange(0, THREAD_STEPS >> ROUNDS)[None, None, :]
    for k in tl.static_range(ROUNDS):  # round k kept the upper half of the run where bit k is set
        steps += ((low_bits >> k) & 1) * (THREAD_STEPS >> (k + 1))
    return x, steps


@triton.jit
def _state_inputs(A_ptr, B_ptr, C_ptr, ckpt_tiles_ptr, d, d_mask, bc_off, L, t, t_mask, i, n, N: tl.constexpr):
    """State n's inputs to the backward of tile i: A[d, n] (BLOCK_D,), B and C at steps t (T,), and the
    checkpointed state entering the tile (BLOCK_D,)."""
    A_n = tl.load(A_ptr + d * N + n, mask=d_mask, other=0.0).to(tl.float32)
    B_n = tl.load(B_ptr + bc_off + n * L + t, mask=t_mask, other=0.0).to(tl.float32)
    C_n = tl.load(C_ptr + bc_off + n * L + t, mask=t_mask, other=0.0).to(tl.float32)
    return A_n, B_n, C_n, tl.load(ckpt_tiles_ptr + i * N + n, mask=d_mask, other=0.0)


@triton.jit
def _scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    delta_bias_ptr,
    seq_idx_ptr,
    ckpt_ptr,
    dlast_ptr,
    dout_ptr,
    adjoints_ptr,
    decays_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dA_part_ptr,
    dB_part_ptr,
    dC_part_ptr,
    dD_part_ptr,
    dbias_part_ptr,
    dinit_ptr,
    n_rows,
    dim,
    L,
    groups,
    dpg,
    n_tiles,
    chunk_tiles,
    N: tl.constexpr,
    NU: tl.constexpr,
    T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    THREAD_STEPS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Program axis 2 walks chunk c of the sequence (chunk_tiles tiles) backwards; where SPLIT (more than one
    chunk), `adjoints` and `decays` (batch, dim, chunks, d_state) hold _chunk_summary_kernel's reverse summaries
    of every chunk but the first. dA, dD and ddelta_bias partials are per (chunk, batch)."""
    b, d, d_mask, row_off, bc_off = _coords(dim, L, N, groups, dpg, BLOCK_D)
    c = tl.program_id(2)
    n_chunks = tl.num_programs(2)
    bias_v, D_v = _channel_params(delta_bias_ptr, D_ptr, d, d_mask, HAS_BIAS, HAS_D)
    tt = tl.arange(0, T)
    # Per-state values in registers, state n in column n of a (BLOCK_D, T) tile (T >= N), as in the forward.
    st_off = (b * dim + d[:, None]) * N + tt[None, :]  # (batch, dim, d_state) tensors: dlast, dinit
    st_mask = d_mask[:, None] & (tt < N)[None, :]
    if HAS_DLAST:  # q: the adjoint of the state after the step just past the tile
        q = tl.load(dlast_ptr + st_off, mask=st_mask, other=0.0)
    else:
        q = tl.zeros([BLOCK_D, T], dtype=tl.float32)
    if SPLIT:  # compiled out of unsplit launches (as in the lanes forward)
        # The adjoint entering chunk c from its end: each later chunk's adjoint from zero, carried back through the
        # chunks before it. The chunk's end then acts as the sequence's: past it, a = 1.
        summary_off = (b * dim + d[:, None]) * n_chunks * N + tt[None, :]
        for later in range(n_chunks - 1 - c):
            j = n_chunks - 1 - later
            q = (
                tl.load(adjoints_ptr + summary_off + j * N, mask=st_mask, other=0.0)
                + tl.load(decays_ptr + summary_off + j * N, mask=st_mask, other=0.0) * q
            )
    dA_acc = tl.zeros([BLOCK_D, T], dtype=tl.float32)
    ckpt_tiles_ptr = ckpt_ptr + (b * dim + d) * n_tiles * N
    # This program's rows of the (channel blocks, batch * groups, d_state, length) partials of dB, dC.
    part_off = (tl.program_id(1).to(tl.int64) * n_rows + tl.program_id(0)) * N * L
    chunk_off = c.to(tl.int64) * (n_rows // groups) * dim  # this chunk's rows of the partials per (chunk, batch)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = c * chunk_tiles
    count = tl.minimum(chunk_tiles, n_tiles - first)
    t_end = tl.minimum((first + count) * T, L)
    # No prefetch here (unlike the forward): its registers cost more occupancy than it hides latency.
    for i_rev in range(count):
        i = first + count - 1 - i_rev
        t = i * T + tt
        t_mask = t < L
        tile_mask = d_mask[:, None] & t_mask[None, :]
        tile_off = row_off[:, None] + t[None, :]
        u_t, dt, z_t, keep, dt1, keep1, g = _bwd_tile(
            u_ptr,
            delta_ptr,
            z_ptr,
            dout_ptr,
            seq_idx_ptr,
            b,
            L,
            row_off,
            d_mask,
            bias_v,
            t,
            HAS_Z,
            HAS_BIAS,
            SOFTPLUS,
            HAS_SEQ,
        )
        if SPLIT:  # past the chunk's last step, a = 1 (the loads already give that past L)
            dt1 = tl.where((t + 1 < t_end)[None, :], dt1, 0.0)
            keep1 = tl.where(t + 1 < t_end, keep1, 1.0)
        if HAS_Z:  # out = y silu(z): g becomes dL/dy; y is summed below for dz
            g *= z_t * tl.sigmoid(z_t)
            y = D_v[:, None] * u_t
        dtu = dt * u_t
        qB = tl.zeros([BLOCK_D, T], dtype=tl.float32)  # sum_n q_t[n] B_t[n]: the adjoint of dt_t u_t
        dexpA = tl.zeros([BLOCK_D, T], dtype=tl.float32)  # sum_n of the adjoint of dt_t A[n], times A[n]
        # Software prefetch: the loads of state n + 1 are issued before state n is computed.
        A_x, B_x, C_x, h0_x = _state_inputs(
            A_ptr, B_ptr, C_ptr, ckpt_tiles_ptr, d, d_mask, bc_off, L, t, t_mask, i, 0, N
        )
        for n0 in range(0, N, NU):  # NU states at a time: enough independent work, not all N live at once
            for k in tl.static_range(NU):
                n = n0 + k
                sel = (tt == n)[None, :]
                A_n, B_n, C_n, h0 = A_x, B_x, C_x, h0_x
                A_x, B_x, C_x, h0_x = _state_inputs(
                    A_ptr, B_ptr, C_ptr, ckpt_tiles_ptr, d, d_mask, bc_off, L, t, t_mask, i, (n + 1) % N, N
                )
                A2_n = A_n * LOG2E
                bb = dtu * B_n[None, :]
                hs = _trajectory(_decay(dt, A2_n, keep, HAS_SEQ), bb, h0)
                if HAS_Z:
                    y += hs * C_n[None, :]
                qs = _adjoint(_decay(dt1, A2_n, keep1, HAS_SEQ), g * C_n[None, :], _col(q, tt, n))  # dL/dh_t
                q = tl.where(sel, _col(qs, tt, 0)[:, None], q)
                dexp = qs * (hs - bb)  # adjoint of dt_t A[n]: q_t a_t h_{t-1}
                dA_acc = tl.where(sel, dA_acc + tl.sum(dexp * dt, axis=1)[:, None], dA_acc)
                dexpA += dexp * A_n[:, None]
                qB += qs * B_n[None, :]
                dB_n, steps = _channel_sums(qs * dtu, BLOCK_D, T, THREAD_STEPS)
                dC_n, _ = _channel_sums(g * hs, BLOCK_D, T, THREAD_STEPS)
                tl.store(dB_part_ptr + part_off + n * L + i * T + steps, dB_n, mask=i * T + steps < L)
                tl.store(dC_part_ptr + part_off + n * L + i * T + steps, dC_n, mask=i * T + steps < L)
        ddt = dexpA + qB * u_t
        if SOFTPLUS:  # d softplus(x)/dx = sigmoid(x) = 1 - exp(-softplus(x))
            ddt *= 1.0 - tl.exp2(dt * -LOG2E)
        ddt = tl.where(tile_mask, ddt, 0.0)
        du_t = qB * dt
        if HAS_D:
            du_t += g * D_v[:, None]
            dD_acc += tl.sum(g * u_t, axis=1)
        if HAS_Z:  # reloaded rather than kept live through the state loop
            z_t = tl.load(z_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
            g_out = tl.load(dout_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z_t)
            tl.store(dz_ptr + tile_off, g_out * y * sz * (1.0 + z_t * (1.0 - sz)), mask=tile_mask)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + tile_off, du_t, mask=tile_mask)
        tl.store(ddelta_ptr + tile_off, ddt, mask=tile_mask)
    tl.store(dA_part_ptr + chunk_off * N + st_off, dA_acc, mask=st_mask)
    if HAS_INIT:  # h_0 = a_0 h_init + b_0
        if c == 0:
            dt0 = _dt(
                tl.load(delta_ptr + row_off[:, None] + tl.zeros([1, T], dtype=tl.int64), mask=st_mask, other=0.0),
                st_mask,
                bias_v,
                HAS_BIAS,
                SOFTPLUS,
            )
            A2 = tl.load(A_ptr + d[:, None] * N + tt[None, :], mask=st_mask, other=0.0).to(tl.float32) * LOG2E
            tl.store(dinit_ptr + st_off, q * tl.exp2(dt0 * A2), mask=st_mask)
    if HAS_D:
        tl.store(dD_part_ptr + chunk_off + b * dim + d, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + chunk_off + b * dim + d, dbias_acc, mask=d_mask)


def _contiguous(t):
    return None if t is None else contiguous(t)


def _grouped(BC: torch.Tensor) -> torch.Tensor:
    return (BC if BC.dim() == 4 else BC.unsqueeze(1)).contiguous()


def _block_d(cap, n_rows, dpg, sms):
    """BLOCK_D: at most `cap`, halved while too few programs would fill `sms` SMs (small batches)."""
    bd = block_size(dpg, cap)
    while bd > MIN_BLOCK_D and n_rows * cdiv(dpg, bd) < PROGRAMS_PER_SM * sms:
        bd //= 2
    return bd


def _bwd_occupancy(meta, n_programs, N, sms):
    """NU and maxnreg of the backward on `sms` SMs (see BWD_REGISTER_CAPS)."""
    warps = n_programs * meta["num_warps"]
    per_sm = lambda cap: min(64, 65536 // (32 * cap))  # noqa: E731 (an SM: 64K registers, at most 64 warps)
    resident = [cap for cap in BWD_REGISTER_CAPS if warps <= sms * per_sm(cap)]
    nu = meta["NU"] if meta["BLOCK_D"] == GPU_TRAIN["bwd"]["BLOCK_D"] else _unroll(BWD_SMALL_BLOCK_NU, N)
    return dict(NU=nu, maxnreg=max(resident, default=BWD_REGISTER_CAPS[0]))


def _unroll(nu, N):
    """The largest divisor of N that is at most nu."""
    return max(k for k in range(1, min(nu, N) + 1) if N % k == 0)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """A scan kernel's launch: its meta (constexprs and launch options), whether it is the lanes forward, the
    forward's checkpoint spacing in tiles, and the chunks of a split scan with their summaries' meta."""

    meta: dict
    lanes: bool = False
    ckpt_every: int = 1
    chunk: int = 0  # steps per chunk
    chunks: int = 1
    summary: dict | None = None


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """A scan's tile shapes, which fix the shapes of its outputs (the checkpoints) and of the backward's partials,
    and the steps and lanes forwards' metas to choose from. Symbolic sizes (torch.compile) pass through."""

    groups: int
    dpg: int
    steps: dict  # _scan_fwd_kernel's meta
    lanes: dict  # _scan_fwd_lanes_kernel's meta less BLOCK_D
    backward: _Launch | None


@dataclasses.dataclass(frozen=True)
class _Plan:
    groups: int
    dpg: int
    forward: _Launch
    backward: _Launch | None


def _tiles(batch, dim, L, groups, N, train, gpu, sms) -> _Tiles:
    """The tiles of a scan of these sizes on a GPU with `sms` SMs (or, where not `gpu`, in the interpreter)."""
    if dim % groups != 0:
        raise ValueError(f"dim ({dim}) must be divisible by the number of B/C groups ({groups})")
    dpg, n_rows = dim // groups, batch * groups

    def tile(T):  # T shrinks for short sequences (decode: one step) but the states fill a tile's columns
        return max(min(T, next_power_of_2(L)), next_power_of_2(N), 2)

    if not gpu:  # the interpreter: one small tile shape; the lanes forward's tiles half the
        # checkpoint spacing, as on a GPU
        T = tile(CHUNK)
        base = dict(T=T, BLOCK_D=block_size(dpg, 4), NU=_unroll(2, N), num_warps=1)
        bwd_chunk = _chunks(L, _backward_chunk(n_rows, dpg, L, base["BLOCK_D"], sms), T)[0]
        forward, backward, lanes = base, dict(base), dict(T=T // 2, num_warps=1)
    else:
        # The backward first: its chunks count as rows when BLOCK_D is chosen.
        bwd_chunk = _backward_chunk(n_rows, dpg, L, GPU_TRAIN["bwd"]["BLOCK_D"], sms) if train else L
        chunk_rows = n_rows * cdiv(L, bwd_chunk)
        configs = [GPU_TRAIN["fwd"], GPU_TRAIN["bwd"]] if train else [GPU_FWD]
        blocks = [_block_d(c["BLOCK_D"], chunk_rows, dpg, sms) for c in configs]
        # A thread holds runs of 8 steps (16 bytes of bf16): with fewer channels than lanes, T grows so that
        # the spare lanes take more of the sequence instead of idling.
        T = tile(max(GPU_TRAIN["T"] if train else GPU_FWD["T"], 256 // min(blocks)))
        bwd_chunk = _chunks(L, bwd_chunk, T)[0]
        metas = [
            dict(c, T=T, BLOCK_D=bd, NU=_unroll(c["NU"], N), num_warps=max(1, min(c["num_warps"], bd * T // 256)))
            for c, bd in zip(configs, blocks)
        ]
        forward, backward = metas[0], metas[-1]
        lanes = dict(LANES, T=min(LANES["T"], T))
        if train:
            n_programs = n_rows * cdiv(dpg, backward["BLOCK_D"]) * cdiv(L, bwd_chunk)
            backward.update(_bwd_occupancy(backward, n_programs, N, sms))
    bwd = None
    if train:
        chunks = cdiv(L, bwd_chunk)
        # the reverse summaries in the lanes forward's tiles, which divide the backward's
        bwd = _Launch(backward, chunk=bwd_chunk, chunks=chunks, summary=_summary_meta(n_rows, dpg, chunks, sms, lanes))
    return _Tiles(groups, dpg, forward, lanes, bwd)


def _summary_meta(n_rows, dpg, chunks, sms, lanes):
    """_chunk_summary_kernel's meta over `chunks` chunks (None: no split), in the lanes forward's tiles."""
    if chunks < 2:
        return None
    return dict(
        T=lanes["T"], BLOCK_D=_summary_block(n_rows, dpg, chunks - 1, SUB_PARTITIONS_PER_SM * sms)[1], num_warps=1
    )


def _plan(batch, dim, L, groups, N, train, gpu, sms) -> _Plan:
    """The launches of a scan of these sizes on a GPU with `sms` SMs (or, where not `gpu`, in the interpreter):
    `_tiles` and the forward's layout (sizes as ints)."""
    tiles = _tiles(batch, dim, L, groups, N, train, gpu, sms)
    lanes, n_rows = tiles.lanes, batch * groups
    kernel, lanes_block, chunk = _forward_layout(n_rows, tiles.dpg, L, lanes["T"], sms)
    if kernel == "lanes":
        chunk, chunks = _chunks(L, chunk, lanes["T"])
        forward = _Launch(
            dict(lanes, BLOCK_D=lanes_block),
            lanes=True,
            ckpt_every=tiles.steps["T"] // lanes["T"],
            chunk=chunk,
            chunks=chunks,
            summary=_summary_meta(n_rows, tiles.dpg, chunks, sms, lanes),
        )
    else:
        forward = _Launch(tiles.steps, chunk=L)
    return _Plan(groups, tiles.dpg, forward, tiles.backward)


def _configs(u, B, N, train) -> _Plan:
    """The launches of a scan over u (batch, dim, length) with B (batch, groups, d_state, length), and of its
    backward where `train`."""
    sizes = (*u.shape, B.shape[1], N, train)
    if u.is_cuda:
        return _gpu_plan(*sizes, _sm_count(u.device), _FORCED.get())
    return _plan(*sizes, False, INTERPRETER_SMS)


@functools.lru_cache(maxsize=1024)
def _gpu_plan(batch, dim, L, groups, N, train, sms, forced) -> _Plan:
    """_plan on a GPU, cached per sizes and forced layout (which _plan reads): planning takes about 45 µs of
    Python, as long as a short scan's kernels. A script that changes the cost model's constants calls
    _gpu_plan.cache_clear()."""
    return _plan(batch, dim, L, groups, N, train, True, sms)


def _tiles_of(u, B, N, train) -> _Tiles:
    return _tiles(*u.shape, B.shape[1], N, train, u.is_cuda, _sm_count(u.device))


def _summarize(x, delta, V, z, A, delta_bias, seq_idx, softplus, launch, reverse):
    """(ends or adjoints, decays): _chunk_summary_kernel over the chunks of `launch` (see there). x, delta, z:
    (batch, dim, length); V: (batch, groups, d_state, length)."""
    batch, dim, L = x.shape
    N, groups = A.shape[1], V.shape[1]
    meta = launch.summary
    ends, decays = (torch.empty(batch, dim, launch.chunks, N, dtype=torch.float32, device=x.device) for _ in range(2))
    grid = (batch * groups, cdiv(dim // groups, meta["BLOCK_D"]), launch.chunks - 1)
    _chunk_summary_kernel[grid](
        x,
        delta,
        V,
        x if z is None else z,
        A,
        x if delta_bias is None else delta_bias,
        x if seq_idx is None else seq_idx,
        ends,
        decays,
        dim,
        L,
        groups,
        dim // groups,
        cdiv(L, meta["T"]),
        launch.chunk // meta["T"],
        launch.chunks,
        N=N,
        BLOCK_N=max(2, next_power_of_2(N)),
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus,
        HAS_SEQ=seq_idx is not None,
        REVERSE=reverse,
        **meta,
    )
    return ends, decays


def _new_outputs(u, A, backward):
    """Uninitialised (out, checkpoints) of a forward over u, with checkpoints for the `backward` launch (or none):
    the launch and the shape-only (fake) implementation of the op below share them."""
    batch, dim, L = u.shape
    N = A.shape[1]
    shape = (1,) if backward is None else (batch, dim, cdiv(L, backward.meta["T"]), N)  # a state per tile
    return torch.empty_like(u), u.new_empty(shape, dtype=torch.float32)


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, seq_idx, last, save_ckpt):
    """Launches the forward on contiguous u, delta, z (batch, dim, length) and B, C (batch, groups,
    d_state, length); writes the final state into `last` (which may be `initial_state`).
    Returns (out, checkpoints)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    plan = _configs(u, B, N, save_ckpt)
    launch, groups, dpg = plan.forward, plan.groups, plan.dpg
    if initial_state is not None and initial_state.stride() != last.stride():
        raise ValueError("initial_state and the last state must have the same strides")
    if launch.chunks > 1 and initial_state is last:  # every chunk reads the initial state, the last one writes
        raise ValueError("a scan split into chunks cannot write its last state over its initial state")
    out, ckpt = _new_outputs(u, A, plan.backward)
    grid = (batch * groups, cdiv(dpg, launch.meta["BLOCK_D"]))
    inputs = (
        u,
        delta,
        A,
        B,
        C,
        u if D is None else D,
        u if z is None else z,
        u if delta_bias is None else delta_bias,
        u if seq_idx is None else seq_idx,
        last if initial_state is None else initial_state,
        last,
    )
    n_tiles = cdiv(L, launch.meta["T"])
    flags = dict(
        N=N,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus,
        HAS_SEQ=seq_idx is not None,
        HAS_INIT=initial_state is not None,
        SAVE_CKPT=save_ckpt,
    )
    if launch.lanes:  # see LANES
        ends, decays = (
            (last, last)
            if launch.chunks == 1
            else _summarize(u, delta, B, None, A, delta_bias, seq_idx, softplus, launch, reverse=False)
        )
        block_n = max(2, next_power_of_2(N))
        _scan_fwd_lanes_kernel[grid + (launch.chunks,)](
            *inputs,
            ckpt,
            out,
            ends,
            decays,
            dim,
            L,
            groups,
            dpg,
            n_tiles,
            launch.chunk // launch.meta["T"],
            *last.stride(),
            BLOCK_N=block_n,
            CKPT_EVERY=launch.ckpt_every,
            Y_PARTS=min(block_n, LANE_Y_PARTS[launch.meta["BLOCK_D"]]),
            SPLIT=launch.chunks > 1,
            **flags,
            **launch.meta,
        )
    else:
        _scan_fwd_kernel[grid](
            *inputs, ckpt, out, dim, L, groups, dpg, n_tiles, *last.stride(), **flags, **launch.meta
        )
    return out, ckpt


# The kernels enter torch.compile as custom ops: opaque to the compiler (which traces around them and fuses the
# code between them, with no graph break), shapes from the fake implementations, gradients from the backward op.
# Eager calls take the same implementations through an autograd.Function (`eager_autograd`), without
# torch.library's dispatch. Absent optional inputs have empty gradients.
def _scan_fwd_impl(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    softplus: bool,
    save_ckpt: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, last state, checkpoints for the backward) of contiguous inputs, B and C grouped."""
    last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    out, ckpt = _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, seq_idx, last, save_ckpt)
    return out, last, ckpt


_scan_fwd_op = torch.library.custom_op("samba_kernels::selective_scan_fwd", _scan_fwd_impl, mutates_args=())


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, save_ckpt):
    out, ckpt = _new_outputs(u, A, _tiles_of(u, B, A.shape[1], save_ckpt).backward)
    return out, u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32), ckpt


def _scan_bwd_outputs(u, delta, A, B, D, z, delta_bias, has_init, n_dblocks, chunks=1):
    """Uninitialised gradients of the backward (per-program partials where programs share a sum; dA, dD and
    ddelta_bias per chunk of the sequence)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    f32 = dict(dtype=torch.float32, device=u.device)
    empty = lambda: torch.empty(0, **f32)  # noqa: E731 (one per absent input: outputs must not alias)
    return [
        torch.empty_like(u),
        torch.empty_like(delta),
        torch.empty(chunks * batch, dim, N, **f32),
        torch.empty(n_dblocks, B.shape[0] * B.shape[1], N, L, **f32),
        torch.empty(n_dblocks, B.shape[0] * B.shape[1], N, L, **f32),
        torch.empty(chunks * batch, dim, **f32) if D is not None else empty(),
        torch.empty_like(z) if z is not None else empty(),
        torch.empty(chunks * batch, dim, **f32) if delta_bias is not None else empty(),
        torch.empty(batch, dim, N, **f32) if has_init else empty(),
    ]


def _bwd_launch(u, B, A):
    """(launch, channel blocks) of the backward (its tiles alone where sizes are symbolic: torch.compile)."""
    symbolic = any(isinstance(size, torch.SymInt) for size in u.shape)
    launch = (_tiles_of if symbolic else _configs)(u, B, A.shape[1], True).backward
    return launch, cdiv(u.shape[1] // B.shape[1], launch.meta["BLOCK_D"])


def _scan_bwd_impl(
    dout: torch.Tensor,
    dlast: torch.Tensor | None,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    ckpt: torch.Tensor,
    softplus: bool,
    has_init: bool,
) -> list[torch.Tensor]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); dA, dB, dC, dD and ddelta_bias
    as float32 partials (summed by the caller), empty where the input is absent."""
    batch, dim, L = u.shape
    N, groups = A.shape[1], B.shape[1]
    launch, n_dblocks = _bwd_launch(u, B, A)
    if ckpt.shape[2] != cdiv(L, launch.meta["T"]):  # checkpoints of other tiles would give wrong gradients
        raise RuntimeError(
            f"the forward saved the states entering {ckpt.shape[2]} tiles, the backward plans tiles of "
            f"{launch.meta['T']} steps over {L}: the launch plan changed between the two"
        )
    du, ddelta, dA_part, dB_part, dC_part, dD_part, dz, dbias_part, dinit = _scan_bwd_outputs(
        u, delta, A, B, D, z, delta_bias, has_init, n_dblocks, launch.chunks
    )
    adjoints, decays = (
        (ckpt, ckpt)
        if launch.chunks == 1
        else _summarize(dout, delta, C, z, A, delta_bias, seq_idx, softplus, launch, reverse=True)
    )
    _scan_bwd_kernel[(batch * groups, n_dblocks, launch.chunks)](
        u,
        delta,
        A,
        B,
        C,
        u if D is None else D,
        u if z is None else z,
        u if delta_bias is None else delta_bias,
        u if seq_idx is None else seq_idx,
        ckpt,
        ckpt if dlast is None else dlast,
        dout,
        adjoints,
        decays,
        du,
        ddelta,
        u if z is None else dz,
        dA_part,
        dB_part,
        dC_part,
        dA_part if D is None else dD_part,
        dA_part if delta_bias is None else dbias_part,
        dinit if has_init else ckpt,
        batch * groups,
        dim,
        L,
        groups,
        dim // groups,
        ckpt.shape[2],
        launch.chunk // launch.meta["T"],
        N=N,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus,
        HAS_SEQ=seq_idx is not None,
        HAS_INIT=has_init,
        HAS_DLAST=dlast is not None,
        SPLIT=launch.chunks > 1,
        THREAD_STEPS=min(launch.meta["T"], 16 // u.element_size()),
        **launch.meta,  # a thread's run of steps: one 16-byte load
    )
    if launch.chunks > 1:  # the outputs' partials are per batch entry, whatever the split
        dA_part, dD_part, dbias_part = (
            x.view(launch.chunks, batch, *x.shape[1:]).sum(0) if x.numel() else x
            for x in (dA_part, dD_part, dbias_part)
        )
    return [du, ddelta, dA_part, dB_part, dC_part, dD_part, dz, dbias_part, dinit]


_scan_bwd_op = torch.library.custom_op("samba_kernels::selective_scan_bwd", _scan_bwd_impl, mutates_args=())


@_scan_bwd_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt, softplus, has_init):
    return _scan_bwd_outputs(u, delta, A, B, D, z, delta_bias, has_init, _bwd_launch(u, B, A)[1])


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, _ = inputs
    ctx.softplus, ctx.has_init = softplus, initial_state is not None
    # The backward plans its launch as the forward did: on CUDA, autograd runs it on its own thread, where a
    # forced_layout of the forward's caller is not set.
    ctx.forced = _FORCED.get()
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, output[2])


def _scan_grads(ctx, dout, dlast, backward):
    """The inputs' gradients, the backward's kernels launched by `backward` (the custom op or its implementation)."""
    u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt = ctx.saved_tensors
    token = _FORCED.set(ctx.forced)
    try:
        du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = backward(
            torch.zeros_like(u) if dout is None else contiguous(dout),
            None if dlast is None else dlast.float().contiguous(),
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            seq_idx,
            ckpt,
            ctx.softplus,
            ctx.has_init,
        )
    finally:
        _FORCED.reset(token)
    return (
        du,
        ddelta,
        dA.sum(0).to(A.dtype),
        dB.sum(0).view(B.shape).to(B.dtype),
        dC.sum(0).view(C.shape).to(C.dtype),
        None if D is None else dD.sum(0).to(D.dtype),
        None if z is None else dz,
        None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
        dinit if ctx.has_init else None,
        None,
        None,
        None,
    )


_scan_fwd_op.register_autograd(
    lambda ctx, dout, dlast, _: _scan_grads(ctx, dout, dlast, _scan_bwd_op), setup_context=_scan_setup_context
)
_EagerScan = eager_autograd(
    "_EagerScan",
    _scan_fwd_impl,
    _scan_setup_context,
    lambda ctx, dout, dlast, _: _scan_grads(ctx, dout, dlast, _scan_bwd_impl),
)


def selective_scan_fn(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    initial_state=None,
    seq_idx=None,
):
    """Mamba-1 selective scan (semantics: `selective_scan_ref`), differentiable in every tensor input including
    `initial_state` (and through the returned last state): the Triton kernels where `use_triton(u)`, the reference
    elsewhere. The launch plan (see `forced_layout`) splits long sequences of small batches into chunks.

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  y_t = (C_t . h_t + D u_t) silu(z_t)

    Args:
        u (torch.Tensor): inputs of shape `[batch, dim, length]`, float32, bfloat16 or float16.
        delta (torch.Tensor): step sizes, shape `[batch, dim, length]` (before `delta_bias` and softplus).
        A (torch.Tensor): state decay rates, shape `[dim, d_state]` (negative), any float dtype.
        B, C (torch.Tensor): input and output projections, shape `[batch, d_state, length]`, or
            `[batch, groups, d_state, length]` shared by `dim / groups` channels each.
        D (torch.Tensor | None): skip connection, shape `[dim]`.
        z (torch.Tensor | None): gate, shape `[batch, dim, length]`.
        delta_bias (torch.Tensor | None): shape `[dim]`, added to delta (before softplus).
        delta_softplus (bool): apply softplus to delta (+ delta_bias).
        return_last_state (bool): also return the state after the last step.
        initial_state (torch.Tensor | None): the state before position 0, shape `[batch, dim, d_state]`; it
            belongs to the first document of `seq_idx`.
        seq_idx (torch.Tensor | None): document of each position, shape `[batch, length]`, integer; the state
            restarts from zero where it changes (packed sequences).

    Returns:
        y of u's shape and dtype, or (y, last_state) with last_state `[batch, dim, d_state]` float32.
    """
    if not use_triton(u):
        return selective_scan_ref(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            delta_softplus,
            return_last_state,
            initial_state=initial_state,
            seq_idx=seq_idx,
        )
    if (B.dim() == 4) != (C.dim() == 4) or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        raise ValueError("B and C must have the same number of groups")
    inputs = [u, delta, A, B, C, D, z, delta_bias, initial_state]
    # Checkpoints for the backward only where a gradient will be asked for.
    save_ckpt = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    u, delta, A, D, z, delta_bias = map(_contiguous, (u, delta, A, D, z, delta_bias))
    scan = _scan_fwd_op if torch.compiler.is_compiling() else _EagerScan.apply
    y, last, _ = scan(
        u,
        delta,
        A,
        _grouped(B),
        _grouped(C),
        D,
        z,
        delta_bias,
        None if initial_state is None else initial_state.float().contiguous(),
        None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
        delta_softplus,
        save_ckpt,
    )
    return (y, last) if return_last_state else y


def _state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
) -> torch.Tensor:
    """y (batch, dim, 1) of one-step sequences x, dt, z (batch, dim, 1), B, C (batch, groups, d_state, 1);
    `state` is both the initial and the last state."""
    return _scan_forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus, state, None, state, save_ckpt=False)[0]


_state_update_op = torch.library.custom_op(
    "samba_kernels::selective_state_update", _state_update, mutates_args=("state",)
)


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step of the scan (semantics: `selective_state_update_ref`), without gradients.

    Args:
        state (torch.Tensor): the SSM state, shape `[batch, dim, d_state]`, float32, any strides (a slice of a
            cache); updated in place (no new state is allocated, so it is safe under CUDA graphs).
        x, dt (torch.Tensor): the step's input and step size, shape `[batch, dim]`.
        A (torch.Tensor): shape `[dim, d_state]`.
        B, C (torch.Tensor): shape `[batch, d_state]` or `[batch, groups, d_state]`.
        D (torch.Tensor | None): shape `[dim]`.
        z (torch.Tensor | None): gate, shape `[batch, dim]`.
        dt_bias (torch.Tensor | None): shape `[dim]`.
        dt_softplus (bool): apply softplus to dt (+ dt_bias).

    Returns:
        y of shape `[batch, dim]` in x's dtype.
    """
    if not use_triton(x):
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    col = lambda t: None if t is None else t.unsqueeze(-1).contiguous()  # noqa: E731 (a one-step sequence)
    B, C = (BC if BC.dim() == 3 else BC.unsqueeze(1) for BC in (B, C))
    # Only the compiler needs the custom op: uncompiled, its dispatch (for an op that mutates an input)
    # costs more host time than the launch at decode size, and eager decoding is bound by host time.
    update = _state_update_op if torch.compiler.is_compiling() else _state_update
    y = update(
        state,
        col(x),
        col(dt),
        A.contiguous(),
        col(B),
        col(C),
        _contiguous(D),
        col(z),
        _contiguous(dt_bias),
        dt_softplus,
    )
    return y.squeeze(-1)
