"""PyTorch Samba model: Mamba and sliding-window attention mixers, each followed by a SwiGLU MLP.

Samba (Ren et al., 2024, arXiv 2406.07522) interleaves Mamba-1 selective state-space layers with
sliding-window attention, so it runs in linear time and extrapolates to unlimited context. The
cache is transformers' own hybrid cache: `DynamicCache(config=config)` holds conv + SSM states for
Mamba layers and at most `sliding_window - 1` keys for sliding-window layers.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticCache, StaticLayer, StaticSlidingWindowLayer
from transformers.generation import GenerationMixin
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_samba import ATTENTION_TYPES, SambaConfig
from .kernel_dispatch import mamba_decode_kernel, mamba_ops, one_row_kernels, windowed_attention_kernel

logger = logging.get_logger(__name__)


class SambaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Normalise in float32; return the weight's dtype, since the residual stream may be float32
        # while the layers that read the output are bf16. F.rms_norm is one fused kernel on CUDA, where
        # the written-out formula is five (a tenth of an eager long-prompt prefill's time).
        normalized = F.rms_norm(hidden_states.float(), self.weight.shape, self.weight.float(), self.variance_epsilon)
        return normalized.to(self.weight.dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class SambaLinear(nn.Linear):
    """nn.Linear whose one-row products without gradients inside torch.compile (a compiled batch-1 decode
    step) run samba_kernels' matvec on CUDA, where cuBLAS runs them as general matrix products
    (benchmarks/matvec.md; `kernel_dispatch.one_row_kernels` says when). It is a subclass, not a fused
    path: adapters that wrap an nn.Linear (PEFT's LoRA) wrap it and add their own term, and quantizers
    that replace nn.Linear modules replace it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: SambaConfig):
        super().__init__(in_features, out_features, bias=bias)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = one_row_kernels(self.config.kernel_implementation, x, self.weight)
        return super().forward(x) if kernels is None else kernels.matvec(x, self.weight, self.bias)


def plain_projection(projection: nn.Module) -> bool:
    """Whether a fused kernel may read this projection's weight itself: a plain SambaLinear, not wrapped by
    an adapter (PEFT's LoRA wraps it and adds its term), replaced by a quantizer, or hooked (a hook may
    move or change the weight)."""
    return (
        type(projection) is SambaLinear
        and not hasattr(projection, "_hf_hook")
        and not projection._forward_hooks
        and not projection._forward_pre_hooks
    )


def one_launch_kernels(x: torch.Tensor, *projections: nn.Module):
    """samba_kernels where a compiled one-row step may compute `projections`, which share the input x, in
    one kernel launch (`stacked_matvec`, `gated_matvec`); None where each must run as its own module (one
    is not a `plain_projection` without bias)."""
    if not all(plain_projection(projection) and projection.bias is None for projection in projections):
        return None
    config = projections[0].config
    return one_row_kernels(config.kernel_implementation, x, *(projection.weight for projection in projections))


