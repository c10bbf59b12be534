"""The benchmarks' one entry point.

    python -m benchmarks.run list
    python -m benchmarks.run SUITE [--cases A,B] [--budget-s SECONDS] [--out DIR]
    python -m benchmarks.run SUITE --smoke [--cases A,B]    # tiny sizes on the CPU (Triton's interpreter)
    python -m benchmarks.run summary [SUITE ...]            # the key numbers of the results files
    python -m benchmarks.run record-tests JUNIT_XML         # benchmarks/results/gpu_tests.md from a pytest run

SUITE is one of SUITES. Cases run in their registry's order (the order of priority); with --budget-s, cells
predicted not to fit in what is left are skipped, with the prediction in the results. The results go to
benchmarks/results/SUITE.{json,md,png} (smoke runs: a temporary folder unless --out says otherwise); the
entries of cases not run are kept as they were. The exit status is 1 if a case failed.
"""

import argparse
import importlib
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# Without a GPU, samba_kernels' Triton kernels run in Triton's interpreter on CPU tensors (smoke runs). Triton reads
# this when it is first imported, so before the harness (and any suite) imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .harness import RESULTS, Budget, Context, load_results, machine_stamp, save_plot, save_results  # noqa: E402

SUITES = ("kernels", "generate", "prefill", "train", "memory", "multi_gpu", "lora")
SMOKE_RESULTS = Path(tempfile.gettempdir()) / "samba-benchmarks-smoke"


def suite_module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def selected_cases(suite, names: str | None) -> list[str]:
    if not names:
        return list(suite.CASES)
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in suite.CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; this suite has: {', '.join(suite.CASES)}")
    return chosen


def run_suite(
    name: str,
    cases: str | None = None,
    smoke: bool = False,
    budget_s: float | None = None,
    out: str | Path | None = None,
    command: str | None = None,
) -> int:
    """Runs the chosen cases of suite `name` and writes its results files; 1 if a case failed, else 0."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not smoke:
        raise SystemExit(f"the {name} suite measures a GPU and none is visible; --smoke runs its code on the CPU")
    suite = suite_module(name)
    chosen = selected_cases(suite, cases)
    out_dir = Path(out) if out else (SMOKE_RESULTS if smoke else RESULTS)
    result = load_results(out_dir / f"{name}.json") or {"suite": name, "cases": {}}
    command = command or shlex.join(
        [
            "python",
            "-m",
            "benchmarks.run",
            name,
            *(["--cases", cases] if cases else []),
            *(["--smoke"] if smoke else []),
            *(["--budget-s", f"{budget_s:g}"] if budget_s else []),
        ]
    )
    threads = torch.get_num_threads()
    if device.type == "cpu" and smoke:
        torch.set_num_threads(1)  # tiny tensors: more threads only contend for the cores
    try:
        failed = run_cases(suite, chosen, result, out_dir, device, smoke, Budget(budget_s), command)
    finally:
        torch.set_num_threads(threads)
    why_not = save_plot(suite, result, out_dir)
    print(f"results: {out_dir}/{name}.json, .md" + (f" (no plot: {why_not})" if why_not else ", .png"))
    print("\n".join(summary_lines(suite, result)))
    if failed:
        print(f"FAILED cases: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def run_cases(
    suite,
    chosen: list[str],
    result: dict,
    out_dir: Path,
    device: torch.device,
    smoke: bool,
    budget: Budget,
    command: str,
) -> list[str]:
    """Each case in turn, its entry replacing the previous one (a case the budget leaves out keeps its old entry);
    the names of the cases that failed."""
    failed = []
    for case_name in chosen:
        entry = {"stamp": machine_stamp(device), "command": command, "rows": []}
        if budget.left() <= 0:
            print(f"[{result['suite']}/{case_name}] not run: the budget was spent", flush=True)
            if case_name not in result["cases"]:
                result["cases"][case_name] = {**entry, "skipped": "the run's budget was spent before this case"}
            continue
        result["cases"][case_name] = entry

        def save():
            save_results(suite, result, out_dir)

        print(f"[{result['suite']}/{case_name}] {suite.CASES[case_name].about}", flush=True)
        start = time.perf_counter()
        try:
            suite.CASES[case_name].run(Context(device, smoke, budget, entry, save))
        except Exception:  # recorded in the results, printed, and the run's exit status says it failed
            entry["error"] = traceback.format_exc()[-4000:]
            failed.append(case_name)
            print(entry["error"], flush=True)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        print(f"[{result['suite']}/{case_name}] {entry['seconds']} s", flush=True)
        save()
    return failed


def summary_lines(suite, result: dict) -> list[str]:
    lines = [f"== {result['suite']}"]
    if hasattr(suite, "summary"):
        lines += suite.summary(result)
    for case_name, entry in result.get("cases", {}).items():
        if entry.get("error"):
            lines.append(f"{case_name}: FAILED ({entry['error'].strip().splitlines()[-1][:160]})")
    return lines


def record_tests(junit_xml: str) -> int:
    """benchmarks/results/gpu_tests.md: each test of a `pytest tests/gpu --junitxml=...` run and its outcome,
    stamped; 1 if a test failed."""
    import xml.etree.ElementTree as ElementTree

    from .harness import atomic_write, stamp_line, table

    rows, counts = [], {"passed": 0, "skipped": 0, "failure": 0, "error": 0}
    for test in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        problem = next((child for child in test if child.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if problem is None else problem.tag
        counts[outcome] += 1
        message = None if problem is None else (problem.get("message") or "").strip().splitlines()[0][:160]
        rows.append(
            [
                f"{test.get('classname', '').split('.')[-1]}::{test.get('name')}",
                outcome,
                f"{float(test.get('time', 0)):.1f}",
                message,
            ]
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [
        "# GPU tests",
        "",
        "The model's CUDA paths against its PyTorch paths (tests/gpu), run on a GPU.",
        "",
        f"Run: {stamp_line(machine_stamp(device))}.",
        "",
        "    python -m pytest tests/gpu -rA",
        "",
        *table(["test", "outcome", "seconds", "message"], rows),
        "",
        f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['failure']} failed, "
        f"{counts['error']} errors.",
    ]
    atomic_write(RESULTS / "gpu_tests.md", "\n".join(lines) + "\n")
    print(lines[-1])
    return 1 if counts["failure"] or counts["error"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"]:
        for name in SUITES:
            suite = suite_module(name)
            print(f"{name}: {suite.TITLE}")
            for case in suite.CASES.values():
                print(f"    {case.name}: {case.about}")
        return 0
    if argv[:1] == ["record-tests"] and len(argv) == 2:
        return record_tests(argv[1])
    if argv[:1] == ["summary"]:
        for name in argv[1:] or SUITES:
            result = load_results(RESULTS / f"{name}.json")
            if result:
                print("\n".join(summary_lines(suite_module(name), result)))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--cases", help="comma-separated case names (default: all, in the registry's order)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; on a machine without a GPU, on the CPU")
    parser.add_argument("--budget-s", type=float, help="seconds the run may take; cells predicted past it are skipped")
    parser.add_argument(
        "--out",
        help=f"results folder (default {RESULTS.relative_to(RESULTS.parents[1])}, or {SMOKE_RESULTS} with --smoke)",
    )
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.run", *argv])
    return run_suite(args.suite, args.cases, args.smoke, args.budget_s, args.out, command)


if __name__ == "__main__":
    sys.exit(main())
