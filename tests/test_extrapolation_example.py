"""examples/reproduce_extrapolation.py and the data helpers it uses, and a smoke run of the whole script (six
tiny models, two steps each) on CPU."""

import csv
import sys
from pathlib import Path

import torch

from samba_hf.data import TokenBlocks, stdlib_corpus, token_stream, train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the examples are scripts

import reproduce_extrapolation  # noqa: E402


def test_token_blocks_match_documents_tokenized_one_at_a_time():
    documents = stdlib_corpus()[:40]
    tokenizer = train_tokenizer(documents, vocab_size=300)
    expected = []
    for document in documents:
        expected.extend(tokenizer(document)["input_ids"] + [tokenizer.eos_token_id])
    assert token_stream(documents, tokenizer).tolist() == expected
    blocks = TokenBlocks(documents, tokenizer, block_size=16)
    assert blocks.blocks.flatten().tolist() == expected[: len(expected) // 16 * 16]
    assert torch.equal(blocks[1]["input_ids"], torch.tensor(expected[16:32]))


def test_stdlib_source_corpus():
    documents = reproduce_extrapolation.stdlib_source()
    assert len(documents) > 100
    assert any("def " in document for document in documents)


def test_script_writes_reports(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    documents = stdlib_corpus()[:200]
    for i in range(10):  # ten files: the last one is held out
        (data / f"{i}.txt").write_text("\n\n".join(documents[20 * i : 20 * (i + 1)]), encoding="utf-8")
    out = tmp_path / "out"
    argv = [
        "--data",
        str(data),
        "--seq-len",
        "16",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--vocab-size",
        "300",
        "--num-samples",
        "2",
        "--output-dir",
        str(out),
    ]
    assert reproduce_extrapolation.main(argv) == 0
    assert sorted(path.name for path in out.iterdir()) == [f"extrapolation.{ext}" for ext in ("csv", "md", "png")]
    with (out / "extrapolation.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 * 3 and {row["length"] for row in rows} == {"16", "64", "256"}
    report = (out / "extrapolation.md").read_text()
    assert "| Samba | 4 |" in report and "Incomplete" not in report and "--seq-len 16" in report
