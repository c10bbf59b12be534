"""The `samba-hf` command."""

import argparse
import platform
import sys
import time
from contextlib import nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .conversion.cli import add_convert_parser
from .evaluation import add_eval_parser
from .publish import add_push_parser


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, steps=args.steps, device=args.device, force=args.force)
    return 0


def cmd_env(args) -> int:
    import torch

    from . import kernel_dispatch

    print(f"python          {platform.python_version()} ({platform.platform()})")
    for package in ("samba-hf", "torch", "transformers", "triton", "accelerate", "safetensors", "tokenizers",
                    "huggingface-hub", "peft", "datasets", "mamba-ssm", "causal-conv1d"):  # fmt: skip
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = "not installed"
        print(f"{package:<16}{installed}")
    print(f"cuda            {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    choice = kernel_dispatch.requested_implementation()
    for op, devices in kernel_dispatch.describe().items():
        print(f"{op} (SAMBA_KERNELS={choice}):")
        for device, implementation in devices.items():
            print(f"  {device:<6} tensors -> {implementation}")
    return 0


def read_prompt(args) -> str:
    if args.prompt_file:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    if args.prompt is None or args.prompt == "-":
        return sys.stdin.read()
    return args.prompt


def cmd_generate(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from .generation import cache_nbytes

    prompt = read_prompt(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(args.device)
    sampling = {"do_sample": False} if args.greedy else {
        "do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}  # fmt: skip
    launches = nullcontext()
    if args.static_cache:
        # The compiled step's kernels launch as programmatic dependents (on sm90 and later; samba_kernels'
        # one-row products follow the same switch): 10% less time per token on the H200 (benchmarks/generate.md).
        from torch._inductor import config as inductor_config

        launches = inductor_config.patch({"triton.enable_pdl": True})
    started = time.perf_counter()
    with launches:
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=TextStreamer(tokenizer, skip_prompt=not args.echo_prompt),
            return_dict_in_generate=True,
            cache_implementation="static" if args.static_cache else None,
            **sampling,
        )
    elapsed = time.perf_counter() - started
    new_tokens = output.sequences.shape[1] - inputs["input_ids"].shape[1]
    print(
        f"\n[{inputs['input_ids'].shape[1]} prompt tokens, {new_tokens} generated in {elapsed:.2f} s: "
        f"{new_tokens / elapsed:.1f} tokens/s; cache {cache_nbytes(output.cache) / 2**20:.2f} MiB]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samba-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a tiny Samba on the CPU, publish it, reload it and generate")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300, about 3 minutes on 2 CPU cores)")
    demo.add_argument("--output-dir", default="samba-demo", help="where the Hub-ready folder goes")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.add_argument("--force", action="store_true", help="replace an existing output folder")
    demo.set_defaults(func=cmd_demo)

    env = commands.add_parser("env", help="versions, and the implementation each Mamba op would use here")
    env.set_defaults(func=cmd_env)

    generate = commands.add_parser("generate", help="stream a continuation of a prompt")
    generate.add_argument("model", help="a model folder or Hub id")
    generate.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads standard input")
    generate.add_argument("--prompt-file", help="read the prompt from this file")
    generate.add_argument("--max-new-tokens", type=int, default=100)
    generate.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--echo-prompt", action="store_true", help="print the prompt before the continuation")
    generate.add_argument("--static-cache", action="store_true",
                          help="a static cache: on a GPU, generate compiles the decode step once (CUDA graphs), "
                          "faster per token after a compilation of about a minute")  # fmt: skip
    generate.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    generate.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    generate.set_defaults(func=cmd_generate)

    add_convert_parser(commands)
    add_eval_parser(commands)
    add_push_parser(commands)
    return parser


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"samba-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
