"""
Fused attention over packed variable-length sequences (FlashAttention-2 algorithm) in Triton.

Why this kernel exists
----------------------
In I-JEPA every image keeps a different number of context patches (25-129 on a 14x14 grid), and the predictor
sees 4 sequences per image of length K_ctx + K_tgt. The official code truncates every context to the shortest
one in the batch (37% of context tokens thrown away at B=128); padding to the longest one wastes ~40% of the
attention FLOPs instead. Here every sequence keeps all of its tokens and no FLOP is spent on padding.

Layout: packed tokens + cu_seqlens (not padding + key mask)
-----------------------------------------------------------
    q, k, v : [T, H, Dh]   the tokens of S sequences laid end to end (T = sum of lengths)
    cu_seqlens: int32 [S+1] cu[0] = 0, cu[s+1] - cu[s] = length of sequence s, cu[S] = T
  * no padding FLOPs and no padding memory: a program only visits tiles of its own sequence;
  * the same layout as FlashAttention-2's `flash_attn_varlen_func` and torch's `varlen_attn`, so either can be
    the oracle / drop-in replacement;
  * q, k, v may be strided views `qkv.view(T, 3, H, Dh).unbind(1)` of one fused qkv projection: the kernel takes
    (token, head) strides and only needs the head dim to be contiguous, so nothing is copied or transposed.

Algorithm (FlashAttention-2, non-causal, one softmax per sequence)
------------------------------------------------------------------
forward, grid (S*H, cdiv(max_seqlen, BLOCK_M)): one program = one tile of BLOCK_M queries of one (sequence, head).
    It streams the keys of its sequence in BLOCK_N tiles with the online softmax (running max m, running sum l,
    exp2 with log2(e) folded into the scale) and writes O and LSE = m + log2(l) (fp32, base 2, [H, T]).
    2 tile-GEMMs per (query tile, key tile): S = Q K^T and O += P V.
backward:
    1. delta[h, t] = sum_d O*dO                                   (one cheap elementwise kernel)
    2. one kernel; a program owns key tiles of one (sequence, head), keeps K, V, dK, dV in registers and loops
       over the query tiles of its sequence, recomputing the probabilities from the saved LSE:
           P^T = exp2(K Q^T * scale - LSE)          (the scale and the LSE subtraction are one FMA per element)
           dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T * (dP^T - delta),  dK += dS^T Q,  dQ[tile] += dS K
       = 5 tile-GEMMs (FlashAttention-2's count; backward = 2.5 x forward). dQ is summed over the key tiles in an
       fp32 buffer, in one of two ways (`atomic_dq`):
         False (default): one program per (sequence, head) walks all of its key tiles in a fixed order and adds
                into dQ with plain load + store: bit-for-bit deterministic, no atomics. Parallelism is S*H
                programs (1,536 for ViT-B at B=128, 6,144 in its predictor), plenty at I-JEPA lengths.
         True:  grid (S*H, key tiles), partial dQ sums meet in fp32 atomic adds: more programs for long
                sequences or small batches, but the summation order (and the last bits of dQ) vary run to run.
       (The earlier version used a separate dQ kernel that recomputed Q K^T and dO V^T: 7 GEMMs, 3.5 x fwd.)
Every load is masked (rows >= length read 0, keys >= length get score -inf), so any length >= 1 works, not only
multiples of the block size. A program whose tile starts past its sequence's end returns at once.
Grids put S*H on axis 0 (up to 2^31 - 1 programs); CUDA caps axes 1 and 2 at 65,535, which S*H passes already
for ViT-B at a per-GPU batch of ~1,366 (12 heads x 4 target blocks). Axis 1 only counts tiles of one sequence.

Head dims that are not a power of two
-------------------------------------
`tl.arange` needs a power of two and `tl.dot` needs K >= 16, so the head dim is padded in registers to
BLOCK_D = max(16, next_pow2(Dh)) and masked: padded lanes load 0 (adding 0 to every dot product) and are never
stored. vit_large's predictor (384 / 16 = 24) runs on 32 lanes, 33% more attention-GEMM work; nothing in memory
is padded.

Constraints
-----------
  * fp32 / fp16 / bf16; q, k, v the same dtype; 1 <= Dh <= 128; head dim contiguous (stride 1).
  * fp32 inputs run `tl.dot(..., input_precision="ieee")` on a GPU (Triton's default, TF32, rounds the inputs to 10
    mantissa bits, ~1e-3 error): fp32 is a checking dtype here, so it should be exact, not fast. fp16/bf16 run
    on the tensor cores as usual.
  * Value checks on cu_seqlens (monotone, cu[-1] == T, max_seqlen >= longest) need a device->host copy, so they
    run for CPU tensors always and for CUDA tensors only with RADJEPA_CHECK_KERNEL_ARGS=1. A too-small max_seqlen
    on CUDA without checks leaves rows of O unwritten.
  * The ops are registered with torch.library (`radjepa::varlen_attn_fwd`, `radjepa::varlen_attn_bwd`) with fake
    implementations and a registered autograd formula, so torch.compile sees one opaque op per call instead of
    tracing into the launcher (or into the CPU interpreter).

Tested with triton 3.7.1 + torch 2.13.0 in the Triton interpreter (TRITON_INTERPRET=1, CPU) only; the compiled
GPU path has not run yet (see kernels/bench.py).

Caution: the interpreter's bf16 arithmetic is wrong (bf16 is held as raw uint16 bits), so when interpreting bf16
the kernels upcast every loaded tile to fp32 (UPCAST). On a GPU the tiles stay bf16/fp16 for the tensor cores.
The interpreter also rounds fp32->bf16 toward zero, so interpreted bf16 outputs may differ by 1 ulp.
Credits: algorithm from FlashAttention-2 (Dao, 2023) and Triton tutorial 06; code written from scratch.
"""
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# The interpreter flag is read when @triton.jit decorates, so it must be set before this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
# Value checks that need a device->host sync (see "Constraints"); always on for CPU tensors.
CHECK_VALUES = os.environ.get("RADJEPA_CHECK_KERNEL_ARGS", "0") == "1"
# Backward dQ strategy (see "Algorithm"): False = deterministic, True = fp32 atomics. Per call: atomic_dq=...
ATOMIC_DQ = os.environ.get("RADJEPA_ATTN_ATOMIC_DQ", "0") == "1"
# Test hook: fill every output buffer with NaN before the kernels run, so an element a kernel forgot to write
# shows up as NaN instead of as whatever torch.empty happened to return.
POISON = False

MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)); exp2 is the native instruction
MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 allows 2^31 - 1)


def head_dim_problem(dh):
    """None if the kernels support head dim `dh`, else the reason (one line)."""
    return None if 1 <= dh <= MAX_HEAD_DIM else f"head dim {dh} unsupported (need 1 <= Dh <= {MAX_HEAD_DIM})"


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU, qk_scale,  # qk_scale = sm_scale * log2(e)
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
              T, H, LEN_BUCKET,  # LEN_BUCKET: only an autotune key (next pow2 of max_seqlen)
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    # -- stage 0: which (sequence, head, query tile) am I? -------------------------------------------------------
    seq = tl.program_id(0) // H
    head = tl.program_id(0) % H
    pid_m = tl.program_id(1)
    start = tl.load(CU + seq).to(tl.int64)  # first token of my sequence in the packed T axis
    L = tl.load(CU + seq + 1).to(tl.int64) - start  # its length
    if pid_m * BLOCK_M >= L:  # grid is sized for the longest sequence; shorter ones have spare tiles
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions inside the sequence
    offs_d = tl.arange(0, BLOCK_D)  # head-dim lanes; lanes >= HEAD_DIM are padding (read 0, never stored)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < L

    # -- stage 1: load my query tile [BLOCK_M, BLOCK_D] (rows past the end read 0 and are never stored) ----------
    q = tl.load(Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the (base-2) scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running unnormalised output

    # -- stage 2: stream the key/value tiles of my sequence with the online softmax ------------------------------
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        kv_rows = (start + offs_n)[:, None]
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + kv_rows * stride_kt + head * stride_kh + offs_d[None, :], mask=mask_nd, other=0.0)
        v = tl.load(V + kv_rows * stride_vt + head * stride_vh + offs_d[None, :], mask=mask_nd, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N] log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))  # keys past the end (or of the next sequence) get weight 0
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds >= 1 valid key
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max (0 on 1st tile)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # P in the input dtype -> tensor-core GEMM
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    # -- stage 3: normalise, store O and the log-sum-exp the backward pass needs ----------------------------------
    o = acc / l_i[:, None]
    tl.store(O + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + head * T + start + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, T,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    # delta[h, t] = sum_d O[t, h, d] * dO[t, h, d]  (= rowsum(P * dP), the softmax-backward correction term)
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + offs_t[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + offs_t[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * T + offs_t, delta, mask=offs_t < T)


@triton.jit
def _attn_bwd(Q, K, V, DO, LSE, DELTA, DQ32, DK, DV, CU, qk_scale, sm_scale,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
              stride_dkt, stride_dkh, stride_dvt, stride_dvh, T, H, LEN_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    # -- stage 0: which (sequence, head), and which of its key tiles? --------------------------------------------
    seq = tl.program_id(0) // H
    head = tl.program_id(0) % H
    start = tl.load(CU + seq).to(tl.int64)
    L = tl.load(CU + seq + 1).to(tl.int64) - start
    if ATOMIC_DQ:  # one key tile per program (grid axis 1); dQ partial sums meet in fp32 atomics
        n_lo = tl.program_id(1) * BLOCK_N
        if n_lo >= L:
            return
        n_hi = n_lo + 1  # the loop below runs exactly once
    else:  # every key tile of the sequence, in order, in this one program: dQ adds in a fixed order
        n_lo = 0
        n_hi = L
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    # DQ32 is a contiguous fp32 [T, H, HEAD_DIM] buffer, zeroed by the launcher
    for start_n in range(n_lo, n_hi, BLOCK_N):
        # -- stage 1: my K and V tiles stay in registers while I loop over the query tiles --------------------
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_nd = (offs_n < L)[:, None] & mask_d[None, :]
        k = tl.load(K + (start + offs_n)[:, None] * stride_kt + head * stride_kh + offs_d[None, :],
                    mask=mask_nd, other=0.0)
        v = tl.load(V + (start + offs_n)[:, None] * stride_vt + head * stride_vh + offs_d[None, :],
                    mask=mask_nd, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        # -- stage 2: every query tile of my sequence; transposed scores [BLOCK_N, BLOCK_M]; 5 tile-GEMMs ------
        for start_m in range(0, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < L
            mask_md = mask_m[:, None] & mask_d[None, :]
            q_rows = (start + offs_m)[:, None]
            q = tl.load(Q + q_rows * stride_qt + head * stride_qh + offs_d[None, :], mask=mask_md, other=0.0)
            do = tl.load(DO + q_rows * stride_dot + head * stride_doh + offs_d[None, :], mask=mask_md, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + head * T + start + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + head * T + start + offs_m, mask=mask_m, other=0.0)
            # recompute the probabilities from the saved LSE instead of storing the L x L matrix
            pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse[None, :])  # 1
            pT = tl.where(mask_m[None, :], pT, 0.0)  # queries past the end contribute nothing
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)  # 2: dV = P^T dO
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # 3: (dO V^T)^T
            dsT = pT * (dpT - delta[None, :])  # softmax backward: dS = P * (dP - delta)
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)  # 4: dK = dS^T Q (scaled below)
            dq = tl.dot(tl.trans(dsT).to(k.dtype), k, input_precision=DOT_PREC) * sm_scale  # 5: dS K, [BM, BD]
            dq_ptrs = DQ32 + q_rows * (H * HEAD_DIM) + head * HEAD_DIM + offs_d[None, :]
            if ATOMIC_DQ:
                tl.atomic_add(dq_ptrs, dq, mask=mask_md)
            else:  # only this program touches these rows of this head: a plain read-modify-write is race-free
                tl.store(dq_ptrs, tl.load(dq_ptrs, mask=mask_md, other=0.0) + dq, mask=mask_md)
                tl.debug_barrier()  # the next key tile's read of these rows may run on other threads of the CTA

        # -- stage 3: store dK, dV (rows past the end are masked off) -----------------------------------------
        tl.store(DK + (start + offs_n)[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=mask_nd)
        tl.store(DV + (start + offs_n)[:, None] * stride_dvt + head * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=mask_nd)


# On a GPU pick block sizes per (head dim, length bucket, dtype). Not in the interpreter: multi-config autotune
# benchmarks through the GPU driver and fails there. The forward only *writes* its outputs, so re-running it while
# tuning is harmless; the backward accumulates into DQ32, so each of its configs zeroes DQ32 first (a Config
# pre_hook also runs before the final launch, unlike autotune's reset_to_zero in older Triton versions).
# (outer tile = the one a program owns, inner tile = the one it loops over, num_warps, num_stages)
_TILES = [(64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3)]
# The backward holds K, V, dK, dV and the five products of a tile pair at once: mostly 8 warps and 32-query inner
# tiles. Compiled for sm_90 ahead of time (ptxas -v, bf16, Dh 64): the first four spill no registers in either dQ
# variant; 4-warp versions of them and 64x64 (deterministic variant) spill 100-2000 bytes.
_BWD_TILES = [(64, 32, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (64, 16, 4, 2)]


def _zero_dq32(nargs):
    nargs["DQ32"].zero_()


def _configs(outer_name, inner_name, tiles, pre_hook=None):
    return [triton.Config({outer_name: bo, inner_name: bi}, num_warps=w, num_stages=st, pre_hook=pre_hook)
            for bo, bi, w, st in tiles]


if not INTERPRET:
    _attn_fwd_tuned = triton.autotune(_configs("BLOCK_M", "BLOCK_N", _TILES),
                                      key=["HEAD_DIM", "LEN_BUCKET"])(_attn_fwd)
    _attn_bwd_tuned = triton.autotune(_configs("BLOCK_N", "BLOCK_M", _BWD_TILES, _zero_dq32),
                                      key=["HEAD_DIM", "LEN_BUCKET", "ATOMIC_DQ"])(_attn_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (loud argument checks), registered as torch.library ops with autograd
# ----------------------------------------------------------------------------------------------------------------

def _alloc(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device) if POISON else torch.empty(
        shape, dtype=dtype, device=device)


def _check_args(q, k, v, cu_seqlens, max_seqlen, block_m, block_n):
    """Metadata checks only (dtype, shape, device): cheap, and traceable by torch.compile."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"varlen_attention: {name} must be a [T, H, Dh] tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"varlen_attention: {name} has dtype {t.dtype}; supported: fp32, fp16, bf16")
        if t.stride(2) != 1:
            raise ValueError(f"varlen_attention: {name} must have a contiguous head dim (stride(2) == 1), "
                             f"got strides {tuple(t.stride())}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"varlen_attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"varlen_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    problem = head_dim_problem(q.shape[2])
    if problem:
        raise ValueError(f"varlen_attention: {problem}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 2:
        raise ValueError("varlen_attention: cu_seqlens must be a 1-D int32 tensor [S+1] with S >= 1, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    devices = {t.device for t in (q, k, v, cu_seqlens)}
    if len(devices) != 1:
        raise ValueError(f"varlen_attention: q, k, v, cu_seqlens are on different devices: {devices}")
    if not INTERPRET and q.device.type != "cuda":
        raise ValueError("varlen_attention: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "import, to run the slow CPU interpreter); use varlen_attention_ref on CPU")
    if not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 1:
        raise ValueError(f"varlen_attention: max_seqlen must be a positive int, got {max_seqlen!r}")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b is not None and (b < 16 or b & (b - 1)):
            raise ValueError(f"varlen_attention: {name}={b} must be a power of two >= 16")


def _check_values(q, cu_seqlens, max_seqlen):
    """Checks that read cu_seqlens' values: a device->host copy on CUDA, so only with RADJEPA_CHECK_KERNEL_ARGS=1."""
    if CHECK_VALUES or cu_seqlens.device.type == "cpu":
        cu = cu_seqlens.cpu()
        lens = cu[1:] - cu[:-1]
        if cu[0] != 0 or cu[-1] != q.shape[0] or bool((lens < 0).any()):
            raise ValueError(f"varlen_attention: cu_seqlens must start at 0, be non-decreasing and end at "
                             f"T={q.shape[0]}; got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''} "
                             f"(last {int(cu[-1])})")
        if int(lens.max()) > max_seqlen:
            raise ValueError(f"varlen_attention: max_seqlen={max_seqlen} < longest sequence {int(lens.max())}")


def _grid(S, H, max_seqlen, block):
    """(S*H, tiles per sequence): the big dimension on axis 0, which CUDA allows up to 2^31 - 1."""
    grid = (S * H, triton.cdiv(max_seqlen, block))
    if grid[1] > MAX_GRID_YZ:  # only for sequences of > 1M tokens
        raise ValueError(f"varlen_attention: max_seqlen={max_seqlen} needs {grid[1]} tiles > {MAX_GRID_YZ}")
    return grid


def _strides(t):
    return t.stride(0), t.stride(1)


def _meta(q):
    Dh = q.shape[2]
    return dict(HEAD_DIM=Dh, BLOCK_D=max(16, triton.next_power_of_2(Dh)),
                UPCAST=INTERPRET and q.dtype == torch.bfloat16,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")  # fp32: exact products (docstring)


@torch.library.custom_op("radjepa::varlen_attn_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
         sm_scale: float, block_m: Optional[int], block_n: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    _check_values(q, cu_seqlens, max_seqlen)
    T, H, Dh = q.shape
    S = cu_seqlens.numel() - 1
    o = _alloc((T, H, Dh), q.dtype, q.device)
    lse = _alloc((H, T), torch.float32, q.device)  # base-2 log-sum-exp of each query row
    args = (q, k, v, o, lse, cu_seqlens, sm_scale * LOG2E, *_strides(q), *_strides(k), *_strides(v),
            *_strides(o), T, H, triton.next_power_of_2(max_seqlen))
    if block_m is None and not INTERPRET:  # GPU default: autotuned tiles
        _attn_fwd_tuned[lambda M: _grid(S, H, max_seqlen, M["BLOCK_M"])](*args, **_meta(q))
    else:
        bm, bn = block_m or 64, block_n or 64
        _attn_fwd[_grid(S, H, max_seqlen, bm)](*args, **_meta(q), BLOCK_M=bm, BLOCK_N=bn)
    return o, lse


@_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, sm_scale, block_m, block_n):
    T, H, Dh = q.shape
    return q.new_empty((T, H, Dh)), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("radjepa::varlen_attn_bwd", mutates_args=())
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
         cu_seqlens: torch.Tensor, max_seqlen: int, sm_scale: float, block_m: Optional[int], block_n: Optional[int],
         atomic_dq: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, H, Dh = q.shape
    S = cu_seqlens.numel() - 1
    if do.stride(2) != 1:
        do = do.contiguous()
    # 1. delta = rowsum(O * dO), fp32 [H, T]
    delta = _alloc((H, T), torch.float32, q.device)
    meta = _meta(q)
    _attn_bwd_preprocess[(triton.cdiv(T, 64), H)](o, do, delta, *_strides(o), *_strides(do), T,
                                                   HEAD_DIM=Dh, BLOCK_D=meta["BLOCK_D"], BLOCK=64)
    # 2. dK, dV, and dQ summed in fp32 (zeroed here; the autotuner's config hook zeroes it again per trial)
    dk, dv = (_alloc((T, H, Dh), q.dtype, q.device) for _ in range(2))
    dq32 = torch.zeros((T, H, Dh), dtype=torch.float32, device=q.device)
    args = (q, k, v, do, lse, delta, dq32, dk, dv, cu_seqlens, sm_scale * LOG2E, sm_scale, *_strides(q),
            *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), T, H,
            triton.next_power_of_2(max_seqlen))
    if block_m is None and not INTERPRET:
        _attn_bwd_tuned[lambda M: _grid(S, H, max_seqlen if atomic_dq else 1, M["BLOCK_N"])](
            *args, **meta, ATOMIC_DQ=atomic_dq)
    else:
        bm, bn = block_m or 64, block_n or 64
        _attn_bwd[_grid(S, H, max_seqlen if atomic_dq else 1, bn)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                                     ATOMIC_DQ=atomic_dq)
    return (dq32 if q.dtype == torch.float32 else dq32.to(q.dtype)), dk, dv


@_bwd.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, sm_scale, block_m, block_n, atomic_dq):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, sm_scale, block_m, block_n = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.cfg = (max_seqlen, sm_scale, block_m, block_n)
    ctx.atomic_dq = ATOMIC_DQ


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _bwd(do, q, k, v, o, lse, cu_seqlens, *ctx.cfg, ctx.atomic_dq)
    return dq, dk, dv, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, sm_scale=None, *, block_m=None, block_n=None):
    """Non-causal attention of each token over the tokens of its own sequence.

    q, k, v: [T, H, Dh] (strided views allowed, head dim contiguous); cu_seqlens: int32 [S+1];
    max_seqlen: int >= longest sequence. Returns o [T, H, Dh] in q's dtype; differentiable in q, k, v.
    block_m / block_n: fixed tile sizes (powers of 2 >= 16); default = autotuned on GPU, 64 in the interpreter.
    The backward's dQ strategy is the module flag ATOMIC_DQ (env RADJEPA_ATTN_ATOMIC_DQ=1), read at forward time.
    """
    _check_args(q, k, v, cu_seqlens, max_seqlen, block_m, block_n)
    sm_scale = 1.0 / math.sqrt(q.shape[2]) if sm_scale is None else float(sm_scale)
    return _fwd(q, k, v, cu_seqlens, max_seqlen, sm_scale, block_m, block_n)[0]


# ----------------------------------------------------------------------------------------------------------------
# Pure-PyTorch reference (also the CPU fallback): one SDPA call per sequence
# ----------------------------------------------------------------------------------------------------------------

def varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen=None, sm_scale=None):
    """Same contract as varlen_attention, any device/dtype (float64 works), differentiable. Slow: loops over S."""
    outs = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        # [L, H, Dh] -> [1, H, L, Dh] for SDPA, then back
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=sm_scale)[0].transpose(0, 1))
    return torch.cat(outs, 0)


