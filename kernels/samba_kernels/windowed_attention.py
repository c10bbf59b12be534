"""Causal sliding-window attention: torch's flex_attention (compiled once) on CUDA, an exact eager
reference elsewhere.

    windowed_attention(query, key, value, window, scale=None) -> (batch, heads, len_q, head_dim)

query (batch, heads, len_q, head_dim); key, value (batch, kv_heads, len_kv, head_dim) with
heads % kv_heads == 0 (grouped-query attention) and len_q <= len_kv. Queries are aligned to the END
of the keys: query i sits at position p = len_kv - len_q + i and sees keys p - window + 1 .. p (itself
and the window - 1 keys before it), so a chunk that continues from cached keys works as well as a
full sequence. Differentiable in query, key and value on both paths.

On CUDA the op calls a compiled flex_attention (created on first use and reused) with a BlockMask
built once per (len_q, len_kv, window, device) and cached, so fully-masked key blocks are skipped.
It compiles for the first shape and once more with symbolic lengths at the second (automatic
dynamic shapes), so inputs of every length share it: compiled per shape, the ninth length would hit
dynamo's recompile limit and fall back to flex's unfused path, which materialises the whole score
matrix (198 GiB for a 64K-token prefill chunk on the H200). Called inside a torch.compile'd model,
it is traced into the model's graph (flex_attention and the block mask, without the caches). CPU
(and any other device) tensors take the eager reference with an explicit boolean mask, computed in
float32 (flex has no CPU backward).
"""

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def _check(query, key, value, window):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("query, key and value must be (batch, heads, length, head_dim)")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} disagree")
    if query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} disagree")
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key heads ({key.shape[1]})")
    if query.shape[2] > key.shape[2]:
        raise ValueError(f"len_q ({query.shape[2]}) must not exceed len_kv ({key.shape[2]})")
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def window_mask(len_q: int, len_kv: int, window: int, device=None) -> torch.Tensor:
    """(len_q, len_kv) bool, True where a query may see a key (queries aligned to the end of the keys)."""
    q_pos = torch.arange(len_q, device=device)[:, None] + (len_kv - len_q)
    k_pos = torch.arange(len_kv, device=device)[None, :]
    return (k_pos <= q_pos) & (q_pos - k_pos < window)


def windowed_attention_ref(query, key, value, window, scale=None):
    """Exact eager reference: explicit mask, float32 softmax, output in query's dtype."""
    _check(query, key, value, window)
    rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(rep, dim=1)
    v = value.float().repeat_interleave(rep, dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    mask = window_mask(query.shape[2], key.shape[2], int(window), query.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(query.dtype)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=None)


@functools.lru_cache(maxsize=64)
def _block_mask(len_q: int, len_kv: int, window: int, device: str):
    # A tensor, not an int: compiled flex guards on the ints a mask function closes over, so a prefill's
    # first chunk (offset 0) and its continuations (offset window - 1) would compile separately.
    offset = torch.tensor(len_kv - len_q, device=device)

    def sliding_window(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        return (kv_idx <= q_pos) & (q_pos - kv_idx < window)

    return create_block_mask(sliding_window, B=None, H=None, Q_LEN=len_q, KV_LEN=len_kv, device=device)


def windowed_attention(query, key, value, window, scale=None, kernel_options=None):
    """Causal sliding-window attention (see the module docstring); `kernel_options` is passed to
    flex_attention on CUDA (e.g. block sizes) and ignored elsewhere."""
    if not query.is_cuda:
        return windowed_attention_ref(query, key, value, window, scale)
    _check(query, key, value, window)
    # Inside a caller's torch.compile, its graph compiles flex and the mask itself: the host-side
    # caches (the compiled function, the block masks) are for eager callers.
    compiling = torch.compiler.is_compiling()
    attend = flex_attention if compiling else _compiled_flex()
    mask = (_block_mask.__wrapped__ if compiling else _block_mask)(query.shape[2], key.shape[2], int(window),
                                                                  str(query.device))
    return attend(query, key, value, block_mask=mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1],
                  kernel_options=kernel_options)
