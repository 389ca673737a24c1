"""A newcomer's first hour: the quick evaluation (partial results survive a kill, the verdict and the too-short
warning), `pip install .` imports from anywhere, bad image sizes are one-line errors, the pictures have axes and a
legend, log records are typed, and data_prep.py runs without the model code."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as E
import radjepa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny prepared set and a 3-step checkpoint (24 images seen: far too short to beat random init)."""
    root = tmp_path_factory.mktemp("newcomer")
    data, run = root / "prep", root / "run"
    subprocess.run([sys.executable, os.path.join(REPO, "data_prep.py"), "synthetic", str(data), "--n", "48",
                    "--size", "64", "--seed", "0"], check=True, capture_output=True, timeout=120)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    radjepa.main(["--data", str(data), "--out", str(run), "--model", "vit_tiny", "--depth", "2", "--width", "64",
                  "--heads", "2", "--pred-width", "32", "--pred-depth", "1", "--patch", "16", "--img-size", "32",
                  "--batch-size", "8", "--steps", "3", "--warmup", "1", "--workers", "0", "--log-every", "1",
                  "--min-ctx", "1", "--tgt-scale", "0.2", "0.25"])
    torch.set_num_threads(n)
    return data, run, root


def quick(data, run, out, *extra):
    return E.main(["--ckpt", str(run / "ckpt.pt"), "--data", str(data), "--out", str(out), "--quick",
                   "--n-boot", "50", "--seg-epochs", "2", *extra])


def test_quick_eval_end_to_end_with_verdict_and_too_short_warning(tiny, capsys):
    data, run, root = tiny
    assert quick(data, run, root / "q") == 0
    text = capsys.readouterr().out
    m = json.loads((root / "q" / "metrics.json").read_text())
    assert m["status"] == "complete"
    assert m["config"]["cls_img_size"] == m["config"]["seg_img_size"] == 64      # 2x the 32-px training size
    assert m["config"]["probes"] == ["linear", "grid"] and m["config"]["seg_epochs"] == 2   # explicit flag wins
    assert set(m["classification"]) == {f"{e}/{p}" for e in ("jepa", "random", "pixels") for p in ("linear", "grid")}
    assert m["pretraining"]["images_seen"] == 24 and m["pretraining"]["step"] == 3
    assert "warning: this checkpoint was pretrained on only 24 images" in text      # said before the probes run
    v = m["verdict"]
    assert v["text"] in text and v["text"] in (root / "q" / "report.md").read_text()
    if not v["helped"]:                                              # the usual outcome for 24 images
        assert "too short" in v["text"] and "experiment.sh cpu" in v["text"]


def test_quick_eval_writes_results_after_each_task(tiny, monkeypatch):
    """A kill during segmentation leaves metrics.json and report.md with the classification results."""
    data, run, root = tiny
    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(E, "fit_segmentation", killed)
    with pytest.raises(KeyboardInterrupt):
        quick(data, run, root / "killed")
    m = json.loads((root / "killed" / "metrics.json").read_text())
    assert m["status"].startswith("partial") and "segmentation" not in m and "jepa/grid" in m["classification"]
    report = (root / "killed" / "report.md").read_text()
    assert "Partial report" in report and "| jepa | grid |" in report
    assert not [f for f in os.listdir(root / "killed") if ".tmp" in f]   # written atomically


def _metrics(verdict_dice, seen):
    t = {"dice": {"diff": 0.03, "p": 0.002 if verdict_dice == "better" else 0.4, "verdict": verdict_dice}}
    return {"main": "jepa", "compare": "random",
            "segmentation": {"jepa": {"dice": {"lungs": {"dice": 0.91}}, "vs": {"random": {"lungs": t}}},
                             "random": {"dice": {"lungs": {"dice": 0.88}}}},
            "pretraining": dict(step=seen // 32, batch_size=32, images_seen=seen, width=192, depth=6, img_size=96,
                                loss=0.05, erank=20.0, train_images=1402)}


def test_verdict_names_the_win_or_says_why_not():
    v = E.verdict(_metrics("better", 19200))
    assert v["helped"] and "lungs Dice 0.910 vs 0.880 (p = 0.002)" in v["text"] and "too short" not in v["text"]
    v = E.verdict(_metrics("n.s.", 64000))
    assert not v["helped"] and "No significant win" in v["text"] and "too short" not in v["text"]
    v = E.verdict(_metrics("n.s.", 320))
    assert "too short" in v["text"] and "320 images (10 steps of 32" in v["text"]


