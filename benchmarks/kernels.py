"""Benchmark of the samba_kernels Triton ops on a GPU (or a tiny CPU smoke run under TRITON_INTERPRET=1).

    python benchmarks/kernels.py [--out benchmarks/kernels.md] [--smoke]

Checks the ops against the PyTorch references on small random inputs first, then times (median
of triton.testing.do_bench) the scan forward and forward+backward, the conv forward and
forward+backward and the decode steps at the shapes of samba-421m and samba-1.3b. Each time is
set against the floor (bytes moved / measured copy bandwidth), the PyTorch reference (timed at a
short length and extrapolated linearly in length) and, where importable, mamba-ssm and
causal-conv1d. Writes a markdown table to --out and the raw numbers next to it as JSON.
"""

import argparse
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "kernels"))
import samba_kernels as sk  # noqa: E402
import triton  # noqa: E402

D_STATE, WIDTH, REF_LEN = 16, 4, 256


def timer(device):
    if device == "cuda":
        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def once(fn):  # the interpreter: one warm call is all a smoke run affords
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def upstream():
    found = {}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        found["scan"] = selective_scan_fn
    except ImportError as e:
        print(f"mamba_ssm not importable, skipped: {e}")
    try:
        from causal_conv1d import causal_conv1d_fn

        found["conv"] = causal_conv1d_fn
    except ImportError as e:
        print(f"causal_conv1d not importable, skipped: {e}")
    return found


def scan_inputs(batch, dim, length, device, dtype, requires_grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=device).to(dt)  # noqa: E731
    t = dict(u=r(batch, dim, length), delta=r(batch, dim, length) - 2,
             A=-torch.exp(torch.rand(dim, D_STATE, generator=g, device=device)),
             B=r(batch, D_STATE, length), C=r(batch, D_STATE, length), D=r(dim, dt=torch.float32),
             z=r(batch, dim, length), delta_bias=r(dim, dt=torch.float32) * 0.5)
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def conv_inputs(batch, dim, length, device, dtype, requires_grad=False):
    g = torch.Generator(device=device).manual_seed(1)
    t = dict(x=torch.randn(batch, dim, length, generator=g, device=device).to(dtype),
             weight=torch.randn(dim, WIDTH, generator=g, device=device).to(dtype) * 0.5,
             bias=torch.randn(dim, generator=g, device=device).to(dtype))
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def check(device, dim, length):
    """Relative errors of the Triton ops against the references (fp32, forward and gradients)."""
    errs = {}
    t = scan_inputs(2, dim, length, device, torch.float32, requires_grad=True)
    y, y_ref = sk.selective_scan_fn(**t, delta_softplus=True), sk.selective_scan_ref(**t, delta_softplus=True)
    dy = torch.randn_like(y)
    errs["scan fwd"] = rel_err(y, y_ref)
    grads = zip(torch.autograd.grad(y, list(t.values()), dy), torch.autograd.grad(y_ref, list(t.values()), dy))
    errs["scan bwd (worst input)"] = max(rel_err(a, b) for a, b in grads)
    c = conv_inputs(2, dim, length, device, torch.float32, requires_grad=True)
    o, o_ref = sk.causal_conv1d_fn(**c, activation="silu"), sk.causal_conv1d_ref(**c, activation="silu")
    errs["conv fwd"] = rel_err(o, o_ref)
    grads = zip(torch.autograd.grad(o, list(c.values()), dy), torch.autograd.grad(o_ref, list(c.values()), dy))
    errs["conv bwd (worst input)"] = max(rel_err(a, b) for a, b in grads)
    state = torch.randn(2, dim, D_STATE, device=device)
    state_ref = state.clone()
    s = {k: v.detach()[..., 0] if v.dim() == 3 else v.detach() for k, v in t.items()}
    step = dict(x=s["u"], dt=s["delta"], A=s["A"], B=s["B"], C=s["C"], D=s["D"], z=s["z"], dt_bias=s["delta_bias"],
                dt_softplus=True)
    errs["decode step"] = rel_err(sk.selective_state_update(state, **step), sk.selective_state_update_ref(state_ref, **step))
    return errs


def device_rates(device, measure, smoke):
    n = 1 << (20 if smoke else 28)
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 4 / (measure(lambda: y.copy_(x)) * 1e-3)
    m = 256 if smoke else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    flops = 2 * m**3 / (measure(lambda: a @ a) * 1e-3)
    return copy_bw, flops


