"""The common model tests, in the spirit of transformers' ModelTesterMixin and GenerationTesterMixin: every
model class saved and loaded, in half precision, with its outputs, caches, padding, training, embeddings and
pipelines. Each result is compared against an independent reference (a full forward without a cache, each row
run alone, the embedding looked up by hand, the loss written out), never against an earlier output of the code.

The contracts of transformers and its ecosystem that Samba must keep (the deprecated `past_key_values=` name,
packed documents, padding, chunked prefill, quantization, fp32 parameters, static cache sizes, RoPE types,
padding-free training, clear errors) are tested in test_contracts.py. Tests of the common suite that do not
apply to Samba are listed in NOT_APPLICABLE, each with its reason."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    pipeline,
)

from samba_hf import SambaConfig, SambaForCausalLM, SambaForSequenceClassification, SambaModel
from samba_hf.demo import train_tokenizer

from .helpers import fp32_rule_breaks, left_padded, main_output, random_ids, small_config, small_model

WINDOW = 8  # small_config's sliding window
BATCH, LENGTH = 2, 2 * WINDOW + 3  # past the window, so that sliding-window layers drop keys
VOCAB = 97
ALL_MODEL_CLASSES = (SambaModel, SambaForCausalLM, SambaForSequenceClassification)
AUTO_CLASSES = {
    SambaModel: AutoModel,
    SambaForCausalLM: AutoModelForCausalLM,
    SambaForSequenceClassification: AutoModelForSequenceClassification,
}
# Mamba, sliding-window and full attention, and an MLP-only mixer: every kind of layer a Samba can have.
EVERY_LAYER_TYPE = ["linear_attention", "sliding_attention", "full_attention", "mlp"]
# Same function, other summation order: logits of magnitude ~5 agree to a few 1e-6 relative in fp32.
FP32 = dict(rtol=1e-4, atol=5e-5)
GREEDY = dict(do_sample=False, pad_token_id=0)

NOT_APPLICABLE = {
    "test_initialization": "Samba's linear layers take PyTorch's default init, as the reference code does, so "
    "zeroing initializer_range does not zero them; test_modeling checks the Mamba init",
    "test_torchscript": "removed from transformers 5; torch.compile is tested in test_generation and test_training",
    "test_headmasking / test_head_pruning": "removed from transformers 5; Mamba layers have no heads to mask",
    "test_feed_forward_chunking": "Samba has no chunk_size_feed_forward; long inputs are chunked by prefill instead",
    "test_resize_position_vector_embeddings": "RoPE has no position table to resize; the window bounds attention",
    "test_sliding_window_mask": "needs config.use_sliding_window; Samba sets the window per layer in layer_types, "
    "checked by test_attention_outputs_cover_only_attention_layers",
    "test_custom_4d_attention_mask": "a 4D mask cannot say which tokens are padding to the Mamba layers, which need "
    "the 2D mask",
    "test_assisted_decoding / test_prompt_lookup_decoding / test_dola_decoding": "a recurrent state cannot be "
    "rolled back to drop rejected draft tokens; generate() refuses it (test_generation)",
    "test_contrastive_generate": "moved out of transformers 5 to the Hub, and needs a cache that can be cropped",
    "test_generate_with_quant_cache": "a quantized cache quantizes keys and values only, not conv and SSM states",
    "test_flash_attn_* / test_sdpa_can_dispatch_on_flash / test_eager_matches_fa*_generate": "need a CUDA GPU; the "
    "GPU benchmarks check flash attention",
    "test_model_parallelism / test_cpu_offload / test_disk_offload_bin": "need GPUs; "
    "test_device_map_auto_offloads_to_disk_exactly covers offloading on the CPU",
    "activation checkpointing with offload=True": "pins CPU memory, which needs a GPU",
    "test_torch_compile_for_training / test_sdpa_can_compile_dynamic": "slow, GPU-marked in transformers; compiled "
    "training and decoding are tested in test_training and test_generation",
    "test_tp_plan_matches_params / test_tied_weights_are_sharded_together": "Samba defines no tensor-parallel plan",
    "test_encoder_decoder_* / multimodal / get_*_features / moe / router logits": "Samba is a decoder-only text "
    "model without experts",
    "test_eager_matches_sdpa_inference": "test_modeling compares eager, sdpa and flex against an explicit mask",
}


@pytest.mark.parametrize("name", NOT_APPLICABLE)
def test_not_applicable(name):
    pytest.skip(NOT_APPLICABLE[name])


def build(model_class=SambaForCausalLM, seed: int = 0, **overrides):
    """A small random model of `model_class` (pad token 0, three labels for classification)."""
    return small_model(seed, model_class=model_class, **{"pad_token_id": 0, "num_labels": 3, **overrides})


def greedy_by_full_forwards(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding that reruns the whole sequence every step, without a cache: the sequences and the
    logits of each new token."""
    sequence, step_logits = prompt, []
    with torch.no_grad():
        for _ in range(steps):
            last = model(sequence, use_cache=False).logits[:, -1]
            step_logits.append(last)
            sequence = torch.cat([sequence, last.argmax(-1, keepdim=True)], dim=1)
    return sequence, torch.stack(step_logits, dim=1)


