import pytest
import torch

import samba_hf  # noqa: F401  (registers the Auto classes)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
