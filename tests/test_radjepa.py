"""Tests for radjepa.py: masking properties, packed-batch equivalence, resolution, EMA, schedules, exact resume,
torchrun (2 gloo processes), bad inputs, and a short run whose loss falls. CPU only, a minute or two in all."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import radjepa
from radjepa import Predictor, Seqs, ViT, pack_masks, sample_masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "vit_tiny", "--width", "64", "--heads", "2", "--depth", "2", "--pred-width", "64", "--pred-depth",
        "1", "--img-size", "64", "--patch", "16", "--batch-size", "4", "--workers", "0", "--warmup", "2",
        "--min-ctx", "4", "--log-every", "1", "--kernels", "torch", "--precision", "fp32"]  # exact equivalences


pytestmark = pytest.mark.usefixtures("torch_path")   # conftest.py


def blob_images(folder, n=12, size=80, seed=0):
    """Structured images (a few bright Gaussian blobs on a gradient): something a JEPA can actually learn."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = 0.3 + 0.3 * yy
        for _ in range(3):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
            img = img + 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(os.path.join(folder, f"img{i:03d}.png"))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Masking: properties over thousands of draws.

def test_masks_properties_over_many_draws():
    gh = gw = 14
    N = gh * gw
    gen = torch.Generator().manual_seed(0)
    scale, aspect = (0.15, 0.2), (0.75, 1.5)
    h_lo, h_hi = round(math.sqrt(scale[0] * N * aspect[0])), round(math.sqrt(scale[1] * N * aspect[1]))
    w_lo, w_hi = round(math.sqrt(scale[0] * N / aspect[1])), round(math.sqrt(scale[1] * N / aspect[0]))
    ctx_rows, ctx_cols, tgt_rows, tgt_cols = (np.zeros(14, int) for _ in range(4))
    areas, ratios, ctx_sizes = [], [], []
    for _ in range(2000):
        ctx, tgts = sample_masks(gen, (gh, gw), 4, scale, aspect, (0.85, 1.0), 10)
        assert len(ctx) >= 10 and torch.equal(ctx, ctx.sort().values)
        ctx_set = set(ctx.tolist())
        ctx_sizes.append(len(ctx))
        r, c = ctx // gw, ctx % gw
        np.add.at(ctx_rows, r.numpy(), 1), np.add.at(ctx_cols, c.numpy(), 1)
        for t in tgts:
            assert not ctx_set & set(t.tolist()), "context contains a target patch"
            r, c = t // gw, t % gw
            h, w = int(r.max() - r.min() + 1), int(c.max() - c.min() + 1)
            assert len(t) == h * w, "a target block is not a full rectangle"
            assert h_lo <= h <= h_hi and w_lo <= w <= w_hi, (h, w)
            areas.append(h * w / N)
            ratios.append(h / w)
            np.add.at(tgt_rows, r.numpy(), 1), np.add.at(tgt_cols, c.numpy(), 1)
    # every patch row and column is reachable in both roles (the official sampler never uses row/col 13 here)
    for counts in (ctx_rows, ctx_cols, tgt_rows, tgt_cols):
        assert (counts > 0).all(), counts
    # scale and aspect are independent draws: area and aspect ratio are (nearly) uncorrelated
    assert abs(np.corrcoef(areas, ratios)[0, 1]) < 0.15
    assert 0.13 < np.mean(areas) < 0.22
    # sizes vary per image (no batch-wide block size)
    assert np.std(ctx_sizes) > 5


def test_masks_are_a_pure_function_of_the_generator():
    a = sample_masks(torch.Generator().manual_seed(7), (16, 16))
    b = sample_masks(torch.Generator().manual_seed(7), (16, 16))
    c = sample_masks(torch.Generator().manual_seed(8), (16, 16))
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert not (torch.equal(a[0], c[0]) and all(torch.equal(x, y) for x, y in zip(a[1], c[1])))


def test_masks_impossible_config_is_a_clear_error():
    with pytest.raises(ValueError, match="no context"):
        sample_masks(torch.Generator().manual_seed(0), (2, 2), min_ctx=10)


