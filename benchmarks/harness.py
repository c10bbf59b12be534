"""What every suite shares: the case registry, the time budget, timers, the device's ceilings, the machine
stamp and the results files.

A suite is a module of this package with
- `TITLE` and `INTRO` (what it measures and how, for the top of its Markdown file);
- `CASES`, an ordered registry of cases (`registry()`); the order is the order of priority, so that a run cut
  short by its budget has measured the cases that matter most;
- `render_case(name, entry) -> list[str]`: the Markdown of one case's entry;
- optionally `render_overview(result) -> list[str]` (tables across cases), `plot(result, path)` (a PNG) and
  `summary(result) -> list[str]` (a few lines for a terminal).

A case is a function of a `Context`: it measures, and adds one row (a dict) per measurement with `ctx.add`,
or one skipped cell with `ctx.skip`. The results file keeps one entry per case, each with the stamp of the
run that measured it, so a run of some cases leaves the others' numbers as they were.
"""

import collections
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# A cell whose predicted peak memory passes this share of the device's memory is skipped: the allocator's
# fragmentation and the CUDA context take the rest.
MEMORY_HEADROOM = 0.92
# The shortest wait between two kernels that `idle_gaps` counts: longer than a launch queued behind another.
IDLE_GAP_US = 20.0
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable[["Context"], None]
    about: str


def registry() -> tuple[dict[str, Case], Callable]:
    """An empty registry and its decorator: `@case("name", "what it measures")` adds a case function."""
    cases: dict[str, Case] = {}

    def case(name: str, about: str):
        def add(fn):
            cases[name] = Case(name, fn, about)
            return fn

        return add

    return cases, case


