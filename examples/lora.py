"""LoRA fine-tuning of a Samba model with PEFT and transformers' Trainer.

    python examples/lora.py --model samba-tiny --train-file notes.txt --output-dir samba-lora --merge

The adapter (a few MB) is saved to --output-dir; --merge also folds it into the base weights with
`merge_and_unload` and writes a Hub-ready folder to OUTPUT_DIR/merged. Without --train-file the
model is tuned on docstrings of Python's standard library, so the script runs anywhere.

By default LoRA adapts every linear projection: attention (q/k/v/o_proj), SwiGLU
(gate/up/down_proj) and Mamba (in/x/dt/out_proj); samba_hf registers these as PEFT's defaults.
--qlora loads the base model in 4-bit NF4 with bitsandbytes (CUDA only) and trains the adapter on it.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import samba_hf  # noqa: F401  (registers Samba with the Auto classes and PEFT's default targets)
from samba_hf.demo import TokenBlocks, stdlib_corpus
from samba_hf.hub import save_hub_folder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (with its tokenizer) or Hub id")
    parser.add_argument("--train-file", nargs="+", help="text files, documents separated by blank lines "
                        "(default: the standard library's docstrings)")  # fmt: skip
    parser.add_argument("--output-dir", required=True, help="the adapter goes here (and merged/ with --merge)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=32, help="LoRA alpha (the update is scaled by alpha / r)")
    parser.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter's input")
    parser.add_argument("--target-modules", nargs="+", help="module names to adapt (default: every projection)")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per training row")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--merge", action="store_true", help="also write the merged model as a Hub-ready folder")
    parser.add_argument("--qlora", action="store_true", help="4-bit NF4 base model via bitsandbytes (needs CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def read_documents(paths) -> list[str]:
    if not paths:
        return stdlib_corpus()
    texts = (Path(path).read_text(encoding="utf-8") for path in paths)
    return [document.strip() for text in texts for document in text.split("\n\n") if document.strip()]


def load_base_model(name: str, qlora: bool):
    if not qlora:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
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


def merge_adapter(base_name: str, adapter_dir: Path, tokenizer, output_dir: Path, training: str) -> Path:
    """Fold the adapter into a full-precision copy of the base model (never into 4-bit weights,
    which would round the update away) and write a Hub-ready folder."""
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return save_hub_folder(merged, output_dir, tokenizer=tokenizer, force=True, training=training)


def main(argv=None) -> dict:
    """Train the adapter, save it (and the merged model with --merge); returns paths and the loss."""
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_base_model(args.model, args.qlora)
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

    documents = read_documents(args.train_file)
    dataset = TokenBlocks(documents, tokenizer, block_size=args.block_size)
    if len(dataset) == 0:
        raise ValueError(f"the text has fewer than --block-size ({args.block_size}) tokens")
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="samba-lora-trainer-") as trainer_dir:
        training_args = TrainingArguments(
            output_dir=trainer_dir,  # no checkpoints: the adapter is saved below
            save_strategy="no",
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.max_steps // 20),
            logging_steps=args.logging_steps,
            bf16=on_gpu and torch.cuda.is_bf16_supported(),
            dataloader_pin_memory=on_gpu,
            report_to=[],
            seed=args.seed,
        )
        result = Trainer(model=model, args=training_args, train_dataset=dataset).train()

    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)  # the adapter weights and adapter_config.json only
    tokenizer.save_pretrained(output_dir)
    print(f"adapter saved to {output_dir}/ (training loss {result.training_loss:.4f})")
    merged_dir = None
    if args.merge:
        recipe = (
            f"LoRA (r={args.rank}, alpha={args.alpha:g}{', QLoRA 4-bit base' if args.qlora else ''}) on "
            f"{args.model}, {args.max_steps} steps of {args.batch_size} x {args.block_size} tokens, "
            f"learning rate {args.learning_rate:g}; the adapter is merged into the weights."
        )
        merged_dir = merge_adapter(args.model, output_dir, tokenizer, output_dir / "merged", recipe)
        print(f"merged model saved to {merged_dir}/")
    return {"adapter_dir": output_dir, "merged_dir": merged_dir, "train_loss": result.training_loss}


if __name__ == "__main__":
    main()
