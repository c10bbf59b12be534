import functools
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, StaticCache, TextIteratorStreamer
from transformers.generation import CompileConfig

from samba_hf import SambaConfig, SambaForCausalLM, SambaStaticCache
from samba_hf.cache_samba import windows_joined_by_copies
from samba_hf.cli import main as samba_hf_main
from samba_hf.demo import train_tokenizer
from samba_hf.generation import (
    cache_nbytes,
    cache_tensors,
    chunked_forward,
    counts_tokens,
    last_layer_fills_the_cache,
)
from samba_hf.hub import save_hub_folder
from samba_hf.modeling_samba import SambaAttention, SambaMLP

from .helpers import small_model

WINDOW = 8
GREEDY = dict(do_sample=False, pad_token_id=0)


def test_cache_memory_is_constant_however_long_the_generation():
    model = small_model()
    prompt = torch.randint(3, 97, (2, 5))
    cache = DynamicCache(config=model.config)
    sizes = {}
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
        token = prompt[:, -1:]
        for step in range(1, 10 * WINDOW + 1):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            if step in (WINDOW, 10 * WINDOW):
                sizes[step] = cache_nbytes(cache)
    assert sizes[WINDOW] == sizes[10 * WINDOW] > 0


def sequence_log_probs(model, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    with torch.no_grad():
        log_probs = model(sequences).logits.log_softmax(-1)
    targets = sequences[:, prompt_length:]
    return log_probs[:, prompt_length - 1 : -1].gather(-1, targets[..., None]).squeeze(-1).sum(-1)


def test_beam_search_scores_equal_full_forward_recomputation():
    """Beam search reorders the cache between steps; a wrong reorder gives scores that full
    forwards of the returned sequences do not reproduce."""
    model = small_model()
    prompt = torch.randint(3, 97, (2, WINDOW + 3))
    new_tokens = 2 * WINDOW
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            num_beams=4,
            num_return_sequences=2,
            length_penalty=0.0,
            early_stopping=True,
            output_scores=True,
            return_dict_in_generate=True,
            **GREEDY,
        )
    assert out.sequences.shape == (4, prompt.shape[1] + new_tokens)
    recomputed = sequence_log_probs(model, out.sequences, prompt.shape[1])
    torch.testing.assert_close(out.sequences_scores, recomputed, rtol=1e-4, atol=1e-4)
    assert (out.sequences_scores.view(2, 2)[:, 0] >= out.sequences_scores.view(2, 2)[:, 1]).all()


def test_sampling_is_reproducible_and_returns_several_sequences():
    model = small_model()
    prompt = torch.randint(3, 97, (2, 6))
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=True,
        top_k=20,
        num_return_sequences=3,
        pad_token_id=0,
    )
    torch.manual_seed(7)
    first = model.generate(prompt, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(first, model.generate(prompt, **kwargs)) and first.shape == (6, 18)


@pytest.mark.parametrize("search", [{}, dict(num_beams=3, num_return_sequences=2, length_penalty=0.0)])
def test_static_cache_generation_equals_the_dynamic_cache_with_left_padding(search):
    """Greedy, and beam search (which reorders the ring buffers between steps)."""
    model = small_model()
    prompt = torch.randint(3, 97, (2, WINDOW + 4))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=3 * WINDOW, **GREEDY, **search)
    assert torch.equal(
        model.generate(prompt, **kwargs), model.generate(prompt, cache_implementation="static", **kwargs)
    )


