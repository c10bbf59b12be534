"""generate: the public `model.generate()` call, timed wall-clock; samba-421m against the paper's 438M Llama in
one process, each model in each of its modes. Secondary: one compiled decode step alone (case `step`)."""

import contextlib
import dataclasses
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch
from torch._inductor import config as inductor_config
from transformers import StaticCache

from samba_hf import SambaStaticCache

from . import models
from .harness import columns, free_memory, peak_gib, profiled, registry, rows_of, synchronize, wall_seconds

TITLE = "Generation: `model.generate()`, samba-421m against the paper's 438M Llama"
NEW_TOKENS = 128
# A row's steady and TTFT calls are repeated where a pair of them is short, and their medians taken (see INTRO).
REPEATED_PAIRS, REPEAT_BELOW_S = 5, 2.0
# (batch, context) of each case, in the order of priority: the targets' cells first.
CELLS = {
    "b1-4k": (1, 4096),
    "b16-64k": (16, 65536),
    "b64-64k": (64, 65536),
    "b1-64k": (1, 65536),
    "b1-128k": (1, 131072),
    "b16-4k": (16, 4096),
    "b64-4k": (64, 4096),
    "b16-128k": (16, 131072),
    "b64-128k": (64, 131072),
}
# Smoke runs: the tiny models (window 64) at batches 1-3, contexts on both sides of the window, 4 new tokens.
SMOKE_BATCH = {1: 1, 16: 2, 64: 3}
SMOKE_CONTEXT = {4096: 48, 65536: 80, 131072: 144}
SMOKE_NEW_TOKENS = 4
STEP_CONTEXT, STEP_TOKENS, STEP_REPEATS = 4096, 32, 5
VARIANT_ROUNDS = 5  # engine-variants: alternating rounds over the variants

INTRO = f"""
Each row times the public call `model.generate(prompt, attention_mask=ones, max_new_tokens=N, min_new_tokens=N,
do_sample=False)`, wall-clock, with N = {NEW_TOKENS} and a prompt of random tokens as long as the row's context, so
every cache is prefilled for real by generate() itself. samba-421m (`SambaConfig.from_preset("samba-421m")`)
against transformers' `LlamaForCausalLM` of the paper's 438M shape (12 layers, hidden 1536, 12 heads, MLP 4096,
vocabulary 32000, tied embeddings, sdpa); random weights, bf16, one process. Each row builds its model afresh,
after `torch._dynamo.reset()`. The modes:

- samba `engine`: `generate()` with its defaults (on CUDA, samba-hf's decode engine);
- samba `static`: `decode_engine=False, cache_implementation="static"` (transformers compiles the decode step);
- samba `eager`: `decode_engine=False` (dynamic cache, eager steps);
- llama `static`: `cache_implementation="static"` (compiled step); llama `eager`: its defaults (dynamic cache).

Calls per row: the first (`first s`: it pays compilation or graph capture), then the same call (`steady s`) and
one with N = 1 (`TTFT s`: prefill plus the first token) in turn, {REPEATED_PAIRS} times each where such a pair takes
under {REPEAT_BELOW_S:g} s (a short prompt's prefill is bound by the host's launches and moves by milliseconds from
call to call), else once (runs before 2026-12-04 12:10 UTC: once; until 14:50 UTC that day: three times); `steady s`
and `TTFT s` are the medians.
Warm-up = first - steady.
ms/step = (steady - TTFT) / (N - 1); tokens/s = batch / that; e2e tokens/s = batch x N / steady.
Roofline (batch 1) = (weight bytes + the cache's bytes at that context, measured on a real prefill) / the measured
copy bandwidth; `of roofline` = roofline / ms per step. Cells predicted not to fit the GPU's memory or what is left
of the run's time budget are skipped, with the prediction. `log` quotes what samba_hf logged during the calls
(the decode engine says which path ran).

Case `first-call`: the batch-1, 4K-prompt engine row's calls in two new processes in turn, sharing a Triton cache
folder that starts empty: the first process compiles every kernel (a new machine), the second finds them compiled
(every later process). Three times, each pair with its own empty cache: with the kernels compiled ahead in forked
processes (the default on Linux), ahead in threads only (SAMBA_COMPILE_AHEAD=threads), and each at its first
launch (SAMBA_COMPILE_AHEAD=0). `process s` is the whole process: Python's imports, the model's build, the three
calls. `of which compiled ahead s`: the engine's dry run that compiles the call's kernels before it runs, and the
wait for them (`of which the dry run s`: the dry run alone); `capture s`: the step's graph capture. `Triton s`: the seconds Triton spent in the process's compilations (loads from
its disk cache in the second process, and where children compiled), summed over kernels that compile concurrently,
with the slowest; a forked child's compile is not seen there.

Case `engine-profile`: the engine's batch-1 step at 4K, each kernel's GPU time under torch.profiler (launched one by
one, ordinary launches) and the replay of the captured step with and without programmatic dependent launch, a step
per replay and STEPS_PER_REPLAY per replay (µs per step).

Case `engine-variants`: the same step captured with the defaults and with other settings of its kernels (the
embedding by PyTorch, the Mamba decode tiles, the decode attention's tiling), all from one state after a real 4K
prompt, replayed in alternating rounds in one process: what the defaults were picked by. `same tokens` compares
the last tokens after every round: kernels that sum in another order can part the random model's greedy path.
"""


