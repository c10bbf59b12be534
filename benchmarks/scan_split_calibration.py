"""Calibration of the selective scan's launch plan (samba_kernels.selective_scan.kernel's cost model).

Every forward layout is forced in turn with `selective_scan.forced_layout`: the steps forward, the lanes forward
at each BLOCK_D, and the split scan at each BLOCK_D and several chunk counts; then forward+backward with the
backward unsplit or split into several chunk counts. Each layout is first checked against the PyTorch reference
(float32, every option, documents crossing chunk boundaries; and bf16; the unsplit and split backward also at
1 x 3072 x 4096, with the tiles the grid times, recording whether each backward ran on the forward's thread and
saw its forced layout), and at every timed shape against the first layout timed there. From the times the script fits the cost model's constants (LANE_COST, SUMMARY_COST,
SPLIT_OVERHEAD, STEPS_COST), prints them as Python to paste into selective_scan/kernel.py, and prints per shape the
layout the model chooses among those measured, before and after the fit, against the fastest one.

    python benchmarks/scan_split_calibration.py                  # a GPU; JSON to $OUT or the current folder
    python benchmarks/scan_split_calibration.py --out calib.json --budget-minutes 8
    python benchmarks/scan_split_calibration.py --smoke          # CPU, Triton's interpreter, tiny sizes

Timed inputs: bf16, dim 3072 (and 8 x 4608), d_state 16, with z, D, delta_bias and delta_softplus, as the
model's Mamba mixer calls the scan. It stops timing when --budget-minutes have passed (and says what it
skipped), writes the JSON after every shape, and exits non-zero if a check failed.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

if "--smoke" in sys.argv:  # Triton reads it when the kernels are defined, so before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # run as a script: the benchmarks' harness and samba_kernels
from benchmarks.harness import atomic_write, commit, scan_inputs  # noqa: E402
from samba_kernels import selective_scan_fn, selective_scan_ref  # noqa: E402
from samba_kernels.selective_scan import kernel as ss  # noqa: E402

D_STATE = 16
EXP2_RATE = 3.90e12  # exp2 per second of the H200 (benchmarks/kernels.md's measured ceiling), for "x floor"
CHUNK_COUNTS = (2, 3, 4, 5, 6, 8, 11, 16, 22, 32, 44, 64)  # the split forward's chunk counts tried
BACKWARD_CHUNK_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24)
MAX_TURNS = 4  # forward layouts whose warps take more turns of the SM sub-partitions are not timed
CONSTANTS = ("LANE_COST", "SUMMARY_COST", "SPLIT_OVERHEAD", "STEPS_COST")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny sizes")
    parser.add_argument("--out", help="JSON path (default: $OUT/scan_split_calibration.json, else ./)")
    parser.add_argument("--budget-minutes", type=float, default=8.5, help="stop timing after this long")
    parser.add_argument("--exp2-rate", type=float, default=EXP2_RATE, help="exp2 per second, for the floor")
    return parser.parse_args()


class Setup:
    """Sizes, device and timer of a GPU run or of a smoke run (the interpreter, tiny sizes)."""

    def __init__(self, smoke):
        self.smoke = smoke
        if smoke:
            # A "GPU" of two sub-partitions: tiny sizes fill it, or not, so that every part of the fit runs.
            ss.INTERPRETER_SMS, ss.SUB_PARTITIONS_PER_SM = 1, 2
            self.device, self.dtype, self.d_state, self.min_chunk = "cpu", torch.float32, 4, 8
            self.shapes = [(2, 8, 24), (1, 8, 24)]  # (batch, dim, length): the lanes forward fills it, then not
            self.check = dict(batch=1, dim=5, length=13, chunks=(4, 8), backward_chunks=(8, 16))
            self.timed_check = dict(batch=1, dim=8, length=40, backward_chunk_counts=(3, 2))
        else:
            if not torch.cuda.is_available():
                raise SystemExit("no GPU: run with --smoke to check the script on the CPU")
            self.device, self.dtype, self.d_state, self.min_chunk = "cuda", torch.bfloat16, D_STATE, ss.MIN_CHUNK
            batch_1_and_2 = [(b, 3072, n) for b in (1, 2) for n in (4096, 16384, 65536)]
            self.shapes = batch_1_and_2 + [
                (8, 3072, 4096),
                (8, 4608, 4096),
                (4, 3072, 4096),
                (8, 3072, 16384),
                (8, 3072, 65536),
            ]
            self.check = dict(batch=2, dim=197, length=1001, chunks=(64, 200), backward_chunks=(128, 304))
            self.timed_check = dict(batch=1, dim=3072, length=4096, backward_chunk_counts=(6, 2))
        self.sms = ss._sm_count(torch.device(self.device))

    def time_ms(self, fn):
        if self.device == "cuda":
            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        start = time.perf_counter()  # the interpreter: one call is all a smoke run affords
        fn()
        return (time.perf_counter() - start) * 1e3


def inputs_with_documents(batch, dim, length, d_state, device, dtype, *, extras, seed=0):
    """The scan's inputs (`harness.scan_inputs`) as (tensors, seq_idx); with `extras` an initial state and random
    documents (seq_idx), else seq_idx None."""
    tensors = scan_inputs(batch, dim, length, device, dtype, d_state=d_state, extras=extras, seed=seed)
    if not extras:
        return tensors, None
    g = torch.Generator(device=device).manual_seed(seed + 1)
    starts = torch.rand(batch, length, generator=g, device=device) < 8.0 / length
    starts[:, 0] = False
    return tensors, torch.cumsum(starts, dim=-1).to(torch.int32)


def with_documents_at(seq_idx, steps):
    """seq_idx with documents also starting at `steps` (chunk boundaries)."""
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    starts[:, [s for s in steps if 0 < s < seq_idx.shape[1]]] = True
    return torch.cumsum(starts, dim=-1).to(torch.int32)


def relative_errors(outs, refs):
    """max over tensors of ||out - ref|| / ||ref||, in float32."""
    return max(((o.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item() for o, r in zip(outs, refs))


def outputs_and_grads(scan, tensors, seq_idx, cotangents):
    """(y, last state, gradients of every input) of `scan` for fixed cotangents."""
    inputs = {k: v.detach().requires_grad_() for k, v in tensors.items()}
    y, last = scan(**inputs, delta_softplus=True, return_last_state=True, seq_idx=seq_idx)
    grads = torch.autograd.grad((y, last), list(inputs.values()), cotangents)
    return [y.detach(), last.detach(), *grads]


class BackwardWitness:
    """Records, for each backward launch, whether it ran on the thread that called the forward and whether the
    forward's forced layout reached it (on CUDA, autograd runs backward ops on a thread of its own)."""

    def __enter__(self):
        self.seen, self.launch, caller = [], ss._bwd_launch, threading.get_ident()

        def launch(*args):
            self.seen.append(
                dict(on_caller_thread=threading.get_ident() == caller, forced_layout_seen=ss._FORCED.get() is not None)
            )
            return self.launch(*args)

        ss._bwd_launch = launch
        return self

    def __exit__(self, *exc):
        ss._bwd_launch = self.launch


