"""Checkpoint conversion. Source checkpoints are built here from the documented layouts (the Samba
reference code, github.com/microsoft/Samba; flash-linear-attention's Samba; transformers' models),
never with samba-hf's own exporter, and the converted models are checked against independent
forwards of those layouts."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from samba_conversion import (
    ConversionError,
    CorruptCheckpointError,
    convert_fla,
    convert_lit_gpt,
    convert_to_lit_gpt,
    convert_transformers,
    samba_from_transformers,
)
from samba_conversion import lit_gpt as lit_gpt_module
from samba_conversion.reference_forward import fla_forward, lit_gpt_forward
from samba_hf import SambaForCausalLM
from samba_hf.cli import main as samba_hf_main
from samba_hf.staging import OutputPathError

HIDDEN, VOCAB, INTER, WINDOW = 32, 64, 48, 8
LENGTH = 2 * WINDOW + 5  # longer than the window


def random_tensors(seed):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=generator) * (shape[-1] ** -0.5 if scale is None else scale)

    return rand


def s4d_real(d_inner, d_state):
    return torch.log(torch.arange(1, d_state + 1.0)).repeat(d_inner, 1)


def mamba_tensors(rand, prefix, d, d_state=4, d_conv=4, expand=2):
    """mamba-ssm's Mamba-1 parameters, initialised the way the reference code does (plus noise)."""
    d_inner, rank = expand * d, math.ceil(d / 16)
    dt = torch.exp(rand(d_inner, scale=1.0).sigmoid() * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        prefix + "in_proj.weight": rand(2 * d_inner, d),
        prefix + "conv1d.weight": rand(d_inner, 1, d_conv),
        prefix + "conv1d.bias": rand(d_inner, scale=0.1),
        prefix + "x_proj.weight": rand(rank + 2 * d_state, d_inner),
        prefix + "dt_proj.weight": rand(d_inner, rank),
        prefix + "dt_proj.bias": dt + torch.log(-torch.expm1(-dt)),
        prefix + "A_log": s4d_real(d_inner, d_state) + rand(d_inner, d_state, scale=0.1),
        prefix + "D": 1 + rand(d_inner, scale=0.1),
        prefix + "out_proj.weight": rand(d, d_inner),
    }


def lit_gpt_state_dict(n_head=4, n_kv=2, blocks=4, d=HIDDEN, vocab=VOCAB, inter=INTER, mlp=True, seed=0):
    """The reference code's state dict: even blocks Mamba, odd blocks attention with the fused QKV
    [(n_head + 2 n_kv) * head_dim, d], xformers SwiGLU w1/w2/w3, lm_head tied to wte."""
    rand = random_tensors(seed)
    head_dim = d // n_head
    sd = {"transformer.wte.weight": rand(vocab, d, scale=1.0)}
    for i in range(blocks):
        p = f"transformer.h.{i}."
        sd[p + "norm_1.weight"] = 1 + rand(d, scale=0.1)
        if i % 2 == 0:
            sd.update(mamba_tensors(rand, p + "attn.", d))
        else:
            sd[p + "attn.attn.weight"] = rand((n_head + 2 * n_kv) * head_dim, d)
            sd[p + "attn.proj.weight"] = rand(d, n_head * head_dim)
        if mlp:
            sd[p + "norm_2.weight"] = 1 + rand(d, scale=0.1)
            sd[p + "mlp.swiglu.w1.weight"] = rand(inter, d)
            sd[p + "mlp.swiglu.w2.weight"] = rand(inter, d)
            sd[p + "mlp.swiglu.w3.weight"] = rand(d, inter)
    sd["transformer.ln_f.weight"] = 1 + rand(d, scale=0.1)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # GPT.tie_weights shares the tensor
    return sd


