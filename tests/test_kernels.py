"""
Tests for kernels/: Triton varlen attention and token gathers against float64 PyTorch references.

Without a GPU they run in the Triton interpreter (TRITON_INTERPRET=1 must be set before any kernel import; the
guard below does it if tests/conftest.py has not). Tolerance rule (flash-attn's): for every output and gradient,
    max|kernel - ref64| <= 2 * max|torch_same_dtype - ref64| + atol[dtype]
Outputs are poisoned with NaN before the kernels run (module flag POISON), so an element a kernel forgot to write
fails. Run:  TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_kernels.py -q   (~30-60 s on 2 CPU cores)
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import available  # noqa: E402
from kernels import gather as ga  # noqa: E402
from kernels import varlen_attention as va  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and not va.INTERPRET else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 5e-3}
if DEV == "cuda":  # fp32 dots run input_precision="ieee" (exact products); exp2 is the approximate ex2.approx.f32
    ATOL[torch.float32] = 2e-5


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(va, "POISON", True)
    monkeypatch.setattr(ga, "POISON", True)
    # value checks (cu_seqlens, index ranges) only run by default for CPU tensors; tests want them on a GPU too
    monkeypatch.setattr(va, "CHECK_VALUES", True)
    monkeypatch.setattr(ga, "CHECK_VALUES", True)


def cu_from_lens(lens):
    return F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32).to(DEV)


def assert_close_rule(name, got, ref_same_dtype, ref64, atol):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element?)"
    err = (got.double() - ref64).abs().max().item()
    err_torch = (ref_same_dtype.double() - ref64).abs().max().item()
    if va.INTERPRET and got.dtype == torch.bfloat16:
        # the interpreter casts fp32 -> bf16 toward zero (kernels.md pitfall 2): up to 1 ulp where torch's
        # round-to-nearest-even is off by at most 1/2 ulp; allow that one extra ulp of the largest value
        atol += 2.0 ** -7 * 2.0 ** torch.floor(torch.log2(ref64.abs().max())).item()
    assert err <= 2 * err_torch + atol, f"{name}: err {err:.3e} > 2 * torch err {err_torch:.3e} + {atol:.0e}"


# ----------------------------------------------------------------------------------------------------------------
# varlen attention
# ----------------------------------------------------------------------------------------------------------------

def run_attention(fn, qkv64, g64, cu, max_len, dtype, **kw):
    """Forward + backward through strided q, k, v views of one [T, 3, H, Dh] tensor; returns (o, dqkv)."""
    qkv = qkv64.to(dtype).requires_grad_()
    q, k, v = qkv.unbind(1)  # non-contiguous views, as radjepa's fused qkv projection produces them
    o = fn(q, k, v, cu, max_len, **kw)
    (dqkv,) = torch.autograd.grad(o, qkv, g64.to(dtype))
    return o, dqkv


# The full irregular mix (1, 7, 33, 129, 197: lengths 1, sub-tile, several tiles with ragged ends) in fp32; smaller
# mixes for fp16/bf16 to keep the interpreter time down. (64, 32) also exercises BLOCK_M != BLOCK_N. Head dims 24
# (vit_large's predictor, 384/16) and 8 are padded to 32 / 16 lanes inside the kernels. atomic = the backward's
# atomic-dQ variant (one program per key tile) instead of the deterministic one (one program per sequence and head).
ATTN_CASES = [
    (torch.float32, 32, [1, 7, 33, 129, 197], (64, 64), False),
    (torch.float32, 64, [197, 1, 33, 129, 7], (64, 32), False),
    (torch.float16, 32, [33, 1, 70], (64, 64), False),
    (torch.float16, 64, [7, 129], (64, 64), False),
    (torch.bfloat16, 32, [70, 1, 33], (64, 64), False),
    (torch.bfloat16, 64, [129, 7], (64, 64), False),
    (torch.float32, 24, [1, 40, 70], (32, 32), False),
    (torch.bfloat16, 24, [33, 5], (32, 32), False),
    (torch.float16, 8, [20, 3], (16, 16), False),
    (torch.float32, 32, [1, 7, 33, 129], (32, 32), True),
    (torch.float16, 24, [70, 1, 33], (32, 32), True),
]


@pytest.mark.parametrize("dtype,dh,lens,blocks,atomic", ATTN_CASES,
                         ids=[f"{str(c[0])[6:]}-dh{c[1]}-{len(c[2])}seqs{'-atomic' if c[4] else ''}"
                              for c in ATTN_CASES])
def test_varlen_attention_matches_reference(dtype, dh, lens, blocks, atomic, monkeypatch):
    monkeypatch.setattr(va, "ATOMIC_DQ", atomic)
    torch.manual_seed(0)
    H, cu, max_len = 2, cu_from_lens(lens), max(lens)
    qkv64 = torch.randn(sum(lens), 3, H, dh, dtype=torch.float64, device=DEV)
    g64 = torch.randn(sum(lens), H, dh, dtype=torch.float64, device=DEV)
    o, dqkv = run_attention(va.varlen_attention, qkv64, g64, cu, max_len, dtype, block_m=blocks[0],
                            block_n=blocks[1])
    o_t, dqkv_t = run_attention(va.varlen_attention_ref, qkv64, g64, cu, max_len, dtype)
    o64, dqkv64 = run_attention(va.varlen_attention_ref, qkv64, g64, cu, max_len, torch.float64)
    assert o.dtype == dtype and o.shape == o64.shape
    assert_close_rule("o", o, o_t, o64, ATOL[dtype])
    for i, name in enumerate("qkv"):
        assert_close_rule(f"d{name}", dqkv[:, i], dqkv_t[:, i], dqkv64[:, i], ATOL[dtype])


def test_varlen_attention_length_one_sequences_and_custom_scale():
    # all sequences of length 1: each token attends only to itself, so o == v
    lens = [1, 1, 1]
    qkv = torch.randn(3, 3, 2, 16, device=DEV, requires_grad=True)
    q, k, v = qkv.unbind(1)
    o = va.varlen_attention(q, k, v, cu_from_lens(lens), 1)
    # exact in the interpreter; a GPU's exp2 and division are approximate instructions (ex2.approx, div.full): a
    # couple of fp32 ulps there (fp32 dots are "ieee", not TF32, so no 1e-3 errors)
    ulps = dict(atol=0, rtol=0 if DEV == "cpu" else 3e-7)
    torch.testing.assert_close(o, v, **ulps)
    (d,) = torch.autograd.grad(o.sum(), qkv)
    torch.testing.assert_close(d[:, 2], torch.ones_like(d[:, 2]), **ulps)  # dv = p * do = do
    # dq = dk = p * (do.v - delta) * ... with delta = o.do = v.do: zero up to fp32 rounding of the two dot products
    torch.testing.assert_close(d[:, :2], torch.zeros_like(d[:, :2]), atol=1e-6, rtol=0)
    # a non-default softmax scale, contiguous (not strided) inputs
    lens = [5, 20]
    q, k, v = (torch.randn(25, 2, 16, device=DEV) for _ in range(3))
    o = va.varlen_attention(q, k, v, cu_from_lens(lens), 20, sm_scale=0.3)
    torch.testing.assert_close(o, va.varlen_attention_ref(q, k, v, cu_from_lens(lens), sm_scale=0.3),
                               atol=1e-5, rtol=1e-5)


def test_varlen_attention_backward_is_deterministic(monkeypatch):
    monkeypatch.setattr(va, "ATOMIC_DQ", False)  # the default; the atomic variant is not (on a GPU)
    torch.manual_seed(1)
    lens = [40, 90, 3]
    qkv64, g64 = torch.randn(133, 3, 2, 32, dtype=torch.float64), torch.randn(133, 2, 32, dtype=torch.float64)
    runs = [run_attention(va.varlen_attention, qkv64.to(DEV), g64.to(DEV), cu_from_lens(lens), 90, torch.float16)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_varlen_attention_rejects_bad_arguments():
    q = torch.randn(10, 2, 32, device=DEV)
    cu = cu_from_lens([4, 6])
    bad = [
        (dict(q=q.double(), k=q.double(), v=q.double()), "dtype"),
        (dict(cu_seqlens=cu.long()), "int32"),
        (dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=DEV)), "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32, device=DEV)), "end at"),
        (dict(max_seqlen=5), "max_seqlen"),
        (dict(q=torch.randn(10, 2, 160, device=DEV), k=torch.randn(10, 2, 160, device=DEV),
              v=torch.randn(10, 2, 160, device=DEV)), "head dim 160"),
        (dict(k=torch.randn(10, 3, 32, device=DEV)), "shapes differ"),
        (dict(v=q.half()), "dtypes differ"),
        (dict(q=torch.randn(10, 2, 64, device=DEV)[..., ::2]), "contiguous head dim"),
        (dict(block_m=48), "power of two"),
    ]
    for override, msg in bad:
        kw = dict(q=q, k=q, v=q, cu_seqlens=cu, max_seqlen=6)
        kw.update(override)
        with pytest.raises(ValueError, match=msg):
            va.varlen_attention(**kw)


def test_launch_grids_put_sequences_times_heads_on_axis_0(monkeypatch):
    # CUDA caps grid axes 1 and 2 at 65,535: ViT-B's predictor at a per-GPU batch of 1,366 has 4 * 1366 sequences
    # x 12 heads = 65,568 (sequence, head) pairs, which must go on axis 0 (2^31 - 1)
    S, H = 4 * 1366, 12
    assert va._grid(S, H, 200, 64) == (S * H, 4) and S * H > va.MAX_GRID_YZ
    assert va._grid(4 * 1024, 16, 200, 16) == (4 * 1024 * 16, 13)  # vit_large, the smallest tile
    with pytest.raises(ValueError, match="tiles"):
        va._grid(1, 1, 16 * (va.MAX_GRID_YZ + 1), 16)
    # ... and every launch uses it: record the grids of a forward and both backward variants
    seen = []
    monkeypatch.setattr(va, "_grid", lambda *a: seen.append(a) or va_grid(*a))
    lens = [3, 20]
    for atomic in (False, True):
        monkeypatch.setattr(va, "ATOMIC_DQ", atomic)
        qkv = torch.randn(23, 3, 3, 16, device=DEV, requires_grad=True)
        va.varlen_attention(*qkv.unbind(1), cu_from_lens(lens), 20, block_m=16, block_n=16).sum().backward()
    # (S, H, length covered by the grid, tile): fwd over query tiles, bwd one program per (sequence, head) or per
    # (sequence, head, key tile)
    assert seen == [(2, 3, 20, 16), (2, 3, 1, 16), (2, 3, 20, 16), (2, 3, 20, 16)]


va_grid = va._grid


def test_kernels_are_registered_custom_ops_that_pass_opcheck():
    # schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch.compile will use them
    from torch.library import opcheck
    lens, H, dh = [3, 17], 2, 24
    cu = cu_from_lens(lens)
    q, k, v = (torch.randn(20, H, dh, device=DEV, requires_grad=True) for _ in range(3))
    opcheck(torch.ops.radjepa.varlen_attn_fwd.default, (q, k, v, cu, 17, 0.2, 16, 16))
    o, lse = torch.ops.radjepa.varlen_attn_fwd(q, k, v, cu, 17, 0.2, 16, 16)
    for atomic in (False, True):
        opcheck(torch.ops.radjepa.varlen_attn_bwd.default,
                (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), cu, 17, 0.2,
                 16, 16, atomic))
    x = torch.randn(2, 10, 32, device=DEV, requires_grad=True)
    idx = torch.tensor([3, 17, 0, 11], device=DEV)
    pos = torch.randn(10, 32, device=DEV)
    for p in (pos, None):
        opcheck(torch.ops.radjepa.gather_rows.default, (x, idx, p))
    opcheck(torch.ops.radjepa.scatter_rows.default, (torch.randn(4, 32, device=DEV), idx, 2, 10, torch.bfloat16))
    z = torch.randn(4, 32, device=DEV, requires_grad=True)
    for write_grad in (True, False):
        opcheck(torch.ops.radjepa.ln_gather_smooth_l1.default,
                (z if write_grad else z.detach(), x.detach(), idx, 1e-5, 1.0, write_grad))


def test_compiled_graph_holds_the_kernels_without_breaks():
    # one compiled frame with two attention calls with grad, a gather and the loss: fullgraph=True fails on any graph
    # break; backend aot_eager runs Dynamo + AOTAutograd (fake tensors, the registered backward) without a C compiler
    lens = [5, 9, 2]
    cu, T, H, dh = cu_from_lens(lens), sum(lens), 2, 16
    x = torch.randn(2, 8, H * dh, device=DEV, requires_grad=True)
    pos = torch.randn(8, H * dh, device=DEV)
    idx = torch.randperm(16, device=DEV)[:T]
    h = torch.randn(2, 8, H * dh, device=DEV)

    def step(x, max_len):
        t = ga.gather_rows(x, idx, pos)
        for _ in range(2):
            q, k, v = t.view(T, H, dh), (t * 2).view(T, H, dh), t.view(T, H, dh)
            t = t + va.varlen_attention(q, k, v, cu, max_len, block_m=16, block_n=16).reshape(T, H * dh)
        return ga.ln_gather_smooth_l1(t, h, idx)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    loss = compiled(x, max(lens))
    (g,) = torch.autograd.grad(loss, x)
    loss_e = step(x, max(lens))
    (g_e,) = torch.autograd.grad(loss_e, x)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, g_e)


# ----------------------------------------------------------------------------------------------------------------
# gathers
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,with_pos", [(192, True), (768, False)])
def test_gather_rows_forward_and_scatter_backward_exact(dtype, D, with_pos):
    torch.manual_seed(0)
    B, N = 3, 49
    x = torch.randn(B, N, D, device=DEV, dtype=dtype, requires_grad=True)
    pos = torch.randn(N, D, device=DEV, dtype=dtype) if with_pos else None  # same dtype as radjepa's buffers
    idx = torch.randperm(B * N, device=DEV)[:101]  # T=101: not a multiple of the rows per program
    for index in (idx, idx.int()):
        out = ga.gather_rows(x, index, pos)
        assert out.dtype == dtype and out.shape == (101, D)
        if pos is None:  # a pure copy: bit-exact
            assert torch.equal(out, ga.gather_rows_ref(x, idx))
        else:  # the kernel adds in fp32 and rounds once, like torch; the interpreter's rounding is toward zero
            ref = ga.gather_rows_ref(x, idx, pos)  # pitfall 2), so allow 1 ulp there and demand exactness on GPU
            ulp = {torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
            torch.testing.assert_close(out, ref, atol=0, rtol=ulp if va.INTERPRET else 0)
        g = torch.randn_like(out)
        (dx,) = torch.autograd.grad(out, x, g)
        (dx_ref,) = torch.autograd.grad(ga.gather_rows_ref(x, idx, pos), x, g)
        assert torch.equal(dx, dx_ref), "scatter backward must be exact (rows not gathered stay 0)"


def test_gather_rows_mixed_dtype_pos_promotes_like_torch():
    x = torch.randn(2, 10, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(10, 64, device=DEV)
    idx = torch.tensor([3, 17, 0, 11], device=DEV)
    out, ref = ga.gather_rows(x, idx, pos), ga.gather_rows_ref(x, idx, pos)
    assert out.dtype == ref.dtype == torch.float32 and torch.equal(out, ref)
    g = torch.randn_like(out)
    (dx,), (dx_ref,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g)
    # fp32 -> bf16 cast of the gradient: the interpreter truncates (pitfall 2), torch rounds to nearest even
    torch.testing.assert_close(dx, dx_ref, atol=0, rtol=2 ** -7)


LN_CASES = [(torch.float32, 1.0), (torch.float32, 0.5), (torch.float32, 0.0), (torch.bfloat16, 1.0),
            (torch.bfloat16, 0.0), (torch.float16, 1.0)]


@pytest.mark.parametrize("dtype,beta", LN_CASES, ids=[f"{str(d)[6:]}-beta{b}" for d, b in LN_CASES])
def test_ln_gather_smooth_l1_matches_reference(dtype, beta):
    torch.manual_seed(0)
    B, N, D, R = 2, 49, 768, 4 * 37  # R = 148 rows: not a multiple of the rows per program
    h64 = torch.randn(B, N, D, dtype=torch.float64, device=DEV) * 2 + 0.5
    z64 = torch.randn(R, D, dtype=torch.float64, device=DEV)
    idx = torch.randint(0, B * N, (R,), device=DEV)  # repeats allowed: I-JEPA target blocks may overlap

    def run(fn, dt):
        z = z64.to(dt).requires_grad_()
        loss = fn(z, h64.to(dt), idx, beta=beta)
        (dz,) = torch.autograd.grad(loss * 3.0, z)  # a non-unit grad_out
        return loss, dz

    loss, dz = run(ga.ln_gather_smooth_l1, dtype)
    loss_t, dz_t = run(ga.ln_gather_smooth_l1_ref, dtype)
    loss64, dz64 = run(ga.ln_gather_smooth_l1_ref, torch.float64)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and dz.dtype == dtype
    assert_close_rule("loss", loss, loss_t, loss64, 1e-6)
    assert_close_rule("dz", dz, dz_t, dz64, 1e-9)  # |dz| <= 3 / (R*D) ~ 2.6e-5


def test_ln_gather_smooth_l1_without_grad_and_int32_idx():
    z, h = torch.randn(70, 192, device=DEV), torch.randn(3, 30, 192, device=DEV)
    idx = torch.randint(0, 90, (70,), device=DEV, dtype=torch.int32)
    with torch.no_grad():
        loss = ga.ln_gather_smooth_l1(z, h, idx)
    torch.testing.assert_close(loss, ga.ln_gather_smooth_l1_ref(z, h, idx.long()), atol=1e-6, rtol=1e-5)


def test_gathers_reject_bad_arguments():
    x = torch.randn(2, 5, 32, device=DEV, requires_grad=True)
    idx = torch.tensor([0, 3, 9], device=DEV)
    with pytest.raises(ValueError, match="repeat"):
        ga.gather_rows(x, torch.tensor([1, 1], device=DEV))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        ga.gather_rows(x, torch.tensor([0, 10], device=DEV))
    with pytest.raises(ValueError, match="int32/int64"):
        ga.gather_rows(x, idx.float())
    with pytest.raises(ValueError, match="no gradient"):
        ga.gather_rows(x, idx, torch.zeros(5, 32, device=DEV, requires_grad=True))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        ga.gather_rows(x, idx, torch.zeros(4, 32, device=DEV))
    with pytest.raises(ValueError, match="dtype"):
        ga.gather_rows(x.double(), idx)
    z = torch.randn(3, 32, device=DEV)
    with pytest.raises(ValueError, match="must not require grad"):
        ga.ln_gather_smooth_l1(z, x, idx)
    with pytest.raises(ValueError, match="beta"):
        ga.ln_gather_smooth_l1(z, x.detach(), idx, beta=-1.0)
    with pytest.raises(ValueError, match="one entry per row"):
        ga.ln_gather_smooth_l1(z, x.detach(), idx[:2])


def test_available_reports_a_reason():
    ok, reason = available()
    assert ok and isinstance(reason, str) and reason


# ----------------------------------------------------------------------------------------------------------------
# the GPU benchmark script, in its tiny --smoke mode (interpreter on CPU: proves it runs end to end, ~6 s)
# ----------------------------------------------------------------------------------------------------------------

def test_bench_smoke_mode_writes_json_and_markdown(tmp_path):
    """kernels/bench.py measures; bench/kernels.py (`python -m bench.kernels --out DIR`) writes the files."""
    import json

    import bench.kernels
    result = bench.kernels.main(["--smoke", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "kernels_bench.json").read_text())
    assert on_disk["mode"] == "smoke" and on_disk["attention"]["cases"]
    assert all(c["correct"] for c in result["attention"]["cases"]), result["attention"]["cases"]
    methods = [t["method"] for t in on_disk["attention"]["cases"][0]["timing"]]
    assert methods[:2] == ["ours: triton varlen", "ours: triton varlen, atomic dQ"]  # both backward variants timed
    loss_case = on_disk["gather"]["cases"][1]
    assert any("jepa_loss_torch" in t["method"] for t in loss_case["timing"]) and loss_case["speedup_vs_best_torch"] > 0
    for case in on_disk["gather"]["cases"]:
        assert all(t["fwd_bwd_us"] > 0 for t in case["timing"])
    assert on_disk["gather"]["cases"][1]["loss_abs_err_vs_fp32_ref"] < 1e-5
    assert "## Attention" in (tmp_path / "kernels_bench.md").read_text()


def test_aot_check_compiles_the_attention_kernels_for_sm90():
    # without a GPU, the next best thing: the kernels generate sm_90 code (ptxas), with no register spills in the
    # first autotune configurations; a GPU machine runs the kernels themselves instead
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the compiled kernels in the other tests")
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton wheel has no NVIDIA backend / ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "bench.aot_check", "--quick"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| fwd") or
            line.startswith("| bwd")]
    assert len(rows) == 6 and all(int(r[5]) == 0 for r in rows), out.stdout  # 0 spill bytes


# ----------------------------------------------------------------------------------------------------------------
# the room's walls: kernels/ stands on its own (a clone's `kernels`, or `radjepa.kernels` installed)
# ----------------------------------------------------------------------------------------------------------------

def test_kernels_import_nothing_of_the_project():
    """Every import in kernels/*.py is relative (inside kernels/) or of a third-party module: none of
    radjepa, plumbing, eval, data_prep or bench (bench/ imports kernels/, never the other way), and no
    absolute `kernels` import, which would pick a clone's folder, or Hugging Face's `kernels`, for the
    installed copy."""
    import ast
    import glob
    project = {"radjepa", "plumbing", "eval", "data_prep", "bench", "kernels"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "kernels", "*.py")))
    names = sorted(map(os.path.basename, files))
    assert names == ["__init__.py", "bench.py", "gather.py", "varlen_attention.py"]  # the measurement: bench/
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:  # level > 0: relative, inside kernels/
                names = [node.module]
            else:
                continue
            bad += [f"{os.path.basename(path)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] in project]
    assert not bad, bad


def test_kernel_bench_only_prints_and_its_old_out_flag_names_the_new_command(capsys):
    """kernels/bench.py writes no file (kernels/ has no writer); the old `python -m kernels.bench --out DIR`
    says in one line which command writes the files now."""
    from kernels import bench
    with pytest.raises(SystemExit, match=r"^error: .*`python -m bench.kernels --out /tmp/x`") as e:
        bench.main(["--smoke", "--out", "/tmp/x"])
    assert "\n" not in str(e.value)


def test_fast_ops_hand_out_the_kernels_only_when_they_reproduce_the_reference():
    """The dispatch radjepa.py calls (kernels.fast_ops(torch ops, Seqs, check)), here with the kernels' own
    PyTorch references as the torch ops: they agree; a changed formula (MSE for smooth-L1) stops."""
    import types

    import kernels

    def make_seqs(lens, device):  # what the attention op reads of radjepa.Seqs
        return types.SimpleNamespace(cu=cu_from_lens(lens).to(device), max_len=max(lens))

    reference = dict(attention=lambda q, k, v, s: va.varlen_attention_ref(q, k, v, s.cu),
                     gather=ga.gather_rows_ref, loss=ga.ln_gather_smooth_l1_ref)
    check = dict(width=32, head_dims=(16,), device=DEV, dtype=torch.float32)
    fast = kernels.fast_ops(reference, make_seqs, check)
    assert sorted(fast) == ["attention", "gather", "loss"] and fast["gather"] is ga.gather_rows
    assert kernels.fast_ops(reference, make_seqs) is not None  # no check: nothing is run
    mse = dict(reference, loss=lambda z, h, idx: F.mse_loss(z, F.layer_norm(h.flatten(0, 1)[idx], (32,))))
    with pytest.raises(SystemExit, match="^error: kernel op 'loss' disagrees"):
        kernels.fast_ops(mse, make_seqs, check)
