"""The Triton ops of samba_kernels against the PyTorch references, on fresh random inputs.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), so sizes are tiny.
"""

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import samba_kernels
from samba_kernels import causal_conv1d, selective_scan

# Without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1
# before anything imports triton, which reads it when the kernels are defined.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-4, atol=2e-4)


@pytest.fixture(autouse=True)
def _kernels_on():
    if not samba_kernels.use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("TRITON_INTERPRET is off and there is no GPU: the ops would run the references")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g).to(DEVICE)


def _seq_idx(g, batch, length, cuts=()):
    """Random packed-document ids (batch, length), with documents also starting at `cuts`."""
    starts = torch.rand(batch, length, generator=g) < 0.1
    starts[:, list(cuts)] = True
    starts[:, 0] = False
    return torch.cumsum(starts, dim=-1).to(torch.int32).to(DEVICE)


def _assert_grads_match(out, out_ref, inputs, g):
    outs, refs = (out, out_ref) if isinstance(out, tuple) else ((out,), (out_ref,))
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, **TOL)
    cotangents = [_randn(g, *o.shape) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cotangents)
    grads_ref = torch.autograd.grad(refs, inputs, cotangents)
    for x, gr, gr_ref in zip(inputs, grads, grads_ref):
        assert gr.shape == x.shape and gr.dtype == x.dtype
        torch.testing.assert_close(gr, gr_ref, **TOL)


def _scan_inputs(g, batch, dim, d_state, length, groups=None, *, D=False, z=False, bias=False, init=False):
    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    t = dict(
        u=_randn(g, batch, dim, length),
        delta=F.softplus(_randn(g, batch, dim, length) - 2),
        A=-torch.exp(torch.rand(dim, d_state, generator=g)).to(DEVICE),
        B=_randn(g, *bc_shape),
        C=_randn(g, *bc_shape),
        D=_randn(g, dim) if D else None,
        z=_randn(g, batch, dim, length) if z else None,
        delta_bias=_randn(g, dim) * 0.5 if bias else None,
        initial_state=_randn(g, batch, dim, d_state) if init else None,
    )
    return {k: v.requires_grad_() for k, v in t.items() if v is not None}


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


# The lanes forward runs where there are enough channels to give each SM sub-partition a warp
# (selective_scan.LANES), the split scan where a long sequence has too few: at these sizes only when forced.
LANE_CASES = ["everything", "grouped", "length-1", "length-130", "d_state-13"]
# The split scan: the forward in chunks of two lanes tiles, the backward in chunks of two of its tiles, the last
# chunk partial; documents start at chunks' first steps (`chunk`, 2 `chunk`) and inside chunks.
SPLIT_CASES = ["everything", "grouped", "d_state-13"]
LAYOUTS = {
    "steps": lambda chunk: dict(forward="steps"),
    "lanes": lambda chunk: dict(forward="lanes"),
    "split": lambda chunk: dict(forward="lanes", chunk_length=chunk, backward_chunk_length=2 * chunk),
}


@pytest.mark.parametrize("case, layout", [(case, "steps") for case in SCAN_CASES] +
                         [(case, "lanes") for case in LANE_CASES] + [(case, "split") for case in SPLIT_CASES])
def test_selective_scan_matches_reference(case, layout, monkeypatch):
    batch, dim, d_state, length, groups, chunk, opt = SCAN_CASES[case]
    monkeypatch.setattr(selective_scan, "CHUNK", chunk)  # small chunks: cross checkpoints at tiny lengths
    g = _gen(len(case))
    tensors = _scan_inputs(g, batch, dim, d_state, length, groups,
                           **{k: opt.get(k, False) for k in ("D", "z", "bias", "init")})
    kwargs = dict(delta_softplus=opt.get("softplus", False), return_last_state=opt.get("last", False))
    if opt.get("seq"):
        kwargs["seq_idx"] = _seq_idx(g, batch, length, cuts=[c for c in (chunk, 2 * chunk, length - 1) if c < length])
    with selective_scan.forced_layout(**LAYOUTS[layout](chunk)):
        plan = selective_scan._configs(tensors["u"], _grouped(tensors["B"]), d_state, True)
        out = samba_kernels.selective_scan_fn(**tensors, **kwargs)
        out_ref = samba_kernels.selective_scan_ref(**tensors, **kwargs)
        _assert_grads_match(out, out_ref, list(tensors.values()), g)
    assert plan.forward.lanes == (layout != "steps")
    if layout == "split":  # both split, unless the backward's tiles are as long as the sequence (d_state 13)
        assert plan.forward.chunks > 1 and (plan.backward.chunks > 1 or 2 * plan.backward.meta["T"] >= length)


