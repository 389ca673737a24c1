"""
eval.py: frozen-encoder probes for RadJEPA checkpoints, with confidence intervals and significance tests.

The RadJEPA paper's claims are probe results: a frozen encoder, a small trained head, AUROC/AUPRC on disease labels and
Dice on anatomy, with paired significance tests between encoders. This file produces those numbers for any checkpoint
written by radjepa.py on any prepared dataset written by data_prep.py (layout: images/, masks/, labels.csv, meta.json).

    python eval.py --ckpt runs/x/ckpt.pt --data prep/ [--task cls|seg|report|all] [--probe linear|grid|attentive|all]
                   [--compare OTHER.pt|random] [--out DIR]

What one run does, top to bottom (the file reads in the same order):
  1. metrics: AUROC, average precision (AUPRC), PR curve, Dice; bootstrap CIs and paired bootstrap p-values.
  2. data: read the prepared folder, check it has what the task needs.
  3. features: run each frozen encoder once over every image (cached in OUT/cache/), keep the patch tokens (fp16).
     Encoders in one run: the checkpoint's EMA target encoder ("jepa"), the same architecture randomly initialised
     ("random"), raw pixels ("pixels": a downsampled image for the linear probe, the patch's pixels as its "token"),
     and optionally a second checkpoint ("other", via --compare OTHER.pt). --ckpt and --compare also take external
     encoders, timm:NAME_OR_DIR and hf:NAME_OR_DIR (Rad-DINO, DINOv2, any timm model), through one adapter (3b).
  4. probes: linear (logistic regression on mean-pooled tokens, L-BFGS), grid (the same on tokens mean-pooled per cell
     of a 4x4 partition of the patch grid: coarse position kept), attentive (one learned query cross-attending over
     the patch tokens), segmentation head (per-patch linear, or a small conv decoder, on the token grid).
     Hyper-parameters are chosen on the val split only; the chosen probe is applied to the test split once.
  5. report: metrics.json, report.md, pr_curves.png, seg_overlays.png, pca_features.png (all written atomically).
  Report generation (--task report, needs reports.csv): frozen tokens -> MLP projector -> prefix of a small causal
     decoder; BLEU-1..4, ROUGE-L and clinical efficacy against baselines; report_examples.png. Its own section below.
  `python eval.py ablate OUT ... -- RECIPE` (section 10) runs the recipe's one-factor ablation table with these probes.

Protocol definitions (exact, so the numbers can be checked):
  * AUROC = Mann-Whitney U / (n_pos * n_neg), ranks with ties averaged (a tie between a positive and a negative
    counts one half). AUPRC = average precision, sklearn's step definition AP = sum_n (R_n - R_{n-1}) P_n over the
    distinct score thresholds (tied scores enter together), no interpolation. Prevalence = n_pos / n_known on test.
    A label whose test set holds a single class has AUROC/AUPRC null with a reason, and is left out of macro means.
  * Dice per image and structure = 2|P∩G| / (|P| + |G|) on binary masks at --mask-size, 1 when both are empty.
    An absent mask file means "not annotated": that image is left out for that structure. Reported twice: the mean
    over all annotated test images ("dice"), and over those where the structure is present ("dice_pos"; for a rare
    finding the first is mostly empty-vs-empty = 1, the second is the lesion-segmentation number).
  * Bootstrap: B resamples (--n-boot, default 1000, seeded) of the test *patients* with replacement (all images of a
    drawn patient enter; one image per patient reduces this to the usual image bootstrap). The same resamples are used
    for every encoder, so differences are paired. 95% CI = 2.5th and 97.5th percentiles of the resampled statistic
    (resamples where it is undefined, e.g. a single class, are dropped). Macro mean per resample = mean over labels.
  * Paired test of encoder A vs B (same probe, same test images): d_b = m_A(b) - m_B(b) per resample b, then
    p = min(1, 2 * min((#{d_b <= 0} + 1) / (B + 1), (#{d_b >= 0} + 1) / (B + 1))), two-sided; the +1 keeps p above 0
    with a finite B (smallest reportable p = 2/(B+1)). A label counts as "significantly better" when p < 0.05 and
    the point difference > 0 ("worse" when p < 0.05 and it is < 0).
"""
import argparse
import collections
import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

SPLITS = ("train", "val", "test")
# Hyper-parameter grids, searched on the val split. Small on purpose: the probe must not carry the result.
LINEAR_L2 = (1e-4, 1e-3, 1e-2, 1e-1)      # L2 penalty on the logistic-regression weights (features are standardized)
ATTENTIVE_LR = (3e-4, 1e-3, 3e-3)          # AdamW learning rate of the attentive probe (weight decay fixed at 0.05)
SEG_LR = (1e-3, 1e-2)                      # AdamW learning rate of the segmentation head (weight decay 1e-4)
# --quick: the evaluation to run right after the README quick start (<= 5 min on 2 CPU cores). It keeps the probes
# where JEPA beats random init first (BENCHMARKS.md): the grid probe (a 200-step run wins there) and segmentation
# (the clearest win at 1,000 steps), read at twice the training resolution (the default of --img-size and
# --seg-img-size under --quick), and drops the slow attentive probe. Flags given explicitly win over these values.
QUICK = dict(probe=["linear", "grid"], seg_epochs=15, n_boot=500, mask_size=64)
# The shortest pretraining (steps x batch images) measured to beat random init on these phantoms (BENCHMARKS.md
# sections 1 and 9: 1,000 steps of 64 at 128 px win segmentation and the grid probe; the 600-step quick start (19,200
# images) and a 1,200-step variant (38,400) did not win at all; on phantom version 2, section 11, 500 steps (32,000)
# win nothing and 1,000 win the linear probe and segmentation); shorter checkpoints get a warning, and a verdict
# without a win says why.
MIN_IMAGES_TO_WIN = 64000


class EvalError(Exception):
    """A problem with the user's input (checkpoint, dataset, flags): main() prints it as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------------
# 1. Metrics (numpy, no sklearn)

def _ranks(s):
    """1-based ranks of s, ties get the average of the ranks they span (the Mann-Whitney convention)."""
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # boundaries of runs of equal values in the sorted array
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], len(s)]                      # run i covers sorted positions [starts[i], ends[i])
    avg = (starts + ends + 1) / 2.0                       # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(y, s):
    """Area under the ROC curve; None when y holds a single class (undefined, not 0.5)."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum()); n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    r = _ranks(np.asarray(s, dtype=np.float64))
    # U = (sum of positive ranks) - n_pos(n_pos+1)/2 counts the (pos, neg) pairs ordered correctly, ties as 1/2
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _pr_points(y, s):
    """Precision and recall at every distinct threshold, from the highest score down (tied scores enter together)."""
    y = np.asarray(y).astype(np.float64)
    order = np.argsort(-np.asarray(s, dtype=np.float64), kind="mergesort")
    s_sorted, y_sorted = np.asarray(s, dtype=np.float64)[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(y) - 1]   # index of the last item of each tie run
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    return tp / (tp + fp), tp / tp[-1]                    # precision, recall (non-decreasing)


def average_precision(y, s):
    """AUPRC as AP = sum_n (R_n - R_{n-1}) P_n (sklearn's definition); None when there is no positive or no negative."""
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
    """groups: list of index arrays (one per patient). Returns n_boot index arrays, patients drawn with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    return [np.concatenate([groups[g] for g in row]) for row in picks]


def bootstrap_stat(stat, resamples):
    """stat(idx) -> float or None; returns the statistic on each resample (nan where undefined)."""
    out = [stat(idx) for idx in resamples]
    return np.array([np.nan if v is None else v for v in out], dtype=np.float64)


def nanmean_rows(stack):
    """Mean over axis 0 ignoring nan (a label undefined in one resample); all-nan columns stay nan, silently."""
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


# ----------------------------------------------------------------------------------------------------------------------
# 2. The prepared dataset

LABEL_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": np.nan}   # the only label cells accepted; blank = unknown


def read_text(path):
    """A text file as str (UTF-8, a byte-order mark allowed); other bytes are an EvalError naming the file and line."""
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise EvalError(f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None


def read_prepared(root, task):
    """Reads labels.csv (+ masks/) of a prepared folder. Returns a dict of numpy arrays; raises EvalError if the
    folder lacks what `task` needs. Labels: float [N, L] with nan for unknown (blank cell).
    Refused, each naming the file, line (and column): a label cell other than 1 / 0 / blank (CheXpert's -1 or a 0.5
    would silently wreck a probe: map them with data_prep.py --uncertain), an image path that leaves the folder, an
    image listed twice (it would count twice in test), a row whose split is not train/val/test."""
    csv_path = os.path.join(root, "labels.csv")
    if not os.path.isfile(csv_path):
        raise EvalError(f"{root} is not a prepared dataset: labels.csv is missing (make one with data_prep.py)")
    reader = csv.reader(io.StringIO(read_text(csv_path), newline=""))
    header = next(reader, None)
    rows = [(reader.line_num, r) for r in reader if r]
    if header is None or header[:3] != ["image", "patient", "split"]:
        raise EvalError(f"{csv_path}: header must start with image,patient,split (got {header})")
    label_names = header[3:]
    ids, paths, patients, splits, labels, seen = [], [], [], [], [], {}
    for line, r in rows:
        where = f"{csv_path} line {line}"
        if len(r) != len(header):
            raise EvalError(f"{where}: the row has {len(r)} cells, the header has {len(header)}: {r[:3]}")
        if r[2] not in SPLITS:
            raise EvalError(f"{where}: split must be one of {', '.join(SPLITS)}, got {r[2]!r} for {r[0]}")
        img = os.path.normpath(r[0])
        if os.path.isabs(img) or img.split(os.sep)[0] in ("..", "."):
            raise EvalError(f"{where}: image path {r[0]!r} is empty or leaves the prepared folder")
        if img in seen:
            raise EvalError(f"{where}: image {r[0]!r} repeats line {seen[img]} (it would count twice)")
        seen[img] = line
        bad = [(name, c) for name, c in zip(label_names, r[3:]) if c.strip() not in LABEL_VALUES]
        if bad:
            raise EvalError(f"{where}, column {bad[0][0]!r}: label {bad[0][1]!r} is not 1, 0 or blank (unknown); "
                            f"map uncertain labels first (data_prep.py --uncertain)")
        paths.append(os.path.join(root, img))
        ids.append(os.path.splitext(os.path.basename(img))[0])
        patients.append(r[1]); splits.append(r[2])
        labels.append([LABEL_VALUES[c.strip()] for c in r[3:]])
    if len(set(ids)) != len(ids):
        dup = next(i for i, k in collections.Counter(ids).items() if k > 1)
        raise EvalError(f"{csv_path}: two images share the id {dup!r} (masks/<structure>/<id>.png would be ambiguous)")
    for s in SPLITS:
        if s not in splits:
            raise EvalError(f"{csv_path}: no image in the {s} split (probes train on train, pick hyper-parameters on "
                            f"val, report test)")
    split_of = {}                                  # a patient in two splits leaks test images into training
    for (line, r), sp in zip(rows, splits):
        first = split_of.setdefault(r[1], (sp, line))
        if first[0] != sp:
            raise EvalError(f"{csv_path} line {line}: patient {r[1]!r} is in {sp} here and in {first[0]} on line "
                            f"{first[1]}; splits must be by patient")
    mask_root = os.path.join(root, "masks")
    structures = sorted(d for d in os.listdir(mask_root) if os.path.isdir(os.path.join(mask_root, d))) \
        if os.path.isdir(mask_root) else []
    lab = np.array(labels, dtype=np.float64).reshape(len(ids), len(label_names))
    has_cls = len(label_names) > 0 and np.isfinite(lab[np.array(splits) == "train"]).any()
    if task == "cls" and not has_cls:
        raise EvalError(f"{root}: --task cls needs label columns with known values in labels.csv "
                        f"(found columns {label_names})")
    if task == "seg" and not structures:
        raise EvalError(f"{root}: --task seg needs masks/<structure>/<id>.png, but masks/ has no structure folder")
    if task == "all" and not has_cls and not structures:
        raise EvalError(f"{root}: no labels in labels.csv and no masks/: nothing to evaluate")
    return dict(root=root, ids=ids, paths=paths, patients=np.array(patients), split=np.array(splits),
                labels=lab, label_names=label_names, structures=structures, has_cls=has_cls)


def parallel_map(fn, items, desc):
    """map() over threads: PNG decoding releases the GIL, so 20k images + 6 masks each read ~8x faster on 8 cores."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:
        return list(tqdm(ex.map(fn, items), total=len(items), desc=desc, leave=False))


def load_images(data, radjepa):
    """All images as uint8 [N, S, S] (one read per image; resizing happens per encoder on the fly)."""
    def read(p):
        try:
            return np.round(radjepa.load_image(p) * 255).astype(np.uint8)
        except radjepa.BadImage as e:
            raise EvalError(f"{p}: unreadable image ({e})")
    imgs = parallel_map(read, data["paths"], "read images")
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise EvalError(f"{data['root']}: images differ in size {sorted(shapes)[:3]}; prepared images are all S x S")
    return torch.from_numpy(np.stack(imgs))


def load_masks(data, size):
    """Masks per structure: bool [N, size, size] and a known flag [N] (absent file = not annotated)."""
    def read(path):
        if not os.path.isfile(path):
            return None
        # area-resize the 0/255 mask and threshold at half: a pixel is "in" if most of it was
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L").resize((size, size), Image.BOX)) >= 128
        except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise EvalError(f"{path}: unreadable mask ({type(e).__name__}: {e})") from None
    out = {}
    for st in data["structures"]:
        ms = parallel_map(read, [os.path.join(data["root"], "masks", st, i + ".png") for i in data["ids"]],
                          f"read masks/{st}")
        known = np.array([m is not None for m in ms])
        zero = np.zeros((size, size), dtype=bool)
        out[st] = (np.stack([zero if m is None else m for m in ms]), known)
    return out


