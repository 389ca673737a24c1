"""
Benchmark of kernels/ against the PyTorch alternatives, prepared to run in one call on a CUDA machine.

    python -m kernels.bench             # GPU; prints the markdown table (--json: the result as JSON)
    python -m kernels.bench --smoke     # CPU (Triton interpreter), tiny sizes, ~10 s: proves the script
                                        # runs; timings meaningless
    python -m bench.kernels --out DIR   # the same run, written to DIR/kernels_bench.{json,md} (bench/
                                        # writes the files; this module only measures and prints)
Attention (bf16, real I-JEPA lengths: batch 128, 25-200 tokens per sequence, 12 heads, head dim 64 and 32):
  1. correctness: max |out - fp32 reference| of o, dq, dk, dv for ours, torch varlen_attn and padded SDPA;
     ours passes if its error <= 2 x varlen_attn's (the fastest same-dtype torch path) + 1e-3.
  2. time (triton.testing.do_bench medians) of fwd and fwd+bwd for
       ours          kernels.varlen_attention on packed [T, H, Dh], once per backward variant: deterministic dQ
                     (one program per sequence and head) and atomic dQ (one program per key tile); both 5 GEMMs
       (a) FA2       torch.nn.attention.varlen.varlen_attn (FlashAttention-2 varlen, CUDA only)
       (b) padded    SDPA on [B, H, Lmax, Dh] with a boolean key-padding mask (torch picks the backend)
       (c) truncated the official I-JEPA approach: cut every sequence to the shortest, SDPA flash without a mask
     TFLOP/s count the useful work 4 * sum(L^2) * H * Dh per fwd (x 3.5 for fwd+bwd: bwd = 2.5 fwd); for (c) the
     work of the truncated problem (it solves a smaller, different problem: it drops tokens).
Gather (bf16, width 768, 14x14 grid): context gather (+pos) and the fused target LN + gather + smooth-L1
  (+dL/dz) against the plain torch paths: index + add for the gather; for the loss both the official way
  (F.layer_norm of all B*N rows + torch.gather + F.smooth_l1_loss) and gather.py's reference
  ln_gather_smooth_l1_ref (gather the target rows first, layer-norm only those: the order of radjepa.py's
  jepa_loss_torch), the best torch path; speed-up = best torch row / ours.
  GB/s = bytes the kernel must move / time, compared with a measured device copy (read + write).
Targets (from the issue): attention fwd+bwd at least as fast as (a); gathers >= 70% of copy bandwidth.
Padding/gathering of the baselines' inputs is not timed (favours the baselines).
"""
import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

H200_BF16_TFLOPS = 790.0  # measured dense bf16 GEMM rate on this workplace's H200 (0.8 x 989 peak)
H200_COPY_GBPS = 4300.0  # measured device copy bandwidth (read + write bytes / time)


def parser(prog=None):
    """The measurement's flags (bench/kernels.py adds --out to the same parser)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU in the Triton interpreter")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--min-len", type=int, default=25)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 32])
    p.add_argument("--seed", type=int, default=0)
    return p


def settle(p, args):
    """--smoke sizes, and the lengths checked (p.error on a bad pair) -> args."""
    if args.smoke:  # a few tiny tiles: each interpreted tile costs milliseconds
        args.batch, args.heads, args.min_len, args.max_len, args.head_dims = 4, 2, 1, 40, [32]
    if not 1 <= args.min_len <= args.max_len:
        p.error(f"need 1 <= --min-len <= --max-len, got {args.min_len}, {args.max_len}")
    return args


class Timer:
    """Milliseconds: triton.testing.do_bench median on CUDA; one perf_counter run on CPU (smoke only)."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        if self.device == "cuda":
            import triton.testing
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        fn()  # warm-up (compiles / traces), then one timed run: the interpreter is only smoke-tested here
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------

