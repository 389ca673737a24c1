"""
Triton kernels for RadJEPA's packed variable-length path (optional; radjepa.py runs without them).

    __init__.py          can they run here (available), the dispatch radjepa.py calls (resolve_kernels,
                         resolve_precision, fast_ops) and disagreement(), the guard on the math
    varlen_attention.py  varlen_attention(q, k, v, cu_seqlens, max_seqlen, sm_scale=None) + _ref
    gather.py            gather_rows(x, idx, pos=None), ln_gather_smooth_l1(z, h, idx, eps, beta) + _refs
    bench.py             micro-benchmark against torch varlen_attn / padded SDPA / truncation; prints it
                         (`python -m bench.kernels --out DIR` writes it)

Each kernel file is a tutorial: docstring -> kernel -> launcher -> autograd -> PyTorch reference. The
measurement harness (whole training steps, the official code, the GPU check) lives in bench/. This package
imports nothing of the rest of the project, and only relatively inside itself, so it works as a clone's
top-level `kernels` and as `radjepa.kernels` installed. It imports no kernel module at import time:
TRITON_INTERPRET is read when @triton.jit decorates, so whoever wants the CPU interpreter must set it
before the first call that imports .varlen_attention / .gather (available(), fast_ops()).

radjepa.py's torch ops are the one definition of the math: fast_ops(check=...) hands out the kernel ops
only after disagreement() found that each reproduces the torch op it replaces on the same tensors.
"""
import importlib.util
import os


