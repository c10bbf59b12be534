"""Samba's cache layers: transformers' `StaticCache` with the sliding-window layers in ring buffers, and the
chunked prefill's sliding-window layer (`ChunkWindowLayer`).

The dynamic cache is transformers' own: `DynamicCache(config=config)` builds conv + SSM state layers for the
Mamba mixers and windowed key/value layers for the sliding-window attention from `layer_types`; the chunked
prefill only changes how those window layers join keys, for its duration.
"""

import contextlib

import torch
from transformers.cache_utils import (
    Cache,
    DynamicSlidingWindowLayer,
    StaticCache,
    StaticLayer,
    StaticSlidingWindowLayer,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .configuration_samba import SambaConfig

# Attention implementations that read a ring buffer through a mask saying which slots to read. Flash
# attention takes a window rather than a mask, so it keeps transformers' ordered layers.
RING_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "samba_sdpa")


class SlidingWindowRingLayer(StaticLayer):
    """Static cache of a sliding-window attention layer: its last `min(sliding_window, max_cache_len)` keys
    and values in a ring buffer.

    transformers' `StaticSlidingWindowLayer` keeps its keys in order by rolling the buffer, and counts
    tokens in a Python int that it branches on; compiled, that int is an input of the graph and CUDA
    graphs record a new graph at every step (huggingface/transformers#44609). Here a one-token step
    writes its key at slot `tokens_seen % slots`, a tensor index, so every step runs the same graph;
    `ring_window_mask` says which slots hold tokens of the window. Attention does not depend on the
    order of the keys: their positions are already rotated into them."""

    is_sliding = True

    def __init__(self, max_cache_len: int, sliding_window: int, **kwargs):
        # As transformers sizes its static window layers: a cache for fewer tokens than the window never wraps.
        super().__init__(max_cache_len=min(sliding_window, max_cache_len))
        self.sliding_window = sliding_window

    @property
    def is_croppable(self) -> bool:
        return False  # once the ring has wrapped, the overwritten keys cannot come back

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots, new_tokens = self.max_cache_len, key_states.shape[-2]
        if new_tokens == 1:  # a decode step: in place, at a tensor index
            slot = (self.cumulative_length % slots).view(1)
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.cumulative_length.add_(1)
            return self.keys, self.values
        # Several tokens (a prompt, a prefill chunk, a continuation): they attend to the kept keys in
        # order followed by themselves, as `get_mask_sizes` describes; the last `slots` are kept.
        seen = int(self.cumulative_length)
        if seen + new_tokens > self.max_cache_len < self.sliding_window:
            raise ValueError(
                f"This static cache was built for {self.max_cache_len} tokens, fewer than the window, and would hold "
                f"{seen + new_tokens}: build it with max_cache_len >= the whole sequence."
            )
        keys = torch.cat([self.keys[:, :, self.ordered_slots(seen)], key_states], dim=2)
        values = torch.cat([self.values[:, :, self.ordered_slots(seen)], value_states], dim=2)
        last_slots = self.ordered_slots(seen + new_tokens)
        self.keys.index_copy_(2, last_slots, keys[:, :, -last_slots.numel() :])
        self.values.index_copy_(2, last_slots, values[:, :, -last_slots.numel() :])
        self.cumulative_length.add_(new_tokens)
        return keys, values

    def ordered_slots(self, tokens_seen: int) -> torch.Tensor:
        """The slots of the last min(tokens_seen, slots) tokens, oldest first."""
        kept = min(tokens_seen, self.max_cache_len)
        return torch.arange(tokens_seen - kept, tokens_seen, device=self.device) % self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Length and first position of the keys a multi-token `update` returns (one-token steps are
        masked by `ring_window_mask`)."""
        seen = int(self.cumulative_length)
        kept = min(seen, self.max_cache_len)
        return kept + query_length, seen - kept


class SambaStaticCache(StaticCache):
    """transformers' `StaticCache` with ring-buffer sliding-window layers (`SlidingWindowRingLayer`),
    so that a decode step is one CUDA graph, replayed at every length. Its memory does not grow past
    `sliding_window` tokens whatever `max_cache_len` is: Samba's layers keep a window of keys and a
    fixed-size state. `generate(cache_implementation="static")` builds one."""

    def __init__(self, config: SambaConfig, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        use_ring_buffers(self, config, max_cache_len)


def use_ring_buffers(cache: StaticCache, config: SambaConfig, max_cache_len: int) -> StaticCache:
    """Replace the static sliding-window layers of `cache` by `SlidingWindowRingLayer`s, for the
    attention implementations that read them through a mask (`RING_ATTENTION_IMPLEMENTATIONS`)."""
    if config._attn_implementation in RING_ATTENTION_IMPLEMENTATIONS:
        cache.layers = [
            SlidingWindowRingLayer(max_cache_len, config.sliding_window)
            if type(layer) is StaticSlidingWindowLayer
            else layer
            for layer in cache.layers
        ]
    return cache


def count_mamba_tokens(cache: Cache, layer_idx: int, tokens: int) -> None:
    """Add `tokens` to the token count that transformers' cache keeps in a Mamba layer, where it keeps one.

    From transformers 5.25 a Mamba layer of the cache counts one token per column of conv input that
    `update_conv_state` is handed, and `get_seq_length()` (positions, generate's chunked prefill and
    cache continuation) reads the count of layer 0. The mixer's one-token step updates its conv state
    in place, and its multi-token step hands the cache the final conv state alone (padding-aware, and
    narrower than the tokens it follows): what the cache did not count is added here."""
    count = getattr(cache.layers[layer_idx], "cumulative_length_linear", None)
    if count is not None:
        count.add_(tokens)


def ring_window_mask(config: SambaConfig, inputs_embeds: torch.Tensor, attention_mask, ring: SlidingWindowRingLayer):
    """The sliding-window mask of a one-token step that reads a ring buffer: slot s holds the latest
    position p = s (mod slots) up to the new token's, and is read when p >= 0 (written) and the 2D
    `attention_mask`, if any, does not mark p as padding. Built from the ring's tensor count only, so
    it is the same graph at every step."""
    if config._attn_implementation not in RING_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"A ring-buffer static cache needs attention implementation 'samba_sdpa', 'sdpa' or 'eager', not "
            f"{config._attn_implementation!r}: build the cache after choosing the implementation."
        )
    slots, device = ring.max_cache_len, inputs_embeds.device
    query_position = ring.cumulative_length.to(device)
    slot_index = torch.arange(slots, device=device)
    positions = query_position - (query_position - slot_index) % slots
    readable = positions >= 0
    if attention_mask is not None:
        readable = readable & attention_mask[:, positions.clamp(min=0)].bool()

    def slot_mask(batch_idx, head_idx, q_idx, kv_idx):
        return readable.expand(inputs_embeds.shape[0], slots)[batch_idx, kv_idx]

    return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
        batch_size=inputs_embeds.shape[0],
        q_length=1,
        kv_length=slots,
        mask_function=slot_mask,
        allow_is_causal_skip=False,
        dtype=inputs_embeds.dtype,
        device=device,
    )


__all__ = ["SambaStaticCache", "SlidingWindowRingLayer"]


class ChunkWindowLayer(DynamicSlidingWindowLayer):
    """transformers' dynamic sliding-window layer, except that an update joins the kept keys and the new ones by two
    copies into one new tensor. `torch.cat` of the kept keys (a slice of the last join) and a chunk's values (a
    transposed view of their projection) takes PyTorch's generic gather for strided inputs, which moved 0.7 TB/s on
    the H200: 16 ms of a 128K-token prefill's 278 (docs/performance-notes.md). The keys, values and count are
    transformers' layer's, so the layer goes back to its class after the prefill (`windows_joined_by_copies`)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.record_past:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys, values = joined(self.keys, key_states), joined(self.values, value_states)
        self.keys, self.values = keys[:, :, -self.sliding_window + 1 :], values[:, :, -self.sliding_window + 1 :]
        return keys, values


