"""Passkey fine-tuning, the Samba paper's recipe for long-context retrieval (arXiv 2406.07522): a
short fine-tune (500 steps) at a 4K sequence length on passkey-formatted data, then passkey
retrieval measured at lengths far beyond 4K (the paper reports perfect retrieval up to 256K).

Training samples are the evaluation's prompts (samba_hf.evaluation: filler text with the pass key
line at a random depth, then the question) followed by the answer; the loss is on the answer only.
The learning rate, schedule and batch size are this script's choices, not the paper's.

    # the paper's recipe, on a converted checkpoint and a GPU
    python examples/passkey_finetune.py MODEL_DIR --length 4096 --steps 500 --bf16 --gradient-checkpointing \\
        --eval-lengths 4k,16k,64k,128k,256k --depths 11 --trials 5 --output-dir samba-passkey

    # a smoke run on the CPU: a tiny random Samba with a tokenizer trained on stdlib docstrings
    python examples/passkey_finetune.py --steps 5 --length 256
"""

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from samba_hf import SambaForCausalLM
from samba_hf.demo import stdlib_corpus, tiny_config, train_tokenizer
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="model folder or Hub id (default: a tiny random Samba)")
    parser.add_argument("--length", type=int, default=4096, help="training sequence length (paper: 4096)")
    parser.add_argument("--steps", type=int, default=500, help="training steps (paper: 500)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--eval-lengths", help="passkey lengths after training (default: 1x, 4x and 16x --length)")
    parser.add_argument("--depths", type=int, default=5, help="evenly spaced pass key depths (default 5)")
    parser.add_argument("--trials", type=int, default=2, help="random keys per (length, depth) cell (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="samba-passkey", help="fine-tuned model, passkey.csv and passkey.png")
    args = parser.parse_args(argv)
    eval_lengths = parse_lengths(args.eval_lengths) if args.eval_lengths else [n * args.length for n in (1, 4, 16)]
    torch.manual_seed(args.seed)

    if args.model:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = tiny_samba()
    dataset = PasskeySamples(tokenizer, args.length, size=args.steps * args.batch_size, seed=args.seed)

    model.config.use_cache = False  # no cache while training; the evaluation asks for it explicitly
    with tempfile.TemporaryDirectory(prefix="passkey-finetune-") as trainer_dir:
        training_args = TrainingArguments(
            output_dir=trainer_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 20),
            max_grad_norm=1.0,
            bf16=args.bf16,
            activation_checkpointing=args.gradient_checkpointing,
            logging_steps=max(1, args.steps // 10),
            save_strategy="no",
            report_to=[],
            use_cpu=args.device == "cpu",
            dataloader_num_workers=0,
            seed=args.seed,
        )
        Trainer(model=model, args=training_args, train_dataset=dataset).train()
    model.config.use_cache = True

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    rows = evaluate_passkey(
        model.to(args.device).eval(), tokenizer, eval_lengths, depths, args.trials, chunk_size=args.length,
        seed=args.seed + 1, model_name=output_dir.name,  # other keys than in training
    )  # fmt: skip
    write_csv(rows, output_dir / "passkey.csv")
    plot_passkey(rows, output_dir / "passkey.png")
    print(format_table(rows, ["length", "depth", "accuracy", "trials"]))
    print(f"saved the fine-tuned model, passkey.csv and passkey.png to {output_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