def _grouped(BC):
    return BC if BC.dim() == 4 else BC.unsqueeze(1)


@pytest.mark.parametrize("sms", [132, 78])
def test_selective_scan_splits_long_sequences_of_small_batches(sms):
    """The GPU launch plan on a device of `sms` SMs (shapes only, no launch): batch-1 and batch-2 sequences of
    16K steps split in the forward, a batch of 8 x 4K does not; the backward splits only where SPLIT_BACKWARD is
    on. At batch 1 the forward's chunks give every SM sub-partition a warp and the backward's give each SM
    PROGRAMS_PER_SM programs."""
    def plan(batch, length, dim=3072):
        return selective_scan._plan(batch, dim, length, 1, 16, True, gpu=True, sms=sms)

    for batch in (1, 2):
        assert plan(batch, 16384).forward.chunks > 1 and plan(batch, 16384).backward.chunks == 1
    unsplit = plan(8, 4096)
    assert unsplit.forward.lanes and unsplit.forward.chunks == 1 and unsplit.backward.chunks == 1
    selective_scan.SPLIT_BACKWARD = True
    try:
        assert plan(1, 16384).backward.chunks > 1
        forward, backward = plan(1, 65536).forward, plan(1, 65536).backward
    finally:
        selective_scan.SPLIT_BACKWARD = False
    assert forward.lanes and forward.chunk % forward.meta["T"] == 0 and backward.chunk % backward.meta["T"] == 0
    assert forward.chunks * triton.cdiv(3072, forward.meta["BLOCK_D"]) >= selective_scan.SUB_PARTITIONS_PER_SM * sms
    assert backward.chunks * triton.cdiv(3072, backward.meta["BLOCK_D"]) >= selective_scan.PROGRAMS_PER_SM * sms
    assert plan(1, 64).forward.chunks == 1 and plan(1, 64).backward.chunks == 1  # too short to split
    with pytest.raises(ValueError, match="forward='lanes'"):
        with selective_scan.forced_layout("steps", chunk_length=64):
            pass


@triton.jit
def _softplus_kernel(x, out, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + offsets, selective_scan._softplus(tl.load(x + offsets, mask=offsets < n)), mask=offsets < n)


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
    values, steps = selective_scan._channel_sums(tile, BLOCK_D, T, THREAD_STEPS)
    tl.store(sums + steps, values)


@pytest.mark.parametrize("block_d, T, thread_steps", [(16, 16, 8), (4, 8, 4), (8, 32, 8), (32, 8, 8), (1, 8, 8),
                                                      (2, 16, 4)])
def test_scan_channel_sums_match_torch_sum(block_d, T, thread_steps):
    # the backward's reduce-scatter, with fewer rounds than channel bits (32 x 8) and than step bits (2 x 16)
    x = _randn(_gen(block_d * T), block_d, T)
    sums = torch.full((T,), float("nan"), device=DEVICE)
    _channel_sums_kernel[(1,)](x, sums, BLOCK_D=block_d, T=T, THREAD_STEPS=thread_steps)
    torch.testing.assert_close(sums, x.sum(0), rtol=1e-6, atol=1e-6)


