"""`samba-hf generate`: stream a continuation of a prompt, then report the timing and the cache size.

Decoding follows the model's generation_config (greedy or sampling, temperature, ...) unless an
option says otherwise; on a GPU it runs the decode engine (CUDA graphs) unless --no-decode-engine. The
report gives the time to the first new token and the decoding rate after it, and where the engine ran,
its one-time cost of capturing the step's graph.
"""

import sys
import time
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


def add_parser(commands, formatter) -> None:
    parser = commands.add_parser("generate", help="stream a continuation of a prompt", formatter_class=formatter)
    parser.add_argument("model", help="a model folder or Hub id")
    parser.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads standard input")
    parser.add_argument("--prompt-file", help="read the prompt from this file (UTF-8)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to generate at most")
    strategy = parser.add_mutually_exclusive_group()
    strategy.add_argument("--greedy", action="store_true", help="greedy decoding, whatever the generation_config says")
    strategy.add_argument("--do-sample", action="store_true", help="sampling, whatever the generation_config says")
    parser.add_argument("--temperature", type=float, help="sampling temperature (implies --do-sample)")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (implies --do-sample)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold (implies --do-sample)")
    parser.add_argument("--seed", type=int, help="seed the sampling, for a reproducible output")
    parser.add_argument("--echo-prompt", action="store_true", help="print the prompt before the continuation")
    parser.add_argument(
        "--no-decode-engine",
        action="store_true",
        help="decode with transformers' loop rather than the decode engine (CUDA graphs, on a GPU)",
    )
    add_device_option(parser)
    add_dtype_option(parser)
    parser.set_defaults(run=run)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(
            f"{where} is not valid UTF-8 (byte {data[error.start]:#04x} at offset {error.start})."
        ) from None


def read_prompt(args) -> str:
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt-file {path} is not a file.")
        prompt = _decode(path.read_bytes(), str(path))
    elif args.prompt is None or args.prompt == "-":
        stdin = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else None
        prompt = _decode(stdin.read(), "standard input") if stdin is not None else sys.stdin.read()
    else:
        prompt = args.prompt
    if not prompt.strip():
        raise UsageError("the prompt is empty; give it as an argument, with --prompt-file, or on standard input.")
    return prompt


def decoding_options(args) -> dict:
    """Only what the command line sets; generate takes the rest from the model's generation_config."""
    options = {
        name: getattr(args, name) for name in ("temperature", "top_k", "top_p") if getattr(args, name) is not None
    }
    if args.greedy:
        if options:
            raise UsageError(
                f"--greedy cannot be combined with {', '.join('--' + n.replace('_', '-') for n in options)}."
            )
        return {"do_sample": False}
    if args.do_sample or options:
        options["do_sample"] = True
    return options


def timing_streamer(tokenizer, skip_prompt: bool):
    """A TextStreamer that notes when the first new token arrives (its first `put` is the prompt)."""
    from transformers import TextStreamer

    class TimingStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
            self.puts, self.first_token_at = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.first_token_at = time.perf_counter()
            super().put(value)

    return TimingStreamer()


def report(
    prompt_tokens: int,
    new_tokens: int,
    started: float,
    first_token_at,
    finished: float,
    engine_stats,
    cache_mib: float,
) -> str:
    parts = [f"{prompt_tokens} prompt tokens, {new_tokens} generated in {finished - started:.2f} s"]
    if first_token_at is not None:
        parts.append(f"first token after {first_token_at - started:.3f} s")
        rate = (new_tokens - 1) / (finished - first_token_at) if new_tokens > 1 and finished > first_token_at else None
        parts.append(f"then {rate:.1f} tokens/s" if rate else f"{new_tokens / (finished - started):.1f} tokens/s")
    if engine_stats is not None:
        parts.append(
            f"decode engine, kernels compiled ahead {engine_stats.compile_s:.3f} s and graph capture "
            f"{engine_stats.capture_s:.3f} s (once per batch size)"
        )
    parts.append(f"cache {cache_mib:.2f} MiB")
    return "[" + "; ".join(parts) + "]"


def run(args) -> int:
    from transformers import set_seed

    from ..generation import cache_nbytes, decode_engine

    prompt = read_prompt(args)
    options = decoding_options(args)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=args.dtype, device=device)
    if args.seed is not None:
        set_seed(args.seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    engine = decode_engine(model)
    engine.stats = None  # set again only if this call runs on the engine
    streamer = timing_streamer(tokenizer, skip_prompt=not args.echo_prompt)
    started = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        streamer=streamer,
        return_dict_in_generate=True,
        decode_engine=not args.no_decode_engine,
        **options,
    )
    finished = time.perf_counter()
    prompt_tokens = inputs["input_ids"].shape[1]
    new_tokens = output.sequences.shape[1] - prompt_tokens
    cache_mib = cache_nbytes(output.cache) / 2**20
    print(
        "\n" + report(prompt_tokens, new_tokens, started, streamer.first_token_at, finished, engine.stats, cache_mib),
        file=sys.stderr,
    )
    return 0