def resize(x, size):
    """x: float [B, 1, H, W] -> [B, 1, size, size] (antialiased bilinear, the same as training-time resizing)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Frozen features (cached)

@torch.no_grad()
def extract_tokens(encoder, images, size, device, batch_size=64, last4=False, desc="features"):
    """Runs a frozen encoder over all images at `size`. Returns tokens fp16 [N, g*g, D] (row-major patch grid) and the
    pooled feature fp32 [N, D] (mean over patches) or [N, 4D] (concatenated means of the last 4 blocks; fewer if
    the encoder is shallower)."""
    tokens, pooled = [], []
    # bf16 on a GPU (tokens are stored in fp16 anyway); plain fp32 on a CPU
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for i in tqdm(range(0, len(images), batch_size), desc=desc):
        x = resize(images[i:i + batch_size].to(device).float().div(255).unsqueeze(1), size)   # (B, 1, size, size)
        with amp:
            if last4:
                outs = encoder(x, n_last_blocks=4)                       # min(4, depth) x (B, N, D), last = final
                tok = outs[-1]
                pool = torch.cat([o.float().mean(1) for o in outs], -1)  # (B, 4D)
            else:
                tok = encoder(x)                                         # (B, N, D)
                pool = tok.float().mean(1)                               # (B, D)
        tokens.append(tok.half().cpu()); pooled.append(pool.float().cpu())
    return torch.cat(tokens), torch.cat(pooled)


def sincos_2d(g, dim=64):
    """Fixed 2-D sin-cos code of each cell of a g x g grid, row-major: [g*g, dim] (half rows, half columns)."""
    freqs = 1.0 / (100.0 ** (torch.arange(dim // 4) / (dim // 4)))        # (dim/4,) from 1 down to ~1/100
    r, c = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    code = [f(t.reshape(-1, 1) * freqs) for t in (r, c) for f in (torch.sin, torch.cos)]
    return torch.cat(code, 1)                                               # (g*g, dim)


def pixel_features(images, size, patch, pool_size):
    """The raw-pixel baseline. tokens [N, g*g, p*p + 64]: each patch's pixels at `size` (a linear head on them is a
    local filter) plus a sin-cos code of its position, as a ViT token has one (else the attentive probe would see a
    bag of patches); pooled [N, pool_size^2]: the whole image downsampled to pool_size x pool_size."""
    toks, pools = [], []
    g = size // patch
    pos = sincos_2d(g)
    for i in range(0, len(images), 256):
        x = resize(images[i:i + 256].float().div(255).unsqueeze(1), size)          # (B, 1, S, S)
        t = F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)            # (B, g*g, p*p), row-major grid
        t = torch.cat([t, pos.expand(len(t), -1, -1)], 2)                           # (B, g*g, p*p + 64)
        toks.append(t.half()); pools.append(resize(x, pool_size).flatten(1))        # (B, pool^2)
    return torch.cat(toks), torch.cat(pools)


def feature_geometry(tokens, rows, effective_rank, n_tokens=20000, seed=0):
    """Label-free health of a token set [N, g*g, D] over the given image rows (the train split):
    erank = effective rank (RankMe) of the patch tokens, erank_content = the same after removing each grid position's
    mean over images (what differs between images), position_share = share of the token variance that is that
    per-position mean. A JEPA whose target features squeeze into a few directions (dimensional collapse) shows a low
    erank while its across-batch std looks healthy."""
    t = tokens[torch.as_tensor(rows)].float()                                # (n, T, D)
    content = t - t.mean(0, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, t.shape[0] * t.shape[1], (min(n_tokens, t.shape[0] * t.shape[1]),), generator=g)
    flat, cflat = t.reshape(-1, t.shape[2])[pick], content.reshape(-1, t.shape[2])[pick]
    total = float(((t - t.mean((0, 1), keepdim=True)) ** 2).mean())
    return {"dim": int(t.shape[2]), "erank": effective_rank(flat), "erank_content": effective_rank(cflat),
            "position_share": 1.0 - float((content ** 2).mean()) / max(total, 1e-12)}


def cached_features(cache_dir, key_fields, compute):
    """Loads features from cache_dir if this exact (encoder content, size, pooling, image content) was extracted
    before, else computes and saves them (atomically). Returns (tokens, pooled). Cache files are read as tensors only
    (no pickled code runs); an unreadable one is recomputed."""
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
    tmp = path + ".tmp"
    torch.save({"tokens": tokens, "pooled": pooled, "key": key_fields}, tmp)
    os.replace(tmp, path)
    return tokens, pooled


def content_key(path):
    """sha256 of what an encoder (or dataset) is made of: a file's bytes, or every file under a folder (relative name
    and bytes, e.g. a Hugging Face model directory). Another checkpoint with the same size and mtime gets another
    key; a copied or touched file keeps its key. A name that is not a path (a hub model id) is its own key."""
    if not os.path.exists(path):
        return str(path)
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns)
    for f in files:
        h.update(os.path.relpath(f, path).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# 3b. External encoders: --ckpt / --compare timm:NAME_OR_DIR or hf:NAME_OR_DIR (Rad-DINO, DINOv2, any timm model).
# One adapter gives them the contract of radjepa.load_encoder, so every probe below runs unchanged on them.

EXTERNAL = ("timm:", "hf:")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_external(spec):
    return spec.startswith(EXTERNAL)


class ExternalEncoder(nn.Module):
    """A frozen timm / Hugging Face image model with load_encoder's contract: x float [B, 1, H, W] in [0, 1] -> patch
    tokens [B, N, D], row-major on the model's own square g x g grid. Per batch: resize to the model's input size
    (antialiased bilinear, the whole image: no centre crop, which would cut off the costophrenic angles), gray -> its
    number of channels (the same values in each), (x - mean) / std with its own statistics, run it, and drop the
    tokens that are not patches (CLS, registers, distillation token). Rad-DINO: 518 px, patch 14 -> 37 x 37 tokens.
    With n_last_blocks=k: a list of the last k blocks' tokens through the final norm (as for --pool last4)."""

    def __init__(self, spec, model, size, chans, mean, std, patch=None, nhwc=False):
        super().__init__()
        self.spec, self.model, self.size, self.chans, self.nhwc = spec, model.float().eval(), size, chans, nhwc
        for n, v in (("mean", mean), ("std", std)):             # one value for gray models, else one per channel
            v = [float(a) for a in v] * (chans if len(v) == 1 else 1)
            self.register_buffer(n, torch.tensor(v).view(1, -1, 1, 1))
        if self.mean.shape[1] != chans:
            raise EvalError(f"{spec}: mean/std have {self.mean.shape[1]} values, the model takes {chans} channels")
        self.requires_grad_(False)
        with torch.no_grad():                                   # one blank image tells where the patch tokens are
            out = self.run(torch.zeros(1, chans, size[0], size[1]))
        grid, self.n_prefix = None, 0
        if out.ndim == 4:                                       # a feature map: NCHW (CNNs), NHWC (timm Swin)
            grid = tuple(out.shape[1:3] if nhwc else out.shape[2:])
        elif out.ndim == 3:
            L, g = out.shape[1], (size[0] // patch, size[1] // patch) if patch else (0, 0)
            if g[0] and 0 <= L - g[0] * g[1] <= 8:              # ViT-like: [CLS, registers, ..., patch tokens]
                grid, self.n_prefix = g, L - g[0] * g[1]
            elif math.isqrt(L) ** 2 == L:                       # no patch size known (or hierarchical): all tokens
                grid = (math.isqrt(L),) * 2
        if not grid or grid[0] != grid[1] or grid[0] == 0:
            raise EvalError(f"{spec}: its output {tuple(out.shape)} at {size[0]}x{size[1]} px has no square patch grid "
                            f"(eval.py needs per-patch tokens [B, g*g (+ up to 8 CLS/register tokens), D])")
        self.grid, self.dim = int(grid[0]), int(out.shape[1 if out.ndim == 4 and not nhwc else -1])
        self.patch_size = size[0] // self.grid                  # pixels per token side (the pixel baseline uses it)
        self.config = {"img_size": size[0], "source": spec, "model": type(model).__name__, "grid": self.grid,
                       "dim": self.dim, "prefix_tokens_dropped": self.n_prefix, "channels": chans,
                       "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def describe(self):
        c = self.config
        return (f"{self.spec} ({c['model']}, {c['img_size']} px, {c['grid']}x{c['grid']} tokens of {c['dim']} dims, "
                f"{c['prefix_tokens_dropped']} CLS/register token(s) dropped, gray -> {c['channels']} channel(s), "
                f"mean {[round(v, 4) for v in c['mean']]}, std {[round(v, 4) for v in c['std']]})")

    def run(self, x, k=None):
        """The model's own output: [B, L, D] tokens or a [B, C, h, w] map (a list of the last k with k)."""
        if hasattr(self.model, "forward_features"):            # timm
            if k:                                               # min(k, taps), as load_encoder's min(k, depth)
                k = min(k, len(getattr(self.model, "feature_info", None) or getattr(self.model, "blocks", ())) or k)
                return self.model.forward_intermediates(x, indices=k, norm=True, output_fmt="NCHW",
                                                        intermediates_only=True)
            return self.model.forward_features(x)
        out = self.model(pixel_values=x, output_hidden_states=bool(k))
        if not k:
            return out.last_hidden_state
        norm = getattr(self.model, "layernorm", None)          # ViT / DINOv2: the final norm sits outside the blocks
        hidden = out.hidden_states[1:]                          # [0] is the embedding output, not a block's
        return [norm(h) if norm is not None and h.ndim == 3 else h for h in hidden[-k:]]

    def tokens(self, out, fmt_nhwc):
        if out.ndim == 4:
            return (out.flatten(1, 2) if fmt_nhwc else out.flatten(2).transpose(1, 2))   # [B, h*w, C]
        return out[:, self.n_prefix:]

    def forward(self, x, n_last_blocks=None):
        x = F.interpolate(x.float(), size=self.size, mode="bilinear", antialias=True, align_corners=False)
        x = (x.expand(-1, self.chans, -1, -1) - self.mean) / self.std
        if n_last_blocks:
            return [self.tokens(o, False) for o in self.run(x, n_last_blocks)]
        return self.tokens(self.run(x), self.nhwc)


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _load_timm(spec, name, random_init):
    try:
        import timm
        import timm.data
    except Exception as e:  # not installed, or a torchvision built for another torch ("torchvision::nms ... not exist")
        raise EvalError(f"{spec} needs timm: pip install timm (and a torchvision built for torch {torch.__version__}); "
                        f"import failed with {_first_line(e)}")
    if os.path.isdir(name):                                     # e.g. `radjepa.py export` output, or a hub snapshot
        cfg = _read_json(os.path.join(name, "config.json"))
        if not isinstance(cfg, dict) or "architecture" not in cfg:
            raise EvalError(f"{name}: not a timm model folder (no config.json with an 'architecture')")
        try:
            model = timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {}))
        except Exception as e:
            raise EvalError(f"{name}/config.json does not build a timm model ({_first_line(e)})")
        if not random_init:
            files = [os.path.join(name, f) for f in ("model.safetensors", "pytorch_model.bin")]
            w = next((f for f in files if os.path.isfile(f)), None)
            if w is None:
                raise EvalError(f"{name}: no weights (model.safetensors or pytorch_model.bin)")
            try:
                if w.endswith(".safetensors"):
                    import safetensors.torch
                    sd = safetensors.torch.load_file(w)
                else:
                    sd = torch.load(w, map_location="cpu", weights_only=True)
                model.load_state_dict(sd)
            except Exception as e:
                raise EvalError(f"{w}: cannot load into {cfg['architecture']} ({_first_line(e)})")
        pc = {**dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD), **cfg.get("pretrained_cfg", {})}
    else:
        try:
            model = timm.create_model(name, pretrained=not random_init, num_classes=0)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise EvalError(f"{spec}: unknown timm model name (see timm.list_models('*{name.split('.')[0][:8]}*'))")
            raise EvalError(f"{spec}: {_first_line(e)}")
        except Exception as e:                                  # no network and no cached weights, bad hub id, ...
            raise EvalError(f"{spec}: cannot get the pretrained weights ({_first_line(e)}); for a local copy pass "
                            f"timm:FOLDER (config.json + weights)")
        pc = timm.data.resolve_model_data_config(model)
    chans = int(pc["input_size"][0])
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return model, tuple(pc["input_size"][1:]), chans, pc["mean"], pc["std"], patch, \
        getattr(model, "output_fmt", "NCHW") == "NHWC"


def _hf_file(name, filename):
    if os.path.isdir(name):
        return _read_json(os.path.join(name, filename))
    try:
        from huggingface_hub import hf_hub_download
        return _read_json(hf_hub_download(name, filename))
    except Exception:
        return None


