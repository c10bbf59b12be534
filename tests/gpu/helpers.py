"""Small random Samba models on the GPU, and what the GPU tests share."""

import torch

from samba_hf import SambaConfig, SambaForCausalLM

# Relative error that the Triton kernel path and the PyTorch path stay within in float32 (different summation
# orders; measured around 1e-6).
FLOAT32_TOLERANCE = 1e-5


def random_model(implementation: str = "auto", seed: int = 0) -> SambaForCausalLM:
    """A 4-layer Samba (width 96, window 64) on the GPU in float32, with visible time steps (the reference
    initialisation makes them tiny)."""
    torch.manual_seed(seed)
    config = SambaConfig.from_preset(
        "tiny", hidden_size=96, num_hidden_layers=4, sliding_window=64, kernel_implementation=implementation
    )
    model = SambaForCausalLM(config).cuda().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("dt_proj.bias"):
                parameter.copy_(torch.randn_like(parameter) - 1.0)
    return model


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double(), expected.double()
    return ((got - expected).norm() / expected.norm()).item()


def generate_takes_decode_engine(model) -> bool:
    """Whether generate() has samba-hf's decode engine (and so its `decode_engine` switch)."""
    prompt = torch.zeros(1, 4, dtype=torch.long, device=model.device)
    try:
        model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0, decode_engine=False)
    except ValueError as error:  # transformers refuses model keywords it does not use, naming them
        if "decode_engine" in str(error):
            return False
        raise
    return True
