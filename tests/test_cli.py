"""The `samba-hf` command and what it writes: the demo, safe output folders (--force, staging,
interruptions, permissions), the exit-code rule, generate's options, and the environment report."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import version

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import samba_hf
from samba_hf import SambaConfig, SambaForCausalLM
from samba_hf.cli import main as samba_hf_main
from samba_hf.data import train_tokenizer
from samba_hf.hub import save_hub_folder
from samba_hf.staging import MANIFEST, OutputPathError, read_manifest


def exit_code(argv) -> int:
    """main's return value, or argparse's exit code for what it refuses itself."""
    try:
        return samba_hf_main(argv)
    except SystemExit as exit:
        return exit.code


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_demo_trains_publishes_reloads_and_generates(tmp_path, capsys):
    output = tmp_path / "demo"
    assert samba_hf_main(["demo", "--steps", "4", "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "trained 4 steps" in printed and "reloaded SambaForCausalLM" in printed
    files = {p.name for p in output.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_samba.py",
        "configuration_samba.py",
        "tokenizer.json",
        "README.md",
        MANIFEST,
    } <= files
    assert set(read_manifest(output)) == files - {MANIFEST}
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask(), "the folder has save_pretrained's permissions"
    assert json.loads((output / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith(
        "modeling_samba"
    )
    card = (output / "README.md").read_text()
    for section in (
        "## Architecture",
        "## Training data and recipe",
        "## Intended use",
        "## Evaluation",
        "## Limitations",
        "## Citation",
        "4 steps of AdamW",
        "language:\n- en",
    ):
        assert section in card
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(output)
    ids = tokenizer("Return the", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no staging folders left behind"


def test_demo_refuses_a_folder_it_did_not_write_even_with_force(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):
        assert samba_hf_main(["demo", "--steps", "1", "--output-dir", str(tmp_path / "demo"), *force]) == 2
        err = capsys.readouterr().err
        assert "did not write" in err and err.count("\n") == 1
    assert (tmp_path / "demo" / "keep.txt").read_text() == "mine"
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["keep.txt"]


def test_version_has_one_source():
    assert samba_hf.__version__ == version("samba-hf")
    assert (
        'version = { attr = "samba_hf.__version__" }'
        in (__import__("pathlib").Path(__file__).parents[1] / "pyproject.toml").read_text()
    )


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists the packages one by one: a new folder left out imports from the tree but not from the
    wheel (a kernel folder once did, caught only by CI's wheel check)."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join((package, *init.parent.relative_to(root / where).parts))
        for package, where in setuptools["package-dir"].items()
        for init in (root / where).rglob("__init__.py")
    }
    assert folders == set(setuptools["packages"])


def test_version_option(capsys):
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"samba-hf {samba_hf.__version__}"


def test_help_shows_the_defaults(capsys):
    assert exit_code(["demo", "--help"]) == 0
    assert "(default: 300)" in capsys.readouterr().out
    assert exit_code(["generate", "--help"]) == 0
    assert "(default: 100)" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


# ------------------------------------------------------------------------------- safe output folders


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Samba and its tokenizer."""
    tokenizer = train_tokenizer(
        ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 20, 300
    )
    torch.manual_seed(0)
    config = SambaConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return SambaForCausalLM(config).eval(), tokenizer


def test_force_replaces_only_what_samba_hf_wrote(tiny, tmp_path):
    model, tokenizer = tiny
    folder = save_hub_folder(model, tmp_path / "out", tokenizer=tokenizer)
    (folder / "notes.md").write_text("the user's notes")
    (folder / "results").mkdir()
    (folder / "results" / "eval.json").write_text("{}")
    with pytest.raises(OutputPathError, match="--force"):
        save_hub_folder(model, folder)

    save_hub_folder(model, folder, force=True)  # no tokenizer this time: its files go, they were ours
    assert (folder / "notes.md").read_text() == "the user's notes" and (folder / "results" / "eval.json").is_file()
    assert not (folder / "tokenizer.json").exists()
    assert set(read_manifest(folder)) == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    } | {p.name for p in folder.glob("*.py")}

    (folder / "README.md").write_text("my own card")  # edited since samba-hf wrote it: no longer only ours
    with pytest.raises(OutputPathError, match="README.md in .* changed since samba-hf wrote"):
        save_hub_folder(model, folder, force=True)
    assert (folder / "README.md").read_text() == "my own card"


