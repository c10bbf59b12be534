"""The selective scan of earlier revisions against the working tree's, in one process on one GPU.

Each baseline's `kernels/samba_kernels` is taken from git (`git show REV:...`, or a folder holding
such a copy) into a temporary package with its own custom-op namespace, so that both versions load side by side; each is timed on
the same inputs, in alternation, twice. Each version's scan is also checked against the PyTorch
reference (fp32, packed documents). Writes the times as JSON.

    PYTHONPATH=kernels:benchmarks python benchmarks/scan_ab.py --baseline 7d3fe1c --baseline 82609bd --out ab.json
"""

import argparse
import contextlib
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import samba_kernels
from kernels import rel_err, scan_inputs, seq_idx_for, timer  # the sibling script (benchmarks/ on the path)

# (batch, Mamba channels (dim)); length 4096, bf16. 3072 and 4608 are samba-421m's and samba-1.3b's. The smaller
# batches take the lanes forward's smaller BLOCK_D (selective_scan.LANE_COST) and the backward's smaller BLOCK_D;
# batch 1 takes the forward that spreads steps over lanes (_scan_fwd_kernel).
SHAPES = [(8, 3072), (8, 4608), (8, 4096), (4, 3072), (2, 3072), (1, 3072)]
# (batch, dim) of the checks: few channels (the forward that spreads steps over lanes) and enough for the
# lanes forward at BLOCK_D 16, 8 and 32
CHECKS = [(2, 256), (8, 2176), (2, 3072), (8, 4096)]


def kernel_sources(baseline: str) -> dict[str, str]:
    """{file: source} of samba_kernels at a git revision, or in a folder (a copy made with
    `git show`, for a machine without the repository's history)."""
    folder = Path(baseline)
    if folder.is_dir():
        return {path.name: path.read_text() for path in folder.glob("*.py")}
    files = subprocess.run(["git", "ls-tree", "--name-only", f"{baseline}:kernels/samba_kernels"],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return {file: subprocess.run(["git", "show", f"{baseline}:kernels/samba_kernels/{file}"], capture_output=True,
                                 text=True, check=True).stdout for file in files if file.endswith(".py")}  # fmt: skip


def import_baseline(baseline: str, root: Path):
    """samba_kernels at `baseline` as its own package (and custom-op namespace) under root."""
    name = "samba_kernels_" + "".join(c if c.isalnum() else "_" for c in Path(baseline).name)
    package = root / name
    package.mkdir()
    for file, source in kernel_sources(baseline).items():
        source = source.replace("samba_kernels::", f"{name}::").replace("from samba_kernels", f"from {name}")
        (package / file).write_text(source)
    return importlib.import_module(name)


def check(module, batch: int, dim: int) -> float:
    """Worst relative error of the outputs and gradients against the reference (fp32)."""
    inputs = scan_inputs(batch, dim, 1000, "cuda", torch.float32, True, extras=True)
    seq_idx = seq_idx_for(batch, 1000, "cuda")
    dy = torch.randn_like(inputs["u"])
    results = []
    for scan in (module.selective_scan_fn, module.selective_scan_ref):
        tensors = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        out = scan(**tensors, delta_softplus=True, seq_idx=seq_idx)
        results.append([out, *torch.autograd.grad(out, list(tensors.values()), dy)])
    return max(rel_err(a, b) for a, b in zip(*results))


def ab_arguments(default_out: str) -> argparse.Namespace:
    """The A/B scripts' arguments: --baseline (repeatable) and --out."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", action="append", required=True,
                        help="a git revision, or a folder with its samba_kernels files (repeatable)")
    parser.add_argument("--out", default=default_out)
    return parser.parse_args()


@contextlib.contextmanager
def side_by_side(baselines: list[str]):
    """{version: samba_kernels module}: each baseline imported as its own package, then the working tree's."""
    with tempfile.TemporaryDirectory() as root:
        sys.path.insert(0, root)
        versions = {baseline: import_baseline(baseline, Path(root)) for baseline in baselines}
        yield {**versions, "working tree": samba_kernels}


def main():
    args = ab_arguments("scan_ab.json")
    measure = timer("cuda")
    with side_by_side(args.baseline) as versions:
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "check": {version: {f"batch {b} dim {d}": check(module, b, d) for b, d in CHECKS}
                            for version, module in versions.items()}, "times_ms": {}}  # fmt: skip
        print("worst relative errors against the reference:", result["check"], flush=True)
        for batch, dim in SHAPES:
            t = scan_inputs(batch, dim, 4096, "cuda", torch.bfloat16, True)
            dy = torch.randn_like(t["u"])
            detached = {k: v.detach() for k, v in t.items()}
            for repeat in range(2):
                for version, module in versions.items():
                    fwd = lambda m=module: m.selective_scan_fn(**detached, delta_softplus=True)  # noqa: E731
                    fwd_bwd = lambda m=module: torch.autograd.grad(  # noqa: E731
                        m.selective_scan_fn(**t, delta_softplus=True), list(t.values()), dy)
                    times = {"fwd": measure(fwd), "fwd+bwd": measure(fwd_bwd)}
                    result["times_ms"][f"batch {batch} dim {dim} {version} #{repeat + 1}"] = times
                    print(batch, dim, version, repeat + 1, times, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
