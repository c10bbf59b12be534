"""The causal conv1d's forward+backward of earlier revisions against the working tree's, in one process
on one GPU: batch 8, length 4096, width 4, with bias and SiLU (as the Mamba mixer calls it), bf16 at
samba-421m's and samba-1.3b's widths, timed in alternation, twice. Each version's gradients (dx,
dweight, dbias) are also compared with the PyTorch reference's, in float32 over packed documents.
Baselines as in scan_ab.py: git revisions, or folders holding a copy of their samba_kernels files.
Writes the errors and times as JSON.

    PYTHONPATH=kernels:benchmarks python benchmarks/conv_ab.py --baseline 20ddf4c --out conv_ab.json
"""

import json
from pathlib import Path

import torch
from scan_ab import ab_arguments, side_by_side

import samba_kernels
from kernels import rel_err, timer  # the sibling scripts (benchmarks/ on the path)

SHAPES = {"samba-421m": 3072, "samba-1.3b": 4608}  # Mamba channels, as in kernels.py


def conv_inputs(dim: int, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(dim)
    return dict(x=torch.randn(8, dim, 4096, device="cuda", dtype=dtype, generator=g),
                weight=(torch.randn(dim, 4, device="cuda", generator=g) * 0.5).to(dtype),
                bias=torch.randn(dim, device="cuda", generator=g).to(dtype))  # fmt: skip


def gradients(conv, inputs: dict, dy: torch.Tensor, seq_idx=None) -> tuple:
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    out = conv(**leaves, seq_idx=seq_idx, activation="silu")
    return torch.autograd.grad(out, list(leaves.values()), dy)


def main():
    args = ab_arguments("conv_ab.json")
    measure = timer("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "relative_error_against_reference": {}, "times_ms": {}}
    with side_by_side(args.baseline) as versions:
        inputs = conv_inputs(512, torch.float32)  # the check: float32, three documents per row
        dy = torch.randn_like(inputs["x"])
        seq_idx = (torch.arange(4096, device="cuda") // 1500).to(torch.int32).expand(8, -1).contiguous()
        reference = gradients(samba_kernels.causal_conv1d_ref, inputs, dy, seq_idx)
        for name, module in versions.items():
            grads = gradients(module.causal_conv1d_fn, inputs, dy, seq_idx)
            result["relative_error_against_reference"][name] = max(map(rel_err, grads, reference))
        print("worst relative errors of dx, dweight, dbias:", result["relative_error_against_reference"], flush=True)
        for model, dim in SHAPES.items():
            inputs = conv_inputs(dim, torch.bfloat16)
            dy = torch.randn_like(inputs["x"])
            for repeat in range(2):
                for name, module in versions.items():
                    ms = measure(lambda m=module: gradients(m.causal_conv1d_fn, inputs, dy))
                    result["times_ms"][f"{model} {name} #{repeat + 1}"] = ms
                    print(model, name, repeat + 1, round(ms, 3), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
