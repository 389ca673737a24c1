"""
eval.py: frozen-encoder probes for RadJEPA checkpoints, with confidence intervals and significance tests.

The RadJEPA paper's claims are probe results: a frozen encoder, a small trained head, AUROC/AUPRC on disease
labels and Dice on anatomy, with paired significance tests between encoders. This file produces those numbers
for any checkpoint written by radjepa.py on any prepared dataset written by data_prep.py (layout: images/,
masks/, labels.csv, reports.csv, meta.json).

    python eval.py --ckpt runs/x/ckpt.pt --data prep/ [--task cls|seg|report|all]
                   [--probe linear|grid|attentive|all] [--compare OTHER.pt|random] [--out DIR]

What one run does, top to bottom (the file reads in the same order):
  1. metrics: AUROC, average precision (AUPRC), PR curve, Dice; bootstrap CIs and paired bootstrap p-values.
  2. data: the prepared folder (read and checked by plumbing), what the task needs.
  3. features: each frozen encoder run once over every image (cached in OUT/cache/), patch tokens kept (fp16).
     Encoders: the checkpoint's EMA target encoder ("jepa"), the same architecture randomly initialised
     ("random"), raw pixels ("pixels": a downsampled image for the linear probe, the patch's pixels as its
     "token"), optionally a second checkpoint ("other", --compare OTHER.pt). --ckpt and --compare also take
     external encoders, timm:NAME_OR_DIR and hf:NAME_OR_DIR (Rad-DINO, DINOv2, any timm model): encoders.py.
  4. probes: linear (logistic regression on mean-pooled tokens, L-BFGS), grid (the same on tokens mean-pooled
     per cell of a 4x4 partition of the patch grid: coarse position kept), attentive (one learned query
     cross-attending over the patch tokens), segmentation head (per-patch linear, or a small conv decoder).
  5. fitting: trained on train, hyper-parameters chosen on val only, the chosen probe applied to test once.
  6. statistics on the test split; 7. pictures; 8. the markdown report (metrics.json, report.md and the
     pictures are written atomically); 9. the command line: run() calls one function per task.
Report generation (--task report, reports.csv) is report_gen.py, built on this file. The recipe's ablation
table, probed with these probes, is bench/ablate.py (python -m bench.ablate).

Protocol definitions (exact, so the numbers can be checked):
  * AUROC = Mann-Whitney U / (n_pos * n_neg), ranks with ties averaged (a tie between a positive and a
    negative counts one half). AUPRC = average precision, sklearn's step definition AP = sum_n (R_n - R_{n-1})
    P_n over the distinct score thresholds (tied scores enter together), no interpolation. Prevalence =
    n_pos / n_known on test. A label whose test set holds a single class has AUROC/AUPRC null with a reason,
    and is left out of macro means.
  * Dice per image and structure = 2|P∩G| / (|P| + |G|) on binary masks at --mask-size, 1 when both are empty.
    An absent mask file means "not annotated": that image is left out for that structure. Reported twice: the
    mean over all annotated test images ("dice"), and over those where the structure is present ("dice_pos";
    for a rare finding the first is mostly empty-vs-empty = 1, the second is the lesion-segmentation number).
  * Bootstrap: B resamples (--n-boot, default 1000, seeded) of the test *patients* with replacement (all
    images of a drawn patient enter; one image per patient reduces this to the usual image bootstrap). The
    same resamples are used for every encoder, so differences are paired. 95% CI = 2.5th and 97.5th
    percentiles of the resampled statistic (resamples where it is undefined, e.g. a single class, are
    dropped). Macro mean per resample = mean over labels.
  * Paired test of encoder A vs B (same probe, same test images): d_b = m_A(b) - m_B(b) per resample b, then
    p = min(1, 2 * min((#{d_b <= 0} + 1) / (B + 1), (#{d_b >= 0} + 1) / (B + 1))), two-sided; the +1 keeps p
    above 0 with a finite B (smallest reportable p = 2/(B+1)). A label counts as "significantly better" when
    p < 0.05 and the point difference > 0 ("worse" when p < 0.05 and it is < 0).
"""
import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

if __package__:  # installed: this file is radjepa.eval, its siblings radjepa.plumbing, ...
    from . import encoders, plumbing, radjepa
else:            # a clone: `python eval.py` from the repository root
    import encoders
    import plumbing
    import radjepa
# timm:NAME and hf:NAME encoders (encoders.py) behind the probes' contract
is_external, load_external = encoders.is_external, encoders.load_external
ExternalEncoder = encoders.ExternalEncoder

# Hyper-parameter grids, searched on the val split. Small on purpose: the probe must not carry the result.
LINEAR_L2 = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 penalty of the logistic regression (features are standardized)
ATTENTIVE_LR = (3e-4, 1e-3, 3e-3)     # AdamW learning rate of the attentive probe (weight decay 0.05)
SEG_LR = (1e-3, 1e-2)                 # AdamW learning rate of the segmentation head (weight decay 1e-4)
# --quick: the evaluation to run right after the README quick start (<= 5 min on 2 CPU cores). It keeps the
# probes where JEPA beats random init first (BENCHMARKS.md): the grid probe (a 200-step run wins there) and
# segmentation (the clearest win at 1,000 steps), read at twice the training resolution (the default of
# --img-size and --seg-img-size under --quick), and drops the slow attentive probe. Flags given win.
QUICK = dict(probe=["linear", "grid"], seg_epochs=15, n_boot=500, mask_size=64)
# The shortest pretraining (steps x batch images) measured to beat random init on these phantoms
# (BENCHMARKS.md sections 1 and 9: 1,000 steps of 64 at 128 px win segmentation and the grid probe; the
# 600-step quick start (19,200 images) and a 1,200-step variant (38,400) did not win at all; on phantom
# version 2, section 11, 500 steps (32,000) win nothing and 1,000 win the linear probe and segmentation);
# shorter checkpoints get a warning, and a verdict without a win says why.
MIN_IMAGES_TO_WIN = 64000


class EvalError(plumbing.BadInput):
    """A problem with the user's input (checkpoint, dataset, flags): main() prints it as one line, exit code
    2, as it does every plumbing.BadInput (a file that plumbing's readers refuse)."""


# ------------------------------------------------------------------------------------------------------------
# 1. Metrics (numpy, no sklearn)

ranks, auroc = plumbing.ranks, plumbing.auroc  # (plumbing: the online probe scores with them too)


def _pr_points(y, s):
    """Precision and recall at every distinct threshold, from the highest score down (ties enter together)."""
    y = np.asarray(y).astype(np.float64)
    order = np.argsort(-np.asarray(s, dtype=np.float64), kind="mergesort")
    s_sorted, y_sorted = np.asarray(s, dtype=np.float64)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(y) - 1]   # index of the last item of each tie run
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    return tp / (tp + fp), tp / tp[-1]                    # precision, recall (non-decreasing)


def average_precision(y, s):
    """AUPRC as AP = sum_n (R_n - R_{n-1}) P_n (sklearn's definition); None without positives or negatives."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return None
    precision, recall = _pr_points(y, s)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pr_curve(y, s):
    """(recall, precision) arrays for plotting, starting at recall 0 with the first precision."""
    precision, recall = _pr_points(y, s)
    return np.r_[0.0, recall], np.r_[precision[0], precision]


def dice_per_image(pred, gt):
    """pred, gt: bool [N, H, W] -> Dice per image [N]; both empty -> 1 (nothing to find, nothing found)."""
    pred = pred.reshape(len(pred), -1); gt = gt.reshape(len(gt), -1)
    inter = (pred & gt).sum(1).astype(np.float64)
    total = pred.sum(1).astype(np.float64) + gt.sum(1)
    return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))


def bootstrap_indices(groups, n_boot, seed):
    """groups: index arrays, one per patient -> n_boot index arrays, patients drawn with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    return [np.concatenate([groups[g] for g in row]) for row in picks]


def bootstrap_stat(stat, resamples):
    """stat(idx) -> float or None; returns the statistic on each resample (nan where undefined)."""
    out = [stat(idx) for idx in resamples]
    return np.array([np.nan if v is None else v for v in out], dtype=np.float64)


def nanmean_rows(stack):
    """Mean over axis 0 ignoring nan (a label undefined in a resample); all-nan columns stay nan, silently."""
    ok = np.isfinite(stack)
    return np.where(ok.any(0), np.where(ok, stack, 0).sum(0) / np.maximum(ok.sum(0), 1), np.nan)


def percentile_ci(samples, level=0.95):
    """Percentile interval of the finite samples; None if none is finite."""
    v = samples[np.isfinite(samples)]
    if len(v) == 0:
        return None
    a = (1 - level) / 2 * 100
    return [float(np.percentile(v, a)), float(np.percentile(v, 100 - a))]


def paired_p_value(samples_a, samples_b):
    """Two-sided paired bootstrap p-value of (a - b), definition in the module docstring."""
    d = samples_a - samples_b
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return None
    n = len(d)
    le = (np.sum(d <= 0) + 1) / (n + 1)
    ge = (np.sum(d >= 0) + 1) / (n + 1)
    return float(min(1.0, 2 * min(le, ge)))


# ------------------------------------------------------------------------------------------------------------
# 2. The prepared dataset

