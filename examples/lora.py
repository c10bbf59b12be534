"""LoRA fine-tuning of a Samba model with PEFT and TRL's SFTTrainer.

    python examples/lora.py --model samba-tiny --train-file notes.txt --output-dir samba-lora --merge
    python examples/lora.py --model samba-tiny --train-file chats.jsonl --chat-template zephyr --output-dir samba-chat

Every option of TRL's SFTConfig and transformers' TrainingArguments works (--max-length,
--per-device-train-batch-size, --optim, --save-steps, --report-to, --push-to-hub, --packing, ...);
`--resume-from-checkpoint last` continues from the newest checkpoint in --output-dir.

Data: text files (one document per paragraph), or JSON lines with a "text" field, or conversations
in a "messages" field ([{"role": "user", "content": ...}, ...]). Conversations are formatted by the
tokenizer's chat template; `--chat-template` sets one (a .jinja file, or the built-in "zephyr") and
it is saved with the tokenizer. Without --train-file the model is tuned on docstrings of Python's
standard library, so the script runs anywhere.

The adapter (a few MB) and the tokenizer are saved to --output-dir, with checkpoints on the way;
--merge also folds the adapter into the base weights (`merge_and_unload`) and writes a Hub-ready
folder to OUTPUT_DIR/merged. By default LoRA adapts every linear projection: attention
(q/k/v/o_proj), SwiGLU (gate/up/down_proj) and Mamba (in/x/dt/out_proj); samba_hf registers these as
PEFT's defaults. The base model's weights are float32 unless `--dtype bfloat16` (half the memory;
the adapter stays float32); --qlora loads them in 4-bit NF4 with bitsandbytes (CUDA only), the parts
it does not quantize in bfloat16.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

import samba_hf  # noqa: F401  (registers Samba with the Auto classes and PEFT's default targets)
from samba_hf.data import stdlib_corpus
from samba_hf.hub import save_hub_folder

# The Zephyr chat format. Its turn markers are plain text, so it suits any tokenizer; each turn ends
# with the tokenizer's EOS, so generation stops after the assistant's turn. The generation markers
# let TRL train on the assistant's turns alone (--assistant-only-loss).
BUILT_IN_CHAT_TEMPLATES = {
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{{ '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}

# --dtype: the base model's weights without --qlora.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ScriptArguments:
    """The model, the data and the adapter; everything about training is TRL's SFTConfig."""

    model: str = field(metadata={"help": "model folder (with its tokenizer) or Hub id"})
    train_file: list[str] | None = field(
        default=None,
        metadata={
            "help": "text files (paragraphs) or JSON lines with 'text' or 'messages' (default: stdlib docstrings)"
        },
    )
    chat_template: str | None = field(
        default=None, metadata={"help": f"a .jinja file, or built-in: {', '.join(BUILT_IN_CHAT_TEMPLATES)}"}
    )
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input"})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "module names to adapt (default: every projection)"}
    )
    merge: bool = field(default=False, metadata={"help": "also write the merged model as a Hub-ready folder"})
    qlora: bool = field(default=False, metadata={"help": "4-bit NF4 base model via bitsandbytes (needs CUDA)"})
    dtype: str = field(
        default="float32",
        metadata={"help": f"the base model's weights: {' or '.join(DTYPES)} (--qlora: 4-bit, the rest bfloat16)"},
    )


# This script's choices where they differ from SFTConfig's defaults; any of them can be overridden.
TRAINING_DEFAULTS = dict(
    output_dir="samba-lora",
    learning_rate=2e-4,
    lr_scheduler_type="cosine",
    num_train_epochs=1.0,
    logging_steps=10,
    max_length=512,
    seed=0,
)


