"""Contracts of transformers and its ecosystem that Samba keeps, each against an independent reference: the
full forward without a cache, each row run alone without its padding, each packed document run alone,
transformers' own conventions (deprecated keyword names, static cache sizes, RoPE types, quantization,
fp32 parameters), TRL's padding-free batches, and clear errors for bad inputs. A path that cannot be exact
must raise, never return a different result."""

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, DynamicCache

from samba_hf import SambaForCausalLM, SambaForSequenceClassification, SambaModel
from samba_hf.demo import train_tokenizer
from samba_hf.generation import chunked_forward

from .helpers import (
    fp32_rule_breaks,
    left_padded,
    load_quantized,
    main_output,
    random_ids,
    small_config,
    small_model,
)

WINDOW = 8  # small_config's sliding window
FP32 = dict(rtol=1e-4, atol=5e-5)
MAMBA_ONLY = ["linear_attention"] * 4
EVERY_LAYER_TYPE = ["linear_attention", "sliding_attention", "full_attention", "mlp"]
# Padding tests compare each row against the row run alone. A window counts cache slots, pads included, so
# a window longer than the rows keeps the two comparable; the window itself is tested in test_modeling.
LONG_WINDOW = 64


def assert_rows_equal_each_row_alone(model, logits, rows, mask):
    """`logits` (batch, n) of the last n positions of a padded batch: at each real position, the logits of the
    row's real tokens run alone, in one forward without a cache."""
    n = logits.shape[1]
    for row_idx, row in enumerate(rows):
        real = mask[row_idx, -n:].bool()
        alone = main_output(model, input_ids=row[None], use_cache=False)[0]
        torch.testing.assert_close(logits[row_idx, real], alone[-int(real.sum()) :], **FP32)


# ------------------------------------------------------------------ the cache keyword and its old names


def continued_through(model, keyword: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill a cache with the first tokens, then continue from it passed as `keyword`: the continuation's first
    output, and that of the same positions in one forward without a cache."""
    ids, split = random_ids(), WINDOW + 3
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :split], cache=cache, use_cache=True)
        continued = model(ids[:, split:], use_cache=True, **{keyword: cache})[0]
    return continued, main_output(model, input_ids=ids)[:, split:]


@pytest.mark.parametrize(
    "found, refused",
    [
        ("5.23.0", False),
        ("5.24.0", False),
        ("5.25.0", False),
        ("5.25.1rc1", False),
        ("5.26.0.dev0", True),
        ("5.26.0", True),
        ("6.0.0", True),
    ],
)
def test_an_untested_transformers_is_refused_at_import(found, refused):
    from samba_hf.modeling_samba import check_transformers_version

    if refused:
        with pytest.raises(ImportError, match=rf"found {found}\): .*pip install 'transformers>=5.23,<5.26'"):
            check_transformers_version(found)
    else:
        check_transformers_version(found)


@pytest.mark.parametrize("model_class", [SambaModel, SambaForCausalLM])
def test_past_key_values_is_a_deprecated_name_of_cache(model_class):
    """transformers' models take `past_key_values=` until 5.40 with a FutureWarning, as PEFT still passes it."""
    with pytest.warns(FutureWarning, match="past_key_values"):
        continued, expected = continued_through(small_model(model_class=model_class), "past_key_values")
    torch.testing.assert_close(continued, expected, **FP32)


def test_a_cache_under_mambas_keyword_is_used_or_refused():
    """transformers names the cache of Mamba models `cache_params`; a Mamba-only Samba must not ignore it."""
    try:
        continued, expected = continued_through(small_model(layer_types=MAMBA_ONLY), "cache_params")
    except (TypeError, ValueError):
        return
    torch.testing.assert_close(continued, expected, **FP32)


# --------------------------------------------------------------------------------------------- padding


def test_packed_documents_longer_than_a_prefill_chunk_stay_separate():
    """Eval, no labels, position_ids restarting, longer than one prefill chunk: the documents run alone."""
    model = small_model(prefill_chunk_size=16)
    documents = [random_ids(1, n, seed=n) for n in (13, 11)]
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in documents])[None]
    packed = main_output(model, input_ids=torch.cat(documents, dim=1), position_ids=position_ids)
    separate = torch.cat([main_output(model, input_ids=d) for d in documents], dim=1)
    torch.testing.assert_close(packed, separate, **FP32)


