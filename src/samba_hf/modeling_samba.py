"""PyTorch Samba model: Mamba and sliding-window attention mixers, each followed by a SwiGLU MLP.

Samba (Ren et al., 2024, arXiv 2406.07522) interleaves Mamba-1 selective state-space layers with
sliding-window attention, so it runs in linear time and extrapolates to unlimited context. The
cache is transformers' own hybrid cache: `DynamicCache(config=config)` holds conv + SSM states for
Mamba layers and at most `sliding_window - 1` keys for sliding-window layers. Kernels are chosen in
`kernel_dispatch` (Mamba ops, RoPE, and the default attention implementation "samba_sdpa"); fast decoding
lives in `generation` (a CUDA-graph decode engine behind `generate`).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.masking_utils import (
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_samba import SlidingWindowRingLayer, count_mamba_tokens, ring_window_mask, use_ring_buffers
from .configuration_samba import ATTENTION_TYPES, SambaConfig
from .generation import SambaGenerationMixin
from .kernel_dispatch import SAMBA_SDPA, kernel_op, mamba_ops

logger = logging.get_logger(__name__)

# The transformers versions this model is tested against. A minor release can change the cache's contract without
# an error: 5.25 began reading the token count from the cache's first layer, a Mamba layer here, which a forward
# continued from the cache then took for its position.
SUPPORTED_TRANSFORMERS = (5, 23), (5, 26)


def check_transformers_version(found: str) -> None:
    """Refuse a transformers outside SUPPORTED_TRANSFORMERS, where generation would be silently wrong."""
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= Version(found).release[:2] < high:  # pre-releases of 5.26 (5.26.0.dev0) are 5.26
        raise ImportError(
            f"Samba needs transformers >= {low[0]}.{low[1]}, < {high[0]}.{high[1]} (found {found}): with other "
            f"versions continuing from the cache (every generate() call) may give wrong logits. Install a supported "
            f"one: pip install 'transformers>={low[0]}.{low[1]},<{high[0]}.{high[1]}'"
        )


check_transformers_version(transformers.__version__)

# A time step that softplus maps to exactly 0 in float32: the SSM step is then the identity (decay 1, no input).
SKIPPED_TIME_STEP = -1e4


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    # Normalise in float32 and return the layers' dtype, since the residual stream may be float32 while the layers
    # that read the output are bf16.
    return F.rms_norm(hidden_states.float(), weight.shape, weight.float(), eps).to(out_dtype)


class SambaRMSNorm(nn.Module):
    def __init__(self, config: SambaConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.variance_epsilon = config.rms_norm_eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normalize = kernel_op("rms_norm", self.config.kernel_implementation, hidden_states.device, rms_norm)
        return normalize(hidden_states, self.weight, self.variance_epsilon, self.weight.dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def float32_residual_add(residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    return residual.float() + update  # the add promotes a bf16 update to float32 itself, without a cast copy


class SambaMLP(nn.Module):
    """SwiGLU without bias: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: SambaConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.config = config

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gated = kernel_op("swiglu", self.config.kernel_implementation, hidden_states.device, swiglu)
        return self.down_proj(gated(self.gate_proj(hidden_states), self.up_proj(hidden_states)))


