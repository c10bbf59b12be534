"""Samba model configuration."""

import math

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# One mixer per layer. "linear_attention" is a Mamba mixer, "mlp" a SwiGLU of width
# expand * hidden_size standing where a Mamba mixer would (the MLP2-SWA-MLP ablation); transformers'
# cache builds a recurrent state for Mamba layers, a windowed KV cache for sliding ones and
# nothing for "mlp".
MIXER_TYPES = ("linear_attention", "sliding_attention", "full_attention", "mlp")
ATTENTION_TYPES = ("sliding_attention", "full_attention")

# Shapes of the Samba paper (arXiv 2406.07522) and its reference code. The paper counts mixers
# and MLPs as separate layers, so its "24 layers" are 12 of ours (6 Mamba + 6 SWA, each + MLP).
# fmt: off
PRESETS = {
    "samba-421m": dict(
        vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, head_dim=128,
    ),
    "samba-1.3b": dict(
        vocab_size=32000, hidden_size=2304, intermediate_size=6144, num_hidden_layers=18,
        num_attention_heads=18, num_key_value_heads=18, head_dim=128,
    ),
    # 1.7B and 3.8B: from the paper's hyper-parameter table (their code was not released).
    # The paper prints an MLP width of 8196 for 1.7B; 8192 is taken as the intended value.
    "samba-1.7b": dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=4, head_dim=64,
    ),
    "samba-3.8b": dict(
        vocab_size=32064, hidden_size=2816, intermediate_size=9984, num_hidden_layers=32,
        num_attention_heads=11, num_key_value_heads=1, head_dim=256,
    ),
    "tiny": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
    ),
}
# fmt: on


