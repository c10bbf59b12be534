"""A decode step's embedding lookup (samba_kernels.embedding) against rows picked one by one."""

import pytest
import torch

import samba_kernels
from samba_kernels.embedding import kernel

from .common import DEVICE, forbid_kernels_on_the_cpu, gen


@pytest.mark.parametrize("hidden", [48, 1500])  # one block of columns, and two (the kernel's block is 1024 wide)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_each_row_is_its_tokens_weight_row_in_the_output_dtype(hidden, out_dtype):
    g = gen(hidden)
    weight = torch.randn(101, hidden, generator=g).to(torch.bfloat16)
    # tokens as the decode engine keeps them: one column of a wider buffer, the first and last ids among them
    buffer = torch.randint(0, 101, (3, 5), generator=g)
    buffer[0, 2], buffer[1, 2] = 0, 100
    out = torch.full((3, hidden), float("nan"), dtype=out_dtype)
    out, weight, tokens = out.to(DEVICE), weight.to(DEVICE), buffer.to(DEVICE)[:, 2:3]
    samba_kernels.embedding_rows_(weight, tokens, out)
    expected = torch.stack([weight[int(token)].to(out_dtype) for token in buffer[:, 2]])
    assert torch.equal(out.cpu(), expected.cpu())


def test_embedding_rows_runs_the_reference_on_the_cpu_without_the_interpreter(monkeypatch):
    forbid_kernels_on_the_cpu(monkeypatch, kernel, "_embedding_rows_kernel")
    weight, out = torch.arange(12.0).reshape(4, 3), torch.zeros(2, 3)
    kernel.embedding_rows_(weight, torch.tensor([3, 1]), out)
    assert out.tolist() == [[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]]


def test_embedding_rows_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[vocab, 3\]"):
        samba_kernels.embedding_rows_(torch.zeros(4, 5), torch.tensor([0, 1]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[2\] or \[2, 1\]"):
        samba_kernels.embedding_rows_(torch.zeros(4, 3), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3))
