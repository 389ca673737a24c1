"""What the first hour meets (issue 24, item 6): pr_curves.png (a legend of what was drawn, ticks, the prevalence),
progress bars in eval.py, a p-value at the bootstrap's floor, dimensional collapse named in the verdict, masks.png's
colours, and the README's install table."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as E
import plumbing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


# ---------------------------------------------------------------------------------------------------- pr_curves.png

def _curves(probes, prev=0.3, n=200):
    rng = np.random.default_rng(0)
    y = rng.random(n) < prev
    return {"a": [(name, probe, *E.pr_curve(y, y * 1.0 + rng.normal(size=n))) for name in ("jepa", "random")
                  for probe in probes]}, y.mean()


def test_eval_pr_curves_legend_names_only_what_was_drawn_and_the_prevalence_is_dashed(tmp_path):
    curves, prev = _curves(["linear", "grid"])                              # --quick: no attentive probe
    legend = E.draw_pr_curves(curves, ["a"], tmp_path / "pr.png")
    assert legend == ["jepa", "random", "linear probe", "grid probe", "prevalence (no skill)"]
    full, _ = _curves(["linear", "grid", "attentive"])
    assert "attentive probe" in E.draw_pr_curves(full, ["a"], tmp_path / "pr3.png")
    im = np.asarray(Image.open(tmp_path / "pr.png").convert("RGB")).astype(int)
    black = im.sum(-1) == 0
    rows = [y for y in range(im.shape[0]) if black[y].sum() > 200]           # the frame's top and bottom
    top, bot = rows[0], rows[-1]
    cols = [x for x in range(im.shape[1]) if black[top:bot + 1, x].all()]    # its left and right sides
    left, right = cols[0], cols[-1]
    ticks = [y for y in range(top, bot + 1) if black[y, left - 4:left].all()]
    assert len(ticks) == 5                                                   # y ticks 0, 0.25, ... 1, labelled
    assert (im[top - 6:bot + 6, :left - 4].sum(-1) < 384).sum() > 20
    assert black[bot + 1:bot + 5, left:right + 1].all(0).sum() == 5         # x ticks below the frame
    def runs(y):                                                             # black dashes along a row, inside
        b = black[y, left + 2:right - 1].astype(int)
        return int((np.diff(b) == 1).sum())
    dashed = [y for y in range(top + 2, bot - 1) if runs(y) >= 10]
    assert dashed and abs(np.mean(dashed) - (bot - prev * (bot - top))) <= 2  # at the prevalence


# ---------------------------------------------------------------------------------------------------- progress bars

class _Bars:
    """Stands in for tqdm: records each bar's arguments."""
    made = []

    def __init__(self, it=None, **kw):
        self.it, self.kw = it, kw
        _Bars.made.append(kw)

    def __iter__(self):
        return iter(self.it)

    def update(self, n=1):
        pass

    def close(self):
        pass

    @staticmethod
    def write(s):
        print(s)