@dataclasses.dataclass(frozen=True)
class Mode:
    model: str
    name: str
    kwargs: dict
    engine_switch: bool  # passes decode_engine=False where generate() has the engine


MODES = (
    Mode("samba", "engine", {}, False),
    Mode("samba", "static", {"cache_implementation": "static"}, True),
    Mode("samba", "eager", {}, True),
    Mode("llama", "static", {"cache_implementation": "static"}, False),
    Mode("llama", "eager", {}, False),
)
# Planning guesses for the time budget, corrected by each run's measurements (earlier values in
# benchmarks/results/generate.json): a step's fixed seconds (eager steps are bound by the host), the share of the
# copy bandwidth its bytes stream at, a first call's extra seconds (compilation, capture), building a model.
STEP_FIXED_S = {
    "eager": {"samba": 0.020, "llama": 0.015},
    "static": {"samba": 0.0017, "llama": 0.0017},
    "engine": {"samba": 0.0007},
}
STEP_BANDWIDTH_SHARE = 0.5
FIRST_CALL_EXTRA_S = {"static": 60.0, "engine": 15.0, "eager": 3.0, "step": 90.0}
BUILD_S = 3.0

CASES, case = registry()


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@functools.cache
def engine_switch_supported(device_type: str) -> bool:
    """Whether generate() has the decode engine here: without it, generate()'s defaults are the eager loop and the
    engine rows are skipped."""
    return models.generate_takes_decode_engine(models.build("samba", torch.device(device_type), torch.float32, True))


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def samba_hf_logs():
    """The messages samba_hf logs (INFO and up) inside the block."""
    logger, handler = logging.getLogger("samba_hf"), _Messages()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def pairs_for(pair_s: float) -> int:
    """How many (steady, TTFT) pairs a row measures, where one pair takes `pair_s` seconds."""
    return REPEATED_PAIRS if pair_s < REPEAT_BELOW_S else 1


class Planner:
    """Predicts a row's seconds from guesses that each measured row corrects (per model, and per mode)."""

    def __init__(self, copy_bytes_per_s: float, device: torch.device, smoke: bool):
        self.copy, self.device, self.smoke = copy_bytes_per_s, device, smoke
        self.prefill_scale, self.step_scale, self.first_extra = {}, {}, {}

    def step_bytes(self, model: str, batch: int, context: int) -> float:
        dtype = dtype_for(self.device)
        element = torch.tensor([], dtype=dtype).element_size()
        cache = models.cache_bytes(model, self.device, dtype, self.smoke, batch, context)
        return models.parameter_count(model, self.smoke) * element + cache

    def _step_guess(self, mode: Mode, batch: int, context: int) -> float:
        streamed = self.step_bytes(mode.model, batch, context) / (STEP_BANDWIDTH_SHARE * self.copy)
        return STEP_FIXED_S[mode.name][mode.model] + streamed

    def seconds(self, mode: Mode, batch: int, context: int, new_tokens: int) -> float:
        prefill = models.prefill_seconds(mode.model, batch, context) * self.prefill_scale.get(mode.model, 1.0)
        step = self._step_guess(mode, batch, context) * self.step_scale.get((mode.model, mode.name), 1.0)
        first = self.first_extra.get((mode.model, mode.name), FIRST_CALL_EXTRA_S[mode.name])
        pair = 2 * prefill + (new_tokens - 1) * step  # a steady call and a TTFT call
        return prefill + (new_tokens - 1) * step + pairs_for(pair) * pair + first + BUILD_S

    def learn(self, mode: Mode, batch: int, context: int, row: dict) -> None:
        self.prefill_scale[mode.model] = row["ttft_s"] / models.prefill_seconds(mode.model, batch, context)
        self.step_scale[(mode.model, mode.name)] = row["ms_per_step"] * 1e-3 / self._step_guess(mode, batch, context)
        key = (mode.model, mode.name)
        self.first_extra[key] = max(self.first_extra.get(key, 0.0), row["warmup_s"])


