"""flash-linear-attention's Samba (fla/models/samba) to samba-hf.

fla names the embedding `backbone.embeddings` and the final norm `backbone.norm_f`; inside a layer it
uses samba-hf's names already (`mixer_norm`, `mixer.{q,k,v,o}_proj` or mamba-ssm's Mamba names,
`mlp_norm`, `mlp.{gate,up,down}_proj`). Its attention window is flash-attn's `(window_size - 1, 0)`,
the same as samba-hf's `sliding_window`. Its config defaults to an untied LM head.
"""

from pathlib import Path

from .core import (
    ConversionError,
    build_model,
    find_tokenizer,
    heads_from_rows,
    layer_indices,
    load_tokenizer,
    make_config,
    mamba_fields,
    open_checkpoint,
    prepare_output,
    rename,
    save,
    untied_head,
    verify_against,
)
from .reference_forward import fla_forward

TOP_LEVEL = {
    "model.embed_tokens.weight": "backbone.embeddings.weight",
    "model.norm.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
FIX_HEADS = "--num-heads N (and --num-kv-heads M for grouped-query attention), or the model's config.json"


def fla_key(samba_key: str) -> str:
    return TOP_LEVEL.get(samba_key) or samba_key.replace("model.layers.", "backbone.layers.", 1)


def infer_config(source, fla_config: dict, num_heads, num_kv_heads, sliding_window):
    """The samba-hf configuration of an fla checkpoint: sizes from the shapes, head counts, window,
    RoPE base and norm epsilon from fla's config.json when there is one, else from the flags."""
    attn = fla_config.get("attn") or {}
    num_heads = num_heads if num_heads is not None else attn.get("num_heads")
    num_kv_heads = num_kv_heads if num_kv_heads is not None else attn.get("num_kv_heads")
    window = attn.get("window_size") if "window_size" in attn else sliding_window
    if attn.get("qkv_bias") or attn.get("qk_norm"):
        raise ConversionError("the fla model uses qkv_bias or qk_norm, which Samba lacks; it cannot be converted.")
    if fla_config.get("hidden_act", "swish") not in ("swish", "silu"):
        raise ConversionError(f"the fla model's MLP uses {fla_config['hidden_act']!r}; samba-hf supports SwiGLU only.")

    vocab_size, hidden_size = source.shape("backbone.embeddings.weight")
    layers = layer_indices(source, "backbone.layers.")
    layer_types, fields = [], {"num_attention_heads": 0}
    for i in layers:
        p = f"backbone.layers.{i}.mixer."
        if p + "q_proj.weight" in source:
            layer_types.append("sliding_attention" if window else "full_attention")
            if "head_dim" not in fields:
                q_rows, kv_rows = source.shape(p + "q_proj.weight")[0], source.shape(p + "k_proj.weight")[0]
                fields.update(heads_from_rows(q_rows, kv_rows, num_heads, num_kv_heads, FIX_HEADS))
        else:
            layer_types.append("linear_attention")
            if "expand" not in fields:
                fields.update(mamba_fields(source, p, hidden_size))
    untied = untied_head(
        source, "backbone.embeddings.weight", "lm_head.weight", fla_config.get("tie_word_embeddings", False)
    )
    config = make_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=source.shape("backbone.layers.0.mlp.gate_proj.weight")[0],
        num_hidden_layers=len(layers),
        layer_types=layer_types,
        use_mlp=True,  # every fla Samba layer has an MLP
        sliding_window=window or None,
        rope_parameters={"rope_type": "default", "rope_theta": float(attn.get("rope_theta", 10000.0))},
        rms_norm_eps=fla_config.get("norm_eps", 1e-5),
        residual_in_fp32=fla_config.get("residual_in_fp32", False),
        tie_word_embeddings=not untied,
        **{key: fla_config[key] for key in ("pad_token_id", "bos_token_id", "eos_token_id") if key in fla_config},
        **fields,
    )
    return config, untied


def convert_fla(
    source_path,
    output_dir,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    sliding_window: int | None = 2048,
    dtype=None,
    tokenizer_path=None,
    force: bool = False,
    verify: bool = False,
    tolerance: float | None = None,
) -> Path:
    """Convert an fla Samba checkpoint (a folder with config.json and safetensors/bin weights, or a
    single state-dict file) to a samba-hf folder. The folder's config.json gives the head counts,
    window, RoPE base and epsilon; the flags stand in where it is absent. A folder's tokenizer is
    carried over unless `tokenizer_path` names another."""
    output = prepare_output(output_dir, force, source_path, dtype, tolerance)
    tokenizer = load_tokenizer(tokenizer_path or find_tokenizer(source_path))
    with output:
        source, metadata = open_checkpoint(source_path)
        config, untied = infer_config(source, metadata.get("config", {}), num_heads, num_kv_heads, sliding_window)
        ignored = () if untied else ("lm_head.weight",)
        model = build_model(config, source, lambda key: rename(fla_key(key)), dtype, ignored)
        save(model, output, source.description, tokenizer)
        del model
    if verify:
        verify_against(output.path, config, fla_forward, source, dtype, tolerance)
    return output.path
