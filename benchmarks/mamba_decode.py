"""A Mamba mixer's decode step between in_proj and out_proj: samba_kernels.mamba_decode_step (two launches)
per tile, against the same step as PyTorch ops compiled by inductor (`mamba_decode_step_ref`: the conv
update, x_proj, dt_proj and the state update; F.linear for the two products).

The mixer is the first of a preset's model (bf16, random weights), with a static cache's states. Each
variant is timed as 100 calls in one CUDA graph (median of do_bench), so launches cost no host time. The
model-level effect (the compiled decode step with and without the kernel) is generate.py's
`compiled_step_pdl` against `compiled_step_pdl_mamba_ops`. Writes mamba_decode.json and mamba_decode.md.

    PYTHONPATH=src:kernels:benchmarks python benchmarks/mamba_decode.py --out benchmarks [--preset samba-421m]
"""

import importlib
import itertools
import json
from pathlib import Path

import torch
from matvec import graph_ms, preset_arguments  # the sibling script (benchmarks/ on the path)

from samba_hf import SambaConfig, SambaForCausalLM, SambaStaticCache
from samba_hf.modeling_samba import SambaMambaMixer

mamba_decode = importlib.import_module("samba_kernels.mamba_decode")
CALLS = 100
# (BLOCK_N, BLOCK_K, warps) of x_proj's kernel, (BLOCK_D, warps) of the state update's
PROJECT_TILES = [(1, 4096, 8), (1, 4096, 16), (2, 4096, 8), (2, 4096, 16), (4, 4096, 16), (1, 2048, 8),
                 (4, 1024, 8), (2, 1024, 4)]
STATE_TILES = [(16, 2), (32, 4), (64, 4)]


def mixer_inputs(preset: str) -> tuple:
    """mamba_decode_step's arguments for the first Mamba mixer of `preset`, its states in a static cache."""
    model = SambaForCausalLM(SambaConfig.from_preset(preset)).to("cuda", torch.bfloat16).eval()
    cache = SambaStaticCache(config=model.config, max_cache_len=64)
    mixer = next(m for m in model.modules() if isinstance(m, SambaMambaMixer))
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 16), device="cuda"), cache=cache, use_cache=True)
    dim = mixer.intermediate_size
    xz = torch.randn(1, 2 * dim, device="cuda", dtype=torch.bfloat16)  # in_proj's output
    weights = [t.detach() for t in (mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.x_proj.weight,
                                    mixer.dt_proj.weight, mixer.dt_proj.bias, mixer.A_log, mixer.D)]
    states = cache.get_conv_state(mixer.layer_idx), cache.get_recurrent_state(mixer.layer_idx)
    return (xz[:, :dim], xz[:, dim:], *states, *weights)


def main():
    args = preset_arguments()
    inputs = mixer_inputs(args.preset)
    results = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": importlib.import_module("triton").__version__, "preset": args.preset,
               "conv_state": list(inputs[2].shape), "ssm_state": list(inputs[3].shape), "calls_per_graph": CALLS}
    with torch.no_grad():
        reference = torch.compile(mamba_decode.mamba_decode_step_ref, fullgraph=True, dynamic=False)
        results["compiled_ops_us"] = graph_ms([lambda: reference(*inputs)] * CALLS) * 1e3 / CALLS
        results["tiles"] = []
        for project, state in itertools.product(PROJECT_TILES, STATE_TILES):
            mamba_decode.PROJECT_TILE = dict(zip(("BLOCK_N", "BLOCK_K", "num_warps"), project))
            mamba_decode.STATE_TILE = dict(zip(("BLOCK_D", "num_warps"), state))
            us = graph_ms([lambda: mamba_decode.mamba_decode_step(*inputs)] * CALLS) * 1e3 / CALLS
            results["tiles"].append({"project": project, "state": state, "us": us})
            print(project, state, round(us, 2), flush=True)
    out = Path(args.out)
    (out / "mamba_decode.json").write_text(json.dumps(results, indent=1))
    (out / "mamba_decode.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    best = min(r["tiles"], key=lambda t: t["us"])
    rows = "\n".join(f"| {t['project'][0]} x {t['project'][1]}, {t['project'][2]} warps | {t['state'][0]}, "
                     f"{t['state'][1]} warps | {t['us']:.2f} |" for t in r["tiles"])
    return f"""# A Mamba mixer's decode step: samba_kernels.mamba_decode_step against the compiled PyTorch ops

Machine: {r['machine']}; torch {r['torch']}, triton {r['triton']}. Mixer: the first of `{r['preset']}` (bf16,
random weights); conv state {tuple(r['conv_state'])}, SSM state {tuple(r['ssm_state'])}.

    PYTHONPATH=src:kernels:benchmarks python benchmarks/mamba_decode.py --out benchmarks

{r['calls_per_graph']} calls in one CUDA graph, µs per call. The compiled PyTorch ops (conv update, x_proj, dt_proj,
state update; inductor, F.linear for the products): **{r['compiled_ops_us']:.2f} µs**. The kernel's best tile:
**{best['us']:.2f} µs** ({r['compiled_ops_us'] / best['us']:.2f}x as fast).

| x_proj kernel: rows x K step | state kernel: channels per program | µs |
|---|---|---|
{rows}
"""


if __name__ == "__main__":
    main()
