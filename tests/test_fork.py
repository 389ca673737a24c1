"""examples/lejepa.py, the worked fork (I-JEPA masking + SIGReg): the regulariser on cases computed by hand, and
both variants training a tiny model through radjepa.main."""
import json
import math
import os

import pytest
import torch

import radjepa
from examples import lejepa
from test_radjepa import TINY, blob_images

pytestmark = pytest.mark.usefixtures("torch_path", "one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sigreg_gaussian_near_zero_collapsed_high():
    N, D = 2048, 64
    z = torch.randn(N, D, generator=gen(0))
    gauss = lejepa.sigreg(z, gen=gen(1)).item()
    # z ~ N(0, I): every projection is exactly N(0, 1), so only the empirical characteristic function's variance
    # remains, E|phi_N(t) - e^{-t^2/2}|^2 = (1 - e^{-t^2}) / N: E[sigreg] = (1/N) int (1 - e^{-t^2}) e^{-t^2/2} dt
    # = (sqrt(2 pi) - sqrt(2 pi / 3)) / N = 1.06 / N = 5.2e-4. Bound: 3x that (measured 4.5e-4 to 5.7e-4, 5 seeds).
    expected = (math.sqrt(2 * math.pi) - math.sqrt(2 * math.pi / 3)) / N
    assert 0 < gauss < 3 * expected
    # collapse: all rows equal -> each projection is a constant s, |e^{its} - e^{-t^2/2}|^2 >= (1 - e^{-t^2/2})^2,
    # whose weighted integral is 2 * (sqrt(pi/2) - sqrt(pi) + sqrt(pi/6)) = 0.409 (s = 0, the least): >= 700x
    const = lejepa.sigreg(torch.randn(1, D, generator=gen(2)).expand(N, D), gen=gen(1)).item()
    zero = lejepa.sigreg(torch.zeros(N, D), gen=gen(1)).item()
    assert zero == pytest.approx(2 * (math.sqrt(math.pi / 2) - math.sqrt(math.pi) + math.sqrt(math.pi / 6)),
                                 rel=1e-2)
    assert const >= zero - 1e-3 and zero > 500 * gauss
    u = torch.randn(D, generator=gen(3))
    rank1 = lejepa.sigreg(torch.randn(N, 1, generator=gen(4)) * u / u.norm(), gen=gen(1)).item()  # a line
    assert rank1 > 100 * gauss
    # the wrong scale is penalised too (nothing is standardised): N(0, 9) ~ 0.51 by the same integral
    std3 = lejepa.sigreg(3 * z, gen=gen(1)).item()
    assert std3 > 0.4 and std3 > 500 * gauss


def test_sigreg_permutation_invariant_and_differentiable():
    z = torch.randn(256, 32, generator=gen(0)) * 2 + 0.5
    perm = torch.randperm(256, generator=gen(1))
    assert lejepa.sigreg(z[perm], gen=gen(5)).item() == pytest.approx(lejepa.sigreg(z, gen=gen(5)).item(), rel=1e-5)
    # gradients flow, and descending them (fresh directions each step) moves a cloud of std 2, shifted by 0.5,
    # to N(0, I): sigreg 0.28 -> 0.003 (the Gaussian's is 1.06 / 256 = 0.004), std 2 -> 1.08, mean 0.5 -> 0.02
    w = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.05)
    for s in range(40):
        loss = lejepa.sigreg(w, gen=gen(100 + s))
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
        opt.step()
    assert lejepa.sigreg(w.detach(), gen=gen(999)).item() < 0.1 * lejepa.sigreg(z, gen=gen(999)).item()
    assert abs(w.std().item() - 1) < 0.2 and abs(w.mean().item()) < 0.1