@pytest.mark.parametrize("prompt_length", [1, WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW])
def test_ring_buffer_static_cache_continues_exactly(prompt_length):
    """Prompt, one-token steps past the window (the ring wraps), then a multi-token continuation
    that reads the wrapped ring in order: the logits of one forward over everything."""
    model = small_model()
    ids = torch.randint(3, 97, (2, prompt_length + 2 * WINDOW + 5))
    cache = SambaStaticCache(config=model.config, max_cache_len=ids.shape[1])
    steps_end = prompt_length + 2 * WINDOW
    with torch.no_grad():
        logits = [model(ids[:, :prompt_length], cache=cache, use_cache=True).logits]
        for t in range(prompt_length, steps_end):
            logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        logits.append(model(ids[:, steps_end:], cache=cache, use_cache=True).logits)
        expected = model(ids).logits
    torch.testing.assert_close(torch.cat(logits, dim=1), expected, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize(
    "new_cache",
    [lambda config: DynamicCache(config=config), lambda config: SambaStaticCache(config=config, max_cache_len=256)],
    ids=["dynamic", "static"],
)
def test_a_second_turn_continues_the_cache_of_the_first(new_cache):
    """Multi-turn chat: generate, append a user turn, generate again from the returned cache (the ring
    has wrapped); the same tokens as generating the second turn from scratch."""
    model = small_model()
    kwargs = dict(max_new_tokens=2 * WINDOW, return_dict_in_generate=True, **GREEDY)
    first = torch.randint(3, 97, (1, 13))
    out = model.generate(first, attention_mask=torch.ones_like(first), cache=new_cache(model.config), **kwargs)
    second = torch.cat([out.sequences, torch.randint(3, 97, (1, 5))], dim=1)
    continued = model.generate(second, attention_mask=torch.ones_like(second), cache=out.cache, **kwargs).sequences
    assert torch.equal(continued, model.generate(second, attention_mask=torch.ones_like(second), **kwargs).sequences)


def test_ring_buffer_static_cache_memory_does_not_grow_with_its_maximum_length():
    model = small_model()
    prompt = torch.randint(3, 97, (2, 5))
    sizes = []
    for max_cache_len in (2 * WINDOW, 100 * WINDOW):
        cache = SambaStaticCache(config=model.config, max_cache_len=max_cache_len)
        with torch.no_grad():
            model(prompt, cache=cache, use_cache=True)
        sizes.append(cache_nbytes(cache))
    assert sizes[0] == sizes[1] > 0


def test_generate_with_a_static_cache_compiles_its_decode_step_once():
    """generate() compiles its decode step itself for a static cache (on GPUs; forced here on the CPU):
    one graph (fullgraph), not recompiled at any later step (a recompile raises), prefill uncompiled,
    left-padded rows exact against the dynamic cache."""
    model = small_model()
    prompt = torch.randint(3, 97, (2, WINDOW + 4))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=3 * WINDOW, **GREEDY)
    dynamic = model.generate(prompt, **kwargs)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        static = model.generate(prompt, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert torch.equal(dynamic, static)


def test_a_ring_buffer_cache_refuses_an_attention_without_masks():
    model = small_model()
    prompt = torch.randint(3, 97, (1, WINDOW + 2))
    cache = SambaStaticCache(config=model.config, max_cache_len=4 * WINDOW)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
        model.config._attn_implementation = "flash_attention_2"  # switched after the cache was built
        with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
            model(prompt[:, -1:], cache=cache, use_cache=True)


def test_decode_step_compiles_as_one_graph_with_a_static_cache():
    model = small_model()
    prompt = torch.randint(3, 97, (2, WINDOW + 1))
    cache = StaticCache(config=model.config, max_cache_len=4 * WINDOW)
    with torch.no_grad():
        logits = model(prompt, cache=cache, use_cache=True).logits
        torch._dynamo.reset()  # compiled graphs of other tests count towards the recompile limit
        step = torch.compile(model.forward, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
        token = logits[:, -1:].argmax(-1)
        position = torch.full((2, 1), prompt.shape[1])
        compiled = step(input_ids=token, cache=cache, use_cache=True, position_ids=position).logits
    with torch.no_grad():
        expected = model(torch.cat([prompt, token], dim=1)).logits[:, -1:]
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=5e-5)


def test_compiled_decode_steps_on_the_triton_kernels():
    """A compiled decode step with the Triton decode kernels forced (custom ops that update the cached
    states in place; Triton's interpreter without a GPU): one graph, not recompiled at the next step,
    and the logits of the full forward."""
    import samba_kernels

    if not samba_kernels.use_triton(torch.empty(0)):
        pytest.skip("TRITON_INTERPRET is off and there is no GPU")
    model = small_model(num_hidden_layers=2, kernel_implementation="triton")
    ids = torch.randint(3, 97, (1, 8))
    prompt_length = 6
    cache = SambaStaticCache(config=model.config, max_cache_len=ids.shape[1])
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        model(ids[:, :prompt_length], cache=cache, use_cache=True)
        steps = [
            step(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True, position_ids=torch.tensor([[t]])).logits
            for t in range(prompt_length, ids.shape[1])
        ]
        expected = small_model(num_hidden_layers=2, kernel_implementation="torch")(ids).logits[:, prompt_length:]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-4, atol=5e-5)


def test_inductor_compiled_decode_steps_run_one_graph_at_every_length():
    """The decode step lowered by inductor (what CUDA-graph decoding replays on a GPU), compiled once
    for static shapes and run past the window: a recompile raises (transformers' own static
    sliding-window layer recompiles at every step here), and the logits stay exact."""
    model = small_model()
    ids = torch.randint(3, 97, (1, 3 * WINDOW))
    prompt_length = WINDOW - 2
    cache = SambaStaticCache(config=model.config, max_cache_len=ids.shape[1])
    torch._dynamo.reset()  # compiled graphs of other tests count towards the recompile limit
    step = torch.compile(model.forward, fullgraph=True, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        model(ids[:, :prompt_length], cache=cache, use_cache=True)
        steps = [
            step(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True, position_ids=torch.tensor([[t]])).logits
            for t in range(prompt_length, ids.shape[1])
        ]
        expected = model(ids).logits[:, prompt_length:]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-4, atol=5e-5)


