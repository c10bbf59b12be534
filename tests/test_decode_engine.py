"""The decode engine behind generate(): the same tokens as transformers' own decoding loop, and sampling
from the same distributions. On the CPU the engine runs its step without capturing a CUDA graph
(`decode_engine="eager"`); the captured step is checked on a GPU (tests/gpu)."""

import contextlib
import copy
import logging

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, TextStreamer

import samba_kernels
from samba_hf import generation
from samba_hf.generation import counts_tokens, decode_engine

from .helpers import small_model

WINDOW = 8
GREEDY = dict(do_sample=False, pad_token_id=0)


def left_padded_prompt(batch: int = 3, length: int = WINDOW + 5):
    ids = torch.randint(3, 97, (batch, length))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    if batch > 2:
        mask[2, : length - 2] = 0  # a row of two tokens
    return ids, mask


_built = generation.DecodeStep.__init__


def built_and_warmed_up(step, *args, **kwargs):
    """A new step, run as capture() runs it before it captures (on the CPU the step is not captured)."""
    _built(step, *args, **kwargs)
    step.warm_up()


def both_paths(model, ids, **kwargs):
    """generate() through transformers' loop and through the engine."""
    return model.generate(ids, decode_engine=False, **kwargs), model.generate(ids, decode_engine="eager", **kwargs)


@pytest.mark.parametrize("layer_types", [None, ["linear_attention"] * 2, ["mlp", "sliding_attention"] * 2])
def test_greedy_tokens_equal_transformers_loop_past_the_window(layer_types):
    model = small_model(
        **({} if layer_types is None else dict(layer_types=layer_types, num_hidden_layers=len(layer_types)))
    )
    if not counts_tokens(model.config):
        pytest.skip(
            "this transformers cannot generate with an MLP-only first layer (test_generation checks the error)"
        )
    ids, mask = left_padded_prompt()
    loop, engine = both_paths(model, ids, attention_mask=mask, max_new_tokens=3 * WINDOW, **GREEDY)
    assert torch.equal(loop, engine)


def test_rows_stop_at_their_end_of_sequence_and_the_output_ends_with_the_last_row():
    model = small_model()
    ids, mask = left_padded_prompt()
    free = model.generate(ids, attention_mask=mask, max_new_tokens=40, decode_engine=False, **GREEDY)
    eos = int(free[0, ids.shape[1] + 5])  # a token the first row generates early
    loop, engine = both_paths(model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos, **GREEDY)
    assert torch.equal(loop, engine)
    assert (engine[:, ids.shape[1] :] == eos).any()


def test_a_minimum_length_keeps_the_greedy_choice_in_one_kernel(monkeypatch):
    """Greedy search with min_new_tokens and an end token the first row would generate early: every step chooses
    in greedy_token_ (the end token blocked up to the minimum), with the tokens of transformers' loop."""
    if not samba_kernels.use_triton(torch.empty(0)):
        pytest.skip("TRITON_INTERPRET is off and there is no GPU")
    calls = []
    kernel = samba_kernels.greedy_token_
    monkeypatch.setattr(samba_kernels, "greedy_token_", lambda *a, **kw: calls.append(a) or kernel(*a, **kw))
    model = small_model()
    ids, mask = left_padded_prompt()
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, decode_engine=False, **GREEDY)
    eos = int(free[0, ids.shape[1] + 2])
    kwargs = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=8, eos_token_id=eos, **GREEDY)
    loop, engine = both_paths(model, ids, **kwargs)
    assert torch.equal(loop, engine)
    assert not (engine[:, ids.shape[1] : ids.shape[1] + 8] == eos).any()
    assert calls and all(call[-2] is not None for call in calls)  # the minimum length's blocked tokens


