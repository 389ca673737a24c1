"""
bench/ablate.py: the ablation table, `python -m bench.ablate OUT [flags] -- RECIPE` (experiment.sh ablate).

One row = one factor of the documented CPU recipe changed, everything else as in the recipe (RECIPE: the
radjepa.py flags of `experiment.sh cpu`, with 1,000 steps in `experiment.sh ablate`). Each row is pretrained
with every --seeds seed for --steps steps (warmup 10% of them, as the base's 100 of 1,000), then probed with
the SAME frozen probes as every other row (eval.py's), at every --probe-sizes resolution: linear, grid,
attentive, segmentation, and the effective rank of its tokens. The random-init twin of each architecture and
raw pixels are probed once, the same way. Layout (re-running resumes; nothing finished reruns):
  OUT/s{steps}/{row}/seed{k}/ckpt.pt, log.jsonl   pretraining (radjepa.py --resume continues a killed run)
  OUT/s{steps}/{row}/seed{k}/result.json          test-set scores of every probe: written last, atomically
  OUT/baselines/{random_<arch>|pixels_p<patch>}/result.json
  OUT/ablation_s{steps}.md / .json                the table, rebuilt from the results after every run
  OUT/rows.json                                   the rows added with --add-row
The objective rows (sigreg=L, sigreg-noema=L: examples/lejepa.py's SIGReg fork, issue 26) run only when named with
--rows (experiment.sh sigreg names them); they train through lejepa.forked(), which restores radjepa after the run.
Statistics are computed at table time from the stored test scores: 95% bootstrap CIs over test patients and
paired p-values (eval.py's docstring), with the same resamples for every row, so a row can be compared with
any other. A row's score is the mean over its seeds (per resample too); the table also gives each seed's own
score, because the bootstrap covers test-set sampling only, not the spread between pretraining runs.
"""
import argparse
import contextlib
import io
import json
import os
import re
import shlex
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

import eval
import plumbing
import radjepa
from examples import lejepa

# (row id, factor, value, radjepa.py flags that change it, warmup as a fraction of --steps). Cheap rows first:
# a partial run then has whole rows (both seeds) of the cheap factors; a 16x16-grid row costs ~4x a row.
ABLATION_ROWS = [
    ("baseline", "-", "the documented CPU recipe", [], 0.1),
    ("pred_depth=6", "predictor depth", "6 (recipe 3)", ["--pred-depth", "6"], 0.1),
    ("lr=3e-3", "peak LR at batch 64", "3e-3 (recipe 3e-4)", ["--lr", "3e-3", "--start-lr", "6e-4"], 0.1),
    ("lr=1e-3", "peak LR at batch 64", "1e-3 (the recipe before the ablations)",
     ["--lr", "1e-3", "--start-lr", "2e-4"], 0.1),
    ("lr=1e-4", "peak LR at batch 64", "1e-4", ["--lr", "1e-4", "--start-lr", "2e-5"], 0.1),
    ("ema=0.99-0.999", "EMA momentum start-end", "0.99-0.999 (recipe 0.996-1.0)",
     ["--ema", "0.99", "--final-ema", "0.999"], 0.1),
    ("pred_width=192", "predictor width", "192 (recipe 96)", ["--pred-width", "192"], 0.1),
    ("warmup=30%", "warmup", "30% of the steps (recipe 10%)", [], 0.3),
    ("ema=0.999-1", "EMA momentum start-end", "0.999-1.0", ["--ema", "0.999", "--final-ema", "1.0"], 0.1),
    ("wd=const0.04", "weight-decay schedule", "constant 0.04 (recipe cosine 0.04->0.4)",
     ["--final-wd", "0.04"], 0.1),
    ("n_targets=2", "target blocks per image", "2 (recipe 4)", ["--n-targets", "2"], 0.1),
    ("tgt_scale=0.1-0.15", "target block scale", "0.10-0.15 (recipe 0.15-0.20)",
     ["--tgt-scale", "0.1", "0.15"], 0.1),
    ("ctx_scale=1", "context block scale", "1.0 (recipe 0.85-1.0)", ["--ctx-scale", "1.0", "1.0"], 0.1),
    ("crop=0.8-1", "random-resized-crop scale", "0.8-1.0 (recipe 0.3-1.0)",
     ["--crop-scale", "0.8", "1.0"], 0.1),
    ("target=last4", "regression target", "mean of the last 4 blocks (recipe: last block)",
     ["--target-blocks", "4"], 0.1),
    ("precision=fp32", "matmul precision", "fp32 (recipe: --precision auto, bf16 on CPUs with native bf16)",
     ["--precision", "fp32"], 0.1),
    ("patch=8", "patch / image size", "patch 8 at 128 px: 16x16 grid (recipe patch 16, 8x8)",
     ["--patch", "8"], 0.1),
    ("img=256", "patch / image size", "256 px, patch 16: 16x16 grid", ["--img-size", "256"], 0.1),
    # The objective (issue 26): the worked fork examples/lejepa.py, I-JEPA masking + SIGReg, in its two variants and
    # three weights. A row with the fork's flags trains through lejepa.forked() (restored after the run). The weights
    # were 0.1/1/10 until lambda 1 + EMA measured far below I-JEPA (BENCHMARKS.md section 17): with the EMA, 10 would
    # only say more of the same, 0.01 where the fork meets the original. Without it SIGReg is all that stops collapse,
    # and lambda 1 lost dimensions (target effective rank 8): those weights bracket upward, to 10.
    *[(f"sigreg={lam}", "objective (examples/lejepa.py)", f"smooth-L1 + {lam} x SIGReg, EMA target kept",
       ["--sigreg-lambda", lam], 0.1) for lam in ("0.01", "0.1", "1")],
    *[(f"sigreg-noema={lam}", "objective (examples/lejepa.py)",
       f"smooth-L1 + {lam} x SIGReg of both views instead of EMA + stop-gradient",
       ["--no-ema", "--sigreg-lambda", lam], 0.1) for lam in ("0.1", "1", "10")],
]
CLS_PROBES = ("linear", "grid", "attentive")
# Rows that run only when named with --rows: the objective rows are a comparison of their own (experiment.sh sigreg),
# not factors of the recipe's table, which stays as BENCHMARKS.md section 10 made it.
OPT_IN = {r[0] for r in ABLATION_ROWS if r[1].startswith("objective")}