# ----------------------------------------------------------------------------------------- save and load


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_save_load_round_trip(model_class, tmp_path):
    model = build(model_class)
    inputs = dict(input_ids=random_ids())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "generation_config.json").exists() == model.can_generate()
    for load in (model_class.from_pretrained, AUTO_CLASSES[model_class].from_pretrained):
        loaded = load(tmp_path).eval()
        assert type(loaded) is model_class
        assert torch.equal(main_output(loaded, **inputs), main_output(model, **inputs))
    # from_pretrained adds config fields that a second round trip must read back.
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(
        main_output(model_class.from_pretrained(tmp_path / "again").eval(), **inputs), main_output(model, **inputs)
    )


def test_from_pretrained_takes_a_state_dict_without_a_checkpoint():
    model = build()
    loaded = SambaForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def storage_groups(model) -> list[set[str]]:
    """Names of the state-dict tensors that share storage, by group of two or more."""
    groups = {}
    for name, tensor in model.state_dict().items():
        groups.setdefault(tensor.untyped_storage().data_ptr(), set()).add(name)
    return [names for names in groups.values() if len(names) > 1]


def test_safetensors_keep_tied_weights_tied(tmp_path):
    model = build()
    assert storage_groups(model) == [{"lm_head.weight", "model.embed_tokens.weight"}]
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as saved:
        assert "model.embed_tokens.weight" in saved.keys() and "lm_head.weight" not in saved.keys()
    loaded, info = SambaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert storage_groups(loaded) == [{"lm_head.weight", "model.embed_tokens.weight"}]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_tied_weights_keys_name_every_shared_tensor():
    model = build()
    for names in storage_groups(model):
        untied = names - set(model._tied_weights_keys)
        assert len(untied) == 1, f"{names} share storage but _tied_weights_keys names only {names - untied}"


def test_untied_embeddings_save_and_load_separately(tmp_path):
    model = build(tie_word_embeddings=False)
    assert storage_groups(model) == []
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as saved:
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(saved.keys())
    loaded, info = SambaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and storage_groups(loaded) == []
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_a_checkpoint_without_weights_reports_every_parameter_missing(tmp_path):
    from safetensors.torch import save_file

    model = build()
    model.save_pretrained(tmp_path)
    save_file({"unrelated": torch.zeros(2)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = SambaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    # Every weight is reported, the tied head perhaps through its source only; no other key.
    weights = set(loaded.state_dict())
    assert weights - {"lm_head.weight"} <= set(info["missing_keys"]) <= weights


# ----------------------------------------------------------------------------------------- dtype rules


def test_fp32_modules_named_in_keep_in_fp32_modules_strict_exist():
    names = SambaForCausalLM(small_config()).state_dict().keys()
    for pattern in SambaForCausalLM._keep_in_fp32_modules_strict:
        assert any(name.endswith("." + pattern) for name in names), pattern


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_from_pretrained_in_half_precision_keeps_the_ssm_parameters_in_fp32(half, tmp_path):
    """Building a model in half precision from a config is in test_contracts (issue of `D`)."""
    build().save_pretrained(tmp_path)
    loaded = SambaForCausalLM.from_pretrained(tmp_path, dtype=half)
    assert fp32_rule_breaks(loaded, half) == {}
    assert torch.isfinite(main_output(loaded, input_ids=random_ids())).all()


# ------------------------------------------------------------------------------------ keywords and outputs


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_an_unknown_keyword_is_refused_or_changes_nothing(model_class):
    """An unknown keyword may be refused; if it is accepted, it must not change the result."""
    model, ids = build(model_class), random_ids()
    try:
        with_keyword = main_output(model, input_ids=ids, a_keyword_no_model_knows=torch.ones(1))
    except (TypeError, ValueError):
        return
    assert torch.equal(with_keyword, main_output(model, input_ids=ids))


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_determinism(model_class):
    model, ids = build(model_class), random_ids()
    assert torch.equal(main_output(model, input_ids=ids), main_output(model, input_ids=ids))


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_tuple_outputs_equal_dict_outputs(model_class):
    model, ids = build(model_class), random_ids()
    with torch.no_grad():
        as_dict = model(ids, output_hidden_states=True)
        as_tuple = model(ids, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict[0])
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[-1], as_dict.hidden_states))


