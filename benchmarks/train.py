"""train: training tokens/s and peak memory, samba-421m against the paper's 438M Llama in one process, eager and
under torch.compile, from 8 x 4K tokens to one 64K-token sequence."""

import torch

from . import models
from .harness import columns, free_memory, peak_gib, profiled, registry, rows_of, synchronize, wall_seconds

TITLE = "Training: tokens/s and peak memory, samba-421m against the paper's 438M Llama"
# (batch, length) per case, in the order of priority: the long single sequences first.
SHAPES = {
    "b1-64k": (1, 65536),
    "b1-64k-packed": (1, 65536),
    "b2-32k": (2, 32768),
    "b1-16k": (1, 16384),
    "b8-4k": (8, 4096),
}
SMOKE_SHAPES = {"b1-64k": (1, 96), "b1-64k-packed": (1, 96), "b2-32k": (2, 64), "b1-16k": (1, 48), "b8-4k": (2, 32)}
# Rows of packed documents, as DataCollatorWithFlattening makes them (position ids restarting at each document):
# documents of DOCUMENT_TOKENS tokens, uniformly at random (seeded), the last one cut at the row's end.
PACKED = {"b1-64k-packed"}
DOCUMENT_TOKENS = (1024, 8192)
SMOKE_CHECKPOINTED = "b1-64k"  # a smoke run checkpoints this shape's activations, so that the path runs
MODES = ("eager", "compiled")
WARMUP_STEPS, STEPS = 2, 5
INTRO = f"""
AdamW steps (fused on CUDA, learning rate 1e-4, gradient clipping 1.0) on random tokens with labels = inputs:
fp32 weights under bf16 autocast, {WARMUP_STEPS} warm-up steps, then the mean of {STEPS}. samba-421m against
transformers' `LlamaForCausalLM` of the paper's 438M shape (12 layers, hidden 1536, 12 heads, MLP 4096, tied
embeddings, sdpa), in one process. `compiled`: the forward under `torch.compile(model, fullgraph=True)`
(inductor); its first step pays the compilation (`first step s`). Activation checkpointing
(`model.activation_checkpointing_enable()`, every layer) is used where the peak predicted from this run's rows
(or a prior guess) would not fit the GPU, and after an out-of-memory error. MFU counts 6 N per token for the
non-embedding weights plus the attention scores (sliding layers: the window's keys per query), over the measured
bf16 matmul rate.
"""
# Planning guesses (earlier rows of benchmarks/results/train.json), corrected by each run's rows: tokens/s at
# 8 x 4K, the Llama's slowdown as its attention grows with the length, the compilation's seconds, peak bytes
# per token without checkpointing, and checkpointing's extra time.
TOKENS_PER_S = {
    ("samba", "eager"): 1.0e5,
    ("llama", "eager"): 1.0e5,
    ("samba", "compiled"): 1.4e5,
    ("llama", "compiled"): 1.15e5,
}
LLAMA_ATTENTION_LENGTH = 32768  # its time per token doubles about every this many tokens of length
COMPILE_S = 90.0
PEAK_BYTES_PER_TOKEN = {
    ("samba", "eager"): 1.6e6,
    ("llama", "eager"): 1.7e6,
    ("samba", "compiled"): 1.3e6,
    ("llama", "compiled"): 1.3e6,
}
CHECKPOINTING_SLOWDOWN = 1.35

CASES, case = registry()
_measured: dict[tuple[str, str], dict] = {}  # (model, mode) -> {"step_scale", "bytes_per_token"} from this run


def model_flops_per_token(model, length: int) -> float:
    """6 N per token for the non-embedding weights, plus attention scores: 12 . heads . head_dim . keys per query."""
    n = model.num_parameters() - model.get_input_embeddings().weight.numel()
    config = model.config
    attention = 0.0
    for layer_type in getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers:
        if layer_type == "full_attention":
            attention += 12 * config.num_attention_heads * config.head_dim * (length + 1) / 2
        elif layer_type == "sliding_attention":
            attention += 12 * config.num_attention_heads * config.head_dim * min(config.sliding_window, length)
    return 6 * n + attention


def guessed_step_s(name: str, mode: str, batch: int, length: int, checkpointing: bool) -> float:
    rate = TOKENS_PER_S[(name, mode)]
    if name == "llama":
        rate /= 1 + length / LLAMA_ATTENTION_LENGTH
    seconds = batch * length / rate * _measured.get((name, mode), {}).get("step_scale", 1.0)
    return seconds * (CHECKPOINTING_SLOWDOWN if checkpointing else 1.0)


def predicted_peak(name: str, mode: str, batch: int, length: int) -> float:
    per_token = _measured.get((name, mode), {}).get("bytes_per_token", PEAK_BYTES_PER_TOKEN[(name, mode)])
    return batch * length * per_token