def attention_section(args, device, timer):
    from . import varlen_attention as va
    from .varlen_attention import varlen_attention, varlen_attention_ref

    def ours(atomic_dq):  # the backward's dQ variant is chosen at forward time (module flag, see the kernel file)
        def fn(a, b, c):
            old, va.ATOMIC_DQ = va.ATOMIC_DQ, atomic_dq
            try:
                return varlen_attention(a, b, c, cu, Lmax)
            finally:
                va.ATOMIC_DQ = old
        return fn
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=gen)  # one length per sequence
    B, H, T, Lmax, Lmin = args.batch, args.heads, int(lens.sum()), int(lens.max()), int(lens.min())
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32).to(device)
    keep = torch.arange(Lmax)[None, :] < lens[:, None]  # [B, Lmax] True on real tokens
    keep_d = keep.to(device)
    useful = 4.0 * float((lens.double() ** 2).sum()) * H  # fwd FLOPs / Dh
    out = dict(dtype="bfloat16", batch=B, heads=H, tokens=T, max_len=Lmax, min_len=Lmin,
               mean_len=float(lens.float().mean()), padded_tokens=B * Lmax, truncated_tokens=B * Lmin, cases=[])

    varlen_attn = None
    if device == "cuda":  # CUDA-only (FlashAttention-2 kernels); torch >= 2.10 has it
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError as e:
            print(f"torch varlen_attn unavailable ({e}); comparing with padded SDPA only")

    def pad(t):  # [T, H, Dh] -> [B, H, Lmax, Dh] zero-padded, as a fresh leaf
        p = t.new_zeros(B, Lmax, *t.shape[1:])
        p[keep_d] = t
        return p.transpose(1, 2).contiguous().requires_grad_()

    def unpad(p):  # [B, H, Lmax, Dh] -> [T, H, Dh]
        return p.transpose(1, 2)[keep_d]

    for dh in args.head_dims:
        torch.manual_seed(args.seed)
        q, k, v = (torch.randn(T, H, dh, device=device, dtype=dt, requires_grad=True) for _ in range(3))
        g = torch.randn(T, H, dh, device=device, dtype=dt)
        qp, kp, vp = pad(q.detach()), pad(k.detach()), pad(v.detach())
        gp = pad(g).detach()
        mask = keep_d[:, None, None, :]  # [B, 1, 1, Lmax] key-padding mask, broadcast over heads and queries
        qt, kt, vt = (t.detach()[:, :, :Lmin].contiguous().requires_grad_() for t in (qp, kp, vp))
        gt = gp[:, :, :Lmin].contiguous()

        # (name, fn, inputs, grad_out, fwd FLOPs) ; every fn maps its own inputs to its own output layout
        methods = [("ours: triton varlen", ours(False), (q, k, v), g, useful * dh),
                   ("ours: triton varlen, atomic dQ", ours(True), (q, k, v), g, useful * dh)]
        if varlen_attn is not None:
            methods.append(("(a) torch varlen_attn (FA2)", lambda a, b, c: varlen_attn(a, b, c, cu, cu, Lmax, Lmax),
                            (q, k, v), g, useful * dh))
        methods.append(("(b) SDPA padded + key mask", lambda a, b, c: F.scaled_dot_product_attention(
            a, b, c, attn_mask=mask), (qp, kp, vp), gp, useful * dh))

        def truncated(a, b, c):
            if device != "cuda":
                return F.scaled_dot_product_attention(a, b, c)
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(a, b, c)
        methods.append(("(c) truncate to shortest + SDPA flash", truncated, (qt, kt, vt), gt,
                        4.0 * B * Lmin ** 2 * H * dh))

        # -- correctness at these lengths, against an fp32 per-sequence reference --------------------------------
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        o32 = varlen_attention_ref(q32, k32, v32, cu)
        ref = [t.detach() for t in (o32, *torch.autograd.grad(o32, (q32, k32, v32), g.float()))]
        errors = {}
        for name, fn, inputs, grad, _ in methods[:-1]:  # (c) computes a different problem
            o = fn(*inputs)
            grads = torch.autograd.grad(o, inputs, grad)
            if inputs[0].dim() == 4:
                o, grads = unpad(o), [unpad(t) for t in grads]
            errors[name] = [float((a.detach().float() - b).abs().max()) for a, b in zip((o, *grads), ref)]
        baseline = errors.get("(a) torch varlen_attn (FA2)", errors["(b) SDPA padded + key mask"])
        # interpreter only: its fp32 -> bf16 casts truncate, 1 extra ulp of the largest value (kernels.md pitfall 2)
        slack = [2.0 ** -7 * float(t.abs().max()) if device == "cpu" else 0.0 for t in ref]
        passed = all(e <= 2 * b + 1e-3 + s for name in errors if name.startswith("ours")
                     for e, b, s in zip(errors[name], baseline, slack))

        # -- timing --------------------------------------------------------------------------------------------------
        rows = []
        for name, fn, inputs, grad, flops in methods:
            with torch.no_grad():
                ms_f = timer(lambda: fn(*inputs))
            ms_fb = timer(lambda: torch.autograd.grad(fn(*inputs), inputs, grad))
            rows.append(dict(method=name, fwd_us=ms_f * 1e3, fwd_tflops=flops / ms_f * 1e-9,
                             fwd_bwd_us=ms_fb * 1e3, fwd_bwd_tflops=3.5 * flops / ms_fb * 1e-9))
        fa2 = next((r for r in rows if r["method"].startswith("(a)")), None)
        target = None if fa2 is None else min(r["fwd_bwd_us"] for r in rows[:2]) <= fa2["fwd_bwd_us"]
        out["cases"].append(dict(head_dim=dh, errors={k_: dict(zip(("o", "dq", "dk", "dv"), e))
                                                      for k_, e in errors.items()},
                                 correct=passed, timing=rows, target_fwd_bwd_at_least_fa2=target))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Gathers
