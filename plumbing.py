"""
plumbing.py: what radjepa.py, eval.py, data_prep.py and bench/ need that is not the method, each defined once.

The ground floor of the project: it imports nothing of the project (numpy, PIL and, where needed, torch).
  files        atomic writes (temp file + fsync + rename; a full disk is one line naming the OS reason and the path)
  folders      the output-folder lock (one live run per folder; a dead run's lock is taken over)
  images       decoding any PNG/JPEG/BMP/TIFF to float [0, 1], listing a tree of images
  tables       one CSV reader and one image-path normaliser for labels.csv and reports.csv, with every check
  checkpoints  one validator (training's --resume, eval and export alike), one writer, resume
  the CLI      flags generated from a dataclass, range and type checks, Ctrl-C held over a training step
  runs         a training run's --out folder and log.jsonl, unreadable files, torchrun processes
  metrics      AUROC (the Mann-Whitney statistic), and the online probe of a run (--probe-every)
  pictures     loss curves from log.jsonl, the training masks over crops
  export       the EMA encoder as a timm model folder
Every check raises BadInput (a ValueError) with a one-line message; each script turns it into `error: ...`.
"""
import argparse
import csv
import io
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
import contextlib
from contextlib import contextmanager
from dataclasses import fields

import numpy as np
from PIL import Image, ImageDraw


class BadInput(ValueError):
    """A file, folder, flag or checkpoint that cannot be used; the message is one line and names it."""


class BadImage(BadInput):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Files: written atomically. A reader (or a resumed run) sees the old file or the new one, never half of one.

def os_reason(e):
    """An OSError -> 'no space left on device' (its strerror, lower case), for one-line messages."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    return reason[:1].lower() + reason[1:]


@contextmanager
def atomic_open(path, mode="wb", encoding=None):
    """with atomic_open(path) as f: f.write(...). The data goes to a hidden temp file beside `path` (the name neither
    starts like nor ends like the real file, so no glob sees it), is fsynced, then renamed over `path`. Any failure
    removes the temp file, keeps the previous `path`, and raises BadInput('cannot write PATH: no space left on
    device')."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except OSError as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise BadInput(f"cannot write {path}: {os_reason(e)}") from None
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path, text):
    """UTF-8, always: every reader of the project's CSV and markdown files insists on it."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def save_torch(path, obj):
    """torch.save, atomically. Serialised in memory first: a full disk is then an OSError with its reason, where
    torch's own writer says 'enforce fail at inline_container.cc'."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def save_png(path, image):
    """A PIL image or a uint8 array ([H, W] gray or [H, W, 3] RGB) -> PNG, atomically."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    write_bytes(path, buf.getbuffer())


def append_jsonl(path, record):
    """One JSON record per line (log.jsonl): a line is written in one call, so a killed run leaves whole lines."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")


