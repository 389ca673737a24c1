"""
End-to-end training benchmark: whole RadJEPA training steps (radjepa.py's own model, masks and `train_step`) on
random images already on the device, beside an official-style truncation and the official I-JEPA code's own step.

    python -m bench.train_bench --out tb                # CUDA: ViT-B/16 @224 batch 128 and 256, ViT-B/14 @224
    python -m bench.train_bench --smoke --out /tmp/tb   # CPU, tiny model, Triton interpreter: the script runs
    python -m bench.train_bench --device cpu --configs vitt16-b16 --paths torch official --interleave 8 \\
        --out c                                         # CPU side by side: the rows take turns, step by step
    python -m bench.train_bench --device cpu --configs cpu-recipe --paths torch sigreg sigreg-noema \\
        --interleave 4 --steps 5 --out f                # a fork's step cost beside the original's (issue 26)

Paths (--paths):
  torch            radjepa.py --kernels torch: packed tokens; attention pads to the longest sequence (SDPA + key mask)
  torch+fp32       the same in fp32 (the others use radjepa's --precision auto: bf16 on CUDA and on CPUs with native
                   bf16; the official code's autocast is CUDA-only, so on a CPU it runs fp32). Not in the default set
  sigreg           the torch path training examples/lejepa.py's fork (SIGReg, lambda 1, EMA target kept): what a
  sigreg-noema     fork's step costs beside the original's (--no-ema: SIGReg instead of EMA + stop-gradient, the
                   targets encoded with gradients). Not in the default set; their FLOPs are counted as I-JEPA's
  triton           radjepa.py --kernels triton: varlen attention, fused gather and loss (kernels/)
  torch+compile    the same with --compile (Module.compile(dynamic=True) of encoder, predictor and target)
  triton+compile
  truncate         official-style proxy: every context and every target block cut to the batch minimum, as the
                   official collator does (row-major order: the bottom rows go), then radjepa's torch path (no padding)
  official         the official I-JEPA repository's own train step (bench/official_ijepa.py,
                   third_party/ijepa)
Each radjepa row builds the model as `radjepa.train` does and times `radjepa.train_step` on masks drawn by
radjepa's own collate (4 batches of masks, cycled), including the per-step `Batch.to` (index copies, Seqs).
Steps are queued asynchronously, as in training: ms/step = one window of --steps steps after --warmup,
synchronised at both ends.

Useful FLOPs (the tokens each path actually processes; backward = 2 x forward; LN, GELU, softmax, optimizer and
patch-embed backward details not counted):
  block(L, w) = 24 L w^2 + 4 L^2 w             qkv + proj + MLP matmuls, QK^T and PV, one sequence of L tokens
  target      = sum_b [2 N P w + depth block(N, w)]                       forward only, all N patches
  context     = 3 sum_b [2 K_b P w + depth block(K_b, w)]                 K_b context tokens of image b
  predictor   = 3 [sum_b 2 K_b w wp + sum_bj (pdepth block(K_b + T_bj, wp) - 18 K_b wp^2 + 2 T_bj wp w)]
                T_bj: target block j. The -18 K_b wp^2: the last predictor block's projection and MLP run on the
                T_bj target rows only, the only outputs the loss uses (radjepa.Predictor; the official code runs them
                on every row, work that is not useful and so not counted)
  MFU         = (target + context + predictor) / step time / 790 TFLOP/s (dense bf16 GEMM rate measured on this
                workplace's H200, kernels/bench.py). P = patch^2 x channels (1 here, 3 for the official RGB model).

Rows fail soft: on CUDA every run of radjepa rows and every official row runs in a worker process with a per-row
timeout; a row that raises, times out or kills its process records a one-line error and the next row goes on (in a
fresh worker if needed). --budget stops starting rows when the time is spent (they are listed as skipped).
Fault injection for tests: RADJEPA_BENCH_FAULT=<path>:raise|exit makes that path's rows fail.
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone

import plumbing
from bench import out_folder, save_results  # one --out check, one result writer
from kernels.bench import H200_BF16_TFLOPS  # one peak rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> model preset, patch, image size, batch, predictor width x depth (min_ctx: only the tiny grid needs less)
CONFIGS = {
    "vitb16-b128": dict(model="vit_base", patch=16, img_size=224, batch=128, pred_width=384, pred_depth=6),
    "vitb16-b256": dict(model="vit_base", patch=16, img_size=224, batch=256, pred_width=384, pred_depth=6),
    "vitb14-b128": dict(model="vit_base", patch=14, img_size=224, batch=128, pred_width=384, pred_depth=6),
    "vitt16-b16": dict(model="vit_tiny", patch=16, img_size=224, batch=16, pred_width=384, pred_depth=6),
    "smoke": dict(model="vit_tiny", patch=16, img_size=96, batch=4, pred_width=48, pred_depth=1, min_ctx=4),
    # experiment.sh cpu's model and batch (the recipe the SIGReg fork is compared with: the fork paths' step cost)
    "cpu-recipe": dict(model="vit_tiny", depth=6, patch=16, img_size=128, batch=64, pred_width=96, pred_depth=3),
}
PATHS = ["torch", "triton", "truncate", "official", "triton+compile", "torch+compile", "torch+fp32",
         "sigreg", "sigreg-noema"]
DEFAULT_PATHS = PATHS[:-3]
FORK_PATHS = {"sigreg": ["--sigreg-lambda", "1"], "sigreg-noema": ["--no-ema", "--sigreg-lambda", "1"]}  # lejepa flags
FULL_CONFIGS = ["vitb16-b128", "vitb16-b256", "vitb14-b128"]
ROW_TIMEOUT = {"plain": 90.0, "compile": 240.0, "official": 120.0}  # seconds, on CUDA


def kind(path):
    return "official" if path == "official" else "compile" if path.endswith("+compile") else "plain"


# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------

def step_flops(width, depth, pred_width, pred_depth, patch, n_patches, ctx_lens, tgt_lens, channels=1, attention=True,
               patch_embed=True):
    """Useful FLOPs of one training step (formula in the module docstring). ctx_lens: [B] context tokens per image;
    tgt_lens: [B][M] target tokens per block. attention/patch_embed=False leave those terms out (for checks against
    torch's FLOP counter, which does not see the CPU attention kernel)."""
    def block(L, w):
        return 24 * L * w * w + 4 * L * L * w * attention
    P, N, w, wp = patch * patch * channels * patch_embed, n_patches, width, pred_width
    target = sum(2 * N * P * w + depth * block(N, w) for _ in ctx_lens)
    context = 3 * sum(2 * k * P * w + depth * block(k, w) for k in ctx_lens)
    predictor = 3 * sum(2 * k * w * wp + sum(pred_depth * block(k + t, wp) - 18 * k * wp * wp + 2 * t * wp * w
                                             for t in ts)
                        for k, ts in zip(ctx_lens, tgt_lens))
    return dict(target=float(target), context=float(context), predictor=float(predictor),
                total=float(target + context + predictor))


# ----------------------------------------------------------------------------------------------------------------
# radjepa rows
# ----------------------------------------------------------------------------------------------------------------

def truncate_masks(masks):
    """Official-style: every context and every target block cut to the batch minimum (first indices in row-major
    order, as the official collator keeps them)."""
    kc = min(len(c) for c, _ in masks)
    kt = min(len(t) for _, ts in masks for t in ts)
    return [(c[:kc], [t[:kt] for t in ts]) for c, ts in masks]


class RadjepaStepper:
    """One radjepa row: models, optimizer and masks built as radjepa.train builds them; step() = radjepa.train_step."""

    def __init__(self, cfg, path, device, n_mask_batches=4, seed=0):
        import torch

        import kernels
        import radjepa
        self.torch, self.rj, self.device, self.path = torch, radjepa, device, path
        given = dict(model=cfg["model"], patch=cfg["patch"], img_size=cfg["img_size"], batch_size=cfg["batch"],
                     pred_width=cfg["pred_width"], pred_depth=cfg["pred_depth"], seed=seed,
                     min_ctx=cfg.get("min_ctx", 10), kernels="triton" if path.startswith("triton") else "torch",
                     precision="fp32" if path.endswith("+fp32") else "auto")
        if "depth" in cfg:  # a config shallower than its preset (cpu-recipe)
            given["depth"] = cfg["depth"]
        c = self.c = radjepa.make_config(given)
        triton = kernels.resolve_kernels(c.kernels, device, (c.width // c.heads, c.pred_width // c.heads))
        radjepa.use_kernels(triton)
        torch.manual_seed(seed)
        self.encoder = radjepa.build_encoder(c).to(device)
        self.predictor = radjepa.Predictor(c.width, c.pred_width, c.pred_depth, c.heads, c.grid).to(device)
        self.target = radjepa.build_encoder(c).to(device).requires_grad_(False)
        self.target.load_state_dict(self.encoder.state_dict())
        self.opt = torch.optim.AdamW(radjepa.param_groups(self.encoder, self.predictor), lr=1e-4, betas=(0.9, 0.999),
                                     fused=True)  # as radjepa.train
        for g in self.opt.param_groups:
            g["weight_decay"] = 0.04 * g["wd_scale"]
        if path.endswith("+compile"):
            for m in (self.encoder, self.predictor, self.target):
                m.compile(dynamic=True)
        self.precision = kernels.resolve_precision(c.precision, device, triton)  # as radjepa.train
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                         else contextlib.nullcontext())
        self.imgs = torch.rand(c.batch_size, 1, c.img_size, c.img_size, device=device)
        collate = radjepa.Collate(c)
        self.batches, self.ctx_drawn = [], []  # radjepa.Batch on the host, imgs None
        for s in range(n_mask_batches):  # the masks of training steps 0..n-1 (collate's own per-sample seeds)
            masks = [collate.masks_for(s * c.batch_size + i) for i in range(c.batch_size)]
            self.ctx_drawn += [len(m[0]) for m in masks]
            if path == "truncate":
                masks = truncate_masks(masks)
            b = radjepa.pack_masks(masks, c.grid[0] * c.grid[1])
            if device.type == "cuda":  # as the DataLoader delivers them (pin_memory=True); the lengths stay
                b = dataclasses.replace(b, **{k: getattr(b, k).pin_memory()  # plain: read on the host
                                              for k in ("ctx_idx", "tgt_idx", "pred_idx", "pred_out")})
            self.batches.append(b)
        self.i = 0
        self.fork = None  # a fork path: examples/lejepa.py's settings, swapped in around each step only
        if path in FORK_PATHS:
            from examples import lejepa
            self.fork = lejepa.forked, lejepa.split_args(FORK_PATHS[path])[0]

    def step(self):
        b = dataclasses.replace(self.batches[self.i % len(self.batches)], imgs=self.imgs)
        self.i += 1
        b = b.to(self.device)  # per step, as in training: index copies and the two Seqs
        with self.fork[0](self.fork[1]) if self.fork else contextlib.nullcontext():  # --interleave: rows alternate
            return self.rj.train_step(self.encoder, self.predictor, self.target, self.opt, [b], 0.996, 0.0,
                                      self.autocast, check=False)[0]  # one micro-batch (--accum 1): the loss

    def tokens(self):
        """Per image: context tokens encoded, target tokens per block; and the per-step lists for the FLOPs."""
        ctx = [b.ctx_len.tolist() for b in self.batches]
        M = self.c.n_targets
        tgt = [[b.tgt_len.tolist()[i * M:(i + 1) * M] for i in range(len(c))]
               for b, c in zip(self.batches, ctx)]
        return ctx, tgt

    def close(self):
        self.rj.use_kernels(False)


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def finish_row(row, cfg, ms_list, ctx_lists, tgt_lists, device, channels=1, width=None, depth=None):
    """Common row fields from per-step times and the token counts of each mask batch."""
    ms = statistics.median(ms_list) if len(ms_list) > 1 else ms_list[0]
    flops = [step_flops(width, depth, cfg["pred_width"], cfg["pred_depth"], cfg["patch"],
                        (cfg["img_size"] // cfg["patch"]) ** 2, c, t, channels) for c, t in zip(ctx_lists, tgt_lists)]
    mean_flops = {k: statistics.mean(f[k] for f in flops) for k in flops[0]}
    tflops = mean_flops["total"] / (ms * 1e-3) * 1e-12
    n_ctx = [k for c in ctx_lists for k in c]
    n_tgt = [t for ts in tgt_lists for b in ts for t in b]
    row.update(status="ok", ms_per_step=ms, img_per_s=cfg["batch"] / ms * 1e3,
               ctx_tokens=statistics.mean(n_ctx), tgt_tokens_per_block=statistics.mean(n_tgt),
               useful_gflop_per_img=mean_flops["total"] / cfg["batch"] / 1e9,
               flop_share={k: mean_flops[k] / mean_flops["total"] for k in ("target", "context", "predictor")},
               useful_tflops=tflops, mfu=tflops / H200_BF16_TFLOPS if device.type == "cuda" else None)
    return row


def run_radjepa_row(cfg_name, path, device, steps, warmup):
    import torch
    cfg = CONFIGS[cfg_name]
    row = dict(config=cfg_name, path=path, **{k: cfg[k] for k in ("model", "patch", "img_size", "batch")})
    fault(path)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    st = RadjepaStepper(cfg, path, device)
    try:
        for _ in range(warmup):
            st.step()
        sync(device)
        row["warmup_s"] = time.perf_counter() - t0  # includes compilation for +compile rows
        graphs = _graph_count()
        t1 = time.perf_counter()
        for _ in range(steps):
            loss = st.step()
        sync(device)
        ms = (time.perf_counter() - t1) * 1e3 / steps
        row["recompiles_while_timed"] = _graph_count() - graphs
        row["loss"] = float(loss)
        ctx, tgt = st.tokens()
        finish_row(row, cfg, [ms], ctx, tgt, device, width=st.c.width, depth=st.c.depth)
        row["ctx_tokens_drawn"] = statistics.mean(st.ctx_drawn)
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        row["steps"], row["warmup"], row["precision"] = steps, warmup, st.precision
    finally:
        st.close()
        del st
        gc.collect()
    return row


def _graph_count():
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return 0


def fault(path):
    """Test hook (see the module docstring): RADJEPA_BENCH_FAULT=<path>:raise|exit."""
    spec = os.environ.get("RADJEPA_BENCH_FAULT", "")
    if spec.partition(":")[0] == path:
        if spec.endswith(":exit"):
            os._exit(7)  # a hard crash: no exception, no cleanup, like a segfault or a dead CUDA context
        raise RuntimeError(f"injected fault in row {path}")


def run_official_row(cfg_name, device, steps, warmup, repo=None, between=None):
    from bench import official_ijepa
    cfg = CONFIGS[cfg_name]
    row = dict(config=cfg_name, path="official", **{k: cfg[k] for k in ("model", "patch", "img_size", "batch")})
    fault("official")
    r = official_ijepa.run(model=cfg["model"], patch=cfg["patch"], img_size=cfg["img_size"], batch=cfg["batch"],
                           pred_width=cfg["pred_width"], pred_depth=cfg["pred_depth"], steps=steps, warmup=warmup,
                           min_keep=cfg.get("min_ctx", 10), repo=repo, device=device.type, between=between)
    import radjepa
    p = radjepa.PRESETS[cfg["model"]]
    kc, kt, B = round(r["ctx_tokens"]), round(r["tgt_tokens"]), cfg["batch"]
    finish_row(row, cfg, r["ms_per_step_all"], [[kc] * B], [[[kt] * 4] * B], device, channels=3,
               width=p["width"], depth=p["depth"])
    row.update(ctx_tokens=r["ctx_tokens"], tgt_tokens_per_block=r["tgt_tokens"], peak_mem_gb=r["peak_mem_gb"],
               ms_per_step_all=r["ms_per_step_all"],
               ms_per_step_official_csv=r["ms_per_step_csv"], steps=steps, warmup=warmup, dtype=r["dtype"])
    return row


def error_line(e):
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return msg[0][:300] if msg else type(e).__name__


def fatal_cuda(msg):
    return any(s in msg for s in ("illegal memory access", "device-side assert", "CUDA error", "unspecified launch"))


# ----------------------------------------------------------------------------------------------------------------
# Workers (fail soft) and the parent scheduler
# ----------------------------------------------------------------------------------------------------------------

def worker(rows_file, results_file, device_name, steps, warmup, repo):
    """Run rows in order; append {"i", "start"} before and the result after each one (JSON lines, each line
    written in one call)."""
    import torch
    device = torch.device(device_name)
    rows = json.load(open(rows_file))
    for i, (cfg_name, path) in rows:
        plumbing.append_jsonl(results_file, dict(i=i, start=time.time()))
        try:
            if path == "official":
                row = run_official_row(cfg_name, device, steps, warmup, repo)
            else:
                row = run_radjepa_row(cfg_name, path, device, steps, warmup)
        except SystemExit as e:  # radjepa's one-line errors (e.g. --kernels triton cannot run here)
            row = dict(config=cfg_name, path=path, status="error", error=str(e))
        except BaseException as e:  # noqa: BLE001: a row must never take the bench down
            row = dict(config=cfg_name, path=path, status="error", error=error_line(e),
                       where=traceback.format_exc().strip().splitlines()[-3:])
            if device.type == "cuda" and isinstance(e, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
        row["i"] = i
        plumbing.append_jsonl(results_file, row)
        if row["status"] == "error" and fatal_cuda(row["error"]):
            sys.exit(3)  # the CUDA context is gone: the parent restarts a fresh worker for the rest


def read_results(path):
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a crash
    return out


def schedule(jobs, args, device, log):
    """jobs: [(config, path)]. Runs them in worker processes (a run of radjepa rows shares one worker; each official
    row gets its own) and returns one result per job, in order."""
    results = [None] * len(jobs)
    deadline = time.time() + args.budget if args.budget else None
    tmp = tempfile.mkdtemp(prefix="train_bench_")
    i = 0
    while i < len(jobs):
        if deadline and deadline - time.time() < 15:
            break
        group = [i]
        if jobs[i][1] != "official":
            while group[-1] + 1 < len(jobs) and jobs[group[-1] + 1][1] != "official":
                group.append(group[-1] + 1)
        rows_file, res_file = os.path.join(tmp, f"rows{i}.json"), os.path.join(tmp, f"res{i}.jsonl")
        plumbing.write_json(rows_file, [(j, jobs[j]) for j in group])
        cmd = [sys.executable, "-m", "bench.train_bench", "--worker", rows_file, res_file,
               "--device", device.type, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.official_repo:
            cmd += ["--official-repo", args.official_repo]
        env = dict(os.environ)
        if device.type == "cpu":
            env.setdefault("TRITON_INTERPRET", "1")  # triton rows on CPU: the interpreter (smoke only)
        errf = open(os.path.join(tmp, f"err{i}.txt"), "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=errf, stderr=subprocess.STDOUT)
        seen, announced, current, started = set(), set(), None, time.time()
        while True:
            rc = proc.poll()
            for r in read_results(res_file):
                j = r["i"]
                if "start" in r and j not in seen and j not in announced:
                    announced.add(j)
                    current, started = j, time.time()
                    log(f"  [{j + 1}/{len(jobs)}] {jobs[j][0]} {jobs[j][1]} ...")
                elif "status" in r and j not in seen:
                    seen.add(j)
                    r.pop("i")
                    results[j] = r
                    log("      " + row_line(r))
                    current = None
            if rc is not None:
                break
            if current is not None:
                limit = args.row_timeout or ROW_TIMEOUT[kind(jobs[current][1])]
                if deadline:
                    limit = min(limit, deadline - started)
            if current is not None and time.time() - started > limit:
                proc.kill()
                proc.wait()
                results[current] = dict(config=jobs[current][0], path=jobs[current][1], status="error",
                                        error=f"timeout: no result after {limit:.0f} s (row killed)")
                log("      " + row_line(results[current]))
                seen.add(current)
                break
            time.sleep(0.2)
        errf.close()
        unfinished = [j for j in group if results[j] is None]
        if unfinished and rc is not None:  # the worker died: charge its current (or first) row, so we always advance
            j0 = unfinished[0]
            tail = open(os.path.join(tmp, f"err{i}.txt")).read().strip().splitlines()[-1:] or [""]
            what = "during this row" if j0 == current else "before starting this row"
            results[j0] = dict(config=jobs[j0][0], path=jobs[j0][1], status="error",
                               error=f"worker exited with code {rc} {what}: {tail[0][:300]}")
            log("      " + row_line(results[j0]))
        nxt = [j for j in group if results[j] is None]
        i = nxt[0] if nxt else group[-1] + 1
    for j, r in enumerate(results):
        if r is None:
            results[j] = dict(config=jobs[j][0], path=jobs[j][1], status="skipped",
                              error="not started: the time budget (--budget) was spent")
    return results


def interleave(jobs, args, device, log):
    """CPU side by side: every row in this process; after warm-up the rows take turns one step at a time, so that
    the load of other jobs on shared cores hits all rows alike. The official row (if any) drives the turns."""
    import torch
    steppers, times, results = {}, {}, {}
    for j, (cfg_name, path) in enumerate(jobs):
        if path == "official":
            continue
        try:
            fault(path)
            st = RadjepaStepper(CONFIGS[cfg_name], path, device)
            for _ in range(args.warmup):
                st.step()
            steppers[j], times[j] = st, []
        except BaseException as e:  # noqa: BLE001
            results[j] = dict(config=cfg_name, path=path, status="error", error=error_line(e))
    n = args.steps * args.interleave

    def turn():
        for j, st in steppers.items():
            t0 = time.perf_counter()
            st.step()
            times[j].append((time.perf_counter() - t0) * 1e3)

    off = [j for j, (_, p) in enumerate(jobs) if p == "official"]
    if off:
        try:
            results[off[0]] = run_official_row(jobs[off[0]][0], device, n, args.warmup, args.official_repo, turn)
        except BaseException as e:  # noqa: BLE001
            results[off[0]] = dict(config=jobs[off[0]][0], path="official", status="error", error=error_line(e))
    while any(len(t) < n for t in times.values()):
        turn()
    for j, st in steppers.items():
        cfg = CONFIGS[jobs[j][0]]
        row = dict(config=jobs[j][0], path=jobs[j][1], **{k: cfg[k] for k in ("model", "patch", "img_size", "batch")})
        ctx, tgt = st.tokens()
        finish_row(row, cfg, times[j][:n], ctx, tgt, device, width=st.c.width, depth=st.c.depth)
        row.update(ctx_tokens_drawn=statistics.mean(st.ctx_drawn), ms_per_step_all=times[j][:n], steps=n,
                   warmup=args.warmup, peak_mem_gb=None, precision=st.precision)
        results[j] = row
    if args.profile:
        for j, st in steppers.items():
            results[j]["profile"] = profile_steps(st, args.profile)
            log(f"  profile {jobs[j][0]} {jobs[j][1]}: " + ", ".join(
                f"{k} {v:.0%}" for k, v in results[j]["profile"]["share"].items()))
    for st in steppers.values():
        st.close()
    for j in sorted(results):
        log("  " + row_line(results[j]))
    return [results[j] for j in range(len(jobs))]


# what a CPU step's self time is spent on, by op name (torch.profiler); first match wins
PROFILE_GROUPS = [("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
                  ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
                  ("gather/scatter (pad, unpad, pack, repeat)", ("aten::index", "index_put", "aten::cat",
                                                                 "masked_", "aten::gather", "scatter")),
                  ("fill/copy", ("aten::fill_", "aten::copy_", "aten::zero_", "aten::zeros")),
                  ("optimizer + EMA", ("adam", "lerp", "addcdiv", "addcmul", "aten::sqrt", "_foreach")),
                  ("layer norm", ("layer_norm",)), ("gelu", ("gelu",)), ("patch embed (conv)", ("convolution",))]


def profile_steps(st, n):
    """torch.profiler over n steps of one radjepa row -> self-CPU share per group, top ops, and the loader's cost
    per image (PNG decode + random resized crop, masks + pack) measured on 256-px PNGs written to a temp folder."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            st.step()
    wall = (time.perf_counter() - t0) / n
    ops = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in ops) or 1.0
    share = {}
    for name, t in ops:
        g = next((g for g, keys in PROFILE_GROUPS if any(k in name.lower() or k in name for k in keys)), "other")
        share[g] = share.get(g, 0.0) + t / total
    top = sorted(ops, key=lambda x: -x[1])[:12]
    c, B = st.c, st.c.batch_size
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(B):
            paths.append(os.path.join(d, f"{i}.png"))
            plumbing.save_png(paths[-1], np.random.default_rng(i).integers(0, 256, (256, 256), dtype=np.uint8))
        ds, col = st.rj.CXRDataset(paths, c), st.rj.Collate(c)
        t1 = time.perf_counter()
        items = [ds[(i, i)] for i in range(B)]
        t2 = time.perf_counter()
        col(items)
        t3 = time.perf_counter()
    return dict(steps=n, step_ms_profiled=wall * 1e3, share=dict(sorted(share.items(), key=lambda x: -x[1])),
                top_ops=[(k, t / total) for k, t in top], loader_decode_crop_ms_per_img=(t2 - t1) * 1e3 / B,
                loader_masks_pack_ms_per_img=(t3 - t2) * 1e3 / B)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def row_line(r):
    if r["status"] != "ok":
        return f"{r['config']} {r['path']}: {r['status'].upper()} {r.get('error', '')}"
    mem = f" | {r['peak_mem_gb']:.1f} GB" if r.get("peak_mem_gb") else ""
    mfu = f" | MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    return (f"{r['config']} {r['path']}: {r['img_per_s']:.1f} img/s | {r['ms_per_step']:.1f} ms/step | ctx "
            f"{r['ctx_tokens']:.1f} tok/img | {r['useful_tflops']:.2f} TFLOP/s{mfu}{mem}")


def to_markdown(res):
    lines = [f"# End-to-end training benchmark, {res['date']}", "",
             f"machine: {res['machine']} | torch {res['torch']} | triton {res['triton']} | mode: {res['mode']}",
             f"command: `{res['command']}`", ""]
    if res["mode"] == "smoke":
        lines += ["**Smoke run on CPU (tiny model, Triton interpreter): timings are NOT performance numbers.**", ""]
    lines += ["Useful FLOPs: " + res["flops_formula"], "",
              "| config | path | img/s | ms/step | ctx tokens/img (drawn) | tgt tokens/block | GFLOP/img | TFLOP/s | "
              "MFU | peak GB | vs official | vs torch |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['path']} | {r['status']}: {r.get('error', '')[:160]} |"
                         " | | | | | | | | |")
            continue
        ref = {p: next((x for x in res["rows"] if x["config"] == r["config"] and x["path"] == p
                        and x["status"] == "ok"), None) for p in ("official", "torch")}
        rel = [f"{r['img_per_s'] / ref[p]['img_per_s']:.2f}x" if ref[p] else "" for p in ("official", "torch")]
        drawn = f" ({r['ctx_tokens_drawn']:.1f})" if r.get("ctx_tokens_drawn") else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "-"
        prec = f" ({r['precision']})" if r.get("precision") else ""
        lines.append(f"| {r['config']} | {r['path']}{prec} | {r['img_per_s']:.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['ctx_tokens']:.1f}{drawn} | {r['tgt_tokens_per_block']:.1f} | "
                     f"{r['useful_gflop_per_img']:.1f} | {r['useful_tflops']:.2f} | {mfu} | {mem} | {rel[0]} | "
                     f"{rel[1]} |")
    for r in res["rows"]:
        if r.get("profile"):
            pr = r["profile"]
            lines += ["", f"Profile of {r['config']} {r['path']} ({pr['steps']} steps, {pr['step_ms_profiled']:.0f} "
                      f"ms/step under the profiler; loader per image: decode + crop "
                      f"{pr['loader_decode_crop_ms_per_img']:.1f} ms, masks + pack "
                      f"{pr['loader_masks_pack_ms_per_img']:.1f} ms):", "",
                      "| where (self CPU time) | share |", "|---|---:|"]
            lines += [f"| {k} | {100 * v:.1f}% |" for k, v in pr["share"].items()]
            lines += ["", "top ops: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in pr["top_ops"])]
    lines += ["", "Notes: `truncate` and `official` encode fewer context tokens (the batch minimum); their TFLOP/s "
              "count only the tokens they process. `vs official` = img/s ratio at the same config. radjepa rows: every "
              "context token drawn is encoded. Warm-up (incl. compilation) per row is in the JSON (`warmup_s`)."]
    return "\n".join(lines) + "\n"


FLOPS_FORMULA = ("block(L,w) = 24 L w^2 + 4 L^2 w; target = sum_b [2 N P w + depth block(N,w)] (fwd only); context = "
                 "3 sum_b [2 K_b P w + depth block(K_b,w)]; predictor = 3 [sum_b 2 K_b w wp + sum_bj (pdepth "
                 "block(K_b+T_bj, wp) - 18 K_b wp^2 + 2 T_bj wp w)] (the last predictor block's projection and MLP on "
                 "target rows only: the only outputs used); MFU = FLOPs / step time / 790 TFLOP/s (H200 bf16 GEMM, "
                 "measured). P = patch^2 x channels; backward = 2 x forward.")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="folder for train_bench.json and train_bench.md")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model (config 'smoke'), 2 steps, every path")
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                   help=f"model/batch configs (default: {' '.join(FULL_CONFIGS)}; smoke: smoke)")
    p.add_argument("--paths", nargs="+", default=DEFAULT_PATHS, choices=PATHS,
                   help="paths to time (default: all but torch+fp32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--budget", type=float, default=0, help="seconds: start no row after this (0 = no limit)")
    p.add_argument("--row-timeout", type=float, default=0,
                   help="seconds per row (default: 90 plain, 240 compile, 120 official)")
    p.add_argument("--interleave", type=int, default=0, metavar="R",
                   help="CPU side by side: all rows in one process taking turns step by step, R x --steps steps each")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="with --interleave: also profile K steps of each radjepa row (torch.profiler, CPU) and time "
                        "the loader")
    p.add_argument("--official-repo", default=None, help="official I-JEPA checkout (default third_party/ijepa)")
    p.add_argument("--worker", nargs=2, metavar=("ROWS", "RESULTS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.configs is None:
        a.configs = ["smoke"] if a.smoke else FULL_CONFIGS
    if a.steps is None:
        a.steps = 2 if a.smoke else 10
    if a.warmup is None:
        a.warmup = 1 if a.smoke else 3
    if a.smoke and a.device == "auto":
        a.device = "cpu"
    if a.steps < 1 or a.warmup < 0:
        p.error("need --steps >= 1 and --warmup >= 0")
    if not a.worker and not a.out:
        p.error("--out is required")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    import torch
    dev = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    if dev == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernels/ import: triton rows run interpreted
    device = torch.device(dev)
    if a.worker:
        return worker(a.worker[0], a.worker[1], dev, a.steps, a.warmup, a.official_repo)
    out_folder(a.out)  # a file, or a path under one: one line, before any row runs

    def log(msg):
        print(msg, flush=True)

    jobs = [(cf, p) for cf in a.configs for p in a.paths if not (p.endswith("+compile") or p == "official")]
    jobs += [(cf, "official") for cf in a.configs if "official" in a.paths]
    jobs += [(cf, p) for p in ("triton+compile", "torch+compile") for cf in a.configs if p in a.paths]
    log(f"train_bench: {len(jobs)} rows on {dev} ({'interleaved' if a.interleave else 'one worker per run'}), "
        f"{a.warmup} warm-up + {a.steps} timed steps" + (f", budget {a.budget:.0f} s" if a.budget else ""))
    t0 = time.time()
    rows = interleave(jobs, a, device, log) if a.interleave else schedule(jobs, a, device, log)
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    res = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               machine=torch.cuda.get_device_name() if dev == "cuda" else f"CPU {platform.machine()}, "
               f"{torch.get_num_threads()} threads", torch=torch.__version__, triton=tv,
               mode="smoke" if a.smoke else "interleaved" if a.interleave else "full",
               command="python -m bench.train_bench " + " ".join(argv), seconds=time.time() - t0,
               flops_formula=FLOPS_FORMULA, peak_tflops=H200_BF16_TFLOPS, rows=rows)
    save_results(a.out, "train_bench", res, to_markdown)
    return res


if __name__ == "__main__":
    main()