class SambaRotaryEmbedding(nn.Module):
    def __init__(self, config: SambaConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
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

    @dynamic_rope_update  # the "dynamic" and "longrope" types rescale with the sequence length
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

    The window reaches eager/sdpa through the 4D mask, the flash kernels through the `sliding_window`
    argument, flex through its block mask, and "samba_sdpa" through either: all are passed."""

    def __init__(self, config: SambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query, key, value = self.project(hidden_states, position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

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

    def project(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query, key and value heads of `hidden_states`, (batch, heads, length, head_dim), RoPE applied."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if position_embeddings is not None:
            rotary = kernel_op(
                "rotary_embedding", self.config.kernel_implementation, query.device, apply_rotary_pos_emb
            )
            query, key = rotary(query, key, *position_embeddings)
        return query, key, value


def mamba_A_log(channels: int, state_size: int) -> torch.Tensor:
    """Mamba's S4D-real initialisation: A = -(1, 2, ..., state_size) for every channel, stored as log(-A)."""
    return torch.log(torch.arange(1, state_size + 1, dtype=torch.float32)).expand(channels, -1).contiguous()


class SambaMambaMixer(nn.Module):
    """Mamba-1 selective SSM mixer.

    Unlike transformers' MambaMixer it continues from the cached conv and SSM states for multi-token
    inputs too (chunked prefill, multi-turn chat), resets them at packed-document boundaries, skips
    padding wherever it stands (a padded position changes neither state), and calls every `nn.Linear`
    as a module so that adapters (LoRA) and quantizers on any of them take effect. The ops come from
    `kernel_dispatch`: Triton kernels on CUDA, PyTorch elsewhere."""

    def __init__(self, config: SambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.intermediate_size = config.mamba_intermediate_size
        self.state_size = config.state_size
        self.time_step_rank = config.time_step_rank
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.intermediate_size,
            self.intermediate_size,
            kernel_size=config.conv_kernel,
            groups=self.intermediate_size,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.x_proj = nn.Linear(self.intermediate_size, self.time_step_rank + 2 * self.state_size, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        # float32 whatever the model's dtype (`_keep_in_fp32_modules_strict`)
        self.A_log = nn.Parameter(mamba_A_log(self.intermediate_size, self.state_size))
        self.D = nn.Parameter(torch.ones(self.intermediate_size, dtype=torch.float32))
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)

    @force_accelerate_hooks("conv1d")  # the conv weight is handed to the op directly
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        decoding = conv_state is not None and x.shape[-1] == 1
        ops = mamba_ops(self.config.kernel_implementation, hidden_states.device, decoding)
        if decoding:  # one token: the cached states are updated in place (static addresses for CUDA graphs)
            x = ops.causal_conv1d_update(x[..., 0], conv_state, conv_weight, conv_bias, "silu")[..., None]
            count_mamba_tokens(cache, self.layer_idx, 1)
        else:
            x, new_conv_state = self.convolve(ops, x, conv_state, padding_mask, seq_idx)

        time_step, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.time_step_rank, self.state_size, self.state_size], dim=-1
        )
        # dt_proj is called as a module (bias included) so that LoRA on it takes effect. Its input, a slice, is made
        # contiguous: F.linear adds the bias inside the product only then (not as a pass over the output).
        delta = self.dt_proj(time_step.contiguous()).transpose(1, 2)
        if padding_mask is not None:  # a zero time step leaves the SSM state as it was
            delta = delta.masked_fill(~padding_mask.bool()[:, None, :], SKIPPED_TIME_STEP)
        B, C = B.transpose(1, 2), C.transpose(1, 2)
        A = -torch.exp(self.A_log.float())

        if decoding:
            y = ops.selective_state_update(
                ssm_state,
                x[..., 0],
                delta[..., 0],
                A,
                B[..., 0],
                C[..., 0],
                D=self.D.float(),
                z=gate[..., 0],
                dt_softplus=True,
            )[..., None]
        else:
            # The cache overwrites its state in place below: the op gets a copy, which autograd may keep.
            y, last_ssm_state = ops.selective_scan(
                x,
                delta,
                A,
                B,
                C,
                D=self.D.float(),
                z=gate,
                delta_softplus=True,
                return_last_state=True,
                initial_state=ssm_state.clone() if ssm_state is not None else None,
                seq_idx=seq_idx,
            )
            if cache is not None:
                cache.update_conv_state(new_conv_state, self.layer_idx, conv_kernel_size=self.config.conv_kernel - 1)
                cache.update_recurrent_state(last_ssm_state, self.layer_idx)
                count_mamba_tokens(cache, self.layer_idx, x.shape[-1] - new_conv_state.shape[-1])
        return self.out_proj(y.transpose(1, 2))

    def convolve(self, ops, x, conv_state, padding_mask, seq_idx) -> tuple[torch.Tensor, torch.Tensor]:
        """silu(causal depthwise convolution) of x (batch, channels, length) continuing from `conv_state`
        (the last inputs before x, or none), and the convolution's state after x. Padded positions are
        skipped: each real token's window holds the real tokens (or cached inputs) before it."""
        weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        if padding_mask is None:
            # The cache overwrites its state in place: the op gets a copy, which autograd may keep.
            initial = conv_state.clone() if conv_state is not None else None
            return ops.causal_conv1d(
                x, weight, bias, seq_idx=seq_idx, initial_states=initial, return_final_states=True, activation="silu"
            )
        # A stable sort on the mask moves every pad ahead of the cached inputs and keeps the rest in order:
        # [pads, cached inputs, real tokens]. One convolution of that, from a zero state, gives each real
        # token the window it would have without the pads, and ends in the state it would end in.
        batch, channels, _ = x.shape
        width = weight.shape[-1]
        if conv_state is None:
            conv_state = x.new_zeros(batch, channels, width - 1)
        kept = torch.cat([padding_mask.new_ones(batch, width - 1), padding_mask], dim=1).bool()
        order = torch.sort(kept.to(torch.int8), dim=1, stable=True).indices[:, None, :].expand(-1, channels, -1)
        ordered = torch.cat([conv_state.to(x.dtype), x], dim=-1).gather(2, order)
        out, final_state = ops.causal_conv1d(ordered, weight, bias, return_final_states=True, activation="silu")
        return torch.empty_like(out).scatter_(2, order, out)[..., width - 1 :], final_state