def parse_args(argv=None) -> tuple[ScriptArguments, SFTConfig]:
    parser = HfArgumentParser(
        (ScriptArguments, SFTConfig), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_gpu = torch.cuda.is_available()
    parser.set_defaults(
        **TRAINING_DEFAULTS, bf16=on_gpu and torch.cuda.is_bf16_supported(), dataloader_pin_memory=on_gpu
    )
    return parser.parse_args_into_dataclasses(args=argv)


def load_data(paths) -> Dataset:
    if not paths:
        return Dataset.from_dict({"text": stdlib_corpus()})
    if all(path.endswith((".json", ".jsonl")) for path in paths):
        return load_dataset("json", data_files=list(paths), split="train")
    if any(path.endswith((".json", ".jsonl")) for path in paths):
        raise SystemExit("--train-file: give text files or JSON lines files, not both.")
    texts = (Path(path).read_text(encoding="utf-8") for path in paths)
    return Dataset.from_dict({"text": [doc.strip() for text in texts for doc in text.split("\n\n") if doc.strip()]})


def set_chat_template(tokenizer, name_or_file: str | None, dataset: Dataset) -> None:
    """The tokenizer's chat template from --chat-template; conversations without one are refused."""
    if name_or_file in BUILT_IN_CHAT_TEMPLATES:
        tokenizer.chat_template = BUILT_IN_CHAT_TEMPLATES[name_or_file]
    elif name_or_file is not None:
        if not Path(name_or_file).is_file():
            raise SystemExit(
                f"--chat-template {name_or_file}: neither a file nor a built-in "
                f"({', '.join(BUILT_IN_CHAT_TEMPLATES)})."
            )
        tokenizer.chat_template = Path(name_or_file).read_text(encoding="utf-8")
    if "messages" in dataset.column_names and tokenizer.chat_template is None:
        raise SystemExit(
            "the data holds conversations ('messages') and the tokenizer has no chat template: "
            f"pass --chat-template ({', '.join(BUILT_IN_CHAT_TEMPLATES)} or a .jinja file)."
        )


def load_base_model(name: str, qlora: bool, dtype: torch.dtype = torch.float32):
    if not qlora:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    # Checked before anything heavy is loaded, with the fix in the message.
    if not torch.cuda.is_available():
        raise SystemExit("--qlora needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on the CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SystemExit("--qlora needs bitsandbytes: pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        # x_proj and dt_proj are small and produce Mamba's time step, which is sensitive to
        # quantisation error: keep them (and the tied LM head) in bf16.
        llm_int8_skip_modules=["lm_head", "x_proj", "dt_proj"],
    )
    model = AutoModelForCausalLM.from_pretrained(
        name, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": torch.cuda.current_device()}
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def resolve_checkpoint(training_args: SFTConfig) -> str | None:
    """--resume-from-checkpoint PATH, or "last" for the newest checkpoint-* in --output-dir."""
    requested = training_args.resume_from_checkpoint
    if requested != "last":
        return requested
    last = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
    if last is None:
        raise SystemExit(f"--resume-from-checkpoint last: no checkpoint-* folder in {training_args.output_dir}")
    return last


def merge_adapter(base_name: str, adapter_dir: Path, tokenizer, output_dir: Path, training: str) -> Path:
    """Fold the adapter into a full-precision copy of the base model (never into 4-bit weights,
    which would round the update away) and write a Hub-ready folder naming its base."""
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return save_hub_folder(
        merged, output_dir, tokenizer=tokenizer, force=True, base_model=base_name, training=training
    )


def main(argv=None) -> dict:
    """Train the adapter, save it (and the merged model with --merge); returns paths and the loss."""
    args, training_args = parse_args(argv)
    checkpoint = resolve_checkpoint(training_args)  # fail before loading anything
    if args.dtype not in DTYPES:
        raise SystemExit(f"--dtype {args.dtype}: choose {' or '.join(DTYPES)}.")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_data(args.train_file)
    set_chat_template(tokenizer, args.chat_template, dataset)
    model = load_base_model(args.model, args.qlora, DTYPES[args.dtype])
    model.config.use_cache = False  # the cache serves generation; training would build one per step for nothing
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.target_modules,
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    output_dir = Path(training_args.output_dir)
    trainer.save_model(output_dir)  # the adapter (adapter_config.json, weights, PEFT's card) and the tokenizer
    if training_args.push_to_hub:
        trainer.push_to_hub()
    print(f"adapter saved to {output_dir}/ (training loss {result.training_loss:.4f})")
    merged_dir = None
    if args.merge:
        recipe = (
            f"LoRA (r={args.rank}, alpha={args.alpha:g}{', QLoRA 4-bit base' if args.qlora else ''}) on "
            f"{args.model}, {result.global_step} steps of {training_args.per_device_train_batch_size} rows of up to "
            f"{training_args.max_length} tokens, learning rate {training_args.learning_rate:g}; the adapter is merged "
            "into the weights."
        )
        merged_dir = merge_adapter(args.model, output_dir, tokenizer, output_dir / "merged", recipe)
        print(f"merged model saved to {merged_dir}/")
    return {
        "adapter_dir": output_dir,
        "merged_dir": merged_dir,
        "train_loss": result.training_loss,
        "resumed_from": checkpoint,
    }


if __name__ == "__main__":
    main()