def read_prepared(root, task):
    """A prepared folder -> dict of numpy arrays; EvalError if it lacks what `task` needs.
    plumbing.read_labels checks labels.csv (header, splits, image paths inside the folder and listed once,
    label cells 1 / 0 / blank, a patient in one split: see there); here, what the protocol adds: ids unique
    (masks/<structure>/<id>.png), every split present, and the labels or masks the task needs. Labels: float
    [N, L], nan = unknown (blank)."""
    if not os.path.isfile(os.path.join(root, "labels.csv")):
        raise EvalError(f"{root} is not a prepared dataset: labels.csv is missing (make one with "
                        "data_prep.py)")
    table = plumbing.read_labels(root)
    path, rows, names = table["path"], table["rows"], table["label_names"]
    keys = [r["image"] for r in rows]                   # normalised paths: the keys reports.csv is matched on
    ids = [os.path.splitext(os.path.basename(k))[0] for k in keys]
    if len(set(ids)) != len(ids):
        dup = next(i for i, k in collections.Counter(ids).items() if k > 1)
        raise EvalError(f"{path}: two images share the id {dup!r} (masks/<structure>/<id>.png would be "
                        "ambiguous)")
    splits = np.array([r["split"] for r in rows])
    for s in plumbing.SPLITS:
        if not (splits == s).any():
            raise EvalError(f"{path}: no image in the {s} split (probes train on train, pick "
                            "hyper-parameters on val, report test)")
    mask_root = os.path.join(root, "masks")
    structures = sorted(d for d in os.listdir(mask_root) if os.path.isdir(os.path.join(mask_root, d))) \
        if os.path.isdir(mask_root) else []
    lab = np.array([r["labels"] for r in rows], dtype=np.float64).reshape(len(ids), len(names))
    has_cls = len(names) > 0 and np.isfinite(lab[splits == "train"]).any()
    if task == "cls" and not has_cls:
        raise EvalError(f"{root}: --task cls needs label columns with known values in labels.csv "
                        f"(found columns {names})")
    if task == "seg" and not structures:
        raise EvalError(f"{root}: --task seg needs masks/<structure>/<id>.png, but masks/ has no structure "
                        "folder")
    if task == "all" and not has_cls and not structures:
        raise EvalError(f"{root}: no labels in labels.csv and no masks/: nothing to evaluate")
    return dict(root=root, keys=keys, ids=ids, paths=[os.path.join(root, k) for k in keys],
                patients=np.array([r["patient"] for r in rows]), split=splits, labels=lab, label_names=names,
                structures=structures, has_cls=has_cls)


def report_texts(data, section):
    """reports.csv (plumbing.read_reports: the same CSV reader and path normaliser as labels.csv) -> the text
    to generate for every dataset row, "" where an image has no report: FINDINGS (the IMPRESSION where a
    report has none), IMPRESSION, or both."""
    reports = plumbing.read_reports(data["root"], data["keys"])
    pick = {"findings": lambda f, i: f or i, "impression": lambda f, i: i,
            "both": lambda f, i: f"{f} {i}".strip()}
    return [pick[section](*reports[k]) if k in reports else "" for k in data["keys"]]


def progress(it, desc, leave=False, **kw):
    """A tqdm bar on a terminal only: disable=None turns it off when stderr is not a TTY, so a log file gets the
    log lines, not thousands of redrawn bars. Nested bars (the default) vanish when done."""
    return tqdm(it, desc=desc, leave=leave, disable=None, dynamic_ncols=True, **kw)


def parallel_map(fn, items, desc):
    """map() over threads: PNG decoding releases the GIL (20k images + 6 masks each: 8 cores ~8x faster)."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:
        return list(progress(ex.map(fn, items), desc, total=len(items)))


def load_images(data):
    """All images as uint8 [N, S, S] (one read per image; resizing happens per encoder on the fly). An
    unreadable one: plumbing.BadImage naming it."""
    imgs = parallel_map(lambda p: np.round(plumbing.load_image(p) * 255).astype(np.uint8), data["paths"],
                        "read images")
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise EvalError(f"{data['root']}: images differ in size {sorted(shapes)[:3]}; prepared images are "
                        "all S x S")
    return torch.from_numpy(np.stack(imgs))


def load_masks(data, size):
    """Masks per structure: bool [N, size, size] and a known flag [N] (absent file = not annotated)."""
    def read(path):
        if not os.path.isfile(path):
            return None
        # area-resize the 0/255 mask and threshold at half: a pixel is "in" if most of it was
        u8 = Image.fromarray(np.round(plumbing.load_image(path) * 255).astype(np.uint8))
        return np.asarray(u8.resize((size, size), Image.BOX)) >= 128
    out = {}
    for st in data["structures"]:
        ms = parallel_map(read, [os.path.join(data["root"], "masks", st, i + ".png") for i in data["ids"]],
                          f"read masks/{st}")
        known = np.array([m is not None for m in ms])
        zero = np.zeros((size, size), dtype=bool)
        out[st] = (np.stack([zero if m is None else m for m in ms]), known)
    return out


def resize(x, size):
    """x: float [B, 1, H, W] -> [B, 1, size, size] (antialiased bilinear, as training resizes)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ------------------------------------------------------------------------------------------------------------
# 3. Frozen features (cached)

@torch.no_grad()
def extract_tokens(encoder, images, size, device, batch_size=64, last4=False, desc="features"):
    """Runs a frozen encoder over all images at `size`. Returns tokens fp16 [N, g*g, D] (row-major patch grid)
    and the pooled feature fp32 [N, D] (mean over patches) or [N, 4D] (concatenated means of the last 4
    blocks; fewer if the encoder is shallower)."""
    tokens, pooled = [], []
    # bf16 on a GPU (tokens are stored in fp16 anyway); plain fp32 on a CPU
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bar = progress(None, desc, leave=True, total=len(images), unit="img")
    for i in range(0, len(images), batch_size):
        # (B, 1, size, size)
        x = resize(images[i:i + batch_size].to(device).float().div(255).unsqueeze(1), size)
        with amp:
            if last4:
                outs = encoder(x, n_last_blocks=4)                   # min(4, depth) x (B, N, D), last = final
                tok = outs[-1]
                pool = torch.cat([o.float().mean(1) for o in outs], -1)  # (B, 4D)
            else:
                tok = encoder(x)                                         # (B, N, D)
                pool = tok.float().mean(1)                               # (B, D)
        tokens.append(tok.half().cpu()); pooled.append(pool.float().cpu())
        bar.update(len(x))
    bar.close()
    return torch.cat(tokens), torch.cat(pooled)


def sincos_2d(g, dim=64):
    """Fixed 2-D sin-cos code of each cell of a g x g grid, row-major: [g*g, dim] (half rows, half cols)."""
    freqs = 1.0 / (100.0 ** (torch.arange(dim // 4) / (dim // 4)))        # (dim/4,) from 1 down to ~1/100
    r, c = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32),
                          indexing="ij")
    code = [f(t.reshape(-1, 1) * freqs) for t in (r, c) for f in (torch.sin, torch.cos)]
    return torch.cat(code, 1)                                               # (g*g, dim)


def pixel_features(images, size, patch, pool_size):
    """The raw-pixel baseline. tokens [N, g*g, p*p + 64]: each patch's pixels at `size` (a linear head on them
    is a local filter) plus a sin-cos code of its position, as a ViT token has one (else the attentive probe
    would see a bag of patches); pooled [N, pool_size^2]: the whole image downsampled to that side."""
    toks, pools = [], []
    g = size // patch
    pos = sincos_2d(g)
    for i in range(0, len(images), 256):
        x = resize(images[i:i + 256].float().div(255).unsqueeze(1), size)          # (B, 1, S, S)
        t = F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)       # (B, g*g, p*p), row-major grid
        t = torch.cat([t, pos.expand(len(t), -1, -1)], 2)                           # (B, g*g, p*p + 64)
        toks.append(t.half()); pools.append(resize(x, pool_size).flatten(1))        # (B, pool^2)
    return torch.cat(toks), torch.cat(pools)


def feature_geometry(tokens, rows, n_tokens=20000, seed=0):
    """Label-free health of a token set [N, g*g, D] over the given image rows (the train split):
    erank = effective rank (RankMe) of the patch tokens, erank_content = the same after removing each grid
    position's mean over images (what differs between images), position_share = share of the token variance
    that is that per-position mean. A JEPA whose target features squeeze into a few directions (dimensional
    collapse) shows a low erank while its across-batch std looks healthy."""
    t = tokens[torch.as_tensor(rows)].float()                                # (n, T, D)
    content = t - t.mean(0, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, t.shape[0] * t.shape[1], (min(n_tokens, t.shape[0] * t.shape[1]),), generator=g)
    flat, cflat = t.reshape(-1, t.shape[2])[pick], content.reshape(-1, t.shape[2])[pick]
    total = float(((t - t.mean((0, 1), keepdim=True)) ** 2).mean())
    erank = radjepa.effective_rank
    return {"dim": int(t.shape[2]), "erank": erank(flat), "erank_content": erank(cflat),
            "position_share": 1.0 - float((content ** 2).mean()) / max(total, 1e-12)}


def cached_features(cache_dir, key_fields, compute):
    """Loads features from cache_dir if this exact (encoder content, size, pooling, image content) was
    extracted before, else computes and saves them (atomically). Returns (tokens, pooled). Cache files are
    read as tensors only (no pickled code runs); an unreadable one is recomputed."""
    key = hashlib.sha1(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"feat_{key_fields['encoder']}_{key_fields['img_size']}_{key}.pt")
    if os.path.isfile(path):
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            if d["key"] == key_fields:
                print(f"features: cached {os.path.basename(path)}")
                return d["tokens"], d["pooled"]
        except Exception as e:
            print(f"features: ignoring unreadable cache file {path} ({type(e).__name__})")
    tokens, pooled = compute()
    os.makedirs(cache_dir, exist_ok=True)
    plumbing.save_torch(path, {"tokens": tokens, "pooled": pooled, "key": key_fields})
    return tokens, pooled


