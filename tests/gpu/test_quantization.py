"""bitsandbytes loading replaces every projection (they are plain nn.Linear), and the model runs on them: 4-bit
gives the logits of the model whose weights are their dequantized values, 8-bit stays near full precision,
and generate() on a quantized model runs transformers' loop."""

import pytest
import torch
from torch import nn

from samba_hf import SambaConfig, SambaForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("bits", [4, 8])
@torch.no_grad()
def test_bitsandbytes_replaces_every_projection(bits, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    model = SambaForCausalLM(SambaConfig.from_preset("tiny")).eval()
    model.save_pretrained(tmp_path)
    quantization = (
        BitsAndBytesConfig(load_in_8bit=True)
        if bits == 8
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cuda")
    layer_type = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    linears = {name: module for name, module in quantized.named_modules() if isinstance(module, nn.Linear)}
    assert {name for name, module in linears.items() if not isinstance(module, layer_type)} == {"lm_head"}
    ids = torch.randint(3, 1000, (2, 40), device="cuda")
    logits = quantized(ids).logits.float()
    model = model.cuda()
    if bits == 4:
        for name, module in linears.items():
            if isinstance(module, layer_type):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                model.get_submodule(name).weight.copy_(weight)
        torch.testing.assert_close(logits, model(ids).logits.float(), rtol=1e-4, atol=1e-4)
    else:
        expected = model(ids).logits.float()
        assert ((logits - expected).norm() / expected.norm()).item() < 0.1
    generated = quantized.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 48)
