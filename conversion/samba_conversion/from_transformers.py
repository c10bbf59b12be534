"""transformers' Mistral, Llama and Mamba to samba-hf: the paper's baselines (Llama-2, Llama-2-SWA,
Mamba; arXiv 2406.07522, Table 3) are Samba layer patterns, so their checkpoints run as Samba models.

Mistral / Llama -> every layer attention + SwiGLU MLP ("sliding_attention" with Mistral's window,
"full_attention" without one). Mamba -> every layer a Mamba mixer without MLP; transformers'
MambaRMSNorm is the same RMSNorm (epsilon `layer_norm_epsilon`), and `norm_f` the final norm.
"""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from samba_hf.modeling_samba import SambaForCausalLM

from .core import (
    ConversionError,
    TensorSource,
    build_model,
    find_tokenizer,
    load_tokenizer,
    make_config,
    mamba_fields,
    open_checkpoint,
    prepare_output,
    rename,
    save,
    verify_logits,
)

ATTENTION_NAMES = {"mixer_norm.": "input_layernorm.", "mlp_norm.": "post_attention_layernorm.", "mixer.": "self_attn."}
MAMBA_TOP_LEVEL = {
    "model.embed_tokens.weight": "backbone.embeddings.weight",
    "model.norm.weight": "backbone.norm_f.weight",
}
SUPPORTED = ("mistral", "llama", "mamba")


def attention_key(samba_key: str) -> str:
    for ours, theirs in ATTENTION_NAMES.items():
        if f".{ours}" in samba_key:
            return samba_key.replace(f".{ours}", f".{theirs}", 1)
    return samba_key  # embed_tokens, norm, lm_head and the MLP have the same names


def mamba_key(samba_key: str) -> str:
    if samba_key in MAMBA_TOP_LEVEL:
        return MAMBA_TOP_LEVEL[samba_key]
    return samba_key.replace("model.layers.", "backbone.layers.", 1).replace(".mixer_norm.", ".norm.", 1)


def token_ids(config) -> dict:
    return {key: getattr(config, key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}


def attention_config(config):
    """Mistral/Llama features Samba's attention layer lacks are refused rather than dropped."""
    unsupported = [name for name in ("attention_bias", "mlp_bias") if getattr(config, name, False)]
    if config.hidden_act != "silu":
        unsupported.append(f"hidden_act={config.hidden_act!r}")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported.append(f"rope_parameters={rope}")
    if unsupported:
        raise ConversionError(
            f"the {config.model_type} model uses {', '.join(unsupported)}, which samba-hf's attention layer does not "
            "support (it has no biases, a SiLU SwiGLU and default RoPE); it cannot be converted."
        )
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    return make_config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        layer_types=["sliding_attention" if window else "full_attention"] * config.num_hidden_layers,
        use_mlp=True,
        sliding_window=window,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope.get("rope_theta", 10000.0))},
        rms_norm_eps=config.rms_norm_eps,
        residual_in_fp32=False,  # transformers keeps the residual stream in the weights' dtype
        tie_word_embeddings=config.tie_word_embeddings,
        **token_ids(config),
    )


def mamba_config(config, source: TensorSource):
    if config.hidden_act != "silu":
        raise ConversionError(f"the Mamba model uses hidden_act={config.hidden_act!r}; samba-hf's Mamba uses SiLU.")
    return make_config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=0,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=0,
        layer_types=["linear_attention"] * config.num_hidden_layers,
        use_mlp=False,
        rms_norm_eps=config.layer_norm_epsilon,
        residual_in_fp32=config.residual_in_fp32,
        time_step_min=config.time_step_min,
        time_step_max=config.time_step_max,
        time_step_floor=config.time_step_floor,
        tie_word_embeddings=config.tie_word_embeddings,
        **mamba_fields(source, "backbone.layers.0.mixer.", config.hidden_size),
        **token_ids(config),
    )


def open_source(source) -> tuple[object, TensorSource]:
    """(transformers config, tensors) of a model folder or a model object."""
    if isinstance(source, PreTrainedModel):
        return source.config, TensorSource.from_state_dict(source.state_dict(), type(source).__name__)
    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot read a config.json in {source} ({error}); pass a model folder.") from error
    return config, open_checkpoint(source)[0]


def samba_from_transformers(source, dtype=None) -> SambaForCausalLM:
    """A samba-hf model with the weights of a transformers MistralForCausalLM, LlamaForCausalLM or
    MambaForCausalLM (a folder or a model object), whose logits equal the source's."""
    config, tensors = open_source(source)
    if config.model_type not in SUPPORTED:
        raise ConversionError(
            f"model_type {config.model_type!r} is not supported; the transformers converter takes "
            f"{', '.join(SUPPORTED)}."
        )
    if config.model_type == "mamba":
        samba_config, key = mamba_config(config, tensors), mamba_key
    else:
        samba_config, key = attention_config(config), attention_key
    ignored = ("lm_head.weight",) if samba_config.tie_word_embeddings else ()
    return build_model(samba_config, tensors, lambda samba_key: rename(key(samba_key)), dtype, ignored)


def convert_transformers(
    source,
    output_dir,
    dtype=None,
    tokenizer_path=None,
    force: bool = False,
    verify: bool = False,
    tolerance: float | None = None,
) -> Path:
    """Convert a Mistral/Llama/Mamba folder (or model object) to a samba-hf folder. A folder's
    tokenizer is carried over unless `tokenizer_path` names another. `verify` compares the logits
    with transformers' own forward of the source, in float32."""
    is_folder = not isinstance(source, PreTrainedModel)
    output = prepare_output(output_dir, force, source if is_folder else None, dtype, tolerance)
    tokenizer = load_tokenizer(tokenizer_path or (find_tokenizer(source) if is_folder else None))
    with output:
        model = samba_from_transformers(source, dtype)
        save(model, output, str(source) if is_folder else type(source).__name__, tokenizer)
        del model
    if verify:
        if is_folder:
            reference_model = AutoModelForCausalLM.from_pretrained(
                str(source), dtype=torch.float32, attn_implementation="eager"
            )
        else:
            reference_model = source
        reference_model.eval()

        def reference(input_ids):
            return reference_model(input_ids, use_cache=False).logits

        compared_dtype = dtype if dtype is not None or is_folder else reference_model.dtype
        verify_logits(output.path, reference, compared_dtype, tolerance)
    return output.path
