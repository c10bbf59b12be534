"""The model's CUDA paths against its PyTorch paths, on random inputs: the Triton kernels and windowed attention's
own forward kernel, continuation from the cache, packed documents, LoRA on the kernel path, generate() with the
static cache, and a training step under torch.compile."""

import pytest
import torch
from transformers import DynamicCache

import samba_kernels
from samba_kernels.windowed_attention import kernel as window_kernel_module

from .helpers import FLOAT32_TOLERANCE, generate_takes_decode_engine, random_model, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_triton_and_torch_paths_agree_on_logits_and_gradients(monkeypatch):
    forward_kernel, kernel_calls = window_kernel_module._window_fwd, []
    monkeypatch.setattr(
        window_kernel_module, "_window_fwd", lambda *args: kernel_calls.append(1) or forward_kernel(*args)
    )
    ids = torch.randint(0, 1024, (2, 257), device="cuda")
    results = {}
    for implementation in ("triton", "torch"):
        model = random_model(implementation)
        model(ids, labels=ids).loss.backward()  # with gradients the window layers run FlexAttention
        with torch.no_grad():  # without, windowed attention's own forward kernel
            logits = model(ids).logits
        results[implementation] = logits, {name: p.grad for name, p in model.named_parameters()}
    sliding_layers = model.config.layer_types.count("sliding_attention")
    assert len(kernel_calls) == sliding_layers, "the window layers did not run windowed attention's forward kernel"
    assert relative_error(results["triton"][0], results["torch"][0]) <= FLOAT32_TOLERANCE
    for name, grad in results["torch"][1].items():
        assert relative_error(results["triton"][1][name], grad) <= FLOAT32_TOLERANCE, name


@torch.no_grad()
def test_continuation_from_the_cache_and_decode_kernels_match_one_forward():
    model = random_model("triton")
    ids = torch.randint(0, 1024, (2, 300), device="cuda")
    full = model(ids).logits
    first = model(ids[:, :137], cache=DynamicCache(config=model.config), use_cache=True)
    second = model(ids[:, 137:250], cache=first.cache, use_cache=True)
    steps = [model(ids[:, t : t + 1], cache=second.cache, use_cache=True).logits for t in range(250, 300)]
    continued = torch.cat([first.logits, second.logits, *steps], dim=1)
    assert relative_error(continued, full) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("gradients", [False, True])
def test_packed_documents_match_the_documents_run_separately(gradients, monkeypatch):
    """Packed rows run the window layers in flex with the documents' block mask, with and without gradients: the
    logits, and the gradients of a random projection of them, are the documents' run one by one."""
    document_masks, document_mask = [], window_kernel_module._document_block_mask
    monkeypatch.setattr(
        window_kernel_module, "_document_block_mask", lambda *args: document_masks.append(1) or document_mask(*args)
    )
    model = random_model("triton")
    documents = [torch.randint(0, 1024, (1, n), device="cuda") for n in (70, 150, 33)]
    position_ids = torch.cat([torch.arange(d.shape[1], device="cuda") for d in documents])[None]
    with torch.set_grad_enabled(gradients):
        packed = model(torch.cat(documents, dim=1), position_ids=position_ids, use_cache=False).logits
        separate = torch.cat([model(d, use_cache=False).logits for d in documents], dim=1)
    assert len(document_masks) == model.config.layer_types.count("sliding_attention")
    assert relative_error(packed, separate) <= FLOAT32_TOLERANCE
    if gradients:
        projection, parameters = torch.randn_like(packed), list(model.parameters())
        packed_grads = torch.autograd.grad((packed * projection).sum(), parameters)
        separate_grads = torch.autograd.grad((separate * projection).sum(), parameters)
        for name, got, expected in zip(dict(model.named_parameters()), packed_grads, separate_grads):
            assert relative_error(got, expected) <= FLOAT32_TOLERANCE, name


