"""
RadJEPA in one file: I-JEPA pretraining of a Vision Transformer on chest X-rays.

Paper: "RadJEPA: Radiology Encoder for Chest X-Rays via Joint Embedding Predictive Architecture" (arXiv 2601.15891),
built on I-JEPA (Assran et al., arXiv 2301.08243). One training step, in four lines:
  1. a *target encoder* (an EMA copy of the encoder, no gradients) embeds the whole image -> one feature per patch;
  2. the *encoder* sees only a large "context" block of patches, with every target patch removed;
  3. a narrow *predictor* gets the context features plus learned mask tokens at the positions of 4 target blocks,
     and predicts the target encoder's (layer-normed) features there;
  4. smooth-L1 between prediction and target, backprop into encoder + predictor, EMA the encoder into the target.
No labels, no text, no pixel reconstruction. Why each piece is there is said where it is built: latent targets
(jepa_loss_torch), collapse (ema_update), block sizes (sample_masks), the narrow predictor (Predictor).
Unlike the official code, masks are drawn per image and packed (pack_masks): nothing is truncated to the batch
minimum. Resume is exact (data and schedules are pure functions of the step); torchrun needs no SLURM.

Run:   python radjepa.py --data cxr/                        (a folder of images, or a data_prep.py folder)
       python radjepa.py --data cxr/ --resume               (continue exactly where OUT/ckpt.pt stopped)
       torchrun --nproc_per_node=8 radjepa.py --data cxr/   (DDP; same global batch, same schedules)
       python radjepa.py export OUT/ckpt.pt OUT/timm        (the encoder as a timm VisionTransformer folder)
Import: from radjepa import load_encoder, sample_masks, ViT, Predictor   (importing starts nothing)
"""
import argparse
import io
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------------
# Config: one typed dataclass; argparse is generated from it, so every field is a flag with its help text.

def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- data ---
    data: str = opt("", "folder of images (read recursively: PNG/JPEG/BMP/TIFF, 8/16-bit) or a data_prep.py folder "
                        "(then only its split==train images are used, so probes never see pretraining test images)")
    out: str = opt("out", "output folder: ckpt.pt, log.jsonl, config.json, masks.png, loss.png")
    img_size: int = opt(224, "training resolution (square crops); any multiple of --patch")
    crop_scale: tuple = opt((0.3, 1.0), "random-resized-crop area range (I-JEPA: 0.3 1.0). No flips: laterality matters")
    workers: int = opt(4, "data-loading worker processes (0 = load in the main process)")
    # --- model ---
    model: str = opt("vit_base", "preset: vit_tiny | vit_small | vit_base | vit_large (RadJEPA: vit_base, patch 14)")
    patch: int = opt(14, "patch size in pixels (14 or 16 usually)")
    width: int = opt(768, "encoder width (set by --model unless given)")
    depth: int = opt(12, "encoder depth (set by --model unless given)")
    heads: int = opt(12, "attention heads, encoder and predictor (set by --model unless given)")
    pred_width: int = opt(384, "predictor width: narrow, as in I-JEPA")
    pred_depth: int = opt(6, "predictor depth (set by --model unless given)")
    target_blocks: int = opt(1, "regression target: the target encoder's last block (1, I-JEPA) or the mean of its "
                                "last K blocks' outputs (data2vec-style); layer-normed per token either way")
    # --- multi-block masking (I-JEPA values) ---
    n_targets: int = opt(4, "target blocks per image")
    tgt_scale: tuple = opt((0.15, 0.2), "area of each target block, as a fraction of the patch grid")
    tgt_aspect: tuple = opt((0.75, 1.5), "aspect ratio (height/width) range of target blocks")
    ctx_scale: tuple = opt((0.85, 1.0), "area of the context block before the targets are removed from it")
    min_ctx: int = opt(10, "resample an image's masks when fewer context patches than this remain")
    # --- optimisation: every schedule is a pure function of the step ---
    batch_size: int = opt(128, "GLOBAL batch size (split over torchrun processes)")
    steps: int = opt(10000, "total optimisation steps (schedules are defined over these)")
    warmup: int = opt(500, "linear LR warmup steps, from --start-lr to --lr")
    start_lr: float = opt(2e-4, "LR at step 0")
    lr: float = opt(1e-3, "peak LR, reached after warmup, then cosine decay")
    final_lr: float = opt(1e-6, "LR at the last step")
    wd: float = opt(0.04, "weight decay at step 0 (never applied to biases, norms and other 1-D params)")
    final_wd: float = opt(0.4, "weight decay at the last step (cosine increase, as in I-JEPA)")
    ema: float = opt(0.996, "EMA momentum of the target encoder at step 0")
    final_ema: float = opt(1.0, "EMA momentum at the last step (linear increase)")
    clip: float = opt(0.0, "clip the gradient norm to this (0 = off, as in I-JEPA; V-JEPA uses 10)")
    # --- system ---
    device: str = opt("auto", "auto | cuda | cpu (auto picks cuda when available)")
    precision: str = opt("auto", "auto | bf16 | fp32: bf16 autocast runs the matmuls in bf16 (residual stream, norms, "
                                 "loss and optimizer stay fp32, as in I-JEPA). auto = bf16 on CUDA and on CPUs that "
                                 "multiply bf16 natively (AVX512-BF16/AMX: ~2.6x faster steps), else fp32")
    kernels: str = opt("auto", "auto | torch | triton: attention/gather implementation. auto = Triton on CUDA when it "
                               "imports, else PyTorch. Asking for triton where it cannot run is an error")
    compile: bool = opt(False, "torch.compile the encoder and predictor (dynamic shapes: sequence lengths vary)")
    seed: int = opt(0, "seed for init, data order, augmentation and masks")
    resume: bool = opt(False, "continue from OUT/ckpt.pt: flags you pass override its config, the rest come from it")
    stop_at: int = opt(0, "checkpoint and stop at this step (0 = run to --steps); e.g. to split a run into job slots")
    log_every: int = opt(10, "steps between log lines (and log.jsonl records)")
    ckpt_every: int = opt(500, "steps between checkpoints (one is always written at the end)")
    bench_loader: int = opt(0, "only time the data loader (decode, crop, masks) over this many batches, then exit")


# Presets: (width, depth, heads, predictor depth). Sizes as in the official ViT/I-JEPA code.
PRESETS = {
    "vit_tiny":  dict(width=192, depth=12, heads=3, pred_width=96, pred_depth=6),   # predictor half as wide as the
    "vit_small": dict(width=384, depth=12, heads=6, pred_width=192, pred_depth=6),  # encoder: "narrow" for small ViTs
    "vit_base":  dict(width=768, depth=12, heads=12, pred_depth=6),
    "vit_large": dict(width=1024, depth=24, heads=16, pred_depth=12),
}
# Fields whose change on --resume would not break the run (the others define the model, data or schedules).
RUN_FIELDS = {"data", "out", "workers", "device", "kernels", "compile", "resume", "stop_at", "log_every", "ckpt_every"}
ARCH_FIELDS = ("patch", "width", "depth", "heads", "pred_width", "pred_depth")  # the weights' shapes: fixed on --resume
# Every flag's allowed range, checked by make_config before any work starts: (flags, allowed, test).
RANGES = [("img_size patch width depth heads pred_width pred_depth n_targets min_ctx batch_size steps log_every "
           "ckpt_every", "an integer >= 1", lambda v: v >= 1),
          ("workers warmup stop_at seed", "an integer >= 0", lambda v: v >= 0),
          ("lr start_lr final_lr wd final_wd clip", "a finite number >= 0", lambda v: 0 <= v < math.inf),
          ("ema final_ema", "a number in [0, 1]", lambda v: 0 <= v <= 1),
          ("crop_scale tgt_scale ctx_scale", "LO HI with 0 < LO <= HI <= 1", lambda v: 0 < v[0] <= v[1] <= 1),
          ("tgt_aspect", "LO HI with 0 < LO <= HI (finite)", lambda v: 0 < v[0] <= v[1] < math.inf),
          ("device", "auto, cuda or cpu", lambda v: v in ("auto", "cuda", "cpu")),
          ("precision", "auto, bf16 or fp32", lambda v: v in ("auto", "bf16", "fp32")),
          ("kernels", "auto, torch or triton", lambda v: v in ("auto", "torch", "triton"))]


