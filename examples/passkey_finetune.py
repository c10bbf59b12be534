"""Passkey fine-tuning, the Samba paper's recipe for long-context retrieval (arXiv 2406.07522): a
short fine-tune (500 steps) at a 4K sequence length on passkey-formatted data, then passkey
retrieval measured at lengths far beyond 4K (the paper reports perfect retrieval up to 256K).

Training samples are the evaluation's prompts (samba_hf.evaluation: filler text with the pass key
line at a random depth, then the question) followed by the answer; the loss is on the answer only.
The learning rate, schedule and batch size are this script's choices, not the paper's.

    # the paper's recipe, on a converted checkpoint and a GPU
    python examples/passkey_finetune.py --model MODEL_DIR --length 4096 --max-steps 500 --bf16 \\
        --activation-checkpointing --eval-lengths 4k,16k,64k,128k,256k --depths 11 --trials 5 \\
        --output-dir samba-passkey

    # a smoke run on the CPU: a tiny random Samba with a tokenizer trained on stdlib docstrings
    python examples/passkey_finetune.py --max-steps 5 --length 256

Every option of transformers' TrainingArguments works (--learning-rate, --optim, --save-steps,
--report-to, --push-to-hub, ...), beside this script's own.
"""

import argparse
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments

from samba_hf import SambaForCausalLM
from samba_hf.data import stdlib_corpus, train_tokenizer
from samba_hf.demo import tiny_config
from samba_hf.evaluation import (
    build_passkey_prompt,
    evaluate_passkey,
    format_table,
    parse_lengths,
    plot_passkey,
    write_csv,
)


class PasskeySamples(torch.utils.data.Dataset):
    """`size` passkey prompts of at most `length` tokens with their answers, right-padded to `length`.
    Sample i depends only on (seed, i), so every epoch and every run sees the same data."""

    def __init__(self, tokenizer, length: int, size: int, seed: int = 0):
        self.tokenizer, self.length, self.size, self.seed = tokenizer, length, size, seed
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = random.Random(f"{self.seed}-{index}")
        key = str(rng.randint(10000, 99999))
        answer = self.tokenizer(f" {key}.", add_special_tokens=False)["input_ids"]
        prompt = build_passkey_prompt(self.tokenizer, self.length - len(answer), rng.random(), key).input_ids
        padding = self.length - len(prompt) - len(answer)
        return {
            "input_ids": torch.tensor(prompt + answer + [self.pad_token_id] * padding),
            "attention_mask": torch.tensor([1] * (len(prompt) + len(answer)) + [0] * padding),
            "labels": torch.tensor([-100] * len(prompt) + answer + [-100] * padding),
        }


def tiny_samba():
    """A random tiny Samba and a BPE tokenizer trained on the standard library's docstrings."""
    tokenizer = train_tokenizer(stdlib_corpus(), vocab_size=2048)
    return SambaForCausalLM(tiny_config(tokenizer)), tokenizer


@dataclass
class ScriptArguments:
    model: str | None = field(default=None, metadata={"help": "model folder or Hub id (default: a tiny random Samba)"})
    length: int = field(default=4096, metadata={"help": "training sequence length (paper: 4096)"})
    eval_lengths: str | None = field(
        default=None, metadata={"help": "passkey lengths after training (default: 1x, 4x and 16x --length)"}
    )
    depths: int = field(default=5, metadata={"help": "evenly spaced pass key depths"})
    trials: int = field(default=2, metadata={"help": "random keys per (length, depth) cell"})


# The paper's 500 steps; the rest are this script's choices where they differ from TrainingArguments'.
TRAINING_DEFAULTS = dict(
    output_dir="samba-passkey",
    max_steps=500,
    per_device_train_batch_size=4,
    learning_rate=2e-5,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,
    max_grad_norm=1.0,
    logging_steps=50,
    save_strategy="no",
    seed=0,
)


def main(argv=None) -> int:
    parser = HfArgumentParser(
        (ScriptArguments, TrainingArguments), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(**TRAINING_DEFAULTS, dataloader_pin_memory=torch.cuda.is_available())
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    eval_lengths = parse_lengths(args.eval_lengths) if args.eval_lengths else [n * args.length for n in (1, 4, 16)]
    torch.manual_seed(training_args.seed)

    if args.model:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = tiny_samba()
    size = (
        training_args.max_steps * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    )
    dataset = PasskeySamples(tokenizer, args.length, size=size, seed=training_args.seed)

    model.config.use_cache = False  # no cache while training; the evaluation asks for it explicitly
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    model.config.use_cache = True

    output_dir = Path(training_args.output_dir)
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    rows = evaluate_passkey(
        model.eval(),
        tokenizer,
        eval_lengths,
        depths,
        args.trials,
        chunk_size=args.length,
        seed=training_args.seed + 1,
        model_name=output_dir.name,  # other keys than in training
    )
    write_csv(rows, output_dir / "passkey.csv")
    try:
        plot_passkey(rows, output_dir / "passkey.png")
    except ImportError as error:
        print(f"no plot: {error}")
    print(format_table(rows, ["length", "depth", "accuracy", "trials"]))
    print(f"saved the fine-tuned model and passkey.csv to {output_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