def available(head_dims=()):
    """(ok, reason): can the Triton kernels run here, for attention with these head dims?
    True on CUDA with Triton, or in the CPU interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton; it ships with CUDA builds of torch)"
    import torch
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        ok, why = True, ("TRITON_INTERPRET=1: Triton interpreter on CPU tensors (correct but very slow; "
                         "for tests)")
    elif torch.cuda.is_available():
        import triton
        ok, why = True, f"CUDA device {torch.cuda.get_device_name()} with triton {triton.__version__}"
    else:
        return False, "no CUDA device (and TRITON_INTERPRET is not set); use the PyTorch path"
    from .varlen_attention import head_dim_problem  # safe now: the interpreter choice is settled
    problems = [p for p in map(head_dim_problem, head_dims) if p]
    return (False, f"attention {problems[0]}") if problems else (ok, why)


def resolve_kernels(choice, device, head_dims=()):
    """--kernels auto|torch|triton -> bool. Never a silent fallback when triton was asked for."""
    if choice not in ("auto", "torch", "triton"):
        raise SystemExit(f"error: --kernels must be auto, torch or triton, not {choice!r}")
    if choice == "torch":
        return False
    try:  # CUDA present (or TRITON_INTERPRET=1) and these head dims supported
        ok, why = available(head_dims)
    except (ImportError, AttributeError) as e:
        ok, why = False, f"cannot import kernels/ ({e})"
    if choice == "triton" and not ok:
        raise SystemExit(f"error: --kernels triton cannot run here: {why}. Use --kernels torch (or auto).")
    if device.type == "cuda" and not ok:
        print(f"--kernels auto: using the PyTorch path ({why})")
    return ok and (choice == "triton" or device.type == "cuda")


def resolve_precision(choice, device, triton=False):
    """--precision auto|bf16|fp32 -> "bf16" or "fp32". The Triton interpreter (CPU) computes bf16 wrongly."""
    import torch
    if choice == "auto":
        try:
            native = (torch.cuda.is_bf16_supported() if device.type == "cuda" else
                      torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # an older torch without the probe: stay exact
            native = False
        choice = "bf16" if native and not (triton and device.type == "cpu") else "fp32"
    if choice == "bf16" and triton and device.type == "cpu":
        raise SystemExit("error: --precision bf16 with --kernels triton on a CPU: the Triton interpreter "
                         "computes bf16 wrongly. Use --precision fp32 (or --kernels torch)")
    return choice



def _max_rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def disagreement(kernel_ops, torch_ops, make_seqs, width, head_dims, device, dtype=None, seed=0):
    """None if every kernel op reproduces the torch op of the same name, else one line naming the first
    that does not.

    Ops use radjepa.py's OPS signatures: attention(q, k, v, seqs), gather(x, idx, pos), loss(z, h, idx).
    Both sides run on the same random tensors (model widths, a few short sequences), forward and backward,
    the torch op in fp32 and the kernel op in the training dtype (fp32 on CPU; bf16 on CUDA, where fp32
    kernels would need compiles that training never uses; or `dtype`). For the output and every gradient,
    with err(a) = max|a - torch32| / max|torch32|:
    fp32: err(kernel) <= 5e-3 (allows TF32 on the torch side);
    bf16: err(kernel) <= 3 * err(torch op run in bf16) + 1e-2 (flash-attn's rule: no worse than torch at
    the same precision; the torch op in bf16 is ~1e-2 off here).
    A changed formula (another loss, scale or position rule) moves results by whole percents or more.
    Costs one tiny call of each op (a few seconds in the CPU interpreter)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(device)

    def run(fn, inputs, diff, extra, upstream, dt):  # -> [output, grad of each diff input]
        leaves = [(t.to(dt, copy=True) if t.is_floating_point() else t.clone()).requires_grad_(i in diff)
                  for i, t in enumerate(inputs)]
        out = fn(*leaves, *[t.to(dt) if torch.is_tensor(t) else t for t in extra])
        return [out, *torch.autograd.grad(out, [leaves[i] for i in diff], upstream.to(out.dtype))]

    N, lens = 6, [5, 11, 1]  # a 6-patch image table; three sequences of different lengths (one of length 1)
    cases = [("attention", [rand(sum(lens), 2, dh) for _ in range(3)], (0, 1, 2), [make_seqs(lens, device)])
             for dh in sorted(set(head_dims))]
    perm = torch.randperm(2 * N, generator=gen)[:7].to(device)  # unique flat indices into B*N = 12 rows
    cases.append(("gather", [rand(2, N, width), perm], (0,), [rand(N, width)]))
    tgt = torch.randint(0, 2 * N, (9,), generator=gen).to(device)  # repeats allowed, like overlapping targets
    cases.append(("loss", [rand(9, width), rand(2, N, width), tgt], (0,), []))
    for name, inputs, diff, extra in cases:
        with torch.no_grad():
            upstream = rand(*torch_ops[name](*inputs, *extra).shape)  # one upstream gradient for both
        fast, ref = (run(kernel_ops[name], inputs, diff, extra, upstream, dtype),
                     run(torch_ops[name], inputs, diff, extra, upstream, torch.float32))
        same = run(torch_ops[name], inputs, diff, extra, upstream, dtype) if dtype != torch.float32 else ref
        for label, a, b, c in zip(["output"] + [f"gradient of input {i}" for i in diff], fast, ref, same):
            err, tol = _max_rel_err(a, b), (5e-3 if dtype == torch.float32 else 3 * _max_rel_err(c, b) + 1e-2)
            if not err <= tol:  # also catches NaN
                return (f"kernel op '{name}' disagrees with the torch op it replaces ("
                        f"{getattr(torch_ops[name], '__name__', name)} in radjepa.py): its {label} differs "
                        f"by {err:.1e} (relative, {str(dtype)[6:]}; allowed {tol:.1e}); make kernels/ "
                        f"compute the same thing, or run with --kernels torch")
    return None


def fast_ops(reference, make_seqs, check=None):
    """The kernel ops under radjepa.py's OPS names and signatures -> dict(attention=, gather=, loss=).
    reference: the torch ops they replace (same names); make_seqs(lens, device) builds the packing object
    whose .cu / .max_len the attention reads (radjepa.Seqs). check = dict(width=, head_dims=, device=):
    first run disagreement(), and stop with its one line if a kernel op does not reproduce its torch op."""
    from .gather import gather_rows, ln_gather_smooth_l1
    from .varlen_attention import varlen_attention
    fast = dict(attention=lambda q, k, v, s: varlen_attention(q, k, v, s.cu, s.max_len), gather=gather_rows,
                loss=ln_gather_smooth_l1)
    if bad := check and disagreement(fast, reference, make_seqs, **check):
        raise SystemExit(f"error: {bad}")
    return fast
