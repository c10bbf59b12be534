"""Training and adaptation: LoRA on every projection, the fine-tuning example, packed batches, the
push command, and smoke tests of TRL and lm-eval when they are installed. CPU only, tiny models."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

from samba_hf import SambaForCausalLM, kernel_dispatch
from samba_hf.data import stdlib_corpus, train_tokenizer
from samba_hf.demo import tiny_config
from samba_hf.hub import save_hub_folder
from samba_hf.peft_integration import SAMBA_LORA_TARGET_MODULES, register_peft_defaults

from .helpers import small_model

peft = pytest.importorskip("peft")
# conftest imported samba_hf before this module, which must have registered the defaults; the tests
# below register them again (harmless) so that only test_import_registers_peft_defaults checks that.
REGISTERED_BY_IMPORT = "samba" in peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
register_peft_defaults()

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples are scripts, not a package

INPUT_IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def lora_model(target_modules=None, seed: int = 0):
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=target_modules)
    return peft.get_peft_model(small_model(seed), config)


def randomise_lora_b(model) -> None:
    """LoRA initialises B to zero (the adapter starts as a no-op); a trained B is not."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter))


# ---------------------------------------------------------------------------------------- LoRA


def test_import_registers_peft_defaults():
    assert REGISTERED_BY_IMPORT, "samba_hf/__init__.py must call peft_integration.register_peft_defaults()"


@pytest.mark.parametrize("module", SAMBA_LORA_TARGET_MODULES)
def test_lora_on_each_projection_changes_the_logits(module):
    base = logits_of(small_model())
    model = lora_model([module])
    adapted = [name for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert adapted and all(name.endswith(f".{module}") for name in adapted)
    torch.testing.assert_close(logits_of(model), base, rtol=0, atol=0)  # B = 0: exactly the base model
    randomise_lora_b(model)
    assert (logits_of(model) - base).abs().max() > 1e-3, f"LoRA on {module} has no effect"


def test_default_lora_targets_cover_every_projection():
    """Without target_modules, every nn.Linear of the layers is adapted (the tied LM head is not)."""
    linear = {name for name, module in small_model().named_modules() if isinstance(module, torch.nn.Linear)}
    model = lora_model(target_modules=None)
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert adapted == linear - {"lm_head"}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == set(SAMBA_LORA_TARGET_MODULES)


def test_lora_merge_and_save_round_trip(tmp_path):
    model = lora_model()
    randomise_lora_b(model)
    adapted = logits_of(model)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(small_model(), tmp_path / "adapter")
    torch.testing.assert_close(logits_of(reloaded), adapted)

    merged = model.merge_and_unload()
    assert isinstance(merged, SambaForCausalLM) and not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged), adapted, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ packed training


def test_packed_batch_matches_documents_run_separately():
    """DataCollatorWithFlattening's row (position_ids restart, first label of each document -100)
    gives the summed token loss, and the gradients, of the documents run one by one."""
    lengths = (7, 12, 5)
    documents = [torch.randint(0, 97, (n,)).tolist() for n in lengths]

    separate = small_model()
    separate_loss = sum(
        F.cross_entropy(separate(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]), reduction="sum")
        for ids in documents
    )
    separate_loss.backward()

    packed = small_model()
    batch = DataCollatorWithFlattening()([{"input_ids": ids} for ids in documents])
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    output = packed(**batch)
    predicted = sum(lengths) - len(lengths)  # every token but each document's first
    packed_loss = output.loss * predicted  # the model's loss is the mean over predicted tokens
    packed_loss.backward()

    torch.testing.assert_close(packed_loss, separate_loss, rtol=1e-5, atol=1e-4)
    for (name, p_separate), p_packed in zip(separate.named_parameters(), packed.parameters()):
        torch.testing.assert_close(p_packed.grad, p_separate.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_compiled_training_step_is_one_graph_with_exact_gradients(implementation):
    """torch.compile(model, fullgraph=True) traces a packed training step without a graph break, on
    the PyTorch ops and on the Triton kernels (custom ops; Triton's interpreter without a GPU), and
    gives the eager PyTorch path's loss and gradients."""
    import samba_kernels

    if implementation == "triton" and not samba_kernels.use_triton(torch.empty(0)):
        pytest.skip("TRITON_INTERPRET is off and there is no GPU")
    ids = torch.randint(0, 97, (1, 12))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]  # two packed documents

    def step(model):
        loss = model(ids, labels=ids, position_ids=position_ids).loss
        loss.backward()
        return loss

    eager = small_model(num_hidden_layers=2)
    eager_loss = step(eager)
    model = small_model(num_hidden_layers=2, kernel_implementation=implementation)
    compiled_loss = step(torch.compile(model, fullgraph=True, backend="aot_eager"))

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)