def test_a_document_starting_where_the_cache_ends_is_refused_like_one_inside_the_row():
    """Position ids that restart at 0 right after cached tokens start a new document, which cannot continue the
    cache: refused, as a restart inside the row is, whether the call continues a cache itself or is a chunk of
    generate's prefill that ends where a document begins."""
    model = small_model()
    with torch.no_grad():
        cache = model(random_ids(1, 13, seed=13), use_cache=True).cache
        with pytest.raises(ValueError, match="cannot continue a cache"):
            model(random_ids(1, 11, seed=11), position_ids=torch.arange(11)[None], cache=cache)

    chunked = small_model(prefill_chunk_size=16)
    ids = random_ids(1, 25, seed=2)
    for first_document in (16, 14):  # the second starts at the chunk boundary, then inside the second chunk
        position_ids = torch.cat([torch.arange(first_document), torch.arange(25 - first_document)])[None]
        with pytest.raises(ValueError, match="cannot continue a cache"):
            chunked.generate(ids, position_ids=position_ids, max_new_tokens=2, do_sample=False)


def test_right_padding_is_refused_or_its_cache_continues_exactly():
    """A right-padded batch filling the cache the forward builds itself (no cache passed in): refused with a
    ValueError, as README promises, or else continuing from that cache gives each row's own logits."""
    model = small_model(sliding_window=LONG_WINDOW)
    rows = [random_ids(1, n, seed=n)[0] for n in (WINDOW + 3, 5)]
    width = max(len(row) for row in rows)
    ids = torch.stack([F.pad(row, (0, width - len(row))) for row in rows])
    mask = torch.stack([F.pad(torch.ones_like(row), (0, width - len(row))) for row in rows])
    try:
        with torch.no_grad():
            cache = model(ids, attention_mask=mask).cache
    except ValueError as error:
        assert "padding" in str(error)
        return
    following = random_ids(2, 4, seed=1)
    step_logits = []
    with torch.no_grad():
        for token in following.split(1, dim=1):  # decode steps after the pads, as a chat turn would
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            position_ids = mask.sum(-1, keepdim=True) - 1
            step_logits.append(model(token, attention_mask=mask, position_ids=position_ids, cache=cache).logits)
    assert_rows_equal_each_row_alone(
        model,
        torch.cat(step_logits, dim=1),
        [torch.cat([row, next_ids]) for row, next_ids in zip(rows, following)],
        mask,
    )


def test_a_mamba_only_model_continues_left_padded_rows_in_chunks():
    """A cache of Mamba layers alone does not count tokens: the chunks of generate's prefill cut the 2D mask
    from its end, so each chunk of a continuation gets its own padding."""
    model = small_model(layer_types=MAMBA_ONLY)
    rows = [random_ids(1, n, seed=n)[0] for n in (6, 3)]
    prompt, mask = left_padded(rows)
    following = random_ids(2, 9, seed=1)  # longer than a chunk
    full_mask = torch.cat([mask, torch.ones_like(following)], dim=1)
    with torch.no_grad():
        first = model(prompt, attention_mask=mask, use_cache=True)
        second = chunked_forward(
            model, dict(input_ids=following, attention_mask=full_mask, cache=first.cache, use_cache=True), chunk_size=4
        )
    assert_rows_equal_each_row_alone(model, first.logits, rows, mask)
    assert_rows_equal_each_row_alone(
        model, second.logits, [torch.cat([row, next_ids]) for row, next_ids in zip(rows, following)], full_mask
    )


def test_padding_in_the_middle_of_a_continued_batch():
    """transformers' test_recurrent_layers_mask_padding_on_continued_forward: a second turn with its own
    padding, continued from the first turn's cache. Padded positions leave the conv and SSM states untouched
    and are hidden from attention: each row gives the logits of its real tokens run alone, and the last
    position those of one forward over both turns."""
    model = small_model(layer_types=EVERY_LAYER_TYPE, sliding_window=LONG_WINDOW)
    first_turn, second_turn = random_ids(2, 6, seed=1), random_ids(2, 7, seed=2)
    second_turn[1, :3] = 0
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 6:9] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        one_forward = model(
            torch.cat([first_turn, second_turn], dim=1), attention_mask=mask, position_ids=position_ids
        ).logits
        first = model(first_turn, attention_mask=mask[:, :6], position_ids=position_ids[:, :6], use_cache=True)
        second = model(
            second_turn, attention_mask=mask, position_ids=position_ids[:, 6:], cache=first.cache, use_cache=True
        )
    torch.testing.assert_close(second.logits[:, -1], one_forward[:, -1], **FP32)
    rows = [torch.cat([first_turn[i], second_turn[i][mask[i, 6:].bool()]]) for i in range(2)]
    assert_rows_equal_each_row_alone(model, second.logits, rows, mask)


