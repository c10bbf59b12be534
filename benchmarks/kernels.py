"""kernels: samba_kernels' ops against their PyTorch references, FlexAttention and SDPA, cuBLAS, and mamba-ssm's
CUDA selective scan built and measured in the same process."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import samba_kernels as sk
from samba_hf.cache_samba import joined
from samba_kernels._common import contiguous

from . import mamba_ssm_cuda, models
from .harness import columns, drawer, fmt, free_memory, kernel_ms, registry, rows_of, scan_inputs

TITLE = "Kernels: samba_kernels against PyTorch, FlexAttention, cuBLAS and mamba-ssm"
D_STATE, WIDTH, REF_LEN = 16, 4, 256
# (batch, dim, length) of the scan's grid, in the order of priority: mamba-ssm's earlier comparison first.
SCAN_GRID = [
    (8, 3072, 4096),
    (8, 4608, 4096),
    (2, 3072, 16384),
    (1, 3072, 4096),
    (1, 3072, 65536),
    (2, 3072, 4096),
    (8, 3072, 16384),
    (1, 3072, 16384),
    (2, 3072, 65536),
    (8, 3072, 65536),
]
SMOKE_SCAN_GRID = [(1, 4, 16)]  # Triton's interpreter: a Python loop per program and step
ACCURACY_SHAPE, SMOKE_ACCURACY_SHAPE = (2, 256, 3000), (1, 4, 16)  # crosses mamba-ssm's 2048-step chunks
# Relative errors against the PyTorch reference (float32 math) that a correct kernel stays within: float32 inputs,
# and bf16 inputs (the reference computes in float32 from the same bf16 values). mamba-ssm is built with
# --use_fast_math; its bound is there to catch a wrong binding, not to grade it.
TOLERANCE = {
    "samba_kernels": {torch.float32: 1e-5, torch.bfloat16: 1e-2},
    "mamba-ssm": {torch.float32: 1e-3, torch.bfloat16: 5e-2},
}
CHECK_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}
CONV_SHAPES = {"samba-421m": (8, 3072, 4096), "samba-1.3b": (8, 4608, 4096)}
ATTENTION_SHAPES = [(8, 12, 4096, 128, 2048), (1, 16, 16384, 128, 2048)]  # batch, heads, length, head_dim, window
SMOKE_ATTENTION_SHAPES = [(1, 2, 32, 16, 8)]
GRAPH_CALLS = 100  # calls per CUDA graph of the one-token ops
COLD_L2_BYTES = 200e6  # each matvec shape is timed over this many bytes of weight copies, so no read hits the L2
SHAPE_S = 25.0  # a planning guess of one shape of the scan grid (compilation included), for the budget

INTRO = f"""
Times are medians of `triton.testing.do_bench` (which empties the L2 before each call) on bf16 inputs, d_state
{D_STATE}, conv width {WIDTH}; `first ms` is the first call, which pays compilation. The ceilings are measured in the
same process: copy bandwidth, bf16 matmul rate, exp2 rate. A scan's floor is the larger of its minimal bytes over the
copy bandwidth and its exponentials (one per channel, state and step; twice for forward+backward) over the exp2
rate. mamba-ssm's `selective_scan_cuda` is compiled from its source distribution for this GPU alone
(`benchmarks/mamba_ssm_cuda.py`) and called through a small autograd function; both scans take z, D, delta_bias
and delta's softplus, B and C of shape (batch, d_state, length). Reference times (the PyTorch references) are
measured at length {REF_LEN} and extrapolated linearly.
"""

CASES, case = registry()


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def seq_idx_for(batch: int, length: int, device) -> torch.Tensor:
    """About eight packed documents per row."""
    starts = torch.rand(batch, length, device=device) < 8.0 / length
    starts[:, 0] = False
    return torch.cumsum(starts, dim=-1).to(torch.int32)


def conv_inputs(batch, dim, length, device, dtype, requires_grad=False) -> dict:
    generator = torch.Generator(device=device).manual_seed(1)
    inputs = dict(
        x=torch.randn(batch, dim, length, generator=generator, device=device).to(dtype),
        weight=torch.randn(dim, WIDTH, generator=generator, device=device).to(dtype) * 0.5,
        bias=torch.randn(dim, generator=generator, device=device).to(dtype),
    )
    return {name: tensor.requires_grad_(requires_grad) for name, tensor in inputs.items()}


def check_errors(errors: dict[str, float], tolerance_of) -> None:
    """Raises, naming each, where an error passes its tolerance (tolerance_of(name))."""
    failures = [
        f"{name}: {error:.1e} > {tolerance_of(name):.0e}"
        for name, error in errors.items()
        if not error <= tolerance_of(name)
    ]
    if failures:
        raise AssertionError("relative errors past tolerance: " + "; ".join(failures))


@case(
    "checks", "relative errors of every op against its PyTorch reference (scan, conv, decode step, window attention)"
)
def checks(ctx):
    device = ctx.device
    dim, length = (4, 16) if ctx.smoke else (256, 1024)
    errors = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        inputs = scan_inputs(2, dim, length, device, dtype, requires_grad=True, extras=True, seed=3)
        options = dict(delta_softplus=True, return_last_state=True, seq_idx=seq_idx_for(2, length, device))
        (y, last), (y_ref, last_ref) = (
            sk.selective_scan_fn(**inputs, **options),
            sk.selective_scan_ref(**inputs, **options),
        )
        errors[f"scan {name} fwd"] = rel_err(y, y_ref)
        errors[f"scan {name} last state"] = rel_err(last, last_ref)
        dy, dlast = torch.randn_like(y), torch.randn_like(last)
        grads = torch.autograd.grad((y, last), list(inputs.values()), (dy, dlast))
        grads_ref = torch.autograd.grad((y_ref, last_ref), list(inputs.values()), (dy, dlast))
        for input_name, grad, grad_ref in zip(inputs, grads, grads_ref):
            errors[f"scan {name} d{input_name}"] = rel_err(grad, grad_ref)
    conv = conv_inputs(2, dim, length, device, torch.float32, requires_grad=True)
    out, out_ref = sk.causal_conv1d_fn(**conv, activation="silu"), sk.causal_conv1d_ref(**conv, activation="silu")
    errors["conv fp32 fwd"] = rel_err(out, out_ref)
    dy = torch.randn_like(out)
    for input_name, grad, grad_ref in zip(
        conv, torch.autograd.grad(out, list(conv.values()), dy), torch.autograd.grad(out_ref, list(conv.values()), dy)
    ):
        errors[f"conv fp32 d{input_name}"] = rel_err(grad, grad_ref)
    step = {name: tensor.detach() for name, tensor in scan_inputs(2, dim, 1, device, torch.float32).items()}
    state = torch.randn(2, dim, D_STATE, device=device)
    arguments = dict(
        x=step["u"][..., 0],
        dt=step["delta"][..., 0],
        A=step["A"],
        B=step["B"][..., 0],
        C=step["C"][..., 0],
        D=step["D"],
        z=step["z"][..., 0],
        dt_bias=step["delta_bias"],
        dt_softplus=True,
    )
    errors["decode step fp32"] = rel_err(
        sk.selective_state_update(state.clone(), **arguments),
        sk.selective_state_update_ref(state.clone(), **arguments),
    )
    low = dtype_for(device)  # the interpreter computes bf16 dots wrongly: fp32 on the CPU
    for head_dim, dtype in ((64, low), (128, torch.float32), (256, low)):
        q = torch.randn(2, 4, length, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(2, 2, length + 100, head_dim, device=device, dtype=dtype) for _ in range(2))
        with torch.no_grad():
            name = "fp32" if dtype == torch.float32 else "bf16"
            errors[f"window attention {name} head_dim {head_dim}"] = rel_err(
                sk.windowed_attention(q, k, v, 256), sk.windowed_attention_ref(q, k, v, 256)
            )
    for name, error in errors.items():
        ctx.add(check=name, rel_error=error, tolerance=CHECK_TOLERANCE["bf16" if "bf16" in name else "fp32"])
    check_errors(errors, lambda name: CHECK_TOLERANCE["bf16" if "bf16" in name else "fp32"])


def mamba_ssm_extension(ctx):
    """mamba-ssm's compiled extension, or None; what happened is kept in the case's entry."""
    try:
        extension, build_s, version = mamba_ssm_cuda.load()
    except mamba_ssm_cuda.Unavailable as error:
        ctx.entry["mamba_ssm"] = {"unavailable": str(error)}
        return None
    ctx.entry["mamba_ssm"] = {"version": version, "load_s": build_s}
    return extension


def scans(extension) -> dict:
    """name -> scan function of the benchmark's inputs (without initial state or packed documents)."""
    scans = {"samba_kernels": lambda **t: sk.selective_scan_fn(**t, delta_softplus=True)}
    if extension is not None:
        scans["mamba-ssm"] = lambda **t: mamba_ssm_cuda.selective_scan(extension, **t, delta_softplus=True)
    return scans


