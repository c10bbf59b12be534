"""Publish a model folder on the Hugging Face Hub from Python (what `samba-hf push` does).

    python examples/push_to_hub.py samba-ft your-name/samba-ft --base-model your-name/samba-base --dry-run

The folder goes up as it is: its README.md (the model card) and every other file. A folder without a
card gets one rendered from its config (a LoRA adapter folder: from adapter_config.json), with the
base model, datasets and languages given here; a repository that has a card keeps it. Log in first
with `hf auth login` (or set HF_TOKEN).

A model in memory publishes the same way: `model.push_to_hub("your-name/samba-ft", base_model=...)`
saves it and uploads it with the same card.
"""

import argparse

from samba_hf.hub import plan_push, push_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by save_pretrained, samba-hf or PEFT")
    parser.add_argument("repo_id", help="your-name/model-name")
    parser.add_argument("--base-model", help="Hub id of the model this one was made from")
    parser.add_argument("--dataset", action="append", help="Hub id of a training dataset (repeat for several)")
    parser.add_argument("--training", help="the card's training section (Markdown)")
    parser.add_argument("--dry-run", action="store_true", help="print the files and the card; upload nothing")
    args = parser.parse_args(argv)

    card = {"base_model": args.base_model, "datasets": args.dataset, "training": args.training}
    if args.dry_run:
        plan = plan_push(args.folder, args.repo_id, **card)
        print("\n".join(plan.files))
        print(plan.card or "(the folder's own README.md, uploaded as it is)")
        return 0
    print(f"uploaded to {push_folder(args.folder, args.repo_id, **card)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
