"""`samba-hf convert ...`: the converters on the command line.

    samba-hf convert lit-gpt CHECKPOINT OUTPUT_DIR [--num-heads N] [--num-kv-heads M] [--preset NAME] ...
    samba-hf convert to-lit-gpt HF_DIR OUTPUT
    samba-hf convert fla SOURCE OUTPUT_DIR [...]
    samba-hf convert transformers SOURCE OUTPUT_DIR [...]

Exit codes: 0 success, 1 `--verify` found the logits too far apart, 2 a user error (one line on
stderr saying what is wrong and how to fix it).
"""

import argparse
import sys

from .core import DTYPES, ConversionError, VerificationError
from .fla import convert_fla
from .from_transformers import convert_transformers
from .lit_gpt import convert_lit_gpt, convert_to_lit_gpt


def window(value: str) -> int | None:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("the window must be >= 0 (0: full attention)")
    return number or None


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of the output weights (default: the source's; A_log, D: fp32)"
    )
    parser.add_argument("--tokenizer", dest="tokenizer_path", help="tokenizer folder to save with the model")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--verify", action="store_true", help="compare the logits with an independent forward of the source"
    )
    parser.add_argument("--tolerance", type=float, help="max |Δlogits| allowed by --verify (default: 1e-4 for fp32, "
                        "5e-2 for bf16, 1e-2 for fp16, times max(1, max |logits|))")  # fmt: skip


def add_head_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-heads", type=int, help="query heads of the attention layers")
    parser.add_argument("--num-kv-heads", type=int, help="key/value heads (grouped-query attention)")
    parser.add_argument("--sliding-window", type=window, default=2048,
                        help="attention window, the query included (default 2048; 0: full attention)")  # fmt: skip


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register `convert` and its sub-commands on an argparse subparsers object."""
    convert = subparsers.add_parser("convert", help="convert checkpoints to and from samba-hf")
    convert.set_defaults(func=lambda args: usage(convert))
    commands = convert.add_subparsers(dest="convert_command", metavar="{lit-gpt,to-lit-gpt,fla,transformers}")

    lit_gpt = commands.add_parser("lit-gpt", help="a checkpoint of the reference code (microsoft/Samba)")
    lit_gpt.add_argument("checkpoint", help=".pth/.pt (training dict or state dict) or .safetensors")
    lit_gpt.add_argument("output_dir")
    add_head_options(lit_gpt)
    lit_gpt.add_argument("--preset", help="head counts of a named size: samba-421m, ... or Samba_421M, ...")
    add_output_options(lit_gpt)
    lit_gpt.set_defaults(func=run_lit_gpt)

    to_lit_gpt = commands.add_parser("to-lit-gpt", help="a samba-hf folder to a reference-code state dict")
    to_lit_gpt.add_argument("hf_dir")
    to_lit_gpt.add_argument("output", help="the .pth file to write")
    to_lit_gpt.add_argument("--force", action="store_true", help="replace an existing file")
    to_lit_gpt.set_defaults(func=run_to_lit_gpt)

    fla = commands.add_parser("fla", help="a flash-linear-attention Samba folder or state-dict file")
    fla.add_argument("source")
    fla.add_argument("output_dir")
    add_head_options(fla)
    add_output_options(fla)
    fla.set_defaults(func=run_fla)

    transformers = commands.add_parser("transformers", help="a transformers Mistral, Llama or Mamba folder")
    transformers.add_argument("source")
    transformers.add_argument("output_dir")
    add_output_options(transformers)
    transformers.set_defaults(func=run_transformers)
    return convert


def usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def output_options(args) -> dict:
    return {
        "dtype": args.dtype,
        "tokenizer_path": args.tokenizer_path,
        "force": args.force,
        "verify": args.verify,
        "tolerance": args.tolerance,
    }


def run(convert, *args, **kwargs) -> int:
    """Call a converter and turn its errors into exit codes."""
    try:
        output = convert(*args, **kwargs)
    except VerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


def run_lit_gpt(args) -> int:
    heads = {"num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads, "sliding_window": args.sliding_window}
    return run(convert_lit_gpt, args.checkpoint, args.output_dir, preset=args.preset, **heads, **output_options(args))


def run_to_lit_gpt(args) -> int:
    return run(convert_to_lit_gpt, args.hf_dir, args.output, force=args.force)


def run_fla(args) -> int:
    heads = {"num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads, "sliding_window": args.sliding_window}
    return run(convert_fla, args.source, args.output_dir, **heads, **output_options(args))


def run_transformers(args) -> int:
    return run(convert_transformers, args.source, args.output_dir, **output_options(args))
