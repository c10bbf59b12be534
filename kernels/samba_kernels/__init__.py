"""samba_kernels: Triton kernels for Samba's Mamba ops and their PyTorch references.

Imports torch and triton only, never transformers. Besides the Mamba ops: sliding-window attention
(`windowed_attention`), and for batch-1 decoding one-row products (`matvec`, `stacked_matvec`,
`gated_matvec`) and a Mamba mixer's token between its in_proj and out_proj (`mamba_decode_step`). The
public ops run their Triton kernels on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (see
`use_triton`); elsewhere they run the PyTorch references of `reference.py` (F.linear and F.silu for the
one-row products, `mamba_decode_step_ref`). The kernels are registered as torch.library custom ops
(`torch.ops.samba_kernels.*`), so torch.compile traces models that use them as one graph.
"""

from ._common import programmatic_dependent_launch, use_triton
from .causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from .decode_attention import ring_decode_attention
from .mamba_decode import mamba_decode_step, mamba_decode_step_ref
from .matvec import gated_matvec, matvec, matvec_add_, stacked_matvec
from .reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)
from .selective_scan import selective_scan_fn, selective_state_update
from .windowed_attention import window_mask, windowed_attention, windowed_attention_ref

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "gated_matvec",
    "mamba_decode_step",
    "mamba_decode_step_ref",
    "matvec",
    "matvec_add_",
    "programmatic_dependent_launch",
    "ring_decode_attention",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "stacked_matvec",
    "use_triton",
    "window_mask",
    "windowed_attention",
    "windowed_attention_ref",
]