def test_pack_masks_keeps_every_patch():
    N, gen = 64, torch.Generator().manual_seed(1)
    masks = [sample_masks(gen, (8, 8), 4, min_ctx=4) for _ in range(5)]
    mb = pack_masks(masks, N)
    assert torch.equal(mb.ctx_idx, torch.cat([c + b * N for b, (c, _) in enumerate(masks)]))
    assert torch.equal(mb.tgt_idx, torch.cat([t + b * N for b, (_, ts) in enumerate(masks) for t in ts]))
    table = torch.cat([mb.ctx_idx, mb.tgt_idx])  # what each predictor row refers to
    cu = torch.cat([torch.zeros(1, dtype=torch.long), mb.pred_len.cumsum(0)])
    s = 0
    for b, (c, ts) in enumerate(masks):
        for t in ts:  # sequence s = [context of b ; targets of block (b, j)], and pred_out points at the targets
            seq = table[mb.pred_idx[cu[s]:cu[s + 1]]]
            assert torch.equal(seq, torch.cat([c, t]) + b * N)
            s += 1
    assert torch.equal(table[mb.pred_idx[mb.pred_out]], mb.tgt_idx)


# ---------------------------------------------------------------------------------------------------------------
# Model: equivalences.

def tiny_models(seed=0, width=64, heads=2, grid=(6, 6)):
    torch.manual_seed(seed)
    return ViT(16, width, 2, heads), Predictor(width, 32, 2, heads, grid)


def jepa_forward(enc, pred, imgs, masks, grid, device="cpu"):
    mb = pack_masks(masks, grid[0] * grid[1]).to(device)
    with torch.no_grad():  # the target branch carries no gradient, as in training
        h = enc(imgs)
    z = pred(enc(imgs, mb.ctx_idx, mb.ctx_seqs), mb)
    return z, radjepa.OPS["loss"](z, h, mb.tgt_idx), len(mb.tgt_idx)


def test_packed_batch_equals_one_image_at_a_time():
    enc, pred = tiny_models()
    grid, gen = (6, 6), torch.Generator().manual_seed(3)
    imgs = torch.rand(4, 1, 96, 96)
    masks = [sample_masks(gen, grid, 4, min_ctx=4) for _ in range(4)]
    assert len({len(c) for c, _ in masks}) > 1, "want different context lengths in the batch"
    z, loss, n = jepa_forward(enc, pred, imgs, masks, grid)
    zs, sums = [], 0.0
    for b in range(4):
        zb, lb, nb = jepa_forward(enc, pred, imgs[b:b + 1], masks[b:b + 1], grid)
        zs.append(zb)
        sums += lb * nb
    torch.testing.assert_close(z, torch.cat(zs), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss * n, sums, atol=1e-4, rtol=1e-5)


def test_predictor_last_block_on_target_rows_equals_the_full_block():
    """The last predictor block computes projection + MLP for the mask-token rows only: the same predictions and the
    same gradients as running every row through it and keeping the mask-token outputs."""
    enc, pred = tiny_models(seed=1)
    grid, gen = (6, 6), torch.Generator().manual_seed(4)
    imgs = torch.rand(3, 1, 96, 96)
    mb = pack_masks([sample_masks(gen, grid, 4, min_ctx=4) for _ in range(3)], 36).to("cpu")
    ctx = enc(imgs, mb.ctx_idx, mb.ctx_seqs)
    fast = pred(ctx, mb)
    g_fast = torch.autograd.grad(fast.square().sum(), list(pred.parameters()))
    N, pos = 36, radjepa.sincos_pos_embed(*grid, pred.width)
    h = torch.cat([pred.embed(ctx) + pos[mb.ctx_idx % N], pred.mask_token + pos[mb.tgt_idx % N]])
    h = h[mb.pred_idx]
    for blk in pred.blocks:  # every row through every block, the plain way
        h = blk(h, mb.pred_seqs)
    full = pred.proj(pred.norm(h[mb.pred_out]))
    g_full = torch.autograd.grad(full.square().sum(), list(pred.parameters()))
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_precision_auto_and_bf16_training_on_cpu(tmp_path):
    cpu = torch.device("cpu")
    assert radjepa.resolve_precision("fp32", cpu) == "fp32" and radjepa.resolve_precision("bf16", cpu) == "bf16"
    assert radjepa.resolve_precision("auto", cpu, triton=True) == "fp32"  # the interpreter's bf16 is wrong
    with pytest.raises(SystemExit, match="interpreter computes bf16 wrongly"):
        radjepa.resolve_precision("bf16", cpu, triton=True)
    data = blob_images(tmp_path / "data")
    losses = {}
    for prec in ("fp32", "bf16"):
        out = ["--data", str(data), "--steps", "4", "--out", str(tmp_path / prec)]
        radjepa.main(out + TINY + ["--precision", prec])
        log = [json.loads(line) for line in open(tmp_path / prec / "log.jsonl")]
        assert log[0]["precision"] == prec  # the header says what ran
        losses[prec] = [r["loss"] for r in log if r.get("type") == "train"]
    # bf16 matmuls (8-bit mantissa) follow the fp32 run closely over a few steps; they are not bit-equal
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.05)
    assert losses["bf16"] != losses["fp32"]