def test_assisted_decoding_is_refused_with_a_clear_error():
    model = small_model()
    prompt = torch.randint(3, 97, (1, 6))
    with pytest.raises(ValueError, match="stateful"):
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            assistant_model=small_model(seed=1),
            max_new_tokens=4,
            **GREEDY,
        )


def test_a_model_whose_first_layer_is_an_mlp_generates_or_refuses_clearly():
    """transformers 5.25 reads the cache's token count from its first layer, which an MLP-only layer does not
    keep: there generate() refuses, naming the fix; elsewhere it continues the prompt as one forward does."""
    model = small_model(layer_types=["mlp", "sliding_attention"] * 2)
    prompt = torch.randint(3, 97, (1, 6))
    if not counts_tokens(model.config):
        with pytest.raises(
            ValueError, match=r"first layer is an MLP-only layer.*pip install 'transformers>=5.23,<5.25'"
        ):
            model.generate(prompt, max_new_tokens=2, **GREEDY)
        return
    generated = model.generate(prompt, max_new_tokens=1, decode_engine=False, **GREEDY)
    with torch.no_grad():
        assert generated[0, -1] == model(prompt).logits[0, -1].argmax()


@pytest.mark.parametrize("chunk_size", [2, 5, WINDOW, WINDOW + 1])
def test_chunked_prefill_is_exact_with_left_padding(chunk_size):
    """generate's prefill in chunks through the cache: the last position's logits of one forward, and the
    tokens of an unchunked prefill."""
    model = small_model()
    ids = torch.randint(3, 97, (2, 4 * WINDOW + 3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1, use_cache=True)
    with torch.no_grad():
        whole = model(**inputs).logits
        chunked = chunked_forward(model, dict(inputs, cache=DynamicCache(config=model.config)), chunk_size).logits
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=5e-5)
    kwargs = dict(attention_mask=mask, max_new_tokens=WINDOW, decode_engine=False, **GREEDY)
    assert torch.equal(
        model.generate(ids, prefill_chunk_size=chunk_size, **kwargs),
        model.generate(ids, prefill_chunk_size=ids.shape[1], **kwargs),
    )


@pytest.mark.parametrize("last_layer", ["sliding_attention", "full_attention", "linear_attention", "mlp"])
@pytest.mark.parametrize("hook", ["none", "a user's hook", "output capturing"])
def test_the_chunks_before_the_last_run_the_last_layer_for_its_cache_only(monkeypatch, last_layer, hook):
    """Nothing reads the outputs of a chunked prefill's chunks before the last: there the last layer runs neither
    its MLP nor its attention, and leaves the cache as one forward over the whole prompt does (the last position's
    logits too). A user's hook on the layer would see another output: with one, the layer runs whole.
    transformers' output-capturing hooks, installed by a forward that asked for hidden states, record nothing
    here."""
    model = small_model(layer_types=["linear_attention", "sliding_attention", last_layer], num_hidden_layers=3)
    last = model.model.layers[-1]
    ran = []
    for module_class in (SambaMLP, SambaAttention):
        monkeypatch.setattr(module_class, "forward", recording(module_class.forward, ran))
    if hook == "a user's hook":
        last.mlp.register_forward_hook(lambda *args: None)
    ids, chunks = torch.randint(3, 97, (2, 3 * WINDOW + 2)), 4
    inputs = dict(input_ids=ids, logits_to_keep=1, use_cache=True)
    with torch.no_grad():
        whole = model(**inputs, output_hidden_states=hook == "output capturing")
        assert bool(last._forward_hooks) == (hook == "output capturing")
        ran.clear()
        chunked = chunked_forward(model, dict(inputs, cache=DynamicCache(config=model.config)), WINDOW)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-4, atol=5e-5)
    for got, expected in zip(cache_tensors(chunked.cache), cache_tensors(whole.cache), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=5e-5)
    last_modules = [last.mlp] + ([last.mixer] if last_layer != "linear_attention" else [])
    for module in last_modules:
        assert sum(m is module for m in ran) == (chunks if hook == "a user's hook" else 1)
    for module in (layer.mlp for layer in model.model.layers[:-1]):
        assert sum(m is module for m in ran) == chunks


