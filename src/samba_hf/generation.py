"""Generation for Samba: chunked prefill, and the decode engine behind `generate()`.

`SambaGenerationMixin` is transformers' `GenerationMixin` with two of its hooks replaced:

- `_prefill` runs a long prompt through the cache `prefill_chunk_size` tokens at a time (the config's
  unless `generate(prefill_chunk_size=...)` says otherwise), eagerly: activation memory O(chunk + window)
  whatever the prompt's length, exact (each chunk continues from the state the last one left).
- `_sample` (greedy search and sampling) hands the decoding loop to a `DecodeEngine` on CUDA. The engine
  replays decode steps (every layer, the logits and the token choice) as captured CUDA graphs over static
  buffers: the Mamba conv and SSM states and the sliding-window keys in ring buffers (`SambaStaticCache`).
  transformers' loop spends most of a small model's step on the host (launching hundreds of kernels, its
  logits processors, a synchronisation per token); a graph replay is one launch, for up to `STEPS_PER_REPLAY`
  steps where nothing needs the tokens one by one.

The engine covers greedy search and sampling with temperature, top-k, top-p, min-p, repetition penalty
and minimum lengths, `num_return_sequences`, end-of-sequence and maximum-length stopping, time limits and
streamers. Everything else (beam search and other decoding modes, custom logits processors or stopping
criteria, per-step scores, attentions or hidden states in the output, dynamic or longrope RoPE, full
attention layers, quantized models, several devices, the CPU) runs transformers' own loop; which path ran
is logged once per reason (logger "samba_hf.generation", level INFO). Both are exact.

Switch: `generate(..., decode_engine=False)` (or `model.generation_config.decode_engine = False`) always
runs transformers' loop; `decode_engine="eager"` runs the engine's step without capturing it, on any
device (for debugging, and for the tests on the CPU).

First call: before the engine's first capture at a batch size, dtype and token choice, a dry run of the call
(one step on scratch buffers, then its prompt's chunks on a scratch cache) compiles the Triton kernels it launches
in parallel, in forked processes on Linux (`samba_kernels.compile_ahead`): on a new machine Triton would otherwise
compile them one after another at their first launch.

Memory: a captured step keeps its buffers (the window's keys and values and the Mamba states of its batch
size: about 75 MB per sequence for samba-421m in bf16) and a private pool for a step's activations, which
its graphs (one per number of steps a replay runs) share. An engine keeps at most `MAX_GRAPHS` steps, one
per (batch size, dtype, token choice), dropping the least recently used; `release_decode_graphs(model)` frees
them all. Steps are reused only while every parameter keeps its address and the model holds only plain
modules; a model with adapter or quantized layers gets a step captured for each call (a few tens of ms), since
their switches (an adapter turned off, say) would not show in a replayed graph.
"""

import collections
import contextlib
import copy
import math
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin
from transformers.generation import GenerationMixin, GenerationMode
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteriaList,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .cache_samba import SambaStaticCache, SlidingWindowRingLayer, count_mamba_tokens, windows_joined_by_copies
from .kernel_dispatch import kernels_serve, requested_implementation

logger = logging.get_logger(__name__)

MAX_GRAPHS = 4
# Steps a replay runs where nothing needs them one at a time: a graph boundary and the loop's work between replays
# cost about 11 µs a step at batch 1 (docs/performance-notes.md). A kept step has a graph of one step and one of
# STEPS_PER_REPLAY; a step captured for one call (adapters, quantized layers) only the first, whose capture costs a
# few tens of ms.
STEPS_PER_REPLAY = 8
# Logits processors that keep the end-of-sequence tokens out below a minimum length (the chooser's length decides).
MIN_LENGTH_PROCESSORS = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)
# Logits processors whose work depends only on the scores: they run in the captured step as they are.
SCORE_ONLY_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
# Whether the fused step's kernels launch as programmatic dependents (Hopper and later): each starts while the
# one before it finishes and loads its weights meanwhile (docs/performance-notes.md has the measurement).
DEPENDENT_LAUNCH = True
# Modules whose forward a replayed graph reproduces for every call (their behaviour has no switches).
PLAIN_MODULE_TYPES = (nn.Linear, nn.Conv1d, nn.Embedding, nn.ModuleList, nn.Identity)


def cache_tensors(cache: Cache) -> list[torch.Tensor]:
    """Every tensor a transformers cache holds: keys/values of attention layers, conv and recurrent
    states of Mamba layers."""
    tensors = []
    for layer in cache.layers:
        for name in ("keys", "values"):
            if isinstance(getattr(layer, name, None), torch.Tensor):
                tensors.append(getattr(layer, name))
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            tensors.extend(t for t in states.values() if isinstance(t, torch.Tensor))
    return tensors


def cache_nbytes(cache: Cache) -> int:
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