CONV_CASES = {
    # name: (batch, dim, length, width, activation, seq_idx, initial_states, bias, return_final_states)
    "silu-everything": (2, 5, 19, 4, "silu", True, True, True, True),
    "plain-width-3": (1, 37, 7, 3, None, False, False, False, False),
    "shorter-than-width": (2, 3, 2, 4, "silu", False, True, True, True),
    "length-1": (1, 4, 1, 2, None, True, True, False, True),
    "long": (1, 3, 130, 4, "silu", True, False, True, False),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_causal_conv1d_matches_reference(case):
    batch, dim, length, width, activation, seq, init, bias, final = CONV_CASES[case]
    g = _gen(len(case))
    tensors = dict(x=_randn(g, batch, dim, length), weight=_randn(g, dim, width) * 0.5)
    if bias:
        tensors["bias"] = _randn(g, dim)
    if init:
        tensors["initial_states"] = _randn(g, batch, dim, width - 1)
    tensors = {k: v.requires_grad_() for k, v in tensors.items()}
    kwargs = dict(activation=activation, return_final_states=final,
                  seq_idx=_seq_idx(g, batch, length, cuts=(1,) if length > 1 else ()) if seq else None)
    out = samba_kernels.causal_conv1d_fn(**tensors, **kwargs)
    out_ref = samba_kernels.causal_conv1d_ref(**tensors, **kwargs)
    _assert_grads_match(out, out_ref, list(tensors.values()), g)


@pytest.mark.parametrize("extra_state, length", [(0, None), (2, None), (3, 3)])
def test_causal_conv1d_update_matches_reference(extra_state, length):
    g = _gen(extra_state)
    batch, dim, width = 2, 5, 4
    x = _randn(g, batch, dim) if length is None else _randn(g, batch, dim, length)
    weight, bias = _randn(g, dim, width), _randn(g, dim)
    state = _randn(g, batch, dim, width - 1 + extra_state)
    state_ref, ptr = state.clone(), state.data_ptr()
    out = samba_kernels.causal_conv1d_update(x, state, weight, bias, activation="silu")
    out_ref = samba_kernels.causal_conv1d_update_ref(x, state_ref, weight, bias, activation="silu")
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)
    assert state.data_ptr() == ptr
    with pytest.raises(ValueError):
        samba_kernels.causal_conv1d_update(x, state[:, :, :2], weight)


@pytest.mark.parametrize("groups", [None, 2])
def test_selective_state_update_matches_reference(groups):
    g = _gen(3)
    batch, dim, d_state = 2, 6, 3
    bc = (batch, d_state) if groups is None else (batch, groups, d_state)
    x, dt, z = _randn(g, batch, dim), _randn(g, batch, dim), _randn(g, batch, dim)
    A = -torch.exp(torch.rand(dim, d_state, generator=g)).to(DEVICE)
    B, C, D, dt_bias = _randn(g, *bc), _randn(g, *bc), _randn(g, dim), _randn(g, dim)
    # A strided state, as a slice of a bigger cache.
    cache = _randn(g, batch, dim, d_state + 2)
    state = cache[:, :, 1:-1]
    state_ref, cache_before, ptr = state.clone(), cache.clone(), state.data_ptr()
    y = samba_kernels.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    y_ref = samba_kernels.selective_state_update_ref(state_ref, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)
    assert state.data_ptr() == ptr  # updated in place, its neighbours in the cache untouched
    assert torch.equal(cache[:, :, [0, -1]], cache_before[:, :, [0, -1]])


def test_decode_token_by_token_matches_full_sequence():
    g = _gen(4)
    batch, dim, d_state, width, length = 2, 5, 3, 4, 6
    x, dt, z = _randn(g, batch, dim, length), _randn(g, batch, dim, length), _randn(g, batch, dim, length)
    weight, conv_bias = _randn(g, dim, width) * 0.5, _randn(g, dim)
    A = -torch.exp(torch.rand(dim, d_state, generator=g)).to(DEVICE)
    B, C, D, dt_bias = _randn(g, batch, d_state, length), _randn(g, batch, d_state, length), _randn(g, dim), _randn(g, dim)

    xc, conv_final = samba_kernels.causal_conv1d_fn(x, weight, conv_bias, activation="silu", return_final_states=True)
    y, ssm_final = samba_kernels.selective_scan_fn(xc, dt, A, B, C, D, z, dt_bias, True, return_last_state=True)

    conv_state = torch.zeros(batch, dim, width - 1, device=DEVICE)
    ssm_state = torch.zeros(batch, dim, d_state, device=DEVICE)
    ys = []
    for t in range(length):
        xc_t = samba_kernels.causal_conv1d_update(x[:, :, t], conv_state, weight, conv_bias, activation="silu")
        ys.append(samba_kernels.selective_state_update(
            ssm_state, xc_t, dt[:, :, t], A, B[:, :, t], C[:, :, t], D, z[:, :, t], dt_bias, dt_softplus=True))
    torch.testing.assert_close(torch.stack(ys, dim=-1), y, **TOL)
    torch.testing.assert_close(conv_state, conv_final, **TOL)
    torch.testing.assert_close(ssm_state, ssm_final, **TOL)