@functools.cache
def planner(device_type: str, smoke: bool, copy_bytes_per_s: float) -> Planner:
    return Planner(copy_bytes_per_s, torch.device(device_type), smoke)


def random_prompt(vocab_size: int, batch: int, context: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randint(0, vocab_size, (batch, context), device=device, generator=generator)


@torch.no_grad()
def time_generate(model, kwargs: dict, batch: int, context: int, new_tokens: int, device: torch.device) -> dict:
    """The three calls of a row (see INTRO), each checked to return exactly the tokens asked for."""
    prompt = random_prompt(model.config.vocab_size, batch, context, device)
    common = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0, **kwargs)

    def call(count: int) -> float:
        seconds, out = wall_seconds(
            lambda: model.generate(prompt, max_new_tokens=count, min_new_tokens=count, **common), device
        )
        if tuple(out.shape) != (batch, context + count):
            raise RuntimeError(
                f"generate() returned {tuple(out.shape)} tokens for a {batch} x {context} prompt and "
                f"{count} new tokens: the timing would not be of {count} steps"
            )
        return seconds

    first = call(new_tokens)
    engine = model.__dict__.get("_decode_engine")  # samba's: what its first call spent once
    once = {}
    if engine is not None:
        stats = engine.stats
        once = dict(compile_ahead_s=stats.compile_s, dry_run_s=stats.dry_run_s, capture_s=stats.capture_s)
    steadies, ttfts = [call(new_tokens)], [call(1)]
    while len(steadies) < pairs_for(steadies[0] + ttfts[0]):
        steadies.append(call(new_tokens))
        ttfts.append(call(1))
    steady, ttft = statistics.median(steadies), statistics.median(ttfts)
    step = (steady - ttft) / (new_tokens - 1)
    return dict(
        **once,
        first_s=first,
        steady_s=steady,
        ttft_s=ttft,
        steady_runs_s=steadies,
        ttft_runs_s=ttfts,
        warmup_s=first - steady,
        ms_per_step=step * 1e3,
        tokens_per_s=batch / step,
        e2e_tokens_per_s=batch * new_tokens / steady,
        peak_gib=peak_gib(),
    )


def measure_mode(ctx, mode: Mode, batch: int, context: int, new_tokens: int) -> None:
    cell = dict(model=mode.model, mode=mode.name, batch=batch, context=context, new_tokens=new_tokens)
    switch = engine_switch_supported(ctx.device.type)
    if mode.name == "engine" and not switch:
        return ctx.skip("this samba_hf's generate() has no decode engine (it takes no decode_engine)", **cell)
    dtype = dtype_for(ctx.device)
    plan = planner(ctx.device.type, ctx.smoke, ctx.ceilings()["copy_bytes_per_s"])
    peak = models.predicted_peak_bytes(mode.model, ctx.device, dtype, ctx.smoke, batch, context, new_tokens)
    refusal = ctx.memory_refusal(peak) or ctx.budget.refuses(plan.seconds(mode, batch, context, new_tokens))
    if refusal:
        return ctx.skip(refusal, **cell, predicted_peak_gib=peak / 2**30)
    kwargs = dict(mode.kwargs, **({"decode_engine": False} if mode.engine_switch and switch else {}))
    model, out_of_memory = None, None
    free_memory()
    torch._dynamo.reset()
    try:
        model = models.build(mode.model, ctx.device, dtype, ctx.smoke)
        with samba_hf_logs() as messages:
            row = time_generate(model, kwargs, batch, context, new_tokens, ctx.device)
    except torch.OutOfMemoryError as error:  # a measured outcome: the row says so, the next cells still run
        out_of_memory = f"out of memory ({str(error).splitlines()[0][:160]})"
    finally:
        del model
        torch._dynamo.reset()  # also frees the CUDA graphs' memory pools
        free_memory()
    if out_of_memory:
        return ctx.skip(out_of_memory, **cell, predicted_peak_gib=peak / 2**30)
    plan.learn(mode, batch, context, row)
    if batch == 1:
        roofline_ms = plan.step_bytes(mode.model, 1, context) / ctx.ceilings()["copy_bytes_per_s"] * 1e3
        row.update(roofline_ms=roofline_ms, of_roofline=roofline_ms / row["ms_per_step"])
    ctx.add(**cell, **row, log=messages)


