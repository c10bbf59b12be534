"""Benchmark of the samba_kernels ops on a GPU (or a tiny CPU smoke run under TRITON_INTERPRET=1).

    PYTHONPATH=kernels python benchmarks/kernels.py [--out-dir benchmarks] [--smoke]
    PYTHONPATH=kernels python benchmarks/kernels.py --warm {scan,attention}   # compile only (disk caches)

Imports samba_kernels, torch and triton only. In order: relative errors of the ops against the
PyTorch references (the scan at a mid size in bf16 and fp32, with every option; the windowed
attention forward kernel); the device's copy bandwidth, bf16 matmul rate and exp2 rate; a sweep of
the scan's tile shapes at the samba-421m shape (the best becomes the configuration for the rest); the
scan forward and forward+backward, conv forward and forward+backward and decode steps at the
samba-421m and samba-1.3b shapes; causal sliding-window attention (full-causal SDPA, SDPA with a
boolean window mask, flex_attention compiled for the exact shape, and `windowed_attention`, whose
forward kernel is also timed at each of its candidate tiles). Each time is set against its floor (the larger of bytes / copy bandwidth and,
for the scan, exps / exp2 rate), the PyTorch reference (timed at a short length and extrapolated
linearly) and, for the scan at the 421m shape, earlier numbers QUOTED from a previous measurement.
Writes kernels.md, kernels.json and kernels.png to --out-dir (JSON rewritten after every section).
"""

import argparse
import json
import pathlib
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "kernels"))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import samba_kernels as sk  # noqa: E402
from samba_kernels import selective_scan as ss  # noqa: E402

wa = sys.modules["samba_kernels.windowed_attention"]  # the package exports a function of the same name

D_STATE, WIDTH, REF_LEN = 16, 4, 256
# Quoted, not measured by this script: earlier H200 measurements (bf16, batch 8, dim 3072, length 4096,
# d_state 16) of this repo's previous scan kernel (tiles (T, d_state, BLOCK_D), states spread over
# lanes) and of mamba-ssm's CUDA kernel.
QUOTED = {"scan fwd": dict(previous_ms=2.564, mamba_ssm_ms=1.72), "scan fwd+bwd": dict(previous_ms=24.4, mamba_ssm_ms=8.56)}
# Forward: (BLOCK_D, T, NU, warps); training: (T, forward (BLOCK_D, NU, warps), backward (BLOCK_D, NU, warps)).
FWD_SWEEP = [(16, 16, 4, 1), (16, 16, 8, 1), (16, 16, 16, 1), (32, 16, 4, 2), (8, 32, 4, 1), (32, 16, 4, 1)]
TRAIN_SWEEP = [(16, (16, 4, 1), (16, 1, 1)), (16, (16, 4, 1), (16, 2, 1)), (16, (16, 8, 1), (16, 2, 1)),
               (16, (32, 4, 2), (32, 2, 2)), (32, (8, 4, 1), (8, 2, 1))]
ATTN_TILES = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
              (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 8, 4)]  # windowed attention forward: (BLOCK_M, BLOCK_N, warps, stages)
ATTN_SHAPES = [(8, 12, 4096, 128, 2048), (1, 16, 16384, 128, 2048)]  # batch, heads, length, head_dim, window


def timer(device):
    if device == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")

    def once(fn):  # the interpreter: one warm call is all a smoke run affords
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def set_fwd(c):
    """Forward tiles (BLOCK_D, T, NU, warps); other launch options (the register cap) kept."""
    ss.GPU_FWD = dict(ss.GPU_FWD, BLOCK_D=c[0], T=c[1], NU=c[2], num_warps=c[3])


def set_train(c):
    """Training tiles (T, fwd (BLOCK_D, NU, warps), bwd (...)); other launch options (the register cap) kept."""
    tiles = {"fwd": c[1], "bwd": c[2]}
    ss.GPU_TRAIN = dict(T=c[0], **{k: dict(ss.GPU_TRAIN[k], BLOCK_D=bd, NU=nu, num_warps=w) for k, (bd, nu, w) in tiles.items()})


