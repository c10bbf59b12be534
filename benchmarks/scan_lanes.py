"""The lanes forward at each BLOCK_D, for selective_scan.LANE_COST. Each BLOCK_D is forced in turn at shapes
whose warps give the SM sub-partitions different numbers of turns; a warp's time is the forward's time over
ceil(warps / sub-partitions), and LANE_COST is its median over the shapes relative to BLOCK_D 32's. Then,
at batch 1 (fewer warps than sub-partitions), the lanes forward forced at BLOCK_D 8 against _scan_fwd_kernel.
bf16, length 4096, d_state 16, the inputs of kernels.py. Writes the times and the relative costs as JSON.

    PYTHONPATH=kernels:benchmarks python benchmarks/scan_lanes.py --out scan_lanes.json
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton

from kernels import scan_inputs, timer  # the sibling script (benchmarks/ on the path)
from samba_kernels import selective_scan as ss

SHAPES = [(8, 3072), (8, 4096), (8, 4608), (16, 3072)]  # (batch, dim)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="scan_lanes.json")
    out = parser.parse_args().out
    measure = timer("cuda")
    slots = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "sub_partitions": slots, "lane_cost_in_use": ss.LANE_COST, "times_ms": {}}
    per_turn = {bd: [] for bd in ss.LANE_COST}
    chooser = ss._lanes_block
    try:
        for batch, dim in SHAPES:
            t = scan_inputs(batch, dim, 4096, "cuda", torch.bfloat16)
            for bd in ss.LANE_COST:
                ss._lanes_block = lambda n_rows, dpg, device, bd=bd: bd  # noqa: E731
                ms = measure(lambda: ss.selective_scan_fn(**t, delta_softplus=True))
                turns = triton.cdiv(batch * triton.cdiv(dim, bd), slots)
                per_turn[bd].append(ms / turns)
                result["times_ms"][f"batch {batch} dim {dim} BLOCK_D {bd}"] = dict(ms=ms, turns=turns)
                print(batch, dim, bd, ms, turns, flush=True)
        for dim in (3072, 4096):
            t = scan_inputs(1, dim, 4096, "cuda", torch.bfloat16)
            for bd in (None, 8):
                ss._lanes_block = lambda n_rows, dpg, device, bd=bd: bd  # noqa: E731
                ms = measure(lambda: ss.selective_scan_fn(**t, delta_softplus=True))
                result["times_ms"][f"batch 1 dim {dim} " + ("_scan_fwd_kernel" if bd is None else f"BLOCK_D {bd}")] = ms
                print(1, dim, bd, ms, flush=True)
    finally:
        ss._lanes_block = chooser
    result["lane_cost_measured"] = {bd: statistics.median(a / b for a, b in zip(times, per_turn[32]))
                                    for bd, times in per_turn.items()}
    print(result["lane_cost_measured"])
    Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