def cases(batch, dim, length, device, dtype, up):
    """(name, bytes moved, triton fn, reference fn at REF_LEN, upstream fn or None) per timed op."""
    ref_len = min(length, REF_LEN)
    e = torch.tensor([], dtype=dtype).element_size()
    act = batch * dim * length * e  # one (batch, dim, length) activation
    bc = 2 * batch * D_STATE * length * e
    t, tr = scan_inputs(batch, dim, length, device, dtype, True), scan_inputs(batch, dim, ref_len, device, dtype, True)
    c, cr = conv_inputs(batch, dim, length, device, dtype, True), conv_inputs(batch, dim, ref_len, device, dtype, True)
    dy, dyr = torch.randn_like(t["u"]), torch.randn_like(tr["u"])

    def fwd(fn, inputs, **kw):
        return lambda: fn(**{k: v.detach() for k, v in inputs.items()}, **kw)

    def fwd_bwd(fn, inputs, grad, **kw):
        return lambda: torch.autograd.grad(fn(**inputs, **kw), list(inputs.values()), grad)

    up_scan, up_conv = up.get("scan"), up.get("conv")
    state = torch.zeros(batch, dim, D_STATE, device=device)
    conv_state = torch.zeros(batch, dim, WIDTH - 1, device=device, dtype=dtype)
    s = {k: v.detach()[..., 0].contiguous() if v.dim() == 3 else v.detach() for k, v in t.items()}
    step = dict(x=s["u"], dt=s["delta"], A=s["A"], B=s["B"], C=s["C"], D=s["D"], z=s["z"], dt_bias=s["delta_bias"],
                dt_softplus=True)
    cw = {k: v.detach() for k, v in c.items()}
    return [
        ("scan fwd", 4 * act + bc, fwd(sk.selective_scan_fn, t, delta_softplus=True),
         fwd(sk.selective_scan_ref, tr, delta_softplus=True),
         up_scan and fwd(up_scan, t, delta_softplus=True)),
        ("scan fwd+bwd", 12 * act + 3 * bc, fwd_bwd(sk.selective_scan_fn, t, dy, delta_softplus=True),
         fwd_bwd(sk.selective_scan_ref, tr, dyr, delta_softplus=True),
         up_scan and fwd_bwd(up_scan, t, dy, delta_softplus=True)),
        ("conv fwd", 2 * act, fwd(sk.causal_conv1d_fn, c, activation="silu"),
         fwd(sk.causal_conv1d_ref, cr, activation="silu"), up_conv and fwd(up_conv, c, activation="silu")),
        ("conv fwd+bwd", 5 * act, fwd_bwd(sk.causal_conv1d_fn, c, dy, activation="silu"),
         fwd_bwd(sk.causal_conv1d_ref, cr, dyr, activation="silu"),
         up_conv and fwd_bwd(up_conv, c, dy, activation="silu")),
        ("decode ssm step", 2 * state.numel() * 4, lambda: sk.selective_state_update(state, **step),
         lambda: sk.selective_state_update_ref(state.clone(), **step), None),
        ("decode conv step", 2 * conv_state.numel() * e,
         lambda: sk.causal_conv1d_update(cw["x"][..., 0], conv_state, cw["weight"], cw["bias"], "silu"),
         lambda: sk.causal_conv1d_update_ref(cw["x"][..., 0], conv_state.clone(), cw["weight"], cw["bias"], "silu"),
         None),
    ], length / ref_len


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/kernels.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU run under TRITON_INTERPRET=1)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not sk.use_triton(torch.empty(0, device=device)):
        sys.exit("no GPU and TRITON_INTERPRET is not 1: nothing to benchmark")
    measure = timer(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    models = {"tiny": 8} if args.smoke else {"samba-421m": 3072, "samba-1.3b": 4608}
    shapes = [(1, 16)] if args.smoke else [(8, 4096), (2, 16384), (1, 65536)]
    up = upstream()

    errors = check(device, 8 if args.smoke else 64, 16 if args.smoke else 512)
    for name, err in errors.items():
        print(f"check {name}: relative error {err:.2e}")
    copy_bw, flops = device_rates(device, measure, args.smoke)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, copy {copy_bw / 1e9:.0f} GB/s, "
          f"bf16 matmul {flops / 1e12:.1f} TFLOP/s")

    rows = []
    for model, dim in models.items():
        for batch, length in shapes:
            ops, scale = cases(batch, dim, length, device, dtype, up)
            for name, nbytes, fn, ref, up_fn in ops:
                ms = measure(fn)
                decode = name.startswith("decode")
                ref_ms = measure(ref) * (1 if decode else scale)
                rows.append(dict(op=name, model=model, batch=batch, length=1 if decode else length, ms=ms,
                                 gbps=nbytes / ms / 1e6, floor_ms=nbytes / copy_bw * 1e3, ref_ms=ref_ms,
                                 upstream_ms=up_fn and measure(up_fn)))
                torch.cuda.empty_cache() if device == "cuda" else None
            del ops

    lines = [
        f"Device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter smoke run)'}; "
        f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; bf16 matmul {flops / 1e12:.1f} TFLOP/s; dtype {dtype}; "
        f"d_state {D_STATE}, conv width {WIDTH}.",
        f"Reference times are measured at length {REF_LEN} and extrapolated linearly to the length shown.",
        "", "| op | model | batch | length | ms | GB/s | floor ms | x floor | reference ms | x faster | upstream ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        up_ms = "n/a" if r["upstream_ms"] is None else f"{r['upstream_ms']:.3f}"
        lines.append(f"| {r['op']} | {r['model']} | {r['batch']} | {r['length']} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                     f"{r['floor_ms']:.3f} | {r['ms'] / r['floor_ms']:.1f} | {r['ref_ms']:.2f} | "
                     f"{r['ref_ms'] / r['ms']:.1f} | {up_ms} |")
    lines += ["", "Checks (relative error vs reference, fp32): "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())]
    table = "\n".join(lines)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        dict(device=device, copy_bw=copy_bw, bf16_flops=flops, checks=errors, rows=rows), indent=1))


if __name__ == "__main__":
    main()