def check_layouts(setup, c, layouts, bf16_layouts=()):
    """`layouts` against the PyTorch reference in float32 with every option (documents at the chunks' boundaries),
    and `bf16_layouts` in bf16, at the shape `c`."""
    tensors, seq_idx = inputs_with_documents(
        c["batch"], c["dim"], c["length"], setup.d_state, setup.device, torch.float32, extras=True, seed=1
    )
    seq_idx = with_documents_at(seq_idx, [k * n for n in c["boundaries"] for k in range(1, 9)])
    g = torch.Generator(device="cpu").manual_seed(2)
    cotangents = [
        torch.randn(c["batch"], c["dim"], c["length"], generator=g).to(setup.device),
        torch.randn(c["batch"], c["dim"], setup.d_state, generator=g).to(setup.device),
    ]
    bf16 = {
        k: v if k in ("A", "D", "delta_bias", "initial_state") else v.to(torch.bfloat16) for k, v in tensors.items()
    }
    bf16_cotangents = [cotangents[0].to(torch.bfloat16), cotangents[1]]
    # The references: float32 inputs, and the bf16 inputs (computed in float32 by the reference as well).
    references = {
        torch.float32: (tensors, cotangents, outputs_and_grads(selective_scan_ref, tensors, seq_idx, cotangents))
    }
    if bf16_layouts:
        references[torch.bfloat16] = (
            bf16,
            bf16_cotangents,
            outputs_and_grads(selective_scan_ref, bf16, seq_idx, bf16_cotangents),
        )
    results = []
    shape = f"{c['batch']}x{c['dim']}x{c['length']}"
    for dtype, tolerance, dtype_layouts in ((torch.float32, 1e-4, layouts), (torch.bfloat16, 1e-2, bf16_layouts)):
        for layout in dtype_layouts:
            inputs, cot, reference = references[dtype]
            entry = dict(shape=shape, layout=layout, dtype=str(dtype))
            try:
                with BackwardWitness() as witness, ss.forced_layout(**layout):
                    error = relative_errors(outputs_and_grads(selective_scan_fn, inputs, seq_idx, cot), reference)
                entry.update(relative_error=error, ok=error < tolerance, backward=witness.seen)
            except Exception as e:  # noqa: BLE001 (recorded, the run goes on)
                entry.update(error=f"{type(e).__name__}: {e}", ok=False)
            results.append(entry)
            print(
                f"check {shape} {layout} {dtype}: {entry.get('relative_error', entry.get('error'))} "
                f"{entry.get('backward')}",
                flush=True,
            )
    return results


