"""The scan backward's NU and register cap (selective_scan._bwd_occupancy) forced in turn, for its rule: at each
shape, forward+backward with each (NU, maxnreg) of CONFIGS, and the one the rule picks. bf16, length 4096,
d_state 16, the inputs of kernels.py. A cap decides how many one-warp programs an SM holds (168 registers: 12,
144: 14, 128: 16, 112: 18), so whether the grid's warps are resident at once. Writes the times as JSON.

    PYTHONPATH=kernels:benchmarks python benchmarks/scan_bwd_occupancy.py --out scan_bwd_occupancy.json
    PYTHONPATH=kernels:benchmarks python benchmarks/scan_bwd_occupancy.py --configs 4,168 4,128 8,168 8,128 2,168 1,168 \
        --out scan_bwd_occupancy_nu8.json
"""

import argparse
import json
from pathlib import Path

import torch
import triton

from kernels import scan_inputs, timer  # the sibling script (benchmarks/ on the path)
from samba_kernels import selective_scan as ss

SHAPES = [(8, 3072), (8, 4096), (8, 4608), (4, 3072), (2, 3072)]  # (batch, dim); BLOCK_D 16, 16, 16, 8, 4
CONFIGS = [(1, 168), (4, 168), (4, 144), (4, 128), (1, 128), (4, 112)]  # (NU, maxnreg)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="scan_bwd_occupancy.json")
    parser.add_argument("--configs", nargs="+", metavar="NU,MAXNREG", help="instead of CONFIGS")
    args = parser.parse_args()
    configs = [tuple(map(int, pair.split(","))) for pair in args.configs] if args.configs else CONFIGS
    measure = timer("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "register_caps_in_use": ss.BWD_REGISTER_CAPS, "times_ms": {}, "chosen": {}}
    rule = ss._bwd_occupancy
    try:
        for batch, dim in SHAPES:
            t = scan_inputs(batch, dim, 4096, "cuda", torch.bfloat16, requires_grad=True)
            dy = torch.randn_like(t["u"])
            fwd_bwd = lambda: torch.autograd.grad(ss.selective_scan_fn(**t, delta_softplus=True), list(t.values()), dy)  # noqa: E731
            backward = ss._configs(t["u"], t["B"].unsqueeze(1), 16, True)[3]
            result["chosen"][f"batch {batch} dim {dim}"] = backward
            for nu, cap in configs:
                ss._bwd_occupancy = lambda meta, n_programs, N, device, nu=nu, cap=cap: dict(NU=nu, maxnreg=cap)  # noqa: E731
                ms = measure(fwd_bwd)
                result["times_ms"][f"batch {batch} dim {dim} NU {nu} maxnreg {cap}"] = ms
                print(batch, dim, nu, cap, round(ms, 3), flush=True)
            ss._bwd_occupancy = rule
            result["times_ms"][f"batch {batch} dim {dim} chosen"] = measure(fwd_bwd)
            print(batch, dim, "chosen", backward, round(result["times_ms"][f"batch {batch} dim {dim} chosen"], 3),
                  flush=True)
    finally:
        ss._bwd_occupancy = rule
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