def test_cpu_without_interpreter_takes_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not samba_kernels.use_triton(torch.zeros(1))

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    for module in (selective_scan, causal_conv1d):
        monkeypatch.setattr(module, "use_triton", lambda x: x.is_cuda)
    monkeypatch.setattr(selective_scan, "_scan_forward", no_kernel)
    monkeypatch.setattr(causal_conv1d, "_conv_forward", no_kernel)
    g = _gen(5)
    t = _scan_inputs(g, 1, 3, 2, 4, D=True)
    t = {k: v.detach().cpu() for k, v in t.items()}
    torch.testing.assert_close(samba_kernels.selective_scan_fn(**t), samba_kernels.selective_scan_ref(**t))
    x, w = torch.randn(1, 3, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(samba_kernels.causal_conv1d_fn(x, w), samba_kernels.causal_conv1d_ref(x, w))
    state = torch.zeros(1, 3, 2)
    samba_kernels.selective_state_update(state, t["u"][:, :, 0], t["delta"][:, :, 0], t["A"], t["B"][:, :, 0],
                                         t["C"][:, :, 0])
    assert state.abs().sum() > 0


def test_ops_compile_as_one_graph_with_exact_gradients():
    """The ops are custom ops: torch.compile(fullgraph=True) traces a conv + scan with packed documents
    and initial states without a graph break, and its gradients match the references'."""
    g = _gen(11)
    batch, dim, length = 2, 6, 13
    t = _scan_inputs(g, batch, dim, 3, length, D=True, z=True, bias=True, init=True)
    weight, bias = _randn(g, dim, 4).requires_grad_(), _randn(g, dim).requires_grad_()
    conv_init = _randn(g, batch, dim, 3).requires_grad_()
    seq_idx = _seq_idx(g, batch, length, cuts=(5,))

    def layer(conv, scan):
        x, conv_last = conv(t["u"], weight, bias, seq_idx=seq_idx, initial_states=conv_init,
                            return_final_states=True, activation="silu")
        rest = {k: v for k, v in t.items() if k != "u"}
        y, last = scan(x, **rest, delta_softplus=True, return_last_state=True, seq_idx=seq_idx)
        return y, last, conv_last

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(samba_kernels.causal_conv1d_fn, samba_kernels.selective_scan_fn)
    ref = layer(samba_kernels.causal_conv1d_ref, samba_kernels.selective_scan_ref)
    _assert_grads_match(out, ref, [*t.values(), weight, bias, conv_init], g)


def test_custom_op_registrations():
    """torch.library.opcheck: schema, fake (shape) implementations, autograd registration and
    AOT dispatch of every custom op, on the Triton kernels."""
    g = _gen(12)
    t = {k: v.detach() for k, v in _scan_inputs(g, 2, 5, 3, 9, D=True, z=True, bias=True, init=True).items()}
    seq_idx = _seq_idx(g, 2, 9)
    grouped = t["B"].unsqueeze(1).contiguous(), t["C"].unsqueeze(1).contiguous()
    u, w = t["u"].clone().requires_grad_(), _randn(g, 5, 4).requires_grad_()
    cases = {
        selective_scan._scan_fwd_op: (u, t["delta"], t["A"], *grouped, t["D"], t["z"], t["delta_bias"],
                                      t["initial_state"], seq_idx, True, True),
        causal_conv1d._conv_fwd_op: (u, w, _randn(g, 5), seq_idx, _randn(g, 2, 5, 3), "silu"),
        selective_scan._state_update_op: (_randn(g, 2, 5, 3), _randn(g, 2, 5, 1), _randn(g, 2, 5, 1), t["A"],
                                          _randn(g, 2, 1, 3, 1), _randn(g, 2, 1, 3, 1), None, None, None, True),
        causal_conv1d._conv_update_op: (_randn(g, 2, 5, 1), _randn(g, 2, 5, 4), w.detach(), None, "silu"),
    }  # fmt: skip
    for op, args in cases.items():
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)
    with selective_scan.forced_layout("lanes", chunk_length=4, backward_chunk_length=8):  # the split scan
        results = torch.library.opcheck(selective_scan._scan_fwd_op, cases[selective_scan._scan_fwd_op])
    assert set(results.values()) == {"SUCCESS"}, results