def test_eval_progress_bars_for_features_probes_and_bootstrap_are_quiet_in_logs(monkeypatch):
    monkeypatch.setattr(E, "tqdm", _Bars)
    _Bars.made = []
    torch.manual_seed(0)
    images = torch.randint(0, 255, (12, 16, 16), dtype=torch.uint8)
    enc = lambda x, **kw: F.unfold(x, 4, stride=4).transpose(1, 2)          # noqa: E731  (B, 16 tokens, 16)
    tok, pooled = E.extract_tokens(enc, images, 16, torch.device("cpu"), batch_size=5, desc="features toy")
    assert tok.shape == (12, 16, 16)
    n = 40
    split = np.array(["train"] * 20 + ["val"] * 10 + ["test"] * 10)
    y = (torch.rand(n, 1) > 0.5).float()
    data = {"split": split, "labels": y.numpy().astype(float), "label_names": ["x"]}
    feats = {"tokens": (torch.randn(n, 4, 16) + y[:, :, None]).half(), "pooled": torch.randn(n, 16)}
    args = type("A", (), dict(epochs=1, batch_size=16, seed=0))()
    scores, _ = E.fit_classification("attentive", feats, data, args, torch.device("cpu"), lambda m: None)
    res = E.bootstrap_indices([np.array([i]) for i in range(10)], 20, 0)
    E.cls_statistics(scores, data, res, np.flatnonzero(split == "test"), "bootstrap toy")
    descs = [b["desc"] for b in _Bars.made]
    assert "features toy" in descs and "attentive probe lr grid" in descs and "bootstrap toy" in descs
    assert any(d.startswith("attentive lr=") for d in descs)                 # the epochs of each grid point
    assert all(b["disable"] is None for b in _Bars.made)                     # off when stderr is not a terminal
    assert all(b["leave"] is (b["desc"] == "features toy") for b in _Bars.made)   # nested bars vanish
    assert [b["total"] for b in _Bars.made if b["desc"] == "features toy"] == [12]   # counted in images


# ---------------------------------------------------------------------------------------------------- the verdict

def _seg_metrics(p_dice, n_boot=500, features=None):
    t = {"dice": {"diff": 0.03, "p": p_dice, "verdict": "better" if p_dice < 0.05 else "n.s.", "resamples": n_boot}}
    m = {"main": "jepa", "compare": "random", "labels": [], "structures": ["lungs"],
         "segmentation": {"jepa": {"dice": {"lungs": {"dice": 0.91}}, "vs": {"random": {"lungs": t}}},
                          "random": {"dice": {"lungs": {"dice": 0.88}}}},
         "config": {"ckpt": "c.pt", "data": "d", "n_boot": n_boot, "probes": [], "seg_head": "linear",
                    "seg_grid": 12, "mask_size": 64, "train_config": {"lr": 1e-3}},
         "pretraining": None}
    if features:
        m["features"] = {"img_size": 192, "n_images": 100,
                         **{k: {"dim": 192, "erank": v, "erank_content": v, "position_share": 0.3}
                            for k, v in features.items()}}
    return m


def test_eval_p_value_at_the_bootstrap_floor_is_reported_as_an_upper_bound():
    a, b = np.linspace(1, 2, 500), np.zeros(500)                            # A above B in every resample
    t = E.compare({("x", "m"): a}, {("x", "m"): b}, lambda *k: 1.0, lambda *k: 0.0, [("x", "m")])["x"]["m"]
    assert t["p"] == pytest.approx(2 / 501) and t["resamples"] == 500 and E.at_floor(t)
    assert E.p_text(t) == "p < 0.004 (the resolution of 500 resamples)"
    assert E.fmt_p(t) == "< 0.004 ↑"
    assert E.p_text({"p": 0.012, "resamples": 500}) == "p = 0.012" and E.fmt_p(
        {"p": 0.012, "verdict": "better", "resamples": 500}) == "0.012 ↑"
    assert E.p_text({"p": 2 / 1001}) == "p = 0.002"                          # an old metrics.json: no resamples
    assert E.p_floor(50) == 0.04 and E.p_floor(1000) == 0.002               # rounded up: p < X stays true
    m = _seg_metrics(2 / 501)
    v = E.verdict(m)
    assert "lungs Dice 0.910 vs 0.880, p < 0.004 (the resolution of 500 resamples)" in v["text"]
    assert "p = 0.004" not in v["text"]
    m["verdict"] = v
    report = E.make_report(m)
    assert "p = 0.004" not in report and "| < 0.004 ↑ |" in report
    assert "p < 0.004 (the resolution of 500 resamples)" in report
    assert "lungs Dice 0.910 vs 0.880 (p = 0.012)" in E.verdict(_seg_metrics(0.012))["text"]


