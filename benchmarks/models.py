"""The two models every end-to-end suite compares, built the same way everywhere: samba-421m and transformers'
`LlamaForCausalLM` of the paper's 438M shape (12 layers, hidden 1536, 12 heads, MLP 4096, vocabulary 32000,
tied embeddings, sdpa). Random weights: speed does not depend on them. Smoke runs build tiny models of the
same two classes.

Also what the suites predict before they run a cell: the bytes a model reads per decode step, its cache's
size, and rough prefill times and activation memory for the time budget and the memory check.
"""

import functools
import math

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from samba_hf import PRESETS, SambaConfig, SambaForCausalLM
from samba_hf.generation import cache_nbytes

MODELS = ("samba", "llama")
PAPER_LLAMA = dict(
    vocab_size=32000,
    hidden_size=1536,
    intermediate_size=4096,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    head_dim=128,
)
# Smoke runs' Llama has the tiny preset's shape.
TINY_LLAMA = {key: value for key, value in PRESETS["tiny"].items() if key in PAPER_LLAMA}
# Cache sizes are measured at up to this many prompt tokens and extrapolated linearly beyond: keys and values
# of full attention grow by a fixed amount per token, Samba's states and window keys not at all once the
# window is full (its window, 2048, is at most half of this).
CACHE_PROBE_TOKENS = 4096
# Planning guesses for the time budget, from earlier runs of these suites on an H200 in bf16
# (benchmarks/results/prefill.json): prefill seconds per prompt token for Samba, and per token plus per
# token and context token for the Llama (quadratic attention). The suites correct them by what they measure.
SAMBA_PREFILL_S_PER_TOKEN = 3.2e-6
LLAMA_PREFILL_S_PER_TOKEN = (2.1e-6, 8.3e-11)
# Activation bytes per token of one forward without gradients (bf16): about eight hidden-size tensors and
# three MLP-size ones live at once; Samba's Mamba mixers add about six of twice the hidden size.
ACTIVATION_HIDDEN_TENSORS = {"samba": 20, "llama": 8}
ACTIVATION_MLP_TENSORS = 3


def config(name: str, smoke: bool, **overrides):
    if name == "samba":
        return SambaConfig.from_preset("tiny" if smoke else "samba-421m", **overrides)
    if name == "llama":
        shape = TINY_LLAMA if smoke else PAPER_LLAMA
        return LlamaConfig(
            **{
                **shape,
                "tie_word_embeddings": True,
                "max_position_embeddings": 1 << 21,
                "attn_implementation": "sdpa",
                **overrides,
            }
        )
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def build(name: str, device: torch.device, dtype: torch.dtype, smoke: bool, seed: int = 0, **overrides):
    """A freshly initialised model on `device` in `dtype`, in eval mode (initialised on the device: seconds, not
    minutes, at samba-421m's size)."""
    torch.manual_seed(seed)
    model_class = SambaForCausalLM if name == "samba" else LlamaForCausalLM
    with torch.device(device):
        model = model_class(config(name, smoke, **overrides))
    return model.to(dtype).eval()


def generate_takes_decode_engine(model) -> bool:
    """Whether the model's generate() has samba-hf's decode engine, tried through its documented opt-out
    (`decode_engine=False`): without the engine, generate() refuses the keyword, naming it."""
    prompt = torch.zeros(1, 4, dtype=torch.long, device=model.device)
    try:
        model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0, decode_engine=False)
    except ValueError as error:  # transformers refuses model keywords it does not use
        if "decode_engine" in str(error):
            return False
        raise
    return True


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters (a tied embedding once): what one decode step reads at least."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def _measured_cache_bytes(model, context: int) -> int:
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=model.device)
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return cache_nbytes(cache)


@functools.cache
def _cache_probe(name: str, device_type: str, dtype: torch.dtype, smoke: bool, context: int) -> int:
    model = build(name, torch.device(device_type), dtype, smoke)
    size = _measured_cache_bytes(model, context)
    del model
    return size


def cache_bytes(name: str, device: torch.device, dtype: torch.dtype, smoke: bool, batch: int, context: int) -> float:
    """Bytes of `name`'s cache after a `context`-token prompt at `batch` rows: measured on a real prefill at
    batch 1 up to CACHE_PROBE_TOKENS tokens, extrapolated linearly beyond from the probe and half of it."""
    probe = lambda length: _cache_probe(name, device.type, dtype, smoke, length)  # noqa: E731
    if context <= CACHE_PROBE_TOKENS:
        return batch * probe(context)
    half, full = probe(CACHE_PROBE_TOKENS // 2), probe(CACHE_PROBE_TOKENS)
    per_token = (full - half) / (CACHE_PROBE_TOKENS - CACHE_PROBE_TOKENS // 2)
    return batch * (full + per_token * (context - CACHE_PROBE_TOKENS))


def prefill_seconds(name: str, batch: int, context: int) -> float:
    """A planning guess of one prefill of `batch` x `context` tokens (see the constants above)."""
    if name == "samba":
        return batch * context * SAMBA_PREFILL_S_PER_TOKEN
    per_token, per_token_and_context = LLAMA_PREFILL_S_PER_TOKEN
    return batch * context * (per_token + per_token_and_context * context)


def prefill_chunk(model_config) -> int | None:
    """Tokens per forward of a chunked prefill, or None where the prompt goes through in one forward."""
    return getattr(model_config, "prefill_chunk_size", None)


def activation_bytes(name: str, model_config, batch: int, tokens: int) -> float:
    """A rough peak of the activations of one forward without gradients over `batch` x `tokens` tokens."""
    per_token = ACTIVATION_HIDDEN_TENSORS[name] * model_config.hidden_size
    per_token += ACTIVATION_MLP_TENSORS * model_config.intermediate_size
    return batch * tokens * per_token * 2


def predicted_peak_bytes(
    name: str, device: torch.device, dtype: torch.dtype, smoke: bool, batch: int, context: int, new_tokens: int = 1
) -> float:
    """Weights, the cache after `context + new_tokens` tokens, and the prefill's activations (per chunk
    where the model chunks its prefill)."""
    model_config = config(name, smoke)
    element = torch.tensor([], dtype=dtype).element_size()
    chunk = prefill_chunk(model_config)
    tokens = context if chunk is None else min(context, chunk)
    return (
        parameter_count(name, smoke) * element
        + cache_bytes(name, device, dtype, smoke, batch, context + new_tokens)
        + activation_bytes(name, model_config, batch, tokens)
    )


@functools.cache
def parameter_count(name: str, smoke: bool) -> int:
    model_class = SambaForCausalLM if name == "samba" else LlamaForCausalLM
    with torch.device("meta"):
        return model_class(config(name, smoke)).num_parameters()


def family(label: str) -> str:
    """ "samba" or "llama" from a row's model label (earlier runs' labels also name a size or layer count)."""
    return label.split("-")[0].split()[0]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator or math.isnan(denominator):
        return None
    return numerator / denominator