def scan_inputs(batch, dim, length, device, dtype, requires_grad=False, extras=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=device).to(dt)  # noqa: E731
    t = dict(u=r(batch, dim, length), delta=r(batch, dim, length) - 2,
             A=-torch.exp(torch.rand(dim, D_STATE, generator=g, device=device)),
             B=r(batch, D_STATE, length), C=r(batch, D_STATE, length), D=r(dim, dt=torch.float32),
             z=r(batch, dim, length), delta_bias=r(dim, dt=torch.float32) * 0.5)
    if extras:
        t["initial_state"] = r(batch, dim, D_STATE, dt=torch.float32)
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def seq_idx_for(batch, length, device):
    starts = torch.rand(batch, length, device=device) < 8.0 / length
    starts[:, 0] = False
    return torch.cumsum(starts, dim=-1).to(torch.int32)


def conv_inputs(batch, dim, length, device, dtype, requires_grad=False):
    g = torch.Generator(device=device).manual_seed(1)
    t = dict(x=torch.randn(batch, dim, length, generator=g, device=device).to(dtype),
             weight=torch.randn(dim, WIDTH, generator=g, device=device).to(dtype) * 0.5,
             bias=torch.randn(dim, generator=g, device=device).to(dtype))
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def rel_err(a, b):
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(device, dim, length):
    """Relative errors against the references: the scan with every option in fp32 and bf16
    (forward, last state, every gradient), the conv in fp32, the decode step, the windowed attention
    forward kernel."""
    errs = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        t = scan_inputs(2, dim, length, device, dtype, requires_grad=True, extras=True, seed=3)
        kw = dict(delta_softplus=True, return_last_state=True, seq_idx=seq_idx_for(2, length, device))
        (y, last), (y_r, last_r) = sk.selective_scan_fn(**t, **kw), sk.selective_scan_ref(**t, **kw)
        assert torch.isfinite(y.float()).all(), "non-finite scan output"
        errs[f"scan {name} fwd"] = rel_err(y, y_r)
        errs[f"scan {name} last state"] = rel_err(last, last_r)
        dy, dl = torch.randn_like(y), torch.randn_like(last)
        names = list(t)
        grads = torch.autograd.grad((y, last), list(t.values()), (dy, dl))
        grads_r = torch.autograd.grad((y_r, last_r), list(t.values()), (dy, dl))
        per = {n: rel_err(a, b) for n, a, b in zip(names, grads, grads_r)}
        worst = max(per, key=per.get)
        errs[f"scan {name} bwd (worst: d{worst})"] = per[worst]
    c = conv_inputs(2, dim, length, device, torch.float32, requires_grad=True)
    o, o_ref = sk.causal_conv1d_fn(**c, activation="silu"), sk.causal_conv1d_ref(**c, activation="silu")
    errs["conv fp32 fwd"] = rel_err(o, o_ref)
    dy = torch.randn_like(o)
    grads = zip(torch.autograd.grad(o, list(c.values()), dy), torch.autograd.grad(o_ref, list(c.values()), dy))
    errs["conv fp32 bwd (worst input)"] = max(rel_err(a, b) for a, b in grads)
    t = scan_inputs(2, dim, 1, device, torch.float32)
    state = torch.randn(2, dim, D_STATE, device=device)
    state_ref = state.clone()
    step = dict(x=t["u"][..., 0], dt=t["delta"][..., 0], A=t["A"], B=t["B"][..., 0], C=t["C"][..., 0], D=t["D"],
                z=t["z"][..., 0], dt_bias=t["delta_bias"], dt_softplus=True)
    errs["decode step"] = rel_err(sk.selective_state_update(state, **step), sk.selective_state_update_ref(state_ref, **step))
    # windowed attention's own forward (no gradients): grouped heads, a chunk continuing 100 cached keys
    low = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter computes in fp32
    for head_dim, dtype in ((64, low), (128, torch.float32), (256, low)):
        q = torch.randn(2, 4, length, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(2, 2, length + 100, head_dim, device=device, dtype=dtype) for _ in range(2))
        with torch.no_grad():
            out = sk.windowed_attention(q, k, v, 256)
        name = "fp32" if dtype == torch.float32 else "bf16"
        errs[f"window attention fwd {name} head_dim {head_dim}"] = rel_err(out, sk.windowed_attention_ref(q, k, v, 256))
    return errs