def test_padded_rows_without_a_cache_match_transformers_masks(monkeypatch):
    """Padded rows (left and middle pads) without a cache run the window layers in flex with each pad a document of
    its own: the logits at real tokens, and the gradients of a random projection of them, are those of
    transformers' masks (attn_implementation="sdpa")."""
    document_masks, document_mask = [], window_kernel_module._document_block_mask
    monkeypatch.setattr(
        window_kernel_module, "_document_block_mask", lambda *args: document_masks.append(1) or document_mask(*args)
    )
    mask = torch.ones(2, 300, dtype=torch.long, device="cuda")
    mask[0, :40], mask[1, 100:130] = 0, 0
    ids = torch.randint(1, 1024, (2, 300), device="cuda") * mask
    torch.manual_seed(1)
    projection = None
    results = []
    for implementation in ("samba_sdpa", "sdpa"):
        model = random_model("triton")
        model.set_attn_implementation(implementation)
        logits = model(ids, attention_mask=mask, use_cache=False).logits * mask[..., None]
        projection = torch.randn_like(logits) if projection is None else projection
        results.append((logits, torch.autograd.grad((logits * projection).sum(), list(model.parameters()))))
    assert len(document_masks) == model.config.layer_types.count("sliding_attention")
    (logits, grads), (expected_logits, expected_grads) = results
    assert relative_error(logits, expected_logits) <= FLOAT32_TOLERANCE
    for name, got, expected in zip(dict(model.named_parameters()), grads, expected_grads):
        assert relative_error(got, expected) <= FLOAT32_TOLERANCE, name


@pytest.mark.parametrize("module", ["in_proj", "x_proj", "dt_proj", "out_proj"])
@torch.no_grad()
def test_lora_on_a_mamba_projection_applies_on_the_kernel_path(module):
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, 1024, (1, 80), device="cuda")
    outputs = {}
    for implementation in ("triton", "torch"):
        model = random_model(implementation)
        base = model(ids).logits
        torch.manual_seed(1)  # the same adapter weights for both
        adapted = get_peft_model(model, LoraConfig(target_modules=[module], r=4, init_lora_weights=False))
        outputs[implementation] = base, adapted(ids).logits
    assert relative_error(outputs["triton"][1], outputs["torch"][1]) <= FLOAT32_TOLERANCE
    # The adapter changes the output (measured: 2e-3 relative for dt_proj, 0.06 to 1.3 for the others).
    assert relative_error(outputs["triton"][1], outputs["triton"][0]) > 1e-4


@pytest.mark.parametrize("implementation, batch", [("auto", 2), ("triton", 2), ("auto", 1)])
@torch.no_grad()
def test_static_cache_generate_gives_the_dynamic_cache_tokens(implementation, batch):
    """transformers compiles the static-cache decode step (CUDA graphs, ring-buffer window cache); "triton" forces
    the Triton decode kernels into it; at batch 1 its products take the one-row kernels. Float32, so that greedy
    choices are comparable across the two paths."""
    model = random_model(implementation)
    eager = {"decode_engine": False} if generate_takes_decode_engine(model) else {}
    prompt = torch.randint(0, 1024, (batch, 100), device="cuda")
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False, pad_token_id=0, **eager)
    dynamic = model.generate(prompt, **options)
    static = model.generate(prompt, cache_implementation="static", **options)
    assert torch.equal(static, dynamic), f"{(static == dynamic).float().mean().item():.1%} of the tokens equal"


@pytest.mark.parametrize("packed", [True, False])
def test_compiled_training_step_matches_the_eager_step(packed, monkeypatch):
    """torch.compile(model, fullgraph=True) with the Triton kernels as custom ops; unpacked, the window layers
    trace the fused window kernel (FlexAttention) into the graph. Without a cache, as training runs: with one,
    the masks never looked for packed rows, and a compiled step without it took a full-length masked sdpa."""
    ids = torch.randint(0, 1024, (1, 300), device="cuda")
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in (120, 180)])[None] if packed else None
    window_kernel, window_calls = samba_kernels.windowed_attention, []
    monkeypatch.setattr(
        samba_kernels,
        "windowed_attention",
        lambda *args, **kwargs: window_calls.append(1) or window_kernel(*args, **kwargs),
    )
    results = []
    for compiled in (False, True):
        window_calls.clear()
        model = random_model("triton")
        run = torch.compile(model, fullgraph=True) if compiled else model
        loss = run(ids, labels=ids, position_ids=position_ids, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    assert relative_error(loss, eager_loss) <= FLOAT32_TOLERANCE
    for name, grad in grads.items():
        assert relative_error(grad, eager_grads[name]) <= FLOAT32_TOLERANCE, name
    if not packed:
        assert window_calls, "the compiled step did not trace the fused window kernel"
