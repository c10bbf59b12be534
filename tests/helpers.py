"""Small random Samba models for the tests."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from samba_hf import SambaConfig, SambaForCausalLM


def small_config(**overrides) -> SambaConfig:
    """The smallest Samba the foundation issue asks to work, with any field overridden."""
    fields = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        eos_token_id=None,
    )
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


def random_ids(batch: int = 2, length: int = 19, seed: int = 0, vocab_size: int = 97) -> torch.Tensor:
    """Token ids that avoid 0, the pad token of the tests that pad."""
    return torch.randint(1, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one left-padded batch (pad 0) and its attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.stack([F.pad(row, (width - len(row), 0), value=0) for row in rows])
    mask = torch.stack([F.pad(torch.ones_like(row), (width - len(row), 0)) for row in rows])
    return ids, mask


def main_output(model, **inputs) -> torch.Tensor:
    """The first output of a forward without gradients: hidden states, LM logits or class logits."""
    with torch.no_grad():
        return model(**inputs)[0]


def fp32_rule_breaks(model, half: torch.dtype) -> dict:
    """Floating tensors whose dtype breaks the half-precision rule: float32 for the parameters named in
    `_keep_in_fp32_modules_strict`, `half` for the others."""
    strict = model._keep_in_fp32_modules_strict
    wrong = {}
    for name, tensor in model.state_dict().items():
        expected = torch.float32 if any(name.endswith("." + pattern) for pattern in strict) else half
        if tensor.is_floating_point() and tensor.dtype != expected:
            wrong[name] = tensor.dtype
    return wrong


@torch.no_grad()
def load_quantized(model, folder, bits: int, device: str):
    """`model` saved to `folder` and loaded back by transformers with bitsandbytes in `bits` bits on `device`;
    every projection must hold bitsandbytes' layer (transformers keeps the tied output head in full precision).
    Returns (the quantized model, `model` on `device` as the reference: for 4-bit its projections hold their
    dequantized weights, so the logits must match; for 8-bit unchanged, as LLM.int8 quantizes activations too)."""
    import bitsandbytes as bnb

    model.save_pretrained(folder)
    quantization = (
        BitsAndBytesConfig(load_in_8bit=True)
        if bits == 8
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map=device)
    layer_type = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    linears = {name: module for name, module in quantized.named_modules() if isinstance(module, nn.Linear)}
    assert {name for name, module in linears.items() if not isinstance(module, layer_type)} == {"lm_head"}
    reference = model.to(device)
    if bits == 4:
        for name, module in linears.items():
            if isinstance(module, layer_type):
                dequantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                reference.get_submodule(name).weight.copy_(dequantized)
    return quantized, reference
