"""Tests for eval.py: metrics against hand-computed values, bootstrap and paired-test behaviour, Dice edge cases, probes
that must learn easy synthetic problems, and one end-to-end CLI run on a real tiny checkpoint and prepared set."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval as E

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


# ---------------------------------------------------------------------------------------------------- metrics by hand

def test_auroc_hand_values():
    assert E.auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0             # perfect ranking
    assert E.auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0             # inverted ranking
    # ties: pairs (pos, neg) = (.5,.1) 1, (.5,.5) 1/2, (.9,.1) 1, (.9,.5) 1 -> 3.5 / 4
    assert E.auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert E.auroc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)   # all tied -> chance
    # pos .9 .7 .6 vs neg .8 .5: correctly ordered pairs (.9>.8, .9>.5, .7>.5, .6>.5) = 4 of 6
    assert E.auroc([1, 0, 1, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5]) == pytest.approx(4 / 6)
    assert E.auroc([0, 0, 0], [0.1, 0.2, 0.3]) is None                    # all-negative label: undefined
    assert E.auroc([1, 1], [0.1, 0.2]) is None


def test_average_precision_hand_values():
    # ranked: +(P=1,R=1/3) -(.) +(P=2/3,R=2/3) +(P=3/4,R=1): AP = 1/3 * (1 + 2/3 + 3/4)
    assert E.average_precision([1, 0, 1, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5]) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # ties enter together: threshold .9 -> P=1, R=1/2; threshold .5 (both) -> P=2/3, R=1
    assert E.average_precision([1, 0, 1], [0.9, 0.5, 0.5]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert E.average_precision([0, 1, 1], [0.1, 0.8, 0.9]) == pytest.approx(1.0)
    # the worst ranking: positive last among 4 -> P = 1/4 at R = 1
    assert E.average_precision([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.25)
    assert E.average_precision([0, 0], [0.1, 0.2]) is None
    assert E.average_precision([1, 1], [0.1, 0.2]) is None
    r, p = E.pr_curve([1, 0, 1], [0.9, 0.5, 0.5])
    assert r[0] == 0 and r[-1] == 1 and np.all(np.diff(r) >= 0)


def test_metrics_random_agreement_with_pairwise_definition():
    """AUROC equals the brute-force pairwise probability on random data with many ties."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200); s = rng.integers(0, 10, 200).astype(float)
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert E.auroc(y, s) == pytest.approx(brute)


def test_dice_edge_cases():
    z = np.zeros((1, 4, 4), bool); full = np.ones((1, 4, 4), bool)
    half = np.zeros((1, 4, 4), bool); half[0, :2] = True
    assert E.dice_per_image(z, z)[0] == 1.0                                # empty vs empty = 1
    assert E.dice_per_image(z, full)[0] == 0.0                             # missed everything
    assert E.dice_per_image(full, z)[0] == 0.0                             # found something that is not there
    assert E.dice_per_image(full, full)[0] == 1.0
    assert E.dice_per_image(half, full)[0] == pytest.approx(2 * 8 / (8 + 16))


def test_seg_statistics_separates_images_that_lack_the_structure():
    """A head that never predicts a rare finding scores the share of negatives over all images, 0 on positives."""
    n = 10
    gt = np.zeros((n, 4, 4), bool); gt[:3, 1:3, 1:3] = True                     # 3 of 10 images have it
    known = np.ones(n, bool); known[9] = False                                  # one image not annotated
    silent = np.zeros((n, 4, 4), bool)                                          # predicts nothing anywhere
    good = gt.copy(); good[1] = False; good[1, 1, 1] = True                     # 1 of 4 pixels on image 1
    rows = np.arange(n)
    res = E.bootstrap_indices([np.array([i]) for i in range(n)], 50, seed=0)
    per, smp = E.seg_statistics({"x": silent}, {"x": (gt, known)}, ["x"], rows, res)
    assert per["x"]["n"] == 9 and per["x"]["n_pos"] == 3
    assert per["x"]["dice"] == pytest.approx(6 / 9) and per["x"]["dice_pos"] == 0.0
    per, _ = E.seg_statistics({"x": good}, {"x": (gt, known)}, ["x"], rows, res)
    assert per["x"]["dice_pos"] == pytest.approx((1 + 2 * 1 / (1 + 4) + 1) / 3)
    assert per["x"]["dice"] == pytest.approx((6 + 2 + 0.4) / 9)
    assert per["mean"]["dice_pos"] == per["x"]["dice_pos"]
    assert per["x"]["dice_pos_ci"][0] <= per["x"]["dice_pos"] <= per["x"]["dice_pos_ci"][1]
    # a structure absent from every test image has no dice_pos, and the mean skips it
    per, smp = E.seg_statistics({"x": good, "y": silent}, {"x": (gt, known), "y": (np.zeros_like(gt), known)},
                                ["x", "y"], rows, res)
    assert per["y"]["dice_pos"] is None and per["y"]["dice"] == 1.0
    assert per["mean"]["dice_pos"] == per["x"]["dice_pos"] and ("y", "dice_pos") not in smp