@case("scan-accuracy", "the scan's outputs and gradients, samba_kernels and mamba-ssm, against the PyTorch reference")
def scan_accuracy(ctx):
    batch, dim, length = SMOKE_ACCURACY_SHAPE if ctx.smoke else ACCURACY_SHAPE
    implementations = scans(mamba_ssm_extension(ctx))
    errors, tolerances = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        inputs = scan_inputs(batch, dim, length, ctx.device, dtype, requires_grad=True, seed=5)
        dy = torch.randn(batch, dim, length, device=ctx.device, dtype=dtype)
        reference_inputs = {name: tensor.detach().float().requires_grad_() for name, tensor in inputs.items()}
        y_ref = sk.selective_scan_ref(**reference_inputs, delta_softplus=True)
        expected = dict(
            out=y_ref,
            **dict(
                zip(
                    (f"d{name}" for name in inputs),
                    torch.autograd.grad(y_ref, list(reference_inputs.values()), dy.float()),
                )
            ),
        )
        outputs = {}
        for name, scan in implementations.items():
            y = scan(**inputs)
            outputs[name] = dict(
                out=y, **dict(zip((f"d{name}" for name in inputs), torch.autograd.grad(y, list(inputs.values()), dy)))
            )
            for tensor, value in outputs[name].items():
                key = f"{name} {str(dtype)[6:]} {tensor}"
                errors[key], tolerances[key] = rel_err(value, expected[tensor]), TOLERANCE[name][dtype]
                ctx.add(
                    implementation=name,
                    dtype=str(dtype)[6:],
                    tensor=tensor,
                    rel_error_vs_reference=errors[key],
                    tolerance=tolerances[key],
                    batch=batch,
                    dim=dim,
                    length=length,
                )
        if len(outputs) == 2:
            for tensor in outputs["samba_kernels"]:
                ctx.add(
                    implementation="samba_kernels vs mamba-ssm",
                    dtype=str(dtype)[6:],
                    tensor=tensor,
                    rel_error=rel_err(outputs["samba_kernels"][tensor], outputs["mamba-ssm"][tensor]),
                )
    check_errors(errors, tolerances.get)


