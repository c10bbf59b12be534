"""`samba-hf eval ppl` / `eval passkey`: the long-context evaluations of samba_hf.evaluation.

Each prints a line as each length (or cell) finishes and rewrites its CSV then, so an interrupted run
keeps what it measured; the plot is drawn at the end when matplotlib is installed.
"""

import sys
from pathlib import Path

from .options import (
    UsageError,
    add_device_option,
    add_dtype_option,
    load_causal_lm,
    load_tokenizer,
    positive_int,
    resolve_device,
)


def add_common_options(parser, lengths: str, output_dir: str) -> None:
    parser.add_argument("model", help="a model folder or Hub id (any AutoModelForCausalLM)")
    parser.add_argument("--lengths", default=lengths, help="comma-separated context lengths, 4k = 4096")
    parser.add_argument("--chunk-size", type=positive_int, default=4096, help="tokens per forward through the cache")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")
    add_device_option(parser)
    add_dtype_option(parser)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow modeling code shipped with the model")
    parser.add_argument("--output-dir", default=output_dir, help="folder for the CSV and the plot")


def add_parser(commands, formatter) -> None:
    evaluate = commands.add_parser(
        "eval", help="long-context evaluation: perplexity vs length, passkey retrieval", formatter_class=formatter
    )
    kinds = evaluate.add_subparsers(dest="eval_command", metavar="{ppl,passkey}", required=True)

    ppl = kinds.add_parser(
        "ppl", help="perplexity against context length, through the cache in chunks", formatter_class=formatter
    )
    add_common_options(ppl, lengths="4k,8k,16k", output_dir="eval-ppl")
    ppl.add_argument("--data", required=True, help="a text file, or a folder of .txt files")
    ppl.add_argument("--num-samples", type=positive_int, default=16, help="windows per length")
    ppl.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward")
    ppl.set_defaults(run=run_ppl)

    passkey = kinds.add_parser(
        "passkey", help="passkey retrieval grid over context lengths and depths", formatter_class=formatter
    )
    add_common_options(passkey, lengths="4k,8k,16k,32k,64k,128k,256k", output_dir="eval-passkey")
    passkey.add_argument(
        "--depths",
        type=positive_int,
        default=11,
        help="evenly spaced depths of the key from 0%% to 100%% (1: the middle only)",
    )
    passkey.add_argument("--trials", type=positive_int, default=5, help="random keys per cell")
    passkey.add_argument("--max-new-tokens", type=positive_int, default=10, help="greedy tokens to read the key from")
    passkey.add_argument("--seed", type=int, default=0)
    passkey.set_defaults(run=run_passkey)


def load(args):
    kwargs = {"trust_remote_code": args.trust_remote_code}
    tokenizer = load_tokenizer(args.tokenizer or args.model, **kwargs)
    return load_causal_lm(args.model, dtype=args.dtype, device=resolve_device(args.device), **kwargs), tokenizer


def parse_lengths(text: str) -> list[int]:
    from ..evaluation import parse_lengths as parse

    try:
        return parse(text)
    except ValueError as error:
        raise UsageError(f"--lengths: {error}") from None


def model_label(model_path: str) -> str:
    return Path(model_path).name or model_path


class Results:
    """Rows as they come: a line on the terminal and the whole CSV rewritten for each."""

    def __init__(self, path: Path, describe):
        self.path, self.describe, self.rows = path, describe, []

    def __call__(self, row: dict) -> None:
        from ..evaluation import write_csv

        self.rows.append(row)
        write_csv(self.rows, self.path)
        print(self.describe(row), flush=True)


def plot_and_report(plot, results: Results, path: Path) -> None:
    try:
        plot(results.rows, path)
    except ImportError as error:  # the numbers are in the CSV and the table above
        print(f"wrote {results.path}; no plot: {error}, then run the command again")
    else:
        print(f"wrote {results.path} and {path}")


def run_ppl(args) -> int:
    import torch

    from ..data import read_documents, token_stream
    from ..evaluation import chunking_error, evaluate_perplexity, format_length, format_table, plot_perplexity

    lengths = parse_lengths(args.lengths)
    if not Path(args.data).exists():
        raise UsageError(f"--data {args.data} does not exist.")
    model, tokenizer = load(args)
    stream = token_stream(read_documents(args.data), tokenizer)
    print(f"data: {len(stream):,} tokens from {args.data}")

    # A few hundred tokens across one chunk boundary show whether the model continues from its cache exactly.
    probe = min(len(stream), 2 * min(args.chunk_size, 128))
    error = chunking_error(model, stream[None, :probe].to(model.device), chunk_size=probe // 2)
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2
    if error > tolerance:
        print(
            f"warning: a chunked forward differs from a single forward by {error:.2e} in the logits: this model "
            "does not continue exactly from its cache, so set --chunk-size to at least the longest length.",
            file=sys.stderr,
        )

    output_dir = Path(args.output_dir)
    results = Results(
        output_dir / "perplexity.csv",
        lambda row: (
            f"{format_length(row['length'])}: perplexity {row['ppl']} (last chunk {row['last_chunk_ppl']}) over "
            f"{row['windows']} windows, {row['seconds']} s"
        ),
    )
    evaluate_perplexity(
        model,
        stream,
        lengths,
        args.chunk_size,
        args.num_samples,
        args.batch_size,
        model_label(args.model),
        on_row=results,
    )
    print(format_table(results.rows, ["length", "windows", "ppl", "last_chunk_ppl", "cache_mib", "seconds"]))
    plot_and_report(plot_perplexity, results, output_dir / "perplexity.png")
    return 0


def run_passkey(args) -> int:
    from ..evaluation import evaluate_passkey, format_length, format_table, plot_passkey

    lengths = parse_lengths(args.lengths)
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    model, tokenizer = load(args)
    output_dir = Path(args.output_dir)
    results = Results(
        output_dir / "passkey.csv",
        lambda row: (
            f"{format_length(row['length'])}, depth {row['depth']:.0%}: {row['accuracy']:.0%} of {row['trials']} keys"
        ),
    )
    evaluate_passkey(
        model,
        tokenizer,
        lengths,
        depths,
        args.trials,
        args.chunk_size,
        args.max_new_tokens,
        args.seed,
        model_label(args.model),
        on_row=results,
    )
    summary = [
        {"length": length, "accuracy": round(sum(r["accuracy"] for r in cells) / len(cells), 3)}
        for length in lengths
        for cells in [[r for r in results.rows if r["length"] == length]]
    ]
    print(format_table(summary, ["length", "accuracy"]))
    plot_and_report(plot_passkey, results, output_dir / "passkey.png")
    return 0
