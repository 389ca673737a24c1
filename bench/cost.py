"""
Cost and memory of a RadJEPA pretraining run, for the paper's setting and for radjepa.py's defaults: useful FLOPs,
GPU-hours on 1, 8 and 64 H100s at a stated MFU, and per-GPU memory by micro-batch and --accum.

    python -m bench.cost --out cost              # the tables, from the activation slope recorded here (~10 s)
    python -m bench.cost --measure --out cost    # measure that slope on this CPU first (~3 min on 2 cores)
    -> cost/cost.json, cost/cost.md (the markdown is printed too)

Settings:
  paper     ViT-B/14 at 224 px (16x16 patches) on ~840K chest X-rays (RadJEPA, arXiv 2601.15891). RadJEPA's batch and
            epochs are unpublished: I-JEPA's recipe stands in, batch 2048 for 300 epochs (123,047 steps) with 40
            epochs of warm-up (../shared/docs/jepa-recipe.md, sections 1 and 2).
  defaults  radjepa.py with no flags: the same model, batch 128, 10,000 steps (1.28M images, 1.5 epochs of 840K).

What each number is (each line of the output says computed, measured or estimated):
  FLOPs     computed: bench/train_bench.py's useful-FLOP formula (`step_flops`, its docstring) on radjepa's own masks
            (`Collate.masks_for` of the first global batch, 2,048 images); per step = batch x per image.
  time      estimated: total useful FLOPs / (GPUs x MFU x 989 TFLOP/s, the H100 SXM dense bf16 peak), at MFU 30% and
            45% (why those: BENCHMARKS.md section 12). Multi-GPU scaling is ASSUMED linear; the all-reduce time per
            step is printed beside the compute time so that the assumption can be judged.
  memory    per GPU = static + (crops + kept target features) x per-GPU batch + activations x micro-batch, where
            per-GPU batch = batch / GPUs and micro-batch = per-GPU batch / --accum (rounded up: radjepa's split).
            static (computed): bytes per parameter of the built models: weights, gradients, AdamW's two states, the
            EMA target, and on CUDA bf16 weight copies (autocast) and DDP's gradient buckets.
            activations (measured on this CPU, then estimated for the GPU): real ViT-B/14 training steps
            (radjepa.train_step on radjepa's masks, micro-batches 2, 4, 8, each in a fresh process) in the CPU's
            precision (fp32 where it has no native bf16): the slope of their peak RSS, and of the bytes autograd
            saves for backward (inside the attention op, and the rest); one forward under bf16 autocast gives the
            bf16 / fp32 ratio of the rest. GPU slope = the rest (the larger of the RSS- and saved-bytes-based
            slopes) x that ratio + what the Triton varlen attention keeps (computed). Without --measure, the
            recorded measurement (RECORDED, below) is used, and the output says so.
            Fits: the estimate is at most 70 GiB of an H100's ~78 GiB (headroom for the CUDA context, NCCL, the
            caching allocator's fragmentation and the CPU-to-GPU transfer of the slope).
"""
import argparse
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone

from bench import out_folder, save_results
from bench.train_bench import step_flops  # the one useful-FLOP formula

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 peak (same die as the H200; ../shared/docs/kernels.md)
GEMM_TFLOPS = 790.0  # the dense bf16 GEMM rate this workplace measured on an H200 (kernels.bench.H200_BF16_TFLOPS)
MFUS = (0.30, 0.45)
GPUS = (1, 8, 64)
GPU_GIB, FIT_GIB = 78.0, 70.0  # what torch sees of an 80 GB H100; what an estimate may use of it
GIB = 2 ** 30
# gradient all-reduce bandwidth per GPU, GB/s (assumed): NVLink within one 8-GPU node, 400 Gb/s InfiniBand per GPU
# across nodes (~45 GB/s achieved). Ring all-reduce moves 2 (N-1)/N x the gradient bytes per GPU.
ALLREDUCE_GBPS = {8: 300.0, 64: 45.0}
DATA_IMAGES = 840_000  # RadJEPA's pretraining images (jepa-recipe.md section 2)
SETTINGS = {
    "paper": dict(given=dict(model="vit_base", patch=14, img_size=224, batch_size=2048), epochs=300,
                  warmup_epochs=40, source="ViT-B/14 @224 and ~840K images: RadJEPA paper; batch 2048 x 300 epochs "
                                           "(40 warm-up): I-JEPA's recipe (RadJEPA's is unpublished)"),
    "defaults": dict(given={}, source="radjepa.py with no flags (steps and batch: its defaults)"),
}
MICRO_BATCHES = (16, 32, 64, 128, 256, 512)
ACCUMS = (1, 2, 4, 8, 16, 32, 64)