# ------------------------------------------------------------------------------------------------------------
# The command line and the rows

def ablate_args(argv):
    if "--" in argv:
        i = argv.index("--")
        argv, recipe = argv[:i], argv[i + 1:]
    else:
        recipe = []
    p = argparse.ArgumentParser(prog="python -m bench.ablate", description="One-factor ablations of the "
                                "pretraining recipe, each probed with the same frozen probes; flags after "
                                "`--` are the recipe (radjepa.py flags; experiment.sh passes those of "
                                "`experiment.sh cpu`).")
    p.add_argument("out", help="output folder (re-running resumes: finished runs are never repeated)")
    p.add_argument("--data", default=None, help="prepared dataset (default: OUT/data)")
    p.add_argument("--steps", type=int, default=200,
                   help="pretraining steps of every run (the run-length knob; warmup is 10%% of it unless "
                        "the row varies warmup). Runs of different lengths live side by side, so a "
                        "ranking-stability check is one more call with another --steps (and --rows)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="pretraining seeds of every row")
    p.add_argument("--ema-compress", action=argparse.BooleanOptionalAction, default=True,
                   help="scale 1 - EMA momentum (start and end) by the recipe's --steps / --steps, as the "
                        "LR, wd and warmup schedules are compressed: with the recipe's 0.996 over a 100-step "
                        "run the target encoder (what is probed) would still be 82%% its random init "
                        "(measured: its effective rank stayed at the random level). With it, the target "
                        "moves as far as in the recipe")
    p.add_argument("--rows", nargs="+", default=None,
                   help="row ids to run (default: all but the objective rows, which run only when named; "
                        "in the listed order; see --list); `baseline` is always added unless --no-baseline")
    p.add_argument("--no-baseline", action="store_true",
                   help="with --rows: do not add the baseline row (e.g. a second seed of one row whose "
                        "baseline seed is not needed yet); the table still compares with whatever baseline "
                        "runs exist")
    p.add_argument("--baseline-steps", type=int, default=None, metavar="N",
                   help="compare with the baseline row pretrained for N steps (OUT/sN/baseline) instead of "
                        "--steps: for rows whose step costs more, run for fewer steps at the same CPU time "
                        "(issue 26: a --no-ema step costs 1.5x an I-JEPA step, so its rows run 2/3 of the "
                        "recipe's steps; python -m bench.train_bench --paths torch sigreg sigreg-noema measures "
                        "it). The baseline row is then never trained by this call")
    p.add_argument("--add-row", nargs=2, action="append", default=[], metavar=("ID", "FLAGS"),
                   help="an extra row: ID and the radjepa.py flags it changes, in one quoted string (e.g. "
                        "--add-row adopted '--pred-depth 6 --ema 0.999'): a combination of factors, or a "
                        "factor the list lacks. Its flags are checked with the recipe's, then recorded in "
                        "OUT/rows.json, so later calls (and --table-only) know it; reusing an ID with other "
                        "flags is refused. Its warmup is 10%% of --steps, as for every row")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--table-only", action="store_true",
                   help="rebuild the table from finished runs; train nothing")
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
    a.all_rows = ablation_rows(a.out, a.add_row, recipe)
    ids = [r[0] for r in a.all_rows]
    if a.rows is None and a.add_row:                             # only the rows just added (and the baseline)
        a.rows = [rid for rid, _ in a.add_row]
    if a.rows:
        bad = [r for r in a.rows if r not in ids]
        if bad:
            raise plumbing.BadInput(f"unknown ablation row(s) {', '.join(bad)}; rows are: {', '.join(ids)}")
        a.rows = ["baseline"] * (not a.no_baseline) + [r for r in ids if r in a.rows and r != "baseline"]
    else:
        a.rows = [r for r in ids if r not in OPT_IN]
    a.baseline_steps = a.baseline_steps or a.steps
    if a.baseline_steps != a.steps:                              # the baseline lives at its own length
        a.rows = [r for r in a.rows if r != "baseline"]
    if a.steps < 1 or not a.seeds:
        raise plumbing.BadInput("--steps must be >= 1 and --seeds must name at least one seed")
    a.data = a.data or os.path.join(a.out, "data")
    return a


