import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

import samba_kernels
from samba_hf import (
    SambaForCausalLM,
    SambaForSequenceClassification,
    modeling_samba,
)
from samba_hf.modeling_samba import SambaAttention, SambaMambaMixer

from .helpers import small_config, small_model

WINDOW = 8
# Same function, other summation order: logits of magnitude ~5 agree to a few 1e-6 relative in fp32.
FP32 = dict(rtol=1e-4, atol=5e-5)


def naive_mamba(mixer: SambaMambaMixer, hidden_states: torch.Tensor) -> torch.Tensor:
    """Mamba-1 written out token by token from the mixer's weights (the test's own oracle)."""
    batch, length, _ = hidden_states.shape
    width = mixer.conv1d.weight.shape[-1]
    x_all, gate_all = mixer.in_proj.weight.chunk(2, dim=0)
    A = -torch.exp(mixer.A_log)
    state = torch.zeros(batch, mixer.intermediate_size, mixer.state_size)
    history = torch.zeros(batch, mixer.intermediate_size, width)
    outputs = []
    for t in range(length):
        token = hidden_states[:, t]
        history = torch.cat([history[:, :, 1:], (token @ x_all.T)[:, :, None]], dim=-1)
        x = F.silu((history * mixer.conv1d.weight[:, 0]).sum(-1) + mixer.conv1d.bias)
        projected = x @ mixer.x_proj.weight.T
        dt_low = projected[:, : mixer.time_step_rank]
        B = projected[:, mixer.time_step_rank : mixer.time_step_rank + mixer.state_size]
        C = projected[:, mixer.time_step_rank + mixer.state_size :]
        dt = F.softplus(dt_low @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)
        state = torch.exp(dt[:, :, None] * A) * state + (dt * x)[:, :, None] * B[:, None, :]
        y = (state * C[:, None, :]).sum(-1) + mixer.D * x
        y = y * F.silu(token @ gate_all.T)
        outputs.append(y @ mixer.out_proj.weight.T)
    return torch.stack(outputs, dim=1)


def naive_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE on (batch, heads, length, dim): pair i with i + dim/2."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = positions.double()[:, None] * freqs[None, :]
    cos, sin = angles.cos().float(), angles.sin().float()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def naive_attention(attention: SambaAttention, hidden_states: torch.Tensor, window: int | None) -> torch.Tensor:
    """Attention with an explicit boolean mask: query i sees keys j with i - window < j <= i."""
    batch, length, _ = hidden_states.shape
    heads, kv_heads, head_dim = (
        attention.config.num_attention_heads,
        attention.config.num_key_value_heads,
        attention.head_dim,
    )

    def project(linear, n):
        return linear(hidden_states).view(batch, length, n, head_dim).transpose(1, 2)

    positions = torch.arange(length)
    q = naive_rope(project(attention.q_proj, heads), positions)
    k = naive_rope(project(attention.k_proj, kv_heads), positions).repeat_interleave(heads // kv_heads, dim=1)
    v = project(attention.v_proj, kv_heads).repeat_interleave(heads // kv_heads, dim=1)
    i, j = positions[:, None], positions[None, :]
    allowed = (j <= i) & ((i - j < window) if window is not None else True)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
    return attention.o_proj(out)


def test_mamba_mixer_matches_a_naive_recurrence():
    model = small_model()
    mixer = model.model.layers[0].mixer
    hidden_states = torch.randn(2, 19, 32)
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden_states), naive_mamba(mixer, hidden_states), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("layer_types", [["linear_attention", "sliding_attention"] * 2, ["full_attention"] * 4])
def test_attention_matches_an_explicit_mask_past_the_window(implementation, layer_types):
    model = small_model(layer_types=layer_types)
    model.set_attn_implementation(implementation)
    layer = model.model.layers[1]
    window = WINDOW if layer_types[1] == "sliding_attention" else None
    hidden_states = torch.randn(2, 3 * WINDOW + 1, 32)
    with torch.no_grad():
        full_model = model.model
        masks_input = hidden_states
        position_ids = torch.arange(hidden_states.shape[1])[None]
        # Run the layer exactly as SambaModel does, through the masks transformers builds.
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        make_mask = create_sliding_window_causal_mask if window else create_causal_mask
        mask = make_mask(
            config=model.config, inputs_embeds=masks_input, attention_mask=None, cache=None, position_ids=position_ids
        )
        rope = full_model.rotary_emb(hidden_states, position_ids)
        got, _ = layer.mixer(hidden_states, rope, mask)
    torch.testing.assert_close(got, naive_attention(layer.mixer, hidden_states, window), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flex_attention"])
def test_model_logits_agree_across_attention_implementations(implementation):
    model = small_model()
    ids = torch.randint(0, 97, (2, 3 * WINDOW + 5))
    with torch.no_grad():
        reference = model(ids).logits
        model.set_attn_implementation(implementation)
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt_length", [WINDOW - 1, WINDOW, WINDOW + 1, 3 * WINDOW])
@pytest.mark.parametrize("continuation", [1, 5, 2 * WINDOW + 3])
def test_forward_continued_from_the_cache_equals_one_forward(prompt_length, continuation):
    model = small_model()
    ids = torch.randint(0, 97, (2, prompt_length + continuation))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :prompt_length], cache=cache, use_cache=True)
        second = model(ids[:, prompt_length:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, **FP32)


def test_token_by_token_decoding_equals_one_forward():
    model = small_model()
    ids = torch.randint(0, 97, (2, 2 * WINDOW + 3))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **FP32)