# The activation measurement of 2026-12-06 (`python -m bench.cost --measure --out /tmp/cost`), used without --measure.
RECORDED = dict(date="2026-12-06", machine="CPU AMD EPYC, 2 cores, 2 threads", torch="2.13.0+cpu", precision="fp32",
                steps=2, micro_batches=[2, 4, 8], peak_rss=[2618388480, 2937458688, 3931217920],
                rss_built=[2285715456, 2285903872, 2286862336],
                step_s=[[17.2369, 15.5855], [22.784, 21.2568], [32.0692, 29.7847]],
                saved_attention=[144367128, 293949000, 668896000], saved_other=[252440924, 497055196, 1048225636],
                ctx_tokens_mean=117.5714, slope=223038464, intercept=2121508864, max_residual=76204032,
                attention_slope=88323660, other_slope=133368189, ratio_micro=2, bf16_attention=144367128,
                bf16_other=147522648, bf16_ratio=0.5844, seconds=215.452)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and time
# ----------------------------------------------------------------------------------------------------------------

def config(given):
    import radjepa
    return radjepa.make_config(dict(given))


def mask_lengths(c, n_images, first=0):
    """Context tokens per image and target tokens per block, of global samples first..first+n-1 (radjepa's masks)."""
    import radjepa
    col = radjepa.Collate(c)
    masks = [col.masks_for(g) for g in range(first, first + n_images)]
    return [len(ctx) for ctx, _ in masks], [[len(t) for t in ts] for _, ts in masks]


def flops_per_image(c, n_images=2048):
    """Useful FLOPs per image (train_bench.step_flops on the masks of the first n_images global samples; radjepa's
    encoder is gray: 1 channel) -> dict target/context/predictor/total, and the mean token counts."""
    ctx, tgt = mask_lengths(c, n_images)
    f = step_flops(c.width, c.depth, c.pred_width, c.pred_depth, c.patch, c.grid[0] * c.grid[1], ctx, tgt, channels=1)
    out = {k: v / n_images for k, v in f.items()}
    out.update(ctx_tokens=sum(ctx) / n_images, tgt_tokens_per_block=sum(map(sum, tgt)) / n_images / c.n_targets,
               images_sampled=n_images)
    return out


def plan(name, c):
    """Images, steps and epochs of a setting."""
    s = SETTINGS[name]
    if "epochs" in s:
        steps = math.ceil(s["epochs"] * DATA_IMAGES / c.batch_size)
        warmup = round(s["warmup_epochs"] * DATA_IMAGES / c.batch_size)
    else:
        steps, warmup = c.steps, c.warmup
    return dict(batch=c.batch_size, steps=steps, warmup=warmup, images=steps * c.batch_size,
                epochs=steps * c.batch_size / DATA_IMAGES, data_images=DATA_IMAGES)


def gpu_time(total_flops, n_gpus, mfu, peak_tflops=PEAK_TFLOPS):
    """Linear scaling (assumed): wall-clock hours on n_gpus, and GPU-hours (wall-clock x GPUs)."""
    wall_h = total_flops / (n_gpus * mfu * peak_tflops * 1e12) / 3600
    return dict(wall_h=wall_h, gpu_h=wall_h * n_gpus)


def allreduce_ms(grad_bytes, n_gpus):
    """Ring all-reduce of the fp32 gradients once per step (DDP; --accum all-reduces once), at ALLREDUCE_GBPS."""
    if n_gpus == 1:
        return 0.0
    bw = ALLREDUCE_GBPS[8 if n_gpus <= 8 else 64]
    return 2 * (n_gpus - 1) / n_gpus * grad_bytes / (bw * 1e9) * 1e3


# ----------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------

def build_models(c, device="meta"):
    """Encoder, predictor and EMA target as radjepa.train builds them (on the meta device: shapes and dtypes only)."""
    import torch

    import radjepa
    with torch.device(device):
        enc = radjepa.build_encoder(c)
        pred = radjepa.Predictor(c.width, c.pred_width, c.pred_depth, c.heads, c.grid)
        tgt = radjepa.build_encoder(c).requires_grad_(False)
    return enc, pred, tgt


def static_bytes(c, world=1, cuda_bf16=True):
    """Bytes that do not depend on the batch, counted from the built models. -> dict part -> (bytes, bytes/param
    of the trained parameters, what it is)."""
    enc, pred, tgt = build_models(c)
    trained = [p for m in (enc, pred) for p in m.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trained)
    w = sum(p.numel() * p.element_size() for p in trained)
    parts = {
        "weights": (w, "encoder + predictor, fp32"),
        "gradients": (w, "one per trained weight, fp32 (set to None between steps; all present at the last backward)"),
        "AdamW states": (2 * w + 4 * len(trained), "exp_avg + exp_avg_sq in the weight's dtype, + a step count each "
                                                  "(fused AdamW)"),
        "EMA target": (sum(p.numel() * p.element_size() for p in tgt.parameters()), "a full encoder, fp32, no grads"),
        "buffers": (sum(b.numel() * b.element_size() for m in (enc, pred, tgt) for b in m.buffers()),
                    "sin-cos position tables"),
    }
    if cuda_bf16:
        parts["bf16 weight copies"] = (2 * n, "autocast's cached casts of the trained weights, alive until backward")
    if world > 1:
        parts["DDP gradient buckets"] = (w, "radjepa's DDP keeps its own bucket copy of the gradients")
    return {k: dict(bytes=b, per_param=b / n, what=what) for k, (b, what) in parts.items()}, n


