"""One-row matrix products, `x @ weight.T + bias` for a single row of x: the projections of batch-1
decoding, where every token reads all of the model's weights once.

cuBLAS runs such a product as a general matrix product, tiled for many rows, often split over K with a
second kernel that sums the splits. Here a few programs per SM each walk a stream of weight blocks (its tiles
of BLOCK_N rows in turn, each tile's columns in BLOCK_K-wide blocks, the whole row where it fits), loading the
next block before reducing the current one, accumulating in fp32: one pass over the weight, one kernel. The
weight is read with an evict-first hint, as nothing reads it again before the next token.

A kernel launch has a fixed cost of a few µs at these sizes (ramp-up, tail), so products that share
their input also run as one launch: `stacked_matvec` (the rows of several weights, as for q/k/v) and
`gated_matvec` (SwiGLU's silu(x @ gate.T) * (x @ up.T), with the product taken in the kernel). A token's
products of samba-421m, so grouped, take fewer launches and less time than cuBLAS's (benchmarks/results/kernels.md,
the matvec case).

Where torch.compile's kernels launch as programmatic dependents (`torch._inductor.config.triton.enable_pdl`
on sm90 and later; see `dependent_launch`), these do too: a product loads its first weight block while
the kernel before it finishes, and reads x only after `gdc_wait()`, which shortens a decode step
(docs/performance-notes.md, Decoding).

The references (`naive.py`: F.linear, after F.rms_norm where a norm is fused) are the path on CPU tensors
without Triton's interpreter.
"""

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._common import cdiv, dependent_launch, gdc_launch_dependents, gdc_wait, next_power_of_2, use_triton
from .naive import gated_matvec_ref, matvec_add_ref, matvec_ref, stacked_matvec_ref


