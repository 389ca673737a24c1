"""
Does the online probe rank checkpoints like the offline probes? One pretraining run, stopped at several steps (an
exact resume makes it the same run as an unstopped one), each checkpoint probed offline by eval.py, the online
probe's value at the same steps read from the run's log.jsonl; step 0 is random init on both sides (the online
probe's first record; eval.py's random-init reference).

    python -m bench.probe_agreement OUT --eval-data LABELLED --at 100 200 300 400 500 600 \\
        [--eval-flags "--quick"] -- RADJEPA FLAGS (--data ... --steps 600 ...)
    -> OUT/run/ (the run: log.jsonl, loss.png), OUT/ckpt_STEP.pt, OUT/eval_STEP/ (eval.py's report),
       OUT/agreement.json, OUT/agreement.md (printed), OUT/agreement.png (online probe and offline probes by step)

A step whose online probe is not in the log (the run probed at other steps, e.g. every 400 while its checkpoints
were kept every 500) gets it from the checkpoint: the probe is a function of the target encoder alone (fixed
images, closed-form ridge, no random draw), so online_from_checkpoint gives what the run would have logged (in
fp32; a run trained under bf16 autocast logged it in bf16, equal to ~1e-3).

Spearman's rho between the online probe and each offline metric (grid and mean-pooled linear probe macro AUROC;
anatomy Dice, the mean of lungs and heart, when segmentation ran) over the checkpoints. Resumable: a checkpoint or
an evaluation already on disk is not redone.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw

import plumbing
from bench import out_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spearman(a, b):
    """Spearman's rho: Pearson's r of the ranks (ties averaged); None for fewer than 3 pairs or a constant side."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 3:
        return None
    ra, rb = plumbing.ranks(a) - (len(a) + 1) / 2, plumbing.ranks(b) - (len(b) + 1) / 2
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den else None


def offline(metrics, who):
    """eval.py's metrics.json -> {metric: value} of encoder `who` (jepa or random)."""
    out = {}
    for key, entry in metrics.get("classification", {}).items():
        enc, probe = key.split("/", 1)
        if enc == who:
            out[f"{probe} AUROC"] = entry["macro"]["auroc"]
    dice = metrics.get("segmentation", {}).get(who, {}).get("dice", {})
    anatomy = [dice[s]["dice"] for s in ("lungs", "heart") if s in dice]
    if anatomy:  # the structures every image has (findings' Dice is dominated by empty masks)
        out["anatomy Dice"] = float(np.mean(anatomy))
    return out


def online_from_checkpoint(path):
    """The online probe's macro AUROC for a checkpoint's target encoder, with the run's own probe settings."""
    import radjepa
    enc = radjepa.load_encoder(path)
    c = enc.config
    return plumbing.OnlineProbe(c["probe_data"] or c["data"], c["img_size"], c["probe_images"])(enc)[0]


