"""samba_kernels: Triton kernels for Samba's ops and their PyTorch references.

Imports torch and triton only, never transformers. Every op is a folder with the same shape:

    <op>/kernel.py   the Triton kernels, their launches, the torch.library custom ops and the public entry points
    <op>/naive.py    the PyTorch reference: torch only, readable, computed in float32; the CPU path and the tests'
                     oracle (the four Mamba ones ship with the model's remote code)

    selective_scan       selective_scan_fn, selective_state_update      (Mamba-1's scan and its decode step)
    causal_conv1d        causal_conv1d_fn, causal_conv1d_update         (Mamba's depthwise convolution)
    windowed_attention   windowed_attention, window_mask                (causal sliding-window attention)
    matvec               matvec, stacked_matvec, gated_matvec,          (one-row products of batch-1 decoding)
                         matvec_add_
    mamba_decode         mamba_decode_step                              (a Mamba mixer's decode token)
    decode_attention     ring_decode_attention                          (a token's attention over a ring buffer)
    rotary               rotary_embedding                               (rotate-half RoPE on queries and keys)
    norm_swiglu          rms_norm, swiglu, residual_add                 (RMSNorm with its cast; silu(gate) * up;
                                                                        the float32 residual add)
    token_choice         greedy_token_                                  (a decode step's greedy token and its
                                                                        end-of-sequence rule)
    embedding            embedding_rows_                                (a decode step's embedding lookup)

and each reference is the op's name with `_ref`. `compile_ahead` (_compile_ahead.py) compiles a computation's kernels in
parallel (forked children on Linux, or threads) before it runs, from a dry run. The public ops run their Triton
kernels on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (see `use_triton`); elsewhere they run the references. The kernels are
registered as torch.library custom ops (`torch.ops.samba_kernels.*`), so torch.compile traces models that use
them as one graph; rotary and norm_swiglu have none: under torch.compile they run their references, which inductor
fuses; nor have token_choice and embedding, which only the decode engine's eager step calls. Tests: tests/kernels/test_<op>.py.

Kernel code names what it holds: pointers (arguments, and tensors of pointers) end in `_ptr`, offset tensors
added to a pointer in `_off`, masks in `_mask`; loaded blocks have plain names (`u`, `dt`, `B_n`), `_raw` where a
block is still in its stored dtype; index vectors are named after what they index (`d`, `t`, `rows`).
"""

from ._common import programmatic_dependent_launch, use_triton
from ._compile_ahead import compile_ahead
from .causal_conv1d import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from .decode_attention import ring_decode_attention, ring_decode_attention_ref
from .embedding import embedding_rows_, embedding_rows_ref
from .mamba_decode import mamba_decode_step, mamba_decode_step_ref
from .matvec import (
    gated_matvec,
    gated_matvec_ref,
    matvec,
    matvec_add_,
    matvec_add_ref,
    matvec_ref,
    stacked_matvec,
    stacked_matvec_ref,
)
from .norm_swiglu import residual_add, residual_add_ref, rms_norm, rms_norm_ref, swiglu, swiglu_ref
from .rotary import rotary_embedding, rotary_embedding_ref
from .selective_scan import selective_scan_fn, selective_scan_ref, selective_state_update, selective_state_update_ref
from .token_choice import greedy_token_, greedy_token_ref
from .windowed_attention import window_mask, windowed_attention, windowed_attention_ref

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "compile_ahead",
    "embedding_rows_",
    "embedding_rows_ref",
    "gated_matvec",
    "gated_matvec_ref",
    "greedy_token_",
    "greedy_token_ref",
    "mamba_decode_step",
    "mamba_decode_step_ref",
    "matvec",
    "matvec_add_",
    "matvec_add_ref",
    "matvec_ref",
    "programmatic_dependent_launch",
    "residual_add",
    "residual_add_ref",
    "ring_decode_attention",
    "rms_norm",
    "rms_norm_ref",
    "ring_decode_attention_ref",
    "rotary_embedding",
    "rotary_embedding_ref",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "stacked_matvec",
    "stacked_matvec_ref",
    "swiglu",
    "swiglu_ref",
    "use_triton",
    "window_mask",
    "windowed_attention",
    "windowed_attention_ref",
]