def test_force_never_replaces_a_file_it_did_not_write(tiny, tmp_path):
    model, tokenizer = tiny
    folder = save_hub_folder(model, tmp_path / "out")  # no tokenizer
    (folder / "tokenizer.json").write_text("the user's")
    with pytest.raises(OutputPathError, match="tokenizer.json, which samba-hf did not write"):
        save_hub_folder(model, folder, tokenizer=tokenizer, force=True)
    assert (folder / "tokenizer.json").read_text() == "the user's"
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir()), "the staging folder is removed"


def test_an_output_that_would_hold_the_source_or_the_current_directory_is_refused(tmp_path, monkeypatch, capsys):
    """`convert lit-gpt lit.pth . --force` and an output folder around the checkpoint: refused in one
    line, the checkpoint and the other files untouched."""
    checkpoint = tmp_path / "run" / "lit.pth"
    checkpoint.parent.mkdir()
    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, checkpoint)
    (tmp_path / "run" / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path / "run")
    for output in (".", str(tmp_path / "run"), str(tmp_path)):
        assert samba_hf_main(["convert", "lit-gpt", str(checkpoint), output, "--num-heads", "1", "--force"]) == 2
        err = capsys.readouterr().err
        assert ("the current directory" in err or "the source" in err) and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["lit.pth", "notes.txt"]
    assert torch.load(checkpoint)["transformer.wte.weight"].shape == (2, 2)