def scan_floor_ms(
    batch: int, dim: int, length: int, element: int, ceilings: dict, backward: bool
) -> tuple[float, str]:
    """The scan's floor and what sets it. Forward: read u, delta, z, B, C and write out once, one exp per
    (channel, state, step). Forward+backward adds a read of u, delta, z, dout, B, C and a write of du, ddelta, dz,
    dB, dC, and counts the exps twice."""
    activation, bc = batch * dim * length * element, 2 * batch * D_STATE * length * element
    nbytes = (11 * activation + 3 * bc) if backward else (4 * activation + bc)
    exps = batch * dim * length * D_STATE * (2 if backward else 1)
    bytes_ms, exp_ms = nbytes / ceilings["copy_bytes_per_s"] * 1e3, exps / ceilings["exp2_per_s"] * 1e3
    return (exp_ms, "exp") if exp_ms >= bytes_ms else (bytes_ms, "bytes")


@case("scan", "the selective scan's grid, forward and forward+backward: samba_kernels beside mamba-ssm, and the floor")
def scan_grid(ctx):
    implementations = scans(mamba_ssm_extension(ctx))
    element = torch.tensor([], dtype=dtype_for(ctx.device)).element_size()
    for batch, dim, length in SMOKE_SCAN_GRID if ctx.smoke else SCAN_GRID:
        refusal = ctx.budget.refuses(SHAPE_S) or ctx.memory_refusal(14 * batch * dim * length * element)
        if refusal:
            ctx.skip(refusal, batch=batch, dim=dim, length=length)
            continue
        free_memory()
        time_scans(ctx, implementations, batch, dim, length)


def time_scans(ctx, implementations: dict, batch: int, dim: int, length: int) -> None:
    """One shape of the grid: a row per op with each implementation's times and the floor."""
    dtype = dtype_for(ctx.device)
    inputs = scan_inputs(batch, dim, length, ctx.device, dtype, requires_grad=True)
    detached = {name: tensor.detach() for name, tensor in inputs.items()}
    dy = torch.randn(batch, dim, length, device=ctx.device, dtype=dtype)
    for op in ("fwd", "fwd+bwd"):
        floor_ms, floor_kind = scan_floor_ms(batch, dim, length, dy.element_size(), ctx.ceilings(), op == "fwd+bwd")
        row = dict(op=op, batch=batch, dim=dim, length=length, floor_ms=floor_ms, floor_kind=floor_kind)
        for name, scan in implementations.items():
            if op == "fwd":
                timing = kernel_ms(lambda: scan(**detached), ctx.device)
            else:
                timing = kernel_ms(lambda: torch.autograd.grad(scan(**inputs), list(inputs.values()), dy), ctx.device)
            row[f"{name}_ms"], row[f"{name}_first_ms"] = timing["ms"], timing["first_call_ms"]
            free_memory()
        row["samba_kernels_x_floor"] = row["samba_kernels_ms"] / floor_ms
        if "mamba-ssm_ms" in row:
            row["mamba_ssm_over_ours"] = row["mamba-ssm_ms"] / row["samba_kernels_ms"]
        ctx.add(**row)


def timed_against_reference(ctx, op: str, model: str, shape: tuple, nbytes: int, fn, reference, scale: float) -> None:
    """A row of `op`: its time, its bytes floor, and the reference's time times `scale` (its length's ratio)."""
    timing = kernel_ms(fn, ctx.device)
    reference_ms = kernel_ms(reference, ctx.device)["ms"] * scale
    floor_ms = nbytes / ctx.ceilings()["copy_bytes_per_s"] * 1e3
    ctx.add(
        op=op,
        model=model,
        batch=shape[0],
        dim=shape[1],
        length=shape[2],
        ms=timing["ms"],
        first_ms=timing["first_call_ms"],
        floor_ms=floor_ms,
        x_floor=timing["ms"] / floor_ms,
        reference_ms=reference_ms,
        x_faster_than_reference=reference_ms / timing["ms"],
    )


@case("conv", "the causal conv1d, forward and forward+backward, against its floor and the PyTorch reference")
def conv(ctx):
    dtype = dtype_for(ctx.device)
    element = torch.tensor([], dtype=dtype).element_size()
    for model, shape in ({"tiny": (2, 8, 32)} if ctx.smoke else CONV_SHAPES).items():
        batch, dim, length = shape
        reference_length = min(length, REF_LEN)
        inputs = conv_inputs(batch, dim, length, ctx.device, dtype, requires_grad=True)
        short = conv_inputs(batch, dim, reference_length, ctx.device, dtype, requires_grad=True)
        dy, dy_short = torch.randn_like(inputs["x"]), torch.randn_like(short["x"])
        activation = batch * dim * length * element

        def forward(fn, tensors):
            return lambda: fn(**{name: t.detach() for name, t in tensors.items()}, activation="silu")

        def forward_backward(fn, tensors, grad):
            return lambda: torch.autograd.grad(fn(**tensors, activation="silu"), list(tensors.values()), grad)

        scale = length / reference_length
        # forward: read x, write out; fwd+bwd: and read x, dout, write dx (weights are negligible)
        timed_against_reference(
            ctx,
            "fwd",
            model,
            shape,
            2 * activation,
            forward(sk.causal_conv1d_fn, inputs),
            forward(sk.causal_conv1d_ref, short),
            scale,
        )
        timed_against_reference(
            ctx,
            "fwd+bwd",
            model,
            shape,
            5 * activation,
            forward_backward(sk.causal_conv1d_fn, inputs, dy),
            forward_backward(sk.causal_conv1d_ref, short, dy_short),
            scale,
        )


