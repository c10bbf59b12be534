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
    assert "sliding-window attention" in printed and "cpu    tensors -> the attention interface" in printed
    assert "one-row projections" in printed and "cpu    tensors -> F.linear" in printed


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


def test_the_one_row_kernels_are_chosen_only_where_they_apply(monkeypatch):
    """samba_kernels' one-row kernels take one row inside torch.compile, without gradients, in the
    weights' dtype, outside autocast, on CUDA ("auto") or anywhere with "triton"; everything else, and
    every eager call, stays with nn.Linear's F.linear."""
    import samba_kernels
    from samba_hf.kernel_dispatch import one_row_kernels

    row, rows, weight = torch.zeros(1, 1, 4), torch.zeros(1, 2, 4), torch.zeros(3, 4)
    with torch.no_grad():
        assert one_row_kernels("triton", row, weight) is None  # eager
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert one_row_kernels("triton", row, weight, weight) is samba_kernels
        assert one_row_kernels("auto", row, weight) is None  # a CPU tensor
        assert one_row_kernels("torch", row, weight) is None
        assert one_row_kernels("triton", rows, weight) is None
        assert one_row_kernels("triton", row, weight, weight.double()) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert one_row_kernels("triton", row, weight) is None
        assert one_row_kernels("auto", row.to("meta"), weight.to("meta")) is None
        assert one_row_kernels("triton", row.to("meta"), weight.to("meta")) is samba_kernels  # F.linear inside
    assert one_row_kernels("triton", row, weight, weight.requires_grad_()) is None  # gradients: F.linear's backward
