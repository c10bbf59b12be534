"""Multi-GPU check of examples/finetune.py: one GPU, two with DDP, two with FSDP2, and an FSDP2 resume
from a checkpoint, all with the same global batch, seed, data and steps; the loss curves must agree.

    export PYTHONPATH=/tmp/site:src:kernels:benchmarks
    python benchmarks/multi_gpu.py --out benchmarks            # two GPUs: 4-5 minutes on two H200s
    python benchmarks/multi_gpu.py --qlora --out benchmarks    # and then a short QLoRA run of examples/lora.py
    python benchmarks/multi_gpu.py --cpu --out /tmp/multi_gpu  # CPU check: gloo, a tiny model, 8 steps

It writes a Samba model folder (random weights, a BPE tokenizer) and text files from Python's standard
library (nothing is downloaded), then runs finetune.py four times:
  1gpu    python examples/finetune.py, CUDA_VISIBLE_DEVICES=0, per-device batch B
  ddp     accelerate launch --config_file examples/accelerate_ddp.yaml --num_processes 2, per-device batch B/2
  fsdp2   accelerate launch --config_file examples/accelerate_fsdp2.yaml --num_processes 2, per-device batch B/2;
          it checkpoints (sharded) half-way
  resume  the fsdp2 command, resuming from fsdp2's half-way checkpoint into a new folder
and compares each step's training loss (trainer_state.json) of ddp and fsdp2 with 1gpu, and of resume
with fsdp2. multi_gpu.json (everything, with the commands) and multi_gpu_results.md (the table) go to
--out, the runs' logs to --out/multi_gpu_logs. The exit status is 1 if a check fails.

On the CPU, accelerate enables FSDP only for GPU processes (an FSDP config there silently trains with
DDP), so --cpu skips fsdp2 and resumes the ddp run instead.
"""

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# GPU: a ~33M-parameter Samba (Mamba, sliding-window attention and SwiGLU), 60 steps of 16 x 512 tokens,
# within one epoch of the text (which keeps the data order identical on one and two GPUs). CPU: the
# tiny preset, enough to exercise the same code in seconds.
SETTINGS = {
    "gpu": dict(
        model=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=64, sliding_window=256),
        vocab_size=8192, block_size=512, global_batch=16, steps=60, timeout_s=240,
    ),
    "cpu": dict(
        model=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, sliding_window=32),
        vocab_size=512, block_size=64, global_batch=4, steps=8, timeout_s=300,
    ),
}  # fmt: skip

# Tolerances on |loss(run) - loss(reference)| / loss(reference), per step. In float32 (CPU) two
# processes reproduce one up to the order of the gradient all-reduce (about 1e-7 here). In bf16 the
# runs differ by rounding: different batch shapes per GPU (matmul tiling), the all-reduce order, and
# under FSDP2 bf16 parameters and gradient reduction; the optimizer compounds it, so the curves drift
# apart by tenths of a percent over 60 steps. FSDP2 also returns the loss in bf16 (its mixed-precision
# output dtype): logged losses near 6 are rounded to steps of 1/32, up to 0.26%. Errors that change
# the effective batch, learning rate or data order (unsharded data, summed gradients, a schedule or
# optimizer state lost on resume) move the curves by several percent.
TOLERANCES = {"gpu": dict(mean=0.01, max=0.03), "cpu": dict(mean=1e-4, max=1e-4)}
CPU_FSDP_SKIP = "accelerate enables FSDP only on GPUs (on the CPU it would train with DDP)"


