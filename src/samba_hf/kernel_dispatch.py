"""The one place where the Mamba ops of a Samba model are chosen.

`"auto"`: samba_kernels' Triton kernels for CUDA tensors, the PyTorch references elsewhere.
`"triton"` / `"torch"` / `"mamba_ssm"` force one implementation (`config.kernel_implementation`,
overridden by the environment variable SAMBA_KERNELS). A forced implementation that is not
installed, or an error inside a kernel, is raised: no silent fallback to a slower path.

This file ships with the model's remote code, so it imports optional libraries inside try blocks
and keeps the PyTorch references (mamba_reference.py) beside it.
"""

import logging
import os
from types import SimpleNamespace

import torch

from .mamba_reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

logger = logging.getLogger(__name__)

try:  # samba-hf's own Triton kernels (installed with samba-hf)
    import samba_kernels
except ImportError:
    samba_kernels = None

try:  # the CUDA extensions of mamba-ssm / causal-conv1d (optional extra)
    from causal_conv1d import causal_conv1d_fn as _cc_causal_conv1d_fn
    from causal_conv1d import causal_conv1d_update as _cc_causal_conv1d_update
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _ms_selective_scan_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _ms_selective_state_update
except ImportError:
    _ms_selective_scan_fn = None

IMPLEMENTATIONS = ("auto", "triton", "torch", "mamba_ssm")

TORCH_OPS = SimpleNamespace(
    name="torch",
    selective_scan=selective_scan_ref,
    causal_conv1d=causal_conv1d_ref,
    causal_conv1d_update=causal_conv1d_update_ref,
    selective_state_update=selective_state_update_ref,
)


# Built once: torch.compile traces the lookup below, not the construction of a namespace.
TRITON_OPS = (
    SimpleNamespace(
        name="triton",
        selective_scan=samba_kernels.selective_scan_fn,
        causal_conv1d=samba_kernels.causal_conv1d_fn,
        causal_conv1d_update=samba_kernels.causal_conv1d_update,
        selective_state_update=samba_kernels.selective_state_update,
    )
    if samba_kernels is not None
    else None
)


def _mamba_ssm_scan(*args, initial_state=None, seq_idx=None, **kwargs):
    if initial_state is not None or seq_idx is not None:
        raise NotImplementedError(
            "mamba-ssm's selective scan cannot continue from a cached state or reset at packed-document boundaries; "
            "use kernel implementation 'triton' (the default on CUDA) for chunked prefill and packed sequences."
        )
    return _ms_selective_scan_fn(*args, **kwargs)


MAMBA_SSM_OPS = (
    SimpleNamespace(
        name="mamba_ssm",
        selective_scan=_mamba_ssm_scan,
        causal_conv1d=_cc_causal_conv1d_fn,
        causal_conv1d_update=_cc_causal_conv1d_update,
        selective_state_update=_ms_selective_state_update,
    )
    if _ms_selective_scan_fn is not None
    else None
)
MISSING = {
    "triton": "kernel implementation 'triton' needs samba_kernels (installed with samba-hf): `pip install samba-hf`, "
    "or choose SAMBA_KERNELS=torch.",
    "mamba_ssm": "kernel implementation 'mamba_ssm' needs the CUDA packages: `pip install samba-hf[mamba-ssm]` "
    "(mamba-ssm and causal-conv1d build against your CUDA), or choose SAMBA_KERNELS=triton.",
}


def requested_implementation(config_choice: str = "auto") -> str:
    choice = os.environ.get("SAMBA_KERNELS", config_choice)
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"SAMBA_KERNELS / kernel_implementation must be one of {IMPLEMENTATIONS}, got {choice!r}.")
    return choice


_logged = set()


