import os

import pytest
import torch

# Without a GPU, samba_kernels' ops run their Triton kernels in Triton's interpreter when this is
# set; triton reads it when kernels are defined, so it must be set before samba_hf imports them.
# The model itself still takes the PyTorch references on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import samba_hf  # noqa: E402,F401  (registers the Auto classes)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
