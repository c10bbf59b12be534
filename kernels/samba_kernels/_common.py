"""What the Triton ops share: the kernel-or-reference decision and small device functions."""

import os

import torch
import triton
import triton.language as tl


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET as Triton reads it (it decides, when a kernel is defined, whether it is interpreted)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def use_triton(x: torch.Tensor) -> bool:
    """True where the public ops run their Triton kernels on `x`: CUDA tensors always, CPU tensors
    under TRITON_INTERPRET=1 (Triton's interpreter); everywhere else the PyTorch references."""
    return x.is_cuda or (x.device.type == "cpu" and interpreter_enabled())


def block_size(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


@triton.jit
def silu_grad(x):
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))
