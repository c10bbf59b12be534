"""`samba-hf demo`: train a tiny Samba on text that ships with Python, publish it as a Hub-ready
folder, reload it through the Auto classes and stream a sample. Downloads nothing."""

import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, Trainer, TrainingArguments

from .configuration_samba import SambaConfig
from .data import TokenBlocks, stdlib_corpus, train_tokenizer
from .hub import save_hub_folder
from .modeling_samba import SambaForCausalLM
from .staging import OutputFolder


def tiny_config(tokenizer, **overrides) -> SambaConfig:
    """The "tiny" preset sized for `tokenizer`, with its special tokens."""
    return SambaConfig.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def run_demo(
    output_dir: str = "samba-demo",
    steps: int = 300,
    device: str = "cpu",
    force: bool = False,
    prompt: str = "Return a new",
    seed: int = 0,
) -> Path:
    with OutputFolder(output_dir, force=force) as output:  # checked before minutes of training
        model, tokenizer, recipe = train_demo_model(steps, device, seed)
        save_hub_folder(model, output, tokenizer=tokenizer, model_name="samba-hf demo (tiny)", **recipe)
    print(f"saved a Hub-ready folder to {output.path}/")

    reloaded = AutoModelForCausalLM.from_pretrained(output.path).to(device)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(output.path)
    inputs = reloaded_tokenizer(prompt, return_tensors="pt").to(device)
    print(f"reloaded {type(reloaded).__name__} through AutoModelForCausalLM; sample:\n")
    reloaded.generate(
        **inputs,
        max_new_tokens=60,
        do_sample=True,
        temperature=0.7,
        top_k=40,
        streamer=TextStreamer(reloaded_tokenizer, skip_special_tokens=True),
    )
    print()
    return output.path


def train_demo_model(steps: int, device: str, seed: int):
    """The tiny Samba trained on the standard library's docstrings, its tokenizer, and the card's
    description of the run."""
    torch.manual_seed(seed)
    started = time.time()
    documents = stdlib_corpus()
    tokenizer = train_tokenizer(documents, vocab_size=2048)
    dataset = TokenBlocks(documents, tokenizer, block_size=128)
    print(f"corpus: {len(documents)} docstrings from the standard library, {dataset.blocks.numel():,} tokens")

    config = tiny_config(tokenizer)
    model = SambaForCausalLM(config)
    print(f"model: tiny Samba, {model.num_parameters() / 1e6:.2f}M parameters, layers {config.layer_types}")

    with tempfile.TemporaryDirectory(prefix="samba-demo-trainer-") as trainer_dir:
        args = TrainingArguments(
            output_dir=trainer_dir,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 20),
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            logging_steps=max(1, steps // 15),
            save_strategy="no",
            report_to=[],
            use_cpu=device == "cpu",
            dataloader_num_workers=0,
            seed=seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        result = trainer.train()
    final_loss = trainer.state.log_history[-2]["loss"] if len(trainer.state.log_history) > 1 else result.training_loss
    print(
        f"trained {steps} steps in {time.time() - started:.0f} s; last logged loss {final_loss:.3f} "
        f"(perplexity {math.exp(final_loss):.1f}; a uniform guess would be {math.log(len(tokenizer)):.2f})"
    )

    recipe = {
        "training": (
            f"{steps} steps of AdamW on {dataset.blocks.numel():,} tokens of Python standard-library "
            "docstrings (`samba-hf demo`), blocks of 128 tokens, batch 8, learning rate 3e-3 with cosine decay."
        ),
        "evaluation": f"Training loss at the end: {final_loss:.3f}.",
        "intended_use": "A demonstration of samba-hf's training, publishing and generation path; not a useful model.",
        "language": "en",
    }
    return model, tokenizer, recipe
