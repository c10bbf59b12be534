"""`samba-hf demo`: train a tiny Samba on text that ships with Python, publish it as a Hub-ready
folder, reload it through the Auto classes and stream a sample. Downloads nothing."""

import importlib
import inspect
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    TextStreamer,
    Trainer,
    TrainingArguments,
)

from .configuration_samba import SambaConfig
from .hub import check_output_dir, save_hub_folder
from .modeling_samba import SambaForCausalLM

# Standard-library modules whose docstrings make the corpus: English prose about programming,
# present in every CPython installation.
CORPUS_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections concurrent.futures contextlib copy csv "
    "dataclasses datetime decimal difflib email enum fractions functools glob gzip hashlib heapq html "
    "http.client inspect io ipaddress itertools json logging math multiprocessing operator os pathlib pickle "
    "pprint queue random re shutil socket sqlite3 statistics string struct subprocess tarfile tempfile "
    "textwrap threading time timeit tokenize typing unittest urllib.parse uuid warnings weakref "
    "xml.etree.ElementTree zipfile"
).split()
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def stdlib_corpus() -> list[str]:
    """Docstrings of the standard library's modules, classes and functions (about 330 kB)."""
    documents = []
    with warnings.catch_warnings():  # some modules carry deprecated aliases (typing.io, ...)
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in CORPUS_MODULES:
            module = importlib.import_module(name)
            members = [
                value
                for key, value in sorted(vars(module).items())
                if not key.startswith("_")
                and (inspect.isclass(value) or inspect.isfunction(value))
                and getattr(value, "__module__", None) == module.__name__
            ]
            for obj in [module, *members]:
                methods = [v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and inspect.isfunction(v)]
                for documented in [obj, *methods] if inspect.isclass(obj) else [obj]:
                    doc = inspect.getdoc(documented)
                    if doc and len(doc) > 80:
                        documents.append(doc)
    return documents


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `documents` with the `tokenizers` library."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


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


class TokenBlocks(torch.utils.data.Dataset):
    """The documents, each ended by EOS (as in Samba's pre-training data), concatenated and cut into
    blocks of `block_size` tokens."""

    def __init__(self, documents: list[str], tokenizer, block_size: int):
        ids = []
        for document_ids in tokenizer(documents)["input_ids"]:  # one batch call: a fast tokenizer runs it in parallel
            ids.extend(document_ids + [tokenizer.eos_token_id])
        usable = len(ids) // block_size * block_size
        self.blocks = torch.tensor(ids[:usable]).view(-1, block_size)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}


def run_demo(
    output_dir: str = "samba-demo",
    steps: int = 300,
    device: str = "cpu",
    force: bool = False,
    prompt: str = "Return a new",
    seed: int = 0,
) -> Path:
    output_dir = check_output_dir(output_dir, force)  # refuse before spending minutes training
    torch.manual_seed(seed)
    started = time.time()
    documents = stdlib_corpus()
    tokenizer = train_tokenizer(documents, vocab_size=2048)
    dataset = TokenBlocks(documents, tokenizer, block_size=128)
    print(f"corpus: {len(documents)} docstrings from the standard library, {dataset.blocks.numel():,} tokens")

    config = tiny_config(tokenizer)
    model = SambaForCausalLM(config)
    print(f"model: tiny Samba, {model.num_parameters() / 1e6:.2f}M parameters, layers {config.layer_types}")

    trainer_dir = tempfile.TemporaryDirectory(prefix="samba-demo-trainer-")
    args = TrainingArguments(
        output_dir=trainer_dir.name,
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
    trainer_dir.cleanup()
    final_loss = trainer.state.log_history[-2]["loss"] if len(trainer.state.log_history) > 1 else result.training_loss
    print(f"trained {steps} steps in {time.time() - started:.0f} s; last logged loss {final_loss:.3f} "
          f"(perplexity {math.exp(final_loss):.1f}; a uniform guess would be {math.log(len(tokenizer)):.2f})")  # fmt: skip

    save_hub_folder(
        model,
        output_dir,
        tokenizer=tokenizer,
        model_name="samba-hf demo (tiny)",
        force=force,
        training=(
            f"{steps} steps of AdamW on {dataset.blocks.numel():,} tokens of Python standard-library "
            "docstrings (`samba-hf demo`), blocks of 128 tokens, batch 8, learning rate 3e-3 with cosine decay."
        ),
        evaluation=f"Training loss at the end: {final_loss:.3f}.",
        intended_use="A demonstration of samba-hf's training, publishing and generation path; not a useful model.",
    )
    print(f"saved a Hub-ready folder to {output_dir}/")

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir).to(device)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = reloaded_tokenizer(prompt, return_tensors="pt").to(device)
    print(f"reloaded {type(reloaded).__name__} through AutoModelForCausalLM; sample:\n")
    reloaded.generate(
        **inputs,
        max_new_tokens=60,
        do_sample=True,
        temperature=0.7,
        top_k=40,
        streamer=TextStreamer(reloaded_tokenizer),
    )
    print()
    return output_dir