def test_keeping_every_patch_equals_the_full_image_path_at_any_resolution():
    enc, _ = tiny_models()
    for H, W in ((64, 64), (96, 128), (32, 48)):  # trained nowhere in particular: pos-embed is computed per grid
        x = torch.rand(2, 1, H, W)
        full = enc(x)
        N = (H // 16) * (W // 16)
        assert full.shape == (2, N, 64)
        packed = enc(x, torch.arange(2 * N), Seqs([N, N], "cpu"))
        torch.testing.assert_close(packed, full.reshape(2 * N, 64), atol=1e-5, rtol=1e-5)
    x = torch.rand(1, 1, 64, 64)
    last2 = enc(x, n_last_blocks=2)  # the last block's output through the final norm is the ordinary output
    assert len(last2) == 2 and torch.equal(last2[-1], enc(x)) and not torch.allclose(last2[0], last2[1])


def test_position_embedding_scales_other_grids_to_the_training_grid():
    train = radjepa.sincos_pos_embed(8, 8, 32)
    assert torch.equal(radjepa.sincos_pos_embed(8, 8, 32, ref=(8, 8)), train)  # training grid: unchanged
    fine = radjepa.sincos_pos_embed(16, 16, 32, ref=(8, 8)).view(16, 16, 32)
    torch.testing.assert_close(fine[::2, ::2].reshape(64, 32), train)  # every other patch = a training position
    c = radjepa.make_config({"img_size": 128, "patch": 16, "model": "vit_tiny", "depth": 1})
    assert radjepa.build_encoder(c).ref_grid == (8, 8)


def test_position_embedding_is_sincos_and_distinct():
    pe = radjepa.sincos_pos_embed(5, 7, 32)
    assert pe.shape == (35, 32)
    assert torch.unique(pe, dim=0).shape[0] == 35  # every patch position has its own code
    assert torch.allclose(pe[:, :8] ** 2 + pe[:, 8:16] ** 2, torch.ones(35, 8))  # sin^2 + cos^2 = 1 (rows half)


def test_depth_scaled_init_is_not_undone():
    torch.manual_seed(0)
    vit = ViT(16, 384, 8, 6)
    for i, blk in enumerate(vit.blocks, start=1):
        for w in (blk.attn.proj.weight, blk.mlp[2].weight):
            assert abs(w.std().item() / (0.02 / math.sqrt(2 * i)) - 1) < 0.1
    assert abs(vit.blocks[0].attn.qkv.weight.std().item() / 0.02 - 1) < 0.1


def test_ema_equals_lerp_and_target_has_no_grad():
    a, _ = tiny_models(0)
    b, _ = tiny_models(1)
    b.requires_grad_(False)
    expected = [torch.lerp(pb, pa, 1 - 0.9) for pa, pb in zip(a.parameters(), b.parameters())]
    radjepa.ema_update(b, a, 0.9)
    for p, e in zip(b.parameters(), expected):
        assert torch.equal(p, e) and p.grad is None and not p.requires_grad


def test_target_features_are_the_last_block_or_the_mean_of_the_last_k_normed_blocks():
    """Pins the regression target of --target-blocks K, recomputed here from the ViT's parts by hand."""
    torch.manual_seed(0)
    enc = ViT(patch=8, width=32, depth=3, heads=2).eval()
    with torch.no_grad():
        for p in enc.norm.parameters():                       # a non-trivial final norm: its affine must be applied
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        t = enc.patch_embed((x - radjepa.MEAN) / radjepa.STD).flatten(2).transpose(1, 2)     # [2, 16, 32]
        h, seqs, outs = (t + radjepa.sincos_pos_embed(4, 4, 32)).flatten(0, 1), Seqs([16, 16], "cpu"), []
        for blk in enc.blocks:
            h = blk(h, seqs)
            outs.append(enc.norm(h).view(2, 16, 32))          # every block's output through the final norm
        assert torch.allclose(radjepa.target_features(enc, x, 1), outs[-1], atol=1e-6)      # I-JEPA: last block
        for k in (2, 3):
            want = sum(outs[-k:]) / k
            assert torch.allclose(radjepa.target_features(enc, x, k), want, atol=1e-6)
            assert not torch.allclose(want, outs[-1], atol=1e-3)                          # a different target
    with pytest.raises(ValueError, match="--target-blocks must be between 1 and --depth 6"):
        radjepa.make_config({"depth": 6, "target_blocks": 7})


def test_effective_rank_counts_the_directions_features_use():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(20000, 16, generator=g)
    assert radjepa.effective_rank(iso) == pytest.approx(16, rel=0.05)          # isotropic: every direction
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 16, generator=g) + 3.0
    assert radjepa.effective_rank(line) == pytest.approx(1.0, abs=1e-3)        # rank 1, offset removed
    two = torch.zeros(500, 16); two[:, :2] = torch.randn(500, 2, generator=g).sign()    # 2 equal directions
    assert radjepa.effective_rank(two) == pytest.approx(2.0, rel=0.05)
    scaled = iso * torch.tensor([10.0] + [1.0] * 15)                            # one dominant direction lowers it
    assert 1 < radjepa.effective_rank(scaled) < radjepa.effective_rank(iso)
    assert radjepa.effective_rank(torch.ones(10, 4)) == pytest.approx(1.0)      # a constant (collapsed) feature: 1


