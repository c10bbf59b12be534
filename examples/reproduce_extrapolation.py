"""Length extrapolation of equal-size models, after the Samba paper's ablation (arXiv 2406.07522,
Table 3 / Figure 4): models trained at sequence length T, perplexity measured at 1x, 4x and 16x T.

The paper's claim: full attention (Llama-2) and attention without position encoding (Samba-NoPE)
degrade beyond the training length; models whose attention is windowed (Llama-2-SWA, Mamba-SWA-MLP,
Samba) or absent (Mamba) do not, and Samba is best.

All six architectures are samba-hf configurations (layer patterns), trained on the same data with
the same recipe; their layer counts are chosen to match Samba's non-embedding parameters. The data
are the standard library's docstrings (samba_hf.demo), the last 10% of documents held out.

    python examples/reproduce_extrapolation.py                        # CPU, a few minutes
    python examples/reproduce_extrapolation.py --size small --seq-len 512 --steps 2000 --device cuda --data DIR
"""

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from samba_hf import SambaConfig, SambaForCausalLM
from samba_hf.demo import TokenBlocks, stdlib_corpus, train_tokenizer
from samba_hf.evaluation import (
    evaluate_perplexity,
    format_length,
    format_table,
    plot_perplexity,
    read_documents,
    token_stream,
    write_csv,
)

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


def train(config: SambaConfig, dataset, args) -> tuple[SambaForCausalLM, float]:
    torch.manual_seed(args.seed)
    model = SambaForCausalLM(config)
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
            logging_steps=max(1, args.steps // 5),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=args.device == "cpu",
            dataloader_num_workers=0,
            seed=args.seed,  # the same batches in the same order for every architecture
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model.eval(), losses[-1]


def environment() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu})"
    return (
        f"{device}; {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {version('transformers')}, "
        f"samba-hf {version('samba-hf')}"
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
    parser.add_argument("--data", help="text file or folder of .txt files instead of the stdlib docstrings")
    parser.add_argument("--num-samples", type=int, default=8, help="validation windows per length (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks", help="folder for extrapolation.{md,csv,png}")
    args = parser.parse_args(argv)
    seq_len, window = args.seq_len, args.window or args.seq_len // 2
    lengths = [seq_len, 4 * seq_len, 16 * seq_len]
    started = time.time()

    documents = read_documents(args.data) if args.data else stdlib_corpus()
    split = int(0.9 * len(documents))  # the last 10% of documents are held out
    tokenizer = train_tokenizer(documents[:split], vocab_size=args.vocab_size)
    train_set = TokenBlocks(documents[:split], tokenizer, block_size=seq_len)
    validation = token_stream(documents[split:], tokenizer)
    print(f"data: {len(documents)} documents; training {train_set.blocks.numel():,} tokens, "
          f"validation {len(validation):,} tokens (last {len(documents) - split} documents)")  # fmt: skip

    configs = matched_configs(args.size, window, tokenizer)
    samba_parameters = non_embedding_parameters(configs["Samba"])
    parameter_rows, rows = [], []
    for architecture, config in configs.items():
        count = non_embedding_parameters(config)
        model, loss = train(config, train_set, args)
        model.to(args.device)
        parameter_rows.append({
            "model": architecture,
            "layers": config.num_hidden_layers,
            "non-embedding params": f"{count:,}",
            "vs Samba": f"{count / samba_parameters:.2f}",
            "total params": f"{model.num_parameters():,}",
            "final train loss": f"{loss:.3f}",
        })  # fmt: skip
        print(format_table(parameter_rows[-1:], list(parameter_rows[-1])).splitlines()[-1])
        rows += evaluate_perplexity(
            model, validation, lengths, chunk_size=seq_len, num_samples=args.num_samples,
            batch_size=args.num_samples, model_name=architecture,
        )  # fmt: skip

    out = Path(args.out)
    write_csv(rows, out / "extrapolation.csv")
    plot_perplexity(rows, out / "extrapolation.png")
    by_model = {architecture: {row["length"]: row for row in rows if row["model"] == architecture} for architecture in configs}
    ppl_rows = [
        {"model": architecture, **{f"ppl@{format_length(n)}": f"{results[n]['ppl']:.2f}" for n in lengths},
         **{f"last-{seq_len} ppl@{format_length(n)}": f"{results[n]['last_chunk_ppl']:.2f}" for n in lengths[1:]}}
        for architecture, results in by_model.items()
    ]  # fmt: skip
    command = "python examples/reproduce_extrapolation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = "\n\n".join([
        "# Length extrapolation of equal-size models",
        f"Trained at T = {seq_len} tokens (sliding window {window}), {args.steps} steps of batch {args.batch_size}; "
        f"perplexity on held-out text at {', '.join(format_length(n) for n in lengths)} tokens "
        f"({args.num_samples} windows each, run through the cache in chunks of T). The columns `last-{seq_len}` "
        f"average only the last {seq_len} positions of each window, the ones farthest from the start. "
        f"The paper's claim to compare with: {PAPER_CLAIM}.",
        f"Command: `{command.strip()}`",
        f"Machine: {environment()}; total time {time.time() - started:.0f} s.",
        "## Models",
        format_table(parameter_rows, list(parameter_rows[0])),
        "## Perplexity",
        format_table(ppl_rows, list(ppl_rows[0])),
        "![perplexity against context length](extrapolation.png)",
    ])  # fmt: skip
    (out / "extrapolation.md").write_text(report + "\n", encoding="utf-8")
    print("\n" + report)
    print(f"\nwrote {out}/extrapolation.md, .csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
