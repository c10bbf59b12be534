"""Hub-ready folders and publishing them.

A Hub-ready folder holds the sharded safetensors, config.json with `auto_map`, the modeling code
that `save_pretrained` copies beside them (transformers' `custom_object_save` follows the modeling
file's relative imports, so every sibling module it needs comes along), the tokenizer and README.md,
the model card. `push_folder` uploads a folder as it is; it renders a card only where the folder has
none, and `push_to_hub` (installed as the models' `push_to_hub`) renders the same card.
"""

import json
import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .configuration_samba import SambaConfig
from .peft_integration import SAMBA_LORA_TARGET_MODULES
from .staging import MANIFEST, OutputFolder

MIXER_NAMES = {
    "linear_attention": "Mamba",
    "sliding_attention": "sliding-window attention",
    "full_attention": "full attention",
    "mlp": "SwiGLU",
}
TAGS = ["samba", "mamba", "sliding-window-attention", "hybrid", "samba-hf"]
# Where a card is written before the repository is known; `push_folder` fills in the repository id.
REPO_ID_PLACEHOLDER = "path/to/this/folder"

CARD_DEFAULTS = {
    "license": "apache-2.0",
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
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id(name) -> str | None:
    """`name` if it names a Hub repository ("owner/name", not a local path), else None: a card's
    `base_model` must be a repository the Hub knows."""
    if name is None or not HUB_ID.fullmatch(str(name)) or Path(name).exists():
        return None
    return str(name)


def _listed(value) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _count(items) -> str:
    return ", ".join(f"{n} × {name}" for name, n in Counter(items).items())


def _format_parameters(count: int) -> str:
    return f"{count / 1e6:,.2f}M" if count < 1e9 else f"{count / 1e9:.3f}B"


def _render(template: str, model_name: str, sections: dict, *, base_model, datasets, language, tags, **values) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    unknown = set(sections) - set(CARD_DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown model card section(s) {sorted(unknown)}; known: {sorted(CARD_DEFAULTS)}")
    text = {**CARD_DEFAULTS, **{key: value for key, value in sections.items() if value}}
    data = ModelCardData(
        license=text["license"],
        library_name=values.pop("library_name", "transformers"),
        pipeline_tag="text-generation",
        tags=TAGS + [tag for tag in tags or () if tag not in TAGS],
        base_model=base_model,
        datasets=_listed(datasets),
        language=_listed(language),
    )
    card = ModelCard.from_template(
        data, template_path=str(Path(__file__).parent / template), model_name=model_name, **text, **values
    )
    return str(card).rstrip("\n") + "\n"


def render_model_card(
    config: SambaConfig,
    num_parameters: int,
    model_name: str,
    *,
    repo_id: str = REPO_ID_PLACEHOLDER,
    base_model: str | None = None,
    datasets=None,
    language=None,
    tags=None,
    **sections: str,
) -> str:
    """The card (README.md) of a Samba model: metadata, an architecture table from `config`, usage,
    and the free-text `sections` (training, intended_use, evaluation, limitations, license)."""
    base_model = hub_id(base_model)
    return _render(
        "model_card.md",
        model_name,
        sections,
        base_model=base_model,
        datasets=datasets,
        language=language,
        tags=tags,
        repo_id=repo_id,
        num_parameters=_format_parameters(num_parameters),
        num_layers=config.num_hidden_layers,
        layer_summary=_count(MIXER_NAMES[t] for t in config.layer_types),
        mlp_summary=f"{sum(config.use_mlp)} of {config.num_hidden_layers} layers",
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        sliding_window=config.sliding_window,
        position_encoding=f"RoPE, base {config.rope_parameters['rope_theta']:g}" if config.use_rope else "none",
        state_size=config.state_size,
        conv_kernel=config.conv_kernel,
        expand=config.expand,
        time_step_rank=config.time_step_rank,
        vocab_size=config.vocab_size,
        tie_word_embeddings="yes" if config.tie_word_embeddings else "no",
        lora_target_modules=json.dumps(SAMBA_LORA_TARGET_MODULES),
    )


def render_adapter_card(
    adapter_config: dict, model_name: str, *, repo_id: str, datasets=None, language=None, tags=None, **sections
) -> str:
    """The card of a PEFT LoRA adapter folder, naming its base model (adapter_config.json's
    `base_model_name_or_path`) as PEFT's own cards do."""
    base = adapter_config.get("base_model_name_or_path") or "the base model"
    targets = adapter_config.get("target_modules") or []
    return _render(
        "adapter_card.md",
        model_name,
        sections,
        base_model=hub_id(base),
        datasets=datasets,
        language=language,
        tags=["lora", "peft", *(tags or ())],
        library_name="peft",
        repo_id=repo_id,
        base_model_link=f"https://huggingface.co/{base}" if hub_id(base) else None,
        rank=adapter_config.get("r"),
        alpha=adapter_config.get("lora_alpha"),
        target_modules=", ".join(f"`{name}`" for name in sorted(targets))
        if isinstance(targets, list)
        else f"`{targets}`",
    )


def count_saved_parameters(folder: Path) -> int:
    """Parameters of the model saved in `folder`, from the safetensors headers (no weight is read)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(folder).glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                total += math.prod(weights.get_slice(key).get_shape())
    return total


def folder_card(folder, model_name: str, *, repo_id: str = REPO_ID_PLACEHOLDER, base_model=None, **card) -> str:
    """The card of a saved folder that has none: a Samba model folder's (config.json, weights) or a
    LoRA adapter folder's (adapter_config.json)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if base_model:
            adapter_config["base_model_name_or_path"] = base_model
        return render_adapter_card(adapter_config, model_name, repo_id=repo_id, **card)
    config_file = folder / "config.json"
    model_type = (
        json.loads(config_file.read_text(encoding="utf-8")).get("model_type") if config_file.is_file() else None
    )
    if model_type != "samba":
        raise ValueError(
            f"{folder} holds no Samba model (config.json with model_type 'samba') or LoRA adapter "
            "(adapter_config.json), and no README.md: add a model card to the folder to push it."
        )
    config = SambaConfig.from_pretrained(folder)
    return render_model_card(
        config, count_saved_parameters(folder), model_name, repo_id=repo_id, base_model=base_model, **card
    )


def save_hub_folder(
    model,
    output_dir,
    *,
    tokenizer=None,
    model_name: str | None = None,
    force: bool = False,
    max_shard_size: str = "2GB",
    **card,
) -> Path:
    """Write a Hub-ready folder: sharded safetensors, config.json with `auto_map`, the modeling code
    (so it loads with trust_remote_code=True without samba-hf), the tokenizer and README.md (the
    model card; `card` takes base_model, datasets, language, tags and the text sections of
    render_model_card). `output_dir` is a path, or an OutputFolder opened earlier so that its checks
    ran before the work. Everything is written to a staging folder and moved into place at the end;
    `force` replaces only a folder samba-hf wrote, and only its own files."""
    output = output_dir if isinstance(output_dir, OutputFolder) else OutputFolder(output_dir, force=force)
    with output:
        model.save_pretrained(output.staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(output.staging)
        card_text = folder_card(output.staging, model_name or output.path.name, **card)
        (output.staging / "README.md").write_text(card_text, encoding="utf-8")
        return output.commit()


# ---------------------------------------------------------------- publishing


@dataclass
class PushPlan:
    """What `push_folder` uploads: the folder's files as they are, and `card`, the README.md it adds
    or fills in (None: the folder's own README.md goes up unchanged)."""

    folder: Path
    repo_id: str
    files: list[str]
    card: str | None
    card_origin: str


def uploaded_files(folder: Path) -> list[str]:
    """The files upload_folder sends: all but the manifest and git/cache folders."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and relative.as_posix() != MANIFEST and not {".git", ".cache"} & set(relative.parts):
            files.append(relative.as_posix())
    return files


def plan_push(folder, repo_id: str, *, model_name: str | None = None, **card) -> PushPlan:
    """The files and the card of a push of `folder` to `repo_id`. The folder's own README.md is kept;
    one samba-hf rendered gets the repository id in place of its placeholder; a folder without one
    gets a rendered card (`card`: base_model, datasets, language, tags and the text sections)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a model folder written by save_pretrained.")
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(
            f"{folder} has no config.json or adapter_config.json: give a saved model or adapter folder."
        )
    files = uploaded_files(folder)
    readme = folder / "README.md"
    model_name = model_name or repo_id.split("/")[-1]
    if not readme.is_file():
        return PushPlan(folder, repo_id, files, folder_card(folder, model_name, repo_id=repo_id, **card), "rendered")
    text = readme.read_text(encoding="utf-8")
    if REPO_ID_PLACEHOLDER in text:  # a card samba-hf rendered before the repository was known
        return PushPlan(folder, repo_id, files, text.replace(REPO_ID_PLACEHOLDER, repo_id), "repository id filled in")
    return PushPlan(folder, repo_id, files, None, "the folder's own")


def upload(
    plan: PushPlan,
    api,
    *,
    private=None,
    commit_message: str,
    commit_description=None,
    revision=None,
    create_pr: bool = False,
) -> str:
    """Create the repository and upload the plan's folder as it is, then its card. A rendered card
    does not replace one the repository already has."""
    repo_url = api.create_repo(plan.repo_id, private=private, exist_ok=True, repo_type="model")
    ignore = [MANIFEST]
    card = plan.card
    if plan.card_origin == "rendered" and api.file_exists(plan.repo_id, "README.md", revision=revision):
        card = None  # the card on the Hub stays
    elif card is not None:
        ignore.append("README.md")
    common = dict(repo_id=plan.repo_id, repo_type="model", revision=revision, create_pr=create_pr)
    api.upload_folder(
        folder_path=plan.folder,
        commit_message=commit_message,
        commit_description=commit_description,
        ignore_patterns=ignore,
        **common,
    )
    if card is not None:
        api.upload_file(
            path_or_fileobj=card.encode("utf-8"),
            path_in_repo="README.md",
            commit_message="Add the model card",
            **common,
        )
    return str(repo_url)


def push_folder(
    folder,
    repo_id: str,
    *,
    private=None,
    commit_message="Upload with samba-hf",
    token=None,
    revision=None,
    create_pr=False,
    model_name=None,
    **card,
) -> str:
    """Upload a saved model or LoRA adapter folder to the Hub as it is (see plan_push for the card)."""
    from huggingface_hub import HfApi

    plan = plan_push(folder, repo_id, model_name=model_name, **card)
    api = HfApi(token=token)
    return upload(plan, api, private=private, commit_message=commit_message, revision=revision, create_pr=create_pr)


def push_to_hub(
    self,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token=None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size="50GB",
    tags=None,
    **card,
) -> str:
    """Save the model and upload it to `repo_id`, with the model card `samba-hf push` renders
    (`card`: base_model, datasets, language and the text sections training, intended_use,
    evaluation, limitations, license). A card the repository already has is kept."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="samba-hf-push-") as folder:
        self.save_pretrained(folder, max_shard_size=max_shard_size)
        plan = plan_push(folder, repo_id, tags=[*(self.model_tags or ()), *(tags or ())], **card)
        message = commit_message or "Upload model with samba-hf"
        return upload(
            plan,
            api,
            private=private,
            commit_message=message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


__all__ = [
    "CARD_DEFAULTS",
    "PushPlan",
    "folder_card",
    "plan_push",
    "push_folder",
    "push_to_hub",
    "render_adapter_card",
    "render_model_card",
    "save_hub_folder",
    "upload",
]