def test_schedules_at_their_end_points():
    c = radjepa.make_config({"steps": 1000, "warmup": 100})
    assert radjepa.lr_at(0, c) == pytest.approx(c.start_lr)
    assert radjepa.lr_at(100, c) == pytest.approx(c.lr)
    assert radjepa.lr_at(1000, c) == pytest.approx(c.final_lr)
    assert radjepa.wd_at(0, c) == pytest.approx(c.wd) and radjepa.wd_at(1000, c) == pytest.approx(c.final_wd)
    assert radjepa.ema_at(0, c) == pytest.approx(c.ema) and radjepa.ema_at(1000, c) == pytest.approx(c.final_ema)
    lrs = [radjepa.lr_at(s, c) for s in range(100, 1001)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # cosine decays monotonically after warmup


def test_adamw_groups_skip_decay_on_1d_params():
    enc, pred = tiny_models()
    decay, no_decay = radjepa.param_groups(enc, pred)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert any(p is pred.mask_token for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(enc.parameters()) + list(pred.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# CLI, config, data.

def test_cli_forms_and_presets():
    a = radjepa.make_config(radjepa.parse_args(["--data", "cxr/", "--model=vit_small", "--crop-scale", "0.5", "1"]))
    b = radjepa.make_config(radjepa.parse_args(["--data=cxr/", "--model", "vit_small", "--depth", "4"]))
    assert a.data == b.data == "cxr/" and a.width == 384 and a.depth == 12 and b.depth == 4
    assert a.crop_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="not a multiple"):  # a library call: ValueError; main() makes it one line
        radjepa.make_config({"img_size": 100, "patch": 16})


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "radjepa.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for f in dataclasses.fields(radjepa.Config):
        assert "--" + f.name.replace("_", "-") in out.stdout


def test_load_image_formats_and_bad_files(tmp_path):
    gray = (np.arange(40 * 30).reshape(40, 30) % 256).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert np.allclose(radjepa.load_image(tmp_path / "g.png"), gray / 255.0)
    twelve = (np.arange(40 * 30).reshape(40, 30) * 3).astype(np.uint16)  # 12-bit data (max 3597) in a 16-bit PNG
    Image.fromarray(twelve).save(tmp_path / "d16.png")
    a = radjepa.load_image(tmp_path / "d16.png")
    assert a.dtype == np.float32 and np.allclose(a, twelve / 4095.0, atol=1e-6)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.allclose(radjepa.load_image(tmp_path / "rgba.png"), gray / 255.0, atol=1 / 255)
    Image.fromarray(gray).save(tmp_path / "t.tiff")
    assert np.allclose(radjepa.load_image(tmp_path / "t.tiff"), gray / 255.0)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a picture")
    data = (tmp_path / "g.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    for bad, why in (("zero.png", "zero-byte"), ("text.png", "not a readable"), ("trunc.png", "not a readable")):
        with pytest.raises(radjepa.BadImage, match=why):
            radjepa.load_image(tmp_path / bad)


def test_small_images_are_upsampled_and_crops_stay_in_range():
    rng = np.random.default_rng(0)
    tiny = rng.random((10, 7)).astype(np.float32)
    for _ in range(20):
        out = radjepa.random_resized_crop(tiny, 64, (0.3, 1.0), rng)
        assert out.shape == (64, 64) and out.min() >= 0 and out.max() <= 1


def test_empty_or_missing_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "empty", tmp_path / "missing"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "radjepa.py"), "--data", str(d), "--out",
                            str(tmp_path / "o")] + TINY, capture_output=True, text=True)
        assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().startswith("error:"), r.stderr