def joined(kept: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """torch.cat([kept, new], dim=2) of (batch, heads, tokens, head_dim) tensors, by a copy of each (kept: also the
    empty 1-D tensor of a layer that holds no keys yet). The join is laid out in memory as `new` is: the model's
    keys are (batch, tokens, heads, head_dim) memory seen transposed, and a copy between two such tensors is a plain
    copy of memory (a copy into (batch, heads, tokens, head_dim) memory took PyTorch's strided path, 1.4 TB/s on
    the H200). Attention reads keys by their strides."""
    kept = kept if kept.dim() == 4 else new[:, :, :0]
    batch, heads, tokens, head_dim = new.shape
    if new.stride(1) < new.stride(2):  # heads inside tokens in memory
        out = new.new_empty(batch, kept.shape[2] + tokens, heads, head_dim).transpose(1, 2)
    else:
        out = new.new_empty(batch, heads, kept.shape[2] + tokens, head_dim)
    out[:, :, : kept.shape[2]].copy_(kept)
    out[:, :, kept.shape[2] :].copy_(new)
    return out


@contextlib.contextmanager
def windows_joined_by_copies(cache: Cache):
    """The cache's transformers sliding-window layers update as `ChunkWindowLayer`s inside the block."""
    layers = [layer for layer in cache.layers if type(layer) is DynamicSlidingWindowLayer]
    for layer in layers:
        layer.__class__ = ChunkWindowLayer
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = DynamicSlidingWindowLayer
