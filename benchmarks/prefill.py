"""prefill: long prompts through the public `generate()` call (time to the first token), samba-421m against the
paper's 438M Llama in one process, with peak memory and Samba's linearity from 128K to 1M tokens."""

import statistics
import time

import torch

from . import models
from .generate import dtype_for, random_prompt
from .harness import columns, free_memory, peak_gib, profiled, registry, rows_of, synchronize, wall_seconds

TITLE = "Prefill: 128K and 1M-token prompts, samba-421m against the paper's 438M Llama"
LENGTHS = {"128k": 131072, "1m": 1048576}
SMOKE_LENGTHS = {"128k": 96, "1m": 768}
# Two of Samba's default prefill chunks: a first chunk and one that continues the cache, whose kernel variants differ.
# (A 4K warm-up left those to the first timed call, which at b7e4fa3 took 2.28 s at 128K; the median of three was
# then the slower of the two others, 0.338 s against 0.294.)
WARMUP_TOKENS, SMOKE_WARMUP_TOKENS = 2 * 16384, 32
REPEATS = 3
PROFILE_TOP = 25
INTRO = f"""
Batch 1: `model.generate(prompt, attention_mask=ones, max_new_tokens=1, do_sample=False)` on a prompt of random
tokens, wall-clock: the prefill and one token, as a user's call runs it (Samba: through its chunked prefill; the
Llama: one sdpa forward). Same models, weights and dtype as the generate suite (bf16, random weights, one
process). Per model: one warm-up call on a {WARMUP_TOKENS}-token prompt, then {REPEATS} calls per length, median
reported (all runs are listed). Peak memory: torch's
max allocated over the calls at that length. A Llama cell predicted past the memory or the time budget is skipped
with the prediction (its attention is quadratic: at 1M tokens, about 64 times its 128K time per call).
"""

CASES, case = registry()
# Measured over guessed prefill seconds per model, from this process's rows: the 128K rows correct the 1M guesses.
_measured_scale: dict[str, float] = {}


@torch.no_grad()
def prefill_row(ctx, name: str, model, length: int, repeats: int, **options) -> dict:
    prompt = random_prompt(model.config.vocab_size, 1, length, ctx.device)
    mask = torch.ones_like(prompt)
    free_memory()
    runs = []
    for _ in range(repeats):
        seconds, out = wall_seconds(
            lambda: model.generate(
                prompt,
                attention_mask=mask,
                max_new_tokens=1,
                min_new_tokens=1,
                do_sample=False,
                pad_token_id=0,
                **options,
            ),
            ctx.device,
        )
        if tuple(out.shape) != (1, length + 1):
            raise RuntimeError(
                f"generate() returned {tuple(out.shape)} tokens for a {length}-token prompt and one new token"
            )
        runs.append(seconds)
    return dict(
        model=name,
        length=length,
        seconds=statistics.median(runs),
        runs_s=runs,
        peak_gib=peak_gib(),
        tokens_per_s=length / statistics.median(runs),
    )


def prefill_case(length_key: str):
    def run(ctx):
        length = SMOKE_LENGTHS[length_key] if ctx.smoke else LENGTHS[length_key]
        dtype = dtype_for(ctx.device)
        for name in models.MODELS:
            cell = dict(model=name, length=length)
            peak = models.predicted_peak_bytes(name, ctx.device, dtype, ctx.smoke, 1, length)
            repeats = REPEATS
            predicted = REPEATS * models.prefill_seconds(name, 1, length) * _measured_scale.get(name, 1.0)
            if name == "llama" and ctx.budget.refuses(predicted) and not ctx.budget.refuses(predicted / REPEATS):
                repeats = 1  # the quadratic Llama: one call rather than none
                predicted /= REPEATS
            refusal = ctx.memory_refusal(peak) or ctx.budget.refuses(predicted + 10)
            if refusal:
                ctx.skip(refusal, **cell, predicted_peak_gib=peak / 2**30, predicted_s=predicted)
                continue
            torch._dynamo.reset()
            model, out_of_memory = models.build(name, ctx.device, dtype, ctx.smoke), None
            try:
                warmup = prefill_row(ctx, name, model, SMOKE_WARMUP_TOKENS if ctx.smoke else WARMUP_TOKENS, 1)
                row = prefill_row(ctx, name, model, length, repeats)
            except torch.OutOfMemoryError as error:  # a measured outcome: the row says so
                out_of_memory = f"out of memory ({str(error).splitlines()[0][:160]})"
            finally:
                del model
                free_memory()
            if out_of_memory:
                ctx.skip(out_of_memory, **cell, predicted_peak_gib=peak / 2**30)
                continue
            _measured_scale[name] = row["seconds"] / models.prefill_seconds(name, 1, length)
            ctx.add(**row, warmup_call_s=warmup["seconds"], predicted_peak_gib=peak / 2**30)

    return run


