"""Long-context evaluation of any causal language model: perplexity against context length and
passkey retrieval, the two long-context measurements of the Samba paper (Ren et al., 2024,
arXiv 2406.07522).

Both run the input through the model's cache in chunks, so memory is O(chunk + cache): constant for
Samba (Mamba states and a sliding-window KV cache), growing with the context for full attention.
They work on every `AutoModelForCausalLM` whose forward takes `cache=` and returns `.cache`
(samba-hf models and transformers' Llama, Mistral, Mamba, ...). Chunking is exact only if the
model continues a multi-token forward from its cache exactly; `samba-hf eval ppl` checks this on
the data and warns otherwise (transformers' Mamba restarts its SSM state at every chunk: give it
`--chunk-size` at least the longest length).

    samba-hf eval ppl MODEL --data PATH --lengths 4k,8k,16k [--chunk-size 4096] [--output-dir DIR]
    samba-hf eval passkey MODEL --lengths 4k,16k,64k,256k --depths 11 --trials 5 [--output-dir DIR]

Zero-shot suite of the paper (1.3B: ARC-Easy, HellaSwag, WinoGrande, PIQA, LAMBADA) with
lm-evaluation-harness, on a converted checkpoint folder:

    lm_eval --model hf \\
        --model_args pretrained=DIR,trust_remote_code=True,dtype=bfloat16 \\
        --tasks arc_easy,hellaswag,winogrande,piqa,lambada_openai \\
        --num_fewshot 0 --batch_size 16 --device cuda:0 --output_path results/

(Folders written by samba-hf carry their modeling code, so `trust_remote_code=True` loads them
where samba-hf is not installed.)
"""

import csv
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .generation import cache_nbytes

LENGTH_UNITS = {"": 1, "k": 1024, "m": 1024**2}


# ---------------------------------------------------------------- lengths and data


