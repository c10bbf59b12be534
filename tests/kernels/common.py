"""What the kernel tests share: the device, the tolerance, seeded inputs and the check of outputs and gradients
against a reference.

Without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before anything
imports triton, which reads it when the kernels are defined. So sizes are tiny.
"""

import torch

import samba_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-4, atol=2e-4)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape):
    return torch.randn(*shape, generator=g).to(DEVICE)


def random_seq_idx(g, batch, length, cuts=()):
    """Random packed-document ids (batch, length), with documents also starting at `cuts`."""
    starts = torch.rand(batch, length, generator=g) < 0.1
    starts[:, list(cuts)] = True
    starts[:, 0] = False
    return torch.cumsum(starts, dim=-1).to(torch.int32).to(DEVICE)


def assert_grads_match(out, out_ref, inputs, g):
    outs, refs = (out, out_ref) if isinstance(out, tuple) else ((out,), (out_ref,))
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, **TOL)
    cotangents = [randn(g, *o.shape) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cotangents)
    grads_ref = torch.autograd.grad(refs, inputs, cotangents)
    for x, gr, gr_ref in zip(inputs, grads, grads_ref):
        assert gr.shape == x.shape and gr.dtype == x.dtype
        torch.testing.assert_close(gr, gr_ref, **TOL)


def forbid_kernels_on_the_cpu(monkeypatch, kernel_module, launcher):
    """CPU tensors without TRITON_INTERPRET: `use_triton` says no, and `kernel_module`'s `launcher` fails the test
    if it is reached (the module's own `use_triton` is the real one only for CUDA tensors)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not samba_kernels.use_triton(torch.zeros(1))

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(kernel_module, "use_triton", lambda x: x.is_cuda)
    monkeypatch.setattr(kernel_module, launcher, no_kernel)