def test_a_forward_in_another_thread_runs_the_last_layer_whole_meanwhile():
    """While one thread's prefill runs the last layer for its cache only, a forward of the same model in another
    thread (a server's second request, say) gets its whole output."""
    model = small_model()
    ids = torch.randint(3, 97, (2, 5))
    results = {}
    with torch.no_grad():
        expected = model(ids).logits
        with last_layer_fills_the_cache(model):
            worker = threading.Thread(target=lambda: results.setdefault("logits", model(ids).logits))
            worker.start()
            worker.join()
            unread = model(ids).logits  # this thread's forward: the last layer only filled the cache
    torch.testing.assert_close(results["logits"], expected)
    assert not torch.allclose(unread, expected)


def test_a_block_ending_leaves_another_threads_forward_in_place():
    """Two threads may both enter the block before either puts in its forward: the one that ends first leaves the
    other's in place, for the other to remove."""
    model = small_model()
    layer = model.model.layers[-1]
    with last_layer_fills_the_cache(model):
        layer.forward = others = functools.partial(type(layer).forward, layer)  # the other thread's block
    assert vars(layer).get("forward") is others


def recording(forward, modules: list):
    def record(self, *args, **kwargs):
        modules.append(self)
        return forward(self, *args, **kwargs)

    return record


@pytest.mark.parametrize("transposed", [True, False], ids=["model's chunks", "contiguous chunks"])
def test_the_prefills_window_layers_update_as_transformers_layers_do(transposed):
    """Inside the chunked prefill the sliding-window layers join keys by copies (`ChunkWindowLayer`): each update
    returns the keys and values of transformers' own layer fed the same chunks (the model's: transposed views),
    laid out in memory as the chunk is, keeps the same, and the layers are transformers' again afterwards (after an
    error too)."""
    config = small_model().config
    reference, cache = DynamicCache(config=config), DynamicCache(config=config)
    layer = config.layer_types.index("sliding_attention")
    g = torch.Generator().manual_seed(0)

    def chunk(tokens):
        if transposed:  # (batch, tokens, heads, head_dim) memory
            return torch.randn(2, tokens, 2, 4, generator=g).transpose(1, 2)
        return torch.randn(2, 2, tokens, 4, generator=g)

    with windows_joined_by_copies(cache):
        for tokens in (3, 1, WINDOW + 2, 2):
            keys, values = chunk(tokens), chunk(tokens)
            for got, expected in zip(cache.update(keys, values, layer), reference.update(keys, values, layer)):
                assert torch.equal(got, expected)
                assert got.transpose(1, 2).is_contiguous() == transposed
                assert got.is_contiguous() != transposed
            assert torch.equal(cache.layers[layer].keys, reference.layers[layer].keys)
            assert cache.get_seq_length(layer) == reference.get_seq_length(layer)
    assert type(cache.layers[layer]) is type(reference.layers[layer])
    with pytest.raises(RuntimeError, match="a chunk failed"), windows_joined_by_copies(cache):
        raise RuntimeError("a chunk failed")
    assert type(cache.layers[layer]) is type(reference.layers[layer])


