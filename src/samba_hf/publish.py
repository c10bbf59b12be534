"""`samba-hf push`: publish a model folder to the Hugging Face Hub as a Hub-ready folder (weights,
config with `auto_map`, the modeling code, tokenizer and a rendered model card)."""

import argparse
import tempfile
from pathlib import Path

from .hub import CARD_DEFAULTS, save_hub_folder

# --card-SECTION options; repo_id comes from REPO_ID itself.
CARD_OPTIONS = [section for section in CARD_DEFAULTS if section != "repo_id"]


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `samba-hf push`, shared with examples/push_to_hub.py."""
    parser.add_argument("model_dir", help="a folder written by save_pretrained or save_hub_folder")
    parser.add_argument("repo_id", help="the Hub repository, e.g. your-name/samba-421m")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="print the files and the model card; upload nothing")
    parser.add_argument("--model-name", help="title of the model card (default: the repository name)")
    parser.add_argument("--commit-message", default="Upload Samba model with samba-hf")
    for section in CARD_OPTIONS:
        parser.add_argument(
            f"--card-{section.replace('_', '-')}",
            dest=f"card_{section}",
            metavar="TEXT",
            help=f"model card: {section.replace('_', ' ')} (Markdown)",
        )
    parser.set_defaults(func=push)


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    """Register `push` on the `samba-hf` command's subparsers."""
    parser = subparsers.add_parser("push", help="upload a model folder to the Hugging Face Hub, with code and card")
    add_push_arguments(parser)
    return parser


def push(args) -> int:
    """Build the Hub-ready folder in a temporary directory, then print it (--dry-run) or upload it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # imported here to keep `samba-hf --help` fast

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: give a folder written by save_pretrained")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    has_tokenizer = (model_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if has_tokenizer else None
    card_sections = {
        section: getattr(args, f"card_{section}") for section in CARD_OPTIONS if getattr(args, f"card_{section}")
    }

    with tempfile.TemporaryDirectory(prefix="samba-hf-push-") as staging:
        folder = save_hub_folder(
            model,
            Path(staging) / "hub",
            tokenizer=tokenizer,
            model_name=args.model_name or args.repo_id.split("/")[-1],
            repo_id=args.repo_id,
            **card_sections,
        )
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        print(f"{'Would upload' if args.dry_run else 'Uploading'} {len(files)} files to {args.repo_id}:")
        for path in files:
            print(f"  {path.relative_to(folder).as_posix()}  ({path.stat().st_size:,} bytes)")
        if not has_tokenizer:
            print(f"note: {model_dir} has no tokenizer; the repository will have none")
        if args.dry_run:
            print("\n----- README.md (model card) -----\n")
            print((folder / "README.md").read_text(encoding="utf-8"))
            return 0

        from huggingface_hub import HfApi

        api = HfApi()
        repo_url = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=args.repo_id, folder_path=folder, repo_type="model", commit_message=args.commit_message
        )
    print(f"uploaded to {repo_url}")
    return 0


__all__ = ["add_push_arguments", "add_push_parser", "push"]