@pytest.mark.parametrize("where", ["both rows in the third", "one row in the second, one in the third"])
def test_every_row_ending_inside_a_replay_ends_the_output_there(where):
    """The engine runs STEPS_PER_REPLAY steps a replay, checks each replay's tokens for the rows' ends while the next
    one runs, and drops the steps after the last row's end (here inside a replay, one row ending in an earlier one)."""
    model = small_model()
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    free = model.generate(ids, max_new_tokens=60, decode_engine=False, **GREEDY)[:, ids.shape[1] :]
    per_replay = generation.STEPS_PER_REPLAY
    # the first token is the prefill's; decode step s (from 0) generates token s + 1
    first_steps = {
        int(token): [int((row == token).nonzero()[0]) - 1 if (row == token).any() else None for row in free]
        for token in free.unique()
    }
    replays = (2, 2) if where.startswith("both") else (1, 2)
    ending = [
        token
        for token, steps in first_steps.items()
        if None not in steps
        and all(step >= 0 and step // per_replay == replay for step, replay in zip(steps, replays))
        and len({step % per_replay for step in steps}) == 2
        and max(steps) % per_replay != per_replay - 1  # the last row ends inside a replay
    ]
    assert ending, f"no token ends {where} replay: change the prompt's seed"
    loop, engine = both_paths(model, ids, max_new_tokens=60, eos_token_id=ending[0], **GREEDY)
    assert torch.equal(loop, engine)
    assert engine.shape[1] == ids.shape[1] + max(first_steps[ending[0]]) + 2


def test_replays_run_several_steps_unless_each_is_needed_on_its_own(monkeypatch):
    """Without a streamer or a returned cache a replay runs STEPS_PER_REPLAY steps, the rest one at a time."""
    sizes = []
    run = generation.DecodeStep.run
    monkeypatch.setattr(generation.DecodeStep, "run", lambda step, steps=1: sizes.append(steps) or run(step, steps))
    model = small_model()
    ids = torch.randint(3, 97, (2, 9))
    per_replay = generation.STEPS_PER_REPLAY
    model.generate(ids, max_new_tokens=2 * per_replay + 4, decode_engine="eager", **GREEDY)
    assert sizes == [per_replay, per_replay, 1, 1, 1]
    sizes.clear()
    out = model.generate(ids, max_new_tokens=6, return_dict_in_generate=True, decode_engine="eager", **GREEDY)
    assert sizes == [1] * 5 and out.sequences.shape[1] == ids.shape[1] + 6


@pytest.mark.parametrize("warmed_up", [False, True])
def test_logits_processors_run_inside_the_step_as_transformers_runs_them(monkeypatch, warmed_up):
    """warmed_up: a new step first runs as capture() runs it before it captures (on a GPU); those runs must not
    count tokens, end rows or mark tokens seen for the call."""
    if warmed_up:
        monkeypatch.setattr(generation.DecodeStep, "__init__", built_and_warmed_up)
    model = small_model()
    ids, mask = left_padded_prompt()
    eos = int(model.generate(ids, attention_mask=mask, max_new_tokens=3, decode_engine=False, **GREEDY)[0, -1])
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=2 * WINDOW,
        eos_token_id=eos,
        repetition_penalty=1.7,
        min_new_tokens=WINDOW,
        **GREEDY,
    )
    loop, engine = both_paths(model, ids, **kwargs)
    assert torch.equal(loop, engine)
    loop, engine = both_paths(model, ids, **dict(kwargs, min_length=ids.shape[1] + 4, min_new_tokens=None))
    assert torch.equal(loop, engine)


