"""mamba-ssm's CUDA selective scan, built from its source distribution for this machine's GPU alone, and an
autograd function around it: the kernels suite times it beside samba_kernels' scan in one process.

    bash benchmarks/fetch_mamba_ssm.sh               # once, where PyPI is reachable: .mamba_ssm_src/
    MAMBA_SSM_CSRC=.mamba_ssm_src/mamba_ssm-2.3.2.post1/csrc/selective_scan python -m benchmarks.mamba_ssm_cuda

`load()` compiles `selective_scan_cuda` with torch.utils.cpp_extension (ninja, MAX_JOBS jobs, default 16) for the
compute capability of GPU 0 only (TORCH_CUDA_ARCH_LIST, unless set), with the sources and nvcc flags of
mamba-ssm's setup.py. The build folder (torch's extensions cache, or MAMBA_SSM_BUILD) is reused while the sources
do not change. Compiling needs nvcc (CUDA_HOME).
"""

import functools
import os
import sys
import time
from pathlib import Path

import torch

ENV_SOURCES, ENV_BUILD = "MAMBA_SSM_CSRC", "MAMBA_SSM_BUILD"
# mamba-ssm 2.3.2.post1's setup.py: the extension's sources and its nvcc flags (without the per-architecture
# -gencode list, which TORCH_CUDA_ARCH_LIST gives, and without ptxas's verbose report).
SOURCES = (
    "selective_scan.cpp",
    "selective_scan_fwd_fp32.cu",
    "selective_scan_fwd_fp16.cu",
    "selective_scan_fwd_bf16.cu",
    "selective_scan_bwd_fp32_real.cu",
    "selective_scan_bwd_fp32_complex.cu",
    "selective_scan_bwd_fp16_real.cu",
    "selective_scan_bwd_fp16_complex.cu",
    "selective_scan_bwd_bf16_real.cu",
    "selective_scan_bwd_bf16_complex.cu",
)
CXX_FLAGS = ("-O3", "-std=c++17")
NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "-lineinfo",
    "--threads",
    "4",
)


class Unavailable(RuntimeError):
    """mamba-ssm's extension cannot be built or loaded here; the message says why and what to do."""


def source_dir() -> Path:
    """The `csrc/selective_scan` folder named by MAMBA_SSM_CSRC, checked to hold every source."""
    if not os.environ.get(ENV_SOURCES):
        raise Unavailable(
            f"{ENV_SOURCES} is not set: run benchmarks/fetch_mamba_ssm.sh and point {ENV_SOURCES} at "
            f"the csrc/selective_scan folder it extracts"
        )
    folder = Path(os.environ[ENV_SOURCES]).resolve()
    missing = [name for name in SOURCES if not (folder / name).is_file()]
    if missing:
        raise Unavailable(
            f"{ENV_SOURCES}={folder} lacks {', '.join(missing)}: it must be mamba-ssm's csrc/selective_scan folder"
        )
    return folder


def version(folder: Path) -> str | None:
    """The version in the sdist's PKG-INFO two folders up (fetch_mamba_ssm.sh keeps it), if there."""
    info = folder.parent.parent / "PKG-INFO"
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


@functools.cache
def load(verbose: bool = False):
    """(the compiled `selective_scan_cuda` module, build seconds, version); raises Unavailable."""
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA device: mamba-ssm's extension runs on NVIDIA GPUs only")
    from torch.utils.cpp_extension import CUDA_HOME
    from torch.utils.cpp_extension import load as load_extension

    if CUDA_HOME is None:
        raise Unavailable("no CUDA toolkit (nvcc) found: set CUDA_HOME")
    folder = source_dir()
    major, minor = torch.cuda.get_device_capability(0)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    os.environ.setdefault("MAX_JOBS", "16")
    build = os.environ.get(ENV_BUILD)
    if build:
        Path(build).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    module = load_extension(
        name="selective_scan_cuda",
        sources=[str(folder / name) for name in SOURCES],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        extra_include_paths=[str(folder)],
        build_directory=build,
        verbose=verbose,
    )
    return module, time.perf_counter() - start, version(folder)


class SelectiveScan(torch.autograd.Function):
    """y = mamba-ssm's selective scan of (u, delta, A, B, C, D, z, delta_bias) with delta's softplus as asked,
    gated by silu(z): the semantics of samba_kernels.selective_scan_fn without initial state or packed documents.

    `extension` is the compiled module. Its forward takes B and C as (batch, groups, d_state, length) and returns
    [out, states per chunk, out * silu(z)]; its backward takes (..., dout, states, out, dz=None, softplus,
    recompute_out_z) and returns [du, ddelta, dA, dB, dC, dD, ddelta_bias, dz]."""

    @staticmethod
    def forward(ctx, extension, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        ctx.ungrouped = B.dim() == 3  # (batch, d_state, length): one group, added for the kernel
        u, delta, z = (t.contiguous() for t in (u, delta, z))
        B, C = (t.unsqueeze(1).contiguous() if ctx.ungrouped else t.contiguous() for t in (B, C))
        out, states, out_z = extension.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, out)
        ctx.extension, ctx.delta_softplus = extension, delta_softplus
        return out_z

    @staticmethod
    def backward(ctx, grad_out):
        u, delta, A, B, C, D, z, delta_bias, states, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, dz = ctx.extension.bwd(
            u, delta, A, B, C, D, z, delta_bias, grad_out.contiguous(), states, out, None, ctx.delta_softplus, False
        )[:8]
        if ctx.ungrouped:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        return None, du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None


def selective_scan(extension, u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """mamba-ssm's scan with z, D and delta_bias; u, delta, z (batch, dim, length), A (dim, d_state) float32,
    B, C (batch, d_state, length) or (batch, groups, d_state, length), D and delta_bias (dim,) float32."""
    return SelectiveScan.apply(extension, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


if __name__ == "__main__":
    try:
        _, seconds, found = load(verbose="-v" in sys.argv)
    except Unavailable as error:
        sys.exit(f"mamba-ssm: {error}")
    print(f"mamba-ssm {found or '(version unknown)'}: selective_scan_cuda ready after {seconds:.0f} s")
