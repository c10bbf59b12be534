"""What the Triton ops share: the kernel-or-reference decision and small device functions."""

import contextlib
import contextvars
import os

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch: Triton 3.4 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton: the kernels' PDL branches are never compiled (see dependent_launch)
    gdc_launch_dependents = gdc_wait = None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET as Triton reads it (it decides, when a kernel is defined, whether it is interpreted)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def use_triton(x: torch.Tensor) -> bool:
    """True where the public ops run their Triton kernels on `x`: CUDA tensors always, CPU tensors
    under TRITON_INTERPRET=1 (Triton's interpreter); everywhere else the PyTorch references."""
    return x.is_cuda or (x.device.type == "cpu" and interpreter_enabled())


# Set by `programmatic_dependent_launch`: whether the decode kernels launch as programmatic dependents, in place
# of torch.compile's switch.
_dependent_launch: contextvars.ContextVar = contextvars.ContextVar("samba_kernels_dependent_launch", default=None)


@contextlib.contextmanager
def programmatic_dependent_launch(enabled: bool):
    """Within this context, the decode kernels launch as programmatic dependents (where the device and
    Triton can) if `enabled`, and never if not, whatever torch.compile's switch says: for a caller that
    launches or captures a chain of them itself (the decode engine)."""
    token = _dependent_launch.set(enabled)
    try:
        yield
    finally:
        _dependent_launch.reset(token)


def dependent_launch(x: torch.Tensor) -> dict:
    """The launch arguments of a decode kernel with a `PDL` constexpr on x's device: {"PDL": True,
    "launch_pdl": True} where it launches as a programmatic dependent (PDL, sm90 and later), else
    {"PDL": False}. Such a kernel may start while the one before it finishes, and reads what that one
    writes only after `gdc_wait()`. A one-token step is a chain of kernels of a few µs each; with PDL each
    loads what does not depend on the chain (its weights) during the previous one's tail.

    It follows torch.compile's own switch, `torch._inductor.config.triton.enable_pdl` (or
    TORCHINDUCTOR_ENABLE_PDL=1): PDL pays only when the kernels around take part too, and a dependent
    launch after an ordinary kernel costs time (docs/performance-notes.md, Decoding). Off in Triton's interpreter and
    before Triton 3.4 (which knows neither `gdc_wait` nor `launch_pdl`)."""
    if gdc_wait is None or not x.is_cuda or interpreter_enabled() or torch.cuda.get_device_capability(x.device)[0] < 9:
        return {"PDL": False}
    if _dependent_launch.get() is not None:
        return {"PDL": True, "launch_pdl": True} if _dependent_launch.get() else {"PDL": False}
    from torch._inductor import config  # here, not at import: it takes seconds, and only decoding on CUDA asks

    return {"PDL": True, "launch_pdl": True} if getattr(config.triton, "enable_pdl", False) else {"PDL": False}


def eager_autograd(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function of a custom op's implementation, setup_context and backward, for eager calls:
    torch.library's dispatch was the largest host cost of a scan on the H200's host (about 0.18 ms a forward
    under cProfile; docs/performance-notes.md), as long as a batch-1 4K scan's kernels. torch.compile traces the custom op.
    Gradients of unused outputs reach `backward` as None, as the custom op's do. (A forward that takes ctx: with a
    separate setup_context, Function.apply binds its arguments through inspect.signature on every call.)"""

    def forward_with_context(ctx, *inputs):
        output = forward(*inputs)
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)
        return output

    methods = dict(forward=staticmethod(forward_with_context), backward=staticmethod(backward))
    return type(name, (torch.autograd.Function,), methods)


# Host-side arithmetic of the launchers. triton.cdiv and triton.next_power_of_2 are constexpr functions since
# Triton 3.5, which unwrap their arguments on every call: about 4 µs each in host code, tens of them per scan.
def cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two at or above n (as triton.next_power_of_2; symbolic sizes pass through)."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def block_size(n: int, cap: int) -> int:
    return min(next_power_of_2(max(n, 1)), cap)


@triton.jit
def _transposed_copy_kernel(
    src_ptr, dst_ptr, dim, L, stride_sb, stride_sl, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr
):
    """dst (batch, dim, L) contiguous = src, whose channels are contiguous (element (b, d, l) at
    b stride_sb + l stride_sl + d): a tile loaded along the channels and stored along the positions."""
    b = tl.program_id(2).to(tl.int64)  # offsets in int64: channels x length passes 2**31 at a 1M-token sequence
    d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    pos = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    mask = (d[:, None] < dim) & (pos[None, :] < L)
    tile = tl.load(src_ptr + b * stride_sb + pos[None, :] * stride_sl + d[:, None], mask=mask)
    tl.store(dst_ptr + b * dim * L + d[:, None] * L + pos[None, :], tile, mask=mask)


COPY_TILE = 64  # (channels, positions) of a tile of `contiguous`'s copy


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """x, contiguous. A (batch, channels, length) view of (batch, length, channels) memory, as the model's
    projections hand the Mamba ops their outputs transposed, is copied in tiles by a Triton kernel: torch's copy
    moves it an element at a time on one side, 159 µs for 1 x 3072 x 8192 bf16 on the H200
    (docs/performance-notes.md). torch.compile makes its own copy kernels."""
    if x.is_contiguous() or x.dim() != 3 or x.stride(1) != 1 or not use_triton(x) or torch.compiler.is_compiling():
        return x.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        return _TransposedCopy.apply(x)
    return _transposed_copy(x)


def _transposed_copy(x: torch.Tensor) -> torch.Tensor:
    batch, dim, L = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _transposed_copy_kernel[(cdiv(L, COPY_TILE), cdiv(dim, COPY_TILE), batch)](
        x, out, dim, L, x.stride(0), x.stride(2), BLOCK_D=COPY_TILE, BLOCK_L=COPY_TILE
    )
    return out


class _TransposedCopy(torch.autograd.Function):
    """A copy: the gradient passes through as it is."""

    @staticmethod
    def forward(ctx, x):
        return _transposed_copy(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


@triton.jit
def silu_grad(x):
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))