@pytest.mark.parametrize("through", ["argument", "config"])
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_hidden_states_output(model_class, through):
    model, ids = build(model_class), random_ids()
    if through == "config":
        model.config.output_hidden_states = True
    with torch.no_grad():
        outputs = model(ids, **({"output_hidden_states": True} if through == "argument" else {}))
        last_hidden_state = model.base_model(ids).last_hidden_state
    hidden_states = outputs.hidden_states
    assert len(hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (BATCH, LENGTH, model.config.hidden_size) for h in hidden_states)
    torch.testing.assert_close(hidden_states[0], model.get_input_embeddings().weight[ids])  # the embeddings
    torch.testing.assert_close(hidden_states[-1], last_hidden_state)  # after the final norm


@pytest.mark.parametrize("through", ["argument", "config"])
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_attention_outputs_cover_only_attention_layers(model_class, through):
    """One attention map per attention layer (none for Mamba or MLP mixers), of shape (batch, heads, L, L);
    a sliding-window layer's map is zero outside its window, a full-attention layer's only above the diagonal."""
    model = build(model_class, layer_types=EVERY_LAYER_TYPE)
    model.set_attn_implementation("eager")
    if through == "config":
        model.config.output_attentions = True
    with torch.no_grad():
        attentions = model(random_ids(), **({"output_attentions": True} if through == "argument" else {})).attentions
    attention_types = [t for t in EVERY_LAYER_TYPE if t.endswith("attention") and t != "linear_attention"]
    assert len(attentions) == len(attention_types)
    query, key = torch.arange(LENGTH)[:, None], torch.arange(LENGTH)[None, :]
    for weights, layer_type in zip(attentions, attention_types):
        assert weights.shape == (BATCH, model.config.num_attention_heads, LENGTH, LENGTH)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        visible = (key <= query) & ((query - key < WINDOW) if layer_type == "sliding_attention" else True)
        assert (weights[..., ~visible] == 0).all() and (weights[..., visible] > 0).all(), layer_type


def test_hidden_states_and_attentions_retain_their_gradients():
    model = build(layer_types=EVERY_LAYER_TYPE)
    model.set_attn_implementation("eager")
    outputs = model(random_ids(), output_hidden_states=True, output_attentions=True)
    hidden_states, attentions = outputs.hidden_states[0], outputs.attentions[0]
    hidden_states.retain_grad()
    attentions.retain_grad()
    outputs.logits.flatten()[0].backward()
    assert hidden_states.grad is not None and hidden_states.grad.abs().sum() > 0
    assert attentions.grad is not None and attentions.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- inputs_embeds


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_inputs_embeds_match_input_ids(model_class):
    model, ids = build(model_class), random_ids()
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(main_output(model, inputs_embeds=embeds), main_output(model, input_ids=ids))


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_from_inputs_embeds(cache_implementation):
    """From embeddings alone generate returns the new tokens only; they are those of the same prompt as ids."""
    model, prompt = build(), random_ids(length=WINDOW + 3)
    kwargs = dict(max_new_tokens=WINDOW, cache_implementation=cache_implementation, **GREEDY)
    with torch.no_grad():
        from_ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        from_embeds = model.generate(
            inputs_embeds=model.get_input_embeddings()(prompt), attention_mask=torch.ones_like(prompt), **kwargs
        )
    assert torch.equal(from_embeds, from_ids[:, prompt.shape[1] :])