class SambaGenerationMixin(GenerationMixin):
    """transformers' GenerationMixin with Samba's chunked prefill and decode engine (see the module docstring)."""

    def _prepare_generation_config(self, generation_config, **kwargs):
        decode_engine = kwargs.pop("decode_engine", None)
        if decode_engine not in (None, True, False, "eager"):
            raise ValueError(f"decode_engine must be True, False or 'eager', got {decode_engine!r}.")
        cache_asked = generation_config is not None or "use_cache" in kwargs
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        if not cache_asked:
            # The model's default generation config copies config.use_cache, which Trainer saves as False. That
            # is a training setting: without a cache, each new token would run the whole sequence again.
            generation_config.use_cache = True
        if decode_engine is not None:
            generation_config.decode_engine = decode_engine
        return generation_config, model_kwargs

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            # transformers 5.25 rolls a Mamba layer back through state histories that Samba's scan does not keep.
            raise ValueError(
                "Assisted generation is not supported with stateful models such as Samba: the Mamba layers' state "
                "cannot be rolled back past rejected draft tokens. Generate without assistant_model / "
                "prompt_lookup_num_tokens."
            )
        if not counts_tokens(self.config):
            raise ValueError(
                "This model's first layer is an MLP-only layer, which keeps no cache, and this transformers reads "
                "the cache's token count from its first layer, so generate() cannot run. Install transformers "
                "5.23 or 5.24 (pip install 'transformers>=5.23,<5.25') to generate with this layout."
            )
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration: bool = True):
        """The prompt's forward; where the prompt is longer than `prefill_chunk_size`, in chunks through the
        cache (`chunked_forward`), eagerly (transformers' own chunked prefill compiles each chunk when the
        cache is static)."""
        chunk_size = generation_config.prefill_chunk_size or self.config.prefill_chunk_size
        per_step_outputs = generation_config.return_dict_in_generate and (
            generation_config.output_hidden_states or generation_config.output_attentions
        )
        cache = model_kwargs.get("cache")
        if cache is None or per_step_outputs or chunk_size is None or input_ids.shape[1] <= chunk_size:
            unchunked = generation_config.prefill_chunk_size
            generation_config.prefill_chunk_size = None
            try:
                return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration)
            finally:
                generation_config.prefill_chunk_size = unchunked
        model_inputs = self.prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=uncached_length(input_ids, generation_config, model_kwargs, is_first_iteration),
            is_first_iteration=is_first_iteration,
            **model_kwargs,
        )
        return chunked_forward(self, model_inputs, chunk_size)

    def _sample(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        **model_kwargs,
    ):
        reason = engine_unavailable(
            self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, model_kwargs
        )
        log_path_once("transformers' decoding loop" if reason else "the decode engine", reason)
        if reason:
            return super()._sample(
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus,
                streamer,
                **model_kwargs,
            )
        return decode_engine(self).generate(
            input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs
        )


def counts_tokens(config) -> bool:
    """Whether transformers' cache for `config` can say how many tokens it holds where generate() asks: transformers
    5.25 asks the first layer, and an MLP-only layer keeps no count (earlier versions asked the first attention
    layer)."""
    if config.layer_types[0] != "mlp":
        return True
    try:
        DynamicCache(config=config).get_seq_length()  # builds the layers only: no tensors yet
    except AttributeError:
        return False
    return True


def uncached_length(input_ids, generation_config, model_kwargs, is_first_iteration: bool) -> int | None:
    """How many of the prompt's tokens the cache has not seen yet, counted as transformers' `_prefill` counts
    them (None: all of `input_ids`; a cache of Mamba layers alone does not count tokens)."""
    cache, inputs_embeds = model_kwargs["cache"], model_kwargs.get("inputs_embeds")
    if all(cache.is_linear):
        return None
    past = cache.get_seq_length()
    if inputs_embeds is not None and is_first_iteration:
        return inputs_embeds.shape[1] - past
    mask = model_kwargs.get("attention_mask")
    mask_length = mask.shape[1] if mask is not None else getattr(generation_config, "_mask_length", -1)
    return input_ids.shape[1] - past if mask_length == input_ids.shape[1] else None


def chunked_forward(model, model_inputs: dict, chunk_size: int):
    """`model(**model_inputs)` run `chunk_size` tokens at a time through `model_inputs["cache"]`, each chunk
    continuing from the state the one before left: the output of the last chunk. The 2D attention mask
    (past and new tokens) is cut at each chunk's end, counted from the mask's end. Nothing reads the outputs of
    the chunks before the last: in those the model's last layer only fills the cache (`last_layer_fills_the_cache`)."""
    tokens = model_inputs.get("input_ids")
    tokens = model_inputs["inputs_embeds"] if tokens is None else tokens
    length, mask = tokens.shape[1], model_inputs.get("attention_mask")
    positions = model_inputs.get("position_ids")
    if positions is not None and mask is None and numbered_from_the_cache(model, positions, model_inputs["cache"]):
        model_inputs = {**model_inputs, "position_ids": None}
    chunks = []
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        chunk = dict(model_inputs)
        for name in ("input_ids", "inputs_embeds"):
            if chunk.get(name) is not None:
                chunk[name] = chunk[name][:, start:end]
        if chunk.get("position_ids") is not None:
            chunk["position_ids"] = chunk["position_ids"][..., start:end]
        if isinstance(mask, torch.Tensor):
            chunk["attention_mask"] = mask[:, : mask.shape[1] - (length - end)]
        chunks.append(chunk)
    with windows_joined_by_copies(model_inputs["cache"]):
        with last_layer_fills_the_cache(model):
            for chunk in chunks[:-1]:
                model(**chunk, return_dict=True)
        return model(**chunks[-1], return_dict=True)


@contextlib.contextmanager
def last_layer_fills_the_cache(model):
    """Inside the block the model's last decoder layer only fills the cache (`fill_cache`) and returns its input,
    for forwards whose outputs nothing reads: the last layer's MLP, and in an attention layer the attention and its
    output projection, are about 6% of samba-421m's work per token (docs/performance-notes.md). Where the layer's
    forward is wrapped (accelerate's hooks) or anything hooks the layer or its modules, nothing changes: a hook
    would see another output (transformers' output capturing records only where a forward asks for hidden states
    or attentions, never in a chunked prefill). Forwards of the same model in other threads meanwhile run the layer
    whole."""
    layer, owner = model.model.layers[-1], threading.get_ident()
    hooks = [
        *nn.modules.module._global_forward_hooks.values(),
        *nn.modules.module._global_forward_pre_hooks.values(),
        *(hook for module in layer.modules() for hook in module._forward_hooks.values()),
        *(hook for module in layer.modules() for hook in module._forward_pre_hooks.values()),
    ]
    if "forward" in vars(layer) or any(hook.__module__ != "transformers.utils.output_capturing" for hook in hooks):
        yield
        return

    def forward(*args, **kwargs):
        if threading.get_ident() != owner:
            return type(layer).forward(layer, *args, **kwargs)
        return fill_cache(layer, *args, **kwargs)

    layer.forward = forward
    try:
        yield
    finally:
        if vars(layer).get("forward") is forward:  # another thread's block may have put its own in meanwhile
            del layer.forward


