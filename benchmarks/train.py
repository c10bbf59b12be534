"""Training throughput: samba-hf against same-size transformers models, in one run.

tokens/s, peak memory and MFU at sequence 4096, bf16 autocast, AdamW, for Samba (Triton kernels
on CUDA), a same-size Llama (transformers, sdpa) and a same-size all-Mamba model. The Mamba
baseline is samba-hf's own all-"linear_attention" pattern on the same Triton kernels:
transformers' MambaForCausalLM has no kernel path without mamba-ssm (not installable here).

    PYTHONPATH=src:kernels python benchmarks/train.py --out benchmarks            # H200
    PYTHONPATH=src:kernels python benchmarks/train.py --out DIR --modes eager,compiled  # also torch.compile (fullgraph)
    PYTHONPATH=src:kernels python benchmarks/train.py --smoke --out /tmp/train     # CPU check
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from generate import llama_like, sync  # the sibling script (benchmarks/ on the path)

from samba_hf import SambaConfig, SambaForCausalLM


def matmul_rate(device) -> float:
    """Measured bf16 matmul FLOP/s (the MFU denominator)."""
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start)


def model_flops_per_token(model, length: int) -> float:
    """6 N per token for the weights, plus attention scores: 12 · layers · d · (keys seen per query)."""
    n = model.num_parameters() - model.get_input_embeddings().weight.numel()
    config = model.config
    attention = 0.0
    for layer_type in getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers:
        if layer_type == "full_attention":
            attention += 12 * config.num_attention_heads * config.head_dim * (length + 1) / 2
        elif layer_type == "sliding_attention":
            attention += 12 * config.num_attention_heads * config.head_dim * min(config.sliding_window, length)
    return 6 * n + attention


def size_matched_mamba_layers(samba: SambaForCausalLM) -> int:
    """Mamba blocks without MLP (as transformers' MambaForCausalLM) with about Samba's parameters."""
    with torch.device("meta"):
        one = SambaForCausalLM(SambaConfig(**{**samba.config.to_dict(), "num_hidden_layers": 1,
                                              "layer_types": ["linear_attention"], "use_mlp": False})).num_parameters()
    embedding = samba.get_input_embeddings().weight.numel()
    return max(1, round((samba.num_parameters() - embedding) / (one - embedding)))


def throughput(model, batch, length, steps, device, compiled=False):
    """(tokens/s, peak GiB, last loss) of AdamW steps; `compiled`: the forward under torch.compile
    (fullgraph, inductor), so the steps include no compilation (it happens in the warm-up)."""
    model.train()
    forward = torch.compile(model, fullgraph=True) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return batch * length / seconds, peak, loss.item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--presets", default="samba-421m,samba-1.3b")
    parser.add_argument("--modes", default="eager", help="eager and/or compiled (each model in each mode)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    presets = ["tiny"] if args.smoke else args.presets.split(",")
    batch, length, steps = (2, 128, 2) if args.smoke else (8, 4096, 5)
    peak_rate = matmul_rate(device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "batch": batch, "length": length, "bf16_matmul_TFLOPs": peak_rate / 1e12, "rows": []}  # fmt: skip
    for preset in presets:
        torch.manual_seed(0)
        samba = SambaForCausalLM(SambaConfig.from_preset(preset))
        mamba_layers = size_matched_mamba_layers(samba)
        candidates = {
            f"{preset} Samba": lambda: samba,
            f"{preset}-size Llama (sdpa)": lambda: llama_like(samba, kv_heads=samba.config.num_key_value_heads),
            f"{preset}-size Mamba (samba-hf, Triton)": lambda: SambaForCausalLM(SambaConfig.from_preset(
                preset, num_hidden_layers=mamba_layers, layer_types=["linear_attention"] * mamba_layers, use_mlp=False)),
        }  # fmt: skip
        for (name, build), mode in itertools.product(candidates.items(), args.modes.split(",")):
            model = build().to(device)
            torch._dynamo.reset()
            try:
                tokens_per_s, peak, loss = throughput(model, batch, length, steps, device, mode == "compiled")
                flops = model_flops_per_token(model, length) * tokens_per_s
                row = {"model": name, "mode": mode, "params": model.num_parameters(), "tokens_per_s": tokens_per_s,
                       "peak_GiB": peak, "MFU": flops / peak_rate, "loss": loss}  # fmt: skip
            except torch.OutOfMemoryError:
                row = {"model": name, "mode": mode, "error": "out of memory"}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
