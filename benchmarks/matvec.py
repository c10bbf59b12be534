"""Batch-1 decoding's matrix products: samba_kernels.matvec against cuBLAS (F.linear), with a cold L2.

Takes every projection of a Samba model in the order a decode step runs them (the model built from a
preset, bf16, random weights) and times:
- each distinct shape over enough copies of its weight (>= 200 MB) that no read hits the 50 MB L2,
  inside one CUDA graph, per product;
- one token's products in the model's order (all the weights, once each), inside one CUDA graph, one
  product per launch and with q/k/v and gate/up each in one launch (stacked_matvec, gated_matvec);
- those two groups alone, one launch against one product at a time, with a cold L2.
Checks each product against a float64 one. Writes matvec.json and matvec.md.

    PYTHONPATH=src:kernels:benchmarks python benchmarks/matvec.py --out benchmarks [--preset samba-421m]
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from generate import copy_bandwidth  # the sibling script (benchmarks/ on the path)

import samba_kernels
from samba_hf import SambaConfig, SambaForCausalLM
from samba_hf.modeling_samba import SambaLinear


def graph_ms(calls) -> float:
    """ms of one replay of a CUDA graph that makes `calls` in order (median of do_bench)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=60, return_mode="median")


def products(preset: str):
    """[(name, weight, bias)] of the model's projections in forward order (one layer of each kind first)."""
    model = SambaForCausalLM(SambaConfig.from_preset(preset)).to("cuda", torch.bfloat16)
    return [(name, m.weight.detach(), None if m.bias is None else m.bias.detach())
            for name, m in model.named_modules() if isinstance(m, SambaLinear)]


# (projections sharing an input, their one-launch kernel, the same one product at a time): as the model
# runs them in a compiled batch-1 step (SambaAttention, SambaMLP), where inductor fuses SiLU * up.
GROUPS = [
    (("q_proj", "k_proj", "v_proj"), lambda x, ws: samba_kernels.stacked_matvec(x, ws),
     lambda x, ws: [samba_kernels.matvec(x, w) for w in ws]),
    (("gate_proj", "up_proj"), lambda x, ws: samba_kernels.gated_matvec(x, *ws),
     lambda x, ws: F.silu(samba_kernels.matvec(x, ws[0])) * samba_kernels.matvec(x, ws[1])),
]


def token_in_groups(linears) -> list:
    """One token's products as calls, q/k/v and gate/up each as one launch (the others one by one)."""
    calls, i = [], 0
    while i < len(linears):
        name = linears[i][0].split(".")[-1]
        group = next((g for g in GROUPS if g[0][0] == name), None)
        if group is None:
            x = torch.randn(1, 1, linears[i][1].shape[1], device="cuda", dtype=torch.bfloat16)
            calls.append(lambda x=x, r=linears[i]: samba_kernels.matvec(x, r[1], r[2]))
            i += 1
            continue
        weights = [w for _, w, _ in linears[i:i + len(group[0])]]
        x = torch.randn(1, 1, weights[0].shape[1], device="cuda", dtype=torch.bfloat16)
        calls.append(lambda x=x, ws=weights, kernel=group[1]: kernel(x, ws))
        i += len(group[0])
    return calls


