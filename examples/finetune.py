"""Full fine-tuning of a Samba model on local text files with transformers' Trainer.

    python examples/finetune.py --model samba-tiny --train-file notes.txt --output-dir samba-ft

Every parameter is trained: bf16 mixed precision on a GPU, float32 on the CPU. The text files are read
with `datasets` (one document per paragraph by default). Without `--packed`, documents are joined
with EOS and cut into blocks of `--block-size` tokens; with `--packed`, each document stays whole
(split only when longer than a block) and transformers' DataCollatorWithFlattening concatenates a
batch into one row whose position_ids restart at 0 for each document: no padding, and neither
attention nor the Mamba state crosses from one document into the next.
"""

import argparse
import math
from itertools import chain
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithFlattening,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import get_last_checkpoint

import samba_hf  # noqa: F401  (registers Samba with the Auto classes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (with its tokenizer) or Hub id")
    parser.add_argument("--train-file", nargs="+", required=True, help="text files to train on")
    parser.add_argument("--eval-file", nargs="+", help="text files to evaluate on (default: hold out --eval-fraction)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="documents held out without --eval-file")
    parser.add_argument("--sample-by", choices=["line", "paragraph", "document"], default="paragraph",
                        help="what one document of a text file is (datasets' text loader)")  # fmt: skip
    parser.add_argument("--output-dir", required=True, help="checkpoints and the final model go here")
    parser.add_argument("--block-size", type=int, default=1024,
                        help="tokens per training row (per document with --packed)")  # fmt: skip
    parser.add_argument("--packed", action="store_true",
                        help="padding-free batches of whole documents (DataCollatorWithFlattening)")  # fmt: skip
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each layer's activations in the backward (less memory, ~30%% more compute)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="rows (documents with --packed) per device and step")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--save-steps", type=int, default=500, help="checkpoint every this many steps")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--resume-from-checkpoint", nargs="?", const="last", metavar="PATH",
                        help="continue from this checkpoint folder; alone, from the last in --output-dir")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def tokenize_documents(dataset, tokenizer, block_size: int, packed: bool):
    """Token ids of each document ended by EOS (as in Samba's pre-training data). Packed: documents
    split into pieces of at most `block_size`; otherwise concatenated and cut into full blocks."""

    def tokenize(batch):
        documents = [ids + [tokenizer.eos_token_id] for ids in tokenizer(batch["text"])["input_ids"]]
        if packed:
            pieces = [ids[i : i + block_size] for ids in documents for i in range(0, len(ids), block_size)]
            return {"input_ids": [piece for piece in pieces if len(piece) > 1]}  # one token predicts nothing
        stream = list(chain.from_iterable(documents))
        blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
        return {"input_ids": blocks, "labels": blocks}

    dataset = dataset.filter(lambda row: row["text"].strip() != "")
    return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenizing")


def load_splits(args, tokenizer):
    data_files = {"train": args.train_file, **({"eval": args.eval_file} if args.eval_file else {})}
    raw = load_dataset("text", data_files=data_files, sample_by=args.sample_by)
    if "eval" not in raw:
        held_out = raw["train"].train_test_split(test_size=args.eval_fraction, seed=args.seed)
        raw = {"train": held_out["train"], "eval": held_out["test"]}
    splits = {name: tokenize_documents(split, tokenizer, args.block_size, args.packed) for name, split in raw.items()}
    for name, split in splits.items():
        if len(split) == 0:
            raise ValueError(
                f"the {name} split has no block of {args.block_size} tokens; give more text or a smaller --block-size"
            )
    return splits["train"], splits["eval"]


def resolve_checkpoint(args) -> str | None:
    if args.resume_from_checkpoint != "last":
        return args.resume_from_checkpoint
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if last is None:
        raise FileNotFoundError(f"--resume-from-checkpoint: no checkpoint-* folder in {args.output_dir}")
    return last


def save_model(trainer: Trainer, output_dir: str) -> None:
    """trainer.save_model, with a fix for FSDP2: there Trainer would write no weights for a sharded state
    dict, and save_pretrained would take the model's class (swapped by FSDP2 for a subclass defined in
    torch) for its remote code, copying torch's files and writing a broken auto_map."""
    if not trainer.is_fsdp_enabled:
        trainer.save_model(output_dir)
        return
    # Checkpoints stay sharded (fast, resumable); the final model is gathered whole, a collective on every process.
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        with torch.device("meta"):  # the model's own class, for its config and code; the weights are state_dict
            unwrapped = AutoModelForCausalLM.from_config(trainer.model.config)
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        trainer.processing_class.save_pretrained(output_dir)


def main(argv=None) -> dict:
    """Train, evaluate and save; returns the metrics (eval_loss, eval_perplexity, train_loss, ...)."""
    args = parse_args(argv)
    checkpoint = resolve_checkpoint(args)  # fail before loading anything
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # float32 master weights in both cases: on a GPU, bf16 autocast does the arithmetic.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False  # the cache serves generation; training would build one per step for nothing

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_pin_memory=torch.cuda.is_available(),
        activation_checkpointing=args.activation_checkpointing,
        eval_strategy="steps",
        eval_steps=args.save_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        report_to=[],
        seed=args.seed,
    )
    # Under `accelerate launch`, the main process tokenizes first and the others read its cache.
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset, eval_dataset = load_splits(args, tokenizer)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorWithFlattening() if args.packed else default_data_collator,
        processing_class=tokenizer,
    )
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {**train_result.metrics, **trainer.evaluate()}
    metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
    metrics["resumed_from"] = checkpoint

    model.config.use_cache = True  # the saved model is for generation
    save_model(trainer, args.output_dir)
    trainer.save_state()
    trainer.save_metrics("all", metrics)  # all_results.json
    if trainer.is_world_process_zero():  # once, not once per process under accelerate launch
        print(f"eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}; "
              f"model saved to {args.output_dir}")  # fmt: skip
    return metrics


if __name__ == "__main__":
    main()