def per_image_kept(c):
    """Bytes per image of the per-GPU batch kept for the whole step (whatever --accum): the crop (radjepa.train moves
    all micro-batches to the device at once) and the target features h (train_step keeps every micro-batch's for
    the collapse statistics: fp32, as layer norm runs in fp32 under autocast; torch.cat copies them once more at
    the end of the step)."""
    return dict(crop=c.img_size ** 2 * 4, targets=c.grid[0] * c.grid[1] * c.width * 4)


def peak_bytes(static, kept, act_per_img, per_gpu_batch, accum):
    """Peak per-GPU bytes: the larger of (last micro-batch's forward/backward) and (the end-of-step torch.cat)."""
    micro = math.ceil(per_gpu_batch / accum)
    during = static + per_gpu_batch * (kept["crop"] + kept["targets"]) + micro * act_per_img
    at_end = static + per_gpu_batch * (kept["crop"] + 2 * kept["targets"])
    return max(during, at_end), micro


def memory_rows(c, act_per_img, batch, gpus=GPUS, accums=ACCUMS, fit_gib=FIT_GIB):
    """Per (GPUs, --accum): per-GPU batch, micro-batch, estimated peak GiB, fits. Accums that leave an empty
    micro-batch are skipped."""
    kept, rows = per_image_kept(c), []
    for n in gpus:
        static = sum(p["bytes"] for p in static_bytes(c, n)[0].values())
        per_gpu = math.ceil(batch / n)
        for k in accums:
            if k > per_gpu:
                break
            b, micro = peak_bytes(static, kept, act_per_img, per_gpu, k)
            rows.append(dict(gpus=n, per_gpu_batch=per_gpu, accum=k, micro_batch=micro, peak_gib=b / GIB,
                             fits=b / GIB <= fit_gib))
    return rows


def smallest_fitting(rows):
    """(GPUs) -> the first row that fits (smallest --accum), or None."""
    out = {}
    for r in rows:
        if r["fits"] and r["gpus"] not in out:
            out[r["gpus"]] = r
    return out


# ----------------------------------------------------------------------------------------------------------------
# The measurement (--measure): each micro-batch in a fresh process
# ----------------------------------------------------------------------------------------------------------------

class SavedBytes:
    """Bytes of the tensors autograd saves for backward, each storage once, leaving out the weights and tensors
    made only from one weight (autocast's bf16 copies, transposes): what scales with the batch. Split in two:
    what is saved inside radjepa.OPS["attention"] (wrapped by `attention`), and everything else."""

    def __init__(self, modules):
        import torch
        self.torch, self.seen, self.bucket = torch, {}, "other"
        self.params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}

    def attention(self, op):
        def wrapped(*args):
            before, self.bucket = self.bucket, "attention"
            try:
                return op(*args)
            finally:
                self.bucket = before
        return wrapped

    def from_weight(self, t):
        if t.is_leaf:
            return t.requires_grad
        fn = t.grad_fn
        while fn is not None:
            if type(fn).__name__ == "AccumulateGrad":
                return t.numel() == fn.variable.numel()
            nxt = [f for f, _ in fn.next_functions if f is not None]
            fn = nxt[0] if len(nxt) == 1 else None
        return False

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.params and not self.from_weight(t):
            self.seen.setdefault(s.data_ptr(), (s.nbytes(), self.bucket))
        return t

    def __enter__(self):
        self.hooks = self.torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def total(self, bucket):
        return sum(n for n, b in self.seen.values() if b == bucket)


