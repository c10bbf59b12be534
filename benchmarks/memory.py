"""memory: a cache's bytes and the peak device memory against the number of generated tokens."""

import torch
from transformers import DynamicCache

from samba_hf.generation import cache_nbytes

from . import models
from .generate import dtype_for
from .harness import columns, free_memory, peak_gib, registry, rows_of

TITLE = "Memory: the cache against generated length"
WINDOW, SMOKE_WINDOW = 256, 16
MARKS = (0.5, 1, 2, 5, 10)  # generated tokens at which to read the cache, in windows
STEP_S = 0.025  # a planning guess of one eager decode step (benchmarks/results/memory.json)
INTRO = f"""
Eager decoding with transformers' `DynamicCache`, one token at a time from one start token, batch 1, bf16, random
weights; the cache's bytes (every tensor it holds) and torch's peak allocated memory after
{", ".join(f"{mark:g}" for mark in MARKS)} windows of generated tokens. Samba is samba-421m with a {WINDOW}-token
window (so that ten windows take seconds; the cache's behaviour does not depend on the window): its Mamba states
and window keys stop growing once the window is full. The Llama (the paper's 438M shape) is measured at the same
lengths for comparison: its keys and values grow with every token.
"""

CASES, case = registry()


@torch.no_grad()
def cache_growth(ctx, name: str) -> None:
    window = SMOKE_WINDOW if ctx.smoke else WINDOW
    marks = [int(mark * window) for mark in MARKS]
    refusal = ctx.budget.refuses(marks[-1] * STEP_S)
    if refusal:
        return ctx.skip(refusal, model=name, window=window)
    overrides = {"sliding_window": window} if name == "samba" else {}
    free_memory()
    model = models.build(name, ctx.device, dtype_for(ctx.device), ctx.smoke, **overrides)
    cache = DynamicCache(config=model.config)
    token = torch.zeros(1, 1, dtype=torch.long, device=ctx.device)
    for generated in range(1, marks[-1] + 1):
        token = model(token, cache=cache, use_cache=True).logits.argmax(-1)
        if generated in marks:
            ctx.add(
                model=name,
                window=window,
                generated=generated,
                cache_mib=cache_nbytes(cache) / 2**20,
                peak_gib=peak_gib(),
            )
    del model, cache
    free_memory()


case("samba", "samba-421m (window 256): cache bytes and peak memory against generated tokens")(
    lambda ctx: cache_growth(ctx, "samba")
)
case("llama", "the paper's 438M Llama: cache bytes and peak memory at the same lengths")(
    lambda ctx: cache_growth(ctx, "llama")
)


COLUMNS = [
    ("generated tokens", "generated"),
    ("window", "window"),
    ("cache MiB", "cache_mib", ".2f"),
    ("peak GiB", "peak_gib", ".2f"),
    ("note", "skipped"),
]


def render_case(name: str, entry: dict) -> list[str]:
    lines = columns(entry["rows"], COLUMNS)
    full = [row["cache_mib"] for row in entry["rows"] if "cache_mib" in row and row["generated"] >= row["window"]]
    if full:
        growth = "constant" if max(full) == min(full) else "growing"
        lines += ["", f"From one window on the cache is {growth}: {min(full):.2f} to {max(full):.2f} MiB."]
    return lines


def summary(result: dict) -> list[str]:
    lines = []
    for name in CASES:
        rows = [row for row in rows_of(result, name) if "cache_mib" in row]
        if rows:
            lines.append(
                f"{name}: cache {rows[0]['cache_mib']:.1f} MiB after {rows[0]['generated']} tokens, "
                f"{rows[-1]['cache_mib']:.1f} MiB after {rows[-1]['generated']}"
            )
    return lines