# (rows, width): a prefill chunk of samba-421m's residual stream and MLP, and a batch-16 decode step's.
NORM_SWIGLU_ROWS = {"prefill chunk": 8192, "decode, batch 16": 16}


@case(
    "norm-swiglu",
    "RMSNorm (float32 residual in, bf16 out), SwiGLU's silu(gate) * up and the float32 residual add: samba_kernels "
    "against the model's formulas; the chunked prefill's window join (cache_samba.joined) against torch.cat; the "
    "Mamba input's transposed copy (samba_kernels' contiguous) against torch's copy",
)
@torch.no_grad()
def norm_swiglu(ctx):
    config = models.config("samba", ctx.smoke)
    dtype, hidden, inner = dtype_for(ctx.device), config.hidden_size, config.intermediate_size
    for label, rows in NORM_SWIGLU_ROWS.items():
        rows = min(rows, 64) if ctx.smoke else rows
        residual = torch.randn(rows, hidden, device=ctx.device)
        weight = torch.randn(hidden, device=ctx.device, dtype=dtype)
        gate, up = (torch.randn(rows, inner, device=ctx.device, dtype=dtype) for _ in range(2))
        update = torch.randn(rows, hidden, device=ctx.device, dtype=dtype)
        element = weight.element_size()
        timed_against_reference(
            ctx,
            f"residual_add, {label}",
            "samba",
            (1, hidden, rows),
            rows * hidden * (4 + element + 4),  # read float32 and the update, write float32
            lambda: sk.residual_add(residual, update),
            lambda: sk.residual_add_ref(residual, update),
            1.0,
        )
        timed_against_reference(
            ctx,
            f"rms_norm, {label}",
            "samba",
            (1, hidden, rows),
            rows * hidden * (4 + element),  # read float32, write the layers' dtype
            lambda: sk.rms_norm(residual, weight, 1e-5),
            lambda: sk.rms_norm_ref(residual, weight, 1e-5, dtype),
            1.0,
        )
        timed_against_reference(
            ctx,
            f"swiglu, {label}",
            "samba",
            (1, inner, rows),
            3 * rows * inner * element,
            lambda: sk.swiglu(gate, up),
            lambda: sk.swiglu_ref(gate, up),
            1.0,
        )
    window_join(ctx, config, dtype)
    transposed_copy(ctx, config, dtype)


def window_join(ctx, config, dtype) -> None:
    """A prefill chunk's values joined to the kept ones, as the sliding-window cache does at every attention layer
    and chunk: the kept values a slice of the last join, the chunk's a transposed view of their projection (both
    (batch, tokens, heads, head_dim) memory)."""
    chunk = 64 if ctx.smoke else config.prefill_chunk_size
    kept, heads, head_dim = config.sliding_window - 1, config.num_key_value_heads, config.head_dim
    last_join = torch.randn(1, kept + chunk, heads, head_dim, device=ctx.device, dtype=dtype).transpose(1, 2)
    kept_values = last_join[:, :, -kept:]
    projection = torch.randn(1, chunk, heads * head_dim, device=ctx.device, dtype=dtype)
    values = projection.view(1, chunk, heads, head_dim).transpose(1, 2)
    timed_against_reference(
        ctx,
        "window join, prefill chunk",
        "samba",
        (1, heads * head_dim, kept + chunk),
        2 * (kept + chunk) * heads * head_dim * last_join.element_size(),  # read both, write the join
        lambda: joined(kept_values, values),
        lambda: torch.cat([kept_values, values], dim=2),
        1.0,
    )


def transposed_copy(ctx, config, dtype) -> None:
    """The Mamba mixer's input as the scan reads it: a prefill chunk's in_proj output, (batch, length, 2 x inner)
    memory, seen as (batch, inner, length) and copied contiguous, against torch's copy."""
    chunk, inner = (64 if ctx.smoke else config.prefill_chunk_size), config.mamba_intermediate_size
    projection = torch.randn(1, chunk, 2 * inner, device=ctx.device, dtype=dtype)
    x = projection.transpose(1, 2)[:, :inner]
    timed_against_reference(
        ctx,
        "transposed copy, prefill chunk",
        "samba",
        (1, inner, chunk),
        2 * x.numel() * x.element_size(),  # read and write
        lambda: contiguous(x),
        x.contiguous,
        1.0,
    )


def window_block_mask(length: int, window: int, device) -> object:
    """FlexAttention's block mask of causal attention to the `window` latest keys (the query's own included)."""

    def in_window(batch, head, query, key):
        return (key <= query) & (query - key < window)

    return create_block_mask(in_window, None, None, length, length, device=str(device))


def keys_seen(length: int, window: int) -> float:
    position = torch.arange(length, dtype=torch.float64)
    return torch.minimum(position + 1, torch.full_like(position, window)).sum().item()