class SambaDecoderLayer(GradientCheckpointingLayer):
    """x + mixer(norm(x)), then x + mlp(norm(x)) when the layer has an MLP."""

    def __init__(self, config: SambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.mixer_type = config.layer_types[layer_idx]
        self.residual_in_fp32 = config.residual_in_fp32
        self.mixer_norm = SambaRMSNorm(config)
        if self.mixer_type == "linear_attention":
            self.mixer = SambaMambaMixer(config, layer_idx)
        elif self.mixer_type == "mlp":
            self.mixer = SambaMLP(config, config.mamba_intermediate_size)
        else:
            self.mixer = SambaAttention(config, layer_idx)
        if config.use_mlp[layer_idx]:
            self.mlp_norm = SambaRMSNorm(config)
            self.mlp = SambaMLP(config, config.intermediate_size)
        else:
            self.mlp_norm = self.mlp = None

    def add_residual(self, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.residual_in_fp32:
            add = kernel_op("residual_add", self.config.kernel_implementation, residual.device, float32_residual_add)
            return add(residual, update)
        return residual + update

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        seq_idx: torch.Tensor | None = None,
        window_documents: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """seq_idx: packed documents, for the Mamba layers; window_documents: the documents the sliding windows
        keep to (packed documents, or each pad alone: `window_documents`)."""
        mixer_input = self.mixer_norm(hidden_states)
        if self.mixer_type == "linear_attention":
            update = self.mixer(mixer_input, cache=cache, padding_mask=attention_mask, seq_idx=seq_idx)
        elif self.mixer_type == "mlp":
            update = self.mixer(mixer_input)
        else:
            update, _ = self.mixer(
                mixer_input, position_embeddings, attention_mask, cache=cache, seq_idx=window_documents, **kwargs
            )
        hidden_states = self.add_residual(hidden_states, update)
        if self.mlp is not None:
            hidden_states = self.add_residual(hidden_states, self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states


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

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """ "samba_sdpa" unless another implementation is asked for: sdpa, with sliding windows computed
        without a (queries x keys) mask (`kernel_dispatch.samba_sdpa_attention`)."""
        return super().get_correct_attn_implementation(requested_attention or SAMBA_SDPA, is_init_check)

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
            rope_init = module.compute_default_rope_parameters
            if module.rope_type != "default":
                rope_init = ROPE_INIT_FUNCTIONS[module.rope_type]
            inv_freq, _ = rope_init(module.config)
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
        init.copy_(mixer.A_log, mamba_A_log(mixer.intermediate_size, mixer.state_size))
        init.ones_(mixer.D)
        init.uniform_(mixer.dt_proj.weight, -(mixer.time_step_rank**-0.5), mixer.time_step_rank**-0.5)
        log_min, log_max = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(mixer.intermediate_size) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=config.time_step_floor)
        init.copy_(mixer.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


# What a forward takes besides its named arguments: transformers' keywords (`TransformersKwargs`) and
# `return_dict`. Anything else is refused rather than ignored: a misspelt cache argument would otherwise
# run the input without its cache.
ACCEPTED_KEYWORDS = frozenset(TransformersKwargs.__annotations__) | {"return_dict"}
# Keywords of transformers' causal-LM loss that the causal-LM forward hands to it rather than to the model.
LOSS_KEYWORDS = ("shift_labels", "ignore_index")


class SambaModel(SambaPreTrainedModel):
    def __init__(self, config: SambaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([SambaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = SambaRMSNorm(config)
        # Positions continue from the token count of the first attention layer's cache (none without attention).
        self.first_attention_layer = next(
            (i for i, layer_type in enumerate(config.layer_types) if layer_type in ATTENTION_TYPES), None
        )
        has_attention = self.first_attention_layer is not None
        self.rotary_emb = SambaRotaryEmbedding(config) if config.use_rope and has_attention else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        attention_mask (`torch.Tensor` of shape `(batch, past + length)`, *optional*):
            1 for real tokens, 0 for padding, anywhere in the row. Padded positions change neither Mamba
            state and are hidden from attention; windows count positions in the padded row (as
            transformers' sliding-window masks do), so with left padding each row gets its own result.
        position_ids (`torch.LongTensor` of shape `(batch, length)`, *optional*):
            Restarting at 0 inside a row marks packed documents (transformers'
            `DataCollatorWithFlattening`): attention does not cross them and Mamba states reset.
        seq_idx (`torch.IntTensor` of shape `(batch, length)`, *optional*):
            The document of each token of packed rows (`DataCollatorWithFlattening(return_seq_idx=True)`);
            it must agree with `position_ids`, and stands in for them when they are not given.
        """
        unknown = sorted(set(kwargs) - ACCEPTED_KEYWORDS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.forward() got unexpected keyword argument(s) {unknown}; it takes "
                f"input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache and transformers' "
                f"keywords {sorted(ACCEPTED_KEYWORDS)}."
            )
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.shape[1] == 0:
            raise ValueError(
                f"The input has no tokens (shape {tuple(inputs_embeds.shape[:2])}): pass at least one token per row."
            )
        seq_idx, position_ids = packed_documents(kwargs.pop("seq_idx", None), position_ids, attention_mask, cache)
        if use_cache and cache is None and seq_idx is None:
            cache = DynamicCache(config=self.config)

        # The masks read packed rows from position ids they are given, and compiled they cannot read their values:
        # any would count as packed, and a sliding window would take a (length x length) mask. Ids made here pack
        # nothing, so the masks do not see them.
        given_position_ids = position_ids
        if position_ids is None:
            past_seen_tokens = 0
            if cache is not None and self.first_attention_layer is not None:
                past_seen_tokens = cache.get_seq_length(self.first_attention_layer)
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if isinstance(attention_mask, dict):  # masks prepared by `generate` (compiled steps) or the decode engine
            masks, documents = attention_mask, None
        else:
            documents = window_documents(self.config, attention_mask, cache, seq_idx, inputs_embeds.shape[1])
            masks = create_layer_masks(
                self.config, inputs_embeds, attention_mask, cache, given_position_ids, documents is not None
            )

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None
        hidden_states = inputs_embeds
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks.get(layer_type),
                position_embeddings=position_embeddings,
                cache=cache,
                seq_idx=seq_idx,
                window_documents=documents,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


def packed_documents(seq_idx, position_ids, attention_mask, cache) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(seq_idx, position_ids) for the Mamba ops and the masks: the document index (int32) of each token of
    packed rows, or None where every row holds one document.

    As in transformers' masks, packing shows in position ids that do not step by one, read only where no
    padding mask is given (padding repeats positions). A `seq_idx` from a collator must agree with the
    position ids, and stands in for them where they are missing. Packed rows cannot continue a cache: the
    cached state belongs to one document. Compiled, position ids cannot be read (that would break the graph):
    rows without a cache always take the index (all zeros for one document), as transformers' masks do."""
    if seq_idx is not None and position_ids is None:
        position_ids = document_positions(seq_idx)
    if position_ids is None or position_ids.shape[1] == 1 or attention_mask is not None:
        if seq_idx is not None:
            raise ValueError("seq_idx marks packed documents, which cannot carry a padding mask: drop attention_mask.")
        return None, position_ids
    if torch.compiler.is_compiling():
        index = None if cache is not None else find_packed_sequence_indices(position_ids).to(torch.int32)
        return index, position_ids
    packed = find_packed_sequence_indices(position_ids)
    if seq_idx is not None:
        documents = packed if packed is not None else torch.zeros_like(position_ids)
        if not torch.equal(documents.to(seq_idx.device), document_numbers(seq_idx)):
            raise ValueError(
                "seq_idx and position_ids disagree on where documents start: pass one of them, or "
                "both from the same collator."
            )
    # A document may also start with the call (a chunk of generate's prefill ending where it begins).
    restarts_after_the_cache = cache is not None and holds_state(cache) and bool((position_ids[:, 0] == 0).any())
    if cache is not None and (packed is not None or restarts_after_the_cache):
        raise ValueError(
            "position_ids restart inside a row, or at its start after cached tokens (packed documents), which cannot "
            "continue a cache: run packed rows without one (use_cache=False), or unpack them."
        )
    if packed is None:
        return None, position_ids
    return packed.to(torch.int32).contiguous(), position_ids


def window_documents(config: SambaConfig, attention_mask, cache, seq_idx, length: int) -> torch.Tensor | None:
    """The document (int32) of each token as "samba_sdpa"'s sliding windows see a whole sequence (no cache, or a
    new DynamicCache, whose window layers hand back this call's keys), where the rows need more than the window:
    packed documents (`seq_idx`), or for padded rows one document for the real tokens and one for each pad (no
    token sees a pad; a pad sees itself, so that its output stays finite). The window then needs no
    (length x length) mask. None where the rows need nothing more, or transformers' masks serve (another attention
    implementation, a cache holding tokens or of another kind, a mask that is not one (batch, length) row of this
    call's tokens). Eager, a mask without a pad needs nothing; compiled its values cannot be read, and it becomes
    documents."""
    if config._attn_implementation != SAMBA_SDPA:
        return None
    if cache is not None and (type(cache) is not DynamicCache or holds_state(cache)):
        return None
    if seq_idx is not None:
        return seq_idx
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != length:
        return None
    if not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), 0, -1 - positions).to(torch.int32)


def holds_state(cache: Cache) -> bool:
    """Whether `cache` holds what tokens before left: a Mamba layer's states or an attention layer's keys (an
    MLP-only layer's placeholder holds none)."""
    return any(
        layer.has_previous_state[0]
        if isinstance(layer, LinearAttentionCacheLayerMixin)
        else layer.keys is not None and bool(layer.get_seq_length() > 0)
        for layer in cache.layers
    )


def document_positions(seq_idx: torch.Tensor) -> torch.Tensor:
    """The position of each token in its document, from the document index of each token."""
    token_index = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand_as(seq_idx)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return token_index - torch.cummax(torch.where(starts, token_index, 0), dim=1).values


def document_numbers(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx renumbered 0, 1, 2, ... from each row's start (as `find_packed_sequence_indices` numbers them)."""
    starts = torch.zeros_like(seq_idx, dtype=torch.long)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return starts.cumsum(dim=1)


def create_layer_masks(
    config: SambaConfig, inputs_embeds, attention_mask, cache, position_ids, windows_take_documents=False
) -> dict:
    """The attention mask of each layer type (transformers' mask functions; `ring_window_mask` for a
    one-token step over a ring-buffer static cache). Where the sliding windows take `window_documents`, they get
    no mask: the windowed attention keeps each query in its document, without a (length x length) mask."""
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
        elif layer_type == "sliding_attention" and windows_take_documents:
            masks[layer_type] = None
        elif layer_type in mask_functions:
            masks[layer_type] = mask_functions[layer_type](**mask_kwargs)
    return masks


class SambaForCausalLM(SambaPreTrainedModel, SambaGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SambaConfig):
        super().__init__(config)
        self.model = SambaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KEYWORDS if name in kwargs}
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
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs, **kwargs
            )
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
        function does for models it has no masks for: the forward builds its masks itself."""
        if inputs_embeds.shape[1] > 1:
            return attention_mask
        return create_layer_masks(config, inputs_embeds, attention_mask, cache, position_ids)

    def _prepare_static_cache(self, cache_implementation: str, batch_size: int, max_cache_len: int, *args, **kwargs):
        """`cache_implementation="static"` builds `SambaStaticCache` (ring-buffer window layers)."""
        cache = super()._prepare_static_cache(cache_implementation, batch_size, max_cache_len, *args, **kwargs)
        return use_ring_buffers(cache, self.config, self._previous_max_cache_length)


class SambaForSequenceClassification(GenericForSequenceClassification, SambaPreTrainedModel):
    pass


__all__ = ["SambaForCausalLM", "SambaForSequenceClassification", "SambaModel", "SambaPreTrainedModel"]
