import os

import pytest
import torch

# Without a GPU, samba_kernels' ops run their Triton kernels in Triton's interpreter when this is
# set; triton reads it when kernels are defined, so it is set before any test module imports them.
# The model itself still takes the PyTorch references on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