def fla_state_dict(n_head=4, n_kv=2, layers=4, d=HIDDEN, tied=False, seed=1):
    """fla's SambaForCausalLM state dict: attention in odd layers, an MLP in every layer."""
    rand = random_tensors(seed)
    head_dim = d // n_head
    sd = {"backbone.embeddings.weight": rand(VOCAB, d, scale=1.0)}
    for i in range(layers):
        p = f"backbone.layers.{i}."
        sd[p + "mixer_norm.weight"] = 1 + rand(d, scale=0.1)
        if i % 2 == 0:
            sd.update(mamba_tensors(rand, p + "mixer.", d))
        else:
            sd[p + "mixer.q_proj.weight"] = rand(n_head * head_dim, d)
            sd[p + "mixer.k_proj.weight"] = rand(n_kv * head_dim, d)
            sd[p + "mixer.v_proj.weight"] = rand(n_kv * head_dim, d)
            sd[p + "mixer.o_proj.weight"] = rand(d, n_head * head_dim)
        sd[p + "mlp_norm.weight"] = 1 + rand(d, scale=0.1)
        sd[p + "mlp.gate_proj.weight"] = rand(INTER, d)
        sd[p + "mlp.up_proj.weight"] = rand(INTER, d)
        sd[p + "mlp.down_proj.weight"] = rand(d, INTER)
    sd["backbone.norm_f.weight"] = 1 + rand(d, scale=0.1)
    sd["lm_head.weight"] = sd["backbone.embeddings.weight"].clone() if tied else rand(VOCAB, d, scale=1.0)
    return sd


def prompt(batch=2, vocab=VOCAB):
    return torch.randint(0, vocab, (batch, LENGTH), generator=torch.Generator().manual_seed(123))


def samba_logits(folder, input_ids):
    model = SambaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


def assert_logits_close(actual, expected):
    # Logits here reach ~30; a wrong head order or window changes them by O(1).
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-5 * max(1.0, scale)


def save_training_checkpoint(path, state_dict, **hparams):
    torch.save(
        {"model": state_dict, "optimizer": {"state": {}}, "hparams": hparams, "iter_num": 10, "step_count": 1}, path
    )
    return path


def cli(*argv) -> int:
    """`samba-hf convert ...`'s exit code (argparse's own, for what it refuses itself)."""
    try:
        return samba_hf_main(["convert", *argv])
    except SystemExit as exit:
        return exit.code


# ---------------------------------------------------------------- lit-gpt (reference code)