@case("attention", "causal sliding-window attention: windowed_attention against compiled FlexAttention and SDPA")
def attention(ctx):
    dtype = dtype_for(ctx.device)
    for batch, heads, length, head_dim, window in SMOKE_ATTENTION_SHAPES if ctx.smoke else ATTENTION_SHAPES:
        shape = dict(batch=batch, heads=heads, length=length, head_dim=head_dim, window=window)
        generator = torch.Generator(device=ctx.device).manual_seed(5)
        q, k, v = (
            torch.randn(
                batch, heads, length, head_dim, generator=generator, device=ctx.device, dtype=dtype
            ).requires_grad_()
            for _ in range(3)
        )
        dy = torch.randn_like(q)
        mask = sk.window_mask(length, length, window, ctx.device)
        in_window_flops = 4 * batch * heads * head_dim * keys_seen(length, window)
        causal_flops = 4 * batch * heads * head_dim * keys_seen(length, length)

        def sdpa_with(backend):
            def attend(q, k, v):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            return attend

        methods = {
            "sdpa window bool mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "windowed_attention": lambda q, k, v: sk.windowed_attention(q, k, v, window),
        }
        if ctx.device.type == "cuda":
            compiled_flex, block_mask = (
                torch.compile(flex_attention, dynamic=False),
                window_block_mask(length, window, ctx.device),
            )
            methods.update(
                {
                    "sdpa causal (default)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    "sdpa causal cuDNN": sdpa_with(SDPBackend.CUDNN_ATTENTION),
                    "sdpa causal flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
                    "flex_attention (compiled)": lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask),
                }
            )
        detached = [t.detach() for t in (q, k, v)]
        with torch.no_grad():
            ours, reference = methods["windowed_attention"](*detached), methods["sdpa window bool mask"](*detached)
        for name, attend in methods.items():
            forward = kernel_ms(lambda: attend(*detached), ctx.device)
            backward = kernel_ms(lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), dy), ctx.device)
            # The backward counted as 2.5 forwards (five matmuls with the recomputed scores), as FlashAttention does.
            ctx.add(
                method=name,
                **shape,
                fwd_ms=forward["ms"],
                fwd_first_ms=forward["first_call_ms"],
                fwd_bwd_ms=backward["ms"],
                fwd_tflops_in_window=in_window_flops / forward["ms"] * 1e-9,
                fwd_bwd_tflops_in_window=3.5 * in_window_flops / backward["ms"] * 1e-9,
                fwd_tflops_causal_work=causal_flops / forward["ms"] * 1e-9 if "causal" in name else None,
            )
            free_memory()
        ctx.add(
            method="check: windowed_attention vs sdpa window bool mask", **shape, rel_error=rel_err(ours, reference)
        )


def graph_ms(calls: list, device: torch.device) -> float:
    """ms of `calls` made in order: one CUDA graph's replay on the GPU (no launch costs), else one pass."""
    if device.type != "cuda":
        return kernel_ms(lambda: [call() for call in calls], device)["ms"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: compilation, allocator
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return kernel_ms(graph.replay, device)["ms"]


# Projections that share their input, the one-launch kernel a compiled batch-1 step runs them with, and the same
# products one at a time (gate/up with SiLU's product as its own kernel).
GROUPS = [
    (
        ("q_proj", "k_proj", "v_proj"),
        lambda x, ws: sk.stacked_matvec(x, ws),
        lambda x, ws: [sk.matvec(x, w) for w in ws],
    ),
    (
        ("gate_proj", "up_proj"),
        lambda x, ws: sk.gated_matvec(x, *ws),
        lambda x, ws: F.silu(sk.matvec(x, ws[0])) * sk.matvec(x, ws[1]),
    ),
]


def projections(model) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name, weight, bias) of every nn.Linear of the model, in the order a forward runs them."""
    return [
        (name.split(".")[-1], module.weight.detach(), None if module.bias is None else module.bias.detach())
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]


def token_calls(linears: list, grouped: bool, device: torch.device) -> list:
    """One token's products as calls, with q/k/v and gate/up each in one launch where `grouped`."""
    calls, i = [], 0
    while i < len(linears):
        group = next((g for g in GROUPS if grouped and g[0][0] == linears[i][0]), None)
        width = linears[i][1].shape[1]
        x = torch.randn(1, 1, width, device=device, dtype=linears[i][1].dtype)
        if group is None:
            calls.append(lambda x=x, weight=linears[i][1], bias=linears[i][2]: sk.matvec(x, weight, bias))
            i += 1
        else:
            weights = [weight for _, weight, _ in linears[i : i + len(group[0])]]
            calls.append(lambda x=x, weights=weights, kernel=group[1]: kernel(x, weights))
            i += len(group[0])
    return calls


