"""Small random Samba models for the tests."""

import torch

from samba_hf import SambaConfig, SambaForCausalLM


def small_config(**overrides) -> SambaConfig:
    """The smallest Samba the foundation issue asks to work, with any field overridden."""
    fields = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, eos_token_id=None,
    )  # fmt: skip
    return SambaConfig(**{**fields, **overrides})


def small_model(seed: int = 0, model_class=SambaForCausalLM, **overrides):
    torch.manual_seed(seed)
    model = model_class(small_config(**overrides)).eval()
    # The reference initialisation makes dt tiny and the residual writers small; randomise
    # everything so that the tests exercise every term at a visible scale.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("A_log"):
                parameter.copy_(torch.randn_like(parameter).abs().log1p())
            elif name.endswith("dt_proj.bias"):
                parameter.copy_(torch.randn_like(parameter) - 1.0)
            elif "norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
    return model