@strict
class SambaConfig(PreTrainedConfig):
    r"""
    Configuration of a Samba model: a stack of layers, each a pre-norm mixer (Mamba, sliding-window
    attention, full attention or a SwiGLU) with a residual connection, optionally followed by a
    pre-norm SwiGLU MLP with its own residual.

    Args:
        vocab_size (`int`): Vocabulary size.
        hidden_size (`int`): Width of the residual stream.
        intermediate_size (`int`): Width of the SwiGLU MLP that follows a mixer.
        num_hidden_layers (`int`): Number of mixers (= `len(layer_types)`).
        num_attention_heads (`int`): Query heads of the attention mixers.
        num_key_value_heads (`int`, *optional*): Key/value heads (grouped-query attention); defaults to
            `num_attention_heads`.
        head_dim (`int`, *optional*): Attention head width; defaults to `hidden_size // num_attention_heads`.
        layer_types (`list[str]`, *optional*): The mixer of each layer, from `"linear_attention"` (Mamba),
            `"sliding_attention"`, `"full_attention"` and `"mlp"`. Defaults to Mamba and sliding-window
            attention alternating, starting with Mamba.
        use_mlp (`bool` or `list[bool]`, defaults to `True`): Whether each layer's mixer is followed by a
            SwiGLU MLP (one value for all layers, or one per layer).
        use_rope (`bool`, defaults to `True`): Rotary position embeddings in the attention mixers
            (`False` gives the paper's Samba-NoPE).
        sliding_window (`int`, defaults to 2048): Keys a query of a sliding-window layer sees, itself
            included (flash-attn's `window_size=(sliding_window - 1, 0)`).
        rope_parameters (`dict`, *optional*): transformers' RoPE parameters; defaults to
            `{"rope_type": "default", "rope_theta": 10000.0}` (`rope_theta=` is accepted as well). Every
            `rope_type` of transformers' RoPE utilities works ("linear", "dynamic", "yarn", "longrope", "llama3", ...)
            with the fields it needs; Samba extrapolates without any.
        max_position_embeddings (`int`, defaults to 4096): The length the model was trained at. Only the RoPE
            scaling types read it (Samba itself has no maximum length).
        rms_norm_eps (`float`): Epsilon of the RMSNorms.
        state_size, conv_kernel, expand (`int`): Mamba's d_state, d_conv and expansion factor.
        time_step_rank (`int` or `"auto"`): Mamba's dt_rank; `"auto"` is `ceil(hidden_size / 16)`.
        time_step_min, time_step_max, time_step_floor (`float`): Range of the initial time steps.
        use_conv_bias (`bool`): Bias of Mamba's depthwise convolution.
        use_bias (`bool`): Bias of Mamba's input and output projections.
        residual_in_fp32 (`bool`): Keep the residual stream in float32 whatever the weights' dtype.
        initializer_range (`float`): Standard deviation of the embedding initialisation.
        tie_word_embeddings (`bool`): Share the embedding and the LM head.
        kernel_implementation (`str`): Implementation of the Mamba ops: `"auto"` (Triton on CUDA,
            PyTorch elsewhere), `"triton"`, `"torch"` or `"mamba_ssm"`. The environment variable
            `SAMBA_KERNELS` overrides it.
        windowed_attention_kernel (`bool`, defaults to `True`): On CUDA, run sliding-window layers whose
            input reaches past the window (without padding or packing) through samba_kernels' fused
            windowed attention (its own Triton forward without gradients, compiled FlexAttention for
            training) when the attention implementation is sdpa or eager. `False` keeps them on the
            attention interface with a window mask, which needs no compilation (short training
            sequences of many different shapes).
        prefill_chunk_size (`int`, *optional*, defaults to 16384): Inputs longer than this that fill a cache
            (prompts in `generate`) run through the model in chunks of this many tokens, so activation
            memory stays O(chunk + window) whatever the prompt length. Each chunk costs the host a fixed
            launch time, which shorter chunks do not hide behind the GPU's work (docs/performance-notes.md).
            `None` disables chunking; the `prefill_chunk_size=` argument of `forward` overrides it per call
            (that of `generate` has transformers chunk the prompt before the forward sees it).

    Example:

    ```python
    >>> from samba_hf import SambaConfig, SambaForCausalLM
    >>> config = SambaConfig.from_preset("samba-421m")
    >>> model = SambaForCausalLM(config)
    ```
    """

    model_type = "samba"
    keys_to_ignore_at_inference = ["cache"]
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 1536
    intermediate_size: int = 4096
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    layer_types: list[str] | None = None
    use_mlp: bool | list[bool] = True
    use_rope: bool = True
    sliding_window: int | None = 2048
    rope_parameters: dict | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    state_size: int = 16
    conv_kernel: int = 4
    expand: int = 2
    time_step_rank: int | str = "auto"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    use_conv_bias: bool = True
    use_bias: bool = False
    residual_in_fp32: bool = True
    initializer_range: float = 0.02
    kernel_implementation: str = "auto"
    windowed_attention_kernel: bool = True
    prefill_chunk_size: int | None = 16384
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) does not divide hidden_size "
                    f"({self.hidden_size}); choose a divisor, or set head_dim explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = [
                "linear_attention" if i % 2 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        if isinstance(self.use_mlp, bool):
            self.use_mlp = [self.use_mlp] * len(self.layer_types)
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if self.rope_parameters is None and "rope_theta" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        # Checked here rather than in @strict validators so that users get a plain ValueError.
        self._check_types()
        self._check_layer_types()
        self._check_sizes()
        super().__post_init__(**kwargs)

    @property
    def mamba_intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    def validate_layer_type(self):
        """Replaces transformers' check, which does not know the "mlp" mixer type (see _check_layer_types)."""

    def _check_types(self):
        """Fields that arithmetic would accept silently with the wrong type (a float rank, a string eps)."""
        integers = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "state_size",
            "conv_kernel",
            "expand",
            "time_step_rank",
            "max_position_embeddings",
        )
        for name in integers:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                hint = ' (or "auto" for ceil(hidden_size / 16))' if name == "time_step_rank" else ""
                raise ValueError(f"{name} must be an integer{hint}, got {value!r} of type {type(value).__name__}.")
        for name in ("rms_norm_eps", "initializer_range", "time_step_min", "time_step_max", "time_step_floor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")

    def _check_layer_types(self):
        unknown = sorted(set(self.layer_types) - set(MIXER_TYPES))
        if unknown:
            raise ValueError(f"layer_types: unknown mixer type(s) {unknown}; allowed are {list(MIXER_TYPES)}.")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}: give one mixer type per layer."
            )
        if len(self.use_mlp) != self.num_hidden_layers:
            raise ValueError(
                f"use_mlp has {len(self.use_mlp)} entries but num_hidden_layers is {self.num_hidden_layers}: "
                "give one bool per layer, or a single bool for all layers."
            )

    def _check_sizes(self):
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel", "expand")
        for name in positive + ("time_step_rank",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if any(self.use_mlp) and self.intermediate_size < 1:
            raise ValueError(
                f"intermediate_size must be positive when layers have an MLP, got {self.intermediate_size}."
            )
        if any(layer_type in ATTENTION_TYPES for layer_type in self.layer_types):
            self._validate_attention()
        if self.rms_norm_eps <= 0:
            raise ValueError(
                f"rms_norm_eps must be positive (it keeps the norm finite at zero input), got {self.rms_norm_eps}."
            )
        if self.initializer_range < 0:
            raise ValueError(
                f"initializer_range is a standard deviation and must be >= 0, got {self.initializer_range}."
            )
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 2:
            raise ValueError(f"prefill_chunk_size must be None or at least 2, got {self.prefill_chunk_size}.")
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"time_step_min ({self.time_step_min}) and time_step_max ({self.time_step_max}) must satisfy "
                "0 < time_step_min <= time_step_max."
            )
        if self.kernel_implementation not in ("auto", "triton", "torch", "mamba_ssm"):
            raise ValueError(
                f"kernel_implementation must be one of 'auto', 'triton', 'torch', 'mamba_ssm'; "
                f"got {self.kernel_implementation!r}."
            )

    def _validate_attention(self):
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads < 1 or kv_heads < 1:
            raise ValueError(
                f"num_attention_heads ({heads}) and num_key_value_heads ({kv_heads}) must be positive when "
                "layer_types has attention layers."
            )
        if heads % kv_heads != 0:
            raise ValueError(f"num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads}) evenly.")
        if self.head_dim is None or self.head_dim < 1 or self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be a positive even number (RoPE rotates pairs), got {self.head_dim}.")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if self.use_rope and rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope_parameters['rope_type'] {rope_type!r} is unknown; choose 'default' or one of "
                f"{sorted(ROPE_INIT_FUNCTIONS)}."
            )
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(
                f"sliding_window must be an integer >= 1 when layer_types has sliding_attention layers, "
                f"got {self.sliding_window}."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SambaConfig":
        """A configuration of a named size (`"samba-421m"`, `"samba-1.3b"`, `"samba-1.7b"`,
        `"samba-3.8b"`, `"tiny"`), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["SambaConfig"]