# (N, K, bias, dtype): odd sizes; N >= 4096 takes the many-programs tile, K = 5 a single masked step
@pytest.mark.parametrize("N, K, bias, dtype", [(37, 100, True, torch.float32), (4100, 5, False, torch.float32),
                                               (130, 2500, True, torch.bfloat16)])
def test_matvec_matches_a_float64_product(N, K, bias, dtype):
    g = _gen(13)
    x, w = _randn(g, 1, 1, K).to(dtype), _randn(g, N, K).to(dtype)
    b = _randn(g, N).to(dtype) if bias else None
    with torch.no_grad():
        out = samba_kernels.matvec(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == (1, 1, N) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), ref, **tol)


def test_one_row_kernels_launch_as_dependents_only_where_inductor_does_on_sm90(monkeypatch):
    """PDL follows torch.compile's switch, on CUDA devices of compute capability 9 or more, never in the
    interpreter or before Triton 3.4 (the launch itself is checked on the H200: benchmarks/generate.md)."""
    from torch._inductor import config

    common = importlib.import_module("samba_kernels._common")
    on_gpu = SimpleNamespace(is_cuda=True, device=0)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[0])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    serial = {"PDL": False}  # without launch_pdl, which Triton before 3.4 refuses
    monkeypatch.setattr(config.triton, "enable_pdl", False)
    assert common.dependent_launch(on_gpu) == serial
    monkeypatch.setattr(config.triton, "enable_pdl", True)
    assert common.dependent_launch(on_gpu) == {"PDL": True, "launch_pdl": True}
    capability[0] = (8, 0)
    assert common.dependent_launch(on_gpu) == serial
    capability[0] = (9, 0)
    assert common.dependent_launch(torch.zeros(1)) == serial
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert common.dependent_launch(on_gpu) == serial
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(common, "gdc_wait", None)  # Triton before 3.4
    assert common.dependent_launch(on_gpu) == serial


def test_matvec_reads_a_strided_row_and_traces_into_a_graph():
    """A row whose elements are strided (a transposed slice, as the Mamba mixer's x_proj input behind the
    PyTorch decode ops), inside torch.compile(fullgraph=True): one custom op, the fake output's shape,
    F.linear's values; the stacked and gated products read it too."""
    g = _gen(14)
    x, w, b = _randn(g, 1, 24, 3)[:, :, -1:].transpose(1, 2), _randn(g, 10, 24), _randn(g, 10)
    assert x.reshape(-1).stride() == (3,)
    with torch.no_grad():
        torch.testing.assert_close(samba_kernels.stacked_matvec(x, [w, b[:, None] * w])[1], F.linear(x, b[:, None] * w), **TOL)
        torch.testing.assert_close(samba_kernels.gated_matvec(x, w, w), F.silu(F.linear(x, w)) * F.linear(x, w), **TOL)
    compiled = torch.compile(samba_kernels.matvec, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b), **TOL)
    op = importlib.import_module("samba_kernels.matvec")._matvec
    for args in ((x, [w], b, False), (x, [w, w[:3]], None, False), (x, [w, w], None, True)):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