def run(py, args, cwd=REPO):
    print("$", " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([py] + args, cwd=cwd, check=True)


def plot(rows, path, w=720, h=360):
    """Each series min-max scaled into the panel (their ranges differ), its range written in its label."""
    im = Image.new("RGB", (w, h), "white")
    d, x0, x1, top, bot = ImageDraw.Draw(im), 60, w - 20, 40, h - 40
    steps = [r["step"] for r in rows]
    def X(s): return x0 + s / max(steps) * (x1 - x0)
    d.rectangle([x0, top, x1, bot], outline="black")
    series = [("online probe AUROC", [r["online"] for r in rows], (20, 20, 120))]
    keys = [k for k in rows[-1]["offline"] if all(k in r["offline"] for r in rows)]
    colours = [(220, 60, 60), (60, 160, 60), (230, 140, 20), (150, 60, 200)]
    series += [(k, [r["offline"][k] for r in rows], c) for k, c in zip(keys, colours)]
    for i, (name, ys, col) in enumerate(series):
        lo, hi = min(ys), max(ys)
        pts = [(X(s), bot - (y - lo) / ((hi - lo) or 1) * (bot - top)) for s, y in zip(steps, ys)]
        d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        d.text((x0 + 5 + 235 * (i % 3), 4 + 14 * (i // 3)), f"{name} {lo:.3f}-{hi:.3f}", fill=col)
    for s in steps:
        d.line([X(s), bot, X(s), bot + 4], fill="black")
        d.text((X(s) - 10, bot + 6), str(s), fill="black")
    d.text((4, bot + 6), "step", fill="black")
    d.text((4, top), "scaled", fill="black")
    plumbing.save_png(path, im)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m bench.probe_agreement", description=__doc__.split("\n\n")[1])
    p.add_argument("out", help="folder for the run, its checkpoints, their evaluations and the table")
    p.add_argument("--eval-data", required=True, help="the labelled prepared folder eval.py probes on")
    p.add_argument("--at", type=int, nargs="+", required=True, help="the steps to stop and probe offline at")
    p.add_argument("--eval-flags", default="--quick", help="eval.py's flags (one string; default --quick)")
    p.add_argument("--python", default=sys.executable, help="the interpreter for radjepa.py and eval.py")
    a, train = p.parse_args(argv[:cut]), argv[cut + 1:]
    out = out_folder(a.out, "OUT")
    rows, run_dir = [], os.path.join(out, "run")
    for at in sorted(set(a.at)):
        ck = os.path.join(out, f"ckpt_{at}.pt")
        if not os.path.exists(ck):
            run(a.python, ["radjepa.py", *train, "--out", run_dir, "--stop-at", str(at), "--resume"])
            shutil.copyfile(os.path.join(run_dir, "ckpt.pt"), ck + ".tmp")
            os.replace(ck + ".tmp", ck)
        ev = os.path.join(out, f"eval_{at}")
        metrics = os.path.join(ev, "metrics.json")         # (eval.py rewrites it after each task)
        done = plumbing.read_json(metrics) if os.path.exists(metrics) else {}
        if "classification" not in done or ("segmentation" not in done and "cls" not in a.eval_flags):
            run(a.python, ["eval.py", "--ckpt", ck, "--data", a.eval_data, "--out", ev,
                           *shlex.split(a.eval_flags)])
    probes = {r["step"]: r["auroc"] for r in plumbing.read_log(os.path.join(run_dir, "log.jsonl"), "probe")}
    first = plumbing.read_json(os.path.join(out, f"eval_{min(a.at)}", "metrics.json"))
    if 0 in probes:  # random init, on both sides
        rows.append(dict(step=0, online=probes[0], offline=offline(first, "random")))
    for at in sorted(set(a.at)):
        if at not in probes:
            print(f"step {at}: no online probe in the log; computing it from {out}/ckpt_{at}.pt", flush=True)
            probes[at] = online_from_checkpoint(os.path.join(out, f"ckpt_{at}.pt"))
        m = plumbing.read_json(os.path.join(out, f"eval_{at}", "metrics.json"))
        rows.append(dict(step=at, online=probes[at], offline=offline(m, "jepa")))
    keys = [k for k in rows[-1]["offline"] if all(k in r["offline"] for r in rows)]
    rho = {k: spearman([r["online"] for r in rows], [r["offline"][k] for r in rows]) for k in keys}
    result = dict(train_flags=train, eval_flags=a.eval_flags, rows=rows, spearman=rho,
                  versions=plumbing.versions())
    md = ["| step | online probe AUROC | " + " | ".join(keys) + " |", "|---:|---:|" + "---:|" * len(keys)]
    md += [f"| {r['step']}{' (random init)' if r['step'] == 0 else ''} | {r['online']:.3f} | "
           + " | ".join(f"{r['offline'][k]:.3f}" for k in keys) + " |" for r in rows]
    md += ["", f"Spearman's rho of the online probe with each offline metric over these {len(rows)} checkpoints: "
           + ", ".join(f"{k} {v:+.2f}" if v is not None else f"{k} undefined" for k, v in rho.items())]
    plumbing.write_json(os.path.join(out, "agreement.json"), result)
    plumbing.write_text(os.path.join(out, "agreement.md"), "\n".join(md) + "\n")
    plot(rows, os.path.join(out, "agreement.png"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
