"""multi_gpu: examples/finetune.py on one GPU, on two with DDP and with FSDP2, and an FSDP2 resume from a
checkpoint, all with the same global batch, seed, data and steps: the loss curves must agree. (QLoRA on one GPU:
the lora suite.)

    python -m benchmarks.run multi_gpu                # two GPUs: 4-5 minutes on two H200s
    python -m benchmarks.run multi_gpu --smoke        # the CPU check: gloo processes, a tiny model, 8 steps

It writes a Samba model folder (random weights, a BPE tokenizer) and text files from Python's standard
library (nothing is downloaded), then runs finetune.py four times:
  1gpu    python examples/finetune.py, CUDA_VISIBLE_DEVICES=0, per-device batch B
  ddp     accelerate launch --config_file examples/accelerate_ddp.yaml --num_processes 2, per-device batch B/2
  fsdp2   accelerate launch --config_file examples/accelerate_fsdp2.yaml --num_processes 2, per-device batch B/2;
          it checkpoints (sharded) half-way
  resume  the fsdp2 command, resuming from fsdp2's half-way checkpoint into a new folder
and compares each step's training loss (trainer_state.json) of ddp and fsdp2 with 1gpu, and of resume
with fsdp2. A case fails when a run fails or a comparison is past its tolerance.

On the CPU, accelerate enables FSDP only for GPU processes (an FSDP config there silently trains with
DDP), so the smoke run skips fsdp2 and resumes the ddp run instead.
"""

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .harness import registry

TITLE = "Multi-GPU training: DDP, FSDP2, and resuming under FSDP2"
INTRO = """
The same model trained on the same data four ways, each with the same global batch, seed and number of steps
(`examples/finetune.py`); the per-step training losses (`trainer_state.json`) are compared. The model is a
33M-parameter Samba (8 layers, width 512, Mamba and sliding-window attention alternating), random weights, a BPE
tokenizer trained on the text, which is Python's standard library (docstrings and source); nothing is downloaded.
A check passes when the mean relative loss difference is at most 1% and the largest at most 3%: bf16 rounding with
a different batch shape, all-reduce order, and under FSDP2 bf16 parameters, gradient reduction and a bf16 loss,
drift the curves by tenths of a percent, while errors in the effective batch, learning rate, data order or the
resumed state move them by several percent. The final model that fsdp2 saves (gathered from the shards) must load.
"""
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# GPU: a ~33M-parameter Samba (Mamba, sliding-window attention and SwiGLU), 60 steps of 16 x 512 tokens,
# within one epoch of the text (which keeps the data order identical on one and two GPUs). CPU: the
# tiny preset, enough to exercise the same code in seconds.
SETTINGS = {
    "gpu": dict(
        model=dict(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            sliding_window=256,
        ),
        vocab_size=8192,
        block_size=512,
        global_batch=16,
        steps=60,
        timeout_s=240,
    ),
    "cpu": dict(
        model=dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=32,
        ),
        vocab_size=512,
        block_size=64,
        global_batch=4,
        steps=8,
        timeout_s=300,
    ),
}

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
    log(
        f"model: {model.num_parameters() / 1e6:.1f}M parameters, layers {model.config.layer_types}; "
        f"train text {train_file.stat().st_size / 1e6:.2f} MB"
    )
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
        process = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
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
    return {
        "passed": True,
        "class": f"{type(model).__module__.split('.')[-1]}.{type(model).__name__}",
        "parameters": model.num_parameters(),
    }


def render_case(name: str, entry: dict) -> list[str]:
    report = entry.get("report")
    if report is None:
        return []
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
    for run_name, run in report["runs"].items():
        if "skipped" in run:
            lines.append(f"| {run_name} | | | | | | | | | | | | skipped: {run['skipped']} |")
            continue
        comparison = report["comparisons"].get(run_name, {})
        losses = run.get("losses") or {}
        cells = [
            run_name,
            run["processes"],
            run["batch_per_process"],
            run["wall_s"],
            _fmt(run.get("train_runtime_s"), ".1f"),
            _fmt(run.get("tokens_per_s"), ",.0f"),
            _fmt(losses[max(losses)] if losses else None, ".4f"),
            _fmt(run.get("eval_loss"), ".4f"),
            comparison.get("reference", ""),
            _fmt(comparison.get("max_abs"), ".2e"),
            _fmt(comparison.get("mean_rel"), ".2e"),
            _fmt(comparison.get("max_rel"), ".2e"),
            "pass" if comparison.get("passed") else comparison.get("error", "FAIL") if comparison else "",
        ]
        if run["returncode"] != 0:
            cells[-1] = f"run failed ({run['returncode']}), see its log"
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    if "final_model" in report:
        final = report["final_model"]
        lines += [
            "",
            f"Final model saved by {final['run']} (gathered from the shards): "
            + (f"loads as {final['class']}" if final["passed"] else f"**fails**: {final['error']}"),
        ]
    lines += ["", "Commands:", "", "```"] + [run["command"] for run in report["runs"].values() if "command" in run]
    lines += ["```", "", f"Overall: {'pass' if report['passed'] else 'FAIL'} ({report['total_wall_s']:.0f} s)."]
    return lines


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