# ------------------------------------------------------------------------------------ chunked prefill


@pytest.mark.parametrize("use_cache", ["default", "False in the config"])
def test_long_prompts_are_prefilled_in_chunks_whatever_the_config_says(use_cache):
    """Trainer saves `use_cache: false` into the config, a training setting: generate still keeps a cache and
    runs a long prompt through it in chunks (every layer sees at most one chunk), with the tokens of an
    unchunked prefill. (A plain forward is never chunked; test_generation checks that its memory grows
    linearly.)"""
    chunk = 8
    model = small_model(prefill_chunk_size=chunk)
    if use_cache == "False in the config":
        model = small_model(prefill_chunk_size=chunk, use_cache=False)
    ids = random_ids(length=3 * chunk + 5)
    lengths_seen = []

    def record_length(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        lengths_seen.append(hidden_states.shape[1])

    hooks = [layer.register_forward_pre_hook(record_length, with_kwargs=True) for layer in model.model.layers]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, decode_engine=False)
    chunked = model.generate(ids, **kwargs)
    assert max(lengths_seen) <= chunk, f"a layer ran {max(lengths_seen)} tokens at once"
    for hook in hooks:
        hook.remove()
    assert torch.equal(chunked, model.generate(ids, prefill_chunk_size=ids.shape[1], **kwargs))


# ------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_quantizes_every_projection(bits, tmp_path):
    """transformers replaces the modules whose type is nn.Linear by bitsandbytes' layers (CPU backend here).
    8-bit (LLM.int8, activations quantized too): logits within a few percent of full precision. 4-bit: the
    logits of the full-precision model whose weights are replaced by their dequantized 4-bit values."""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    # On CPUs with AVX512-BF16, bitsandbytes packs 4-bit weights for inference in blocks of 32 output rows
    # and 64 inputs, and multiplies in bfloat16: sizes that pack, and bf16's tolerance.
    config = small_config(hidden_size=64, intermediate_size=64, time_step_rank=64)
    model = SambaForCausalLM(config).eval()  # the reference initialisation
    quantized, reference = load_quantized(model, tmp_path, bits, "cpu")
    ids = random_ids(length=20)
    logits, expected = main_output(quantized, input_ids=ids), main_output(reference, input_ids=ids)
    if bits == 8:
        assert (logits - expected).norm() / expected.norm() < 0.1
    elif bitsandbytes.functional.has_avx512bf16():
        torch.testing.assert_close(logits, expected, rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(logits, expected, **FP32)


# ---------------------------------------------------------------------------------------- fp32 parameters


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("built", ["under a default dtype", "by from_config"])
def test_a_model_built_in_half_precision_keeps_the_ssm_parameters_in_fp32(half, built):
    """`_keep_in_fp32_modules_strict` parameters must be created in float32, as from_pretrained keeps them
    (transformers' test_keep_in_fp32_modules_strict_also_hardcode_fp32)."""
    if built == "by from_config":
        model = AutoModelForCausalLM.from_config(small_config(), dtype=half)
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(half)
        try:
            model = SambaForCausalLM(small_config())
        finally:
            torch.set_default_dtype(default)
    assert fp32_rule_breaks(model, half) == {}


# ------------------------------------------------------------------------------------------ static cache


@pytest.mark.parametrize("new_tokens", [2, 3 * WINDOW])
def test_static_cache_holds_the_smaller_of_the_window_and_its_length(new_tokens):
    """transformers' static sliding-window layers hold min(sliding_window, max_cache_len) keys; the cache of
    `generate(cache_implementation="static")` and the attention maps of its decode steps have that size,
    and the tokens are those of the dynamic cache."""
    model = small_model(layer_types=EVERY_LAYER_TYPE)
    model.set_attn_implementation("eager")
    prompt = random_ids(length=3)
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        static = model.generate(prompt, cache_implementation="static", output_attentions=True, **kwargs)
        dynamic = model.generate(prompt, **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    sliding_idx, full_idx = EVERY_LAYER_TYPE.index("sliding_attention"), EVERY_LAYER_TYPE.index("full_attention")
    max_cache_len = static.cache.layers[full_idx].keys.shape[-2]
    expected = min(WINDOW, max_cache_len)
    assert static.cache.layers[sliding_idx].keys.shape[-2] == expected
    for step_attentions in static.attentions[1:]:  # decode steps: one query over the cache's slots
        sliding, full = step_attentions
        assert sliding.shape[-1] == expected and full.shape[-1] == max_cache_len


# ---------------------------------------------------------------------------------------------- RoPE


def rope_parameters(rope_type: str, head_dim: int) -> dict:
    """The parameters transformers' RoPE functions read for each type, for a context trained at 16 tokens."""
    parameters = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 4.0}
    if rope_type != "linear":
        parameters["original_max_position_embeddings"] = 16
    if rope_type == "longrope":
        parameters.update(short_factor=[1.0] * (head_dim // 2), long_factor=[4.0] * (head_dim // 2))
    if rope_type == "llama3":
        parameters.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return parameters


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "longrope", "llama3"])
def test_rope_types_are_supported_or_refused_with_a_value_error(rope_type):
    """Either the config refuses the type with a ValueError, or the model applies it: its outputs differ from
    default RoPE's past the original context (dynamic: equal within it), never silently default RoPE."""
    config = small_config(layer_types=EVERY_LAYER_TYPE)
    try:
        scaled = small_model(
            model_class=SambaModel,
            layer_types=EVERY_LAYER_TYPE,
            max_position_embeddings=16,
            rope_parameters=rope_parameters(rope_type, config.head_dim),
        )
    except ValueError:
        return
    default = small_model(model_class=SambaModel, layer_types=EVERY_LAYER_TYPE, max_position_embeddings=16)
    short, long = random_ids(1, 12), random_ids(1, 40)
    if rope_type == "dynamic":
        torch.testing.assert_close(main_output(scaled, input_ids=short), main_output(default, input_ids=short))
    same = torch.allclose(main_output(scaled, input_ids=long), main_output(default, input_ids=long), atol=1e-4)
    assert not same, f"rope_type {rope_type!r} gives the outputs of default RoPE"


# --------------------------------------------------------------------------------- padding-free training


def unpacked_loss(model, batch) -> torch.Tensor:
    """The causal LM loss of a packed row with each document's logits computed alone (documents start where
    position_ids restart); the same labels, shifted the same way."""
    position_ids, ids = batch["position_ids"][0], batch["input_ids"][0]
    starts = (position_ids == 0).nonzero().flatten().tolist() + [len(ids)]
    logits = torch.cat([model(ids[None, a:b]).logits[0] for a, b in zip(starts[:-1], starts[1:])])
    labels = batch["labels"][0]
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)