@case("matvec", "batch-1 decoding's products with a cold L2: samba_kernels.matvec against cuBLAS (F.linear)")
@torch.no_grad()
def matvec(ctx):
    copy = ctx.ceilings()["copy_bytes_per_s"]
    model = models.build("samba", ctx.device, dtype_for(ctx.device), ctx.smoke)
    linears = projections(model)
    for shape in sorted({tuple(weight.shape) for _, weight, _ in linears}, key=lambda s: -s[0] * s[1]):
        names = sorted({name for name, weight, _ in linears if tuple(weight.shape) == shape})
        nbytes = shape[0] * shape[1] * linears[0][1].element_size()
        copies = 2 if ctx.smoke else max(1, math.ceil(COLD_L2_BYTES / nbytes))
        weights = [torch.randn(shape, device=ctx.device, dtype=linears[0][1].dtype) * 0.02 for _ in range(copies)]
        x = torch.randn(1, 1, shape[1], device=ctx.device, dtype=weights[0].dtype)
        expected = F.linear(x.double(), weights[0].double())
        cublas_us = graph_ms([lambda w=w: F.linear(x, w) for w in weights], ctx.device) * 1e3 / copies
        ours_us = graph_ms([lambda w=w: sk.matvec(x, w) for w in weights], ctx.device) * 1e3 / copies
        ctx.add(
            what="one product",
            weight=f"{shape[0]}x{shape[1]}",
            modules=names,
            per_token=sum(1 for _, weight, _ in linears if tuple(weight.shape) == shape),
            MB=nbytes / 1e6,
            cublas_us=cublas_us,
            matvec_us=ours_us,
            speedup=cublas_us / ours_us,
            rel_error_vs_float64=rel_err(sk.matvec(x, weights[0]), expected),
        )
        del weights
        free_memory()
    token_bytes = sum(weight.numel() * weight.element_size() for _, weight, _ in linears)
    rows = [
        (torch.randn(1, 1, weight.shape[1], device=ctx.device, dtype=weight.dtype), weight, bias)
        for _, weight, bias in linears
    ]
    grouped = token_calls(linears, grouped=True, device=ctx.device)
    ctx.add(
        what="one token's products",
        products=len(linears),
        launches_grouped=len(grouped),
        MB=token_bytes / 1e6,
        floor_us=token_bytes / copy * 1e6,
        cublas_us=graph_ms([lambda r=r: F.linear(*r) for r in rows], ctx.device) * 1e3,
        matvec_us=graph_ms([lambda r=r: sk.matvec(*r) for r in rows], ctx.device) * 1e3,
        grouped_us=graph_ms(grouped, ctx.device) * 1e3,
    )


def mixer_step_inputs(config, device: torch.device, dtype: torch.dtype) -> tuple:
    """mamba_decode_step's arguments for one mixer of `config` (random weights and states, one row)."""
    dim, d_state, rank = config.mamba_intermediate_size, config.state_size, config.time_step_rank
    draw = drawer(device, dtype, seed=7)
    xz = draw(1, 2 * dim)  # in_proj's output: x and z as views
    return (
        xz[:, :dim],
        xz[:, dim:],
        draw(1, dim, config.conv_kernel - 1),
        draw(1, dim, d_state, dtype=torch.float32),
        draw(dim, config.conv_kernel, scale=0.5),
        draw(dim),
        draw(rank + 2 * d_state, dim, scale=dim**-0.5),
        draw(dim, rank, scale=rank**-0.5),
        draw(dim, scale=0.5),
        draw(dim, d_state, dtype=torch.float32),
        draw(dim, dtype=torch.float32),
    )


@case("mamba-decode", "a Mamba mixer's decode step: mamba_decode_step against the same PyTorch ops compiled")
@torch.no_grad()
def mamba_decode(ctx):
    config = models.config("samba", ctx.smoke)
    inputs = mixer_step_inputs(config, ctx.device, dtype_for(ctx.device))
    compiled = torch.compile(
        sk.mamba_decode_step_ref, fullgraph=True, dynamic=False, **({"backend": "eager"} if ctx.smoke else {})
    )
    calls = 3 if ctx.smoke else GRAPH_CALLS
    reference_us = graph_ms([lambda: compiled(*inputs)] * calls, ctx.device) * 1e3 / calls
    ours_us = graph_ms([lambda: sk.mamba_decode_step(*inputs)] * calls, ctx.device) * 1e3 / calls
    ctx.add(
        dim=config.mamba_intermediate_size,
        calls_per_graph=calls,
        compiled_ops_us=reference_us,
        mamba_decode_step_us=ours_us,
        speedup=reference_us / ours_us,
    )


