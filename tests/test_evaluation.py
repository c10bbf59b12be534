import builtins
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from samba_hf.cli import main as samba_hf_main
from samba_hf.data import train_tokenizer
from samba_hf.evaluation import (
    PASSKEY_FILLER,
    PASSKEY_QUESTION,
    PASSKEY_TASK,
    build_passkey_prompt,
    chunking_error,
    evaluate_perplexity,
    format_length,
    greedy_continuation,
    parse_lengths,
    passkey_answer_correct,
    passkey_text,
    sample_windows,
    token_nll,
)

from .helpers import small_model


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return model


def single_forward_nll(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1], use_cache=False).logits.float()
    return F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")


@pytest.fixture(scope="module")
def tokenizer():
    documents = [PASSKEY_TASK + PASSKEY_FILLER * 3 + PASSKEY_QUESTION, "The pass key is 12345. 0123456789"] * 4
    return train_tokenizer(documents, vocab_size=600)  # saturates at ~390 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Samba and its tokenizer, saved as a folder the CLI can load."""
    folder = tmp_path_factory.mktemp("tiny-samba")
    model = small_model(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, sliding_window=16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cli(*argv) -> int:
    return samba_hf_main(["eval", *argv])


def run_ppl(model_dir, tmp_path, lengths="32,64", num_samples=2) -> int:
    """`samba-hf eval ppl` on a small text, writing to tmp_path / "ppl"."""
    data = tmp_path / "data.txt"
    data.write_text((PASSKEY_TASK + PASSKEY_FILLER * 5) * 10)
    options = f"--lengths {lengths} --chunk-size 16 --num-samples {num_samples} --device cpu".split()
    return cli("ppl", str(model_dir), "--data", str(data), *options, "--output-dir", str(tmp_path / "ppl"))


def read_csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_parse_lengths():
    assert parse_lengths("4k,16K,1m,512") == [4096, 16384, 1048576, 512]
    assert parse_lengths(" 8k , 2K ") == [8192, 2048]
    for bad in ("4x", "0", "k", "1.5k", "-4k", "", " , "):
        with pytest.raises(ValueError):
            parse_lengths(bad)
    assert [format_length(n) for n in (4096, 1048576, 1000)] == ["4K", "1M", "1000"]


@pytest.mark.parametrize("make_model", [lambda: small_model(sliding_window=8), tiny_llama], ids=["samba", "llama"])
def test_chunked_nll_equals_single_forward(make_model):
    model = make_model()
    windows = torch.randint(0, 97, (2, 41))
    expected = single_forward_nll(model, windows)
    for chunk_size in (7, 16, 40):  # several boundaries, a ragged last chunk, and one chunk
        nll, cache_bytes = token_nll(model, windows, chunk_size)
        torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
        assert cache_bytes > 0
    assert chunking_error(model, windows[:, :32], chunk_size=16) < 1e-4
    # Control: the same chunks without the cache give other numbers, so the check above can fail.
    without_cache = torch.cat([single_forward_nll(model, windows[:, s : s + 8]) for s in range(0, 40, 7)], dim=1)
    assert (without_cache[:, 7:14] - expected[:, 7:14]).abs().max() > 1e-2


def test_evaluate_perplexity_rows_match_single_forward():
    model = small_model(sliding_window=8)
    stream = torch.randint(0, 97, (300,))
    rows = evaluate_perplexity(model, stream, [16, 64], chunk_size=16, num_samples=3, batch_size=2)
    assert [row["length"] for row in rows] == [16, 64] and all(row["windows"] == 3 for row in rows)
    nll = single_forward_nll(model, sample_windows(stream, 64, 3))
    assert rows[1]["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    assert rows[1]["last_chunk_ppl"] == pytest.approx(math.exp(nll[:, -16:].mean().item()), rel=1e-4)


def test_sample_windows_do_not_overlap_and_are_capped():
    stream = torch.arange(100)
    windows = sample_windows(stream, 9, num_samples=4)
    assert windows.shape == (4, 10)
    assert len(set(windows.flatten().tolist())) == 40  # distinct tokens: no overlap
    assert sample_windows(stream, 9, num_samples=50).shape == (10, 10)  # only 10 fit
    with pytest.raises(ValueError):
        sample_windows(stream, 100, num_samples=1)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt_places_key_at_depth(tokenizer, depth):
    prompt = build_passkey_prompt(tokenizer, 600, depth, key="48151")
    fillers = prompt.filler_before + prompt.filler_after
    assert len(prompt.input_ids) <= 600
    # The longest such prompt: one more filler sentence would not fit.
    assert fillers > 5 and len(tokenizer(passkey_text("48151", fillers + 1, 0))["input_ids"]) > 600
    assert prompt.filler_before == round(depth * fillers)
    # In the text itself: the key line sits after exactly filler_before filler sentences.
    before, after = prompt.text.split(" The pass key is 48151. Remember it. 48151 is the pass key.")
    assert before == PASSKEY_TASK + PASSKEY_FILLER * prompt.filler_before
    assert after == PASSKEY_FILLER * prompt.filler_after + PASSKEY_QUESTION
    with pytest.raises(ValueError):
        build_passkey_prompt(tokenizer, 5, depth, key="48151")


def test_passkey_answer_checker():
    assert passkey_answer_correct(" 48151. Remember it.", "48151")
    assert passkey_answer_correct("48151", "48151")
    assert not passkey_answer_correct(" 4815", "48151")
    assert not passkey_answer_correct(" 481512", "48151")
    assert not passkey_answer_correct(" 12345 48151", "48151")
    assert not passkey_answer_correct(" the key", "48151")


def test_greedy_continuation_matches_generate():
    model = small_model(sliding_window=8)
    prompt = torch.randint(0, 97, (1, 30))
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 30:].tolist()
    assert greedy_continuation(model, prompt[0].tolist(), chunk_size=7, max_new_tokens=6) == expected


def test_cli_ppl_writes_csv_and_plot(tmp_path, model_dir):
    out = tmp_path / "ppl"
    assert run_ppl(model_dir, tmp_path) == 0
    rows = read_csv(out / "perplexity.csv")
    assert [int(row["length"]) for row in rows] == [32, 64]
    assert all(float(row["ppl"]) > 1 and int(row["windows"]) == 2 for row in rows)
    assert (out / "perplexity.png").stat().st_size > 1000


def test_cli_ppl_reports_each_length_as_it_finishes_and_keeps_it_when_interrupted(
    tmp_path, model_dir, capsys, monkeypatch
):
    """Each length prints its line and lands in the CSV before the next one starts: a run stopped
    during the second length keeps the first."""
    import samba_hf.evaluation as evaluation

    out = tmp_path / "ppl"
    calls, token_nll = [], evaluation.token_nll

    def interrupted_at_the_second_length(model, windows, chunk_size):
        calls.append(windows.shape[1])
        if windows.shape[1] == 65:  # length 64: the second
            raise KeyboardInterrupt
        return token_nll(model, windows, chunk_size)

    monkeypatch.setattr(evaluation, "token_nll", interrupted_at_the_second_length)
    assert run_ppl(model_dir, tmp_path) == 130
    printed = capsys.readouterr()
    assert "32: perplexity" in printed.out and "interrupted" in printed.err and "Traceback" not in printed.err
    assert [int(row["length"]) for row in read_csv(out / "perplexity.csv")] == [32]


def test_cli_ppl_without_matplotlib_prints_the_table_and_how_to_plot(tmp_path, model_dir, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert run_ppl(model_dir, tmp_path, lengths="32", num_samples=1) == 0
    printed = capsys.readouterr().out
    assert "| length |" in printed and "pip install matplotlib" in printed
    assert (tmp_path / "ppl" / "perplexity.csv").is_file() and not (tmp_path / "ppl" / "perplexity.png").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--lengths", ""], "--lengths"),
        (["--lengths", "4k,x"], "Cannot read 'x'"),
        (["--chunk-size", "0"], "--chunk-size: must be at least 1"),
        (["--trials", "0"], "--trials: must be at least 1"),
        (["--depths", "0"], "--depths: must be at least 1"),
        (["--device", "cuda:7"], "--device"),
        (["--dtype", "float8"], "unknown dtype"),
    ],
)
def test_cli_eval_user_errors_exit_2_with_one_line(tmp_path, model_dir, capsys, options, message):
    if options[0] == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    try:
        code = cli("passkey", str(model_dir), "--device", "cpu", *options)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]  # argparse prints its usage above its error line
    assert code == 2 and "Traceback" not in err
    assert last_line.startswith("samba-hf eval passkey: error:") and message in last_line


def test_cli_passkey_end_to_end(tmp_path, model_dir):
    out = tmp_path / "passkey"
    options = "--lengths 128,256 --depths 3 --trials 2 --chunk-size 64 --device cpu".split()
    assert cli("passkey", str(model_dir), *options, "--output-dir", str(out)) == 0
    rows = read_csv(out / "passkey.csv")
    assert [(int(r["length"]), float(r["depth"])) for r in rows] == [(n, d) for n in (128, 256) for d in (0, 0.5, 1)]
    assert all(0 <= float(row["accuracy"]) <= 1 and int(row["trials"]) == 2 for row in rows)
    assert all(float(row["mean_prompt_tokens"]) <= int(row["length"]) for row in rows)
    assert (out / "passkey.png").stat().st_size > 1000