# The rows of one to three weights of odd sizes (the last ones straddling a program's rows), in one launch
@pytest.mark.parametrize("rows", [(37,), (40, 3), (130, 24, 24)])
def test_stacked_matvec_matches_float64_products(rows):
    g = _gen(15)
    x, weights = _randn(g, 1, 1, 2500), [_randn(g, n, 2500) for n in rows]
    with torch.no_grad():
        outs = samba_kernels.stacked_matvec(x, weights)
    assert [o.shape for o in outs] == [(1, 1, n) for n in rows]
    for out, w in zip(outs, weights):
        torch.testing.assert_close(out.double(), F.linear(x.double(), w.double()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_matvec_matches_a_float64_swiglu_half(dtype):
    g = _gen(16)
    x, gate, up = _randn(g, 1, 1, 300).to(dtype), _randn(g, 257, 300).to(dtype), _randn(g, 257, 300).to(dtype)
    with torch.no_grad():
        out = samba_kernels.gated_matvec(x, gate, up)
    ref = F.silu(F.linear(x.double(), gate.double())) * F.linear(x.double(), up.double())
    assert out.shape == (1, 1, 257) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.double(), ref, **tol)


def test_matvec_refuses_what_it_cannot_do():
    w = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        samba_kernels.matvec(torch.zeros(2, 4, device=DEVICE), w)
    with pytest.raises(ValueError, match="does not match"):
        samba_kernels.matvec(torch.zeros(1, 5, device=DEVICE), w)
    with pytest.raises(ValueError, match="no backward"):
        samba_kernels.matvec(torch.zeros(1, 4, device=DEVICE), w.requires_grad_())
    with torch.no_grad():
        with pytest.raises(ValueError, match="one to three"):
            samba_kernels.stacked_matvec(torch.zeros(1, 4, device=DEVICE), [w] * 4)
        with pytest.raises(ValueError, match="same shape"):
            samba_kernels.gated_matvec(torch.zeros(1, 4, device=DEVICE), w, w[:2])
        with pytest.raises(ValueError, match="does not match"):
            samba_kernels.stacked_matvec(torch.zeros(1, 4, device=DEVICE), [w, torch.zeros(3, 5, device=DEVICE)])


def _explicit_window_attention(q, k, v, window):
    """Softmax attention written out: query i (aligned to the end of the keys) sees keys j with
    0 <= pos(i) - j < window; kv heads shared by consecutive query heads."""
    lq, lk, rep = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // rep].double(), v[:, h // rep].double()
        for i in range(lq):
            pos = lk - lq + i
            lo = max(0, pos - window + 1)
            s = q[:, h, i : i + 1].double() @ kh[:, lo : pos + 1].transpose(-1, -2) / q.shape[-1] ** 0.5
            out[:, h, i] = (torch.softmax(s, dim=-1) @ vh[:, lo : pos + 1])[:, 0]
    return out


@pytest.mark.parametrize("heads, kv_heads, len_q, len_kv, window", [(2, 2, 9, 9, 4), (4, 2, 5, 12, 3), (3, 1, 1, 7, 16)])
def test_windowed_attention_matches_explicit_softmax(heads, kv_heads, len_q, len_kv, window):
    g = _gen(heads + len_q)
    q = _randn(g, 2, heads, len_q, 16).requires_grad_()  # flex needs head_dim >= 16
    k, v = _randn(g, 2, kv_heads, len_kv, 16).requires_grad_(), _randn(g, 2, kv_heads, len_kv, 16).requires_grad_()
    out = samba_kernels.windowed_attention(q, k, v, window)
    ref = _explicit_window_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), window)
    torch.testing.assert_close(out.detach().cpu().double(), ref, rtol=1e-3 if DEVICE == "cuda" else 1e-5,
                               atol=1e-3 if DEVICE == "cuda" else 1e-5)
    # Gradients against the float64 autograd of the same explicit softmax.
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    dy = _randn(g, *out.shape)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    grads_ref = torch.autograd.grad(_explicit_window_attention(q64, k64, v64, window), (q64, k64, v64), dy.cpu().double())
    for gr, gr_ref in zip(grads, grads_ref):
        assert gr.shape == gr_ref.shape
        torch.testing.assert_close(gr.cpu().double(), gr_ref, rtol=2e-3 if DEVICE == "cuda" else 1e-5,
                                   atol=2e-3 if DEVICE == "cuda" else 1e-5)
    with pytest.raises(ValueError):
        samba_kernels.windowed_attention(q, k, v, 0)


@pytest.mark.parametrize(
    "heads, kv_heads, len_q, len_kv, window, head_dim",
    [
        (2, 1, 400, 400, 300, 16),  # a tile's keys in all three ranges: unmasked bulk, trailing edge, diagonal
        (2, 2, 70, 333, 200, 32),  # a chunk continuing cached keys
        (4, 2, 130, 130, 5, 16),  # a window narrower than a tile of keys
        (1, 1, 1, 50, 64, 16),  # one query
    ],
)
def test_windowed_attention_forward_kernel(monkeypatch, heads, kv_heads, len_q, len_kv, window, head_dim):
    """Without gradients the op runs its own Triton forward (never flex nor the reference)."""
    module = importlib.import_module("samba_kernels.windowed_attention")  # the package exports the function

    def other_path(*args, **kwargs):
        raise AssertionError("the forward kernel should have run")

    monkeypatch.setattr(module, "windowed_attention_ref", other_path)
    monkeypatch.setattr(module, "_compiled_flex", other_path)
    g = _gen(len_q + window)
    q = _randn(g, 2, heads, len_q, head_dim)
    k, v = _randn(g, 2, kv_heads, len_kv, head_dim), _randn(g, 2, kv_heads, len_kv, head_dim)
    with torch.no_grad():
        out = samba_kernels.windowed_attention(q, k, v, window)
    ref = _explicit_window_attention(q.cpu(), k.cpu(), v.cpu(), window)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def test_windowed_attention_head_dim_without_a_kernel_tile():
    """A head_dim that is not a power of two has no tile of the forward kernel: flex or the reference
    answer instead, exactly."""
    g = _gen(5)
    q, k, v = (_randn(g, 1, 2, 140, 24) for _ in range(3))
    with torch.no_grad():
        out = samba_kernels.windowed_attention(q, k, v, 50)
    ref = _explicit_window_attention(q.cpu(), k.cpu(), v.cpu(), 50)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-3 if DEVICE == "cuda" else 1e-5,
                               atol=1e-3 if DEVICE == "cuda" else 1e-5)


