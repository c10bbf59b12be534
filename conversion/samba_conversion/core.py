"""What every converter shares: reading a checkpoint one tensor at a time, checking it against the
model it should become, building that model without a second copy of the weights, saving it and
verifying its logits."""

import json
import math
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from samba_hf.configuration_samba import SambaConfig
from samba_hf.dtypes import parse_dtype
from samba_hf.hub import save_hub_folder
from samba_hf.modeling_samba import SambaForCausalLM, SambaRotaryEmbedding
from samba_hf.staging import OutputFolder


class ConversionError(Exception):
    """A problem with the user's input (checkpoint, flags, output path): the message says how to fix it."""


class VerificationError(ConversionError):
    """The converted model's logits differ from the source's by more than the tolerance."""


class CorruptCheckpointError(ConversionError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not the format its name says."""


# Verification tolerance on max |Δlogits|, relative to max(1, max |logits|): fp32 conversion is exact
# up to summation order; bf16/fp16 outputs carry the rounding of every weight.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# Kept in float32 whatever the output dtype, as the model does (`_keep_in_fp32_modules_strict`).
FP32_SUFFIXES = ("mixer.A_log", "mixer.D")


def output_dtype(dtype) -> torch.dtype | None:
    """The dtype of the converted weights; None keeps the source's."""
    try:
        return parse_dtype(dtype)
    except ValueError as error:
        raise ConversionError(str(error)) from None


def summarize(items, limit: int = 8) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class TensorSource(Mapping):
    """The tensors of a checkpoint by name. Shapes are known without reading the data; a tensor is
    read (from a mmap'd torch file or a safetensors file) only when asked for."""

    def __init__(self, shapes: dict[str, torch.Size], load: Callable[[str], torch.Tensor], description: str):
        self._shapes = shapes
        self._load = load
        self.description = description

    @classmethod
    def from_state_dict(cls, state_dict: Mapping, description: str) -> "TensorSource":
        not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
        if not_tensors:
            raise ConversionError(
                f"{description}: entries that are not tensors: {summarize(not_tensors)}; pass a state dict "
                "(or the training checkpoint whose 'model' entry is one)."
            )
        return cls({key: value.shape for key, value in state_dict.items()}, state_dict.__getitem__, description)

    @classmethod
    def from_safetensors(cls, files: list[Path], description: str) -> "TensorSource":
        handles, shapes = {}, {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as error:
                raise CorruptCheckpointError(
                    f"{file} is not a readable safetensors file ({error}); it may be truncated or corrupt: copy "
                    "or download it again."
                ) from None
            for key in handle.keys():
                handles[key] = handle
                shapes[key] = torch.Size(handle.get_slice(key).get_shape())
        return cls(shapes, lambda key: handles[key].get_tensor(key), description)

    def shape(self, key: str) -> torch.Size:
        if key not in self._shapes:
            raise ConversionError(f"{self.description}: missing tensor {key}; is this the right checkpoint layout?")
        return self._shapes[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        return self._load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def load_torch_file(path: Path):
    """A torch checkpoint unpickled with weights_only (no code runs): memory-mapped when it has the
    zip format of torch.save; read whole when it has the legacy format, which cannot be mapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:  # weights_only refused an object: running it would run code
        raise ConversionError(
            f"{path} holds objects other than tensors and plain containers, which are not loaded because "
            f"unpickling them runs code ({str(error).splitlines()[0]}); save the state dict alone."
        ) from None
    except Exception as error:  # torch raises several types for a file it cannot parse
        raise CorruptCheckpointError(
            f"cannot read {path} as a torch checkpoint ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "it may be truncated or corrupt, or not saved with torch.save."
        ) from None


def weight_files(folder: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'torch', files) of a model folder, sharded or not."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("torch", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return kind, [folder / shard for shard in shards]
        if (folder / single).is_file():
            return kind, [folder / single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return "safetensors", files
    raise ConversionError(f"{folder} holds no model.safetensors or pytorch_model.bin; pass the model folder.")


def open_checkpoint(path) -> tuple[TensorSource, dict]:
    """Tensors and metadata of a checkpoint: a folder (config.json + safetensors/bin), a .safetensors
    file, or a torch file holding a state dict or a training dict {"model": state_dict, ...}.
    The metadata holds the folder's config.json under "config" and a training dict's other entries."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist; pass the checkpoint file or folder.")
    if path.is_dir():
        config_file = path / "config.json"
        metadata = {"config": json.loads(config_file.read_text())} if config_file.is_file() else {}
        kind, files = weight_files(path)
        if kind == "safetensors":
            return TensorSource.from_safetensors(files, str(path)), metadata
        state_dict = {}
        for file in files:
            state_dict.update(load_torch_file(file))
        return TensorSource.from_state_dict(state_dict, str(path)), metadata
    if path.suffix == ".safetensors":
        return TensorSource.from_safetensors([path], str(path)), {}
    content = load_torch_file(path)
    if not isinstance(content, dict):
        raise ConversionError(f"{path} holds a {type(content).__name__}, not a state dict; pass a state dict file.")
    if isinstance(content.get("model"), dict):  # a training checkpoint: weights under "model"
        metadata = {key: value for key, value in content.items() if key not in ("model", "optimizer")}
        return TensorSource.from_state_dict(content["model"], str(path)), metadata
    return TensorSource.from_state_dict(content, str(path)), {}


@dataclass(frozen=True)
class Rule:
    """How one samba-hf tensor is made: `transform` applied to the named source tensors (a rename
    when there is no transform). Transforms are shape operations, so they run on meta tensors too."""

    sources: tuple[str, ...]
    transform: Callable[..., torch.Tensor] | None = None

    def apply(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.transform(*tensors) if self.transform is not None else tensors[0]


def rename(source_key: str) -> Rule:
    return Rule((source_key,))


def make_config(**fields) -> SambaConfig:
    try:
        return SambaConfig(**fields)
    except ValueError as error:
        raise ConversionError(f"the checkpoint's shapes give an invalid Samba configuration: {error}") from error


def check_plan(source: TensorSource, plan: dict[str, Rule], expected: dict[str, torch.Size], ignored=()) -> None:
    """Raise one ConversionError listing every missing, unexpected and misshapen tensor."""
    used = {key for rule in plan.values() for key in rule.sources}
    missing = {key for key in used if key not in source}
    unexpected = set(source) - used - set(ignored)
    misshapen = {}
    for target, rule in plan.items():
        if any(key in missing for key in rule.sources):
            continue
        described = ", ".join(f"{key} {list(source.shape(key))}" for key in rule.sources)
        try:
            shape = rule.apply(*(torch.empty(source.shape(key), device="meta") for key in rule.sources)).shape
        except (RuntimeError, ValueError) as error:
            misshapen[rule.sources] = f"{described}: {error}"
            continue
        if shape != expected[target]:
            misshapen[rule.sources] = f"{described} (makes {target} {list(shape)}, expected {list(expected[target])})"
    problems = []
    if missing:
        problems.append(f"missing tensors: {summarize(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {summarize(unexpected)}")
    if misshapen:
        problems.append(f"misshapen tensors: {summarize(misshapen.values(), limit=4)}")
    if problems:
        raise ConversionError(
            f"{source.description} does not match the inferred model ({'; '.join(problems)}); check the layout, "
            "the head counts and the flags, and that the checkpoint is complete. Nothing was written."
        )


def build_model(
    config: SambaConfig, source: TensorSource, rule_for: Callable[[str], Rule], dtype=None, ignored=()
) -> SambaForCausalLM:
    """A SambaForCausalLM holding the converted tensors; `rule_for` says how each samba-hf tensor is
    made from the source. The model is built on the meta device and each tensor is assigned as it is
    converted, so memory holds about one copy of the weights. `ignored`: source tensors not needed
    (an LM head tied to the embedding)."""
    dtype = output_dtype(dtype)
    with torch.device("meta"):
        model = SambaForCausalLM(config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
    plan = {key: rule_for(key) for key in expected}
    check_plan(source, plan, expected, ignored)

    state_dict, cached_key, cached = {}, None, None
    for target, rule in tqdm(plan.items(), desc="Converting tensors", unit="tensor", leave=False):
        tensors = []
        for key in rule.sources:
            if key != cached_key:  # fused tensors feed several targets in a row: read them once
                cached_key, cached = key, source[key]
            tensors.append(cached)
        tensor = rule.apply(*tensors)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if target.endswith(FP32_SUFFIXES) else dtype)
        state_dict[target] = tensor.contiguous()
    if config.tie_word_embeddings:
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    if model.model.rotary_emb is not None:  # its buffers are not in the state dict: compute them
        model.model.rotary_emb = SambaRotaryEmbedding(config)
    return model.eval()


def heads_from_rows(q_rows: int, kv_rows: int, num_heads: int | None, num_kv_heads: int | None, fix: str) -> dict:
    """Head counts and width from the rows of the query and key projections, given either count."""
    if num_heads is None and num_kv_heads is None:
        raise ConversionError(f"the number of attention heads is not determined by the weights; pass {fix}.")
    if any(count is not None and count < 1 for count in (num_heads, num_kv_heads)):
        raise ConversionError(f"head counts must be positive, got {num_heads} and {num_kv_heads}; pass {fix}.")
    head_dim = q_rows // num_heads if num_heads is not None else kv_rows // num_kv_heads
    num_heads = num_heads if num_heads is not None else q_rows // max(head_dim, 1)
    num_kv_heads = num_kv_heads if num_kv_heads is not None else kv_rows // max(head_dim, 1)
    if head_dim < 1 or num_heads * head_dim != q_rows or num_kv_heads * head_dim != kv_rows:
        raise ConversionError(
            f"{num_heads} query heads and {num_kv_heads} key/value heads do not fit the attention weights "
            f"({q_rows} query rows, {kv_rows} key rows); pass the head counts the model was trained with ({fix})."
        )
    return {"num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim}


def layer_indices(source: TensorSource, prefix: str) -> list[int]:
    """The layer numbers 0..n-1 of the keys `prefix` + "i." (an error if there are none or gaps)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(match.group(1)) for key in source if (match := pattern.match(key))}
    if not found:
        raise ConversionError(f"{source.description} has no tensors named {prefix}0.*; is this the right layout?")
    gaps = sorted(set(range(max(found) + 1)) - found)
    if gaps:
        raise ConversionError(
            f"{source.description}: missing every tensor of layers {gaps}; pass the complete checkpoint."
        )
    return sorted(found)


def mamba_fields(source: TensorSource, prefix: str, hidden_size: int) -> dict:
    """Mamba sizes of the mixer whose tensors start with `prefix`. The tensor names (in_proj, conv1d,
    x_proj, dt_proj, A_log, D, out_proj) are mamba-ssm's, which every Samba layout keeps."""
    d_inner = source.shape(prefix + "in_proj.weight")[0] // 2
    if d_inner % hidden_size != 0:
        raise ConversionError(
            f"{prefix}in_proj.weight gives a Mamba width of {d_inner}, not a multiple of the hidden size "
            f"{hidden_size}; samba-hf supports an integer expansion factor only."
        )
    return {
        "expand": d_inner // hidden_size,
        "state_size": source.shape(prefix + "A_log")[-1],
        "conv_kernel": source.shape(prefix + "conv1d.weight")[-1],
        "time_step_rank": source.shape(prefix + "dt_proj.weight")[-1],
        "use_bias": prefix + "in_proj.bias" in source,
        "use_conv_bias": prefix + "conv1d.bias" in source,
    }


def untied_head(source: TensorSource, embedding_key: str, head_key: str, tie_if_absent: bool) -> bool:
    """Whether the checkpoint has an LM head of its own: one that is present and differs from the
    embedding. A head equal to the embedding is tied (and not stored twice)."""
    if head_key not in source:
        if not tie_if_absent:
            raise ConversionError(
                f"{source.description}: missing tensor {head_key}, and the source config does not tie it to "
                f"{embedding_key}; pass the complete checkpoint."
            )
        return False
    if source.shape(head_key) != source.shape(embedding_key):
        return True
    return not torch.equal(source[head_key], source[embedding_key])


def find_tokenizer(folder) -> Path | None:
    folder = Path(folder)
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    return folder if folder.is_dir() and any((folder / name).is_file() for name in names) else None


def load_tokenizer(path):
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load a tokenizer from {path} ({error}); pass a tokenizer folder.") from error


def save(model: SambaForCausalLM, output: OutputFolder, source_description: str, tokenizer=None) -> Path:
    return save_hub_folder(
        model,
        output,
        tokenizer=tokenizer,
        training=f"Converted to samba-hf from `{Path(source_description).name}` ({source_description}).",
    )


def prepare_output(output_dir, force: bool, source=None, dtype=None, tolerance=None) -> OutputFolder:
    """What every converter checks before any work: its options and the output folder (refused if
    it holds files samba-hf did not write, or the source)."""
    output_dtype(dtype)
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConversionError(f"the tolerance must be a finite number >= 0, got {tolerance}.")
    return OutputFolder(output_dir, force=force, sources=[source] if source is not None else [])


def verification_prompt(vocab_size: int, sliding_window: int | None) -> torch.Tensor:
    """A fixed prompt longer than the attention window, so that the window is exercised."""
    length = (sliding_window or 48) + 16
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def verify_against(output_dir, config: SambaConfig, source_forward: Callable, source, dtype=None, tolerance=None):
    """verify_logits with `source_forward(source, input_ids, num_heads, num_kv_heads, window, eps,
    rope_theta)`, an independent forward of the source layout, given the converted config's shapes."""
    window = config.sliding_window if "sliding_attention" in config.layer_types else None
    reference = partial(
        source_forward,
        source,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        window=window,
        eps=config.rms_norm_eps,
        rope_theta=config.rope_parameters["rope_theta"],
    )
    return verify_logits(output_dir, reference, dtype, tolerance)


def verify_logits(output_dir, reference: Callable[[torch.Tensor], torch.Tensor], dtype=None, tolerance=None) -> float:
    """Compare the logits of the saved model (loaded back, run in float32) with `reference` on a fixed
    prompt; print max |Δlogits| and raise VerificationError past the tolerance."""
    model = SambaForCausalLM.from_pretrained(output_dir, dtype=torch.float32, attn_implementation="eager").eval()
    config = model.config
    window = config.sliding_window if "sliding_attention" in config.layer_types else None
    input_ids = verification_prompt(config.vocab_size, window)
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits.float()
        expected = reference(input_ids).float()
    difference = (logits - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if tolerance is None:
        tolerance = TOLERANCES[output_dtype(dtype) or torch.float32] * scale
    print(f"verify: max |Δlogits| = {difference:.3e} over {input_ids.shape[1]} tokens (tolerance {tolerance:.1e})")
    if not math.isfinite(difference) or difference > tolerance:
        raise VerificationError(
            f"the converted model's logits differ from the source's by {difference:.3e} (> {tolerance:.1e}); "
            f"the output in {output_dir} is not a faithful conversion: check the head counts, window and layout."
        )
    return difference