case("128k", "prefill of a 128K-token prompt, both models")(prefill_case("128k"))
case("1m", "prefill of a 1M-token prompt, both models (the Llama where it fits)")(prefill_case("1m"))


CHUNK_SIZES = (16384, 8192, 32768)  # the default first


@case(
    "chunk-size",
    "samba-421m's 128K and 1M-token prefills with generate(prefill_chunk_size=...) of 16K (the default), 8K and 32K",
)
def chunk_size_case(ctx):
    """One model; per chunk size a warm-up call of two chunks (the kernel variants of a first chunk and of one that
    continues; the prompt is a whole number of chunks), then REPEATS calls per length: the cost a chunk pays whatever
    its length (the host's launches, the window's keys carried over) against the memory of a longer chunk's
    activations. At 128K, one more call timed chunk by chunk says which of the host and the GPU the chunks wait on
    (`chunk_times`)."""
    lengths = SMOKE_LENGTHS if ctx.smoke else LENGTHS
    sizes = [size // 256 for size in CHUNK_SIZES] if ctx.smoke else CHUNK_SIZES
    model = models.build("samba", ctx.device, dtype_for(ctx.device), ctx.smoke)
    for size in sizes:
        prefill_row(ctx, "samba", model, 2 * size, 1, prefill_chunk_size=size)
        for length in lengths.values():
            cell = dict(model="samba", length=length, chunk=size)
            refusal = ctx.budget.refuses(
                REPEATS * models.prefill_seconds("samba", 1, length) * _measured_scale.get("samba", 1.0)
            )
            if refusal:
                ctx.skip(refusal, **cell)
                continue
            row = prefill_row(ctx, "samba", model, length, REPEATS, prefill_chunk_size=size)
            if length == lengths["128k"]:
                row.update(chunk_times(model, length, size, ctx.device))
            ctx.add(**row, chunk=size)


@torch.no_grad()
def chunk_times(model, length: int, chunk: int, device: torch.device) -> dict:
    """Medians over the chunks of one prefill of `length` tokens: the host's milliseconds from one chunk's forward
    returning to the next's (its launches), and the GPU's between CUDA events recorded at the same points (its
    work, or, where it is the shorter, the host's launches again: the GPU waited)."""
    marks = []

    def mark(*_):
        event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if event is not None:
            event.record()
        marks.append((time.perf_counter(), event))

    prompt = random_prompt(model.config.vocab_size, 1, length, device)
    handle = model.register_forward_hook(mark)
    try:
        synchronize(device)
        mark()
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),  # else generate masks the prompt's pad ids: another path
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
            prefill_chunk_size=chunk,
        )
        synchronize(device)
    finally:
        handle.remove()
    times = dict(host_ms_per_chunk=statistics.median(1e3 * (b[0] - a[0]) for a, b in zip(marks, marks[1:])))
    if device.type == "cuda":
        times["gpu_ms_per_chunk"] = statistics.median(a[1].elapsed_time(b[1]) for a, b in zip(marks, marks[1:]))
    return times


@case(
    "profile",
    "where samba-421m's 128K-token prefill goes: one generate() call under torch.profiler, its GPU time by "
    "operator and by kernel",
)
@torch.no_grad()
def profile_case(ctx):
    profile_prefill(ctx, "128k")


@case("profile-1m", "where samba-421m's 1M-token prefill goes: as the profile case, at 1M tokens")
@torch.no_grad()
def profile_1m_case(ctx):
    profile_prefill(ctx, "1m")


