"""The selective scan's forward of inference (no gradients) of earlier revisions against the working
tree's, in one process on one GPU, at batch x dim shapes of length 4096 (bf16, d_state 16, with z, D,
delta_bias and softplus). Each version's output and last state are compared with the first baseline's,
then each is timed in alternation, twice. Baselines as in scan_ab.py: git revisions, or folders holding a
copy of their samba_kernels files. Writes the errors and times as JSON.

    PYTHONPATH=kernels:benchmarks python benchmarks/scan_forward_ab.py --baseline d506dd9 --out ab.json
"""

import json
from pathlib import Path

import torch
from scan_ab import ab_arguments, side_by_side

from kernels import rel_err, scan_inputs, timer  # the sibling scripts (benchmarks/ on the path)

SHAPES = [(8, 3072), (8, 4096), (6, 3072), (16, 3072)]  # (batch, dim): samba-421m's and samba-1.3b's widths


def main():
    args = ab_arguments("scan_forward_ab.json")
    measure = timer("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "length": 4096,
              "relative_error_against_first_baseline": {}, "times_ms": {}}
    with side_by_side(args.baseline) as versions, torch.no_grad():
        for batch, dim in SHAPES:
            inputs = scan_inputs(batch, dim, 4096, "cuda", torch.bfloat16)
            shape = f"{batch}x{dim}"
            outputs = {name: m.selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True)
                       for name, m in versions.items()}  # fmt: skip
            first = outputs[args.baseline[0]]
            for name, (y, last) in outputs.items():
                result["relative_error_against_first_baseline"][f"{shape} {name}"] = {
                    "out": rel_err(y.float(), first[0].float()), "last_state": rel_err(last, first[1])}
            for repeat in range(2):
                for name, module in versions.items():
                    ms = measure(lambda m=module: m.selective_scan_fn(**inputs, delta_softplus=True))
                    result["times_ms"][f"{shape} {name} #{repeat + 1}"] = ms
                    print(shape, name, repeat + 1, round(ms, 3), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