def test_get_and_set_input_embeddings():
    model = build()
    replacement = torch.nn.Embedding(VOCAB, model.config.hidden_size)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement and model.model.embed_tokens is replacement


# ------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_generate_equals_full_forward_recomputation(cache_implementation):
    """The tokens and the logits of each step, against greedy decoding rerunning the whole sequence."""
    model, prompt = build(), random_ids(length=WINDOW + 3)
    steps = 2 * WINDOW
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=steps,
            cache_implementation=cache_implementation,
            return_dict_in_generate=True,
            output_logits=True,
            output_scores=True,
            **GREEDY,
        )
    sequences, step_logits = greedy_by_full_forwards(model, prompt, steps)
    assert torch.equal(out.sequences, sequences)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), step_logits, **FP32)
    torch.testing.assert_close(torch.stack(out.scores, dim=1), step_logits, **FP32)  # greedy: no processors


def test_generate_returns_attentions_and_hidden_states_of_every_step():
    """Dynamic cache: the prompt's maps are (P, P); each decode step's (1, keys kept + itself), at most the
    window. The static cache's shapes are in test_contracts."""
    model, prompt = build(layer_types=EVERY_LAYER_TYPE), random_ids(length=5)
    model.set_attn_implementation("eager")
    steps = 2 * WINDOW
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=steps,
            return_dict_in_generate=True,
            output_attentions=True,
            output_hidden_states=True,
            **GREEDY,
        )
    heads, hidden = model.config.num_attention_heads, model.config.hidden_size
    assert len(out.attentions) == len(out.hidden_states) == steps
    for step, (attentions, hidden_states) in enumerate(zip(out.attentions, out.hidden_states)):
        queries = prompt.shape[1] if step == 0 else 1
        seen = prompt.shape[1] + step  # tokens up to and including this step's
        assert len(hidden_states) == model.config.num_hidden_layers + 1
        assert all(h.shape == (BATCH, queries, hidden) for h in hidden_states)
        sliding, full = attentions
        assert sliding.shape == (BATCH, heads, queries, min(seen, WINDOW) if step else seen)
        assert full.shape == (BATCH, heads, queries, seen)


def test_cache_keeps_fixed_size_states_and_a_window_of_keys():
    model = build()
    config = model.config
    for length in (3, WINDOW, 3 * WINDOW):
        cache = DynamicCache(config=config)
        with torch.no_grad():
            model(random_ids(length=length), cache=cache, use_cache=True)
        assert cache.get_seq_length() == length
        for layer_idx, layer_type in enumerate(config.layer_types):
            if layer_type == "linear_attention":
                ssm_state, conv_state = cache.get_recurrent_state(layer_idx), cache.get_conv_state(layer_idx)
                assert ssm_state.shape == (BATCH, config.mamba_intermediate_size, config.state_size)
                assert conv_state.shape == (BATCH, config.mamba_intermediate_size, config.conv_kernel - 1)
            else:  # transformers' sliding layers keep the window's last W - 1 keys (the next token is the W-th)
                keys = cache.layers[layer_idx].keys
                assert keys.shape == (BATCH, config.num_key_value_heads, min(length, WINDOW - 1), config.head_dim)


def test_generate_continues_from_its_returned_cache():
    model, prompt = build(), random_ids(length=5)
    kwargs = dict(return_dict_in_generate=True, **GREEDY)
    with torch.no_grad():
        first = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, **kwargs)
        continued = model.generate(
            first.sequences,
            attention_mask=torch.ones_like(first.sequences),
            cache=first.cache,
            max_new_tokens=2 * WINDOW,
            **kwargs,
        )
        at_once = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2 * WINDOW + 4, **kwargs
        )
    assert torch.equal(continued.sequences, at_once.sequences)