def ring_attention_inputs(config, device: torch.device, dtype: torch.dtype) -> tuple:
    """ring_decode_attention's arguments for one attention layer of `config` after 3 windows and a few tokens: a
    full ring, every slot readable (random projections and rings, one row)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    slots = config.sliding_window
    draw = drawer(device, dtype, seed=8)
    tokens_seen = 3 * slots + 5
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    return (
        draw(1, heads * head_dim),
        draw(1, kv_heads * head_dim),
        draw(1, kv_heads * head_dim),
        draw(1, kv_heads, slots, head_dim),
        draw(1, kv_heads, slots, head_dim),
        torch.ones(1, slots, dtype=torch.bool, device=device),
        torch.tensor(tokens_seen, device=device),
        torch.tensor([[tokens_seen]], device=device),
        inv_freq,
        1.0,
        head_dim**-0.5,
    )


# The kernel's tilings the decode-attention case times beside the default: slots per program x warps.
DECODE_ATTENTION_TILINGS = [(32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)]


@case(
    "decode-attention",
    "one token's attention over a ring buffer: ring_decode_attention (each tiling of its kernel) against the "
    "same PyTorch ops compiled",
)
@torch.no_grad()
def decode_attention(ctx):
    from samba_kernels.decode_attention import kernel as ring_kernel

    config = models.config("samba", ctx.smoke)
    inputs = ring_attention_inputs(config, ctx.device, dtype_for(ctx.device))
    compiled = torch.compile(
        sk.ring_decode_attention_ref, fullgraph=True, dynamic=False, **({"backend": "eager"} if ctx.smoke else {})
    )
    calls = 3 if ctx.smoke else GRAPH_CALLS
    reference_us = graph_ms([lambda: compiled(*inputs)] * calls, ctx.device) * 1e3 / calls
    ring_bytes = 2 * inputs[3].numel() * inputs[3].element_size()
    finished = torch.zeros(config.num_key_value_heads, dtype=torch.int32, device=ctx.device)  # the calls share it
    default = (ring_kernel.SPLIT_SLOTS, ring_kernel.WARPS)
    for split_slots, warps in [default] + [
        t for t in DECODE_ATTENTION_TILINGS[: 1 if ctx.smoke else None] if t != default
    ]:

        def call(split_slots=split_slots, warps=warps):
            return ring_kernel._launch(*inputs, finished, split_slots=split_slots, num_warps=warps)

        ours_us = graph_ms([call] * calls, ctx.device) * 1e3 / calls
        ctx.add(
            heads=config.num_attention_heads,
            slots=config.sliding_window,
            tiling=f"{split_slots} slots x {warps} warps" + (" (default)" if (split_slots, warps) == default else ""),
            calls_per_graph=calls,
            floor_us=ring_bytes / ctx.ceilings()["copy_bytes_per_s"] * 1e6,
            compiled_ops_us=reference_us,
            ring_decode_attention_us=ours_us,
            speedup=reference_us / ours_us,
        )


@case("decode-steps", "the one-token scan and conv updates at batch 8 (bound by launches: read as host overhead)")
@torch.no_grad()
def decode_steps(ctx):
    dtype = dtype_for(ctx.device)
    for model, (batch, dim, _) in ({"tiny": (2, 8, 1)} if ctx.smoke else CONV_SHAPES).items():
        step = {
            name: tensor[..., 0].contiguous() if tensor.dim() == 3 else tensor
            for name, tensor in scan_inputs(batch, dim, 1, ctx.device, dtype).items()
        }
        arguments = dict(
            x=step["u"],
            dt=step["delta"],
            A=step["A"],
            B=step["B"],
            C=step["C"],
            D=step["D"],
            z=step["z"],
            dt_bias=step["delta_bias"],
            dt_softplus=True,
        )
        state = torch.zeros(batch, dim, D_STATE, device=ctx.device)
        conv_state = torch.zeros(batch, dim, WIDTH - 1, device=ctx.device, dtype=dtype)
        weights = conv_inputs(batch, dim, 1, ctx.device, dtype)
        shape = (batch, dim, 1)
        timed_against_reference(
            ctx,
            "ssm step",
            model,
            shape,
            2 * state.numel() * 4,
            lambda: sk.selective_state_update(state, **arguments),
            lambda: sk.selective_state_update_ref(state.clone(), **arguments),
            1.0,
        )
        timed_against_reference(
            ctx,
            "conv step",
            model,
            shape,
            2 * conv_state.numel() * conv_state.element_size(),
            lambda: sk.causal_conv1d_update(step["u"], conv_state, weights["weight"], weights["bias"], "silu"),
            lambda: sk.causal_conv1d_update_ref(
                step["u"], conv_state.clone(), weights["weight"], weights["bias"], "silu"
            ),
            1.0,
        )


def mamba_note(entry: dict) -> list[str]:
    info = entry.get("mamba_ssm")
    if not info:
        return []
    if "unavailable" in info:
        return [f"mamba-ssm not measured: {info['unavailable']}.", ""]
    return [f"mamba-ssm {info.get('version') or '(version unknown)'}, built or loaded in {info['load_s']:.0f} s.", ""]


def first_calls(row: dict) -> str | None:
    """The first calls' ms of both scans (compilation included), where measured."""
    if "samba_kernels_ms" not in row:
        return None
    return ", ".join(fmt(row.get(key), ".0f") or "-" for key in ("samba_kernels_first_ms", "mamba-ssm_first_ms"))


def floor(row: dict) -> str | None:
    return f"{row['floor_ms']:.3f} ({row['floor_kind']})" if "floor_ms" in row else None