@triton.jit
def _exp2_kernel(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc = tl.zeros_like(x)
    for _ in range(ITERS):
        x = tl.exp2(x * -0.999)
        acc += x
    tl.store(out_ptr + offs, acc)


def device_rates(device, measure, smoke):
    n = 1 << (16 if smoke else 28)
    x = torch.randn(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    copy_bw = 2 * x.numel() * 4 / (measure(lambda: y.copy_(x)) * 1e-3)
    m = 256 if smoke else 8192
    a, b = (torch.randn(m, m, device=device, dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * m**3 / (measure(lambda: a @ b) * 1e-3)
    ne, iters = (1 << (10 if smoke else 22)), (4 if smoke else 256)
    xe, oe = torch.rand(ne, device=device), torch.empty(ne, device=device)
    exp_rate = ne * iters / (measure(lambda: _exp2_kernel[(ne // 1024,)](xe, oe, ITERS=iters, BLOCK=1024)) * 1e-3)
    return copy_bw, flops, exp_rate


def scan_fns(t, dy):
    det = {k: v.detach() for k, v in t.items()}
    fwd = lambda: sk.selective_scan_fn(**det, delta_softplus=True)  # noqa: E731
    fwd_bwd = lambda: torch.autograd.grad(sk.selective_scan_fn(**t, delta_softplus=True), list(t.values()), dy)  # noqa: E731
    return fwd, fwd_bwd


def sweep(device, measure, dim, batch=8, length=4096):
    """Times each tile shape at (batch, dim, length); leaves the fastest set in selective_scan."""
    t = scan_inputs(batch, dim, length, device, torch.bfloat16, True)
    dy = torch.randn_like(t["u"])
    fwd, fwd_bwd = scan_fns(t, dy)
    res = {"fwd": [], "train": []}
    for c in FWD_SWEEP:
        set_fwd(c)
        try:
            res["fwd"].append((c, measure(fwd)))
        except Exception as e:  # noqa: BLE001 (a shape that does not compile is reported, not fatal)
            res["fwd"].append((c, f"{type(e).__name__}: {str(e)[:200]}"))
        print("sweep fwd", res["fwd"][-1], flush=True)
    for c in TRAIN_SWEEP:
        set_train(c)
        try:
            res["train"].append((c, measure(fwd_bwd)))
        except Exception as e:  # noqa: BLE001
            res["train"].append((c, f"{type(e).__name__}: {str(e)[:200]}"))
        print("sweep train", res["train"][-1], flush=True)
    ok = lambda rows: [r for r in rows if isinstance(r[1], float)]  # noqa: E731
    if ok(res["fwd"]):
        set_fwd(min(ok(res["fwd"]), key=lambda r: r[1])[0])
    if ok(res["train"]):
        set_train(min(ok(res["train"]), key=lambda r: r[1])[0])
    return res


def cases(batch, dim, length, device, dtype):
    """(name, bytes moved, exps, triton fn, reference fn at REF_LEN) per timed op."""
    ref_len = min(length, REF_LEN)
    e = torch.tensor([], dtype=dtype).element_size()
    act = batch * dim * length * e  # one (batch, dim, length) activation
    bc = 2 * batch * D_STATE * length * e  # B and C
    exps = batch * dim * length * D_STATE
    t, tr = scan_inputs(batch, dim, length, device, dtype, True), scan_inputs(batch, dim, ref_len, device, dtype, True)
    c, cr = conv_inputs(batch, dim, length, device, dtype, True), conv_inputs(batch, dim, ref_len, device, dtype, True)
    dy, dyr = torch.randn_like(t["u"]), torch.randn_like(tr["u"])
    fwd, fwd_bwd = scan_fns(t, dy)
    fwd_r, fwd_bwd_r = scan_fns(tr, dyr)
    fwd_r = lambda: sk.selective_scan_ref(**{k: v.detach() for k, v in tr.items()}, delta_softplus=True)  # noqa: E731
    fwd_bwd_r = lambda: torch.autograd.grad(sk.selective_scan_ref(**tr, delta_softplus=True), list(tr.values()), dyr)  # noqa: E731

    def conv_fwd(fn, inputs):
        return lambda: fn(**{k: v.detach() for k, v in inputs.items()}, activation="silu")

    def conv_fb(fn, inputs, grad):
        return lambda: torch.autograd.grad(fn(**inputs, activation="silu"), list(inputs.values()), grad)

    state = torch.zeros(batch, dim, D_STATE, device=device)
    conv_state = torch.zeros(batch, dim, WIDTH - 1, device=device, dtype=dtype)
    s = {k: v.detach()[..., 0].contiguous() if v.dim() == 3 else v.detach() for k, v in t.items()}
    step = dict(x=s["u"], dt=s["delta"], A=s["A"], B=s["B"], C=s["C"], D=s["D"], z=s["z"], dt_bias=s["delta_bias"],
                dt_softplus=True)
    cw = {k: v.detach() for k, v in c.items()}
    return [
        # forward: read u, delta, z, B, C, write out; fwd+bwd: + read u, delta, z, dout, B, C, write du, ddelta, dz, dB, dC
        ("scan fwd", 4 * act + bc, exps, fwd, fwd_r),
        ("scan fwd+bwd", 11 * act + 3 * bc, 2 * exps, fwd_bwd, fwd_bwd_r),
        ("conv fwd", 2 * act, 0, conv_fwd(sk.causal_conv1d_fn, c), conv_fwd(sk.causal_conv1d_ref, cr)),
        ("conv fwd+bwd", 5 * act, 0, conv_fb(sk.causal_conv1d_fn, c, dy), conv_fb(sk.causal_conv1d_ref, cr, dyr)),
        ("decode ssm step", 2 * state.numel() * 4, batch * dim * D_STATE, lambda: sk.selective_state_update(state, **step),
         lambda: sk.selective_state_update_ref(state.clone(), **step)),
        ("decode conv step", 2 * conv_state.numel() * e, 0,
         lambda: sk.causal_conv1d_update(cw["x"][..., 0], conv_state, cw["weight"], cw["bias"], "silu"),
         lambda: sk.causal_conv1d_update_ref(cw["x"][..., 0], conv_state.clone(), cw["weight"], cw["bias"], "silu")),
    ], length / ref_len


def keys_seen(len_q, len_kv, window):
    pos = torch.arange(len_q, dtype=torch.float64) + (len_kv - len_q)
    return torch.minimum(pos + 1, torch.full_like(pos, window)).sum().item()


def attention(device, measure, shapes, rows, record):
    """Forward and forward+backward of causal sliding-window attention, in-window TFLOP/s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for batch, heads, length, hd, window in shapes:
        g = torch.Generator(device=device).manual_seed(5)
        q, k, v = (torch.randn(batch, heads, length, hd, generator=g, device=device, dtype=dtype).requires_grad_()
                   for _ in range(3))
        dy = torch.randn_like(q)
        mask = sk.window_mask(length, length, window, device)
        fwd_flops = 4 * batch * heads * hd * keys_seen(length, length, window)  # in-window work only
        causal_flops = 4 * batch * heads * hd * keys_seen(length, length, length)

        exact_flex = torch.compile(flex_attention, dynamic=False)

        def with_backend(backend):
            def fn(q, k, v):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return fn

        methods = {
            "sdpa causal (default)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "sdpa causal cuDNN": with_backend(SDPBackend.CUDNN_ATTENTION),
            "sdpa causal flash": with_backend(SDPBackend.FLASH_ATTENTION),
            "sdpa window bool mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            # Compiled for this exact shape, flex's fastest. windowed_attention runs its own Triton forward
            # without gradients and compiled flex (forward and backward) with them.
            "flex_attention (compiled)": lambda q, k, v: exact_flex(
                q, k, v, block_mask=wa._block_mask(length, length, window, str(q.device))),
            "windowed_attention": lambda q, k, v: sk.windowed_attention(q, k, v, window),
        }
        if device != "cuda":
            methods = {k_: m for k_, m in methods.items() if k_ in ("sdpa window bool mask", "windowed_attention")}
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        ours = ref = None
        for name, fn in methods.items():
            r = dict(op="attention", method=name, batch=batch, heads=heads, length=length, head_dim=hd, window=window)
            try:
                out = fn(qd, kd, vd)
                if name == "windowed_attention":
                    ours = out
                elif name == "sdpa window bool mask":
                    ref = out
                r["fwd_ms"] = measure(lambda: fn(qd, kd, vd))
                r["fwd_bwd_ms"] = measure(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dy))
                # Backward counted as 2.5 forwards (5 matmuls incl. the recompute of QK^T), as FlashAttention does.
                r["fwd_tflops_in_window"] = fwd_flops / r["fwd_ms"] * 1e-9
                r["fwd_bwd_tflops_in_window"] = 3.5 * fwd_flops / r["fwd_bwd_ms"] * 1e-9
                if "causal" in name:
                    r["fwd_tflops_causal_work"] = causal_flops / r["fwd_ms"] * 1e-9
            except Exception as e:  # noqa: BLE001 (a backend that refuses the shape is reported)
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print("attention", r, flush=True)
            rows.append(r)
            record()
            if device == "cuda":
                torch.cuda.empty_cache()
        if device == "cuda":  # the forward kernel's tiles (BLOCK_M, BLOCK_N, warps, stages)
            for tile in ATTN_TILES:
                launch = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tile))
                ms = measure(lambda: wa._launch_window_fwd(qd, kd, vd, window, None, launch))
                rows.append(dict(op="attention tile", tile=tile, batch=batch, heads=heads, length=length, fwd_ms=ms,
                                 fwd_tflops_in_window=fwd_flops / ms * 1e-9))
                print("attention tile", rows[-1], flush=True)
            record()
        if ours is not None and ref is not None:
            rows.append(dict(op="attention check", batch=batch, heads=heads, length=length, window=window,
                             rel_err_vs_sdpa_window_mask=rel_err(ours, ref)))
            print("attention check", rows[-1], flush=True)


def warm(what):
    """Compile only, so that the timed run finds Triton's and Inductor's disk caches filled."""
    if what == "attention":
        for batch, heads, length, hd, window in ATTN_SHAPES:
            q, k, v = (torch.randn(1, heads, length, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            q2, k2, v2 = (x.detach().expand(batch, -1, -1, -1).contiguous().requires_grad_() for x in (q, k, v))
            out = sk.windowed_attention(q2, k2, v2, window)
            torch.autograd.grad(out, (q2, k2, v2), torch.randn_like(out))
            sk.windowed_attention(q2.detach(), k2.detach(), v2.detach(), window)
    else:
        t = scan_inputs(8, 3072, 4096, "cuda", torch.bfloat16, True)
        dy = torch.randn_like(t["u"])
        fwd, fwd_bwd = scan_fns(t, dy)
        for c in FWD_SWEEP:
            set_fwd(c)
            fwd()
        for c in TRAIN_SWEEP:
            set_train(c)
            fwd_bwd()
    torch.cuda.synchronize()
    print(f"warm {what}: done", flush=True)


def versions(device):
    v = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
             cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device == "cuda" else None)
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        v.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    return v


def plot(path, rows, attn_rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    timed = [r for r in rows if "ms" in r and r["op"].startswith(("scan", "conv"))]
    labels = [f"{r['op']}\n{r['model']} b{r['batch']} L{r['length']}" for r in timed]
    axes[0].bar(range(len(timed)), [r["ms"] / r["floor_ms"] for r in timed], color="tab:blue")
    axes[0].axhline(1, color="k", lw=0.8)
    axes[0].axhline(2, color="tab:red", lw=0.8, ls="--", label="2x floor")
    axes[0].set_xticks(range(len(timed)), labels, rotation=90, fontsize=6)
    axes[0].set_ylabel("time / floor")
    axes[0].set_title("samba_kernels: time over floor (lower is better)")
    axes[0].legend()
    ok = [r for r in attn_rows if r["op"] == "attention" and "fwd_ms" in r]
    labels = [f"{r['method']}\nb{r['batch']} h{r['heads']} L{r['length']}" for r in ok]
    x = range(len(ok))
    axes[1].bar([i - 0.2 for i in x], [r["fwd_tflops_in_window"] for r in ok], width=0.4, label="fwd")
    axes[1].bar([i + 0.2 for i in x], [r["fwd_bwd_tflops_in_window"] for r in ok], width=0.4, label="fwd+bwd")
    axes[1].set_xticks(list(x), labels, rotation=90, fontsize=6)
    axes[1].set_ylabel("in-window TFLOP/s")
    axes[1].set_title("sliding-window attention, window 2048 (higher is better)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="where kernels.md/.json/.png go (default benchmarks/, "
                        "or a temporary folder with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU run under TRITON_INTERPRET=1)")
    parser.add_argument("--warm", choices=["scan", "attention"], help="compile only, then exit")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    if args.warm:
        return warm(args.warm)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not sk.use_triton(torch.empty(0, device=device)):
        sys.exit("no GPU and TRITON_INTERPRET is not 1: nothing to benchmark")
    out_dir = pathlib.Path(args.out_dir or ("/tmp/samba_kernels_smoke" if args.smoke else "benchmarks"))
    out_dir.mkdir(parents=True, exist_ok=True)
    measure = timer(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    models = {"tiny": 8} if args.smoke else {"samba-421m": 3072, "samba-1.3b": 4608}
    shapes = {"tiny": [(1, 16)], "samba-421m": [(8, 4096), (1, 65536)], "samba-1.3b": [(8, 4096)]}
    command = "PYTHONPATH=kernels python3 " + " ".join(["benchmarks/kernels.py"] + sys.argv[1:])
    result = dict(command=command, device=device, versions=versions(device), rows=[], attention=[], errors=[])

    def record():  # after every section, so that a run cut short still leaves its numbers
        (out_dir / "kernels.json").write_text(json.dumps(result, indent=1, default=str))
        (out_dir / "kernels.md").write_text(render(result) + "\n")

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 (one failing section must not lose the others)
            result["errors"].append(f"{name}: {traceback.format_exc()[-1500:]}")
            print(f"SECTION {name} FAILED\n{traceback.format_exc()}", flush=True)
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)
        record()

    def do_check():
        result["checks"] = check(device, 8 if args.smoke else 256, 16 if args.smoke else 1024)
        for name, err in result["checks"].items():
            print(f"check {name}: relative error {err:.2e}", flush=True)

    def do_rates():
        result["copy_bw"], result["bf16_flops"], result["exp2_rate"] = device_rates(device, measure, args.smoke)
        print(f"copy {result['copy_bw'] / 1e9:.0f} GB/s, bf16 matmul {result['bf16_flops'] / 1e12:.0f} TFLOP/s, "
              f"exp2 {result['exp2_rate'] / 1e12:.2f} T/s", flush=True)

    def do_sweep():
        result["sweep"] = sweep(device, measure, 3072)

    def do_ops():
        for model, dim in models.items():
            for batch, length in shapes[model]:
                ops, scale = cases(batch, dim, length, device, dtype)
                for name, nbytes, exps, fn, ref in ops:
                    decode = name.startswith("decode")
                    if length > 8192 and not name.startswith("scan"):
                        continue
                    try:
                        ms = measure(fn)
                        ref_ms = measure(ref) * (1 if decode else scale) if length <= 8192 else None
                    except Exception as e:  # noqa: BLE001
                        result["errors"].append(f"{name} {model} {batch}x{length}: {type(e).__name__}: {e}")
                        continue
                    floor_ms = max(nbytes / result["copy_bw"], exps / result["exp2_rate"]) * 1e3
                    row = dict(op=name, model=model, batch=batch, length=1 if decode else length, ms=ms,
                               gbps=nbytes / ms / 1e6, floor_ms=floor_ms, ref_ms=ref_ms,
                               floor_kind="exp" if exps / result["exp2_rate"] > nbytes / result["copy_bw"] else "bytes")
                    if model == "samba-421m" and (batch, length) == (8, 4096) and name in QUOTED:
                        row.update({f"quoted_{k}": v for k, v in QUOTED[name].items()})
                    result["rows"].append(row)
                    print(row, flush=True)
                    record()
                del ops
                torch.cuda.empty_cache() if device == "cuda" else None

    def do_attention():
        attention(device, measure, [(1, 2, 32, 16, 8)] if args.smoke else ATTN_SHAPES, result["attention"], record)

    section("checks", do_check)
    section("device rates", do_rates)
    if device == "cuda" and not args.no_sweep:
        section("tile sweep", do_sweep)
    result["scan_config"] = dict(fwd=ss.GPU_FWD, train=ss.GPU_TRAIN, lanes=ss.LANES, lane_cost=ss.LANE_COST,
                                 lane_y_parts=ss.LANE_Y_PARTS, bwd_register_caps=ss.BWD_REGISTER_CAPS,
                                 bwd_small_block_nu=ss.BWD_SMALL_BLOCK_NU)
    section("ops", do_ops)
    section("attention", do_attention)
    table = render(result)
    print(table)
    (out_dir / "kernels.md").write_text(table + "\n")
    record()
    try:
        plot(out_dir / "kernels.png", result["rows"], result["attention"])
    except Exception:  # noqa: BLE001
        print(f"plot failed\n{traceback.format_exc()}")


def render(result):
    v = result["versions"]
    rate = lambda k, s, u: f"{result[k] / s:.2f} {u}" if k in result else "n/a"  # noqa: E731
    lines = [
        "# samba_kernels benchmark", "",
        f"Machine: {v.get('gpu', 'cpu (interpreter smoke run)')} ({v.get('sms', '?')} SMs, {v.get('memory_gib', '?')} GiB); "
        f"python {v['python']}, torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}.",
        f"Command: `{result['command']}` (from the repository root). Inputs bf16 on the GPU (fp32 in the smoke run), "
        f"d_state {D_STATE}, conv width {WIDTH}; times are medians of triton.testing.do_bench.",
        f"Measured ceilings: copy {rate('copy_bw', 1e9, 'GB/s')} (read + write), bf16 matmul "
        f"{rate('bf16_flops', 1e12, 'TFLOP/s')}, exp2 {rate('exp2_rate', 1e12, 'T/s')}.",
        "Floor = max(minimal bytes / copy bandwidth, exps / exp2 rate): the scan forward reads u, delta, z, B, C and "
        "writes out once, with d_state exps per (channel, step); forward+backward adds one read of u, delta, z, dout, "
        "B, C and one write of du, ddelta, dz, dB, dC, and counts the exps twice. Reference times are measured at "
        f"length {REF_LEN} and extrapolated linearly.",
        f"Scan tile configuration used: {result.get('scan_config')}.",
        "", "| op | model | batch | length | ms | GB/s | floor ms | x floor | reference ms | x faster than ref |"
        " previous ms (QUOTED) | mamba-ssm ms (QUOTED) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ref = "n/a" if r["ref_ms"] is None else f"{r['ref_ms']:.2f}"
        faster = "n/a" if r["ref_ms"] is None else f"{r['ref_ms'] / r['ms']:.1f}"
        prev = r.get("quoted_previous_ms")
        mam = r.get("quoted_mamba_ssm_ms")
        prev_s = f"{prev:.2f} ({prev / r['ms']:.1f}x)" if prev else ""
        mam_s = f"{mam:.2f} ({mam / r['ms']:.2f}x)" if mam else ""
        lines.append(f"| {r['op']} | {r['model']} | {r['batch']} | {r['length']} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                     f"{r['floor_ms']:.3f} ({r['floor_kind']}) | {r['ms'] / r['floor_ms']:.1f} | {ref} | {faster} | "
                     f"{prev_s} | {mam_s} |")
    lines += ["", "QUOTED columns: an earlier H200 measurement (bf16, batch 8, dim 3072, length 4096, d_state 16) of "
              "this repo's previous scan kernel (states spread over lanes) and of mamba-ssm's CUDA kernel, not re-measured here "
              "(mamba-ssm is not installed on the benchmark machine); the ratio is quoted / ours.", ""]
    if result.get("sweep"):
        lines += ["Tile sweep at samba-421m, batch 8, length 4096 (forward: (BLOCK_D, T, NU, warps); training: "
                  "(T, fwd (BLOCK_D, NU, warps), bwd (BLOCK_D, NU, warps)), timed as forward+backward):", ""]
        for kind, rows in result["sweep"].items():
            lines.append(f"- {kind}: " + "; ".join(f"{c}: {m:.3f} ms" if isinstance(m, float) else f"{c}: {m}"
                                                   for c, m in rows))
        lines.append("")
    lines += ["Sliding-window attention (useful FLOPs = 4 * batch * heads * head_dim * keys seen, in the window only; "
              "fwd+bwd counts 3.5x the forward's FLOPs; full-causal SDPA does more work than the window needs):", "",
              "| method | batch | heads | length | head_dim | window | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
              "fwd+bwd TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["attention"]:
        if r["op"] != "attention":
            continue
        if "error" in r:
            lines.append(f"| {r['method']} | {r['batch']} | {r['heads']} | {r['length']} | {r['head_dim']} | "
                         f"{r['window']} | error: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['batch']} | {r['heads']} | {r['length']} | {r['head_dim']} | {r['window']} | "
                     f"{r['fwd_ms']:.3f} | {r['fwd_tflops_in_window']:.0f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{r['fwd_bwd_tflops_in_window']:.0f} |")
    tiles = [r for r in result["attention"] if r["op"] == "attention tile"]
    if tiles:
        lines += ["", "windowed_attention's forward kernel by tile (BLOCK_M, BLOCK_N, warps, stages), fwd ms "
                  "(TFLOP/s); the first is the one it uses at head_dim 128:", ""]
        for shape in dict.fromkeys((r["batch"], r["heads"], r["length"]) for r in tiles):
            lines.append(f"- b{shape[0]} h{shape[1]} L{shape[2]}: " + "; ".join(
                f"{tuple(r['tile'])}: {r['fwd_ms']:.3f} ({r['fwd_tflops_in_window']:.0f})"
                for r in tiles if (r["batch"], r["heads"], r["length"]) == shape))
    checks = [r for r in result["attention"] if r["op"] == "attention check"]
    lines += ["", "Checks (||out - ref|| / ||ref||): "
              + ", ".join(f"{k} {v:.1e}" for k, v in result.get("checks", {}).items())
              + "".join(f"; windowed_attention vs SDPA window mask (b{c['batch']} L{c['length']}) "
                        f"{c['rel_err_vs_sdpa_window_mask']:.1e}" for c in checks)]
    if result["errors"]:
        lines += ["", "Errors: " + " | ".join(e.replace("\n", " ")[:300] for e in result["errors"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