def test_eval_verdict_names_dimensional_collapse_with_both_ranks():
    v = E.verdict(_seg_metrics(0.4, features={"jepa": 6.2, "random": 42.7, "pixels": 50.0}))
    assert "dimensional collapse" in v["text"] and "6.2" in v["text"] and "42.7" in v["text"] and v["collapse"]
    assert "lower --lr than this run's 0.001" in v["text"] and "BENCHMARKS.md §10" in v["text"]
    v = E.verdict(_seg_metrics(0.4, features={"jepa": 30.0, "random": 42.7}))
    assert "collapse" not in v["text"] and not v["collapse"]
    # without a win, after a too-short pretraining: the collapse is named before the run length
    m = _seg_metrics(0.4, features={"jepa": 6.2, "random": 42.7})
    m["pretraining"] = dict(step=10, batch_size=32, images_seen=320, width=192, depth=6, img_size=96, loss=0.05,
                            erank=5.0, train_images=1402)
    text = E.verdict(m)["text"]
    assert text.index("dimensional collapse") < text.index("too short") and text.count("dimensional collapse") == 1
    # a win with collapsed features still names it
    assert "dimensional collapse" in E.verdict(_seg_metrics(0.002, features={"jepa": 6.2, "random": 42.7}))["text"]


# ---------------------------------------------------------------------------------------------------- masks.png

def test_masks_png_colours_are_the_legends_and_neither_is_not_context(tmp_path):
    """A 2x2 patch grid on a flat grey crop: patch 0 context, 1 in target 1, 2 in targets 1 and 2, 3 in neither."""
    crop = np.full((32, 32), 0.5)
    plumbing.draw_masks([(crop, ([0], [[1, 2], [2]]))], 16, tmp_path / "m.png", 2)
    im = np.asarray(Image.open(tmp_path / "m.png").convert("RGB")).astype(int)
    L = [np.array(c) for c in plumbing.LEGEND]
    gray = round(0.5 * 255)
    at = lambda r, c: im[r * 128 + 64, c * 128 + 40]                       # noqa: E731  inside a patch, off lines
    ctx, neither = at(0, 0), at(1, 1)
    assert np.abs(ctx - (0.5 * gray + 0.5 * L[0])).max() <= 1               # context: the legend's blue tint
    assert np.abs(neither - 0.35 * gray).max() <= 1                         # neither: the image dimmed
    assert np.abs(ctx - neither).sum() > 200
    assert np.abs(at(0, 1) - (0.35 * gray + 0.65 * L[1])).max() <= 1        # target 1
    both = im[128:256, 0:128].reshape(-1, 3)                                 # in targets 1 and 2: 1's colour
    assert (np.abs(both - L[2]).sum(1) == 0).sum() > 1000                    # striped with 2's, exactly
    assert (np.abs(both - (0.35 * gray + 0.65 * L[1])).sum(1) <= 3).sum() > 1000
    blend = 0.35 * gray + 0.65 * (L[1] + L[2]) / 2                           # the old average of two blocks
    assert not (np.abs(im[:256, :256] - blend).sum(-1) <= 6).any()
    legend = im[256:]
    for color in (L[0], L[1], L[2], np.array((80, 80, 80))):                 # context, targets, neither
        assert (np.abs(legend - color).sum(-1) == 0).sum() >= 100
    assert (np.abs(legend - L[2]).sum(-1) == 0).sum() >= 121 + 20            # and the stripes' swatch


# ---------------------------------------------------------------------------------------------------- README

def test_readme_install_table_matches_the_pins():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    pin = re.search(r"^torch==(\S+)", open(os.path.join(REPO, "requirements.txt")).read(), re.M).group(1)
    para = text[text.index("The first line installs"):text.index("The second line makes")]
    assert f"pip install torch=={pin} --index-url https://download.pytorch.org/whl/cpu" in para
    assert f"torch=={pin} torchvision==" in para and "timm" in para and "CUDA" in para
