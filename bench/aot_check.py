"""
Compile the attention kernels for an H100/H200 (sm_90) ahead of time, on a machine without a GPU, and report
registers, spills and shared memory per configuration (Triton's bundled ptxas -v). It proves the GPU code generates
and how heavy each tile configuration is; it says nothing about speed (that is `python -m bench.kernels` on a
GPU).

    python -m bench.aot_check            # every autotune configuration, bf16 Dh 24/32/64 + fp32 Dh 32
                                         # (~3-5 min CPU)
    python -m bench.aot_check --quick    # one configuration per kernel (~20 s)

Uses Triton's compiler API (triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))); written against
triton 3.7.1, where the CPU wheel ships the NVIDIA backend and ptxas. TRITON_INTERPRET must not be set.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import plumbing

POINTERS = ("Q", "K", "V", "O", "DO", "DK", "DV")


def signature(fn, dtype, consts):
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in POINTERS:
            sig[n] = f"*{dtype}"
        elif n in ("LSE", "DELTA", "DQ32"):
            sig[n] = "*fp32"
        elif n == "CU":
            sig[n] = "*i32"
        else:
            sig[n] = "fp32" if n in ("qk_scale", "sm_scale") else "i32"
    return sig


def compile_report(fn, dtype, consts, num_warps, num_stages):
    """-> dict(registers, spill_bytes, shared_bytes) of one kernel configuration compiled for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    k = triton.compile(ASTSource(fn, signature(fn, dtype, consts), constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        plumbing.write_text(path, k.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    regs, spill = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    return dict(registers=int(regs.group(1)), spill_bytes=int(spill.group(1)) if spill else 0,
                shared_bytes=k.metadata.shared)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one configuration per kernel")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("error: bench/aot_check.py: unset TRITON_INTERPRET (the interpreter has no "
                         "compiler)")
    import triton
    from kernels import varlen_attention as va
    cases = [("bf16", 64), ("bf16", 32), ("bf16", 24), ("fp32", 32)]
    fwd_tiles, bwd_tiles = (va._TILES[:1], va._BWD_TILES[:1]) if args.quick else (va._TILES, va._BWD_TILES)
    rows = []
    for dtype, dh in cases[:2] if args.quick else cases:
        base = dict(HEAD_DIM=dh, BLOCK_D=max(16, triton.next_power_of_2(dh)), UPCAST=False,
                    DOT_PREC="ieee" if dtype == "fp32" else "tf32")
        for bm, bn, w, st in fwd_tiles:
            rows.append(("fwd", dtype, dh, f"{bm}x{bn} w{w} s{st}",
                         compile_report(va._attn_fwd, dtype, dict(base, BLOCK_M=bm, BLOCK_N=bn), w, st)))
        for bn, bm, w, st in bwd_tiles:
            for atomic in (False, True):
                rows.append((f"bwd {'atomic' if atomic else 'deterministic'}", dtype, dh, f"{bn}x{bm} w{w} s{st}",
                             compile_report(va._attn_bwd, dtype, dict(base, BLOCK_M=bm, BLOCK_N=bn, ATOMIC_DQ=atomic),
                                            w, st)))
        print(f"compiled {dtype} Dh {dh}", file=sys.stderr, flush=True)
    print("| kernel | dtype | Dh | tiles (own x loop), warps, stages | registers | spill bytes | shared bytes |")
    print("|---|---|---:|---|---:|---:|---:|")
    for kernel, dtype, dh, tiles, r in rows:
        print(f"| {kernel} | {dtype} | {dh} | {tiles} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} |")
    return rows


if __name__ == "__main__":
    main()
