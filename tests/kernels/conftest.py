import pytest
import torch

import samba_kernels

from .common import DEVICE


@pytest.fixture(autouse=True)
def _kernels_on():
    if not samba_kernels.use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("TRITON_INTERPRET is off and there is no GPU: the ops would run the references")
