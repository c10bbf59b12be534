"""RMSNorm, SwiGLU's silu(gate) * up and the float32 residual add, each one Triton kernel, for inference.

In a prefill, the model's formulas cost more than their arithmetic: RMSNorm reads the float32 residual stream, writes
it normalised in float32 and then rounds it to bf16 in a second kernel (and casts its weight to float32 in a third);
SwiGLU writes silu(gate) and reads it back for the product. Of a 128K-token prefill's 278 ms of kernels on the H200,
those took about 20 and 16 ms (benchmarks/results/prefill.md, profile). Here each reads its inputs once and writes
its output once, computing in float32 and rounding once. The residual add (a float32 stream plus a bf16 update)
runs in PyTorch's unvectorised kernel for mixed dtypes, at about 2.6 TB/s (18 ms of that prefill); here at the
copy bandwidth, with the same float32 sums.

Forward only: where autograd records (an input that requires a gradient under grad mode), and under torch.compile
(whose compiler fuses the formulas itself), the public functions run the references.
"""

import torch
import triton
import triton.language as tl

from .._common import cdiv, next_power_of_2, use_triton
from .naive import residual_add_ref, rms_norm_ref, swiglu_ref

TILE = 8192  # elements per program


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, H, s_x, eps, BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows of x (rows of stride s_x, unit stride along H) normalised into contiguous out."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (h < H)[None, :]
    x = tl.load(x_ptr + rows[:, None] * s_x + h[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + h, mask=h < H, other=0.0).to(tl.float32)
    inverse_rms = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    y = x * inverse_rms[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * H + h[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    gate = tl.load(gate_ptr + i, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_add_kernel(residual_ptr, update_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    residual = tl.load(residual_ptr + i, mask=mask, other=0.0).to(tl.float32)
    update = tl.load(update_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, residual + update, mask=mask)


def _records_gradients(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension (semantics: `rms_norm_ref`): one Triton kernel where `use_triton(x)`, outside
    torch.compile and without gradients to record; the reference elsewhere.

    Args:
        x (torch.Tensor): `[..., hidden]`, float32 or a 16-bit float; its last dimension contiguous where the kernel
            runs (else it reads a contiguous copy).
        weight (torch.Tensor): `[hidden]`.
        eps (float): added to the mean square.
        out_dtype (torch.dtype, optional): the output's dtype; weight's by default.

    Returns:
        torch.Tensor: x's shape, contiguous, in `out_dtype`, computed in float32 and rounded once.
    """
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be x's last dimension, x {tuple(x.shape)}")
    if torch.compiler.is_compiling() or not use_triton(x) or _records_gradients(x, weight):
        return rms_norm_ref(x, weight, eps, out_dtype)
    H = x.shape[-1]
    rows = x.reshape(-1, H) if x.stride(-1) == 1 else x.contiguous().view(-1, H)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0] == 0:
        return out
    BLOCK_H = next_power_of_2(H)
    ROWS = max(1, min(TILE // BLOCK_H, next_power_of_2(rows.shape[0])))
    _rms_norm_kernel[(cdiv(rows.shape[0], ROWS),)](
        rows, weight, out, rows.shape[0], H, rows.stride(0), eps, BLOCK_H=BLOCK_H, ROWS=ROWS, num_warps=8
    )
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (semantics: `swiglu_ref`, but computed in float32 and rounded once): one Triton kernel where
    `use_triton(gate)`, outside torch.compile and without gradients to record, for gate and up of one dtype; the
    reference elsewhere (which promotes mixed dtypes, as projections quantized differently may give). gate and up:
    the same shape; the output: their shape, contiguous."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    kernel_serves = use_triton(gate) and gate.dtype == up.dtype
    if torch.compiler.is_compiling() or not kernel_serves or _records_gradients(gate, up):
        return swiglu_ref(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if gate.numel():
        _swiglu_kernel[(cdiv(gate.numel(), TILE),)](gate, up, out, gate.numel(), BLOCK=TILE, num_warps=8)
    return out


def residual_add(residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """residual + update in float32 whatever their dtypes (semantics: `residual_add_ref`; float32 sums of the same
    values, so equal to it): one Triton kernel where `use_triton(residual)`, outside torch.compile and without
    gradients to record, for a float32 residual and an update of its shape, both contiguous; the reference elsewhere
    (which also broadcasts). A 16-bit residual (the embeddings, once per forward) takes the reference too: a second
    variant of the kernel would cost a compilation on a new machine for one add."""
    kernel_serves = (
        use_triton(residual)
        and residual.dtype == torch.float32
        and residual.shape == update.shape
        and residual.is_contiguous()
        and update.is_contiguous()
    )
    if torch.compiler.is_compiling() or not kernel_serves or _records_gradients(residual, update):
        return residual_add_ref(residual, update)
    out = torch.empty(residual.shape, dtype=torch.float32, device=residual.device)
    if out.numel():
        _residual_add_kernel[(cdiv(out.numel(), TILE),)](residual, update, out, out.numel(), BLOCK=TILE, num_warps=8)
    return out
