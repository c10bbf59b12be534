import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from samba_hf.cli import main as samba_hf_main


def test_demo_trains_publishes_reloads_and_generates(tmp_path, capsys):
    output = tmp_path / "demo"
    assert samba_hf_main(["demo", "--steps", "4", "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "trained 4 steps" in printed and "reloaded SambaForCausalLM" in printed
    files = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_samba.py", "configuration_samba.py", "kernel_dispatch.py",
            "mamba_reference.py", "tokenizer.json", "README.md"} <= files  # fmt: skip
    assert json.loads((output / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith("modeling_samba")
    card = (output / "README.md").read_text()
    for section in ("## Architecture", "## Training data and recipe", "## Intended use", "## Evaluation",
                    "## Limitations", "## Citation", "4 steps of AdamW"):  # fmt: skip
        assert section in card
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(output)
    ids = tokenizer("Return the", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no staging folders left behind"


def test_demo_refuses_to_overwrite_an_existing_folder(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("mine")
    assert samba_hf_main(["demo", "--steps", "1", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "demo" / "keep.txt").read_text() == "mine"


def test_env_reports_versions_and_each_op_implementation(capsys):
    assert samba_hf_main(["env"]) == 0
    printed = capsys.readouterr().out
    assert "transformers" in printed and "cpu    tensors -> torch" in printed
    assert "sliding-window attention" in printed and "cpu    tensors -> sdpa over blocks" in printed
    assert "generate() decoding" in printed and "cpu    tensors -> transformers' decoding loop" in printed


def test_env_honours_the_samba_kernels_override(capsys, monkeypatch):
    monkeypatch.setenv("SAMBA_KERNELS", "mamba_ssm")
    assert samba_hf_main(["env"]) == 0
    assert "unavailable" in capsys.readouterr().out  # mamba-ssm cannot be installed without CUDA


def test_a_forced_missing_implementation_raises_instead_of_falling_back(monkeypatch):
    from .helpers import small_model

    monkeypatch.setenv("SAMBA_KERNELS", "mamba_ssm")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        small_model()(torch.randint(0, 97, (1, 5)))


def test_auto_takes_the_pytorch_decode_ops_under_compilation(monkeypatch):
    from samba_hf.kernel_dispatch import TORCH_OPS, TRITON_OPS, mamba_ops

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert mamba_ops("auto", torch.device("cuda"), decoding=True) is TORCH_OPS
    assert mamba_ops("triton", torch.device("cpu"), decoding=True) is TRITON_OPS