@contextlib.contextmanager
def _no_hub_kernels():
    """Keep transformers away from Hugging Face's `kernels` package while it imports and loads a model. transformers
    >= 5 depends on that package and, when it is installed, imports names from the top-level module `kernels`, which
    from the repository root is this project's `kernels/` (ImportError: cannot import name 'CUDAProperties'), and
    from_pretrained kernelizes by default. Here sys.modules['kernels'] = None, which find_spec reads as "not
    installed", and USE_HUB_KERNELS=NO: transformers keeps its plain PyTorch layers (hub kernels only swap in fused
    GPU layers; a frozen encoder gives the same tokens). Our package and the environment are put back afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "kernels" or k.startswith("kernels.")}
    env = os.environ.get("USE_HUB_KERNELS")
    for k in saved:
        del sys.modules[k]
    sys.modules["kernels"] = None
    os.environ["USE_HUB_KERNELS"] = "NO"
    try:
        yield
    finally:
        del sys.modules["kernels"]
        sys.modules.update(saved)
        if env is None:
            del os.environ["USE_HUB_KERNELS"]
        else:
            os.environ["USE_HUB_KERNELS"] = env


def import_transformers():
    """`import transformers` with its model code loaded (transformers.modeling_utils), safe from the repository root
    (_no_hub_kernels). Raises what the import raises."""
    with _no_hub_kernels():
        import transformers
        import transformers.modeling_utils  # noqa: F401  (pulls in its hub-kernel integration now, inside the guard)
        return transformers


def _load_hf(spec, name, random_init):
    try:
        transformers = import_transformers()
    except Exception as e:
        raise EvalError(f"{spec} needs transformers: pip install transformers (import failed with {_first_line(e)})")
    with _no_hub_kernels():
        return _load_hf_model(transformers, spec, name, random_init)


def _load_hf_model(transformers, spec, name, random_init):
    import inspect
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise EvalError(f"{name}: not a Hugging Face model folder (no config.json)")
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise EvalError(f"{name}: no such folder (hf: takes a local folder or a hub name like microsoft/rad-dino)")
    transformers.utils.logging.disable_progress_bar()          # its per-tensor loading bar; warnings stay on
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        model = (transformers.AutoModel.from_config(config) if random_init
                 else transformers.AutoModel.from_pretrained(name))
    except Exception as e:                                      # unknown name, offline, not a model, unknown type, ...
        raise EvalError(f"{spec}: cannot load a model ({_first_line(e)})")
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise EvalError(f"{spec}: {type(model).__name__} is not an image encoder (it takes no pixel_values)")
    pp = _hf_file(name, "preprocessor_config.json") or {}
    size = getattr(config, "image_size", 224)
    for key in ("crop_size", "size"):                           # the model's input size, as its processor sets it
        v = pp.get(key) if key == "size" or pp.get("do_center_crop", True) else None
        if isinstance(v, int) or (isinstance(v, dict) and ("height" in v or "shortest_edge" in v)):
            size = v if isinstance(v, int) else (v["height"], v["width"]) if "height" in v else v["shortest_edge"]
            break
    size = (size, size) if isinstance(size, int) else tuple(size)
    norm = pp.get("do_normalize", True)
    mean, std = (pp.get("image_mean", IMAGENET_MEAN), pp.get("image_std", IMAGENET_STD)) if norm else ([0.0], [1.0])
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return model, size, int(getattr(config, "num_channels", 3)), mean, std, patch, False


def load_external(spec, device="cpu", random_init=False, seed=0):
    """timm:NAME (pretrained weights, downloaded once by timm), timm:FOLDER (config.json + weights, e.g. written by
    `radjepa.py export`), hf:NAME (Hugging Face hub, e.g. hf:microsoft/rad-dino) or hf:FOLDER (a saved model, works
    offline) -> ExternalEncoder. random_init=True: the same architecture with fresh weights (nothing downloaded for
    timm; hf reads only config.json)."""
    kind, name = spec.split(":", 1)
    name = os.path.expanduser(name)
    if not name:
        raise EvalError(f"{spec}: give a model name or folder after '{kind}:'")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, size, chans, mean, std, patch, nhwc = (_load_timm if kind == "timm" else _load_hf)(spec, name,
                                                                                                  random_init)
    try:
        return ExternalEncoder(spec, model, size, chans, mean, std, patch, nhwc).to(device)
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(f"{spec}: a {size[0]}x{size[1]} px, {chans}-channel image does not run ({_first_line(e)})")


def source_fingerprint(spec):
    """Feature-cache key of an encoder source, by content (content_key): a checkpoint file's bytes; timm:/hf: the
    name, plus for a local folder every file in it (new weights in the same folder give a new key)."""
    if not is_external(spec):
        return content_key(spec)
    name = os.path.expanduser(spec.split(":", 1)[1])
    return {"source": spec, **({"content": content_key(name)} if os.path.isdir(name) else {})}


# ----------------------------------------------------------------------------------------------------------------------
# 4. Probes (torch). All take standardized inputs: mean/std from the train split only.

def standardizer(x_train):
    """Per-feature mean and std over the train rows (x_train: [N, F] or [N, T, F]); std floored to avoid 1/0."""
    flat = x_train.float().reshape(-1, x_train.shape[-1])
    return flat.mean(0), flat.std(0).clamp_min(1e-6)


def grid_pool(tokens, G, chunk=256):
    """tokens [N, g*g, D] (row-major grid) -> [N, G*G*D]: mean over each cell of a G x G partition of the patch grid,
    concatenated. A linear probe on it keeps coarse position (which region holds what), as the raw-pixel probe on a
    32x32 image does, while mean pooling (G = 1) keeps none: an enlarged heart or a blunted costophrenic angle is a
    change in *where* things are, which a global mean cannot see."""
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


def macro_auroc(y, scores):
    """Mean AUROC over labels defined on these rows (for val-split model selection)."""
    vals = []
    for j in range(y.shape[1]):
        k = np.isfinite(y[:, j])
        a = auroc(y[k, j], scores[k, j])
        if a is not None:
            vals.append(a)
    return float(np.mean(vals)) if vals else float("nan")


def train_linear(x, y, l2, iters=100):
    """Logistic regression, all labels at once: full-batch L-BFGS on masked BCE + l2 * ||W||^2.
    x: [N, F] standardized, y: [N, L] (nan = unknown). Returns (W [F, L], b [L])."""
    W = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    prev = torch.nanmean(y, 0).nan_to_num(0.5).clamp(0.01, 0.99)
    b = torch.log(prev / (1 - prev)).clone().requires_grad_(True)     # start at the prevalence: a sensible bias
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
    """One learned query cross-attending over the patch tokens (V-JEPA's attentive probe, one block), then LN + linear.
    Unlike mean pooling it can single out the few patches that hold a small finding.

    The parameters are those of nn.MultiheadAttention (the test checks we compute exactly what it computes), but with a
    single query the attention can be rearranged to cost O(N*D*H) instead of O(N*D^2):
      score_h(i) = q_h . (Wk_h x_i + bk_h) / sqrt(dh) = x_i . (Wk_h^T q_h) / sqrt(dh) + const  (cancels in softmax)
      out_h      = sum_i a_h(i) (Wv_h x_i + bv_h)    = Wv_h (sum_i a_h(i) x_i) + bv_h            (weights sum to 1)
    i.e. per head a learned *weighted mean* of the raw tokens, then the value projection. On a CPU this makes the probe
    ~100x cheaper, so it can be trained for enough steps."""

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
        bq, _, bv = self.attn.in_proj_bias.chunk(3)           # the key bias only adds a per-head constant: dropped
        q = (Wq @ self.query[0, 0] + bq).view(H, dh)          # (H, dh) the query, per head
        u = torch.einsum("hd,hdD->hD", q, Wk.view(H, dh, D)) / math.sqrt(dh)   # (H, D) query folded into key space
        a = torch.softmax(tok @ u.T, dim=1)                   # (B, N, H) attention of each head over the N patches
        mean = torch.einsum("bnh,bnD->bhD", a, tok)          # (B, H, D) per-head weighted mean of the tokens
        v = torch.einsum("bhD,hdD->bhd", mean, Wv.view(H, dh, D)) + bv.view(H, dh)   # (B, H, dh)
        return self.attn.out_proj(v.reshape(B, D))            # (B, D), heads concatenated, output projection

    def forward(self, tok):
        return self.head(self.norm(self.pool(tok)))           # (B, L) logits


def n_heads(dim):
    return next(h for h in (8, 4, 2, 1) if dim % h == 0 and dim // h >= 16) if dim >= 16 else 1


def train_loop(model, loss_fn, n, epochs, lr, wd, batch_size, seed, device, desc="probe"):
    """AdamW with a cosine schedule, mini-batches of row indices into the train split; loss_fn(model, idx) -> loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
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
    """Segmentation from frozen patch tokens on a g x g grid: 'linear' = one logit per patch and structure (a 1x1 conv),
    'decoder' = 3x3 conv -> GELU -> 2x up -> 3x3 conv -> GELU -> 1x1 conv. Both are bilinearly upsampled to the mask."""

    def __init__(self, dim, n_out, kind):
        super().__init__()
        if kind == "linear":
            self.net = nn.Conv2d(dim, n_out, 1)
        else:
            self.net = nn.Sequential(nn.Conv2d(dim, 128, 3, padding=1), nn.GELU(),
                                     nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                     nn.Conv2d(128, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, n_out, 1))

    def init_bias(self, prior):
        """Start every pixel at the train-set foreground fraction (logit): a rare structure (a nodule) then starts
        'absent' instead of covering half the image, so short training does not decide the result."""
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
    soft_dice = 1 - (2 * inter + 1) / (total + 1)             # (B, S), +1 smooths the empty-vs-empty case to 0 loss
    return bce + (soft_dice * known).sum() / known.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Running the probes for one encoder (fit on train, select on val, predict test once)

def fit_classification(probe, feats, data, args, device, log):
    """Returns test-split scores [n_test, L] (probabilities) and the chosen hyper-parameters."""
    sp = data["split"]
    y = torch.tensor(data["labels"], dtype=torch.float32)
    tr, va, te = (torch.from_numpy(np.flatnonzero(sp == s)) for s in SPLITS)
    y_val = data["labels"][va.numpy()]
    if probe in ("linear", "grid"):
        x = feats["pooled"].float() if probe == "linear" else grid_pool(feats["tokens"], args.grid)
        mu, sd = standardizer(x[tr]); x = (x - mu) / sd
        best = None
        for l2 in tqdm(LINEAR_L2, desc=f"{probe} probe L2 grid", leave=False):
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
    for lr in ATTENTIVE_LR:
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
    tr, va, te = (torch.from_numpy(np.flatnonzero((sp == s) & known.numpy().any(1))) for s in SPLITS)
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
        d = [dice_per_image(pred[:, j], gt[rows, j].numpy())[known[rows, j].numpy()] for j in range(len(structs))]
        return float(np.mean([v.mean() for v in d if len(v)])), pred       # mean over structures annotated here

    # The training loss is computed at L = 4x the token grid (64 px for 16x16 tokens), on area-averaged (soft) masks:
    # a linear head cannot draw finer than its grid anyway, and the loss at 128 px cost 4x more (the CPU bottleneck).
    # Dice is still measured at R.
    g = int(round(math.sqrt(tok.shape[1])))
    L = min(R, 4 * g)
    gt_tr = F.adaptive_avg_pool2d(gt[tr].float(), L).to(device)               # (n_train, S, L, L) in [0, 1]
    known_tr, trd = known[tr].to(device), tr.to(device)
    # foreground fraction per structure over the annotated train images: (S,)
    trn = tr.numpy()
    prior = torch.tensor([float(masks[s][0][trn][masks[s][1][trn]].mean()) if masks[s][1][trn].any() else 0.5
                          for s in structs])
    best = None
    for lr in SEG_LR:
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
    _, pred = val_dice(model, te)                                           # the single look at the test split
    return {s: pred[:, j] for j, s in enumerate(structs)}, te.numpy(), \
        {"lr": lr, "weight_decay": 1e-4, "epochs": args.seg_epochs, "head": args.seg_head, "val_mean_dice": best[0]}


# ----------------------------------------------------------------------------------------------------------------------
# 6. Statistics over the test split: point estimates, bootstrap CIs, paired p-values

def cls_statistics(scores, data, resamples, test_rows):
    """scores [n_test, L]. Per label: point AUROC/AUPRC, prevalence, CI, and the bootstrap samples (for paired tests).
    resamples index positions within the test rows."""
    y = data["labels"][test_rows]
    per_label, samples = {}, {}
    for j, name in enumerate(data["label_names"]):
        k = np.isfinite(y[:, j])
        yk, sk = y[:, j], scores[:, j]
        n_pos = int(np.nansum(yk[k])); n_known = int(k.sum())
        entry = {"n_pos": n_pos, "n_neg": n_known - n_pos, "prevalence": n_pos / n_known if n_known else None}
        if n_pos == 0 or n_pos == n_known:
            entry.update(auroc=None, auprc=None, reason=f"single class in test ({n_pos} positive of {n_known})")
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


def seg_statistics(pred, masks, structs, test_rows, resamples):
    """Dice per structure over the annotated test images ("dice"), and over those of them where the structure is
    present ("dice_pos"). For a finding that most images lack, "dice" is dominated by empty-vs-empty = 1 (a head that
    never predicts anything scores the share of negatives); "dice_pos" is the lesion-segmentation number.
    For anatomy that every image has (lungs, heart) the two are the same."""
    per, samples = {}, {}
    for s in structs:
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
            smp = bootstrap_stat(lambda idx: float(d[idx][sel[idx]].mean()) if sel[idx].any() else None, resamples)
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
    """Paired p-values of A vs B for every (name, metric) both have. Returns {name: {metric: {diff, p, verdict}}}."""
    out = {}
    for (name, metric) in keys:
        if (name, metric) not in samples_a or (name, metric) not in samples_b:
            continue
        diff = stats_a(name, metric) - stats_b(name, metric)
        p = paired_p_value(samples_a[(name, metric)], samples_b[(name, metric)])
        verdict = "better" if p is not None and p < 0.05 and diff > 0 else \
            "worse" if p is not None and p < 0.05 and diff < 0 else "n.s."
        out.setdefault(name, {})[metric] = {"diff": diff, "p": p, "verdict": verdict}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 7. Pictures (PIL only)

COLORS = {"jepa": (200, 30, 30), "random": (30, 90, 200), "pixels": (120, 120, 120), "other": (20, 150, 60)}


def draw_pr_curves(curves, label_names, path):
    """curves: {label: [(name, probe, recall, precision)]}. One panel per label, attentive thick, linear thin."""
    W, H, pad = 300, 260, 36
    cols = min(3, max(1, len(label_names)))
    rows = math.ceil(len(label_names) / cols)
    img = Image.new("RGB", (cols * W, rows * H + 40), "white")
    d = ImageDraw.Draw(img)
    for i, lab in enumerate(label_names):
        ox, oy = (i % cols) * W, (i // cols) * H
        x0, y0, x1, y1 = ox + pad, oy + 20, ox + W - 10, oy + H - pad
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, oy + 4), lab, fill="black")
        d.text((x0, y1 + 4), "0", fill="black"); d.text((x1 - 30, y1 + 4), "recall 1", fill="black")
        d.text((ox + 4, y0), "P 1", fill="black"); d.text((ox + 4, y1 - 10), "0", fill="black")
        for name, probe, r, p in curves.get(lab, []):
            pts = [(x0 + float(rr) * (x1 - x0), y1 - float(pp) * (y1 - y0)) for rr, pp in zip(r, p)]
            step = []                                    # PR curves are step functions: draw them as steps
            for a, b in zip(pts[:-1], pts[1:]):
                step += [a, (b[0], a[1])]
            step.append(pts[-1])
            d.line(step, fill=COLORS.get(name, (0, 0, 0)), width=3 if probe == "attentive" else 1)
    x = 10
    for name, c in COLORS.items():
        if any(n == name for v in curves.values() for n, *_ in v):
            d.line([(x, rows * H + 20), (x + 20, rows * H + 20)], fill=c, width=3)
            d.text((x + 24, rows * H + 14), name, fill="black")
            x += 90
    d.text((x + 10, rows * H + 14), "thick = attentive, thin = linear", fill="black")
    save_image(img, path)


def gray_rgb(u8, size):
    return np.asarray(Image.fromarray(u8).resize((size, size), Image.BILINEAR).convert("RGB")).astype(np.float32)


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
                m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
                im[m] = 0.55 * im[m] + 0.45 * np.array(tints[j % len(tints)])
            canvas.paste(Image.fromarray(im.astype(np.uint8)), (ci * size, 16 + ri * size))
    save_image(canvas, path)


def pca_rgb(tokens):
    """tokens [K, g*g, D] -> [K, g, g, 3] in [0, 1]: the first 3 principal components of all K*g*g patch tokens,
    each stretched between its 1st and 99th percentile (the DINO / Rad-DINO feature pictures)."""
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
    save_image(canvas, path)


def save_image(img, path):
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# 8. The markdown report

def fmt(v, ci=None):
    if v is None:
        return "undefined"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def fmt_p(c):
    if c is None:
        return "-"
    mark = {"better": " ↑", "worse": " ↓"}.get(c["verdict"], "")
    return f"{c['p']:.3f}{mark}" if c["p"] is not None else "-"


