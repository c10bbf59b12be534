"""Hub-ready folders: weights, config with `auto_map`, remote code, tokenizer and model card."""

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from string import Template

from .configuration_samba import SambaConfig

MIXER_NAMES = {
    "linear_attention": "Mamba",
    "sliding_attention": "sliding-window attention",
    "full_attention": "full attention",
    "mlp": "SwiGLU",
}

CARD_DEFAULTS = {
    "license": "apache-2.0",
    "repo_id": "path/to/this/folder",
    "training": "Not documented by the uploader.",
    "intended_use": (
        "Research on efficient long-context language modelling, and as a base model for fine-tuning. "
        "It is a base model: it was not aligned or instruction-tuned."
    ),
    "evaluation": "No evaluation was recorded for this checkpoint.",
    "limitations": (
        "Like other base language models it can produce false, biased or offensive text. Sliding-window "
        "attention sees only the last `sliding_window` tokens exactly; older context reaches the model "
        "only through the Mamba state, so exact recall far back is limited without fine-tuning."
    ),
}


def _count(items) -> str:
    return ", ".join(f"{n} × {name}" for name, n in Counter(items).items())


def render_model_card(config: SambaConfig, num_parameters: int, model_name: str, **sections: str) -> str:
    """The repository's model_card.md filled in for `config`. `sections` override the free-text
    parts: training, intended_use, evaluation, limitations, license, repo_id."""
    unknown = set(sections) - set(CARD_DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown model card section(s) {sorted(unknown)}; known: {sorted(CARD_DEFAULTS)}")
    template = Template((Path(__file__).parent / "model_card.md").read_text(encoding="utf-8"))
    values = {
        **CARD_DEFAULTS,
        **sections,
        "model_name": model_name,
        "num_parameters": f"{num_parameters / 1e6:,.2f}M" if num_parameters < 1e9 else f"{num_parameters / 1e9:.3f}B",
        "num_layers": config.num_hidden_layers,
        "layer_summary": _count(MIXER_NAMES[t] for t in config.layer_types),
        "mlp_summary": f"{sum(config.use_mlp)} of {config.num_hidden_layers} layers",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "sliding_window": config.sliding_window,
        "position_encoding": f"RoPE, base {config.rope_parameters['rope_theta']:g}" if config.use_rope else "none",
        "state_size": config.state_size,
        "conv_kernel": config.conv_kernel,
        "expand": config.expand,
        "time_step_rank": config.time_step_rank,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": "yes" if config.tie_word_embeddings else "no",
    }
    return template.substitute(values)


def check_output_dir(output_dir, force: bool) -> Path:
    """Refuse to replace an existing, non-empty folder unless `force` is set."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise FileExistsError(f"{output_dir} already exists and is not empty; pass --force (force=True in Python) to replace it.")
    return output_dir


def save_hub_folder(
    model,
    output_dir,
    *,
    tokenizer=None,
    model_name: str | None = None,
    force: bool = False,
    max_shard_size: str = "2GB",
    **card_sections: str,
) -> Path:
    """Write a Hub-ready folder: sharded safetensors, config.json with `auto_map`, the modeling code
    (so it loads with trust_remote_code=True without samba-hf), the tokenizer and README.md (the
    model card). Everything is written to a temporary folder beside `output_dir` and moved into
    place at the end, so a failure leaves nothing half-written."""
    output_dir = check_output_dir(output_dir, force)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    model_name = model_name or output_dir.name
    card = render_model_card(model.config, model.num_parameters(), model_name, **card_sections)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(card, encoding="utf-8")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