def test_prepared_folder_uses_train_split_only(tmp_path):
    blob_images(tmp_path / "images", n=4)
    rows = ["image,patient,split,Nodule"] + [f"images/img{i:03d}.png,p{i},{s},0"
                                             for i, s in enumerate(["train", "val", "test", "train"])]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    paths = radjepa.list_images(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["img000.png", "img003.png"]


def test_step_batches_same_global_batch_for_any_world_size():
    one = list(radjepa.StepBatches(10, 8, 0, 0, 5))
    two = [list(radjepa.StepBatches(10, 8, 0, 0, 5, rank=r, world=2)) for r in (0, 1)]
    assert all(a == b + c for a, b, c in zip(one, *two))
    resumed = list(radjepa.StepBatches(10, 8, 0, 3, 5))
    assert resumed == one[3:]
    flat = [i for batch in one for i, _ in batch]  # each epoch is a permutation: every image once per 10 samples
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


# ---------------------------------------------------------------------------------------------------------------
# Training runs.

def params(path):
    ck = torch.load(path, weights_only=False)
    return {f"{k}.{n}": t for k in ("encoder", "predictor", "target_encoder") for n, t in ck[k].items()}, ck


def test_exact_resume(tmp_path):
    data = blob_images(tmp_path / "data")
    common = ["--data", str(data), "--steps", "6"] + TINY
    radjepa.main(common + ["--out", str(tmp_path / "straight")])
    radjepa.main(common + ["--out", str(tmp_path / "split"), "--stop-at", "3"])
    _, half = params(tmp_path / "split" / "ckpt.pt")
    assert half["step"] == 3
    radjepa.main(common + ["--out", str(tmp_path / "split"), "--resume"])
    a, ca = params(tmp_path / "straight" / "ckpt.pt")
    b, cb = params(tmp_path / "split" / "ckpt.pt")
    assert ca["step"] == cb["step"] == 6
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_short_run_loss_falls_and_logs(tmp_path):
    data = blob_images(tmp_path / "data", n=16)
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "run"
    radjepa.main(["--data", str(data), "--out", str(out), "--steps", "40", "--lr", "2e-3"] + TINY)
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert "config" in recs[0] and recs[0]["config"]["steps"] == 40
    assert recs[0]["objective"] == radjepa.OBJECTIVE == json.load(open(out / "config.json"))["objective"]
    logs = [r for r in recs if "loss" in r]
    assert len(logs) == 40
    for key in ("loss", "lr", "wd", "ema", "grad_norm", "img_per_s", "ctx_patches", "tgt_patches", "target_std",
                "target_erank", "skipped_files"):
        assert key in logs[-1]
    first, last = np.mean([r["loss"] for r in logs[:5]]), np.mean([r["loss"] for r in logs[-5:]])
    assert last < 0.7 * first, (first, last)
    assert logs[-1]["skipped_files"] > 0
    assert all(1.0 <= r["target_erank"] <= 64 for r in logs)                # width 64
    assert (out / "loss.png").exists() and (out / "masks.png").exists()
    enc = radjepa.load_encoder(str(out / "ckpt.pt"))
    assert not enc.training and enc.patch_size == 16 and enc.embed_dim == 64 and enc.config["steps"] == 40
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in ck["target_encoder"].items())
    rnd = radjepa.load_encoder(str(out / "ckpt.pt"), random_init=True)
    assert not torch.equal(rnd.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    feats = enc(torch.rand(2, 1, 96, 96))
    assert feats.shape == (2, 36, 64) and torch.isfinite(feats).all()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    data = blob_images(tmp_path / "data", n=4)
    out = tmp_path / "run"
    calls = {"n": 0}
    real = radjepa.jepa_loss_torch

    def poisoned(z, h, idx):
        calls["n"] += 1
        loss = real(z, h, idx)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(radjepa, "jepa_loss_torch", poisoned)
    with pytest.raises(SystemExit, match="loss is nan at step 4"):
        radjepa.main(["--data", str(data), "--out", str(out), "--steps", "8", "--ckpt-every", "2"] + TINY)
    _, ck = params(out / "ckpt.pt")
    assert ck["step"] == 4 and all(torch.isfinite(t).all() for t in ck["encoder"].values())


def test_load_encoder_rejects_other_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_text("junk")
    for f in ("other.pt", "junk.pt"):
        with pytest.raises(ValueError, match="not a RadJEPA checkpoint"):
            radjepa.load_encoder(str(tmp_path / f))


def test_torchrun_two_gloo_processes_match_one(tmp_path):
    data = blob_images(tmp_path / "data", n=8)
    common = [str(os.path.join(ROOT, "radjepa.py")), "--data", str(data), "--steps", "3"] + TINY
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable] + common + ["--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"]
                         + common + ["--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    la = [r["loss"] for r in map(json.loads, open(tmp_path / "one" / "log.jsonl")) if "loss" in r]
    lb = [r["loss"] for r in map(json.loads, open(tmp_path / "two" / "log.jsonl")) if "loss" in r]
    assert len(la) == len(lb) == 3
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    a, _ = params(tmp_path / "one" / "ckpt.pt")
    b, _ = params(tmp_path / "two" / "ckpt.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Kernels (interpreted on CPU): the whole JEPA loss and its gradients equal the PyTorch path.

def test_triton_path_matches_torch_path_end_to_end():
    pytest.importorskip("triton")
    ok, why = __import__("kernels").available()
    if not ok:
        pytest.skip(why)
    # on a GPU machine the compiled kernels run on CUDA tensors (fp32: exact "ieee" dots); else the CPU interpreter
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" else "cpu"
    enc, pred = (m.to(dev) for m in tiny_models(width=64, heads=2, grid=(4, 4)))  # head dim 32 in the encoder; predictor 16
    grid, gen = (4, 4), torch.Generator().manual_seed(5)
    imgs = torch.rand(2, 1, 64, 64).to(dev)
    masks = [sample_masks(gen, grid, 4, min_ctx=4) for _ in range(2)]
    results = []
    for triton in (False, True):
        radjepa.use_kernels(triton)
        enc.zero_grad(), pred.zero_grad()
        z, loss, _ = jepa_forward(enc, pred, imgs, masks, grid, dev)
        loss.backward()
        grads = [p.grad.clone() for p in list(enc.parameters()) + list(pred.parameters())]
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    tol = dict(atol=1e-5, rtol=1e-5) if dev == "cpu" else dict(atol=1e-4, rtol=1e-4)  # cuDNN conv, ex2.approx
    torch.testing.assert_close(l1, l0, **tol)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=tol["atol"], rtol=10 * tol["rtol"])


TRITON_RUN = [a if a != "torch" else "triton" for a in TINY] + ["--steps", "3", "--depth", "1"]


def test_triton_path_trains_under_compile(tmp_path, monkeypatch):
    # --compile with the kernels as torch.library ops: Dynamo traces the model, not the (interpreted) kernels
    pytest.importorskip("triton")
    ok, why = __import__("kernels").available()
    if not ok:
        pytest.skip(why)
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start on a small CPU
    data = blob_images(tmp_path / "imgs", n=8)
    radjepa.main(["--data", str(data), "--out", str(tmp_path / "run"), "--compile"] + TRITON_RUN)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[0]["kernels"] == "triton" and [r["step"] for r in log[1:]] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log[1:])


