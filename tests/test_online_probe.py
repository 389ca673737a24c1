"""The online probe (radjepa.py --probe-every, plumbing.OnlineProbe): its maths on cases computed by hand or by
brute force, its absence on unlabelled data, and an exact resume with it on."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import plumbing
import radjepa
from test_radjepa import TINY, blob_images, params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("torch_path", "one_thread")   # conftest.py


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    """48 labelled phantoms at 64 px (train/val/test by patient), as data_prep.py writes them."""
    data = tmp_path_factory.mktemp("probe") / "prep"
    subprocess.run([sys.executable, os.path.join(REPO, "data_prep.py"), "synthetic", str(data), "--n", "48",
                    "--size", "64", "--seed", "0"], check=True, capture_output=True, timeout=120)
    return data


def test_ridge_equals_the_primal_solution_and_brute_force_leave_one_out():
    g = torch.Generator().manual_seed(0)
    for n, d in ((30, 8), (12, 40)):                  # more rows than features, and fewer (the dual's case)
        xt, xv = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(7, d, generator=g,
                                                                                   dtype=torch.float64)
        yt = (torch.rand(n, 3, generator=g) < 0.4).double()
        scores, lam = plumbing.OnlineProbe.ridge(xt, yt, xv)
        # the same penalty in the primal form, with the intercept as the label mean (x is not centred here:
        # the dual solves the same problem, min |y - mean - x w|^2 + lam |w|^2)
        yc = yt - yt.mean(0)
        w = torch.linalg.solve(xt.T @ xt + lam * torch.eye(d, dtype=torch.float64), xt.T @ yc)
        assert torch.allclose(scores, xv @ w + yt.mean(0), atol=1e-8)
        # the penalty chosen is the one with the lowest leave-one-out error, refitting n times per penalty
        def loo(lam):
            err = 0.0
            for i in range(n):
                keep = torch.arange(n) != i
                a = torch.linalg.solve(xt[keep] @ xt[keep].T + lam * torch.eye(n - 1, dtype=torch.float64),
                                       yc[keep])
                err += ((yc[i] - xt[i] @ xt[keep].T @ a) ** 2).mean()
            return err / n
        k = (xt @ xt.T).diagonal().mean()
        brute = min(plumbing.OnlineProbe.PENALTIES, key=lambda p: loo(float(p * k)))
        assert lam == pytest.approx(float(brute * k))


class Quadrants(torch.nn.Module):
    """A stand-in encoder: 4 tokens (2x2 grid) whose 3 features are the quadrant's mean brightness (+ a
    constant), or all constant. The probe's pooling keeps where a bright spot is."""

    def __init__(self, constant=False):
        super().__init__()
        self.w, self.constant = torch.nn.Parameter(torch.ones(1)), constant

    def forward(self, x):
        q = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)[:, :, None]   # [B, 4, 1]
        t = torch.cat([q, q ** 2, torch.ones_like(q)], 2) * self.w
        return torch.ones_like(t) if self.constant else t


def test_probe_scores_a_readable_label_1_and_a_constant_encoder_at_chance(tmp_path):
    """A hand-made labelled folder: the label is 'the top-left quadrant is bright'."""
    from PIL import Image
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows = ["image,patient,split,TopLeft,Noise"]
    for i in range(60):
        img = rng.uniform(0.2, 0.4, (32, 32))
        bright = i % 3 == 0
        if bright:
            img[:16, :16] += 0.5
        Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,p{i},{'train' if i < 40 else 'val'},{int(bright)},{int(rng.random() < .5)}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    rows.append("images/broken.png,pb,train,1,0")                              # an unreadable one: left out
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert plumbing.OnlineProbe.why_off(str(tmp_path)) is None
    probe = plumbing.OnlineProbe(str(tmp_path), 32, n_train=41)
    assert len(probe.y["train"]) == 40 and len(probe.y["val"]) == 20          # val: half of n_train at most
    macro, per = probe(Quadrants())
    assert per["TopLeft"] == 1.0 and 0.0 <= per["Noise"] <= 1.0
    assert macro == pytest.approx((per["TopLeft"] + per["Noise"]) / 2)
    macro, per = probe(Quadrants(constant=True))                               # nothing to read: every score ties
    assert per == {"TopLeft": 0.5, "Noise": 0.5}


def test_probe_is_off_on_unlabelled_data_and_says_why_once(tmp_path, capsys):
    data = blob_images(tmp_path / "data")
    out = tmp_path / "run"
    radjepa.main(["--data", str(data), "--out", str(out), "--steps", "4"] + TINY)
    said = capsys.readouterr().out
    assert said.count("online probe off:") == 1 and "no labels.csv" in said
    assert not plumbing.read_log(str(out / "log.jsonl"), "probe")
    with pytest.raises(SystemExit, match="--probe-data: .* no labels.csv"):            # asked for by name: an error
        radjepa.main(["--data", str(data), "--out", str(tmp_path / "r2"), "--probe-data", str(data)] + TINY)


