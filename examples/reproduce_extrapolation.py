"""Length extrapolation of equal-size models, after the Samba paper's ablation (arXiv 2406.07522,
Table 3 / Figure 4): models trained at sequence length T, perplexity measured at 1x, 4x and 16x T.

The paper's claim: full attention (Llama-2) and attention without position encoding (Samba-NoPE)
degrade beyond the training length; models whose attention is windowed (Llama-2-SWA, Mamba-SWA-MLP,
Samba) or absent (Mamba) do not, and Samba is best.

All six architectures are samba-hf configurations (layer patterns), trained on the same data with
the same recipe; their layer counts are chosen to match Samba's non-embedding parameters. The data
ship with Python, the last 10% of documents held out: `--corpus docstrings` (default) takes the
standard library's docstrings (samba_hf.data, about 100K tokens: enough for T = 64), `--corpus
source` its .py files (tests and codec tables left out, about 3M tokens: enough held-out text for
windows of 16 x 512 tokens); `--data` reads .txt files instead.

On CUDA the models train under bf16 autocast and are evaluated in float32, with the Triton kernels
for the Mamba layers; the sliding-window layers run sdpa with a window mask unless `--flex-attention` asks
for samba_kernels' compiled FlexAttention (at these lengths it saves nothing, and every new shape
and dtype costs a compilation). The report files are rewritten after every model, so an
interrupted run keeps the models done so far.

    python examples/reproduce_extrapolation.py                        # CPU, a few minutes
    python examples/reproduce_extrapolation.py --size small --corpus source --seq-len 512 --steps 1000 \\
        --batch-size 16 --lr 2e-3 --num-samples 32 --device cuda --output-dir DIR     # one GPU (benchmarks/extrapolation.md)
"""

import argparse
import os
import platform
import shlex
import sys
import sysconfig
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from samba_hf import SambaConfig, SambaForCausalLM
from samba_hf.data import TokenBlocks, read_documents, stdlib_corpus, token_stream, train_tokenizer
from samba_hf.evaluation import evaluate_perplexity, format_length, format_table, plot_perplexity, write_csv

# Each architecture repeats a cycle of (mixer, followed by an MLP?) layers.
SAMBA_CYCLE = [("linear_attention", True), ("sliding_attention", True)]
ARCHITECTURES = {
    "Llama-2": dict(cycle=[("full_attention", True)]),
    "Llama-2-SWA": dict(cycle=[("sliding_attention", True)]),
    "Mamba": dict(cycle=[("linear_attention", False)]),
    "Mamba-SWA-MLP": dict(cycle=[("linear_attention", False), ("sliding_attention", True)]),
    "Samba-NoPE": dict(cycle=SAMBA_CYCLE, use_rope=False),
    "Samba": dict(cycle=SAMBA_CYCLE),
}
# Samba's shape at each size; the other architectures get the layer count that matches its parameters.
SIZES = {
    "tiny": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4),
    "small": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=8),
    "base": dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, num_hidden_layers=12),
}
PAPER_CLAIM = (
    "full attention (Llama-2) and Samba-NoPE degrade beyond the training length; Llama-2-SWA, Mamba, "
    "Mamba-SWA-MLP and Samba do not, and Samba is best"
)


def make_config(architecture: str, num_cycles: int, size: str, window: int, tokenizer) -> SambaConfig:
    spec = ARCHITECTURES[architecture]
    shape = {k: v for k, v in SIZES[size].items() if k != "num_hidden_layers"}
    layers = spec["cycle"] * num_cycles
    return SambaConfig(
        **shape,
        intermediate_size=3 * shape["hidden_size"],
        num_hidden_layers=len(layers),
        layer_types=[mixer for mixer, _ in layers],
        use_mlp=[mlp for _, mlp in layers],
        use_rope=spec.get("use_rope", True),
        sliding_window=window,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,  # training; the evaluator asks for the cache explicitly
    )


def non_embedding_parameters(config: SambaConfig) -> int:
    with torch.device("meta"):  # counts only: no memory, no initialisation
        model = SambaForCausalLM(config)
    return model.num_parameters() - model.model.embed_tokens.weight.numel()


def matched_configs(size: str, window: int, tokenizer) -> dict[str, SambaConfig]:
    """Every architecture with the number of layer cycles whose non-embedding parameter count is
    closest to Samba's."""
    samba_cycles = SIZES[size]["num_hidden_layers"] // len(SAMBA_CYCLE)
    target = non_embedding_parameters(make_config("Samba", samba_cycles, size, window, tokenizer))
    configs = {}
    for architecture, spec in ARCHITECTURES.items():
        candidates = [make_config(architecture, n, size, window, tokenizer) for n in range(1, 4 * samba_cycles + 1)]
        configs[architecture] = min(candidates, key=lambda c: abs(non_embedding_parameters(c) - target))
    return configs