@pytest.mark.parametrize("n_head, n_kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_lit_gpt_matches_reference_forward(tmp_path, n_head, n_kv):
    sd = lit_gpt_state_dict(n_head, n_kv)
    checkpoint = save_training_checkpoint(tmp_path / "iter-000010-ckpt.pth", sd, model_name="custom")
    out = convert_lit_gpt(checkpoint, tmp_path / "out", num_heads=n_head, num_kv_heads=n_kv, sliding_window=WINDOW)

    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["linear_attention", "sliding_attention"] * 2
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (n_head, n_kv, 8)
    assert config["tie_word_embeddings"] and config["sliding_window"] == WINDOW
    ids = prompt()
    assert_logits_close(samba_logits(out, ids), lit_gpt_forward(sd, ids, n_head, n_kv, WINDOW))


def test_lit_gpt_fused_qkv_row_order(tmp_path):
    """Query head g * q_per_kv + j is rows (g * (q_per_kv + 2) + j) * head_dim ... of the fused weight;
    group g's key and value heads follow its queries."""
    n_head, n_kv, head_dim = 4, 2, 8
    sd = lit_gpt_state_dict(n_head, n_kv)
    out = convert_lit_gpt(
        save_training_checkpoint(tmp_path / "c.pth", sd), tmp_path / "out", num_heads=n_head, num_kv_heads=n_kv
    )
    model = SambaForCausalLM.from_pretrained(out)
    fused, mixer = sd["transformer.h.1.attn.attn.weight"], model.model.layers[1].mixer
    q_per_kv = n_head // n_kv

    def rows(tensor, index):  # the head_dim rows of head `index`
        return tensor[index * head_dim : (index + 1) * head_dim]

    for g in range(n_kv):
        group_start = g * (q_per_kv + 2)  # in heads
        for j in range(q_per_kv):
            assert torch.equal(rows(mixer.q_proj.weight, g * q_per_kv + j), rows(fused, group_start + j))
        assert torch.equal(rows(mixer.k_proj.weight, g), rows(fused, group_start + q_per_kv))
        assert torch.equal(rows(mixer.v_proj.weight, g), rows(fused, group_start + q_per_kv + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lit_gpt_round_trip_is_bit_exact(tmp_path, dtype):
    sd = {key: value.to(dtype) for key, value in lit_gpt_state_dict(4, 2).items()}
    sd["transformer.h.0.attn.A_log"] = sd["transformer.h.0.attn.A_log"].float()  # the reference keeps A_log fp32
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    out = convert_lit_gpt(save_training_checkpoint(tmp_path / "c.pth", sd), tmp_path / "out", num_heads=4)
    back = torch.load(convert_to_lit_gpt(out, tmp_path / "back.pth"), weights_only=True)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_lit_gpt_untied_head_round_trip(tmp_path):
    sd = lit_gpt_state_dict(4, 2)
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 0.01
    out = convert_lit_gpt(save_training_checkpoint(tmp_path / "c.pth", sd), tmp_path / "out", num_heads=4)
    assert not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    ids = prompt()
    assert_logits_close(samba_logits(out, ids), lit_gpt_forward(sd, ids, 4, 2, 2048))
    back = torch.load(convert_to_lit_gpt(out, tmp_path / "back.pth"), weights_only=True)
    assert torch.equal(back["lm_head.weight"], sd["lm_head.weight"])


def test_lit_gpt_bare_safetensors_without_mlp(tmp_path):
    """A bare state dict in safetensors (no shared tensors there, so lm_head is a copy of wte), of the
    paper's Mamba-SWA ablation without MLPs; lm_head equal to wte means tied."""
    sd = lit_gpt_state_dict(4, 4, mlp=False)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors")
    out = convert_lit_gpt(tmp_path / "model.safetensors", tmp_path / "out", num_heads=4, sliding_window=WINDOW)
    config = json.loads((out / "config.json").read_text())
    assert config["use_mlp"] == [False] * 4 and config["tie_word_embeddings"]
    ids = prompt()
    assert_logits_close(samba_logits(out, ids), lit_gpt_forward(sd, ids, 4, 4, WINDOW))


def test_lit_gpt_heads_from_preset_and_one_flag(tmp_path):
    tiny = dict(n_head=4, n_kv=2, d=64, vocab=1024, inter=192)  # the shapes of the "tiny" preset
    checkpoint = save_training_checkpoint(tmp_path / "c.pth", lit_gpt_state_dict(**tiny))
    for name, kwargs in [("preset", {"preset": "tiny"}), ("kv", {"num_kv_heads": 2})]:
        out = convert_lit_gpt(checkpoint, tmp_path / name, **kwargs)
        config = json.loads((out / "config.json").read_text())
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    with pytest.raises(ConversionError, match="preset 'Samba_421M'"):
        convert_lit_gpt(checkpoint, tmp_path / "wrong", preset="Samba_421M")


def test_lit_gpt_bf16_output_keeps_A_log_fp32_and_verifies(tmp_path, capsys):
    checkpoint = save_training_checkpoint(tmp_path / "c.pth", lit_gpt_state_dict(4, 2))
    out = convert_lit_gpt(checkpoint, tmp_path / "out", num_heads=4, sliding_window=WINDOW, dtype="bf16", verify=True)
    assert "max |Δlogits|" in capsys.readouterr().out
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {key: f.get_tensor(key).dtype for key in f.keys()}
    assert {dtypes[k] for k in dtypes if k.endswith(("A_log", "mixer.D"))} == {torch.float32}
    assert {dtypes[k] for k in dtypes if not k.endswith(("A_log", "mixer.D"))} == {torch.bfloat16}


def corrupt(sd, kind):
    if kind == "missing":
        del sd["transformer.h.2.attn.conv1d.bias"]
        return "missing tensors: transformer.h.2.attn.conv1d.bias"
    if kind == "unexpected":
        sd["transformer.h.1.attn.rotary.inv_freq"] = torch.ones(4)
        return "unexpected tensors: transformer.h.1.attn.rotary.inv_freq"
    sd["transformer.h.3.mlp.swiglu.w2.weight"] = torch.zeros(INTER + 1, HIDDEN)
    return r"misshapen tensors: transformer.h.3.mlp.swiglu.w2.weight \[49, 32\]"


@pytest.mark.parametrize("kind", ["missing", "unexpected", "misshapen"])
def test_lit_gpt_bad_tensors_are_listed_and_nothing_is_written(tmp_path, kind):
    sd = lit_gpt_state_dict(4, 2)
    message = corrupt(sd, kind)
    with pytest.raises(ConversionError, match=message):
        convert_lit_gpt(save_training_checkpoint(tmp_path / "c.pth", sd), tmp_path / "out", num_heads=4)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no staging folder left behind


def test_lit_gpt_user_errors(tmp_path):
    checkpoint = save_training_checkpoint(tmp_path / "c.pth", lit_gpt_state_dict(4, 2))
    with pytest.raises(ConversionError, match="--num-heads"):
        convert_lit_gpt(checkpoint, tmp_path / "a")
    # Without flags, the training dict's hparams name the reference config (here one of other shapes).
    named = save_training_checkpoint(tmp_path / "named.pth", lit_gpt_state_dict(4, 2), model_name="Samba_421M")
    with pytest.raises(ConversionError, match="12 query heads and 12 key/value heads do not fit"):
        convert_lit_gpt(named, tmp_path / "a")
    with pytest.raises(ConversionError, match="unknown preset 'samba-9b'"):
        convert_lit_gpt(checkpoint, tmp_path / "b", preset="samba-9b")
    with pytest.raises(ConversionError, match="do not fit"):
        convert_lit_gpt(checkpoint, tmp_path / "c", num_heads=3)
    with pytest.raises(ConversionError, match="tolerance must be a finite number >= 0"):
        convert_lit_gpt(checkpoint, tmp_path / "d", num_heads=4, verify=True, tolerance=float("nan"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    for force in (False, True):  # a folder samba-hf did not write is never replaced
        with pytest.raises(OutputPathError, match="did not write"):
            convert_lit_gpt(checkpoint, tmp_path / "taken", num_heads=4, force=force)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    out = convert_lit_gpt(checkpoint, tmp_path / "ours", num_heads=4)
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputPathError, match="--force"):
        convert_lit_gpt(checkpoint, out, num_heads=4)
    convert_lit_gpt(checkpoint, out, num_heads=2, force=True)  # replaces its own files, keeps the user's
    assert (out / "keep.txt").read_text() == "user data"
    assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 2


# ---------------------------------------------------------------- CLI


def test_cli_verify_exit_codes(tmp_path, monkeypatch, capsys):
    checkpoint = str(save_training_checkpoint(tmp_path / "c.pth", lit_gpt_state_dict(4, 2)))
    flags = ["--num-heads", "4", "--sliding-window", "8", "--verify"]
    assert cli("lit-gpt", checkpoint, str(tmp_path / "ok"), *flags) == 0
    assert "max |Δlogits|" in capsys.readouterr().out

    # A source forward that disagrees (as a wrong conversion would) fails verification.
    reference = lit_gpt_module.lit_gpt_forward
    monkeypatch.setattr(lit_gpt_module, "lit_gpt_forward", lambda *a, **k: reference(*a, **k) + 0.01)
    assert cli("lit-gpt", checkpoint, str(tmp_path / "bad"), *flags) == 1
    assert "differ" in capsys.readouterr().err


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    checkpoint = str(save_training_checkpoint(tmp_path / "c.pth", lit_gpt_state_dict(4, 2)))
    for argv in (
        ["lit-gpt", checkpoint, str(tmp_path / "a")],  # no head counts
        ["lit-gpt", checkpoint, str(tmp_path / "a"), "--preset", "nope"],
        ["lit-gpt", str(tmp_path / "missing.pth"), str(tmp_path / "a"), "--num-heads", "4"],
        ["fla", str(tmp_path), str(tmp_path / "a")],  # a folder without weights
        ["transformers", str(tmp_path), str(tmp_path / "a")],  # no config.json
    ):
        assert cli(*argv) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"samba-hf convert {argv[0]}: error: ") and err.count("\n") == 1 and "Traceback" not in err
        )


@pytest.mark.parametrize("tolerance", ["nan", "-1", "inf"])
def test_cli_refuses_a_tolerance_that_passes_anything(tmp_path, capsys, tolerance):
    checkpoint = str(save_training_checkpoint(tmp_path / "c.pth", lit_gpt_state_dict(4, 2)))
    assert (
        cli("lit-gpt", checkpoint, str(tmp_path / "out"), "--num-heads", "4", "--verify", "--tolerance", tolerance)
        == 2
    )
    assert "--tolerance: must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_a_truncated_checkpoint_exits_3_in_one_line(tmp_path, capsys, kind):
    sd = lit_gpt_state_dict(4, 2)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    path = tmp_path / f"c.{kind}"
    save_file(sd, path) if kind == "safetensors" else torch.save(sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        convert_lit_gpt(path, tmp_path / "out", num_heads=4)
    assert cli("lit-gpt", str(path), str(tmp_path / "out"), "--num-heads", "4") == 3
    err = capsys.readouterr().err
    assert str(path) in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_legacy_torch_file_is_read_safely(tmp_path):
    """torch.save's pre-zip format cannot be memory-mapped; it is read whole, still with weights_only."""
    sd = lit_gpt_state_dict(4, 2)
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    out = convert_lit_gpt(tmp_path / "legacy.pth", tmp_path / "out", num_heads=4, sliding_window=WINDOW)
    ids = prompt()
    assert_logits_close(samba_logits(out, ids), lit_gpt_forward(sd, ids, 4, 2, WINDOW))


def test_a_torch_file_with_code_objects_is_refused(tmp_path, capsys):
    torch.save({"model": lit_gpt_state_dict(4, 2), "callback": Path}, tmp_path / "c.pth")
    assert cli("lit-gpt", str(tmp_path / "c.pth"), str(tmp_path / "out"), "--num-heads", "4") == 2
    assert "unpickling them runs code" in capsys.readouterr().err


def test_converted_folders_have_the_usual_permissions(tmp_path):
    out = convert_lit_gpt(
        save_training_checkpoint(tmp_path / "c.pth", lit_gpt_state_dict(4, 2)), tmp_path / "out", num_heads=4
    )
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_cli_round_trip(tmp_path):
    sd = lit_gpt_state_dict(4, 2)
    checkpoint = save_training_checkpoint(tmp_path / "c.pth", sd)
    assert cli("lit-gpt", str(checkpoint), str(tmp_path / "hf"), "--num-heads", "4", "--num-kv-heads", "2") == 0
    assert cli("to-lit-gpt", str(tmp_path / "hf"), str(tmp_path / "back.pth")) == 0
    assert cli("to-lit-gpt", str(tmp_path / "hf"), str(tmp_path / "back.pth")) == 2  # exists, no --force
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert all(torch.equal(back[key], value) for key, value in sd.items()) and len(back) == len(sd)
    assert cli("to-lit-gpt", str(tmp_path / "hf"), str(tmp_path / "hf" / "back.pth")) == 2  # inside the source
    assert not (tmp_path / "hf" / "back.pth").exists()


def test_to_lit_gpt_of_another_model_names_the_problem(tmp_path, capsys):
    TRANSFORMERS_SOURCES["llama"]().save_pretrained(tmp_path / "llama")
    assert cli("to-lit-gpt", str(tmp_path / "llama"), str(tmp_path / "out.pth")) == 2
    err = capsys.readouterr().err
    assert "holds a 'llama' model, not a samba-hf one" in err and "convert transformers" in err


# ---------------------------------------------------------------- flash-linear-attention


def write_fla_folder(folder, sd, **config):
    folder.mkdir()
    save_file(sd, folder / "model.safetensors")
    attn = {
        "layers": [1, 3],
        "num_heads": 4,
        "num_kv_heads": 2,
        "qkv_bias": False,
        "window_size": WINDOW,
        "rope_theta": 10000.0,
    }
    fla_config = {
        "model_type": "samba",
        "hidden_size": HIDDEN,
        "num_hidden_layers": 4,
        "norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "swish",
        "attn": attn,
        **config,
    }
    (folder / "config.json").write_text(json.dumps(fla_config))
    return folder


def save_tokenizer(folder):
    vocabulary = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


def test_fla_folder_untied_gqa_with_tokenizer(tmp_path):
    sd = fla_state_dict(4, 2)
    folder = write_fla_folder(tmp_path / "fla", sd)
    save_tokenizer(folder)
    out = convert_fla(folder, tmp_path / "out", verify=True)
    config = json.loads((out / "config.json").read_text())
    assert not config["tie_word_embeddings"] and config["num_key_value_heads"] == 2
    assert AutoTokenizer.from_pretrained(out)("w3 w5").input_ids == [3, 5]  # the folder's tokenizer came along
    ids = prompt()
    assert_logits_close(samba_logits(out, ids), fla_forward(sd, ids, 4, 2, WINDOW))


def test_fla_state_dict_file_with_flags_and_tied_head(tmp_path):
    sd = fla_state_dict(4, 4, tied=True)
    torch.save(sd, tmp_path / "fla.pt")
    with pytest.raises(ConversionError, match="--num-heads"):
        convert_fla(tmp_path / "fla.pt", tmp_path / "no-heads")
    out = convert_fla(tmp_path / "fla.pt", tmp_path / "out", num_heads=4, sliding_window=WINDOW)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"]  # lm_head equals the embedding
    ids = prompt()
    assert_logits_close(samba_logits(out, ids), fla_forward(sd, ids, 4, 4, WINDOW))


def test_fla_qkv_bias_is_refused(tmp_path):
    folder = write_fla_folder(tmp_path / "fla", fla_state_dict(), attn={"num_heads": 4, "qkv_bias": True})
    with pytest.raises(ConversionError, match="qkv_bias"):
        convert_fla(folder, tmp_path / "out")


# ---------------------------------------------------------------- transformers


def randomize_norms(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


TRANSFORMERS_SOURCES = {
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=WINDOW,
            rms_norm_eps=1e-5,
            attn_implementation="eager",
        )
    ),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            attn_implementation="eager",
        )
    ),
    "mamba": lambda: MambaForCausalLM(
        MambaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            state_size=8,
            num_hidden_layers=2,
            layer_norm_epsilon=1e-3,
            residual_in_fp32=False,
        )
    ),
}


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS_SOURCES))
def test_transformers_parity(kind):
    torch.manual_seed(0)
    source = randomize_norms(TRANSFORMERS_SOURCES[kind]())
    model = samba_from_transformers(source)
    model.set_attn_implementation("eager")
    ids = prompt()
    with torch.no_grad():
        expected, actual = source(ids, use_cache=False).logits, model(ids, use_cache=False).logits
    assert (actual - expected).abs().max().item() <= 1e-5
    expected_types = {"mistral": "sliding_attention", "llama": "full_attention", "mamba": "linear_attention"}[kind]
    assert set(model.config.layer_types) == {expected_types}
    assert model.config.tie_word_embeddings == source.config.tie_word_embeddings


def test_transformers_folder_cli_verify(tmp_path):
    torch.manual_seed(0)
    randomize_norms(TRANSFORMERS_SOURCES["mistral"]()).save_pretrained(tmp_path / "mistral")
    assert cli("transformers", str(tmp_path / "mistral"), str(tmp_path / "out"), "--verify") == 0
    ids = prompt()
    source = MistralForCausalLM.from_pretrained(tmp_path / "mistral", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (samba_logits(tmp_path / "out", ids) - source(ids).logits).abs().max().item() <= 1e-5


def test_transformers_unsupported_features_are_refused(tmp_path):
    sizes = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1, num_attention_heads=4
    )
    biased = LlamaForCausalLM(LlamaConfig(**sizes, attention_bias=True))
    with pytest.raises(ConversionError, match="attention_bias"):
        convert_transformers(biased, tmp_path / "out")
    gelu = MistralForCausalLM(MistralConfig(**sizes, hidden_act="gelu"))
    with pytest.raises(ConversionError, match="hidden_act"):
        convert_transformers(gelu, tmp_path / "out")
    assert not (tmp_path / "out").exists()