def read_json(path):
    """A JSON file, or None if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Folders: one live run per output folder.

def lock_file(path, what):
    """Hold an exclusive lock on `path` for this process's life (flock: the OS drops a dead process's lock, so a
    stale lock is simply taken over). The file holds our pid. Another live holder -> BadInput naming its pid.
    Returns the open file; closing it releases the lock."""
    import fcntl
    try:
        lock = open(path, "a+")
    except OSError as e:
        raise BadInput(f"{what}: cannot create {path} ({os_reason(e)})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise BadInput(f"{what} is in use by another process (pid {pid}); wait for it or stop it") from None
    lock.seek(0), lock.truncate(), lock.write(f"{os.getpid()}\n"), lock.flush()
    return lock


def claim_out(out, what=None):
    """Before any work: OUT must be a writable folder (64 KiB written and removed) that no live run uses.
    -> the lock (see lock_file); temp files a dead run left behind are removed."""
    what = what or f"--out {out}"
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f".probe.{os.getpid()}"), "wb") as f:
            f.write(bytes(1 << 16)), f.flush(), os.fsync(f.fileno())
        os.remove(f.name)
    except OSError as e:
        raise BadInput(f"{what} is not a writable folder ({os_reason(e)})") from None
    lock = lock_file(os.path.join(out, ".lock"), what)
    for name in os.listdir(out):  # no live process owns these: we hold the lock
        if name.startswith(".") and ".tmp" in name and not name.startswith(".lock"):
            os.remove(os.path.join(out, name))
    return lock


# ----------------------------------------------------------------------------------------------------------------
# Images.

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def load_image(path):
    """Any PNG/JPEG/BMP/TIFF -> float32 [H, W] in [0, 1]. 16-bit data is scaled by its stored bit depth, inferred
    from the maximum (a 12-bit image in a 16-bit PNG -> / 4095), not by 65535, which would make it nearly black.
    RGB/RGBA -> luminance (alpha dropped: NIH's few RGBA files are opaque). Raises BadImage if unreadable."""
    try:
        if os.path.getsize(path) == 0:
            raise BadImage(f"{path}: zero-byte file")
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not later
            if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "1"):
                im = im.convert("L")
            a = np.asarray(im)
    except BadImage:
        raise
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise BadImage(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if a.ndim == 3:
        a = a[..., 0]
    integer, a = np.issubdtype(a.dtype, np.integer), a.astype(np.float32)
    if integer:  # 8-bit data: bits = 8, / 255
        bits = max(8, int(np.ceil(np.log2(float(a.max()) + 1))))
        return a / (2.0 ** bits - 1)
    lo, hi = float(a.min()), float(a.max())  # float images: min-max
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def load_whole(path, size):
    """An image file -> the whole image resized to size x size (bilinear), float32 in [0, 1] (the online probe's
    and bench.views' input; training crops instead). Unreadable: BadImage."""
    return np.asarray(Image.fromarray(load_image(path), mode="F").resize((size, size), Image.BILINEAR)).clip(0, 1)


def list_image_files(root, out=None):
    """Every image file under `root` (links followed, each real folder and file once: a loop or a link back up
    adds nothing), except inside `out`, whose pictures are not data. -> sorted paths."""
    top, found = os.path.realpath(root), {}
    if out and os.path.realpath(out) == top:
        raise BadInput(f"--out {out} is the --data folder: its pictures would become training images")
    seen = {os.path.realpath(out)} if out else set()
    for d, dirs, names in os.walk(root, followlinks=True):
        if (real := os.path.realpath(d)) in seen or top.startswith(real + os.sep):
            dirs[:], names = [], []
        seen.add(real)
        for p in (os.path.join(d, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTS):
            found.setdefault(os.path.realpath(p), p)  # the first path of a file wins
    return sorted(found.values())


# ----------------------------------------------------------------------------------------------------------------
# Tables: labels.csv and reports.csv of a prepared folder (data_prep.py writes them; README: the prepared layout).

SPLITS = ("train", "val", "test")
LABEL_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": float("nan")}  # blank = unknown
FIELD_LIMIT = 1 << 24  # 16 MiB per cell: a long report is fine; csv's default (128 KiB) would stop it


def read_csv(path, required=(), exact=None):
    """A CSV (or .csv.gz) file -> (header, [(line, cells)]). Strict UTF-8 (a byte-order mark allowed): another
    byte is an error naming the line, never a silent replacement. `required`: columns that must be present;
    `exact`: the header must start with these. Blank rows are skipped; a row with another number of cells than
    the header is an error naming its line."""
    import gzip
    path = os.fspath(path)
    try:
        raw = open(path, "rb").read()
        raw = gzip.decompress(raw) if path.endswith(".gz") else raw
    except (OSError, EOFError) as e:
        raise BadInput(f"{path}: cannot be read ({os_reason(e) if isinstance(e, OSError) else e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise BadInput(f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except csv.Error as e:
        raise BadInput(f"{path} line {reader.line_num}: {e}") from None
    if not header:
        raise BadInput(f"{path}: empty CSV file")
    if exact and header[:len(exact)] != list(exact):
        raise BadInput(f"{path}: header must start with {','.join(exact)} (got {','.join(header) or 'nothing'})")
    if missing := [c for c in required if c not in header]:
        raise BadInput(f"{path}: missing column {missing[0]!r} (header: {','.join(header)})")
    for line, r in rows:
        if exact and len(r) != len(header):
            raise BadInput(f"{path} line {line}: the row has {len(r)} cells, the header has {len(header)}: "
                           f"{r[:3]}")
    return header, rows


def image_key(cell, where):
    """The one spelling of an image path inside a prepared folder: `./images/x.png`, `images//x.png` and
    `images/x.png` are the same file. A path that is empty, absolute or leaves the folder -> BadInput."""
    p = os.path.normpath(cell.strip()) if cell.strip() else "."
    if os.path.isabs(p) or p.split(os.sep)[0] in ("..", "."):
        raise BadInput(f"{where}: image path {cell!r} is empty or leaves the prepared folder")
    return p


def read_labels(root):
    """ROOT/labels.csv -> dict(header, label_names, rows=[dict(line, image, patient, split, labels)]), every
    check done before any work: header image,patient,split,<labels>; a split of train/val/test; an image path
    inside the folder, listed once; label cells 1 / 0 / blank only (CheXpert's -1 would silently wreck a probe:
    data_prep.py --uncertain maps them); a patient in one split only (else test images leak into training)."""
    path = os.path.join(root, "labels.csv")
    header, raw = read_csv(path, exact=("image", "patient", "split"))
    names, rows, line_of, split_of = header[3:], [], {}, {}
    for line, r in raw:
        where = f"{path} line {line}"
        if r[2] not in SPLITS:
            raise BadInput(f"{where}: split must be one of {', '.join(SPLITS)}, got {r[2]!r} for {r[0]!r}")
        img = image_key(r[0], where)
        if img in line_of:
            raise BadInput(f"{where}: image {r[0]!r} repeats line {line_of[img]} (it would count twice)")
        line_of[img] = line
        bad = [(n, c) for n, c in zip(names, r[3:]) if c.strip() not in LABEL_VALUES]
        if bad:
            raise BadInput(f"{where}, column {bad[0][0]!r}: label {bad[0][1]!r} is not 1, 0 or blank (unknown); "
                           f"map uncertain labels first (data_prep.py --uncertain)")
        first = split_of.setdefault(r[1], (r[2], line))
        if first[0] != r[2]:
            raise BadInput(f"{path} line {line}: patient {r[1]!r} is in {r[2]} here and in {first[0]} on line "
                           f"{first[1]}; splits must be by patient")
        rows.append(dict(line=line, image=img, patient=r[1], split=r[2],
                         labels=[LABEL_VALUES[c.strip()] for c in r[3:]]))
    return dict(path=path, header=header, label_names=names, rows=rows)


def read_reports(root, images):
    """ROOT/reports.csv (image,findings,impression) -> {image key: (findings, impression)}. `images`: the image
    keys of labels.csv. The same reader and path normaliser as labels.csv, so `./images/x.png` finds its row; a
    report for an image that labels.csv does not list, or listed twice, is an error naming the line."""
    path = os.path.join(root, "reports.csv")
    header, raw = read_csv(path, exact=("image", "findings", "impression"))
    known, out, line_of = set(images), {}, {}
    for line, r in raw:
        where = f"{path} line {line}"
        img = image_key(r[0], where)
        if img not in known:
            raise BadInput(f"{where}: image {r[0]!r} is not in labels.csv")
        if img in line_of:
            raise BadInput(f"{where}: image {r[0]!r} repeats line {line_of[img]}")
        line_of[img] = line
        out[img] = (r[1].strip(), r[2].strip())
    return out


def list_images(root, out=None):
    """Training images: a prepared folder's train split (labels.csv, checked as above), else every image file
    under `root`. -> sorted paths; none -> BadInput."""
    if not os.path.isdir(root):
        raise BadInput(f"--data {root!r} is not a folder")
    if os.path.exists(os.path.join(root, "labels.csv")):
        paths = [os.path.join(root, r["image"]) for r in read_labels(root)["rows"] if r["split"] == "train"]
    else:
        paths = list_image_files(root, out)
    if not paths:
        raise BadInput(f"no training images found in {root!r} (extensions: {' '.join(sorted(IMAGE_EXTS))})")
    return sorted(paths)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: one validator for training's --resume, eval.py and `radjepa.py export`; one writer.

CHECKPOINT_FORMAT = "radjepa-v1"
STATE_KEYS = ("encoder", "predictor", "target_encoder")


def read_checkpoint(path):
    """A RadJEPA checkpoint -> its dict, checked: loadable as tensors and plain types only (no pickled code runs),
    the format marker, a config dict, weights that are all finite, a step that is an integer >= 0."""
    import torch
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise BadInput(f"{path} is not a RadJEPA checkpoint: cannot be loaded ({type(e).__name__}: {first})") \
            from None
    missing = {"format", "config", "target_encoder"} - set(ck if isinstance(ck, dict) else {})
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or missing:
        raise BadInput(f"{path} is not a RadJEPA checkpoint: missing {sorted(missing) or 'format marker'}")
    if not isinstance(ck["config"], dict):
        raise BadInput(f"{path}: its config is not a dict")
    step = ck.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise BadInput(f"{path}: its step {step!r} is not an integer >= 0")
    for key in STATE_KEYS:
        sd = ck.get(key, {})
        if not isinstance(sd, dict):
            raise BadInput(f"{path}: its {key} is not a state dict")
        if bad := [n for n, t in sd.items() if not torch.is_tensor(t)]:
            raise BadInput(f"{path} is not a good checkpoint: {key} holds a non-tensor ({bad[0]})")
        if bad := [n for n, t in sd.items() if not torch.isfinite(t).all()]:
            raise BadInput(f"{path} is not a good checkpoint: {key} has NaN/Inf weights ({bad[0]})")
    return ck


def load_state(module, ck, key, path):
    """ck[key] -> module, or a one-line BadInput naming the first mismatch with the architecture."""
    if key not in ck:
        raise BadInput(f"{path} is not a good checkpoint: {key} is missing")
    try:
        module.load_state_dict(ck[key])
    except (RuntimeError, ValueError, KeyError) as e:  # the last line of PyTorch's message names the mismatch
        raise BadInput(f"{path}: its {key} does not fit the architecture of its config: "
                       f"{str(e).strip().splitlines()[-1].strip()[:200]}") from None


def save_checkpoint(path, step, config, versions_, **state_dicts):
    """A RadJEPA checkpoint, atomically: one dict (read_checkpoint reads it). A failed write keeps the
    previous checkpoint and says so."""
    try:
        save_torch(path, dict(format=CHECKPOINT_FORMAT, step=step, config=config, versions=versions_,
                              **state_dicts))
    except BadInput as e:
        raise BadInput(f"{e}; the previous checkpoint is kept") from None


def resume(path, modules, say=None):
    """--resume: every state dict of a checked checkpoint into its module (or optimizer). -> its step
    (0, and nothing loaded, when there is no checkpoint yet)."""
    if not os.path.exists(path):
        if say:
            say(f"--resume: no checkpoint at {path} yet, starting from scratch")
        return 0
    try:
        ck = read_checkpoint(path)
        for key, module in modules.items():
            load_state(module, ck, key, path)
    except BadInput as e:
        raise BadInput(f"--resume: {e}") from None
    if say:
        say(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


def resume_config(path):
    """--resume: the config of OUT/ckpt.pt (checked), or None when there is no checkpoint yet. Its stop
    point belongs to the run that stopped, not to its continuation."""
    if not os.path.exists(path):
        return None
    try:
        return {**read_checkpoint(path)["config"], "stop_at": 0}
    except BadInput as e:
        raise BadInput(f"--resume: {e}") from None


def versions():
    """What ran: torch, triton, python, the GPU. Recorded in config.json, log.jsonl and checkpoints."""
    import torch
    from importlib.metadata import PackageNotFoundError, version
    try:
        tv = version("triton")
    except PackageNotFoundError:
        tv = None
    return dict(torch=str(torch.__version__), triton=tv, python=sys.version.split()[0],
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


# ----------------------------------------------------------------------------------------------------------------
# The CLI: flags generated from a dataclass; every value checked before any work.

FINITE = (lambda v: 0 <= v < math.inf)
# radjepa.py's flags: each one's allowed range, and the flags that must agree (make_config calls this).
TRAIN_RANGES = [
    ("img_size patch width depth heads pred_width pred_depth n_targets min_ctx batch_size steps log_every "
     "ckpt_every probe_images", "an integer >= 1", lambda v: v >= 1),
    ("workers warmup stop_at seed threads", "an integer >= 0", lambda v: v >= 0),
    ("probe_every", "an integer >= -1 (-1: 10 per run, 0: off)", lambda v: v >= -1),
    ("lr start_lr final_lr wd final_wd clip", "a finite number >= 0", FINITE),
    ("ema final_ema", "a number in [0, 1]", lambda v: 0 <= v <= 1),
    ("crop_scale tgt_scale ctx_scale", "LO HI with 0 < LO <= HI <= 1", lambda v: 0 < v[0] <= v[1] <= 1),
    ("tgt_aspect", "LO HI with 0 < LO <= HI (finite)", lambda v: 0 < v[0] <= v[1] < math.inf),
    ("device", "auto, cuda or cpu", lambda v: v in ("auto", "cuda", "cpu")),
    ("precision", "auto, bf16 or fp32", lambda v: v in ("auto", "bf16", "fp32")),
    ("kernels", "auto, torch or triton", lambda v: v in ("auto", "torch", "triton"))]


def parse_dataclass_flags(cls, argv, description, epilog=None, prog=None):
    """A dataclass whose fields carry metadata["help"] -> argparse, one --flag per field (--name-with-dashes;
    bools get --no-flag; tuples take LO HI). -> dict of the flags actually given (field name -> value)."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                argument_default=argparse.SUPPRESS)
    for f in fields(cls):
        flag, h = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=h)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=float, nargs=2, metavar=("LO", "HI"), help=h)
        else:
            p.add_argument(flag, type=type(f.default), help=h)
    given = vars(p.parse_args(argv))  # SUPPRESS: only the flags actually passed appear here
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def check_types(cls, values, where):
    """Values from a file (a checkpoint's config) must have their field's type: `lr: "abc"` is refused here in
    one line instead of failing deep inside. ints pass for floats; lists for tuples (JSON has no tuples).
    Keys the dataclass does not have (a newer version's) are dropped with a warning."""
    kinds = {f.name: type(f.default) for f in fields(cls)}
    if unknown := sorted(set(values) - set(kinds)):  # a checkpoint of a newer version
        print(f"warning: ignoring unknown config key(s) {', '.join(unknown)}", file=sys.stderr)
    values = {k: v for k, v in values.items() if k in kinds}
    for k, v in values.items():
        want = kinds.get(k)
        ok = (want is None or (want is bool and isinstance(v, bool))
              or (want is int and isinstance(v, int) and not isinstance(v, bool))
              or (want is float and isinstance(v, (int, float)) and not isinstance(v, bool))
              or (want is str and isinstance(v, str))
              or (want is tuple and isinstance(v, (list, tuple)) and len(v) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)))
        if not ok:
            raise BadInput(f"{where}: {k} = {v!r} is not a {want.__name__}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def succeeds(fn, *args):
    """True if fn(*args) returns, False if it raises BadInput (a rate of refusals, e.g. of mask draws)."""
    try:
        fn(*args)
        return True
    except BadInput:
        return False


def check_ranges(cfg, ranges):
    """ranges: [(space-separated field names, what is allowed, test)] -> BadInput naming the first bad flag."""
    for names, allowed, ok in ranges:
        for k in names.split():
            if not ok(v := getattr(cfg, k)):
                v = " ".join(map(str, v)) if isinstance(v, tuple) else v
                raise BadInput(f"--{k.replace('_', '-')} {v}: must be {allowed}")


def check_config(c):
    """A radjepa.Config, checked before any work: every range, then the flags that must agree."""
    check_ranges(c, TRAIN_RANGES)
    if c.stop_at > c.steps:
        raise BadInput(f"--stop-at {c.stop_at} is beyond --steps {c.steps}, where the schedules end")
    if c.img_size % c.patch:
        raise BadInput(f"--img-size {c.img_size} is not a multiple of --patch {c.patch}")
    if c.width % c.heads or c.pred_width % c.heads or c.width % 4 or c.pred_width % 4:
        raise BadInput("--width and --pred-width must be multiples of --heads and of 4 (2-D sin-cos)")
    if not 1 <= c.target_blocks <= c.depth:
        raise BadInput(f"--target-blocks must be between 1 and --depth {c.depth}, not {c.target_blocks}")
    return c


def check_resume(c, given, base, arch_fields, run_fields):
    """--resume: flags that change the weights' shapes are refused (they could not load); other flags
    that change the run (not the where and how of run_fields) get a warning."""
    arch = [f"--{k.replace('_', '-')} {getattr(c, k)} (checkpoint: {base.get(k)})"
            for k in arch_fields if getattr(c, k) != base.get(k)]
    if arch:
        raise BadInput(f"--resume with a different architecture: {', '.join(arch)}; drop these flags or "
                       f"use another --out")
    if c.batch_size != base.get("batch_size"):  # the schedules and the data order are per global batch
        raise BadInput(f"--resume with another global batch: --batch-size {c.batch_size} (checkpoint: "
                       f"{base.get('batch_size')}); use --accum or more processes to fit it in memory, or "
                       f"another --out")
    if changed := sorted(k for k in given if k not in run_fields and given[k] != base.get(k)):
        print(f"warning: --resume with changed {', '.join(changed)}: the continuation will not match an "
              f"uninterrupted run")


class Preemption:
    """Ctrl-C (SIGINT) and SIGTERM (what SLURM, timeouts and spot machines send) during training: the first
    is noted, and the run finishes its step, checkpoints and stops in one line (`requested` rides on the
    step's all-reduce, so every process of a torchrun job stops after the same step). A second Ctrl-C stops
    at once. Each handler is ours only in the main thread, and only where that signal's handler is still the
    default: a job started in the background by a script (`nohup python radjepa.py ... &`) has Ctrl-C
    ignored, and must still checkpoint on the SIGTERM of a plain `kill`."""

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self):
        self.signum, self.old = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self.note) for s, d in self.DEFAULTS.items() if signal.getsignal(s) is d}
        return self

    def note(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: now
        self.signum = self.signum or signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint", file=sys.stderr)

    @property
    def requested(self):
        return float(self.signum > 0)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def stop(self, step, ckpt):
        """The one line a preempted run ends with; exit code 128 + the signal (130 Ctrl-C, 143 SIGTERM; a
        torchrun process stopped by another's signal says SIGTERM)."""
        signum = self.signum or signal.SIGTERM
        print(f"{signal.Signals(signum).name} at step {step}: checkpoint {ckpt} saved; run the same "
              f"command with --resume to continue", file=sys.stderr)
        raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------------------------------------------
# Runs: the output folder of a training run, its log, unreadable files, and the processes of a torchrun job.

RUN_FILES = ("ckpt.pt", "log.jsonl", "config.json", "masks.png", "loss.png")


def check_run_folder(out, resume, restart):
    """An --out that holds a run is continued (--resume) or replaced (--restart), never silently mixed:
    a second run would append to log.jsonl, rewrite config.json and overwrite ckpt.pt."""
    ckpt, log = os.path.join(out, "ckpt.pt"), os.path.join(out, "log.jsonl")
    if restart:
        for name in RUN_FILES:
            if os.path.exists(p := os.path.join(out, name)):
                os.remove(p)
    elif not resume and (os.path.exists(ckpt) or os.path.exists(log)):
        step = read_checkpoint(ckpt).get("step", 0) if os.path.exists(ckpt) else 0
        raise BadInput(f"--out {out} already holds a run (at step {step}): add --resume to continue it, "
                       f"or --restart to start over (its files are replaced)")


def start_log(out, header):
    """OUT/config.json = header; OUT/log.jsonl keeps the records up to header['start_step'] (those past it
    were written after the checkpoint a resumed run starts from: they are redone), then the header."""
    path, start = os.path.join(out, "log.jsonl"), header["start_step"]
    old = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) and start else []
    write_text(path, "".join(r + "\n" for r in old if json.loads(r).get("step", 0) <= start))
    write_json(os.path.join(out, "config.json"), header)
    append_jsonl(path, header)
    h = header
    print(f"RadJEPA | {h['images']} images | encoder {h['params_encoder'] / 1e6:.1f}M, predictor "
          f"{h['params_predictor'] / 1e6:.1f}M params | {h['world']} process(es) on {h['device']} | "
          f"kernels: {h['kernels']} | {h['precision']} | steps {h['start_step']}->{h['end_step']}")
    if not h.get("objective", "").startswith("I-JEPA"):
        print(f"objective: {h['objective']}")


class StepStats:
    """A training log line's numbers, summed between log steps as device tensors (no sync per step);
    record() reads them once and starts the next sums. It also watches the effective rank: a rank under
    half of the run's first logged one is dimensional collapse, said once in the log line."""

    def __init__(self, first_erank=None):  # a resumed run: its log's first record's
        self.first_erank, self.warned = first_erank, False
        self.reset()

    def reset(self):
        self.sums, self.t0 = dict(loss=0.0, ctx=0.0, tgt=0.0, std=0.0, n=0, imgs=0), time.time()

    def add(self, **values):  # loss, ctx, tgt, std: averaged; imgs: summed (images per second)
        for k, v in values.items():
            self.sums[k] += v
        self.sums["n"] += 1

    def record(self, step, skipped, **extra):
        """-> (the log.jsonl record, the log line)."""
        s, n, now = self.sums, max(self.sums["n"], 1), time.time()
        r = dict(type="train", step=step, loss=float(s["loss"]) / n, lr=extra.pop("lr"),
                 wd=extra.pop("wd"), ema=extra.pop("ema"), grad_norm=float(extra.pop("grad_norm")),
                 img_per_s=float(s["imgs"]) / (now - self.t0), ctx_patches=float(s["ctx"]) / n,
                 tgt_patches=float(s["tgt"]) / n, target_std=float(s["std"]) / n,
                 skipped_files=skipped, time=now, **extra)
        self.reset()
        line = (f"step {step:6d} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | wd {r['wd']:.3f} | "
                f"ema {r['ema']:.4f} | gnorm {r['grad_norm']:.3f} | {r['img_per_s']:.1f} img/s | "
                f"ctx {r['ctx_patches']:.1f} tgt {r['tgt_patches']:.1f} | std {r['target_std']:.3f} | "
                f"erank {r['target_erank']:.1f} | skipped {skipped}")
        self.first_erank = self.first_erank or r["target_erank"]
        if r["target_erank"] < 0.5 * self.first_erank and not self.warned:
            self.warned = True
            line += (f"\nwarning: dimensional collapse: the target tokens' effective rank fell from "
                     f"{self.first_erank:.1f} to {r['target_erank']:.1f}; a lower --lr keeps it "
                     f"(BENCHMARKS.md section 10: 1e-3 collapses, 3e-4 does not)")
        return r, line


class Unreadable:
    """Unreadable training files: each is named once (`say`) and counted; `limit` batches in a row with
    no readable image means the data is bad, not unlucky: BadInput, never training on nothing."""

    def __init__(self, say, data, limit=10):  # say=None: count silently (ranks other than 0)
        self.files, self.empty, self.say, self.data, self.limit = set(), 0, say, data, limit

    def note(self, bad, empty):
        for err in bad:
            if err not in self.files and self.say:
                self.say(f"skipping {err}")
            self.files.add(err)
        self.empty = self.empty + 1 if empty else 0
        if self.empty >= self.limit:
            raise BadInput(f"{self.empty} batches in a row held no readable image ({len(self.files)} "
                           f"distinct unreadable files, listed above); check --data {self.data}")


def setup_distributed(device, batch_size):
    """-> (ddp, rank, world, torch.device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python
    radjepa.py` never makes a process group. device: auto | cuda | cpu."""
    import torch
    import torch.distributed as dist
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda but CUDA is not available")
    rank, world = 0, 1
    if ddp:
        dist.init_process_group(backend="nccl" if dev == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if dev == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if batch_size % world:
        raise BadInput(f"--batch-size {batch_size} is not divisible by the {world} processes")
    return ddp, rank, world, torch.device(dev, torch.cuda.current_device()) if dev == "cuda" else torch.device(dev)


# ----------------------------------------------------------------------------------------------------------------
# Metrics, and the online probe of a training run (eval.py scores its probes with the same metrics).

def ranks(s):
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
    r = ranks(np.asarray(s, dtype=np.float64))
    # U = (sum of positive ranks) - n_pos(n_pos+1)/2 counts the (pos, neg) pairs in order, ties as 1/2
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auroc(y, scores):
    """Mean AUROC over labels defined on these rows (for val-split model selection)."""
    vals = []
    for j in range(y.shape[1]):
        k = np.isfinite(y[:, j])
        a = auroc(y[k, j], scores[k, j])
        if a is not None:
            vals.append(a)
    return float(np.mean(vals)) if vals else float("nan")



class OnlineProbe:
    """--probe-every: is the encoder learning anything useful, *while* it trains? The loss falls in a
    collapsed run too. A fixed labelled subset (the first n_train images of the train split and n_val of
    the val split, in file order; never the test split) is embedded by the target encoder, whole images
    resized to the training size, no augmentation. Each image -> its tokens on a grid of at most 8x8 cells
    (average-pooled where the patch grid is finer), concatenated: [cells x D], standardized on the train
    images. Where a finding is, and its size, matter on radiographs: pooled to a mean or a 2x2 grid, even
    raw pixels read at chance on the phantoms (measured: BENCHMARKS.md section 14). A closed-form ridge
    regression onto the labels (its penalty chosen by leave-one-out error on the train images, so val is
    only scored) gives val scores; macro AUROC says how linearly readable the findings are. No random
    number is drawn and nothing is trained: an exact resume stays exact."""

    PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0)  # x mean squared norm of a feature row

    def __init__(self, root, size, n_train, every=0, steps=0):
        """root: a prepared folder (labels.csv); check first with why_off(root). every, steps: the
        schedule maybe() follows (open() sets it); calling the probe itself needs neither."""
        import torch
        info = read_labels(root)
        rows = {s: [r for r in info["rows"] if r["split"] == s] for s in ("train", "val")}
        rows["train"], rows["val"] = rows["train"][:n_train], rows["val"][:max(1, n_train // 2)]
        self.names, self.size = info["label_names"], size
        self.x, self.y = {}, {}
        for split, rs in rows.items():  # decoded once: [n, 1, size, size] in [0, 1]
            imgs, ys = [], []
            for r in rs:
                try:
                    imgs.append(load_whole(os.path.join(root, r["image"]), size))
                except BadImage:  # training names unreadable files; the probe only leaves them out
                    continue
                ys.append(r["labels"])
            if not imgs:
                raise BadInput(f"online probe: no readable {split} image in {root}")
            self.x[split] = torch.from_numpy(np.stack(imgs))[:, None]  # load_whole: float32 in [0, 1]
            self.y[split] = np.array(ys, np.float64)  # nan = unknown
        self.every, self.steps, self.seconds, self.said, self.t0 = every, steps, 0.0, "", time.time()

    @staticmethod
    def why_off(root):
        """None if root can be probed, else the reason (one line) it cannot."""
        if not os.path.exists(os.path.join(root, "labels.csv")):
            return f"{root} has no labels.csv (an unlabelled folder; --probe-data names a labelled one)"
        info = read_labels(root)
        val = np.array([r["labels"] for r in info["rows"] if r["split"] == "val"], np.float64)
        if not any(r["split"] == "train" for r in info["rows"]) or not len(val):
            return f"{root} has no train or no val images"
        if not any(np.nansum(c) > 0 and np.nansum(1 - c) > 0 for c in val.T):
            return f"no label of {root} has both classes in its val split"
        return None

    def features(self, encoder, split, autocast, batch=128):
        import torch
        import torch.nn.functional as F
        device, out = next(encoder.parameters()).device, []
        with torch.no_grad(), autocast:
            for i in range(0, len(self.x[split]), batch):
                t = encoder(self.x[split][i:i + batch].to(device)).float()  # [b, N, D]
                g = int(round(t.shape[1] ** 0.5))
                grid = F.adaptive_avg_pool2d(t.transpose(1, 2).reshape(len(t), -1, g, g), min(g, 8))
                out.append(grid.flatten(1).cpu())  # [b, D x cells]
        return torch.cat(out).double()

    @classmethod
    def open(cls, root, size, n_train, say, every=-1, steps=0):
        """The probe of root, every `every` steps of a `steps`-step run (-1: 10 per run; 0: off), or None
        (after saying once why it is off). It also probes at step 0 (the random-init reference) and at
        the last step, and keeps its own time: cost() says it, and a StepStats' img/s leaves it out."""
        every = every if every >= 0 else max(1, steps // 10)
        if not every:
            return None
        why = cls.why_off(root)
        if why:
            say(f"online probe off: {why}")
            return None
        return cls(root, size, n_train, every, steps)

    def maybe(self, log_path, step, encoder, autocast, stats, write=print):
        """At step 0, every `every` steps and the last one: probe, log and write its line; its seconds
        move stats' clock on, so the next log line's img/s counts training alone."""
        if step % self.every and step != self.steps:
            return
        self.said, seconds = self.step(log_path, step, encoder, autocast)
        self.seconds, stats.t0 = self.seconds + seconds, stats.t0 + seconds
        write(self.said)

    def cost(self):
        """The last reading and what the probe cost (the issue's bound is 5% of a run), or ""."""
        run = time.time() - self.t0
        return self.said and (f"{self.said}; the probe took {self.seconds:.0f} s, "
                              f"{100 * self.seconds / run:.1f}% of this run's time")

    def step(self, log_path, step, encoder, autocast=contextlib.nullcontext()):
        """Probe, append a "probe" record to log.jsonl -> (the line to print, seconds it took)."""
        t0 = time.time()
        a, per = self(encoder, autocast)
        seconds = time.time() - t0
        append_jsonl(log_path, dict(type="probe", step=step, auroc=a, labels=per, seconds=seconds,
                                    images=[len(self.y["train"]), len(self.y["val"])]))
        ref = [r["auroc"] for r in read_log(log_path, "probe") if r["step"] == 0]
        init = f" (random init {ref[0]:.3f})" if ref and step else " (random init: the step-0 reference)" \
            if not step else ""
        return f"online probe macro AUROC {a:.3f}{init} at step {step:,}", seconds

    @classmethod
    def ridge(cls, xt, yt, xv):
        """Ridge regression of yt [n, L] on xt [n, D] -> (scores of xv [m, L], the penalty chosen). Dual
        form (D can exceed n): alpha = (K + lam I)^-1 y, K = xt xt^T. Each penalty's leave-one-out error
        comes in closed form from one eigendecomposition of K: e_i / (1 - H_ii), H = K (K + lam I)^-1."""
        import torch
        mean = yt.mean(0)
        yc, K = yt - mean, xt @ xt.T
        evals, evecs = torch.linalg.eigh(K)
        best = None
        for p in cls.PENALTIES:
            lam = p * K.diagonal().mean().clamp_min(1e-12)  # (a collapsed encoder: K = 0)
            hat = evecs @ torch.diag(evals / (evals + lam)) @ evecs.T  # fitted = hat @ yc
            loo = (((yc - hat @ yc) / (1 - hat.diagonal()[:, None]).clamp_min(1e-9)) ** 2).mean()
            if best is None or loo < best[0]:
                best = (loo, lam)
        alpha = torch.linalg.solve(K + best[1] * torch.eye(len(K), dtype=K.dtype), yc)
        return xv @ xt.T @ alpha + mean, float(best[1])

    def __call__(self, encoder, autocast=contextlib.nullcontext()):
        """-> (macro AUROC on the val images, {label: AUROC})."""
        import torch
        xt, xv = self.features(encoder, "train", autocast), self.features(encoder, "val", autocast)
        mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
        yt = torch.from_numpy(np.nan_to_num(self.y["train"], nan=0.5))  # unknown: no pull either way
        scores = self.ridge((xt - mu) / sd, yt, (xv - mu) / sd)[0].numpy()
        per = {}
        for j, name in enumerate(self.names):
            k = np.isfinite(self.y["val"][:, j])
            a = auroc(self.y["val"][k, j], scores[k, j])
            if a is not None:
                per[name] = a
        return float(np.mean(list(per.values()))) if per else float("nan"), per


# ----------------------------------------------------------------------------------------------------------------
# Pictures, drawn with PIL alone.

LEGEND = [(60, 110, 255), (230, 60, 60), (60, 180, 75), (245, 160, 30), (170, 60, 200), (70, 200, 220)]


def read_log(log_path, type="train"):
    """The records of one type in log.jsonl ([] without one). The first logs were untyped: their train
    records have "loss", their header "images"."""
    if not os.path.isfile(log_path):
        return []
    with open(log_path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    legacy = lambda r: "train" if "loss" in r else "header" if "images" in r else None  # noqa: E731
    return [r for r in recs if r.get("type", legacy(r)) == type]


RUN_COLOURS = [(0, 0, 128), (230, 60, 60), (60, 170, 75), (245, 150, 30), (150, 60, 200), (40, 180, 210),
               (140, 90, 40), (120, 120, 120), (200, 80, 160), (110, 140, 30)]  # one per overlaid run


def plot_log(logs, png_path, curves, w=720, ph=170):
    """logs: one log.jsonl, or [(label, log.jsonl)] to overlay runs (a fork beside the original: one colour
    each, a legend on top). -> a PNG with one panel per (key, title) in `curves` that every train record
    has, then one of the online probe (each run's step-0 value, random init, as a dashed reference line)
    if a run has one: y with ticks (from 0, the probe's from its range), the step on x."""
    runs = [("", logs)] if isinstance(logs, (str, os.PathLike)) else list(logs)
    runs = [(label, read_log(path), read_log(path, "probe")) for label, path in runs]
    runs = [(label, recs, probes) for label, recs, probes in runs if len(recs) >= 2]
    every = [r for _, recs, _ in runs for r in recs]
    panels = [(k, t, 1) for k, t in curves if every and all(k in r for r in every)]  # old logs lack keys
    if any(len(probes) >= 2 for *_, probes in runs):
        panels.append(("auroc", "online probe: val macro AUROC (dashed: random init)", 2))
    if not panels:
        return
    head = 18 * ((len(runs) + 3) // 4) if len(runs) > 1 else 0  # the legend: four runs a line
    im = Image.new("RGB", (w, head + ph * len(panels)), "white")
    d, x0, x1 = ImageDraw.Draw(im), 60, w - 20
    for i, (label, *_) in enumerate(runs if head else ()):
        lx, ly = x0 + (i % 4) * (x1 - x0) // 4, 4 + 18 * (i // 4)
        d.rectangle([lx, ly + 3, lx + 14, ly + 9], fill=RUN_COLOURS[i % len(RUN_COLOURS)])
        d.text((lx + 18, ly), label, fill="black")
    s0 = min(r["step"] for _, recs, probes in runs for r in recs + probes[:len(probes) >= 2])
    s1 = max(recs[-1]["step"] for _, recs, _ in runs)
    def X(s): return x0 + (s - s0) / max(1, s1 - s0) * (x1 - x0)
    for i, (key, title, kind) in enumerate(panels):
        series = [(c, rs, [r[key] for r in rs]) for c, (_, recs, probes) in zip(itertools.cycle(RUN_COLOURS), runs)
                  for rs in [recs if kind == 1 else probes] if len(rs) >= 2]
        ys, top, bot = [v for *_, vs in series for v in vs], head + i * ph + 24, head + (i + 1) * ph - 30
        if kind == 1:  # losses and indicators from 0
            lo, hi = 0.0, max(ys) * 1.05 or 1.0
        else:  # AUROC: its range, with a margin
            pad = 0.1 * (max(ys) - min(ys) or 0.1)
            lo, hi = min(ys) - pad, max(ys) + pad
        def Y(v): return bot - (v - lo) / (hi - lo) * (bot - top)
        for colour, rs, y in series:
            if kind == 2 and rs[0]["step"] == 0:  # the reference: the same encoder, untrained
                for xa in np.arange(x0, x1, 12):
                    d.line([xa, Y(y[0]), min(xa + 6, x1), Y(y[0])], fill="gray" if not head else colour, width=1)
            pts = [(X(r["step"]), Y(v)) for r, v in zip(rs, y)]
            d.line(pts, fill=colour, width=2)
            for p in pts if kind == 2 else ():  # (the frame and ticks are drawn over them)
                d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        d.rectangle([x0, top, x1, bot], outline="black")
        y = series[0][2]  # one run: where it started and ended
        d.text((x0, top - 16), title + (f": {y[0]:.4g} -> {y[-1]:.4g}" if not head else ""), fill="black")
        for v in np.linspace(lo, hi, 5):
            d.line([x0 - 4, Y(v), x0, Y(v)], fill="black")
            d.text((4, Y(v) - 5), f"{v:.3g}", fill="black")
        for st in np.linspace(s0, s1, 6):
            d.line([X(st), bot, X(st), bot + 4], fill="black")
            d.text((X(st) - 10, bot + 6), f"{st:.0f}", fill="black")
        d.text((x0 - 50, bot + 6), "step", fill="black")
    save_png(png_path, im)


def preview_masks(png_path, dataset, collate, patch, n_targets, n=4):
    """OUT/masks.png, once per run folder: the first n training crops (dataset[(i, g)] -> (crop, why, g))
    with the very masks training draws for them (collate.masks_for(g)); unreadable images are left out."""
    if os.path.exists(png_path):
        return
    crops = [dataset[(g % len(dataset), g)] for g in range(n)]
    draw_masks([(x[0].numpy(), collate.masks_for(g)) for x, _, g in crops if x is not None], patch,
               png_path, n_targets)


def draw_masks(items, patch, png_path, n_targets):
    """items: [(crop, (context indices, [target indices]))], crops [H, W] in [0, 1], indices on the patch grid.
    -> a strip of the crops (each upscaled to >= 256 px) and a legend below that names every colour drawn: the
    context tinted blue (LEGEND[0]), each target block its own colour (LEGEND[1:]) and outline, a patch in two
    blocks the first one's colour striped with the other's, and the patches in neither dimmed grey."""
    if not items:
        return
    k = -(-256 // items[0][0].shape[0])  # upscale factor (ceil)
    P = patch * k                        # a patch's side on the picture
    colour = lambda j: np.array(LEGEND[1 + j % 5], float)  # noqa: E731  (target block j)
    tiles, seen = [], set()              # seen: the kinds of patch drawn, for the legend
    for x, (ctx, tgts) in items:
        gray = np.kron(np.asarray(x, float) * 255, np.ones((k, k)))[..., None].repeat(3, -1)
        gh, gw = gray.shape[0] // P, gray.shape[1] // P
        first, second = np.full(gh * gw, -1), np.full(gh * gw, -1)  # the first / second target block a patch is in
        for j, t in enumerate(tgts):
            t = np.asarray(t, int)
            second[t] = np.where((first[t] >= 0) & (second[t] < 0), j, second[t])
            first[t] = np.where(first[t] < 0, j, first[t])
        in_ctx = np.zeros(gh * gw, bool)
        in_ctx[np.asarray(ctx, int)] = True
        yy, xx = np.mgrid[:P, :P]
        tile = gray * 0.35                                        # neither: dimmed
        for i in range(gh * gw):
            sl = np.s_[i // gw * P:(i // gw + 1) * P, i % gw * P:(i % gw + 1) * P]
            if first[i] >= 0:                                     # a target patch (never context)
                tile[sl] = 0.35 * gray[sl] + 0.65 * colour(first[i])
                if second[i] >= 0:                                # in two blocks: the other one's stripes
                    stripes = (yy + xx + (i // gw + i % gw) * P) % 12 < 4
                    tile[sl][stripes] = colour(second[i])
                    seen.add("overlap")
                seen.add(first[i])
            elif in_ctx[i]:
                tile[sl] = 0.5 * gray[sl] + 0.5 * np.array(LEGEND[0], float)
                seen.add("context")
            else:
                seen.add("neither")
        im = Image.fromarray(tile.clip(0, 255).astype(np.uint8))
        d, w = ImageDraw.Draw(im), max(2, k)
        for j, t in enumerate(tgts):                              # each block's outline, in its colour
            block = set(np.asarray(t, int).tolist())
            for i in block:
                r, c = divmod(i, gw)
                x0, y0, x1, y1 = c * P, r * P, (c + 1) * P - 1, (r + 1) * P - 1
                fill = tuple(int(v) for v in colour(j))
                for side, nb, ok in (((x0, y0, x1, y0), i - gw, r > 0), ((x0, y1, x1, y1), i + gw, r < gh - 1),
                                     ((x0, y0, x0, y1), i - 1, c > 0), ((x1, y0, x1, y1), i + 1, c < gw - 1)):
                    if not ok or nb not in block:
                        d.line(side, fill=fill, width=w)
        tiles.append(np.asarray(im))
    strip = np.concatenate([np.pad(t, ((0, 0), (0, 6), (0, 0)), constant_values=255) for t in tiles], axis=1)
    names = ["context: what the encoder sees"] + [f"target {j + 1}" for j in range(min(n_targets, 5))]
    entries = [(LEGEND[j], name) for j, name in enumerate(names)]
    if "overlap" in seen:
        entries.append(("stripes", "in two targets: the other's stripes"))
    if "neither" in seen:
        entries.append(((80, 80, 80), "dimmed: in neither"))
    x, y, lines = 4, strip.shape[0] + 8, []
    for fill, name in entries:                                    # flow the entries, a new line when full
        w = 28 + 6 * len(name)
        if x + w > strip.shape[1] and x > 4:
            x, y = 4, y + 20
        lines.append((x, y, fill, name))
        x += w
    im = Image.new("RGB", (strip.shape[1], y + 20), "white")
    im.paste(Image.fromarray(strip))
    d = ImageDraw.Draw(im)
    for x, y, fill, name in lines:
        if fill == "stripes":                                     # the first target striped with the second's
            sw = np.tile(np.array(LEGEND[1], np.uint8), (13, 13, 1))
            yy, xx = np.mgrid[:13, :13]
            sw[(yy + xx) % 6 < 2] = LEGEND[2]
            im.paste(Image.fromarray(sw), (x, y))
            d.rectangle([x, y, x + 12, y + 12], outline="black")
        else:
            d.rectangle([x, y, x + 12, y + 12], fill=fill, outline="black")
        d.text((x + 16, y), name, fill="black")
    save_png(png_path, im)


# ----------------------------------------------------------------------------------------------------------------
# Export: a checkpoint's EMA encoder as a folder that timm reads (no timm needed here).

TIMM_ARCH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 1024: "vit_large_patch16_224"}


def export_timm(ck, ckpt_path, pos_embed, mean, std, out_dir):
    """ck: a checked checkpoint (read_checkpoint); pos_embed [N, D]: the training grid's sin-cos table.
    Writes pytorch_model.bin, a plain state dict with the key names of timm's VisionTransformer(in_chans=1,
    class_token=False, global_pool="avg", fc_norm=False, num_classes=0), and config.json: architecture +
    model_args (enough to build it) and pretrained_cfg with the input size and the one-channel mean/std. RadJEPA's
    blocks are timm's (pre-norm, LayerNorm eps 1e-6, exact GELU, qkv laid out [3, heads, Dh]), so only names
    change. timm normalises outside the model: model.forward_features((x - mean) / std) == load_encoder(ckpt)(x)."""
    c = ck["config"]
    sd = {k.replace("patch_embed.", "patch_embed.proj.").replace(".mlp.0.", ".mlp.fc1.")  # only names differ
          .replace(".mlp.2.", ".mlp.fc2."): v.float().contiguous() for k, v in ck["target_encoder"].items()}
    sd["pos_embed"] = pos_embed[None]  # no class token -> no extra slot: [1, N, D]
    g = c["img_size"] // c["patch"]
    args = dict(img_size=c["img_size"], patch_size=c["patch"], in_chans=1, embed_dim=c["width"],
                depth=c["depth"], num_heads=c["heads"], mlp_ratio=4.0, qkv_bias=True, class_token=False,
                no_embed_class=True, global_pool="avg", fc_norm=False, num_classes=0)
    cfg = dict(architecture=TIMM_ARCH.get(c["width"], "vit_base_patch16_224"), num_classes=0,
               num_features=c["width"], global_pool="avg", model_args=args,
               pretrained_cfg=dict(input_size=[1, c["img_size"], c["img_size"]], mean=[mean], std=[std],
                                   crop_pct=1.0, interpolation="bilinear", fixed_input_size=True, num_classes=0),
               radjepa=dict(checkpoint=os.path.abspath(ckpt_path), step=ck.get("step"), config=c,
                            note="timm interpolates pos_embed at other sizes; radjepa.sincos_pos_embed(gh, gw, "
                                 f"D, ref=({g}, {g})) is the exact table (README: Use the weights elsewhere)"))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create {out_dir}: {os_reason(e)}") from None
    save_torch(os.path.join(out_dir, "pytorch_model.bin"), sd)
    write_json(os.path.join(out_dir, "config.json"), cfg)
    return cfg


def export_cli(argv, load_encoder, sincos_pos_embed, mean, std):
    """`radjepa.py export CKPT OUT_DIR`: the checkpoint passes the checks of eval and --resume (its encoder
    loads), then export_timm with the training grid's sin-cos table."""
    p = argparse.ArgumentParser(prog="radjepa.py export", description=export_timm.__doc__)
    p.add_argument("ckpt", help="OUT/ckpt.pt written by radjepa.py")
    p.add_argument("out_dir", help="folder to write pytorch_model.bin and config.json into")
    a = p.parse_args(argv)
    try:
        enc = load_encoder(a.ckpt)  # a bad checkpoint never exports
        pos = sincos_pos_embed(*enc.ref_grid, enc.embed_dim)
        cfg = export_timm(read_checkpoint(a.ckpt), a.ckpt, pos, mean, std, a.out_dir)
    except BadInput as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {a.out_dir}/pytorch_model.bin and config.json ({cfg['architecture']} args, "
          f"{cfg['model_args']['img_size']} px, patch {cfg['model_args']['patch_size']})")


def grouped(items, k):
    """[a, b, c, d, ...] -> [a, b], [c, d], ... (k at a time: the micro-batches of one step)."""
    group = []
    for x in items:
        group.append(x)
        if len(group) == k:
            yield group
            group = []


@contextmanager
def no_sync(*ddp_modules):
    """Gradients accumulate locally: DDP all-reduces nothing until a backward outside this block."""
    with contextlib.ExitStack() as stack:
        for m in ddp_modules:
            stack.enter_context(m.no_sync())
        yield