def cell_case(batch: int, context: int):
    def run(ctx):
        shape_batch = SMOKE_BATCH[batch] if ctx.smoke else batch
        shape_context = SMOKE_CONTEXT[context] if ctx.smoke else context
        for mode in MODES:
            measure_mode(ctx, mode, shape_batch, shape_context, SMOKE_NEW_TOKENS if ctx.smoke else NEW_TOKENS)

    return run


for _name, (_batch, _context) in CELLS.items():
    case(_name, f"generate() at batch {_batch} after a {_context // 1024}K-token prompt, both models, every mode")(
        cell_case(_batch, _context)
    )


@torch.no_grad()
def compiled_step_ms(model, context: int, device: torch.device, graph_of_steps: bool, smoke: bool) -> dict:
    """One decode step at batch 1 over a static cache prefilled for real, compiled (fullgraph, static shapes):
    ms per token, the median of STEP_REPEATS runs of STEP_TOKENS steps, and the compilation's seconds.
    Samba's static cache keeps its window keys in ring buffers, so its step is one graph at every length.

    One call of the compiled step per token (CUDA graphs by inductor; the host's work per call is timed too), or
    with `graph_of_steps` the step compiled without CUDA graphs and STEP_TOKENS steps (argmax and position
    increment included) captured as one CUDA graph: the GPU's own time per token. Smoke runs trace the step with
    dynamo only (backend "eager"): inductor's CPU compile takes minutes."""
    cache_class = SambaStaticCache if model.config.model_type == "samba" else StaticCache
    cache = cache_class(config=model.config, max_cache_len=context + (STEP_REPEATS + 2) * STEP_TOKENS + 2)
    prompt = random_prompt(model.config.vocab_size, 1, context, device)
    token = model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    if smoke:
        step = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    else:
        options = {"triton.cudagraphs": not graph_of_steps}
        step = torch.compile(model.forward, options=options, fullgraph=True, dynamic=False)
    position = torch.tensor([[context]], device=device)

    def decode(count, token, position):
        for _ in range(count):
            token = step(input_ids=token, cache=cache, use_cache=True, position_ids=position).logits.argmax(-1)
            position = position + 1
        return token, position

    compile_s, (token, position) = wall_seconds(lambda: decode(2, token, position), device)
    if graph_of_steps and device.type == "cuda":

        def steps_in_place():  # the graph's inputs are its outputs' buffers, so replays continue the sequence
            next_token, next_position = decode(STEP_TOKENS, token, position)
            token.copy_(next_token)
            position.copy_(next_position)

        steps_in_place()  # outside the capture: allocator and lazy initialisations
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            steps_in_place()
        run = graph.replay
    else:

        def run():
            nonlocal token, position
            token, position = decode(STEP_TOKENS, token, position)

    times = [wall_seconds(run, device)[0] / STEP_TOKENS for _ in range(STEP_REPEATS)]
    synchronize(device)
    return {"ms_per_token": statistics.median(times) * 1e3, "compile_s": compile_s}


FIRST_CALL_PROCESSES = (
    ("new machine", "an empty Triton cache: every kernel is compiled"),
    ("new process", "Triton's disk cache as the process before left it"),
)
# The engine's dry run compiling the kernels in forked processes (its default on Linux) or in threads, and each
# kernel compiled at its first launch.
FIRST_CALL_COMPILATION = (("ahead, processes", "1"), ("ahead, threads", "threads"), ("at launch", "0"))
FIRST_CALL_PROCESS_S = 40.0  # a planning guess: Python's imports, the model, two calls