def test_a_seeded_first_call_samples_as_a_later_call_does(monkeypatch):
    """A first call runs steps that draw random numbers before its own decoding (on a GPU, the dry run that compiles
    the kernels and the capture's warm-up runs): they must leave the random state as the caller seeded it."""
    monkeypatch.setattr(generation.DecodeStep, "__init__", built_and_warmed_up)
    monkeypatch.setattr(generation, "kernels_serve", lambda config_choice, device: True)
    monkeypatch.setattr(generation.DecodeEngine, "compiles_ahead", lambda self, *args: True)
    model = small_model()
    ids, mask = left_padded_prompt()
    kwargs = dict(attention_mask=mask, max_new_tokens=WINDOW, do_sample=True, pad_token_id=0, decode_engine="eager")
    torch.manual_seed(0)
    first = model.generate(ids, **kwargs)
    monkeypatch.setattr(generation.DecodeEngine, "compiles_ahead", lambda self, *args: False)
    torch.manual_seed(0)
    later = model.generate(ids, **kwargs)  # the kept step: no dry run, no warm-up runs
    assert decode_engine(model).stats.graph_replayed and torch.equal(first, later)


def test_the_dry_run_that_compiles_kernels_ahead_leaves_the_call_alone(monkeypatch):
    """Before a new step is captured, the engine runs the prompt's first chunks and one step on scratch buffers (on
    CUDA, to compile the kernels in threads: kernels that do not run leave garbage). Run here on the CPU with every
    mixer's output garbage during the dry run: the call's tokens, its token choice and the cache it returns are
    those of transformers' loop."""
    dry = []

    @contextlib.contextmanager
    def dry_run(threads=None):
        dry.append(True)
        try:
            yield
        finally:
            dry.pop()

    dry_lengths = []

    def garbage_while_dry(module, inputs, output):
        if dry:
            first = output[0] if isinstance(output, tuple) else output
            dry_lengths.append(first.shape[1])
            garbage = torch.randn_like(first) * 100
            return (garbage, *output[1:]) if isinstance(output, tuple) else garbage

    monkeypatch.setattr(samba_kernels, "compile_ahead", dry_run)
    monkeypatch.setattr(generation, "kernels_serve", lambda config_choice, device: True)
    monkeypatch.setattr(generation.DecodeEngine, "compiles_ahead", lambda self, *args: True)
    model = small_model()
    for layer in model.model.layers:
        layer.mixer.register_forward_hook(garbage_while_dry)
    ids, mask = left_padded_prompt(length=3 * WINDOW + 1)
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=2 * WINDOW,
        eos_token_id=[token for token in range(model.config.vocab_size) if token != 5],  # rows end once allowed
        min_new_tokens=WINDOW,
        repetition_penalty=1.7,
        prefill_chunk_size=WINDOW,  # the dry run's two chunks are not the whole prompt
        return_dict_in_generate=True,
        **GREEDY,
    )
    loop, engine = both_paths(model, ids, **kwargs)
    stats = decode_engine(model).stats
    assert 0 < stats.dry_run_s <= stats.compile_s
    assert dry_lengths[0] == 1 and max(dry_lengths) == WINDOW  # the step's kernels first, then the prompt's
    assert torch.equal(loop.sequences, engine.sequences)
    more = torch.randint(3, 97, (ids.shape[0], 3))
    turn = dict(kwargs, attention_mask=torch.ones(ids.shape[0], loop.sequences.shape[1] + 3, dtype=torch.long))
    turn["attention_mask"][:, : mask.shape[1]] = mask
    second = [
        model.generate(torch.cat([out.sequences, more], 1), cache=out.cache, decode_engine=mode, **turn).sequences
        for out, mode in ((loop, False), (engine, "eager"))
    ]
    assert torch.equal(*second)


def test_kernels_are_compiled_ahead_once_per_batch_size_dtype_and_token_choice(monkeypatch):
    calls = []
    engine_generate = generation.DecodeEngine.generate

    def recorded(engine, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs):
        calls.append((input_ids, logits_processor, stopping_criteria, generation_config, dict(model_kwargs)))
        return engine_generate(
            engine, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs
        )

    monkeypatch.setattr(generation.DecodeEngine, "generate", recorded)
    monkeypatch.setattr(generation, "kernels_serve", lambda config_choice, device: True)
    model = small_model()
    ids, mask = left_padded_prompt(batch=2)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, decode_engine="eager", **GREEDY)
    input_ids, processors, criteria, config, model_kwargs = calls[0]
    chooser = generation.TokenChooser(processors, criteria, config, input_ids, model.config)
    engine = decode_engine(model)
    graph = copy.copy(config)
    graph.decode_engine = True
    assert engine.compiles_ahead(chooser, 2, graph) and not engine.compiles_ahead(chooser, 2, config)  # eager
    engine.compile_kernels_ahead(input_ids, chooser, graph, model_kwargs)
    assert engine.stats.compile_s > 0
    assert not engine.compiles_ahead(chooser, 2, graph) and engine.compiles_ahead(chooser, 3, graph)