def train_config(argv, what):
    """radjepa.py flags -> its Config, checked as radjepa.py checks them. A bad flag or value -> one-line
    BadInput "WHAT: the reason" (argparse prints its usage and exits; its last line is the reason)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if lejepa.uses_fork(argv):                      # the fork's flags checked, radjepa's the same way
                argv = lejepa.split_args(argv)[1]
            given = radjepa.parse_args(argv)
        c = radjepa.make_config(given)
        radjepa.check_masking(c)
        return c
    except SystemExit as e:
        reason = (err.getvalue().strip().splitlines() or [str(e.code or "bad flags")])[-1]
        reason = reason.split("error: ", 1)[-1].removeprefix("argument ")
        raise plumbing.BadInput(f"{what}: {reason}") from None
    except ValueError as e:
        raise plumbing.BadInput(f"{what}: {str(e).splitlines()[0].removeprefix('error: ')}") from None


def ablation_rows(out, added=(), recipe=()):
    """ABLATION_ROWS + the rows added with --add-row (kept in OUT/rows.json: {id: flags string}). A new row's
    flags are checked with the recipe's before they are recorded: a bad row never enters rows.json."""
    path = os.path.join(out, "rows.json")
    have = plumbing.read_json(path) or {}
    builtin = {r[0] for r in ABLATION_ROWS}
    for rid, flags in added:
        if rid in builtin or not re.fullmatch(r"[A-Za-z0-9_.=+-]+", rid):
            raise plumbing.BadInput(f"--add-row {rid!r}: the id must be new (not one of --list) and use only "
                                    f"letters, digits and _ . = + -")
        if not flags.strip().startswith("--"):
            raise plumbing.BadInput(f"--add-row {rid}: FLAGS must be radjepa.py flags in one string, e.g. "
                                    f"'--pred-depth 6'")
        if have.get(rid, flags) != flags:
            raise plumbing.BadInput(f"--add-row {rid}: {path} already defines it as {have[rid]!r}; pick "
                                    "another id")
        try:
            split = shlex.split(flags)
        except ValueError as e:                                   # an unclosed quote
            raise plumbing.BadInput(f"row {rid}: {e}") from None
        train_config([*recipe, *split], f"row {rid}")
        have[rid] = flags
    if added:
        os.makedirs(out, exist_ok=True)
        plumbing.write_json(path, have)
    return ABLATION_ROWS + [(rid, "added row", f"`{flags}`", shlex.split(flags), 0.1)
                            for rid, flags in have.items()]