@case("first-call", "samba's first generate() in a new process, batch 1, 4K prompt: on a new machine, and after one")
def first_call_case(ctx):
    """Two processes in turn, each importing samba_hf, building samba-421m and calling generate() twice (its
    defaults, N new tokens): the first with an empty Triton cache (a new machine), the second with the cache the
    first left (every later process of a user)."""
    batch, context = (SMOKE_BATCH[1], SMOKE_CONTEXT[4096]) if ctx.smoke else (1, 4096)
    new_tokens = SMOKE_NEW_TOKENS if ctx.smoke else NEW_TOKENS
    for compiled, switch in FIRST_CALL_COMPILATION:
        with tempfile.TemporaryDirectory() as triton_cache:
            environment = dict(os.environ, TRITON_CACHE_DIR=triton_cache, SAMBA_COMPILE_AHEAD=switch)
            for process, about in FIRST_CALL_PROCESSES:
                cell = dict(
                    model="samba", process=process, about=about, compiled=compiled, batch=batch, context=context
                )
                refusal = ctx.budget.refuses(FIRST_CALL_PROCESS_S)
                if refusal:
                    ctx.skip(refusal, **cell)
                    continue
                command = [sys.executable, "-m", "benchmarks.generate", "first-call", str(batch), str(context)]
                command += [str(new_tokens), "smoke" if ctx.smoke else "full"]
                started = time.perf_counter()
                child = subprocess.run(command, capture_output=True, text=True, env=environment)
                if child.returncode:
                    ctx.skip(f"the process failed: {(child.stderr or child.stdout)[-300:]}", **cell)
                    continue
                row = json.loads(child.stdout.strip().splitlines()[-1])
                ctx.add(**cell, **row, process_s=time.perf_counter() - started)


def first_call_child(batch: int, context: int, new_tokens: int, smoke: bool) -> None:
    """The first-call case's process: prints one JSON line."""
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.build("samba", device, dtype_for(device), smoke)
    built = time.perf_counter() - started
    with triton_compilations() as compiled:
        row = time_generate(model, {}, batch, context, new_tokens, device)
    slowest = sorted(compiled, key=compiled.get, reverse=True)[:FIRST_CALL_SLOWEST]
    triton_row = dict(
        triton_compiles=len(compiled),
        triton_compile_s=sum(compiled.values()),
        slowest=", ".join(f"{name} {compiled[name]:.2f}" for name in slowest),
    )
    print(json.dumps(dict(build_s=built, **row, **triton_row)))


FIRST_CALL_SLOWEST = 5


@contextlib.contextmanager
def triton_compilations():
    """{kernel specialization: seconds} of every Triton compilation (or load from Triton's disk cache) in the
    context, from Triton's hooks around a JIT function's compile; empty where Triton has no such hooks."""
    compiled, started = {}, {}
    try:
        import triton

        runtime = triton.knobs.runtime
        runtime.jit_cache_hook, runtime.jit_post_compile_hook  # noqa: B018 (Triton 3.4 and later)
    except (ImportError, AttributeError):
        yield compiled
        return

    def before(*, key, repr, **_):
        started[str(key)] = time.perf_counter()
        return False  # compile as usual

    def after(*, key, repr, **_):
        name = f"{repr.split('[')[0]}#{len(compiled)}"
        compiled[name] = time.perf_counter() - started.pop(str(key), time.perf_counter())
        return False

    saved = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
    try:
        yield compiled
    finally:
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = saved


STEP_VARIANTS = {
    "graph of steps, PDL": dict(graph_of_steps=True, pdl=True),
    "one call per step": dict(graph_of_steps=False, pdl=False),
}


@case("step", "one compiled decode step alone at batch 1, 4K context: the GPU's time against the roofline")
def step_case(ctx):
    context = SMOKE_CONTEXT[4096] if ctx.smoke else STEP_CONTEXT
    copy = ctx.ceilings()["copy_bytes_per_s"]
    plan = planner(ctx.device.type, ctx.smoke, copy)
    for variant, options in STEP_VARIANTS.items():
        for name in models.MODELS:
            cell = dict(model=name, variant=variant, batch=1, context=context)
            refusal = ctx.budget.refuses(FIRST_CALL_EXTRA_S["step"])
            if refusal:
                ctx.skip(refusal, **cell)
                continue
            free_memory()
            torch._dynamo.reset()
            model = models.build(name, ctx.device, dtype_for(ctx.device), ctx.smoke)
            pdl = options["pdl"] and ctx.device.type == "cuda"
            with inductor_config.patch({"triton.enable_pdl": pdl}):
                row = compiled_step_ms(model, context, ctx.device, options["graph_of_steps"], ctx.smoke)
            del model
            torch._dynamo.reset()
            roofline_ms = plan.step_bytes(name, 1, context) / copy * 1e3
            ctx.add(**cell, **row, roofline_ms=roofline_ms, of_roofline=roofline_ms / row["ms_per_token"])


