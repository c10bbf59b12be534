"""Generation benchmark: Samba against a same-size Llama (transformers, sdpa), in one run.

Measures decode tokens/s at batch 1 and 16 after contexts of 4K/64K/128K tokens, prefill time of
long prompts, cache memory against generated length, and batch-1 decode against its bandwidth
roofline (bytes of weights + state read per token / measured copy bandwidth). Random weights:
speed does not depend on them.

    PYTHONPATH=src:kernels python benchmarks/generate.py --out benchmarks          # H200
    PYTHONPATH=src:kernels python benchmarks/generate.py --smoke --out /tmp/gen     # CPU check
"""

import argparse
import json
import platform
import time
import traceback
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch._inductor.config
import transformers
from transformers import CompileConfig, DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from samba_hf import SambaConfig, SambaForCausalLM, SambaStaticCache, modeling_samba
from samba_hf.generation import cache_nbytes


def samba_model(preset, **overrides):
    return SambaForCausalLM(SambaConfig.from_preset(preset, **overrides))


def llama_like(samba: SambaForCausalLM, kv_heads: int) -> LlamaForCausalLM:
    """A Llama (GQA, RoPE, SwiGLU) of the same width, with as many layers as match Samba's parameters."""
    c = samba.config
    base = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_attention_heads=c.num_attention_heads, num_key_value_heads=kv_heads, head_dim=c.head_dim,
                tie_word_embeddings=True, max_position_embeddings=1 << 21, attn_implementation="sdpa")  # fmt: skip
    with torch.device("meta"):
        one = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **base)).num_parameters()
        two = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **base)).num_parameters()
    layers = max(1, round((samba.num_parameters() - one) / (two - one)) + 1)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **base))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = 1 << 28 if device.type == "cuda" else 1 << 22
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    return 2 * n * 4 * 10 / (time.perf_counter() - start)


@torch.no_grad()
def prefill(model, batch, length, device, **forward_kwargs):
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    cache = DynamicCache(config=model.config)
    sync()
    start = time.perf_counter()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1, **forward_kwargs)
    sync()
    return time.perf_counter() - start, out.cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def filled_cache(model, batch, context, device):
    """A cache holding `context` tokens, and the next input token. Samba is prefilled for real
    (linear time); Llama's KV cache is filled with random keys and values of the same shapes, since
    decode speed does not depend on their values and a batch-16 quadratic prefill would take
    minutes."""
    if isinstance(model, SambaForCausalLM):
        return prefill(model, batch, context, device)[1:]
    config = model.config
    cache = DynamicCache(config=config)
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, device=device, dtype=model.dtype), torch.randn(shape, device=device, dtype=model.dtype), layer)
    return cache, torch.zeros(batch, 1, dtype=torch.long, device=device)


@torch.no_grad()
def decode(model, cache, token, steps):
    for _ in range(2):  # warm-up steps
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    sync()
    return (time.perf_counter() - start) / steps


# Inductor options of the compiled decode variants (CUDA graphs in each). "matvec": coordinate-descent
# tuning, under which inductor writes a batch-1 matmul as a multiply-and-sum reduction that it tunes and
# fuses with its neighbours instead of calling cuBLAS; "combo": independent kernels (such as the q/k/v
# or gate/up reductions, which read the same input) launched as one; "freezing": weights become
# constants, so inductor may concatenate products that share an input. "cublas": the model's one-row
# products left to F.linear (cuBLAS) instead of samba_kernels' kernels, the alternative in the same run;
# "unfused": every product its own matvec (q/k/v and gate/up not grouped into one launch); "pdl":
# programmatic dependent launch (torch._inductor.config.triton.enable_pdl, which samba_kernels' decode
# kernels follow); "mamba_ops": each Mamba mixer's token through its modules and decode ops instead of
# samba_kernels.mamba_decode_step.
COMPILE_VARIANTS = {
    "compiled_step": {},
    "compiled_step_cublas": {},
    "compiled_step_unfused": {},
    "compiled_step_pdl": {},
    "compiled_step_mamba_ops": {},
    "compiled_step_pdl_mamba_ops": {},
    "compiled_step_max_autotune": {"max_autotune": True},
    "compiled_step_matvec": {"coordinate_descent_tuning": True},
    "compiled_step_matvec_combo": {"coordinate_descent_tuning": True, "combo_kernels": True},
    "compiled_step_freezing": {"freezing": True},
    "compiled_step_matvec_freezing": {"coordinate_descent_tuning": True, "freezing": True},
}


