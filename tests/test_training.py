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

from samba_hf import SambaForCausalLM
from samba_hf.demo import stdlib_corpus, tiny_config, train_tokenizer
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


# ------------------------------------------------------------------------------- the examples


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return stdlib_corpus()[:120]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, corpus) -> Path:
    """A Hub-ready folder of a random tiny Samba with a small BPE tokenizer, as `samba-hf demo` writes."""
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    torch.manual_seed(0)
    return save_hub_folder(SambaForCausalLM(tiny_config(tokenizer)), tmp_path_factory.mktemp("models") / "tiny", tokenizer=tokenizer)


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
    common = ["--model", str(tiny_model_dir), "--train-file", str(train_file), "--eval-file", str(eval_file),
              "--output-dir", str(output_dir), "--block-size", "32", "--batch-size", "2",
              "--save-steps", "2"]  # fmt: skip

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

    resumed = finetune.main([*common, "--max-steps", "4", "--resume-from-checkpoint", "--activation-checkpointing"])
    assert Path(resumed["resumed_from"]).name == "checkpoint-2"
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and {"step": 2, "marker": "checkpoint-2"} in state["log_history"]
    assert resumed["eval_perplexity"] == pytest.approx(math.exp(resumed["eval_loss"]))
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "tokenizer.json").is_file()


def test_finetune_packed(tiny_model_dir, text_files, tmp_path):
    import finetune

    train_file, eval_file = text_files
    metrics = finetune.main(["--model", str(tiny_model_dir), "--train-file", str(train_file), "--eval-file",
                             str(eval_file), "--output-dir", str(tmp_path), "--block-size", "48", "--batch-size",
                             "3", "--max-steps", "1", "--save-steps", "100", "--packed"])  # fmt: skip
    assert math.isfinite(metrics["eval_perplexity"])


def test_lora_example_trains_saves_and_merges(tiny_model_dir, text_files, tmp_path):
    import lora
    from transformers import AutoModelForCausalLM

    result = lora.main(["--model", str(tiny_model_dir), "--train-file", str(text_files[0]), "--output-dir",
                        str(tmp_path / "lora"), "--rank", "4", "--block-size", "32", "--batch-size", "2",
                        "--max-steps", "2", "--merge"])  # fmt: skip
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_qlora_without_cuda_fails_clearly(tiny_model_dir, tmp_path):
    import lora

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        lora.main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--qlora"])


# ------------------------------------------------------------------------------------- push

REQUIRED_HUB_FILES = {
    "config.json", "model.safetensors", "modeling_samba.py", "configuration_samba.py", "kernel_dispatch.py",
    "mamba_reference.py", "tokenizer.json", "tokenizer_config.json", "README.md",
}  # fmt: skip
CARD_SECTIONS = ("Architecture", "Training data and recipe", "Intended use", "Evaluation", "Limitations", "Citation")


def run_push(argv) -> int:
    """`samba-hf push ...` through the parser that add_push_parser registers."""
    import argparse

    from samba_hf.publish import add_push_parser

    parser = argparse.ArgumentParser(prog="samba-hf")
    add_push_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["push", *argv])
    return args.func(args)


@pytest.fixture
def hub_api_calls(monkeypatch):
    """Replaces huggingface_hub.HfApi: records calls, and snapshots the uploaded folder's files."""
    import huggingface_hub

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            files = {path.name for path in Path(folder_path).iterdir()}
            calls.append(("upload_folder", repo_id, files))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return calls


def test_push_dry_run_lists_the_hub_folder_and_uploads_nothing(tiny_model_dir, tmp_path, capsys, hub_api_calls):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    card_options = ["--card-training", "Two steps on **docstrings**.", "--card-evaluation", "Perplexity 12.3."]
    code = run_push([str(tiny_model_dir), "someone/samba-tiny", "--dry-run", *card_options])
    assert code == 0 and hub_api_calls == []
    output = capsys.readouterr().out
    listing, card = output.split("----- README.md (model card) -----")
    listed = {line.split()[0] for line in listing.splitlines() if line.startswith("  ")}

    hub_folder = save_hub_folder(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        tmp_path / "hub",
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    assert listed == {path.name for path in hub_folder.iterdir()}
    assert REQUIRED_HUB_FILES <= listed
    auto_map = json.loads((hub_folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_samba.SambaForCausalLM"

    for section in CARD_SECTIONS:
        assert f"## {section}\n" in card, section
    assert "Two steps on **docstrings**." in card and "Perplexity 12.3." in card
    assert 'from_pretrained("someone/samba-tiny")' in card


def test_push_uploads_the_hub_folder(tiny_model_dir, hub_api_calls, capsys):
    assert run_push([str(tiny_model_dir), "someone/samba-tiny", "--private"]) == 0
    (create, repo_id, kwargs), (upload, upload_repo_id, files) = hub_api_calls
    assert (create, repo_id, kwargs["private"]) == ("create_repo", "someone/samba-tiny", True)
    assert (upload, upload_repo_id) == ("upload_folder", "someone/samba-tiny")
    assert REQUIRED_HUB_FILES <= files
    assert "uploaded to https://huggingface.co/someone/samba-tiny" in capsys.readouterr().out


# ------------------------------------------------------------------- TRL and lm-eval smoke tests


def test_trl_sft_trainer_runs(tiny_model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["Return a new list of the items.", "Open the file and return a stream object."] * 2
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_length=32,
                           save_strategy="no", report_to=[], use_cpu=True)  # fmt: skip
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