def packed_position_ids(batch: int, length: int, device: torch.device, smoke: bool) -> torch.Tensor:
    """(batch, length) position ids of rows of packed documents (see DOCUMENT_TOKENS; 8 to 32 tokens in smoke
    runs)."""
    shortest, longest = (8, 32) if smoke else DOCUMENT_TOKENS
    generator, rows = torch.Generator().manual_seed(0), []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < length:
            lengths.append(int(torch.randint(shortest, longest + 1, (), generator=generator)))
        rows.append(torch.cat([torch.arange(n) for n in lengths])[:length])
    return torch.stack(rows).to(device)


def training_step(model, batch: int, length: int, device: torch.device, compiled: bool, smoke: bool, packed=False):
    """One AdamW step on random tokens (see INTRO), as a function that returns the loss; `packed`: rows of packed
    documents (`packed_position_ids`)."""
    model.train()
    if compiled:  # smoke runs trace with dynamo only: inductor's CPU compile takes minutes
        forward = torch.compile(model, fullgraph=True, **({"backend": "eager"} if smoke else {}))
    else:
        forward = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device, generator=generator)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    documents = {"position_ids": packed_position_ids(batch, length, device, smoke)} if packed else {}

    def step():
        with autocast:
            loss = forward(input_ids=ids, labels=ids, use_cache=False, **documents).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def train_steps(model, batch: int, length: int, device: torch.device, compiled: bool, smoke: bool, packed=False):
    """tokens/s, step seconds, peak GiB, the last loss and the first step's seconds of AdamW steps."""
    step = training_step(model, batch, length, device, compiled, smoke, packed)
    warmup, steps = (1, 1) if smoke else (WARMUP_STEPS, STEPS)
    first_s, _ = wall_seconds(step, device)
    for _ in range(warmup - 1):
        step()
    free_memory()  # resets the peak: the timed steps' own
    seconds, loss = wall_seconds(lambda: [step() for _ in range(steps)][-1], device)
    synchronize(device)
    loss = loss.item()
    if loss != loss or loss in (float("inf"), float("-inf")):
        raise FloatingPointError(f"the training loss is {loss}")
    return dict(
        tokens_per_s=batch * length * steps / seconds,
        step_s=seconds / steps,
        peak_gib=peak_gib(),
        loss=loss,
        first_step_s=first_s,
    )


def measure(ctx, name: str, mode: str, batch: int, length: int, checkpointing: bool = False, packed=False) -> None:
    cell = dict(model=name, mode=mode, batch=batch, length=length)
    if not checkpointing and ctx.memory_refusal(predicted_peak(name, mode, batch, length)):
        checkpointing, note = True, "activation checkpointing: predicted not to fit without"
    else:
        note = "activation checkpointing (smoke run: to run that path)" if checkpointing else None
    for attempt in range(2):
        predicted_s = (WARMUP_STEPS + STEPS) * guessed_step_s(name, mode, batch, length, checkpointing)
        predicted_s += COMPILE_S if mode == "compiled" else 0.0
        refusal = ctx.budget.refuses(predicted_s)
        if refusal:
            return ctx.skip(refusal, **cell, checkpointing=checkpointing)
        torch._dynamo.reset()
        free_memory()
        model, out_of_memory, refused = models.build(name, ctx.device, torch.float32, ctx.smoke), None, None
        if checkpointing:
            model.activation_checkpointing_enable()
        try:
            row = train_steps(model, batch, length, ctx.device, mode == "compiled", ctx.smoke, packed)
        except torch.OutOfMemoryError as error:  # retried once with checkpointing, else recorded
            out_of_memory = f"out of memory ({str(error).splitlines()[0][:160]})"
        except torch._dynamo.exc.Unsupported as error:  # recorded: a model that torch.compile refuses
            refused = f"torch.compile refuses this model: {str(error).splitlines()[0][:160]}"
        finally:
            params = model.num_parameters()
            flops_per_token = model_flops_per_token(model, length)
            del model
            torch._dynamo.reset()
            free_memory()
        if refused:
            return ctx.skip(refused, **cell, checkpointing=checkpointing)
        if out_of_memory is None:
            break
        if checkpointing or attempt:
            return ctx.skip(out_of_memory, **cell, checkpointing=checkpointing)
        checkpointing, note = True, f"activation checkpointing after {out_of_memory}"
    learned = _measured.setdefault((name, mode), {})
    learned["step_scale"] = (
        row["step_s"] / guessed_step_s(name, mode, batch, length, checkpointing) * learned.get("step_scale", 1.0)
    )
    if not checkpointing and row["peak_gib"]:
        learned["bytes_per_token"] = row["peak_gib"] * 2**30 / (batch * length)
    mfu = flops_per_token * row["tokens_per_s"] / ctx.ceilings()["bf16_flops_per_s"]
    ctx.add(**cell, checkpointing=checkpointing, params=params, **row, mfu=mfu, note=note)


def shape_case(key: str):
    def run(ctx):
        batch, length = SMOKE_SHAPES[key] if ctx.smoke else SHAPES[key]
        for mode in MODES:
            for name in models.MODELS:
                checkpointing = ctx.smoke and key == SMOKE_CHECKPOINTED
                measure(ctx, name, mode, batch, length, checkpointing=checkpointing, packed=key in PACKED)

    return run