def test_exact_resume_with_the_probe_on(prep, tmp_path, capsys):
    common = ["--data", str(prep), "--steps", "6", "--probe-every", "2", "--probe-images", "16"] + TINY
    radjepa.main(common + ["--out", str(tmp_path / "straight")])
    radjepa.main(common + ["--out", str(tmp_path / "split"), "--stop-at", "3"])
    radjepa.main(common + ["--out", str(tmp_path / "split"), "--resume"])
    said = capsys.readouterr().out
    a, ca = params(tmp_path / "straight" / "ckpt.pt")
    b, cb = params(tmp_path / "split" / "ckpt.pt")
    assert ca["step"] == cb["step"] == 6
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a resume with the probe on"
    logs = {run: plumbing.read_log(str(tmp_path / run / "log.jsonl"), "probe") for run in ("straight", "split")}
    assert [r["step"] for r in logs["straight"]] == [r["step"] for r in logs["split"]] == [0, 2, 4, 6]
    for x, y in zip(*logs.values()):                  # the same encoder at the same step: the same score
        assert x["auroc"] == pytest.approx(y["auroc"], abs=1e-9) and x["images"] == [16, 8]
    ref = logs["split"][0]["auroc"]                   # the resumed half still names random init's score
    assert f"online probe macro AUROC {logs['split'][-1]['auroc']:.3f} (random init {ref:.3f}) at step 6" in said
    assert "of this run's time" in said
    header = json.loads(open(tmp_path / "split" / "log.jsonl").readline())
    assert header["config"]["probe_every"] == 2
    assert (tmp_path / "straight" / "loss.png").exists()
    # bench.probe_agreement fills a step the log lacks from the checkpoint: the same value the run logged
    from bench.probe_agreement import online_from_checkpoint
    got = online_from_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    assert got == pytest.approx(logs["straight"][-1]["auroc"], abs=1e-9)


def test_loss_png_has_the_probe_panel(tmp_path):
    from PIL import Image
    log = tmp_path / "log.jsonl"
    recs = [dict(type="header")]
    recs += [dict(type="train", step=s, loss=1 / s, target_std=0.1, target_erank=5.0) for s in range(10, 101, 10)]
    recs += [dict(type="probe", step=s, auroc=0.5 + s / 400) for s in (0, 50, 100)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    plumbing.plot_log(str(log), str(tmp_path / "a.png"), [("loss", "loss"), *radjepa.CURVES])
    log.write_text("".join(json.dumps(r) + "\n" for r in recs if r["type"] != "probe"))
    plumbing.plot_log(str(log), str(tmp_path / "b.png"), [("loss", "loss"), *radjepa.CURVES])
    h = [Image.open(tmp_path / f"{k}.png").size[1] for k in "ab"]
    assert h[0] == 4 * 170 and h[1] == 3 * 170                              # one panel more, for the probe


def test_collapse_is_said_once_in_words():
    st = plumbing.StepStats()
    kw = dict(lr=1e-3, wd=0.04, ema=0.996, grad_norm=0.1)
    lines = [st.record(s, 0, target_erank=e, **kw)[1] for s, e in ((10, 40.0), (20, 30.0), (30, 15.0), (40, 12.0))]
    assert ["collapse" in x for x in lines] == [False, False, True, False]
    assert "from 40.0 to 15.0" in lines[2] and "--lr" in lines[2]
    resumed = plumbing.StepStats(first_erank=40.0)                          # a resumed run keeps its start
    assert "collapse" in resumed.record(50, 0, target_erank=19.0, **kw)[1]


def test_agreement_bench_spearman_and_metrics_reader():
    from bench.probe_agreement import offline, spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) vs (2, 1, 4, 3): d = (1, 1, 1, 1), rho = 1 - 6 * 4 / (4 * 15) = 0.6
    assert spearman([0.1, 0.2, 0.3, 0.4], [5, 1, 9, 7]) == pytest.approx(0.6)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    m = {"classification": {"jepa/grid": {"macro": {"auroc": 0.6}}, "random/grid": {"macro": {"auroc": 0.5}}},
         "segmentation": {"jepa": {"dice": {"lungs": {"dice": 0.8}, "heart": {"dice": 0.6},
                                            "nodule": {"dice": 0.9}}}}}
    assert offline(m, "jepa") == {"grid AUROC": 0.6, "anatomy Dice": pytest.approx(0.7)}
    assert offline(m, "random") == {"grid AUROC": 0.5}


def test_resume_from_a_log_whose_records_lack_the_rank(tmp_path):
    """Logs of older versions have train records without target_erank: the collapse watch starts afresh."""
    data, out = blob_images(tmp_path / "data"), tmp_path / "run"
    common = ["--data", str(data), "--out", str(out), "--steps", "4"] + TINY
    radjepa.main(common + ["--stop-at", "2"])
    log = out / "log.jsonl"
    recs = [json.loads(line) for line in open(log)]
    log.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "target_erank"}) + "\n" for r in recs))
    radjepa.main(common + ["--resume"])
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 4