def test_windowed_attention_forward_kernel_only_takes_int32_offsets():
    """The kernel's offsets within a batch entry are int32: a tensor reaching past 2**31 elements
    (a million tokens of 16 heads x 128 in one piece) goes to the other path. Shapes only (meta)."""
    module = importlib.import_module("samba_kernels.windowed_attention")
    fits = module._offsets_fit_int32
    assert fits(torch.empty(8, 16, 65536, 128, device="meta"))  # the batch offset is int64 in the kernel
    assert not fits(torch.empty(1, 16, 2**20 + 1, 128, device="meta"))
    # the model's layout: (batch, length, heads, head_dim) memory seen as (batch, heads, length, head_dim)
    assert fits(torch.empty(1, 2**20, 16, 128, device="meta").transpose(1, 2))
    assert not fits(torch.empty(1, 2**20 + 1, 16, 128, device="meta").transpose(1, 2))
    # a strided head_dim is made contiguous before the launch: the copy's offsets count
    assert not fits(torch.empty((), device="meta").expand(1, 16, 2**20 + 1, 128))  # broadcast: all strides 0
    assert fits(torch.empty(1, 16, 128, 2**20, device="meta").transpose(2, 3))


def test_windowed_attention_forward_kernel_traces_into_a_graph():
    """Inside torch.compile(fullgraph=True) the forward kernel is one custom op, whose fake output
    (shape and layout) matches the real one."""
    g = _gen(3)
    # (batch, len, heads, head_dim) memory seen as (batch, heads, len, head_dim), as the model passes it
    q, k, v = (_randn(g, 2, 150, 2, 16).transpose(1, 2) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: samba_kernels.windowed_attention(q, k, v, 40), fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        out = compiled(q, k, v)
    assert out.stride() == q.stride()
    ref = _explicit_window_attention(q.cpu(), k.cpu(), v.cpu(), 40)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="flex_attention runs on CUDA only")
def test_windowed_attention_flex_matches_reference_bf16():
    g = _gen(7)
    q = _randn(g, 2, 4, 300, 64).to(torch.bfloat16).requires_grad_()
    k, v = (_randn(g, 2, 2, 520, 64).to(torch.bfloat16).requires_grad_() for _ in range(2))
    out = samba_kernels.windowed_attention(q, k, v, 128)
    ref = samba_kernels.windowed_attention_ref(q, k, v, 128)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    dy = torch.randn_like(out)
    for gr, gr_ref in zip(torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy)):
        torch.testing.assert_close(gr.float(), gr_ref.float(), rtol=5e-2, atol=5e-2)


def test_compiled_flex_serves_prompts_of_any_length_with_two_compilations():
    """The CUDA path's compiled flex_attention, run here through inductor's CPU backend: a compilation
    per length would hit dynamo's recompile limit after eight lengths of chunked prefill and fall
    back to flex's unfused path (the whole score matrix in memory). It compiles for the first length
    and once more for symbolic lengths, first chunks and continued ones alike, and stays exact
    against the explicit softmax."""
    from torch._dynamo.utils import counters

    from samba_kernels.windowed_attention import _block_mask, _compiled_flex

    torch._dynamo.reset()
    counters.clear()
    window, g = 64, _gen(11)
    for len_q, continued in ((128, False), (256, False), (200, True), (384, True)):
        len_kv = len_q + window - 1 if continued else len_q  # a first chunk, or one continuing cached keys
        q, k, v = (_randn(g, 1, 2, n, 16).cpu() for n in (len_q, len_kv, len_kv))
        out = _compiled_flex()(q, k, v, block_mask=_block_mask(len_q, len_kv, window, "cpu"))
        torch.testing.assert_close(out.double(), _explicit_window_attention(q, k, v, window), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] <= 2