def check_all(setup):
    """Every layout at a small odd shape (float32 and, for the splits, bf16); then the unsplit and split backward at
    a timed shape, where the GPU's tiles are those the grid times."""
    c = setup.check
    split = dict(chunk_length=c["chunks"][0], backward_chunk_length=c["backward_chunks"][0])
    layouts = [dict(), dict(forward="steps", backward_chunk_length=c["length"])]
    layouts += [dict(forward="lanes", block_d=bd, chunk_length=c["length"]) for bd in ss.LANE_COST]
    layouts += [dict(forward="lanes", block_d=bd, **split) for bd in ss.LANE_COST]
    layouts += [dict(forward="lanes", chunk_length=c["chunks"][1], backward_chunk_length=c["backward_chunks"][1])]
    small = dict(c, boundaries=(*c["chunks"], *c["backward_chunks"]))
    results = check_layouts(setup, small, layouts, [dict(forward="lanes", block_d=bd, **split) for bd in ss.LANE_COST])
    t = setup.timed_check
    length = t["length"]
    timed = [dict(), dict(backward_chunk_length=length)]
    timed += [dict(backward_chunk_length=triton.cdiv(length, n)) for n in t["backward_chunk_counts"]]
    timed += [
        dict(forward="lanes", chunk_length=length, backward_chunk_length=triton.cdiv(length, n))
        for n in t["backward_chunk_counts"][:1]
    ]
    boundaries = [triton.cdiv(length, n) for n in t["backward_chunk_counts"]]
    return results + check_layouts(setup, dict(t, boundaries=boundaries), timed)


def plan_of(setup, batch, dim, length, layout, train):
    with ss.forced_layout(**layout):
        return ss._plan(batch, dim, length, 1, setup.d_state, train, setup.device == "cuda", setup.sms)


def describe(plan):
    """The forward's layout in words, and its (kernel, BLOCK_D, chunk) for the cost model."""
    f = plan.forward
    if not f.lanes:
        return f"steps BLOCK_D {f.meta['BLOCK_D']}", ("steps", None, f.chunk)
    split = f"split {f.chunks} x {f.chunk}, summary BLOCK_D {f.summary['BLOCK_D']}" if f.chunks > 1 else "unsplit"
    return f"lanes BLOCK_D {f.meta['BLOCK_D']} {split}", ("lanes", f.meta["BLOCK_D"], f.chunk)


def forward_layouts(setup, batch, dim, length):
    """The forward layouts timed at a shape: the model's choice, steps, lanes unsplit and split at each BLOCK_D."""
    slots = ss.SUB_PARTITIONS_PER_SM * setup.sms
    layouts = [dict(), dict(forward="steps")] + [
        dict(forward="lanes", block_d=bd, chunk_length=length) for bd in ss.LANE_COST
    ]
    for n in CHUNK_COUNTS:
        chunk = triton.cdiv(length, n)
        for bd in ss.LANE_COST:
            if chunk >= setup.min_chunk and batch * triton.cdiv(dim, bd) * n <= MAX_TURNS * slots:
                layouts.append(dict(forward="lanes", block_d=bd, chunk_length=chunk))
    return layouts


class Budget:
    def __init__(self, minutes):
        self.deadline = time.monotonic() + 60 * minutes

    def left(self):
        return time.monotonic() < self.deadline


