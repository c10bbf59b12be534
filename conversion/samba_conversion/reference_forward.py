"""Independent forward passes of the Samba checkpoint layouts that cannot be imported here: the
reference training code (github.com/microsoft/Samba, lit-gpt based) and flash-linear-attention's
Samba (fla/models/samba). They read the source state dict directly, in float32, with plain torch ops
and no code shared with modeling_samba.py, so that `--verify` and the tests check the conversion
against the architecture of the Samba paper (arXiv 2406.07522) rather than against itself:

    block:     x = x + mixer(rmsnorm(x));  x = x + swiglu(rmsnorm(x))   (the MLP may be absent)
    attention: RoPE (rotate-half, on the full head dim), causal, each query sees itself and the
               `window - 1` previous tokens, softmax scale 1/sqrt(head_dim)
    Mamba:     Mamba-1 selective SSM, run one time step at a time
"""

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

Weights = Mapping[str, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x @ weight.float().T
    return out if bias is None else out + bias.float()


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE of (batch, length, heads, head_dim): dimension i pairs with i + head_dim/2."""
    length, head_dim = x.shape[1], x.shape[-1]
    frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * frequencies[None, :]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def attention(q, k, v, window: int | None, rope_base: float) -> torch.Tensor:
    """q: (batch, length, heads, head_dim); k, v: (batch, length, kv_heads, head_dim). Query head h
    reads key/value head h // (heads // kv_heads)."""
    batch, length, heads, head_dim = q.shape
    q, k = rotary(q, rope_base), rotary(k, rope_base)
    group = heads // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5
    query_pos, key_pos = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return out.reshape(batch, length, heads * head_dim)


def mamba(x: torch.Tensor, w: Weights, prefix: str) -> torch.Tensor:
    """Mamba-1 mixer of (batch, length, d_model), with mamba-ssm's tensor names under `prefix`."""

    def get(name):
        return w[prefix + name].float() if prefix + name in w else None

    A = -torch.exp(get("A_log"))  # (d_inner, d_state)
    d_inner, d_state = A.shape
    u, z = linear(x, get("in_proj.weight"), get("in_proj.bias")).split(d_inner, dim=-1)
    # Depthwise causal convolution: output t mixes inputs t - K + 1 .. t of its own channel.
    kernel = get("conv1d.weight")[:, 0, :]  # (d_inner, K)
    width = kernel.shape[-1]
    padded = F.pad(u, (0, 0, width - 1, 0))
    u = sum(padded[:, j : j + u.shape[1]] * kernel[:, j] for j in range(width))
    if get("conv1d.bias") is not None:
        u = u + get("conv1d.bias")
    u = F.silu(u)
    rank = get("dt_proj.weight").shape[1]
    dt, B, C = linear(u, get("x_proj.weight")).split([rank, d_state, d_state], dim=-1)
    dt = F.softplus(linear(dt, get("dt_proj.weight"), get("dt_proj.bias")))  # (batch, length, d_inner)
    D = get("D")
    state = x.new_zeros(x.shape[0], d_inner, d_state)
    outputs = []
    for t in range(x.shape[1]):
        state = torch.exp(dt[:, t, :, None] * A) * state + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        outputs.append((state * C[:, t, None, :]).sum(-1) + D * u[:, t])
    y = torch.stack(outputs, dim=1) * F.silu(z)
    return linear(y, get("out_proj.weight"), get("out_proj.bias"))


def block_indices(w: Weights, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in w if (m := pattern.match(key))})


@torch.no_grad()
def lit_gpt_forward(
    w: Weights,
    input_ids: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    window: int | None = 2048,
    eps: float = 1e-5,
    rope_theta: float = 10000.0,
) -> torch.Tensor:
    """Logits of a checkpoint in the reference code's layout (`transformer.wte`, `transformer.h.{i}`
    with `norm_1`, `attn` (Mamba, or fused QKV `attn.attn` + `attn.proj`), `norm_2`,
    `mlp.swiglu.w1/w2/w3`, `transformer.ln_f`, `lm_head`)."""
    x = w["transformer.wte.weight"].float()[input_ids]
    batch, length, _ = x.shape
    for i in block_indices(w, "transformer.h."):
        p = f"transformer.h.{i}."
        h = rms_norm(x, w[p + "norm_1.weight"], eps)
        if p + "attn.attn.weight" in w:
            # Fused QKV: for each of the num_kv_heads groups, q_per_kv query heads, a key head, a value head.
            q_per_kv = num_heads // num_kv_heads
            qkv = linear(h, w[p + "attn.attn.weight"]).view(batch, length, num_kv_heads, q_per_kv + 2, -1)
            q = qkv[:, :, :, :q_per_kv].reshape(batch, length, num_heads, -1)
            k, v = qkv[:, :, :, q_per_kv], qkv[:, :, :, q_per_kv + 1]
            h = linear(attention(q, k, v, window, rope_theta), w[p + "attn.proj.weight"])
        else:
            h = mamba(h, w, p + "attn.")
        x = x + h
        if p + "norm_2.weight" in w:
            h = rms_norm(x, w[p + "norm_2.weight"], eps)
            x = x + swiglu(h, *(w[p + f"mlp.swiglu.{n}.weight"] for n in ("w1", "w2", "w3")))
    x = rms_norm(x, w["transformer.ln_f.weight"], eps)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["transformer.wte.weight"]
    return linear(x, head)


@torch.no_grad()
def fla_forward(
    w: Weights,
    input_ids: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    window: int | None = 2048,
    eps: float = 1e-5,
    rope_theta: float = 10000.0,
) -> torch.Tensor:
    """Logits of a checkpoint in flash-linear-attention's Samba layout (`backbone.embeddings`,
    `backbone.layers.{i}` with `mixer_norm`, `mixer` (Mamba or q/k/v/o_proj), `mlp_norm`,
    `mlp.gate/up/down_proj`, `backbone.norm_f`, `lm_head`)."""
    x = w["backbone.embeddings.weight"].float()[input_ids]
    batch, length, _ = x.shape
    for i in block_indices(w, "backbone.layers."):
        p = f"backbone.layers.{i}."
        h = rms_norm(x, w[p + "mixer_norm.weight"], eps)
        if p + "mixer.q_proj.weight" in w:
            q = linear(h, w[p + "mixer.q_proj.weight"]).view(batch, length, num_heads, -1)
            k = linear(h, w[p + "mixer.k_proj.weight"]).view(batch, length, num_kv_heads, -1)
            v = linear(h, w[p + "mixer.v_proj.weight"]).view(batch, length, num_kv_heads, -1)
            h = linear(attention(q, k, v, window, rope_theta), w[p + "mixer.o_proj.weight"])
        else:
            h = mamba(h, w, p + "mixer.")
        x = x + h
        h = rms_norm(x, w[p + "mlp_norm.weight"], eps)
        x = x + swiglu(h, *(w[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))
    x = rms_norm(x, w["backbone.norm_f.weight"], eps)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["backbone.embeddings.weight"]
    return linear(x, head)
