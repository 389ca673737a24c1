"""
data_prep.py: chest X-ray datasets (or synthetic phantoms) -> one training-ready folder.

RadJEPA trains on, and eval.py probes, a single "prepared" layout. This file writes that layout from any of the
public datasets a user may have downloaded, from a folder of hospital DICOMs, or (with no data at all) from
procedurally generated chest-radiograph phantoms, so the whole pipeline runs on a fresh machine.

    python data_prep.py synthetic prep/ --n 2000                     # no download needed
    python data_prep.py nih ~/data/ChestX-ray14 prep_nih/ --workers 8
    python data_prep.py chexpert ~/data/CheXpert-v1.0-small prep_cx/ --uncertain mixed --frontal-only
    python data_prep.py folder /mnt/pacs_export prep_site/           # any tree of PNG/JPEG/TIFF/DICOM
    python data_prep.py iu_xray ~/data/iu_xray prep_iu/              # Open-i XML reports + PNGs -> with reports.csv
    python data_prep.py bench /tmp/bench                             # conversion + loader throughput

Prepared layout (OUT/):
    images/<id>.png            8-bit grayscale, S x S. Padded to square (aspect ratio kept), then resized to S.
    masks/<structure>/<id>.png 0/255, same S x S geometry as the image; absent file = no mask for that image.
    labels.csv                 image,patient,split,<label>...   cells 1 / 0 / empty (= unknown)
    info.csv                   image,sex,age,view              (only where the source has them)
    reports.csv                image,findings,impression       (only where the source has reports; UTF-8)
    meta.json                  source, size, labels, structures, counts and prevalence per split, uncertain
                               policy, every skipped file with its reason.
    params.json                source, SRC, size, seed, modality: written before the first image; a later run into
                               OUT with other values is refused (--overwrite starts over), so runs never mix.
    .lock                      held by the run writing OUT: a second run into OUT at the same time is refused.

Why pad-to-square instead of a centre crop: a crop of a portrait radiograph cuts the costophrenic angles and the
lateral chest wall, exactly where effusions and pneumothoraces show. Padding keeps all anatomy and keeps the
aspect ratio, so a heart looks as wide as it is (the cardiothoracic ratio survives).

Splits are by patient: the dataset's official split where one exists, otherwise a deterministic hash of the
patient id (sha1 -> 70% train / 10% val / 20% test; see split_for_patient).

The file reads top-down: helpers (reading, geometry) -> the conversion engine -> one section per source
-> synthetic phantoms -> benchmark -> CLI. Only numpy, pillow and tqdm are needed; pydicom only for DICOM sources.
Atomic file writing, the OUT lock, CSV reading and image decoding are plumbing.py's, shared with the trainer.
"""

import argparse
import csv
import hashlib
import io
import math
import os
import re
import shutil
import sys
import time
import unicodedata
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

if __package__:  # installed: this file is radjepa.data_prep, its sibling radjepa.plumbing
    from . import plumbing
else:            # a clone: `python data_prep.py` from the repository root
    import plumbing

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a nicety, never a requirement
    def tqdm(it, **kw):
        return it

IMAGE_EXTS = plumbing.IMAGE_EXTS | {".dcm", ".dicom"}  # what a source tree may hold; DICOM is decoded here
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test for the patient-hash split
VAL_OF_TRAIN = 0.125               # val share carved out of an official "train" set that has no val part

NIH_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
              "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]
CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices"]
VINDR_CLASSES = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
                 "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
                 "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis"]
# CheXpert paper's best per-label choice: U-Ones for Atelectasis and Edema, U-Zeros for the rest.
MIXED_ONES = {"Atelectasis", "Edema"}
UNCERTAIN_POLICIES = ["ignore", "zeros", "ones", "mixed"]

# Which package decodes which compressed DICOM transfer syntax (pydicom itself only reads uncompressed and RLE).
CODEC_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pillow or pylibjpeg-libjpeg",  # JPEG Baseline (RSNA, SIIM)
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg or pillow",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg or python-gdcm",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg or python-gdcm",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg or python-gdcm",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg or python-gdcm",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg or python-gdcm",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg or python-gdcm",  # JPEG 2000
}


class PrepError(Exception):
    """A problem with the user's input as a whole (missing CSV, missing column): stops the run with one line.
    plumbing.BadInput (a CSV that is not UTF-8, a full disk, OUT in use) stops it the same way."""


class BadFile(Exception):
    """One unreadable file: it is skipped and listed in meta.json, the run goes on."""


class MissingCodec(PrepError):
    """A compressed DICOM whose decoder is not installed: every such file would fail, so stop and say what to install."""


# ----------------------------------------------------------------------------------------------------------------
# Reading images: everything becomes float32 [H, W] in [0, 1], 0 = black (air), 1 = white (bone).
# PNG/JPEG/TIFF/BMP (8- or 16-bit, gray/RGB/RGBA/palette) are plumbing.load_image's, as for the trainer;
# DICOM and JSRT's raw files are read here.