def test_bad_output_paths_fail_in_one_line_before_any_work(tmp_path, capsys):
    """The output is checked before the checkpoint is read: a checkpoint that does not exist is not
    what the error names."""
    (tmp_path / "a-file").write_text("x")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root ignores permissions; sysfs refuses new folders even to root
        read_only = "/sys" if os.path.isdir("/sys") and not os.access("/sys", os.W_OK) or os.geteuid() == 0 else None
    cases = {
        str(tmp_path / "a-file"): "is a file",
        str(tmp_path / "missing" / "out"): "is not an existing folder",
        str(tmp_path / "a-file" / "out"): "is not an existing folder",
    }
    if read_only is not None:
        cases[os.path.join(read_only, "samba-out")] = "cannot write in"
    for output, message in cases.items():
        code = samba_hf_main(["convert", "lit-gpt", str(tmp_path / "no-such.pth"), output, "--num-heads", "1"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (output, err)


def test_a_hub_folder_holds_every_module_its_remote_code_imports(tiny, tmp_path):
    """transformers copies the modeling file's relative imports (recursively, by a regular expression
    over `from .x import`); every relative import, in any form Python allows, must find its file in
    the folder, or trust_remote_code fails where samba-hf is not installed."""
    import ast

    model, _ = tiny
    folder = save_hub_folder(model, tmp_path / "out")
    code_files = {path.stem: path for path in folder.glob("*.py")}
    assert {"modeling_samba", "configuration_samba"} <= set(code_files)
    for path in code_files.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                missing = [name for name in names if name.split(".")[0] not in code_files]
                assert not missing, f"{path.name} imports .{missing}, which the folder lacks"


def test_stale_staging_of_a_dead_process_is_removed(tiny, tmp_path):
    model, _ = tiny
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    stale = tmp_path / f".out.samba-hf-staging-{dead}-x1"
    live = tmp_path / f".out.samba-hf-staging-{os.getpid()}-x2"  # a run still going: left alone
    for staging in (stale, live):
        staging.mkdir()
        (staging / "model.safetensors").write_text("partial")
    save_hub_folder(model, tmp_path / "out")
    assert not stale.exists() and live.exists()


DEMO_UNTIL_SIGNALLED = [sys.executable, "-m", "samba_hf.cli", "demo", "--steps", "100000", "--output-dir", "out"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_removes_its_staging_folder(tmp_path, signum, code):
    """The signal comes once the training loop has taken a step (its progress bar on stderr says so), with the
    staging folder open. The demo starts with Ctrl-C's default action, as from a terminal: a test run started in
    the background by a shell would pass on an ignored SIGINT, which Python then leaves ignored."""
    process = subprocess.Popen(
        DEMO_UNTIL_SIGNALLED,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: process.stderr.read(64), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not re.search(r"\b[1-9]\d*/100000\b", "".join(chunks)) and time.monotonic() < deadline:
            assert process.poll() is None, "".join(chunks)
            time.sleep(0.2)
        assert list(tmp_path.glob(".out.samba-hf-staging-*")), "the demo's training runs without its staging folder"
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        process.kill()  # a failed check leaves no demo training on beside the other tests
    reader.join(timeout=10)
    stderr = "".join(chunks)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and ("interrupted" if signum == signal.SIGINT else "terminated") in stderr
    assert list(tmp_path.iterdir()) == [], "neither the output nor its staging folder is left"


# ------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    model, tokenizer = tiny
    return save_hub_folder(model, tmp_path_factory.mktemp("tiny") / "model", tokenizer=tokenizer)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "no/such/folder", "hi"], "no/such/folder is not a model folder"),
        (["generate", "./missing", "hi"], "./missing is not a model folder"),
        (["generate", "MODEL", ""], "the prompt is empty"),
        (["generate", "MODEL", "hi", "--device", "cuda"], "CUDA is not available"),
        (["generate", "MODEL", "hi", "--greedy", "--temperature", "0.5"], "--greedy cannot be combined"),
    ],
)
def test_generate_user_errors_exit_2_in_one_line(tiny_folder, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = [str(tiny_folder) if part == "MODEL" else part for part in argv]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "huggingface.co" not in err


def test_generate_refuses_invalid_utf8_on_stdin(tiny_folder, capsys, monkeypatch):
    class BinaryStdin:
        buffer = __import__("io").BytesIO(b"caf\xe9")

    monkeypatch.setattr(sys, "stdin", BinaryStdin())
    assert samba_hf_main(["generate", str(tiny_folder)]) == 2
    assert "standard input is not valid UTF-8 (byte 0xe9 at offset 3)" in capsys.readouterr().err


def test_generate_follows_the_generation_config_and_skips_special_tokens(tiny, tiny_folder, tmp_path, capsys):
    """Without decoding options the folder's generation_config decides (here greedy without a repeated
    token); the printed text is the tokens' text without special tokens."""
    import shutil

    model, tokenizer = tiny
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "no_repeat_ngram_size": 1}))
    ids = tokenizer("the quick", return_tensors="pt")["input_ids"]
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(ids, no_repeat_ngram_size=1, **greedy)[0, ids.shape[1] :]
    assert not torch.equal(expected, model.generate(ids, **greedy)[0, ids.shape[1] :]), "the setting matters here"
    assert samba_hf_main(["generate", str(folder), "the quick", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert "first token after" in printed.err and "tokens/s" in printed.err


def test_generate_seed_makes_sampling_reproducible(tiny_folder, capsys):
    outputs = []
    for seed in ("1", "1", "2"):
        argv = ["generate", str(tiny_folder), "the quick", "--do-sample", "--max-new-tokens", "12", "--seed", seed]
        assert samba_hf_main([*argv, "--device", "cpu"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_corrupt_weights_exit_3_in_one_line(tiny_folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert samba_hf_main(["generate", str(broken), "hi", "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_env_reports_versions_and_each_op_implementation(capsys):
    assert samba_hf_main(["env"]) == 0
    printed = capsys.readouterr().out
    assert "transformers" in printed and "cpu    tensors -> torch" in printed
    assert "RoPE" in printed and "cpu    tensors -> the formula" in printed
    assert "RMSNorm, SwiGLU and the residual add" in printed and "cpu    tensors -> the formulas" in printed
    assert "sliding-window attention" in printed and "cpu    tensors -> sdpa over blocks" in printed
    assert "generate() decoding" in printed and "cpu    tensors -> transformers' decoding loop" in printed


def test_env_honours_the_samba_kernels_override(capsys, monkeypatch):
    monkeypatch.setenv("SAMBA_KERNELS", "mamba_ssm")
    assert samba_hf_main(["env"]) == 0
    assert "unavailable" in capsys.readouterr().out  # mamba-ssm cannot be installed without CUDA


def test_a_forced_missing_implementation_raises_instead_of_falling_back(monkeypatch):
    from .helpers import small_model

    monkeypatch.setenv("SAMBA_KERNELS", "mamba_ssm")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        small_model()(torch.randint(0, 97, (1, 5)))


@pytest.mark.parametrize("continued", ["initial_state", "seq_idx"])
def test_mamba_ssm_refuses_cached_states_and_packed_documents(continued):
    """mamba-ssm's scan has neither: the forced implementation says so and names the one that has both."""
    from samba_hf.kernel_dispatch import _mamba_ssm_scan

    with pytest.raises(NotImplementedError, match="use kernel implementation 'triton'"):
        _mamba_ssm_scan(*[torch.zeros(1)] * 5, **{continued: torch.zeros(1)})


def test_auto_takes_the_pytorch_decode_ops_under_compilation(monkeypatch):
    from samba_hf.kernel_dispatch import TORCH_OPS, TRITON_OPS, mamba_ops

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert mamba_ops("auto", torch.device("cuda"), decoding=True) is TORCH_OPS
    assert mamba_ops("triton", torch.device("cpu"), decoding=True) is TRITON_OPS


# ---------------------------------------------------------------------------------------- serve


def test_samba_hf_serve_lets_transformers_serve_load_a_samba_folder(tiny, tiny_folder):
    """`transformers serve` loads models through its ModelManager, which looks the architecture up by
    name in the transformers namespace: a Samba folder fails there alone, and loads once `samba-hf
    serve` has exposed the classes; the loaded model generates what the original does."""
    import transformers
    from transformers.cli.serving import model_manager
    from transformers.cli.serving.model_manager import ModelManager

    if hasattr(model_manager, "ModelLoader"):
        pytest.skip("this transformers loads each model in a process of its own (the test below)")

    from samba_hf.cli.serve import expose_to_transformers

    model, tokenizer = tiny
    manager = ModelManager(device="cpu", model_timeout=-1)
    name = manager.process_model_name(str(tiny_folder))
    with pytest.raises(AttributeError, match="no attribute SambaForCausalLM"):
        manager.load_model_and_processor(name)
    added = expose_to_transformers()
    try:
        served, processor = manager.load_model_and_processor(name)
    finally:
        for attribute in added:
            delattr(transformers, attribute)
    assert type(served) is SambaForCausalLM
    ids = processor("the quick", return_tensors="pt")["input_ids"]
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(served.generate(ids, **greedy), model.generate(ids, **greedy))


def test_samba_hf_serve_loads_a_samba_folder_in_the_process_transformers_serve_spawns(tiny, tiny_folder):
    """transformers 5.25 and later load each model in a process that serve spawns (`EngineClient.start_process`),
    from a fresh transformers namespace: transformers' own loader fails there, `samba-hf serve`'s loads; loaded
    here, its model generates what the original does."""
    import transformers
    from transformers.cli.serving import model_manager

    if not hasattr(model_manager, "ModelLoader"):
        pytest.skip("this transformers loads models in the server's process (the test above)")
    from transformers.cli.serving.model_manager import EngineClient, ModelLoader
    from transformers.cli.serving.utils import GenerationState

    from samba_hf.cli.serve_loader import SambaModelLoader

    # There the folder's config type is unknown (it asks for its remote code) and the class is not in transformers.
    with pytest.raises(RuntimeError, match="trust_remote_code|no attribute SambaForCausalLM"):
        EngineClient.start_process(str(tiny_folder), ModelLoader(device="cpu"), GenerationState())
    process, *_ = EngineClient.start_process(str(tiny_folder), SambaModelLoader(device="cpu"), GenerationState())
    process.terminate()
    process.join()
    names = [name for name in dir(samba_hf) if name.startswith("Samba") and not hasattr(transformers, name)]
    try:
        served, processor = SambaModelLoader(device="cpu").load_model_and_processor(str(tiny_folder))
    finally:
        for name in names:
            if hasattr(transformers, name):
                delattr(transformers, name)
    model, tokenizer = tiny
    assert type(served) is SambaForCausalLM
    ids = processor("the quick", return_tensors="pt")["input_ids"]
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(served.generate(ids, **greedy), model.generate(ids, **greedy))


def test_samba_hf_serve_passes_its_options_to_transformers_serve(monkeypatch):
    from transformers.cli import transformers as transformers_cli
    from transformers.cli.serving import model_manager
    from transformers.utils import import_utils

    import samba_hf.cli.serve as serve

    calls = []
    monkeypatch.setattr(import_utils, "is_serve_available", lambda: True)
    monkeypatch.setattr(transformers_cli, "app", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(serve, "expose_to_transformers", lambda: calls.append("exposed") or [])
    loader = getattr(model_manager, "ModelLoader", None)
    if loader is not None:  # transformers 5.25 and later: serve's model processes load with samba-hf's loader
        monkeypatch.setattr(model_manager, "ModelLoader", loader)
    assert samba_hf_main(["serve", "samba-demo", "--port", "8001"]) == 0
    assert calls == ["exposed", {"args": ["serve", "samba-demo", "--port", "8001"], "prog_name": "samba-hf"}]
    if loader is not None:
        from samba_hf.cli.serve_loader import SambaModelLoader

        assert model_manager.ModelLoader is SambaModelLoader
