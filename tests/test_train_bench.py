"""bench/train_bench.py (end-to-end training benchmark), bench/official_ijepa.py and bench/gpu_check.py on
CPU: the FLOP formula against torch's FLOP counter, official-style truncation, the CLI in smoke mode failing
soft, the GPU check's plumbing and its --out checks. CPU only; the timings of these runs mean nothing."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import radjepa
from bench import official_ijepa
from bench.train_bench import CONFIGS, RadjepaStepper, step_flops, truncate_masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("torch_path")   # conftest.py


def test_truncation_cuts_every_mask_to_the_batch_minimum_in_row_major_order():
    gen = torch.Generator().manual_seed(0)
    masks = [sample for sample in (radjepa.sample_masks(gen, (8, 8)) for _ in range(16))]
    cut = truncate_masks(masks)
    kc, kt = min(len(c) for c, _ in masks), min(len(t) for _, ts in masks for t in ts)
    assert kc < max(len(c) for c, _ in masks)                                 # something was really cut
    for (c, ts), (c2, ts2) in zip(masks, cut):
        assert torch.equal(c2, c[:kc]) and all(torch.equal(t2, t[:kt]) for t, t2 in zip(ts, ts2))


@pytest.mark.parametrize("path", ["truncate", "torch"])
def test_useful_flops_equal_the_matmul_flops_torch_counts(path):
    """One real training step (forward + backward) of the tiny config: torch's FLOP counter sees every mm/addmm.
    With equal lengths (truncate) attention needs no padding, so the formula's matmul part must match exactly; the
    padded torch path counts the same matmuls (padding lives inside SDPA, which the CPU counter does not see)."""
    cfg = CONFIGS["smoke"]
    st = RadjepaStepper(cfg, path, torch.device("cpu"), n_mask_batches=1)
    with FlopCounterMode(display=False) as fc:
        st.step()
    counted = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    ctx, tgt = st.tokens()
    f = step_flops(st.c.width, st.c.depth, cfg["pred_width"], cfg["pred_depth"], cfg["patch"], 36, ctx[0], tgt[0],
                   attention=False, patch_embed=False)
    assert counted["aten.mm"] + counted["aten.addmm"] == f["total"]
    full = step_flops(st.c.width, st.c.depth, cfg["pred_width"], cfg["pred_depth"], cfg["patch"], 36, ctx[0], tgt[0])
    assert full["total"] > f["total"] and full["predictor"] > f["predictor"]


def run_bench(tmp_path, *args, env=None):
    r = subprocess.run([sys.executable, "-m", "bench.train_bench", "--out", str(tmp_path)] + list(args),
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.load(open(tmp_path / "train_bench.json")), (tmp_path / "train_bench.md").read_text()


def test_smoke_rows_fail_soft_and_the_bench_goes_on(tmp_path):
    """A worker that dies hard in one row (os._exit, like a segfault) costs that row only: the next row runs in a
    fresh worker. The official row runs if third_party/ijepa is there, else says how to get it."""
    res, md = run_bench(tmp_path, "--smoke", "--paths", "torch", "truncate", "official", "--steps", "1",
                        "--warmup", "0", env={"RADJEPA_BENCH_FAULT": "truncate:exit"})
    rows = {r["path"]: r for r in res["rows"]}
    assert list(rows) == ["torch", "truncate", "official"] and res["mode"] == "smoke"
    t = rows["torch"]
    assert t["status"] == "ok" and t["img_per_s"] > 0 and t["ctx_tokens"] == t["ctx_tokens_drawn"]  # nothing cut
    assert t["useful_gflop_per_img"] > 0 and abs(sum(t["flop_share"].values()) - 1) < 1e-9
    assert rows["truncate"]["status"] == "error" and "exited with code 7" in rows["truncate"]["error"]
    off = rows["official"]
    if os.path.exists(os.path.join(official_ijepa.DEFAULT_REPO, "src", "train.py")):
        assert off["status"] == "ok" and off["ctx_tokens"] < t["ctx_tokens"], off    # official truncation
    else:
        assert off["status"] == "error" and "not found" in off["error"]
    assert "| smoke | torch (" in md and "exited with code 7" in md


def test_interleaved_rows_take_turns_in_one_process(tmp_path):
    res, _ = run_bench(tmp_path, "--device", "cpu", "--configs", "smoke", "--paths", "torch", "truncate",
                       "--steps", "2", "--warmup", "0", "--interleave", "1")
    rows = {r["path"]: r for r in res["rows"]}
    assert all(r["status"] == "ok" and len(r["ms_per_step_all"]) == 2 for r in rows.values())
    assert rows["truncate"]["ctx_tokens"] < rows["truncate"]["ctx_tokens_drawn"] == rows["torch"]["ctx_tokens"]


def test_fork_paths_train_the_fork_from_the_same_start_and_restore_radjepa():
    """The sigreg paths (a fork's step cost beside the original's) train examples/lejepa.py's objective: from the
    same weights, batch and masks the first loss is the original's plus SIGReg (> 0); --no-ema's target is then a
    copy of the encoder (momentum 0) while the original's EMA target is not; radjepa is itself again after."""
    original = radjepa.objective, radjepa.ema_update
    st = {p: RadjepaStepper(CONFIGS["smoke"], p, torch.device("cpu")) for p in ("torch", "sigreg", "sigreg-noema")}
    loss = {p: float(s.step()) for p, s in st.items()}
    assert (radjepa.objective, radjepa.ema_update) == original
    assert 0 < loss["sigreg"] - loss["torch"] < 1, loss
    same = {p: all(torch.equal(a, b) for a, b in zip(s.encoder.state_dict().values(), s.target.state_dict().values()))
            for p, s in st.items()}
    assert same == {"torch": False, "sigreg": False, "sigreg-noema": True}
    for s in st.values():
        s.close()