def _mamba_decode_inputs(g, dim, width, state_len, rank, d_state, conv_bias=True):
    xz = _randn(g, 1, 2 * dim)  # in_proj's output: x and z are strided views of one row
    weights = dict(conv_weight=_randn(g, dim, width), conv_bias=_randn(g, dim) if conv_bias else None,
                   x_proj_weight=_randn(g, rank + 2 * d_state, dim) * 0.2, dt_proj_weight=_randn(g, dim, rank) * 0.3,
                   dt_proj_bias=_randn(g, dim) - 1.0, A_log=_randn(g, dim, d_state).abs().log1p(), D=_randn(g, dim))
    return xz[:, :dim], xz[:, dim:], _randn(g, 1, dim, state_len), _randn(g, 1, dim, d_state), weights


# (dim, width, state_len, rank, d_state): sizes that are not powers of two, a state longer than the
# convolution needs (a static cache's), no conv bias.
@pytest.mark.parametrize("dim, width, state_len, rank, d_state, conv_bias",
                         [(40, 4, 3, 5, 6, True), (70, 3, 5, 3, 16, False), (24, 2, 1, 4, 4, True)])
def test_mamba_decode_step_matches_the_mixer_ops_over_several_steps(monkeypatch, dim, width, state_len, rank,
                                                                    d_state, conv_bias):
    """Against conv update, x_proj, dt_proj and the state update of the PyTorch references, step after step:
    the output, the convolution's state (shifted in place) and the SSM state. x_proj's K steps are 32 wide,
    so that the wider mixers take several."""
    monkeypatch.setitem(importlib.import_module("samba_kernels.mamba_decode").PROJECT_TILE, "BLOCK_K", 32)
    g = _gen(19)
    x, z, conv_state, ssm_state, weights = _mamba_decode_inputs(g, dim, width, state_len, rank, d_state, conv_bias)
    ref_conv_state, ref_ssm_state = conv_state.clone(), ssm_state.clone()
    with torch.no_grad():
        for _ in range(3):
            y = samba_kernels.mamba_decode_step(x, z, conv_state, ssm_state, **weights)
            expected = samba_kernels.mamba_decode_step_ref(x, z, ref_conv_state, ref_ssm_state, **weights)
            torch.testing.assert_close(y, expected, **TOL)
            torch.testing.assert_close(conv_state, ref_conv_state, rtol=0, atol=0)
            torch.testing.assert_close(ssm_state, ref_ssm_state, **TOL)
            x, z = x.roll(1, -1), z * 0.5


def test_mamba_decode_step_traces_into_a_graph_and_refuses_what_it_cannot_do():
    g = _gen(20)
    x, z, conv_state, ssm_state, weights = _mamba_decode_inputs(g, 16, 4, 3, 4, 4)
    ref_conv_state, ref_ssm_state = conv_state.clone(), ssm_state.clone()
    with torch.no_grad():
        step = torch.compile(samba_kernels.mamba_decode_step, fullgraph=True, backend="aot_eager")
        y = step(x, z, conv_state, ssm_state, **weights)
    expected = samba_kernels.mamba_decode_step_ref(x, z, ref_conv_state, ref_ssm_state, **weights)
    torch.testing.assert_close(y, expected, **TOL)
    torch.testing.assert_close(ssm_state, ref_ssm_state, **TOL)  # the compiled op mutates the states
    op = importlib.import_module("samba_kernels.mamba_decode")._mamba_decode_step
    results = torch.library.opcheck(op, (x, z, conv_state, ssm_state, *weights.values()))
    assert set(results.values()) == {"SUCCESS"}, results
    with pytest.raises(ValueError, match="x has shape"):
        samba_kernels.mamba_decode_step(x.expand(2, -1), z, conv_state, ssm_state, **weights)
    with pytest.raises(ValueError, match="needs at least 3"):
        samba_kernels.mamba_decode_step(x, z, conv_state[..., :2], ssm_state, **weights)
    with pytest.raises(ValueError, match="no backward"):
        samba_kernels.mamba_decode_step(x.requires_grad_(), z, conv_state, ssm_state, **weights)
