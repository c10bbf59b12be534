"""What the commands share: the help format, option types that refuse bad values with one line, and
loading a model or tokenizer with an error that says what is wrong."""

import argparse
import math
from pathlib import Path


class UsageError(Exception):
    """A mistake on the command line; the message says what to do instead."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except for flags and options without one."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def dtype_name(text: str) -> str:
    """A dtype name the one parser (samba_hf.dtypes) knows; kept as text for --help and the commands."""
    from ..dtypes import parse_dtype

    try:
        parse_dtype(text, allow_auto=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


DTYPE_METAVAR = "{auto,float32,bfloat16,float16,fp32,bf16,fp16}"


def add_dtype_option(parser, default="auto", help="dtype to load the weights in; auto: the checkpoint's") -> None:
    parser.add_argument("--dtype", type=dtype_name, default=default, metavar=DTYPE_METAVAR, help=help)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_option(parser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")


def resolve_device(name: str | None) -> str:
    """The device to run on; a CUDA device where there is none is a user error, not a traceback."""
    import torch

    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return name


def check_model_path(name: str) -> None:
    """A name that is a path on this machine must be a model folder; anything else is left to the Hub."""
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if not looks_local:
        return
    if not path.is_dir():
        raise UsageError(f"{name} is not a model folder (it does not exist or is a file).")
    if not (path / "config.json").is_file():
        raise UsageError(f"{name} has no config.json: give a folder written by save_pretrained or samba-hf.")


def _not_loaded(name: str, what: str, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name).expanduser().is_dir():
        return f"cannot load a {what} from the folder {name}: {reason}"
    return f"{name} is not a folder here, and loading a {what} of that name from the Hub failed: {reason}"


def load_tokenizer(name: str, **kwargs):
    from transformers import AutoTokenizer

    check_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(_not_loaded(name, "tokenizer", error)) from None


def load_causal_lm(name: str, *, dtype: str, device: str, **kwargs):
    """AutoModelForCausalLM from a folder or Hub id, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    from ..dtypes import parse_dtype

    check_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=parse_dtype(dtype, allow_auto=True), **kwargs)
    except OSError as error:
        raise UsageError(_not_loaded(name, "model", error)) from None
    return model.to(device).eval()