def pretraining_summary(ckpt, radjepa):
    """How much pretraining the checkpoint had: steps, images seen, epochs, size, and the last logged loss and erank
    (from log.jsonl beside the checkpoint, when there is one)."""
    ck = radjepa.read_checkpoint(ckpt)
    c, step = ck["config"], int(ck.get("step", 0))
    s = dict(step=step, batch_size=c["batch_size"], images_seen=step * c["batch_size"], width=c["width"],
             depth=c["depth"], img_size=c["img_size"], loss=None, erank=None, train_images=None)
    log_path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "log.jsonl")
    if os.path.isfile(log_path):
        with open(log_path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        train = [r for r in recs if r.get("type") == "train" or "loss" in r]
        head = [r for r in recs if r.get("type") == "header" or "images" in r]
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


def verdict(m):
    """Did pretraining beat the reference encoder (random init unless --compare)? Wins and losses are the
    significant (p < 0.05) differences of macro AUROC per classification probe and of Dice per structure."""
    ref, wins, losses = m["compare"], [], []
    for key, r in m.get("classification", {}).items():
        t = r.get("vs", {}).get(ref, {}).get("tests", {}).get("macro", {}).get("auroc")
        if key.startswith(m["main"] + "/") and t:
            probe = key.split("/")[1]
            b = m["classification"][f"{ref}/{probe}"]["macro"]["auroc"]
            item = f"{probe} probe macro AUROC {r['macro']['auroc']:.3f} vs {b:.3f} (p = {t['p']:.3f})"
            (wins if t["verdict"] == "better" else losses if t["verdict"] == "worse" else []).append(item)
    seg = m.get("segmentation", {})
    for st, t in seg.get(m["main"], {}).get("vs", {}).get(ref, {}).items():
        if st != "mean" and t.get("dice"):
            a, b = seg[m["main"]]["dice"][st]["dice"], seg[ref]["dice"][st]["dice"]
            item = f"{st} Dice {a:.3f} vs {b:.3f} (p = {t['dice']['p']:.3f})"
            v = t["dice"]["verdict"]
            (wins if v == "better" else losses if v == "worse" else []).append(item)
    name = "random init" if ref == "random" else f"`{ref}`"
    if wins:
        text = ("Pretraining helped" if not losses else "Mixed result") + \
            f": significantly better than {name} on " + "; ".join(wins) + "."
    else:
        text = f"No significant win over {name} on any task."
        pt = m.get("pretraining")
        if ref == "random" and pt:
            text += (f" The model ({pt['width']} wide, {pt['depth']} deep) saw {pt['images_seen']:,} images"
                     + (f", final loss {pt['loss']:.3f}, effective rank {pt['erank']:.0f}" if pt.get("loss") else "")
                     + ". " + ("It is too short: " + too_short_text(pt) + ". " if pt["images_seen"] < MIN_IMAGES_TO_WIN
                              else "") + "`bash experiment.sh cpu` (4,000 steps of 64 on 10,000 unlabeled "
                     "phantoms, 29 min of pretraining on 2 CPU cores) shows significant wins in both pretraining "
                     "seeds under every probe and in segmentation (BENCHMARKS.md §11).")
    if losses:
        text += f" Worse than {name} on: " + "; ".join(losses) + "."
    return dict(helped=bool(wins), wins=wins, losses=losses, text=text)


def make_report(m):
    L = [f"# RadJEPA probe report", "",
         f"checkpoint `{m['config']['ckpt']}`, data `{m['config']['data']}`, {m['config']['n_boot']} bootstrap "
         f"resamples over test patients, 95% percentile CIs. p = paired two-sided bootstrap p-value of "
         f"`{m['main']}` vs the named encoder (↑ significantly better, ↓ worse, at p < 0.05).", ""]
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
            bw = "-" if not c else (f"{c['n_better']['auroc']} / {c['n_worse']['auroc']}; {c['n_better']['auprc']} / "
                                    f"{c['n_worse']['auprc']} (of {c['n_labels']})")
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
        for metric, title in (("dice", "all annotated test images"), ("dice_pos", "test images that contain it")):
            if metric == "dice_pos" and not partial:
                continue                                   # every image has every structure: the same table twice
            L += ["", f"Dice over {title}" + (" (n = images)" if metric == "dice_pos" else "") + ":", "",
                  "| structure | " + " | ".join(encs) + " | " + " | ".join(f"p vs {o}" for o in others) + " |",
                  "|---|" + "---|" * (len(encs) + len(others))]
            for s in m["structures"] + ["mean"]:
                e0 = d0.get(s)
                if not e0 or e0.get(metric) is None:
                    continue
                cells = [fmt(seg[e]["dice"][s].get(metric), seg[e]["dice"][s].get(metric + "_ci")) for e in encs]
                ps = [fmt_p(seg[m["main"]].get("vs", {}).get(o, {}).get(s, {}).get(metric)) for o in others]
                n = f" (n={e0['n_pos']})" if metric == "dice_pos" and s != "mean" else ""
                L.append(f"| {s}{n} | " + " | ".join(cells) + " | " + " | ".join(ps) + " |")
        if partial:
            L += ["", f"Most images lack {', '.join(partial)}: over all images a head that predicts nothing scores the "
                  "share of images without it (empty vs empty = 1), so read the second table for those."]
    geo = m.get("features")
    if geo:
        names = [k for k in geo if isinstance(geo[k], dict)]
        L += ["", f"## Feature geometry (label-free; patch tokens of {geo['n_images']} train images at "
              f"{geo['img_size']} px)", "",
              "| encoder | dims | effective rank | effective rank, per-position mean removed | position share of variance |",
              "|---|---|---|---|---|"]
        L += [f"| {n} | {geo[n]['dim']} | {geo[n]['erank']:.1f} | {geo[n]['erank_content']:.1f} | "
              f"{geo[n]['position_share']:.2f} |" for n in names]
        L += ["", "Effective rank = exp(entropy of the normalised singular values) (RankMe): how many directions the "
              "features really use. A low value with a healthy std is dimensional collapse."]
    if m.get("report"):
        L += report_markdown(m["report"])
    L += ["", "Pictures: `pr_curves.png`, `seg_overlays.png`, `pca_features.png`" +
          (", `report_examples.png`." if m.get("report") else "."), ""]
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------------------------------
# Report generation (--task report): the paper's third evaluation, LLaVA-style, small enough for a CPU.
#
#   frozen tokens [N, g*g, D] -> mean over each cell of a G x G grid (--report-grid, default 4: 16 prefix tokens)
#   -> standardize (train statistics) -> 2-layer MLP projector -> prefix of a causal transformer decoder trained from
#   scratch with teacher forcing on the train reports -> epoch with the lowest val loss kept -> test decoded once,
#   greedy and beam search (width 3), capped at --report-max-len words.
# Text: the FINDINGS section (the IMPRESSION when a report has no findings; --report-section), lower-cased, words and
# punctuation marks as tokens; the vocabulary is the train split's words seen at least --report-min-count times, the
# rest is <unk>. Metrics compare generated and reference token lists:
#   BLEU-n  corpus-level: clipped n-gram matches summed over the corpus / candidate n-grams summed, geometric mean
#           over 1..n, times the brevity penalty exp(1 - r/c) when the total candidate length c <= reference length r.
#           No smoothing (a corpus with no matching 4-gram scores 0), one reference per report.
#   ROUGE-L F1 of the longest common subsequence (P = LCS/|cand|, R = LCS/|ref|), averaged over reports.
#   Clinical efficacy (CE): label_report() on the generated and on the reference text; precision/recall/F1, micro
#           (pooled counts) and macro (mean over labels with a positive reference in the test set).
# Baselines under the same decoder and budget: random-init encoder, raw pixels, "none" (no prefix: the decoder alone
# learns the most typical report), and retrieval (the report of the nearest train image by cosine similarity of the
# standardized mean-pooled tokens; "retrieval-jepa", and the same with each other encoder's tokens, which compares the
# feature spaces with no training at all). CIs and p-values: the patient bootstrap and paired test of sections 1, 6.

REPORT_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)

# The labeler's rules. A finding is mentioned where its pattern matches; a mention is cancelled by a negation cue in
# the same clause, before it ("no effusion", "without pneumothorax", "negative for pneumonia") or after it ("effusion
# has resolved", "pneumothorax is no longer seen"). Clauses end at . ; ! ? and at but/however/although/except, so
# "no effusion but a small pneumothorax" keeps the pneumothorax. Hedged mentions ("possible effusion") count as
# positive. Label = 1 if any mention survives, else 0 (negated and unmentioned are the same: "not reported").
LABELER_FINDINGS = {
    "Atelectasis": r"atelecta\w*",
    "Cardiomegaly": r"cardiomegaly|(?:heart|cardiac silhouette)(?: size)? (?:is|appears|remains) (?:\w+ly )?enlarged"
                    r"|enlarged (?:heart|cardiac silhouette)",
    "Consolidation": r"consolidat\w*",
    "Edema": r"o?edema",
    "Effusion": r"effusions?",
    "Nodule": r"nodul\w*|mass(?:es)?",
    "Pneumonia": r"pneumonias?",
    "Pneumothorax": r"pneumothora(?:x|ces)",
}
NEGATION_BEFORE = r"\b(?:no|not|without|negative for|free of|absence of|resolution of|resolved|clear of)\b"
NEGATION_AFTER = (r"\b(?:(?:has|have) (?:resolved|cleared)|(?:is|are) no longer (?:seen|present|visible|evident)"
                  r"|(?:is|are) not (?:seen|present|identified|visible|evident)|(?:has|have) been excluded|resolved)\b")
CLAUSE_END = r"[.;!?]|\b(?:but|however|although|except)\b"


def label_report(text, findings=LABELER_FINDINGS):
    """Report text -> {finding: 0/1} by the rules above."""
    out = dict.fromkeys(findings, 0)
    for clause in re.split(CLAUSE_END, text.lower()):
        for name, pattern in findings.items():
            for m in re.finditer(rf"\b(?:{pattern})\b", clause):
                if not (re.search(NEGATION_BEFORE, clause[:m.start()]) or re.search(NEGATION_AFTER, clause[m.end():])):
                    out[name] = 1
    return out


def tokenize(text):
    """'No effusion; left-sided.' -> ['no', 'effusion', ';', 'left', '-', 'sided', '.']"""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def detokenize(words):
    return re.sub(r" ([.,;:!?])", r"\1", " ".join(words))


def bleu_stats(hyp, ref, max_n=4):
    """Sufficient statistics of one report for corpus BLEU: [matches_1..n, candidate n-grams_1..n, |hyp|, |ref|]."""
    row = [0] * (2 * max_n) + [len(hyp), len(ref)]
    for n in range(1, max_n + 1):
        h = collections.Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        r = collections.Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        row[n - 1] = sum(min(c, r[g]) for g, c in h.items())            # clipped: a word counts at most as often
        row[max_n + n - 1] = max(len(hyp) - n + 1, 0)                   # as it occurs in the reference
    return row


def bleu_from_stats(s, n, max_n=4):
    """Corpus BLEU-n from summed bleu_stats rows (definition in the section header)."""
    match, total, c, r = s[:max_n], s[max_n:2 * max_n], s[2 * max_n], s[2 * max_n + 1]
    if c == 0 or min(match[:n]) == 0:
        return 0.0
    log_p = sum(math.log(match[k] / total[k]) for k in range(n)) / n
    return (1.0 if c > r else math.exp(1 - r / c)) * math.exp(log_p)


def corpus_bleu(hyps, refs, n=4):
    return bleu_from_stats(np.sum([bleu_stats(h, r) for h, r in zip(hyps, refs)], 0), n)


def rouge_l(hyp, ref):
    """ROUGE-L F1 of two token lists (LCS by dynamic programming, one row at a time)."""
    if not hyp or not ref:
        return 0.0
    prev = [0] * (len(ref) + 1)
    for a in hyp:
        cur = [0]
        for j, b in enumerate(ref):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(hyp) + len(ref))     # = 2PR/(P+R) with P=lcs/|hyp|, R=lcs/|ref|


def clinical_efficacy(pred, ref):
    """pred, ref: bool [n, L] (labels of generated / reference reports). Micro and macro precision/recall/F1; a label
    enters the macro means only if it has a positive reference here; precision with no predicted positive is 0."""
    tp, fp, fn = (pred & ref).sum(0), (pred & ~ref).sum(0), (~pred & ref).sum(0)
    div = lambda a, b: a / b if b else 0.0  # noqa: E731
    out = {"ce_p_micro": div(tp.sum(), tp.sum() + fp.sum()), "ce_r_micro": div(tp.sum(), tp.sum() + fn.sum()),
           "ce_f1_micro": div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())}
    has = np.flatnonzero(tp + fn)
    if not len(has):
        return {k: None for k in list(out) + ["ce_p_macro", "ce_r_macro", "ce_f1_macro"]}
    out.update(ce_p_macro=float(np.mean([div(tp[j], tp[j] + fp[j]) for j in has])),
               ce_r_macro=float(np.mean([tp[j] / (tp[j] + fn[j]) for j in has])),
               ce_f1_macro=float(np.mean([2 * tp[j] / (2 * tp[j] + fp[j] + fn[j]) for j in has])))
    return {k: float(v) for k, v in out.items()}


REPORT_METRICS = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "ce_p_micro", "ce_r_micro", "ce_f1_micro",
                  "ce_p_macro", "ce_r_macro", "ce_f1_macro"]


def report_statistics(hyps, refs, resamples):
    """Point values, bootstrap CIs and samples of every REPORT_METRICS entry, plus per-label CE F1 (point)."""
    stats = np.array([bleu_stats(h, r) for h, r in zip(hyps, refs)])
    rl = np.array([rouge_l(h, r) for h, r in zip(hyps, refs)])
    names = list(LABELER_FINDINGS)
    lab = lambda ts: np.array([[label_report(detokenize(t))[k] for k in names] for t in ts], bool)  # noqa: E731
    pred, ref = lab(hyps), lab(refs)

    def metrics(idx):
        s = stats[idx].sum(0)
        return {**{f"bleu{n}": bleu_from_stats(s, n) for n in range(1, 5)}, "rouge_l": float(rl[idx].mean()),
                **clinical_efficacy(pred[idx], ref[idx])}
    point = metrics(np.arange(len(hyps)))
    boot = [metrics(idx) for idx in resamples]
    samples = {("all", k): np.array([np.nan if b[k] is None else b[k] for b in boot]) for k in REPORT_METRICS}
    out = {k: point[k] for k in REPORT_METRICS}
    out.update({k + "_ci": percentile_ci(samples[("all", k)]) for k in REPORT_METRICS})
    out["ce_per_label"] = {n: {"n_ref": int(ref[:, j].sum()), "n_pred": int(pred[:, j].sum()),
                               "f1": clinical_efficacy(pred[:, [j]], ref[:, [j]])["ce_f1_micro"]}
                           for j, n in enumerate(names)}
    return out, samples


def read_reports(data, section):
    """OUT/reports.csv -> the target text per dataset row ("" = no report)."""
    path = os.path.join(data["root"], "reports.csv")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:3] != ["image", "findings", "impression"]:
        raise EvalError(f"{path}: header must be image,findings,impression (got {rows[0] if rows else 'nothing'})")
    row_of = {p: i for i, p in enumerate(data["paths"])}
    text = [""] * len(data["paths"])
    for r in rows[1:]:
        i = row_of.get(os.path.join(data["root"], r[0])) if len(r) == 3 else None
        if i is not None:
            fnd, imp = r[1].strip(), r[2].strip()
            text[i] = {"findings": fnd or imp, "impression": imp, "both": f"{fnd} {imp}".strip()}[section]
    return text


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention + MLP. forward(x, cache): x = (B, T, W) new positions; cache = (k, v) of the
    positions before them, or None. Returns (out, (k, v) including x's): decoding feeds one word at a time."""

    def __init__(self, width, heads, dropout):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        B, T, W = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (B,H,T,dh)
        if cache is not None:                                     # one new position: it may see every cached one
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and T > 1)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, W)))
        return x + self.drop(self.mlp(self.n2(x))), (k, v)


class ReportDecoder(nn.Module):
    """prefix features (B, P, F) -> projector Linear-GELU-Linear -> P prefix tokens, followed by <bos> w1 .. wn; a
    causal transformer predicts every next word. n_prefix = 0 is the no-image baseline (the decoder alone)."""

    def __init__(self, feat_dim, n_prefix, vocab_size, width=256, layers=4, max_len=100, dropout=0.1):
        super().__init__()
        self.n_prefix = n_prefix
        self.proj = nn.Sequential(nn.Linear(feat_dim, width), nn.GELU(), nn.Linear(width, width)) if n_prefix else None
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(n_prefix + max_len + 2, width) * 0.02)   # prefix, <bos>, words, <eos>
        self.blocks = nn.ModuleList(DecoderBlock(width, n_heads(width), dropout) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab_size)

    def step(self, x, start, caches=None):
        """x (B, T, W) at positions start.. -> logits (B, T, V) and the updated per-layer caches."""
        x = x + self.pos[start:start + x.shape[1]]
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if caches is None else caches[i])
            new.append(kv)
        return self.head(self.norm(x)), new

    def start(self, prefix, words):
        """Prefix + words at once -> (logits of the word positions (B, L, V), caches)."""
        x = self.embed(words)
        if self.proj is not None:
            x = torch.cat([self.proj(prefix), x], 1)
        logits, caches = self.step(x, 0)
        return logits[:, self.n_prefix:], caches

    def forward(self, prefix, words):                            # teacher forcing: words = <bos> w1 .. wn <eos> <pad>..
        return self.start(prefix, words)[0]


