"""lora: examples/lora.py (PEFT LoRA through TRL's SFTTrainer) on samba-421m, plain LoRA against QLoRA: peak GPU
memory and speed of the same training steps, each mode in its own process.

    python -m benchmarks.run lora

Each mode runs `python -m benchmarks.lora RESULT_JSON -- LORA_ARGS...`, which calls examples/lora.py's
main() as a user's command would and writes what it measured to RESULT_JSON.
"""

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .harness import GiB, columns, fmt, registry, rows_of
from .multi_gpu import run_logged

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, LENGTH, LOGGING_STEPS = 20, 4, 1024, 5
SMOKE_STEPS, SMOKE_BATCH, SMOKE_LENGTH, SMOKE_LOGGING_STEPS = 2, 2, 64, 1
TOKENIZER_VOCAB, SMOKE_TOKENIZER_VOCAB = 4096, 512  # within the model's vocabulary (32000; the tiny preset's 1024)
# Planning guesses for the budget: one mode's process (imports, loading, the steps, Triton's first compiles; on the
# H200 32-39 s with Triton's cache warm, 73 s with it empty: benchmarks/results/lora.json and its first run), and
# building and saving the model folder.
MODE_S, SETUP_S = 60, 30


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    flags: tuple[str, ...]
    about: str
    smoke_skip: str | None = None  # why a smoke run leaves it out (each process takes about 20 s on the CPU)


# In order of priority: the comparison that matters first.
MODES = (
    Mode("lora-bf16", ("--dtype", "bfloat16"), "bf16 base weights"),
    Mode("qlora", ("--qlora",), "4-bit NF4 projections; x_proj, dt_proj, embeddings and norms not quantized"),
    Mode("lora", (), "fp32 base weights, bf16 autocast: the script's default"),
    Mode(
        "lora-bf16-no-checkpointing",
        ("--dtype", "bfloat16", "--gradient-checkpointing", "false"),
        "bf16 base weights, activations kept (TRL checkpoints them by default)",
        smoke_skip="lora-bf16's path with one more flag",
    ),
)

TITLE = "LoRA and QLoRA fine-tuning of samba-421m: peak memory and speed"
INTRO = f"""
`examples/lora.py` as users run it (PEFT LoRA, rank 16 on every projection, through TRL's SFTTrainer; its default
data, the standard library's docstrings, padded per batch), on samba-421m with random weights (seed 0) and a
{TOKENIZER_VOCAB}-token BPE tokenizer trained on that text; {STEPS} steps of {BATCH} rows of up to {LENGTH} tokens
(`--max-steps {STEPS} --per-device-train-batch-size {BATCH} --max-length {LENGTH} --report-to none --save-strategy
no`), each mode in its own process so that each peak is its own:

{chr(10).join(f"- `{mode.name}` ({' '.join(mode.flags) or 'no flags'}): {mode.about}" for mode in MODES)}

Training runs under bf16 autocast (the script's default on a GPU); the adapter and its optimizer states are fp32.
The checkpointing column is what the model reported after training (TRL's SFTConfig turns activation checkpointing
on by default; QLoRA's `prepare_model_for_kbit_training` too).

Peak GiB: `torch.cuda.max_memory_allocated()` over the whole `main()` call (loading, training, saving the adapter);
load peak: up to the first step. Weights GiB: the base model's `get_memory_footprint()` after loading (after
`prepare_model_for_kbit_training` for QLoRA, which casts the parts not quantized to fp32). Train s: the Trainer's
`train_runtime` (it includes the first steps' kernel compilation and autotuning); tokens/s: TRL's `num_tokens` (the
tokens that are not padding) over it. Loss: the mean training loss of the run. 4-bit / plain linears: the base
model's `bitsandbytes.nn.Linear4bit` and other `nn.Linear` modules before the adapter is added.
"""

CASES, case = registry()