def parse_args(argv=None):
    """argv -> dict of the flags actually given (field name -> value). `--data cxr/` and `--data=cxr/` both work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="python radjepa.py export CKPT OUT_DIR: the encoder as a timm model folder")
    for f in fields(Config):
        flag, h = "--" + f.name.replace("_", "-"), f.metadata["help"] + f" (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=h)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=float, nargs=2, metavar=("LO", "HI"), help=h)
        else:
            p.add_argument(flag, type=type(f.default), help=h)
    given = vars(p.parse_args(argv))  # SUPPRESS: only the flags actually passed appear here
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def make_config(given, base=None):
    """defaults <- preset of --model <- (checkpoint config on resume) <- flags given on the command line.
    Every value is checked here, before any work starts: a bad one is a one-line ValueError naming the flag."""
    cfg = dict(base) if base else asdict(Config())
    if unknown := sorted(set(cfg) - {f.name for f in fields(Config)}):  # a checkpoint of a newer version
        print(f"warning: ignoring unknown config key(s) {', '.join(unknown)}", file=sys.stderr)
    model = given.get("model", cfg["model"])
    if model not in PRESETS:
        raise ValueError(f"--model {model!r} is not one of {', '.join(PRESETS)}")
    if base is None or "model" in given:
        cfg.update(PRESETS[model])
    cfg.update(given)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k not in unknown})
    for names, allowed, ok in RANGES:
        for k in names.split():
            if not ok(v := getattr(cfg, k)):
                v = " ".join(map(str, v)) if isinstance(v, tuple) else v
                raise ValueError(f"--{k.replace('_', '-')} {v}: must be {allowed}")
    if cfg.stop_at > cfg.steps:
        raise ValueError(f"--stop-at {cfg.stop_at} is beyond --steps {cfg.steps}, where the schedules end")
    if cfg.img_size % cfg.patch:
        raise ValueError(f"--img-size {cfg.img_size} is not a multiple of --patch {cfg.patch}")
    if cfg.width % cfg.heads or cfg.pred_width % cfg.heads or cfg.width % 4 or cfg.pred_width % 4:
        raise ValueError("--width and --pred-width must be multiples of --heads and of 4 (2-D sin-cos)")
    if not 1 <= cfg.target_blocks <= cfg.depth:
        raise ValueError(f"--target-blocks must be between 1 and --depth {cfg.depth}, not {cfg.target_blocks}")
    for s in range(8):  # an impossible masking configuration fails now, on the real grid, not in a worker mid-run
        sample_masks(torch.Generator().manual_seed(s), (cfg.img_size // cfg.patch,) * 2, cfg.n_targets,
                     cfg.tgt_scale, cfg.tgt_aspect, cfg.ctx_scale, cfg.min_ctx)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Packed variable-length sequences. Images keep different numbers of context patches and target blocks differ in
# size, so sequences differ in length. Tokens are stored *packed*: all sequences concatenated into one [T, D] tensor
# (FlashAttention's varlen layout). Linear, LayerNorm and MLP work per token, so packing costs them nothing; only
# attention must know where each sequence starts and ends, and that is all Seqs holds.

class Seqs:
    """Where S packed sequences start and end. Example: lengths [3, 2] pack the 5 tokens a0 a1 a2 b0 b1, and
      cu    = [0, 3, 5]           sequence s is rows cu[s]:cu[s+1] of the packed [T, D] tensor
      slot  = [0, 1, 2, 3, 4]     [T]: each token's place in a padded [S, Lmax] batch, flattened (b0 -> 1*3 + 0)
      valid = [[1, 1, 1],         [S, Lmax]: real slots; the padding slot (1, 2) stays zero and is masked
               [1, 1, 0]]
    attention_torch scatters into the padded batch with slot and gathers back with it; Triton reads cu.
    Built from CPU lengths and copied to the device pinned + non-blocking: no syncs."""

    def __init__(self, lengths, device):
        self.lengths = lengths.tolist() if torch.is_tensor(lengths) else [int(n) for n in lengths]  # CPU: no sync
        self.n, self.max_len = len(self.lengths), max(self.lengths)
        cu = torch.tensor([0] + list(itertools.accumulate(self.lengths)))  # [S+1]
        self.cu = to_device(cu.to(torch.int32), device)
        self.uniform = min(self.lengths) == self.max_len  # all equal (the target encoder): a plain reshape will do
        if not self.uniform and OPS["attention"] is attention_torch:  # the Triton path reads cu only
            j, lens, T = torch.arange(self.max_len), torch.tensor(self.lengths), sum(self.lengths)
            self.valid = to_device(j[None, :] < lens[:, None], device)  # [S, Lmax] which padded slots hold a token
            seq = torch.repeat_interleave(torch.arange(self.n), lens, output_size=T)  # [T] each token's sequence
            self.slot = to_device(seq * self.max_len + torch.arange(T) - cu[seq], device)  # [T] distinct slots


def to_device(t, device):
    """CPU tensor -> device. On CUDA from pinned memory, non-blocking: the host queues the copy and moves on."""
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def attention_torch(q, k, v, seqs):
    """q, k, v [T, H, Dh] packed -> [T, H, Dh]. Each token attends to every token of its own sequence (non-causal)."""
    if q.device.type == "cpu" and q.dtype != torch.float32:  # a CPU's flash attention runs ~2x slower in bf16 than
        with torch.autocast("cpu", enabled=False):  # in fp32 (measured), so under bf16 autocast it gets fp32 here
            return attention_torch(q.float(), k.float(), v.float(), seqs).to(q.dtype)
    T, H, Dh = q.shape
    if seqs.uniform:  # [T, H, Dh] -> [S, L, H, Dh] -> [S, H, L, Dh]
        q, k, v = (t.reshape(seqs.n, seqs.max_len, H, Dh).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(T, H, Dh)
    S, L = seqs.n, seqs.max_len  # pad by scatter (index_copy), unpad by gather (index_select): slots are distinct,
    # so each one's backward is the other, and no accumulating scatter (index_put, slow on CPU) is needed
    def pad(t): return t.new_zeros(S * L, H, Dh).index_copy(0, seqs.slot, t).view(S, L, H, Dh).transpose(1, 2)
    key_mask = seqs.valid[:, None, None, :]  # [S, 1, 1, Lmax]: padded keys get no attention weight
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_mask)  # [S, H, Lmax, Dh]; padded
    return o.transpose(1, 2).reshape(S * L, H, Dh).index_select(0, seqs.slot)  # query rows computed, then dropped


def gather_torch(x, idx, pos):
    """x [B, N, D], idx [T] flat indices into B*N, pos [N, D] -> x.flat[idx] + pos[idx % N]: [T, D]."""
    return x.flatten(0, 1)[idx] + pos[idx % x.shape[1]]


def jepa_loss_torch(z, h, idx):
    """Smooth-L1 between predictions z [R, D] and layer-normed (no affine) target features h.flat[idx].
    Why features, not pixels: no context predicts a block's noise and texture, and a pixel loss spends the model on
    them; the target encoder's features keep what can be predicted (anatomy, layout). I-JEPA, ViT-L/16, ImageNet 1%
    linear probe: 66.9% with these targets, 40.7% with pixel targets. LayerNorm per token keeps the scale fixed."""
    t = F.layer_norm(h.flatten(0, 1)[idx].float(), (h.shape[-1],))  # [R, D]; normalise only the rows we need
    return F.smooth_l1_loss(z.float(), t)


# The three ops that kernels/ accelerates. use_kernels() switches the whole model between the paths. The torch ops
# above are the one definition of the math: with check=..., a kernel op is used only after it reproduced the torch op
# it replaces (fwd and bwd, same random tensors), so an edit here is never silently undone by a stale kernel.
OPS = dict(attention=attention_torch, gather=gather_torch, loss=jepa_loss_torch)


def use_kernels(triton: bool, check=None):
    """check = dict(width=, head_dims=, device=): compare every kernel op with its torch op first (kernels/)."""
    reference = dict(attention=attention_torch, gather=gather_torch, loss=jepa_loss_torch)  # looked up now: a
    OPS.update(reference)  # patched torch op is used; the check below runs the torch ops as the model would
    if triton:
        import kernels
        from kernels.gather import gather_rows, ln_gather_smooth_l1
        from kernels.varlen_attention import varlen_attention
        fast = dict(attention=lambda q, k, v, s: varlen_attention(q, k, v, s.cu, s.max_len), gather=gather_rows,
                    loss=ln_gather_smooth_l1)
        if bad := check and kernels.disagreement(fast, reference, Seqs, **check):
            raise SystemExit(f"error: {bad}")
        OPS.update(fast)


def resolve_kernels(choice, device, head_dims=()):
    """--kernels auto|torch|triton -> bool. Never a silent fallback when triton was asked for."""
    if choice not in ("auto", "torch", "triton"):
        raise SystemExit(f"error: --kernels must be auto, torch or triton, not {choice!r}")
    if choice == "torch":
        return False
    try:
        import kernels
        ok, why = kernels.available(head_dims)  # CUDA present (or TRITON_INTERPRET=1) and these head dims supported
    except (ImportError, AttributeError) as e:
        ok, why = False, f"cannot import kernels/ ({e})"
    if choice == "triton" and not ok:
        raise SystemExit(f"error: --kernels triton cannot run here: {why}. Use --kernels torch (or auto).")
    if device.type == "cuda" and not ok:
        print(f"--kernels auto: using the PyTorch path ({why})")
    return ok and (choice == "triton" or device.type == "cuda")


def resolve_precision(choice, device, triton=False):
    """--precision auto|bf16|fp32 -> "bf16" or "fp32". The Triton interpreter (CPU) computes bf16 wrongly."""
    if choice == "auto":
        try:
            native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                      else torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # an older torch without the probe: stay exact
            native = False
        choice = "bf16" if native and not (triton and device.type == "cpu") else "fp32"
    if choice == "bf16" and triton and device.type == "cpu":
        raise SystemExit("error: --precision bf16 with --kernels triton on a CPU: the Triton interpreter computes "
                         "bf16 wrongly. Use --precision fp32 (or --kernels torch)")
    return choice


# ----------------------------------------------------------------------------------------------------------------
# The Vision Transformer. No CLS token (I-JEPA predicts patch features; pooling happens in the probes).

MEAN, STD = 0.5307, 0.2583  # chest-X-ray pixel statistics (Rad-DINO's); images arrive in [0, 1]


def sincos_pos_embed(gh, gw, dim, ref=None):
    """Fixed 2-D sin-cos position embedding for a gh x gw patch grid -> [gh*gw, dim] (row-major).
    Half the channels encode the row, half the column; each half is [sin(p*w_i), cos(p*w_i)] with w_i = 10000^(-i/k).
    ref = (rh, rw), the grid the model was trained on: positions are scaled to it (p = i * rh / gh), so a 16x16 grid
    of the same film gets the codes the model learned, between its 8x8 training positions, instead of positions
    8..15 it never saw. This is what position-embedding interpolation does, computed exactly, for any grid."""
    k = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float64) / k)  # [k]
    sh, sw = (ref[0] / gh, ref[1] / gw) if ref else (1.0, 1.0)
    rows, cols = torch.meshgrid(torch.arange(gh) * sh, torch.arange(gw) * sw, indexing="ij")
    def enc(p): return torch.cat([torch.sin(p.reshape(-1, 1) * omega), torch.cos(p.reshape(-1, 1) * omega)], 1)
    return torch.cat([enc(rows.double()), enc(cols.double())], 1).float()  # [N, dim]


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)  # qkv bias, as in ViT / I-JEPA
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, seqs, rows=None):  # x [T, D] packed; rows: keep only these outputs (see Block)
        T, D = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.heads, D // self.heads).unbind(1)  # each [T, H, Dh], strided views
        o = OPS["attention"](q, k, v, seqs).reshape(T, D)
        return self.proj(o if rows is None else o[rows])


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). LayerNorm eps 1e-6, MLP ratio 4, GELU."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, seqs, rows=None):
        """rows=None: every token out. rows=[R] indices: only those tokens' outputs [R, D], computed exactly as
        in the full block (every token is still a key and value) but without the projection and MLP of the rest."""
        x = (x if rows is None else x[rows]) + self.attn(self.norm1(x), seqs, rows)
        return x + self.mlp(self.norm2(x))


def init_transformer(module, blocks):
    """trunc_normal(0.02) weights, zero biases; then attn.proj and mlp[2] of block i (1-based) / sqrt(2i), so deep
    residual streams start small. (The official helper undoes this rescale; here it runs last, pinned by a test.)"""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for i, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2 * i))
            blk.mlp[2].weight.div_(math.sqrt(2 * i))


class ViT(nn.Module):
    """Encoder. Input: grayscale images [B, 1, H, W] in [0, 1] (normalised inside). Output: patch tokens."""

    def __init__(self, patch=16, width=768, depth=12, heads=12, ref_grid=None):
        super().__init__()
        self.patch_size, self.embed_dim, self.depth = patch, width, depth
        self.ref_grid = ref_grid  # (gh, gw) at training resolution: other grids are scaled to it (sincos_pos_embed)
        # the training grid's table lives on the device (no per-step build + copy); not saved in checkpoints
        self.register_buffer("pos", sincos_pos_embed(*ref_grid, width) if ref_grid else None, persistent=False)
        self.patch_embed = nn.Conv2d(1, width, kernel_size=patch, stride=patch)  # one channel: X-rays are gray
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        init_transformer(self, self.blocks)

    def forward(self, x, keep=None, seqs=None, n_last_blocks=None):
        """x [B, 1, H, W].
        keep=None:  every patch; returns [B, N, D] (N = H/p * W/p, row-major), or with n_last_blocks=k a list of the
                    last k blocks' outputs, each [B, N, D] through the final norm (for probes).
        keep=[T]:   flat indices into B*N of the context patches, packed per image as described by `seqs`;
                    returns [T, D] packed."""
        B, p = x.shape[0], self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:  # the conv would silently drop the remainder
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}: resize it")
        x = self.patch_embed((x - MEAN) / STD)  # [B, D, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        pos = self.pos if self.ref_grid and (gh, gw) == tuple(self.ref_grid) else sincos_pos_embed(
            gh, gw, self.embed_dim, self.ref_grid).to(x.device)  # [N, D] fp32, added before masking (I-JEPA): under
        # bf16 autocast x + pos is fp32, so the residual stream stays fp32 (only matmul inputs are bf16), as officially
        if keep is None:
            h, seqs = (x + pos).flatten(0, 1), Seqs([gh * gw] * B, x.device)  # [B*N, D], B sequences of N
        else:
            h = OPS["gather"](x, keep, pos)  # [T, D] the kept patches only: every one of them, nothing truncated
        outs = []
        for blk in self.blocks:
            h = blk(h, seqs)
            outs.append(h)
        if keep is not None:
            return self.norm(h)
        if n_last_blocks:
            return [self.norm(o).view(B, gh * gw, -1) for o in outs[-n_last_blocks:]]
        return self.norm(h).view(B, gh * gw, -1)


class Predictor(nn.Module):
    """Narrow ViT that predicts target-encoder features at the target patches from the context features.
    Why narrow (384 wide for a 768-wide ViT-B; half the width for small ViTs): it is thrown away after training, so
    what the targets need should be computed by the encoder, not by a big predictor; its depth helps (I-JEPA,
    ViT-L/16, ImageNet 1%: depth 6 -> 64.0%, 12 -> 66.9%).

    Each target block of each image is its own sequence: [context tokens of that image ; one mask token per target
    patch]. Context tokens carry their encoder features; mask tokens are one learned vector plus the position of the
    patch to predict, so the blocks never see each other. B images x 4 blocks -> 4B packed sequences."""

    def __init__(self, enc_width=768, width=384, depth=6, heads=12, grid=None):
        super().__init__()
        self.width, self.grid = width, tuple(grid) if grid else None
        self.register_buffer("pos", sincos_pos_embed(*grid, width) if grid else None, persistent=False)  # as in ViT
        self.embed = nn.Linear(enc_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))  # 1-D: no weight decay, like biases
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, enc_width)
        init_transformer(self, self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx, mb, grid):
        """ctx [T_ctx, D_enc] packed encoder output; mb = the batch's index tensors (see collate); grid = (gh, gw).
        Returns predictions [T_tgt, D_enc] in the order of mb["tgt_idx"]."""
        N = grid[0] * grid[1]
        pos = self.pos if tuple(grid) == self.grid else sincos_pos_embed(*grid, self.width).to(ctx.device)  # [N, W]
        c = self.embed(ctx) + pos[mb["ctx_idx"] % N]  # [T_ctx, W] context tokens at their positions
        m = self.mask_token + pos[mb["tgt_idx"] % N]  # [T_tgt, W] one mask token per target patch
        # rows 0..T_ctx-1 of cat are context tokens, the rest mask tokens; pred_idx copies image b's context rows
        # into each of its 4 sequences, followed by that block's mask rows (worked example in pack_masks)
        h = torch.cat([c, m])[mb["pred_idx"]]  # [T_pred, W]: the 4B sequences, each [ctx of b ; targets of (b, j)]
        for blk in self.blocks[:-1]:
            h = blk(h, mb["pred_seqs"])
        # only the mask-token outputs are used: the last block gives just those rows (the context rows are still keys
        # and values), which skips about half its work (ViT-T/16 at 224: ~86 context and ~34 target rows per sequence)
        h = self.blocks[-1](h, mb["pred_seqs"], rows=mb["pred_out"])  # [T_tgt, W]
        return self.proj(self.norm(h))  # -> [T_tgt, D_enc]


# ----------------------------------------------------------------------------------------------------------------
# Multi-block masking, one image at a time, as a pure function of a torch.Generator (testable, reproducible).
# Why large blocks: a 15-20% block cannot be filled in from its neighbours' texture; it must be inferred from the
# anatomy around it. Why one big context (85-100% of the image, minus the targets): it must hold enough to infer
# them. I-JEPA (ViT-B/16, ImageNet 1%): multi-block 54.2% vs one 60% target block 20.2, 60% random patches
# 17.6, image quarters 15.5. Fixes to the official sampler: scale and aspect are independent draws; block starts are
# inclusive (every patch row and column can be context and target); sizes are per image, nothing is truncated.

def _block(gen, gh, gw, scale, aspect):
    """A random rectangle of the gh x gw grid: area ~ U(scale) * gh*gw, height/width ~ U(aspect). -> bool [gh, gw]."""
    s, a = (lo + (hi - lo) * torch.rand(1, generator=gen).item() for lo, hi in (scale, aspect))
    h = min(gh, max(1, round(math.sqrt(s * gh * gw * a))))
    w = min(gw, max(1, round(math.sqrt(s * gh * gw / a))))
    top = torch.randint(0, gh - h + 1, (1,), generator=gen).item()  # inclusive: the last row can start a block
    left = torch.randint(0, gw - w + 1, (1,), generator=gen).item()
    m = torch.zeros(gh, gw, dtype=torch.bool)
    m[top:top + h, left:left + w] = True
    return m


def sample_masks(gen, grid, n_targets=4, tgt_scale=(0.15, 0.2), tgt_aspect=(0.75, 1.5), ctx_scale=(0.85, 1.0),
                 min_ctx=10, max_tries=100):
    """-> (ctx [Kc] long, [tgt_1 [K1], ..., tgt_M [KM]] long): sorted flat patch indices (row-major) of one image.
    Targets may overlap each other; the context never contains a target patch."""
    gh, gw = grid
    for _ in range(max_tries):
        tgts = [_block(gen, gh, gw, tgt_scale, tgt_aspect) for _ in range(n_targets)]
        ctx = _block(gen, gh, gw, ctx_scale, (1.0, 1.0))
        for t in tgts:
            ctx &= ~t
        if int(ctx.sum()) >= min_ctx:
            return ctx.flatten().nonzero()[:, 0], [t.flatten().nonzero()[:, 0] for t in tgts]
    raise ValueError(f"masking: no context of >= {min_ctx} patches in {max_tries} draws on a {gh}x{gw} grid; "
                     f"use a larger --img-size, smaller --tgt-scale or --min-ctx")


def pack_masks(masks, N):
    """Per-image masks -> the flat index tensors that the model consumes (all on CPU; moved to device later).
    masks: list over B images of (ctx [Kc], [tgt [Kj]] * M). Sequence s = b*M + j is target block j of image b.
      ctx_idx  [T_ctx]  flat b*N + n of every context patch, image after image (the encoder's packed input)
      tgt_idx  [T_tgt]  flat b*N + n of every target patch, ordered (b, j, n)
      pred_idx [T_pred] rows of cat([ctx tokens (T_ctx), mask tokens (T_tgt)]) forming the predictor's sequences
      pred_out [T_tgt]  where each mask token sits in the packed predictor sequences (its output = the prediction)
    Example: a 2x3 grid (N = 6, patches 0 1 2 / 3 4 5), B = 2 images, M = 2 blocks:
      image 0: ctx [0, 1],    targets [4], [5]     ->  ctx_idx  = [0, 1, 6, 9, 10]    (image 1 is offset by N)
      image 1: ctx [0, 3, 4], targets [1, 2], [5]      tgt_idx  = [4, 5, 7, 8, 11]
      cat([c, m]) rows: 0-1 ctx of image 0, 2-4 ctx of image 1, 5-9 the mask tokens of tgt_idx in order, so
      pred_idx = [0, 1, 5 | 0, 1, 6 | 2, 3, 4, 7, 8 | 2, 3, 4, 9]   (pred_len [3, 3, 5, 4]; | = sequence boundary)
      pred_out = [2, 5, 9, 10, 14]: the positions of 5, 6, 7, 8, 9 above = the predictions, in tgt_idx order."""
    ctx_len = [len(c) for c, _ in masks]
    ctx_start = np.concatenate([[0], np.cumsum(ctx_len)])
    ctx_idx = torch.cat([c + b * N for b, (c, _) in enumerate(masks)])
    tgt_idx, tgt_len, pred_idx, pred_out, pred_len = [], [], [], [], []
    T_ctx, t0, p0 = int(ctx_start[-1]), 0, 0  # t0: tokens of tgt_idx so far; p0: predictor tokens so far
    for b, (_, tgts) in enumerate(masks):
        ctx_rows = torch.arange(ctx_start[b], ctx_start[b + 1])
        for t in tgts:
            k = len(t)
            tgt_idx.append(t + b * N)
            pred_idx += [ctx_rows, T_ctx + t0 + torch.arange(k)]  # [context of b ; mask tokens of this block]
            pred_out.append(p0 + ctx_len[b] + torch.arange(k))
            tgt_len.append(k)
            pred_len.append(ctx_len[b] + k)
            t0, p0 = t0 + k, p0 + ctx_len[b] + k
    return dict(ctx_idx=ctx_idx, tgt_idx=torch.cat(tgt_idx), pred_idx=torch.cat(pred_idx), pred_out=torch.cat(pred_out),
                ctx_len=torch.tensor(ctx_len), tgt_len=torch.tensor(tgt_len), pred_len=torch.tensor(pred_len))


def batch_to(mb, device):
    """Move the index tensors to the device and build the two Seqs (context encoder, predictor)."""
    seqs = dict(ctx_seqs=Seqs(mb["ctx_len"], device), pred_seqs=Seqs(mb["pred_len"], device))  # from CPU lengths
    mb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and "_len" not in k else v for k, v in mb.items()}
    return {**mb, **seqs}


# ----------------------------------------------------------------------------------------------------------------
# Data: chest X-rays as one channel in [0, 1]; random resized crop only (no flips: the heart is on the left).

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class BadImage(Exception):
    pass


def load_image(path):
    """Any PNG/JPEG/BMP/TIFF -> float32 [H, W] in [0, 1]. 16-bit data is scaled by its stored bit depth, inferred
    from the maximum (a 12-bit image in a 16-bit PNG -> / 4095), not by 65535, which would make it nearly black.
    RGB/RGBA -> luminance (alpha dropped: NIH's few RGBA files are opaque). Raises BadImage on anything unreadable."""
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


def list_images(root, out=None):
    """A data_prep.py folder (labels.csv: train split only) or any tree of image files. -> sorted list of paths.
    A labels.csv row that leaves the folder, repeats, or has no train/val/test split stops the run naming the row."""
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {root!r} is not a folder")
    csv_path, paths, seen = os.path.join(root, "labels.csv"), [], set()
    if os.path.exists(csv_path):
        import csv
        raw = open(csv_path, "rb").read()
        try:
            rows = csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
        except UnicodeDecodeError as e:  # (10 = the newline byte)
            raise SystemExit(f"error: {csv_path} line {raw.count(10, 0, e.start) + 1}: not UTF-8 text") from None
        for r in rows:
            img = os.path.normpath(r.get("image") or ".")
            why = ("image path is empty or leaves the folder" if os.path.isabs(img) or img.split(os.sep)[0] in ("..", ".")
                   else "repeats an earlier row" if img in seen
                   else "split must be train, val or test" if r.get("split") not in ("train", "val", "test") else None)
            if why:
                raise SystemExit(f"error: {csv_path} line {rows.line_num}: {why} ({r.get('image')!r}, split "
                                 f"{r.get('split')!r})")
            seen.add(img)
            paths += [os.path.join(root, img)] * (r["split"] == "train")
    else:  # links are followed, but each real folder and file only once: a loop or a link back up adds nothing
        top, found = os.path.realpath(root), {}
        if out and os.path.realpath(out) == top:
            raise SystemExit(f"error: --out {out} is the --data folder: its pictures would become training images")
        seen = {os.path.realpath(out)} if out else set()  # OUT inside the data: its pictures are not data
        for d, dirs, names in os.walk(root, followlinks=True):
            if (real := os.path.realpath(d)) in seen or top.startswith(real + os.sep):
                dirs[:], names = [], []
            seen.add(real)
            for p in (os.path.join(d, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTS):
                found.setdefault(os.path.realpath(p), p)  # the first path of a file wins
        paths = list(found.values())
    if not paths:
        raise SystemExit(f"error: no training images found in {root!r} (extensions: {' '.join(sorted(IMAGE_EXTS))})")
    return sorted(paths)


def random_resized_crop(img, size, scale, rng):
    """img [H, W] -> [size, size]: a random box of area ~ U(scale) * H*W and aspect in [3/4, 4/3] (log-uniform),
    resized bilinearly. Falls back to the whole image after 10 misses. Small images are simply upsampled."""
    H, W = img.shape
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = math.sqrt(area * ar), math.sqrt(area / ar)
        if w <= W and h <= H:
            x0, y0 = rng.uniform(0, W - w), rng.uniform(0, H - h)
            break
    else:
        x0, y0, w, h = 0.0, 0.0, float(W), float(H)
    crop = Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    return np.asarray(crop, dtype=np.float32).clip(0, 1)


def sample_seed(seed, g, stream):
    """Independent seed for global sample number g (augmentation stream 0, masks stream 1)."""
    return int(np.random.SeedSequence([seed, g, stream]).generate_state(1)[0])


class StepBatches(torch.utils.data.Sampler):
    """Yields, for each step from `start` on, this rank's share of the global batch as (image index, g) pairs, where
    g = step * global_batch + i is the sample's global number. Step s always gets the same images, crops and masks,
    whatever the number of processes and whether the run was resumed: data is a pure function of (seed, step)."""

    def __init__(self, n_images, global_batch, seed, start, steps, rank=0, world=1):
        self.n, self.B, self.seed, self.start, self.steps = n_images, global_batch, seed, start, steps
        self.lo, self.hi = rank * global_batch // world, (rank + 1) * global_batch // world
        self._perm = {}

    def image_for(self, g):  # a fresh permutation of the dataset each epoch
        epoch = g // self.n
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perm[epoch][g % self.n])

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield [(self.image_for(step * self.B + i), step * self.B + i) for i in range(self.lo, self.hi)]

    def __len__(self):
        return self.steps - self.start


class CXRDataset(torch.utils.data.Dataset):
    def __init__(self, paths, cfg):
        self.paths, self.cfg = paths, cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):  # key = (image index, global sample number)
        i, g = key
        try:
            img = load_image(self.paths[i])
        except BadImage as e:
            return None, str(e), g  # skipped by the collate; the main process logs it once and counts it
        rng = np.random.default_rng(sample_seed(self.cfg.seed, g, 0))
        return torch.from_numpy(random_resized_crop(img, self.cfg.img_size, self.cfg.crop_scale, rng))[None], None, g


class Collate:
    """Stack the images and sample each image's masks (in the worker processes, off the training loop's path)."""

    def __init__(self, cfg):
        self.cfg, self.grid = cfg, (cfg.img_size // cfg.patch,) * 2

    def masks_for(self, g):  # the masks of global sample g: a pure function of (seed, g)
        c = self.cfg
        return sample_masks(torch.Generator().manual_seed(sample_seed(c.seed, g, 1)), self.grid, c.n_targets,
                            c.tgt_scale, c.tgt_aspect, c.ctx_scale, c.min_ctx)

    def __call__(self, items):
        good = [(x, g) for x, _, g in items if x is not None]
        masks = [self.masks_for(g) for _, g in good]
        mb = pack_masks(masks, self.grid[0] * self.grid[1]) if good else {}
        mb["imgs"] = torch.stack([x for x, _ in good]) if good else None
        mb["bad"] = [err for _, err, _ in items if err is not None]
        return mb


# ----------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step, so resuming means nothing more than "set step".

def lr_at(step, c):
    if step < c.warmup:  # 1) linear warmup start_lr -> lr
        return c.start_lr + (c.lr - c.start_lr) * step / c.warmup
    t = (step - c.warmup) / max(1, c.steps - c.warmup)  # 2) cosine lr -> final_lr over the remaining steps
    return c.final_lr + 0.5 * (c.lr - c.final_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def wd_at(step, c):  # cosine *increase* wd -> final_wd, as in I-JEPA
    return c.final_wd + 0.5 * (c.wd - c.final_wd) * (1 + math.cos(math.pi * min(step / c.steps, 1.0)))


def ema_at(step, c):  # linear ema -> final_ema: the target moves less and less
    return c.ema + (c.final_ema - c.ema) * min(step / c.steps, 1.0)


def target_features(target, imgs, k=1):
    """[B, N, D] what the predictor regresses (the loss then layer-norms each token): the last block's output (k = 1),
    or the mean of the last k blocks' outputs, each through the final norm: more than one level of abstraction."""
    return target(imgs) if k == 1 else torch.stack(target(imgs, n_last_blocks=k)).mean(0)


@torch.no_grad()
def ema_update(target, online, m):
    """target <- m * target + (1 - m) * online, i.e. lerp(target, online, 1 - m).
    Why: trained by the loss too, both encoders could output one constant, loss 0 (collapse). The target gets no
    gradient and trails the encoder, and the predictor makes the two branches asymmetric (as in BYOL): collapse
    becomes avoidable, not impossible, so the log watches std and erank."""
    t, o = list(target.parameters()), list(online.parameters())
    torch._foreach_lerp_(t, o, 1.0 - m)


@torch.no_grad()
def effective_rank(x):
    """RankMe (Garrido et al., 2023): exp(entropy of the normalised singular values) of centred features x [K, D].
    D for isotropic features, 1 for features on a line: it sees dimensional collapse, which target_std cannot."""
    x = x.float()
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: one dict, one file, written atomically (temp file, fsync, rename): killing the process or the machine
# at any moment leaves either the previous checkpoint or the new one, never half of one.

def save_atomic(obj, path):
    """A failed write (disk full, ...) removes its temp file, keeps the previous checkpoint and stops in one line."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f), f.flush(), os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        os.remove(tmp) if os.path.lexists(tmp) else None
        raise SystemExit(f"error: cannot write {path}: {getattr(e, 'strerror', 0) or e}; the previous checkpoint "
                         f"is kept") from None


def claim_out(out):
    """Rank 0, before any work: OUT must be a writable folder that no live run uses (a lock for this run's life; the
    OS drops a dead process's lock, so a stale one is taken over). -> the open lock file, which holds our pid."""
    import fcntl
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f".probe.{os.getpid()}"), "wb") as f:
            f.write(bytes(1 << 16)), f.flush(), os.fsync(f.fileno())
        os.remove(f.name)
        lock = open(os.path.join(out, ".lock"), "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: --out {out} is in use by another run (pid {open(lock.name).read().strip() or '?'}); "
                         f"wait for it to finish or use another --out") from None
    except OSError as e:
        raise SystemExit(f"error: --out {out} is not a writable folder ({e.strerror or e})") from None
    lock.seek(0), lock.truncate(), lock.write(f"{os.getpid()}\n"), lock.flush()
    for f in (f for f in os.listdir(out) if f.startswith("ckpt.pt.tmp.")):  # no live run owns these: we hold the lock
        os.remove(os.path.join(out, f))
    return lock


@contextmanager
def whole_step():
    """Ctrl-C is held until optimizer step, EMA and step counter have all changed: resume never repeats or skips one."""
    hit, hold = [], (signal.getsignal(signal.SIGINT) is signal.default_int_handler
                     and threading.current_thread() is threading.main_thread())  # else Ctrl-C is not ours to hold
    signal.signal(signal.SIGINT, lambda *a: hit.append(a)) if hold else None
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler) if hold else None
    if hit:
        raise KeyboardInterrupt


def rng_state():
    """Global RNG states as tensors and tuples (loadable with weights_only=True); training uses per-sample seeds."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    s = dict(torch=torch.get_rng_state(), numpy=(name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             python=random.getstate())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def read_checkpoint(path):
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types only: no code runs
    except Exception as e:
        raise ValueError(f"{path} is not a RadJEPA checkpoint: cannot be loaded ({type(e).__name__}: {e})") from None
    missing = {"format", "config", "target_encoder"} - set(ck if isinstance(ck, dict) else {})
    if not isinstance(ck, dict) or ck.get("format") != "radjepa-v1" or missing:
        raise ValueError(f"{path} is not a RadJEPA checkpoint: missing {sorted(missing) or 'format marker'}")
    return ck


def load_weights(ck, path, **modules):
    """Checkpoint state dicts -> modules; NaN/Inf weights or shapes that disagree with its config: one-line ValueError."""
    for key, m in modules.items():
        bad = [n for n, t in ck.get(key, {}).items() if torch.is_tensor(t) and not torch.isfinite(t).all()]
        if key not in ck or bad:
            raise ValueError(f"{path} is not a good checkpoint: {key} " + (f"has NaN/Inf weights ({bad[0]})" if bad
                                                                          else "is missing"))
        try:
            m.load_state_dict(ck[key])
        except (RuntimeError, ValueError) as e:  # the last line of PyTorch's message names the first mismatch
            raise ValueError(f"{path}: its {key} does not fit the architecture of its config: "
                             f"{str(e).strip().splitlines()[-1].strip()[:200]}") from None


def build_encoder(c):
    return ViT(c.patch, c.width, c.depth, c.heads, ref_grid=(c.img_size // c.patch,) * 2)


def load_encoder(path, device="cpu", random_init=False, seed=0):
    """The EMA target encoder of a RadJEPA checkpoint, in eval mode, for probes:
    enc(x [B, 1, H, W] in [0, 1]) -> patch tokens [B, N, D]. random_init=True gives the same architecture freshly
    initialised (with `seed`): the baseline every probe result should be compared against."""
    ck = read_checkpoint(path)
    c = make_config({}, ck["config"])
    with torch.random.fork_rng():  # seed the init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        enc = build_encoder(c)
    if not random_init:
        load_weights(ck, path, target_encoder=enc)
    enc.config = asdict(c)
    return enc.to(device).eval().requires_grad_(False)


def export_timm(ckpt_path, out_dir):
    """The EMA target encoder as a folder that timm reads (no timm needed here): pytorch_model.bin, a plain state dict
    with the key names of timm's VisionTransformer(in_chans=1, class_token=False, global_pool="avg", fc_norm=False,
    num_classes=0), and config.json: architecture + model_args (enough to build it) and pretrained_cfg with the input
    size and the one-channel mean/std. Our blocks are timm's (pre-norm, LayerNorm eps 1e-6, exact GELU, qkv laid out
    [3, heads, Dh]), so only names change; the sin-cos table of the training grid becomes pos_embed [1, N, D]. timm
    normalises outside the model: tokens = model.forward_features((x - mean) / std) == load_encoder(ckpt)(x)."""
    ck = read_checkpoint(ckpt_path)
    c, g = make_config({}, ck["config"]), ck["config"]["img_size"] // ck["config"]["patch"]
    sd = {k.replace("patch_embed.", "patch_embed.proj.").replace(".mlp.0.", ".mlp.fc1.")  # only names differ
          .replace(".mlp.2.", ".mlp.fc2."): v.float().contiguous() for k, v in ck["target_encoder"].items()}
    sd["pos_embed"] = sincos_pos_embed(g, g, c.width)[None]  # no class token -> no extra slot: [1, g*g, D]
    args = dict(img_size=c.img_size, patch_size=c.patch, in_chans=1, embed_dim=c.width, depth=c.depth,
                num_heads=c.heads, mlp_ratio=4.0, qkv_bias=True, class_token=False, no_embed_class=True,
                global_pool="avg", fc_norm=False, num_classes=0)
    arch = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 1024: "vit_large_patch16_224"}
    cfg = dict(architecture=arch.get(c.width, "vit_base_patch16_224"), num_classes=0, num_features=c.width,
               global_pool="avg", model_args=args,
               pretrained_cfg=dict(input_size=[1, c.img_size, c.img_size], mean=[MEAN], std=[STD], crop_pct=1.0,
                                   interpolation="bilinear", fixed_input_size=True, num_classes=0),
               radjepa=dict(checkpoint=os.path.abspath(ckpt_path), step=ck.get("step"), config=ck["config"],
                            note="timm interpolates pos_embed at other sizes; radjepa.sincos_pos_embed(gh, gw, D, "
                                 f"ref=({g}, {g})) is the exact table (README: Use the weights elsewhere)"))
    os.makedirs(out_dir, exist_ok=True)
    save_atomic(sd, os.path.join(out_dir, "pytorch_model.bin"))
    tmp = os.path.join(out_dir, f"config.json.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "config.json"))
    return cfg


def export_main(argv):
    p = argparse.ArgumentParser(prog="radjepa.py export", description="the EMA target encoder as a timm "
                                "VisionTransformer folder: pytorch_model.bin (timm key names) + config.json "
                                "(architecture, model_args, input size, mean/std). README: Use the weights elsewhere")
    p.add_argument("ckpt", help="OUT/ckpt.pt written by radjepa.py")
    p.add_argument("out_dir", help="folder to write pytorch_model.bin and config.json into")
    a = p.parse_args(argv)
    try:
        cfg = export_timm(a.ckpt, a.out_dir)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {str(e).splitlines()[0]}")
    print(f"wrote {a.out_dir}/pytorch_model.bin and config.json ({cfg['architecture']} args, "
          f"{cfg['model_args']['img_size']} px, patch {cfg['model_args']['patch_size']})")


# ----------------------------------------------------------------------------------------------------------------
# Training.

def setup_distributed(c):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python radjepa.py` never creates a process group."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    dev = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    rank, world = 0, 1
    if ddp:
        dist.init_process_group(backend="nccl" if dev == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if dev == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if c.batch_size % world:
        raise SystemExit(f"error: --batch-size {c.batch_size} is not divisible by the {world} processes")
    device = torch.device(dev, torch.cuda.current_device()) if dev == "cuda" else torch.device(dev)
    return ddp, rank, world, device


def param_groups(*modules):
    """AdamW groups: weight decay on matrices only; biases, norms, the mask token (all 1-D) are not decayed."""
    ps = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [dict(params=[p for p in ps if p.ndim >= 2], wd_scale=1.0),
            dict(params=[p for p in ps if p.ndim < 2], wd_scale=0.0)]


def train_step(enc, pred, target, opt, mb, grid, m, clip=0.0, autocast=nullcontext(), check=True, target_blocks=1):
    """One optimisation step on a batch already on the device (enc, pred may be DDP-wrapped). Returns the loss (mean
    over all processes), grad norm and target features [B, N, D] as device tensors: nothing here waits for the
    device unless check=True, which raises FloatingPointError on a non-finite loss *before* the weights change."""
    with autocast:
        # Step 1. targets: the EMA encoder sees the full image; no gradients flow here.
        with torch.no_grad():
            h = target_features(target, mb["imgs"], target_blocks)  # [B, N, D]
        # Step 2. predictions: encode the context patches, predict every target patch.
        z = pred(enc(mb["imgs"], mb["ctx_idx"], mb["ctx_seqs"]), mb, grid)  # [T_tgt, D]
        # Step 3. loss on layer-normed target features at the target patches (normalised inside OPS).
        loss = OPS["loss"](z, h, mb["tgt_idx"])
    share, ddp = 1.0, isinstance(enc, nn.parallel.DistributedDataParallel)
    if ddp:  # weight each process's mean by its share of target tokens: the DDP gradient average is then the gradient
        n = torch.tensor([0.0 if "stand_in" in mb else float(len(mb["tgt_idx"]))], device=loss.device)  # of the global
        n_all = n.clone()  # mean (a stand-in batch of an unreadable share weighs nothing)
        dist.all_reduce(n_all)
        share = n * dist.get_world_size() / n_all.clamp_min(1)
    opt.zero_grad(set_to_none=True)
    (loss * share).backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    loss = (loss.detach() * share).reshape(1)
    if ddp:
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    if check and not torch.isfinite(loss).all():  # a sync: cheap insurance against corrupt weights and checkpoints
        raise FloatingPointError(f"loss is {loss.item()}")
    opt.step()
    # Step 4. the target encoder follows the encoder slowly.
    ema_update(target, getattr(enc, "module", enc), m)
    return loss[0], gnorm, h


def train(c: Config):
    ddp, rank, world, device = setup_distributed(c)
    master = rank == 0
    ckpt_path = os.path.join(c.out, "ckpt.pt")
    torch.manual_seed(c.seed)
    grid = (c.img_size // c.patch,) * 2
    encoder = build_encoder(c).to(device)
    predictor = Predictor(c.width, c.pred_width, c.pred_depth, c.heads, grid).to(device)
    target = build_encoder(c).to(device).requires_grad_(False)  # the EMA copy: never trained, never DDP-wrapped
    target.load_state_dict(encoder.state_dict())
    opt = torch.optim.AdamW(param_groups(encoder, predictor), lr=c.lr, betas=(0.9, 0.999), fused=True)  # fused: fast
    step, end = 0, c.stop_at or c.steps
    if c.resume and os.path.exists(ckpt_path):
        try:
            ck = read_checkpoint(ckpt_path)
            load_weights(ck, ckpt_path, encoder=encoder, predictor=predictor, target_encoder=target, optimizer=opt)
        except ValueError as e:
            raise SystemExit(f"error: --resume: {e}") from None
        step = ck["step"]
        set_rng_state(ck["rng"])
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    elif c.resume and master:
        print(f"--resume: no checkpoint at {ckpt_path} yet, starting from scratch")
    if step == c.steps:  # re-running a finished run changes nothing (and succeeds); any other zero-step run fails
        print(f"{ckpt_path} is already at its last step, {step}: nothing to do")
        return encoder, predictor, target
    if step >= end:
        raise SystemExit(f"error: {ckpt_path} is at step {step}, this run ends at step {end}: "
                         f"nothing to train (raise --steps to continue it)")

    head_dims = (c.width // c.heads, c.pred_width // c.heads)
    triton = resolve_kernels(c.kernels, device, head_dims)
    use_kernels(triton, check=dict(width=c.width, head_dims=head_dims, device=device))
    paths = list_images(c.data, c.out)
    sampler = StepBatches(len(paths), c.batch_size, c.seed, step, end, rank, world)
    loader = torch.utils.data.DataLoader(CXRDataset(paths, c), batch_sampler=sampler, collate_fn=Collate(c),
                                         num_workers=c.workers, pin_memory=device.type == "cuda")
    if c.compile:  # in place (Module.compile): state_dict keys stay clean; dynamic: packed lengths vary every step
        for m in (encoder, predictor, target):
            m.compile(dynamic=True)
    enc, pred = encoder, predictor  # we save the raw modules, never the DDP wrappers (no `module.` prefixes)
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        enc, pred = (nn.parallel.DistributedDataParallel(m, device_ids=ids, broadcast_buffers=False)  # buffers:
                     for m in (enc, pred))                                  # constant pos tables, nothing to sync
    precision = resolve_precision(c.precision, device, triton)  # bf16 needs no loss scaler (fp32's exponent range)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def checkpoint(at):
        if master:
            save_atomic(dict(format="radjepa-v1", encoder=encoder.state_dict(), predictor=predictor.state_dict(),
                             target_encoder=target.state_dict(), optimizer=opt.state_dict(), step=at, config=asdict(c),
                             rng=rng_state(), versions=versions()), ckpt_path)

    if master:
        os.makedirs(c.out, exist_ok=True)
        header = dict(type="header", config=asdict(c), versions=versions(), world=world, images=len(paths),
                      kernels="triton" if triton else "torch", precision=precision, start_step=step,
                      params_encoder=sum(p.numel() for p in encoder.parameters()),
                      params_predictor=sum(p.numel() for p in predictor.parameters()))
        with open(os.path.join(c.out, "config.json"), "w") as f:
            json.dump(header, f, indent=2)
        with open(os.path.join(c.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(header) + "\n")
        print(f"RadJEPA | {len(paths)} images | encoder {header['params_encoder'] / 1e6:.1f}M, predictor "
              f"{header['params_predictor'] / 1e6:.1f}M params | {world} process(es) on {device} | kernels: "
              f"{header['kernels']} | {precision} | steps {step}->{end}")
    from tqdm import tqdm
    bar = tqdm(total=end, initial=step, disable=not master, dynamic_ncols=True)
    seen_bad, empty = set(), 0  # unreadable files; batches in a row without an image
    def fresh_stats(): return dict(loss=0.0, ctx=0.0, tgt=0.0, std=0.0, n=0, imgs=0, t0=time.time())  # per log line
    stats = fresh_stats()
    try:
        for mb in loader:
            for err in mb["bad"]:  # unreadable files: warn once each, count them, keep training
                if err not in seen_bad and master:
                    tqdm.write(f"skipping {err}")
                seen_bad.add(err)
            empty = empty + 1 if mb["imgs"] is None else 0
            if empty >= min(10, len(sampler)):  # unreadable data, not bad luck: stop rather than "train" on nothing
                raise SystemExit(f"error: {empty} batches in a row held no readable image ({len(seen_bad)} distinct "
                                 f"unreadable files, listed above); check --data {c.data}")
            if mb["imgs"] is None and not ddp:  # the whole share of this batch was unreadable
                step += 1
                bar.update(1)
                continue
            if mb["imgs"] is None:  # every process must run each step's collectives: a stand-in that weighs nothing
                mb = {**Collate(c)([(torch.zeros(1, c.img_size, c.img_size), None, 0)]), "stand_in": True}
            mb = batch_to(mb, device)
            lr, wd, m = lr_at(step, c), wd_at(step, c), ema_at(step, c)
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = lr, wd * g["wd_scale"]
            # the loss is checked (a device sync) only where we log or checkpoint:
            check = (step + 1) % c.log_every == 0 or (step + 1) % c.ckpt_every == 0 or step + 1 == end
            with whole_step():  # Ctrl-C waits for the step and its count: a checkpoint never holds half a step
                loss, gnorm, h = train_step(enc, pred, target, opt, mb, grid, m, c.clip, autocast, check,
                                            c.target_blocks)
                step += 1
            with torch.no_grad():  # collapse indicator: per-dimension std across the batch of pooled target features
                stats["std"] += h.float().mean(1).std(0).mean() if len(h) > 1 else 0.0
            stats["loss"] += loss  # device tensors: read on log steps only; lengths stay on the CPU (batch_to)
            stats["ctx"] += mb["ctx_len"].numpy().mean()
            stats["tgt"] += mb["tgt_len"].numpy().mean()
            stats["n"], stats["imgs"] = stats["n"] + 1, stats["imgs"] + len(mb["imgs"]) * world
            bar.update(1)
            if master and (step % c.log_every == 0 or step == end):
                n = stats["n"]
                rec = dict(type="train", step=step, loss=float(stats["loss"]) / n, lr=lr, wd=wd, ema=m,
                           grad_norm=float(gnorm), img_per_s=stats["imgs"] / (time.time() - stats["t0"]),
                           ctx_patches=stats["ctx"] / n, tgt_patches=stats["tgt"] / n,
                           target_std=float(stats["std"]) / n, skipped_files=len(seen_bad), time=time.time(),
                           # this step's target tokens, <= 4096 of them: how many directions the features use
                           target_erank=effective_rank(h.reshape(-1, h.shape[-1])[:4096]))
                with open(os.path.join(c.out, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
                tqdm.write(f"step {step:6d} | loss {rec['loss']:.4f} | lr {lr:.2e} | wd {wd:.3f} | ema {m:.4f} | "
                           f"gnorm {rec['grad_norm']:.3f} | {rec['img_per_s']:.1f} img/s | ctx {rec['ctx_patches']:.1f} "
                           f"tgt {rec['tgt_patches']:.1f} | std {rec['target_std']:.3f} | erank {rec['target_erank']:.1f} | "
                           f"skipped {len(seen_bad)}")
                stats = fresh_stats()
            if step % c.ckpt_every == 0:
                checkpoint(step)
    except FloatingPointError as e:
        bar.close()
        raise SystemExit(f"error: {e} at step {step}. Stopping without saving: {ckpt_path} still holds the last good "
                         f"checkpoint. Try a lower --lr, longer --warmup or --clip 1.0.")
    except KeyboardInterrupt:
        if master:
            print(f"\ninterrupted at step {step}: checkpointing so that --resume continues from here")
        checkpoint(step)
        raise
    bar.close()
    checkpoint(step)
    if master:
        plot_log(os.path.join(c.out, "log.jsonl"), os.path.join(c.out, "loss.png"))
        print(f"done: step {step}, checkpoint {ckpt_path}")
    if ddp:  # wait for rank 0's checkpoint and plot: a rank that tears gloo down alone can abort at exit (seen in CI)
        dist.barrier()
        dist.destroy_process_group()
    return encoder, predictor, target


def loader_speed(c):
    """Images/s of the training loader alone, no model: is data loading the bottleneck? (data_prep.py bench)"""
    paths = list_images(c.data)
    dl = torch.utils.data.DataLoader(CXRDataset(paths, c), collate_fn=Collate(c), num_workers=c.workers,
                                     batch_sampler=StepBatches(len(paths), c.batch_size, c.seed, 0, c.bench_loader))
    t0 = time.perf_counter()
    n = sum(len(mb["imgs"]) for mb in dl if mb["imgs"] is not None)
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------
# Pictures and bookkeeping.

def versions():
    from importlib.metadata import PackageNotFoundError, version
    try:
        tv = version("triton")
    except PackageNotFoundError:
        tv = None
    return dict(torch=str(torch.__version__), triton=tv, python=sys.version.split()[0],
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


PLOT_CURVES = (("loss", "loss (smooth-L1, layer-normed features)"), ("target_std", "target_std (across the batch)"),
               ("target_erank", "target_erank (directions used, of the width)"))
LEGEND = [(60, 110, 255), (230, 60, 60), (60, 180, 75), (245, 160, 30), (170, 60, 200), (70, 200, 220)]  # ctx, 5 tgts


def plot_log(log_path, png_path, w=720, ph=170):
    """log.jsonl -> loss.png: one panel per curve, y from 0 with ticks, the step on x. Drawn with PIL alone."""
    recs = [r for r in map(json.loads, open(log_path)) if r.get("type") == "train" or "loss" in r]
    curves = [(k, t) for k, t in PLOT_CURVES if all(k in r for r in recs)]  # old logs lack the newer keys
    if len(recs) < 2:
        return
    im = Image.new("RGB", (w, ph * len(curves)), "white")
    d, x0, x1 = ImageDraw.Draw(im), 60, w - 20
    s0, s1 = recs[0]["step"], recs[-1]["step"]
    def X(s): return x0 + (s - s0) / max(1, s1 - s0) * (x1 - x0)
    for i, (key, title) in enumerate(curves):
        ys, top, bot = [r[key] for r in recs], i * ph + 24, (i + 1) * ph - 30
        hi = max(ys) * 1.05 or 1.0
        def Y(v): return bot - v / hi * (bot - top)
        d.rectangle([x0, top, x1, bot], outline="black")
        d.text((x0, top - 16), f"{title}: {ys[0]:.4g} -> {ys[-1]:.4g}", fill="black")
        for v in np.linspace(0, hi, 5):
            d.line([x0 - 4, Y(v), x0, Y(v)], fill="black")
            d.text((4, Y(v) - 5), f"{v:.3g}", fill="black")
        for st in np.linspace(s0, s1, 6):
            d.line([X(st), bot, X(st), bot + 4], fill="black")
            d.text((X(st) - 10, bot + 6), f"{st:.0f}", fill="black")
        d.text((x0 - 50, bot + 6), "step", fill="black")
        d.line([(X(r["step"]), Y(y)) for r, y in zip(recs, ys)], fill="navy", width=2)
    im.save(png_path + ".tmp.png")  # temp file + rename: a reader never sees half a picture
    os.replace(png_path + ".tmp.png", png_path)


def save_mask_picture(c, paths, png_path, n=4):
    """What the model sees: n training crops (>= 256 px each) with the context (blue) and each target block in its
    own colour, as they are sampled in training; a legend below."""
    ds, col, k, tiles = CXRDataset(paths, c), Collate(c), -(-256 // c.img_size), []  # k: upscale factor (ceil)
    for x, _, g in (ds[(i % len(paths), i)] for i in range(n)):
        if x is None:
            continue
        ctx, tgts = col.masks_for(g)  # exactly the masks this sample gets in training
        rgb = np.repeat(x[0].numpy()[..., None] * 255, 3, -1)
        over, cover = np.zeros(col.grid + (3,)), np.zeros(col.grid)
        for idx, color in [(ctx, LEGEND[0])] + [(t, LEGEND[1 + j % 5]) for j, t in enumerate(tgts)]:
            over.reshape(-1, 3)[idx.numpy()] += color
            cover.reshape(-1)[idx.numpy()] += 1
        over = over / np.maximum(cover, 1)[..., None]
        up = np.kron(over, np.ones((c.patch, c.patch, 1)))
        alpha = np.kron((cover > 0).astype(float), np.ones((c.patch, c.patch)))[..., None] * 0.45
        tiles.append(np.kron((rgb * (1 - alpha) + up * alpha).astype(np.uint8), np.ones((k, k, 1), np.uint8)))
    if not tiles:
        return
    strip = np.concatenate([np.pad(t, ((0, 0), (0, 6), (0, 0)), constant_values=255) for t in tiles], axis=1)
    im = Image.new("RGB", (strip.shape[1], strip.shape[0] + 28), "white")
    im.paste(Image.fromarray(strip))
    d, x = ImageDraw.Draw(im), 4
    names = ["context: what the encoder sees"] + [f"target {j + 1}" for j in range(min(c.n_targets, 5))]
    for color, name in [*zip(LEGEND, names), (None, "uncoloured: neither")]:
        d.rectangle([x, strip.shape[0] + 8, x + 12, strip.shape[0] + 20], fill=color, outline="black")
        d.text((x + 16, strip.shape[0] + 8), name, fill="black")
        x += 28 + 6 * len(name)
    im.save(png_path + ".tmp.png")
    os.replace(png_path + ".tmp.png", png_path)


def main(argv=None):
    given = parse_args(argv)
    base, ck_path = None, os.path.join(given.get("out", Config.out), "ckpt.pt")
    try:
        if given.get("resume") and os.path.exists(ck_path):
            base = read_checkpoint(ck_path)["config"]  # the run's own config; flags given override
            base["stop_at"] = 0  # a stop point belongs to the run that stopped, not to its continuation
        c = make_config(given, base)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if base and (arch := [f"--{k.replace('_', '-')} {getattr(c, k)} (checkpoint: {base.get(k)})"
                          for k in ARCH_FIELDS if getattr(c, k) != base.get(k)]):  # the weights could not load
        raise SystemExit(f"error: --resume with a different architecture: {', '.join(arch)}; drop these flags or use "
                         f"another --out")
    if base and (changed := sorted(k for k in given if k not in RUN_FIELDS and given[k] != base.get(k))):
        print(f"warning: --resume with changed {', '.join(changed)}: the continuation will not match an "
              f"uninterrupted run")
    if not c.data:
        raise SystemExit("error: --data is required (a folder of chest X-rays, or `python data_prep.py synthetic`)")
    if c.bench_loader:
        return print(f"loader: {loader_speed(c):.1f} img/s ({c.workers} workers, {c.img_size} px crops)")
    lock = claim_out(c.out) if int(os.environ.get("RANK", 0)) == 0 else None  # only rank 0 writes
    try:
        if lock and not os.path.exists(os.path.join(c.out, "masks.png")):
            save_mask_picture(c, list_images(c.data, c.out), os.path.join(c.out, "masks.png"))
        return train(c)
    finally:
        if lock:
            lock.close()  # releases the lock


if __name__ == "__main__":
    export_main(sys.argv[2:]) if sys.argv[1:2] == ["export"] else main()