def worker(spec):
    """One measurement in this (fresh) process. spec: given (radjepa flags), micro, steps, precision, mode:
    'step': real training steps (radjepa.train_step, one micro-batch), peak RSS after each; the saved bytes of the
            first step's forward;
    'saved': one forward (target, encoder, predictor, loss) under `precision`, its saved bytes."""
    import torch

    import radjepa
    c = radjepa.make_config({**spec["given"], "batch_size": spec["micro"]})
    radjepa.use_kernels(False)  # the torch path: the only one a CPU runs at speed
    torch.manual_seed(0)
    enc, pred, tgt = build_models(c, "cpu")
    tgt.load_state_dict(enc.state_dict())
    ac = torch.autocast("cpu", torch.bfloat16) if spec["precision"] == "bf16" else contextlib.nullcontext()
    col, N, B = radjepa.Collate(c), c.grid[0] * c.grid[1], spec["micro"]
    imgs = torch.rand(B, 1, c.img_size, c.img_size)

    def batch(s):  # the masks of step s's global samples, as the loader packs them
        b = radjepa.pack_masks([col.masks_for(s * B + i) for i in range(B)], N)
        b.imgs = imgs
        return b.to(torch.device("cpu"))

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    out = dict(micro=B, precision=spec["precision"], threads=torch.get_num_threads())
    sb = SavedBytes((enc, pred))
    # (this process only; radjepa.Seqs checks `OPS["attention"] is attention_torch`, so both are the wrapper)
    radjepa.attention_torch = radjepa.OPS["attention"] = sb.attention(radjepa.attention_torch)
    if spec["mode"] == "saved":
        b, t0 = batch(0), time.perf_counter()
        with sb, ac:
            with torch.no_grad():
                h = radjepa.target_features(tgt, b.imgs)
            radjepa.OPS["loss"](pred(enc(b.imgs, b.ctx_idx, b.ctx_seqs), b), h, b.tgt_idx)
        out.update(saved_attention=sb.total("attention"), saved_other=sb.total("other"),
                   ctx_tokens=b.ctx_len.tolist(), seconds=time.perf_counter() - t0)
        return out
    opt = torch.optim.AdamW(radjepa.param_groups(enc, pred), lr=1e-4, fused=True)  # as radjepa.train
    for p in (p for m in (enc, pred) for p in m.parameters()):  # AdamW's states exist from the start, as in
        p.grad = torch.zeros_like(p)  # every step after the first
    opt.step()
    out.update(rss_built=rss(), rss_after_step=[], step_s=[], ctx_tokens=[])
    for s in range(spec["steps"]):
        b, t0 = batch(s), time.perf_counter()
        with sb if s == 0 else contextlib.nullcontext():
            radjepa.train_step(enc, pred, tgt, opt, [b], 0.996, 0.0, ac, check=False)
        out["step_s"].append(time.perf_counter() - t0)
        out["rss_after_step"].append(rss())
        out["ctx_tokens"] += b.ctx_len.tolist()
        if s == 0:
            out.update(saved_attention=sb.total("attention"), saved_other=sb.total("other"))
    out["peak_rss"] = rss()
    return out