def run(fn, budget):
    """(milliseconds, None) of fn, or (None, why not). A CUDA error other than running out of memory leaves the
    context unusable: it stops the run."""
    if not budget.left():
        return None, "skipped: time budget"
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return None, f"out of memory: {str(e).splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 (recorded, the run goes on where the device still works)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # raises again where the context is lost: the run stops there
        return None, f"{type(e).__name__}: {e}"


def time_shape(setup, batch, dim, length, budget, exp2_rate):
    """Forward layouts (and their summaries alone), then forward+backward with each backward chunking."""
    tensors, _ = inputs_with_documents(batch, dim, length, setup.d_state, setup.device, setup.dtype, extras=False)
    kwargs = dict(delta_softplus=True)
    record = dict(
        batch=batch,
        dim=dim,
        length=length,
        forward=[],
        summary=[],
        fwd_bwd=[],
        exp_floor_ms=batch * length * dim * setup.d_state / exp2_rate * 1e3,
    )
    baseline = None
    with torch.no_grad():
        for layout in forward_layouts(setup, batch, dim, length):
            words, key = describe(plan_of(setup, batch, dim, length, layout, False))
            if any(r["key"] == list(key) for r in record["forward"][1:]) and layout:
                continue  # the same launch as a layout already timed

            def forward(layout=layout):
                with ss.forced_layout(**layout):
                    return selective_scan_fn(**tensors, **kwargs)

            ms, why = run(lambda: setup.time_ms(forward), budget)
            entry = dict(layout=layout, words=words, key=list(key), ms=ms, error=why)
            if ms is not None:
                out = forward().float()
                baseline = out if baseline is None else baseline
                entry["relative_error_vs_first"] = ((out - baseline).norm() / baseline.norm()).item()
                del out
            record["forward"].append(entry)
            print(f"  fwd {words}: {ms if ms is not None else why}", flush=True)
        del baseline
        # the summary kernel alone, at each BLOCK_D, for SUMMARY_COST
        grouped = ss._grouped(tensors["B"])
        for n in CHUNK_COUNTS:
            split = plan_of(
                setup, batch, dim, length, dict(forward="lanes", chunk_length=triton.cdiv(length, n)), False
            ).forward
            if split.chunk < setup.min_chunk or split.chunks < 2:
                continue
            for bd in ss.SUMMARY_COST:
                warps = batch * triton.cdiv(dim, bd) * (split.chunks - 1)
                if warps > MAX_TURNS * ss.SUB_PARTITIONS_PER_SM * setup.sms:
                    continue
                launch = dataclasses.replace(split, summary=dict(split.summary, BLOCK_D=bd))
                summarize = lambda launch=launch: ss._summarize(  # noqa: E731
                    tensors["u"],
                    tensors["delta"],
                    grouped,
                    None,
                    tensors["A"],
                    tensors["delta_bias"],
                    None,
                    True,
                    launch,
                    reverse=False,
                )
                ms, why = run(lambda: setup.time_ms(summarize), budget)
                record["summary"].append(dict(block_d=bd, chunk=split.chunk, chunks=split.chunks, ms=ms, error=why))
    # forward + backward: the model's forward, the backward forced to each chunk count (1: unsplit)
    tensors = {k: v.requires_grad_() for k, v in tensors.items()}
    dy = torch.randn_like(tensors["u"])
    first_grads = None
    for n in BACKWARD_CHUNK_COUNTS:
        chunk = triton.cdiv(length, n)
        if n > 1 and chunk < setup.min_chunk:
            continue
        layout = dict(backward_chunk_length=chunk)
        plan = plan_of(setup, batch, dim, length, layout, True)

        def fwd_bwd(layout=layout):
            with ss.forced_layout(**layout):
                return torch.autograd.grad(selective_scan_fn(**tensors, **kwargs), list(tensors.values()), dy)

        ms, why = run(lambda: setup.time_ms(fwd_bwd), budget)
        entry = dict(
            layout=layout,
            backward_chunks=plan.backward.chunks,
            backward_chunk=plan.backward.chunk,
            backward_block_d=plan.backward.meta["BLOCK_D"],
            ms=ms,
            error=why,
        )
        if ms is not None:
            grads = fwd_bwd()
            first_grads = grads if first_grads is None else first_grads
            entry["relative_error_vs_first"] = relative_errors(grads, first_grads)
            del grads
        record["fwd_bwd"].append(entry)
        print(f"  fwd+bwd, backward in {plan.backward.chunks} chunks: {ms if ms is not None else why}", flush=True)
    auto = plan_of(setup, batch, dim, length, {}, True)
    record["auto"] = dict(forward=describe(auto)[0], backward_chunks=auto.backward.chunks)
    return record