class Budget:
    """Seconds a run may take (None: no limit). Cases ask it before each expensive cell."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def refuses(self, predicted_s: float) -> str | None:
        """Why a cell predicted to take `predicted_s` seconds does not run, or None if it fits."""
        if predicted_s <= self.left():
            return None
        return f"predicted {predicted_s:.0f} s, {max(self.left(), 0):.0f} s left of the {self.seconds:.0f} s budget"


class Context:
    """What a case gets: the device, the smoke flag, the budget, and where its rows go."""

    def __init__(self, device: torch.device, smoke: bool, budget: Budget, entry: dict, save: Callable[[], None]):
        self.device, self.smoke, self.budget = device, smoke, budget
        self.entry, self.save = entry, save  # save() writes the results files

    def add(self, **row) -> dict:
        """Records one measured row (and writes the results files, so a run cut short keeps it)."""
        self.entry["rows"].append(row)
        print(json.dumps(row, default=str), flush=True)
        self.save()
        return row

    def skip(self, reason: str, **cell) -> None:
        self.add(**cell, skipped=reason)

    def ceilings(self) -> dict:
        """The device's measured copy bandwidth, bf16 matmul rate and exp2 rate (once per process), also kept
        in this case's entry."""
        self.entry["ceilings"] = measure_ceilings(self.device.type, self.smoke)
        return self.entry["ceilings"]

    def memory_refusal(self, predicted_bytes: float) -> str | None:
        """Why a cell predicted to peak at `predicted_bytes` does not run here, or None if it fits."""
        if self.device.type != "cuda":
            return None
        total = torch.cuda.get_device_properties(self.device).total_memory
        if predicted_bytes <= MEMORY_HEADROOM * total:
            return None
        return (
            f"predicted peak {predicted_bytes / GiB:.0f} GiB, more than {MEMORY_HEADROOM:.0%} of the GPU's "
            f"{total / GiB:.0f} GiB"
        )


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def wall_seconds(fn: Callable, device: torch.device | str):
    """(seconds, fn's result) of one call, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def kernel_ms(fn: Callable, device: torch.device | str) -> dict:
    """`ms`: the median time of `fn` (triton.testing.do_bench, which empties the L2 before each call), and
    `first_call_ms`: its first call, which pays any compilation. On the CPU, where only smoke runs go to check the
    code, the first call is all there is."""
    first = wall_seconds(fn, device)[0] * 1e3
    if torch.device(device).type != "cuda":
        return {"ms": first, "first_call_ms": first}
    return {"ms": triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), "first_call_ms": first}


def profiled(fn: Callable, device: torch.device | str, calls: int) -> dict[str, list[tuple[str, float, float]]]:
    """`calls` calls of fn under torch.profiler: {"kernel": [(GPU kernel, µs per call, launches per call)], "op":
    [(operator and its input shapes, µs of GPU time in the kernels it launched itself, calls per call)]}, the most
    time first. On the CPU (smoke runs), where there are no kernels, both list the operators' own CPU times."""
    on_gpu = torch.device(device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as profile:
        for _ in range(calls):
            fn()
        synchronize(device)

    def own_us(event):
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    kernels = [
        (event.key, event.device_time_total if on_gpu else event.self_cpu_time_total, event.count)
        for event in profile.key_averages()
        if (event.device_type == torch.autograd.DeviceType.CUDA) == on_gpu and event.count
    ]
    ops = [
        (f"{event.key} {[shape for shape in event.input_shapes if shape]}", own_us(event), event.count)
        for event in profile.key_averages(group_by_input_shape=True)
        if event.device_type == torch.autograd.DeviceType.CPU and event.count
    ]
    found = {
        kind: sorted(
            ((name, us / calls, count / calls) for name, us, count in rows if us > 0),
            key=lambda row: row[1],
            reverse=True,
        )
        for kind, rows in (("kernel", kernels), ("op", ops))
    }
    if on_gpu:
        found["idle"] = idle_gaps(profile.events(), calls)
    return found


def idle_gaps(events, calls: int) -> list[tuple[str, float, float]]:
    """Where the GPU waited between kernels: [("after <kernel>", µs idle after it per call, gaps per call)] over
    gaps of IDLE_GAP_US or more, the most first, and ("any gap", µs, gaps) for them all."""
    kernels = sorted(
        (event for event in events if event.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda event: event.time_range.start,
    )
    after, busy_until, previous = collections.defaultdict(lambda: [0.0, 0]), None, None
    for event in kernels:
        if busy_until is not None and event.time_range.start - busy_until >= IDLE_GAP_US:
            gap = after[f"after {previous.name[:100]}"]
            gap[0] += event.time_range.start - busy_until
            gap[1] += 1
        if busy_until is None or event.time_range.end > busy_until:
            busy_until, previous = event.time_range.end, event
    total = ("any gap", sum(us for us, _ in after.values()), sum(count for _, count in after.values()))
    rows = sorted(((name, us, count) for name, (us, count) in after.items()), key=lambda row: row[1], reverse=True)
    return [(name, us / calls, count / calls) for name, us, count in [total, *rows]]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else None


@triton.jit
def _exp2_chains(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Chains of dependent exp2 (the Mamba scan's floor) over BLOCK values per program."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    total = tl.zeros_like(x)
    for _ in range(ITERS):
        x = tl.exp2(x * -0.999)
        total += x
    tl.store(out_ptr + offsets, total)


@functools.cache
def drawer(device: torch.device | str, dtype: torch.dtype, seed: int):
    """draw(*shape, scale=1.0, dtype=dtype): seeded normal tensors, generated on `device` (large inputs never
    cross from the host)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape, scale=1.0, dtype=dtype):
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

    return draw


def scan_inputs(
    batch, dim, length, device, dtype, *, d_state=16, requires_grad=False, extras=False, seed=0
) -> dict[str, torch.Tensor]:
    """The selective scan's inputs as the model's Mamba mixer passes them: u, delta (before softplus), z of
    (batch, dim, length) and B, C of (batch, d_state, length) in `dtype`; A (dim, d_state), D and delta_bias (dim,)
    in float32; with `extras` an initial state (batch, dim, d_state) in float32."""
    draw = drawer(device, dtype, seed)
    inputs = dict(
        u=draw(batch, dim, length),
        delta=draw(batch, dim, length) - 2,
        A=-torch.exp(draw(dim, d_state, dtype=torch.float32).sigmoid()),  # in (-e, -1)
        B=draw(batch, d_state, length),
        C=draw(batch, d_state, length),
        D=draw(dim, dtype=torch.float32),
        z=draw(batch, dim, length),
        delta_bias=draw(dim, scale=0.5, dtype=torch.float32),
    )
    if extras:
        inputs["initial_state"] = draw(batch, dim, d_state, dtype=torch.float32)
    return {name: tensor.requires_grad_(requires_grad) for name, tensor in inputs.items()}


def measure_ceilings(device_type: str, smoke: bool) -> dict:
    """copy_bytes_per_s (bytes read + written by a device copy of 1 GiB), bf16_flops_per_s (an 8192^3 matmul)
    and exp2_per_s (chains of dependent exp2 in a Triton kernel, the scan's floor); medians of kernel_ms."""
    device = torch.device(device_type)
    n = 1 << (16 if smoke else 28)
    source, target = torch.randn(n, device=device), torch.empty(n, device=device)
    copy_ms = kernel_ms(lambda: target.copy_(source), device)["ms"]
    m = 64 if smoke else 8192
    a, b = (torch.randn(m, m, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = kernel_ms(lambda: a @ b, device)["ms"]
    count, iterations, block = (1 << (10 if smoke else 22)), (4 if smoke else 256), 1024
    x, out = torch.rand(count, device=device), torch.empty(count, device=device)
    exp_ms = kernel_ms(lambda: _exp2_chains[(count // block,)](x, out, ITERS=iterations, BLOCK=block), device)["ms"]
    return {
        "copy_bytes_per_s": 2 * n * 4 / (copy_ms * 1e-3),
        "bf16_flops_per_s": 2 * m**3 / (matmul_ms * 1e-3),
        "exp2_per_s": count * iterations / (exp_ms * 1e-3),
    }


def commit() -> str:
    """SAMBA_COMMIT if set (a copy of the tree without .git), else git's HEAD, marked -dirty when tracked
    files changed; "unknown" without either."""
    if os.environ.get("SAMBA_COMMIT"):
        return os.environ["SAMBA_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def machine_stamp(device: torch.device) -> dict:
    import transformers

    stamp = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        stamp.update(
            gpu=properties.name,
            sms=properties.multi_processor_count,
            memory_gib=round(properties.total_memory / GiB, 1),
        )
    else:
        stamp["gpu"] = None
        stamp["cpu"] = platform.processor() or platform.machine()
    return stamp


def stamp_line(stamp: dict) -> str:
    """One line of a stamp: date, commit, machine, versions."""
    machine = stamp.get("gpu") or f"CPU ({stamp.get('cpu', '?')}), smoke run"
    versions = ", ".join(f"{name} {stamp[name]}" for name in ("torch", "triton", "transformers") if stamp.get(name))
    commit_text = f"commit {stamp['commit']}" if stamp.get("commit") else "commit not recorded"
    if stamp.get("results_commit"):
        commit_text += f" (results committed in {stamp['results_commit']})"
    return f"{stamp.get('date', 'date not recorded')} · {commit_text} · {machine} · {versions}"


def atomic_write(path: Path, data: str | bytes) -> None:
    """Writes to a temporary file beside `path`, then moves it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(temporary, path)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def render(suite, result: dict) -> str:
    """The Markdown of a suite's results file: its intro, overview and each case's entry in registry order."""
    lines = [f"# {suite.TITLE}", "", suite.INTRO.strip(), ""]
    if hasattr(suite, "render_overview"):
        lines += suite.render_overview(result)
    for name in ordered_cases(suite, result):
        entry = result["cases"][name]
        about = suite.CASES[name].about if name in suite.CASES else entry.get("about", "")
        lines += [f"## {name}", "", about, "", f"Run: {stamp_line(entry['stamp'])}."]
        if entry.get("command"):
            lines += ["", f"    {entry['command']}"]
        if entry.get("note"):
            lines += ["", entry["note"]]
        lines.append("")
        if entry.get("skipped"):
            lines += [f"Not run: {entry['skipped']}.", ""]
        if entry.get("rows") or entry.get("report"):
            lines += suite.render_case(name, entry)
            lines.append("")
        if entry.get("error"):
            lines += ["**Failed:**", "", "```", entry["error"].rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def ordered_cases(suite, result: dict) -> list[str]:
    """The result's cases, registered ones first in registry order, then any others (kept from older runs)."""
    present = result.get("cases", {})
    return [name for name in suite.CASES if name in present] + [name for name in present if name not in suite.CASES]


def save_results(suite, result: dict, out_dir: Path) -> None:
    """SUITE.json and SUITE.md (and SUITE.png where the suite draws one and matplotlib is installed)."""
    name = result["suite"]
    atomic_write(out_dir / f"{name}.json", json.dumps(result, indent=1, default=str) + "\n")
    atomic_write(out_dir / f"{name}.md", render(suite, result))


def save_plot(suite, result: dict, out_dir: Path) -> str | None:
    """Draws SUITE.png; returns why not, where it cannot (no plot for this suite, or matplotlib missing)."""
    if not hasattr(suite, "plot"):
        return "this suite draws no plot"
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed"
    matplotlib.use("Agg")
    path = out_dir / f"{result['suite']}.png"
    temporary = path.with_name(f".{path.name}.tmp.png")
    if suite.plot(result, temporary):
        os.replace(temporary, path)
        return None
    return "nothing to plot"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table (None cells left empty)."""
    cell = lambda value: "" if value is None else str(value)  # noqa: E731
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell(value) for value in row) + " |" for row in rows),
    ]


def columns(rows: list[dict], spec: list[tuple]) -> list[str]:
    """A Markdown table of `rows` by a column spec: (header, key) or (header, key, format) per column; a key may
    be a function of the row. Missing values stay empty."""

    def cell(row, key, *format_spec):
        value = key(row) if callable(key) else row.get(key)
        return fmt(value, *format_spec) if format_spec else value

    return table([column[0] for column in spec], [[cell(row, *column[1:]) for column in spec] for row in rows])


def fmt(value, spec: str = ".3g") -> str | None:
    """format(value, spec), None for None: table cells of optional numbers."""
    return None if value is None else format(value, spec)


def rows_of(result: dict, case: str) -> list[dict]:
    return result.get("cases", {}).get(case, {}).get("rows", [])