def mamba_ops(config_choice: str, device: torch.device, decoding: bool = False) -> SimpleNamespace:
    """The Mamba ops for tensors on `device` (see the module docstring). A compiled one-token decode
    step takes the PyTorch ops under "auto": they are a few elementwise operations that the compiler
    fuses into its neighbours, where the Triton decode kernels are opaque custom ops."""
    choice = requested_implementation(config_choice)
    if choice == "auto":
        use_kernels = device.type == "cuda" and samba_kernels is not None
        choice = "triton" if use_kernels and not (decoding and torch.compiler.is_compiling()) else "torch"
    ops = {"triton": TRITON_OPS, "mamba_ssm": MAMBA_SSM_OPS, "torch": TORCH_OPS}[choice]
    if ops is None:
        raise RuntimeError(MISSING[choice])
    if not torch.compiler.is_compiling() and (ops.name, device.type) not in _logged:
        _logged.add((ops.name, device.type))
        logger.info("samba: Mamba ops on %s tensors use the %s implementation", device.type, ops.name)
    return ops


def windowed_attention_kernel(config_choice: str, device: torch.device):
    """samba_kernels' sliding-window attention (its own Triton forward without gradients, compiled
    FlexAttention with a cached block mask for training) for CUDA tensors, or None where the attention
    interface's own path should run."""
    if device.type != "cuda" or samba_kernels is None or requested_implementation(config_choice) == "torch":
        return None
    if not torch.compiler.is_compiling() and ("windowed_attention", device.type) not in _logged:
        _logged.add(("windowed_attention", device.type))
        logger.info("samba: sliding-window attention on %s tensors uses samba_kernels.windowed_attention", device.type)
    return samba_kernels.windowed_attention


def _matvec_on(config_choice: str, device_type: str) -> bool:
    """Whether a compiled step's one-row products on `device_type` take samba_kernels.matvec: on CUDA,
    or anywhere with "triton" forced. "mamba_ssm" concerns the Mamba ops only; the products follow "auto"."""
    choice = requested_implementation(config_choice)
    return samba_kernels is not None and choice != "torch" and (choice == "triton" or device_type == "cuda")


def one_row_kernels(config_choice: str, x: torch.Tensor, *weights: torch.Tensor):
    """samba_kernels (its `matvec`, `stacked_matvec` and `gated_matvec`) for one-row products of x with
    `weights` inside torch.compile, without gradients, in the weights' dtype, outside autocast, where
    `_matvec_on`; None elsewhere (the modules' own F.linear).
    Eager steps keep cuBLAS: they are bound by host time, and on the H200 a Triton launch took 59 µs of
    it against F.linear's 26 (an eager samba-421m decode step: 27.7 against 22.0 ms). In a compiled
    step's CUDA graph the host time is gone and the kernel's GPU time counts."""
    if not torch.compiler.is_compiling() or x.shape[:-1].numel() != 1 or any(w.dtype != x.dtype for w in weights):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return None
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return None
    return samba_kernels if _matvec_on(config_choice, x.device.type) else None


def mamba_decode_kernel(config_choice: str, x: torch.Tensor, *weights: torch.Tensor):
    """samba_kernels.mamba_decode_step (a Mamba mixer's token from in_proj's output to out_proj's input, in
    two launches) where `one_row_kernels` would run, except with "mamba_ssm" forced (whose decode ops
    then run); None elsewhere."""
    if requested_implementation(config_choice) == "mamba_ssm" or one_row_kernels(config_choice, x, *weights) is None:
        return None
    return samba_kernels.mamba_decode_step


def describe(config_choice: str = "auto") -> dict:
    """{op: {device: the implementation it would use here}}, for `samba-hf env`: the Mamba ops, the
    sliding-window layers' attention (for padding-free inputs past the window) and the one-row
    products of batch-1 decoding."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {"Mamba ops": {}, "sliding-window attention": {}, "one-row projections (batch-1 decoding)": {}}
    for device in devices:
        try:
            report["Mamba ops"][device] = mamba_ops(config_choice, torch.device(device)).name
        except (RuntimeError, ValueError) as error:
            report["Mamba ops"][device] = f"unavailable: {error}"
        fused = windowed_attention_kernel(config_choice, torch.device(device)) is not None
        report["sliding-window attention"][device] = (
            "samba_kernels (Triton forward without gradients, compiled FlexAttention with them)" if fused
            else "the attention interface with a window mask"
        )
        report["one-row projections (batch-1 decoding)"][device] = (
            "samba_kernels' one-row kernels (and its Mamba decode step) in compiled steps, F.linear in eager ones"
            if _matvec_on(config_choice, device)
            else "F.linear")
    return report