def content_key(path):
    """sha256 of what an encoder (or dataset) is made of: a file's bytes, or every file under a folder
    (relative name and bytes, e.g. a Hugging Face model directory). Another checkpoint with the same size and
    mtime gets another key; a copied or touched file keeps its key. A name that is no path (a hub id) is its
    own key."""
    if not os.path.exists(path):
        return str(path)
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else \
        sorted(os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns)
    for f in files:
        h.update(os.path.relpath(f, path).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def source_fingerprint(spec):
    """Feature-cache key of an encoder source, by content (content_key): a checkpoint file's bytes; timm:/hf:
    the name, plus for a local folder every file in it (new weights in the same folder give a new key)."""
    if not is_external(spec):
        return content_key(spec)
    name = os.path.expanduser(spec.split(":", 1)[1])
    return {"source": spec, **({"content": content_key(name)} if os.path.isdir(name) else {})}


# ------------------------------------------------------------------------------------------------------------
# 4. Probes (torch). All take standardized inputs: mean/std from the train split only.

def standardizer(x_train):
    """Per-feature mean and std over the train rows (x_train: [N, F] or [N, T, F]); std floored (no 1/0)."""
    flat = x_train.float().reshape(-1, x_train.shape[-1])
    return flat.mean(0), flat.std(0).clamp_min(1e-6)


def grid_pool(tokens, G, chunk=256):
    """tokens [N, g*g, D] (row-major grid) -> [N, G*G*D]: mean over each cell of a G x G partition of the
    patch grid, concatenated. A linear probe on it keeps coarse position (which region holds what), as the
    raw-pixel probe on a 32x32 image does, while mean pooling (G = 1) keeps none: an enlarged heart or a
    blunted costophrenic angle is a change in *where* things are, which a global mean cannot see."""
    N, T, D = tokens.shape
    g = int(round(math.sqrt(T)))
    out = [F.adaptive_avg_pool2d(t.float().transpose(1, 2).reshape(len(t), D, g, g), G).flatten(1)
           for t in tokens.split(chunk)]                                  # (n, D*G*G) per chunk
    return torch.cat(out)


def masked_bce(logits, y):
    """Multi-label BCE averaged over known cells only (y = nan where the label is unknown)."""
    known = torch.isfinite(y)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


macro_auroc = plumbing.macro_auroc


def train_linear(x, y, l2, iters=100):
    """Logistic regression, all labels at once: full-batch L-BFGS on masked BCE + l2 * ||W||^2.
    x: [N, F] standardized, y: [N, L] (nan = unknown). Returns (W [F, L], b [L])."""
    W = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    prev = torch.nanmean(y, 0).nan_to_num(0.5).clamp(0.01, 0.99)
    b = torch.log(prev / (1 - prev)).clone().requires_grad_(True)   # start at the prevalence: a sensible bias
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = masked_bce(x @ W + b, y) + l2 * (W * W).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach(), b.detach()


class AttentiveProbe(nn.Module):
    """One learned query cross-attending over the patch tokens (V-JEPA's attentive probe, one block), then LN
    + linear. Unlike mean pooling it can single out the few patches that hold a small finding.

    The parameters are those of nn.MultiheadAttention (the test checks we compute exactly what it computes),
    but with a single query the attention can be rearranged to cost O(N*D*H) instead of O(N*D^2):
      score_h(i) = q_h . (Wk_h x_i + bk_h) / sqrt(dh) = x_i . (Wk_h^T q_h) / sqrt(dh) + const  (cancels in
      softmax) out_h      = sum_i a_h(i) (Wv_h x_i + bv_h)    = Wv_h (sum_i a_h(i) x_i) + bv_h           
      (weights sum to 1)
    i.e. per head a learned *weighted mean* of the raw tokens, then the value projection. On a CPU this makes
    the probe ~100x cheaper, so it can be trained for enough steps."""

    def __init__(self, dim, n_out, heads):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def pool(self, tok):                                      # tok: (B, N, D) standardized -> (B, D)
        B, N, D = tok.shape
        H = self.attn.num_heads; dh = D // H
        Wq, Wk, Wv = self.attn.in_proj_weight.chunk(3)       # (D, D) each
        bq, _, bv = self.attn.in_proj_bias.chunk(3)      # the key bias only adds a per-head constant: dropped
        q = (Wq @ self.query[0, 0] + bq).view(H, dh)          # (H, dh) the query, per head
        # (H, D) query folded into key space
        u = torch.einsum("hd,hdD->hD", q, Wk.view(H, dh, D)) / math.sqrt(dh)
        a = torch.softmax(tok @ u.T, dim=1)              # (B, N, H) attention of each head over the N patches
        mean = torch.einsum("bnh,bnD->bhD", a, tok)          # (B, H, D) per-head weighted mean of the tokens
        v = torch.einsum("bhD,hdD->bhd", mean, Wv.view(H, dh, D)) + bv.view(H, dh)   # (B, H, dh)
        return self.attn.out_proj(v.reshape(B, D))            # (B, D), heads concatenated, output projection

    def forward(self, tok):
        return self.head(self.norm(self.pool(tok)))           # (B, L) logits


def n_heads(dim):
    return next(h for h in (8, 4, 2, 1) if dim % h == 0 and dim // h >= 16) if dim >= 16 else 1


def train_loop(model, loss_fn, n, epochs, lr, wd, batch_size, seed, device, desc="probe"):
    """AdamW, cosine schedule, mini-batches of row indices into the train split; loss_fn(model, idx): loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(n / batch_size)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    model.train()
    for _ in progress(range(epochs), desc, unit="epoch"):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            loss = loss_fn(model, idx.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
    model.eval()
    return model


@torch.no_grad()
def predict_batched(fn, n, batch_size=256):
    return torch.cat([fn(torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])


class SegHead(nn.Module):
    """Segmentation from frozen patch tokens on a g x g grid: 'linear' = one logit per patch and structure (a
    1x1 conv), 'decoder' = 3x3 conv -> GELU -> 2x up -> 3x3 conv -> GELU -> 1x1 conv. Both are bilinearly
    upsampled to the mask."""

    def __init__(self, dim, n_out, kind):
        super().__init__()
        if kind == "linear":
            self.net = nn.Conv2d(dim, n_out, 1)
        else:
            self.net = nn.Sequential(nn.Conv2d(dim, 128, 3, padding=1), nn.GELU(),
                                     nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                     nn.Conv2d(128, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, n_out, 1))

    def init_bias(self, prior):
        """Start every pixel at the train-set foreground fraction (logit): a rare structure (a nodule) then
        starts 'absent' instead of covering half the image, so short training does not decide the result."""
        last = self.net if isinstance(self.net, nn.Conv2d) else self.net[-1]
        with torch.no_grad():
            last.bias.copy_(torch.logit(prior.clamp(1e-3, 1 - 1e-3)))

    def forward(self, tok, out_size):                         # tok: (B, g*g, D) standardized
        B, N, D = tok.shape
        g = int(round(math.sqrt(N)))
        x = tok.transpose(1, 2).reshape(B, D, g, g)           # row-major tokens -> (B, D, g, g)
        return F.interpolate(self.net(x), size=(out_size, out_size), mode="bilinear", align_corners=False)


def seg_loss(logits, gt, known):
    """BCE + soft Dice per structure, over the images where that structure is annotated.
    logits, gt: (B, S, H, W); known: (B, S) bool."""
    k = known[:, :, None, None].float()
    bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    bce = (bce * k).sum() / (k.sum() * gt[0, 0].numel()).clamp_min(1)     # mean over annotated pixels
    p = torch.sigmoid(logits)
    inter = (p * gt).sum((2, 3)); total = p.sum((2, 3)) + gt.sum((2, 3))
    soft_dice = 1 - (2 * inter + 1) / (total + 1)       # (B, S), +1 smooths the empty-vs-empty case to 0 loss
    return bce + (soft_dice * known).sum() / known.sum().clamp_min(1)


# ------------------------------------------------------------------------------------------------------------
# 5. Running the probes for one encoder (fit on train, select on val, predict test once)

def fit_classification(probe, feats, data, args, device, log, rows=None):
    """Returns the scores (probabilities) [n, L] of `rows` (default: the test split) and the chosen
    hyper-parameters. data: "labels" [N, L] (nan = unknown) and "split"; fit on train, chosen on val."""
    sp = data["split"]
    y = torch.tensor(data["labels"], dtype=torch.float32)
    tr, va, te = (torch.from_numpy(np.flatnonzero(sp == s)) for s in plumbing.SPLITS)
    te = te if rows is None else torch.as_tensor(rows)
    y_val = data["labels"][va.numpy()]
    if probe in ("linear", "grid"):
        x = feats["pooled"].float() if probe == "linear" else grid_pool(feats["tokens"], args.grid)
        mu, sd = standardizer(x[tr]); x = (x - mu) / sd
        best = None
        for l2 in progress(LINEAR_L2, f"{probe} probe L2 grid"):
            W, b = train_linear(x[tr], y[tr], l2)
            score = macro_auroc(y_val, (x[va] @ W + b).numpy())
            log(f"    {probe} l2={l2:g}: val macro AUROC {score:.4f}")
            if best is None or score > best[0]:
                best = (score, l2, W, b)
        _, l2, W, b = best
        return torch.sigmoid(x[te] @ W + b).numpy(), {"l2": l2, "val_macro_auroc": best[0]}
    # attentive probe on the token grid; tokens stay fp16 on the host and are standardized per batch
    tok = feats["tokens"]
    mu, sd = standardizer(tok[:, ::max(1, tok.shape[1] // 64)][tr])   # every k-th token is plenty for stats
    mu, sd = mu.to(device), sd.to(device)
    get = lambda rows: (tok[rows.cpu()].to(device).float() - mu) / sd   # noqa: E731  (B, N, D)
    y_tr, trd = y[tr].to(device), tr.to(device)          # idx below indexes the train rows
    best = None
    for lr in progress(ATTENTIVE_LR, "attentive probe lr grid"):
        torch.manual_seed(args.seed)
        model = AttentiveProbe(tok.shape[2], y.shape[1], n_heads(tok.shape[2])).to(device)
        train_loop(model, lambda m, idx: masked_bce(m(get(trd[idx])), y_tr[idx]),
                   len(tr), args.epochs, lr, 0.05, args.batch_size, args.seed, device, f"attentive lr={lr:g}")
        with torch.no_grad():
            s_val = predict_batched(lambda r: model(get(va[r])).cpu(), len(va)).numpy()
        score = macro_auroc(y_val, s_val)
        log(f"    attentive lr={lr:g}: val macro AUROC {score:.4f}")
        if best is None or score > best[0]:
            best = (score, lr, model)
    _, lr, model = best
    with torch.no_grad():
        s_test = predict_batched(lambda r: torch.sigmoid(model(get(te[r]))).cpu(), len(te)).numpy()
    return s_test, {"lr": lr, "weight_decay": 0.05, "epochs": args.epochs, "val_macro_auroc": best[0]}


def fit_segmentation(feats, masks, data, args, device, log):
    """Returns predicted test masks {structure: bool [n_test, R, R]} and the chosen hyper-parameters."""
    sp = data["split"]
    structs = data["structures"]
    R = args.mask_size
    gt = torch.from_numpy(np.stack([masks[s][0] for s in structs], 1))        # (N, S, R, R) bool
    known = torch.from_numpy(np.stack([masks[s][1] for s in structs], 1))     # (N, S) bool
    tr, va, te = (torch.from_numpy(np.flatnonzero((sp == s) & known.numpy().any(1))) for s in plumbing.SPLITS)
    if len(tr) == 0 or len(va) == 0 or len(te) == 0:
        raise EvalError(f"{data['root']}: segmentation needs annotated masks in train, val and test "
                        f"(found {len(tr)}/{len(va)}/{len(te)})")
    tok = feats["tokens"]
    mu, sd = standardizer(tok[:, ::max(1, tok.shape[1] // 64)][tr])
    mu, sd = mu.to(device), sd.to(device)
    get = lambda rows: (tok[rows.cpu()].to(device).float() - mu) / sd   # noqa: E731

    def val_dice(model, rows):
        with torch.no_grad():
            pred = predict_batched(lambda r: (model(get(rows[r]), R) > 0).cpu(), len(rows), 64).numpy()
        d = [dice_per_image(pred[:, j], gt[rows, j].numpy())[known[rows, j].numpy()]
             for j in range(len(structs))]
        return float(np.mean([v.mean() for v in d if len(v)])), pred     # mean over structures annotated here

    # The training loss is computed at L = 4x the token grid (64 px for 16x16 tokens), on area-averaged (soft)
    # masks: a linear head cannot draw finer than its grid anyway, and the loss at 128 px cost 4x more (the
    # CPU bottleneck). Dice is still measured at R.
    g = int(round(math.sqrt(tok.shape[1])))
    L = min(R, 4 * g)
    gt_tr = F.adaptive_avg_pool2d(gt[tr].float(), L).to(device)               # (n_train, S, L, L) in [0, 1]
    known_tr, trd = known[tr].to(device), tr.to(device)
    # foreground fraction per structure over the annotated train images: (S,)
    trn = tr.numpy()
    prior = torch.tensor([float(masks[s][0][trn][masks[s][1][trn]].mean()) if masks[s][1][trn].any() else 0.5
                          for s in structs])
    best = None
    for lr in progress(SEG_LR, f"seg head ({args.seg_head}) lr grid"):
        torch.manual_seed(args.seed)
        model = SegHead(tok.shape[2], len(structs), args.seg_head).to(device)
        model.init_bias(prior.to(device))
        train_loop(model, lambda m, idx: seg_loss(m(get(trd[idx]), L), gt_tr[idx], known_tr[idx]),
                   len(tr), args.seg_epochs, lr, 1e-4, args.batch_size, args.seed, device, f"seg lr={lr:g}")
        score, _ = val_dice(model, va)
        log(f"    seg ({args.seg_head}) lr={lr:g}: val mean Dice {score:.4f}")
        if best is None or score > best[0]:
            best = (score, lr, model)
    _, lr, model = best
    _, pred = val_dice(model, te)                                          # the single look at the test split
    return {s: pred[:, j] for j, s in enumerate(structs)}, te.numpy(), \
        {"lr": lr, "weight_decay": 1e-4, "epochs": args.seg_epochs, "head": args.seg_head,
         "val_mean_dice": best[0]}


# ------------------------------------------------------------------------------------------------------------
# 6. Statistics over the test split: point estimates, bootstrap CIs, paired p-values

def cls_statistics(scores, data, resamples, test_rows, desc="bootstrap"):
    """scores [n_test, L]. Per label: point AUROC/AUPRC, prevalence, CI, and the bootstrap samples (for paired
    tests). resamples index positions within the test rows."""
    y = data["labels"][test_rows]
    per_label, samples = {}, {}
    for j, name in progress(enumerate(data["label_names"]), desc, total=len(data["label_names"]), unit="label"):
        k = np.isfinite(y[:, j])
        yk, sk = y[:, j], scores[:, j]
        n_pos = int(np.nansum(yk[k])); n_known = int(k.sum())
        entry = {"n_pos": n_pos, "n_neg": n_known - n_pos, "prevalence": n_pos / n_known if n_known else None}
        if n_pos == 0 or n_pos == n_known:
            entry.update(auroc=None, auprc=None, reason=f"single class in test ({n_pos} positive of "
                                                        f"{n_known})")
            per_label[name] = entry
            continue
        for metric, fn in (("auroc", auroc), ("auprc", average_precision)):
            entry[metric] = fn(yk[k], sk[k])
            smp = bootstrap_stat(lambda idx: fn(yk[idx][k[idx]], sk[idx][k[idx]]), resamples)
            entry[metric + "_ci"] = percentile_ci(smp)
            samples[(name, metric)] = smp
        per_label[name] = entry
    defined = [n for n in data["label_names"] if per_label[n]["auroc"] is not None]
    macro = {}
    for metric in ("auroc", "auprc"):
        if defined:
            smp = nanmean_rows(np.stack([samples[(n, metric)] for n in defined]))
            macro[metric] = float(np.mean([per_label[n][metric] for n in defined]))
            macro[metric + "_ci"] = percentile_ci(smp)
            samples[("macro", metric)] = smp
        else:
            macro[metric] = None
    macro["labels"] = defined
    return {"labels": per_label, "macro": macro}, samples


def seg_statistics(pred, masks, structs, test_rows, resamples, desc="bootstrap"):
    """Dice per structure over the annotated test images ("dice"), and over those of them where the structure
    is present ("dice_pos"). For a finding that most images lack, "dice" is dominated by empty-vs-empty = 1 (a
    head that never predicts anything scores the share of negatives); "dice_pos" is the lesion-segmentation
    number. For anatomy that every image has (lungs, heart) the two are the same."""
    per, samples = {}, {}
    for s in progress(structs, desc, unit="structure"):
        gt, known = masks[s]
        d = dice_per_image(pred[s], gt[test_rows])
        k = known[test_rows]
        if not k.any():
            per[s] = {"dice": None, "dice_pos": None, "reason": "no annotated test image"}
            continue
        present = k & gt[test_rows].reshape(len(test_rows), -1).any(1)
        per[s] = {"n": int(k.sum()), "n_pos": int(present.sum())}
        for metric, sel in (("dice", k), ("dice_pos", present)):
            if not sel.any():
                per[s][metric] = None
                continue
            smp = bootstrap_stat(lambda idx: float(d[idx][sel[idx]].mean()) if sel[idx].any() else None,
                                 resamples)
            per[s].update({metric: float(d[sel].mean()), metric + "_ci": percentile_ci(smp)})
            samples[(s, metric)] = smp
    per["mean"] = {}
    for metric in ("dice", "dice_pos"):
        ok = [s for s in structs if per[s].get(metric) is not None]
        if ok:
            samples[("mean", metric)] = nanmean_rows(np.stack([samples[(s, metric)] for s in ok]))
            per["mean"].update({metric: float(np.mean([per[s][metric] for s in ok])),
                                metric + "_ci": percentile_ci(samples[("mean", metric)])})
    if not per["mean"]:
        del per["mean"]
    return per, samples


def compare(samples_a, samples_b, stats_a, stats_b, keys):
    """Paired p-values of A vs B for each (name, metric) both have -> {name: {metric: {diff, p, verdict}}}."""
    out = {}
    for (name, metric) in keys:
        if (name, metric) not in samples_a or (name, metric) not in samples_b:
            continue
        diff = stats_a(name, metric) - stats_b(name, metric)
        p = paired_p_value(samples_a[(name, metric)], samples_b[(name, metric)])
        verdict = "better" if p is not None and p < 0.05 and diff > 0 else \
            "worse" if p is not None and p < 0.05 and diff < 0 else "n.s."
        n = int(np.isfinite(samples_a[(name, metric)] - samples_b[(name, metric)]).sum())  # the B of the p
        out.setdefault(name, {})[metric] = {"diff": diff, "p": p, "verdict": verdict, "resamples": n}
    return out


def p_floor(n):
    """The smallest p-value paired_p_value can give with n resamples: 2 / (n + 1) (no resample on the other side).
    -> that floor rounded up to 3 decimals, the X of "p < X" (500 resamples: 2/501 = 0.00399 -> 0.004)."""
    return math.ceil(round(2 / (n + 1) * 1000, 6)) / 1000


def at_floor(c):
    """c: one test of compare(). True when its p is the smallest its resamples resolve: the true p is smaller."""
    n = c.get("resamples")
    return bool(n) and c.get("p") is not None and c["p"] <= 2 / (n + 1) * (1 + 1e-9)


def p_text(c):
    """'p = 0.012', or at the floor 'p < 0.004 (the resolution of 500 resamples)' (not 'p = 0.004')."""
    if at_floor(c):
        return f"p < {p_floor(c['resamples']):.3f} (the resolution of {c['resamples']} resamples)"
    return f"p = {c['p']:.3f}"


# ------------------------------------------------------------------------------------------------------------
# 7. Pictures (PIL only)

COLORS = {"jepa": (200, 30, 30), "random": (30, 90, 200), "pixels": (120, 120, 120), "other": (20, 150, 60)}


PROBE_WIDTH = {"linear": 1, "grid": 2, "attentive": 4}   # pr_curves.png: a line width per probe
TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def dashed_line(d, a, b, fill, dash=6, gap=4, width=1):
    """A dashed straight line from a to b (PIL draws none)."""
    (xa, ya), (xb, yb) = a, b
    n = math.hypot(xb - xa, yb - ya)
    at = lambda t: (xa + (xb - xa) * t / n, ya + (yb - ya) * t / n)  # noqa: E731
    t = 0.0
    while t < n:
        d.line([at(t), at(min(t + dash, n))], fill=fill, width=width)
        t += dash + gap


def draw_pr_curves(curves, label_names, path):
    """curves: {label: [(name, probe, recall, precision)]}. A panel a label: precision over recall, ticks and axis
    labels, a colour per encoder (COLORS), a line width per probe (PROBE_WIDTH), and the label's test prevalence
    dashed: the precision of a classifier with no skill. The legend names only the encoders and probes drawn.
    -> the legend's entries."""
    W, H = 320, 290
    cols = min(3, max(1, len(label_names)))
    rows = math.ceil(len(label_names) / cols)
    drawn = [c for lab in label_names for c in curves.get(lab, [])]
    # the legend: an entry per encoder and per probe drawn (in the order of COLORS and PROBE_WIDTH), the prevalence
    names = list(dict.fromkeys([n for n in COLORS if any(c[0] == n for c in drawn)] + [c[0] for c in drawn]))
    probes = list(dict.fromkeys([q for q in PROBE_WIDTH if any(c[1] == q for c in drawn)] + [c[1] for c in drawn]))
    legend = [("encoder", n, n) for n in names] + [("probe", q, f"{q} probe") for q in probes] + \
        ([("prevalence", None, "prevalence (no skill)")] if drawn else [])
    width = cols * W

    def place(d=None):                                      # flows the entries into lines; -> the lines used
        x, y = 10, rows * H + 8
        for kind, key, text in legend:
            w = 30 + 7 * len(text) + 18
            if x + w > width and x > 10:
                x, y = 10, y + 18
            if d is not None:
                a, b = (x, y + 7), (x + 24, y + 7)
                if kind == "encoder":
                    d.line([a, b], fill=COLORS.get(key, (0, 0, 0)), width=3)
                elif kind == "probe":
                    d.line([a, b], fill="black", width=PROBE_WIDTH.get(key, 1))
                else:
                    dashed_line(d, a, b, "black")
                d.text((x + 30, y + 1), text, fill="black")
            x += w
        return (y - rows * H - 8) // 18 + 1
    img = Image.new("RGB", (width, rows * H + 14 + 18 * place()), "white")
    d = ImageDraw.Draw(img)
    for i, lab in enumerate(label_names):
        ox, oy = (i % cols) * W, (i // cols) * H
        x0, y0, x1, y1 = ox + 46, oy + 40, ox + W - 16, oy + H - 46
        X = lambda v: x0 + float(v) * (x1 - x0)  # noqa: E731
        Y = lambda v: y1 - float(v) * (y1 - y0)  # noqa: E731
        mine = curves.get(lab, [])
        # the last point of a PR curve calls every image positive: its precision is the prevalence
        prev = float(mine[0][3][-1]) if mine else None
        d.text((x0, oy + 6), lab + (f"  (prevalence {prev:.2f})" if prev is not None else ""), fill="black")
        d.text((ox + 6, oy + 24), "precision", fill="black")
        for v in TICKS:
            d.line([(X(v), y0), (X(v), y1)], fill=(228, 228, 228))                   # light grid
            d.line([(x0, Y(v)), (x1, Y(v))], fill=(228, 228, 228))
            d.line([(x0 - 4, Y(v)), (x0, Y(v))], fill="black"); d.line([(X(v), y1), (X(v), y1 + 4)], fill="black")
            d.text((x0 - 8 - 6 * len(f"{v:g}"), Y(v) - 6), f"{v:g}", fill="black")
            d.text((X(v) - 3 * len(f"{v:g}"), y1 + 6), f"{v:g}", fill="black")
        d.text(((x0 + x1) / 2 - 18, y1 + 22), "recall", fill="black")
        if prev is not None:
            dashed_line(d, (x0, Y(prev)), (x1, Y(prev)), "black")
        for name, probe, r, p in sorted(mine, key=lambda c: -PROBE_WIDTH.get(c[1], 1)):   # thin lines on top
            pts = [(X(rr), Y(pp)) for rr, pp in zip(r, p)]
            step = []                                    # PR curves are step functions: draw them as steps
            for a, b in zip(pts[:-1], pts[1:]):
                step += [a, (b[0], a[1])]
            step.append(pts[-1])
            d.line(step, fill=COLORS.get(name, (0, 0, 0)), width=PROBE_WIDTH.get(probe, 1))
        d.rectangle([x0, y0, x1, y1], outline="black")    # the axes over the curves that run along them
    place(d)
    plumbing.save_png(path, img)
    return [text for _, _, text in legend]


def gray_rgb(u8, size):
    im = Image.fromarray(u8).resize((size, size), Image.BILINEAR).convert("RGB")
    return np.asarray(im).astype(np.float32)


def draw_seg_overlays(images, preds, masks, structs, test_rows, path, n_show=4, size=160):
    """Rows: test images; columns: ground truth, then each encoder's prediction (one tint per structure)."""
    tints = [(255, 60, 60), (60, 200, 255), (255, 220, 40), (120, 255, 120), (220, 100, 255), (255, 140, 0),
             (0, 120, 255), (255, 255, 255)]
    names = list(preds)
    pick = list(range(min(n_show, len(test_rows))))
    canvas = Image.new("RGB", ((len(names) + 1) * size, len(pick) * size + 32), "white")
    d = ImageDraw.Draw(canvas)
    x = 4
    for j, s in enumerate(structs):                          # legend at the bottom: one colour per structure
        d.rectangle([x, len(pick) * size + 20, x + 10, len(pick) * size + 30], fill=tints[j % len(tints)])
        d.text((x + 14, len(pick) * size + 19), s, fill="black")
        x += 20 + 7 * len(s)
    for ci, title in enumerate(["ground truth"] + names):
        d.text((ci * size + 4, 2), title, fill="black")
    for ri, t in enumerate(pick):
        base = gray_rgb(images[test_rows[t]].numpy(), size)
        for ci in range(len(names) + 1):
            im = base.copy()
            for j, s in enumerate(structs):
                m = masks[s][0][test_rows[t]] if ci == 0 else preds[names[ci - 1]][s][t]
                m = Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
                m = np.asarray(m) > 127
                im[m] = 0.55 * im[m] + 0.45 * np.array(tints[j % len(tints)])
            canvas.paste(Image.fromarray(im.astype(np.uint8)), (ci * size, 16 + ri * size))
    plumbing.save_png(path, canvas)


def pca_rgb(tokens):
    """tokens [K, g*g, D] -> [K, g, g, 3] in [0, 1]: the first 3 principal components of all K*g*g patch
    tokens, each stretched between its 1st and 99th percentile (the DINO / Rad-DINO feature pictures)."""
    K, N, D = tokens.shape
    g = int(round(math.sqrt(N)))
    x = tokens.float().reshape(-1, D)
    x = x - x.mean(0)
    _, _, V = torch.linalg.svd(x, full_matrices=False)      # V: (D, D), rows = principal directions
    z = x @ V[:3].T                                          # (K*N, 3)
    lo, hi = torch.quantile(z, 0.01, dim=0), torch.quantile(z, 0.99, dim=0)
    z = ((z - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return z.reshape(K, g, g, 3).numpy()


def draw_pca(images, token_sets, rows, path, size=160):
    names = list(token_sets)
    canvas = Image.new("RGB", ((len(names) + 1) * size, len(rows) * size + 16), "white")
    d = ImageDraw.Draw(canvas)
    for ci, title in enumerate(["image"] + [f"PCA {n}" for n in names]):
        d.text((ci * size + 4, 2), title, fill="black")
    rgbs = {n: pca_rgb(token_sets[n][rows]) for n in names}
    for ri, r in enumerate(rows):
        canvas.paste(Image.fromarray(gray_rgb(images[r].numpy(), size).astype(np.uint8)), (0, 16 + ri * size))
        for ci, n in enumerate(names):
            im = Image.fromarray((rgbs[n][ri] * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
            canvas.paste(im, ((ci + 1) * size, 16 + ri * size))
    plumbing.save_png(path, canvas)


# ------------------------------------------------------------------------------------------------------------
# 8. The markdown report

def fmt(v, ci=None):
    if v is None:
        return "undefined"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def fmt_p(c):
    if c is None:
        return "-"
    mark = {"better": " ↑", "worse": " ↓"}.get(c["verdict"], "")
    if c["p"] is None:
        return "-"
    return (f"< {p_floor(c['resamples']):.3f}" if at_floor(c) else f"{c['p']:.3f}") + mark


def pretraining_summary(ckpt):
    """How much pretraining the checkpoint had: steps, images seen, epochs, size, and the last logged loss and
    erank (from log.jsonl beside the checkpoint, when there is one)."""
    ck = plumbing.read_checkpoint(ckpt)
    c, step = ck["config"], int(ck.get("step", 0))
    s = dict(step=step, batch_size=c["batch_size"], images_seen=step * c["batch_size"], width=c["width"],
             depth=c["depth"], img_size=c["img_size"], loss=None, erank=None, train_images=None)
    log_path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "log.jsonl")
    train, head = plumbing.read_log(log_path), plumbing.read_log(log_path, "header")
    if train:
        s["loss"], s["erank"] = train[-1]["loss"], train[-1].get("target_erank")
    if head:
        s["train_images"] = head[-1].get("images")
    return s


def too_short_text(s):
    epochs = f", {s['images_seen'] / s['train_images']:.0f} epochs" if s.get("train_images") else ""
    return (f"this checkpoint was pretrained on only {s['images_seen']:,} images ({s['step']} steps of "
            f"{s['batch_size']}{epochs}); the shortest pretraining measured to beat random init saw "
            f"{MIN_IMAGES_TO_WIN:,} (BENCHMARKS.md), so a significant win is unlikely")


# The main encoder's effective rank below this share of random init's (the feature geometry table): the verdict
# names dimensional collapse (BENCHMARKS.md §10: 21.8 vs 42.7 at lr 1e-3, 2.3 at 3e-3; lr 3e-4 kept 39.5).
COLLAPSE_RATIO = 0.5


def collapse_text(m):
    """A sentence when the pretrained features use far fewer directions than random init's: dimensional collapse,
    the two effective ranks and the usual cure; None otherwise (or without the feature geometry)."""
    geo = m.get("features") or {}
    a, b = geo.get(m["main"]), geo.get("random")
    if not (isinstance(a, dict) and isinstance(b, dict)) or a["erank"] >= COLLAPSE_RATIO * b["erank"]:
        return None
    lr = ((m.get("config") or {}).get("train_config") or {}).get("lr")
    lr = f" than this run's {lr:g}" if isinstance(lr, (int, float)) else ""
    return (f"Its features show dimensional collapse: effective rank {a['erank']:.1f} against random init's "
            f"{b['erank']:.1f} (of {a['dim']} dimensions), so the probes have few directions to read. A lower "
            f"--lr{lr} helps (BENCHMARKS.md §10: at 200 steps of 64, lr 3e-4 kept random init's rank, 39.5 vs "
            "42.7, where 1e-3 halved it and 3e-3 collapsed it to 2.3).")


def verdict(m):
    """Did pretraining beat the reference encoder (random init unless --compare)? Wins and losses are the
    significant (p < 0.05) differences of macro AUROC per classification probe, of Dice per structure and,
    when the report task ran, of its headline CE F1 macro. Features that collapsed (collapse_text) are named,
    with or without a win."""
    ref, wins, losses = m["compare"], [], []
    # "(p = 0.012)", or at the bootstrap's floor ", p < 0.004 (the resolution of 500 resamples)"
    ptxt = lambda t: f", {p_text(t)}" if at_floor(t) else f" ({p_text(t)})"  # noqa: E731

    def tally(item, v):                                        # a significant difference is a win or a loss
        (wins if v == "better" else losses if v == "worse" else []).append(item)
    for key, r in m.get("classification", {}).items():
        t = r.get("vs", {}).get(ref, {}).get("tests", {}).get("macro", {}).get("auroc")
        if key.startswith(m["main"] + "/") and t:
            probe = key.split("/")[1]
            b = m["classification"][f"{ref}/{probe}"]["macro"]["auroc"]
            tally(f"{probe} probe macro AUROC {r['macro']['auroc']:.3f} vs {b:.3f}{ptxt(t)}", t["verdict"])
    seg = m.get("segmentation", {})
    for st, t in seg.get(m["main"], {}).get("vs", {}).get(ref, {}).items():
        if st != "mean" and t.get("dice"):
            a, b = seg[m["main"]]["dice"][st]["dice"], seg[ref]["dice"][st]["dice"]
            tally(f"{st} Dice {a:.3f} vs {b:.3f}{ptxt(t['dice'])}", t["dice"]["verdict"])
    rep = m.get("report") or {}
    hl = report_gen().HEADLINE if rep else None                 # the decoding the report's own verdict uses
    t = rep.get("vs", {}).get(f"{m['main']}/{hl}", {}).get(f"{ref}/{hl}", {}).get("ce_f1_macro")
    if t:
        a, b = (rep["systems"][f"{e}/{hl}"]["ce_f1_macro"] for e in (m["main"], ref))
        tally(f"report generation CE F1 macro {a:.3f} vs {b:.3f}{ptxt(t)}", t["verdict"])
    name = "random init" if ref == "random" else f"`{ref}`"
    collapse = collapse_text(m)
    if wins:
        text = ("Pretraining helped" if not losses else "Mixed result") + \
            f": significantly better than {name} on " + "; ".join(wins) + "."
    else:
        text = f"No significant win over {name} on any task."
        pt = m.get("pretraining")
        if ref == "random" and pt:
            loss = f", final loss {pt['loss']:.3f}, effective rank {pt['erank']:.0f}" if pt.get("loss") \
                else ""
            short = f"It is too short: {too_short_text(pt)}. " if pt["images_seen"] < MIN_IMAGES_TO_WIN \
                else ""
            text += (f" The model ({pt['width']} wide, {pt['depth']} deep) saw {pt['images_seen']:,} images"
                     f"{loss}. {collapse + ' ' if collapse else ''}{short}`bash experiment.sh cpu` (4,000 steps "
                     "of 64 on 10,000 unlabeled phantoms, 29 min of pretraining on 2 CPU cores) shows significant "
                     "wins in both pretraining seeds under every probe and in segmentation (BENCHMARKS.md §11).")
            collapse = None                                  # said, before the run length
    if collapse:
        text += " " + collapse
    if losses:
        text += f" Worse than {name} on: " + "; ".join(losses) + "."
    return dict(helped=bool(wins), wins=wins, losses=losses, text=text, collapse=collapse_text(m) is not None)


def make_report(m):
    floor = f"{p_floor(m['config']['n_boot']):.3f}"           # the smallest p the bootstrap resolves
    L = ["# RadJEPA probe report", "",
         f"checkpoint `{m['config']['ckpt']}`, data `{m['config']['data']}`, {m['config']['n_boot']} "
         "bootstrap resamples over test patients, 95% percentile CIs. p = paired two-sided bootstrap p-value "
         f"of `{m['main']}` vs the named encoder (↑ significantly better, ↓ worse, at p < 0.05); a cell "
         f"`< {floor}` means p < {floor} (the resolution of {m['config']['n_boot']} resamples).", ""]
    L += [f"- `{n}`: {src}" for n, src in m.get("encoders", {}).items()] + ([""] if m.get("encoders") else [])
    if m.get("status", "complete") != "complete":
        L += [f"**Partial report ({m['status']}).**", ""]
    if m.get("verdict"):
        L += ["## Verdict", "", m["verdict"]["text"], ""]
    cls = m.get("classification", {})
    if cls:
        L += ["## Classification: macro means over labels", "",
              "| encoder | probe | macro AUROC [95% CI] | macro AUPRC [95% CI] | labels better / worse vs "
              f"`{m['compare']}`: AUROC; AUPRC |", "|---|---|---|---|---|"]
        for key, r in cls.items():
            enc, probe = key.split("/")
            c = r.get("vs", {}).get(m["compare"])
            bw = "-" if not c else (f"{c['n_better']['auroc']} / {c['n_worse']['auroc']}; "
                                    f"{c['n_better']['auprc']} / {c['n_worse']['auprc']} "
                                    f"(of {c['n_labels']})")
            L.append(f"| {enc} | {probe} | {fmt(r['macro']['auroc'], r['macro'].get('auroc_ci'))} | "
                     f"{fmt(r['macro']['auprc'], r['macro'].get('auprc_ci'))} | {bw} |")
        for probe in m["config"]["probes"]:
            keys = [k for k in cls if k.endswith("/" + probe)]
            main_key = f"{m['main']}/{probe}"
            if main_key not in cls:
                continue
            others = [k.split("/")[0] for k in keys if k != main_key]
            for metric in ("auroc", "auprc"):
                L += ["", f"### {probe} probe, {metric.upper()} per label", "",
                      "| label | prevalence | " + " | ".join(k.split("/")[0] for k in keys) + " | " +
                      " | ".join(f"p vs {o}" for o in others) + " |",
                      "|---|---|" + "---|" * (len(keys) + len(others))]
                for lab in m["labels"] + ["macro"]:
                    main_lab = cls[main_key]["labels"].get(lab, {}) if lab != "macro" else {}
                    prev = "-" if lab == "macro" else fmt(main_lab.get("prevalence"))
                    cells = []
                    for k in keys:
                        e = cls[k]["macro"] if lab == "macro" else cls[k]["labels"][lab]
                        cells.append(fmt(e[metric], e.get(metric + "_ci")))
                    tests = {o: cls[main_key]["vs"].get(o, {}).get("tests", {}) for o in others}
                    ps = [fmt_p(tests[o].get(lab, {}).get(metric)) for o in others]
                    L.append(f"| {lab} | {prev} | " + " | ".join(cells) + " | " + " | ".join(ps) + " |")
            notes = [f"{lab}: {e['reason']}" for lab, e in cls[main_key]["labels"].items() if e.get("reason")]
            if notes:
                L += [""] + [f"- {n}" for n in notes]
    seg = m.get("segmentation", {})
    if seg:
        encs = list(seg)
        others = [e for e in encs if e != m["main"]]
        L += ["", f"## Segmentation: Dice [95% CI] ({m['config']['seg_head']} head, token grid "
              f"{m['config']['seg_grid']}x{m['config']['seg_grid']}, masks at {m['config']['mask_size']} px)"]
        d0 = seg[encs[0]]["dice"]
        partial = [s for s in m["structures"] if d0.get(s, {}).get("n_pos", 0) < d0.get(s, {}).get("n", 0)]
        titles = (("dice", "all annotated test images"), ("dice_pos", "test images that contain it"))
        for metric, title in titles:
            if metric == "dice_pos" and not partial:
                continue                               # every image has every structure: the same table twice
            L += ["", f"Dice over {title}" + (" (n = images)" if metric == "dice_pos" else "") + ":", "",
                  f"| structure | {' | '.join(encs)} | " + " | ".join(f"p vs {o}" for o in others) + " |",
                  "|---|" + "---|" * (len(encs) + len(others))]
            for s in m["structures"] + ["mean"]:
                e0 = d0.get(s)
                if not e0 or e0.get(metric) is None:
                    continue
                cells = [fmt(seg[e]["dice"][s].get(metric), seg[e]["dice"][s].get(metric + "_ci"))
                         for e in encs]
                ps = [fmt_p(seg[m["main"]].get("vs", {}).get(o, {}).get(s, {}).get(metric)) for o in others]
                n = f" (n={e0['n_pos']})" if metric == "dice_pos" and s != "mean" else ""
                L.append(f"| {s}{n} | " + " | ".join(cells) + " | " + " | ".join(ps) + " |")
        if partial:
            L += ["", f"Most images lack {', '.join(partial)}: over all images a head that predicts nothing "
                  "scores the share of images without it (empty vs empty = 1), so read the second table for "
                  "those."]
    geo = m.get("features")
    if geo:
        names = [k for k in geo if isinstance(geo[k], dict)]
        L += ["", f"## Feature geometry (label-free; patch tokens of {geo['n_images']} train images at "
              f"{geo['img_size']} px)", "",
              "| encoder | dims | effective rank | effective rank, per-position mean removed | position "
              "share of variance |",
              "|---|---|---|---|---|"]
        L += [f"| {n} | {geo[n]['dim']} | {geo[n]['erank']:.1f} | {geo[n]['erank_content']:.1f} | "
              f"{geo[n]['position_share']:.2f} |" for n in names]
        L += ["", "Effective rank = exp(entropy of the normalised singular values) (RankMe): how many "
              "directions the features really use. A low value with a healthy std is dimensional collapse."]
    if m.get("report"):
        L += report_gen().report_markdown(m["report"])
    L += ["", "Pictures: `pr_curves.png`, `seg_overlays.png`, `pca_features.png`" +
          (", `report_examples.png`." if m.get("report") else "."), ""]
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------------------
# 9. The command line, and the run: one function per task

def parse_args(argv):
    p = argparse.ArgumentParser(description="Frozen-encoder probes (classification + segmentation) for "
                                            "RadJEPA.",
                                epilog="The recipe ablation table: python -m bench.ablate OUT ... -- RECIPE "
                                       "(bash experiment.sh ablate).")
    p.add_argument("--ckpt", required=True, help="OUT/ckpt.pt written by radjepa.py, or an external encoder: "
                   "timm:NAME (pretrained, e.g. timm:vit_base_patch14_dinov2.lvd142m), timm:FOLDER "
                   "(config.json + weights, e.g. from `radjepa.py export`), hf:NAME or hf:FOLDER (e.g. "
                   "hf:microsoft/rad-dino); external encoders run at their own resolution and normalisation, "
                   "--img-size does not apply")
    p.add_argument("--data", required=True, help="a prepared folder (data_prep.py layout)")
    p.add_argument("--task", default="all", choices=["cls", "seg", "report", "all"],
                   help="cls, seg, report (report generation, needs reports.csv), or all (report only if "
                        "reports.csv)")
    p.add_argument("--probe", default=["all"], nargs="+", choices=["linear", "grid", "attentive", "all"],
                   help="classification probe(s), one or more: linear on mean-pooled tokens, grid = linear "
                        "on tokens mean-pooled per cell of a --grid x --grid partition (keeps coarse "
                        "position), attentive (one learned query), all")
    p.add_argument("--grid", type=int, default=4, help="cells per side of the grid probe's partition of the "
                                                       "tokens")
    p.add_argument("--compare", default="random", help="'random', another checkpoint, or timm:NAME_OR_DIR / "
                   "hf:NAME_OR_DIR (as for --ckpt): the paired tests' reference")
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint, eval/)")
    p.add_argument("--img-size", type=int, default=None, help="classification resolution (default: training "
                                                              "size)")
    p.add_argument("--seg-img-size", type=int, default=None,
                   help="segmentation resolution (default: the larger of the training size and 16 patches)")
    p.add_argument("--mask-size", type=int, default=128, help="resolution at which Dice is computed")
    p.add_argument("--pool", default="mean", choices=["mean", "last4"], help="linear probe: mean pool or "
                                                                             "last 4 blocks")
    p.add_argument("--seg-head", default="linear", choices=["linear", "decoder"])
    p.add_argument("--pixels-size", type=int, default=32, help="raw-pixel baseline: image downsampled to "
                                                               "this side")
    p.add_argument("--epochs", type=int, default=100, help="epochs of the attentive probe (small data needs "
                                                           "many)")
    p.add_argument("--seg-epochs", type=int, default=30, help="epochs of the segmentation head")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random-init baseline encoder")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--no-baselines", action="store_true", help="skip the pixels baseline (random/--compare "
                                                               "stay)")
    r = p.add_argument_group("report generation (--task report)")
    r.add_argument("--report-section", default="findings", choices=["findings", "impression", "both"],
                   help="text to generate: FINDINGS (the IMPRESSION where a report has none), IMPRESSION, or "
                        "both")
    r.add_argument("--report-grid", type=int, default=4, help="with --report-prefix grid: tokens mean-pooled on "
                                                              "a G x G grid, G*G prefix tokens")
    r.add_argument("--report-width", type=int, default=256, help="decoder width")
    r.add_argument("--report-layers", type=int, default=4, help="decoder depth")
    r.add_argument("--report-epochs", type=int, default=30, help="decoder epochs (the best on val is kept: "
                                                                 "--report-select)")
    r.add_argument("--report-lr", type=float, default=5e-4, help="decoder AdamW learning rate (cosine "
                                                                 "schedule)")
    r.add_argument("--report-dropout", type=float, default=0.1, help="decoder dropout")
    r.add_argument("--report-max-len", type=int, default=100,
                   help="words per report: longer train reports are cut, decoding stops there")
    r.add_argument("--report-min-count", type=int, default=2,
                   help="train words seen fewer times become <unk>")
    r.add_argument("--report-prefix", default="tokens", choices=["tokens", "grid"],
                   help="decoder prefix: every patch token (LLaVA-style) or tokens pooled on --report-grid")
    r.add_argument("--report-aux", type=float, default=1.0,
                   help="weight of the auxiliary findings loss (labeler labels of the train reports, read at <bos>)")
    r.add_argument("--report-abnormal-weight", type=float, default=5.0,
                   help="loss weight of the words of sentences that state a finding (1 = unweighted)")
    r.add_argument("--report-decoder", default="guided", choices=["guided", "prefix"],
                   help="guided: a findings head on the frozen tokens (--report-head) says which findings the "
                        "image has (thresholds chosen for F1 on val), and one decoder trained to write a report "
                        "from findings (the oracle's) writes it; prefix: a decoder per encoder reading the "
                        "image tokens directly (LLaVA-style, --report-prefix); BENCHMARKS.md section 15 compares")
    r.add_argument("--report-head", default="attentive", choices=["linear", "grid", "attentive"],
                   help="--report-decoder guided: the findings head, one of the classification probes "
                        "(--epochs, --grid and --batch-size apply)")
    r.add_argument("--report-select", default="ce", choices=["ce", "loss"],
                   help="keep the epoch with the best val CE F1 macro (ties: val loss), or the lowest val loss")
    quick = ", ".join(f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
                      for k, v in QUICK.items())
    p.add_argument("--quick", action="store_true", help="the <= 5-minute evaluation for the README quick "
                   f"start: {quick}, features at 2x the training resolution; flags given explicitly win")
    args = p.parse_args(argv)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")]
    for k, v in QUICK.items() if args.quick else ():
        if not any(a.split("=")[0] == "--" + k.replace("_", "-") for a in given):
            setattr(args, k, v)
    return args


# Every numeric flag's smallest value, checked before any work (None = "default" where the flag allows it).
AT_LEAST = {"grid": 1, "img_size": 1, "seg_img_size": 1, "mask_size": 1, "pixels_size": 1, "epochs": 1,
            "seg_epochs": 1, "batch_size": 1, "n_boot": 1, "seed": 0, "random_seed": 0,
            "report_grid": 1, "report_width": 1, "report_layers": 1, "report_epochs": 1, "report_max_len": 1,
            "report_min_count": 1}


def check_args(args):
    """Flag ranges, the device and --out (a writable folder that no other run uses), before anything loads.
    -> (device, out, the lock on out)."""
    for k, lo in AT_LEAST.items():
        v = getattr(args, k)
        if v is not None and v < lo:
            raise EvalError(f"--{k.replace('_', '-')} must be at least {lo} (got {v})")
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
    except RuntimeError:
        raise EvalError(f"--device {args.device!r}: must be auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise EvalError(f"--device {args.device!r}: must be auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: CUDA is not available here")
    safe = "".join(c if c.isalnum() else "_" for c in args.ckpt)
    out = args.out or (os.path.join("runs", "eval_" + safe) if is_external(args.ckpt)
                       else os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval"))
    return device, out, plumbing.claim_out(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ablate"]:                                  # moved to the measurement room (bench/)
        print(f"error: the ablation harness moved; run: python -m bench.ablate {shlex.join(argv[1:])}",
              file=sys.stderr)
        return 2
    try:
        return run(parse_args(argv))
    except plumbing.BadInput as e:                              # EvalError, and every file plumbing refuses
        print(f"error: {e}", file=sys.stderr)
        return 2
    # disk full, permissions, a file vanishing mid-run: the OS reason and the path, one line
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2


def report_gen():
    """report_gen.py (--task report) builds on this file's metrics, pooling and statistics: imported where it
    is used, so that when the two load, the imports run one way."""
    if __package__:
        from . import report_gen as module
    else:
        import report_gen as module
    return module


def run(args):
    """The protocol: encoders -> data -> features -> classification, segmentation, report generation (each
    saves metrics.json and report.md when it ends: a kill leaves the tasks done so far) -> pictures."""
    t0, lines = time.time(), []

    def log(msg):
        tqdm.write(msg)            # above the progress bars, which redraw below it
        sys.stdout.flush()
        lines.append(msg)
    device, out, lock = check_args(args)
    try:
        encoders, sources = load_encoders(args, device, log)
        patch, cls_size, seg_size = resolutions(encoders, args)
        data = read_prepared(args.data, args.task)
        do_cls, do_seg, texts = plan_tasks(args, data, log)         # reports.csv is read now, before any work
        images = load_images(data)
        log(f"data: {len(images)} images {tuple(images.shape[1:])}, splits "
            f"{ {s: int((data['split'] == s).sum()) for s in plumbing.SPLITS} }, labels "
            f"{data['label_names']}, structures {data['structures']}; device {device}")
        # one per size
        sizes = sorted({*([cls_size] if do_cls or texts else []), *([seg_size] if do_seg else [])})
        feats = encode(encoders, images, sizes, cls_size, patch, args, device, os.path.join(out, "cache"))
        names = list(encoders) + ([] if args.no_baselines else ["pixels"])
        # label-free feature health (effective rank, position share) on <= 500 train images, at the first size
        geo_rows = np.flatnonzero(data["split"] == "train")[:500]
        geometry = {n: feature_geometry(feats[(n, sizes[0])]["tokens"], geo_rows) for n in names}
        for n, gm in geometry.items():
            log(f"features {n} @{sizes[0]}: effective rank {gm['erank']:.1f} of {gm['dim']} (content "
                f"{gm['erank_content']:.1f}), position share of variance {gm['position_share']:.2f}")
        test_rows = np.flatnonzero(data["split"] == "test")
        pats = data["patients"][test_rows]
        # positions within test, per patient
        groups = [np.flatnonzero(pats == p) for p in dict.fromkeys(pats)]
        resamples = bootstrap_indices(groups, args.n_boot, args.seed)
        probes = [p for p in ("linear", "grid", "attentive") if p in args.probe or "all" in args.probe]
        m = {"main": "jepa", "compare": "random" if args.compare == "random" else "other",
             "encoders": sources, "labels": data["label_names"],
             "structures": data["structures"] if do_seg else []}
        m["config"] = {**vars(args), "probes": probes, "cls_img_size": cls_size, "seg_img_size": seg_size,
                       "seg_grid": seg_size // patch, "cls_grid": cls_size // patch, "device": str(device),
                       "train_config": encoders["jepa"].config, "n_test": int(len(test_rows)),
                       "grids": {"linear_l2": LINEAR_L2, "attentive_lr": ATTENTIVE_LR, "seg_lr": SEG_LR},
                       "bootstrap": "patients resampled with replacement, percentile 95% CI",
                       "p_value": "min(1, 2*min((#d<=0 + 1)/(B+1), (#d>=0 + 1)/(B+1)))"}
        m["features"] = {"img_size": sizes[0], "n_images": int(len(geo_rows)), **geometry}
        m["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__}
        m["pretraining"] = None if is_external(args.ckpt) else pretraining_summary(args.ckpt)
        if m["compare"] == "random" and (m["pretraining"] or {}).get("images_seen", 1e9) < MIN_IMAGES_TO_WIN:
            log(f"warning: {too_short_text(m['pretraining'])}")

        def save(status):          # after every task, atomically: a kill leaves the tasks done so far
            m["status"], m["seconds"], m["log"] = status, round(time.time() - t0, 1), lines
            m["verdict"] = verdict(m)
            plumbing.write_json(os.path.join(out, "metrics.json"), m)
            plumbing.write_text(os.path.join(out, "report.md"), make_report(m))
        curves, seg_out, examples = {}, None, None
        if do_cls:
            m["classification"], curves = run_classification(feats, names, probes, cls_size, data, test_rows,
                                                              resamples, args, device, log)
            save("partial: classification done" + (", segmentation still to run" if do_seg else ""))
        if do_seg:
            m["segmentation"], seg_out = run_segmentation(feats, names, seg_size, data, test_rows, resamples,
                                                          args, device, log)
            if texts:
                save("partial: classification and segmentation done, report generation still to run")
        if texts:
            m["report"], examples = report_gen().report_task(data, texts, feats, names, cls_size, args,
                                                             device, log)
        save("complete")                                   # metrics.json keeps the log: every val score tried
        log(m["verdict"]["text"])
        draw_pictures(out, images, data, feats, list(encoders), curves, seg_out, examples, test_rows,
                      seg_size if do_seg else cls_size)
        log(f"wrote {out}/metrics.json, report.md and pictures in {time.time() - t0:.0f}s")
        return 0
    finally:
        lock.close()


def load_encoders(args, device, log):
    """The checkpoint's EMA target encoder ("jepa"), a random-init twin ("random"), --compare ("other"), each
    a RadJEPA checkpoint or an external timm:/hf: encoder (encoders.py). -> (encoders, their descriptions)."""
    def load(path, **kw):
        if is_external(path):
            return load_external(path, device=str(device), **kw)
        try:
            return radjepa.load_encoder(path, device=str(device), **kw)
        except ValueError as e:                                 # plumbing.BadInput: a checkpoint it refuses
            msg = str(e).splitlines()[0]
            raise EvalError(msg if path in msg else f"{path}: {msg}") from None
    encoders = {"jepa": load(args.ckpt)}
    encoders["random"] = load(args.ckpt, random_init=True, seed=args.random_seed)
    if args.compare != "random":
        encoders["other"] = load(args.compare)
    sources = {n: e.describe() if isinstance(e, ExternalEncoder) else f"{p} (RadJEPA EMA target encoder)"
               for n, e, p in (("jepa", encoders["jepa"], args.ckpt),
                               ("other", encoders.get("other"), args.compare)) if e is not None}
    sources = {"jepa": sources["jepa"], "random": f"the architecture of {args.ckpt}, randomly initialised "
               f"(seed {args.random_seed})", **sources}                # the order of the report's tables
    if not args.no_baselines:
        sources["pixels"] = ("raw pixels (the image downsampled for the linear probes, each patch's pixels "
                             "as its token)")
    for n, src in sources.items():
        log(f"encoder {n}: {src}")
    return encoders, sources


def resolutions(encoders, args):
    """-> (patch, classification size, segmentation size), from a RadJEPA encoder's patch and training size
    (external encoders run at their own; they set the sizes only when all are external)."""
    ref = next((e for e in encoders.values() if not isinstance(e, ExternalEncoder)), encoders["jepa"])
    patch, train_size = ref.patch_size, int(ref.config.get("img_size", 224))
    cls_size = args.img_size or (2 * train_size if args.quick else train_size)
    seg_size = args.seg_img_size or (2 * train_size if args.quick else max(train_size, 16 * patch))
    for name, enc in encoders.items():
        # those resize themselves
        for s in (cls_size, seg_size) if not isinstance(enc, ExternalEncoder) else ():
            if s % enc.patch_size:
                raise EvalError(f"image size {s} is not a multiple of the patch size {enc.patch_size} "
                                f"({name})")
    return patch, cls_size, seg_size


def plan_tasks(args, data, log):
    """Which tasks run, each logged when skipped. -> (do_cls, do_seg, the report texts or None). reports.csv
    is read and checked here, before any feature is extracted."""
    has_reports = os.path.isfile(os.path.join(args.data, "reports.csv"))
    if args.task == "report" and not has_reports:
        raise EvalError(f"{args.data}: --task report needs reports.csv (data_prep.py writes it where reports "
                        "exist)")
    # --quick leaves report generation out of --task all (a decoder per encoder: minutes more)
    do_report = (args.task == "report" or args.task == "all" and not args.quick) and has_reports
    do_cls = args.task in ("cls", "all") and data["has_cls"]
    do_seg = args.task in ("seg", "all") and bool(data["structures"])
    if args.task == "all" and not do_cls:
        log("skip classification: labels.csv has no label with known values in train")
    if args.task == "all" and not do_seg:
        log("skip segmentation: the dataset has no masks/")
    if args.task == "all" and not do_report:
        log("skip report generation: " + ("--quick (run it with --task report)" if has_reports
                                          else "the dataset has no reports.csv"))
    if not (do_cls or do_seg or do_report):
        raise EvalError(f"{args.data}: nothing to probe (no label with known values in train, no masks/)")
    if not do_report:
        return do_cls, do_seg, None
    texts = report_texts(data, args.report_section)
    n = [sum(bool(t) for t, sp in zip(texts, data["split"]) if sp == s) for s in plumbing.SPLITS]
    if not all(n):
        raise EvalError(f"{os.path.join(args.data, 'reports.csv')}: --task report needs reports in train, "
                        f"val and test (have {n[0]}, {n[1]}, {n[2]})")
    return do_cls, do_seg, texts


def encode(encoders, images, sizes, cls_size, patch, args, device, cache):
    """Features once per (encoder, resolution), cached by content in OUT/cache; raw pixels are recomputed
    (cheap). -> {(name, size): {"tokens", "pooled"}}."""
    data_fp = hashlib.sha256(images.numpy().data).hexdigest()     # the pixels themselves, in order
    ckpt_of = {"jepa": args.ckpt, "random": args.ckpt, "other": args.compare}
    feats = {}
    for name, enc in encoders.items():
        for size in sizes:
            last4 = args.pool == "last4" and size == cls_size
            # its own resolution, from the originals
            esize = enc.size[0] if isinstance(enc, ExternalEncoder) else size
            key = {"ckpt": source_fingerprint(ckpt_of[name]), "encoder": name, "random_seed": args.random_seed
                   if name == "random" else None, "img_size": esize, "pool": "last4" if last4 else "mean",
                   "data": data_fp, "n": len(images)}
            tok, pooled = cached_features(cache, key, lambda: extract_tokens(
                enc, images, esize, device, args.batch_size, last4, desc=f"features {name} @{esize}"))
            feats[(name, size)] = {"tokens": tok, "pooled": pooled}
    if not args.no_baselines:
        for size in sizes:
            tok, pooled = pixel_features(images, size, patch, args.pixels_size)
            feats[("pixels", size)] = {"tokens": tok, "pooled": pooled}
    return feats


def run_classification(feats, names, probes, size, data, test_rows, resamples, args, device, log):
    """Every encoder x probe, then the paired tests of the main encoder against every other, probe by probe.
    -> (metrics["classification"], PR curves per label for the picture)."""
    cls, samples, curves = {}, {}, {}
    y = data["labels"][test_rows]
    for name in names:
        for probe in probes:
            log(f"classification: {name} / {probe}")
            scores, hp = fit_classification(probe, feats[(name, size)], data, args, device, log)
            stats, smp = cls_statistics(scores, data, resamples, test_rows, f"bootstrap {name}/{probe}")
            stats["hparams"] = hp
            cls[f"{name}/{probe}"], samples[f"{name}/{probe}"] = stats, smp
            for j, lab in enumerate(data["label_names"]):
                k = np.isfinite(y[:, j])
                if stats["labels"][lab]["auroc"] is not None:
                    curves.setdefault(lab, []).append((name, probe, *pr_curve(y[k, j], scores[k, j])))
            log(f"    test macro AUROC {fmt(stats['macro']['auroc'], stats['macro'].get('auroc_ci'))}  "
                f"AUPRC {fmt(stats['macro']['auprc'], stats['macro'].get('auprc_ci'))}")
    val = lambda r: (lambda n, m: r["macro"][m] if n == "macro" else r["labels"][n][m])  # noqa: E731
    keys = [(n, m) for n in data["label_names"] + ["macro"] for m in ("auroc", "auprc")]
    for probe in probes:
        a = f"jepa/{probe}"
        cls[a]["vs"] = {}
        for other in names[1:]:
            b = f"{other}/{probe}"
            tests = compare(samples[a], samples[b], val(cls[a]), val(cls[b]), keys)
            per = {mt: [tests[n][mt]["verdict"] for n in data["label_names"] if n in tests]
                   for mt in ("auroc", "auprc")}
            cls[a]["vs"][other] = {"tests": tests, "n_labels": len(per["auroc"]),
                                   "n_better": {mt: v.count("better") for mt, v in per.items()},
                                   "n_worse": {mt: v.count("worse") for mt, v in per.items()}}
    return cls, curves


def run_segmentation(feats, names, size, data, test_rows, resamples, args, device, log):
    """Every encoder's segmentation head, then the paired tests of the main encoder against every other.
    -> (metrics["segmentation"], (predicted test masks per encoder, the masks, the annotated test rows))."""
    masks = load_masks(data, args.mask_size)
    seg, samples, preds = {}, {}, {}
    for name in names:
        log(f"segmentation: {name}")
        pred, te_rows, hp = fit_segmentation(feats[(name, size)], masks, data, args, device, log)
        pos = {r: i for i, r in enumerate(te_rows)}
        # resamples index all test rows; the seg test rows are those annotated: map positions, drop the others
        seg_res = [np.array([pos[r] for r in test_rows[idx] if r in pos], dtype=int) for idx in resamples]
        per, samples[name] = seg_statistics(pred, masks, data["structures"], te_rows, seg_res,
                                            f"bootstrap {name}/seg")
        seg[name], preds[name] = {"dice": per, "hparams": hp}, pred
        log(f"    test mean Dice {fmt(per.get('mean', {}).get('dice'), per.get('mean', {}).get('dice_ci'))}")
    val = lambda r: (lambda n, m: r["dice"][n][m])  # noqa: E731
    keys = [(s, m) for s in data["structures"] + ["mean"] for m in ("dice", "dice_pos")]
    seg["jepa"]["vs"] = {o: compare(samples["jepa"], samples[o], val(seg["jepa"]), val(seg[o]), keys)
                         for o in names[1:]}
    return seg, (preds, masks, te_rows)


def draw_pictures(out, images, data, feats, encoders, curves, seg_out, examples, test_rows, size):
    """pr_curves.png, seg_overlays.png, report_examples.png (for the tasks that ran), pca_features.png."""
    if curves:
        draw_pr_curves(curves, data["label_names"], os.path.join(out, "pr_curves.png"))
    if examples:
        report_gen().draw_report_examples(images, examples, os.path.join(out, "report_examples.png"))
    if seg_out:
        preds, masks, te_rows = seg_out
        draw_seg_overlays(images, preds, masks, data["structures"], te_rows,
                          os.path.join(out, "seg_overlays.png"))
    draw_pca(images, {n: feats[(n, size)]["tokens"] for n in encoders}, list(test_rows[:4]),
             os.path.join(out, "pca_features.png"))


if __name__ == "__main__":
    sys.exit(main())