class DeviceWaits(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (`.item()`, `bool()`): on a GPU, each waits for the
    device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunks", [2, 6])
def test_chunked_prefill_reads_the_position_ids_once_not_per_chunk(chunks):
    """generate hands the prefill position ids without a mask. Checked once to number the tokens on from the
    cache's count, the chunks run without them (the model would read each chunk's ids for packed documents, a
    wait on the GPU per chunk), with the logits of one forward; packed ids still reach the model, which refuses
    them with a cache."""
    model = small_model()
    ids = torch.randint(3, 97, (1, 6 * WINDOW))
    position_ids = torch.arange(ids.shape[1])[None]
    inputs = dict(input_ids=ids, position_ids=position_ids, logits_to_keep=1, use_cache=True)
    with torch.no_grad():
        whole = model(**inputs).logits
        waits = DeviceWaits()
        with waits:
            chunked = chunked_forward(
                model, dict(inputs, cache=DynamicCache(config=model.config)), ids.shape[1] // chunks
            )
        assert waits.count == 1
        torch.testing.assert_close(chunked.logits, whole, rtol=1e-4, atol=5e-5)
        packed = dict(inputs, position_ids=torch.cat([position_ids[:, :5], position_ids[:, 5:] - 5], 1))
        with pytest.raises(ValueError, match="packed documents"):
            chunked_forward(model, dict(packed, cache=DynamicCache(config=model.config)), ids.shape[1] // chunks)


PEAK_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from samba_hf import SambaConfig, SambaForCausalLM
    length, chunk, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    # use_cache=False, as Trainer saves it: generate's cache and chunked prefill do not depend on it
    config = SambaConfig.from_preset("tiny", vocab_size=256, prefill_chunk_size=chunk, eos_token_id=None,
                                     use_cache=False)
    model = SambaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, length))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if how == "forward":
            assert torch.isfinite(model(ids, logits_to_keep=1).logits).all()
        else:
            out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                 cache_implementation="static" if how == "static-cache generate" else None)
            assert out.shape == (1, length + 2)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MiB above the baseline
    """
)


def peak_extra_mib(length: int, chunk_size: int, how: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_PROBE, str(length), str(chunk_size), how],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(result.stdout.split()[-1])


@pytest.mark.parametrize("how", ["generate", "static-cache generate"])
def test_a_32k_token_prompt_prefills_in_memory_of_one_chunk(how):
    chunked_32k = peak_extra_mib(32768, 1024, how)
    chunked_4k = peak_extra_mib(4096, 1024, how)
    # One 32K forward would hold (1, 128, 32K) float32 activations per layer: 16 MiB each, and more at once.
    assert chunked_32k < chunked_4k + 48, (chunked_32k, chunked_4k)


def test_a_long_forward_holds_no_tensor_that_grows_faster_than_its_length():
    """A plain forward does not chunk, but none of its tensors grows faster than the input: no (queries x keys)
    window mask, no (length x channels x d_state) scan factors. Every tensor an op creates is recorded."""
    from torch.utils._pytree import tree_flatten

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.largest = max([self.largest, *sizes])
            return out

    config = SambaConfig.from_preset("tiny", vocab_size=256, eos_token_id=None, use_cache=False)
    model = SambaForCausalLM(config).eval()
    length = 16384
    with torch.no_grad(), LargestTensor() as recorder:
        model(torch.randint(0, 256, (1, length)), logits_to_keep=1)
    # in_proj's output is the largest legitimate tensor: length x 2 x expand x hidden = length x 256.
    assert recorder.largest <= 4 * length * config.hidden_size, recorder.largest


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    documents = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 20
    tokenizer = train_tokenizer(documents, vocab_size=300)
    torch.manual_seed(0)
    config = SambaConfig.from_preset(
        "tiny", vocab_size=len(tokenizer), eos_token_id=None, pad_token_id=tokenizer.pad_token_id
    )
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_hub_folder(SambaForCausalLM(config), folder, tokenizer=tokenizer)
    return folder, tokenizer


def test_text_iterator_streamer_streams_the_generated_text(tiny_folder):
    folder, tokenizer = tiny_folder
    model = SambaForCausalLM.from_pretrained(folder).eval()
    inputs = tokenizer("the quick", return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(ids=model.generate(**inputs, max_new_tokens=12, streamer=streamer, **GREEDY))
    )
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    new_tokens = result["ids"][0, inputs["input_ids"].shape[1] :]
    assert streamed.strip() == tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize(
    "source, engine", [("argument", "default"), ("file", "default"), ("stdin", "default"), ("argument", "off")]
)
def test_generate_command_streams_and_reports_speed_and_cache_memory(
    tiny_folder, tmp_path, source, engine, capsys, monkeypatch
):
    folder, _ = tiny_folder
    argv = ["generate", str(folder)] + (["the quick brown"] if source == "argument" else [])
    argv += ["--max-new-tokens", "6", "--greedy", "--device", "cpu"] + (
        ["--no-decode-engine"] if engine == "off" else []
    )
    if source == "file":
        (tmp_path / "prompt.txt").write_text("the quick brown")
        argv += ["--prompt-file", str(tmp_path / "prompt.txt")]
    else:
        monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("the quick brown"))
    settings, generate = [], SambaForCausalLM.generate
    monkeypatch.setattr(
        SambaForCausalLM,
        "generate",
        lambda *args, **kwargs: (settings.append(kwargs["decode_engine"]), generate(*args, **kwargs))[1],
    )
    assert samba_hf_main(argv) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "MiB" in err and "6 generated" in err and "first token after" in err
    assert settings == [engine == "default"]
    assert "graph capture" not in err  # on the CPU, transformers' loop ran


def test_generate_command_reports_the_engines_one_time_costs():
    from samba_hf.cli.generate import report
    from samba_hf.generation import GenerateStats

    line = report(4, 6, 0.0, 0.5, 1.0, GenerateStats(compile_s=1.5, capture_s=0.04), cache_mib=1.0)
    assert "first token after 0.500 s" in line and "10.0 tokens/s" in line and "graph capture 0.040 s" in line
    assert "kernels compiled ahead 1.500 s" in line