def test_greedy_generate_follows_the_argmax_of_full_forwards():
    model = small_model()
    prompt = torch.randint(0, 97, (1, WINDOW + 2))
    with torch.no_grad():
        generated = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2 * WINDOW, do_sample=False, pad_token_id=0
        )
        sequence = prompt
        for _ in range(2 * WINDOW):
            next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


def test_backward_and_gradient_checkpointing_give_the_same_gradients():
    model = small_model().train()
    ids = torch.randint(0, 97, (2, 2 * WINDOW + 1))

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in plain.values())
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["rotary_embedding", "rms_norm", "swiglu"])
def test_the_fused_kernels_run_on_cuda_and_the_model_formulas_elsewhere(name):
    from samba_hf.kernel_dispatch import kernel_op

    def formula():
        pass

    assert kernel_op(name, "auto", torch.device("cuda"), formula) is getattr(samba_kernels, name)
    assert kernel_op(name, "torch", torch.device("cuda"), formula) is formula
    assert kernel_op(name, "auto", torch.device("cpu"), formula) is formula


def test_every_op_follows_the_configs_kernel_choice_at_call_time(monkeypatch):
    """RoPE, RMSNorm, SwiGLU and the residual add, like the Mamba ops, ask the model's config at each call: a choice set after
    loading holds for all of them."""
    asked = []
    monkeypatch.setattr(
        modeling_samba, "kernel_op", lambda name, choice, device, formula: asked.append(choice) or formula
    )
    model = small_model()
    model.config.kernel_implementation = "torch"
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 5)))
    assert asked and set(asked) == {"torch"}


def test_the_fused_kernels_give_the_formulas_logits_and_gradients(monkeypatch):
    """The model with RoPE, RMSNorm, SwiGLU and the residual add on samba_kernels' kernels (here in Triton's
    interpreter; the last three run their references where autograd records), past the window: the logits and every
    gradient of the model's own formulas."""
    model = small_model().train()
    ids = torch.randint(0, 97, (2, 2 * WINDOW + 1), generator=torch.Generator().manual_seed(3))

    def logits_and_gradients():
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    expected_logits, expected_grads = logits_and_gradients()
    monkeypatch.setattr(modeling_samba, "kernel_op", lambda name, *_: getattr(samba_kernels, name))
    logits, grads = logits_and_gradients()
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # the norm's, SwiGLU's and the residual add's kernels too, over a cache
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :WINDOW], cache=cache).logits
        rest = model(ids[:, WINDOW:], cache=cache).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), expected_logits, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_keeps_tied_weights(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SambaForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 2 * WINDOW))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bf16_loading_keeps_the_ssm_parameters_in_fp32(tmp_path):
    small_model().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    mixer = loaded.model.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        hidden = loaded.model(ids, output_hidden_states=True).hidden_states
    assert hidden[-2].dtype == torch.float32, "residual_in_fp32 keeps the residual stream in float32"