def fill_cache(
    layer, hidden_states, attention_mask=None, position_embeddings=None, cache=None, seq_idx=None, **kwargs
):
    """What the decoder layer `layer` leaves in `cache` for `hidden_states`, without its output: a Mamba mixer's
    states, an attention layer's keys and values (not its attention). Returns `hidden_states`."""
    mixer, mixer_input = layer.mixer, layer.mixer_norm(hidden_states)
    if layer.mixer_type == "linear_attention":
        mixer(mixer_input, cache=cache, padding_mask=attention_mask, seq_idx=seq_idx)
    elif layer.mixer_type != "mlp" and cache is not None:  # an MLP-only layer keeps nothing in the cache
        _, key, value = mixer.project(mixer_input, position_embeddings)
        cache.update(key, value, mixer.layer_idx)
    return hidden_states


def numbered_from_the_cache(model, position_ids, cache) -> bool:
    """Whether position_ids number the prompt's tokens on from the cache's count, as the model numbers them when
    it gets none (without attention layers, where the count is not kept: whether they step by one). Checked once
    for a chunked prompt, which then runs without them: given position ids and no mask, the model reads the ids of
    every chunk for packed documents, a wait on the GPU per chunk (docs/performance-notes.md)."""
    first_attention = model.model.first_attention_layer
    steps = torch.arange(position_ids.shape[-1], device=position_ids.device)
    start = position_ids[..., :1] if first_attention is None else cache.get_seq_length(first_attention)
    return bool((position_ids == start + steps).all())


_logged_paths = set()


def log_path_once(path: str, reason: str | None) -> None:
    if (path, reason) not in _logged_paths:
        _logged_paths.add((path, reason))
        logger.info("samba: generate() decodes with %s%s", path, f" ({reason})" if reason else "")


def engine_unavailable(
    model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, model_kwargs
) -> str | None:
    """Why this call's decoding cannot run on the decode engine, or None where it can."""
    config = model.config
    setting = getattr(generation_config, "decode_engine", True)
    if setting is False:
        return "decode_engine=False"
    if setting is not True and setting != "eager":
        return f"decode_engine={setting!r}"
    if setting is True and input_ids.device.type != "cuda":
        return f"the engine captures CUDA graphs; the model is on {input_ids.device.type}"
    if synced_gpus or len({p.device for p in model.parameters()}) > 1:
        return "the model spans several devices"
    if getattr(model, "hf_quantizer", None) is not None:
        return "quantized weights"
    if generation_config.return_dict_in_generate and (
        generation_config.output_scores
        or generation_config.output_logits
        or generation_config.output_attentions
        or generation_config.output_hidden_states
    ):
        return "per-step scores, logits, attentions or hidden states were asked for"
    if "full_attention" in config.layer_types:
        return "full attention layers"
    if config._attn_implementation not in ("samba_sdpa", "sdpa"):
        return f"attention implementation {config._attn_implementation!r} (the engine masks ring buffers for sdpa)"
    if config.use_rope and config.rope_parameters.get("rope_type") in ("dynamic", "longrope"):
        return "a RoPE type that rescales with the sequence length"
    unsupported = [type(p).__name__ for p in logits_processor if TokenChooser.step_for(p) is None]
    unsupported += [
        type(c).__name__
        for c in stopping_criteria
        if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria, MaxTimeCriteria))
    ]
    if unsupported:
        return f"logits processors or stopping criteria outside the engine: {sorted(set(unsupported))}"
    cache = model_kwargs.get("cache")
    if cache is not None and not isinstance(cache, (SambaStaticCache,)) and type(cache).__name__ != "DynamicCache":
        return f"a {type(cache).__name__}"
    return None


def decode_engine(model) -> "DecodeEngine":
    """The model's decode engine, created on first use (kept outside the module tree: no parameters)."""
    engine = model.__dict__.get("_decode_engine")
    if engine is None:
        engine = model.__dict__["_decode_engine"] = DecodeEngine(model)
    return engine


def release_decode_graphs(model) -> None:
    """Free the captured decode graphs of `model` and their memory."""
    engine = model.__dict__.get("_decode_engine")
    if engine is not None:
        engine.graphs.clear()


@dataclass
class GenerateStats:
    """Timings of the last `generate` call that ran on the decode engine (seconds)."""

    compile_s: float = 0.0  # compiling the call's Triton kernels ahead, in parallel (0 after the first such call)
    dry_run_s: float = 0.0  # of compile_s, the dry run itself, before the wait for the compilations it started
    prefill_s: float = 0.0  # the prompt's forward, to the first token's logits
    capture_s: float = 0.0  # capturing the step's graph (0 when a kept graph was replayed)
    decode_s: float = 0.0  # the decoding steps after the first token
    new_tokens: int = 0  # tokens generated per row
    graph_replayed: bool = False


