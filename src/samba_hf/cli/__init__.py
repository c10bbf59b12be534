"""The `samba-hf` command: train a demo, generate, convert checkpoints, evaluate, publish, serve.

Every command follows one exit-code rule:

    0    success
    1    a check failed: `convert --verify` found the converted logits too far from the source's
    2    a user error: a bad option, a missing model, an output path that cannot be written safely
         (one line on stderr saying what is wrong and what to do)
    3    a corrupt or truncated checkpoint file (one line on stderr naming it)
    130  interrupted (Ctrl-C); 143 terminated (SIGTERM). Partial output is removed either way.
"""

import signal
import sys
import threading

from .. import __version__
from . import convert, demo, env, evaluate, generate, push, serve
from .options import HelpFormatter, UsageError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_CORRUPT_FILE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

COMMANDS = (demo, env, generate, convert, evaluate, push, serve)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that `with` blocks remove their partial output (as
    Ctrl-C's KeyboardInterrupt does); a BaseException, so that `except Exception` does not catch it."""


def _raise_terminated(signum, frame):
    raise Terminated()


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="samba-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"samba-hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands, HelpFormatter)
    return parser


def exit_code(error: BaseException) -> int | None:
    """The exit code of an error the user can act on from its message alone; None for a bug."""
    from safetensors import SafetensorError

    from samba_conversion import ConversionError, CorruptCheckpointError, VerificationError

    from ..staging import OutputPathError

    if isinstance(error, VerificationError):
        return EXIT_CHECK_FAILED
    if isinstance(error, (CorruptCheckpointError, SafetensorError)):
        return EXIT_CORRUPT_FILE
    if isinstance(
        error, (UsageError, ConversionError, OutputPathError, FileExistsError, FileNotFoundError, ValueError)
    ):
        return EXIT_USAGE
    return None


def main(argv=None) -> int:
    parser = build_parser()
    args, passed_on = parser.parse_known_args(argv)
    if passed_on and not getattr(args, "passes_unknown_options", False):
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    args.passed_on = passed_on
    name = " ".join(["samba-hf", args.command] + [getattr(args, f"{args.command}_command", None) or ""]).strip()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as error:
        code = exit_code(error)
        if code is None:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{name}: error: {message}", file=sys.stderr)
        return code
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_CORRUPT_FILE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "build_parser",
    "main",
]