def test_verdict_counts_the_report_task():
    """Issue 23: a `--task report` run whose JEPA reports beat random init said "No significant win over random init
    on any task" at the top of report.md; the report's headline CE F1 macro (beam 3) is now a win or loss there."""
    def with_report(p, verdict, only_report=False):
        m = _metrics("n.s.", 256000)
        if only_report:
            m.pop("segmentation")
        t = {"diff": 0.235, "p": p, "verdict": verdict, "resamples": 1000}
        m["report"] = {"systems": {"jepa/beam3": {"ce_f1_macro": 0.534}, "random/beam3": {"ce_f1_macro": 0.299}},
                       "vs": {"jepa/beam3": {"random/beam3": {"ce_f1_macro": t}}}}
        return E.verdict(m)
    v = with_report(0.001998, "better", only_report=True)
    assert v["helped"] and v["text"] == ("Pretraining helped: significantly better than random init on report "
                                         "generation CE F1 macro 0.534 vs 0.299, p < 0.002 (the resolution of "
                                         "1000 resamples).")
    v = with_report(0.03, "worse")
    assert not v["helped"] and "Worse than random init on: report generation CE F1 macro 0.534 vs 0.299 (p = " \
        "0.030)" in v["text"]
    assert not with_report(0.4, "n.s.")["helped"]


# ------------------------------------------------------------------------------------------------ install, bad input

def test_pip_install_owns_only_its_own_name_and_imports_from_another_cwd(tmp_path):
    """`pip install .` (pyproject.toml; -e reads the same) installs ONE top-level name, `radjepa`: the method
    is `import radjepa`, the rooms are radjepa.eval / .data_prep / .plumbing / .kernels. Nothing of ours is
    named `kernels`, `eval` or `data_prep` at the top level, so Hugging Face's `kernels` (which transformers
    >= 5 imports) and transformers itself import cleanly beside it, from another working directory."""
    pytest.importorskip("setuptools")                  # the build backend; offline, so no isolated build env
    import shutil
    src, site = tmp_path / "src", tmp_path / "site"   # a copy: the in-tree build must not litter the repository
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".*", "tests", "runs", "data", "__pycache__", "*.md"))
    shutil.copy(os.path.join(REPO, "README.md"), src)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--quiet", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["radjepa"]
    code = ("import os, sys, importlib.util, radjepa, radjepa.eval, radjepa.data_prep, radjepa.plumbing, "
            "radjepa.kernels, radjepa.encoders, radjepa.report_gen; "
            "from radjepa import load_encoder, sample_masks, ViT, Predictor; "
            "print(radjepa.__file__, radjepa.kernels.__file__, radjepa.eval.radjepa is radjepa.radjepa); "
            "spec = importlib.util.find_spec('kernels'); print(spec and spec.origin); "
            "import transformers; from transformers import Dinov2Config; print('transformers ok')"
            if importlib.util.find_spec("transformers") else
            "import radjepa, radjepa.eval, radjepa.kernels; print(radjepa.__file__, radjepa.kernels.__file__, "
            "radjepa.eval.radjepa is radjepa.radjepa); print(None); print('transformers ok')")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, hf_kernels, ok = out.stdout.strip().splitlines()[-3:]
    assert first.split() == [str(site / "radjepa" / "__init__.py"), str(site / "radjepa" / "kernels" / "__init__.py"),
                             "True"]                                  # the installed copy, one method module
    assert hf_kernels == "None" or str(site) not in hf_kernels        # `kernels` is never ours
    assert ok == "transformers ok"


def test_image_size_not_a_multiple_of_the_patch_is_a_one_line_error():
    enc = radjepa.ViT(patch=16, width=32, depth=1, heads=2)
    assert enc(torch.zeros(1, 1, 48, 32)).shape == (1, 6, 32)
    for h, w in ((50, 32), (48, 40)):
        with pytest.raises(ValueError, match="not a multiple of the patch size 16") as e:
            enc(torch.zeros(1, 1, h, w))
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ pictures and logs

