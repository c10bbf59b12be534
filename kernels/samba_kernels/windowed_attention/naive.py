"""PyTorch reference of causal sliding-window attention, and its mask.

An explicit boolean mask and a float32 softmax: the path of CPU tensors that need gradients, and the oracle of
the kernel tests beside an independent per-query softmax. Queries are aligned to the END of the keys (see
`windowed_attention`). With `seq_idx` (packed documents, one index per token) a query also sees only keys of its
own document.
"""

import torch


def check_inputs(query, key, value, window, seq_idx=None):
    """Raises where the shapes, the window or the documents do not fit windowed attention (shared with the Triton
    module)."""
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
    if seq_idx is not None and (
        query.shape[2] != key.shape[2] or tuple(seq_idx.shape) != (key.shape[0], key.shape[2])
    ):
        raise ValueError(
            f"seq_idx {tuple(seq_idx.shape)} must be (batch, length) of a whole sequence (query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}): packed documents cannot continue cached keys"
        )


def window_mask(len_q: int, len_kv: int, window: int, device=None) -> torch.Tensor:
    """`[len_q, len_kv]` bool, True where a query may see a key: query i sits at position len_kv - len_q + i
    and sees the keys at positions p - window + 1 .. p."""
    q_pos = torch.arange(len_q, device=device)[:, None] + (len_kv - len_q)
    k_pos = torch.arange(len_kv, device=device)[None, :]
    return (k_pos <= q_pos) & (q_pos - k_pos < window)


def windowed_attention_ref(query, key, value, window, scale=None, seq_idx=None):
    """Exact eager reference: explicit mask, float32 softmax, output in query's dtype. Arguments and result:
    `windowed_attention`'s."""
    check_inputs(query, key, value, window, seq_idx)
    rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(rep, dim=1)
    v = value.float().repeat_interleave(rep, dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    mask = window_mask(query.shape[2], key.shape[2], int(window), query.device)
    if seq_idx is not None:  # (batch, 1, len, len): same document
        mask = mask & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(query.dtype)
