"""
Token gathers for I-JEPA in Triton: the context-side gather (+ position embedding) and the fused target-side
LayerNorm + gather + smooth-L1 loss.

Why these kernels exist
-----------------------
I-JEPA's `apply_masks` uses `torch.gather`, which needs rectangular index tensors; that is the only reason the
official code truncates every context to the shortest one in the batch. With flat indices (b * N + n) into the
[B*N, D] token table, each image keeps all of its tokens and the result is directly the packed [T, D] layout that
kernels/varlen_attention.py consumes.

1. gather_rows(x, idx, pos=None) -> out [T, D]
       out[t] = x.flat[idx[t]] + pos[idx[t] % N]        x: [B, N, D], idx: int [T] into B*N, pos: [N, D] or None
   Grid cdiv(T, ROWS); each program copies ROWS rows in BLOCK_D-wide chunks (D need not be a power of 2:
   192/384/768/1024 all work, the last chunk is masked). The add runs in fp32, the store in the output dtype
   (torch's promotion of x.dtype and pos.dtype, like the reference).
   Backward = scatter dx[idx[t]] = dout[t] into zeros. Indices are unique (one context mask per image), so the
   stores never collide: no atomics, deterministic. pos is a fixed buffer and gets no gradient.

2. ln_gather_smooth_l1(z, h, idx, eps=1e-5, beta=1.0) -> scalar fp32 loss
       loss = mean over R*D of smooth_l1(z, layer_norm(h.flat[idx]) (no affine), beta)
   The target branch is no-grad, so the layer norm is only needed on the R gathered rows, never on the B*N rows
   of h. One program handles ROWS rows with the whole row in one BLOCK_D = next_pow2(D) tile (LN needs full-row
   statistics):  load h[idx] -> fp32 mean/var -> normalise -> load z -> smooth-L1 terms -> one partial sum per
   program (summed on the host in a fixed order: deterministic, no float atomics) -> and, in the same pass,
   dL/dz = clamp((z - t) / beta, -1, 1) / (R*D). Backward just returns dz * grad_out (one extra elementwise
   pass over dz: grad_out is almost always 1, but knowing that would cost a device->host sync).
   idx may repeat here (I-JEPA's 4 target blocks may overlap): h receives no gradient.

Both are registered as torch.library custom ops (`radjepa::gather_rows`, `radjepa::scatter_rows`,
`radjepa::ln_gather_smooth_l1`) with fake implementations and registered autograd, so torch.compile sees one opaque
op per call. Constraints: x/z/h fp32, fp16 or bf16; last dim contiguous; idx int32/int64 in range. The range (and, for
gather_rows, uniqueness) checks need a device->host copy, so they run for CPU tensors always and for CUDA tensors
only with RADJEPA_CHECK_KERNEL_ARGS=1. ln_gather_smooth_l1 handles D <= 8192.
Tested with triton 3.7.1 + torch 2.13.0 in the Triton interpreter (TRITON_INTERPRET=1, CPU) only; the compiled GPU
path has not run yet (see kernels/bench.py). Caution: interpreter bf16 arithmetic is wrong, so every tile is
converted to fp32 right after loading (the kernels here do fp32 math on all paths anyway).
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
CHECK_VALUES = os.environ.get("RADJEPA_CHECK_KERNEL_ARGS", "0") == "1"
POISON = False  # test hook: fill outputs with NaN before the kernels write them (see varlen_attention.py)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_LN_DIM = 8192


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _gather_rows_kernel(X, POS, IDX, OUT, T, N, D, stride_x, stride_pos, stride_out,
                        HAS_POS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # -- stage 0: my ROWS output rows and the source row of each ---------------------------------------------------
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = rows < T
    src = tl.load(IDX + rows, mask=mask_r, other=0).to(tl.int64)  # flat b * N + n
    # -- stage 1: copy the rows chunk by chunk (D need not be a power of two) ---------------------------------------
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = mask_r[:, None] & (cols[None, :] < D)
        x = tl.load(X + src[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
        if HAS_POS:  # position embedding of patch n = src % N, added in fp32
            p = tl.load(POS + (src % N)[:, None] * stride_pos + cols[None, :], mask=m, other=0.0)
            x = x.to(tl.float32) + p.to(tl.float32)
        tl.store(OUT + rows[:, None] * stride_out + cols[None, :], x.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _scatter_rows_kernel(DOUT, IDX, DX, T, D, stride_dout, stride_dx, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # backward of the gather: dx[idx[t]] = dout[t]; unique indices -> plain stores, no races
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_r = rows < T
    dst = tl.load(IDX + rows, mask=mask_r, other=0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = mask_r[:, None] & (cols[None, :] < D)
        g = tl.load(DOUT + rows[:, None] * stride_dout + cols[None, :], mask=m, other=0.0)
        tl.store(DX + dst[:, None] * stride_dx + cols[None, :], g.to(tl.float32).to(DX.dtype.element_ty), mask=m)


@triton.jit
def _ln_gather_smooth_l1_kernel(Z, HT, IDX, PARTIAL, DZ, R, D, stride_z, stride_h, stride_dz,
                                eps, beta, inv_beta, inv_numel,
                                WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # -- stage 0: my ROWS prediction rows and the target-token row each is compared with --------------------------
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    mask_r = rows < R
    src = tl.load(IDX + rows, mask=mask_r, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = mask_r[:, None] & (cols[None, :] < D)

    # -- stage 1: LayerNorm without affine of the gathered target rows (fp32 statistics, biased variance) ----------
    h = tl.load(HT + src[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(h, 1) / D
    hc = tl.where(m, h - mean[:, None], 0.0)  # masked lanes must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, 1) / D + eps)
    t = hc * rstd[:, None]  # [ROWS, BLOCK_D] target

    # -- stage 2: smooth-L1 terms and this program's partial sum -----------------------------------------------------
    z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=m, other=0.0).to(tl.float32)
    d = z - t
    ad = tl.abs(d)
    quad = ad < beta  # |d| < beta: 0.5 d^2 / beta, else |d| - beta/2 (beta = 0 -> pure L1)
    loss = tl.where(m, tl.where(quad, 0.5 * d * d * inv_beta, ad - 0.5 * beta), 0.0)
    tl.store(PARTIAL + pid, tl.sum(tl.sum(loss, 1), 0))

    # -- stage 3: dL/dz of the mean loss, written in the same pass ----------------------------------------------------
    if WRITE_GRAD:
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        g = tl.where(quad, d * inv_beta, sign) * inv_numel
        tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], g.to(DZ.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (loud argument checks) and autograd
# ----------------------------------------------------------------------------------------------------------------

def _alloc(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device) if POISON else torch.empty(
        shape, dtype=dtype, device=device)


def _check_float(fn, name, t, dims):
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        raise ValueError(f"{fn}: {name} must be a {dims}-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{fn}: {name} has dtype {t.dtype}; supported: fp32, fp16, bf16")
    if not INTERPRET and t.device.type != "cuda":
        raise ValueError(f"{fn}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import, to run "
                         f"the slow CPU interpreter); use {fn}_ref on CPU")


def _check_idx(fn, idx, device):
    """Metadata checks only: cheap, and traceable by torch.compile."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{fn}: idx must be a 1-D int32/int64 tensor, got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
    if idx.device != device:
        raise ValueError(f"{fn}: idx is on {idx.device} but the data is on {device}")