def read_image(path, modalities=None):
    """Read an image file or a DICOM. Raises BadFile with the reason (no path: meta.json names the file).
    modalities: DICOM Modality values to accept (e.g. CR, DX); None accepts any."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise BadFile(f"cannot read: {e.strerror}") from None
    if not head:
        raise BadFile("zero-byte file")
    if Path(path).suffix.lower() in (".dcm", ".dicom") or head[128:132] == b"DICM":
        return read_dicom(path, modalities)
    try:
        return plumbing.load_image(path)
    except plumbing.BadImage as e:
        raise BadFile(str(e).removeprefix(f"{path}: ")) from None


def read_dicom(path, modalities=None):
    """DICOM -> float [0, 1]: decode, modality LUT, VOI LUT or window, BitsStored scaling, MONOCHROME1 inversion.
    A Modality outside `modalities` (a CT or MR slice is not a chest radiograph) is a BadFile, before decoding."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise PrepError("reading DICOM needs pydicom: pip install pydicom") from None
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as e:
        raise BadFile(f"not a readable DICOM: {e}") from None
    if "PixelData" not in ds:
        raise BadFile("DICOM without pixel data")
    modality = str(ds.get("Modality", "") or "").upper()
    if modalities and modality and modality not in modalities:
        raise BadFile(f"DICOM modality {modality} is not a radiograph ({'/'.join(modalities)}); "
                      f"add --modality {modality} to convert it anyway")
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    try:
        arr = ds.pixel_array
    except Exception as e:
        if ts in CODEC_PACKAGES and ("decod" in str(e).lower() or "plugin" in str(e).lower()):
            raise MissingCodec(f"{path}: transfer syntax {ts} needs a decoder: pip install {CODEC_PACKAGES[ts]}") from None
        raise BadFile(f"cannot decode DICOM pixels: {e}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") and arr.shape[-1] == 3:
        return arr.astype(np.float32).mean(-1) / (2.0 ** int(ds.get("BitsStored", 8)) - 1)
    if arr.ndim == 3:  # multi-frame: the first frame is the radiograph
        arr = arr[0]
    bits = int(ds.get("BitsStored", 0) or 16)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    has_modality = "ModalityLUTSequence" in ds or float(ds.get("RescaleSlope", 1) or 1) != 1 \
        or float(ds.get("RescaleIntercept", 0) or 0) != 0
    x = apply_modality_lut(arr, ds) if has_modality else arr  # RescaleSlope/Intercept or a Modality LUT Sequence
    if "VOILUTSequence" in ds:
        x = apply_voi_lut(x, ds, index=0, prefer_lut=True)
        lo, hi = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1  # the LUT's output range
        hi = max(hi, float(x.max()))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        x = apply_voi_lut(x, ds, index=0)
        # pydicom's windowing maps onto the stored range (signed/unsigned, through the rescale if there is one)
        lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0 ** bits - 1)
        if "ModalityLUTSequence" in ds:
            lo, hi = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
        elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
            s, b = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            lo, hi = lo * s + b, hi * s + b
    elif has_modality:  # values are in physical units with no nominal range: use the image's own range
        lo, hi = float(x.min()), float(x.max())
    else:  # scale by the stored bit depth (a 12-bit image has max 4095, not 65535)
        lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0 ** bits - 1)
    x = np.clip((x.astype(np.float64) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    invert = photometric == "MONOCHROME1"  # low value = white; invert *after* windowing
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        invert = not invert
    return (1.0 - x if invert else x).astype(np.float32)


def read_jsrt(path):
    """JSRT .IMG: headerless 2048x2048 big-endian uint16 holding 12-bit data, stored with inverted polarity."""
    raw = Path(path).read_bytes()
    if len(raw) != 2048 * 2048 * 2:
        raise BadFile(f"JSRT raw image must be {2048 * 2048 * 2} bytes, got {len(raw)}")
    a = np.frombuffer(raw, dtype=">u2").reshape(2048, 2048).astype(np.float32)
    return (4095.0 - np.clip(a, 0, 4095)) / 4095.0


def read_mask(path):
    """A binary mask file (PNG/GIF/...) -> bool [H, W]."""
    return read_image(path) > 0.5


def rle_decode(rle, h, w, mode="auto"):
    """SIIM run-length encoding -> bool [h, w]. Pixels are numbered column-major (down the first column first).

    mode "relative" (SIIM stage 1): each start is an offset from the end of the previous run.
    mode "absolute" (standard Kaggle RLE): each start is a 0-based pixel index.
    mode "auto": relative, unless that runs past the image while the absolute reading is monotone and fits."""
    nums = [int(v) for v in rle.split()]
    starts, lengths = nums[0::2], nums[1::2]
    if mode == "auto":
        rel_end = sum(starts) + sum(lengths)
        monotone = all(b >= a + l for a, l, b in zip(starts, lengths, starts[1:]))
        mode = "absolute" if rel_end > h * w and monotone else "relative"
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    for s, l in zip(starts, lengths):
        pos = pos + s if mode == "relative" else s
        flat[pos:pos + l] = True
        if mode == "relative":
            pos += l
    return flat.reshape(w, h).T  # column-major: reshape (W, H) then transpose


# ----------------------------------------------------------------------------------------------------------------
# Geometry and writing.

def pad_to_square_resize(img, size, fill=0.0):
    """float [H, W] -> float [size, size]: pad the short side (centred, with `fill`), then resize (antialiased).

    Padding keeps the aspect ratio and every pixel of anatomy; masks use the same function so they stay aligned."""
    h, w = img.shape
    s = max(h, w)
    if h != w:
        top, left = (s - h) // 2, (s - w) // 2
        img = np.pad(img, ((top, s - h - top), (left, s - w - left)), constant_values=fill)
    if s == size:
        return img.astype(np.float32)
    pil = Image.fromarray(img.astype(np.float32), mode="F")
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def to_uint8(img):
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def mask_to_square(mask, size):
    """bool [H, W] -> uint8 {0, 255} [size, size]: same transform as the image, then threshold at 0.5."""
    return np.where(pad_to_square_resize(mask.astype(np.float32), size) >= 0.5, 255, 0).astype(np.uint8)


def split_for_patient(patient, fractions=SPLIT_FRACTIONS):
    """Deterministic patient -> split: sha1 of the id gives a number u in [0, 1); u < 0.7 train, < 0.8 val, else
    test. Same on every machine and every run, and all images of a patient land in the same split."""
    u = int(hashlib.sha1(str(patient).encode()).hexdigest()[:8], 16) / 2 ** 32
    names = ("train", "val", "test")
    acc = 0.0
    for name, frac in zip(names, fractions):
        acc += frac
        if u < acc:
            return name
    return names[-1]


def train_or_val(patient):
    """For an official training set without its own val part: carve out 12.5% of its patients as val."""
    return split_for_patient(patient, (1 - VAL_OF_TRAIN, VAL_OF_TRAIN, 0.0))


def safe_id(text):
    """Anything -> a file-name-safe image id. Letters of any script are kept (NFC-normalised: macOS and Linux spell
    'ü' differently); anything else becomes '_', and then a stable hash of the original text is appended, so that
    'p 1/a' and 'p_1/a' never get the same id. The id is a function of the text alone, so resumed runs agree."""
    text = unicodedata.normalize("NFC", text)
    out = re.sub(r"[^\w.-]+", "_", text).strip("._") or "img"
    return out if out == text else f"{out}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def read_rows(path, required=()):
    """A source's CSV (or .csv.gz) -> list of dicts keyed by the stripped header names, cells stripped. The
    reading is plumbing.read_csv's: strict UTF-8 (a bad byte names the line), no field-size limit, a missing
    column names it and the file. (csv splits `OriginalImage[Width,Height]` in two; we never use them.)"""
    header, rows = plumbing.read_csv(path, required)
    return [dict(zip(header, (c.strip() for c in cells))) for _, cells in rows]


def find_file(root, *names):
    """The first of `names` that exists under root (directly, or one level down)."""
    for name in names:
        for p in (Path(root) / name, *Path(root).glob(f"*/{name}")):
            if p.exists():
                return p
    return None


def index_files(root, exts, skip=None):
    """basename-without-extension -> path, for every file under root with one of `exts` (nested layouts). The folder
    `skip` (our own OUT, when it lies inside the dataset) is never indexed: its PNGs carry the originals' names."""
    out, skip = {}, skip and Path(skip).resolve()
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(dirpath, d).resolve() != skip]
        for f in files:
            if os.path.splitext(f)[1].lower() in exts:
                out.setdefault(os.path.splitext(f)[0], os.path.join(dirpath, f))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The conversion engine. A source builds a list of tasks, one per image, each a plain (picklable) dict:
#   {"id", "src", "reader": "auto"|"jsrt"|"phantom", "patient", "split" (None = hash), "labels": {name: "1"|"0"|""},
#    "masks": {structure: {"files": [paths]} | {"rle": [str], "mode": str}}, "info": {...}, "phantom": {...}}
# Workers convert tasks in parallel; the main process writes labels.csv / meta.json once at the end.

def convert_one(job):
    """Worker: convert one task. Returns (id, status, reasons) with status "ok" | "skip" | "fatal"; never raises,
    so one bad file cannot crash the run. Masks are written first and the image last: the image marks 'done'.
    PNGs are written by plumbing.save_png (temp file + rename: a killed run never leaves half a PNG). "fatal"
    is what every file would hit (a missing decoder, a full disk): the run stops with that one line."""
    task, out, size = job
    reasons = []
    try:
        if task["reader"] == "phantom":
            img, masks = render_phantom(task["phantom"], size)
            for name, m in masks.items():
                plumbing.save_png(Path(out, "masks", name, task["id"] + ".png"),
                                  np.where(m, 255, 0).astype(np.uint8))
            plumbing.save_png(Path(out, "images", task["id"] + ".png"), img)
            return task["id"], "ok", reasons
        img = read_jsrt(task["src"]) if task["reader"] == "jsrt" else read_image(task["src"], task.get("modalities"))
        for name, spec in task.get("masks", {}).items():
            try:
                if "rle" in spec:
                    m = np.zeros(img.shape, bool)
                    for r in spec["rle"]:
                        m |= rle_decode(r, *img.shape, mode=spec.get("mode", "auto"))
                else:
                    m = np.zeros((1, 1), bool)
                    for i, f in enumerate(spec["files"]):
                        part = read_mask(f)
                        m = part if i == 0 else (m | part if part.shape == m.shape else m)
                plumbing.save_png(Path(out, "masks", name, task["id"] + ".png"), mask_to_square(m, size))
            except plumbing.BadInput:  # cannot write: not this mask's fault
                raise
            except (BadFile, ValueError, OSError) as e:
                reasons.append(f"mask {name}: {e}")  # no mask file for this image; the image itself is fine
        plumbing.save_png(Path(out, "images", task["id"] + ".png"), to_uint8(pad_to_square_resize(img, size)))
        return task["id"], "ok", reasons
    except BadFile as e:
        return task["id"], "skip", [str(e)]
    except (PrepError, plumbing.BadInput) as e:  # MissingCodec, no pydicom, cannot write
        return task["id"], "fatal", [str(e)]
    except Exception as e:  # anything unexpected in one file: record it, keep going
        return task["id"], "skip", [f"{type(e).__name__}: {e}"]


IMAGE_PARAMS = ("source", "src", "size", "seed", "modality", "phantom_version")  # what decides an image's pixels


def claim_folder(out, params, overwrite=False):
    """A folder is resumed only by a run with the image-defining parameters recorded in OUT/params.json when it was
    started (before its first image), so old images never sit beside the labels of a new run. --n, label policies
    and the like may change: run_conversion then removes the images the new run does not list. --overwrite deletes
    what an earlier run wrote (images/, masks/, the CSVs, meta.json, params.json) and starts over."""
    out = Path(out)
    if overwrite:
        for d in ("images", "masks"):
            shutil.rmtree(out / d, ignore_errors=True)
        for f in ("labels.csv", "info.csv", "meta.json", "params.json"):
            (out / f).unlink(missing_ok=True)
    old = params
    if not any(out.glob("images/*.png")):
        pass  # nothing to mix with
    elif (out / "params.json").exists():
        old = plumbing.read_json(out / "params.json")
        if not isinstance(old, dict):
            raise PrepError(f"{out}/params.json is not readable JSON: it cannot say how the images were "
                            f"made; rerun with --overwrite to start over, or use another folder")
        if "phantom_version" in params and "phantom_version" not in old:
            old["phantom_version"] = 1                   # written before there were versions: that was version 1
    elif (out / "meta.json").exists():  # written by an older data_prep.py: compare what it recorded
        m = plumbing.read_json(out / "meta.json") or {}
        old = {**params, **{k: m[k] for k in ("source", "size", "seed") if k in m and k in params}}
        if "phantom_version" in params:
            old["phantom_version"] = m.get("phantom_version", 1)
    else:
        raise PrepError(f"{out}/images holds images of a run that recorded no parameters; rerun with --overwrite "
                        f"to start over, or use another folder")
    diff = [f"{k} {old.get(k)} -> {v}" for k, v in params.items() if old.get(k) != v]
    if diff:
        raise PrepError(f"{out} was prepared with other parameters ({', '.join(diff)}): its images would not match; "
                        f"rerun with --overwrite to start over, or use another folder")
    out.mkdir(parents=True, exist_ok=True)
    plumbing.write_json(out / "params.json", params)


def run_conversion(tasks, out, size, workers, source, labels, structures, skipped=(), extra_meta=None):
    """Convert every task not already done, then write labels.csv, info.csv and meta.json atomically. Images (and
    masks) in OUT that no task lists, left by an earlier run with another --n or source content, are removed."""
    out = Path(out)
    first = {}
    for t in tasks:
        if (f := first.setdefault(t["id"], t)) is not t:
            raise PrepError(f"{source}: duplicate image id {t['id']!r} in the index ({f.get('src')} and "
                            f"{t.get('src')})")
    keep = set(first)
    stale = [p for p in out.glob("images/*.png") if p.stem not in keep]
    stale += [p for p in out.glob("masks/*/*.png") if p.stem not in keep]
    for p in stale:
        p.unlink()
    if stale:
        print(f"removed {len(stale)} image/mask files of an earlier run that this run does not list")
    for d in [out / "images"] + [out / "masks" / s for s in structures]:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob(".*.tmp*"):  # leftovers of a killed run (never a complete file)
            stale.unlink(missing_ok=True)
    skipped = list(skipped)
    todo = [t for t in tasks if not (out / "images" / (t["id"] + ".png")).exists()]  # resume: done = image exists
    if len(todo) < len(tasks):
        print(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} images already converted")
    failed = set()
    jobs = [(t, str(out), size) for t in todo]
    by_id = {t["id"]: t for t in tasks}
    pool = Pool(workers) if workers > 1 and len(jobs) > 1 else None
    results = pool.imap_unordered(convert_one, jobs, chunksize=4) if pool else map(convert_one, jobs)
    try:
        for tid, status, reasons in tqdm(results, total=len(jobs), desc=f"{source} -> {out}", unit="img",
                                         disable=len(jobs) < 2):
            src = str(by_id[tid].get("src") or tid)
            if status == "fatal":
                raise PrepError(reasons[0])
            if status == "skip":
                failed.add(tid)
            skipped += [{"file": src, "reason": r} for r in reasons]
    finally:
        if pool:
            pool.terminate()
            pool.join()
    done = [t for t in tasks if t["id"] not in failed and (out / "images" / (t["id"] + ".png")).exists()]
    extra_meta = dict(extra_meta or {})
    report_skipped = extra_meta.pop("report_skipped", None)        # None: this source/run has no reports at all
    if report_skipped is not None or any("report" in t for t in tasks):
        extra_meta["reports"] = {**write_reports(out, done), "skipped": report_skipped or []}
    elif (out / "reports.csv").exists():                            # an earlier run's reports do not belong to this one
        (out / "reports.csv").unlink()
    write_outputs(out, done, source, size, labels, structures, skipped, extra_meta)
    return done


def write_outputs(out, tasks, source, size, labels, structures, skipped, extra_meta):
    """labels.csv + info.csv + meta.json (counts and prevalence per split, skipped files)."""
    rows, counts = [], {"train": 0, "val": 0, "test": 0}
    pos = {s: {l: [0, 0] for l in labels} for s in counts}  # split -> label -> [positives, known]
    for t in sorted(tasks, key=lambda t: t["id"]):
        split = t.get("split") or split_for_patient(t["patient"])
        counts[split] += 1
        cells = [t["labels"].get(l, "") for l in labels]
        for l, v in zip(labels, cells):
            if v != "":
                pos[split][l][0] += v == "1"
                pos[split][l][1] += 1
        rows.append([f"images/{t['id']}.png", t["patient"], split] + cells)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "patient", "split"] + list(labels))
    w.writerows(rows)
    plumbing.write_text(out / "labels.csv", buf.getvalue())
    info_keys = sorted({k for t in tasks for k in t.get("info", {})})
    if info_keys:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image"] + info_keys)
        for t in sorted(tasks, key=lambda t: t["id"]):
            w.writerow([f"images/{t['id']}.png"] + [t.get("info", {}).get(k, "") for k in info_keys])
        plumbing.write_text(out / "info.csv", buf.getvalue())
    meta = {"source": source, "size": size, "labels": list(labels), "structures": list(structures),
            "counts": counts,
            "prevalence": {s: {l: (round(p / k, 4) if k else None) for l, (p, k) in d.items()} for s, d in pos.items()},
            "uncertain_policy": None, "n_images": len(rows), "n_skipped": len(skipped),
            "skipped": skipped, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    meta.update(extra_meta)
    plumbing.write_json(out / "meta.json", meta)
    print(f"{out}: {len(rows)} images (train {counts['train']}, val {counts['val']}, test {counts['test']}), "
          f"{len(skipped)} skipped; labels.csv, meta.json written")


# ----------------------------------------------------------------------------------------------------------------
# Sources. Each returns (tasks, label_names, structures, skipped, extra_meta).

def uncertain_value(v, label, policy, where=""):
    """CheXpert/MIMIC cell -> '1'|'0'|''. 1.0 positive, 0.0 negative, blank (= not mentioned) negative,
    -1.0 uncertain -> by policy: ignore (unknown ''), zeros, ones, mixed (ones for Atelectasis/Edema, else zeros).
    Any other cell is a PrepError naming the row (`where`) and the label: never a guess."""
    if v == "":
        return "0"
    if v.strip() not in ("1", "1.0", "0", "0.0", "-1", "-1.0"):
        raise PrepError(f"{where}: label {label!r} is {v!r}, not 1, 0, -1 or blank")
    x = float(v)
    if x == 1:
        return "1"
    if x == 0:
        return "0"
    return {"ignore": "", "zeros": "0", "ones": "1"}.get(policy, "1" if label in MIXED_ONES else "0")


def src_nih(src, args):
    entry = find_file(src, "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
    if entry is None:
        raise PrepError(f"{src}: no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv found")
    rows = read_rows(entry, ["Image Index", "Finding Labels", "Patient ID"])
    lists = {}
    for name, split in (("train_val_list.txt", "trainval"), ("test_list.txt", "test")):
        p = find_file(src, name)
        if p:
            lists.update({line.strip(): split for line in open(p) if line.strip()})
    pngs = index_files(src, {".png"}, args.out)  # images_001/images/*.png, images/*.png, ... all by basename
    tasks, skipped = [], []
    for r in rows:
        name = r["Image Index"]
        stem = os.path.splitext(name)[0]
        view = r.get("View Position", "")
        if args.frontal_only and view not in ("PA", "AP", ""):
            continue
        if stem not in pngs:
            skipped.append({"file": name, "reason": "listed in CSV but image file not found"})
            continue
        found = set(r["Finding Labels"].split("|"))
        unknown = found - set(NIH_LABELS) - {"No Finding", ""}
        if unknown:
            skipped.append({"file": name, "reason": f"unknown finding label(s) {sorted(unknown)}"})
            continue
        patient = r["Patient ID"].lstrip("0") or "0"
        official = lists.get(name)
        split = "test" if official == "test" else train_or_val(patient) if official == "trainval" else None
        tasks.append({"id": safe_id(stem), "src": pngs[stem], "reader": "auto", "patient": patient, "split": split,
                      "labels": {l: "1" if l in found else "0" for l in NIH_LABELS},
                      "info": {"sex": r.get("Patient Gender", r.get("Patient Sex", "")),  # renamed in v2020
                               "age": r.get("Patient Age", ""), "view": view}})
    return tasks, NIH_LABELS, [], skipped, {"official_split": bool(lists)}


def src_chexpert(src, args):
    src = Path(src)
    tasks, skipped = [], []
    for csv_name, split_kind in (("train.csv", "train"), ("valid.csv", "test")):
        path = src / csv_name
        if not path.exists():
            if csv_name == "train.csv":
                raise PrepError(f"{src}: train.csv not found (point SRC at the CheXpert-v1.0(-small) folder)")
            continue
        rows = read_rows(path, ["Path", "Frontal/Lateral"] + CHEXPERT_LABELS)
        for r in rows:
            # "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg": drop the dataset-name prefix
            parts = Path(r["Path"]).parts
            rel = Path(*parts[1:]) if parts and parts[0].startswith("CheXpert") else Path(r["Path"])
            m = re.search(r"patient\d+", r["Path"])
            if m is None:
                skipped.append({"file": r["Path"], "reason": "no patientNNNNN in Path"})
                continue
            if args.frontal_only and r["Frontal/Lateral"] != "Frontal":
                continue
            patient = m.group(0)
            labels = {l: uncertain_value(r[l], l, args.uncertain, f"{path}, {r['Path']}") for l in CHEXPERT_LABELS}
            tasks.append({"id": safe_id("_".join(rel.with_suffix("").parts[1:])), "src": str(src / rel),
                          "reader": "auto", "patient": patient,
                          "split": "test" if split_kind == "test" else train_or_val(patient), "labels": labels,
                          "info": {"sex": r.get("Sex", ""), "age": r.get("Age", ""),
                                   "view": r.get("AP/PA", "") or r["Frontal/Lateral"]}})
    extra = {"uncertain_policy": args.uncertain, "split_note": "valid.csv -> test; train.csv -> train/val by patient hash"}
    if getattr(args, "reports", None):
        if not Path(args.reports).is_file():
            raise PrepError(f"--reports {args.reports}: not a file (give the CheXpert Plus CSV)")
        extra["report_skipped"] = attach_chexpert_plus_reports(tasks, src, args.reports)
    return tasks, CHEXPERT_LABELS, [], skipped, extra


def src_mimic(src, args):
    src = Path(src)
    pre = "mimic-cxr-2.0.0-"
    split_f = find_file(src, pre + "split.csv.gz", pre + "split.csv")
    lab_f = find_file(src, f"{pre}{args.labeler}.csv.gz", f"{pre}{args.labeler}.csv")
    if split_f is None or lab_f is None:
        raise PrepError(f"{src}: need {pre}split.csv(.gz) and {pre}{args.labeler}.csv(.gz)")
    lab_rows = read_rows(lab_f, ["subject_id", "study_id"])
    label_names = [c for c in lab_rows[0] if c not in ("subject_id", "study_id")] if lab_rows else []
    # labels are per *study*: join them to images on (subject_id, study_id)
    study_labels = {(r["subject_id"], r["study_id"]): r for r in lab_rows}
    meta_f = find_file(src, pre + "metadata.csv.gz", pre + "metadata.csv")
    views = {r["dicom_id"]: r.get("ViewPosition", "")
             for r in read_rows(meta_f, ["dicom_id"])} if meta_f else {}
    tasks, skipped = [], []
    for r in read_rows(split_f, ["dicom_id", "study_id", "subject_id", "split"]):
        sid, study, did = r["subject_id"], r["study_id"], r["dicom_id"]
        view = views.get(did, "")
        if args.frontal_only and view not in ("PA", "AP"):
            continue
        path = src / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{study}" / f"{did}.jpg"
        lab = study_labels.get((sid, study))
        labels = {l: uncertain_value(lab[l], l, args.uncertain, f"{lab_f}, study {study}") if lab else ""
                  for l in label_names}
        split = {"validate": "val"}.get(r["split"], r["split"])
        if split not in ("train", "val", "test"):
            skipped.append({"file": str(path), "reason": f"unknown split {r['split']!r}"})
            continue
        tasks.append({"id": safe_id(did), "src": str(path), "reader": "auto", "patient": sid, "split": split,
                      "labels": labels, "info": {"view": view}})
    extra = {"uncertain_policy": args.uncertain, "labeler": args.labeler}
    reports = getattr(args, "reports", None)
    if reports and not Path(reports, "files").is_dir():
        raise PrepError(f"--reports {reports}: no files/ folder in it (give the mimic-cxr-reports root)")
    report_skipped = attach_mimic_reports(tasks, src, reports)
    if report_skipped is not None:
        extra["report_skipped"] = report_skipped
    return tasks, label_names, [], skipped, extra


def src_vindr(src, args):
    """VinDr-CXR, PhysioNet layout (annotations/image_labels_{train,test}.csv) or Kaggle layout (train.csv)."""
    src = Path(src)
    dicoms = index_files(src, {".dicom", ".dcm"}, args.out)
    votes = {}  # image_id -> (split, {label: [positive reads]}, n_readers)
    phys = find_file(src, "annotations/image_labels_train.csv")
    if phys:
        label_names = None
        for split_kind in ("train", "test"):
            p = find_file(src, f"annotations/image_labels_{split_kind}.csv")
            if p is None:
                continue
            rows = read_rows(p, ["image_id"])
            cols = [c for c in rows[0] if c not in ("image_id", "rad_id", "rad_ID")] if rows else []
            cols = ["Other diseases" if c == "Other disease" else c for c in cols]  # test file spells it singular
            label_names = label_names or cols
            for r in rows:
                r = {("Other diseases" if k == "Other disease" else k): v for k, v in r.items()}
                s, d, n = votes.setdefault(r["image_id"], (split_kind, {l: 0 for l in label_names}, [0]))
                n[0] += 1
                for l in label_names:
                    v = r.get(l, "0")
                    if v not in ("0", "0.0", "", "1", "1.0"):  # never count an unknown value as a vote
                        raise PrepError(f"{p}, image {r['image_id']}: label {l!r} is {v!r}, not 1, 0 or blank")
                    d[l] += v in ("1", "1.0")
    else:
        p = find_file(src, "train.csv")
        if p is None:
            raise PrepError(f"{src}: neither annotations/image_labels_train.csv nor train.csv found")
        label_names = VINDR_CLASSES
        reads = {}  # image -> {reader: set of classes}; one CSV row per box per reader, "No finding" = no box
        for r in read_rows(p, ["image_id", "class_name", "rad_id"]):
            reads.setdefault(r["image_id"], {}).setdefault(r["rad_id"], set()).add(r["class_name"])
        for img, by_reader in reads.items():
            votes[img] = ("train", {l: sum(l in c for c in by_reader.values()) for l in label_names}, [len(by_reader)])
    tasks, skipped = [], []
    for img, (split_kind, d, n) in votes.items():
        if img not in dicoms:
            skipped.append({"file": img, "reason": "listed in CSV but DICOM not found"})
            continue
        need = 1 if args.readers == "any" else n[0] // 2 + 1  # union over readers, or a strict majority
        labels = {l: "1" if d[l] >= need else "0" for l in label_names}
        split = "test" if split_kind == "test" else (train_or_val(img) if phys else None)
        tasks.append({"id": safe_id(img), "src": dicoms[img], "reader": "auto", "patient": img, "split": split,
                      "labels": labels})
    return tasks, label_names, [], skipped, {"reader_vote": args.readers}


def src_rsna(src, args):
    src = Path(src)
    p = find_file(src, "stage_2_train_labels.csv")
    if p is None:
        raise PrepError(f"{src}: stage_2_train_labels.csv not found")
    target = {}
    for r in read_rows(p, ["patientId", "Target"]):  # one row per box; negatives have no box and Target 0
        target[r["patientId"]] = max(target.get(r["patientId"], 0), int(float(r["Target"] or 0)))
    dicoms = index_files(src / "stage_2_train_images" if (src / "stage_2_train_images").exists() else src, {".dcm"},
                         args.out)
    tasks, skipped = [], []
    for pid, t in target.items():
        if pid not in dicoms:
            skipped.append({"file": pid, "reason": "listed in CSV but DICOM not found"})
            continue
        tasks.append({"id": safe_id(pid), "src": dicoms[pid], "reader": "auto", "patient": pid, "split": None,
                      "labels": {"Lung Opacity": str(t)}})
    return tasks, ["Lung Opacity"], [], skipped, {}


def src_siim(src, args):
    src = Path(src)
    p = find_file(src, "train-rle.csv", "stage_2_train.csv")
    if p is None:
        raise PrepError(f"{src}: train-rle.csv (or stage_2_train.csv) not found")
    rles = {}
    for r in read_rows(p, ["ImageId", "EncodedPixels"]):  # header is "ImageId, EncodedPixels" (leading space)
        rles.setdefault(r["ImageId"], [])
        if r["EncodedPixels"] not in ("-1", ""):  # -1 = no pneumothorax; several rows = several components
            rles[r["ImageId"]].append(r["EncodedPixels"])
    mode = "relative" if p.name == "train-rle.csv" else "auto"
    dicoms = index_files(src, {".dcm"}, args.out)  # dicom-images-train/<study>/<series>/<sop>.dcm
    tasks, skipped = [], []
    for img, rl in rles.items():
        if img not in dicoms:
            skipped.append({"file": img, "reason": "listed in CSV but DICOM not found"})
            continue
        tasks.append({"id": safe_id(img), "src": dicoms[img], "reader": "auto", "patient": img, "split": None,
                      "labels": {"Pneumothorax": "1" if rl else "0"},
                      "masks": {"pneumothorax": {"rle": rl, "mode": mode}}})
    return tasks, ["Pneumothorax"], ["pneumothorax"], skipped, {"rle_mode": mode}


def _nlm_tb(src, prefix, mask_for):
    """Montgomery / Shenzhen: CXR_png/<PREFIX>_<nnnn>_<y>.png with y = 1 tuberculosis, 0 normal."""
    pngs = sorted(Path(src).rglob(f"{prefix}_*.png"))
    tasks, skipped = [], []
    for p in pngs:
        if "CXR_png" not in p.parts:
            continue  # masks are named like images; images live in CXR_png/
        m = re.fullmatch(rf"({prefix}_\d+)_([01])", p.stem)
        if m is None:
            skipped.append({"file": str(p), "reason": f"name is not {prefix}_nnnn_y.png"})
            continue
        masks = mask_for(p)
        tasks.append({"id": p.stem, "src": str(p), "reader": "auto", "patient": m.group(1), "split": None,
                      "labels": {"Tuberculosis": m.group(2)}, "masks": {"lungs": {"files": masks}} if masks else {}})
    if not tasks:
        raise PrepError(f"{src}: no CXR_png/{prefix}_nnnn_y.png images found")
    return tasks, ["Tuberculosis"], ["lungs"], skipped, {}


def src_montgomery(src, args):
    def masks(p):  # lung mask = left lung U right lung, two files with the image's name
        found = [Path(src, "ManualMask", side, p.name) for side in ("leftMask", "rightMask")]
        return [str(f) for f in found if f.exists()] if all(f.exists() for f in found) else []
    return _nlm_tb(src, "MCUCXR", masks)


def src_shenzhen(src, args):
    mask_index = {p.name: str(p) for p in Path(src).rglob("*_mask.png")}  # community release: mask/<stem>_mask.png
    return _nlm_tb(src, "CHNCXR", lambda p: [mask_index[f"{p.stem}_mask.png"]] if f"{p.stem}_mask.png" in mask_index else [])


def src_jsrt(src, args):
    src = Path(src)
    imgs = sorted(list(src.rglob("*.IMG")) + list(src.rglob("*.img")))
    if not imgs:
        raise PrepError(f"{src}: no JSRT .IMG files found (All247images/)")
    # SCR masks: <...>/masks/{left lung,right lung,heart,left clavicle,right clavicle}/JPCxxxxx.gif (spaces!)
    scr = {}
    for g in src.rglob("*.gif"):
        scr.setdefault(g.parent.name.lower(), {})[g.stem] = str(g)
    structures = {"lungs": ["left lung", "right lung"], "heart": ["heart"],
                  "clavicles": ["left clavicle", "right clavicle"]}
    tasks = []
    for p in imgs:
        masks = {}
        for s, parts in structures.items():
            files = [scr.get(part, {}).get(p.stem) for part in parts]
            if all(files):
                masks[s] = {"files": files}
        tasks.append({"id": p.stem, "src": str(p), "reader": "jsrt", "patient": p.stem, "split": None,
                      "labels": {"Nodule": "1" if p.stem.upper().startswith("JPCLN") else "0"}, "masks": masks})
    return tasks, ["Nodule"], [s for s in structures if any(s in t["masks"] for t in tasks)], [], {}


def src_folder(src, args):
    """Any tree of images. Patient = the top-level sub-folder (exports are usually one folder per patient), or the
    file name for files directly in SRC. Files with no extension are tried as DICOM; other extensions are skipped.
    DICOMs whose Modality is not in --modality (default: the radiograph ones) are skipped with the reason. Ids keep
    the path's letters in any script; two links to one file are converted once."""
    src, out = Path(src).resolve(), Path(args.out).resolve()
    mods = getattr(args, "modality", None)
    mods = None if not mods or "all" in [m.lower() for m in mods] else [m.upper() for m in mods]
    tasks, skipped, seen, real = [], [], set(), {}
    for dirpath, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(dirpath, d).resolve() != out)
        for f in sorted(files):
            if f.startswith("."):
                continue
            p = Path(dirpath, f)
            rel = p.relative_to(src)
            ext = p.suffix.lower()
            if ext not in IMAGE_EXTS and ext != "":
                skipped.append({"file": str(rel), "reason": f"not an image file (extension {ext})"})
                continue
            if real.setdefault(p.resolve(), rel) != rel:
                skipped.append({"file": str(rel), "reason": f"the same file as {real[p.resolve()]} (a link)"})
                continue
            patient = rel.parts[0] if len(rel.parts) > 1 else rel.stem
            tid = safe_id("__".join(rel.with_suffix("").parts))
            if tid.lower() in seen:  # a.png next to a.dcm: keep the extension in the id
                tid = safe_id("__".join(rel.parts))
            if tid.lower() in seen:  # (case-insensitive file systems): never abort, add a stable hash
                tid = f"{tid}_{hashlib.sha1(str(rel).encode()).hexdigest()[:8]}"
            seen.add(tid.lower())
            tasks.append({"id": tid, "src": str(p), "reader": "auto", "modalities": mods,
                          "patient": patient, "split": None, "labels": {}})
    if not tasks:
        raise PrepError(f"{src}: no image files found")
    return tasks, [], [], skipped, {}


# ----------------------------------------------------------------------------------------------------------------
# Radiology reports -> OUT/reports.csv (image, findings, impression), joined to labels.csv on `image`.
# A source attaches {"findings", "impression"} to a task as task["report"]; an image whose report is missing, empty
# or has no recognisable section keeps its labels, gets no report, and is named in meta.json["reports"]["skipped"].
# MIMIC: one free-text file per study (files/pXX/pNNNNNNNN/sNNNNNNNN.txt), attached to every image of the study.
# IU X-ray: one XML per study. CheXpert: the CheXpert Plus CSV (--reports). Synthetic: written from the phantom.

# "FINDINGS:", "IMPRESSION:", "FINDINGS AND IMPRESSION:" ... at the start of a line (MIMIC's header style).
REPORT_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]*[A-Z)])[ \t]*:", re.M)
FINDINGS_HEADERS = {"FINDINGS", "FINDING"}
IMPRESSION_HEADERS = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"}
BOTH_HEADERS = {"FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION", "IMPRESSION AND FINDINGS", "FINDINGS & IMPRESSION"}