# (header, row key[, format]) of each case's table
COLUMNS = {
    "checks": [("check", "check"), ("relative error", "rel_error", ".1e"), ("tolerance", "tolerance", ".0e")],
    "scan-accuracy": [
        ("implementation", "implementation"),
        ("dtype", "dtype"),
        ("tensor", "tensor"),
        ("relative error", lambda row: row.get("rel_error_vs_reference", row.get("rel_error")), ".1e"),
        ("tolerance", "tolerance", ".0e"),
    ],
    "scan": [
        ("op", "op"),
        ("batch", "batch"),
        ("dim", "dim"),
        ("length", "length"),
        ("samba_kernels ms", "samba_kernels_ms", ".3f"),
        ("mamba-ssm ms", "mamba-ssm_ms", ".3f"),
        ("mamba-ssm / ours", "mamba_ssm_over_ours", ".2f"),
        ("floor ms", floor),
        ("ours / floor", "samba_kernels_x_floor", ".2f"),
        ("first ms (ours, mamba-ssm)", first_calls),
        ("note", "skipped"),
    ],
    "conv": [
        ("op", "op"),
        ("model", "model"),
        ("batch", "batch"),
        ("dim", "dim"),
        ("length", "length"),
        ("ms", "ms", ".3f"),
        ("floor ms", "floor_ms", ".3f"),
        ("x floor", "x_floor", ".1f"),
        ("reference ms", "reference_ms", ".2f"),
        ("x faster than reference", "x_faster_than_reference", ".1f"),
        ("first ms", "first_ms", ".0f"),
    ],
    "attention": [
        ("method", "method"),
        ("batch", "batch"),
        ("heads", "heads"),
        ("length", "length"),
        ("head_dim", "head_dim"),
        ("window", "window"),
        ("fwd ms", "fwd_ms", ".3f"),
        ("fwd TFLOP/s", "fwd_tflops_in_window", ".0f"),
        ("fwd+bwd ms", "fwd_bwd_ms", ".3f"),
        ("fwd+bwd TFLOP/s", "fwd_bwd_tflops_in_window", ".0f"),
        ("fwd first ms", "fwd_first_ms", ".0f"),
    ],
    "matvec": [
        ("weight (N x K)", "weight"),
        ("modules", lambda row: ", ".join(row["modules"])),
        ("per token", "per_token"),
        ("MB", "MB", ".1f"),
        ("cuBLAS µs", "cublas_us", ".2f"),
        ("matvec µs", "matvec_us", ".2f"),
        ("speed-up", "speedup", ".2f"),
        ("error vs float64", "rel_error_vs_float64", ".1e"),
    ],
    "decode-attention": [
        ("heads", "heads"),
        ("slots", "slots"),
        ("first kernel's tiling", "tiling"),
        ("calls per graph", "calls_per_graph"),
        ("rings' read floor µs", "floor_us", ".2f"),
        ("compiled PyTorch ops µs", "compiled_ops_us", ".2f"),
        ("ring_decode_attention µs", "ring_decode_attention_us", ".2f"),
        ("speed-up", "speedup", ".2f"),
    ],
    "mamba-decode": [
        ("channels", "dim"),
        ("calls per graph", "calls_per_graph"),
        ("compiled PyTorch ops µs", "compiled_ops_us", ".2f"),
        ("mamba_decode_step µs", "mamba_decode_step_us", ".2f"),
        ("speed-up", "speedup", ".2f"),
    ],
}
COLUMNS["decode-steps"] = COLUMNS["conv"]
COLUMNS["norm-swiglu"] = [
    ("op", "op"),
    ("rows", "length"),
    ("width", "dim"),
    *[column for column in COLUMNS["conv"] if column[0] in ("ms", "floor ms", "x floor", "first ms")],
    ("the formula ms", "reference_ms", ".3f"),
    ("x faster than the formula", "x_faster_than_reference", ".2f"),
]


def render_case(name: str, entry: dict) -> list[str]:
    rows = entry["rows"]
    if name == "attention":
        checks = [row for row in rows if "rel_error" in row]
        return (
            columns([row for row in rows if "fwd_ms" in row], COLUMNS[name])
            + [""]
            + [
                f"windowed_attention against SDPA with the window's boolean mask (b{row['batch']} L{row['length']}): "
                f"relative error {row['rel_error']:.1e}."
                for row in checks
            ]
        )
    if name == "matvec":
        lines = columns([row for row in rows if row["what"] == "one product"], COLUMNS[name])
        for row in rows:
            if row["what"] == "one token's products":
                lines += [
                    "",
                    f"One token's {row['products']} products ({row['MB']:.0f} MB, one CUDA graph): cuBLAS "
                    f"{row['cublas_us']:.0f} µs, matvec {row['matvec_us']:.0f} µs one product per launch, "
                    f"{row['grouped_us']:.0f} µs with q/k/v and gate/up each in one launch "
                    f"({row['launches_grouped']} launches); reading the weights at the copy bandwidth: "
                    f"{row['floor_us']:.0f} µs.",
                ]
        return lines
    return (mamba_note(entry) if name in ("scan", "scan-accuracy") else []) + columns(rows, COLUMNS[name])


def summary(result: dict) -> list[str]:
    lines = []
    for row in rows_of(result, "scan"):
        if "samba_kernels_ms" in row:
            mamba = (
                f", mamba-ssm {row['mamba-ssm_ms']:.3f} ms ({row['mamba_ssm_over_ours']:.2f}x)"
                if "mamba-ssm_ms" in row
                else ""
            )
            lines.append(
                f"scan {row['op']} {row['batch']}x{row['dim']}x{row['length']}: ours "
                f"{row['samba_kernels_ms']:.3f} ms ({row['samba_kernels_x_floor']:.2f}x floor){mamba}"
            )
    worst = {}
    for row in rows_of(result, "scan-accuracy"):
        if "rel_error_vs_reference" in row:
            key = (row["implementation"], row["dtype"])
            worst[key] = max(worst.get(key, 0.0), row["rel_error_vs_reference"])
    lines += [f"accuracy {name} {dtype}: worst {error:.1e}" for (name, dtype), error in worst.items()]
    return lines


def plot(result: dict, path) -> bool:
    import matplotlib.pyplot as plt

    rows = [row for row in rows_of(result, "scan") if "samba_kernels_ms" in row]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, op in zip(axes, ("fwd", "fwd+bwd")):
        chosen = [row for row in rows if row["op"] == op]
        labels = [f"{row['batch']}x{row['dim']}x{row['length'] // 1024}K" for row in chosen]
        x = range(len(chosen))
        ax.bar(
            [i - 0.2 for i in x],
            [row["samba_kernels_ms"] / row["floor_ms"] for row in chosen],
            0.4,
            label="samba_kernels",
        )
        ax.bar(
            [i + 0.2 for i in x],
            [row.get("mamba-ssm_ms", float("nan")) / row["floor_ms"] for row in chosen],
            0.4,
            label="mamba-ssm",
        )
        ax.set_xticks(list(x), labels, rotation=45, fontsize=7)
        ax.set(ylabel="time / floor", title=f"selective scan {op} (lower is better)")
        ax.axhline(1, color="k", lw=0.8)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return True