def preset_arguments() -> argparse.Namespace:
    """--out (the folder for the results) and --preset (the model's), for the scripts that time one
    preset's decode kernels (this one and mamba_decode.py); seeds torch."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--preset", default="samba-421m")
    torch.manual_seed(0)
    return parser.parse_args()


def main():
    args = preset_arguments()
    linears = products(args.preset)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "preset": args.preset, "products_per_token": len(linears), "shapes": {}}
    result["copy_TBps"] = copy_bandwidth(torch.device("cuda")) / 1e12
    worst = 0.0
    for shape in sorted({tuple(w.shape) for _, w, _ in linears}, key=lambda s: -s[0] * s[1]):
        names = [n.split(".")[-1] for n, w, _ in linears if tuple(w.shape) == shape]
        count = len(names)
        copies = max(1, math.ceil(200e6 / (shape[0] * shape[1] * 2)))
        weights = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, 1, shape[1], device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = F.linear(x.double(), weights[0].double())
            worst = max(worst, ((samba_kernels.matvec(x, weights[0]).double() - ref).norm() / ref.norm()).item())
            cublas = graph_ms([lambda w=w: F.linear(x, w) for w in weights]) * 1e3 / copies
            ours = graph_ms([lambda w=w: samba_kernels.matvec(x, w) for w in weights]) * 1e3 / copies
        mb = shape[0] * shape[1] * 2 / 1e6
        result["shapes"][f"{shape[0]}x{shape[1]}"] = dict(
            modules=sorted(set(names)), per_token=count, MB=mb, cublas_us=cublas, matvec_us=ours,
            cublas_TBps=mb / cublas, matvec_TBps=mb / ours, ratio=cublas / ours)
        print(shape, result["shapes"][f"{shape[0]}x{shape[1]}"], flush=True)
        del weights
        torch.cuda.empty_cache()
    result["groups"] = {}
    for group, kernel, separate in GROUPS:
        weights = [w for n, w, _ in linears if n.split(".")[-1] in group][:len(group)]  # the first layer with them
        mb = sum(w.numel() * 2 for w in weights) / 1e6
        copies = max(1, math.ceil(200 / mb))
        sets = [[torch.randn_like(w) * 0.02 for w in weights] for _ in range(copies)]
        x = torch.randn(1, 1, weights[0].shape[1], device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            one = graph_ms([lambda ws=ws: kernel(x, ws) for ws in sets]) * 1e3 / copies
            apart = graph_ms([lambda ws=ws: separate(x, ws) for ws in sets]) * 1e3 / copies
        result["groups"]["/".join(group)] = dict(MB=mb, one_launch_us=one, separate_us=apart)
        print(group, result["groups"]["/".join(group)], flush=True)
        del sets
    rows = [(torch.randn(1, 1, w.shape[1], device="cuda", dtype=torch.bfloat16), w, b) for _, w, b in linears]
    with torch.no_grad():
        result["token_cublas_us"] = graph_ms([lambda r=r: F.linear(*r) for r in rows]) * 1e3
        result["token_matvec_us"] = graph_ms([lambda r=r: samba_kernels.matvec(*r) for r in rows]) * 1e3
        grouped = token_in_groups(linears)
        result["token_launches_grouped"] = len(grouped)
        result["token_grouped_us"] = graph_ms(grouped) * 1e3
    result["token_MB"] = sum(w.numel() * 2 for _, w, _ in linears) / 1e6
    result["token_floor_us"] = result["token_MB"] / result["copy_TBps"]
    result["worst_rel_err_vs_float64"] = worst
    print({k: v for k, v in result.items() if k != "shapes"}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matvec.json").write_text(json.dumps(result, indent=1))
    (out / "matvec.md").write_text(render(result))


def render(r: dict) -> str:
    lines = [
        "# One-row products (batch-1 decoding): samba_kernels.matvec against cuBLAS", "",
        f"Machine: {r['device']}; torch {r['torch']}, triton {r['triton']}. Measured copy bandwidth "
        f"{r['copy_TBps']:.2f} TB/s (read + write). Model: `{r['preset']}` (bf16, random weights), "
        f"{r['products_per_token']} products per token.", "",
        "    PYTHONPATH=src:kernels:benchmarks python benchmarks/matvec.py --out benchmarks", "",
        "Each shape is timed over enough copies of its weight (>= 200 MB) that every read misses the L2, in one "
        "CUDA graph; cuBLAS is `F.linear` on a (1, 1, K) input.", "",
        "| weight (N x K) | modules | per token | MB | cuBLAS µs | matvec µs | cuBLAS TB/s | matvec TB/s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, s in r["shapes"].items():
        lines.append(f"| {shape} | {', '.join(s['modules'])} | {s['per_token']} | {s['MB']:.1f} | {s['cublas_us']:.2f} | "
                     f"{s['matvec_us']:.2f} | {s['cublas_TBps']:.2f} | {s['matvec_TBps']:.2f} | {s['ratio']:.2f}× |")
    lines += ["", f"One token's {r['products_per_token']} products in the model's order ({r['token_MB']:.0f} MB, one "
              f"CUDA graph): cuBLAS **{r['token_cublas_us']:.0f} µs**, matvec **{r['token_matvec_us']:.0f} µs** "
              f"({r['token_cublas_us'] / r['token_matvec_us']:.2f}× as fast); reading the weights at the copy "
              f"bandwidth would take {r['token_floor_us']:.0f} µs. With q/k/v and gate/up each in one launch "
              f"({r['token_launches_grouped']} launches), as a compiled step runs them: **{r['token_grouped_us']:.0f} µs**.", "",
              "| products in one launch | MB | one launch µs | one at a time µs (gate/up: with SiLU·up as a third kernel) |",
              "|---|---|---|---|",
              *[f"| {g} | {v['MB']:.1f} | {v['one_launch_us']:.2f} | {v['separate_us']:.2f} |" for g, v in r["groups"].items()],
              "",
              f"Worst relative error against a float64 product: {r['worst_rel_err_vs_float64']:.1e}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