class DecodeEngine:
    """Decoding steps of one model, each a replayed CUDA graph (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.compiled: set = set()  # (batch, dtype, token choice) of the calls whose kernels were compiled ahead
        self.stats = GenerateStats()

    def generate(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs):
        model, device = self.model, input_ids.device
        self.stats = GenerateStats(new_tokens=1)
        chooser = TokenChooser(logits_processor, stopping_criteria, generation_config, input_ids, model.config)
        max_new = stopping_criteria.max_length - input_ids.shape[1]
        if max_new > 1 and self.compiles_ahead(chooser, input_ids.shape[0], generation_config):
            self.compile_kernels_ahead(input_ids, chooser, generation_config, model_kwargs)
        started = time.perf_counter()
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        cache = model_kwargs["cache"]
        first = chooser(outputs.logits[:, -1].to(dtype=torch.float32, device=device))
        del outputs
        finished = chooser.unfinished.cpu() == 0  # waits for the prompt's forward
        self.stats.prefill_s = time.perf_counter() - started
        if streamer is not None:
            streamer.put(first.cpu())

        cache_is_returned = generation_config.return_dict_in_generate or getattr(cache, "_is_user_defined", False)
        decoded = first.new_empty(first.shape[0], 0)
        if max_new > 1 and not bool(finished.all()):
            step = self.step_for(chooser, input_ids.shape[0], generation_config)
            step.load(cache, model_kwargs.get("attention_mask"), model_kwargs.get("position_ids"), input_ids, first)
            decoded = self.decode(
                step, max_new - 1, stopping_criteria, streamer, finished, every_step=cache_is_returned
            )
            if cache_is_returned:
                step.store(cache, decoded=decoded.shape[1])  # the last token is not fed yet
        sequences = torch.cat([input_ids, first[:, None], decoded], dim=1)
        self.stats.new_tokens = 1 + decoded.shape[1]
        if streamer is not None:
            streamer.end()
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences, cache=cache)
        return sequences

    def decode(
        self, step: "DecodeStep", steps: int, stopping_criteria, streamer, finished: torch.Tensor, every_step: bool
    ) -> torch.Tensor:
        """Up to `steps` more tokens (batch, n), until every row has finished or time is up; `finished` (batch,)
        bool on the host, the rows finished before, is updated. Each replay's tokens are copied to the host as it
        ends and checked there for the rows' ends. Where the tokens or the state are needed exactly at each step (a
        streamer, a returned cache), a replay is one step, checked before the next; otherwise a replay runs
        `steps_per_replay` steps and is checked while the next one runs, so that the device never waits for the
        host, and the steps past the last row's end are dropped."""
        max_time = next((c for c in stopping_criteria if isinstance(c, MaxTimeCriteria)), None)
        exact = every_step or streamer is not None
        per_replay, running_ahead = (1, 0) if exact else (step.steps_per_replay, 1)
        ends = step.chooser.ends_on_host  # None without end tokens: then no row finishes early
        pinned = step.device.type == "cuda"
        tokens = torch.empty(finished.shape[0], steps, dtype=torch.long, pin_memory=pinned)
        unchecked = collections.deque()  # (first step, steps, the copy's end) of replays not yet checked
        done, end = 0, None
        started = time.perf_counter()
        while done < steps and end is None:
            count = per_replay if steps - done >= per_replay else 1
            tokens[:, done : done + count].copy_(step.run(count), non_blocking=pinned)
            unchecked.append((done, count, copied_event(step.device)))
            done += count
            out_of_time = max_time is not None and time.time() - max_time.initial_timestamp > max_time.max_time
            while len(unchecked) > (0 if done == steps or out_of_time else running_ahead) and end is None:
                first, count, copied = unchecked.popleft()
                if copied is not None:
                    copied.synchronize()
                if streamer is not None:
                    streamer.put(tokens[:, first])
                if ends is not None:
                    ended = steps_until_every_row_ended(ends, finished, tokens[:, first : first + count])
                    end = None if ended is None else first + ended
            if out_of_time:
                break
        synchronize(step.device)
        self.stats.decode_s = time.perf_counter() - started
        return tokens[:, : done if end is None else end].to(step.device)

    def step_key(self, chooser: "TokenChooser", batch: int, generation_config) -> tuple | None:
        """What a kept step is found by; None where steps are not kept (see the module docstring)."""
        model = self.model
        if not plain_modules(model, type(model).__module__):
            return None
        use_graph = getattr(generation_config, "decode_engine", True) is True
        return (use_graph, batch, model.dtype, chooser.key, tuple(p.data_ptr() for p in model.parameters()))

    def compiles_ahead(self, chooser: "TokenChooser", batch: int, generation_config) -> bool:
        """Whether this call first compiles its kernels ahead: the engine's first call that captures a step at this
        batch size, dtype and token choice (a model with adapters captures at every call, but compiles once)."""
        graph = getattr(generation_config, "decode_engine", True) is True
        return graph and (batch, self.model.dtype, chooser.key) not in self.compiled

    def compile_kernels_ahead(self, input_ids, chooser: "TokenChooser", generation_config, model_kwargs) -> None:
        """Compile the Triton kernels this call launches, in parallel, before it runs (`samba_kernels.compile_ahead`):
        a dry run of one decode step on scratch buffers, then on a scratch cache of the prompt's chunks as the
        prefill cuts them, less the middle ones (the first, one that continues a state, and a last as long as the
        prompt's last). The step goes first: its kernels compile while the prompt's dry run, the longer, goes on. A
        later prompt's chunks of other lengths may still compile a kernel variant at launch."""
        model = self.model
        if not kernels_serve(model.config.kernel_implementation, input_ids.device):
            return
        import samba_kernels

        started = time.perf_counter()
        chunk = generation_config.prefill_chunk_size or model.config.prefill_chunk_size or input_ids.shape[1]
        prompt = input_ids.shape[1]
        length = min(prompt, 2 * chunk + (prompt - 1) % chunk + 1)
        scratch = {**model_kwargs, "cache": DynamicCache(config=model.config)}
        for name in ("attention_mask", "position_ids"):
            if isinstance(scratch.get(name), torch.Tensor):
                scratch[name] = scratch[name][..., :length]
        if isinstance(scratch.get("inputs_embeds"), torch.Tensor):
            scratch["inputs_embeds"] = scratch["inputs_embeds"][:, :length]
        with samba_kernels.compile_ahead(), random_state_kept(input_ids.device):
            step = DecodeStep(model, input_ids.shape[0], chooser.copy(), False, STEPS_PER_REPLAY)
            with kernel_launches():
                step.forward()
            if length > 0:
                model._prefill(input_ids[:, :length], generation_config, scratch)
            self.stats.dry_run_s = time.perf_counter() - started
        self.compiled.add((input_ids.shape[0], model.dtype, chooser.key))
        self.stats.compile_s = time.perf_counter() - started

    def step_for(self, chooser: "TokenChooser", batch: int, generation_config) -> "DecodeStep":
        model = self.model
        use_graph = getattr(generation_config, "decode_engine", True) is True
        key = self.step_key(chooser, batch, generation_config)
        step = self.graphs.get(key) if key is not None else None
        if step is not None:
            self.graphs.move_to_end(key)
            self.stats.graph_replayed = True
        else:
            started = time.perf_counter()
            # The step's own chooser: the capture's warm-up runs choose tokens too, and must not count them for
            # this call.
            step = DecodeStep(model, batch, chooser.copy(), use_graph, STEPS_PER_REPLAY if key is not None else 1)
            self.stats.capture_s = time.perf_counter() - started
            if key is not None:
                self.graphs[key] = step
                while len(self.graphs) > MAX_GRAPHS:
                    self.graphs.popitem(last=False)
        step.chooser.adopt(chooser)
        return step


