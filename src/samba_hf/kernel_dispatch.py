"""The one place where the ops of a Samba model are chosen: its Mamba ops, its RoPE, RMSNorm, SwiGLU and residual
add, and its attention implementation "samba_sdpa" (the default), registered with transformers' attention interface.

Mamba ops, `"auto"`: samba_kernels' Triton kernels for CUDA tensors, the PyTorch references elsewhere.
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
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


def kernel_op(name: str, config_choice: str, device: torch.device, reference):
    """samba_kernels.<name> for tensors on `device` where samba_kernels serve it (`kernels_serve`), else `reference`,
    the model's own formula of the same semantics. The kernels that stand in for a formula this way: RoPE
    (`rotary_embedding`, where the formula takes five PyTorch ops that read strided queries element by element), RMSNorm
    with its cast (`rms_norm`) and SwiGLU's gate (`swiglu`), where the formulas take two or three kernels, and the
    float32 residual add (`residual_add`), which PyTorch runs unvectorised for mixed dtypes. Under torch.compile each
    runs its reference, which the compiler fuses itself; rms_norm, swiglu and residual_add also do where autograd
    records (their kernels have no backward)."""
    return getattr(samba_kernels, name) if kernels_serve(config_choice, device) else reference


def kernels_serve(config_choice: str, device: torch.device) -> bool:
    """Whether samba_kernels' kernels serve tensors on `device` beside the Mamba ops (`kernel_op`'s, the window
    attention): CUDA tensors, samba_kernels installed, and kernel implementation "torch" not chosen."""
    return device.type == "cuda" and samba_kernels is not None and requested_implementation(config_choice) != "torch"


# ---------------------------------------------------------------------------------------- attention

SAMBA_SDPA = "samba_sdpa"
# Compiled FlexAttention (samba_kernels' training path) has no kernel for fewer queries than this.
MIN_KERNEL_QUERIES = 128


def samba_sdpa_mask(*, attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
    """transformers' sdpa mask, except for a sliding window over an input without padding or packed
    documents: no mask (None), since `samba_sdpa_attention` applies the window itself. sdpa would need a
    (queries x keys) mask there, which grows with the square of the input."""
    if local_size is not None and attention_mask is None and allow_is_causal_skip:
        return None
    return sdpa_mask(
        attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs
    )


def samba_sdpa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, seq_idx=None, **kwargs
):
    """sdpa, except for sliding-window layers left without a mask (by `samba_sdpa_mask`, or by the model over
    packed or padded rows without a cache): those run `windowed_attention` (samba_kernels' on CUDA, `windowed_sdpa`
    elsewhere), queries aligned to the end of the keys (a continuation of cached keys, or a whole sequence), each
    query within its document where `seq_idx` gives them (`modeling_samba.window_documents`)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    plain = attention_mask is not None or sliding_window is None or q_len == 1
    if plain or (seq_idx is None and q_len == kv_len <= sliding_window):  # the window covers every key: causal sdpa
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if fused_window_kernel(module.config, query):
        output = samba_kernels.windowed_attention(query, key, value, sliding_window, scale, seq_idx=seq_idx)
    else:
        output = windowed_sdpa(query, key, value, sliding_window, scale, seq_idx=seq_idx)
    return output.transpose(1, 2), None


def fused_window_kernel(config, query: torch.Tensor) -> bool:
    """Whether sliding-window attention on `query` runs samba_kernels.windowed_attention: CUDA tensors, unless
    config.windowed_attention_kernel is off (it compiles FlexAttention for training, which short sequences of
    many shapes pay for at every new shape) or kernel implementation "torch" is forced."""
    if not kernels_serve(config.kernel_implementation, query.device):
        return False
    return config.windowed_attention_kernel and query.shape[2] >= MIN_KERNEL_QUERIES


def windowed_sdpa(query, key, value, window: int, scale: float, block: int = 1024, seq_idx=None) -> torch.Tensor:
    """Causal sliding-window attention, query i at position len_kv - len_q + i seeing keys p - window + 1 .. p,
    computed by sdpa in blocks of `block` queries against the keys their window reaches: memory
    O(block x (block + window)) rather than O(len_q x len_kv). (batch, heads, len_q, head_dim) in and out;
    key/value heads may divide the query heads (grouped-query attention). With `seq_idx` (batch, length), the
    documents of packed rows (a whole sequence), a query sees only keys of its own document."""
    offset, outputs = key.shape[2] - query.shape[2], []
    for start in range(0, query.shape[2], block):
        end = min(start + block, query.shape[2])
        first_key, last_key = max(0, offset + start - window + 1), offset + end
        q_pos = torch.arange(offset + start, offset + end, device=query.device)[:, None]
        k_pos = torch.arange(first_key, last_key, device=query.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
        if seq_idx is not None:  # (batch, 1, queries, keys)
            mask = mask & (seq_idx[:, None, start:end, None] == seq_idx[:, None, None, first_key:last_key])
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, first_key:last_key],
                value[:, :, first_key:last_key],
                attn_mask=mask,
                scale=scale,
                enable_gqa=query.shape[1] != key.shape[1],
            )
        )
    return torch.cat(outputs, dim=2)


AttentionInterface.register(SAMBA_SDPA, samba_sdpa_attention)
AttentionMaskInterface.register(SAMBA_SDPA, samba_sdpa_mask)


def describe(config_choice: str = "auto") -> dict:
    """{op: {device: the implementation it would use here}}, for `samba-hf env`: the Mamba ops, RoPE, the
    sliding-window layers' attention under the default "samba_sdpa" (inputs without padding that reach
    past the window) and generate()'s decoding loop."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "Mamba ops": {},
        "RoPE": {},
        "RMSNorm, SwiGLU and the residual add": {},
        "sliding-window attention": {},
        "generate() decoding": {},
    }
    for device in devices:
        try:
            report["Mamba ops"][device] = mamba_ops(config_choice, torch.device(device)).name
        except (RuntimeError, ValueError) as error:
            report["Mamba ops"][device] = f"unavailable: {error}"
        serve = kernels_serve(config_choice, torch.device(device))
        report["RoPE"][device] = (
            "samba_kernels.rotary_embedding (Triton; the formula under torch.compile)" if serve else "the formula"
        )
        report["RMSNorm, SwiGLU and the residual add"][device] = (
            "samba_kernels.rms_norm, swiglu and residual_add (Triton without gradients; the formulas with them and "
            "under torch.compile)"
            if serve
            else "the formulas"
        )
        report["sliding-window attention"][device] = (
            "samba_kernels.windowed_attention (Triton forward without gradients, compiled FlexAttention with them)"
            if serve
            else "sdpa over blocks of queries against the keys their window reaches"
        )
        report["generate() decoding"][device] = (
            "the decode engine (CUDA graphs)" if device == "cuda" else "transformers' decoding loop"
        )
    return report