class SambaMLP(nn.Module):
    """SwiGLU without bias: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: SambaConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = SambaLinear(config.hidden_size, intermediate_size, False, config)
        self.up_proj = SambaLinear(config.hidden_size, intermediate_size, False, config)
        self.down_proj = SambaLinear(intermediate_size, config.hidden_size, False, config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        kernels = one_launch_kernels(hidden_states, self.gate_proj, self.up_proj)
        if kernels is not None:  # a compiled one-row step: both halves and their product in one kernel
            return self.down_proj(kernels.gated_matvec(hidden_states, self.gate_proj.weight, self.up_proj.weight))
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class SambaRotaryEmbedding(nn.Module):
    def __init__(self, config: SambaConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: SambaConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate-half (GPT-NeoX) RoPE on (batch, heads, length, head_dim) queries and keys."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, length, head_dim) -> (batch, kv_heads * n_rep, length, head_dim)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, length, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class SambaAttention(nn.Module):
    """Multi-head (grouped-query) attention with RoPE, full or over a sliding window.

    The window reaches eager/sdpa through the 4D mask, the flash kernels through the
    `sliding_window` argument and flex through its block mask: both are passed."""

    def __init__(self, config: SambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.q_proj = SambaLinear(config.hidden_size, config.num_attention_heads * self.head_dim, False, config)
        self.k_proj = SambaLinear(config.hidden_size, config.num_key_value_heads * self.head_dim, False, config)
        self.v_proj = SambaLinear(config.hidden_size, config.num_key_value_heads * self.head_dim, False, config)
        self.o_proj = SambaLinear(config.num_attention_heads * self.head_dim, config.hidden_size, False, config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        padding_free: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        kernels = one_launch_kernels(hidden_states, self.q_proj, self.k_proj, self.v_proj)
        if kernels is not None:  # a compiled one-row step: the three products in one kernel
            weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
            query, key, value = kernels.stacked_matvec(hidden_states, weights)
        else:
            query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        query = query.view(hidden_shape).transpose(1, 2)
        key = key.view(hidden_shape).transpose(1, 2)
        value = value.view(hidden_shape).transpose(1, 2)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        windowed_kernel = self.windowed_kernel(query, key, padding_free)
        if windowed_kernel is not None:  # the sdpa/eager paths would materialise a window mask
            attn_output = windowed_kernel(query, key, value, self.sliding_window, self.scaling).transpose(1, 2)
            return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), None

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def windowed_kernel(self, query: torch.Tensor, key: torch.Tensor, padding_free: bool):
        """The fused sliding-window kernel, for inputs without padding or packing that reach past the
        window (shorter ones run sdpa's causal path, no mask needed) when the chosen implementation is
        sdpa or eager (flash and flex get the window themselves). Compiled FlexAttention has no kernel
        for fewer than 128 queries, hence the minimum."""
        if (
            self.sliding_window is None
            or not self.config.windowed_attention_kernel
            or not padding_free
            or query.shape[2] < 128
            or key.shape[2] <= self.sliding_window
            or self.config._attn_implementation not in ("sdpa", "eager")
            or self.config.output_attentions  # the kernel returns no attention weights
        ):
            return None
        return windowed_attention_kernel(self.config.kernel_implementation, query.device)


def zero_padding(hidden_states: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero (batch, channels, length) states at padded positions, so that left padding never enters
    the convolution or SSM state (a zero input leaves a zero state at zero)."""
    if padding_mask is None:
        return hidden_states
    return hidden_states * padding_mask[:, None, :].to(hidden_states.dtype)


class SambaMambaMixer(nn.Module):
    """Mamba-1 selective SSM mixer.

    Unlike transformers' MambaMixer it continues from the cached conv and SSM states for
    multi-token inputs too (chunked prefill, multi-turn chat), resets them at packed-document
    boundaries, and calls every `nn.Linear` as a module so that adapters (LoRA) on any of them
    take effect. The ops come from `kernel_dispatch`: Triton kernels on CUDA, PyTorch elsewhere."""

    def __init__(self, config: SambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.intermediate_size = config.mamba_intermediate_size
        self.state_size = config.state_size
        self.time_step_rank = config.time_step_rank
        self.in_proj = SambaLinear(config.hidden_size, 2 * self.intermediate_size, config.use_bias, config)
        self.conv1d = nn.Conv1d(
            self.intermediate_size,
            self.intermediate_size,
            kernel_size=config.conv_kernel,
            groups=self.intermediate_size,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.x_proj = SambaLinear(self.intermediate_size, self.time_step_rank + 2 * self.state_size, False, config)
        self.dt_proj = SambaLinear(self.time_step_rank, self.intermediate_size, True, config)
        A = torch.arange(1, self.state_size + 1, dtype=torch.float32).expand(self.intermediate_size, -1)
        self.A_log = nn.Parameter(torch.log(A).contiguous())
        self.D = nn.Parameter(torch.ones(self.intermediate_size))
        self.out_proj = SambaLinear(self.intermediate_size, config.hidden_size, config.use_bias, config)

    @force_accelerate_hooks("conv1d")  # the conv weight is handed to the op directly
    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        conv_weight, conv_bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        conv_state = cache.get_conv_state(self.layer_idx) if cache is not None else None
        ssm_state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        x = zero_padding(x, padding_mask)
        decoding = conv_state is not None and x.shape[-1] == 1
        decode_kernel = self.decode_kernel(x[..., 0], conv_weight) if decoding else None
        if decode_kernel is not None:  # a compiled one-row step: conv to state update in two launches
            y = decode_kernel(x[..., 0], gate[..., 0], conv_state, ssm_state, conv_weight, conv_bias, self.x_proj.weight,
                              self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D)  # fmt: skip
            return self.out_proj(y.unsqueeze(1))
        A = -torch.exp(self.A_log.float())
        ops = mamba_ops(self.config.kernel_implementation, hidden_states.device, decoding)
        if decoding:  # one token: update the cached states in place (static addresses for CUDA graphs)
            x = ops.causal_conv1d_update(x.squeeze(-1), conv_state, conv_weight, conv_bias, "silu").unsqueeze(-1)
        else:
            # The cache overwrites its states in place below: hand the ops copies, which autograd may keep.
            conv_state = conv_state.clone() if conv_state is not None else None
            ssm_state = ssm_state.clone() if ssm_state is not None else None
            x, new_conv_state = ops.causal_conv1d(
                x,
                conv_weight,
                conv_bias,
                seq_idx=seq_idx,
                initial_states=conv_state,
                return_final_states=True,
                activation="silu",
            )
            x = zero_padding(x, padding_mask)

        time_step, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.time_step_rank, self.state_size, self.state_size], dim=-1
        )
        # dt_proj is called as a module (bias included) so that LoRA on it takes effect.
        delta = self.dt_proj(time_step).transpose(1, 2)
        B, C = B.transpose(1, 2), C.transpose(1, 2)

        if decoding:
            y = ops.selective_state_update(
                ssm_state, x.squeeze(-1), delta.squeeze(-1), A, B.squeeze(-1), C.squeeze(-1),
                D=self.D.float(), z=gate.squeeze(-1), dt_softplus=True,
            ).unsqueeze(-1)  # fmt: skip
        else:
            y, last_ssm_state = ops.selective_scan(
                x, delta, A, B, C, D=self.D.float(), z=gate, delta_softplus=True, return_last_state=True,
                initial_state=ssm_state, seq_idx=seq_idx,
            )  # fmt: skip
            if cache is not None:
                cache.update_conv_state(new_conv_state, self.layer_idx, conv_kernel_size=self.config.conv_kernel - 1)
                cache.update_recurrent_state(last_ssm_state, self.layer_idx)
        return self.out_proj(y.transpose(1, 2))

    def decode_kernel(self, x_row: torch.Tensor, conv_weight: torch.Tensor):
        """samba_kernels.mamba_decode_step for the token of a compiled batch-1 step (`mamba_decode_kernel`)
        whose x_proj and dt_proj are `plain_projection`s (an adapter or a hook on either keeps the modules,
        so that it takes effect); None elsewhere."""
        if not (plain_projection(self.x_proj) and plain_projection(self.dt_proj)) or self.x_proj.bias is not None:
            return None
        weights = (self.x_proj.weight, self.dt_proj.weight, conv_weight)
        return mamba_decode_kernel(self.config.kernel_implementation, x_row, *weights)


class SambaDecoderLayer(GradientCheckpointingLayer):
    """x + mixer(norm(x)), then x + mlp(norm(x)) when the layer has an MLP."""

    def __init__(self, config: SambaConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.layer_types[layer_idx]
        self.residual_in_fp32 = config.residual_in_fp32
        self.mixer_norm = SambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.mixer_type == "linear_attention":
            self.mixer = SambaMambaMixer(config, layer_idx)
        elif self.mixer_type == "mlp":
            self.mixer = SambaMLP(config, config.mamba_intermediate_size)
        else:
            self.mixer = SambaAttention(config, layer_idx)
        if config.use_mlp[layer_idx]:
            self.mlp_norm = SambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = SambaMLP(config, config.intermediate_size)
        else:
            self.mlp_norm = self.mlp = None

    def add_residual(self, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.residual_in_fp32:  # the add promotes a bf16 update to float32 itself, without a cast copy
            return residual.float() + update
        return residual + update

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        seq_idx: torch.Tensor | None = None,
        padding_free: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        mixer_input = self.mixer_norm(hidden_states)
        if self.mixer_type == "linear_attention":
            update = self.mixer(mixer_input, cache=cache, padding_mask=attention_mask, seq_idx=seq_idx)
        elif self.mixer_type == "mlp":
            update = self.mixer(mixer_input)
        else:
            update, _ = self.mixer(
                mixer_input, position_embeddings, attention_mask, cache=cache, padding_free=padding_free, **kwargs
            )
        hidden_states = self.add_residual(hidden_states, update)
        if self.mlp is not None:
            hidden_states = self.add_residual(hidden_states, self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states


class SlidingWindowRingLayer(StaticLayer):
    """Static cache of a sliding-window attention layer: the last `sliding_window` keys and values in
    a ring buffer.

    transformers' `StaticSlidingWindowLayer` keeps its keys in order by rolling the buffer, and counts
    tokens in a Python int that it branches on; compiled, that int is an input of the graph and CUDA
    graphs record a new graph at every step (huggingface/transformers#44609). Here a one-token step
    writes its key at slot `tokens_seen % sliding_window`, a tensor index, so every step runs the same
    graph; `ring_window_mask` says which slots hold tokens of the window. Attention does not depend on
    the order of the keys: their positions are already rotated into them."""

    is_sliding = True

    def __init__(self, sliding_window: int):
        super().__init__(max_cache_len=sliding_window)

    @property
    def is_croppable(self) -> bool:
        return False  # once the ring has wrapped, the overwritten keys cannot come back

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        window, new_tokens = self.max_cache_len, key_states.shape[-2]
        if new_tokens == 1:  # a decode step: in place, at a tensor index
            slot = (self.cumulative_length % window).view(1)
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.cumulative_length.add_(1)
            return self.keys, self.values
        # Several tokens (a prompt, a prefill chunk, a continuation): they attend to the kept keys in
        # order followed by themselves, as `get_mask_sizes` describes; the last `window` are kept.
        seen = int(self.cumulative_length)
        kept_slots = torch.arange(seen - min(seen, window), seen, device=self.device) % window
        keys = torch.cat([self.keys[:, :, kept_slots], key_states], dim=2)
        values = torch.cat([self.values[:, :, kept_slots], value_states], dim=2)
        total = seen + new_tokens
        last_slots = torch.arange(total - min(total, window), total, device=self.device) % window
        self.keys.index_copy_(2, last_slots, keys[:, :, -last_slots.numel() :])
        self.values.index_copy_(2, last_slots, values[:, :, -last_slots.numel() :])
        self.cumulative_length.add_(new_tokens)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Length and first position of the keys a multi-token `update` returns (one-token steps are
        masked by `ring_window_mask`)."""
        seen = int(self.cumulative_length)
        kept = min(seen, self.max_cache_len)
        return kept + query_length, seen - kept


def use_ring_buffers(cache: StaticCache, config: SambaConfig) -> StaticCache:
    """Replace the static sliding-window layers of `cache` by `SlidingWindowRingLayer`s, for the
    attention implementations whose masks can say which slots to read (sdpa and eager; flash
    attention takes a window, not a mask, and keeps transformers' layers)."""
    if config._attn_implementation in ("sdpa", "eager"):
        cache.layers = [
            SlidingWindowRingLayer(config.sliding_window) if type(layer) is StaticSlidingWindowLayer else layer
            for layer in cache.layers
        ]
    return cache


class SambaStaticCache(StaticCache):
    """transformers' `StaticCache` with ring-buffer sliding-window layers (`SlidingWindowRingLayer`),
    so that a compiled decode step is one CUDA graph, replayed at every length. Its memory does not
    grow with `max_cache_len`: Samba's layers keep a window of keys and a fixed-size state.
    `generate(cache_implementation="static")` builds one."""

    def __init__(self, config: SambaConfig, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        use_ring_buffers(self, config)


def ring_window_mask(config: SambaConfig, inputs_embeds: torch.Tensor, attention_mask, ring: SlidingWindowRingLayer):
    """The sliding-window mask of a one-token step that reads a ring buffer: slot s holds the latest
    position p = s (mod window) up to the new token's, and is read when p >= 0 (written) and the 2D
    `attention_mask`, if any, does not mark p as padding. Built from the ring's tensor count only, so
    it is the same graph at every step."""
    if config._attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"A ring-buffer static cache needs attention implementation 'sdpa' or 'eager', not "
            f"{config._attn_implementation!r}: build the cache after choosing the implementation."
        )
    window, device = ring.max_cache_len, inputs_embeds.device
    query_position = ring.cumulative_length.to(device)
    slots = torch.arange(window, device=device)
    positions = query_position - (query_position - slots) % window
    readable = positions >= 0
    if attention_mask is not None:
        readable = readable & attention_mask[:, positions.clamp(min=0)].bool()

    def slot_mask(batch_idx, head_idx, q_idx, kv_idx):
        return readable.expand(inputs_embeds.shape[0], window)[batch_idx, kv_idx]

    return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
        batch_size=inputs_embeds.shape[0],
        q_length=1,
        kv_length=window,
        mask_function=slot_mask,
        allow_is_causal_skip=False,
        dtype=inputs_embeds.dtype,
        device=device,
    )


def create_layer_masks(config: SambaConfig, inputs_embeds, attention_mask, cache, position_ids) -> dict:
    """The attention mask of each layer type (transformers' mask functions; `ring_window_mask` for a
    one-token step over a ring-buffer cache)."""
    mask_kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "cache": cache,
        "position_ids": position_ids,
    }
    mask_functions = {
        "full_attention": create_causal_mask,
        "sliding_attention": create_sliding_window_causal_mask,
        "linear_attention": create_recurrent_attention_mask,
    }
    ring = None
    if cache is not None and inputs_embeds.shape[1] == 1:
        ring = next((layer for layer in cache.layers if isinstance(layer, SlidingWindowRingLayer)), None)
    masks = {}
    for layer_type in set(config.layer_types):
        if layer_type == "sliding_attention" and ring is not None:
            masks[layer_type] = ring_window_mask(config, inputs_embeds, attention_mask, ring)
        elif layer_type in mask_functions:
            masks[layer_type] = mask_functions[layer_type](**mask_kwargs)
    return masks


class SambaPreTrainedModel(PreTrainedModel):
    config: SambaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SambaDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _is_stateful = True
    _keep_in_fp32_modules_strict = ["mixer.A_log", "mixer.D"]
    _can_record_outputs = {"hidden_states": SambaDecoderLayer, "attentions": SambaAttention}

    def _init_weights(self, module):
        """The reference initialisation: PyTorch's default for linear layers with zero biases, N(0, 0.02)
        embeddings, Mamba's S4D-real A and inverse-softplus time-step bias, and the projections that
        write to the residual stream scaled by 1/sqrt(2 * num_hidden_layers)."""
        config = self.config
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1] * module.weight.shape[2])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        elif isinstance(module, SambaRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, SambaRotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        if isinstance(module, SambaMambaMixer):
            self._init_mamba(module)
        for name in ("out_proj", "o_proj", "down_proj"):  # residual-stream writers
            if isinstance(module, (SambaMambaMixer, SambaAttention, SambaMLP)) and hasattr(module, name):
                weight = getattr(module, name).weight
                bound = 1 / math.sqrt(weight.shape[1]) / math.sqrt(2 * config.num_hidden_layers)
                init.uniform_(weight, -bound, bound)

    def _init_mamba(self, mixer: SambaMambaMixer):
        config = self.config
        A = torch.arange(1, mixer.state_size + 1, dtype=torch.float32).expand(mixer.intermediate_size, -1)
        init.copy_(mixer.A_log, torch.log(A))
        init.ones_(mixer.D)
        init.uniform_(mixer.dt_proj.weight, -(mixer.time_step_rank**-0.5), mixer.time_step_rank**-0.5)
        log_min, log_max = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(mixer.intermediate_size) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=config.time_step_floor)
        init.copy_(mixer.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


class SambaModel(SambaPreTrainedModel):
    def __init__(self, config: SambaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([SambaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = SambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.has_attention = any(t in ATTENTION_TYPES for t in config.layer_types)
        self.rotary_emb = SambaRotaryEmbedding(config) if config.use_rope and self.has_attention else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """
        attention_mask (`torch.Tensor` of shape `(batch, length)`, *optional*):
            1 for real tokens, 0 for padding. Padding must be on the left (as `generate` pads for
            decoder-only models): padded positions are zeroed before every Mamba convolution and
            scan, so they leave no trace in the recurrent state.
        position_ids (`torch.LongTensor` of shape `(batch, length)`, *optional*):
            Restarting at 0 inside a row marks packed documents (transformers'
            `DataCollatorWithFlattening`): attention does not cross them and Mamba states reset.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if cache is not None and inputs_embeds.shape[1] > 1 and isinstance(attention_mask, torch.Tensor):
            check_left_padding(attention_mask)  # the caller will continue from this cache (not per decode step)
        # Packed documents, as transformers' masks detect them: position_ids restarting, no padding
        # mask and no cache. Mamba states then reset where the attention mask separates documents.
        seq_idx = None
        if position_ids is not None and attention_mask is None and cache is None:
            seq_idx = packed_document_index(position_ids)
        if (  # asked of prompts, where such a cache is filled, not of every decode step
            inputs_embeds.shape[1] > 1
            and not torch.compiler.is_compiling()
            and self.config._attn_implementation in ("sdpa", "eager")
            and any(type(layer) is StaticSlidingWindowLayer for layer in getattr(cache, "layers", ()))
        ):
            logger.warning_once(
                "This static cache keeps sliding-window keys in transformers' StaticSlidingWindowLayer, which "
                "counts tokens in a Python int: a compiled decode step re-records its CUDA graph at every token. "
                "Build `samba_hf.SambaStaticCache(config=..., max_cache_len=...)` instead (what "
                "`generate(cache_implementation='static')` uses)."
            )
        if use_cache and cache is None and seq_idx is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None and self.has_attention else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if isinstance(attention_mask, dict):  # masks prepared by `generate` for compiled decoding
            masks = attention_mask
        else:
            masks = create_layer_masks(self.config, inputs_embeds, attention_mask, cache, position_ids)

        padding_free = seq_idx is None and is_padding_free(attention_mask, inputs_embeds)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None
        hidden_states = inputs_embeds
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks.get(layer_type),
                position_embeddings=position_embeddings,
                cache=cache,
                seq_idx=seq_idx,
                padding_free=padding_free,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


def is_padding_free(attention_mask, inputs_embeds: torch.Tensor) -> bool:
    """No padding in a multi-token CUDA input (asked only where the fused window kernel could run).
    Under torch.compile only a missing mask counts: reading a mask's values would break the graph."""
    if inputs_embeds.shape[1] == 1 or not inputs_embeds.is_cuda:
        return False
    if attention_mask is None:
        return True
    if torch.compiler.is_compiling():
        return False
    return isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and bool(attention_mask.all())


def check_left_padding(attention_mask: torch.Tensor) -> None:
    """Right padding would leave pad tokens in the cached states, ahead of the tokens that follow."""
    if torch.compiler.is_compiling() or attention_mask.ndim != 2:
        return
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        raise ValueError(
            "Samba needs left padding: a padding token after a real token would enter the Mamba state. "
            "Set `tokenizer.padding_side = 'left'`, or run rows of different lengths separately."
        )


def packed_document_index(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index of each token (int32) for packed rows, where positions restart; else None.
    Compiled, always the index (one document: all zeros): whether positions restart depends on their
    values, and transformers' masks separate the documents of a compiled step whenever they do."""
    if position_ids.shape[1] == 1:
        return None
    seq_idx = find_packed_sequence_indices(position_ids)
    return None if seq_idx is None else seq_idx.to(torch.int32).contiguous()


class SambaForCausalLM(SambaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SambaConfig):
        super().__init__(config)
        self.model = SambaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = SambaLinear(config.hidden_size, config.vocab_size, False, config)
        self.post_init()
        # generate() copies `prefill_chunk_size` from the config into its own option, which chunks the
        # prompt itself and, with a static cache on a GPU, compiles each chunk. The forward already
        # chunks long inputs (eagerly, as prefill should run), so generate passes the prompt whole unless
        # asked for `generate(prefill_chunk_size=...)`.
        if self.generation_config is not None:
            self.generation_config.prefill_chunk_size = None

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """
        labels (`torch.LongTensor` of shape `(batch, length)`, *optional*):
            Targets for the language-modelling loss (shifted inside; -100 is ignored).
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits for the last `logits_to_keep` positions only (0: all).

        Example:

        ```python
        >>> import samba_hf
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/samba")
        >>> out = model.generate(input_ids, max_new_tokens=32)
        ```
        """
        chunk_size = kwargs.pop("prefill_chunk_size", self.config.prefill_chunk_size)
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        fills_cache = use_cache if use_cache is not None else self.config.use_cache
        if (
            chunk_size is not None
            and length > chunk_size
            and fills_cache
            and labels is None
            and not self.training
            and isinstance(logits_to_keep, int)
            and not isinstance(attention_mask, dict)
            and not kwargs.get("output_hidden_states")
            and not kwargs.get("output_attentions")
        ):
            return self.chunked_prefill(
                input_ids, attention_mask, position_ids, cache, inputs_embeds, logits_to_keep, chunk_size, **kwargs
            )
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, position_ids=None, **kwargs):
        """The masks of a decode step, which `generate` prepares outside the compiled step when the cache
        is static (as the model builds them). A prompt gets its 2D mask back, as transformers' own
        function does for models it has no masks for: the forward then prefills it in chunks, with the
        fused window kernel, instead of taking a (prompt x prompt) mask prepared for it whole."""
        if inputs_embeds.shape[1] > 1:
            return attention_mask
        return create_layer_masks(config, inputs_embeds, attention_mask, cache, position_ids)

    def _prepare_static_cache(self, *args, **kwargs) -> StaticCache:
        """`cache_implementation="static"` builds transformers' StaticCache; its sliding-window layers
        become ring buffers (see `SambaStaticCache`)."""
        return use_ring_buffers(super()._prepare_static_cache(*args, **kwargs), self.config)

    def chunked_prefill(
        self, input_ids, attention_mask, position_ids, cache, inputs_embeds, logits_to_keep, chunk_size, **kwargs
    ) -> CausalLMOutputWithPast:
        """Run a long input through the model `chunk_size` tokens at a time, each chunk continuing from
        the cache the previous one filled: exact, with activations of one chunk alive at a time. Only
        the hidden states of the last `logits_to_keep` positions (all when 0) are kept."""
        if chunk_size < 2:
            # A one-token chunk takes the decode path, which assumes its token is not padding.
            raise ValueError(f"prefill_chunk_size must be None or at least 2, got {chunk_size}.")
        if cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if self.model.has_attention else 0
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        first_kept = length - logits_to_keep if logits_to_keep > 0 else 0
        kept = []
        for start in range(0, length, chunk_size):
            end = min(start + chunk_size, length)
            outputs = self.model(
                input_ids=input_ids[:, start:end] if input_ids is not None else None,
                inputs_embeds=inputs_embeds[:, start:end] if inputs_embeds is not None else None,
                attention_mask=attention_mask[:, : past_length + end] if attention_mask is not None else None,
                position_ids=position_ids[:, start:end] if position_ids is not None else None,
                cache=cache,
                use_cache=True,
                **kwargs,
            )
            if end > first_kept:
                kept.append(outputs.last_hidden_state[:, max(first_kept - start, 0) :])
        logits = self.lm_head(torch.cat(kept, dim=1))
        return CausalLMOutputWithPast(logits=logits, cache=cache)


class SambaForSequenceClassification(GenericForSequenceClassification, SambaPreTrainedModel):
    pass


__all__ = [
    "SambaForCausalLM",
    "SambaForSequenceClassification",
    "SambaModel",
    "SambaPreTrainedModel",
    "SambaStaticCache",
    "SlidingWindowRingLayer",
]
