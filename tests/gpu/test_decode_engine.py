"""The decode engine behind generate() on CUDA gives the eager loop's tokens (skipped where generate() has no
engine)."""

import pytest
import torch

from .helpers import generate_takes_decode_engine, random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def model():
    model = random_model()
    if not generate_takes_decode_engine(model):
        pytest.skip("this samba_hf's generate() has no decode engine (it takes no decode_engine)")
    return model


@pytest.mark.parametrize("batch", [1, 8])
@torch.no_grad()
def test_engine_greedy_tokens_equal_the_eager_loop(model, batch):
    prompt = torch.randint(0, 1024, (batch, 100), device="cuda")
    options = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=512, min_new_tokens=512, do_sample=False, pad_token_id=0
    )
    engine = model.generate(prompt, **options)
    eager = model.generate(prompt, decode_engine=False, **options)
    assert torch.equal(engine, eager), f"{(engine == eager).float().mean().item():.1%} of the tokens equal"


@torch.no_grad()
def test_engine_left_padded_rows_equal_each_row_alone(model):
    rows = [torch.randint(1, 1024, (length,), device="cuda") for length in (100, 70, 37)]
    width = max(len(row) for row in rows)
    prompt = torch.zeros(len(rows), width, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(prompt)
    for i, row in enumerate(rows):
        prompt[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    options = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    batched = model.generate(prompt, attention_mask=mask, **options)[:, width:]
    for i, row in enumerate(rows):
        alone = model.generate(row[None], attention_mask=torch.ones_like(row[None]), **options)[:, len(row) :]
        assert torch.equal(batched[i : i + 1], alone), f"row {i} differs from the row generated alone"


@torch.no_grad()
def test_the_capture_leaves_the_first_calls_token_choice_alone(model):
    """The capture's warm-up runs choose tokens: they must not count towards min_new_tokens, end rows or mark
    tokens seen for the repetition penalty of the call that captures."""
    prompt = torch.randint(1, 1024, (3, 50), device="cuda")
    options = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=48,
        min_new_tokens=16,
        eos_token_id=[token for token in range(1024) if token != 5],  # a row ends as soon as it may
        repetition_penalty=1.5,
        do_sample=False,
        pad_token_id=1,
    )
    engine = model.generate(prompt, **options)
    eager = model.generate(prompt, decode_engine=False, **options)
    assert torch.equal(engine, eager)


@torch.no_grad()
def test_a_seeded_first_call_samples_as_the_next_call_does(model):
    """The first call's dry run and the capture's warm-up runs draw random numbers: the seeded draws of the first
    call (which captures) and of the next (which replays) are the same."""
    prompt = torch.randint(1, 1024, (2, 50), device="cuda")
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=True, pad_token_id=0)
    calls = []
    for _ in range(2):
        torch.manual_seed(0)
        calls.append(model.generate(prompt, **options))
    assert torch.equal(*calls)