def build_inputs(work: Path, smoke: bool) -> tuple[Path, list[str]]:
    """samba-421m (smoke: the tiny preset) with random weights and a tokenizer trained here, as a Hub folder, and
    the data flags: none (the script's default data) or, in a smoke run, a text file of the tokenizer's documents,
    which spares each process the minutes of building the whole corpus on the CPU."""
    from samba_hf import SambaConfig, SambaForCausalLM
    from samba_hf.data import stdlib_corpus, train_tokenizer
    from samba_hf.hub import save_hub_folder

    documents = stdlib_corpus()[: 200 if smoke else 2000]
    tokenizer = train_tokenizer(documents, vocab_size=SMOKE_TOKENIZER_VOCAB if smoke else TOKENIZER_VOCAB)
    torch.manual_seed(0)
    config = SambaConfig.from_preset("tiny" if smoke else "samba-421m", pad_token_id=tokenizer.pad_token_id)
    model_dir = save_hub_folder(SambaForCausalLM(config), work / "model", tokenizer=tokenizer)
    if not smoke:
        return model_dir, []
    train_file = work / "train.txt"
    train_file.write_text("\n\n".join(documents), encoding="utf-8")
    return model_dir, ["--train-file", str(train_file)]


def lora_args(model_dir: Path, data: list[str], output_dir: Path, mode: Mode, smoke: bool) -> list[str]:
    steps, batch, length, logging = (
        (SMOKE_STEPS, SMOKE_BATCH, SMOKE_LENGTH, SMOKE_LOGGING_STEPS)
        if smoke
        else (STEPS, BATCH, LENGTH, LOGGING_STEPS)
    )
    return [
        *("--model", str(model_dir), *data, "--output-dir", str(output_dir)),
        *("--max-steps", str(steps), "--per-device-train-batch-size", str(batch), "--max-length", str(length)),
        *("--report-to", "none", "--save-strategy", "no", "--logging-steps", str(logging)),
        *mode.flags,
    ]