POSITIONS = {
    "nothing": None,
    "position ids from 0": torch.arange(24).expand(2, -1),
    "packed position ids": torch.cat([torch.arange(9), torch.arange(15)]).expand(2, -1),
}


@pytest.mark.parametrize("given", POSITIONS)
def test_training_keeps_the_window_without_a_length_x_length_mask(monkeypatch, given):
    """The sliding-window layers take the windowed path, eager and compiled, whether or not rows are packed, and
    the compiled step gives the eager one's loss and gradients. Compiled, transformers' masks cannot read position
    ids (a data-dependent check): any they see count as packed rows, and the window got a (length x length) mask,
    quadratic (samba-421m's compiled training step at 1 x 64K took 4.5x the eager one's time). Packed rows, eager
    or compiled, had that mask too; now the windowed path keeps each query in its document (seq_idx)."""
    windowed_calls = []
    windowed_sdpa = kernel_dispatch.windowed_sdpa

    def counted_windowed_sdpa(*args, **kwargs):
        windowed_calls.append(kwargs.get("seq_idx") is not None)
        return windowed_sdpa(*args, **kwargs)

    monkeypatch.setattr(kernel_dispatch, "windowed_sdpa", counted_windowed_sdpa)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    kwargs = {} if POSITIONS[given] is None else {"position_ids": POSITIONS[given]}

    def step(model):
        loss = model(ids, labels=ids, use_cache=False, **kwargs).loss
        loss.backward()
        return loss

    eager = small_model(num_hidden_layers=2)
    eager_loss = step(eager)
    eager_calls, windowed_calls[:] = list(windowed_calls), []
    model = small_model(num_hidden_layers=2)
    compiled_loss = step(torch.compile(model, fullgraph=True, backend="aot_eager"))

    # compiled, any given ids become documents (all one where they count from 0)
    assert eager_calls == [given == "packed position ids"] and windowed_calls == [given != "nothing"]
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------- the examples


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return stdlib_corpus()[:120]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, corpus) -> Path:
    """A Hub-ready folder of a random tiny Samba with a small BPE tokenizer, as `samba-hf demo` writes."""
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    torch.manual_seed(0)
    return save_hub_folder(
        SambaForCausalLM(tiny_config(tokenizer)), tmp_path_factory.mktemp("models") / "tiny", tokenizer=tokenizer
    )


@pytest.fixture(scope="module")
def text_files(tmp_path_factory, corpus) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("text")
    (folder / "train.txt").write_text("\n\n".join(corpus[:60]), encoding="utf-8")
    (folder / "eval.txt").write_text("\n\n".join(corpus[60:62]), encoding="utf-8")
    return folder / "train.txt", folder / "eval.txt"


