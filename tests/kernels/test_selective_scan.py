"""The selective scan and its decode step (samba_kernels.selective_scan) against the PyTorch references, on fresh
random inputs: every forward layout (steps, lanes, the split scan), forward and gradients."""

import threading

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import samba_kernels
from samba_kernels.selective_scan import kernel as scan_kernel

from .common import DEVICE, TOL, assert_grads_match, forbid_kernels_on_the_cpu, gen, randn, random_seq_idx


def _scan_inputs(g, batch, dim, d_state, length, groups=None, *, D=False, z=False, bias=False, init=False):
    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    t = dict(
        u=randn(g, batch, dim, length),
        delta=F.softplus(randn(g, batch, dim, length) - 2),
        A=-torch.exp(torch.rand(dim, d_state, generator=g)).to(DEVICE),
        B=randn(g, *bc_shape),
        C=randn(g, *bc_shape),
        D=randn(g, dim) if D else None,
        z=randn(g, batch, dim, length) if z else None,
        delta_bias=randn(g, dim) * 0.5 if bias else None,
        initial_state=randn(g, batch, dim, d_state) if init else None,
    )
    return {k: v.requires_grad_() for k, v in t.items() if v is not None}


# fmt: off
SCAN_CASES = {
    # name: (batch, dim, d_state, length, groups, chunk, options)
    "plain": (1, 5, 4, 7, None, 64, {}),
    "everything": (2, 5, 3, 19, None, 8, dict(D=True, z=True, bias=True, init=True, softplus=True, seq=True, last=True)),
    "grouped": (1, 6, 3, 11, 2, 4, dict(D=True, z=True, softplus=True, seq=True, last=True)),
    "length-1": (2, 5, 2, 1, None, 64, dict(bias=True, init=True, softplus=True, last=True)),
    "dim-37": (1, 37, 2, 9, None, 64, dict(D=True, z=True)),
    "length-130": (1, 3, 2, 130, None, 64, dict(D=True, bias=True, init=True, softplus=True, seq=True, last=True)),
    # more states than a tile has steps: the second of the two column tiles that hold the states
    "d_state-13": (1, 3, 13, 12, None, 8, dict(D=True, z=True, bias=True, init=True, softplus=True, seq=True, last=True)),
}
# fmt: on


# The lanes forward runs where there are enough channels to give each SM sub-partition a warp
# (scan_kernel.LANES), the split scan where a long sequence has too few: at these sizes only when forced.
LANE_CASES = ["everything", "grouped", "length-1", "length-130", "d_state-13"]
# The split scan: the forward in chunks of two lanes tiles, the backward in chunks of two of its tiles, the last
# chunk partial; documents start at chunks' first steps (`chunk`, 2 `chunk`) and inside chunks.
SPLIT_CASES = ["everything", "grouped", "d_state-13"]
LAYOUTS = {
    "steps": lambda chunk: dict(forward="steps"),
    "lanes": lambda chunk: dict(forward="lanes"),
    "split": lambda chunk: dict(forward="lanes", chunk_length=chunk, backward_chunk_length=2 * chunk),
}


@pytest.mark.parametrize(
    "case, layout",
    [(case, "steps") for case in SCAN_CASES]
    + [(case, "lanes") for case in LANE_CASES]
    + [(case, "split") for case in SPLIT_CASES],
)
def test_selective_scan_matches_reference(case, layout, monkeypatch):
    batch, dim, d_state, length, groups, chunk, opt = SCAN_CASES[case]
    monkeypatch.setattr(scan_kernel, "CHUNK", chunk)  # small chunks: cross checkpoints at tiny lengths
    g = gen(len(case))
    tensors = _scan_inputs(
        g, batch, dim, d_state, length, groups, **{k: opt.get(k, False) for k in ("D", "z", "bias", "init")}
    )
    kwargs = dict(delta_softplus=opt.get("softplus", False), return_last_state=opt.get("last", False))
    if opt.get("seq"):
        kwargs["seq_idx"] = random_seq_idx(
            g, batch, length, cuts=[c for c in (chunk, 2 * chunk, length - 1) if c < length]
        )
    with scan_kernel.forced_layout(**LAYOUTS[layout](chunk)):
        plan = scan_kernel._configs(tensors["u"], _grouped(tensors["B"]), d_state, True)
        out = samba_kernels.selective_scan_fn(**tensors, **kwargs)
        out_ref = samba_kernels.selective_scan_ref(**tensors, **kwargs)
        assert_grads_match(out, out_ref, list(tensors.values()), g)
    assert plan.forward.lanes == (layout != "steps")
    if layout == "split":  # both split, unless the backward's tiles are as long as the sequence (d_state 13)
        assert plan.forward.chunks > 1 and (plan.backward.chunks > 1 or 2 * plan.backward.meta["T"] >= length)


