import pytest
import torch
from transformers import AutoConfig, DynamicCache
from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

from samba_hf import PRESETS, SambaConfig, SambaForCausalLM

from .helpers import small_config


def test_minimal_arguments_give_an_alternating_samba():
    config = small_config()
    assert config.layer_types == ["linear_attention", "sliding_attention"] * 2
    assert config.use_mlp == [True] * 4
    assert config.head_dim == 8 and config.time_step_rank == 2  # ceil(32 / 16)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-5 and config.sliding_window == 8


def test_rope_theta_keyword_is_accepted():
    assert small_config(rope_theta=500.0).rope_parameters["rope_theta"] == 500.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(layer_types=["mamba"] * 4), "layer_types"),
        (dict(layer_types=["linear_attention"] * 3), "layer_types"),
        (dict(use_mlp=[True, False]), "use_mlp"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(head_dim=7), "head_dim"),
        (dict(expand=0), "expand"),
        (dict(time_step_min=0.5, time_step_max=0.1), "time_step_min"),
        (dict(kernel_implementation="cuda"), "kernel_implementation"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


def test_hybrid_cache_is_built_natively_from_layer_types():
    config = small_config(layer_types=["linear_attention", "sliding_attention", "mlp", "full_attention"])
    layer_classes = [type(layer) for layer in DynamicCache(config=config).layers]
    assert layer_classes == [LinearAttentionLayer, DynamicSlidingWindowLayer, DummyLayer, DynamicLayer]


ABLATIONS = {
    "samba": dict(),
    "samba-nope": dict(use_rope=False),
    "mamba": dict(layer_types=["linear_attention"] * 4, use_mlp=False),
    "llama": dict(layer_types=["full_attention"] * 4),
    "mistral (llama-swa)": dict(layer_types=["sliding_attention"] * 4),
    "mamba-swa-mlp": dict(use_mlp=[False, True, False, True]),
    "mlp2-swa-mlp": dict(layer_types=["mlp", "sliding_attention"] * 2, use_mlp=[False, True, False, True]),
    "samba + one full attention layer": dict(
        layer_types=["linear_attention", "full_attention", "linear_attention", "sliding_attention"]
    ),
}


@pytest.mark.parametrize("name", ABLATIONS)
def test_paper_ablations_build_and_run(name):
    model = SambaForCausalLM(small_config(**ABLATIONS[name]))
    ids = torch.randint(0, 97, (2, 11))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    has_grad = [p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()]
    assert all(has_grad), "every parameter takes part in the forward"


def test_layers_without_mlp_have_no_mlp_parameters():
    model = SambaForCausalLM(small_config(use_mlp=[False, True, False, True]))
    assert model.model.layers[0].mlp is None and model.model.layers[1].mlp is not None
    assert not any(".0.mlp" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("preset, expected", [("samba-421m", 421.79e6), ("samba-1.3b", 1.330e9)])
def test_preset_parameter_counts_match_the_paper(preset, expected):
    with torch.device("meta"):
        model = SambaForCausalLM(SambaConfig.from_preset(preset))
    assert model.num_parameters() == pytest.approx(expected, rel=0.005)


@pytest.mark.parametrize("preset", ["samba-1.7b", "samba-3.8b"])
def test_larger_presets_build(preset):
    with torch.device("meta"):
        model = SambaForCausalLM(SambaConfig.from_preset(preset))
    expected = {"samba-1.7b": 1.74e9, "samba-3.8b": 3.86e9}[preset]
    assert model.num_parameters() == pytest.approx(expected, rel=0.03)


def test_presets_accept_overrides_and_reject_unknown_names():
    assert SambaConfig.from_preset("tiny", vocab_size=321).vocab_size == 321
    assert set(PRESETS) >= {"samba-421m", "samba-1.3b", "samba-1.7b", "samba-3.8b", "tiny"}
    with pytest.raises(ValueError, match="samba-421m"):
        SambaConfig.from_preset("samba-7b")


def test_config_round_trips_through_auto_config(tmp_path):
    config = small_config(layer_types=["mlp", "sliding_attention"] * 2, use_mlp=[False, True] * 2, use_rope=False)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SambaConfig)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}
    assert loaded.layer_types == config.layer_types and loaded.use_mlp == config.use_mlp