for _key, (_batch, _length) in SHAPES.items():
    _rows = f", rows of packed documents of {DOCUMENT_TOKENS[0]} to {DOCUMENT_TOKENS[1]} tokens" * (_key in PACKED)
    _title = f"training steps at batch {_batch} x {_length // 1024}K tokens{_rows}, both models, eager and compiled"
    case(_key, _title)(shape_case(_key))


PROFILE_SHAPE, SMOKE_PROFILE_SHAPE = (1, 65536), (1, 48)
PROFILE_TOP = 15


@case(
    "profile",
    "where samba-421m's training step at batch 1 x 64K goes, eager and compiled: GPU time by kernel, and the step's "
    "wall-clock against the sum of its kernels",
)
def profile_case(ctx):
    """Compiled steps at long sequences ran slower than eager ones, for both models (train.md, b1-64k): this case
    says where, per mode, after the warm-up steps (the compilation)."""
    batch, length = SMOKE_PROFILE_SHAPE if ctx.smoke else PROFILE_SHAPE
    for mode in MODES:
        cell = dict(model="samba", mode=mode, batch=batch, length=length)
        refusal = ctx.budget.refuses(
            (WARMUP_STEPS + 2) * guessed_step_s("samba", mode, batch, length, False)
            + (COMPILE_S if mode == "compiled" else 0.0)
        )
        if refusal:
            ctx.skip(refusal, **cell)
            continue
        torch._dynamo.reset()
        free_memory()
        model = models.build("samba", ctx.device, torch.float32, ctx.smoke)
        try:
            step = training_step(model, batch, length, ctx.device, mode == "compiled", ctx.smoke)
            for _ in range(WARMUP_STEPS):
                step()
            seconds = wall_seconds(step, ctx.device)[0]
            kernels = profiled(step, ctx.device, 1)["kernel"]
        finally:
            del model
            torch._dynamo.reset()
            free_memory()
        for name, us, count in kernels[:PROFILE_TOP]:
            ctx.add(**cell, kernel=name[:120], ms=us / 1e3, launches=count)
        ctx.add(**cell, kernel="every kernel, one after another", ms=sum(us for _, us, _ in kernels) / 1e3)
        ctx.add(**cell, kernel="the step, wall-clock (unprofiled)", ms=seconds * 1e3)


def pairs(result: dict) -> list[tuple[str, str, dict | None, dict | None]]:
    """(shape, mode, samba's row, llama's row) of every shape and mode with a measured row."""
    found = []
    for key in SHAPES:
        rows = {
            (models.family(row["model"]), row["mode"]): row for row in rows_of(result, key) if "tokens_per_s" in row
        }
        for mode in MODES:
            samba, llama = rows.get(("samba", mode)), rows.get(("llama", mode))
            if samba or llama:
                found.append((key, mode, samba, llama))
    return found


def render_overview(result: dict) -> list[str]:
    rows = [
        dict(
            shape=key,
            mode=mode,
            samba=samba and samba["tokens_per_s"],
            llama=llama and llama["tokens_per_s"],
            ratio=models.ratio(samba and samba["tokens_per_s"], llama and llama["tokens_per_s"]),
        )
        for key, mode, samba, llama in pairs(result)
    ]
    if not rows:
        return []
    spec = [
        ("shape", "shape"),
        ("mode", "mode"),
        ("samba tokens/s", "samba", ",.0f"),
        ("llama tokens/s", "llama", ",.0f"),
        ("samba / llama", "ratio", ".2f"),
    ]
    return ["## Overview", ""] + columns(rows, spec) + [""]


COLUMNS = [
    ("model", "model"),
    ("mode", "mode"),
    ("batch", "batch"),
    ("length", "length"),
    ("checkpointing", "checkpointing"),
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("step s", "step_s", ".3f"),
    ("peak GiB", "peak_gib", ".1f"),
    ("MFU", "mfu", ".0%"),
    ("loss", "loss", ".3f"),
    ("first step s", "first_step_s", ".1f"),
    ("note", lambda row: row.get("skipped") or row.get("note")),
]


PROFILE_COLUMNS = [
    ("mode", "mode"),
    ("batch", "batch"),
    ("length", "length"),
    ("kernel", "kernel"),
    ("ms", "ms", ".2f"),
    ("launches", "launches", ".0f"),
    ("note", "skipped"),
]


def render_case(name: str, entry: dict) -> list[str]:
    return columns(entry["rows"], PROFILE_COLUMNS if name == "profile" else COLUMNS)


def summary(result: dict) -> list[str]:
    return [
        f"{key} {mode}: samba {samba['tokens_per_s']:,.0f} tok/s, llama {llama['tokens_per_s']:,.0f} tok/s "
        f"({samba['tokens_per_s'] / llama['tokens_per_s']:.2f}x)"
        for key, mode, samba, llama in pairs(result)
        if samba and llama
    ]