def test_log_records_are_typed_and_loss_png_has_one_panel_per_curve_with_axes(tiny):
    _, run, _ = tiny
    recs = [json.loads(line) for line in open(run / "log.jsonl")]
    assert recs[0]["type"] == "header" and "config" in recs[0]
    train = [r for r in recs[1:] if r["type"] == "train"]
    probes = [r for r in recs[1:] if r["type"] == "probe"]               # the online probe: labelled data
    assert len(train) == 3 and all("loss" in r for r in train) and len(train) + len(probes) == len(recs) - 1
    assert [r["step"] for r in probes] == [0, 1, 2, 3] and all(0 <= r["auroc"] <= 1 for r in probes)
    im = np.asarray(Image.open(run / "loss.png").convert("RGB")).astype(int)
    assert im.shape[0] == 4 * 170                          # loss, target_std, target_erank, online probe
    black = (im.sum(-1) == 0)
    navy = (im[..., 0] == 0) & (im[..., 1] == 0) & (im[..., 2] == 128)
    for i in range(4):
        top, bot = i * 170 + 24, (i + 1) * 170 - 30
        assert (black | navy)[top:bot + 1, 60].all() and black[top, 60:700].all()   # y axis (the curve starts
        assert black[bot, 60:700].mean() > 0.9                              # on it) and frame
        ticks = [y for y in range(top, bot + 1) if black[y, 56:60].all()]
        assert len(ticks) >= 5                                             # 5 y ticks, labelled
        assert (im[top:bot, :50].sum(-1) < 384).sum() > 20                 # tick labels (antialiased text)
        assert black[bot + 1:bot + 5, 60:701].any(axis=0).sum() >= 6       # x ticks below the frame
        assert navy[top:bot].any()                                         # the curve, inside its own panel


def test_plot_log_reads_untyped_legacy_logs(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [{"config": {}}] + [{"step": s, "loss": 1 / s} for s in (1, 2, 3)]))
    radjepa.plumbing.plot_log(str(log), str(tmp_path / "loss.png"), [("loss", "loss"), *radjepa.CURVES])
    assert Image.open(tmp_path / "loss.png").size == (720, 170)           # only the loss panel: the others are absent


def test_masks_png_is_large_with_a_legend(tiny):
    _, run, _ = tiny
    im = np.asarray(Image.open(run / "masks.png").convert("RGB")).astype(int)
    assert im.shape[0] >= 256 + 20 and im.shape[1] >= 4 * 256            # 4 crops of 32 px shown at 256 px
    legend = im[256:]
    for color in radjepa.plumbing.LEGEND[:5]:                                      # context + 4 target swatches
        assert (np.abs(legend - np.array(color)).sum(-1) == 0).sum() >= 100
    crops = im[:256]
    assert (np.abs(crops - np.array(radjepa.plumbing.LEGEND[0])).sum(-1) < 150).any()   # context tint on the crops


# ------------------------------------------------------------------------------------------------ data_prep alone

def test_data_prep_does_not_import_the_model_and_the_loader_bench_lives_in_radjepa(tiny, tmp_path, capsys):
    data, _, _ = tiny
    code = ("import sys, data_prep; data_prep.main(['synthetic', sys.argv[1], '--n', '4', '--size', '32']); "
            "assert 'radjepa' not in sys.modules and 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    radjepa.main(["--data", str(data), "--img-size", "32", "--patch", "16", "--batch-size", "4", "--workers", "0",
                  "--min-ctx", "1", "--bench-loader", "2", "--out", str(tmp_path / "none")])
    assert "loader: " in capsys.readouterr().out and not (tmp_path / "none").exists()   # no model, no run folder


def test_every_name_the_readme_points_to_exists():
    """README pointers into the code (`name()` and `Name` in backticks, `python -m pkg.mod`, files) must exist:
    once it sent readers to markers that were not there."""
    import re
    import eval as E
    import plumbing
    import report_gen
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    rooms = [radjepa, plumbing, E, report_gen]
    method = text[text.index("## How I-JEPA works"):text.index("## Training on real data")]
    names = set(re.findall(r"`(\w+)\(\)`", text)) | set(re.findall(r"`([A-Za-z]+_\w+|[A-Z][a-z]+)`", method))
    assert {"jepa_loss_torch", "ema_update", "sample_masks", "Predictor", "pack_masks"} <= names
    for name in names:
        assert any(hasattr(m, name) for m in rooms), f"README names `{name}`, which no room defines"
    for mod in set(re.findall(r"python3? -m ((?:bench|kernels)\.[a-z_]+)", text)):
        assert os.path.isfile(os.path.join(REPO, *mod.split(".")) + ".py"), mod
    for path in set(re.findall(r"`((?:bench|kernels|tests|examples)/\w+\.py)`", text)):
        assert os.path.isfile(os.path.join(REPO, path)), path
    assert "TRAINING STEP BEGIN" not in text


def test_the_readme_gives_radjepa_pys_true_length():
    """The README's first paragraph states radjepa.py's length; it said 840 while the file had 828 lines."""
    import re
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    stated = re.search(r"one file of ([\d,]+) lines", text)
    assert stated, "README no longer states radjepa.py's length: drop this test with the claim"
    with open(os.path.join(REPO, "radjepa.py"), encoding="utf-8") as f:
        assert int(stated.group(1).replace(",", "")) == sum(1 for _ in f)