@pytest.mark.parametrize("no_ema", [False, True], ids=["sigreg+ema", "sigreg-no-ema"])
def test_sigreg_regularises_every_view_that_has_gradients(no_ema):
    """The fork's loss, term by term, from the same models, batch and directions: I-JEPA's loss (with --no-ema,
    against the encoder's own targets) + lambda x SIGReg of each image's mean token. With the EMA target that is
    the context view alone; with --no-ema the mean over the context and the whole-image views, because the
    whole-image view (the targets) has gradients too: regularising the context alone let a --no-ema run collapse
    every whole image to one embedding (BENCHMARKS.md section 17)."""
    from test_radjepa import tiny_models
    enc, pred = tiny_models()
    target = tiny_models()[0].requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    imgs = torch.rand(8, 1, 96, 96, generator=gen)
    b = radjepa.pack_masks([radjepa.sample_masks(gen, (6, 6), 4, min_ctx=4) for _ in range(8)], 36).to("cpu")
    b.imgs = imgs
    lam = 0.5
    old = dict(lejepa.FORK)
    try:
        lejepa.FORK.update(lam=lam, no_ema=no_ema, n_dirs=64, seed=7, gen=None)
        loss, h = lejepa.objective(enc, pred, target, b)
        d = torch.Generator().manual_seed(7)                               # the fork's directions, redrawn
        ctx = enc(imgs, b.ctx_idx, b.ctx_seqs)
        full = (enc if no_ema else target)(imgs)                           # [B, N, D] the targets' view
        views = [lejepa.pooled(ctx, b)] + [full.mean(1)] * no_ema
        reg = sum(lejepa.sigreg(v, 64, gen=d) for v in views) / len(views)
        ref = radjepa.jepa_loss_torch(pred(ctx, b), full, b.tgt_idx) + lam * reg
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(h, full.detach())
        # with --no-ema the whole-image view's term is really there: it differs from the context view's
        assert not no_ema or abs(reg.item() - lejepa.sigreg(views[0], 64, gen=torch.Generator().manual_seed(7))) > 1e-4
    finally:
        lejepa.FORK.clear()
        lejepa.FORK.update(old)


@pytest.mark.parametrize("variant", [[], ["--no-ema"]], ids=["sigreg+ema", "sigreg-no-ema"])
def test_fork_trains(tmp_path, monkeypatch, variant):
    monkeypatch.setattr(radjepa, "objective", radjepa.objective)  # the fork swaps them (and must restore them)
    monkeypatch.setattr(radjepa, "ema_update", radjepa.ema_update)
    monkeypatch.setattr(radjepa, "OBJECTIVE", radjepa.OBJECTIVE)
    monkeypatch.setattr(lejepa, "FORK", dict(lejepa.FORK))
    before = radjepa.objective, radjepa.ema_update, radjepa.OBJECTIVE, dict(lejepa.FORK)
    data, out = blob_images(str(tmp_path / "data")), str(tmp_path / "out")
    lejepa.main(["--data", data, "--out", out, "--steps", "3", "--sigreg-lambda", "0.5", *variant, *TINY])
    # forked() restores what it swapped: one process can train the original after a fork (bench.ablate does)
    assert (radjepa.objective, radjepa.ema_update, radjepa.OBJECTIVE, lejepa.FORK) == before
    records = [json.loads(r) for r in open(os.path.join(out, "log.jsonl"))]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    enc = radjepa.load_encoder(os.path.join(out, "ckpt.pt"))
    assert enc(torch.rand(2, 1, 64, 64)).shape == (2, 16, 64)
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    same = all(torch.equal(ck["encoder"][k], v) for k, v in ck["target_encoder"].items())
    assert same == bool(variant)  # --no-ema: the target is the encoder; with the EMA it trails it
    header = next(r for r in records if r.get("type") == "header")  # the fork's objective is recorded
    assert "sigreg" in header["objective"] and header["objective"] == json.load(open(os.path.join(out,
                                                                                         "config.json")))["objective"]


def test_sigreg_lambda_default_is_each_variants_best_measured_weight():
    """--sigreg-lambda defaults to the weight BENCHMARKS section 17 found best for the variant (0.01 with the EMA,
    1 without); an explicit weight, 0 included, is kept; a negative one is a one-line error."""
    def lam(argv):
        args, rest = lejepa.split_args(argv + ["--steps", "3"])
        assert rest == ["--steps", "3"]
        return args.sigreg_lambda
    assert lam([]) == 0.01 and lam(["--no-ema"]) == 1.0
    assert lam(["--sigreg-lambda", "0.5"]) == 0.5 and lam(["--no-ema", "--sigreg-lambda=0"]) == 0.0
    with pytest.raises(SystemExit, match="--sigreg-lambda must be >= 0"):
        lejepa.split_args(["--sigreg-lambda", "-1"])