# ----------------------------------------------------------------------------------------------------------------

def gather_section(args, device, timer):
    from .gather import gather_rows, gather_rows_ref, ln_gather_smooth_l1, ln_gather_smooth_l1_ref
    dt, es = torch.bfloat16, 2  # element size in bytes
    side, D, k_tgt = (4, 96, 3) if args.smoke else (14, 768, 33)
    N = side * side
    res = dict(dtype="bfloat16", width=D, grid=f"{side}x{side}", cases=[])

    # a device copy of 1 GiB (64 MiB in smoke mode) sets the bandwidth ceiling: GB/s = (read + write) / time
    n = (64 if args.smoke else 1024) * 2 ** 20 // es
    src, dst = torch.randn(n, device=device, dtype=dt), torch.empty(n, device=device, dtype=dt)
    copy_gbps = 2 * n * es / timer(lambda: dst.copy_(src)) * 1e-6
    res["copy_gbps_measured"] = copy_gbps
    del src, dst

    scales = [1] if args.smoke else [1, 8]  # the real batch, and an 8x larger one for steady-state bandwidth
    for scale in scales:
        B = args.batch * scale
        gen = torch.Generator().manual_seed(args.seed)
        # context: each image keeps a random subset of its patches (the collator's flat b * N + n indices)
        n_keep = torch.randint(min(args.min_len, N), min(args.max_len, N) + 1, (B,), generator=gen)
        ranks = torch.rand(B, N, generator=gen).argsort(1).argsort(1)
        ctx_idx = torch.nonzero(ranks < n_keep[:, None])  # row-major (b, n) pairs
        ctx_idx = (ctx_idx[:, 0] * N + ctx_idx[:, 1]).to(device)
        T = ctx_idx.numel()
        x = torch.randn(B, N, D, device=device, dtype=dt, requires_grad=True)
        pos = torch.randn(N, D, device=device, dtype=dt)
        gout = torch.randn(T, D, device=device, dtype=dt)
        with torch.no_grad():  # on GPU bit-exact; the interpreter rounds fp32 -> bf16 toward zero (1 ulp)
            mine, theirs = gather_rows(x, ctx_idx, pos), gather_rows_ref(x, ctx_idx, pos)
        exact, gerr = torch.equal(mine, theirs), float((mine.float() - theirs.float()).abs().max())
        byts = T * D * 3 * es + T * 8  # read x row + pos row, write out row, read index
        rows = []
        for name, fn in (("ours: gather_rows", lambda: gather_rows(x, ctx_idx, pos)),
                         ("torch: x.flat[idx] + pos[idx % N]", lambda: gather_rows_ref(x, ctx_idx, pos))):
            with torch.no_grad():
                ms = timer(fn)
            ms_fb = timer(lambda: torch.autograd.grad(fn(), x, gout))
            rows.append(dict(method=name, fwd_us=ms * 1e3, fwd_gbps=byts / ms * 1e-6,
                             fwd_frac_of_copy=byts / ms * 1e-6 / copy_gbps, fwd_bwd_us=ms_fb * 1e3))
        res["cases"].append(dict(case="context gather + pos", batch=B, rows=T, bytes=byts, equal_to_torch=exact,
                                 max_abs_err_vs_torch=gerr,
                                 timing=rows, target_70pct_copy=rows[0]["fwd_frac_of_copy"] >= 0.7))

        # target: 4 blocks of k_tgt patches per image, [4, B, k_tgt] like I-JEPA's masks_pred
        tgt = torch.stack([torch.randperm(N, generator=gen)[:k_tgt] for _ in range(4 * B)]).view(4, B, k_tgt)
        tgt = tgt.to(device)
        flat_tgt = (tgt + torch.arange(B, device=device)[None, :, None] * N).reshape(-1)  # [4*B*k_tgt]
        R = flat_tgt.numel()
        h = torch.randn(B, N, D, device=device, dtype=dt)
        z = torch.randn(R, D, device=device, dtype=dt, requires_grad=True)

        def torch_path():  # I-JEPA: layer-norm every token, then torch.gather each target block, then the loss
            hn = F.layer_norm(h, (D,))
            t = torch.cat([torch.gather(hn, 1, m[..., None].expand(-1, -1, D)) for m in tgt])  # [4B, k, D]
            return F.smooth_l1_loss(z, t.reshape(R, D))

        with torch.no_grad():
            err = abs(float(ln_gather_smooth_l1(z, h, flat_tgt)) - float(ln_gather_smooth_l1_ref(
                z.float(), h.float(), flat_tgt)))
        byts = R * D * 3 * es + R * 8  # read h row + z row, write dz row, read index
        rows = []
        for name, fn in (("ours: ln_gather_smooth_l1 (+dL/dz)", lambda: ln_gather_smooth_l1(z, h, flat_tgt)),
                         ("torch, official: layer_norm(all) + gather + smooth_l1", torch_path),
                         ("torch, gather first: gather targets + layer_norm + smooth_l1 "
                          "(ln_gather_smooth_l1_ref; jepa_loss_torch's order)",
                          lambda: ln_gather_smooth_l1_ref(z, h, flat_tgt))):
            ms_fb = timer(lambda: torch.autograd.grad(fn(), z))
            rows.append(dict(method=name, fwd_bwd_us=ms_fb * 1e3, gbps=byts / ms_fb * 1e-6,
                             frac_of_copy=byts / ms_fb * 1e-6 / copy_gbps))
        res["cases"].append(dict(case="target LN + gather + smooth-L1 (fwd+bwd)", batch=B, rows=R, bytes=byts,
                                 loss_abs_err_vs_fp32_ref=err, timing=rows,
                                 speedup_vs_best_torch=min(r["fwd_bwd_us"] for r in rows[1:]) / rows[0]["fwd_bwd_us"],
                                 target_70pct_copy=rows[0]["frac_of_copy"] >= 0.7))
    return res


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def to_markdown(r):
    a, g = r["attention"], r["gather"]
    lines = [f"# kernels/ benchmark, {r['date']}", "",
             f"machine: {r['machine']} | torch {r['torch']} | triton {r['triton']} | mode: {r['mode']}",
             f"command: `{r['command']}`", ""]
    if r["mode"] == "smoke":
        lines += ["**Smoke run in the Triton interpreter on CPU: timings are NOT performance numbers.**", ""]
    lines += [f"## Attention (bf16, B={a['batch']}, H={a['heads']}, lengths {a['min_len']}-{a['max_len']}, mean "
              f"{a['mean_len']:.1f}; {a['tokens']} packed tokens vs {a['padded_tokens']} padded, "
              f"{a['truncated_tokens']} truncated)", "",
              f"Ceiling: ~{H200_BF16_TFLOPS:.0f} TFLOP/s (measured H200 bf16 GEMM). fwd+bwd FLOPs = 3.5 x fwd.", ""]
    for c in a["cases"]:
        lines += [f"### head dim {c['head_dim']}: correct = {c['correct']}, fwd+bwd at least as fast as FA2 = "
                  f"{c['target_fwd_bwd_at_least_fa2']}", "",
                  "| method | max err o | dq | dk | dv |", "|---|---|---|---|---|"]
        lines += [f"| {m} | " + " | ".join(f"{e[x]:.2e}" for x in ("o", "dq", "dk", "dv")) + " |"
                  for m, e in c["errors"].items()]
        lines += ["", "| method | fwd us | fwd TFLOP/s | fwd+bwd us | fwd+bwd TFLOP/s | % of ceiling (f+b) |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {t['method']} | {t['fwd_us']:.1f} | {t['fwd_tflops']:.1f} | {t['fwd_bwd_us']:.1f} | "
                  f"{t['fwd_bwd_tflops']:.1f} | {100 * t['fwd_bwd_tflops'] / H200_BF16_TFLOPS:.1f} |"
                  for t in c["timing"]]
        lines.append("")
    lines += [f"## Gathers (bf16, D={g['width']}, grid {g['grid']})", "",
              f"Measured copy bandwidth here: {g['copy_gbps_measured']:.0f} GB/s (H200 reference ~{H200_COPY_GBPS:.0f})."
              " GB/s = bytes the fused kernel must move / time (same byte count for the torch row).", ""]
    for c in g["cases"]:
        check = (f"equal to torch: {c['equal_to_torch']}, max err {c['max_abs_err_vs_torch']:.1e}"
                 if "equal_to_torch" in c
                 else f"|loss - fp32 ref| = {c['loss_abs_err_vs_fp32_ref']:.1e}; speed-up vs the best torch row "
                      f"{c['speedup_vs_best_torch']:.2f}x")
        lines += [f"### {c['case']}, B={c['batch']}, {c['rows']} rows ({check}; >= 70% of copy: "
                  f"{c['target_70pct_copy']})", "", "| method | time us | GB/s | fraction of copy |",
                  "|---|---:|---:|---:|"]
        for t in c["timing"]:
            us = t.get("fwd_us", t.get("fwd_bwd_us"))
            gbps, frac = t.get("fwd_gbps", t.get("gbps")), t.get("fwd_frac_of_copy", t.get("frac_of_copy"))
            extra = f" (fwd; fwd+bwd {t['fwd_bwd_us']:.1f} us)" if "fwd_us" in t else " (fwd+bwd)"
            lines.append(f"| {t['method']}{extra} | {us:.1f} | {gbps:.0f} | {frac:.2f} |")
        lines.append("")
    return "\n".join(lines)