PROFILE_STEPS = 20
PROFILE_TOP = 12


def dependent_launches(enabled: bool):
    """samba_kernels' decode kernels launched as programmatic dependents or not (a no-op without samba_kernels)."""
    try:
        import samba_kernels
    except ImportError:
        return contextlib.nullcontext()
    return samba_kernels.programmatic_dependent_launch(enabled)


@case(
    "engine-profile",
    "the decode engine's batch-1 step at 4K context: each kernel's GPU time, and the captured step with and without "
    "programmatic dependent launch",
)
@torch.no_grad()
def engine_profile_case(ctx):
    """The step the engine captures for samba-421m after a real 4K prefill (generate() once): its kernels launched
    one by one under torch.profiler, without programmatic dependent launch so that no kernel's time includes a wait
    for the one before (µs per step, grouped by kernel), then the replay of its captured graph, and of the same step
    captured without dependent launches (ms per step, medians of STEP_REPEATS x STEP_TOKENS replays)."""
    from samba_hf import generation

    context = SMOKE_CONTEXT[4096] if ctx.smoke else STEP_CONTEXT
    model = models.build("samba", ctx.device, dtype_for(ctx.device), ctx.smoke)
    prompt = random_prompt(model.config.vocab_size, 1, context, ctx.device)
    engine = "eager" if ctx.device.type != "cuda" else True
    model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, decode_engine=engine)
    step = next(reversed(generation.decode_engine(model).graphs.values()))
    with dependent_launches(False):
        kernels = profiled(step.forward, ctx.device, PROFILE_STEPS)["kernel"]
    for name, us, count in kernels[:PROFILE_TOP]:
        ctx.add(row="kernel", kernel=name[:60], us_per_step=us, launches_per_step=count)
    ctx.add(
        row="kernel",
        kernel="all kernels, one after another",
        us_per_step=sum(us for _, us, _ in kernels),
        launches_per_step=sum(count for *_, count in kernels),
    )
    if not step.graphs:
        return
    for label, dependent in (("captured step, dependent launches", True), ("captured step, ordinary launches", False)):
        graph_step = captured_twin(model, step, mock.patch.object(generation, "DEPENDENT_LAUNCH", dependent))
        for steps, graph in graph_step.graphs.items():
            us = replay_seconds(graph, ctx.device) / steps * 1e6
            ctx.add(row="graph", kernel=f"{label}, {steps} per replay", us_per_step=us)


def captured_twin(model, step, *patches):
    """A batch-1 step captured afresh (STEPS_PER_REPLAY a replay) under `patches`, holding `step`'s state: the
    engine's after a real prompt, not zeros."""
    from samba_hf import generation

    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        twin = generation.DecodeStep(model, 1, step.chooser, True, generation.STEPS_PER_REPLAY)
    for target, source in zip(
        generation.cache_tensors(twin.cache) + [twin.tokens, twin.positions, twin.readable],
        generation.cache_tensors(step.cache) + [step.tokens, step.positions, step.readable],
    ):
        target.copy_(source)
    return twin


def engine_variants():
    """The settings the engine-variants case captures beside the defaults: name -> patches."""
    import samba_kernels
    from samba_kernels.decode_attention import kernel as attention
    from samba_kernels.mamba_decode import kernel as mamba

    def mamba_tiles(project, state):
        return (
            mock.patch.object(mamba, "PROJECT_TILE", dict(zip(("BLOCK_N", "BLOCK_K", "num_warps"), project))),
            mock.patch.object(mamba, "STATE_TILE", dict(zip(("BLOCK_D", "num_warps"), state))),
        )

    def attention_tiling(slots, warps):
        return mock.patch.object(attention, "_launch", functools.partial(attention._launch, split_slots=slots,
                                                                         num_warps=warps))  # fmt: skip

    return {
        "embedding by index_select and a copy": (
            mock.patch.object(samba_kernels, "embedding_rows_", samba_kernels.embedding_rows_ref),
        ),
        "Mamba tiles 1 x 4096 x 8 warps, 32 channels x 4": mamba_tiles((1, 4096, 8), (32, 4)),
        "Mamba tiles 2 x 4096 x 16 warps, 32 channels x 4": mamba_tiles((2, 4096, 16), (32, 4)),
        "Mamba tiles 1 x 4096 x 8 warps, 16 channels x 4": mamba_tiles((1, 4096, 8), (16, 4)),
        "attention 32 slots x 2 warps": (attention_tiling(32, 2),),
        "attention 32 slots x 1 warp": (attention_tiling(32, 1),),
    }