def test_edited_torch_op_is_not_silently_replaced_by_a_kernel(tmp_path, monkeypatch, capsys):
    # a fork that changes the loss (smooth-L1 -> MSE) in radjepa.py but not in kernels/ must stop, naming the op
    pytest.importorskip("triton")
    ok, why = __import__("kernels").available()
    if not ok:
        pytest.skip(why)
    import torch.nn.functional as F
    monkeypatch.setattr(radjepa, "jepa_loss_torch", lambda z, h, idx: F.mse_loss(
        z.float(), F.layer_norm(h.flatten(0, 1)[idx].float(), (h.shape[-1],))))
    data = blob_images(tmp_path / "imgs", n=4)
    with pytest.raises(SystemExit) as e:
        radjepa.main(["--data", str(data), "--out", str(tmp_path / "run")] + TRITON_RUN)
    msg = str(e.value)
    assert "'loss'" in msg and "\n" not in msg and "attention" not in msg and "gather'" not in msg
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")  # stopped before training
    # the same check names the other ops when they are the ones edited (no training run needed)
    monkeypatch.undo()
    check = dict(width=64, head_dims=(16,), device=torch.device("cpu"))
    radjepa.use_kernels(True, check=dict(check, dtype=torch.bfloat16))  # the unmodified ops agree, also in bf16 (GPU)
    attention = radjepa.attention_torch
    for name, edit in (("attention", lambda q, k, v, s: attention(q * 1.1, k, v, s)),
                       ("gather", lambda x, idx, pos: x.flatten(0, 1)[idx] + 0.5 * pos[idx % x.shape[1]])):
        monkeypatch.setattr(radjepa, f"{name}_torch", edit)
        with pytest.raises(SystemExit, match=f"kernel op '{name}'"):
            radjepa.use_kernels(True, check=check)
        monkeypatch.undo()


def test_resolve_kernels_decides_from_the_head_dims(capsys):
    pytest.importorskip("triton")
    ok, why = __import__("kernels").available()
    if not ok:
        pytest.skip(why)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only .type is read: no GPU needed
    vit_large = (1024 // 16, 384 // 16)  # encoder 64, predictor 24: padded to 32 lanes inside the kernels
    assert radjepa.resolve_kernels("triton", cuda, vit_large) and radjepa.resolve_kernels("auto", cuda, vit_large)
    assert not radjepa.resolve_kernels("auto", cpu, vit_large)  # auto = kernels on CUDA only
    assert capsys.readouterr().out == ""
    assert not radjepa.resolve_kernels("auto", cuda, (64, 160))  # beyond the kernels: fall back, with one line
    assert "head dim 160" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--kernels triton cannot run here: attention head dim 160"):
        radjepa.resolve_kernels("triton", cuda, (160,))
    with pytest.raises(SystemExit, match="must be auto, torch or triton"):
        radjepa.resolve_kernels("fast", cpu)
    assert not radjepa.resolve_kernels("torch", cuda, (160,))
