"""Text data that ships with Python, a tokenizer trained on it, and token streams cut into training
blocks: what the demo, the evaluation and the examples share. Nothing here downloads anything."""

import importlib
import inspect
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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


def read_documents(path) -> list[str]:
    """A text file is one document; a folder gives one document per .txt file below it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no .txt files.")
    return [file.read_text(encoding="utf-8") for file in files]


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


def token_stream(documents: list[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and concatenated, each ended by EOS (TokenBlocks with blocks of one token)."""
    return TokenBlocks(documents, tokenizer, block_size=1).blocks.flatten()


__all__ = ["TokenBlocks", "read_documents", "stdlib_corpus", "token_stream", "train_tokenizer"]