def _grouped(BC):
    return BC if BC.dim() == 4 else BC.unsqueeze(1)


@pytest.mark.parametrize("outputs", ["y and last state", "last state only"])
def test_eager_calls_take_the_kernels_without_the_custom_ops_dispatch(monkeypatch, outputs):
    """Outside torch.compile the scan and the conv run their implementations through an autograd.Function, not
    torch.library's dispatch (host time): exact gradients, also where only the last state is used (the output's
    gradient is then None, as the custom op's backward receives it)."""
    from samba_kernels.causal_conv1d import kernel as conv_kernel

    def refused(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    for module, name in ((scan_kernel, "_scan_fwd_op"), (scan_kernel, "_scan_bwd_op"), (conv_kernel, "_conv_fwd_op")):
        monkeypatch.setattr(module, name, refused)
    g = gen(3)
    tensors = _scan_inputs(g, 2, 5, 3, 19, D=True, z=True, bias=True, init=True)
    x = randn(g, 2, 5, 19).requires_grad_()
    weight = randn(g, 5, 4).requires_grad_()
    tensors["u"] = samba_kernels.causal_conv1d_fn(x, weight, activation="silu")
    reference_u = samba_kernels.causal_conv1d_ref(x, weight, activation="silu")
    y, last = samba_kernels.selective_scan_fn(**tensors, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = samba_kernels.selective_scan_ref(
        **{**tensors, "u": reference_u}, delta_softplus=True, return_last_state=True
    )
    leaves = [x, weight] + [t for name, t in tensors.items() if name != "u"]
    if outputs == "last state only":  # C, D and z shape y alone: their gradients are zero
        for grad in torch.autograd.grad(last.sum(), [tensors[k] for k in "CDz"], retain_graph=True):
            assert not grad.any()
        assert_grads_match((last,), (last_ref,), [t for t in leaves if all(t is not tensors[k] for k in "CDz")], g)
    else:
        assert_grads_match((y, last), (y_ref, last_ref), leaves, g)


def test_ops_take_the_models_transposed_projections_with_exact_gradients():
    """The Mamba mixer hands the conv x and the scan delta and z as (batch, channels, length) views of
    (batch, length, channels) projections; `contiguous` copies them with its Triton kernel, gradients included."""
    g = gen(4)
    batch, dim, d_state, length = 2, 6, 3, 19
    projected = randn(g, batch, length, 3 * dim).requires_grad_()
    x, delta, z = projected.transpose(1, 2).chunk(3, dim=1)
    assert x.stride(1) == 1 and not x.is_contiguous()
    weight = randn(g, dim, 4).requires_grad_()
    inputs = _scan_inputs(g, batch, dim, d_state, length, D=True, bias=True)
    del inputs["u"], inputs["delta"]

    def model(conv, scan):
        u = conv(x, weight, activation="silu")
        return scan(u, delta - 2, **inputs, z=z, delta_softplus=True)

    y = model(samba_kernels.causal_conv1d_fn, samba_kernels.selective_scan_fn)
    y_ref = model(samba_kernels.causal_conv1d_ref, samba_kernels.selective_scan_ref)
    assert_grads_match(y, y_ref, [projected, weight, *inputs.values()], g)
    wide = randn(g, 2, 67, 3 * 70).transpose(1, 2)[:, 70:140]  # more than a 64 x 64 copy tile each way
    copied = samba_kernels._common.contiguous(wide)
    assert copied.is_contiguous() and torch.equal(copied, wide)


def test_host_arithmetic_equals_tritons():
    """The launchers' cdiv and next_power_of_2 (plain Python, for host code) against Triton's own."""
    from samba_kernels._common import cdiv, next_power_of_2

    for n in [*range(0, 300), 4095, 4096, 4097, 2**31 - 1, 2**31, 2**40 + 3]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 2, 7, 16, 376, 4096):
            assert cdiv(n, d) == triton.cdiv(n, d)


@pytest.mark.parametrize("sms", [132, 78])
def test_selective_scan_splits_long_sequences_of_small_batches(sms):
    """The GPU launch plan on a device of `sms` SMs (shapes only, no launch): batch-1 and batch-2 sequences of
    16K steps split in the forward, a batch of 8 x 4K does not; the backward splits sequences of
    BWD_SPLIT_MIN_LENGTH steps or more whose programs would fill a third of PROGRAMS_PER_SM per SM or less (batch 1,
    and batch 2 on 132 SMs), into a power of two of chunks. At batch 1 the forward's chunks give every SM
    sub-partition a warp and the backward's give each SM PROGRAMS_PER_SM programs."""

    def plan(batch, length, dim=3072):
        return scan_kernel._plan(batch, dim, length, 1, 16, True, gpu=True, sms=sms)

    for batch in (1, 2):
        assert plan(batch, 16384).forward.chunks > 1
    assert plan(1, 4096).backward.chunks > 1 and plan(1, 2048).backward.chunks == 1
    assert (plan(2, 4096).backward.chunks > 1) == (sms == 132) and plan(8, 4096).backward.chunks == 1
    unsplit = plan(8, 4096)
    assert unsplit.forward.lanes and unsplit.forward.chunks == 1 and unsplit.backward.chunks == 1
    chunks = plan(1, 16384).backward.chunks
    assert chunks > 1 and chunks & (chunks - 1) == 0
    forward, backward = plan(1, 65536).forward, plan(1, 65536).backward
    assert forward.lanes and forward.chunk % forward.meta["T"] == 0 and backward.chunk % backward.meta["T"] == 0
    assert forward.chunks * triton.cdiv(3072, forward.meta["BLOCK_D"]) >= scan_kernel.SUB_PARTITIONS_PER_SM * sms
    assert backward.chunks * triton.cdiv(3072, backward.meta["BLOCK_D"]) >= scan_kernel.PROGRAMS_PER_SM * sms
    assert plan(1, 64).forward.chunks == 1 and plan(1, 64).backward.chunks == 1  # too short to split
    with pytest.raises(ValueError, match="forward='lanes'"):
        with scan_kernel.forced_layout("steps", chunk_length=64):
            pass


def test_selective_scan_backward_keeps_the_forwards_forced_layout_on_another_thread(monkeypatch):
    """On CUDA, autograd runs the backward on its own thread, where the forward caller's forced_layout is not set;
    the backward still launches the forward's plan (here the split backward, whose reverse summaries run)."""
    monkeypatch.setattr(scan_kernel, "CHUNK", 8)
    g = gen(21)
    tensors = _scan_inputs(g, 1, 5, 3, 19, D=True, z=True, bias=True, init=True)
    summaries, summarize = [], scan_kernel._summarize
    monkeypatch.setattr(
        scan_kernel,
        "_summarize",
        lambda *args, reverse: (summaries.append(reverse), summarize(*args, reverse=reverse))[1],
    )
    with scan_kernel.forced_layout("lanes", chunk_length=8, backward_chunk_length=8):
        out = samba_kernels.selective_scan_fn(**tensors, delta_softplus=True)
    dy = randn(g, *out.shape)
    grads = []
    worker = threading.Thread(target=lambda: grads.append(torch.autograd.grad(out, list(tensors.values()), dy)))
    worker.start()
    worker.join()
    assert summaries == [False, True]  # the forward's summaries, then the backward's
    grads_ref = torch.autograd.grad(
        samba_kernels.selective_scan_ref(**tensors, delta_softplus=True), list(tensors.values()), dy
    )
    for gr, gr_ref in zip(grads[0], grads_ref):
        torch.testing.assert_close(gr, gr_ref, **TOL)


def test_selective_scan_backward_refuses_checkpoints_of_other_tiles():
    g = gen(22)
    t = {k: v.detach() for k, v in _scan_inputs(g, 1, 5, 3, 19).items()}
    grouped = t["B"].unsqueeze(1).contiguous(), t["C"].unsqueeze(1).contiguous()
    tiles = scan_kernel._tiles_of(t["u"], grouped[0], 3, True).backward.meta["T"]
    ckpt = torch.zeros(1, 5, triton.cdiv(19, tiles) + 1, 3, device=DEVICE)  # one tile too many
    with pytest.raises(RuntimeError, match="launch plan changed"):
        scan_kernel._scan_bwd_op(
            t["u"], None, t["u"], t["delta"], t["A"], *grouped, None, None, None, None, ckpt, False, False
        )


def test_selective_scan_bf16():
    g = gen(1)
    t = _scan_inputs(g, 1, 5, 3, 9, D=True, z=True, bias=True)
    t = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in t.items()}
    y = samba_kernels.selective_scan_fn(**t, delta_softplus=True)
    y_ref = samba_kernels.selective_scan_ref(**t, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    dy = randn(g, *y.shape).to(torch.bfloat16)
    for gr, gr_ref in zip(
        torch.autograd.grad(y, list(t.values()), dy), torch.autograd.grad(y_ref, list(t.values()), dy)
    ):
        assert gr.dtype == torch.bfloat16
        torch.testing.assert_close(gr.float(), gr_ref.float(), rtol=5e-2, atol=5e-2)


@triton.jit
def _softplus_kernel(x, out, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + offsets, scan_kernel._softplus(tl.load(x + offsets, mask=offsets < n)), mask=offsets < n)


def test_scan_softplus_keeps_float32_precision_in_its_tails():
    # log(1 + exp(x)) in float32 loses everything below x = -17 (1 + exp(x) rounds to 1); the scan's
    # softplus stays within float32's rounding of exp(x) there.
    x = torch.cat([torch.linspace(-40, 40, 8001), -torch.logspace(-7, 1.6, 500), torch.logspace(-7, 1.6, 500)])
    out = torch.empty_like(x, device=DEVICE)
    _softplus_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(DEVICE), out, x.numel(), BLOCK=1024)
    out, expected = out.double().cpu(), F.softplus(x.double(), threshold=100)
    torch.testing.assert_close(out, expected, rtol=4e-6, atol=0)
    middle = x.abs() < 5  # where exp(x) rounds least: a few float32 roundings
    torch.testing.assert_close(out[middle], expected[middle], rtol=6e-7, atol=0)