SAMBA_ONLY_VARIANTS = ("_cublas", "_unfused", "_mamba_ops")  # they change Samba's products; Llama has no such variant


def products_as_in(variant: str) -> ExitStack:
    """The step's decode kernels and launches as `variant` makes them (see COMPILE_VARIANTS)."""
    stack = ExitStack()
    if variant.endswith("_cublas"):
        stack.enter_context(mock.patch.object(modeling_samba, "one_row_kernels", lambda *args: None))
    if variant.endswith("_unfused"):
        stack.enter_context(mock.patch.object(modeling_samba, "one_launch_kernels", lambda *args: None))
    if variant.endswith("_mamba_ops"):
        stack.enter_context(mock.patch.object(modeling_samba, "mamba_decode_kernel", lambda *args: None))
    if "_pdl" in variant:  # global, not a compile option: the kernels read it when they launch
        stack.enter_context(mock.patch.object(torch._inductor.config.triton, "enable_pdl", True))
    return stack


@torch.no_grad()
def compiled_decode(model, context, steps, device, options=None, graph_of_steps=False):
    """Batch-1 decode with a static cache and torch.compile (CUDA graphs on the GPU, plus the inductor
    `options`): seconds per token, the median of five timed runs of `steps` steps. Samba's static cache
    keeps its sliding-window keys in ring buffers, so the step compiles once for static shapes
    (`dynamic=False`) and replays one CUDA graph at every length.

    By default each step is one call of the compiled function, which replays its CUDA graph: the host's
    work per call (dynamo's guards, the replay, the greedy argmax and the position's increment) is
    timed too. With `graph_of_steps` the step is compiled without CUDA graphs and `steps` steps, argmax
    and increment included, are captured as one CUDA graph: the GPU's own time per token, as a serving
    loop that launches ahead of the GPU sees it."""
    cache_class = SambaStaticCache if isinstance(model, SambaForCausalLM) else StaticCache
    cache = cache_class(config=model.config, max_cache_len=context + 10 * steps)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    token = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    options = {"triton.cudagraphs": device.type == "cuda" and not graph_of_steps, **(options or {})}
    step = torch.compile(model.forward, options=options, fullgraph=True, dynamic=False)
    position = torch.tensor([[context]], device=device)

    def decode_steps(count, token, position):
        for _ in range(count):
            token = step(input_ids=token, cache=cache, use_cache=True, position_ids=position).logits.argmax(-1)
            position = position + 1
        return token, position

    token, position = decode_steps(2, token, position)  # compile, then record the CUDA graph
    if graph_of_steps and device.type == "cuda":
        def steps_in_place():  # the graph's inputs are its outputs' buffers, so that replays continue
            next_token, next_position = decode_steps(steps, token, position)
            token.copy_(next_token), position.copy_(next_position)

        steps_in_place()  # warm-up outside the capture (allocator, lazy initialisations)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            steps_in_place()
        run = graph.replay
    else:
        def run():
            nonlocal token, position
            token, position = decode_steps(steps, token, position)
    runs = []
    for _ in range(5):
        sync()
        start = time.perf_counter()
        run()
        sync()
        runs.append((time.perf_counter() - start) / steps)
    return sorted(runs)[len(runs) // 2]


@torch.no_grad()
def generate_seconds_per_token(model, context, new_tokens, device, **generate_kwargs):
    """Seconds per generated token of `model.generate` at batch 1 after a `context`-token prompt: the
    time of `new_tokens + 1` tokens minus that of 1 (the prefill), after a warm-up call."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None,
                  **generate_kwargs)  # fmt: skip
    times = {}
    for count in (new_tokens + 1, 1, new_tokens + 1, 1):  # the first two warm up (and compile)
        sync()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=count, min_new_tokens=count, **kwargs)
        sync()
        times[count] = time.perf_counter() - start
    return (times[new_tokens + 1] - times[1]) / new_tokens


def decode_bytes(model, cache) -> int:
    """Bytes one decode step must read: every weight once plus the cache."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + cache_nbytes(cache)


def measure_memory(preset, device, dtype, results):
    """Cache bytes and peak memory against generated length. The same model with a 256-token window,
    so that 10 windows of eager decoding take seconds, not minutes; the cache's behaviour does not
    depend on the window."""
    model = samba_model(preset, sliding_window=256).to(device, dtype).eval()
    cache = DynamicCache(config=model.config)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    window = model.config.sliding_window
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for generated in range(1, 10 * window + 1):
            token = model(token, cache=cache, use_cache=True).logits.argmax(-1)
            if generated in (window // 2, window, 2 * window, 5 * window, 10 * window):
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                results["memory"].append({"window": window, "generated": generated,
                                          "samba_cache_MiB": cache_nbytes(cache) / 2**20, "peak_GiB": peak})  # fmt: skip
    print("memory", json.dumps(results["memory"]), flush=True)


def measure_compiled(samba, llama, context, steps, bandwidth, device, results, variants=tuple(COMPILE_VARIANTS),
                     generate_calls=True, graph_of_steps=False):
    """Each model: its compiled decode step against the roofline (for each of `variants`), then (with
    `generate_calls`) generate() itself with the static cache (which compiles its decode step, with
    transformers' default `CompileConfig` and with the "matvec" options) and with the dynamic cache. A failure is recorded,
    with the traceback in the log, and the other measurements still run."""
    matvec = CompileConfig(mode=None, options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})
    for name, model in (("samba", samba), ("llama", llama)):
        entry = {"model": name, "context": context}
        measurements = {key: partial(compiled_decode, model, context, steps, device, COMPILE_VARIANTS[key],
                                     graph_of_steps=graph_of_steps)
                        for key in variants if name == "samba" or not key.endswith(SAMBA_ONLY_VARIANTS)}  # fmt: skip
        if generate_calls:
            generate = partial(generate_seconds_per_token, model, context, 4 * steps, device)
            measurements["generate_static"] = partial(generate, cache_implementation="static",
                                                      compile_config=CompileConfig())
            measurements["generate_static_matvec"] = partial(generate, cache_implementation="static",
                                                             compile_config=matvec)
            measurements["generate_dynamic"] = generate
        for key, measure in measurements.items():
            torch._dynamo.reset()
            try:
                with products_as_in(key):
                    entry[key + "_ms_per_token"] = 1e3 * measure()
            except Exception as error:  # report, do not hide: the table says what failed
                traceback.print_exc()
                entry[key + "_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print("compiled", name, key, entry.get(key + "_ms_per_token"), flush=True)
        cache, _ = filled_cache(model, 1, context, device)
        entry["roofline_ms"] = 1e3 * decode_bytes(model, cache) / bandwidth
        for key in variants:
            if key + "_ms_per_token" in entry:
                entry[key + "_fraction_of_roofline"] = entry["roofline_ms"] / entry[key + "_ms_per_token"]
        results["compiled"].append(entry)
        print("compiled", json.dumps(entry), flush=True)


@torch.no_grad()
def measure_decode_profile(samba, context, device, results, variant="compiled_step"):
    """Where a compiled decode step's time goes: the step compiled with the inductor options of
    `variant` but without CUDA graphs (so that its kernels show) and profiled over 20 steps: kernel time
    and launches per token, the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    cache = SambaStaticCache(config=samba.config, max_cache_len=2 * context)
    ids = torch.randint(0, samba.config.vocab_size, (1, context), device=device)
    token = samba(ids, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    torch._dynamo.reset()
    step = torch.compile(samba.forward, options=COMPILE_VARIANTS[variant], fullgraph=True, dynamic=False)
    position = torch.tensor([[context]], device=device)
    steps = 20
    activities = [ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]
    with products_as_in(variant):
        for i in range(3):  # compile and warm up
            token = step(input_ids=token, cache=cache, use_cache=True, position_ids=position + i).logits.argmax(-1)
        sync()
        with profile(activities=activities) as prof:
            for i in range(3, 3 + steps):
                token = step(input_ids=token, cache=cache, use_cache=True, position_ids=position + i).logits.argmax(-1)
            sync()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    matmuls = [e for e in prof.key_averages() if e.key == "aten::mm"]
    results.setdefault("samba_decode_profile", {})[variant] = {
        "kernel_ms_per_token": sum(e.device_time_total for e in kernels) / 1e3 / steps,
        "kernel_launches_per_token": sum(e.count for e in kernels) / steps,
        "matmul_ms_per_token": sum(e.device_time_total for e in matmuls) / 1e3 / steps,
        "top_kernels": [(e.key[:90], e.count, e.device_time_total / 1e3)
                        for e in sorted(kernels, key=lambda e: -e.device_time_total)[:30]],
    }  # fmt: skip
    print("profile", variant, json.dumps(results["samba_decode_profile"][variant])[:400], flush=True)


def measure_many_lengths(samba, device, results):
    """Prefill of a 4K warm-up and twelve prompt lengths in one process (seconds, peak GiB): the
    compiled windowed attention must serve them all without its unfused fallback."""
    rows = []
    for length in [4096] + [20000 + 10007 * i for i in range(12)]:
        seconds = prefill(samba, 1, length, device)[0]
        rows.append((length, seconds, torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None))
        print("many_lengths", rows[-1], flush=True)
    results["prefill_many_lengths"] = {"rows": rows}


def plot(results: dict, path: Path) -> None:
    """Decode tokens/s against context, prefill time against prompt length, cache against generated length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (decode_ax, prefill_ax, memory_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for batch, style in ((1, "o-"), (16, "s--")):
        rows = [r for r in results["decode"] if r["batch"] == batch]
        for name in ("samba", "llama"):
            points = [(r["context"], r[name]["tokens_per_s"]) for r in rows if "tokens_per_s" in r[name]]
            decode_ax.plot(*zip(*points), style, label=f"{name}, batch {batch}")
    decode_ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s", title="decode (eager)")
    for name in ("samba", "llama"):
        points = [(r["length"], r[name + "_s"]) for r in results["prefill"] if r.get(name + "_s")]
        prefill_ax.plot(*zip(*points), "o-", label=name)
    prefill_ax.set(xscale="log", yscale="log", xlabel="prompt (tokens)", ylabel="seconds", title="prefill, batch 1")
    memory = results["memory"]
    memory_ax.plot([m["generated"] for m in memory], [m["samba_cache_MiB"] for m in memory], "o-", label="samba cache")
    memory_ax.set(xscale="log", xlabel=f"generated tokens (window {memory[0]['window']})", ylabel="MiB",
                  title="cache memory against generated length")  # fmt: skip
    for ax in (decode_ax, prefill_ax, memory_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"samba-421m vs same-size Llama (transformers, sdpa), {results['machine']}, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to check the script")
    parser.add_argument("--parts", default="decode,prefill,memory,compiled", help="which measurements to run "
                        "(also: profile, many_lengths)")
    parser.add_argument("--compile-variants", default=",".join(COMPILE_VARIANTS),
                        help="compiled decode variants to time (the keys of COMPILE_VARIANTS)")
    parser.add_argument("--steps-only", action="store_true", help="the compiled part times the compiled steps only, "
                        "not generate() itself")
    parser.add_argument("--graph-of-steps", action="store_true", help="the compiled steps are timed as one CUDA "
                        "graph of many steps (the GPU's time), not one call per step (see compiled_decode)")
    parser.add_argument("--profile-variants", default="compiled_step", help="compiled decode variants to profile")
    parser.add_argument("--prefill-lengths", help="prompt lengths of the prefill part (default: 32K to 1M)")
    parser.add_argument("--samba-chunks", default="", help="more prefill chunk sizes to time Samba with, "
                        "beside the config's default")
    parser.add_argument("--plot", help="only draw the plot of a saved generate.json")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.smoke:
        preset, contexts, batches, prefills, big_prefills, steps = "tiny", [64, 256], [1, 4], [256, 1024], [4096], 4
    else:
        preset, contexts, batches, prefills, big_prefills, steps = (
            "samba-421m", [4096, 65536, 131072], [1, 16], [32768, 131072], [524288, 1048576], 32)
    samba = samba_model(preset).to(device, dtype).eval()
    llama = llama_like(samba, kv_heads=max(1, samba.config.num_attention_heads // 4)).to(device, dtype).eval()
    bandwidth = copy_bandwidth(device)
    results = {"machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "copy_bandwidth_GBps": bandwidth / 1e9, "samba_params": samba.num_parameters(),
               "llama_params": llama.num_parameters(), "llama_layers": llama.config.num_hidden_layers,
               "decode": [], "prefill": [], "memory": [], "compiled": []}  # fmt: skip

    parts = args.parts.split(",")
    for context in contexts if "decode" in parts else []:
        for batch in batches:
            entry = {"context": context, "batch": batch}
            for name, model in (("samba", samba), ("llama", llama)):
                try:
                    cache, token = filled_cache(model, batch, context, device)
                    seconds = decode(model, cache, token, steps)
                    entry[name] = {"ms_per_step": seconds * 1e3, "tokens_per_s": batch / seconds,
                                   "cache_MiB": cache_nbytes(cache) / 2**20}  # fmt: skip
                    del cache
                except torch.OutOfMemoryError:
                    entry[name] = {"error": "out of memory"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if "tokens_per_s" in entry["samba"] and "tokens_per_s" in entry["llama"]:
                entry["speedup"] = entry["samba"]["tokens_per_s"] / entry["llama"]["tokens_per_s"]
            results["decode"].append(entry)
            print("decode", json.dumps(entry), flush=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.prefill_lengths:
        lengths = [int(n) for n in args.prefill_lengths.split(",")]
        prefills, big_prefills = [n for n in lengths if n <= 131072], [n for n in lengths if n > 131072]
    # (name, model, forward keyword arguments): Samba with its default chunk size, then the other sizes
    prefill_runs = [("samba", samba, {}), ("llama", llama, {})]
    prefill_runs += [(f"samba_chunk{n}", samba, {"prefill_chunk_size": int(n)}) for n in args.samba_chunks.split(",") if n]
    for length in prefills + big_prefills if "prefill" in parts else []:
        entry = {"length": length}
        for name, model, forward_kwargs in prefill_runs:
            if name == "llama" and length in big_prefills:
                continue  # quadratic: minutes per prompt
            try:
                prefill(model, 1, min(length, 4096), device)  # warm-up
                runs = sorted(prefill(model, 1, length, device, **forward_kwargs)[0] for _ in range(3))
                entry[name + "_s"], entry[name + "_runs_s"] = runs[1], runs  # the median of three
            except torch.OutOfMemoryError:
                entry[name + "_s"] = None
            if device.type == "cuda":
                entry[name + "_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.empty_cache()
        for name, _, _ in prefill_runs:
            if name != "llama" and entry.get("llama_s") and entry.get(name + "_s"):
                entry["speedup" + name[len("samba"):]] = entry["llama_s"] / entry[name + "_s"]
        results["prefill"].append(entry)
        print("prefill", json.dumps(entry), flush=True)

    if "memory" in parts:
        measure_memory(preset, device, dtype, results)
    if "compiled" in parts:
        measure_compiled(samba, llama, contexts[0], steps, bandwidth, device, results,
                         args.compile_variants.split(","), generate_calls=not args.steps_only,
                         graph_of_steps=args.graph_of_steps)
        results["compiled_timing"] = f"one CUDA graph of {steps} steps" if args.graph_of_steps else "one call per step"
    for variant in args.profile_variants.split(",") if "profile" in parts else []:
        measure_decode_profile(samba, contexts[0], device, results, variant)
    if "many_lengths" in parts:
        measure_many_lengths(samba, device, results)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(results, indent=2))
    if {"decode", "prefill", "memory"} <= set(parts):
        plot(results, out / "generate.png")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