# ----------------------------------------------------------------------------------------------------------------
# Quick benchmark: python kernels/varlen_attention.py  (CUDA; the full comparison lives in kernels/bench.py)
# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    if not (torch.cuda.is_available() or INTERPRET):
        raise SystemExit("needs a CUDA GPU (or TRITON_INTERPRET=1 for a slow CPU check)")
    dev = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    torch.manual_seed(0)
    B, H, Dh = (128, 12, 64) if dev == "cuda" else (4, 2, 32)
    lens = torch.randint(25, 201 if dev == "cuda" else 60, (B,))
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32).to(dev)
    dt = torch.bfloat16
    qkv = torch.randn(int(lens.sum()), 3, H, Dh, device=dev, dtype=dt, requires_grad=True)
    q, k, v = qkv.unbind(1)
    o = varlen_attention(q, k, v, cu, int(lens.max()))
    err = (o.float() - varlen_attention_ref(q.float(), k.float(), v.float(), cu)).abs().max().item()
    print(f"bf16 max |o - ref32| = {err:.2e}")
    if dev == "cuda":
        flops = 4 * float((lens.double() ** 2).sum()) * H * Dh
        ms = triton.testing.do_bench(lambda: varlen_attention(q, k, v, cu, int(lens.max())), return_mode="median")
        g = torch.randn_like(o)
        ms_fb = triton.testing.do_bench(lambda: torch.autograd.grad(varlen_attention(q, k, v, cu, int(lens.max())),
                                                                    qkv, g), return_mode="median")
        print(f"fwd {ms * 1e3:.1f} us ({flops / ms * 1e-9:.1f} TFLOP/s) | "
              f"fwd+bwd {ms_fb * 1e3:.1f} us ({3.5 * flops / ms_fb * 1e-9:.1f} TFLOP/s)")