def test_logits_to_keep_keeps_the_last_positions():
    model, ids = build(), random_ids()
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:], **FP32)
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, full[:, -3:], **FP32)


# ---------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES)
def test_batching_equivalence(model_class):
    model, ids = build(model_class), random_ids(batch=3)
    torch.testing.assert_close(main_output(model, input_ids=ids)[:1], main_output(model, input_ids=ids[:1]), **FP32)


@pytest.mark.parametrize("model_class", [SambaForCausalLM, SambaForSequenceClassification])
def test_left_padded_rows_equal_each_row_alone(model_class):
    """transformers' test_left_padding_compatibility, with rows of three lengths (one past the window)."""
    model = build(model_class)
    rows = [random_ids(1, n, seed=n)[0] for n in (LENGTH, 4, WINDOW + 1)]
    ids, mask = left_padded(rows)
    batched = main_output(model, input_ids=ids, attention_mask=mask)
    for row_idx, row in enumerate(rows):
        alone = main_output(model, input_ids=row[None])[0]
        # The LM gives logits at every real position, the classifier one row of class logits.
        got = batched[row_idx, -len(row) :] if model_class is SambaForCausalLM else batched[row_idx]
        torch.testing.assert_close(got, alone, **FP32)


# --------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("model_class", [SambaForCausalLM, SambaForSequenceClassification])
def test_training_reaches_every_parameter_and_lowers_the_loss(model_class):
    torch.manual_seed(0)
    model = model_class(small_config(pad_token_id=0, num_labels=3)).train()
    ids = random_ids()
    labels = ids if model_class is SambaForCausalLM else torch.tensor([0, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(5):
        optimizer.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        if step == 0:
            for name, parameter in model.named_parameters():
                assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_causal_lm_loss_is_the_mean_cross_entropy_of_the_next_tokens():
    model, ids = build(), random_ids()
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        output = model(ids, labels=labels)
    expected = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)
    # Pre-shifted targets (sequence parallelism) replace the labels.
    shift_labels = random_ids(seed=1)
    with torch.no_grad():
        shifted_loss = model(ids, labels=labels, shift_labels=shift_labels).loss
    torch.testing.assert_close(shifted_loss, F.cross_entropy(output.logits.flatten(0, 1), shift_labels.flatten()))


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification", "regression"])
def test_sequence_classification_losses(problem_type):
    num_labels = 1 if problem_type == "regression" else 3
    model = build(SambaForSequenceClassification, num_labels=num_labels, problem_type=problem_type)
    ids = random_ids()
    labels = {
        "single_label_classification": torch.tensor([0, 2]),
        "multi_label_classification": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        "regression": torch.tensor([0.5, -1.5]),
    }[problem_type]
    with torch.no_grad():
        output = model(ids, labels=labels)
    logits = output.logits
    assert logits.shape == (BATCH, num_labels)
    expected = {
        "single_label_classification": lambda: F.cross_entropy(logits, labels),
        "multi_label_classification": lambda: F.binary_cross_entropy_with_logits(logits, labels),
        "regression": lambda: F.mse_loss(logits.squeeze(-1), labels),
    }[problem_type]()
    torch.testing.assert_close(output.loss, expected)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"activation_checkpointing_kwargs": {"use_reentrant": False}},
        {"activation_checkpointing_kwargs": {"use_reentrant": True}},
        {"every_n_layers": 2},
    ],
    ids=["default", "non-reentrant", "reentrant", "every-2nd-layer"],
)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(options):
    model, ids = build().train(), random_ids()

    def loss_and_gradients():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    plain_loss, plain = loss_and_gradients()
    model.activation_checkpointing_enable(**options)
    assert model.is_activation_checkpointing
    checkpointed_loss, checkpointed = loss_and_gradients()
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=0, atol=0)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_enable_input_require_grads_makes_the_embeddings_require_gradients():
    model = build()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.enable_input_require_grads()
    assert model(random_ids(), output_hidden_states=True).hidden_states[0].requires_grad


# ------------------------------------------------------------------------------------- embedding resizes