def parse_length(text: str) -> int:
    """'512' -> 512, '4k'/'4K' -> 4096, '1m' -> 1048576 (binary units: the paper's 4K is 4096)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(
            f"Cannot read {text!r} as a length: write a positive number, optionally with k or m (4k, 1m)."
        )
    return int(match.group(1)) * LENGTH_UNITS[match.group(2).lower()]


def parse_lengths(text: str) -> list[int]:
    """'4k,16k' -> [4096, 16384]; at least one length."""
    lengths = [parse_length(part) for part in text.split(",") if part.strip()]
    if not lengths:
        raise ValueError(f"Cannot read {text!r} as lengths: write one or more, separated by commas (4k,16k).")
    return lengths


def format_length(length: int) -> str:
    """4096 -> '4K', 1048576 -> '1M', 1000 -> '1000'."""
    for suffix, unit in (("M", 1024**2), ("K", 1024)):
        if length % unit == 0:
            return f"{length // unit}{suffix}"
    return str(length)


# ---------------------------------------------------------------- running through the cache


def chunked_forward(model, input_ids: torch.Tensor, chunk_size: int):
    """Run `input_ids` (batch, length) through the model `chunk_size` tokens at a time, each chunk
    continuing from the cache the previous one returned. Yields (start, output) per chunk."""
    cache = None
    for start in range(0, input_ids.shape[1], chunk_size):
        output = model(input_ids=input_ids[:, start : start + chunk_size], cache=cache, use_cache=True)
        cache = output.cache
        yield start, output


@torch.no_grad()
def chunking_error(model, input_ids: torch.Tensor, chunk_size: int) -> float:
    """Largest |logit| difference between a chunked and a single forward of `input_ids`."""
    whole = model(input_ids=input_ids, use_cache=False).logits.float()
    chunked = torch.cat([output.logits.float() for _, output in chunked_forward(model, input_ids, chunk_size)], dim=1)
    return (whole - chunked).abs().max().item()


@torch.no_grad()
def token_nll(model, windows: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, int]:
    """Negative log-likelihood (batch, length - 1) of each token of `windows` given all before it in
    its window, computed chunk by chunk; and the size in bytes of the cache at the end."""
    device = model.device
    inputs, targets = windows[:, :-1].to(device), windows[:, 1:].to(device)
    nll, output = [], None
    for start, output in chunked_forward(model, inputs, chunk_size):
        logits = output.logits.float()
        chunk_targets = targets[:, start : start + logits.shape[1]]
        nll.append(F.cross_entropy(logits.transpose(1, 2), chunk_targets, reduction="none").cpu())
    return torch.cat(nll, dim=1), cache_nbytes(output.cache)


def sample_windows(stream: torch.Tensor, length: int, num_samples: int) -> torch.Tensor:
    """Up to `num_samples` non-overlapping windows of `length + 1` tokens (inputs plus the next
    token to predict), spread evenly over the stream."""
    available = len(stream) // (length + 1)
    if available == 0:
        raise ValueError(f"The data has {len(stream):,} tokens, fewer than one window of {length + 1:,}.")
    windows = stream[: available * (length + 1)].view(available, length + 1)
    picks = torch.linspace(0, available - 1, min(num_samples, available)).round().long()
    return windows[picks]


def evaluate_perplexity(
    model,
    stream: torch.Tensor,
    lengths: list[int],
    chunk_size: int,
    num_samples: int,
    batch_size: int = 1,
    model_name: str = "",
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per length: mean NLL and perplexity over all positions of the windows, and over the
    last `chunk_size` positions (the tokens farthest from the start, where extrapolation shows).
    `on_row` receives each row as soon as its length is done; a progress bar counts the windows."""
    rows = []
    for length in lengths:
        started = time.perf_counter()
        windows = sample_windows(stream, length, num_samples)
        batches = range(0, len(windows), batch_size)
        progress = tqdm(batches, desc=f"perplexity at {format_length(length)}", unit="batch", leave=False)
        results = [token_nll(model, windows[i : i + batch_size], chunk_size) for i in progress]
        nll = torch.cat([batch_nll for batch_nll, _ in results])
        all_nll, last_nll = nll.mean().item(), nll[:, -chunk_size:].mean().item()
        rows.append(
            {
                "model": model_name,
                "length": length,
                "windows": len(windows),
                "chunk_size": chunk_size,
                "nll": round(all_nll, 5),
                "ppl": round(math.exp(all_nll), 4),
                "last_chunk_nll": round(last_nll, 5),
                "last_chunk_ppl": round(math.exp(last_nll), 4),
                "cache_mib": round(max(nbytes for _, nbytes in results) / 2**20, 3),
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        if on_row is not None:
            on_row(rows[-1])
    return rows


# ---------------------------------------------------------------- passkey retrieval

# The prompt of the landmark-attention passkey test (Mohtashami & Jaggi, 2023), used by the Samba paper.
PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    text: str
    input_ids: list[int]
    key: str
    filler_before: int  # filler sentences before the pass key line
    filler_after: int


def passkey_text(key: str, filler_before: int, filler_after: int) -> str:
    return (
        PASSKEY_TASK
        + PASSKEY_FILLER * filler_before
        + PASSKEY_LINE.format(key=key)
        + PASSKEY_FILLER * filler_after
        + PASSKEY_QUESTION
    )


def build_passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """The longest passkey prompt of at most `length` tokens, with the pass key line after a fraction
    `depth` (0 = start, 1 = end) of the filler."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must lie in [0, 1], got {depth}.")

    def encode(text):
        return tokenizer(text)["input_ids"]

    per_filler = (len(encode(PASSKEY_TASK + PASSKEY_FILLER * 16)) - len(encode(PASSKEY_TASK))) / 16
    fillers = max(0, int((length - len(encode(passkey_text(key, 0, 0)))) / per_filler))
    while True:
        before = round(depth * fillers)
        text = passkey_text(key, before, fillers - before)
        input_ids = encode(text)
        if len(input_ids) <= length:
            return PasskeyPrompt(text, input_ids, key, before, fillers - before)
        if fillers == 0:
            raise ValueError(f"A passkey prompt needs more than {length} tokens with this tokenizer.")
        # Tokens at the joins can differ from the estimate: drop enough fillers to fit.
        fillers = max(0, fillers - math.ceil((len(input_ids) - length) / per_filler))


def passkey_answer_correct(generated: str, key: str) -> bool:
    """Exact match: the first number in the generated text is the pass key."""
    number = re.search(r"\d+", generated)
    return number is not None and number.group() == key


@torch.no_grad()
def greedy_continuation(model, input_ids: list[int], chunk_size: int, max_new_tokens: int, eos_token_id=None):
    """Greedy decoding after a chunked prefill of `input_ids` through the cache."""
    prompt = torch.tensor([input_ids], device=model.device)
    for _, output in chunked_forward(model, prompt, chunk_size):
        pass
    generated = []
    for _ in range(max_new_tokens):
        token = output.logits[:, -1].argmax(-1)
        if token.item() == eos_token_id:
            break
        generated.append(token.item())
        output = model(input_ids=token[:, None], cache=output.cache, use_cache=True)
    return generated


def evaluate_passkey(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int,
    chunk_size: int,
    max_new_tokens: int = 10,
    seed: int = 0,
    model_name: str = "",
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (length, depth): the fraction of `trials` random 5-digit keys retrieved exactly.
    `on_row` receives each row as soon as it is done; a progress bar counts the trials."""
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            correct, prompt_tokens = 0, 0
            label = f"passkey at {format_length(length)}, depth {depth:.0%}"
            for _ in tqdm(range(trials), desc=label, unit="trial", leave=False):
                key = str(rng.randint(10000, 99999))
                prompt = build_passkey_prompt(tokenizer, length, depth, key)
                answer = greedy_continuation(
                    model, prompt.input_ids, chunk_size, max_new_tokens, tokenizer.eos_token_id
                )
                correct += passkey_answer_correct(tokenizer.decode(answer, skip_special_tokens=True), key)
                prompt_tokens += len(prompt.input_ids)
            rows.append(
                {
                    "model": model_name,
                    "length": length,
                    "depth": round(depth, 4),
                    "accuracy": correct / trials,
                    "trials": trials,
                    "mean_prompt_tokens": round(prompt_tokens / trials, 1),
                }
            )
            if on_row is not None:
                on_row(rows[-1])
    return rows


# ---------------------------------------------------------------- reports


def write_csv(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `columns` (lengths written as 4K, 16K, ...)."""

    def cell(column, value):
        return format_length(value) if column == "length" else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the plots need matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(rows: list[dict], path) -> Path:
    """Perplexity against context length, one line per model: over all positions and over the last chunk."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, column, title in ((axes[0], "ppl", "all positions"), (axes[1], "last_chunk_ppl", "last chunk")):
        for model in dict.fromkeys(row["model"] for row in rows):
            points = [row for row in rows if row["model"] == model]
            axis.plot([r["length"] for r in points], [r[column] for r in points], marker="o", label=model or None)
        lengths = sorted({row["length"] for row in rows})
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(lengths, [format_length(length) for length in lengths])
        axis.set_xlabel("context length (tokens)")
        axis.set_title(f"perplexity, {title}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity")
    if any(row["model"] for row in rows):
        axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_passkey(rows: list[dict], path) -> Path:
    """Heatmap of passkey accuracy: context length across, depth down."""
    plt = pyplot()
    lengths = sorted({row["length"] for row in rows})
    depths = sorted({row["depth"] for row in rows})
    accuracy = {(row["length"], row["depth"]): row["accuracy"] for row in rows}
    grid = [[accuracy[length, depth] for length in lengths] for depth in depths]
    figure, axis = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 1.2 + 0.35 * len(depths)))
    image = axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(len(lengths)), [format_length(length) for length in lengths])
    axis.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths])
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("depth of the pass key")
    axis.set_title(f"passkey retrieval {rows[0]['model']}".strip())
    figure.colorbar(image, ax=axis, label="accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


__all__ = [
    "build_passkey_prompt",
    "chunked_forward",
    "evaluate_passkey",
    "evaluate_perplexity",
    "parse_length",
    "parse_lengths",
    "passkey_answer_correct",
]