@case(
    "engine-variants",
    "the decode engine's batch-1 step at 4K context against other settings of its kernels, each captured from the "
    "same state and replayed in alternating rounds",
)
@torch.no_grad()
def engine_variants_case(ctx):
    """samba-421m's batch-1 step after a real 4K prefill (generate() once), captured with the defaults and with each
    of `engine_variants()`, all from the same state; VARIANT_ROUNDS alternating rounds of STEP_TOKENS replays of
    STEPS_PER_REPLAY steps each (µs per step: the median round; `ratio`: against the defaults' median). `same tokens`:
    whether the variant's last tokens equal the defaults' after every round (the same steps from the same state)."""
    from samba_hf import generation

    if ctx.device.type != "cuda":
        ctx.add(variant="defaults", skipped="captured steps need CUDA")
        return
    model = models.build("samba", ctx.device, dtype_for(ctx.device), ctx.smoke)
    prompt = random_prompt(model.config.vocab_size, 1, STEP_CONTEXT, ctx.device)
    model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    step = next(reversed(generation.decode_engine(model).graphs.values()))
    steps = {"defaults": captured_twin(model, step)}
    steps.update((name, captured_twin(model, step, *patches)) for name, patches in engine_variants().items())
    rounds = {name: [] for name in steps}
    for _ in range(VARIANT_ROUNDS):
        for name, twin in steps.items():
            rounds[name].append(replay_seconds(twin.graphs[generation.STEPS_PER_REPLAY], ctx.device, repeats=1))
    per_step = {
        name: statistics.median(seconds) / generation.STEPS_PER_REPLAY * 1e6 for name, seconds in rounds.items()
    }
    for name, twin in steps.items():
        ctx.add(
            variant=name,
            us_per_step=per_step[name],
            ratio=per_step[name] / per_step["defaults"],
            same_tokens=bool(torch.equal(twin.tokens, steps["defaults"].tokens)),
        )


def replay_seconds(graph, device: torch.device, repeats: int = STEP_REPEATS) -> float:
    """Seconds per replay of a captured step: the median of `repeats` runs of STEP_TOKENS replays."""

    def replays():
        for _ in range(STEP_TOKENS):
            graph.replay()

    return statistics.median(wall_seconds(replays, device)[0] / STEP_TOKENS for _ in range(repeats))


def best(rows: list[dict], model: str, mode: str | None = None) -> dict | None:
    """The row of `model` (in `mode`, if given) with the most decode tokens/s."""
    measured = [
        row
        for row in rows
        if models.family(row["model"]) == model and "tokens_per_s" in row and mode in (None, row["mode"])
    ]
    return max(measured, key=lambda row: row["tokens_per_s"], default=None)


def tokens_per_s(row: dict | None) -> float | None:
    return row and row["tokens_per_s"]


def render_overview(result: dict) -> list[str]:
    rows = []
    for name in CELLS:
        cell = rows_of(result, name)
        samba, llama, engine = best(cell, "samba"), best(cell, "llama"), best(cell, "samba", "engine")
        if samba or llama:
            rows.append(
                dict(
                    cell=name,
                    samba=tokens_per_s(samba),
                    samba_mode=samba and samba["mode"],
                    llama=tokens_per_s(llama),
                    llama_mode=llama and llama["mode"],
                    ratio=models.ratio(tokens_per_s(samba), tokens_per_s(llama)),
                    engine_ratio=models.ratio(tokens_per_s(engine), tokens_per_s(llama)),
                )
            )
    if not rows:
        return []
    spec = [
        ("cell", "cell"),
        ("samba best tokens/s", "samba", ".0f"),
        ("mode", "samba_mode"),
        ("llama best tokens/s", "llama", ".0f"),
        ("mode", "llama_mode"),
        ("ratio", "ratio", ".2f"),
        ("engine / llama best", "engine_ratio", ".2f"),
    ]
    intro = (
        "Decode tokens/s of each model's fastest mode in the same run, and Samba's default `generate()` (the engine):"
    )
    return ["## Overview", "", intro, ""] + columns(rows, spec) + [""]


def note(row: dict) -> str | None:
    return row.get("skipped") or "; ".join(row.get("log", []))[:200] or None


