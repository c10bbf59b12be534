"""Full fine-tuning of a Samba model on local text files with transformers' Trainer.

    python examples/finetune.py --model samba-tiny --train-file notes.txt --output-dir samba-ft

Every option of transformers' TrainingArguments works (--per-device-train-batch-size, --optim,
--save-steps, --report-to wandb, --push-to-hub, --gradient-checkpointing, ...), beside this script's
own data options; `--resume-from-checkpoint last` continues from the newest checkpoint in --output-dir.

Every parameter is trained: bf16 mixed precision on a GPU, float32 on the CPU. The text files are read
with `datasets` (one document per paragraph by default). Without `--packed`, documents are joined
with EOS and cut into blocks of `--block-size` tokens; with `--packed`, each document stays whole
(split only when longer than a block) and transformers' DataCollatorWithFlattening concatenates a
batch into one row whose position_ids restart at 0 for each document: no padding, and neither
attention nor the Mamba state crosses from one document into the next.
"""

import argparse
import math
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithFlattening,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import get_last_checkpoint

import samba_hf  # noqa: F401  (registers Samba with the Auto classes)
from samba_hf.hub import folder_card


@dataclass
class ScriptArguments:
    """The data and the model; everything about training is transformers' TrainingArguments."""

    model: str = field(metadata={"help": "model folder (with its tokenizer) or Hub id"})
    train_file: list[str] = field(metadata={"help": "text files to train on"})
    eval_file: list[str] | None = field(
        default=None, metadata={"help": "text files to evaluate on (default: hold out --eval-fraction)"}
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "documents held out without --eval-file"})
    sample_by: str = field(
        default="paragraph",
        metadata={"help": "what one document of a text file is", "choices": ["line", "paragraph", "document"]},
    )
    block_size: int = field(default=1024, metadata={"help": "tokens per training row (per document with --packed)"})
    packed: bool = field(
        default=False, metadata={"help": "padding-free batches of whole documents (DataCollatorWithFlattening)"}
    )


# This script's choices where they differ from TrainingArguments' defaults (the Samba paper's AdamW
# settings, a cosine schedule, evaluation at each logging step); any of them can be overridden.
TRAINING_DEFAULTS = dict(
    output_dir="samba-finetuned",
    learning_rate=1e-4,
    weight_decay=0.1,
    adam_beta2=0.95,
    max_grad_norm=1.0,
    lr_scheduler_type="cosine",
    num_train_epochs=1.0,
    logging_steps=10,
    eval_strategy="steps",
    seed=0,
)


def parse_args(argv=None) -> tuple[ScriptArguments, TrainingArguments]:
    parser = HfArgumentParser(
        (ScriptArguments, TrainingArguments), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_gpu = torch.cuda.is_available()
    parser.set_defaults(
        **TRAINING_DEFAULTS, bf16=on_gpu and torch.cuda.is_bf16_supported(), dataloader_pin_memory=on_gpu
    )
    return parser.parse_args_into_dataclasses(args=argv)


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


def load_splits(args: ScriptArguments, seed: int, tokenizer):
    data_files = {"train": args.train_file, **({"eval": args.eval_file} if args.eval_file else {})}
    raw = load_dataset("text", data_files=data_files, sample_by=args.sample_by)
    if "eval" not in raw:
        held_out = raw["train"].train_test_split(test_size=args.eval_fraction, seed=seed)
        raw = {"train": held_out["train"], "eval": held_out["test"]}
    splits = {name: tokenize_documents(split, tokenizer, args.block_size, args.packed) for name, split in raw.items()}
    for name, split in splits.items():
        if len(split) == 0:
            raise ValueError(
                f"the {name} split has no block of {args.block_size} tokens; give more text or a smaller --block-size"
            )
    return splits["train"], splits["eval"]


def resolve_checkpoint(training_args: TrainingArguments) -> str | None:
    """--resume-from-checkpoint PATH, or "last" for the newest checkpoint-* in --output-dir."""
    requested = training_args.resume_from_checkpoint
    if requested != "last":
        return requested
    last = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
    if last is None:
        raise FileNotFoundError(f"--resume-from-checkpoint last: no checkpoint-* folder in {training_args.output_dir}")
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


def write_card(training_args: TrainingArguments, args: ScriptArguments, metrics: dict, steps: int) -> None:
    """The model card of the saved folder, naming its base (`samba-hf push` uploads it as it is)."""
    world = training_args.world_size * training_args.gradient_accumulation_steps
    training = (
        f"Full fine-tuning of `{args.model}` with transformers' Trainer (`examples/finetune.py`): {steps} steps of "
        f"{training_args.per_device_train_batch_size * world} {'documents' if args.packed else 'blocks'} of up to "
        f"{args.block_size} tokens from {', '.join(Path(f).name for f in args.train_file)}, learning rate "
        f"{training_args.learning_rate:g} ({training_args.lr_scheduler_type.value} schedule)."
    )
    evaluation = f"Held-out loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}."
    card = folder_card(
        training_args.output_dir,
        Path(training_args.output_dir).name,
        base_model=args.model,
        training=training,
        evaluation=evaluation,
    )
    (Path(training_args.output_dir) / "README.md").write_text(card, encoding="utf-8")


def main(argv=None) -> dict:
    """Train, evaluate and save; returns the metrics (eval_loss, eval_perplexity, train_loss, ...)."""
    args, training_args = parse_args(argv)
    checkpoint = resolve_checkpoint(training_args)  # fail before loading anything
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # float32 master weights in both cases: on a GPU, bf16 autocast does the arithmetic.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False  # the cache serves generation; training would build one per step for nothing

    # Under `accelerate launch`, the main process tokenizes first and the others read its cache.
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset, eval_dataset = load_splits(args, training_args.seed, tokenizer)
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
    save_model(trainer, training_args.output_dir)
    trainer.save_state()
    trainer.save_metrics("all", metrics)  # all_results.json
    if trainer.is_world_process_zero():  # once, not once per process under accelerate launch
        write_card(training_args, args, metrics, trainer.state.global_step)
    if training_args.push_to_hub:  # the Hub repository gets the final model and transformers' training card
        trainer.push_to_hub(finetuned_from=args.model)
    if trainer.is_world_process_zero():
        print(
            f"eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}; "
            f"model saved to {training_args.output_dir}"
        )
    return metrics


if __name__ == "__main__":
    main()
