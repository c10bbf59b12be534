"""How fast the split scan's forward could be: its kernels' instructions counted offline, as a bound in exp floors.

Compiles the two kernels of the split forward (`_chunk_summary_kernel`, then `_scan_fwd_lanes_kernel`) for sm_90
with the installed Triton, specialised as the launcher launches them at one shape (no GPU needed), reads the SASS of
each kernel's main loop (cuobjdump, shipped with Triton) and counts, per (channel, state, step) it scans, the
instructions issued and the MUFU operations (exp2, reciprocal). An SM sub-partition issues one warp instruction a
cycle, and its MUFU unit finishes one warp instruction every MUFU_CYCLES cycles (16 results a cycle per SM on
Hopper); the exp floor (benchmarks/results/kernels.md) is one exp2 per element at that rate. A pass can take no
less than max(instructions, MUFU_CYCLES x MUFU operations) cycles per element, so the split's forward, whose summary
scans every chunk but the last, takes at least the sum of its two passes' bounds, in floors:

    python benchmarks/scan_issue_bound.py                       # 1 x 3072 x 65536, the 132 SMs of an H200
    python benchmarks/scan_issue_bound.py --batch 2 --length 16384
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels would be defined for the interpreter
    sys.exit("scan_issue_bound compiles the kernels for a GPU: run it without TRITON_INTERPRET=1")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "kernels")]  # run as a script
from samba_kernels.selective_scan import kernel as ss  # noqa: E402

MUFU_CYCLES = 8  # 32 lanes over 4 MUFU results a cycle per sub-partition (sm_90)
FLOAT32_POINTERS = {"A_ptr", "D_ptr", "delta_bias_ptr", "init_ptr", "last_ptr", "ckpt_ptr", "ends_ptr", "decays_ptr"}
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
BACKWARD_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest loop (a branch back to an earlier address) of one kernel's SASS listing."""
    listing = [(int(address, 16), text) for address, text in SASS_LINE.findall(sass)]
    loops = []
    for address, text in listing:
        branch = BACKWARD_BRANCH.search(text)
        if branch and int(branch.group(1), 16) < address:
            loops.append([text for a, text in listing if int(branch.group(1), 16) <= a <= address])
    if not loops:
        raise ValueError("no loop found in the SASS listing")
    body = max(loops, key=len)
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for text in body)


def pass_bound(opcodes: collections.Counter, elements: int) -> dict:
    """Instructions and MUFU operations per element of a loop over `elements` (channel, state, step) per thread,
    and its least cycles per element in units of the exp floor's MUFU_CYCLES."""
    instructions = sum(opcodes.values()) / elements
    mufu = sum(n for op, n in opcodes.items() if op.startswith("MUFU")) / elements
    return dict(instructions=instructions, mufu=mufu, floors=max(instructions, MUFU_CYCLES * mufu) / MUFU_CYCLES)


def compile_sass(fn, ints: dict, constexprs: dict, num_warps: int) -> str:
    """SASS of `fn` for sm_90, specialised as a launch with these integer arguments would be (16-aligned pointers,
    integers divisible by 16 marked so, 1 a constant)."""
    signature, attrs, constants = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or ints.get(name) == 1:
            signature[name], constants[(i,)] = "constexpr", constexprs.get(name, 1)
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FLOAT32_POINTERS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        return subprocess.run([str(cuobjdump), "-sass", cubin], capture_output=True, text=True, check=True).stdout


def split_bound(batch: int, dim: int, length: int, d_state: int, sms: int) -> dict:
    plan = ss._plan(batch, dim, length, 1, d_state, False, True, sms).forward
    if not plan.lanes or plan.chunks < 2:
        raise ValueError(f"{batch} x {dim} x {length} is not split on {sms} SMs: {plan}")
    lanes, summary, T = plan.meta, plan.summary, plan.meta["T"]
    block_n = max(2, triton.next_power_of_2(d_state))
    common = dict(dim=dim, L=length, groups=1, dpg=dim, n_tiles=length // T, chunk_tiles=plan.chunk // T)
    flags = dict(N=d_state, BLOCK_N=block_n, T=T, HAS_BIAS=True, SOFTPLUS=True, HAS_SEQ=False)
    summary_sass = compile_sass(
        ss._chunk_summary_kernel,
        dict(common, n_chunks=plan.chunks),
        dict(flags, BLOCK_D=summary["BLOCK_D"], HAS_Z=False, REVERSE=False),
        summary["num_warps"],
    )
    lanes_sass = compile_sass(
        ss._scan_fwd_lanes_kernel,
        dict(common, s_hb=dim * d_state, s_hd=d_state, s_hn=1),
        dict(flags, BLOCK_D=lanes["BLOCK_D"], HAS_D=True, HAS_Z=True, HAS_INIT=False, SAVE_CKPT=False,
             CKPT_EVERY=plan.ckpt_every, Y_PARTS=ss.LANE_Y_PARTS[lanes["BLOCK_D"]], SPLIT=True),
        lanes["num_warps"],
    )  # fmt: skip

    def per_thread(meta):  # (channel, state, step) elements a thread scans in one tile
        return T * block_n * meta["BLOCK_D"] // (32 * meta["num_warps"])

    passes = {
        "summary": pass_bound(main_loop(summary_sass), per_thread(summary)),
        "lanes": pass_bound(main_loop(lanes_sass), per_thread(lanes)),
    }
    passes["summary"]["share"] = (plan.chunks - 1) / plan.chunks  # every chunk but the last
    passes["lanes"]["share"] = 1.0
    return dict(plan=plan, passes=passes, floors=sum(p["floors"] * p["share"] for p in passes.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--sms", type=int, default=132)
    args = parser.parse_args()
    result = split_bound(args.batch, args.dim, args.length, args.d_state, args.sms)
    plan = result["plan"]
    print(f"triton {triton.__version__}, sm_90; {args.batch} x {args.dim} x {args.length}: {plan.chunks} chunks of")
    print(f"{plan.chunk} steps, lanes BLOCK_D {plan.meta['BLOCK_D']}, summary BLOCK_D {plan.summary['BLOCK_D']}")
    for name, p in result["passes"].items():
        print(
            f"{name:8s} {p['instructions']:5.2f} instructions and {p['mufu']:.3f} MUFU operations per element: "
            f"at least {p['floors']:.3f} floors, on {p['share']:.3f} of the elements"
        )
    print(f"the split forward: at least {result['floors']:.2f} exp floors")


if __name__ == "__main__":
    main()