REMOTE_CODE_CHECK = textwrap.dedent(
    """
    import sys
    sys.modules["samba_hf"] = None  # make `import samba_hf` fail, as where it is not installed
    sys.modules["samba_kernels"] = None
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert "samba_hf" not in type(model).__module__
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(ids).logits, sys.argv[3])
    """
)


def test_saved_folder_loads_with_remote_code_where_samba_hf_is_not_installed(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 97, (2, 3 * WINDOW))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [
            sys.executable,
            "-c",
            REMOTE_CODE_CHECK,
            str(tmp_path / "model"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(ids).logits)


def test_left_padded_batch_equals_each_row_alone():
    model = small_model()
    rows = [torch.randint(3, 97, (n,)) for n in (WINDOW + 5, 3)]
    width = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (width - len(r), 0), value=0) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=WINDOW + 2, do_sample=False, pad_token_id=0)
        for row, r in enumerate(rows):
            alone = model.generate(
                r[None],
                attention_mask=torch.ones(1, len(r), dtype=torch.long),
                max_new_tokens=WINDOW + 2,
                do_sample=False,
                pad_token_id=0,
            )
            assert torch.equal(batched[row, width:], alone[0, len(r) :])


PAD_LAYOUTS = {  # 1 where a token is real: two rows, the first padded as named, the second not
    "left": [0] * 5 + [1] * 19,
    "right": [1] * 17 + [0] * 7,
    "middle": [1] * 6 + [0] * 4 + [1] * 11 + [0] * 3,
}


@pytest.mark.parametrize(
    "layout, compiled, use_cache",
    [("left", False, False), ("right", False, False), ("middle", False, False), ("middle", True, False)]
    + [("left", False, None)],
)
def test_padded_rows_without_a_cache_keep_the_window_with_each_pad_alone(monkeypatch, layout, compiled, use_cache):
    """Padded rows without a cache (training), or with the new one a forward makes by default, run the sliding
    windows' windowed path, each pad a document of its own, not a (length x length) mask: the logits at real
    tokens and the gradients of a loss over them equal transformers' masks' (attn_implementation="sdpa"), eager
    and compiled (where the mask's values cannot be read, a mask becomes documents)."""
    from samba_hf import kernel_dispatch

    documents = []
    windowed_sdpa = kernel_dispatch.windowed_sdpa
    monkeypatch.setattr(
        kernel_dispatch,
        "windowed_sdpa",
        lambda *args, **kwargs: documents.append(kwargs["seq_idx"]) or windowed_sdpa(*args, **kwargs),
    )
    mask = torch.tensor([PAD_LAYOUTS[layout], [1] * 24])
    ids = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(1)) * mask
    weights = torch.randn(2, 24, 97, generator=torch.Generator().manual_seed(2)) * mask[..., None]

    def logits_and_grads(model):
        logits = model(ids, attention_mask=mask, use_cache=use_cache).logits
        grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
        return logits * mask[..., None], grads

    model = small_model(num_hidden_layers=2)
    got = logits_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model)
    reference = small_model(num_hidden_layers=2)
    reference.set_attn_implementation("sdpa")
    expected = logits_and_grads(reference)

    assert len(documents) == 1 and bool((documents[0][0] < 0).eq(mask[0] == 0).all())
    torch.testing.assert_close(got[0], expected[0], **FP32)
    for name, a, b in zip(dict(model.named_parameters()), got[1], expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_packed_documents_equal_the_documents_run_separately():
    model = small_model()
    lengths = [5, WINDOW + 4, 3]
    documents = [torch.randint(0, 97, (1, n)) for n in lengths]
    packed = torch.cat(documents, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids).logits
        separate = torch.cat([model(d).logits for d in documents], dim=1)
    torch.testing.assert_close(packed_logits, separate, **FP32)


def test_sequence_classification_head_pools_the_last_token():
    torch.manual_seed(0)
    model = SambaForSequenceClassification(small_config(num_labels=3, pad_token_id=0)).eval()
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.model(ids).last_hidden_state
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, model.score(hidden[:, -1]))