def test_gpu_check_smoke_writes_one_flat_folder(tmp_path):
    """The GPU check's plumbing on CPU: phantoms, two radjepa runs, the curve comparison and the summary. The
    candidate is the torch path itself here, so the curves must agree exactly."""
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(out), "--skip",
                        "kernels", "train", "--loss-steps", "6", "--candidate", "--kernels torch"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert files == ["gpu_check.log", "gpu_check.md", "loss_check.json"] and all((out / f).is_file() for f in files)
    lc = json.load(open(out / "loss_check.json"))
    assert [lc["runs"][k]["status"] for k in ("torch", "candidate")] == ["ok", "ok"]
    assert len(lc["runs"]["torch"]["losses"]) == 6 and lc["step1_rel_gap"] == 0.0 and lc["mean_rel_gap"] == 0.0
    assert "Loss curves" in (out / "gpu_check.md").read_text()


@pytest.mark.parametrize("module", ["bench.gpu_check", "bench.train_bench", "bench.kernels"])
@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_on_a_file_or_under_a_file_is_one_line_before_any_work(tmp_path, module, where):
    """Issue 22: `python -m bench.gpu_check --smoke --out F` with F a file (or F/sub) ended in a traceback."""
    f = tmp_path / "F"
    f.write_text("not a folder\n")
    out = f if where == "file" else f / "sub"
    r = subprocess.run([sys.executable, "-m", module, "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: --out {out}: cannot make it a folder "
                                             f"({'file exists' if where == 'file' else 'not a directory'})"]
    assert f.read_text() == "not a folder\n" and r.stdout == ""  # untouched; nothing ran


def test_gpu_check_failures_name_every_failed_part_case_and_row(tmp_path):
    """--strict exits 1 on any of these; gpu_check.md and the log's last line name each."""
    from bench import gpu_check
    (tmp_path / "kernels_bench.json").write_text(json.dumps({"attention": {"cases": [
        {"head_dim": 64, "correct": False}, {"head_dim": 32, "correct": True}]}}))
    (tmp_path / "train_bench.json").write_text(json.dumps({"rows": [
        {"config": "smoke", "path": "torch", "status": "ok"}, {"config": "smoke", "path": "official", "status": "error"}]}))
    s = dict(out=str(tmp_path), parts={"kernels": {"status": "ok"}, "loss curves": {"status": "failed"},
                                       "end to end": {"status": "ok"}})
    assert gpu_check.failures(s) == ["loss curves: failed", "kernels: attention head dim 64 not correct",
                                     "end to end: smoke official error"]