def test_the_returned_cache_continues_a_second_turn_exactly():
    model = small_model()
    first = torch.randint(3, 97, (2, 11))
    kwargs = dict(max_new_tokens=2 * WINDOW, return_dict_in_generate=True, **GREEDY)
    out = model.generate(first, decode_engine="eager", **kwargs)
    second = torch.cat([out.sequences, torch.randint(3, 97, (2, 4))], dim=1)
    continued = model.generate(second, cache=out.cache, decode_engine="eager", **kwargs).sequences
    assert torch.equal(continued, model.generate(second, decode_engine=False, **kwargs).sequences)


def test_num_return_sequences_and_a_kept_step_for_the_next_call():
    model = small_model()
    ids, mask = left_padded_prompt(batch=2)
    # sampling from the top token alone: both paths draw it whatever their random numbers
    kwargs = dict(
        attention_mask=mask, max_new_tokens=WINDOW + 3, num_return_sequences=2, do_sample=True, top_k=1, pad_token_id=0
    )
    assert torch.equal(*both_paths(model, ids, **kwargs))
    engine = decode_engine(model)
    kept = len(engine.graphs)
    other, other_mask = left_padded_prompt(batch=2, length=5)
    loop, again = both_paths(model, other, **dict(kwargs, attention_mask=other_mask))
    assert torch.equal(loop, again) and len(engine.graphs) == kept and engine.stats.graph_replayed


def test_sampling_draws_from_the_distributions_of_transformers_processors():
    """Sampled tokens follow the processed distribution of each step: the first from the prompt's logits, the
    second (drawn inside the step) from the logits after each row's first token."""
    torch.manual_seed(0)
    model = small_model()
    prompt = torch.randint(3, 97, (1, WINDOW + 3))
    rows = 3000
    settings = dict(do_sample=True, temperature=0.7, top_k=12, top_p=0.9, pad_token_id=0)
    torch.manual_seed(1)
    out = model.generate(prompt, max_new_tokens=2, num_return_sequences=rows, decode_engine="eager", **settings)
    warpers = model._get_logits_processor(model.generation_config.__class__(**settings), prompt.shape[1])

    def expected(inputs):
        with torch.no_grad():
            logits = model(inputs).logits[:, -1].float()
        return warpers(inputs, logits).softmax(-1).mean(0)

    first, second = out[:, -2], out[:, -1]
    for step, tokens, probs in ((1, first, expected(prompt)), (2, second, expected(out[:, :-1]))):
        observed = torch.bincount(tokens, minlength=probs.numel()).float() / rows
        total_variation = 0.5 * (observed - probs).abs().sum()
        assert total_variation < 0.04, (step, total_variation)


def test_a_streamer_gets_every_token():
    model = small_model()
    ids = torch.randint(3, 97, (1, 6))
    received = []

    class Recorder(TextStreamer):
        def __init__(self):
            pass

        def put(self, value):
            received.append(value.reshape(-1).tolist())

        def end(self):
            received.append("end")

    out = model.generate(ids, max_new_tokens=5, streamer=Recorder(), decode_engine="eager", **GREEDY)
    prompt, *new, end = received  # generate() puts the prompt first
    assert prompt == ids[0].tolist() and end == "end" and sum(new, []) == out[0, ids.shape[1] :].tolist()


