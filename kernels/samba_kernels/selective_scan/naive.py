"""PyTorch references of the selective scan and its one-step decode form.

Readable, per time step, and computed in float32 whatever the input dtype. They are the CPU path of the model
and the oracle of the kernel tests. This file imports torch only: the model's remote code ships it (as
`selective_scan_naive.py`, beside `mamba_reference.py`), so a checkpoint runs where samba-hf is not installed.

Shapes follow mamba-ssm:
    u, delta, z: (batch, dim, length)            A: (dim, d_state)
    B, C: (batch, d_state, length) or (batch, groups, d_state, length)
    state: (batch, dim, d_state), float32
    seq_idx: (batch, length) int32, the document each token belongs to (packed sequences)
"""

import torch
import torch.nn.functional as F

TIME_BLOCK = 256  # steps of the selective scan whose per-state factors are materialised at once


def _expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, d_state, length) or (batch, groups, d_state, length) -> (batch, dim, d_state, length)."""
    if BC.dim() == 3:
        return BC.unsqueeze(1).expand(-1, dim, -1, -1)
    groups = BC.shape[1]
    if dim % groups != 0:
        raise ValueError(f"dim ({dim}) must be divisible by the number of B/C groups ({groups})")
    return BC.repeat_interleave(dim // groups, dim=1)


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: True where a token starts a new document (never at position 0)."""
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    initial_state=None,
    seq_idx=None,
):
    """Mamba-1 selective scan: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t h_t (+ D u_t),
    gated by silu(z). The state restarts from zero where `seq_idx` changes and from
    `initial_state` (float32) at position 0. Arguments and results: `selective_scan_fn`'s."""
    dtype_out = u.dtype
    batch, dim, length = u.shape
    # delta contiguous: on the mixer's transposed view, softplus's backward returns a layout that torch.compile's
    # backward graph does not expect at batch > 1 (a view of it fails under aot_eager).
    u, delta, A = u.float(), delta.float().contiguous(), A.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.float().clone()
    keep = None if seq_idx is None else (~document_starts(seq_idx)).float()
    ys = []
    # Time in blocks, so that the (batch, dim, d_state) factors of only one block exist at a time: memory
    # O(length x dim), not O(length x dim x d_state). Unbinding each block once, rather than indexing
    # [..., t], keeps the backward linear in the length.
    for start in range(0, length, TIME_BLOCK):
        block = slice(start, start + TIME_BLOCK)
        decays = torch.exp(delta[:, :, None, block] * A[None, :, :, None]).unbind(-1)
        inputs = (delta[..., block] * u[..., block])[:, :, None, :] * _expand_groups(B[..., block].float(), dim)
        C_block = _expand_groups(C[..., block].float(), dim).unbind(-1)
        keep_block = None if keep is None else keep[:, block].unbind(-1)
        for t, (decay, write, C_t) in enumerate(zip(decays, inputs.unbind(-1), C_block)):
            if keep_block is not None:
                state = state * keep_block[t][:, None, None]
            state = decay * state + write
            ys.append((state * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_out)
    return (y, state) if return_last_state else y


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step of the selective scan, updating `state` (batch, dim, d_state) in place.
    Arguments and result: `selective_state_update`'s."""
    y, new_state = selective_scan_ref(
        x.unsqueeze(-1),
        dt.unsqueeze(-1),
        A,
        B.unsqueeze(-1),
        C.unsqueeze(-1),
        D=D,
        z=None if z is None else z.unsqueeze(-1),
        delta_bias=dt_bias,
        delta_softplus=dt_softplus,
        return_last_state=True,
        initial_state=state,
    )
    state.copy_(new_state)
    return y.squeeze(-1)
