"""bitsandbytes loading replaces every projection (they are plain nn.Linear), and the model runs on them: 4-bit
gives the logits of the model whose weights are their dequantized values, 8-bit stays near full precision,
and generate() on a quantized model runs transformers' loop."""

import pytest
import torch

from samba_hf import SambaConfig, SambaForCausalLM

from ..helpers import load_quantized

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("bits", [4, 8])
@torch.no_grad()
def test_bitsandbytes_replaces_every_projection(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = SambaForCausalLM(SambaConfig.from_preset("tiny")).eval()
    quantized, reference = load_quantized(model, tmp_path, bits, "cuda")
    ids = torch.randint(3, 1000, (2, 40), device="cuda")
    logits, expected = quantized(ids).logits.float(), reference(ids).logits.float()
    if bits == 4:
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    else:
        assert ((logits - expected).norm() / expected.norm()).item() < 0.1
    generated = quantized.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 48)