def run(args, command):
    """The whole measurement (args from parser() + settle()) -> the result dict; nothing is written."""
    cuda = torch.cuda.is_available()
    if args.smoke and not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first kernel import
    elif not cuda:
        raise SystemExit("error: kernels/bench.py: no CUDA device; run with --smoke for the CPU "
                         "interpreter check")
    import triton

    from . import varlen_attention as va
    if not cuda and not va.INTERPRET:
        raise SystemExit("error: kernels/bench.py --smoke on CPU: kernels were imported before "
                         "TRITON_INTERPRET=1 was set")
    device = "cpu" if va.INTERPRET else "cuda"
    timer = Timer(device)
    torch.manual_seed(args.seed)
    t0 = time.time()
    machine = (torch.cuda.get_device_name() if device == "cuda"
               else f"CPU {platform.machine()} (Triton interpreter)")
    result = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine,
                  torch=torch.__version__, triton=triton.__version__, mode="smoke" if args.smoke else "full",
                  command=command, attention=attention_section(args, device, timer),
                  gather=gather_section(args, device, timer))
    result["seconds"] = time.time() - t0
    return result


def main(argv=None):
    """Measure and print (the markdown table, or --json); bench/kernels.py writes the same run to a
    folder."""
    argv = sys.argv[1:] if argv is None else argv
    p = parser("python -m kernels.bench")
    p.add_argument("--json", action="store_true", help="print the result as JSON, not the markdown table")
    p.add_argument("--out", help=argparse.SUPPRESS)  # moved to bench/: say where, in one line
    args = settle(p, p.parse_args(argv))
    if args.out is not None:
        raise SystemExit(f"error: kernels.bench only prints; to write the files run `python -m bench.kernels "
                         f"--out {args.out}` from the repository root")
    result = run(args, "python -m kernels.bench " + " ".join(argv))
    print(json.dumps(result, indent=2) if args.json else to_markdown(result))
    return result


if __name__ == "__main__":
    main()