# ---------------------------------------------------------------- data

# Left out of `--corpus source`: tests (the same code again) and the codec tables of encodings/.
SOURCE_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}


def stdlib_source() -> list[str]:
    """The standard library's .py files, one document each, in path order (about 10 MB of text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [path for path in sorted(root.rglob("*.py")) if not SOURCE_SKIP & set(path.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(f"No .py files under {root}: this Python has no standard-library sources.")
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def load_documents(args) -> tuple[list[str], str]:
    if args.data:
        return read_documents(args.data), f"the .txt files of {args.data}"
    if args.corpus == "source":
        return stdlib_source(), "the standard library's .py files (tests and codec tables left out), one document each"
    return stdlib_corpus(), "the standard library's docstrings (samba_hf.data)"


# ---------------------------------------------------------------- training


class Progress(TrainerCallback):
    """One flushed line per logging step: loss, steps done, seconds and the rate since the first step."""

    def __init__(self, name: str):
        self.name, self.started, self.first = name, time.time(), None

    def on_step_end(self, args, state, control, **kwargs):
        if self.first is None:  # the first step carries kernel compilation and warm-up
            self.first = (time.time(), state.global_step)
            print(f"  {self.name}: first step after {self.first[0] - self.started:.1f} s", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.first is not None:
            now, (first_time, first_step) = time.time(), self.first
            rate = (now - first_time) / max(1, state.global_step - first_step)
            print(
                f"  {self.name}: step {state.global_step}/{state.max_steps} loss {logs['loss']:.3f} "
                f"({now - self.started:.0f} s, {1000 * rate:.0f} ms/step)",
                flush=True,
            )


def train(name: str, config: SambaConfig, dataset, args) -> tuple[SambaForCausalLM, float]:
    torch.manual_seed(args.seed)
    # At these lengths the fused windowed attention saves nothing, and each new shape costs a compilation.
    config.windowed_attention_kernel = args.flex_attention
    model = SambaForCausalLM(config)
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="samba-extrapolation-") as trainer_dir:
        training_args = TrainingArguments(
            output_dir=trainer_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 20),
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            bf16=cuda,  # autocast; the weights and optimizer stay float32
            logging_steps=max(1, args.steps // 5),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=args.device == "cpu",
            dataloader_num_workers=0,
            seed=args.seed,  # the same batches in the same order for every architecture
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[Progress(name)])
        trainer.remove_callback(PrinterCallback)  # Progress prints the losses
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model.eval(), losses[-1]


# ---------------------------------------------------------------- report


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    if device.startswith("cuda"):
        gpu = f"{torch.cuda.get_device_name(device)} ({cpu}), CUDA {torch.version.cuda}, triton {package_version('triton')}"
    else:
        gpu = f"CPU ({cpu})"
    return (
        f"{gpu}; {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {version('transformers')}, "
        f"samba-hf {package_version('samba-hf')}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help="Samba's shape (default tiny: hidden 64)")
    parser.add_argument("--seq-len", type=int, default=64, help="training length T (default 64)")
    parser.add_argument("--window", type=int, help="sliding window (default T/2)")
    parser.add_argument("--steps", type=int, default=150, help="training steps per model (default 150)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=2048, help="of the BPE tokenizer trained on the corpus")
    parser.add_argument(
        "--corpus",
        choices=["docstrings", "source"],
        default="docstrings",
        help="the standard library's docstrings (default, ~100K tokens) or its .py files (~3M)",
    )
    parser.add_argument("--data", help="text file or folder of .txt files instead of --corpus")
    parser.add_argument("--num-samples", type=int, default=8, help="validation windows per length (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--flex-attention",
        action="store_true",
        help="sliding-window layers on CUDA use samba_kernels' compiled FlexAttention, not sdpa",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="benchmarks", help="folder for extrapolation.{md,csv,png}")
    args = parser.parse_args(argv)
    seq_len, window = args.seq_len, args.window or args.seq_len // 2
    lengths = [seq_len, 4 * seq_len, 16 * seq_len]
    cuda = args.device.startswith("cuda")
    command = "python examples/reproduce_extrapolation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    print(f"{environment(args.device)}\n{command}", flush=True)

    documents, source = load_documents(args)
    split = int(0.9 * len(documents))  # the last 10% of documents are held out
    tokenizer = train_tokenizer(documents[:split], vocab_size=args.vocab_size)
    train_set = TokenBlocks(documents[:split], tokenizer, block_size=seq_len)
    validation = token_stream(documents[split:], tokenizer)
    windows = min(args.num_samples, len(validation) // (lengths[-1] + 1))
    data = (
        f"{len(documents)} documents, {source}; training {train_set.blocks.numel():,} tokens, "
        f"validation {len(validation):,} tokens (the last {len(documents) - split} documents)"
    )
    print(f"data: {data} ({time.time() - started:.0f} s)", flush=True)
    if windows < args.num_samples:
        print(
            f"warning: the validation text holds {windows} windows of {lengths[-1]:,} tokens, not "
            f"{args.num_samples}: use a larger corpus (--corpus source) or fewer --num-samples",
            flush=True,
        )
    tokens_seen = args.steps * args.batch_size * seq_len

    configs = matched_configs(args.size, window, tokenizer)
    samba_parameters = non_embedding_parameters(configs["Samba"])
    out = Path(args.output_dir)
    parameter_rows, rows = [], []
    for architecture, config in configs.items():
        count = non_embedding_parameters(config)
        print(f"{architecture}: {config.num_hidden_layers} layers, {count:,} non-embedding parameters", flush=True)
        model_started = time.time()
        model, loss = train(architecture, config, train_set, args)
        train_seconds = time.time() - model_started
        model.to(args.device)
        rows += evaluate_perplexity(  # float32: the cache continuation checked on the GPU (gpu_checks.md)
            model,
            validation,
            lengths,
            chunk_size=seq_len,
            num_samples=args.num_samples,
            batch_size=args.num_samples,
            model_name=architecture,
        )
        parameter_rows.append(
            {
                "model": architecture,
                "layers": config.num_hidden_layers,
                "non-embedding params": f"{count:,}",
                "vs Samba": f"{count / samba_parameters:.2f}",
                "total params": f"{model.num_parameters():,}",
                "final train loss": f"{loss:.3f}",
                "train s": f"{train_seconds:.0f}",
                "eval s": f"{sum(row['seconds'] for row in rows if row['model'] == architecture):.0f}",
            }
        )
        print(format_table(parameter_rows[-1:], list(parameter_rows[-1])).splitlines()[-1], flush=True)
        print(
            "  "
            + ", ".join(
                f"ppl@{format_length(row['length'])} {row['ppl']:.2f}" for row in rows if row["model"] == architecture
            ),
            flush=True,
        )
        del model
        if cuda:
            torch.cuda.empty_cache()

        # The report after every model, so that an interrupted run keeps what it has done.
        done = [row["model"] for row in parameter_rows]
        write_csv(rows, out / "extrapolation.csv")
        plot_perplexity(rows, out / "extrapolation.png")
        by_model = {name: {row["length"]: row for row in rows if row["model"] == name} for name in done}
        ppl_rows = [
            {
                "model": name,
                **{f"ppl@{format_length(n)}": f"{results[n]['ppl']:.2f}" for n in lengths},
                **{
                    f"last-{seq_len} ppl@{format_length(n)}": f"{results[n]['last_chunk_ppl']:.2f}"
                    for n in lengths[1:]
                },
            }
            for name, results in by_model.items()
        ]
        precision = (
            "training under bf16 autocast, evaluation in float32; Mamba layers on the Triton kernels, sliding-window "
            "layers on " + ("compiled FlexAttention" if args.flex_attention else "sdpa with a window mask")
            if cuda
            else "float32"
        )
        status = (
            ""
            if len(done) == len(configs)
            else f" **Incomplete: {len(done)} of {len(configs)} models so far ({', '.join(done)}).**"
        )
        report = "\n\n".join(
            [
                "# Length extrapolation of equal-size models",
                f"Trained at T = {seq_len} tokens (sliding window {window}), {args.steps} steps of batch {args.batch_size} "
                f"({tokens_seen / 1e6:.2f}M tokens, {tokens_seen / train_set.blocks.numel():.1f} epochs), "
                f"learning rate {args.lr:g}; perplexity on held-out text at {', '.join(format_length(n) for n in lengths)} "
                f"tokens ({windows} windows each, run through the cache in chunks of T). The columns `last-{seq_len}` "
                f"average only the last {seq_len} positions of each window, the ones farthest from the start. "
                f"The paper's claim to compare with: {PAPER_CLAIM}.{status}",
                f"Data: {data}.",
                f"Command: `{command.strip()}`",
                f"Machine: {environment(args.device)}; {precision}; total time {time.time() - started:.0f} s "
                "(train s and eval s per model below, compilation included).",
                "## Models",
                format_table(parameter_rows, list(parameter_rows[0])),
                "## Perplexity",
                format_table(ppl_rows, list(ppl_rows[0])),
                "![perplexity against context length](extrapolation.png)",
            ]
        )
        (out / "extrapolation.md").write_text(report + "\n", encoding="utf-8")
        print(f"  wrote {out}/extrapolation.md, .csv and .png ({time.time() - started:.0f} s so far)", flush=True)

    print("\n" + report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