@triton.jit
def _channel_sums_kernel(x, sums, BLOCK_D: tl.constexpr, T: tl.constexpr, THREAD_STEPS: tl.constexpr):
    tile = tl.load(x + tl.arange(0, BLOCK_D)[:, None] * T + tl.arange(0, T)[None, :])
    values, steps = scan_kernel._channel_sums(tile, BLOCK_D, T, THREAD_STEPS)
    tl.store(sums + steps, values)


@pytest.mark.parametrize(
    "block_d, T, thread_steps", [(16, 16, 8), (4, 8, 4), (8, 32, 8), (32, 8, 8), (1, 8, 8), (2, 16, 4)]
)
def test_scan_channel_sums_match_torch_sum(block_d, T, thread_steps):
    # the backward's reduce-scatter, with fewer rounds than channel bits (32 x 8) and than step bits (2 x 16)
    x = randn(gen(block_d * T), block_d, T)
    sums = torch.full((T,), float("nan"), device=DEVICE)
    _channel_sums_kernel[(1,)](x, sums, BLOCK_D=block_d, T=T, THREAD_STEPS=thread_steps)
    torch.testing.assert_close(sums, x.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", [None, 2])
def test_selective_state_update_matches_reference(groups):
    g = gen(3)
    batch, dim, d_state = 2, 6, 3
    bc = (batch, d_state) if groups is None else (batch, groups, d_state)
    x, dt, z = randn(g, batch, dim), randn(g, batch, dim), randn(g, batch, dim)
    A = -torch.exp(torch.rand(dim, d_state, generator=g)).to(DEVICE)
    B, C, D, dt_bias = randn(g, *bc), randn(g, *bc), randn(g, dim), randn(g, dim)
    # A strided state, as a slice of a bigger cache.
    cache = randn(g, batch, dim, d_state + 2)
    state = cache[:, :, 1:-1]
    state_ref, cache_before, ptr = state.clone(), cache.clone(), state.data_ptr()
    y = samba_kernels.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    y_ref = samba_kernels.selective_state_update_ref(state_ref, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)
    assert state.data_ptr() == ptr  # updated in place, its neighbours in the cache untouched
    assert torch.equal(cache[:, :, [0, -1]], cache_before[:, :, [0, -1]])


def test_decode_token_by_token_matches_full_sequence():
    g = gen(4)
    batch, dim, d_state, width, length = 2, 5, 3, 4, 6
    x, dt, z = randn(g, batch, dim, length), randn(g, batch, dim, length), randn(g, batch, dim, length)
    weight, conv_bias = randn(g, dim, width) * 0.5, randn(g, dim)
    A = -torch.exp(torch.rand(dim, d_state, generator=g)).to(DEVICE)
    B, C, D, dt_bias = randn(g, batch, d_state, length), randn(g, batch, d_state, length), randn(g, dim), randn(g, dim)

    xc, conv_final = samba_kernels.causal_conv1d_fn(x, weight, conv_bias, activation="silu", return_final_states=True)
    y, ssm_final = samba_kernels.selective_scan_fn(xc, dt, A, B, C, D, z, dt_bias, True, return_last_state=True)

    conv_state = torch.zeros(batch, dim, width - 1, device=DEVICE)
    ssm_state = torch.zeros(batch, dim, d_state, device=DEVICE)
    ys = []
    for t in range(length):
        xc_t = samba_kernels.causal_conv1d_update(x[:, :, t], conv_state, weight, conv_bias, activation="silu")
        ys.append(
            samba_kernels.selective_state_update(
                ssm_state, xc_t, dt[:, :, t], A, B[:, :, t], C[:, :, t], D, z[:, :, t], dt_bias, dt_softplus=True
            )
        )
    torch.testing.assert_close(torch.stack(ys, dim=-1), y, **TOL)
    torch.testing.assert_close(conv_state, conv_final, **TOL)
    torch.testing.assert_close(ssm_state, ssm_final, **TOL)


def test_cpu_without_interpreter_takes_the_reference(monkeypatch):
    forbid_kernels_on_the_cpu(monkeypatch, scan_kernel, "_scan_forward")
    g = gen(5)
    t = _scan_inputs(g, 1, 3, 2, 4, D=True)
    t = {k: v.detach().cpu() for k, v in t.items()}
    torch.testing.assert_close(samba_kernels.selective_scan_fn(**t), samba_kernels.selective_scan_ref(**t))
    state = torch.zeros(1, 3, 2)
    samba_kernels.selective_state_update(
        state, t["u"][:, :, 0], t["delta"][:, :, 0], t["A"], t["B"][:, :, 0], t["C"][:, :, 0]
    )
    assert state.abs().sum() > 0


def test_ops_compile_as_one_graph_with_exact_gradients():
    """The ops are custom ops: torch.compile(fullgraph=True) traces a conv + scan with packed documents
    and initial states without a graph break, and its gradients match the references'."""
    g = gen(11)
    batch, dim, length = 2, 6, 13
    t = _scan_inputs(g, batch, dim, 3, length, D=True, z=True, bias=True, init=True)
    weight, bias = randn(g, dim, 4).requires_grad_(), randn(g, dim).requires_grad_()
    conv_init = randn(g, batch, dim, 3).requires_grad_()
    seq_idx = random_seq_idx(g, batch, length, cuts=(5,))

    def layer(conv, scan):
        x, conv_last = conv(
            t["u"],
            weight,
            bias,
            seq_idx=seq_idx,
            initial_states=conv_init,
            return_final_states=True,
            activation="silu",
        )
        rest = {k: v for k, v in t.items() if k != "u"}
        y, last = scan(x, **rest, delta_softplus=True, return_last_state=True, seq_idx=seq_idx)
        return y, last, conv_last

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(samba_kernels.causal_conv1d_fn, samba_kernels.selective_scan_fn)
    ref = layer(samba_kernels.causal_conv1d_ref, samba_kernels.selective_scan_ref)
    assert_grads_match(out, ref, [*t.values(), weight, bias, conv_init], g)


def test_custom_op_registrations():
    """torch.library.opcheck: schema, fake (shape) implementations, autograd registration and
    AOT dispatch of the scan's custom ops, on the Triton kernels (the split scan's too)."""
    g = gen(12)
    t = {k: v.detach() for k, v in _scan_inputs(g, 2, 5, 3, 9, D=True, z=True, bias=True, init=True).items()}
    seq_idx = random_seq_idx(g, 2, 9)
    grouped = t["B"].unsqueeze(1).contiguous(), t["C"].unsqueeze(1).contiguous()
    u = t["u"].clone().requires_grad_()
    cases = {
        scan_kernel._scan_fwd_op: (
            u,
            t["delta"],
            t["A"],
            *grouped,
            t["D"],
            t["z"],
            t["delta_bias"],
            t["initial_state"],
            seq_idx,
            True,
            True,
        ),
        scan_kernel._state_update_op: (
            randn(g, 2, 5, 3),
            randn(g, 2, 5, 1),
            randn(g, 2, 5, 1),
            t["A"],
            randn(g, 2, 1, 3, 1),
            randn(g, 2, 1, 3, 1),
            None,
            None,
            None,
            True,
        ),
    }
    for op, args in cases.items():
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)
    with scan_kernel.forced_layout("lanes", chunk_length=4, backward_chunk_length=8):  # the split scan
        results = torch.library.opcheck(scan_kernel._scan_fwd_op, cases[scan_kernel._scan_fwd_op])
    assert set(results.values()) == {"SUCCESS"}, results
