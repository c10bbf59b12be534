"""One-row matrix products, `x @ weight.T + bias` for a single row of x: the projections of batch-1
decoding, where every token reads all of the model's weights once.

cuBLAS runs such a product as a general matrix product, tiled for many rows, often split over K with a
second kernel that sums the splits. Here each program takes BLOCK_N rows of the weight and walks K in
BLOCK_K-wide steps, accumulating in fp32, and sums across K once at the end: one pass over the weight,
one kernel. The weight is read with an evict-first hint, as nothing reads it again before the next
token. On the H200, with a cold L2, one token's 85 products of samba-421m took 397 µs against cuBLAS's
595 (benchmarks/matvec.md).

F.linear is the reference (and the path on CPU tensors without Triton's interpreter).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import use_triton


@triton.jit
def _matvec_kernel(x, weight, bias, out, N, K, stride_wn,
                   HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = weight + rows.to(tl.int64)[:, None] * stride_wn  # int64: vocabulary x hidden may pass 2**31
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * tl.load(x + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_mask)


def _tile(N: int, K: int) -> dict:
    """(BLOCK_N, BLOCK_K, warps), from a sweep of samba-421m's decode products on the H200 with a cold L2
    (benchmarks/matvec.md): two rows per program where that gives thousands of programs; otherwise wide
    K steps and eight warps, so that fewer programs still keep enough loads in flight."""
    if N >= 4096:
        return dict(BLOCK_N=2, BLOCK_K=512, num_warps=2)
    block_k = min(2048, triton.next_power_of_2(K))
    block_n = min(16, max(1 if N < 1024 else 2, 2048 // block_k))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_k >= 1024 else 4)


def _new_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _launch_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = _new_output(x, weight)
    x_row = x.reshape(-1)  # one row: a view, or a copy of K elements where its last dimension is strided
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    N, K = weight.shape
    tile = _tile(N, K)
    _matvec_kernel[(triton.cdiv(N, tile["BLOCK_N"]),)](
        x_row, weight, weight if bias is None else bias, out, N, K, weight.stride(0), HAS_BIAS=bias is not None,
        **tile)
    return out


# A custom op for torch.compile; eager calls launch directly, as the op's dispatch costs host time
# that a one-token step, bound by host time, would pay for each of its products.
_matvec = torch.library.custom_op("samba_kernels::matvec", _launch_matvec, mutates_args=())


@_matvec.register_fake
def _(x, weight, bias):
    return _new_output(x, weight)


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for an x holding one row (its leading dimensions multiply to 1), without
    gradients: the Triton kernel where `use_triton(x)`, F.linear elsewhere."""
    if x.shape[:-1].numel() != 1:
        raise ValueError(f"matvec takes one row of x, got shape {tuple(x.shape)}: use F.linear for more rows")
    if x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype:
        raise ValueError(f"matvec: x {tuple(x.shape)} {x.dtype} does not match weight {tuple(weight.shape)} "
                         f"{weight.dtype} (x's last dimension is the weight's second, in the same dtype)")
    if not use_triton(x):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise ValueError("matvec has no backward: call it without gradients (torch.no_grad) or use F.linear")
    return (_matvec if torch.compiler.is_compiling() else _launch_matvec)(x, weight, bias)