def ablation_train_argv(a, rid, seed):
    """The radjepa.py flags of one run: the recipe, the row's change, then length/seed/output (later wins)."""
    _, _, _, flags, wu = next(r for r in a.all_rows if r[0] == rid)
    argv = ["--data", a.data, *a.recipe, *flags]
    # the share of the target that is still its random init must not depend on the run length
    if a.ema_compress:
        c = train_config(argv, f"row {rid}")               # the recipe's own length and EMA momenta (+ row's)
        argv += [f"--{k.replace('_', '-')}={max(0.0, 1 - (1 - getattr(c, k)) * c.steps / a.steps):.6g}"
                 for k in ("ema", "final_ema")]
    return argv + ["--steps", str(a.steps), "--warmup", str(max(1, round(wu * a.steps))),
                   "--seed", str(seed), "--out", os.path.join(a.out, f"s{a.steps}", rid, f"seed{seed}"),
                   "--resume", "--device", a.device, "--log-every", str(max(1, min(20, a.steps // 10))),
                   "--ckpt-every", str(max(1, a.steps // 4))]


# ------------------------------------------------------------------------------------------------------------
# Running the rows: pretrain, probe, store the test scores

def ablate(argv):
    """Runs every (row, seed) without a result.json yet, then the baselines; rewrites the table after each."""
    a = ablate_args(argv)
    if a.list:
        for rid, factor, value, flags, wu in a.all_rows:
            warm = "" if wu == 0.1 else f", warmup {wu:.0%}"
            named = "  (only with --rows)" if rid in OPT_IN else ""
            print(f"{rid:20s} {factor}: {value}  [{' '.join(flags) or '-'}{warm}]{named}")
        return 0
    lock = None
    if not a.table_only:             # one harness per OUT and run length: two would train into one checkpoint
        try:
            os.makedirs(a.out, exist_ok=True)
        except OSError as e:
            raise plumbing.BadInput(f"{a.out}: cannot make it a folder ({plumbing.os_reason(e)})") from None
        lock = plumbing.lock_file(os.path.join(a.out, f"s{a.steps}.lock"),
                                  f"{a.out} (python -m bench.ablate --steps {a.steps})")
    try:
        return run_rows(a)
    finally:
        if lock:
            lock.close()


def run_rows(a):
    device = torch.device(a.device)
    data = eval.read_prepared(a.data, "all")
    if not data["has_cls"]:
        raise plumbing.BadInput(f"{a.data}: the ablation needs classification labels")
    pargs = argparse.Namespace(grid=4, epochs=a.epochs, seg_epochs=a.seg_epochs, batch_size=a.batch_size,
                               seed=0, mask_size=a.mask_size, seg_head="linear")
    state = {}                                              # images/masks are read once, and only when needed

    def loaded():
        if not state:
            state["images"] = eval.load_images(data)
            state["masks"] = eval.load_masks(data, a.mask_size) if data["structures"] else {}
        return state["images"], state["masks"]

    def log(msg):
        print(msg, flush=True)
    rows = [] if a.table_only else a.rows
    want = {(rid, seed): asdict(train_config(ablation_train_argv(a, rid, seed), f"row {rid}"))
            for rid in rows for seed in a.seeds}               # a bad row fails now, not hours into the table
    anatomy = anatomy_structures(a.data, data)
    run_root = os.path.join(a.out, f"s{a.steps}")
    meta = {r[0]: r for r in a.all_rows}
    for rid in rows:
        _, factor, value, flags, wu = meta[rid]
        for seed in a.seeds:
            rdir = os.path.join(run_root, rid, f"seed{seed}")
            ckpt, res_path = os.path.join(rdir, "ckpt.pt"), os.path.join(rdir, "result.json")
            if os.path.isfile(ckpt):                  # never mix recipes in one table: a clear stop instead
                have = plumbing.read_checkpoint(ckpt)["config"]
                diff = sorted(k for k, v in want[rid, seed].items()
                              if k in have and k not in radjepa.RUN_FIELDS
                              and (tuple(have[k]) if isinstance(have[k], list) else have[k]) != v)
                if diff:
                    raise plumbing.BadInput(f"{rdir} was trained with other {', '.join(diff)} than this call "
                                            "asks for (recipe changed?); use another OUT or remove that "
                                            "folder")
            if os.path.isfile(res_path):
                continue
            log(f"=== ablation row {rid} ({factor}: {value}), seed {seed}, {a.steps} steps -> {rdir}")
            enc = pretrain_and_probe(a, rid, seed, rdir, data, loaded, pargs, device, log)
            if enc is None:                                      # diverged: recorded as a failed run
                continue
            ensure_baselines(a, data, loaded, anatomy, pargs, device, log, [enc.config])
            write_ablation_table(a, data, anatomy, log)
    configs = [r["train_config"] for r in map(plumbing.read_json, _result_paths(run_root))
               if r.get("status") == "ok"]
    if configs and not a.table_only:
        ensure_baselines(a, data, loaded, anatomy, pargs, device, log, configs)
    return write_ablation_table(a, data, anatomy, log)


def pretrain_and_probe(a, rid, seed, rdir, data, loaded, pargs, device, log):
    """One (row, seed): pretrain (or continue) with radjepa.main, probe, write result.json. -> the encoder, or
    None when the run diverged (a result, recorded as failed: not a crash)."""
    ckpt, res_path = os.path.join(rdir, "ckpt.pt"), os.path.join(rdir, "result.json")
    t0, c0 = time.time(), time.process_time()
    if not (os.path.isfile(ckpt) and plumbing.read_checkpoint(ckpt)["step"] >= a.steps):
        try:
            argv = ablation_train_argv(a, rid, seed)        # an objective row trains the fork (restored after)
            (lejepa.main if lejepa.uses_fork(argv) else radjepa.main)(argv)
        except SystemExit as e:
            msg = str(e.code if e.code is not None else e)
            if "loss is" not in msg:                            # a bad input found late: stop, say which row
                raise plumbing.BadInput(f"row {rid}, seed {seed}: "
                                        f"{msg.splitlines()[0].removeprefix('error: ')}") from None
            log(f"    row {rid} seed {seed} diverged: {msg}")
            plumbing.write_json(res_path, {"row": rid, "seed": seed, "steps": a.steps, "status": "failed",
                                           "error": msg.splitlines()[0]})
            return None
    c_pre = time.process_time() - c0                              # this call's CPU s (0 if trained elsewhere)
    images, masks = loaded()
    enc = radjepa.load_encoder(ckpt, device=str(device))
    res = probe_once(lambda s: dict(zip(("tokens", "pooled"), eval.extract_tokens(
        enc, images, s, device, a.batch_size, desc=f"features {rid}/seed{seed} @{s}"))),
        a.probe_sizes, data, masks, pargs, device, log)
    with open(os.path.join(rdir, "log.jsonl")) as f:
        records = [json.loads(r) for r in f]
    logs = [r for r in records if "loss" in r]
    last = logs[-1] if logs else {}
    objective = next((r["objective"] for r in reversed(records) if "objective" in r), None)
    result = {"row": rid, "seed": seed, "steps": a.steps, "status": "ok", "sizes": res,
              "train_config": enc.config, "objective": objective, "final_loss": last.get("loss"),
              "train_erank": last.get("target_erank"), "pretrain_seconds": round(train_seconds(records), 1),
              "pretrain_cpu_seconds": round(c_pre, 1), "seconds": round(time.time() - t0, 1)}
    plumbing.write_json(res_path, result)
    return enc


def train_seconds(records):
    """A run's training seconds from its log.jsonl records: each log interval's images over its img/s. Every
    resumed segment counts (the log keeps only what its checkpoint kept), the online probe and the gaps between
    segments do not, and a run trained by another process (the harness only probes it) is timed all the same."""
    total, prev, batch = 0.0, 0, 0
    for r in records:
        if r.get("type") == "header":
            prev, batch = r.get("start_step", 0), r["config"]["batch_size"]
        elif "loss" in r and r.get("img_per_s"):
            total, prev = total + (r["step"] - prev) * batch / r["img_per_s"], r["step"]
    return total


def probe_once(make_feats, sizes, data, masks, pargs, device, log):
    """Probes one encoder at every size. make_feats(size) -> {"tokens", "pooled"}. Returns, per size, the
    test-split scores of every classification probe [n_test][L], per-image Dice on the test images that
    contain each structure (None elsewhere), and the effective rank of the tokens (train images): all a table
    needs, no statistics yet."""
    test_rows = np.flatnonzero(data["split"] == "test")
    geo_rows = np.flatnonzero(data["split"] == "train")[:500]
    out = {}
    for size in sizes:
        t0, c0 = time.time(), time.process_time()
        feats = make_feats(size)
        r = {"geometry": eval.feature_geometry(feats["tokens"], geo_rows), "cls": {}, "dice_pos": {}}
        for probe in CLS_PROBES:
            scores, hp = eval.fit_classification(probe, feats, data, pargs, device, log)
            r["cls"][probe] = {"scores": np.round(scores, 6).tolist(), "hparams": hp}
        if masks:
            pred, te_rows, hp = eval.fit_segmentation(feats, masks, data, pargs, device, log)
            pos = {int(row): i for i, row in enumerate(te_rows)}
            for s in data["structures"]:
                gt, known = masks[s]
                d = eval.dice_per_image(pred[s], gt[te_rows])
                present = known[te_rows] & gt[te_rows].reshape(len(te_rows), -1).any(1)
                r["dice_pos"][s] = [float(d[pos[int(row)]]) if int(row) in pos and present[pos[int(row)]]
                                    else None for row in test_rows]
            r["seg_hparams"] = hp
        r["seconds"], r["cpu_seconds"] = round(time.time() - t0, 1), round(time.process_time() - c0, 1)
        log(f"    probed @{size}: erank {r['geometry']['erank']:.1f}, {r['seconds']:.0f}s "
            f"({r['cpu_seconds']:.0f} CPU s)")
        out[str(size)] = r
    return out


def _result_paths(run_root):
    if not os.path.isdir(run_root):
        return []
    return sorted(os.path.join(run_root, r, s, "result.json") for r in os.listdir(run_root)
                  if os.path.isdir(os.path.join(run_root, r)) for s in os.listdir(os.path.join(run_root, r))
                  if os.path.isfile(os.path.join(run_root, r, s, "result.json")))


def _arch_key(cfg):
    return f"random_p{cfg['patch']}_w{cfg['width']}_d{cfg['depth']}_h{cfg['heads']}_i{cfg['img_size']}"


def ensure_baselines(a, data, loaded, anatomy, pargs, device, log, configs):
    """The random-init twin of each architecture seen, and raw pixels at each patch size: probed once, the
    same way."""
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
                make = lambda s: dict(zip(("tokens", "pooled"), eval.extract_tokens(  # noqa: E731
                    enc, images, s, device, a.batch_size, desc=f"features {name} @{s}")))
            else:
                make = lambda s: dict(zip(("tokens", "pooled"),  # noqa: E731
                                          eval.pixel_features(images, s, cfg["patch"], 32)))
            t0 = time.time()
            res = probe_once(make, a.probe_sizes, data, masks, pargs, device, log)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            plumbing.write_json(path, {"baseline": name, "status": "ok", "sizes": res,
                                       "seconds": round(time.time() - t0, 1)})


def anatomy_structures(root, data, share=0.9):
    """Structures present in >= 90% of the annotated train images (lungs, heart): the table's segmentation
    column averages Dice over these. Rare findings get Dice 0 from every linear head (BENCHMARKS.md): they
    would dilute it."""
    out = []
    rows = np.flatnonzero(data["split"] == "train")[:300]
    for s in data["structures"]:
        paths = [os.path.join(root, "masks", s, data["ids"][r] + ".png") for r in rows]
        present = [bool(plumbing.load_image(p).max() >= 0.5) for p in paths if os.path.isfile(p)]
        if present and np.mean(present) >= share:
            out.append(s)
    return out


# ------------------------------------------------------------------------------------------------------------
# The table: statistics from the stored test scores

_SAMPLES = {}                                                 # (result file, size, resamples) -> _run_samples


def _run_samples(res, size, data, resamples, test_rows, anatomy):
    """One run's (point, bootstrap samples) per metric at one probe size: '<probe>/auroc', '<probe>/auprc',
    'dice'. Memoised per result file: the table is rebuilt after every run, and the bootstrap is its costly
    part."""
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
        stats, smp = eval.cls_statistics(np.array(c["scores"], dtype=np.float64), data, resamples, test_rows)
        for m in ("auroc", "auprc"):
            if stats["macro"][m] is not None:
                out[f"{probe}/{m}"] = (stats["macro"][m], smp[("macro", m)])
    ds = [np.array([np.nan if v is None else v for v in r["dice_pos"][s]])
          for s in anatomy if s in r["dice_pos"]]
    if ds:
        d = np.stack(ds)                                                   # (structures, n_test)
        point = float(np.mean([np.nanmean(x) for x in d]))
        smp = np.array([np.mean([np.nanmean(x[idx]) if np.isfinite(x[idx]).any() else np.nan for x in d])
                        for idx in resamples])
        out["dice"] = (point, smp)
    out["erank"] = (r["geometry"]["erank"], None)
    return out


def _load_result(path):
    return {**plumbing.read_json(path), "_path": path}


def write_ablation_table(a, data, anatomy, log):
    """Rebuilds OUT/ablation_s{steps}.md and .json from every finished run (partial tables are fine)."""
    run_root = os.path.join(a.out, f"s{a.steps}")
    test_rows = np.flatnonzero(data["split"] == "test")
    pats = data["patients"][test_rows]
    groups = [np.flatnonzero(pats == p) for p in dict.fromkeys(pats)]
    resamples = eval.bootstrap_indices(groups, a.n_boot, 0)
    runs, failed = {}, {}
    for res in map(_load_result, _result_paths(run_root)):
        if res.get("status") != "ok":
            failed.setdefault(res["row"], []).append(f"seed {res['seed']}: {res.get('error')}")
            continue
        runs.setdefault(res["row"], []).append(res)
    if a.baseline_steps != a.steps:                   # --baseline-steps: the baseline row at its own length
        runs.pop("baseline", None)
        base_runs = [r for r in map(_load_result, _result_paths(os.path.join(a.out, f"s{a.baseline_steps}")))
                     if r["row"] == "baseline" and r.get("status") == "ok"]
        if base_runs:
            runs["baseline"] = base_runs
    base_dir = os.path.join(a.out, "baselines")
    base_res = {d: _load_result(os.path.join(base_dir, d, "result.json"))
                for d in (os.listdir(base_dir) if os.path.isdir(base_dir) else [])
                if os.path.isfile(os.path.join(base_dir, d, "result.json"))}
    order = [r[0] for r in a.all_rows]
    table = {"steps": a.steps, "n_boot": a.n_boot, "probe_sizes": a.probe_sizes, "anatomy": anatomy,
             "recipe": a.recipe, "rows": {}, "baselines": {}, "failed": failed}
    md = [f"# Ablation table: {a.steps} pretraining steps per run"
          + (f" (PARTIAL: {len(runs)} of {len(order)} rows)" if len(runs) < len(order) else ""), "",
          f"Recipe (`experiment.sh cpu`, warmup 10% of the steps): `{' '.join(a.recipe)}`. Every row changes "
          f"one factor. Probes are frozen and identical for every row (attentive {a.epochs} epochs, "
          f"segmentation {a.seg_epochs} epochs, linear head); Dice is the mean over "
          f"{', '.join(anatomy) or 'no structure'} on the test images that contain them. Cells: mean over "
          f"the row's seeds [95% bootstrap CI over {len(groups)} test patients, {a.n_boot} resamples], then "
          "each seed's own value, then paired two-sided p-values of the seed-mean vs the baseline row (Δb), "
          "the random-init twin (r) and raw pixels (px); ↑/↓ = significant at p < 0.05. The bootstrap covers "
          "test-set sampling only: compare a Δ with the spread between seeds."
          + (f" The baseline row is the recipe at **{a.baseline_steps} steps** (OUT/s{a.baseline_steps}; "
             "--baseline-steps): the rows here cost more per step and run fewer steps at the same CPU time."
             if a.baseline_steps != a.steps else ""), ""]
    for size in a.probe_sizes:
        rids = [r for r in order if r in runs]
        summ = table_rows(a, size, rids, runs, base_res, data, resamples, test_rows, anatomy)
        table["rows"][str(size)] = summ
        table["baselines"][str(size)] = {
            k: {m: {"mean": v[0], "ci": eval.percentile_ci(v[1]) if v[1] is not None else None}
                for m, v in _run_samples(r, size, data, resamples, test_rows, anatomy).items()}
            for k, r in base_res.items()}
        md += _ablation_md(size, summ, table["baselines"][str(size)])
    if failed:
        md += ["", "Failed runs: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in failed.items())]
    md += _stability_md(a, data, anatomy, resamples, test_rows)
    stem = os.path.join(a.out, f"ablation_s{a.steps}")
    plumbing.write_json(stem + ".json", table)
    plumbing.write_text(stem + ".md", "\n".join(md) + "\n")
    log(f"ablation table: {stem}.md ({len(runs)} rows with results)")
    return 0


def table_rows(a, size, rids, runs, base_res, data, resamples, test_rows, anatomy):
    """Every row at one probe size: per metric the seed mean, its CI, each seed's value, the paired tests
    against the baseline row, the random-init twin (r) and raw pixels (px), and which of the issue's targets
    it meets."""
    metrics = [f"{p}/auroc" for p in CLS_PROBES] + ["dice"] + [f"{p}/auprc" for p in CLS_PROBES]
    meta = {r[0]: r for r in a.all_rows}
    base_smp, summ = {}, {}
    for rid in rids:
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
                e["ci"] = eval.percentile_ci(smp)
                if rid == "baseline":
                    base_smp[m] = (point, smp)
                elif m in base_smp:
                    e["vs_baseline"] = {"diff": point - base_smp[m][0],
                                        "p": eval.paired_p_value(smp, base_smp[m][1])}
                for k, rs in ref_smp.items():
                    if m in rs:
                        e[f"vs_{k}"] = {"diff": point - rs[m][0], "p": eval.paired_p_value(smp, rs[m][1]),
                                        "per_seed_p": [eval.paired_p_value(h[1], rs[m][1]) for h in have]}
            else:
                for k, rs in ref_smp.items():
                    if m in rs:
                        e[f"vs_{k}"] = {"diff": point - rs[m][0]}
            row["metrics"][m] = e
        row["targets"] = targets(row, per_seed, ref_smp)
        summ[rid] = row
    return summ


def targets(row, per_seed, ref_smp):
    """The issue's targets at one size, each required of the seed mean AND of every seed alone."""
    checks = {}
    for p in CLS_PROBES + ("dice",):
        e = row["metrics"].get("dice" if p == "dice" else f"{p}/auroc", {}).get("vs_r")
        checks[f"{p} > random"] = bool(e and e["diff"] > 0 and e["p"] is not None and e["p"] < 0.05 and
                                       all(q is not None and q < 0.05 for q in e["per_seed_p"]))
    pix = [(ref_smp["px"][f"{p}/auprc"]) for p in CLS_PROBES if f"{p}/auprc" in ref_smp["px"]]
    if pix:
        best_pt, best_smp = max(pix, key=lambda t: t[0])
        ok = False
        for p in CLS_PROBES:
            hv = [ps[f"{p}/auprc"] for ps in per_seed if f"{p}/auprc" in ps]
            if not hv:
                continue
            smp = np.mean(np.stack([h[1] for h in hv]), 0)
            pv = eval.paired_p_value(smp, best_smp)
            seeds_ok = all(h[0] > best_pt and (eval.paired_p_value(h[1], best_smp) or 1) < 0.05 for h in hv)
            ok |= bool(np.mean([h[0] for h in hv]) > best_pt and pv is not None and pv < 0.05 and seeds_ok)
        checks["AUPRC > best pixel probe"] = ok
    er = row["metrics"].get("erank")
    if er and "vs_r" in er:
        rer = er["mean"] - er["vs_r"]["diff"]
        checks["erank >= random"] = all(v >= rer for v in er["per_seed"])
    return checks


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
         "| row | factor: value | linear AUROC | grid AUROC | attentive AUROC | anatomy Dice | effective "
         "rank | targets met |", "|---|---|---|---|---|---|---|---|"]
    cols = ("linear/auroc", "grid/auroc", "attentive/auroc", "dice")
    for rid, row in summ.items():
        m = row["metrics"]
        er = m.get("erank")
        er_s = "-" if not er else f"{er['mean']:.1f} (" + " / ".join(f"{v:.1f}" for v in er["per_seed"]) + \
            ")" + (f"<br>random {er['mean'] - er['vs_r']['diff']:.1f}" if "vs_r" in er else "")
        t = row["targets"]
        met = f"{sum(t.values())}/{len(t)}" + ("<br>" + ", ".join(k for k, v in t.items() if v)
                                               if any(t.values()) else "")
        L.append(f"| {rid} | {row['factor']}: {row['value']} | " + " | ".join(_cell(m.get(k)) for k in cols) +
                 f" | {er_s} | {met} |")
    for name, b in sorted(baselines.items()):
        ci = {k: f" [{b[k]['ci'][0]:.3f}, {b[k]['ci'][1]:.3f}]" if b[k].get("ci") else ""
              for k in cols if k in b}
        cells = [f"{b[k]['mean']:.3f}{ci[k]}" if k in b else "-" for k in cols]
        er = f"{b['erank']['mean']:.1f}" if "erank" in b else "-"
        L.append(f"| *{name}* | reference | " + " | ".join(cells) + f" | {er} | |")
    L += ["", f"Macro AUPRC at {size} px (the issue's pixel target is on AUPRC):", "",
          "| row | linear | grid | attentive |", "|---|---|---|---|"]
    for rid, row in summ.items():
        L.append(f"| {rid} | " + " | ".join(_cell(row["metrics"].get(f"{p}/auprc")) for p in CLS_PROBES)
                 + " |")
    for name, b in sorted(baselines.items()):
        L.append(f"| *{name}* | " + " | ".join(f"{b[k]['mean']:.3f}" if k in b else "-"
                                               for k in (f"{p}/auprc" for p in CLS_PROBES)) + " |")
    return L + [""]


def _stability_md(a, data, anatomy, resamples, test_rows):
    """Ranking stability: for the rows run at several --steps, Spearman correlation of the rows' scores
    between run lengths (per metric, at the largest probe size). Agreement means the short runs rank the
    factors as longer do."""
    lengths = sorted(int(d[1:]) for d in os.listdir(a.out) if d.startswith("s") and d[1:].isdigit()
                     and os.path.isdir(os.path.join(a.out, d)))
    if len(lengths) < 2:
        return []
    size = max(a.probe_sizes)
    score = {}
    for n in lengths:
        for res in map(_load_result, _result_paths(os.path.join(a.out, f"s{n}"))):
            if res.get("status") == "ok":
                for m, (pt, _) in _run_samples(res, size, data, resamples[:1], test_rows, anatomy).items():
                    score.setdefault((n, m, res["row"]), []).append(pt)
    L = ["", f"## Ranking stability between run lengths (probed at {size} px; rows present at both lengths)",
         "",
         "| metric | " + " | ".join(f"{x} vs {y} steps" for x, y in zip(lengths, lengths[1:])) + " |",
         "|---|" + "---|" * (len(lengths) - 1)]
    for m in [f"{p}/auroc" for p in CLS_PROBES] + ["dice", "erank"]:
        cells = []
        for x, y in zip(lengths, lengths[1:]):
            common = sorted({k[2] for k in score if k[0] == x and k[1] == m}
                            & {k[2] for k in score if k[0] == y and k[1] == m})
            if len(common) < 3:
                cells.append(f"{len(common)} rows (need 3)")
                continue
            u = np.array([np.mean(score[(x, m, r)]) for r in common])
            v = np.array([np.mean(score[(y, m, r)]) for r in common])
            if np.ptp(u) == 0 or np.ptp(v) == 0:
                cells.append(f"all {len(common)} rows tie at one length")
                continue
            rho = float(np.corrcoef(eval.ranks(u), eval.ranks(v))[0, 1])
            cells.append(f"Spearman {rho:+.2f} over {len(common)} rows")
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    return L


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        return ablate(argv)
    except plumbing.BadInput as e:                              # eval.EvalError is one too
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