def median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def fit(setup, records):
    """Constants of the cost model fitted to the times, in LANE_COST's unit (a BLOCK_D-32 warp's time per step),
    or None where the times do not determine them."""
    slots = ss.SUB_PARTITIONS_PER_SM * setup.sms
    per_turn_step = {bd: [] for bd in ss.LANE_COST}  # the unsplit lanes forward where it fills the GPU
    for r in records:
        for e in r["forward"]:
            kernel, bd, chunk = e["key"]
            warps = r["batch"] * triton.cdiv(r["dim"], bd or 1)
            if kernel == "lanes" and chunk >= r["length"] and warps >= slots and e["ms"] is not None:
                per_turn_step[bd].append(e["ms"] / (triton.cdiv(warps, slots) * r["length"]))
    unit = median(per_turn_step[32])
    if unit is None:
        return None
    lane_cost = {bd: round(median(v) / unit, 3) for bd, v in per_turn_step.items() if median(v) is not None}
    steps = [
        e["ms"] / (unit * r["length"])
        for r in records
        for e in r["forward"]
        if e["key"][0] == "steps" and e["ms"] is not None and ss._lanes_block(r["batch"], r["dim"], setup.sms) is None
    ]
    summary = {bd: [] for bd in ss.SUMMARY_COST}
    for r in records:
        for e in r["summary"]:
            warps = r["batch"] * triton.cdiv(r["dim"], e["block_d"]) * (e["chunks"] - 1)
            if e["ms"] is not None and warps >= slots:
                summary[e["block_d"]].append(e["ms"] / (unit * triton.cdiv(warps, slots) * e["chunk"]))
    summary_cost = {bd: round(median(v), 3) for bd, v in summary.items() if median(v) is not None}
    fitted = dict(
        unit_ms_per_step=unit,
        LANE_COST=lane_cost,
        SUMMARY_COST=summary_cost,
        STEPS_COST=round(median(steps), 3) if median(steps) is not None else None,
    )
    with constants(fitted):  # the split's time beyond its two kernels' fitted terms
        residual = [
            e["ms"] / unit
            - (ss._forward_cost(r["batch"], r["dim"], r["length"], *e["key"], slots) - ss.SPLIT_OVERHEAD)
            for r in records
            for e in r["forward"]
            if e["ms"] is not None and e["key"][0] == "lanes" and e["key"][2] < r["length"]
        ]
    fitted["SPLIT_OVERHEAD"] = max(0, round(median(residual))) if median(residual) is not None else None
    return fitted


class constants:
    """Within the block, the cost model runs with `values` (those that are not None) in place of its own."""

    def __init__(self, values):
        self.values = {k: v for k, v in (values or {}).items() if k in CONSTANTS and v not in (None, {})}

    def __enter__(self):
        self.saved = {k: getattr(ss, k) for k in CONSTANTS}
        for k, v in self.values.items():
            setattr(ss, k, {**self.saved[k], **v} if isinstance(v, dict) else v)
        ss._best_split.cache_clear()
        ss._gpu_plan.cache_clear()

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(ss, k, v)
        ss._best_split.cache_clear()
        ss._gpu_plan.cache_clear()


def regret(setup, record, values):
    """(the forward the cost model with `values` chooses, its ms or None where it was not timed, the fastest ms)."""
    timed = [e for e in record["forward"] if e["ms"] is not None and e["layout"]]
    if not timed:
        return None
    with constants(values):
        words, key = describe(plan_of(setup, record["batch"], record["dim"], record["length"], {}, False))
    ms = next((e["ms"] for e in timed if e["key"] == list(key)), None)
    return words if ms is not None else words + " (not timed)", ms, min(e["ms"] for e in timed)


