"""`samba-hf demo`: train a tiny Samba on the CPU, publish it as a Hub-ready folder, reload it, generate."""

from .options import add_device_option, positive_int, resolve_device


def add_parser(commands, formatter) -> None:
    parser = commands.add_parser(
        "demo", help="train a tiny Samba on the CPU, publish it, reload it and generate", formatter_class=formatter
    )
    parser.add_argument(
        "--steps", type=positive_int, default=300, help="training steps (300: about 3 minutes on 2 CPU cores)"
    )
    parser.add_argument("--output-dir", default="samba-demo", help="where the Hub-ready folder goes")
    add_device_option(parser)
    parser.add_argument("--force", action="store_true", help="replace the folder an earlier demo wrote there")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initialisation, the data order and the sample"
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..demo import run_demo

    device = resolve_device(args.device or "cpu")
    run_demo(output_dir=args.output_dir, steps=args.steps, device=device, force=args.force, seed=args.seed)
    return 0