@torch.no_grad()
def beam_search(model, prefix, n, beam, max_len, device):
    """Decodes n reports (prefix (n, P, F) or None). Returns token-id lists (no <bos>/<eos>). Score = summed
    log-probability, no length normalisation; a beam that emitted <eos> is finished and only extends with <eos> at no
    cost; at most max_len words. beam = 1 is greedy decoding."""
    model.eval()
    words = torch.full((n * beam, 1), BOS, device=device)
    pre = None if prefix is None else prefix.to(device).repeat_interleave(beam, 0)
    logits, caches = model.start(pre, words)
    score = torch.full((n, beam), -math.inf, device=device)
    score[:, 0] = 0.0                                            # all beams start identical: expand only the first
    seqs = torch.empty((n * beam, 0), dtype=torch.long, device=device)
    done = torch.zeros(n * beam, dtype=torch.bool, device=device)
    for t in range(max_len + 1):
        logp = torch.log_softmax(logits[:, -1].float(), -1)       # (n*beam, V)
        logp[done] = -math.inf
        logp[done, EOS] = 0.0
        if t == max_len:                                          # length cap: only <eos> is left
            keep = logp[:, EOS].clone(); logp.fill_(-math.inf); logp[:, EOS] = keep
        V = logp.shape[1]
        cand = (score.view(n, beam, 1) + logp.view(n, beam, V)).view(n, beam * V)
        score, flat = cand.topk(beam, 1)                           # (n, beam)
        parent = (flat // V + torch.arange(n, device=device)[:, None] * beam).view(-1)
        tok = (flat % V).view(-1)
        seqs = torch.cat([seqs[parent], tok[:, None]], 1)
        done = done[parent] | (tok == EOS)
        if done.all():
            break
        if beam > 1:                                              # each beam continues its parent's history
            caches = [(k[parent], v[parent]) for k, v in caches]
        logits, caches = model.step(model.embed(tok[:, None]), model.n_prefix + 1 + t, caches)
    best = score.argmax(1) + torch.arange(n, device=device) * beam
    out = []
    for s in seqs[best].tolist():
        out.append(s[:s.index(EOS)] if EOS in s else s)
    return out


def encode_reports(texts, vocab, max_len):
    """Token-id tensor (N, max_len + 2): <bos> words (truncated to max_len) <eos>, right-padded with <pad>."""
    ids = torch.full((len(texts), max_len + 2), PAD, dtype=torch.long)
    for i, t in enumerate(texts):
        w = [vocab.get(x, UNK) for x in tokenize(t)[:max_len]]
        ids[i, :len(w) + 2] = torch.tensor([BOS] + w + [EOS])
    return ids


def train_decoder(prefix, ids, vocab_size, tr, va, args, device, log, name):
    """Teacher forcing, AdamW + cosine schedule over --report-epochs; returns the model at the epoch with the lowest
    val loss (token-averaged cross-entropy), and that epoch and loss."""
    torch.manual_seed(args.seed)
    model = ReportDecoder(prefix.shape[2] if prefix is not None else 0, prefix.shape[1] if prefix is not None else 0,
                          vocab_size, args.report_width, args.report_layers, args.report_max_len,
                          args.report_dropout).to(device)
    get = lambda rows: None if prefix is None else prefix[rows].to(device)  # noqa: E731

    def loss_of(rows):
        w = ids[rows, :int((ids[rows] != PAD).sum(1).max())].to(device)      # cut the batch's all-<pad> columns
        return F.cross_entropy(model(get(rows), w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), ignore_index=PAD)
    opt = torch.optim.AdamW(model.parameters(), lr=args.report_lr, weight_decay=0.01)
    steps = args.report_epochs * math.ceil(len(tr) / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(args.seed)
    best = (math.inf, 0, None)
    for epoch in tqdm(range(1, args.report_epochs + 1), desc=f"decoder {name}", leave=False):
        model.train()
        for idx in torch.randperm(len(tr), generator=g).split(args.batch_size):
            loss = loss_of(tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
        model.eval()
        with torch.no_grad():                                  # token-weighted mean over the val split
            n_tok = [(ids[va[i:i + 256], 1:] != PAD).sum().item() for i in range(0, len(va), 256)]
            val = sum(loss_of(va[i:i + 256]).item() * k for i, k in zip(range(0, len(va), 256), n_tok)) / sum(n_tok)
        if val < best[0]:
            best = (val, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    log(f"    decoder {name}: best val loss {best[0]:.4f} at epoch {best[1]} of {args.report_epochs}")
    return model, {"val_loss": best[0], "epoch": best[1]}


def nearest_train(tokens, tr, te):
    """Retrieval: for each te row, the tr row nearest by cosine similarity of standardized mean-pooled tokens."""
    pooled = tokens.float().mean(1)
    mu, sd = standardizer(pooled[tr])
    z = F.normalize((pooled - mu) / sd, dim=1)
    return tr[(z[te] @ z[tr].T).argmax(1).numpy()]


def report_task(data, feats, enc_names, size, args, device, log):
    """Trains and scores every system; returns (metrics["report"], examples for the pictures)."""
    text = read_reports(data, args.report_section)
    has = np.array([bool(t) for t in text])
    tr, va, te = (np.flatnonzero((data["split"] == s) & has) for s in SPLITS)
    if not len(tr) or not len(va) or not len(te):
        raise EvalError(f"{data['root']}: --task report needs reports in train, val and test "
                        f"(have {len(tr)}, {len(va)}, {len(te)})")
    counts = collections.Counter(w for i in tr for w in tokenize(text[i]))
    vocab = {w: i for i, w in enumerate(REPORT_SPECIALS + sorted(w for w, c in counts.items()
                                                                  if c >= args.report_min_count))}
    inv = {i: w for w, i in vocab.items()}
    ids = encode_reports(text, vocab, args.report_max_len)
    refs = [tokenize(text[i]) for i in te]
    pats = data["patients"][te]
    resamples = bootstrap_indices([np.flatnonzero(pats == p) for p in dict.fromkeys(pats)], args.n_boot, args.seed)
    log(f"report: {len(tr)}/{len(va)}/{len(te)} train/val/test reports, vocabulary {len(vocab)} words "
        f"(min count {args.report_min_count}), section {args.report_section}, prefix {args.report_grid}x"
        f"{args.report_grid} tokens")
    trt, vat = torch.from_numpy(tr), torch.from_numpy(va)
    hyps, info = {}, {}
    for name in enc_names + ["none"]:
        if name == "none":
            prefix = None
        else:
            tok = feats[(name, size)]["tokens"]
            D = tok.shape[2]
            prefix = grid_pool(tok, args.report_grid).view(len(tok), D, -1).transpose(1, 2)   # (N, G*G, D)
            mu, sd = standardizer(prefix[tr])
            prefix = (prefix - mu) / sd
        t0 = time.time()
        model, info[name] = train_decoder(prefix, ids, len(vocab), trt, vat, args, device, log, name)
        for mode, k in (("greedy", 1), ("beam3", 3)):
            out = []
            for i in range(0, len(te), 128):
                rows = torch.from_numpy(te[i:i + 128])
                out += beam_search(model, None if prefix is None else prefix[rows], len(rows), k,
                                   args.report_max_len, device)
            hyps[f"{name}/{mode}"] = [[inv[j] for j in s] for s in out]
        info[name]["seconds"] = round(time.time() - t0, 1)
    for name in enc_names:
        hyps[f"retrieval-{name}"] = [tokenize(text[i]) for i in nearest_train(feats[(name, size)]["tokens"], tr, te)]
    res, samples = {}, {}
    for key, h in hyps.items():
        res[key], samples[key] = report_statistics(h, refs, resamples)
        log(f"    {key}: BLEU-4 {fmt(res[key]['bleu4'], res[key]['bleu4_ci'])}  ROUGE-L {res[key]['rouge_l']:.3f}  "
            f"CE F1 micro {fmt(res[key]['ce_f1_micro'])} macro {fmt(res[key]['ce_f1_macro'])}")
    vs = {}
    val = lambda k: (lambda _, m: res[k][m])  # noqa: E731
    pairs = [(f"jepa/{d}", b) for d in ("greedy", "beam3") for b in
             [f"{n}/{d}" for n in enc_names[1:] + ["none"]] + ["retrieval-jepa"]]
    for a, b in pairs + [("retrieval-jepa", f"retrieval-{n}") for n in enc_names[1:]]:
        ok = [("all", m) for m in REPORT_METRICS if res[a][m] is not None and res[b][m] is not None]
        vs.setdefault(a, {})[b] = compare(samples[a], samples[b], val(a), val(b), ok).get("all", {})
    pick = [i for i in range(len(te)) if any(label_report(text[te[i]]).values())][:3]
    pick += [i for i in range(len(te)) if i not in pick][:6 - len(pick)]
    examples = [{"row": int(te[i]), "id": data["ids"][te[i]], "reference": text[te[i]],
                 **{k: detokenize(hyps[f"{k}/beam3"][i]) for k in ("jepa", "random") if f"{k}/beam3" in hyps}}
                for i in pick]
    return {"systems": res, "vs": vs, "decoders": info, "examples": examples, "n_test": int(len(te)),
            "n_train": int(len(tr)), "vocab_size": len(vocab), "labels": list(LABELER_FINDINGS),
            "config": {k: getattr(args, k) for k in ("report_section", "report_grid", "report_width", "report_layers",
                                                     "report_epochs", "report_lr", "report_max_len",
                                                     "report_min_count", "report_dropout")}}, examples


def report_markdown(r):
    """The report.md section: main table, paired p-values, per-label CE F1, six examples."""
    c = r["config"]
    L = ["", f"## Report generation ({r['n_train']} train / {r['n_test']} test reports, {c['report_section']}; "
         f"decoder {c['report_layers']}x{c['report_width']}, prefix {c['report_grid']}x{c['report_grid']} tokens, "
         f"vocabulary {r['vocab_size']})", "",
         "| system | decoding | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 [95% CI] | ROUGE-L [95% CI] | CE P / R micro | "
         "CE F1 micro [95% CI] | CE F1 macro [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, s in r["systems"].items():
        name, mode = (key.split("/") + ["-"])[:2]
        L.append(f"| {name} | {mode} | {s['bleu1']:.3f} | {s['bleu2']:.3f} | {s['bleu3']:.3f} | "
                 f"{fmt(s['bleu4'], s['bleu4_ci'])} | {fmt(s['rouge_l'], s['rouge_l_ci'])} | "
                 f"{fmt(s['ce_p_micro'])} / {fmt(s['ce_r_micro'])} | {fmt(s['ce_f1_micro'], s['ce_f1_micro_ci'])} | "
                 f"{fmt(s['ce_f1_macro'], s['ce_f1_macro_ci'])} |")
    keys = ["bleu4", "rouge_l", "ce_f1_micro", "ce_f1_macro"]
    L += ["", "Paired bootstrap p-values, jepa vs each (same decoding; ↑ jepa significantly better, ↓ worse):", "",
          "| jepa vs | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for a, row in r["vs"].items():
        for b, t in row.items():
            L.append(f"| {a} vs {b} | " + " | ".join(fmt_p(t.get(k)) for k in keys) + " |")
    names = list(r["systems"])
    L += ["", "Clinical-efficacy F1 per finding (labeler on generated vs reference; n = positive references):", "",
          "| finding | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for lab in r["labels"]:
        e0 = r["systems"][names[0]]["ce_per_label"][lab]
        if e0["n_ref"]:
            L.append(f"| {lab} | {e0['n_ref']} | " + " | ".join(f"{r['systems'][k]['ce_per_label'][lab]['f1']:.2f}"
                                                                for k in names) + " |")
    L += ["", "Test examples (beam 3), also in `report_examples.png`:", "",
          "| image | reference | jepa | random |", "|---|---|---|---|"]
    L += [f"| {e['id']} | {e['reference']} | {e.get('jepa', '-')} | {e.get('random', '-')} |" for e in r["examples"]]
    return L


def draw_report_examples(images, examples, path, thumb=128, col=330, wrap=52):
    """One row per example: thumbnail, then the reference and the JEPA / random reports (wrapped)."""
    import textwrap
    cols = ["reference", "jepa", "random"]
    rows = [[textwrap.wrap(e.get(c, "-"), wrap) for c in cols] for e in examples]
    heights = [max(thumb, 14 + 12 * max(len(t) for t in r)) + 8 for r in rows]
    canvas = Image.new("RGB", (thumb + 8 + col * len(cols), 18 + sum(heights)), "white")
    d = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        d.text((thumb + 8 + j * col, 3), c, fill=(0, 0, 0) if c == "reference" else COLORS[c])
    y = 18
    for e, r, h in zip(examples, rows, heights):
        canvas.paste(Image.fromarray(gray_rgb(images[e["row"]].numpy(), thumb).astype(np.uint8)), (0, y))
        for j, lines in enumerate(r):
            d.text((thumb + 8 + j * col, y), "\n".join(lines), fill="black", spacing=2)
        d.line([(0, y + h - 4), (canvas.width, y + h - 4)], fill=(200, 200, 200))
        y += h
    save_image(canvas, path)


# ----------------------------------------------------------------------------------------------------------------------
# 9. main

def parse_args(argv):
    p = argparse.ArgumentParser(description="Frozen-encoder probes (classification + segmentation) for RadJEPA.",
                                epilog="The recipe ablation table is a subcommand: eval.py ablate OUT ... "
                                       "(see eval.py ablate --help, or bash experiment.sh ablate).")
    p.add_argument("--ckpt", required=True, help="OUT/ckpt.pt written by radjepa.py, or an external encoder: "
                   "timm:NAME (pretrained, e.g. timm:vit_base_patch14_dinov2.lvd142m), timm:FOLDER (config.json + "
                   "weights, e.g. from `radjepa.py export`), hf:NAME or hf:FOLDER (e.g. hf:microsoft/rad-dino); "
                   "external encoders run at their own resolution and normalisation, --img-size does not apply")
    p.add_argument("--data", required=True, help="a prepared folder (data_prep.py layout)")
    p.add_argument("--task", default="all", choices=["cls", "seg", "report", "all"],
                   help="cls, seg, report (report generation, needs reports.csv), or all (report only if reports.csv)")
    p.add_argument("--probe", default=["all"], nargs="+", choices=["linear", "grid", "attentive", "all"],
                   help="classification probe(s), one or more: linear on mean-pooled tokens, grid = linear on tokens "
                        "mean-pooled per cell of a --grid x --grid partition (keeps coarse position), attentive (one "
                        "learned query), all")
    p.add_argument("--grid", type=int, default=4, help="cells per side of the grid probe's partition of the tokens")
    p.add_argument("--compare", default="random", help="'random', another checkpoint, or timm:NAME_OR_DIR / "
                   "hf:NAME_OR_DIR (as for --ckpt): the paired tests' reference")
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint, eval/)")
    p.add_argument("--img-size", type=int, default=None, help="classification resolution (default: training size)")
    p.add_argument("--seg-img-size", type=int, default=None,
                   help="segmentation resolution (default: the larger of the training size and 16 patches)")
    p.add_argument("--mask-size", type=int, default=128, help="resolution at which Dice is computed")
    p.add_argument("--pool", default="mean", choices=["mean", "last4"], help="linear probe: mean pool or last 4 blocks")
    p.add_argument("--seg-head", default="linear", choices=["linear", "decoder"])
    p.add_argument("--pixels-size", type=int, default=32, help="raw-pixel baseline: image downsampled to this side")
    p.add_argument("--epochs", type=int, default=100, help="epochs of the attentive probe (small data needs many)")
    p.add_argument("--seg-epochs", type=int, default=30, help="epochs of the segmentation head")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random-init baseline encoder")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--no-baselines", action="store_true", help="skip the pixels baseline (random/--compare stay)")
    r = p.add_argument_group("report generation (--task report)")
    r.add_argument("--report-section", default="findings", choices=["findings", "impression", "both"],
                   help="text to generate: FINDINGS (the IMPRESSION where a report has none), IMPRESSION, or both")
    r.add_argument("--report-grid", type=int, default=4, help="prefix = tokens mean-pooled on a G x G grid: G*G tokens")
    r.add_argument("--report-width", type=int, default=256, help="decoder width")
    r.add_argument("--report-layers", type=int, default=4, help="decoder depth")
    r.add_argument("--report-epochs", type=int, default=30, help="decoder epochs (the best on val loss is kept)")
    r.add_argument("--report-lr", type=float, default=5e-4, help="decoder AdamW learning rate (cosine schedule)")
    r.add_argument("--report-dropout", type=float, default=0.1, help="decoder dropout")
    r.add_argument("--report-max-len", type=int, default=100,
                   help="words per report: longer train reports are cut, decoding stops there")
    r.add_argument("--report-min-count", type=int, default=2, help="train words seen fewer times become <unk>")
    quick = ", ".join(f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in QUICK.items())
    p.add_argument("--quick", action="store_true", help=f"the <= 5-minute evaluation for the README quick start: "
                   f"{quick}, features at 2x the training resolution; flags given explicitly win")
    args = p.parse_args(argv)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")]
    for k, v in QUICK.items() if args.quick else ():
        if not any(a.split("=")[0] == "--" + k.replace("_", "-") for a in given):
            setattr(args, k, v)
    return args


# Every numeric flag's smallest value, checked before any work starts (None = "default" where the flag allows it).
AT_LEAST = {"grid": 1, "img_size": 1, "seg_img_size": 1, "mask_size": 1, "pixels_size": 1, "epochs": 1,
            "seg_epochs": 1, "batch_size": 1, "n_boot": 1, "seed": 0, "random_seed": 0,
            "report_grid": 1, "report_width": 1, "report_layers": 1, "report_epochs": 1, "report_max_len": 1,
            "report_min_count": 1}


def check_args(args):
    """Flag ranges, the device and a writable --out, before anything loads. -> (device, out)."""
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
    out = args.out or (os.path.join("runs", "eval_" + "".join(c if c.isalnum() else "_" for c in args.ckpt))
                       if is_external(args.ckpt) else os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval"))
    try:
        if os.path.exists(out) and not os.path.isdir(out):
            raise NotADirectoryError(0, "it is a file, not a folder")
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".probe.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(bytes(1 << 16))
        os.remove(probe)
    except OSError as e:
        raise EvalError(f"--out {out} is not writable: {e.strerror or e}") from None
    return device, out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["ablate"]:                              # the ablation harness (section 10)
            return ablate(argv[1:])
        return run(parse_args(argv))
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a file vanishing mid-run: the OS reason and the path, one line
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2


def run(args):
    import radjepa                                               # imported here so `eval.py --help` is instant
    t0 = time.time()
    device, out = check_args(args)
    log_lines = []

    def log(msg):
        print(msg, flush=True); log_lines.append(msg)

    # --- encoders: the checkpoint's target encoder, a random-init twin, optionally another checkpoint -------------
    def load(path, **kw):
        if is_external(path):                                     # timm:... / hf:... (section 3b)
            return load_external(path, device=str(device), **kw)
        if not os.path.isfile(path):
            raise EvalError(f"{path}: no such checkpoint")
        try:
            return radjepa.load_encoder(path, device=str(device), **kw)
        except ValueError as e:
            raise EvalError(str(e).splitlines()[0])
    encoders = {"jepa": load(args.ckpt)}
    encoders["random"] = load(args.ckpt, random_init=True, seed=args.random_seed)
    if args.compare != "random":
        encoders["other"] = load(args.compare)
    compare_name = "random" if args.compare == "random" else "other"
    sources = {n: e.describe() if isinstance(e, ExternalEncoder) else f"{p} (RadJEPA EMA target encoder)"
               for n, e, p in (("jepa", encoders["jepa"], args.ckpt), ("other", encoders.get("other"), args.compare))
               if e is not None}
    sources = {"jepa": sources["jepa"], "random": f"the architecture of {args.ckpt}, randomly initialised (seed "
               f"{args.random_seed})", **sources}                # the order of the report's tables
    if not args.no_baselines:
        sources["pixels"] = "raw pixels (the image downsampled for the linear probes, each patch's pixels as its token)"
    for n, src in sources.items():
        log(f"encoder {n}: {src}")
    enc0 = encoders["jepa"]
    # sizes: a RadJEPA encoder's (external encoders run at their own; they set the sizes only when all are external)
    ref = next((e for e in encoders.values() if not isinstance(e, ExternalEncoder)), enc0)
    patch = ref.patch_size
    train_size = int(ref.config.get("img_size", 224))
    cls_size = args.img_size or (2 * train_size if args.quick else train_size)
    seg_size = args.seg_img_size or (2 * train_size if args.quick else max(train_size, 16 * patch))
    for name, enc in encoders.items():
        for s in (cls_size, seg_size) if not isinstance(enc, ExternalEncoder) else ():   # those resize themselves
            if s % enc.patch_size:
                raise EvalError(f"image size {s} is not a multiple of the patch size {enc.patch_size} ({name})")

    data = read_prepared(args.data, args.task)
    has_reports = os.path.isfile(os.path.join(args.data, "reports.csv"))
    if args.task == "report" and not has_reports:
        raise EvalError(f"{args.data}: --task report needs reports.csv (data_prep.py writes it where reports exist)")
    # --quick leaves report generation out of --task all (a decoder per encoder: minutes more); --task report runs it
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
    images = load_images(data, radjepa)
    log(f"data: {len(images)} images {tuple(images.shape[1:])}, splits "
        f"{ {s: int((data['split'] == s).sum()) for s in SPLITS} }, labels {data['label_names']}, "
        f"structures {data['structures']}; device {device}")

    # --- features, once per (encoder, resolution); raw pixels are recomputed (cheap) -----------------------------
    cache = os.path.join(out, "cache")
    data_fp = hashlib.sha256(images.numpy().data).hexdigest()     # the pixels themselves, in order
    ckpt_of = {"jepa": args.ckpt, "random": args.ckpt, "other": args.compare}
    feats = {}                                                     # (encoder, size) -> {"tokens", "pooled"}
    sizes = sorted({*([cls_size] if do_cls or do_report else []), *([seg_size] if do_seg else [])})  # one per size
    for name, enc in encoders.items():
        for size in sizes:
            last4 = args.pool == "last4" and size == cls_size
            esize = enc.size[0] if isinstance(enc, ExternalEncoder) else size   # its own resolution, from the originals
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
    enc_names = list(encoders) + ([] if args.no_baselines else ["pixels"])

    # label-free feature health (effective rank, position share) on <= 500 train images, at the first probed size
    geo_rows = np.flatnonzero(data["split"] == "train")[:500]
    geometry = {name: feature_geometry(feats[(name, sizes[0])]["tokens"], geo_rows, radjepa.effective_rank)
                for name in enc_names}
    for name, gm in geometry.items():
        log(f"features {name} @{sizes[0]}: effective rank {gm['erank']:.1f} of {gm['dim']} (content "
            f"{gm['erank_content']:.1f}), position share of variance {gm['position_share']:.2f}")

    test_rows = np.flatnonzero(data["split"] == "test")
    pats = data["patients"][test_rows]
    groups = [np.flatnonzero(pats == p) for p in dict.fromkeys(pats)]       # positions within test, per patient
    resamples = bootstrap_indices(groups, args.n_boot, args.seed)
    metrics = {"main": "jepa", "compare": compare_name, "encoders": sources, "labels": data["label_names"],
               "structures": data["structures"] if do_seg else []}
    probes = [p for p in ("linear", "grid", "attentive") if p in args.probe or "all" in args.probe]
    metrics["config"] = {**vars(args), "probes": probes, "cls_img_size": cls_size, "seg_img_size": seg_size,
                         "seg_grid": seg_size // patch, "cls_grid": cls_size // patch, "device": str(device),
                         "train_config": enc0.config, "n_test": int(len(test_rows)),
                         "grids": {"linear_l2": LINEAR_L2, "attentive_lr": ATTENTIVE_LR, "seg_lr": SEG_LR},
                         "bootstrap": "patients resampled with replacement, percentile 95% CI",
                         "p_value": "min(1, 2*min((#d<=0 + 1)/(B+1), (#d>=0 + 1)/(B+1)))"}
    metrics["features"] = {"img_size": sizes[0], "n_images": int(len(geo_rows)), **geometry}
    metrics["versions"] = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    metrics["pretraining"] = None if is_external(args.ckpt) else pretraining_summary(args.ckpt, radjepa)
    if compare_name == "random" and (metrics["pretraining"] or {}).get("images_seen", 1e9) < MIN_IMAGES_TO_WIN:
        log(f"warning: {too_short_text(metrics['pretraining'])}")

    def save(status):                      # after every task, atomically: a kill leaves the tasks done so far
        metrics["status"], metrics["seconds"], metrics["log"] = status, round(time.time() - t0, 1), log_lines
        metrics["verdict"] = verdict(metrics)
        write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1, default=float))
        write_text(os.path.join(out, "report.md"), make_report(metrics))

    # --- classification ---------------------------------------------------------------------------------------------
    curves = {}
    if do_cls:
        cls, samples = {}, {}
        for name in enc_names:
            for probe in probes:
                log(f"classification: {name} / {probe}")
                scores, hp = fit_classification(probe, feats[(name, cls_size)], data, args, device, log)
                stats, smp = cls_statistics(scores, data, resamples, test_rows)
                stats["hparams"] = hp
                cls[f"{name}/{probe}"], samples[f"{name}/{probe}"] = stats, smp
                y = data["labels"][test_rows]
                for j, lab in enumerate(data["label_names"]):
                    k = np.isfinite(y[:, j])
                    if stats["labels"][lab]["auroc"] is not None:
                        curves.setdefault(lab, []).append((name, probe, *pr_curve(y[k, j], scores[k, j])))
                log(f"    test macro AUROC {fmt(stats['macro']['auroc'], stats['macro'].get('auroc_ci'))}  "
                    f"AUPRC {fmt(stats['macro']['auprc'], stats['macro'].get('auprc_ci'))}")
        # paired tests: the main encoder vs every other encoder, probe by probe
        for probe in probes:
            a = f"jepa/{probe}"
            cls[a]["vs"] = {}
            for other in enc_names[1:]:
                b = f"{other}/{probe}"
                val = lambda r: (lambda n, m: r["macro"][m] if n == "macro" else r["labels"][n][m])  # noqa: E731
                tests = compare(samples[a], samples[b], val(cls[a]), val(cls[b]),
                                [(n, m) for n in data["label_names"] + ["macro"] for m in ("auroc", "auprc")])
                per = {mt: [tests[n][mt]["verdict"] for n in data["label_names"] if n in tests]
                       for mt in ("auroc", "auprc")}
                cls[a]["vs"][other] = {"tests": tests, "n_labels": len(per["auroc"]),
                                       "n_better": {mt: v.count("better") for mt, v in per.items()},
                                       "n_worse": {mt: v.count("worse") for mt, v in per.items()}}
        metrics["classification"] = cls
        save("partial: classification done" + (", segmentation still to run" if do_seg else ""))

    # --- segmentation -----------------------------------------------------------------------------------------------
    seg_preds = {}
    if do_seg:
        masks = load_masks(data, args.mask_size)
        seg, samples = {}, {}
        for name in enc_names:
            log(f"segmentation: {name}")
            pred, te_rows, hp = fit_segmentation(feats[(name, seg_size)], masks, data, args, device, log)
            pos = {r: i for i, r in enumerate(te_rows)}
            # resamples index all test rows; the seg test rows are those annotated: map positions, drop the others
            seg_res = [np.array([pos[r] for r in test_rows[idx] if r in pos], dtype=int) for idx in resamples]
            per, smp = seg_statistics(pred, masks, data["structures"], te_rows, seg_res)
            seg[name] = {"dice": per, "hparams": hp}
            samples[name] = smp
            seg_preds[name] = pred
            log(f"    test mean Dice {fmt(per.get('mean', {}).get('dice'), per.get('mean', {}).get('dice_ci'))}")
        seg["jepa"]["vs"] = {}
        for other in enc_names[1:]:
            val = lambda r: (lambda n, m: r["dice"][n][m])  # noqa: E731
            seg["jepa"]["vs"][other] = compare(samples["jepa"], samples[other], val(seg["jepa"]), val(seg[other]),
                                               [(s, m) for s in data["structures"] + ["mean"]
                                                for m in ("dice", "dice_pos")])
        metrics["segmentation"] = seg
        if do_report:
            save("partial: classification and segmentation done, report generation still to run")

    # --- report generation (its own section above) -------------------------------------------------------------------
    if do_report:
        metrics["report"], examples = report_task(data, feats, enc_names, cls_size, args, device, log)

    # --- outputs ----------------------------------------------------------------------------------------------------
    save("complete")                                            # metrics.json keeps the log: every val score tried
    log(metrics["verdict"]["text"])
    if curves:
        draw_pr_curves(curves, data["label_names"], os.path.join(out, "pr_curves.png"))
    if do_report:
        draw_report_examples(images, examples, os.path.join(out, "report_examples.png"))
    if seg_preds:
        draw_seg_overlays(images, seg_preds, masks, data["structures"], te_rows, os.path.join(out, "seg_overlays.png"))
    size = seg_size if do_seg else cls_size
    show = list(test_rows[:4])
    draw_pca(images, {n: feats[(n, size)]["tokens"] for n in encoders}, show, os.path.join(out, "pca_features.png"))
    log(f"wrote {out}/metrics.json, report.md and pictures in {time.time() - t0:.0f}s")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# 10. The ablation table: `python eval.py ablate OUT [flags] -- RECIPE` (what `bash experiment.sh ablate` runs)
#
# One row = one factor of the documented CPU recipe changed, everything else as in the recipe (RECIPE: the radjepa.py
# flags of `experiment.sh cpu`, with 1,000 steps in `experiment.sh ablate`). Each row is pretrained with every
# --seeds seed for --steps steps (warmup 10% of them, as the base's 100 of 1,000), then probed with the SAME frozen probes as every other row, at every --probe-sizes
# resolution: linear, grid, attentive, segmentation, and the effective rank of its tokens. The random-init twin of
# each architecture and raw pixels are probed once, the same way. Layout (re-running resumes; nothing finished reruns):
#   OUT/s{steps}/{row}/seed{k}/ckpt.pt, log.jsonl   pretraining (radjepa.py --resume continues a killed run)
#   OUT/s{steps}/{row}/seed{k}/result.json          test-set scores of every probe: written last, atomically
#   OUT/baselines/{random_<arch>|pixels_p<patch>}/result.json
#   OUT/ablation_s{steps}.md / .json                the table, rebuilt from the results after every run
# Statistics are computed at table time from the stored test scores: 95% bootstrap CIs over test patients and paired
# p-values (module docstring), with the same resamples for every row, so a row can be compared with any other.
# A row's score is the mean over its seeds (per resample too); the table also gives each seed's own score, because the
# bootstrap covers test-set sampling only, not the spread between pretraining runs.

# (row id, factor, value, radjepa.py flags that change it, warmup as a fraction of --steps). Cheap rows first: a partial
# run then has whole rows (both seeds) of the cheap factors; the 16x16-grid rows cost ~4x a row each.
ABLATION_ROWS = [
    ("baseline", "-", "the documented CPU recipe", [], 0.1),
    ("pred_depth=6", "predictor depth", "6 (recipe 3)", ["--pred-depth", "6"], 0.1),
    ("lr=3e-3", "peak LR at batch 64", "3e-3 (recipe 3e-4)", ["--lr", "3e-3", "--start-lr", "6e-4"], 0.1),
    ("lr=1e-3", "peak LR at batch 64", "1e-3 (the recipe before the ablations)", ["--lr", "1e-3", "--start-lr", "2e-4"],
     0.1),
    ("lr=1e-4", "peak LR at batch 64", "1e-4", ["--lr", "1e-4", "--start-lr", "2e-5"], 0.1),
    ("ema=0.99-0.999", "EMA momentum start-end", "0.99-0.999 (recipe 0.996-1.0)",
     ["--ema", "0.99", "--final-ema", "0.999"], 0.1),
    ("pred_width=192", "predictor width", "192 (recipe 96)", ["--pred-width", "192"], 0.1),
    ("warmup=30%", "warmup", "30% of the steps (recipe 10%)", [], 0.3),
    ("ema=0.999-1", "EMA momentum start-end", "0.999-1.0", ["--ema", "0.999", "--final-ema", "1.0"], 0.1),
    ("wd=const0.04", "weight-decay schedule", "constant 0.04 (recipe cosine 0.04->0.4)", ["--final-wd", "0.04"], 0.1),
    ("n_targets=2", "target blocks per image", "2 (recipe 4)", ["--n-targets", "2"], 0.1),
    ("tgt_scale=0.1-0.15", "target block scale", "0.10-0.15 (recipe 0.15-0.20)", ["--tgt-scale", "0.1", "0.15"], 0.1),
    ("ctx_scale=1", "context block scale", "1.0 (recipe 0.85-1.0)", ["--ctx-scale", "1.0", "1.0"], 0.1),
    ("crop=0.8-1", "random-resized-crop scale", "0.8-1.0 (recipe 0.3-1.0)", ["--crop-scale", "0.8", "1.0"], 0.1),
    ("target=last4", "regression target", "mean of the last 4 blocks (recipe: last block)",
     ["--target-blocks", "4"], 0.1),
    ("precision=fp32", "matmul precision", "fp32 (recipe: --precision auto, bf16 on CPUs with native bf16)",
     ["--precision", "fp32"], 0.1),
    ("patch=8", "patch / image size", "patch 8 at 128 px: 16x16 grid (recipe patch 16, 8x8)", ["--patch", "8"], 0.1),
    ("img=256", "patch / image size", "256 px, patch 16: 16x16 grid", ["--img-size", "256"], 0.1),
]
CLS_PROBES = ("linear", "grid", "attentive")


def ablate_args(argv):
    if "--" in argv:
        i = argv.index("--")
        argv, recipe = argv[:i], argv[i + 1:]
    else:
        recipe = []
    p = argparse.ArgumentParser(prog="eval.py ablate", description="One-factor ablations of the pretraining recipe, "
                                "each probed with the same frozen probes; flags after `--` are the recipe "
                                "(radjepa.py flags; experiment.sh passes those of `experiment.sh cpu`).")
    p.add_argument("out", help="output folder (re-running resumes: finished runs are never repeated)")
    p.add_argument("--data", default=None, help="prepared dataset (default: OUT/data)")
    p.add_argument("--steps", type=int, default=200,
                   help="pretraining steps of every run (the run-length knob; warmup is 10%% of it unless the row "
                        "varies warmup). Runs of different lengths live side by side, so a ranking-stability check is "
                        "one more call with another --steps (and --rows)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="pretraining seeds of every row")
    p.add_argument("--ema-compress", action=argparse.BooleanOptionalAction, default=True,
                   help="scale 1 - EMA momentum (start and end) by the recipe's --steps / --steps, as the LR, wd and "
                        "warmup schedules are compressed: with the recipe's 0.996 over a 100-step run the target "
                        "encoder (what is probed) would still be 82%% its random init (measured: its effective rank "
                        "stayed at the random level). With it, the target moves as far as in the recipe")
    p.add_argument("--rows", nargs="+", default=None,
                   help="row ids to run (default: all, in the listed order; see --list); `baseline` is always added "
                        "unless --no-baseline")
    p.add_argument("--no-baseline", action="store_true",
                   help="with --rows: do not add the baseline row (e.g. a second seed of one row whose baseline seed "
                        "is not needed yet); the table still compares with whatever baseline runs exist")
    p.add_argument("--add-row", nargs=2, action="append", default=[], metavar=("ID", "FLAGS"),
                   help="an extra row: ID and the radjepa.py flags it changes, in one quoted string (e.g. --add-row "
                        "adopted '--pred-depth 6 --ema 0.999'): a combination of factors, or a factor the list lacks. "
                        "Recorded in OUT/rows.json, so later calls (and --table-only) know it; reusing an ID with "
                        "other flags is refused. Its warmup is 10%% of --steps, as for every row")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from finished runs; train nothing")
    p.add_argument("--probe-sizes", type=int, nargs="+", default=[128, 256],
                   help="probe resolutions in px (recipe: 128 = the training resolution, 256 = 2x)")
    p.add_argument("--epochs", type=int, default=50, help="attentive-probe epochs")
    p.add_argument("--seg-epochs", type=int, default=15, help="segmentation-head epochs")
    p.add_argument("--mask-size", type=int, default=128, help="resolution at which Dice is computed")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the test patients")
    p.add_argument("--batch-size", type=int, default=64, help="probe batch size")
    p.add_argument("--device", default="cpu", help="cpu|cuda (pretraining and probes)")
    a = p.parse_args(argv)
    a.recipe = recipe
    a.all_rows = ablation_rows(a.out, a.add_row)
    ids = [r[0] for r in a.all_rows]
    if a.rows is None and a.add_row:                              # only the rows just added (and the baseline)
        a.rows = [rid for rid, _ in a.add_row]
    if a.rows:
        bad = [r for r in a.rows if r not in ids]
        if bad:
            raise EvalError(f"unknown ablation row(s) {', '.join(bad)}; rows are: {', '.join(ids)}")
        a.rows = ["baseline"] * (not a.no_baseline) + [r for r in ids if r in a.rows and r != "baseline"]
    else:
        a.rows = ids
    if a.steps < 1 or not a.seeds:
        raise EvalError("--steps must be >= 1 and --seeds must name at least one seed")
    a.data = a.data or os.path.join(a.out, "data")
    return a


def ablation_rows(out, added=()):
    """ABLATION_ROWS + the rows added with --add-row (kept in OUT/rows.json: {id: flags string})."""
    import shlex
    path = os.path.join(out, "rows.json")
    have = json.load(open(path)) if os.path.isfile(path) else {}
    builtin = {r[0] for r in ABLATION_ROWS}
    for rid, flags in added:
        if rid in builtin or not re.fullmatch(r"[A-Za-z0-9_.=+-]+", rid):
            raise EvalError(f"--add-row {rid!r}: the id must be new (not one of --list) and use only letters, digits "
                            f"and _ . = + -")
        if not flags.strip().startswith("--"):
            raise EvalError(f"--add-row {rid}: FLAGS must be radjepa.py flags in one string, e.g. '--pred-depth 6'")
        if have.get(rid, flags) != flags:
            raise EvalError(f"--add-row {rid}: {path} already defines it as {have[rid]!r}; pick another id")
        have[rid] = flags
    if added:
        _atomic_json(path, have)
    return ABLATION_ROWS + [(rid, "added row", f"`{flags}`", shlex.split(flags), 0.1) for rid, flags in have.items()]


def probe_once(make_feats, sizes, data, masks, anatomy, pargs, device, log):
    """Probes one encoder at every size. make_feats(size) -> {"tokens", "pooled"}. Returns, per size, the test-split
    scores of every classification probe [n_test][L], per-image Dice on the test images that contain each structure
    (None elsewhere), and the effective rank of the tokens (train images) -- all a table needs, no statistics yet."""
    import radjepa
    test_rows = np.flatnonzero(data["split"] == "test")
    geo_rows = np.flatnonzero(data["split"] == "train")[:500]
    out = {}
    for size in sizes:
        t0, c0 = time.time(), time.process_time()
        feats = make_feats(size)
        r = {"geometry": feature_geometry(feats["tokens"], geo_rows, radjepa.effective_rank), "cls": {}, "dice_pos": {}}
        for probe in CLS_PROBES:
            scores, hp = fit_classification(probe, feats, data, pargs, device, log)
            r["cls"][probe] = {"scores": np.round(scores, 6).tolist(), "hparams": hp}
        if masks:
            pred, te_rows, hp = fit_segmentation(feats, masks, data, pargs, device, log)
            pos = {int(row): i for i, row in enumerate(te_rows)}
            for s in data["structures"]:
                gt, known = masks[s]
                d = dice_per_image(pred[s], gt[te_rows])
                present = known[te_rows] & gt[te_rows].reshape(len(te_rows), -1).any(1)
                r["dice_pos"][s] = [float(d[pos[int(row)]]) if int(row) in pos and present[pos[int(row)]] else None
                                    for row in test_rows]
            r["seg_hparams"] = hp
        r["seconds"], r["cpu_seconds"] = round(time.time() - t0, 1), round(time.process_time() - c0, 1)
        log(f"    probed @{size}: erank {r['geometry']['erank']:.1f}, {r['seconds']:.0f}s "
            f"({r['cpu_seconds']:.0f} CPU s)")
        out[str(size)] = r
    return out


def _atomic_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, json.dumps(obj, default=float))


def ablation_train_argv(a, rid, seed):
    """The radjepa.py flags of one run: recipe, then the row's change, then length/seed/output (later flags win)."""
    import radjepa
    _, _, _, flags, wu = next(r for r in a.all_rows if r[0] == rid)
    argv = ["--data", a.data, *a.recipe, *flags]
    if a.ema_compress:  # the share of the target that is still its random init must not depend on the run length
        c = radjepa.make_config(radjepa.parse_args(argv))       # the recipe's own length and EMA momenta (+ row's)
        argv += [f"--{k.replace('_', '-')}={max(0.0, 1 - (1 - getattr(c, k)) * c.steps / a.steps):.6g}"
                 for k in ("ema", "final_ema")]
    return argv + ["--steps", str(a.steps), "--warmup", str(max(1, round(wu * a.steps))),
            "--seed", str(seed), "--out", os.path.join(a.out, f"s{a.steps}", rid, f"seed{seed}"), "--resume",
            "--device", a.device, "--log-every", str(max(1, min(20, a.steps // 10))),
            "--ckpt-every", str(max(1, a.steps // 4))]


def ablate(argv):
    """Runs every (row, seed) that has no result.json yet, then the baselines, and writes the table after each."""
    import radjepa
    a = ablate_args(argv)
    if a.list:
        for rid, factor, value, flags, wu in a.all_rows:
            print(f"{rid:20s} {factor}: {value}  [{' '.join(flags) or '-'}{'' if wu == 0.1 else f', warmup {wu:.0%}'}]")
        return 0
    device = torch.device(a.device)
    if not a.table_only:
        hold_lock(os.path.join(a.out, f"s{a.steps}.lock"))
    data = read_prepared(a.data, "all")
    if not data["has_cls"]:
        raise EvalError(f"{a.data}: the ablation needs classification labels")
    pargs = argparse.Namespace(grid=4, epochs=a.epochs, seg_epochs=a.seg_epochs, batch_size=a.batch_size, seed=0,
                               mask_size=a.mask_size, seg_head="linear")
    state = {}                                                   # images/masks are read once, and only when needed

    def loaded():
        if not state:
            state["images"] = load_images(data, radjepa)
            state["masks"] = load_masks(data, a.mask_size) if data["structures"] else {}
        return state["images"], state["masks"]

    def log(msg):
        print(msg, flush=True)
    want = {}                                                    # (row, seed) -> the run's config, all fields
    for rid in ([] if a.table_only else a.rows):                # a bad row fails now, not hours into the table
        for seed in a.seeds:
            try:
                want[rid, seed] = asdict(radjepa.make_config(radjepa.parse_args(ablation_train_argv(a, rid, seed))))
            except (SystemExit, ValueError) as e:
                msg = str(e.code if isinstance(e, SystemExit) else e)
                raise EvalError(f"row {rid}: {msg.splitlines()[0].removeprefix('error: ')}")
    anatomy = anatomy_structures(a.data, data)
    run_root = os.path.join(a.out, f"s{a.steps}")
    rows = {r[0]: r for r in a.all_rows}
    for rid in ([] if a.table_only else a.rows):
        _, factor, value, flags, wu = rows[rid]
        for seed in a.seeds:
            rdir = os.path.join(run_root, rid, f"seed{seed}")
            res_path = os.path.join(rdir, "result.json")
            if os.path.isfile(os.path.join(rdir, "ckpt.pt")):  # never mix recipes in one table: a clear stop instead
                have = radjepa.read_checkpoint(os.path.join(rdir, "ckpt.pt"))["config"]
                diff = sorted(k for k, v in want[rid, seed].items() if k in have and k not in radjepa.RUN_FIELDS
                              and (tuple(have[k]) if isinstance(have[k], list) else have[k]) != v)
                if diff:
                    raise EvalError(f"{rdir} was trained with other {', '.join(diff)} than this call asks for "
                                    f"(recipe changed?); use another OUT or remove that folder")
            if os.path.isfile(res_path):
                continue
            log(f"=== ablation row {rid} ({factor}: {value}), seed {seed}, {a.steps} steps -> {rdir}")
            ckpt = os.path.join(rdir, "ckpt.pt")
            t0, c0 = time.time(), time.process_time()
            done = os.path.isfile(ckpt) and radjepa.read_checkpoint(ckpt)["step"] >= a.steps
            if not done:
                try:
                    radjepa.main(ablation_train_argv(a, rid, seed))
                except SystemExit as e:                             # a diverged run is a result, not a crash
                    msg = str(e.code if e.code is not None else e)
                    if "loss is" not in msg:                        # a bad input found late: stop, say which row
                        raise EvalError(f"row {rid}, seed {seed}: {msg.splitlines()[0].removeprefix('error: ')}")
                    log(f"    row {rid} seed {seed} diverged: {msg}")
                    _atomic_json(res_path, {"row": rid, "seed": seed, "steps": a.steps, "status": "failed",
                                            "error": msg.splitlines()[0]})
                    continue
            t_pre, c_pre = time.time() - t0, time.process_time() - c0     # CPU s: comparable on a shared machine
            images, masks = loaded()
            enc = radjepa.load_encoder(ckpt, device=str(device))
            res = probe_once(lambda s: dict(zip(("tokens", "pooled"), extract_tokens(
                enc, images, s, device, a.batch_size, desc=f"features {rid}/seed{seed} @{s}"))),
                a.probe_sizes, data, masks, anatomy, pargs, device, log)
            logs = [r for r in map(json.loads, open(os.path.join(rdir, "log.jsonl"))) if "loss" in r]
            _atomic_json(res_path, {"row": rid, "seed": seed, "steps": a.steps, "status": "ok", "sizes": res,
                                    "train_config": enc.config, "final_loss": logs[-1]["loss"] if logs else None,
                                    "train_erank": logs[-1].get("target_erank") if logs else None,
                                    "pretrain_seconds": round(t_pre, 1), "pretrain_cpu_seconds": round(c_pre, 1),
                                    "seconds": round(time.time() - t0, 1)})
            ensure_baselines(a, data, loaded, anatomy, pargs, device, log, [enc.config])
            write_ablation_table(a, data, anatomy, log)
    configs = [json.load(open(p))["train_config"] for p in _result_paths(run_root) if _ok(p)]
    if configs and not a.table_only:
        ensure_baselines(a, data, loaded, anatomy, pargs, device, log, configs)
    return write_ablation_table(a, data, anatomy, log)


def hold_lock(path):
    """One harness per OUT and run length: two would train into the same checkpoints. A stale lock (its process is
    gone) is taken over. The lock file is removed when this process exits."""
    import atexit
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        pid = int(open(path).read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid():
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:                                  # someone else's process: alive
            alive = True
        if alive:
            raise EvalError(f"another `eval.py ablate` (pid {pid}) is running on {path[:-5]}; wait for it or stop it")
    write_text(path, str(os.getpid()))
    atexit.register(lambda: os.path.isfile(path) and os.remove(path))


def _result_paths(run_root):
    if not os.path.isdir(run_root):
        return []
    return sorted(os.path.join(run_root, r, s, "result.json") for r in os.listdir(run_root)
                  if os.path.isdir(os.path.join(run_root, r)) for s in os.listdir(os.path.join(run_root, r))
                  if os.path.isfile(os.path.join(run_root, r, s, "result.json")))


def _ok(path):
    return json.load(open(path)).get("status") == "ok"


def _arch_key(cfg):
    return f"random_p{cfg['patch']}_w{cfg['width']}_d{cfg['depth']}_h{cfg['heads']}_i{cfg['img_size']}"


def ensure_baselines(a, data, loaded, anatomy, pargs, device, log, configs):
    """The random-init twin of each architecture seen, and raw pixels at each patch size: probed once, the same way."""
    import radjepa
    for cfg in configs:
        for name in (_arch_key(cfg), f"pixels_p{cfg['patch']}"):
            path = os.path.join(a.out, "baselines", name, "result.json")
            if os.path.isfile(path):
                continue
            log(f"=== baseline {name}")
            images, masks = loaded()
            if name.startswith("random"):
                with torch.random.fork_rng():
                    torch.manual_seed(0)
                    enc = radjepa.ViT(cfg["patch"], cfg["width"], cfg["depth"], cfg["heads"],
                                      ref_grid=(cfg["img_size"] // cfg["patch"],) * 2).to(device).eval()
                enc.requires_grad_(False)
                make = lambda s: dict(zip(("tokens", "pooled"), extract_tokens(  # noqa: E731
                    enc, images, s, device, a.batch_size, desc=f"features {name} @{s}")))
            else:
                make = lambda s: dict(zip(("tokens", "pooled"), pixel_features(images, s, cfg["patch"], 32)))  # noqa
            t0 = time.time()
            res = probe_once(make, a.probe_sizes, data, masks, anatomy, pargs, device, log)
            _atomic_json(path, {"baseline": name, "status": "ok", "sizes": res, "seconds": round(time.time() - t0, 1)})


def anatomy_structures(root, data, share=0.9):
    """Structures present in >= 90% of the annotated train images (lungs, heart): the table's segmentation column
    averages Dice over these. Rare findings get Dice 0 from every linear head (BENCHMARKS.md): they would dilute it."""
    out = []
    rows = np.flatnonzero(data["split"] == "train")[:300]
    for s in data["structures"]:
        present = []
        for r in rows:
            p = os.path.join(root, "masks", s, data["ids"][r] + ".png")
            if os.path.isfile(p):
                present.append(bool(np.asarray(Image.open(p).convert("L")).max() >= 128))
        if present and np.mean(present) >= share:
            out.append(s)
    return out


_SAMPLES = {}                                                   # (result file, size, resamples) -> _run_samples


def _run_samples(res, size, data, resamples, test_rows, anatomy):
    """One run's (point, bootstrap samples) per metric at one probe size: '<probe>/auroc', '<probe>/auprc', 'dice'.
    Memoised per result file: the table is rebuilt after every run, and the bootstrap is its costly part."""
    path = res.get("_path")
    key = (path, os.stat(path).st_mtime_ns if path else None, size, len(resamples), tuple(anatomy))
    if key[0] and key in _SAMPLES:
        return _SAMPLES[key]
    out = _run_samples_uncached(res, size, data, resamples, test_rows, anatomy)
    if key[0]:
        _SAMPLES[key] = out
    return out


def _run_samples_uncached(res, size, data, resamples, test_rows, anatomy):
    r = res["sizes"].get(str(size))
    if r is None:
        return {}
    out = {}
    for probe, c in r["cls"].items():
        stats, smp = cls_statistics(np.array(c["scores"], dtype=np.float64), data, resamples, test_rows)
        for m in ("auroc", "auprc"):
            if stats["macro"][m] is not None:
                out[f"{probe}/{m}"] = (stats["macro"][m], smp[("macro", m)])
    ds = [np.array([np.nan if v is None else v for v in r["dice_pos"][s]]) for s in anatomy if s in r["dice_pos"]]
    if ds:
        d = np.stack(ds)                                                   # (structures, n_test)
        point = float(np.mean([np.nanmean(x) for x in d]))
        smp = np.array([np.mean([np.nanmean(x[idx]) if np.isfinite(x[idx]).any() else np.nan for x in d])
                        for idx in resamples])
        out["dice"] = (point, smp)
    out["erank"] = (r["geometry"]["erank"], None)
    return out


def write_ablation_table(a, data, anatomy, log):
    """Rebuilds OUT/ablation_s{steps}.md and .json from every finished run (partial tables are fine)."""
    run_root = os.path.join(a.out, f"s{a.steps}")
    test_rows = np.flatnonzero(data["split"] == "test")
    pats = data["patients"][test_rows]
    groups = [np.flatnonzero(pats == p) for p in dict.fromkeys(pats)]
    resamples = bootstrap_indices(groups, a.n_boot, 0)
    runs, failed = {}, {}
    for path in _result_paths(run_root):
        res = {**json.load(open(path)), "_path": path}
        if res.get("status") != "ok":
            failed.setdefault(res["row"], []).append(f"seed {res['seed']}: {res.get('error')}")
            continue
        runs.setdefault(res["row"], []).append(res)
    base_res = {}
    for d in (os.listdir(os.path.join(a.out, "baselines")) if os.path.isdir(os.path.join(a.out, "baselines")) else []):
        p = os.path.join(a.out, "baselines", d, "result.json")
        if os.path.isfile(p):
            base_res[d] = {**json.load(open(p)), "_path": p}
    order = [r[0] for r in a.all_rows]
    meta = {r[0]: r for r in a.all_rows}
    metrics = [f"{p}/auroc" for p in CLS_PROBES] + ["dice"] + [f"{p}/auprc" for p in CLS_PROBES]
    table = {"steps": a.steps, "n_boot": a.n_boot, "probe_sizes": a.probe_sizes, "anatomy": anatomy,
             "recipe": a.recipe, "rows": {}, "baselines": {}, "failed": failed}
    md = [f"# Ablation table: {a.steps} pretraining steps per run (PARTIAL: {len(runs)} of {len(order)} rows)"
          if len(runs) < len(order) else f"# Ablation table: {a.steps} pretraining steps per run", "",
          f"Recipe (`experiment.sh cpu`, warmup 10% of the steps): `{' '.join(a.recipe)}`. Every row changes one "
          f"factor. Probes are frozen and identical for every row (attentive {a.epochs} epochs, segmentation "
          f"{a.seg_epochs} epochs, linear head); Dice is the mean over {', '.join(anatomy) or 'no structure'} on the "
          f"test "
          f"images that contain them. Cells: mean over the row's seeds [95% bootstrap CI over {len(groups)} test "
          f"patients, {a.n_boot} resamples], then each seed's own value, then paired two-sided p-values of the "
          f"seed-mean vs the baseline row (Δb), the random-init twin (r) and raw pixels (px); ↑/↓ = significant "
          f"at "
          f"p < 0.05. The bootstrap covers test-set sampling only: compare a Δ with the spread between seeds.", ""]
    for size in a.probe_sizes:
        base_smp = {}
        summ = {}
        for rid in [r for r in order if r in runs]:
            per_seed = [_run_samples(res, size, data, resamples, test_rows, anatomy) for res in runs[rid]]
            cfg = runs[rid][0]["train_config"]
            refs = {"r": base_res.get(_arch_key(cfg)), "px": base_res.get(f"pixels_p{cfg['patch']}")}
            ref_smp = {k: _run_samples(v, size, data, resamples, test_rows, anatomy) if v else {}
                       for k, v in refs.items()}
            row = {"seeds": [res["seed"] for res in runs[rid]], "factor": meta[rid][1], "value": meta[rid][2],
                   "final_loss": [res["final_loss"] for res in runs[rid]],
                   "pretrain_seconds": [res["pretrain_seconds"] for res in runs[rid]], "metrics": {}}
            for m in metrics + ["erank"]:
                have = [ps[m] for ps in per_seed if m in ps]
                if not have:
                    continue
                point = float(np.mean([h[0] for h in have]))
                e = {"mean": point, "per_seed": [h[0] for h in have]}
                if m != "erank":
                    smp = np.mean(np.stack([h[1] for h in have]), 0)
                    e["ci"] = percentile_ci(smp)
                    if rid == "baseline":
                        base_smp[m] = (point, smp)
                    elif m in base_smp:
                        e["vs_baseline"] = {"diff": point - base_smp[m][0], "p": paired_p_value(smp, base_smp[m][1])}
                    for k, rs in ref_smp.items():
                        if m in rs:
                            e[f"vs_{k}"] = {"diff": point - rs[m][0], "p": paired_p_value(smp, rs[m][1]),
                                            "per_seed_p": [paired_p_value(h[1], rs[m][1]) for h in have]}
                else:
                    for k, rs in ref_smp.items():
                        if m in rs:
                            e[f"vs_{k}"] = {"diff": point - rs[m][0]}
                row["metrics"][m] = e
            # the issue's targets at this size, each required of the seed mean AND of every seed alone
            checks = {}
            for p in CLS_PROBES + ("dice",):
                key = "dice" if p == "dice" else f"{p}/auroc"
                e = row["metrics"].get(key, {}).get("vs_r")
                checks[f"{p} > random"] = bool(e and e["diff"] > 0 and e["p"] is not None and e["p"] < 0.05 and
                                               all(q is not None and q < 0.05 for q in e["per_seed_p"]))
            pix = [(rs[f"{p}/auprc"]) for p in CLS_PROBES if f"{p}/auprc" in ref_smp["px"]]
            if pix:
                best_pt, best_smp = max(pix, key=lambda t: t[0])
                ok = False
                for p in CLS_PROBES:
                    hv = [ps[f"{p}/auprc"] for ps in per_seed if f"{p}/auprc" in ps]
                    if not hv:
                        continue
                    smp = np.mean(np.stack([h[1] for h in hv]), 0)
                    pv = paired_p_value(smp, best_smp)
                    seeds_ok = all(h[0] > best_pt and (paired_p_value(h[1], best_smp) or 1) < 0.05 for h in hv)
                    ok |= bool(np.mean([h[0] for h in hv]) > best_pt and pv is not None and pv < 0.05 and seeds_ok)
                checks["AUPRC > best pixel probe"] = ok
            er = row["metrics"].get("erank")
            if er and "vs_r" in er:
                rer = er["mean"] - er["vs_r"]["diff"]
                checks["erank >= random"] = all(v >= rer for v in er["per_seed"])
            row["targets"] = checks
            summ[rid] = row
        table["rows"][str(size)] = summ
        table["baselines"][str(size)] = {k: {m: {"mean": v[0], "ci": percentile_ci(v[1]) if v[1] is not None else None}
                                             for m, v in _run_samples(r, size, data, resamples, test_rows,
                                                                      anatomy).items()}
                                         for k, r in base_res.items()}
        md += _ablation_md(size, summ, table["baselines"][str(size)])
    if failed:
        md += ["", "Failed runs: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in failed.items())]
    md += _stability_md(a, data, anatomy, resamples, test_rows)
    stem = os.path.join(a.out, f"ablation_s{a.steps}")
    write_text(stem + ".json", json.dumps(table, indent=1, default=float))
    write_text(stem + ".md", "\n".join(md) + "\n")
    log(f"ablation table: {stem}.md ({len(runs)} rows with results)")
    return 0


def _pfmt(e):
    if not e or e.get("p") is None:
        return "-"
    mark = (" ↑" if e["diff"] > 0 else " ↓") if e["p"] < 0.05 else ""
    return f"{e['diff']:+.3f} (p {e['p']:.3f}){mark}"


def _cell(e, show_base=True):
    if not e:
        return "-"
    ci = f" [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]" if e.get("ci") else ""
    lines = [f"**{e['mean']:.3f}**{ci}", "seeds " + " / ".join(f"{v:.3f}" for v in e["per_seed"])]
    if show_base and "vs_baseline" in e:
        lines.append(f"Δb {_pfmt(e['vs_baseline'])}")
    refs = [f"{k} {_pfmt(e[f'vs_{k}'])}" for k in ("r", "px") if f"vs_{k}" in e]
    if refs:
        lines.append(" · ".join(refs))
    return "<br>".join(lines)


def _ablation_md(size, summ, baselines):
    L = [f"## Probed at {size} px", "",
         "| row | factor: value | linear AUROC | grid AUROC | attentive AUROC | anatomy Dice | effective rank | "
         "targets met |", "|---|---|---|---|---|---|---|---|"]
    for rid, row in summ.items():
        m = row["metrics"]
        er = m.get("erank")
        er_s = "-" if not er else f"{er['mean']:.1f} (" + " / ".join(f"{v:.1f}" for v in er["per_seed"]) + ")" + \
            (f"<br>random {er['mean'] - er['vs_r']['diff']:.1f}" if "vs_r" in er else "")
        t = row["targets"]
        met = f"{sum(t.values())}/{len(t)}" + ("<br>" + ", ".join(k for k, v in t.items() if v) if any(t.values())
                                               else "")
        L.append(f"| {rid} | {row['factor']}: {row['value']} | " +
                 " | ".join(_cell(m.get(k)) for k in ("linear/auroc", "grid/auroc", "attentive/auroc", "dice")) +
                 f" | {er_s} | {met} |")
    for name, b in sorted(baselines.items()):
        cells = [f"{b[k]['mean']:.3f}" + (f" [{b[k]['ci'][0]:.3f}, {b[k]['ci'][1]:.3f}]" if b[k].get("ci") else "")
                 if k in b else "-" for k in ("linear/auroc", "grid/auroc", "attentive/auroc", "dice")]
        er = f"{b['erank']['mean']:.1f}" if "erank" in b else "-"
        L.append(f"| *{name}* | reference | " + " | ".join(cells) + f" | {er} | |")
    L += ["", f"Macro AUPRC at {size} px (the issue's pixel target is on AUPRC):", "",
          "| row | linear | grid | attentive |", "|---|---|---|---|"]
    for rid, row in summ.items():
        L.append(f"| {rid} | " + " | ".join(_cell(row["metrics"].get(f"{p}/auprc")) for p in CLS_PROBES) + " |")
    for name, b in sorted(baselines.items()):
        L.append(f"| *{name}* | " + " | ".join(f"{b[k]['mean']:.3f}" if k in b else "-"
                                               for k in (f"{p}/auprc" for p in CLS_PROBES)) + " |")
    return L + [""]


def _stability_md(a, data, anatomy, resamples, test_rows):
    """Ranking stability: for the rows run at several --steps, Spearman correlation of the rows' scores between run
    lengths (per metric, at the largest probe size). Agreement means the short runs rank the factors as longer do."""
    lengths = sorted(int(d[1:]) for d in os.listdir(a.out) if d.startswith("s") and d[1:].isdigit()
                     and os.path.isdir(os.path.join(a.out, d)))
    if len(lengths) < 2:
        return []
    size = max(a.probe_sizes)
    score = {}
    for n in lengths:
        for path in _result_paths(os.path.join(a.out, f"s{n}")):
            res = {**json.load(open(path)), "_path": path}
            if res.get("status") == "ok":
                for m, (pt, _) in _run_samples(res, size, data, resamples[:1], test_rows, anatomy).items():
                    score.setdefault((n, m, res["row"]), []).append(pt)
    L = ["", f"## Ranking stability between run lengths (probed at {size} px; rows present at both lengths)", "",
         "| metric | " + " | ".join(f"{x} vs {y} steps" for x, y in zip(lengths, lengths[1:])) + " |",
         "|---|" + "---|" * (len(lengths) - 1)]
    for m in [f"{p}/auroc" for p in CLS_PROBES] + ["dice", "erank"]:
        cells = []
        for x, y in zip(lengths, lengths[1:]):
            common = sorted({k[2] for k in score if k[0] == x and k[1] == m} & {k[2] for k in score
                                                                              if k[0] == y and k[1] == m})
            if len(common) < 3:
                cells.append(f"{len(common)} rows (need 3)")
                continue
            u = np.array([np.mean(score[(x, m, r)]) for r in common])
            v = np.array([np.mean(score[(y, m, r)]) for r in common])
            if np.ptp(u) == 0 or np.ptp(v) == 0:
                cells.append(f"all {len(common)} rows tie at one length")
                continue
            rho = float(np.corrcoef(_ranks(u), _ranks(v))[0, 1])
            cells.append(f"Spearman {rho:+.2f} over {len(common)} rows")
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    return L


if __name__ == "__main__":
    sys.exit(main())