def run_mode(ctx, mode: Mode, model_dir: Path, data: list[str], work: Path) -> None:
    cell = dict(mode=mode.name, flags=" ".join(mode.flags))
    refusal = (ctx.smoke and mode.smoke_skip and f"smoke run: {mode.smoke_skip}") or ctx.budget.refuses(MODE_S)
    if refusal:
        return ctx.skip(refusal, **cell)
    result_file, log_file = work / f"{mode.name}.json", work / f"{mode.name}.log"
    command = [
        sys.executable,
        "-m",
        "benchmarks.lora",
        str(result_file),
        "--",
        *lora_args(model_dir, data, work / mode.name, mode, ctx.smoke),
    ]
    # The child finds samba_hf where this process does (an installed package, or gpu_session.sh's PYTHONPATH) and
    # the examples as scripts; offline, with its datasets cache in the scratch folder.
    python_path = [str(ROOT / "examples"), str(ROOT / "src"), str(ROOT / "kernels"), os.environ.get("PYTHONPATH")]
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, python_path)),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "datasets-cache"),
    }
    left = ctx.budget.left()
    run = run_logged(command, env, log_file, timeout=None if math.isinf(left) else max(left, 1))
    if run["returncode"] != 0 or not result_file.is_file():
        last_line = (log_file.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
        return ctx.skip(f"failed ({run['returncode']}): {last_line[:600]}", **cell, wall_s=run["wall_s"])
    ctx.add(**cell, **json.loads(result_file.read_text()), wall_s=run["wall_s"])


@case("samba-421m", "examples/lora.py on samba-421m: LoRA (fp32 and bf16 base) and QLoRA, each in its own process")
def samba_421m(ctx):
    refusal = ctx.budget.refuses(SETUP_S + MODE_S)
    if refusal:
        return ctx.skip(refusal)
    with tempfile.TemporaryDirectory(prefix="samba-lora-") as scratch:
        work = Path(scratch)
        model_dir, data = build_inputs(work, ctx.smoke)
        for mode in MODES:
            run_mode(ctx, mode, model_dir, data, work)


COLUMNS = [
    ("mode", "mode"),
    ("flags", "flags"),
    ("checkpointing", "checkpointing"),
    ("weights GiB", "weights_gib", ".2f"),
    ("load peak GiB", "load_peak_gib", ".2f"),
    ("peak GiB", "peak_gib", ".2f"),
    ("train s", "train_s", ".1f"),
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("loss", "train_loss", ".4f"),
    ("trainable", "trainable_params", ",d"),
    (
        "4-bit / plain linears",
        lambda row: "linear_4bit" in row and f"{row['linear_4bit']} / {row['linear_plain']}" or None,
    ),
    ("wall s", "wall_s", ".0f"),
    ("note", "skipped"),
]


def render_case(name: str, entry: dict) -> list[str]:
    return columns(entry["rows"], COLUMNS)


def summary(result: dict) -> list[str]:
    rows = {row["mode"]: row for name in CASES for row in rows_of(result, name) if "mode" in row}
    lines = []
    for name, row in rows.items():
        if "skipped" in row:
            lines.append(f"{name}: not run ({row['skipped'][:160]})")
        else:
            peak = f"peak {row['peak_gib']:.2f} GiB, " if row.get("peak_gib") else ""
            lines.append(f"{name}: {peak}{fmt(row['tokens_per_s'], ',.0f')} tokens/s, loss {row['train_loss']:.4f}")
    qlora, bf16 = rows.get("qlora", {}), rows.get("lora-bf16", {})
    if qlora.get("peak_gib") and bf16.get("peak_gib"):
        lines.append(
            f"qlora peak {qlora['peak_gib']:.2f} GiB vs lora-bf16 {bf16['peak_gib']:.2f} GiB "
            f"({qlora['peak_gib'] / bf16['peak_gib']:.2f}x)"
        )
    return lines


def measure(result_file: Path, argv: list[str]) -> None:
    """Runs examples/lora.py's main(argv) in this process and writes what it measured to `result_file`. lora's
    loader and trainer are wrapped to read the model after loading and the Trainer's state around training;
    the script itself runs as it is."""
    import lora

    cuda = torch.cuda.is_available()
    measured = {}
    load_base_model, trainer_class = lora.load_base_model, lora.SFTTrainer

    def load_and_count(*args, **kwargs):
        model = load_base_model(*args, **kwargs)
        try:
            from bitsandbytes.nn import Linear4bit
        except ImportError:  # plain LoRA needs no bitsandbytes
            Linear4bit = ()
        linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
        measured.update(
            weights_gib=model.get_memory_footprint() / GiB,
            linear_4bit=sum(isinstance(module, Linear4bit) for module in linears),
            linear_plain=sum(not isinstance(module, Linear4bit) for module in linears),
        )
        return model

    class MeasuredTrainer(trainer_class):
        def train(self, *args, **kwargs):
            if cuda:  # the peak up to here, then the training's own
                torch.cuda.synchronize()
                measured["load_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
                torch.cuda.reset_peak_memory_stats()
            output = super().train(*args, **kwargs)
            tokens = next((log["num_tokens"] for log in reversed(self.state.log_history) if "num_tokens" in log), None)
            measured.update(
                checkpointing=self.model.is_gradient_checkpointing,
                trainable_params=self.model.get_nb_trainable_parameters()[0],
                steps=self.state.global_step,
                train_s=output.metrics["train_runtime"],
                tokens=tokens,
                tokens_per_s=tokens and tokens / output.metrics["train_runtime"],
                last_logged_loss=next(
                    (log["loss"] for log in reversed(self.state.log_history) if "loss" in log), None
                ),
            )
            return output

    lora.load_base_model, lora.SFTTrainer = load_and_count, MeasuredTrainer
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = lora.main(argv)
    measured["main_s"] = time.perf_counter() - start
    measured["train_loss"] = result["train_loss"]
    if cuda:
        measured["peak_gib"] = max(measured.get("load_peak_gib", 0), torch.cuda.max_memory_allocated() / GiB)
    result_file.write_text(json.dumps(measured))


if __name__ == "__main__":
    result_path, separator, *lora_argv = sys.argv[1:]
    assert separator == "--", "usage: python -m benchmarks.lora RESULT_JSON -- LORA_ARGS..."
    measure(Path(result_path), lora_argv)