def test_flattening_collator_with_seq_idx_gives_the_unpacked_loss():
    model = small_model()
    documents = [random_ids(1, n, seed=n)[0].tolist() for n in (5, WINDOW + 4, 3)]
    batch = DataCollatorWithFlattening(return_seq_idx=True)([{"input_ids": ids} for ids in documents])
    assert "seq_idx" in batch
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, unpacked_loss(model, batch), **FP32)


def test_trl_sft_trainer_with_packing_trains_on_the_unpacked_loss(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    texts = [
        "Return a new list of the items.",
        "Open the file and return a stream object.",
        "Sort the keys and return them in a list.",
    ]
    tokenizer = train_tokenizer(texts * 3, vocab_size=300)
    model = small_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=32,
        packing=True,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": texts * 2}), processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, unpacked_loss(model, batch), **FP32)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "field, value",
    [
        ("rms_norm_eps", 0.0),
        ("rms_norm_eps", -1e-5),
        ("time_step_rank", "big"),
        ("time_step_rank", 2.5),
        ("initializer_range", -0.02),
    ],
)
def test_invalid_config_values_raise_a_value_error_naming_the_field(field, value):
    """A value of the wrong type is refused by the config dataclass's own check (huggingface_hub's strict
    dataclasses, as for every transformers config), one of the right type but out of range by a ValueError:
    both name the field."""
    with pytest.raises((ValueError, StrictDataclassFieldValidationError), match=field):
        small_config(**{field: value})


@pytest.mark.parametrize("model_class", [SambaModel, SambaForCausalLM, SambaForSequenceClassification])
def test_an_empty_input_raises_a_value_error(model_class):
    model = small_model(model_class=model_class, pad_token_id=0)
    with pytest.raises(ValueError, match="input"):
        model(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("model_class", [SambaModel, SambaForCausalLM, SambaForSequenceClassification])
def test_a_forward_without_input_ids_or_inputs_embeds_raises_a_value_error(model_class):
    model = small_model(model_class=model_class, pad_token_id=0)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(attention_mask=torch.ones(2, 5, dtype=torch.long))