def test_resize_token_embeddings_keeps_the_head_tied():
    model, ids = build(), random_ids()
    original = model.get_input_embeddings().weight.detach().clone()
    for new_size in (VOCAB + 10, VOCAB - 15):
        embeddings = model.resize_token_embeddings(new_size)
        assert type(embeddings) is torch.nn.Embedding and embeddings.weight.shape == (new_size, 32)
        assert model.config.vocab_size == new_size and model.lm_head.weight.shape == (new_size, 32)
        assert model.lm_head.weight.data_ptr() == embeddings.weight.data_ptr()
        kept = min(new_size, VOCAB)
        assert torch.equal(embeddings.weight[:kept], original[:kept])
        with torch.no_grad():
            logits = model(ids.clamp(max=new_size - 1)).logits
        assert logits.shape == (BATCH, LENGTH, new_size)
    assert model.resize_token_embeddings(VOCAB + 13, pad_to_multiple_of=64).weight.shape[0] == 128


def test_resize_token_embeddings_of_an_untied_head():
    model = build(tie_word_embeddings=False)
    head = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 10)
    assert model.lm_head.weight.shape == (VOCAB + 10, 32)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight[:VOCAB], head)


# ------------------------------------------------------------------------------------------- pipelines

DOCUMENTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Open file and return a corresponding file object.",
    "Return the number of items in a container.",
]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_tokenizer(DOCUMENTS * 4, vocab_size=300)
    tokenizer.padding_side = "left"
    return tokenizer


def pipeline_model(model_class, tokenizer):
    return build(model_class, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)


def test_text_generation_pipeline_greedy_equals_full_forward_recomputation(tokenizer):
    model = pipeline_model(SambaForCausalLM, tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["Return a new list", "Open the file and return a corresponding"]
    outputs = generator(prompts, max_new_tokens=6, do_sample=False, batch_size=2)  # left-padded batch
    for prompt, output in zip(prompts, outputs):
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        sequence, _ = greedy_by_full_forwards(model, prompt_ids, 6)
        expected = tokenizer.decode(sequence[0], skip_special_tokens=True)
        assert output[0]["generated_text"] == expected


def test_feature_extraction_pipeline_returns_the_last_hidden_states(tokenizer):
    model = pipeline_model(SambaModel, tokenizer)
    text = DOCUMENTS[0]
    features = torch.tensor(pipeline("feature-extraction", model=model, tokenizer=tokenizer)(text))
    ids = tokenizer(text, return_tensors="pt").input_ids
    torch.testing.assert_close(features, main_output(model, input_ids=ids))


def test_text_classification_pipeline_scores_are_the_softmax_of_the_logits(tokenizer):
    model = pipeline_model(SambaForSequenceClassification, tokenizer)
    text = DOCUMENTS[1]
    (scores,) = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)([text])
    probabilities = main_output(model, input_ids=tokenizer(text, return_tensors="pt").input_ids).softmax(-1)[0]
    for score in scores:
        assert score["score"] == pytest.approx(probabilities[model.config.label2id[score["label"]]].item(), rel=1e-5)


# ---------------------------------------------------------------------------------- devices and loading


def test_device_map_auto_offloads_to_disk_exactly(tmp_path):
    """On a machine without GPUs, device_map="auto" with a small CPU budget offloads the last layers to disk
    (accelerate's hooks bring each weight in when its module runs): the logits of the model in memory."""
    from accelerate.utils import compute_module_sizes

    model, ids = build(), random_ids()
    model.save_pretrained(tmp_path / "model")
    budget = int(compute_module_sizes(model)[""] * 0.6)
    offloaded = SambaForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload"
    )
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}
    torch.testing.assert_close(main_output(offloaded, input_ids=ids), main_output(model, input_ids=ids), **FP32)


def test_a_model_can_be_built_on_the_meta_device():
    with torch.device("meta"):
        model = SambaForCausalLM(small_config())
    assert all(parameter.is_meta for parameter in model.parameters())


def test_config_round_trips_through_a_dict():
    config = small_config(layer_types=EVERY_LAYER_TYPE, use_mlp=[True, False, True, False])
    again = SambaConfig.from_dict(copy.deepcopy(config.to_dict()))
    assert again.to_dict() == config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a round trip must not warn about unknown fields
        SambaConfig(**config.to_diff_dict())