def read_report_text(path):
    """Bytes -> str: UTF-8, or Latin-1 when a byte is not UTF-8 (old exports), so one odd byte never loses a report."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def clean_text(text):
    return " ".join(text.split())


def report_sections(text):
    """Free-text report -> ({"findings", "impression"}, None) or (None, skip reason). A "FINDINGS AND IMPRESSION"
    section fills both fields; a report with an impression only has empty findings."""
    if not text.strip():
        return None, "empty file"
    heads = list(REPORT_HEADER.finditer(text))
    sec = {}
    for i, h in enumerate(heads):
        body = clean_text(text[h.end():heads[i + 1].start() if i + 1 < len(heads) else len(text)])
        name = " ".join(h.group(1).split())
        for field, names in (("findings", FINDINGS_HEADERS | BOTH_HEADERS), ("impression", IMPRESSION_HEADERS | BOTH_HEADERS)):
            if name in names and body:
                sec[field] = (sec.get(field, "") + " " + body).strip()
    if not sec:
        return None, "no FINDINGS or IMPRESSION section"
    return {"findings": sec.get("findings", ""), "impression": sec.get("impression", "")}, None


def attach_report(task, path, parsed, skipped):
    """parsed = (report, reason) from report_sections, or None when the file is missing."""
    report, reason = parsed if parsed else (None, "file not found")
    if report:
        task["report"] = report
    else:
        skipped.append({"file": str(path), "image": task["id"], "reason": reason})


def attach_mimic_reports(tasks, src, reports_dir):
    """MIMIC-CXR reports: REPORTS_DIR/files/pXX/pNNNNNNNN/sNNNNNNNN.txt (the mimic-cxr-reports download), or the same
    path beside the JPGs when reports_dir is None. Each file is read once per study. Returns the skips, or None when
    no report was asked for and none lies beside the JPGs (a plain MIMIC-CXR-JPG download has no reports)."""
    root = Path(reports_dir) if reports_dir else Path(src)
    path_of = lambda t: root / "files" / Path(t["src"]).parent.relative_to(Path(src) / "files").with_suffix(".txt")  # noqa: E731
    paths = {t["id"]: path_of(t) for t in tasks}
    if reports_dir is None and not any(p.is_file() for p in paths.values()):
        return None
    cache, skipped = {}, []
    for t in tasks:
        p = paths[t["id"]]
        if p not in cache:
            cache[p] = report_sections(read_report_text(p)) if p.is_file() else None
        attach_report(t, p, cache[p], skipped)
    return skipped


def attach_chexpert_plus_reports(tasks, src, csv_path):
    """CheXpert Plus (df_chexpert_plus_*.csv): path_to_image, section_findings, section_impression per image. Paths are
    matched without the dataset-name prefix and the extension (CheXpert Plus ships PNGs of the same JPGs)."""
    rows = read_rows(csv_path, ["path_to_image", "section_findings", "section_impression"])
    key = lambda p: str(Path(*[q for q in Path(p).parts if not q.startswith("CheXpert")]).with_suffix(""))  # noqa: E731
    by_path = {key(r["path_to_image"]): r for r in rows}
    skipped = []
    for t in tasks:
        r = by_path.get(key(os.path.relpath(t["src"], src)))
        if r is None:
            attach_report(t, csv_path, (None, "no row for this image in the reports CSV"), skipped)
            continue
        rep = {"findings": clean_text(r["section_findings"]), "impression": clean_text(r["section_impression"])}
        attach_report(t, csv_path, (rep, None) if any(rep.values()) else (None, "no FINDINGS or IMPRESSION text"),
                      skipped)
    return skipped


# IU X-ray (Open-i): labels from the report's MeSH "major" terms. A term is "Heading/qualifier/qualifier"; its heading
# (before the first '/') maps to a label when the meaning is clear. "normal" = every label 0. Headings not listed
# (e.g. "Calcified Granuloma", "Spine", "Aorta") are findings outside the label set: they set no label. A report
# indexed only as "No Indexing" has unknown labels (empty cells).
IU_MESH_LABELS = {"Atelectasis": "Atelectasis", "Pulmonary Atelectasis": "Atelectasis",
                  "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
                  "Edema": "Edema", "Pulmonary Edema": "Edema",
                  "Pleural Effusion": "Effusion", "Emphysema": "Emphysema", "Pulmonary Emphysema": "Emphysema",
                  "Fractures, Bone": "Fracture", "Hernia, Hiatal": "Hernia", "Hernia": "Hernia",
                  "Mass": "Mass", "Nodule": "Nodule", "Opacity": "Opacity", "Pneumonia": "Pneumonia",
                  "Pneumothorax": "Pneumothorax"}
IU_LABELS = sorted(set(IU_MESH_LABELS.values()))


def parse_iu_xml(path):
    """One ecgen-radiology/*.xml -> dict(report_id, findings, impression, mesh [major terms], images [(id, view)]).
    View: 'frontal'/'lateral' from a parentImage caption naming exactly one view, else by position (the first
    image of a study is the frontal one, the others lateral: the pairing convention of the Open-i exports)."""
    import xml.etree.ElementTree as ET
    root = ET.fromstring(read_report_text(path).lstrip("\ufeff").encode("utf-8"))
    text = lambda e: clean_text("".join(e.itertext())) if e is not None else ""  # noqa: E731
    sections = {(e.get("Label") or "").upper(): text(e) for e in root.iter("AbstractText")}
    uid = root.find("uId")
    images = []
    for i, im in enumerate(root.iter("parentImage")):
        cap = text(im.find("caption")).lower()
        frontal, lateral = bool(re.search(r"\b(pa|ap|frontal)\b", cap)), "lateral" in cap
        view = ("frontal" if frontal else "lateral") if frontal != lateral else ("frontal" if i == 0 else "lateral")
        if im.get("id"):
            images.append((im.get("id"), view))
    return {"report_id": uid.get("id") if uid is not None and uid.get("id") else Path(path).stem,
            "findings": sections.get("FINDINGS", ""), "impression": sections.get("IMPRESSION", ""),
            "mesh": [text(m) for m in root.iter("major")], "images": images}


def iu_labels(mesh):
    heads = {m.split("/")[0].strip() for m in mesh if m.strip()}
    if not heads or heads <= {"No Indexing"}:
        return {l: "" for l in IU_LABELS}
    found = {IU_MESH_LABELS[h] for h in heads if h in IU_MESH_LABELS}
    return {l: "1" if l in found else "0" for l in IU_LABELS}


def src_iu_xray(src, args):
    """Open-i Indiana University chest X-rays: SRC/ecgen-radiology/*.xml (NLMCXR_reports) and PNGs anywhere under SRC
    (NLMCXR_png/CXR1_1_IM-0001-3001.png). Patient = report id (the collection has no patient ids). Optional
    SRC/indiana_projections.csv (Kaggle re-export: filename, projection) overrides the view of an image."""
    xmls = sorted(Path(src).rglob("*.xml"), key=lambda p: (len(p.stem), p.stem))
    if not xmls:
        raise PrepError(f"{src}: no ecgen-radiology/*.xml report files found")
    pngs = index_files(src, {".png"})
    proj_f = find_file(src, "indiana_projections.csv")
    proj = {os.path.splitext(r["filename"])[0].removesuffix(".dcm"): r["projection"].lower()
            for r in read_rows(proj_f, ["filename", "projection"])} if proj_f else {}
    tasks, skipped, report_skipped, listed_by = [], [], [], {}
    for x in xmls:
        try:
            rep = parse_iu_xml(x)
        except Exception as e:  # ParseError, or anything else in one file: skip that study only
            skipped.append({"file": str(x), "reason": f"unreadable XML ({type(e).__name__}: {e})"})
            continue
        labels = iu_labels(rep["mesh"])
        for iid, view in rep["images"]:
            view = proj.get(iid, view)
            if args.views == "frontal" and view != "frontal":
                continue
            if iid not in pngs:
                skipped.append({"file": iid + ".png", "reason": f"listed in {x.name} but image file not found"})
                continue
            if iid in listed_by:  # whose report and labels would it get?
                first = listed_by[iid]
                where = f"twice in {x}" if first == x else f"by two report XMLs, {first} and {x}"
                raise PrepError(f"image {pngs[iid]} is listed {where}: each image belongs to one report")
            listed_by[iid] = x
            t = {"id": safe_id(iid), "src": pngs[iid], "reader": "auto", "patient": rep["report_id"], "split": None,
                 "labels": labels, "info": {"view": view}}
            body = {"findings": rep["findings"], "impression": rep["impression"]}
            attach_report(t, x, (body, None) if any(body.values()) else (None, "no FINDINGS or IMPRESSION text"),
                          report_skipped)
            tasks.append(t)
    return tasks, IU_LABELS, [], skipped, {"views": args.views, "report_skipped": report_skipped,
                                           "label_source": "MeSH major terms (data_prep.IU_MESH_LABELS)"}


def write_reports(out, tasks):
    """OUT/reports.csv: image,findings,impression for every converted image that has a report (UTF-8)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "findings", "impression"])
    rows = [t for t in sorted(tasks, key=lambda t: t["id"]) if t.get("report")]
    w.writerows([f"images/{t['id']}.png", t["report"]["findings"], t["report"]["impression"]] for t in rows)
    plumbing.write_text(Path(out) / "reports.csv", buf.getvalue())
    return {"n_images_with_report": len(rows), "n_images_without": len(tasks) - len(rows)}

SOURCES = {"nih": src_nih, "chexpert": src_chexpert, "mimic": src_mimic, "vindr": src_vindr, "rsna": src_rsna,
           "siim": src_siim, "montgomery": src_montgomery, "shenzhen": src_shenzhen, "jsrt": src_jsrt,
           "folder": src_folder, "iu_xray": src_iu_xray}


# ----------------------------------------------------------------------------------------------------------------
# Synthetic chest-radiograph phantoms: the embedded default dataset.
#
# An image is drawn in "patient coordinates" (x, y) in about [-1, 1]^2: x to the image right (= the patient's
# left), y down. Each structure is an implicit function d(x, y) (< 0 inside, roughly a distance near the edge), so
# the same function gives the image (soft edges) and the mask (d < 0), and a point can be tested for "inside the
# lung" when a finding is placed. The image is an attenuation map A (soft tissue ~1, aerated lung much less,
# bone extra), displayed through a randomised auto-window + gamma + noise, like a CR/DR system.
#
# Per patient: body habitus, thorax width, lung height, diaphragm height (inspiration), heart size/position/tilt,
# mediastinum, ribs, breast shadows. Per image (same patient, another day): rotation, shift, zoom, window,
# gamma, noise, heel-effect gradient, vessel texture, and the acute findings. Findings are local shape cues:
#   Cardiomegaly   cardiothoracic ratio 0.54-0.66 instead of 0.38-0.50 (per patient: a chronic finding)
#   Effusion       fluid filling a lung base with a meniscus rising laterally: blunted costophrenic angle
#   Nodule         a small round opacity (r 2-5% of the image) somewhere in a lung
#   Pneumothorax   a thin visceral pleural line with no lung markings beyond it (apical/lateral)
#   Consolidation  an ill-defined, mottled opacity with an irregular outline inside one lung
# The auto-window sets the grey levels from the image's own percentiles (plus jitter), so a finding does not shift
# global brightness or histogram in a way that gives the label away (tests/test_data_prep.py checks this).
#
# Two versions (--phantom-version; the version is part of params.json, so a folder never mixes them):
#   1  the original benchmark (BENCHMARKS.md §1-§10). Every image of a given seed is reproduced bit for bit.
#      Its weakness, measured: the pose barely varies (rotation +-0.08 rad, shift +-0.06, zoom 0.82-1.08), so the
#      heart border and the costophrenic angles sit at nearly fixed pixels and a linear probe on a 32x32 image solves
#      cardiomegaly and effusion (AUROC 0.96 / 0.78) as pixel templates; nodules are 3-6 px across at 128 px
#      (below a 16-px patch: every encoder is at chance), and no finding is large enough to segment.
#   2  (default) measures features rather than templates: the patient is posed and sized much more freely
#      (rotation +-0.2 rad, shift +-0.14, zoom 0.74-1.1, wider thorax / lung-height / heart-position ranges), some
#      films are collimated (black borders) or have a smooth exposure inhomogeneity, and ECG leads with electrodes
#      (nuisance, independent of the labels) cross 45% of the films. So "where" a border sits in pixels says little;
#      a finding must be recognised by what it looks like relative to the anatomy around it. Findings are visible at
#      the 128-px training resolution: nodules r 0.045-0.09 (6-12 px across at 128 px), consolidations r 0.11-0.2,
#      effusions and pneumothoraces larger; prevalences are higher (more positives in a 2,000-image test split, so
#      tighter CIs). Each image draws from its own rng streams, so v1's draws are untouched.

SYNTH_LABELS = ["Cardiomegaly", "Effusion", "Nodule", "Pneumothorax", "Consolidation"]
PHANTOM_VERSIONS = (1, 2)
SYNTH_PREVALENCE_BY_VERSION = {
    1: {"Cardiomegaly": 0.20, "Effusion": 0.15, "Nodule": 0.10, "Pneumothorax": 0.06, "Consolidation": 0.12},
    2: {"Cardiomegaly": 0.20, "Effusion": 0.18, "Nodule": 0.15, "Pneumothorax": 0.12, "Consolidation": 0.15}}
SYNTH_PREVALENCE = SYNTH_PREVALENCE_BY_VERSION[1]
SYNTH_STRUCTURES = ["lungs", "heart", "effusion", "nodule", "pneumothorax", "consolidation"]
# Per version: the sampling range of each finding's size parameter (sample_findings), which the reports split into
# small / moderate / large tertiles.
SYNTH_SIZES_BY_VERSION = {
    1: {"Effusion": ("h", 0.08, 0.30), "Nodule": ("r", 0.022, 0.05), "Pneumothorax": ("k", 1.12, 1.4),
        "Consolidation": ("r", 0.09, 0.17)},
    2: {"Effusion": ("h", 0.12, 0.36), "Nodule": ("r", 0.045, 0.09), "Pneumothorax": ("k", 1.18, 1.5),
        "Consolidation": ("r", 0.11, 0.20)}}


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def sample_anatomy(rng, version=1):
    """Per-patient anatomy (plain floats, so a task stays picklable and JSON-able)."""
    if version == 2:
        return _sample_anatomy_v2(rng)
    a = {"W": _u(rng, 0.52, 0.76),            # half-width of the thorax (inner rib margin)
         "margin": _u(rng, 0.06, 0.26),       # soft tissue outside the ribs (body habitus)
         "apex": _u(rng, -0.80, -0.62),       # lung apex height
         "dome_r": _u(rng, 0.2, 0.6),       # right hemidiaphragm (image left); inspiration depth varies a lot
         "med": _u(rng, 0.07, 0.11),          # upper mediastinum half-width
         "soft": _u(rng, 0.8, 1.2),           # soft-tissue attenuation (patient thickness)
         "air": _u(rng, 0.5, 0.7),            # how much the aerated lung lowers attenuation
         "breast": _u(rng, 0.0, 0.12) if rng.random() < 0.5 else 0.0,
         "spine_w": _u(rng, 0.05, 0.07), "vert": _u(rng, 0.075, 0.095), "vert_ph": _u(rng, 0, 1),
         "rib_y0": _u(rng, -0.95, -0.85), "rib_pitch": _u(rng, 0.10, 0.125), "rib_curv": _u(rng, 0.45, 0.7),
         "bone": _u(rng, 0.18, 0.3), "bubble": _u(rng, 0.0, 0.2) if rng.random() < 0.7 else 0.0}
    a["dome_l"] = a["dome_r"] + _u(rng, 0.02, 0.08)  # the left hemidiaphragm sits lower
    a["cardiomegaly"] = bool(rng.random() < SYNTH_PREVALENCE["Cardiomegaly"])
    # Heart: a tilted ellipse whose horizontal extent is set by the cardiothoracic ratio CTR = heart width /
    # thorax width (normal < 0.5). Its vertical size follows its width, its bottom sinks into the left dome.
    a["ctr"] = _u(rng, 0.54, 0.66) if a["cardiomegaly"] else _u(rng, 0.38, 0.50)
    hw = a["ctr"] * a["W"]                      # half of the heart's horizontal extent
    a["h_ang"] = _u(rng, -0.5, -0.25)          # long axis points down and to the patient's left
    a["h_ratio"] = _u(rng, 0.75, 0.9)          # short / long axis
    c, s = math.cos(a["h_ang"]), math.sin(a["h_ang"])
    a["h_rx"] = hw / math.sqrt(c * c + (a["h_ratio"] * s) ** 2)
    a["h_ry"] = a["h_ratio"] * a["h_rx"]
    a["h_x"] = _u(rng, 0.3, 0.5) * hw           # centre shifted to the patient's left
    hv = math.sqrt((a["h_rx"] * s) ** 2 + (a["h_ry"] * c) ** 2)  # half vertical extent of the tilted ellipse
    # The top of the heart sits at a height independent of its size: an enlarged heart grows down into the
    # (equally dense) diaphragm and sideways, so the bright area, and with it the histogram, barely changes.
    a["h_top"] = a["dome_l"] - _u(rng, 0.32, 0.5)
    a["h_y"] = a["h_top"] + hv
    return a


def _sample_anatomy_v2(rng):
    """Version 2: the same anatomy with wider ranges (habitus, lung height, inspiration, heart tilt and position),
    so that no structure has a typical pixel position. The cardiothoracic ratio keeps v1's normal / enlarged ranges:
    cardiomegaly stays a relative judgement (heart width against thorax width), not an absolute size."""
    a = {"W": _u(rng, 0.46, 0.78), "margin": _u(rng, 0.04, 0.30), "apex": _u(rng, -0.84, -0.56),
         "dome_r": _u(rng, 0.15, 0.62), "med": _u(rng, 0.06, 0.12), "soft": _u(rng, 0.75, 1.25),
         "air": _u(rng, 0.45, 0.75), "breast": _u(rng, 0.0, 0.14) if rng.random() < 0.5 else 0.0,
         "spine_w": _u(rng, 0.045, 0.075), "vert": _u(rng, 0.07, 0.1), "vert_ph": _u(rng, 0, 1),
         "rib_y0": _u(rng, -0.97, -0.83), "rib_pitch": _u(rng, 0.095, 0.13), "rib_curv": _u(rng, 0.4, 0.75),
         "bone": _u(rng, 0.15, 0.32), "bubble": _u(rng, 0.0, 0.22) if rng.random() < 0.7 else 0.0}
    a["dome_l"] = a["dome_r"] + _u(rng, 0.0, 0.1)
    a["cardiomegaly"] = bool(rng.random() < SYNTH_PREVALENCE_BY_VERSION[2]["Cardiomegaly"])
    a["ctr"] = _u(rng, 0.54, 0.66) if a["cardiomegaly"] else _u(rng, 0.38, 0.50)
    hw = a["ctr"] * a["W"]
    a["h_ang"] = _u(rng, -0.6, -0.2)
    a["h_ratio"] = _u(rng, 0.72, 0.92)
    c, s = math.cos(a["h_ang"]), math.sin(a["h_ang"])
    a["h_rx"] = hw / math.sqrt(c * c + (a["h_ratio"] * s) ** 2)
    a["h_ry"] = a["h_ratio"] * a["h_rx"]
    a["h_x"] = _u(rng, 0.2, 0.55) * hw
    hv = math.sqrt((a["h_rx"] * s) ** 2 + (a["h_ry"] * c) ** 2)
    a["h_top"] = a["dome_l"] - _u(rng, 0.3, 0.52)
    a["h_y"] = a["h_top"] + hv
    return a


def sample_acquisition(rng, version=1):
    if version == 2:   # free pose; collimation, exposure inhomogeneity; otherwise v1's display chain
        q = {"rot": _u(rng, -0.2, 0.2), "dx": _u(rng, -0.14, 0.14), "dy": _u(rng, -0.14, 0.14),
             "zoom": _u(rng, 0.74, 1.1), "p_lo": _u(rng, 0.2, 6.0), "p_hi": _u(rng, 96.0, 99.9),
             "gamma": _u(rng, 0.7, 1.4), "noise": _u(rng, 0.004, 0.03), "heel": _u(rng, -0.1, 0.1),
             "offset": _u(rng, -0.08, 0.08), "contrast": _u(rng, 0.8, 1.1),
             "shade": _u(rng, 0.0, 0.08) if rng.random() < 0.5 else 0.0}
        q["collim"] = [_u(rng, 0.0, 0.12) if rng.random() < 0.3 else 0.0 for _ in range(4)]  # left right top bottom
        return q
    return {"rot": _u(rng, -0.08, 0.08), "dx": _u(rng, -0.06, 0.06), "dy": _u(rng, -0.06, 0.06),
            "zoom": _u(rng, 0.82, 1.08), "p_lo": _u(rng, 0.2, 6.0), "p_hi": _u(rng, 96.0, 99.9),
            "gamma": _u(rng, 0.7, 1.4), "noise": _u(rng, 0.004, 0.03), "heel": _u(rng, -0.08, 0.08),
            "offset": _u(rng, -0.08, 0.08), "contrast": _u(rng, 0.8, 1.1)}


def sample_devices(rng):
    """Version 2 nuisance: ECG leads. 0-3 wires (cubic Bezier curves from outside the film to an electrode on the
    chest) in 45% of the films, drawn independently of every label."""
    if rng.random() >= 0.45:
        return []
    wires = []
    for _ in range(int(rng.integers(1, 4))):
        end = [_u(rng, -0.7, 0.7), _u(rng, -0.6, 0.5)]                   # the electrode, on the chest
        side = 1 if rng.random() < 0.5 else -1
        start = [side * _u(rng, 1.0, 1.2), _u(rng, -1.1, 1.1)]          # enters from beyond the film edge
        mids = [[_u(rng, -0.9, 0.9), _u(rng, -0.9, 0.9)] for _ in range(2)]
        wires.append({"pts": [start, *mids, end], "w": _u(rng, 0.006, 0.012), "dens": _u(rng, 0.25, 0.5),
                      "electrode": _u(rng, 0.025, 0.04)})
    return wires


def sample_findings(rng, a, version=1):
    """Acute findings for one image. Positions are drawn inside the lung by rejection sampling."""
    f = {"Cardiomegaly": a["cardiomegaly"]}
    prev, sizes = SYNTH_PREVALENCE_BY_VERSION[version], SYNTH_SIZES_BY_VERSION[version]

    def point_in_lung(margin):
        for _ in range(200):
            side = 1 if rng.random() < 0.5 else -1
            x, y = side * _u(rng, 0.1, a["W"]), _u(rng, a["apex"], a["dome_l"])
            if lung_sdf(np.float32(x), np.float32(y), a, side) < -margin:
                return side, x, y
        return side, side * 0.45 * a["W"], 0.5 * (a["apex"] + a["dome_r"])

    nod_dens, con_dens = ((0.25, 0.45), (0.35, 0.6)) if version == 1 else ((0.35, 0.6), (0.4, 0.7))
    if rng.random() < prev["Effusion"]:
        side = 1 if rng.random() < 0.5 else -1
        f["Effusion"] = {"sides": [side, -side] if rng.random() < 0.3 else [side], "h": _u(rng, *sizes["Effusion"][1:])}
    if rng.random() < prev["Nodule"]:
        side, x, y = point_in_lung(0.06 if version == 1 else 0.1)
        f["Nodule"] = {"x": x, "y": y, "r": _u(rng, *sizes["Nodule"][1:]), "dens": _u(rng, *nod_dens)}
    if rng.random() < prev["Pneumothorax"]:
        f["Pneumothorax"] = {"side": 1 if rng.random() < 0.5 else -1, "k": _u(rng, *sizes["Pneumothorax"][1:])}
    if rng.random() < prev["Consolidation"]:
        side, x, y = point_in_lung(0.08 if version == 1 else 0.1)
        f["Consolidation"] = {"x": x, "y": y, "r": _u(rng, *sizes["Consolidation"][1:]), "dens": _u(rng, *con_dens)}
    return f


# Reports faithful to what was rendered: each statement below has several phrasings, picked by the image's own
# report rng, so the text varies like real dictation while every word stays true. Sides are the patient's (x > 0 is
# the image right = the patient's left), sizes are tertiles of the sampled size parameter (SYNTH_SIZES_BY_VERSION),
# zones are thirds of the lung height (apex to dome) at the finding's centre. Absent findings get a normal statement.
SYNTH_SIZES = SYNTH_SIZES_BY_VERSION[1]
SYNTH_PHRASES = {
    "heart_normal": ["The heart size is normal.", "Heart size is within normal limits.",
                     "The cardiac silhouette is normal in size.", "Normal heart size."],
    "heart_big": ["The heart is {deg}ly enlarged.", "{Deg} cardiomegaly.", "The cardiac silhouette is {deg}ly enlarged."],
    "Effusion": ["{Size} {side} pleural effusion.", "There is a {size} {side} pleural effusion.",
                 "{Size} {side} pleural effusion blunting the costophrenic angle."],
    "Effusion_both": ["{Size} bilateral pleural effusions.", "There are {size} bilateral pleural effusions."],
    "Nodule": ["There is a {size} nodule in the {side} {zone} zone.", "{Size} {side} {zone} zone pulmonary nodule.",
               "A {size} nodular opacity is seen in the {zone} zone of the {side} lung."],
    "Pneumothorax": ["{Size} {side} pneumothorax.", "There is a {size} {side}-sided pneumothorax.",
                     "A {size} pneumothorax is present on the {side}."],
    "Consolidation": ["{Size} area of consolidation in the {side} {zone} zone.",
                      "There is {size} consolidation in the {zone} zone of the {side} lung.",
                      "{Size} {side} {zone} zone airspace consolidation."],
    "no_Consolidation": ["No focal consolidation.", "There is no consolidation.", "No airspace consolidation."],
    "no_Nodule": ["No pulmonary nodules.", "No nodule or mass is seen.", "There is no focal nodule."],
    "no_Effusion": ["No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."],
    "no_Pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."],
    "no_pleural": ["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax."],
    "normal": ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.", "Normal chest radiograph."],
}


def phantom_report(a, f, rng, version=1):
    """Anatomy + findings of one phantom -> {"findings", "impression"}. Deterministic for a given rng state."""
    def say(key, **kw):
        kw.update({k.capitalize(): v.capitalize() for k, v in kw.items()})
        return SYNTH_PHRASES[key][int(rng.integers(len(SYNTH_PHRASES[key])))].format(**kw)

    def size(name):
        key, lo, hi = SYNTH_SIZES_BY_VERSION[version][name]
        return ("small", "moderate", "large")[min(2, int(3 * (f[name][key] - lo) / (hi - lo)))]

    def place(x, y):                                   # patient side and lung zone of a point
        side = 1 if x > 0 else -1
        t = (y - a["apex"]) / ((a["dome_l"] if side > 0 else a["dome_r"]) - a["apex"])
        return ("left" if side > 0 else "right"), ("upper", "mid", "lower")[min(2, max(0, int(3 * t)))]

    out, short = [], []
    if f.get("Cardiomegaly"):
        deg = ("mild", "moderate", "marked")[min(2, int(3 * (a["ctr"] - 0.54) / 0.12))]
        out.append(say("heart_big", deg=deg)); short.append(f"{deg.capitalize()} cardiomegaly.")
    else:
        out.append(say("heart_normal"))
    for name in ("Consolidation", "Nodule"):
        if f.get(name):
            side, zone = place(f[name]["x"], f[name]["y"])
            out.append(say(name, size=size(name), side=side, zone=zone))
            short.append(SYNTH_PHRASES[name][0].format(size=size(name), Size=size(name).capitalize(), side=side,
                                                       zone=zone))
        else:
            out.append(say("no_" + name))
    if not f.get("Effusion") and not f.get("Pneumothorax") and rng.random() < 0.5:
        out.append(say("no_pleural"))                  # one sentence for both, as radiologists often write
    else:
        for name in ("Effusion", "Pneumothorax"):
            if not f.get(name):
                out.append(say("no_" + name))
                continue
            sides = f[name]["sides"] if name == "Effusion" else [f[name]["side"]]
            key = "Effusion_both" if len(sides) == 2 else name
            side = "left" if sides[0] > 0 else "right"
            out.append(say(key, size=size(name), side=side))
            short.append(SYNTH_PHRASES[key][0].format(size=size(name), Size=size(name).capitalize(), side=side))
    return {"findings": " ".join(out), "impression": " ".join(short) if short else say("normal")}


def synthetic_tasks(n, seed, version=2):
    """n images from consecutive patients (1-3 images each). Everything about image j of patient p comes from
    np.random.default_rng([seed, p, j]) (and the anatomy from [seed, p]), so the set is fully determined by the
    seed, parallel workers and resumed runs give identical bytes, and --n 100 is a prefix of --n 1000. Version 2
    draws from other streams ([seed, p, j, 2, ...]); version 1's draws are exactly those it always made."""
    if version not in PHANTOM_VERSIONS:
        raise PrepError(f"--phantom-version must be one of {', '.join(map(str, PHANTOM_VERSIONS))} (got {version})")
    tasks, p = [], 0
    while len(tasks) < n:
        prng = np.random.default_rng([seed, p] if version == 1 else [seed, p, 0, 2])
        anatomy = sample_anatomy(prng, version)
        k = int(prng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        for j in range(min(k, n - len(tasks))):
            irng = np.random.default_rng([seed, p, j + 1] if version == 1 else [seed, p, j + 1, 2])
            case = {"anatomy": anatomy, "acq": sample_acquisition(irng, version), "noise_seed": [seed, p, j + 1, 7]}
            case["findings"] = sample_findings(irng, anatomy, version)
            if version == 2:
                case["version"] = 2
                case["devices"] = sample_devices(np.random.default_rng([seed, p, j + 1, 2, 13]))
            labels = {l: "1" if case["findings"].get(l) else "0" for l in SYNTH_LABELS}
            report = phantom_report(anatomy, case["findings"], np.random.default_rng([seed, p, j + 1, 11]), version)
            tasks.append({"id": f"p{p:05d}_{j}", "src": None, "reader": "phantom", "patient": f"p{p:05d}",
                          "split": None, "labels": labels, "phantom": case, "report": report})
        p += 1
    return tasks


def _inside(d, w):
    """Soft inside-indicator of an implicit function: 1 well inside (d < -w/2), 0 outside, linear ramp between."""
    return np.clip(0.5 - d / w, 0.0, 1.0)


def dome_y(u, a, side):
    """Diaphragm height under one lung at lateral coordinate u (= distance from the midline): a dome that drops
    steeply at the lateral edge, which makes the sharp costophrenic angle."""
    top = a["dome_l"] if side > 0 else a["dome_r"]
    return top + 0.5 * (u - 0.45 * a["W"]) ** 2 + 6.0 * np.maximum(u - 0.85 * a["W"], 0.0) ** 2


def lung_sdf(x, y, a, side):
    """Lung field of one side (no heart cut-out): a tall ellipse against the chest wall, above the diaphragm, lateral
    to the mediastinum. side = -1 is the image left (patient's right lung), +1 the image right."""
    u = side * x
    cx, rx = 0.52 * a["W"], 0.5 * a["W"]
    cy, ry = 0.15, 0.15 - a["apex"]
    ell = (((u - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 - 1.0) * 0.5 * rx
    return np.maximum(np.maximum(ell, y - dome_y(u, a, side)), a["med"] - u)


def heart_sdf(x, y, a):
    c, s = math.cos(a["h_ang"]), math.sin(a["h_ang"])
    xr, yr = x - a["h_x"], y - a["h_y"]
    u, v = c * xr + s * yr, -s * xr + c * yr
    return ((u / a["h_rx"]) ** 2 + (v / a["h_ry"]) ** 2 - 1.0) * 0.5 * a["h_ry"]


def _smooth_noise(rng, size, cells):
    """Smooth random field [size, size], unit-ish std: Gaussian noise on a cells x cells grid, bicubic upsampled."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def render_phantom(case, size):
    """One phantom -> (uint8 image [size, size], {structure: bool mask [size, size]})."""
    a, q, f = case["anatomy"], case["acq"], case["findings"]
    v2 = case.get("version", 1) == 2
    rng = np.random.default_rng(case["noise_seed"])
    S = size
    # Pixel grid in image coordinates, then into patient coordinates: the acquisition rotates, shifts and zooms.
    t = (np.arange(S, dtype=np.float32) + 0.5) / S * 2.0 - 1.0
    X, Y = np.meshgrid(t, t)                                            # (S, S) each
    c, s = math.cos(q["rot"]), math.sin(q["rot"])
    x = (c * X - s * Y) / q["zoom"] - q["dx"]
    y = (s * X + c * Y) / q["zoom"] - q["dy"]
    px = 2.0 / S / q["zoom"]                                            # one pixel in patient units (edge width)
    ax = np.abs(x)

    # Body: neck on top, shoulders, chest wall + soft tissue; thickness of an elliptic cross-section.
    half = a["W"] + a["margin"] + 0.25 * np.exp(-((y + 0.75) / 0.13) ** 2)
    half = np.where(y < -0.9, np.minimum(half, 0.26 + 2.0 * (y + 0.9) ** 2), half)
    body = _inside(ax - half, 3 * px)
    A = a["soft"] * body * np.sqrt(np.clip(1.0 - (x / (half + 1e-3)) ** 2, 0.0, 1.0)) ** 0.5

    # Lungs (heart and aortic knob cut out), with fluid/collapse from findings.
    d_heart = heart_sdf(x, y, a)
    knob = np.hypot(x - 0.01 - a["med"], y - a["h_top"] + 0.02) - 0.06  # aortic knob, bulging from the mediastinum
    lung_d = {sd: np.maximum(np.maximum(lung_sdf(x, y, a, sd), -d_heart), -knob) for sd in (-1, 1)}
    lung_soft = {sd: _inside(lung_d[sd], 1.5 * px) for sd in (-1, 1)}
    masks = {"heart": d_heart < 0, "effusion": np.zeros((S, S), bool), "nodule": np.zeros((S, S), bool),
             "pneumothorax": np.zeros((S, S), bool), "consolidation": np.zeros((S, S), bool)}
    aerated = np.zeros((S, S), np.float32)                              # 0..1: how much air along the ray
    for sd in (-1, 1):
        depth = np.clip(-lung_d[sd] / 0.12, 0.0, 1.0) ** 0.5            # thicker lung away from its edges
        air = lung_soft[sd] * (0.55 + 0.45 * depth)
        eff = f.get("Effusion")
        if eff and sd in eff["sides"]:
            # Fluid fills the base; its surface (meniscus) rises laterally, so the costophrenic angle is blunted.
            u = sd * x
            tt = np.clip((u - a["med"]) / (a["W"] - a["med"]), 0.0, 1.0)
            d_fl = dome_y(u, a, sd) - eff["h"] * (0.25 + 1.2 * tt ** 2) - y   # < 0 below the meniscus
            fluid = _inside(d_fl, 0.03) * lung_soft[sd]
            air = air * (1.0 - fluid)
            masks["effusion"] |= (d_fl < 0) & (lung_d[sd] < 0)
        aerated += air

    # Vessel markings: ridges of a smooth random field (|n| small -> a line), densest at the hila.
    n1 = _smooth_noise(rng, S, 12) + 0.5 * _smooth_noise(rng, S, 24)
    vessels = np.exp(-(n1 / 0.22) ** 2)
    hila = np.exp(-np.hypot(ax - 0.14, y - (a["h_y"] - 0.6 * a["h_ry"])) / 0.3)
    markings = vessels * (0.35 + hila)

    ptx = f.get("Pneumothorax")
    if ptx:
        # The lung collapses towards its hilum: a smaller copy of the lung field (scaled by k about the hilum).
        # Between the chest wall and the visceral pleural line there is air with no lung markings.
        sd, k = ptx["side"], ptx["k"]
        hx, hy = sd * 0.12, a["h_y"] - 0.3 * a["h_ry"]
        d_col = lung_sdf(hx + (x - hx) * k, hy + (y - hy) * k, a, sd) / k
        gap = (d_col > 0) & (lung_d[sd] < 0)
        masks["pneumothorax"] = gap
        markings = markings * np.where(gap, 0.0, 1.0)
        aerated = aerated + 0.15 * gap * lung_soft[sd]
        line_a, line_w = (0.24, 1.2) if v2 else (0.16, 0.8)   # v2: visible at 128 px
        A += line_a * np.exp(-(d_col / (line_w * px)) ** 2) * (lung_d[sd] < 0)  # the pleural line itself
    A -= a["air"] * aerated
    A += 0.13 * markings * np.clip(aerated, 0.0, 1.0)

    con = f.get("Consolidation")
    if con:
        # Ill-defined opacity: a blob with a noisy outline and mottled inside, clipped to the lungs.
        r = np.hypot(x - con["x"], y - con["y"]) / con["r"]
        d_c = r - 1.0 + 0.45 * _smooth_noise(rng, S, 10)
        inside = _inside(d_c, 0.5) * np.clip(aerated, 0.0, 1.0)
        A += con["dens"] * a["air"] * inside * (0.75 + 0.25 * _smooth_noise(rng, S, 40))
        masks["consolidation"] = (d_c < 0) & (aerated > 0.3)
    nod = f.get("Nodule")
    if nod:
        r2 = ((x - nod["x"]) ** 2 + (y - nod["y"]) ** 2) / nod["r"] ** 2
        A += nod["dens"] * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))            # a sphere's thickness profile
        masks["nodule"] = r2 < 1.0

    # Bones: spine with vertebrae, posterior and anterior ribs, clavicles, humeral heads.
    verts = 0.85 + 0.15 * np.cos(2 * np.pi * (y / a["vert"] + a["vert_ph"]))
    A += 0.6 * a["bone"] * _inside(ax - a["spine_w"], 2 * px) * verts
    u = ax
    chest = _inside(u - a["W"] * 1.04, 3 * px) * _inside(y - 0.75, 0.1) * (u > 0.04)
    tr = (y - a["rib_y0"] - a["rib_curv"] * u ** 2) / a["rib_pitch"]        # posterior ribs: curve down laterally
    fr = tr - np.floor(tr)
    ribs = np.clip(1.0 - ((fr - 0.17) / 0.17) ** 2, 0.0, 1.0) ** 0.4 * ((tr > 0) & (tr < 10))
    ta = (y - a["rib_y0"] - 0.25 - 0.45 * (a["W"] - u)) / (1.15 * a["rib_pitch"])  # anterior ribs: down medially
    fa = ta - np.floor(ta)
    ribs_a = np.clip(1.0 - ((fa - 0.2) / 0.2) ** 2, 0.0, 1.0) * ((ta > 0) & (ta < 6)) * (u > 0.15)
    A += 0.6 * a["bone"] * chest * (ribs + 0.4 * ribs_a)
    cl_t = np.clip((u - 0.06) / (0.85 * a["W"]), 0.0, 1.0)              # clavicles: medial low, lateral high
    cl_y = a["apex"] + 0.1 - 0.12 * cl_t + 0.04 * np.sin(np.pi * cl_t)
    A += 1.2 * a["bone"] * _inside(np.abs(y - cl_y) - 0.03, 2 * px) * (u > 0.05) * (u < 0.06 + 0.85 * a["W"])
    A += 1.5 * a["bone"] * _inside(np.hypot(u - a["W"] - a["margin"] - 0.1, y + 0.72) - 0.12, 3 * px)
    if a["breast"] > 0:                                                   # breast shadows over the lower lungs
        A += a["breast"] * _inside(np.hypot((u - 0.45 * a["W"]) / 0.35, (y - a["dome_r"] + 0.05) / 0.25) - 1, 0.2)
    if a["bubble"] > 0:                                                   # gastric air under the left dome
        A -= a["bubble"] * _inside(np.hypot((x - 0.45 * a["W"]) / 0.1, (y - a["dome_l"] - 0.12) / 0.06) - 1, 0.3)

    if v2 and case.get("devices"):                                      # ECG leads: thin dense wires + electrodes
        A += draw_devices(case["devices"], q, S)

    # Display: auto-window from the image's own percentiles (+ jitter), gamma, heel effect, quantum noise.
    sub = A[::4, ::4]
    lo, hi = np.percentile(sub, [q["p_lo"], q["p_hi"]])
    v = np.clip((A - lo) / max(hi - lo, 1e-3), 0.0, 1.0) ** q["gamma"]
    v = v * q["contrast"] + q["offset"] + q["heel"] * Y
    if v2 and q["shade"] > 0:                                           # smooth exposure inhomogeneity
        v = v + q["shade"] * _smooth_noise(rng, S, 3)
    v = v + q["noise"] * rng.standard_normal((S, S), dtype=np.float32)
    lungs = (lung_d[-1] < 0) | (lung_d[1] < 0)
    masks["lungs"] = lungs & ~masks["effusion"]       # the visible (aerated) lung fields, as in SCR-style masks
    if v2 and any(q["collim"]):
        # Collimation: the film outside the exposed field stays dark (an electronic shutter), and the masks keep only
        # what is visible. The label stays that of the patient (a finding cut off at the border is still reported).
        cl, cr, ct, cb = q["collim"]
        field = (X > -1 + cl) & (X < 1 - cr) & (Y > -1 + ct) & (Y < 1 - cb)
        v = np.where(field, v, 0.03 + 0.5 * q["noise"] * rng.standard_normal((S, S), dtype=np.float32))
        masks = {k: m & field for k, m in masks.items()}
    return to_uint8(v), {k: masks[k] for k in SYNTH_STRUCTURES}


def draw_devices(wires, q, S):
    """Wires (cubic Beziers in patient coordinates) -> attenuation [S, S]. Drawn with PIL at 4x and box-filtered
    down, so a 1-2 px wire is anti-aliased; points are mapped patient -> image with the inverse of the pose."""
    from PIL import ImageDraw
    up = 4
    c, s = math.cos(q["rot"]), math.sin(q["rot"])
    out = np.zeros((S, S), np.float32)
    for w in wires:
        canvas = Image.new("L", (S * up, S * up), 0)
        draw = ImageDraw.Draw(canvas)
        P = np.array(w["pts"], np.float64)                                  # (4, 2) control points
        t = np.linspace(0.0, 1.0, 64)[:, None]
        curve = ((1 - t) ** 3 * P[0] + 3 * (1 - t) ** 2 * t * P[1] + 3 * (1 - t) * t ** 2 * P[2] + t ** 3 * P[3])
        xz, yz = (curve[:, 0] + q["dx"]) * q["zoom"], (curve[:, 1] + q["dy"]) * q["zoom"]
        X, Y = c * xz + s * yz, -s * xz + c * yz                           # R^T: patient -> image coordinates
        pix = np.stack([(X + 1) / 2 * S * up, (Y + 1) / 2 * S * up], 1)
        width = max(1, int(round(w["w"] * q["zoom"] * S * up / 2)))
        draw.line([tuple(p) for p in pix], fill=255, width=width, joint="curve")
        r = w["electrode"] * q["zoom"] * S * up / 2
        ex, ey = pix[-1]
        draw.ellipse([ex - r, ey - r, ex + r, ey + r], fill=255)
        m = np.asarray(canvas.resize((S, S), Image.Resampling.BOX), np.float32) / 255.0
        out += w["dens"] * m
    return out


def src_synthetic(args):
    tasks = synthetic_tasks(args.n, args.seed, args.phantom_version)
    return tasks, SYNTH_LABELS, SYNTH_STRUCTURES, [], {
        "seed": args.seed, "n": args.n, "phantom_version": args.phantom_version,
        "prevalence_target": SYNTH_PREVALENCE_BY_VERSION[args.phantom_version]}


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: conversion throughput, and a training loader reading prepared 256-px PNGs vs the original 1024-px PNGs.

def bench(args):
    import shutil
    import subprocess
    root = Path(args.dir)
    raw = root / "raw1024"
    raw.mkdir(parents=True, exist_ok=True)
    for t in synthetic_tasks(args.n, 123):  # realistic-looking 1024x1024 8-bit PNGs, like NIH ChestX-ray14
        p = raw / f"{t['id']}.png"
        if not p.exists():  # default compression like the originals; atomic: no half PNG after a kill
            with plumbing.atomic_open(p) as f:
                Image.fromarray(render_phantom(t["phantom"], 1024)[0]).save(f, format="PNG")
    lines = [f"## data_prep.py benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
             f"pillow {Image.__version__})", "",
             f"Command: `python data_prep.py bench {args.dir} --n {args.n}`", "",
             "| what | workers | images/s |", "|---|---:|---:|"]
    for w in args.workers:
        out = root / f"prep_w{w}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        tasks, labels, structs, skipped, extra = src_folder(raw, argparse.Namespace(out=str(out)))
        run_conversion(tasks, out, 256, w, "folder", labels, structs, skipped, extra)
        rate = len(tasks) / (time.perf_counter() - t0)
        lines.append(f"| convert 1024x1024 PNG -> 256 PNG | {w} | {rate:.1f} |")

    # The trainer's own loader (decode + random resized crop to 224, scale 0.3-1, no flips, + mask sampling), timed
    # by radjepa.py itself (`--bench-loader`) in a child process: data_prep.py never imports the model code.
    trainer = Path(__file__).resolve().with_name("radjepa.py")
    if not trainer.is_file():
        raise PrepError(f"bench: {trainer} not found (the loader half of the benchmark runs the trainer's loader)")
    rates = {}
    for name, folder in (("prepared 256 PNG", root / f"prep_w{args.workers[-1]}" / "images"), ("original 1024 PNG", raw)):
        for w in args.workers:
            cmd = [sys.executable, str(trainer), "--data", str(folder), "--img-size", "224", "--patch", "16",
                   "--batch-size", "32", "--workers", str(w), "--bench-loader", str(max(1, args.epochs * args.n // 32))]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if r.returncode or "loader:" not in r.stdout:
                raise PrepError(f"bench: {' '.join(cmd)} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            rates[name, w] = float(r.stdout.split("loader:")[1].split()[0])
            lines.append(f"| radjepa loader: {name} + random resized crop 224 + masks | {w} | {rates[name, w]:.1f} |")
    lines += ["", "Loader speed-up of the prepared folder over the originals: " +
              ", ".join(f"{rates['prepared 256 PNG', w] / rates['original 1024 PNG', w]:.1f}x ({w} workers)"
                        for w in args.workers), ""]
    print("\n".join(lines))
    if args.report:
        plumbing.write_text(args.report, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Chest X-ray datasets or synthetic phantoms -> prepared folder.")
    sub = p.add_subparsers(dest="source", required=True)
    workers = min(4, os.cpu_count() or 1)
    for name in SOURCES:
        sp = sub.add_parser(name, help={"folder": "any tree of PNG/JPEG/TIFF/DICOM", "iu_xray": "Open-i IU X-ray: "
                            "ecgen-radiology/*.xml + PNGs, with reports"}.get(name, f"convert {name}"))
        sp.add_argument("src", help="the dataset's root folder as downloaded")
        sp.add_argument("out", help="prepared output folder (re-running into it resumes)")
        sp.add_argument("--size", type=int, default=256, help="output side S (pad to square, resize)")
        sp.add_argument("--workers", type=int, default=workers)
        sp.add_argument("--overwrite", action="store_true",
                        help="delete what an earlier run wrote into OUT and start over (without it, a run with "
                             "another source, SRC, --size or --modality than OUT was made with is refused)")
        if name == "folder":
            sp.add_argument("--modality", nargs="+", default=["CR", "DX", "DR", "RG"], metavar="M",
                            help="DICOM Modality values to convert (others, e.g. CT or MR slices, are skipped and "
                                 "listed in meta.json); 'all' converts every DICOM")
        if name in ("chexpert", "mimic"):
            sp.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="ignore",
                            help="-1 labels: ignore (= unknown, blank), zeros, ones, mixed (ones for Atelectasis "
                                 "and Edema, zeros otherwise, as in the CheXpert paper)")
        if name in ("nih", "chexpert", "mimic"):
            sp.add_argument("--frontal-only", action="store_true", help="keep PA/AP views only")
        if name == "mimic":
            sp.add_argument("--labeler", choices=["chexpert", "negbio"], default="chexpert")
            sp.add_argument("--reports", default=None, help="root of the mimic-cxr-reports download (holds files/pXX/"
                            "pNNNNNNNN/sNNNNNNNN.txt); default: report .txt files beside the JPGs, if there are any")
        if name == "chexpert":
            sp.add_argument("--reports", default=None, help="CheXpert Plus report CSV (path_to_image, section_findings, "
                            "section_impression) -> reports.csv")
        if name == "iu_xray":
            sp.add_argument("--views", choices=["frontal", "all"], default="frontal",
                            help="frontal views only (default), or every image of each report")
        if name == "vindr":
            sp.add_argument("--readers", choices=["any", "majority"], default="any",
                            help="image label from the 3 readers: any positive, or a majority")
    sp = sub.add_parser("synthetic", help="procedural chest-radiograph phantoms (no download)")
    sp.add_argument("out")
    sp.add_argument("--n", type=int, default=2000)
    sp.add_argument("--size", type=int, default=256)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--phantom-version", type=int, default=2, choices=PHANTOM_VERSIONS,
                    help="2 (default): free pose and habitus, devices, findings visible at 128 px, so probes measure "
                         "features rather than fixed-place pixel templates; 1: the original benchmark of "
                         "BENCHMARKS.md §1-§10, reproduced bit for bit for a given --seed")
    sp.add_argument("--workers", type=int, default=workers)
    sp.add_argument("--overwrite", action="store_true",
                    help="delete what an earlier run wrote into OUT and start over (without it, a run with another "
                         "--seed, --size or --phantom-version than OUT was made with is refused; another --n extends "
                         "or trims it)")
    sp = sub.add_parser("bench", help="conversion and loader throughput")
    sp.add_argument("dir", help="scratch folder")
    sp.add_argument("--n", type=int, default=64)
    sp.add_argument("--epochs", type=int, default=2)
    sp.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    sp.add_argument("--report", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    try:
        if args.source == "bench":
            return bench(args)
        if args.size < 8 or args.workers < 1:
            raise PrepError("--size must be >= 8 and --workers >= 1")
        if args.source == "synthetic" and args.n < 1:
            raise PrepError(f"--n must be >= 1 (got {args.n})")
        if args.source != "synthetic" and not Path(args.src).is_dir():
            raise PrepError(f"{args.src}: not a folder")
        if args.source != "synthetic" and Path(args.out).resolve() in (Path(args.src).resolve(),
                                                                        *Path(args.src).resolve().parents):
            raise PrepError(f"{args.out} holds SRC {args.src}: a rerun would read its own output as source images")
        given = {**vars(args), "src": str(Path(args.src).resolve()) if args.source != "synthetic" else None}
        params = {k: given[k] for k in IMAGE_PARAMS if k in given}
        with plumbing.claim_out(args.out, f"OUT {args.out}"):  # a writable folder, one live run in it
            claim_folder(args.out, params, args.overwrite)
            if args.source == "synthetic":
                tasks, labels, structures, skipped, extra = src_synthetic(args)
            else:
                tasks, labels, structures, skipped, extra = SOURCES[args.source](args.src, args)
            extra = {**extra, "params": params}
            return run_conversion(tasks, args.out, args.size, args.workers, args.source, labels, structures,
                                  skipped, extra)
    except (PrepError, plumbing.BadInput) as e:
        sys.exit(f"data_prep: error: {e}")


if __name__ == "__main__":
    main()