def profile_prefill(ctx, key: str) -> None:
    """After a warm-up call, one unprofiled call (wall-clock) and one profiled: the operators that launched the
    most GPU time (their own kernels), the kernels that took it, the sum of every kernel's time against the
    wall-clock (the rest is the GPU waiting on the host), and the kernels after which the GPU waited longest."""
    length = SMOKE_LENGTHS[key] if ctx.smoke else LENGTHS[key]
    model = models.build("samba", ctx.device, dtype_for(ctx.device), ctx.smoke)
    prompt = random_prompt(model.config.vocab_size, 1, length, ctx.device)
    mask = torch.ones_like(prompt)

    def call():
        return model.generate(
            prompt, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0
        )

    warmup_s = wall_seconds(call, ctx.device)[0]
    seconds = wall_seconds(call, ctx.device)[0]
    found = profiled(call, ctx.device, 1)
    for kind, rows in found.items():
        for name, us, count in rows[:PROFILE_TOP]:
            ctx.add(row=kind, name=name[:140], ms=us / 1e3, calls=count)
    kernel_ms = sum(us for _, us, _ in found["kernel"]) / 1e3
    ctx.add(
        row="total", name="every kernel, one after another", ms=kernel_ms, calls=sum(c for *_, c in found["kernel"])
    )
    ctx.add(row="total", name="the call, wall-clock (unprofiled)", ms=seconds * 1e3, warmup_s=warmup_s)


def measured(result: dict) -> dict:
    """{(model, length key): row} of the measured rows."""
    return {(row["model"], key): row for key in LENGTHS for row in rows_of(result, key) if "seconds" in row}


def render_overview(result: dict) -> list[str]:
    rows = measured(result)
    if not rows:
        return []
    lines = ["## Overview", ""]
    by_length = []
    for key in LENGTHS:
        samba, llama = rows.get(("samba", key)), rows.get(("llama", key))
        by_length.append(
            dict(
                prompt=key,
                samba=samba and samba["seconds"],
                llama=llama and llama["seconds"],
                ratio=models.ratio(llama and llama["seconds"], samba and samba["seconds"]),
            )
        )
    spec = [
        ("prompt", "prompt"),
        ("samba s", "samba", ".3f"),
        ("llama s", "llama", ".3f"),
        ("llama / samba", "ratio", ".2f"),
    ]
    lines += columns(by_length, spec)
    for name in models.MODELS:
        short, long = rows.get((name, "128k")), rows.get((name, "1m"))
        if short and long:
            lines += [
                "",
                f"{name}: time(1M) / time(128K) = **{long['seconds'] / short['seconds']:.2f}** "
                f"(linear: {long['length'] / short['length']:.0f})",
            ]
    return lines + [""]


COLUMNS = [
    ("model", "model"),
    ("length", "length"),
    ("median s", "seconds", ".3f"),
    ("tokens/s", "tokens_per_s", ".0f"),
    ("runs s", lambda row: ", ".join(f"{s:.3f}" for s in row.get("runs_s", [])) or None),
    ("peak GiB", "peak_gib", ".2f"),
    ("predicted peak GiB", "predicted_peak_gib", ".1f"),
    ("note", "skipped"),
]


PROFILE_COLUMNS = [
    ("what", "row"),
    ("operator or kernel", "name"),
    ("ms", "ms", ".2f"),
    ("calls", "calls", ".0f"),
    ("note", "skipped"),
]


CHUNK_COLUMNS = [
    *COLUMNS[:2],
    ("prefill chunk", "chunk"),
    *COLUMNS[2:-1],
    ("host ms per chunk", "host_ms_per_chunk", ".1f"),
    ("GPU ms per chunk", "gpu_ms_per_chunk", ".1f"),
    COLUMNS[-1],
]


def render_case(name: str, entry: dict) -> list[str]:
    spec = {"chunk-size": CHUNK_COLUMNS}.get(name, PROFILE_COLUMNS if name.startswith("profile") else COLUMNS)
    return columns(entry["rows"], spec)


def summary(result: dict) -> list[str]:
    rows = measured(result)
    lines = []
    for key in LENGTHS:
        samba, llama = rows.get(("samba", key)), rows.get(("llama", key))
        if samba:
            lines.append(
                f"{key}: samba {samba['seconds']:.3f} s"
                + (f", llama {llama['seconds']:.3f} s ({llama['seconds'] / samba['seconds']:.2f}x)" if llama else "")
            )
    if ("samba", "128k") in rows and ("samba", "1m") in rows:
        lines.append(
            f"samba time(1M)/time(128K) = {rows['samba', '1m']['seconds'] / rows['samba', '128k']['seconds']:.2f}"
        )
    return lines