def stamp(setup):
    device = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu (Triton's interpreter)"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=commit(),
        device=device,
        sms=setup.sms,
        torch=torch.__version__,
        triton=triton.__version__,
        constants_in_use={
            k: getattr(ss, k)
            for k in (
                *CONSTANTS,
                "MIN_CHUNK",
                "BWD_MIN_CHUNK",
                "BWD_SPLIT_MIN_LENGTH",
                "MAX_CHUNKS",
                "PROGRAMS_PER_SM",
            )
        },
    )


def report(setup, result):
    """The short table: per shape the model's choices and the fastest layouts timed."""
    fitted = result.get("fit")
    print(
        "\n| batch x dim x length | exp floor ms | auto fwd ms | best fwd ms (layout) | model's pick, fitted "
        "| auto fwd+bwd ms | best fwd+bwd ms (backward chunks) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in result["shapes"]:
        fwd = [e for e in r["forward"] if e["ms"] is not None]
        both = [e for e in r["fwd_bwd"] if e["ms"] is not None]
        auto = next((e for e in fwd if not e["layout"]), None)
        best = min(fwd, key=lambda e: e["ms"], default=None)
        best_both = min(both, key=lambda e: e["ms"], default=None)
        auto_both = next((e for e in both if e["backward_chunks"] == r["auto"]["backward_chunks"]), None)
        pick = regret(setup, r, fitted)
        ms = lambda e: "-" if e is None else f"{e['ms']:.3f}"  # noqa: E731
        pick = pick and (f"{pick[1]:.3f}" if pick[1] is not None else "-") + f" ({pick[0]})"
        print(
            f"| {r['batch']} x {r['dim']} x {r['length']} | {r['exp_floor_ms']:.3f} | {ms(auto)} ({r['auto']['forward']}) "
            f"| {ms(best)} ({best and best['words']}) | {pick} "
            f"| {ms(auto_both)} ({r['auto']['backward_chunks']}) "
            f"| {ms(best_both)} ({best_both and best_both['backward_chunks']}) |"
        )
    if fitted:
        print(
            "\nFitted constants (samba_kernels/selective_scan/kernel.py; LANE_COST's unit is "
            f"{fitted['unit_ms_per_step'] * 1e3:.4f} us per step of a BLOCK_D-32 warp):"
        )
        for k in CONSTANTS:
            print(f"{k} = {fitted[k]}")
    else:
        print("\nNo fit: no unsplit BLOCK_D-32 lanes forward filled the GPU among the shapes timed.")
    failed = [c for c in result["checks"] if not c["ok"]]
    print(
        f"\nChecks: {len(result['checks']) - len(failed)} of {len(result['checks'])} within tolerance"
        + "".join(f"\n  FAILED {c}" for c in failed)
    )


def main():
    args = parse_args()
    setup = Setup(args.smoke)
    out_dir = os.environ.get("OUT")
    path = Path(args.out or (Path(out_dir) if out_dir else Path.cwd()) / "scan_split_calibration.json")
    budget = Budget(args.budget_minutes)
    result = dict(stamp(setup), command=" ".join(sys.argv), checks=check_all(setup), shapes=[])
    atomic_write(path, json.dumps(result, indent=1, default=str))
    for batch, dim, length in setup.shapes:
        print(f"{batch} x {dim} x {length}", flush=True)
        try:
            result["shapes"].append(time_shape(setup, batch, dim, length, budget, args.exp2_rate))
        except Exception as e:  # noqa: BLE001 (a lost CUDA context: keep what was measured)
            result["aborted"] = f"at {batch} x {dim} x {length}: {type(e).__name__}: {e}"
            print(result["aborted"], flush=True)
            break
        finally:
            if setup.device == "cuda":
                torch.cuda.empty_cache()
        atomic_write(path, json.dumps(result, indent=1, default=str))
    result["fit"] = fit(setup, result["shapes"])
    result["regret"] = {
        f"{r['batch']}x{r['dim']}x{r['length']}": dict(
            in_use=regret(setup, r, None), fitted=regret(setup, r, result["fit"])
        )
        for r in result["shapes"]
    }
    atomic_write(path, json.dumps(result, indent=1, default=str))
    report(setup, result)
    bad = [
        e for r in result["shapes"] for e in r["forward"] + r["fwd_bwd"] if e.get("relative_error_vs_first", 0) > 2e-2
    ]
    for e in bad:
        print(f"DISAGREES with the first layout timed: {e}")
    print(f"\nwrote {path}")
    if bad or not all(c["ok"] for c in result["checks"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