def kernel_launches():
    """The context in which the engine launches samba_kernels' decode kernels: as programmatic dependents or
    not (DEPENDENT_LAUNCH), whatever torch.compile's switch says."""
    try:
        import samba_kernels
    except ImportError:
        return contextlib.nullcontext()
    return samba_kernels.programmatic_dependent_launch(DEPENDENT_LAUNCH)


def random_state_kept(device: torch.device):
    """A context whose random draws leave the random state (the CPU's, and `device`'s) as it was: a seeded first
    call then samples as a later call does, whatever the engine ran before its own steps."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copied_event(device: torch.device) -> "torch.cuda.Event | None":
    """An event at this point of `device`'s current stream (None on the CPU, where copies are done when issued)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def steps_until_every_row_ended(ends: torch.Tensor, finished: torch.Tensor, tokens: torch.Tensor) -> int | None:
    """Of `tokens` (batch, n), the next steps' tokens: how many steps run up to the one after which every row has
    finished, or None where some row has not. `finished` (batch,) bool, the rows finished before them, is updated.
    As the token choice ends them, a row ends at its first end token (`ends` (vocab,) bool), then only pads."""
    ended = ends[tokens] & ~finished[:, None]
    first = torch.where(ended.any(dim=1), ended.int().argmax(dim=1), -1)  # argmax: the first True
    finished |= ended.any(dim=1)
    return int(first.max()) + 1 if bool(finished.all()) else None


def processor_key(processor) -> tuple:
    """A hashable description of what a logits processor contributes to a captured step. Settings that
    change from call to call (a prompt's length, its padding) live in the chooser's state instead."""
    if isinstance(processor, RepetitionPenaltyLogitsProcessor):
        return (type(processor).__name__, processor.penalty)
    if isinstance(processor, MIN_LENGTH_PROCESSORS):
        return (type(processor).__name__,)

    def plain(value):
        return tuple(value.flatten().tolist()) if isinstance(value, torch.Tensor) else value

    return (type(processor).__name__, *sorted((name, plain(value)) for name, value in vars(processor).items()))


class TokenChooser:
    """The token choice of transformers' `_sample` for one step, as tensor operations that never wait for the
    device, so that a CUDA graph can hold them: the logits processors in their order, greedy search or
    sampling, and the end-of-sequence rule (a finished row takes the pad token). Its state (which rows have
    finished, the tokens seen so far for a repetition penalty, the sequence length, the length from which
    end-of-sequence is allowed) is kept in tensors that it updates in place."""

    STATE = ("unfinished", "length", "eos_allowed_from", "seen")

    def __init__(
        self,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config,
        input_ids: torch.Tensor,
        config,
    ):
        batch, length = input_ids.shape
        device = input_ids.device
        self.do_sample = generation_config.do_sample
        self.steps = [self.step_for(processor) for processor in logits_processor]
        eos = next((c.eos_token_id for c in stopping_criteria if isinstance(c, EosTokenCriteria)), None)
        self.eos = None if eos is None else eos.to(device)
        self.pad = generation_config._pad_token_tensor
        self.pad = None if self.pad is None else self.pad.to(device)
        self.unfinished = torch.ones(batch, dtype=torch.long, device=device)
        self.length = torch.tensor(length, device=device)
        vocab = torch.arange(config.vocab_size, device=device)
        eos_ids = self.eos
        for processor in logits_processor:  # the processors' own end-of-sequence ids where they have them
            if isinstance(processor, MIN_LENGTH_PROCESSORS):
                eos_ids = processor.eos_token_id.to(device)
        self.eos_mask = None if eos_ids is None else torch.isin(vocab, eos_ids)
        # Which tokens end a row, looked up by token: for a long list of ids, torch.isin(tokens, eos) takes a path
        # that a CUDA graph cannot capture (1,023 ids failed the capture on the H200).
        self.ends = None if self.eos is None else torch.isin(vocab, self.eos)
        self.ends_on_host = None if self.eos is None else self.ends.cpu()  # for the decode loop's checks
        minimum = [p.min_length for p in logits_processor if isinstance(p, MinLengthLogitsProcessor)]
        minimum += [
            p.prompt_length_to_skip + p.min_new_tokens
            for p in logits_processor
            if isinstance(p, MinNewTokensLengthLogitsProcessor)
        ]
        self.eos_allowed_from = torch.tensor(max(minimum, default=0), device=device)
        self.seen = None
        penalty = next((p for p in logits_processor if isinstance(p, RepetitionPenaltyLogitsProcessor)), None)
        if penalty is not None:  # as transformers counts them: the prompt's tokens, less those it says to ignore
            ignored = penalty.prompt_ignore_length
            ignored = torch.as_tensor(0 if ignored is None else ignored, device=device).reshape(-1, 1)
            counted = torch.arange(length, device=device)[None, :] >= ignored
            seen = torch.zeros(batch, config.vocab_size + 1, dtype=torch.bool, device=device)
            self.seen = seen.scatter_(1, torch.where(counted, input_ids, config.vocab_size), True)[:, :-1]
        # samba_kernels, where a step's choice is its greedy_token_: greedy, with a minimum length at most
        self.kernels = None
        if not self.do_sample and all(type(p) in MIN_LENGTH_PROCESSORS for p in logits_processor):
            try:
                import samba_kernels
            except ImportError:  # a remote-code install may lack it
                samba_kernels = None
            self.kernels = samba_kernels
        self.key = (
            self.do_sample,
            tuple(processor_key(p) for p in logits_processor),
            None if eos is None else tuple(eos.tolist()),
            None if self.pad is None else int(self.pad),
        )

    @staticmethod
    def step_for(processor):
        """`processor` as a function (chooser, scores) -> scores without host synchronisation, or None."""
        if type(processor) in SCORE_ONLY_PROCESSORS:
            return lambda chooser, scores: processor(None, scores)
        if type(processor) is RepetitionPenaltyLogitsProcessor:
            penalty = processor.penalty  # as transformers': scores of seen tokens divided (x penalty where < 0)
            return lambda chooser, scores: torch.where(
                chooser.seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores
            )
        if type(processor) in MIN_LENGTH_PROCESSORS:
            return lambda chooser, scores: torch.where(
                (chooser.length < chooser.eos_allowed_from) & chooser.eos_mask, -math.inf, scores
            )
        return None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row from the last position's logits (float32), updating the state."""
        scores = logits
        for step in self.steps:
            scores = step(self, scores)
        if self.do_sample:  # an exponential race: the argmax of p / Exp(1) is distributed as p (no host sync)
            probs = scores.softmax(dim=-1)
            tokens = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)
        else:
            tokens = scores.argmax(dim=-1)
        if self.eos is not None:
            ended = self.ends[tokens]
            tokens = tokens * self.unfinished + self.pad * (1 - self.unfinished)
            self.unfinished.mul_(~ended)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        self.length.add_(1)
        return tokens

    def choose_into(
        self, logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, counters: list = ()
    ) -> None:
        """A decode step's choice: each row's next token from the last position's logits written into `tokens`
        (batch, 1), `positions` (batch, 1) counted up, and `counters` (0-dim tensors of the step's) with the
        chooser's length; the state updated as by a call."""
        if self.kernels is None:
            tokens.copy_(self(logits.float())[:, None])
            positions.add_(1)
            if counters:
                torch._foreach_add_(list(counters), 1)
            return
        # Two launches, where PyTorch's argmax and bookkeeping take six to eight
        eos = (self.unfinished, self.ends, self.pad) if self.eos is not None else (None,) * 3
        min_length = (self.eos_mask, self.eos_allowed_from) if self.steps else (None,) * 2
        self.kernels.greedy_token_(logits, tokens, positions, self.length, *eos, *min_length)
        torch._foreach_add_([self.length, *counters], 1)

    def copy(self) -> "TokenChooser":
        """A chooser of the same settings with a state of its own."""
        twin = copy.copy(self)
        for name in self.STATE:
            if getattr(self, name) is not None:
                setattr(twin, name, getattr(self, name).clone())
        return twin

    def adopt(self, other: "TokenChooser") -> None:
        """Take the state of `other`, a chooser of the same settings (a step's chooser starts a new call)."""
        for name in self.STATE:
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(other, name))