@triton.jit
def _weight_tile(
    w0_ptr, w1_ptr, w2_ptr, tile, k0, N0, N1, N2, K, stride0, stride1, stride2,
    WEIGHTS: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The weight block of output rows tile * BLOCK_N.. and columns k0..: (w, up), up the up weight's same rows
    where GATED (else w again). Rows past the outputs load nothing (a tile past the last is all masked)."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_idx = rows.to(tl.int64)  # int64: vocabulary x hidden may pass 2**31
    w_rows_ptr = w0_ptr + row_idx * stride0
    if WEIGHTS > 1:
        w_rows_ptr = tl.where(rows < N0, w_rows_ptr, w1_ptr + (row_idx - N0) * stride1)
    if WEIGHTS > 2:
        w_rows_ptr = tl.where(rows < N0 + N1, w_rows_ptr, w2_ptr + (row_idx - N0 - N1) * stride2)
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = (rows < N0 + N1 + N2)[:, None] & (cols < K)[None, :]
    w = tl.load(w_rows_ptr[:, None] + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    up = w
    if GATED:
        up_rows_ptr = w1_ptr + row_idx * stride1
        up = tl.load(up_rows_ptr[:, None] + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    return w, up


@triton.jit
def _matvec_kernel(
    x_ptr,
    w0_ptr,
    w1_ptr,
    w2_ptr,
    bias_ptr,
    norm_weight_ptr,
    out_ptr,
    N0,
    N1,
    N2,
    K,
    stride_x,
    stride0,
    stride1,
    stride2,
    eps,
    WEIGHTS: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
):
    """out = x @ [w0; w1; w2].T (+ bias): the rows of the first WEIGHTS weights stacked, N0 + N1 + N2
    outputs (the unused weights have 0 rows). GATED: out = silu(x @ w0.T) * (x @ w1.T), N0 outputs,
    each program reading the same rows of both weights. NORM: x is first RMS-normalised (float32) and
    scaled by norm_weight. RESIDUAL: out += the products (out is the float32 residual stream, updated in
    place). PDL: launched as a programmatic dependent; the first weight block loads before the wait for the
    kernel that writes x.

    The grid is a few programs per SM, each walking its tiles of BLOCK_N rows (tile = program, + programs, ...)
    and each tile's columns in BLOCK_K-wide blocks, one stream of blocks per program: the next block is loaded
    before the current one is reduced."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n_chunks = tl.cdiv(K, BLOCK_K)
    steps = tl.cdiv(tl.cdiv(N0 + N1 + N2, BLOCK_N) - pid, programs) * n_chunks  # this program's blocks
    w, up = _weight_tile(
        w0_ptr, w1_ptr, w2_ptr, pid, 0, N0, N1, N2, K, stride0, stride1, stride2, WEIGHTS, GATED, BLOCK_N, BLOCK_K
    )
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    inv_rms = 1.0
    if NORM:  # over the whole row first: every tile scales by it
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x_k = tl.load(x_ptr + cols * stride_x, mask=cols < K, other=0.0).to(tl.float32)
            squares += x_k * x_k
        inv_rms = 1.0 / tl.sqrt(tl.sum(squares) / K + eps)
    if WHOLE_ROW:  # one block spans the row: x is loaded once, every block reduces to its rows' outputs
        x_row = _scaled_x(x_ptr, norm_weight_ptr, 0, K, stride_x, NORM, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_N], tl.float32)  # GATED only
    for step in range(steps):
        if WHOLE_ROW:
            tile, k0, next_tile, next_k0 = pid + step * programs, 0, pid + (step + 1) * programs, 0
            x_k = x_row
        else:
            tile, k0 = pid + (step // n_chunks) * programs, (step % n_chunks) * BLOCK_K
            next_tile, next_k0 = pid + ((step + 1) // n_chunks) * programs, ((step + 1) % n_chunks) * BLOCK_K
            x_k = _scaled_x(x_ptr, norm_weight_ptr, k0, K, stride_x, NORM, BLOCK_K)
        w_next, up_next = _weight_tile(
            w0_ptr, w1_ptr, w2_ptr, next_tile, next_k0, N0, N1, N2, K, stride0, stride1, stride2, WEIGHTS, GATED,
            BLOCK_N, BLOCK_K,
        )  # fmt: skip
        acc += tl.sum(w.to(tl.float32) * x_k[None, :], axis=1)
        if GATED:
            acc_up += tl.sum(up.to(tl.float32) * x_k[None, :], axis=1)
        if k0 + BLOCK_K >= K:  # the tile's last block: its outputs
            rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            row_mask = rows < N0 + N1 + N2
            y = acc * inv_rms
            if GATED:
                y_up = acc_up * inv_rms
                y = y * tl.sigmoid(y) * y_up
            if HAS_BIAS:
                y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            if RESIDUAL:
                y += tl.load(out_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)
            acc = tl.zeros([BLOCK_N], tl.float32)
            acc_up = tl.zeros([BLOCK_N], tl.float32)
        w, up = w_next, up_next


@triton.jit
def _scaled_x(x_ptr, norm_weight_ptr, k0, K, stride_x, NORM: tl.constexpr, BLOCK_K: tl.constexpr):
    """x's columns k0.. in float32, times the norm's weight where NORM (the 1 / rms comes after the sums)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    x_k = tl.load(x_ptr + cols * stride_x, mask=cols < K, other=0.0).to(tl.float32)
    if NORM:
        x_k *= tl.load(norm_weight_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    return x_k


# Blocks of (BLOCK_N rows, up to MAX_BLOCK_K columns), WARPS warps, PROGRAMS_PER_SM programs per SM. On the H200,
# a token's 49 products chained in one CUDA graph with dependent launches took 274-279 us with 4 programs per SM of
# 4 rows (4 or 8 warps) against 333 for the previous kernel (a program per tile: thousands of programs); the engine's
# whole captured step, two rounds of nine settings, 445-448 us at 4 x 4 x 4 warps, 452-454 with 8 warps, 455-532
# with the others (docs/performance-notes.md, Decoding). With a few programs per SM, the next kernel's programs fit
# beside them and load their first blocks while these finish.
BLOCK_N = 4
MAX_BLOCK_K = 4096
WARPS = 4
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 3  # Triton's interpreter: few, so that the tests walk several tiles in a program


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid(x: torch.Tensor, rows: int) -> int:
    programs = PROGRAMS_PER_SM * _sm_count(x.device.index or 0) if x.is_cuda else INTERPRETER_PROGRAMS
    return min(cdiv(rows, BLOCK_N), programs)


def _block_k(K: int, gated: bool) -> int:
    """The whole row where it fits (half as wide for two weights' blocks)."""
    return min(next_power_of_2(K), MAX_BLOCK_K // (2 if gated else 1))


def _new_output(x: torch.Tensor, weights: list[torch.Tensor], gated: bool) -> torch.Tensor:
    n = weights[0].shape[0] if gated else sum(w.shape[0] for w in weights)
    return x.new_empty(*x.shape[:-1], n, dtype=weights[0].dtype)


def _launch_matvec(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bias: torch.Tensor | None,
    gated: bool,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    out = _new_output(x, weights, gated) if residual is None else residual
    x_row = x.reshape(-1)  # one row, as a view: its elements may be strided (a slice of a wider tensor)
    weights = [w if w.stride(-1) == 1 else w.contiguous() for w in weights]
    bias = None if bias is None else bias.contiguous()
    stacked = [] if gated else weights[1:]  # gated: the up weight has the gate weight's rows, no more outputs
    padded = weights + [weights[0]] * (3 - len(weights))  # the kernel's unused weights
    rows = [weights[0].shape[0]] + [w.shape[0] for w in stacked] + [0] * (2 - len(stacked))
    block_k = _block_k(x_row.shape[0], gated)
    _matvec_kernel[(_grid(x_row, out.shape[-1]),)](
        x_row,
        *padded,
        padded[0] if bias is None else bias,
        padded[0] if norm_weight is None else norm_weight,
        out,
        *rows,
        x_row.shape[0],
        x_row.stride(0),
        *(w.stride(0) for w in padded),
        eps,
        WEIGHTS=1 + len(stacked),
        GATED=gated,
        HAS_BIAS=bias is not None,
        NORM=norm_weight is not None,
        RESIDUAL=residual is not None,
        **dependent_launch(x),
        BLOCK_N=BLOCK_N,
        BLOCK_K=block_k,
        WHOLE_ROW=block_k >= x_row.shape[0],
        num_warps=WARPS,
    )
    return out


def _matvec_op(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    return _launch_matvec(x, weights, bias, gated)


# A custom op for torch.compile; eager calls launch directly, as the op's dispatch costs host time
# that a one-token step, bound by host time, would pay for each of its products.
_matvec = torch.library.custom_op("samba_kernels::matvec", _matvec_op, mutates_args=())


@_matvec.register_fake
def _(x, weights, bias, gated):
    return _new_output(x, weights, gated)


def _check(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    name: str,
    norm_weight: torch.Tensor | None = None,
) -> bool:
    """Raises on what the kernel cannot do; True where `use_triton(x)` (the kernel), False where the
    caller's F.linear reference runs."""
    if x.shape[:-1].numel() != 1:
        raise ValueError(f"{name} takes one row of x, got shape {tuple(x.shape)}: use F.linear for more rows")
    for weight in weights:
        # x may be float32 where it is normalised first (the residual stream of a bf16 model)
        dtype_ok = x.dtype == weight.dtype or (norm_weight is not None and x.dtype == torch.float32)
        if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or not dtype_ok:
            raise ValueError(
                f"{name}: x {tuple(x.shape)} {x.dtype} does not match weight {tuple(weight.shape)} "
                f"{weight.dtype} (x's last dimension is the weight's second, in the same dtype)"
            )
    if norm_weight is not None and norm_weight.shape != (x.shape[-1],):
        raise ValueError(f"{name}: norm_weight {tuple(norm_weight.shape)} must have x's last dimension {x.shape[-1]}")
    if not use_triton(x):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights, bias)):
        raise ValueError(f"{name} has no backward: call it without gradients (torch.no_grad) or use F.linear")
    if norm_weight is not None and torch.compiler.is_compiling():
        raise NotImplementedError(f"{name} with norm_weight runs eagerly only (the decode engine's step)")
    return True


def _run(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bias: torch.Tensor | None,
    gated: bool,
    norm_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _matvec(x, weights, bias, gated)
    return _launch_matvec(x, weights, bias, gated, norm_weight, eps)


def matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for an x holding one row, without gradients (semantics: `matvec_ref`): the
    Triton kernel where `use_triton(x)`, the reference elsewhere.

    Args:
        x (torch.Tensor): one row, shape `[..., K]` whose leading dimensions multiply to 1; its elements may be
            strided (a slice of a wider tensor); the weight's dtype, or float32 where `norm_weight` is given.
        weight (torch.Tensor): shape `[N, K]`, float32, bfloat16 or float16.
        bias (torch.Tensor | None): shape `[N]`.
        norm_weight (torch.Tensor | None): shape `[K]`: x is first RMS-normalised with `eps` and scaled by it, in
            the same kernel (eager calls only): F.linear(rms_norm(x) * norm_weight, weight, bias).
        eps (float): the norm's epsilon.

    Returns:
        shape `[..., N]` in the weight's dtype (accumulated in float32).
    """
    if not _check(x, [weight], bias, "matvec", norm_weight):
        return matvec_ref(x, weight, bias, norm_weight=norm_weight, eps=eps)
    return _run(x, [weight], bias, False, norm_weight, eps)


def matvec_add_(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """residual += F.linear(x, weight, bias), in place, for one row (semantics: `matvec_add_ref`): a residual
    stream updated by a projection in one launch, without gradients.

    Args:
        residual (torch.Tensor): one contiguous row `[..., N]`, float32 or x's dtype; updated in place.
        x (torch.Tensor): one row `[..., K]` in the weight's dtype.
        weight (torch.Tensor): shape `[N, K]`; bias (torch.Tensor | None): shape `[N]`.

    Returns:
        residual.
    """
    if residual.shape[:-1].numel() != 1 or residual.shape[-1] != weight.shape[0]:
        raise ValueError(f"matvec_add_: residual {tuple(residual.shape)} must be one row of {weight.shape[0]}")
    if not _check(x, [weight], bias, "matvec_add_"):
        return matvec_add_ref(residual, x, weight, bias)
    if not residual.is_contiguous():
        raise ValueError("matvec_add_ updates a contiguous residual row in place")
    return _launch_matvec(x, [weight], bias, False, residual=residual)


def stacked_matvec(
    x: torch.Tensor, weights: Sequence[torch.Tensor], *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5
) -> tuple[torch.Tensor, ...]:
    """(F.linear(x, w) for w in weights) in one launch, without concatenating the weights (as `matvec`;
    semantics: `stacked_matvec_ref`).

    Args:
        x (torch.Tensor): one row `[..., K]` (as for `matvec`).
        weights (Sequence[torch.Tensor]): one to three weights of shapes `[N_i, K]`.
        norm_weight, eps: as for `matvec`.

    Returns:
        a tuple of shapes `[..., N_i]`.
    """
    weights = list(weights)
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"stacked_matvec takes one to three weights, got {len(weights)}: split the list")
    if not _check(x, weights, None, "stacked_matvec", norm_weight):
        return stacked_matvec_ref(x, weights, norm_weight=norm_weight, eps=eps)
    return _run(x, weights, None, False, norm_weight, eps).split([w.shape[0] for w in weights], dim=-1)


def gated_matvec(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight) for a one-row x in one launch (as `matvec`;
    semantics: `gated_matvec_ref`): SwiGLU's first half, with the product of its two halves taken in the kernel.

    Args:
        x (torch.Tensor): one row `[..., K]` (as for `matvec`).
        gate_weight, up_weight (torch.Tensor): shape `[N, K]` each.
        norm_weight, eps: as for `matvec`.

    Returns:
        shape `[..., N]` in the weights' dtype.
    """
    if gate_weight.shape != up_weight.shape:
        raise ValueError(
            f"gated_matvec: gate {tuple(gate_weight.shape)} and up {tuple(up_weight.shape)} weights "
            "must have the same shape"
        )
    if not _check(x, [gate_weight, up_weight], None, "gated_matvec", norm_weight):
        return gated_matvec_ref(x, gate_weight, up_weight, norm_weight=norm_weight, eps=eps)
    return _run(x, [gate_weight, up_weight], None, True, norm_weight, eps)
