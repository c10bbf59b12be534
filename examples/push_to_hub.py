"""Publish a Samba model folder on the Hugging Face Hub.

    python examples/push_to_hub.py samba-ft your-name/samba-ft --card-training "..." --dry-run

Builds a Hub-ready folder with `samba_hf.hub.save_hub_folder` (safetensors, config.json with
`auto_map`, the modeling code so that it loads with trust_remote_code=True, the tokenizer and a model
card), then uploads it with `huggingface_hub.HfApi().upload_folder`. --dry-run prints the files and
the card instead. Log in first with `hf auth login` (or set HF_TOKEN). The same as `samba-hf push`.
"""

import argparse
import sys

from samba_hf.publish import add_push_arguments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_push_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
