"""`samba-hf convert ...`: the converters of `samba_conversion` on the command line.

samba-hf convert lit-gpt CHECKPOINT OUTPUT_DIR [--num-heads N] [--num-kv-heads M] [--preset NAME] ...
samba-hf convert to-lit-gpt HF_DIR OUTPUT_FILE
samba-hf convert fla SOURCE OUTPUT_DIR [...]
samba-hf convert transformers SOURCE OUTPUT_DIR [...]
"""

import argparse

from .options import DTYPE_METAVAR, dtype_name, non_negative_float


def window(value: str) -> int | None:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError("the window must be >= 0 (0: full attention)")
    return number or None


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        type=dtype_name,
        metavar=DTYPE_METAVAR.replace("auto,", ""),
        help="dtype of the output weights (default: the source's; A_log and D stay float32)",
    )
    parser.add_argument("--tokenizer", dest="tokenizer_path", help="tokenizer folder to save with the model")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier samba-hf output in OUTPUT_DIR (other files there are kept)",
    )
    parser.add_argument(
        "--verify", action="store_true", help="compare the logits with an independent forward of the source"
    )
    parser.add_argument(
        "--tolerance",
        type=non_negative_float,
        help="max |Δlogits| allowed by --verify (default: 1e-4 "
        "for float32, 5e-2 for bfloat16, 1e-2 for float16, times max(1, max |logits|))",
    )


def add_head_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-heads", type=int, help="query heads of the attention layers")
    parser.add_argument("--num-kv-heads", type=int, help="key/value heads (grouped-query attention)")
    parser.add_argument(
        "--sliding-window", type=window, default=2048, help="attention window, the query included (0: full attention)"
    )


def add_parser(commands, formatter) -> None:
    convert = commands.add_parser(
        "convert", help="convert checkpoints to and from samba-hf", formatter_class=formatter
    )
    kinds = convert.add_subparsers(
        dest="convert_command", metavar="{lit-gpt,to-lit-gpt,fla,transformers}", required=True
    )

    lit_gpt = kinds.add_parser(
        "lit-gpt", help="a checkpoint of the reference code (microsoft/Samba)", formatter_class=formatter
    )
    lit_gpt.add_argument("checkpoint", help=".pth/.pt (training dict or state dict) or .safetensors")
    lit_gpt.add_argument("output_dir")
    add_head_options(lit_gpt)
    lit_gpt.add_argument("--preset", help="head counts of a named size: samba-421m, ... or Samba_421M, ...")
    add_output_options(lit_gpt)
    lit_gpt.set_defaults(run=run_lit_gpt)

    to_lit_gpt = kinds.add_parser(
        "to-lit-gpt", help="a samba-hf folder to a reference-code state dict", formatter_class=formatter
    )
    to_lit_gpt.add_argument("hf_dir")
    to_lit_gpt.add_argument("output", help="the .pth file to write")
    to_lit_gpt.add_argument("--force", action="store_true", help="replace an existing file")
    to_lit_gpt.set_defaults(run=run_to_lit_gpt)

    fla = kinds.add_parser(
        "fla", help="a flash-linear-attention Samba folder or state-dict file", formatter_class=formatter
    )
    fla.add_argument("source")
    fla.add_argument("output_dir")
    add_head_options(fla)
    add_output_options(fla)
    fla.set_defaults(run=run_fla)

    transformers = kinds.add_parser(
        "transformers", help="a transformers Mistral, Llama or Mamba folder", formatter_class=formatter
    )
    transformers.add_argument("source")
    transformers.add_argument("output_dir")
    add_output_options(transformers)
    transformers.set_defaults(run=run_transformers)


def output_options(args) -> dict:
    return {
        "dtype": args.dtype,
        "tokenizer_path": args.tokenizer_path,
        "force": args.force,
        "verify": args.verify,
        "tolerance": args.tolerance,
    }


def head_options(args) -> dict:
    return {"num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads, "sliding_window": args.sliding_window}


def run_lit_gpt(args) -> int:
    from samba_conversion import convert_lit_gpt

    output = convert_lit_gpt(
        args.checkpoint, args.output_dir, preset=args.preset, **head_options(args), **output_options(args)
    )
    print(f"wrote {output}")
    return 0


def run_to_lit_gpt(args) -> int:
    from samba_conversion import convert_to_lit_gpt

    print(f"wrote {convert_to_lit_gpt(args.hf_dir, args.output, force=args.force)}")
    return 0


def run_fla(args) -> int:
    from samba_conversion import convert_fla

    print(f"wrote {convert_fla(args.source, args.output_dir, **head_options(args), **output_options(args))}")
    return 0


def run_transformers(args) -> int:
    from samba_conversion import convert_transformers

    print(f"wrote {convert_transformers(args.source, args.output_dir, **output_options(args))}")
    return 0