COLUMNS = {
    "step": [
        ("model", "model"),
        ("variant", "variant"),
        ("context", "context"),
        ("ms/token", "ms_per_token", ".3f"),
        ("roofline ms", "roofline_ms", ".3f"),
        ("of roofline", "of_roofline", ".1%"),
        ("compile s", "compile_s", ".1f"),
        ("note", "skipped"),
    ],
    "engine-profile": [
        ("kernel or graph", "kernel"),
        ("µs per step", "us_per_step", ".1f"),
        ("launches per step", "launches_per_step", ".1f"),
        ("note", "skipped"),
    ],
    "engine-variants": [
        ("variant", "variant"),
        ("µs per step", "us_per_step", ".1f"),
        ("ratio to the defaults", "ratio", ".3f"),
        ("same tokens", "same_tokens"),
        ("note", "skipped"),
    ],
    "first-call": [
        ("process", "process"),
        ("Triton cache", "about"),
        ("kernels compiled", "compiled"),
        ("build s", "build_s", ".1f"),
        ("first s", "first_s", ".2f"),
        ("steady s", "steady_s", ".3f"),
        ("warm-up s", "warmup_s", ".2f"),
        ("of which compiled ahead s", "compile_ahead_s", ".2f"),
        ("of which the dry run s", "dry_run_s", ".2f"),
        ("capture s", "capture_s", ".2f"),
        ("tokens/s", "tokens_per_s", ".1f"),
        ("process s", "process_s", ".1f"),
        ("Triton compiles", "triton_compiles"),
        ("Triton s", "triton_compile_s", ".2f"),
        ("slowest (s)", "slowest"),
        ("note", "skipped"),
    ],
    "cell": [
        ("model", "model"),
        ("mode", "mode"),
        ("batch", "batch"),
        ("context", "context"),
        ("tokens/s", "tokens_per_s", ".1f"),
        ("ms/step", "ms_per_step", ".3f"),
        ("TTFT s", "ttft_s", ".3f"),
        ("first s", "first_s", ".2f"),
        ("steady s", "steady_s", ".3f"),
        ("warm-up s", "warmup_s", ".2f"),
        ("e2e tokens/s", "e2e_tokens_per_s", ".1f"),
        ("peak GiB", "peak_gib", ".1f"),
        ("roofline ms", "roofline_ms", ".3f"),
        ("of roofline", "of_roofline", ".1%"),
        ("note", note),
    ],
}


def render_case(name: str, entry: dict) -> list[str]:
    return columns(entry["rows"], COLUMNS[name if name in COLUMNS else "cell"])


def summary(result: dict) -> list[str]:
    lines = []
    for name in CELLS:
        rows = rows_of(result, name)
        samba, llama = best(rows, "samba"), best(rows, "llama")
        if samba or llama:
            describe = lambda row: f"{row['tokens_per_s']:.0f} tok/s ({row['mode']})" if row else "-"  # noqa: E731
            ratio = models.ratio(tokens_per_s(samba), tokens_per_s(llama))
            lines.append(
                f"{name}: samba {describe(samba)}, llama {describe(llama)}" + (f", {ratio:.2f}x" if ratio else "")
            )
    for row in rows_of(result, "first-call"):
        if "warmup_s" in row:
            lines.append(
                f"first call, {row['process']}, kernels compiled {row.get('compiled', 'at launch')}: "
                f"{row['warmup_s']:.2f} s more than the steady call"
            )
    for row in rows_of(result, "step"):
        if "ms_per_token" in row:
            lines.append(
                f"step {row['model']} ({row['variant']}): {row['ms_per_token']:.3f} ms/token, "
                f"{row['of_roofline']:.0%} of roofline"
            )
    return lines


def plot(result: dict, path) -> bool:
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for name in CELLS for row in rows_of(result, name) if "tokens_per_s" in row})
    if not batches:
        return False
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for mode in MODES:
            points = sorted(
                (row["context"], row["tokens_per_s"])
                for name in CELLS
                for row in rows_of(result, name)
                if row["batch"] == batch
                and row["model"] == mode.model
                and row["mode"] == mode.name
                and "tokens_per_s" in row
            )
            if points:
                ax.plot(*zip(*points), "o-" if mode.model == "samba" else "s--", label=f"{mode.model} {mode.name}")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s", title=f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("generate(): samba-421m against the paper's 438M Llama")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return True


if __name__ == "__main__" and sys.argv[1:2] == ["first-call"]:
    first_call_child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "smoke")