class Session:
    """A case's shared setting: CPU or GPU mode, its settings, a scratch folder, the time left, the runs' env."""

    def __init__(self, ctx, work: Path):
        self.cpu = ctx.smoke
        if not self.cpu and torch.cuda.device_count() < 2:
            raise RuntimeError(f"needs 2 GPUs, found {torch.cuda.device_count()}; --smoke runs the CPU check")
        self.mode = "cpu" if self.cpu else "gpu"
        self.settings, self.budget, self.work = SETTINGS[self.mode], ctx.budget, work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # Offline, with the datasets cache in the work folder, and this checkout's samba_hf first on every path.
        python_path = [str(ROOT / "src"), str(ROOT / "kernels"), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env = {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(work / "datasets-cache"),
            "PYTHONPATH": os.pathsep.join(python_path),
        }

    def time_left(self) -> float:
        """Seconds a run may take: its timeout, cut to what is left of the budget (0 if under 30 s)."""
        left = self.budget.left()
        return min(self.settings["timeout_s"], left) if left >= 30 else 0


CASES, case = registry()


@case("losses", "1 GPU, DDP and FSDP2 on 2 GPUs, FSDP2 resumed: the per-step losses agree")
def losses(ctx):
    with tempfile.TemporaryDirectory(prefix="samba-multi-gpu-") as scratch:
        session = Session(ctx, Path(scratch))
        ctx.entry["report"] = report = compare_runs(session)
    ctx.save()
    if not report["passed"]:
        raise AssertionError("a run failed or its losses disagree: see the table")


def compare_runs(session: Session) -> dict:
    started = time.perf_counter()
    settings, cpu, work, logs = session.settings, session.cpu, session.work, session.logs
    steps = settings["steps"]
    tolerance = TOLERANCES[session.mode]
    machine = machine_description(cpu)
    log(f"machine: {machine}")
    model_dir, train_file, eval_file, parameters = build_inputs(work, cpu, settings)
    global_batch, block_size = settings["global_batch"], settings["block_size"]
    if not cpu:
        log("compiling the Triton kernels (cached on disk for the runs)")
        warm_up_kernels(model_dir, block_size, (global_batch, global_batch // 2))
    finetune = [
        str(EXAMPLES / "finetune.py"),
        "--model",
        str(model_dir),
        "--train-file",
        str(train_file),
        "--eval-file",
        str(eval_file),
        "--block-size",
        str(block_size),
        "--max-steps",
        str(steps),
        "--save-steps",
        str(steps // 2),
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-3",
        "--warmup-steps",
        str(max(1, steps // 10)),
        "--seed",
        "0",
    ]
    if cpu:
        # accelerate's own --cpu flag needs mpirun; this starts gloo processes through torchrun instead.
        two_process_env, precision = {"ACCELERATE_USE_CPU": "true"}, ["--mixed_precision", "no"]
    else:
        two_process_env, precision = {"CUDA_VISIBLE_DEVICES": "0,1"}, []

    def launch(config: str, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(EXAMPLES / config),
            "--num_processes",
            "2",
            "--main_process_port",
            str(port),
            *precision,
        ]

    resume_base = "ddp" if cpu else "fsdp2"
    plans = {
        "1gpu": ([sys.executable], {} if cpu else {"CUDA_VISIBLE_DEVICES": "0"}, 1, []),
        "ddp": (launch("accelerate_ddp.yaml", 29501), two_process_env, 2, []),
        "fsdp2": (launch("accelerate_fsdp2.yaml", 29502), two_process_env, 2, []),
        "resume": (
            launch(f"accelerate_{resume_base}.yaml", 29503),
            two_process_env,
            2,
            ["--resume-from-checkpoint", str(work / resume_base / f"checkpoint-{steps // 2}")],
        ),
    }
    runs = {}
    for name, (launcher, launch_env, processes, extra) in plans.items():
        if cpu and name == "fsdp2":
            skipped = CPU_FSDP_SKIP
        elif extra and not Path(extra[-1]).is_dir():
            skipped = f"{resume_base} left no checkpoint to resume from"
        elif not session.time_left():
            skipped = "out of the run's budget"
        else:
            skipped = None
        if skipped:
            runs[name] = {"skipped": skipped}
            log(f"{name}: skipped, {skipped}")
            continue
        batch = global_batch // processes
        cmd = [*launcher, *finetune, "--batch-size", str(batch), "--output-dir", str(work / name), *extra]
        log(f"{name}: starting ({processes} process(es), batch {batch} each)")
        result = run_logged(cmd, {**session.env, **launch_env}, logs / f"{name}.log", session.time_left())
        run = {**result, "processes": processes, "batch_per_process": batch, **read_run(work / name)}
        trained_steps = steps // 2 if name == "resume" else steps
        if run.get("train_runtime_s"):
            run["tokens_per_s"] = trained_steps * global_batch * block_size / run["train_runtime_s"]
        runs[name] = run
        losses = run.get("losses") or {}
        log(
            f"{name}: exit {run['returncode']} after {run['wall_s']} s; "
            + (
                f"loss {losses[min(losses)]:.4f} -> {losses[max(losses)]:.4f}"
                if losses
                else f"no losses, see {run['log']}"
            )
        )
        if run["returncode"] != 0:
            print(Path(run["log"]).read_text(errors="replace")[-3000:], flush=True)

    all_steps = list(range(1, steps + 1))
    pairs = {
        "ddp": ("1gpu", all_steps),
        "fsdp2": ("1gpu", all_steps),
        "resume": (resume_base, all_steps[steps // 2 :]),
    }
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
    if not cpu and runs["fsdp2"].get("returncode") == 0:
        report["final_model"] = {"run": "fsdp2", **check_final_model(work / "fsdp2")}
        checks.append(report["final_model"]["passed"])
    report["passed"] = all(checks)
    report["total_wall_s"] = time.perf_counter() - started
    return report


def summary(result: dict) -> list[str]:
    lines = []
    for name, entry in result.get("cases", {}).items():
        report = entry.get("report")
        if report:
            lines.append(f"{name}: {'pass' if report['passed'] else 'FAIL'} ({', '.join(report['runs'])})")
    return lines
