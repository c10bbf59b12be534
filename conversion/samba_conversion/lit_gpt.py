"""Checkpoints of the Samba reference code (github.com/microsoft/Samba, lit-gpt based) to samba-hf,
and back.

The reference code's block i holds `norm_1`, a mixer under the attribute `attn` (a mamba-ssm Mamba,
or attention with a fused QKV `attn.attn` and output `attn.proj`), `norm_2` and an xformers SwiGLU
`mlp.swiglu` (w1 = gate, w2 = up, w3 = down). Its fused QKV rows are grouped by key/value head: for
each group, q_per_kv query heads, then the group's key head, then its value head. Its RoPE is
already rotate-half, so no row permutation is needed.
"""

import json
import re
from functools import partial
from pathlib import Path

import torch

from samba_hf.configuration_samba import PRESETS, SambaConfig
from samba_hf.staging import OutputFile

from .core import (
    ConversionError,
    Rule,
    build_model,
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
from .reference_forward import lit_gpt_forward

# The reference code's model names (lit_gpt/config.py) for the samba-hf presets of the same shapes.
REFERENCE_NAMES = {
    "Samba_421M": "samba-421m",
    "Samba_1.3B": "samba-1.3b",
    "Samba_1.7B": "samba-1.7b",
    "Samba_3.8B": "samba-3.8b",
}

TOP_LEVEL = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
IN_LAYER = {
    "mixer_norm.weight": "norm_1.weight",
    "mlp_norm.weight": "norm_2.weight",
    "mlp.gate_proj.weight": "mlp.swiglu.w1.weight",
    "mlp.up_proj.weight": "mlp.swiglu.w2.weight",
    "mlp.down_proj.weight": "mlp.swiglu.w3.weight",
    "mixer.o_proj.weight": "attn.proj.weight",
    "mixer.q_proj.weight": "attn.attn.weight",  # q, k and v are row blocks of one fused tensor
    "mixer.k_proj.weight": "attn.attn.weight",
    "mixer.v_proj.weight": "attn.attn.weight",
}
QKV = ("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight")
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
FIX_HEADS = "--num-heads N (and --num-kv-heads M for grouped-query attention) or --preset NAME"


def layer_and_name(samba_key: str) -> tuple[str | None, str]:
    """("3", "mixer.q_proj.weight") for "model.layers.3.mixer.q_proj.weight"; (None, key) for top-level keys."""
    if samba_key in TOP_LEVEL:
        return None, samba_key
    match = LAYER_KEY.fullmatch(samba_key)
    if match is None:
        raise ConversionError(f"unexpected tensor {samba_key}; is this a samba-hf checkpoint?")
    return match.group(1), match.group(2)


def lit_gpt_key(samba_key: str) -> str:
    """The reference code's name of a samba-hf tensor (q/k/v map to their fused tensor)."""
    layer, name = layer_and_name(samba_key)
    if layer is None:
        return TOP_LEVEL[samba_key]
    # Mamba tensors keep mamba-ssm's names under `attn`.
    return f"transformer.h.{layer}." + IN_LAYER.get(name, name.replace("mixer.", "attn.", 1))


def split_qkv(fused: torch.Tensor, part: int, n_head: int, n_kv: int) -> torch.Tensor:
    """Query (part 0), key (1) or value (2) rows of a fused QKV weight, in samba-hf's head order
    (query head g * q_per_kv + j belongs to key/value head g)."""
    q_per_kv = n_head // n_kv
    grouped = fused.view(n_kv, q_per_kv + 2, -1, fused.shape[-1])  # (group, slot, head_dim, d)
    rows = (grouped[:, :q_per_kv], grouped[:, q_per_kv], grouped[:, q_per_kv + 1])[part]
    return rows.reshape(-1, fused.shape[-1])


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """The inverse of split_qkv."""
    d = q.shape[-1]
    grouped = (q.view(n_kv, n_head // n_kv, -1, d), k.view(n_kv, 1, -1, d), v.view(n_kv, 1, -1, d))
    return torch.cat(grouped, dim=1).reshape(-1, d)


def resolve_preset(name: str) -> dict:
    key = REFERENCE_NAMES.get(name, name)
    if key not in PRESETS:
        known = sorted(PRESETS) + sorted(REFERENCE_NAMES)
        raise ConversionError(f"unknown preset {name!r}; pass --preset with one of {', '.join(known)}.")
    return PRESETS[key]


def infer_config(source, num_heads, num_kv_heads, sliding_window, preset, model_name) -> tuple[SambaConfig, bool]:
    """The samba-hf configuration a reference checkpoint determines, and whether its LM head is tied.
    Head counts: the flags, else the preset, else the training dict's `hparams["model_name"]`."""
    vocab_size, hidden_size = source.shape("transformer.wte.weight")
    blocks = layer_indices(source, "transformer.h.")
    layer_types, use_mlp, fields = [], [], {"intermediate_size": 0, "num_attention_heads": 0}
    attention_prefixes = []
    for i in blocks:
        p = f"transformer.h.{i}."
        keys = [key for key in source if key.startswith(p)]
        if p + "attn.attn.weight" in source or p + "attn.proj.weight" in source:
            layer_types.append("sliding_attention" if sliding_window else "full_attention")
            attention_prefixes.append(p)
        elif any(key.startswith(p + "attn.") for key in keys):
            layer_types.append("linear_attention")
            if "expand" not in fields:
                fields.update(mamba_fields(source, p + "attn.", hidden_size))
        else:
            raise ConversionError(f"{source.description}: block {i} has no mixer tensors ({p}attn.*).")
        use_mlp.append(any(key.startswith((p + "mlp.", p + "norm_2.")) for key in keys))
        if use_mlp[-1] and not fields["intermediate_size"]:
            fields["intermediate_size"] = source.shape(p + "mlp.swiglu.w1.weight")[0]
    if preset is not None:
        check_preset(preset, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=len(blocks), **fields)
    if attention_prefixes:
        fields.update(attention_fields(source, attention_prefixes[0], num_heads, num_kv_heads, preset, model_name))
    untied = untied_head(source, "transformer.wte.weight", "lm_head.weight", tie_if_absent=True)
    config = make_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=len(blocks),
        layer_types=layer_types,
        use_mlp=use_mlp,
        sliding_window=sliding_window or None,
        rms_norm_eps=1e-5,
        residual_in_fp32=True,  # the reference casts the residual stream to float32 after each Mamba mixer
        tie_word_embeddings=not untied,
        **fields,
    )
    return config, untied


def attention_fields(source, prefix, num_heads, num_kv_heads, preset, model_name) -> dict:
    """Head counts and width from the fused QKV rows (n_head + 2 n_kv) * head_dim and the output
    projection's n_head * head_dim columns."""
    if num_heads is None and num_kv_heads is None:
        if preset is None and model_name in REFERENCE_NAMES:
            preset = model_name
        if preset is not None:
            sizes = resolve_preset(preset)
            num_heads, num_kv_heads = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    q_rows = source.shape(prefix + "attn.proj.weight")[1]
    fused_rows = source.shape(prefix + "attn.attn.weight")[0]
    return heads_from_rows(q_rows, (fused_rows - q_rows) // 2, num_heads, num_kv_heads, FIX_HEADS)


def check_preset(name: str, **inferred) -> None:
    preset = resolve_preset(name)
    differences = [
        f"{field} {value} (preset: {preset[field]})"
        for field, value in inferred.items()
        if field in preset and value and value != preset[field]
    ]
    if differences:
        raise ConversionError(
            f"the checkpoint does not have the shapes of preset {name!r}: {', '.join(differences)}; pass the "
            "right --preset, or --num-heads/--num-kv-heads instead."
        )


def rule_for(config: SambaConfig):
    def rule(samba_key: str) -> Rule:
        name = layer_and_name(samba_key)[1]
        if name in QKV:
            split = partial(
                split_qkv, part=QKV.index(name), n_head=config.num_attention_heads, n_kv=config.num_key_value_heads
            )
            return Rule((lit_gpt_key(samba_key),), split)
        return rename(lit_gpt_key(samba_key))

    return rule


def convert_lit_gpt(
    checkpoint_path,
    output_dir,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    sliding_window: int | None = 2048,
    preset: str | None = None,
    dtype=None,
    tokenizer_path=None,
    force: bool = False,
    verify: bool = False,
    tolerance: float | None = None,
) -> Path:
    """Convert a reference-code checkpoint (a training dict {"model": ..., "optimizer": ..., "hparams":
    ...} or a bare state dict; .pth/.pt or .safetensors) to a samba-hf folder. Shapes give every
    size; head counts come from `num_heads`/`num_kv_heads` (either one suffices), `preset` (a samba-hf
    preset or a reference name such as "Samba_421M") or the checkpoint's hparams. `sliding_window`
    None (or 0) gives full attention. `verify` compares logits with an independent forward of the
    source."""
    output = prepare_output(output_dir, force, checkpoint_path, dtype, tolerance)
    if preset is not None:
        resolve_preset(preset)  # an unknown name fails before any work
    tokenizer = load_tokenizer(tokenizer_path)
    with output:
        source, metadata = open_checkpoint(checkpoint_path)
        model_name = metadata.get("hparams", {}).get("model_name")
        config, untied = infer_config(source, num_heads, num_kv_heads, sliding_window, preset, model_name)
        ignored = () if untied else ("lm_head.weight",)
        model = build_model(config, source, rule_for(config), dtype, ignored)
        save(model, output, source.description, tokenizer)
        del model
    if verify:
        verify_against(output.path, config, lit_gpt_forward, source, dtype, tolerance)
    return output.path


def convert_to_lit_gpt(hf_dir, output_path, force: bool = False) -> Path:
    """Write a samba-hf folder as a bare state dict of the reference code (its key names, its fused
    QKV row order, and `lm_head.weight`, which its state dict holds even when tied), loadable with
    `model.load_state_dict(torch.load(output_path))`."""
    output = OutputFile(output_path, force=force, sources=[hf_dir])
    config_file = Path(hf_dir) / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{hf_dir} has no config.json; pass a samba-hf model folder.")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type != "samba":
        raise ConversionError(
            f"{hf_dir} holds a {model_type!r} model, not a samba-hf one (model_type 'samba'); to-lit-gpt writes "
            "samba-hf folders only (`samba-hf convert transformers` turns Mistral, Llama and Mamba folders into one)."
        )
    try:
        config = SambaConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as error:
        message = f"cannot read the samba-hf config in {hf_dir} ({error}); pass a samba-hf folder."
        raise ConversionError(message) from error
    check_expressible(config)
    source, _ = open_checkpoint(hf_dir)
    heads = {"n_head": config.num_attention_heads, "n_kv": config.num_key_value_heads}
    state_dict = {}
    for key in source:
        name = layer_and_name(key)[1]
        if name == QKV[0]:
            parts = [source[key.replace(QKV[0], qkv)] for qkv in QKV]
            state_dict[lit_gpt_key(key)] = fuse_qkv(*parts, **heads)
        elif name not in QKV:
            state_dict[lit_gpt_key(key)] = source[key]
    # The reference model ties by sharing one tensor; torch.save keeps the sharing.
    state_dict.setdefault("lm_head.weight", state_dict["transformer.wte.weight"])
    with output:
        torch.save(state_dict, output.staging)
        return output.commit()


def check_expressible(config: SambaConfig) -> None:
    """The reference code has no layout for a SwiGLU mixer, biased Mamba projections or a Mamba
    convolution without bias, and its attention output projection is square."""
    problems = []
    if "mlp" in config.layer_types:
        problems.append("'mlp' mixers")
    if config.use_bias or not config.use_conv_bias:
        problems.append("Mamba biases other than the convolution's")
    attention = any(t in ("sliding_attention", "full_attention") for t in config.layer_types)
    if attention and config.num_attention_heads * config.head_dim != config.hidden_size:
        problems.append("num_attention_heads * head_dim != hidden_size")
    if problems:
        raise ConversionError(
            f"the reference (lit-gpt) layout cannot hold this model: {', '.join(problems)}; "
            "keep it in samba-hf format."
        )
