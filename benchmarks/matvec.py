"""Batch-1 decoding's matrix products: samba_kernels.matvec against cuBLAS (F.linear), with a cold L2.

Takes every projection of a Samba model in the order a decode step runs them (the model built from a
preset, bf16, random weights) and times:
- each distinct shape over enough copies of its weight (>= 200 MB) that no read hits the 50 MB L2,
  inside one CUDA graph, per product;
- one token's products in the model's order (all the weights, once each), inside one CUDA graph.
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--preset", default="samba-421m")
    args = parser.parse_args()
    torch.manual_seed(0)
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
    rows = [(torch.randn(1, 1, w.shape[1], device="cuda", dtype=torch.bfloat16), w, b) for _, w, b in linears]
    with torch.no_grad():
        result["token_cublas_us"] = graph_ms([lambda r=r: F.linear(*r) for r in rows]) * 1e3
        result["token_matvec_us"] = graph_ms([lambda r=r: samba_kernels.matvec(*r) for r in rows]) * 1e3
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
              f"bandwidth would take {r['token_floor_us']:.0f} µs.", "",
              f"Worst relative error against a float64 product: {r['worst_rel_err_vs_float64']:.1e}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