def _log(path, steps, loss, probes=()):
    recs = [dict(type="header")] + [dict(type="train", step=s, loss=loss(s), target_std=0.1, target_erank=5.0)
                                    for s in steps] + [dict(type="probe", step=s, auroc=a) for s, a in probes]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_curves_overlays_runs_each_in_its_colour_and_refuses_bad_input(tmp_path, capsys):
    """bench.curves: a fork's curves beside the original's, one colour a run, a legend on top; the x axis spans
    the longest run (a shorter run, like a --no-ema row at fewer steps, ends early); one run draws as loss.png."""
    import numpy as np
    from PIL import Image

    from bench import curves
    import plumbing
    a = _log(tmp_path / "a", range(10, 101, 10), lambda s: 1 / s, [(0, 0.5), (50, 0.6), (100, 0.7)])
    b = _log(tmp_path / "b", range(10, 61, 10), lambda s: 2 / s)  # shorter, and no probe
    curves.main([a, b, "--out", str(tmp_path / "ab.png"), "--labels", "orig", "fork"])
    assert "2 runs" in capsys.readouterr().out
    im = np.asarray(Image.open(tmp_path / "ab.png").convert("RGB")).astype(int)
    assert im.shape[0] == 18 + 4 * 170                                      # legend + loss, std, erank, probe

    def has(colour, rows):  # pixels of this exact colour in these rows
        return bool((np.abs(im[rows] - np.array(colour)).sum(-1) == 0).any())
    first, second = plumbing.RUN_COLOURS[:2]
    assert has(first, slice(0, 18)) and has(second, slice(0, 18))          # both named in the legend
    assert has(first, slice(18, 188)) and has(second, slice(18, 188))      # both in the loss panel
    assert not has(second, slice(18 + 3 * 170, None))                      # b has no probe: none drawn for it
    # b ends at step 60 of a's 100: its loss line stops ~60% of the way along the x axis (x0 60, x1 700)
    cols = np.flatnonzero((np.abs(im[18:188] - np.array(second)).sum(-1) == 0).any(0))
    assert 60 + 0.55 * 640 < cols.max() < 60 + 0.65 * 640
    curves.main([a, "--out", str(tmp_path / "a.png")])                    # one run: loss.png's layout
    plumbing.plot_log(os.path.join(a, "log.jsonl"), str(tmp_path / "ref.png"),
                      [("loss", "loss (per objective)"), *radjepa.CURVES])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "ref.png")))
    for bad, why in (([str(tmp_path / "none")], "no log.jsonl"), ([a, b, "--labels", "x"], "1 given for 2 runs"),
                     ([a] * 11, "at most 10")):
        with pytest.raises(SystemExit, match=why):
            curves.main([*bad, "--out", str(tmp_path / "x.png")])


def test_views_tells_a_collapsed_whole_image_view_from_a_working_one(tmp_path):
    """bench.views: each image's mean token per view, for the online and the target encoder. An encoder made blind
    to the pixels (patch embedding zeroed: every whole image gives the same tokens) must read std 0 and a high
    SIGReg on the whole-image view, while its context view still varies (the masks differ per image), and the
    trained checkpoint it came from must not read collapsed. Bad input is one line."""
    from bench import views
    data, out = blob_images(str(tmp_path / "data")), str(tmp_path / "run")
    radjepa.main(["--data", data, "--out", out, "--steps", "2", *TINY])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    for k in ("encoder", "target_encoder"):
        ck[k]["patch_embed.weight"].zero_()
    blind = str(tmp_path / "blind.pt")
    torch.save(ck, blind)
    views.main([os.path.join(out, "ckpt.pt"), blind, "--data", data, "--images", "12", "--random-init",
                "--out", str(tmp_path / "v")])
    res = json.load(open(tmp_path / "v" / "views.json"))
    assert [r["encoder"] for r in res["rows"]] == ["random init", "online", "target", "online", "target"]
    assert (tmp_path / "v" / "views.md").read_text().count("| 2 |") == 5
    blinds = [r["views"] for r in res["rows"] if r["ckpt"] == blind]
    works = [r["views"] for r in res["rows"] if r["ckpt"] != blind]
    for v in blinds:
        assert v["whole image"]["std"] < 1e-5 and v["context"]["std"] > 1e-3
        assert v["whole image"]["sigreg"] > max(w["whole image"]["sigreg"] for w in works)
    assert min(w["whole image"]["std"] for w in works) > 1e-2
    for bad, why in ((["--images", "1"], ">= 2"), (["--data", str(tmp_path / "none")], "not a folder")):
        with pytest.raises(SystemExit, match=why):
            views.main([blind, "--data", data, *bad])