def test_finetune_checkpoints_resumes_and_reports_perplexity(tiny_model_dir, text_files, tmp_path):
    import finetune

    train_file, eval_file = text_files
    output_dir = tmp_path / "finetuned"
    common = [
        "--model",
        str(tiny_model_dir),
        "--train-file",
        str(train_file),
        "--eval-file",
        str(eval_file),
        "--output-dir",
        str(output_dir),
        "--block-size",
        "32",
        "--per-device-train-batch-size",
        "2",
        "--per-device-eval-batch-size",
        "2",
        "--save-steps",
        "2",
    ]

    first = finetune.main([*common, "--max-steps", "2"])
    assert (output_dir / "checkpoint-2" / "model.safetensors").is_file()
    assert first["resumed_from"] is None
    assert math.isfinite(first["eval_loss"])
    assert first["eval_perplexity"] == pytest.approx(math.exp(first["eval_loss"]))

    # Mark the checkpoint's log: a resumed run carries it on, a run from scratch would not.
    state_file = output_dir / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"step": 2, "marker": "checkpoint-2"})
    state_file.write_text(json.dumps(state))

    resumed = finetune.main(
        [*common, "--max-steps", "4", "--resume-from-checkpoint", "last", "--activation-checkpointing"]
    )
    assert Path(resumed["resumed_from"]).name == "checkpoint-2"
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and {"step": 2, "marker": "checkpoint-2"} in state["log_history"]
    assert resumed["eval_perplexity"] == pytest.approx(math.exp(resumed["eval_loss"]))
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "tokenizer.json").is_file()
    card = (output_dir / "README.md").read_text()  # the card names the base and the result
    assert f"Full fine-tuning of `{tiny_model_dir}`" in card and f"perplexity {resumed['eval_perplexity']:.2f}" in card


def test_finetune_packed(tiny_model_dir, text_files, tmp_path):
    import finetune

    train_file, eval_file = text_files
    metrics = finetune.main(
        [
            "--model",
            str(tiny_model_dir),
            "--train-file",
            str(train_file),
            "--eval-file",
            str(eval_file),
            "--output-dir",
            str(tmp_path),
            "--block-size",
            "48",
            "--per-device-train-batch-size",
            "3",
            "--max-steps",
            "1",
            "--save-steps",
            "100",
            "--packed",
        ]
    )
    assert math.isfinite(metrics["eval_perplexity"])