class DecodeStep:
    """Decode steps of `model` at a fixed batch size, over static buffers: the model's forward on the last
    token (a `SambaStaticCache` with rings of `sliding_window` slots), then the token choice. `run(n)` runs n steps
    (1 or `steps_per_replay`), each reading its input from a column of `tokens` and writing the next; captured as
    CUDA graphs (one per n) and replayed where `use_graph`, else run as they are."""

    def __init__(self, model, batch: int, chooser: TokenChooser, use_graph: bool, steps_per_replay: int = 1):
        config, self.device = model.config, model.device
        self.model, self.chooser = model, chooser
        window = config.sliding_window if "sliding_attention" in config.layer_types else 1
        self.cache = SambaStaticCache(config=config, max_cache_len=window)
        self.rings = [layer for layer in self.cache.layers if isinstance(layer, SlidingWindowRingLayer)]
        self.steps_per_replay = steps_per_replay
        # column 0 the next input; n steps write columns 1..n, then column n moves to 0
        self.tokens = torch.zeros(batch, steps_per_replay + 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.readable = torch.zeros(batch, window, dtype=torch.bool, device=self.device)
        self.allocate(config, batch, model.dtype)
        self.fused = FusedStep(model, self) if FusedStep.applies(model, batch) else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_graph:
            self.capture()

    def allocate(self, config, batch: int, dtype: torch.dtype) -> None:
        """The cache's buffers, zeroed: the engine's state lives at these addresses for the graph's life."""
        kv = torch.zeros(batch, config.num_key_value_heads, 1, config.head_dim or 1, dtype=dtype, device=self.device)
        for layer, layer_type in zip(self.cache.layers, config.layer_types):
            if layer_type == "sliding_attention":
                layer.lazy_initialization(kv, kv)
            elif layer_type == "linear_attention":
                channels = config.mamba_intermediate_size
                conv = torch.zeros(batch, channels, config.conv_kernel - 1, dtype=dtype, device=self.device)
                ssm = torch.zeros(batch, channels, config.state_size, dtype=torch.float32, device=self.device)
                layer.lazy_initialization(conv_states=conv, recurrent_states=ssm)
                layer.has_previous_state[0] = True

    def forward(self, column: int = 0) -> None:
        """One step: the next token of each row from tokens[:, column], into tokens[:, column + 1]."""
        inputs, outputs = self.tokens[:, column : column + 1], self.tokens[:, column + 1 : column + 2]
        masks = {"linear_attention": None}
        if self.rings:
            masks["sliding_attention"] = self.readable[:, None, None, :]
        if self.rings and not (self.fused is not None and self.fused.marks_new_slots):
            # the new token's slot becomes readable; its key is written there by the forward
            slot = self.rings[0].cumulative_length % self.rings[0].max_cache_len
            self.readable.index_fill_(1, slot.view(1), True)
        if self.fused is not None:
            logits = self.fused(inputs, masks)
        else:
            logits = self.model(
                input_ids=inputs,
                position_ids=self.positions,
                cache=self.cache,
                attention_mask=masks,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        # the rings' counts of the fused step's layers (the others count their own), after its last kernel
        self.chooser.choose_into(logits, outputs, self.positions, self.fused.ring_counts if self.fused else ())

    def advance(self, steps: int) -> None:
        for column in range(steps):
            self.forward(column)
        self.tokens[:, 0].copy_(self.tokens[:, steps])

    def warm_up(self) -> None:
        """Two runs before the capture (kernels compiled, library workspaces allocated). They change the buffers,
        which `load` sets before every call, and leave the random state as it was, so that a seeded first call
        samples as a later call does."""
        with random_state_kept(self.device), kernel_launches():
            for _ in range(2):
                self.forward()

    def capture(self) -> None:
        stream = torch.cuda.Stream(self.device)  # the warm-up runs on a side stream, as CUDA graphs ask
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.warm_up()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        pool = None  # one memory pool: the graphs replay one after another, and no tensor outlives a replay
        for steps in sorted({1, self.steps_per_replay}):
            self.graphs[steps] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graphs[steps], pool=pool), kernel_launches():
                self.advance(steps)
            pool = self.graphs[steps].pool()

    def run(self, steps: int = 1) -> torch.Tensor:
        """`steps` steps (1 or `steps_per_replay`): their tokens (batch, steps), a view that the next run overwrites."""
        if self.graphs:
            self.graphs[steps].replay()
        else:
            with kernel_launches():
                self.advance(steps)
        return self.tokens[:, 1 : steps + 1]

    def load(self, cache: Cache, attention_mask, position_ids, input_ids, first_token) -> None:
        """Set the buffers to the state after the prompt (`cache`, filled by the prefill), with `first_token`
        (batch,) the next input. attention_mask / position_ids: generate's, the first token's included."""
        seen = input_ids.shape[1]
        # One copy call and one count call for every layer: on the host, a launch per tensor was a few tenths of a
        # millisecond of every call, during which the device waits.
        targets, sources, counts = [], [], []
        for source, target in zip(cache.layers, self.cache.layers):
            if isinstance(target, LinearAttentionCacheLayerMixin):
                conv = target.conv_states[0]
                targets += [conv, target.recurrent_states[0]]
                sources += [source.conv_states[0][..., -conv.shape[-1] :], source.recurrent_states[0]]
            elif isinstance(target, SlidingWindowRingLayer):
                keys, values = ordered_window(source, seen)
                # the window's tokens, oldest first, at slots (seen - kept .. seen - 1) % slots: one run of slots, or
                # two where it wraps around the ring's end
                slots, kept = target.max_cache_len, keys.shape[2]
                start = (seen - kept) % slots
                before_end = min(kept, slots - start)
                for ring, window in ((target.keys, keys), (target.values, values)):
                    targets += [ring[:, :, start : start + before_end], ring[:, :, : kept - before_end]]
                    sources += [window[:, :, :before_end], window[:, :, before_end:]]
                counts.append(target.cumulative_length)
        torch._foreach_copy_(targets, sources)
        if counts:
            torch._foreach_zero_(counts)
            torch._foreach_add_(counts, seen)
        if self.rings:
            slots = self.readable.shape[1]
            index = torch.arange(slots, device=self.device)
            positions = (seen - 1) - ((seen - 1) - index) % slots  # the token each slot holds
            readable = (positions >= 0).expand_as(self.readable)
            if attention_mask is not None:
                readable = readable & attention_mask[:, positions.clamp(min=0)].bool()
            self.readable.copy_(readable)
        self.tokens[:, 0].copy_(first_token)
        self.positions.copy_(position_ids[:, -1:] if position_ids is not None else seen)

    def store(self, cache: Cache, decoded: int) -> None:
        """Write the buffers' state back into `cache` (the caller's, left by the prompt: it continues from
        there), `decoded` tokens after the prompt."""
        for layer_idx, (target, source) in enumerate(zip(cache.layers, self.cache.layers)):
            if isinstance(source, LinearAttentionCacheLayerMixin):
                target.conv_states[0].copy_(source.conv_states[0][..., -target.conv_states[0].shape[-1] :])
                target.recurrent_states[0].copy_(source.recurrent_states[0])
                count_mamba_tokens(cache, layer_idx, decoded)
            elif isinstance(source, SlidingWindowRingLayer):
                seen = int(source.cumulative_length)
                order = source.ordered_slots(seen)
                if isinstance(target, DynamicSlidingWindowLayer):  # it keeps the last window - 1 keys, in order
                    order = order[-(target.sliding_window - 1) :]
                    target.keys, target.values = source.keys[:, :, order].clone(), source.values[:, :, order].clone()
                    target.cumulative_length = seen
                else:
                    target.keys.index_copy_(2, target.ordered_slots(seen)[-order.numel() :], source.keys[:, :, order])
                    target.values.index_copy_(
                        2, target.ordered_slots(seen)[-order.numel() :], source.values[:, :, order]
                    )
                    target.cumulative_length.fill_(seen)


def ordered_window(layer, seen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a sliding-window cache layer holds after `seen` tokens, oldest first."""
    if isinstance(layer, SlidingWindowRingLayer):
        order = layer.ordered_slots(seen)
        return layer.keys[:, :, order], layer.values[:, :, order]
    return layer.keys, layer.values  # DynamicSlidingWindowLayer keeps them in order


def plain_modules(module: nn.Module, model_module: str) -> bool:
    """Whether every module inside `module` is the model's own (defined in `model_module`) or a plain torch
    layer, none of them hooked: then a fused kernel may read their weights, and a replayed graph reproduces
    their forward. Adapters (LoRA), quantized layers and accelerate's offloading hooks keep their own forward."""
    return all(
        (type(part) in PLAIN_MODULE_TYPES or type(part).__module__ == model_module)
        and not (part._forward_hooks or part._forward_pre_hooks or hasattr(part, "_hf_hook"))
        for part in module.modules()
    )


class FusedStep:
    """A batch-1 decode step on samba_kernels' one-row kernels: each norm folded into the product that reads
    it, each residual update into the product that writes it, a Mamba mixer's token in two launches
    (`mamba_decode_step`) and an attention layer's token, with its RoPE and ring update, in one
    (`ring_decode_attention`): five or six launches a layer, where the modules launch dozens. A layer whose
    modules are not plain (`plain_modules`) runs its own forward over the same buffers. The step computes the
    model's function with float32 intermediates (the modules round some to bf16): tokens agree with the
    modules' up to ties within rounding."""

    @staticmethod
    def applies(model, batch: int) -> bool:
        try:
            import samba_kernels  # installed with samba-hf; a remote-code install may lack it
        except ImportError:
            return False
        probe = next(model.parameters())
        return (
            batch == 1
            and samba_kernels.use_triton(probe)
            and requested_implementation(model.config.kernel_implementation) in ("auto", "triton")
        )

    def __init__(self, model, step: DecodeStep):
        import samba_kernels

        self.kernels, self.step, self.model = samba_kernels, step, model
        config, base = model.config, model.model
        own = type(model).__module__
        self.layers = [
            (layer, cache_layer, plain_modules(layer, own))
            for layer, cache_layer in zip(base.layers, step.cache.layers)
        ]
        # the embedding, and the final norm with the head, also run their modules where those are not plain
        self.plain_embedding = plain_modules(base.embed_tokens, own)
        self.plain_head = plain_modules(base.norm, own) and plain_modules(model.lm_head, own)
        self.ring_counts = [
            cache_layer.cumulative_length
            for _, cache_layer, plain in self.layers
            if plain and isinstance(cache_layer, SlidingWindowRingLayer)
        ]
        # ring_decode_attention marks the new slot readable: where every ring's layer runs it, the first does so
        # before any other reads the mask
        self.marks_new_slots = len(self.ring_counts) == len(step.rings)
        self.residual = torch.zeros(
            1, config.hidden_size, device=step.device, dtype=torch.float32 if config.residual_in_fp32 else model.dtype
        )
        # ring_decode_attention's count of finished programs, which its last program sets back to 0: the layers,
        # one after another, share it
        self.attention_finished = torch.zeros(config.num_key_value_heads, dtype=torch.int32, device=step.device)
        rotary = base.rotary_emb
        half = (config.head_dim or 2) // 2
        self.inv_freq = rotary.inv_freq if rotary is not None else torch.zeros(half, device=step.device)
        self.rope_scale = rotary.attention_scaling if rotary is not None else 1.0

    def __call__(self, tokens: torch.Tensor, masks: dict) -> torch.Tensor:
        """The logits (1, vocab) after `tokens` (1, 1)."""
        kernels, step, base, residual = self.kernels, self.step, self.model.model, self.residual
        if self.plain_embedding:
            kernels.embedding_rows_(base.embed_tokens.weight, tokens, residual)
        else:
            residual.copy_(base.embed_tokens(tokens)[:, 0])
        position_embeddings = None
        for layer, cache_layer, plain in self.layers:
            if not plain:  # the layer's own forward, on the same buffers
                if position_embeddings is None and base.rotary_emb is not None:
                    position_embeddings = base.rotary_emb(residual, step.positions)
                out = layer(
                    residual[:, None],
                    attention_mask=masks.get(layer.mixer_type),
                    position_embeddings=position_embeddings,
                    cache=step.cache,
                )
                residual.copy_(out[:, 0])
                continue
            norm, mixer = layer.mixer_norm, layer.mixer
            if layer.mixer_type == "linear_attention":
                xz = kernels.matvec(
                    residual,
                    mixer.in_proj.weight,
                    mixer.in_proj.bias,
                    norm_weight=norm.weight,
                    eps=norm.variance_epsilon,
                )
                x, z = xz.chunk(2, dim=-1)
                y = kernels.mamba_decode_step(
                    x,
                    z,
                    cache_layer.conv_states[0],
                    cache_layer.recurrent_states[0],
                    mixer.conv1d.weight[:, 0],
                    mixer.conv1d.bias,
                    mixer.x_proj.weight,
                    mixer.dt_proj.weight,
                    mixer.dt_proj.bias,
                    mixer.A_log,
                    mixer.D,
                )
                kernels.matvec_add_(residual, y, mixer.out_proj.weight, mixer.out_proj.bias)
            elif layer.mixer_type == "mlp":
                self.swiglu(norm, mixer)
            else:
                q, k, v = kernels.stacked_matvec(
                    residual,
                    [mixer.q_proj.weight, mixer.k_proj.weight, mixer.v_proj.weight],
                    norm_weight=norm.weight,
                    eps=norm.variance_epsilon,
                )
                out = kernels.ring_decode_attention(
                    q,
                    k,
                    v,
                    cache_layer.keys,
                    cache_layer.values,
                    step.readable,
                    cache_layer.cumulative_length,
                    step.positions,
                    self.inv_freq,
                    self.rope_scale,
                    mixer.scaling,
                    self.attention_finished,
                )
                kernels.matvec_add_(residual, out, mixer.o_proj.weight)
            if layer.mlp is not None:
                self.swiglu(layer.mlp_norm, layer.mlp)
        norm, head = base.norm, self.model.lm_head
        if not self.plain_head:
            return head(norm(residual[:, None]))[:, -1]
        return kernels.matvec(residual, head.weight, head.bias, norm_weight=norm.weight, eps=norm.variance_epsilon)

    def swiglu(self, norm, mlp) -> None:
        hidden = self.kernels.gated_matvec(
            self.residual, mlp.gate_proj.weight, mlp.up_proj.weight, norm_weight=norm.weight, eps=norm.variance_epsilon
        )
        self.kernels.matvec_add_(self.residual, hidden, mlp.down_proj.weight)