def test_what_the_engine_cannot_run_goes_to_transformers_loop_and_says_why(caplog):
    class Shift(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.roll(1, dims=-1)

    model = small_model()
    ids = torch.randint(3, 97, (1, 6))
    generation._logged_paths.clear()
    with caplog.at_level(logging.INFO, logger="samba_hf.generation"):
        custom = model.generate(
            ids, max_new_tokens=4, logits_processor=LogitsProcessorList([Shift()]), decode_engine="eager", **GREEDY
        )
        beams = model.generate(ids, max_new_tokens=4, num_beams=2, decode_engine="eager", **GREEDY)
    assert "Shift" in caplog.text
    assert torch.equal(
        custom,
        model.generate(
            ids, max_new_tokens=4, logits_processor=LogitsProcessorList([Shift()]), decode_engine=False, **GREEDY
        ),
    )
    assert beams.shape == (1, 10)
    with caplog.at_level(logging.INFO, logger="samba_hf.generation"):
        model.generate(ids, max_new_tokens=2, **GREEDY)  # on the CPU, the default runs transformers' loop
    assert "captures CUDA graphs" in caplog.text
    with pytest.raises(ValueError, match="decode_engine"):
        model.generate(ids, max_new_tokens=2, decode_engine="fast", **GREEDY)


def test_batch_one_runs_the_fused_kernels_with_the_tokens_of_transformers_loop(monkeypatch):
    """A batch-1 step on the one-row kernels (Triton's interpreter here): norms folded into the products,
    a Mamba mixer's token in mamba_decode_step, attention over the ring in ring_decode_attention, the greedy
    choice in greedy_token_."""
    import samba_kernels

    if not samba_kernels.use_triton(torch.empty(0)):
        pytest.skip("TRITON_INTERPRET is off and there is no GPU")
    calls = []
    for name in ("mamba_decode_step", "ring_decode_attention", "gated_matvec", "matvec_add_", "greedy_token_"):
        kernel = getattr(samba_kernels, name)
        monkeypatch.setattr(samba_kernels, name, lambda *a, _n=name, _k=kernel, **kw: calls.append(_n) or _k(*a, **kw))
    model = small_model()
    ids = torch.randint(3, 97, (1, WINDOW + 3))
    loop, engine = both_paths(model, ids, max_new_tokens=WINDOW + 2, **GREEDY)  # the ring wraps
    assert torch.equal(loop, engine)
    steps = WINDOW + 1
    assert calls.count("ring_decode_attention") == calls.count("mamba_decode_step") == 2 * steps
    assert calls.count("greedy_token_") == steps


@pytest.mark.parametrize(
    "adapted",
    [dict(target_modules=["q_proj", "in_proj"], layers_to_transform=[1, 2]), dict(target_modules=["lm_head"]),
     dict(target_modules=["embed_tokens"])],
    ids=["two layers", "head", "embedding"],
)  # fmt: skip
def test_adapted_modules_keep_their_forward_in_the_fused_step(adapted):
    """LoRA on two layers' projections, on the head or on the embedding: those run their modules (the adapter's
    term included), the rest the fused kernels, over the same buffers."""
    import peft

    import samba_kernels

    if not samba_kernels.use_triton(torch.empty(0)):
        pytest.skip("TRITON_INTERPRET is off and there is no GPU")
    model = peft.get_peft_model(small_model(), peft.LoraConfig(r=4, **adapted))
    for name, parameter in model.named_parameters():
        if "lora_" in name:  # B (and an embedding's A) start at zeros
            torch.nn.init.normal_(parameter, std=0.3)
    ids = torch.randint(3, 97, (1, WINDOW + 3))
    with torch.no_grad():
        loop = model.generate(input_ids=ids, max_new_tokens=WINDOW + 2, decode_engine=False, **GREEDY)
        engine = model.generate(input_ids=ids, max_new_tokens=WINDOW + 2, decode_engine="eager", **GREEDY)
    assert torch.equal(loop, engine)
