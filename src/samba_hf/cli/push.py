"""`samba-hf push`: upload a saved model or LoRA adapter folder to the Hub, as it is.

The folder's own README.md (its model card) and every other file go up unchanged. A folder without
a card gets one rendered from its config (or adapter_config.json), unless the repository already
has one; the card samba-hf wrote into a folder gets the repository id in its usage code.
"""

from ..hub import CARD_DEFAULTS

# --card-SECTION options for a rendered card.
CARD_SECTIONS = list(CARD_DEFAULTS)


def add_parser(commands, formatter) -> None:
    parser = commands.add_parser(
        "push", help="upload a model or adapter folder to the Hugging Face Hub, as it is", formatter_class=formatter
    )
    add_push_arguments(parser)


def add_push_arguments(parser) -> None:
    """The options of `samba-hf push` (examples/push_to_hub.py shows the same from Python)."""
    parser.add_argument("model_dir", help="a folder written by save_pretrained, samba-hf or PEFT (a LoRA adapter)")
    parser.add_argument("repo_id", help="the Hub repository, e.g. your-name/samba-421m")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="print the files and the card; upload nothing")
    parser.add_argument("--commit-message", default="Upload with samba-hf")
    card = parser.add_argument_group("model card, where the folder has none")
    card.add_argument("--model-name", help="title of the card (default: the repository name)")
    card.add_argument("--base-model", help="Hub id of the model this one was made from")
    card.add_argument(
        "--dataset", action="append", dest="datasets", metavar="HUB_ID", help="a training dataset (repeat for several)"
    )
    card.add_argument(
        "--language",
        action="append",
        metavar="CODE",
        help="a language of the training data, e.g. en (repeat for several)",
    )
    for section in CARD_SECTIONS:
        card.add_argument(
            f"--card-{section.replace('_', '-')}",
            dest=f"card_{section}",
            metavar="TEXT",
            help=f"the card's {section.replace('_', ' ')} (Markdown)",
        )
    parser.set_defaults(run=run)


def run(args) -> int:
    from huggingface_hub import HfApi

    from ..hub import plan_push, upload

    card = {section: getattr(args, f"card_{section}") for section in CARD_SECTIONS if getattr(args, f"card_{section}")}
    card.update(model_name=args.model_name, base_model=args.base_model, datasets=args.datasets, language=args.language)
    plan = plan_push(args.model_dir, args.repo_id, **card)
    print(f"{'Would upload' if args.dry_run else 'Uploading'} {len(plan.files)} files to {args.repo_id}:")
    for name in plan.files:
        print(f"  {name}  ({(plan.folder / name).stat().st_size:,} bytes)")
    if not any(name.startswith("tokenizer") for name in plan.files):
        print(f"note: {args.model_dir} has no tokenizer; the repository will have none")
    if plan.card is None:
        print("README.md: the folder's own model card, uploaded as it is")
    elif plan.card_origin == "rendered":
        print("README.md: rendered below (the folder has none); a card the repository already has is kept")
    else:
        print("README.md: the card samba-hf wrote, with the repository id filled in")
    if args.dry_run:
        if plan.card is not None:
            print("\n----- README.md (model card) -----\n")
            print(plan.card)
        return 0
    url = upload(plan, HfApi(), private=args.private or None, commit_message=args.commit_message)
    print(f"uploaded to {url}")
    return 0
