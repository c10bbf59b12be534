"""PyTorch references of the depthwise causal convolution and its decode update.

Readable and computed in float32 whatever the input dtype. They are the CPU path of the model and the oracle of
the kernel tests. This file imports torch only: the model's remote code ships it (as `causal_conv1d_naive.py`,
beside `mamba_reference.py`), so a checkpoint runs where samba-hf is not installed.

Shapes follow causal-conv1d:
    x: (batch, dim, length)    weight: (dim, width)    conv state: (batch, dim, width - 1)
    seq_idx: (batch, length) int32, the document each token belongs to (packed sequences)
"""

import torch
import torch.nn.functional as F


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"activation must be None or 'silu', got {activation!r}")


def causal_conv1d_ref(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False, activation=None
):
    """Depthwise causal convolution: out_t = sum_k weight[:, k] x_{t - width + 1 + k} (+ bias).

    `initial_states` (batch, dim, width - 1) are the inputs before position 0; a token never sees
    inputs of another document of `seq_idx` (the initial states belong to the first document).
    The final states are the last width - 1 inputs. Arguments and results: `causal_conv1d_fn`'s."""
    dtype_out = x.dtype
    batch, dim, length = x.shape
    width = weight.shape[-1]
    history = x.new_zeros(batch, dim, width - 1) if initial_states is None else initial_states.to(x.dtype)
    padded = torch.cat([history, x], dim=-1).float()
    if seq_idx is not None:
        padded_idx = torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=-1)
    out = torch.zeros(batch, dim, length, dtype=torch.float32, device=x.device)
    for k in range(width):
        tap = padded[:, :, k : k + length]
        if seq_idx is not None:
            tap = tap * (padded_idx[:, k : k + length] == seq_idx).float()[:, None, :]
        out = out + weight[:, k, None].float() * tap
    if bias is not None:
        out = out + bias.float()[None, :, None]
    out = _activate(out, activation).to(dtype_out)
    if return_final_states:
        return out, padded[:, :, length:].to(dtype_out)
    return out


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """One decode step (or a few tokens) of the causal convolution, updating `conv_state`
    (batch, dim, state_len >= width - 1) in place. x: (batch, dim) or (batch, dim, length).
    Arguments and result: `causal_conv1d_update`'s."""
    single_token = x.dim() == 2
    if single_token:
        x = x.unsqueeze(-1)
    width, length, state_len = weight.shape[-1], x.shape[-1], conv_state.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"conv_state holds {state_len} steps, the convolution needs at least {width - 1}")
    window = torch.cat([conv_state.to(x.dtype), x], dim=-1)
    out = causal_conv1d_ref(window[:, :, state_len - width + 1 :], weight, bias, activation=activation)
    conv_state.copy_(window[:, :, -state_len:])
    out = out[:, :, -length:]
    return out.squeeze(-1) if single_token else out