def run_worker(spec, timeout=900):
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    p = subprocess.run([sys.executable, "-m", "bench.cost", "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("COST_WORKER ")]
    if p.returncode or not lines:
        raise SystemExit(f"error: the measurement of micro-batch {spec['micro']} failed (exit {p.returncode}): "
                         + (p.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1][len("COST_WORKER "):])


def fit_line(xs, ys):
    """Least squares y = a + b x -> (b, a, largest |residual|)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return b, a, max(abs(y - a - b * x) for x, y in zip(xs, ys))


def measure(given, micro_batches=(2, 4, 8), steps=2, log=print):
    """The activation slope on this CPU: fresh processes, peak RSS of real training steps per micro-batch and the
    bytes saved for backward (inside the attention op, and the rest), lines fitted through them; and the bf16 /
    CPU-precision ratio of the saved bytes outside the attention (one forward at the smallest micro-batch, the same
    masks). The attention is left out of that ratio: on a CPU radjepa's torch path runs it in fp32 even under bf16
    autocast, and on CUDA the Triton kernel saves other tensors (attention_saved_gpu)."""
    import torch

    import kernels
    prec = kernels.resolve_precision("auto", torch.device("cpu"))
    t0, runs = time.perf_counter(), []
    for mb in micro_batches:
        runs.append(run_worker(dict(given=given, micro=mb, steps=steps, precision=prec, mode="step")))
        r = runs[-1]
        log(f"  micro-batch {mb} ({prec}): peak RSS {r['peak_rss'] / GIB:.3f} GiB, steps "
            + ", ".join(f"{s:.1f}" for s in r["step_s"]) + f" s, saved for backward "
            f"{r['saved_attention'] / 2**20:.0f} MiB in the attention + {r['saved_other'] / 2**20:.0f} MiB else "
            f"({time.perf_counter() - t0:.0f} s so far)")
    xs = [r["micro"] for r in runs]
    slope, intercept, resid = fit_line(xs, [r["peak_rss"] for r in runs])
    ref = runs[0]
    if prec == "bf16":
        bf16 = dict(saved_attention=ref["saved_attention"], saved_other=ref["saved_other"])
    else:
        bf16 = run_worker(dict(given=given, micro=ref["micro"], steps=1, precision="bf16", mode="saved"))
        log(f"  micro-batch {ref['micro']} (bf16 autocast, one forward): saved for backward "
            f"{bf16['saved_attention'] / 2**20:.0f} MiB in the attention (run in fp32 on a CPU) + "
            f"{bf16['saved_other'] / 2**20:.0f} MiB else ({time.perf_counter() - t0:.0f} s so far)")
    ctx = [k for r in runs for k in r["ctx_tokens"][:r["micro"]]]
    return dict(date=datetime.now(timezone.utc).date().isoformat(), machine=machine(), torch=torch.__version__,
                precision=prec, steps=steps, micro_batches=xs, peak_rss=[r["peak_rss"] for r in runs],
                rss_built=[r["rss_built"] for r in runs], step_s=[r["step_s"] for r in runs],
                saved_attention=[r["saved_attention"] for r in runs], saved_other=[r["saved_other"] for r in runs],
                ctx_tokens_mean=sum(ctx) / len(ctx), slope=slope, intercept=intercept, max_residual=resid,
                attention_slope=fit_line(xs, [r["saved_attention"] for r in runs])[0],
                other_slope=fit_line(xs, [r["saved_other"] for r in runs])[0],
                ratio_micro=ref["micro"], bf16_attention=bf16["saved_attention"], bf16_other=bf16["saved_other"],
                bf16_ratio=bf16["saved_other"] / ref["saved_other"], seconds=time.perf_counter() - t0)


def attention_saved_gpu(c, ctx_tokens, tgt_tokens_per_block):
    """Bytes per image the Triton varlen attention (--kernels auto on CUDA) keeps for backward under bf16, beyond
    what the rest of the block keeps (computed): per token and block, the qkv output (q, k, v are views of it) in
    bf16 and the fp32 log-sum-exp per head; its output o is the projection's saved input, counted with the rest.
    Every image: ctx tokens x encoder depth + n_targets sequences of (ctx + target) tokens x predictor depth."""
    enc = ctx_tokens * c.depth * (3 * c.width * 2 + 4 * c.heads)
    pred = c.n_targets * (ctx_tokens + tgt_tokens_per_block) * c.pred_depth * (3 * c.pred_width * 2 + 4 * c.heads)
    return enc + pred


def gpu_slope(m, c, ctx_tokens, tgt_tokens_per_block):
    """The GPU's bytes per image of the micro-batch (estimated) from a measurement m. Outside the attention, the
    larger of: the peak-RSS slope less what is kept per image of the whole step (crop, targets: the same bytes on a
    GPU) and less the CPU attention's saved bytes; and the saved-bytes slope of the rest (what an allocator that
    counts allocations, not touched pages, holds); times the bf16 ratio. Plus what the Triton attention saves
    (attention_saved_gpu). -> dict(total, rest, attention, rest_rss, rest_saved) (the last two in the CPU's
    precision)."""
    kept = per_image_kept(c)
    rest_rss = m["slope"] - kept["crop"] - kept["targets"] - m["attention_slope"]
    rest = max(rest_rss, m["other_slope"]) * m["bf16_ratio"]
    attn = attention_saved_gpu(c, ctx_tokens, tgt_tokens_per_block)
    return dict(total=rest + attn, rest=rest, attention=attn, rest_rss=rest_rss, rest_saved=m["other_slope"])


def machine():
    import torch
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------------------------
# The result and its markdown
# ----------------------------------------------------------------------------------------------------------------

def launch(n, batch, accum, steps, warmup):
    flags = f"--data DATA --out OUT --batch-size {batch} --accum {accum} --steps {steps} --warmup {warmup}"
    if n == 1:
        return f"python radjepa.py {flags}"
    if n <= 8:
        return f"torchrun --nproc_per_node={n} radjepa.py {flags}"
    return (f"torchrun --nnodes {n // 8} --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint NODE0:29500 "
            f"--rdzv-id RUN radjepa.py {flags}")


def build(m, measured_now, n_flops_images=2048, mfus=MFUS, gpus=GPUS):
    settings = {}
    for name, s in SETTINGS.items():
        c = config(s["given"])
        p, f = plan(name, c), flops_per_image(c, n_flops_images)
        static, n_params = static_bytes(c, 1)
        static_ddp, _ = static_bytes(c, 2)
        act_parts = gpu_slope(m, c, f["ctx_tokens"], f["tgt_tokens_per_block"])
        act = act_parts["total"]
        rows = memory_rows(c, act, c.batch_size, gpus)
        fit = smallest_fitting(rows)
        per_step = f["total"] * c.batch_size
        grad_bytes = static["gradients"]["bytes"]
        times = []
        for n in gpus:
            k = fit[n]["accum"] if n in fit else None
            for mfu in mfus:
                t = gpu_time(per_step * p["steps"], n, mfu)
                compute_ms = per_step / n / (mfu * PEAK_TFLOPS * 1e12) * 1e3
                times.append(dict(gpus=n, mfu=mfu, **t, compute_ms_per_step=compute_ms,
                                  allreduce_ms_per_step=allreduce_ms(grad_bytes, n),
                                  command=launch(n, c.batch_size, k or 0, p["steps"], p["warmup"])))
        kept = per_image_kept(c)
        by_micro = [dict(micro_batch=mb, activations_gib=mb * act / GIB,
                         peak_gib_1gpu=peak_bytes(sum(v["bytes"] for v in static.values()), kept, act, mb, 1)[0] / GIB,
                         peak_gib_ddp=peak_bytes(sum(v["bytes"] for v in static_ddp.values()), kept, act, mb, 1)[0]
                         / GIB) for mb in MICRO_BATCHES]
        settings[name] = dict(source=s["source"], model=c.model, patch=c.patch, img_size=c.img_size, grid=c.grid,
                              width=c.width, depth=c.depth, pred_width=c.pred_width, pred_depth=c.pred_depth,
                              params_trained=n_params, plan=p, flops_per_image=f, flops_per_step=per_step,
                              flops_per_epoch=f["total"] * DATA_IMAGES, flops_total=per_step * p["steps"],
                              time=times, static=static, static_ddp=static_ddp, kept_per_image=kept,
                              act_per_image_gpu=act, act_parts_gpu=act_parts, memory_by_micro=by_micro, memory=rows,
                              smallest_fitting={str(k): v for k, v in fit.items()})
    return dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), peak_tflops=PEAK_TFLOPS,
                gemm_tflops=GEMM_TFLOPS, mfus=list(mfus), gpus=list(gpus), gpu_gib=GPU_GIB, fit_gib=FIT_GIB,
                allreduce_gbps=ALLREDUCE_GBPS, measurement=m, measured_now=measured_now, settings=settings)


def hours(h):
    return f"{h:,.1f} h" if h >= 1 else f"{60 * h:.0f} min" if h * 60 >= 1 else f"{3600 * h:.0f} s"


def to_markdown(res):
    m, S = res["measurement"], res["settings"]
    mfus = res["mfus"]
    when = "measured in this run" if res["measured_now"] else (
        f"the RECORDED measurement of {m['date']} (bench/cost.py); rerun with --measure to measure again")
    L = [f"# Cost and memory of RadJEPA pretraining, {res['date']}", "",
         f"command: `{res['command']}`  |  machine: {res['machine']}  |  torch {res['torch']}", "",
         "Kinds: **computed** (exact arithmetic on the built models and radjepa's own masks), **measured** (on this "
         "CPU), **estimated** (an H100 number: no GPU has run this code).", ""]
    L += ["## Settings", "", "| setting | model | px (patch grid) | images seen | batch | steps (warm-up) | epochs of "
          "840K | source |", "|---|---|---|---:|---:|---:|---:|---|"]
    for name, s in S.items():
        p = s["plan"]
        L.append(f"| {name} | {s['model']}/{s['patch']} ({s['params_trained'] / 1e6:.1f}M trained params) | "
                 f"{s['img_size']} ({s['grid'][0]}x{s['grid'][1]}) | {p['images'] / 1e6:,.1f}M | {p['batch']} | "
                 f"{p['steps']:,} ({p['warmup']:,}) | {p['epochs']:.1f} | {s['source']} |")
    L += ["", "## Useful FLOPs (computed: bench/train_bench.py's formula on radjepa's masks of the first 2,048 "
          "images)", "",
          "| setting | ctx tokens / tgt tokens per block | GFLOP/img: target + context + predictor = total | "
          "TFLOP/step | PFLOP/epoch | EFLOP total |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in S.items():
        f = s["flops_per_image"]
        L.append(f"| {name} | {f['ctx_tokens']:.1f} / {f['tgt_tokens_per_block']:.1f} | {f['target'] / 1e9:.1f} + "
                 f"{f['context'] / 1e9:.1f} + {f['predictor'] / 1e9:.1f} = **{f['total'] / 1e9:.1f}** | "
                 f"{s['flops_per_step'] / 1e12:.1f} | {s['flops_per_epoch'] / 1e15:.1f} | "
                 f"{s['flops_total'] / 1e18:.2f} |")
    peak, gemm = res["peak_tflops"], res["gemm_tflops"]
    pct = ", ".join(f"{100 * u:.0f}%" for u in mfus)
    rate = ", ".join(f"{u * peak:.0f}" for u in mfus)
    of_gemm = ", ".join(f"{100 * u * peak / gemm:.0f}%" for u in mfus)
    L += ["", f"## Time on H100s (estimated: MFU = useful FLOPs / time / {res['peak_tflops']:.0f} TFLOP/s dense bf16 "
          f"peak; {pct} = {rate} TFLOP/s = {of_gemm} of the {res['gemm_tflops']:.0f} TFLOP/s GEMM rate measured on "
          "an H200; linear scaling assumed)", "",
          "| setting | GPUs | " + " | ".join(f"MFU {100 * u:.0f}%: wall-clock / GPU-hours" for u in mfus)
          + f" | compute ms/step per GPU ({' - '.join(pct.split(', '))}) | all-reduce ms/step | wall-clock at "
          f"{100 * mfus[-1]:.0f}% if the all-reduce does not overlap | command |",
          "|---|---:|" + "---:|" * len(mfus) + "---:|---:|---:|---|"]
    for name, s in S.items():
        for n in res["gpus"]:
            ts = [t for t in s["time"] if t["gpus"] == n]
            no_overlap = s["plan"]["steps"] * (ts[-1]["compute_ms_per_step"] + ts[-1]["allreduce_ms_per_step"]) / 3.6e6
            L.append(f"| {name} | {n} | " + " | ".join(
                f"{hours(t['wall_h'])} / {t['gpu_h']:,.{1 if t['gpu_h'] >= 1 else 2}f}" for t in ts)
                     + " | " + " - ".join(f"{t['compute_ms_per_step']:.0f}" for t in ts) + " | "
                     f"{ts[0]['allreduce_ms_per_step']:.0f} | "
                     f"{hours(no_overlap)} | `{ts[0]['command']}` |")
    L += ["", "All-reduce: fp32 gradients once per step (ring, 2(N-1)/N x the bytes), at "
          + ", ".join(f"{v:.0f} GB/s per GPU for {'<= 8 GPUs (NVLink)' if k == 8 else 'more (InfiniBand)'}"
                      for k, v in res["allreduce_gbps"].items())
          + " (assumed); DDP overlaps it with the backward, about 2/3 of the compute. Where it approaches the "
          "compute time, the linear line is optimistic: the truth lies between it and the no-overlap column. "
          "The --accum of each command is the smallest that fits (memory, below).",
          "", "Images per second per GPU at MFU " + ", ".join(f"{100 * u:.0f}%" for u in mfus) + ": "
          + ", ".join(f"{u * peak * 1e12 / S['paper']['flops_per_image']['total']:,.0f}" for u in mfus)
          + " (computed); radjepa's loader gives ~320 img/s per worker process on prepared 256-px PNGs (BENCHMARKS.md "
          "section 3), so the estimates assume about " + ", ".join(
              f"{math.ceil(u * peak * 1e12 / S['paper']['flops_per_image']['total'] / 320)}" for u in mfus)
          + " loader workers (CPU cores) per GPU.", ""]
    s = S["paper"]
    static, ddp = s["static"], s["static_ddp"]
    L += ["## Memory per GPU (ViT-B/14 at 224 px: both settings)", "",
          "Static (computed from the built models; bytes per trained parameter):", "",
          "| part | bytes/param | GiB | what |", "|---|---:|---:|---|"]
    for k, v in ddp.items():
        L.append(f"| {k} | {v['per_param']:.2f} | {v['bytes'] / GIB:.3f} | {v['what']} |")
    L.append(f"| **total, 1 GPU / DDP** | {sum(v['per_param'] for v in static.values()):.2f} / "
             f"{sum(v['per_param'] for v in ddp.values()):.2f} | {sum(v['bytes'] for v in static.values()) / GIB:.2f}"
             f" / {sum(v['bytes'] for v in ddp.values()) / GIB:.2f} | |")
    kept, a = s["kept_per_image"], s["act_parts_gpu"]
    L += ["", f"Per image of the per-GPU batch, kept for the whole step whatever --accum (computed): crop "
          f"{kept['crop'] / 2**20:.2f} MiB + target features {kept['targets'] / 2**20:.2f} MiB (fp32; copied once "
          f"more by the end-of-step torch.cat).", "",
          f"Per image of the micro-batch, activations ({when}):", "",
          f"* **measured** on {m['machine']}, torch {m['torch']}, {m['precision']} (this CPU has "
          f"{'native' if m['precision'] == 'bf16' else 'no native'} bf16), radjepa's torch path, "
          f"{m['steps']} steps per micro-batch in a fresh process: peak RSS "
          + ", ".join(f"{r / GIB:.3f}" for r in m["peak_rss"]) + " GiB at micro-batches "
          + ", ".join(map(str, m["micro_batches"])) + f" -> **{m['slope'] / 2**20:.1f} MiB/image** (+ "
          f"{m['intercept'] / GIB:.2f} GiB; largest residual {m['max_residual'] / 2**20:.0f} MiB); mean context "
          f"{m['ctx_tokens_mean']:.1f} tokens/image (the 2,048-image mean is "
          f"{s['flops_per_image']['ctx_tokens']:.1f}); {m['seconds']:.0f} s in all; step times "
          + "; ".join(", ".join(f"{t:.1f}" for t in ts) for ts in m["step_s"]) + " s.",
          "* **measured**: bytes autograd saves for backward (weights and their bf16 copies left out), first step: "
          "inside the attention op " + ", ".join(f"{x / 2**20:.0f}" for x in m["saved_attention"]) + " MiB, the "
          "rest " + ", ".join(f"{x / 2**20:.0f}" for x in m["saved_other"])
          + f" MiB -> {m['attention_slope'] / 2**20:.1f} + {m['other_slope'] / 2**20:.1f} MiB/image. At micro-batch "
          f"{m['ratio_micro']} under bf16 autocast (one "
          f"forward) the rest is {m['bf16_other'] / 2**20:.0f} MiB: ratio **{m['bf16_ratio']:.3f}** (the CPU's torch "
          f"path runs the attention in fp32 even under autocast: left out of the ratio).",
          f"* **estimated** for an H100 (bf16 autocast, `--kernels auto` = Triton varlen attention): outside the "
          f"attention, the larger of the RSS slope less kept and attention ({m['slope'] / 2**20:.1f} - "
          f"{(kept['crop'] + kept['targets']) / 2**20:.2f} - {m['attention_slope'] / 2**20:.1f} = "
          f"{a['rest_rss'] / 2**20:.1f}) and the saved bytes ({a['rest_saved'] / 2**20:.1f}; the CUDA allocator "
          "counts allocations, RSS only touched pages: likely the CPU attention's zero padding, never written), "
          f"x {m['bf16_ratio']:.3f} = {a['rest'] / 2**20:.1f}; + "
          f"{a['attention'] / 2**20:.1f} the Triton attention keeps (computed: bf16 qkv + fp32 log-sum-exp per "
          f"token and block) = **{s['act_per_image_gpu'] / 2**20:.1f} MiB/image**. Assumes autograd saves the same "
          "tensors outside the attention on CUDA as on this CPU, and that backward's transients (one block's "
          "gradients at a time) fit in the headroom. `--kernels torch` on CUDA pads each micro-batch's sequences "
          "to the longest (x1.4-1.5 at micro-batch 256) and needs more.",
          "",
          f"By micro-batch (estimated; accum 1, per-GPU batch = micro-batch; fits = at most {res['fit_gib']:.0f} of "
          f"~{res['gpu_gib']:.0f} GiB):", "",
          "| micro-batch | activations GiB | peak GiB, 1 GPU | peak GiB, DDP |", "|---:|---:|---:|---:|"]
    for r in s["memory_by_micro"]:
        L.append(f"| {r['micro_batch']} | {r['activations_gib']:.1f} | {r['peak_gib_1gpu']:.1f} | "
                 f"{r['peak_gib_ddp']:.1f} |")
    L += ["", "By GPUs and --accum (estimated; the smallest --accum that fits in bold):", "",
          "| setting | GPUs | per-GPU batch | --accum | micro-batch | peak GiB | fits |",
          "|---|---:|---:|---:|---:|---:|---|"]
    for name, s in S.items():
        best = {int(k): v["accum"] for k, v in s["smallest_fitting"].items()}
        for r in s["memory"]:
            if best.get(r["gpus"]) is not None and r["accum"] > best[r["gpus"]]:
                continue  # rows past the smallest fitting --accum add nothing
            b = "**" if best.get(r["gpus"]) == r["accum"] else ""
            L.append(f"| {name} | {r['gpus']} | {r['per_gpu_batch']} | {b}{r['accum']}{b} | {r['micro_batch']} | "
                     f"{r['peak_gib']:.1f} | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="folder for cost.json and cost.md")
    p.add_argument("--measure", action="store_true",
                   help="measure the activation slope on this CPU first (~3 min on 2 cores; else the recorded one)")
    p.add_argument("--micro-batches", nargs="+", type=int, default=[2, 4, 8], help="with --measure (default 2 4 8)")
    p.add_argument("--steps", type=int, default=2, help="with --measure: training steps per micro-batch (default 2)")
    p.add_argument("--flops-images", type=int, default=2048, help="images whose masks give the mean FLOPs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not a.worker and not a.out:
        p.error("--out is required")
    if a.measure and (len(set(a.micro_batches)) < 2 or min(a.micro_batches) < 1 or a.steps < 1):
        p.error("--measure needs two or more distinct --micro-batches >= 1 and --steps >= 1")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.worker:
        print("COST_WORKER " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return None
    out_folder(a.out)  # a bad --out: one line, before the measurement
    import torch
    if a.measure:
        print(f"measuring the activation slope: ViT-B/14 at 224 px, micro-batches {a.micro_batches}, "
              f"{a.steps} steps each, fresh processes", flush=True)
        m = measure(SETTINGS["paper"]["given"], a.micro_batches, a.steps)
    elif RECORDED is None:
        raise SystemExit("error: no recorded measurement in bench/cost.py: run with --measure")
    else:
        m = RECORDED
    res = build(m, a.measure, a.flops_images)
    res.update(command="python -m bench.cost " + " ".join(argv), machine=machine(), torch=torch.__version__)
    save_results(a.out, "cost", res, to_markdown)
    return res


if __name__ == "__main__":
    main()