def test_grid_pool_is_per_cell_mean_of_the_row_major_grid():
    torch.manual_seed(0)
    tok = torch.randn(3, 36, 5).half()                                          # 6x6 grid, D = 5
    g = tok.float().reshape(3, 6, 6, 5)                                         # row-major: token r*6+c at (r, c)
    out = E.grid_pool(tok, 2, chunk=2).reshape(3, 5, 2, 2)                     # (N, D, G, G)
    for i in range(2):
        for j in range(2):
            ref = g[:, 3 * i:3 * i + 3, 3 * j:3 * j + 3].mean((1, 2))         # top-left cell = rows 0-2, cols 0-2
            assert torch.allclose(out[:, :, i, j], ref, atol=1e-6)
    assert torch.allclose(E.grid_pool(tok, 1), tok.float().mean(1), atol=1e-6)   # G = 1 is the mean pool


# ---------------------------------------------------------------------------------------------- bootstrap and p-values

def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (60, 1200):
        y = rng.integers(0, 2, n); s = y + rng.normal(0, 1.0, n)
        res = E.bootstrap_indices([np.array([i]) for i in range(n)], 400, seed=0)
        smp = E.bootstrap_stat(lambda idx: E.auroc(y[idx], s[idx]), res)
        lo, hi = E.percentile_ci(smp)
        assert lo <= E.auroc(y, s) <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2                                       # ~ 1/sqrt(n): 20x the data, ~4.5x narrower


def test_bootstrap_resamples_whole_patients():
    groups = [np.array([0, 1]), np.array([2]), np.array([3, 4, 5])]
    for idx in E.bootstrap_indices(groups, 50, seed=3):
        for g in groups:                                                   # a patient enters with all its images
            counts = [int((idx == i).sum()) for i in g]
            assert len(set(counts)) == 1


def test_paired_test_detects_better_and_not_identical():
    rng = np.random.default_rng(2)
    n = 300
    y = rng.integers(0, 2, n)
    good = y + rng.normal(0, 0.5, n); bad = y + rng.normal(0, 3.0, n)
    res = E.bootstrap_indices([np.array([i]) for i in range(n)], 500, seed=0)
    a = E.bootstrap_stat(lambda idx: E.auroc(y[idx], good[idx]), res)
    b = E.bootstrap_stat(lambda idx: E.auroc(y[idx], bad[idx]), res)
    assert E.paired_p_value(a, b) < 0.01
    assert E.paired_p_value(a, b) == pytest.approx(2 / 501)                # never 0 with finite B: smallest is 2/(B+1)
    assert E.paired_p_value(a, a) == 1.0                                   # identical predictors
    # a small, noisy difference is not significant
    b2 = E.bootstrap_stat(lambda idx: E.auroc(y[idx], (good + rng.normal(0, 0.05, n))[idx]), res)
    assert E.paired_p_value(a, b2) > 0.05


def test_single_class_label_is_undefined_not_a_crash():
    data = {"labels": np.array([[1, 0], [0, 0], [1, 0], [np.nan, 0]], float), "label_names": ["A", "B"]}
    res = E.bootstrap_indices([np.array([i]) for i in range(4)], 30, seed=0)
    stats, smp = E.cls_statistics(np.random.default_rng(0).random((4, 2)), data, res, np.arange(4))
    assert stats["labels"]["B"]["auroc"] is None and "single class" in stats["labels"]["B"]["reason"]
    assert stats["labels"]["A"]["n_pos"] == 2 and stats["labels"]["A"]["n_neg"] == 1    # the nan row is unknown
    assert stats["macro"]["labels"] == ["A"]


# ------------------------------------------------------------------------------------------------ probes must learn

def _probe_args(**kw):
    return SimpleNamespace(**{"epochs": 15, "seg_epochs": 15, "batch_size": 32, "seed": 0, "mask_size": 32,
                              "seg_head": "linear", **kw})


def _splits(n):
    return np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))