def log(message: str) -> None:
    print(f"[multi_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="results folder (default: $OUT or ./out)")
    parser.add_argument("--work", help="model, data and checkpoints (default: a temporary folder, removed at the end)")
    parser.add_argument("--cpu", action="store_true", help="check on the CPU: gloo processes, tiny model, no FSDP2")
    parser.add_argument("--steps", type=int, help="training steps of each run (default: 60 on GPUs, 8 on the CPU)")
    parser.add_argument("--qlora", action="store_true",
                        help="then train a QLoRA adapter with examples/lora.py on one GPU, if bitsandbytes "
                             "imports (with --cpu: plain LoRA, to check the plumbing)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=420,
                        help="no run starts, or goes on, past this many seconds from the start")  # fmt: skip
    return parser.parse_args(argv)


def machine_description(cpu: bool) -> dict:
    import accelerate
    import transformers

    description = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cpu_count": os.cpu_count(),
    }
    if not cpu:
        description["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        description["cuda"] = torch.version.cuda
    return description


def build_inputs(work: Path, cpu: bool, settings: dict) -> tuple[Path, Path, Path, int]:
    """The model folder (random weights, BPE tokenizer), train and eval text files, and the parameter count."""
    import importlib

    from samba_hf import SambaForCausalLM
    from samba_hf.demo import CORPUS_MODULES, stdlib_corpus, tiny_config, train_tokenizer
    from samba_hf.hub import save_hub_folder

    documents = stdlib_corpus()
    if not cpu:
        # The docstrings alone (~100k tokens) are too few for 60 steps within one epoch; the same
        # modules' source adds about 2 MB.
        for name in CORPUS_MODULES:
            path = Path(getattr(importlib.import_module(name), "__file__", None) or "built-in")
            if path.suffix == ".py":  # built-in modules (math, itertools, ...) have no source
                documents.extend(part for part in path.read_text(encoding="utf-8").split("\n\n\n") if part.strip())
    # finetune.py reads one document per paragraph, so blank lines inside a document are dropped.
    paragraphs = ["\n".join(line for line in doc.splitlines() if line.strip()) for doc in documents]
    train_file, eval_file = work / "train.txt", work / "eval.txt"
    train_file.write_text("\n\n".join(p for i, p in enumerate(paragraphs) if i % 50), encoding="utf-8")
    eval_file.write_text("\n\n".join(paragraphs[::50][:200]), encoding="utf-8")  # every 50th, held out

    tokenizer = train_tokenizer(documents, vocab_size=settings["vocab_size"])
    torch.manual_seed(0)
    model = SambaForCausalLM(tiny_config(tokenizer, **settings["model"]))
    model_dir = save_hub_folder(model, work / "model", tokenizer=tokenizer, force=True)
    log(f"model: {model.num_parameters() / 1e6:.1f}M parameters, layers {model.config.layer_types}; "
        f"train text {train_file.stat().st_size / 1e6:.2f} MB")  # fmt: skip
    return model_dir, train_file, eval_file, model.num_parameters()


def warm_up_kernels(model_dir: Path, block_size: int, batch_sizes) -> None:
    """Compile the Triton kernels here, for every batch shape, once: they are cached on disk, so the
    first timed run is not charged for the compilation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).cuda()
    for batch in batch_sizes:
        ids = torch.randint(0, model.config.vocab_size, (batch, block_size), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    del model
    torch.cuda.empty_cache()


def run_logged(cmd: list[str], env: dict, log_file: Path, timeout: float) -> dict:
    """Run `cmd` in its own process group, output to `log_file`; on timeout, end the whole group
    (accelerate launch's workers too)."""
    started = time.perf_counter()
    with open(log_file, "w") as output:
        process = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT,
                                   cwd=ROOT, start_new_session=True)  # fmt: skip
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            returncode = "timeout"
    return {
        "command": shlex.join([f"{key}={value}" for key, value in env.items() if key != "PYTHONPATH"] + cmd),
        "returncode": returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "log": str(log_file),
    }


def read_run(output_dir: Path) -> dict:
    """Per-step training losses, runtime and eval loss of a finished finetune.py run."""
    state_file, results_file = output_dir / "trainer_state.json", output_dir / "all_results.json"
    if not state_file.is_file():
        return {}
    history = json.loads(state_file.read_text())["log_history"]
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    return {
        "losses": {entry["step"]: entry["loss"] for entry in history if "loss" in entry},
        "epochs": history[-1].get("epoch") if history else None,  # past 1, two GPUs see another data order
        "train_runtime_s": results.get("train_runtime"),
        "eval_loss": results.get("eval_loss"),
    }


def compare_losses(losses: dict, reference: dict, steps, tolerance: dict) -> dict:
    """|loss - reference| over `steps`, absolute and relative to the reference loss; passes when the
    mean and the largest relative difference are within `tolerance`."""
    missing = [step for step in steps if step not in losses or step not in reference]
    if missing:
        return {"passed": False, "error": f"no loss logged at steps {missing[:5]}{'...' if len(missing) > 5 else ''}"}
    absolute = [abs(losses[step] - reference[step]) for step in steps]
    relative = [diff / abs(reference[step]) for diff, step in zip(absolute, steps)]
    mean_relative = sum(relative) / len(relative)
    return {
        "steps": [steps[0], steps[-1]],
        "max_abs": max(absolute),
        "mean_abs": sum(absolute) / len(absolute),
        "max_rel": max(relative),
        "mean_rel": mean_relative,
        "passed": mean_relative <= tolerance["mean"] and max(relative) <= tolerance["max"],
    }


def check_final_model(output_dir: Path) -> dict:
    """The model folder a run saved at the end loads, through the remote code it carries."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)
    except Exception as error:  # reported, not raised: the other results still get written
        return {"passed": False, "error": f"{type(error).__name__}: {error}"}
    return {"passed": True, "class": f"{type(model).__module__.split('.')[-1]}.{type(model).__name__}",
            "parameters": model.num_parameters()}  # fmt: skip


def run_lora(model_dir: Path, train_file: Path, work: Path, logs: Path, cpu: bool, timeout: float, env: dict) -> dict:
    """A short adapter training with examples/lora.py: QLoRA on one GPU, plain LoRA on the CPU. It passes
    when it trains (finite losses, some parameters trainable): a few steps need not lower the loss."""
    if not cpu:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return {"skipped": "bitsandbytes is not importable"}
    cmd = [sys.executable, str(EXAMPLES / "lora.py"), "--model", str(model_dir), "--train-file", str(train_file),
           "--output-dir", str(work / "lora"), "--block-size", "512" if not cpu else "64", "--batch-size", "8",
           "--max-steps", "30" if not cpu else "4", "--logging-steps", "5" if not cpu else "1", "--learning-rate", "1e-3",
           *([] if cpu else ["--qlora"])]  # fmt: skip
    result = run_logged(cmd, {**env, "CUDA_VISIBLE_DEVICES": "0"} if not cpu else env, logs / "lora.log", timeout)
    text = Path(result["log"]).read_text(errors="replace")
    trainable = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", text)
    losses = [float(value) for value in re.findall(r"'loss': '?([^',}]+)", text)]  # Trainer's printed logs
    return {
        **result,
        "mode": "lora (CPU stand-in for QLoRA)" if cpu else "qlora",
        "trainable_params": int(trainable[1].replace(",", "")) if trainable else None,
        "all_params": int(trainable[2].replace(",", "")) if trainable else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "passed": result["returncode"] == 0 and bool(trainable) and bool(losses) and all(map(math.isfinite, losses)),
    }


def markdown(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = [
        f"Machine: {', '.join(machine.get('gpus', ['CPU']))}; torch {machine['torch']}, transformers "
        f"{machine['transformers']}, accelerate {machine['accelerate']}.",
        f"Runs: {settings['steps']} steps of {settings['global_batch']} x {settings['block_size']} tokens "
        f"(global), {settings['parameters'] / 1e6:.1f}M-parameter Samba, seed 0. Tolerance per step: mean "
        f"relative loss difference <= {report['tolerance']['mean']:g}, largest <= {report['tolerance']['max']:g}.",
        "",
        "| run | processes | batch per process | wall s | train s | tokens/s | last loss | eval loss "
        "| compared with | max abs diff | mean rel diff | max rel diff | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in report["runs"].items():
        if "skipped" in run:
            lines.append(f"| {name} | | | | | | | | | | | | skipped: {run['skipped']} |")
            continue
        comparison = report["comparisons"].get(name, {})
        losses = run.get("losses") or {}
        cells = [
            name, run["processes"], run["batch_per_process"], run["wall_s"], _fmt(run.get("train_runtime_s"), ".1f"),
            _fmt(run.get("tokens_per_s"), ",.0f"), _fmt(losses[max(losses)] if losses else None, ".4f"),
            _fmt(run.get("eval_loss"), ".4f"), comparison.get("reference", ""),
            _fmt(comparison.get("max_abs"), ".2e"), _fmt(comparison.get("mean_rel"), ".2e"),
            _fmt(comparison.get("max_rel"), ".2e"),
            "pass" if comparison.get("passed") else comparison.get("error", "FAIL") if comparison else "",
        ]  # fmt: skip
        if run["returncode"] != 0:
            cells[-1] = f"run failed ({run['returncode']}), see {Path(run['log']).name}"
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    if "final_model" in report:
        final = report["final_model"]
        lines += ["", f"Final model saved by {final['run']} (gathered from the shards): "
                  + (f"loads as {final['class']}" if final["passed"] else f"**fails**: {final['error']}")]  # fmt: skip
    if "lora" in report:
        lora = report["lora"]
        lines += ["", "Adapter training (examples/lora.py): " + (
            f"skipped: {lora['skipped']}" if "skipped" in lora else
            f"{lora['mode']}, {lora['trainable_params']:,} of {lora['all_params']:,} parameters trainable, "
            f"loss {lora['first_loss']} -> {lora['last_loss']}, {lora['wall_s']} s: "
            f"{'pass' if lora['passed'] else 'FAIL'}"
        )]  # fmt: skip
    lines += ["", "Commands:", "", "```"] + [run["command"] for run in report["runs"].values() if "command" in run]
    lines += [report["lora"]["command"]] if "command" in report.get("lora", {}) else []
    lines += ["```", "", f"Overall: {'pass' if report['passed'] else 'FAIL'} ({report['total_wall_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    mode = "cpu" if args.cpu else "gpu"
    settings = SETTINGS[mode]
    steps = args.steps or settings["steps"]
    if steps % 2:
        raise SystemExit("--steps must be even: the resume run starts from the half-way checkpoint")
    if not args.cpu and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, found {torch.cuda.device_count()}; use --cpu for the CPU check")
    out = Path(args.out)
    logs = out / "multi_gpu_logs"
    logs.mkdir(parents=True, exist_ok=True)
    scratch = None if args.work else tempfile.TemporaryDirectory(prefix="samba-multi-gpu-")
    work = Path(args.work or scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    tolerance = TOLERANCES[mode]

    def time_left() -> float:
        """Seconds a run may take: its timeout, cut to what is left of the budget (0 if under 30 s)."""
        left = args.budget_s - (time.perf_counter() - started)
        return min(settings["timeout_s"], left) if left >= 30 else 0

    machine = machine_description(args.cpu)
    log(f"machine: {machine}")
    model_dir, train_file, eval_file, parameters = build_inputs(work, args.cpu, settings)
    global_batch, block_size = settings["global_batch"], settings["block_size"]
    if not args.cpu:
        log("compiling the Triton kernels (cached on disk for the runs)")
        warm_up_kernels(model_dir, block_size, (global_batch, global_batch // 2))

    # Every run the same but for the launcher and the per-process batch. Offline, with the datasets cache
    # in the work folder, and this checkout's samba_hf first on the path of every process.
    python_path = [str(ROOT / "src"), str(ROOT / "kernels"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "datasets-cache"),
        "PYTHONPATH": os.pathsep.join(python_path),
    }
    finetune = [str(EXAMPLES / "finetune.py"), "--model", str(model_dir), "--train-file", str(train_file),
                "--eval-file", str(eval_file), "--block-size", str(block_size), "--max-steps", str(steps),
                "--save-steps", str(steps // 2), "--logging-steps", "1", "--learning-rate", "1e-3",
                "--warmup-steps", str(max(1, steps // 10)), "--seed", "0"]  # fmt: skip
    if args.cpu:
        # accelerate's own --cpu flag needs mpirun; this starts gloo processes through torchrun instead.
        two_process_env, precision = {"ACCELERATE_USE_CPU": "true"}, ["--mixed_precision", "no"]
    else:
        two_process_env, precision = {"CUDA_VISIBLE_DEVICES": "0,1"}, []

    def launch(config: str, port: int) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / config),
                "--num_processes", "2", "--main_process_port", str(port), *precision]  # fmt: skip

    resume_base = "ddp" if args.cpu else "fsdp2"
    plans = {
        "1gpu": ([sys.executable], {} if args.cpu else {"CUDA_VISIBLE_DEVICES": "0"}, 1, []),
        "ddp": (launch("accelerate_ddp.yaml", 29501), two_process_env, 2, []),
        "fsdp2": (launch("accelerate_fsdp2.yaml", 29502), two_process_env, 2, []),
        "resume": (
            launch(f"accelerate_{resume_base}.yaml", 29503), two_process_env, 2,
            ["--resume-from-checkpoint", str(work / resume_base / f"checkpoint-{steps // 2}")],
        ),
    }  # fmt: skip
    runs = {}
    for name, (launcher, launch_env, processes, extra) in plans.items():
        if args.cpu and name == "fsdp2":
            skipped = CPU_FSDP_SKIP
        elif extra and not Path(extra[-1]).is_dir():
            skipped = f"{resume_base} left no checkpoint to resume from"
        elif not time_left():
            skipped = f"out of the {args.budget_s:.0f} s budget"
        else:
            skipped = None
        if skipped:
            runs[name] = {"skipped": skipped}
            log(f"{name}: skipped, {skipped}")
            continue
        batch = global_batch // processes
        cmd = [*launcher, *finetune, "--batch-size", str(batch), "--output-dir", str(work / name), *extra]
        log(f"{name}: starting ({processes} process(es), batch {batch} each)")
        result = run_logged(cmd, {**env, **launch_env}, logs / f"{name}.log", time_left())
        run = {**result, "processes": processes, "batch_per_process": batch, **read_run(work / name)}
        trained_steps = steps // 2 if name == "resume" else steps
        if run.get("train_runtime_s"):
            run["tokens_per_s"] = trained_steps * global_batch * block_size / run["train_runtime_s"]
        runs[name] = run
        losses = run.get("losses") or {}
        log(f"{name}: exit {run['returncode']} after {run['wall_s']} s; "
            + (f"loss {losses[min(losses)]:.4f} -> {losses[max(losses)]:.4f}" if losses else f"no losses, see {run['log']}"))  # fmt: skip
        if run["returncode"] != 0:
            print(Path(run["log"]).read_text(errors="replace")[-3000:], flush=True)

    all_steps = list(range(1, steps + 1))
    pairs = {"ddp": ("1gpu", all_steps), "fsdp2": ("1gpu", all_steps),
             "resume": (resume_base, all_steps[steps // 2 :])}  # fmt: skip
    comparisons = {}
    for name, (reference, compared_steps) in pairs.items():
        if "losses" in runs[name] and "losses" in runs[reference]:
            comparison = compare_losses(runs[name]["losses"], runs[reference]["losses"], compared_steps, tolerance)
            comparisons[name] = {"reference": reference, **comparison}
            log(f"{name} vs {reference}: {comparisons[name]}")

    report = {
        "machine": machine,
        "settings": dict(steps=steps, global_batch=global_batch, block_size=block_size, parameters=parameters),
        "tolerance": tolerance,
        "runs": runs,
        "comparisons": comparisons,
    }
    # Every run must have run and agreed, but for the one skipped by design on the CPU.
    expected = [name for name, run in runs.items() if run.get("skipped") != CPU_FSDP_SKIP]
    checks = [runs[name].get("returncode") == 0 for name in expected]
    checks += [comparisons.get(name, {}).get("passed", False) for name in pairs if name in expected]
    if not args.cpu and runs["fsdp2"].get("returncode") == 0:
        report["final_model"] = {"run": "fsdp2", **check_final_model(work / "fsdp2")}
        checks.append(report["final_model"]["passed"])
    if args.qlora:
        log("lora: starting")
        timeout = time_left()
        base = work / "1gpu" if (work / "1gpu" / "config.json").is_file() else model_dir  # trained, if it ran
        report["lora"] = (
            run_lora(base, train_file, work, logs, args.cpu, timeout, env)
            if timeout
            else {"skipped": f"out of the {args.budget_s:.0f} s budget"}
        )
        log(f"lora: {report['lora']}")
        checks.append(report["lora"].get("passed", True))  # skipped (no bitsandbytes, no time) is not a failure
    report["passed"] = all(checks)
    report["total_wall_s"] = time.perf_counter() - started

    (out / "multi_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "multi_gpu_results.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    log(f"{'PASS' if report['passed'] else 'FAIL'}; results in {out}/multi_gpu.json and multi_gpu_results.md")
    if scratch is not None:
        scratch.cleanup()
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