def _check_idx_values(fn, idx, n_rows, unique):
    """Range (and uniqueness) of the indices: a device->host copy on CUDA, so only with RADJEPA_CHECK_KERNEL_ARGS=1."""
    if (CHECK_VALUES or idx.device.type == "cpu") and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n_rows:
            raise ValueError(f"{fn}: idx values must lie in [0, {n_rows}), got [{lo}, {hi}]")
        if unique and torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{fn}: idx must not repeat (the backward is a plain scatter)")


def _row_tiling(D):
    """Rows per program and chunk width: ~4K elements per tile on a GPU; bigger tiles in the (slow) interpreter."""
    block_d = min(triton.next_power_of_2(D), 256)
    rows = 64 if INTERPRET else max(1, 4096 // block_d)
    return rows, block_d


# The autograd wiring is registered with torch.library (custom ops + fake implementations + register_autograd), so
# torch.compile sees one opaque op per call instead of tracing into the launchers (or the CPU interpreter).

@torch.library.custom_op("radjepa::gather_rows", mutates_args=())
def _gather_rows_op(x: torch.Tensor, idx: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    B, N, D = x.shape
    _check_idx_values("gather_rows", idx, B * N, unique=True)
    x2 = x.reshape(B * N, D)  # a view when x is contiguous
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    T = idx.numel()
    out = _alloc((T, D), _gather_dtype(x, pos), x.device)
    rows, block_d = _row_tiling(D)
    _gather_rows_kernel[(triton.cdiv(T, rows),)](
        x2, x2 if pos is None else pos, idx, out, T, N, D, x2.stride(0), 0 if pos is None else pos.stride(0),
        out.stride(0), HAS_POS=pos is not None, ROWS=rows, BLOCK_D=block_d)
    return out


@_gather_rows_op.register_fake
def _(x, idx, pos):
    return x.new_empty((idx.shape[0], x.shape[2]), dtype=_gather_dtype(x, pos))


@torch.library.custom_op("radjepa::scatter_rows", mutates_args=())
def _scatter_rows_op(dout: torch.Tensor, idx: torch.Tensor, B: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    D = dout.shape[1]
    if dout.stride(1) != 1:
        dout = dout.contiguous()
    dx = torch.zeros(B * N, D, dtype=dtype, device=dout.device)  # rows never gathered get zero grad
    rows, block_d = _row_tiling(D)
    T = idx.numel()
    _scatter_rows_kernel[(triton.cdiv(T, rows),)](dout, idx, dx, T, D, dout.stride(0), dx.stride(0),
                                                   ROWS=rows, BLOCK_D=block_d)
    return dx.view(B, N, D)


@_scatter_rows_op.register_fake
def _(dout, idx, B, N, dtype):
    return dout.new_empty((B, N, dout.shape[1]), dtype=dtype)


def _gather_setup_context(ctx, inputs, output):
    x, idx, _pos = inputs
    ctx.save_for_backward(idx)
    ctx.B, ctx.N, ctx.dtype = x.shape[0], x.shape[1], x.dtype


def _gather_backward(ctx, dout):
    (idx,) = ctx.saved_tensors
    return _scatter_rows_op(dout, idx, ctx.B, ctx.N, ctx.dtype), None, None


_gather_rows_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


def _gather_dtype(x, pos):
    return x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)


def gather_rows(x, idx, pos=None):
    """out[t] = x.flat[idx[t]] (+ pos[idx[t] % N]).  x: [B, N, D]; idx: unique int [T] into B*N; pos: [N, D]."""
    _check_float("gather_rows", "x", x, 3)
    B, N, D = x.shape
    if pos is not None:
        _check_float("gather_rows", "pos", pos, 2)
        if tuple(pos.shape) != (N, D) or pos.stride(1) != 1 or pos.device != x.device:
            raise ValueError(f"gather_rows: pos must be a [N, D] = [{N}, {D}] tensor on {x.device} with a contiguous "
                             f"last dim, got {tuple(pos.shape)} on {pos.device}")
        if pos.requires_grad:
            raise ValueError("gather_rows: pos gets no gradient here (a fixed sin-cos buffer); pass pos.detach() "
                             "or use gather_rows_ref for a learned position embedding")
    _check_idx("gather_rows", idx, x.device)
    return _gather_rows_op(x, idx, pos)


@torch.library.custom_op("radjepa::ln_gather_smooth_l1", mutates_args=())
def _ln_loss_op(z: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, eps: float, beta: float,
                write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss fp32 scalar, dL/dz [R, D] in z's dtype, or an empty tensor when write_grad is False)."""
    R, D = z.shape
    _check_idx_values("ln_gather_smooth_l1", idx, h.numel() // D, unique=False)
    h2 = h.reshape(-1, D)
    if h2.stride(1) != 1:
        h2 = h2.contiguous()
    if z.stride(1) != 1:
        z = z.contiguous()
    rows = 64 if INTERPRET else 4
    n_prog = triton.cdiv(R, rows)
    partial = _alloc((n_prog,), torch.float32, z.device)  # one partial sum per program
    dz = _alloc((R, D), z.dtype, z.device) if write_grad else z.new_empty(0)
    _ln_gather_smooth_l1_kernel[(n_prog,)](
        z, h2, idx, partial, dz if write_grad else partial, R, D, z.stride(0), h2.stride(0),
        dz.stride(0) if write_grad else 0, float(eps), float(beta), 1.0 / beta if beta > 0 else 0.0, 1.0 / (R * D),
        WRITE_GRAD=write_grad, ROWS=rows, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return partial.sum() / (R * D), dz  # fixed-order host-side reduction: deterministic


@_ln_loss_op.register_fake
def _(z, h, idx, eps, beta, write_grad):
    return z.new_empty((), dtype=torch.float32), z.new_empty(z.shape if write_grad else (0,))


def _ln_loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _ln_loss_backward(ctx, grad_loss, _grad_dz):
    (dz,) = ctx.saved_tensors
    if dz.numel() == 0 and ctx.needs_input_grad[0]:
        raise RuntimeError("ln_gather_smooth_l1: the op ran with write_grad=False, so it has no dL/dz to return")
    return dz * grad_loss, None, None, None, None, None


_ln_loss_op.register_autograd(_ln_loss_backward, setup_context=_ln_loss_setup_context)


def ln_gather_smooth_l1(z, h, idx, eps=1e-5, beta=1.0):
    """mean smooth_l1(z, layer_norm(h.flat[idx]), beta) as an fp32 scalar; gradient for z only.

    z: [R, D] predictions; h: [B, N, D] (or [B*N, D]) target-encoder output, no grad; idx: int [R] into B*N."""
    _check_float("ln_gather_smooth_l1", "z", z, 2)
    if not isinstance(h, torch.Tensor) or h.dim() not in (2, 3):
        raise ValueError(f"ln_gather_smooth_l1: h must be [B, N, D] or [B*N, D], got "
                         f"{getattr(h, 'shape', type(h).__name__)}")
    _check_float("ln_gather_smooth_l1", "h", h, h.dim())
    R, D = z.shape
    if h.shape[-1] != D or h.device != z.device:
        raise ValueError(f"ln_gather_smooth_l1: h {tuple(h.shape)} on {h.device} does not match z {tuple(z.shape)} "
                         f"on {z.device} (same last dim and device needed)")
    if D > MAX_LN_DIM:
        raise ValueError(f"ln_gather_smooth_l1: D={D} > {MAX_LN_DIM} does not fit one row tile")
    if h.requires_grad:
        raise ValueError("ln_gather_smooth_l1: h must not require grad (it is the target-encoder output); "
                         "pass h.detach()")
    if idx is None or getattr(idx, "numel", lambda: 0)() != R:
        raise ValueError(f"ln_gather_smooth_l1: idx must have one entry per row of z ({R}), got "
                         f"{getattr(idx, 'shape', None)}")
    if not (beta >= 0 and eps > 0):
        raise ValueError(f"ln_gather_smooth_l1: need beta >= 0 and eps > 0, got beta={beta}, eps={eps}")
    _check_idx("ln_gather_smooth_l1", idx, z.device)
    write_grad = z.requires_grad and torch.is_grad_enabled()  # dL/dz is written in the same pass only if needed
    return _ln_loss_op(z, h, idx, float(eps), float(beta), write_grad)[0]


# ----------------------------------------------------------------------------------------------------------------
# Pure-PyTorch references (also the CPU fallback)
# ----------------------------------------------------------------------------------------------------------------

def gather_rows_ref(x, idx, pos=None):
    B, N, D = x.shape
    out = x.reshape(B * N, D)[idx]  # [T, D]
    return out if pos is None else out + pos[idx % N]


def ln_gather_smooth_l1_ref(z, h, idx, eps=1e-5, beta=1.0):
    D = z.shape[-1]
    return F.smooth_l1_loss(z, F.layer_norm(h.reshape(-1, D)[idx], (D,), eps=eps), beta=beta)


# ----------------------------------------------------------------------------------------------------------------
# Quick benchmark: python kernels/gather.py  (CUDA; the full comparison lives in kernels/bench.py)
# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    if not (torch.cuda.is_available() or INTERPRET):
        raise SystemExit("needs a CUDA GPU (or TRITON_INTERPRET=1 for a slow CPU check)")
    dev = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    torch.manual_seed(0)
    B, N, D = (128, 196, 768) if dev == "cuda" else (4, 16, 96)
    x = torch.randn(B, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    idx = torch.randperm(B * N, device=dev)[: B * N * 2 // 5]  # ~80 kept patches per image
    out = gather_rows(x, idx, pos)
    ref = gather_rows_ref(x, idx, pos)  # bit-exact on GPU; the interpreter's bf16 rounding is toward zero
    print(f"gather_rows max |out - ref| = {(out.float() - ref.float()).abs().max().item():.1e}")
    tgt = torch.randint(0, B * N, (4 * B * N // 6,), device=dev)  # 4 target blocks of ~33 patches
    z = torch.randn(tgt.numel(), D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(B, N, D, device=dev, dtype=torch.bfloat16)
    print(f"ln_gather_smooth_l1 {ln_gather_smooth_l1(z, h, tgt).item():.6f} "
          f"ref {ln_gather_smooth_l1_ref(z.float(), h.float(), tgt).item():.6f}")
    if dev == "cuda":
        ms = triton.testing.do_bench(lambda: gather_rows(x, idx, pos), return_mode="median")
        print(f"gather_rows {ms * 1e3:.1f} us, {3 * idx.numel() * D * 2 / ms * 1e-6:.0f} GB/s")
        ms = triton.testing.do_bench(lambda: ln_gather_smooth_l1(z, h, tgt), return_mode="median")
        print(f"ln_gather_smooth_l1 (fwd + dz) {ms * 1e3:.1f} us, {3 * tgt.numel() * D * 2 / ms * 1e-6:.0f} GB/s")