def test_lora_example_trains_checkpoints_resumes_and_merges(tiny_model_dir, text_files, tmp_path):
    import lora
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "lora"
    common = [
        "--model",
        str(tiny_model_dir),
        "--train-file",
        str(text_files[0]),
        "--output-dir",
        str(output_dir),
        "--rank",
        "4",
        "--max-length",
        "32",
        "--per-device-train-batch-size",
        "2",
        "--save-steps",
        "2",
    ]
    first = lora.main([*common, "--max-steps", "2"])
    assert (output_dir / "checkpoint-2" / "adapter_model.safetensors").is_file() and first["resumed_from"] is None
    state_file = output_dir / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"step": 2, "marker": "checkpoint-2"})  # a resumed run carries it on
    state_file.write_text(json.dumps(state))

    result = lora.main([*common, "--max-steps", "4", "--resume-from-checkpoint", "last", "--merge"])
    assert Path(result["resumed_from"]).name == "checkpoint-2"
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and {"step": 2, "marker": "checkpoint-2"} in state["log_history"]
    adapter_config = json.loads((result["adapter_dir"] / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(SAMBA_LORA_TARGET_MODULES)
    assert (result["adapter_dir"] / "adapter_model.safetensors").is_file()

    merged = AutoModelForCausalLM.from_pretrained(result["merged_dir"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = peft.PeftModel.from_pretrained(base, result["adapter_dir"])
    input_ids = torch.arange(2, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, adapted(input_ids).logits, rtol=1e-4, atol=1e-4)
    assert "LoRA (r=4" in (result["merged_dir"] / "README.md").read_text()


def test_lora_example_trains_on_conversations_with_a_built_in_chat_template(tiny_model_dir, tmp_path):
    import lora
    from transformers import AutoTokenizer

    conversation = [
        {"role": "user", "content": "Return a new list."},
        {"role": "assistant", "content": "Use list(items)."},
    ]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": conversation}) for _ in range(8)))
    common = [
        "--model",
        str(tiny_model_dir),
        "--train-file",
        str(chats),
        "--output-dir",
        str(tmp_path / "chat"),
        "--rank",
        "2",
        "--max-length",
        "64",
        "--per-device-train-batch-size",
        "2",
        "--max-steps",
        "1",
    ]
    with pytest.raises(SystemExit, match="--chat-template"):
        lora.main(common)  # conversations, and a tokenizer without a chat template

    lora.main([*common, "--chat-template", "zephyr", "--assistant-only-loss"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "chat")  # saved with the adapter
    eos = tokenizer.eos_token
    expected = f"<|user|>\nReturn a new list.{eos}\n<|assistant|>\nUse list(items).{eos}\n<|assistant|>\n"
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == expected


def test_passkey_finetune_example_trains_saves_and_evaluates(tmp_path):
    import passkey_finetune

    output_dir = tmp_path / "passkey"
    argv = [
        "--max-steps",
        "2",
        "--length",
        "128",
        "--per-device-train-batch-size",
        "2",
        "--eval-lengths",
        "128",
        "--depths",
        "2",
        "--trials",
        "1",
        "--output-dir",
        str(output_dir),
        "--report-to",
        "none",
    ]
    assert passkey_finetune.main(argv) == 0
    with (output_dir / "passkey.csv").open() as file:
        rows = list(__import__("csv").DictReader(file))
    assert [(row["length"], row["depth"]) for row in rows] == [("128", "0.0"), ("128", "1.0")]
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "tokenizer.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_lora_example_refuses_an_unknown_dtype(tiny_model_dir, tmp_path):
    import lora

    with pytest.raises(SystemExit, match="--dtype float16: choose float32 or bfloat16"):
        lora.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--dtype", "float16"])


def test_qlora_without_cuda_fails_clearly(tiny_model_dir, tmp_path):
    import lora

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        lora.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--qlora"])


# ------------------------------------------------------------------------------------- push


def run_push(argv) -> int:
    from samba_hf.cli import main

    return main(["push", *argv])


@pytest.fixture
def hub(monkeypatch):
    """Replaces huggingface_hub.HfApi: records what would reach the Hub, reaches nothing."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    class RecordingApi:
        calls = []
        remote_files = set()  # what the repository holds already

        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def file_exists(self, repo_id, filename, **kwargs):
            return filename in self.remote_files

        def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
            names = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
            uploaded = set(filter_repo_objects(names, ignore_patterns=ignore_patterns))
            contents = {name: (Path(folder_path) / name).read_bytes() for name in uploaded}
            self.calls.append(("upload_folder", repo_id, contents))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
            self.calls.append(("upload_file", repo_id, {path_in_repo: path_or_fileobj}))

        def uploaded(self) -> dict[str, bytes]:
            files = {}
            for call in self.calls:
                if call[0].startswith("upload"):
                    files.update(call[2])
            return files

    RecordingApi.calls, RecordingApi.remote_files = [], set()
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return RecordingApi


def test_push_uploads_the_folder_as_it_is_with_its_own_card(tiny_model_dir, tmp_path, hub, capsys):
    """The card and every extra file go up unchanged; nothing is re-rendered or re-saved."""
    import shutil

    folder = tmp_path / "finetuned"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("# My model\n\nTrained on my notes.\n")
    (folder / "training_args.json").write_text('{"learning_rate": 0.001}')
    (folder / "results").mkdir()
    (folder / "results" / "eval.csv").write_text("length,ppl\n4096,12.3\n")

    assert run_push([str(folder), "someone/samba-tiny", "--private"]) == 0
    create = hub.calls[0]
    assert create[:2] == ("create_repo", "someone/samba-tiny") and create[2]["private"] is True
    uploaded = hub().uploaded()
    expected = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    del expected[".samba-hf-manifest.json"]
    assert uploaded == expected
    assert {"modeling_samba.py", "configuration_samba.py", "config.json", "model.safetensors"} <= set(uploaded)
    assert "uploaded to https://huggingface.co/someone/samba-tiny" in capsys.readouterr().out


def test_push_fills_the_repository_id_into_the_card_samba_hf_wrote(tiny_model_dir, hub, capsys):
    code = run_push([str(tiny_model_dir), "someone/samba-tiny", "--dry-run"])
    assert code == 0 and hub.calls == []
    listing, card = capsys.readouterr().out.split("----- README.md (model card) -----")
    listed = {line.split()[0] for line in listing.splitlines() if line.startswith("  ")}
    assert listed == {p.name for p in tiny_model_dir.iterdir()} - {".samba-hf-manifest.json"}
    assert 'from_pretrained("someone/samba-tiny"' in card and "path/to/this/folder" not in card

    assert run_push([str(tiny_model_dir), "someone/samba-tiny"]) == 0
    assert hub().uploaded()["README.md"].decode() == card.strip() + "\n"


def test_push_renders_a_card_only_where_there_is_none(tmp_path, hub, capsys):
    """A save_pretrained folder gets a card with the metadata given; a repository that has a card
    keeps it; model.push_to_hub renders the same card as the command."""
    from huggingface_hub import ModelCard

    model = small_model()
    model.save_pretrained(tmp_path / "plain")
    options = [
        "--base-model",
        "someone/samba-base",
        "--dataset",
        "someone/notes",
        "--language",
        "en",
        "--card-training",
        "Two steps on **docstrings**.",
    ]
    assert run_push([str(tmp_path / "plain"), "someone/samba-small", *options]) == 0
    card = hub().uploaded()["README.md"].decode()
    data = ModelCard(card).data
    assert (data.base_model, data.datasets, data.language) == ("someone/samba-base", ["someone/notes"], ["en"])
    assert "Two steps on **docstrings**." in card and 'from_pretrained("someone/samba-small"' in card
    assert f"{model.num_parameters() / 1e6:,.2f}M" in card

    hub.calls.clear()
    model.push_to_hub(
        "someone/samba-small",
        base_model="someone/samba-base",
        datasets="someone/notes",
        language="en",
        training="Two steps on **docstrings**.",
    )
    assert hub().uploaded()["README.md"].decode() == card

    hub.calls.clear()
    hub.remote_files.add("README.md")  # the repository has a card of its own
    assert run_push([str(tmp_path / "plain"), "someone/samba-small"]) == 0
    assert "README.md" not in hub().uploaded()


def test_push_a_lora_adapter_folder(tmp_path, hub):
    model = lora_model()
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "README.md").unlink()  # PEFT writes a card; test the one push renders
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "someone/base"})
    )
    assert run_push([str(tmp_path / "adapter"), "someone/samba-lora"]) == 0
    uploaded = hub().uploaded()
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    card = uploaded["README.md"].decode()
    assert "base_model: someone/base" in card and "library_name: peft" in card
    assert 'PeftModel.from_pretrained(base, "someone/samba-lora")' in card


def test_the_card_names_the_lora_targets_for_remote_code_users(tiny_model_dir):
    """Through remote code PEFT has no default targets for Samba: the card lists them, and they are
    every linear projection of the layers (all nn.Linear but the tied LM head)."""
    import re

    card = (tiny_model_dir / "README.md").read_text()
    listed = json.loads(re.search(r"target_modules=(\[.*?\])", card).group(1))
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in small_model().named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    assert set(listed) == linear


# ------------------------------------------------------------------- TRL and lm-eval smoke tests


def test_trl_sft_trainer_runs(tiny_model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["Return a new list of the items.", "Open the file and return a stream object."] * 2
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=32,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)


def test_lm_eval_loglikelihood(tiny_model_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [("Return a new", " list"), ("Open the file and", " return a stream")]
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    results = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2).loglikelihood(requests)

    # The same numbers by hand: the continuation's log-probabilities, each document run alone
    # (lm-eval batches them right-padded, which a causal model must not notice).
    for (context, continuation), (loglikelihood, _) in zip(pairs, results):
        ids = tokenizer(context + continuation)["input_ids"]
        start = len(tokenizer(context)["input_ids"])
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        expected = sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids)))
        assert loglikelihood == pytest.approx(expected, rel=1e-4)