def test_linear_and_attentive_probes_learn_a_separable_problem():
    """Label j = a small 'finding': one token of 16 carries direction j. Both probes must rank test images well."""
    torch.manual_seed(0)
    n, N, D, L = 240, 16, 32, 2
    y = torch.randint(0, 2, (n, L)).float()
    tok = torch.randn(n, N, D) * 0.5
    where = torch.randint(0, N, (n,))
    for j in range(L):
        tok[torch.arange(n), where, j] += 8.0 * y[:, j]                    # the finding lives in one patch
    y[::9, 1] = float("nan")                                               # some unknown cells: masked, not a crash
    data = {"split": _splits(n), "labels": y.numpy().astype(float), "label_names": ["a", "b"]}
    feats = {"tokens": tok.half(), "pooled": tok.mean(1)}
    te = data["split"] == "test"
    for probe in ("linear", "attentive"):
        scores, hp = E.fit_classification(probe, feats, data, _probe_args(), torch.device("cpu"), lambda m: None)
        for j in range(L):
            k = np.isfinite(data["labels"][te, j])
            assert E.auroc(data["labels"][te, j][k], scores[k, j]) > 0.9, (probe, j, hp)


def test_grid_probe_sees_where_mean_pooling_cannot():
    """A 'where' label: feature 0 is +1 on the left half of a 4x4 grid and -1 on the right for positives, mirrored for
    negatives. Every image has the same mean token, so the mean-pool probe is at chance; the 2x2 grid probe is not."""
    torch.manual_seed(0)
    n, g, D = 200, 4, 8
    y = torch.randint(0, 2, (n, 1)).float()
    left = (torch.arange(g * g) % g < g // 2).float() * 2 - 1                  # +1 left columns, -1 right, row-major
    tok = torch.randn(n, g * g, D) * 0.3
    tok[:, :, 0] += (2 * y - 1) * left                                          # (n, 16)
    tok = tok - tok.mean(1, keepdim=True)                                      # exactly equal means: no leak
    data = {"split": _splits(n), "labels": y.numpy().astype(float), "label_names": ["where"]}
    feats = {"tokens": tok.half(), "pooled": tok.mean(1)}
    te = data["split"] == "test"
    got = {}
    for probe in ("linear", "grid"):
        scores, _ = E.fit_classification(probe, feats, data, _probe_args(grid=2), torch.device("cpu"), lambda m: None)
        got[probe] = E.auroc(data["labels"][te, 0], scores[:, 0])
    assert got["grid"] > 0.95 and abs(got["linear"] - 0.5) < 0.2, got


def test_seg_head_learns_a_synthetic_mask():
    """A 4x4 token grid whose first feature says 'this patch is inside the structure': Dice must be high."""
    torch.manual_seed(0)
    n, g, D, R = 64, 4, 8, 32
    grid = torch.rand(n, g, g) > 0.5                                        # which patches are inside
    tok = torch.randn(n, g * g, D) * 0.3
    tok[..., 0] += 2.0 * grid.flatten(1).float()
    gt = grid.repeat_interleave(R // g, 1).repeat_interleave(R // g, 2).numpy()    # (n, R, R) bool
    gt[5] = False                                                           # one empty mask (empty vs empty case)
    tok[5, :, 0] = torch.randn(g * g) * 0.3
    known = np.ones(n, bool); known[7] = False                              # one image not annotated
    data = {"split": _splits(n), "structures": ["blob"], "root": "synthetic"}
    args = _probe_args(seg_epochs=100, batch_size=8)
    pred, te_rows, hp = E.fit_segmentation({"tokens": tok.half()}, {"blob": (gt, known)}, data, args,
                                           torch.device("cpu"), lambda m: None)
    d = E.dice_per_image(pred["blob"], gt[te_rows])
    assert d.mean() > 0.9, hp
    assert 7 not in te_rows


# -------------------------------------------------------------------------------------------------- end to end (CLI)

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny prepared set (data_prep.py synthetic) and a tiny real checkpoint (radjepa.main, a few steps)."""
    import radjepa
    root = tmp_path_factory.mktemp("eval_e2e")
    data, run = root / "prep", root / "run"
    subprocess.run([sys.executable, os.path.join(REPO, "data_prep.py"), "synthetic", str(data), "--n", "48",
                    "--size", "64", "--seed", "0"], check=True, capture_output=True, timeout=120)
    torch.manual_seed(0)
    radjepa.main(["--data", str(data), "--out", str(run), "--model", "vit_tiny", "--depth", "2", "--width", "64",
                  "--heads", "2", "--pred-width", "32", "--pred-depth", "1", "--patch", "16", "--img-size", "64",
                  "--batch-size", "8", "--steps", "3", "--warmup", "1", "--workers", "0", "--min-ctx", "4"])
    return data, run / "ckpt.pt", root


def test_cli_end_to_end(tiny_run, capsys):
    data, ckpt, root = tiny_run
    out = root / "eval"
    rc = E.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--epochs", "2", "--seg-epochs", "2",
                 "--n-boot", "50", "--mask-size", "32", "--report-epochs", "1", "--report-width", "32",
                 "--report-layers", "1"])                 # phantoms have reports.csv: --task all includes the report
    assert rc == 0
    for f in ("metrics.json", "report.md", "pr_curves.png", "seg_overlays.png", "pca_features.png",
              "report_examples.png"):
        assert (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["seg_grid"] >= 16                                    # seg probed on >= 16x16 tokens by default
    cls = m["classification"]
    assert set(cls) == {f"{e}/{p}" for e in ("jepa", "random", "pixels") for p in ("linear", "grid", "attentive")}
    for r in cls.values():
        for lab, e in r["labels"].items():
            if e["auroc"] is None:
                assert e["reason"]
                continue
            assert 0 <= e["auroc"] <= 1 and 0 <= e["auprc"] <= 1
            if e["auroc_ci"]:
                assert e["auroc_ci"][0] <= e["auroc_ci"][1]
    assert "random" in cls["jepa/linear"]["vs"] and "pixels" in cls["jepa/linear"]["vs"]
    for st, e in m["segmentation"]["jepa"]["dice"].items():
        assert 0 <= e["dice"] <= 1
    assert "| jepa |" in (out / "report.md").read_text()
    geo = m["features"]                                     # label-free feature health of every encoder
    for name in ("jepa", "random", "pixels"):
        assert 1.0 <= geo[name]["erank"] <= geo[name]["dim"] and 0.0 <= geo[name]["position_share"] <= 1.0
    assert geo["pixels"]["dim"] == 16 * 16 + 64 and "Feature geometry" in (out / "report.md").read_text()
    assert any(f.startswith("feat_jepa") for f in os.listdir(out / "cache"))
    # a second run reuses the cached features
    capsys.readouterr()
    assert E.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--task", "cls", "--probe", "linear",
                   "--n-boot", "20"]) == 0
    assert "features: cached" in capsys.readouterr().out
    # "concatenated mean pools of the last 4 blocks": min(4, depth) x width features (the tiny model has 2 blocks)
    assert E.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out / "last4"), "--task", "cls",
                   "--probe", "linear", "--pool", "last4", "--n-boot", "20", "--no-baselines"]) == 0
    feats = [torch.load(out / "last4" / "cache" / f) for f in os.listdir(out / "last4" / "cache")]
    assert {f["pooled"].shape[1] for f in feats} == {2 * 64}


def test_cli_bad_inputs_are_one_line_errors(tiny_run, tmp_path, capsys):
    data, ckpt, _ = tiny_run
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    assert E.main(["--ckpt", str(bad), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a RadJEPA checkpoint" in err and "\n" not in err
    # a folder with labels.csv but no label columns / no masks
    (tmp_path / "nolab").mkdir()
    (tmp_path / "nolab" / "labels.csv").write_text("image,patient,split\nimages/a.png,p,train\nimages/b.png,q,val\n"
                                                   "images/c.png,r,test\n")
    for task, words in (("cls", "label columns"), ("seg", "masks"), ("all", "nothing to")):
        assert E.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "nolab"), "--task", task,
                       "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert E.main(["--ckpt", str(ckpt), "--data", str(data), "--grid", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--grid must be at least 1" in capsys.readouterr().err


def test_attentive_probe_equals_multihead_attention():
    """The folded one-query attention computes exactly nn.MultiheadAttention(query, tokens, tokens)."""
    torch.manual_seed(0)
    probe = E.AttentiveProbe(48, 3, 4)
    with torch.no_grad():
        probe.attn.in_proj_bias.normal_()                                 # non-zero biases: they must be handled
        probe.attn.out_proj.bias.normal_()
        probe.query.normal_()
    tok = torch.randn(5, 10, 48)
    ref, _ = probe.attn(probe.query.expand(5, -1, -1), tok, tok, need_weights=False)
    torch.testing.assert_close(probe.pool(tok), ref[:, 0], rtol=1e-5, atol=1e-5)
