"""Small random Samba models on the GPU, and what the GPU tests share."""

import torch

from benchmarks.models import generate_takes_decode_engine
from samba_hf import SambaConfig, SambaForCausalLM

__all__ = ["FLOAT32_TOLERANCE", "generate_takes_decode_engine", "random_model", "relative_error"]

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
