"""A decode step's greedy token choice (samba_kernels.token_choice) against torch.argmax and the end-of-sequence rule
of transformers' greedy loop, written out row by row."""

import pytest
import torch

import samba_kernels
from samba_kernels.token_choice import greedy_token_ref, kernel

from .common import DEVICE, forbid_kernels_on_the_cpu, gen


def logits_with_edge_cases(batch, vocab, dtype, g):
    """Random scores; row 1 has its maximum twice, in different tiles; row 2 NaNs after a larger number; row 3
    -inf only."""
    logits = torch.randn(batch, vocab, generator=g)
    logits[1, [vocab - 3, 5]] = 100.0
    logits[2, 7] = 1e4
    logits[2, [vocab - 2, 40]] = float("nan")
    logits[3] = float("-inf")
    return logits.to(dtype)


def expected_row(scores, unfinished, ends, pad):
    """The first maximal index (the first NaN where there is one); a finished row takes pad."""
    scores = scores.double()
    nan = torch.isnan(scores).nonzero()
    token = int(nan[0]) if len(nan) else int((scores == scores.max()).nonzero()[0])
    if ends is None:
        return token, None
    return (token if unfinished else pad), (0 if bool(ends[token]) else unfinished)


@pytest.mark.parametrize("vocab", [97, 5000])  # one tile, and two (the kernel's tile is 4096 wide)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eos", [False, True])
def test_greedy_token_matches_argmax_and_the_end_of_sequence_rule(vocab, dtype, eos):
    g = gen(vocab)
    batch = 5
    logits = logits_with_edge_cases(batch, vocab, dtype, g)
    unfinished = torch.tensor([1, 1, 0, 1, 0])
    ends = torch.zeros(vocab, dtype=torch.bool)
    ends[[5, 40, 0]] = True  # row 1's token, row 2's first NaN, row 3's
    pad = torch.tensor(vocab - 1)
    positions, length = torch.arange(batch)[:, None] + 10, torch.tensor(33)
    expected = [expected_row(logits[b], int(unfinished[b]), ends if eos else None, int(pad)) for b in range(batch)]
    assert [token for token, _ in expected][:4] == [expected[0][0], 5, 40 if not eos else int(pad), 0]

    for choose in (samba_kernels.greedy_token_, greedy_token_ref):
        state = [t.clone().to(DEVICE) for t in (positions, length, unfinished, ends, pad)]
        tokens = torch.full((batch, 1), -1, device=DEVICE)
        choose(logits.to(DEVICE), tokens, state[0], state[1], *(state[2:] if eos else ()))
        assert tokens[:, 0].tolist() == [token for token, _ in expected], choose
        assert torch.equal(state[0].cpu(), positions + 1) and int(state[1]) == 33  # the caller counts length
        if eos:
            assert state[2].tolist() == [flag for _, flag in expected]


@pytest.mark.parametrize("vocab", [97, 9000])  # one tile, and two
@pytest.mark.parametrize("length, allowed_from", [(10, 12), (12, 12)])
def test_blocked_tokens_are_not_chosen_below_the_minimum_length(vocab, length, allowed_from):
    """Below the minimum length the blocked tokens (a row's maximum among them, a NaN among them) score -inf, as
    transformers' minimum-length processors make them; from it on they count again."""
    g = gen(vocab + length)
    logits = torch.randn(3, vocab, generator=g)
    logits[0, [4, vocab - 1]] = 50.0  # the maximum, blocked, and the second best, not
    logits[0, 9] = 40.0
    logits[1, 4] = float("nan")
    logits[2] = float("-inf")
    blocked = torch.zeros(vocab, dtype=torch.bool)
    blocked[[4, 9]] = True
    below = length < allowed_from
    masked = logits.masked_fill(blocked & below, float("-inf"))
    expected = [expected_row(row, 1, None, 0)[0] for row in masked]
    assert expected[0] == (vocab - 1 if below else 4)
    for choose in (samba_kernels.greedy_token_, greedy_token_ref):
        tokens, positions = torch.full((3, 1), -1, device=DEVICE), torch.zeros(3, 1, dtype=torch.long, device=DEVICE)
        where = [torch.tensor(length), None, None, None, blocked, torch.tensor(allowed_from)]
        choose(logits.to(DEVICE), tokens, positions, *(t if t is None else t.to(DEVICE) for t in where))
        assert tokens[:, 0].tolist() == expected, choose


def test_greedy_token_runs_the_reference_on_the_cpu_without_the_interpreter(monkeypatch):
    forbid_kernels_on_the_cpu(monkeypatch, kernel, "_greedy_token_kernel")
    tokens, positions, length = (
        torch.zeros(2, 1, dtype=torch.long),
        torch.zeros(2, 1, dtype=torch.long),
        torch.tensor(0),
    )
    kernel.greedy_token_(torch.tensor([[0.0, 2.0, 1.0], [3.0, 3.0, 1.0]]), tokens, positions, length)
    assert tokens[:, 0].tolist() == [1, 0] and positions[:, 0].tolist() == [1, 1] and int(length) == 0


def test_greedy_token_refuses_mismatched_state():
    logits, tokens = torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="together"):
        samba_kernels.greedy_token_(logits, tokens, tokens.clone(), torch.tensor(0), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        samba_kernels.greedy_token_(logits, tokens[:, 0], tokens.clone(), torch.tensor(0))
    with pytest.raises(ValueError, match="ends"):
        samba_kernels.greedy_token_(
            logits, tokens, tokens.clone(), torch.tensor(0), torch.ones(2, dtype=torch.long),
            torch.zeros(7, dtype=torch.bool), torch.tensor(0),
        )  # fmt: skip
