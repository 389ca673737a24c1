"""
RadJEPA in one file: I-JEPA pretraining of a Vision Transformer on chest X-rays.

Paper: "RadJEPA: Radiology Encoder for Chest X-Rays via Joint Embedding Predictive Architecture"
(arXiv 2601.15891), built on I-JEPA (Assran et al., arXiv 2301.08243). One training step:
  1. a *target encoder* (an EMA copy of the encoder, no gradients) embeds the whole image;
  2. the *encoder* sees only a large "context" block of patches, every target patch removed;
  3. a narrow *predictor* predicts the target encoder's (layer-normed) features at 4 target blocks;
  4. smooth-L1 between prediction and target; backprop; EMA the encoder into the target.
No labels, no text, no pixels to reconstruct; masks are per image and packed (nothing truncated).
Where the rest lives: plumbing.py (files, locks, images, checks, pictures, export), kernels/
(Triton, --kernels), eval.py (probes), data_prep.py (datasets), bench/ (measurements).

Run: python radjepa.py --data cxr/ [--resume] (or torchrun ... radjepa.py); --help for every flag;
python radjepa.py export OUT/ckpt.pt DIR (a timm model). Import: from radjepa import load_encoder
"""
import itertools
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

if __package__:  # installed (pip install): this is radjepa.radjepa, beside radjepa.plumbing ...
    from . import kernels, plumbing
else:            # a clone: `python radjepa.py`, or `import radjepa` from the repository root
    import kernels
    import plumbing
BadInput, BadImage, load_image = plumbing.BadInput, plumbing.BadImage, plumbing.load_image
list_images, read_checkpoint = plumbing.list_images, plumbing.read_checkpoint
resolve_kernels, resolve_precision = kernels.resolve_kernels, kernels.resolve_precision

# -------------------------------------------------------------------------------------------------
# Config: one typed dataclass; the command line is generated from it (every field is a --flag).

def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- data ---
    data: str = opt("", "images (PNG/JPEG/BMP/TIFF, any tree) or a data_prep.py folder (train)")
    out: str = opt("out", "output folder: ckpt.pt, log.jsonl, config.json, masks.png, loss.png")
    img_size: int = opt(224, "training resolution (square crops); a multiple of --patch")
    crop_scale: tuple = opt((0.3, 1.0), "random-resized-crop area range (no flips: laterality)")
    workers: int = opt(4, "data-loading worker processes (0 = load in the main process)")
    # --- model ---
    model: str = opt("vit_base", "vit_tiny | vit_small | vit_base | vit_large (paper: vit_base/14)")
    patch: int = opt(14, "patch size in pixels")
    width: int = opt(768, "encoder width (set by --model unless given)")
    depth: int = opt(12, "encoder depth (set by --model unless given)")
    heads: int = opt(12, "attention heads, encoder and predictor (set by --model unless given)")
    pred_width: int = opt(384, "predictor width: narrow, as in I-JEPA")
    pred_depth: int = opt(6, "predictor depth (set by --model unless given)")
    target_blocks: int = opt(1, "targets: mean of the target encoder's last K blocks (I-JEPA: 1)")
    # --- multi-block masking (I-JEPA's values) ---
    n_targets: int = opt(4, "target blocks per image")
    tgt_scale: tuple = opt((0.15, 0.2), "area of each target block, a fraction of the patch grid")
    tgt_aspect: tuple = opt((0.75, 1.5), "aspect ratio (height/width) range of target blocks")
    ctx_scale: tuple = opt((0.85, 1.0), "area of the context block before the targets are removed")
    min_ctx: int = opt(10, "resample an image's masks when fewer context patches remain")
    # --- optimisation: every schedule is a pure function of the step ---
    batch_size: int = opt(128, "GLOBAL batch size (split over torchrun processes and --accum)")
    accum: int = opt(1, "micro-batches per optimizer step: the same batch and run in less memory")
    steps: int = opt(10000, "total optimisation steps (the schedules are defined over these)")
    warmup: int = opt(500, "linear LR warmup steps, from --start-lr to --lr")
    start_lr: float = opt(2e-4, "LR at step 0")
    lr: float = opt(1e-3, "peak LR, reached after warmup, then cosine decay")
    final_lr: float = opt(1e-6, "LR at the last step")
    wd: float = opt(0.04, "weight decay at step 0 (never on biases, norms and other 1-D params)")
    final_wd: float = opt(0.4, "weight decay at the last step (cosine increase, as in I-JEPA)")
    ema: float = opt(0.996, "EMA momentum of the target encoder at step 0")
    final_ema: float = opt(1.0, "EMA momentum at the last step (linear increase)")
    clip: float = opt(0.0, "clip the gradient norm to this (0 = off, as in I-JEPA)")
    # --- system ---
    device: str = opt("auto", "auto | cuda | cpu (auto picks cuda when available)")
    precision: str = opt("auto", "auto | bf16 | fp32: bf16 autocast, matmuls only. auto = bf16 on "
                                 "CUDA and on CPUs with native bf16 (~2.6x faster), else fp32")
    kernels: str = opt("auto", "auto | torch | triton (kernels/); auto: Triton on CUDA, else torch")
    compile: bool = opt(False, "torch.compile encoder and predictor (dynamic shapes: lengths vary)")
    seed: int = opt(0, "seed for init, data order, augmentation and masks")
    resume: bool = opt(False, "continue from OUT/ckpt.pt: flags given override its config")
    restart: bool = opt(False, "start over in an --out that holds a run: its files are replaced")
    stop_at: int = opt(0, "checkpoint and stop at this step (0 = run to --steps): job slots")
    log_every: int = opt(10, "steps between log lines (and log.jsonl records)")
    probe_every: int = opt(-1, "online probe every N steps: val macro AUROC of a closed-form ridge "
                               "head on target features (-1: 10 per run, and step 0; 0: off)")
    probe_data: str = opt("", "labelled prepared folder for the online probe (default: --data)")
    probe_images: int = opt(512, "train-split images of the online probe (val: half as many)")
    threads: int = opt(0, "CPU threads of torch (0: one per core; on a busy CPU fewer are faster)")
    ckpt_every: int = opt(500, "steps between checkpoints (one is always written at the end)")
    bench_loader: int = opt(0, "only time the data loader over this many batches, then exit")

    @property
    def grid(self):  # the patch grid of a training crop: (rows, columns)
        return (self.img_size // self.patch,) * 2


# Presets: sizes as in the official ViT/I-JEPA code; the predictor is half as wide for small ViTs.
PRESETS = {"vit_tiny": dict(width=192, depth=12, heads=3, pred_width=96, pred_depth=6),
           "vit_small": dict(width=384, depth=12, heads=6, pred_width=192, pred_depth=6),
           "vit_base": dict(width=768, depth=12, heads=12, pred_depth=6),
           "vit_large": dict(width=1024, depth=24, heads=16, pred_depth=12)}
# Fields that --resume may change without changing the run; ARCH_FIELDS fix the weights' shapes.
RUN_FIELDS = {"data", "out", "workers", "device", "kernels", "compile", "resume", "restart",
              "stop_at", "log_every", "ckpt_every", "accum", "probe_every", "probe_data",
              "probe_images", "threads"}
ARCH_FIELDS = ("patch", "width", "depth", "heads", "pred_width", "pred_depth")


def parse_args(argv=None):
    """argv -> dict of the flags actually given (field name -> value)."""
    return plumbing.parse_dataclass_flags(Config, argv, __doc__.split("\n\n")[0].strip(),
                                          "python radjepa.py export CKPT OUT: the encoder for timm")


def make_config(given, base=None):
    """defaults <- preset of --model <- (a checkpoint's config) <- the flags given. Every value is
    checked here, before any work: a bad one is a one-line BadInput (a ValueError) naming it."""
    cfg = asdict(Config())  # a checkpoint's config: keys of a newer version are dropped (a warning)
    cfg.update(plumbing.check_types(Config, base, "its config") if base else {})
    model = given.get("model", cfg["model"])
    if model not in PRESETS:
        raise BadInput(f"--model {model!r} is not one of {', '.join(PRESETS)}")
    if not base or "model" in given:
        cfg.update(PRESETS[model])
    return plumbing.check_config(Config(**{**cfg, **given}))  # ranges, flags that must agree


def check_masking(c):
    """Before training: an impossible masking setting fails now, not in a worker mid-run, and so
    does a rarely possible one (< 20% of draws: 100 tries per image can all fail in a long run)."""
    def masks(s, tries):  # one image's masks, from seed s
        return sample_masks(torch.Generator().manual_seed(s), c.grid, c.n_targets, c.tgt_scale,
                            c.tgt_aspect, c.ctx_scale, c.min_ctx, tries)
    for s in range(8):
        masks(s, 100)
    if (ok := sum(plumbing.succeeds(masks, s, 1) for s in range(100))) < 20:
        raise BadInput(f"masking: only {ok} of 100 draws leave >= {c.min_ctx} context patches on a "
                       f"{c.grid[0]}x{c.grid[1]} grid (a long run would fail mid-way); use a "
                       f"larger --img-size, smaller --tgt-scale or --min-ctx")


# -------------------------------------------------------------------------------------------------
# The model: a Vision Transformer on *packed* tokens. Per-image context sizes and target blocks
# differ, so sequences are concatenated into one [T, D] tensor (FlashAttention's varlen layout);
# only attention needs their boundaries (Seqs). Attention and gather run OPS (defined by the loss).

class Seqs:
    """Where S packed sequences start and end. Lengths [3, 2] pack the tokens a0 a1 a2 b0 b1:
      cu    = [0, 3, 5]          sequence s is rows cu[s]:cu[s+1] of the packed [T, D] tensor
      slot  = [0, 1, 2, 3, 4]    [T] each token's place in a padded [S, Lmax] batch (b0 -> 1*3+0)
      valid = [[1, 1, 1],        [S, Lmax] real slots; the padding slot (1, 2) is masked out
               [1, 1, 0]]
    attention_torch pads with slot/valid; Triton reads cu only. Built from CPU lengths: no sync."""

    def __init__(self, lengths, device):
        self.lengths = lengths.tolist() if torch.is_tensor(lengths) else [int(n) for n in lengths]
        self.n, self.max_len = len(self.lengths), max(self.lengths)
        pin = torch.device(device).type == "cuda"  # then copied pinned, non-blocking: no waiting
        def to_device(t): return (t.pin_memory() if pin else t).to(device, non_blocking=pin)
        cu = torch.tensor([0] + list(itertools.accumulate(self.lengths)))  # [S+1]
        self.cu = to_device(cu.to(torch.int32))
        self.uniform = min(self.lengths) == self.max_len  # all equal: a reshape will do
        if not self.uniform and OPS["attention"] is attention_torch:
            j, lens, T = torch.arange(self.max_len), torch.tensor(self.lengths), sum(self.lengths)
            self.valid = to_device(j[None, :] < lens[:, None])  # [S, Lmax]
            seq = torch.repeat_interleave(torch.arange(self.n), lens, output_size=T)  # [T]
            self.slot = to_device(seq * self.max_len + torch.arange(T) - cu[seq])  # [T]


def attention_torch(q, k, v, seqs):
    """q, k, v [T, H, Dh] packed -> [T, H, Dh]: each token attends to all tokens of its sequence."""
    if q.device.type == "cpu" and q.dtype != torch.float32:  # CPU flash attention is ~2x slower
        with torch.autocast("cpu", enabled=False):          # in bf16 than in fp32 (measured)
            return attention_torch(q.float(), k.float(), v.float(), seqs).to(q.dtype)
    T, H, Dh = q.shape
    if seqs.uniform:  # [T, H, Dh] -> [S, L, H, Dh] -> [S, H, L, Dh]
        q, k, v = (t.reshape(seqs.n, seqs.max_len, H, Dh).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(T, H, Dh)
    # pad by index_copy, unpad by index_select: the slots are distinct, so each one's backward is
    # the other (no accumulating scatter, which is slow on a CPU)
    S, L = seqs.n, seqs.max_len
    def pad(t): return t.new_zeros(S * L, H, Dh).index_copy(0, seqs.slot, t).view(S, L, H, Dh)
    q, k, v = (pad(t).transpose(1, 2) for t in (q, k, v))  # [S, H, Lmax, Dh]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=seqs.valid[:, None, None, :])
    return o.transpose(1, 2).reshape(S * L, H, Dh).index_select(0, seqs.slot)  # drop the padding


def gather_torch(x, idx, pos):
    """x [B, N, D], idx [T] flat indices into B*N, pos [N, D] -> x.flat[idx] + pos[idx % N]."""
    return x.flatten(0, 1)[idx] + pos[idx % x.shape[1]]


MEAN, STD = 0.5307, 0.2583  # chest-X-ray pixel statistics (Rad-DINO's); images arrive in [0, 1]


def sincos_pos_embed(gh, gw, dim, ref=None):
    """Fixed 2-D sin-cos position embedding of a gh x gw grid -> [gh*gw, dim] (row-major): half the
    channels encode the row, half the column, [sin(p w_i), cos(p w_i)], w_i = 10000^(-i/k). ref: the
    training grid; positions are scaled to it (p = i * rh / gh), so a 16x16 grid of a film gets the
    codes learned at 8x8, between them, not positions 8..15 never seen."""
    k = dim // 4
    w = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float64) / k)  # [k] the frequencies w_i
    sh, sw = (ref[0] / gh, ref[1] / gw) if ref else (1.0, 1.0)
    rows, cols = torch.meshgrid(torch.arange(gh) * sh, torch.arange(gw) * sw, indexing="ij")
    def enc(p): return torch.cat([torch.sin(p[:, None] * w), torch.cos(p[:, None] * w)], 1)
    return torch.cat([enc(rows.flatten().double()), enc(cols.flatten().double())], 1).float()


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)  # qkv bias, as in ViT / I-JEPA
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, seqs, rows=None):  # x [T, D] packed; rows: keep only these outputs
        T, D = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.heads, D // self.heads).unbind(1)  # each [T, H, Dh]
        o = OPS["attention"](q, k, v, seqs).reshape(T, D)
        return self.proj(o if rows is None else o[rows])


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); LN eps 1e-6, GELU MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, seqs, rows=None):
        """rows=[R]: only those tokens' outputs [R, D], exactly as in the full block (every token
        is still a key and a value), without the projection and MLP of the other rows."""
        x = (x if rows is None else x[rows]) + self.attn(self.norm1(x), seqs, rows)
        return x + self.mlp(self.norm2(x))


def init_transformer(module, blocks):
    """trunc_normal(0.02) weights, zero biases; then attn.proj and mlp[2] of block i (1-based) are
    divided by sqrt(2i), so deep residual streams start small (last: nothing undoes it)."""
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
    """The encoder: gray images [B, 1, H, W] in [0, 1] -> patch tokens. No CLS token: I-JEPA
    predicts patch features, and the probes pool them."""

    def __init__(self, patch=16, width=768, depth=12, heads=12, ref_grid=None):
        super().__init__()
        self.patch_size, self.embed_dim, self.depth = patch, width, depth
        self.ref_grid = ref_grid  # the training grid (gh, gw): other grids are scaled to it
        pos = sincos_pos_embed(*ref_grid, width) if ref_grid else None
        self.register_buffer("pos", pos, persistent=False)  # on the device, not in checkpoints
        self.patch_embed = nn.Conv2d(1, width, kernel_size=patch, stride=patch)  # X-rays are gray
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        init_transformer(self, self.blocks)

    def forward(self, x, keep=None, seqs=None, n_last_blocks=None):
        """x [B, 1, H, W] ->
        keep=None: tokens [B, N, D] of every patch (N = H/p * W/p, row-major), or with
                   n_last_blocks=k the last k blocks' outputs, each through the final norm (probes);
        keep=[T]:  only these patches (flat indices into B*N, packed as `seqs` says): [T, D]."""
        (B, _, H, W), p = x.shape, self.patch_size
        if H % p or W % p:  # the conv would silently drop the remainder
            raise ValueError(f"image size {(H, W)} is not a multiple of the patch size {p}")
        x = self.patch_embed((x - MEAN) / STD)  # [B, D, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        pos = self.pos if self.ref_grid and (gh, gw) == tuple(self.ref_grid) else \
            sincos_pos_embed(gh, gw, self.embed_dim, self.ref_grid).to(x.device)
        # pos (fp32) is added before masking (I-JEPA): under bf16 autocast the stream stays fp32
        if keep is None:
            h, seqs = (x + pos).flatten(0, 1), Seqs([gh * gw] * B, x.device)  # B sequences of N
        else:
            h = OPS["gather"](x, keep, pos)  # [T, D] the kept patches: all of them, none truncated
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
    """A narrow ViT: the target encoder's features at the target patches, from the context. Narrow
    as it is thrown away: the work should happen in the encoder; depth helps (I-JEPA, ImageNet 1%:
    depth 6 64.0%, 12 66.9%). Each block of each image is a sequence: [the image's context ; a mask
    token (a learned vector + position) per target patch]. B images x 4 blocks: 4B sequences."""

    def __init__(self, enc_width, width, depth, heads, grid):
        super().__init__()
        self.width, self.grid = width, tuple(grid)
        self.register_buffer("pos", sincos_pos_embed(*grid, width), persistent=False)  # [N, W]
        self.embed = nn.Linear(enc_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))  # 1-D: no weight decay, like biases
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, enc_width)
        init_transformer(self, self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx, b):
        """ctx [T_ctx, D_enc] packed encoder output; b: the Batch (its index tensors: pack_masks).
        -> predictions [T_tgt, D_enc] in the order of b.tgt_idx."""
        N = self.grid[0] * self.grid[1]
        c = self.embed(ctx) + self.pos[b.ctx_idx % N]  # [T_ctx, W] context at its positions
        m = self.mask_token + self.pos[b.tgt_idx % N]  # [T_tgt, W] a mask token per target patch
        h = torch.cat([c, m])[b.pred_idx]  # [T_pred, W] 4B sequences [ctx of b ; targets (b, j)]
        for blk in self.blocks[:-1]:
            h = blk(h, b.pred_seqs)
        # only the mask tokens' outputs are used: the last block computes just those rows (the
        # context rows stay keys and values), which skips about half of its work
        h = self.blocks[-1](h, b.pred_seqs, rows=b.pred_out)  # [T_tgt, W]
        return self.proj(self.norm(h))


# -------------------------------------------------------------------------------------------------
# Multi-block masking, one image at a time, a pure function of a torch.Generator. Why large blocks:
# a 15-20% block cannot be filled in from its neighbours' texture, only inferred from the anatomy
# around it; one big context (85-100% of the image, minus the targets) holds enough to infer them.
# I-JEPA (ViT-B/16, ImageNet 1%): multi-block 54.2% vs one 60% block 20.2, random patches 17.6.
# Unlike the official sampler: independent scale and aspect, inclusive starts, sizes per image.

def _block(gen, gh, gw, scale, aspect):
    """A random rectangle: area ~ U(scale) * gh*gw, height/width ~ U(aspect). -> bool [gh, gw]."""
    s, a = (lo + (hi - lo) * torch.rand(1, generator=gen).item() for lo, hi in (scale, aspect))
    h = min(gh, max(1, round(math.sqrt(s * gh * gw * a))))
    w = min(gw, max(1, round(math.sqrt(s * gh * gw / a))))
    top = torch.randint(0, gh - h + 1, (1,), generator=gen).item()  # inclusive: the last row too
    left = torch.randint(0, gw - w + 1, (1,), generator=gen).item()
    m = torch.zeros(gh, gw, dtype=torch.bool)
    m[top:top + h, left:left + w] = True
    return m


def sample_masks(gen, grid, n_targets=4, tgt_scale=(0.15, 0.2), tgt_aspect=(0.75, 1.5),
                 ctx_scale=(0.85, 1.0), min_ctx=10, max_tries=100):
    """-> (ctx [Kc], [tgt_1 [K1], ..., tgt_M [KM]]): sorted flat patch indices of one image.
    Targets may overlap each other; the context never contains a target patch."""
    gh, gw = grid
    for _ in range(max_tries):
        tgts = [_block(gen, gh, gw, tgt_scale, tgt_aspect) for _ in range(n_targets)]
        ctx = _block(gen, gh, gw, ctx_scale, (1.0, 1.0))
        ctx &= ~torch.stack(tgts).any(0)  # no target patch is ever context
        if int(ctx.sum()) >= min_ctx:
            return ctx.flatten().nonzero()[:, 0], [t.flatten().nonzero()[:, 0] for t in tgts]
    raise BadInput(f"masking: no context of >= {min_ctx} patches in {max_tries} draws on a "
                   f"{gh}x{gw} grid; use a larger --img-size, smaller --tgt-scale or --min-ctx")


@dataclass
class Batch:
    """Images + their masks' packed index tensors (pack_masks, on the CPU); .to(device) + Seqs."""
    imgs: torch.Tensor       # [B, 1, S, S] in [0, 1] (None until Collate sets it)
    ctx_idx: torch.Tensor    # [T_ctx]  flat b*N + n of every context patch (the encoder's input)
    tgt_idx: torch.Tensor    # [T_tgt]  flat b*N + n of every target patch, ordered (b, j, n)
    pred_idx: torch.Tensor   # [T_pred] rows of cat([context tokens, mask tokens]): predictor input
    pred_out: torch.Tensor   # [T_tgt]  where each mask token sits there (its output: a prediction)
    ctx_len: torch.Tensor    # [B]      context patches per image            (CPU, always)
    tgt_len: torch.Tensor    # [B*M]    patches per target block             (CPU, always)
    pred_len: torch.Tensor   # [B*M]    length of each predictor sequence    (CPU, always)
    bad: list = field(default_factory=list)  # unreadable files in this batch (skipped, logged)
    stand_in: bool = False   # no readable image: a blank stand-in, skipped (DDP: run, weight 0)
    ctx_seqs: Seqs = None
    pred_seqs: Seqs = None

    def to(self, device):
        idx = {k: getattr(self, k) for k in ("imgs", "ctx_idx", "tgt_idx", "pred_idx", "pred_out")}
        idx = {k: t if t is None else t.to(device, non_blocking=True) for k, t in idx.items()}
        return Batch(**{**self.__dict__, **idx, "ctx_seqs": Seqs(self.ctx_len, device),
                        "pred_seqs": Seqs(self.pred_len, device)})


def pack_masks(masks, N):
    """Per-image masks [(ctx, [tgt_j])] -> a Batch (imgs None). Sequence s = b*M + j: block j of b.
    Example: a 2x3 grid (N = 6, patches 0 1 2 / 3 4 5), B = 2 images, M = 2 blocks:
      image 0: ctx [0, 1],    targets [4], [5]    ->  ctx_idx = [0, 1, 6, 9, 10]  (image 1: + N)
      image 1: ctx [0, 3, 4], targets [1, 2], [5]     tgt_idx = [4, 5, 7, 8, 11]
      cat([c, m]) rows: 0-1 context of image 0, 2-4 context of image 1, 5-9 the mask tokens:
      pred_idx = [0, 1, 5 | 0, 1, 6 | 2, 3, 4, 7, 8 | 2, 3, 4, 9]   (pred_len [3, 3, 5, 4])
      pred_out = [2, 5, 9, 10, 14]: where 5, 6, 7, 8, 9 stand above = the predictions, in order."""
    ctx_len = [len(c) for c, _ in masks]
    ctx_start = np.concatenate([[0], np.cumsum(ctx_len)])
    T_ctx, t0, p0 = int(ctx_start[-1]), 0, 0  # t0: target tokens so far; p0: predictor tokens
    tgt_idx, tgt_len, pred_idx, pred_out, pred_len = [], [], [], [], []
    for b, (_, tgts) in enumerate(masks):
        ctx_rows = torch.arange(ctx_start[b], ctx_start[b + 1])
        for t in tgts:
            k = len(t)
            tgt_idx.append(t + b * N)
            pred_idx += [ctx_rows, T_ctx + t0 + torch.arange(k)]  # [context of b ; block's masks]
            pred_out.append(p0 + ctx_len[b] + torch.arange(k))
            tgt_len.append(k)
            pred_len.append(ctx_len[b] + k)
            t0, p0 = t0 + k, p0 + ctx_len[b] + k
    ctx_idx = torch.cat([c + b * N for b, (c, _) in enumerate(masks)])
    return Batch(None, ctx_idx, torch.cat(tgt_idx), torch.cat(pred_idx), torch.cat(pred_out),
                 torch.tensor(ctx_len), torch.tensor(tgt_len), torch.tensor(pred_len))


# -------------------------------------------------------------------------------------------------
# Loss, EMA, schedules.

def jepa_loss_torch(z, h, idx):
    """Smooth-L1 between predictions z [R, D] and layer-normed (no affine) targets h.flat[idx]. Why
    features, not pixels: no context predicts a block's noise, yet a pixel loss spends the model on
    it; features keep what is predictable (I-JEPA ViT-L/16, ImageNet 1%: 66.9% vs pixels' 40.7%)."""
    t = F.layer_norm(h.flatten(0, 1)[idx].float(), (h.shape[-1],))  # [R, D]: only the rows needed
    return F.smooth_l1_loss(z.float(), t)


# The three ops that kernels/ accelerates (--kernels). These torch ops are the one definition of
# the math: a kernel op is used only after it reproduced the op it replaces (kernels.fast_ops).
def torch_ops():  # looked up at each call: a patched (or forked) torch op is what the model uses
    return dict(attention=attention_torch, gather=gather_torch, loss=jepa_loss_torch)


OPS = torch_ops()


def use_kernels(triton, check=None):
    """The torch ops, or the Triton kernels, each first checked against its torch op (check=...)."""
    OPS.update(torch_ops())
    if triton:
        OPS.update(kernels.fast_ops(torch_ops(), Seqs, check))


# The schedules: pure functions of the step, so resuming is nothing more than "set step".
def lr_at(step, c):  # linear warmup start_lr -> lr, then cosine lr -> final_lr
    if step < c.warmup:
        return c.start_lr + (c.lr - c.start_lr) * step / c.warmup
    t = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.final_lr + 0.5 * (c.lr - c.final_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def wd_at(step, c):  # cosine *increase* wd -> final_wd, as in I-JEPA
    return c.final_wd + 0.5 * (c.wd - c.final_wd) * (1 + math.cos(math.pi * min(step / c.steps, 1)))


def ema_at(step, c):  # linear ema -> final_ema: the target moves less and less
    return c.ema + (c.final_ema - c.ema) * min(step / c.steps, 1.0)


def target_features(target, imgs, k=1):
    """[B, N, D] what the predictor regresses (the loss layer-norms each token): the last block's
    output (k = 1), or the mean of the last k blocks' outputs, each through the final norm."""
    return target(imgs) if k == 1 else torch.stack(target(imgs, n_last_blocks=k)).mean(0)


def objective(enc, pred, target, b, target_blocks=1):
    """Steps 1-3 on one micro-Batch -> (loss, targets [B, N, D]): what a fork swaps (examples/)."""
    with torch.no_grad():  # 1. targets: the EMA encoder sees the whole image; no gradients
        h = target_features(target, b.imgs, target_blocks)  # [B, N, D]
    z = pred(enc(b.imgs, b.ctx_idx, b.ctx_seqs), b)  # 2. encode the context, predict the targets
    return OPS["loss"](z, h, b.tgt_idx), h  # 3. against the layer-normed target features


@torch.no_grad()
def ema_update(target, online, m):
    """4. target <- m * target + (1 - m) * online. Why: trained by the loss too, both encoders could
    output one constant, loss 0 (collapse). The target gets no gradient and trails the encoder; the
    predictor makes the branches asymmetric (BYOL): collapse is avoidable, not impossible."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - m)


@torch.no_grad()
def effective_rank(x):
    """RankMe (Garrido et al., 2023): exp(entropy of the normalised singular values) of centred
    features x [K, D]: D if isotropic, 1 on a line. It sees dimensional collapse; std cannot."""
    s = torch.linalg.svdvals(x.float() - x.float().mean(0))
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


# -------------------------------------------------------------------------------------------------
# Data: chest X-rays as one channel in [0, 1]; random resized crop only (no flips: the heart is on
# the left). Step s always gets the same images, crops and masks, whatever the number of processes
# and whether the run was resumed: the data is a pure function of (seed, step).

def random_resized_crop(img, size, scale, rng):
    """img [H, W] -> [size, size]: a random box of area ~ U(scale) * H*W, aspect in [3/4, 4/3]
    (log-uniform), resized bilinearly; the whole image after 10 misses. Small images upsample."""
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
    crop = Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR,
                                                 box=(x0, y0, x0 + w, y0 + h))
    return np.asarray(crop, dtype=np.float32).clip(0, 1)


def sample_seed(seed, g, stream):
    """An independent seed for global sample number g (augmentation: stream 0, masks: stream 1)."""
    return int(np.random.SeedSequence([seed, g, stream]).generate_state(1)[0])


class StepBatches(torch.utils.data.Sampler):
    """Yields, for each step from `start` on, this rank's share of the global batch as (image index,
    g) pairs, g = step * global_batch + i the sample's global number; in `accum` micro-batches."""

    def __init__(self, n_images, global_batch, seed, start, steps, rank=0, world=1, accum=1):
        self.n, self.B, self.seed = n_images, global_batch, seed
        self.start, self.steps = start, steps
        lo, hi = rank * global_batch // world, (rank + 1) * global_batch // world
        self.parts = [(lo + k * (hi - lo) // accum, lo + (k + 1) * (hi - lo) // accum)
                      for k in range(accum)]
        self._perm = {}

    def image_for(self, g):  # a fresh permutation of the dataset each epoch
        epoch = g // self.n
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perm[epoch][g % self.n])

    def __iter__(self):
        for step in range(self.start, self.steps):
            for lo, hi in self.parts:
                g0 = step * self.B
                yield [(self.image_for(g), g) for g in range(g0 + lo, g0 + hi)]

    def __len__(self):
        return (self.steps - self.start) * len(self.parts)


class CXRDataset(torch.utils.data.Dataset):
    """(image index, global sample number g) -> (crop [1, S, S], None, g), or (None, why, g)."""

    def __init__(self, paths, cfg):
        self.paths, self.cfg = paths, cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, g = key
        try:
            img = load_image(self.paths[i])
        except BadImage as e:
            return None, str(e), g  # skipped by the collate; the main process logs it once
        rng = np.random.default_rng(sample_seed(self.cfg.seed, g, 0))
        crop = random_resized_crop(img, self.cfg.img_size, self.cfg.crop_scale, rng)
        return torch.from_numpy(crop)[None], None, g


class Collate:
    """Stack the images and draw each image's masks (in the loader workers, off the hot path)."""

    def __init__(self, cfg):
        self.cfg = cfg  # (a class, not a closure: loader workers pickle it)

    def masks_for(self, g):  # the masks of global sample g: a pure function of (seed, g)
        c, gen = self.cfg, torch.Generator().manual_seed(sample_seed(self.cfg.seed, g, 1))
        return sample_masks(gen, c.grid, c.n_targets, c.tgt_scale, c.tgt_aspect, c.ctx_scale,
                            c.min_ctx)

    def __call__(self, items):
        good = [(x, g) for x, _, g in items if x is not None]
        stand_in = not good  # nothing readable: one blank image that weighs nothing (train_step)
        good = good or [(torch.zeros(1, self.cfg.img_size, self.cfg.img_size), 0)]
        b = pack_masks([self.masks_for(g) for _, g in good], self.cfg.grid[0] * self.cfg.grid[1])
        b.imgs, b.stand_in = torch.stack([x for x, _ in good]), stand_in
        b.bad = [err for _, err, _ in items if err is not None]
        return b


def make_loader(c, paths, start, end, rank=0, world=1, pin=False):
    """This rank's micro-batches of steps start..end-1, collated in c.workers worker processes."""
    sampler = StepBatches(len(paths), c.batch_size, c.seed, start, end, rank, world, c.accum)
    return torch.utils.data.DataLoader(CXRDataset(paths, c), batch_sampler=sampler, pin_memory=pin,
                                       collate_fn=Collate(c), num_workers=c.workers)


# -------------------------------------------------------------------------------------------------
# Training: one step, then the loop around it.

def build_encoder(c):
    return ViT(c.patch, c.width, c.depth, c.heads, ref_grid=c.grid)


def param_groups(*modules):
    """AdamW groups: weight decay on matrices only; biases, norms, the mask token (1-D) are not."""
    ps = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [dict(params=[p for p in ps if p.ndim >= 2], wd_scale=1.0),
            dict(params=[p for p in ps if p.ndim < 2], wd_scale=0.0)]


def train_step(enc, pred, target, opt, bs, m, clip=0.0, autocast=nullcontext(), check=True,
               target_blocks=1, stop=0.0):
    """One step on this process's share of the global batch, bs: --accum micro-Batches on the device
    (enc, pred may be DDP-wrapped). -> loss (global mean), grad norm, the last micro-batch's targets
    [B, N, D], any process's signal (stop). No sync unless check: a non-finite loss raises first."""
    ddp = isinstance(enc, nn.parallel.DistributedDataParallel)
    # each micro-batch's mean loss is weighted by its share of the global batch's target tokens:
    # the sum of the gradients (over micro-batches, then DDP's average) is the global mean's
    dev = bs[0].tgt_idx.device if ddp else "cpu"  # NCCL reduces device tensors; else no H2D copy
    n = torch.tensor([0.0 if b.stand_in else float(len(b.tgt_idx)) for b in bs], device=dev)  # [K]
    n_all, world = torch.stack([n.sum(), torch.tensor(stop, device=dev)]), 1  # [tokens, stop]
    if ddp:
        dist.all_reduce(n_all)
        world = dist.get_world_size()
    share, total = n * world / n_all[0].clamp_min(1), 0.0
    opt.zero_grad(set_to_none=True)
    for i, b in enumerate(bs):
        with plumbing.no_sync(enc, pred) if ddp and i < len(bs) - 1 else nullcontext():
            with autocast:  # (DDP all-reduces the gradients in the last micro-batch's backward)
                loss, h = objective(enc, pred, target, b, target_blocks)
            (loss * share[i]).backward()
        total = total + loss.detach() * share[i]  # (h: the last only, to save what --accum saves)
    params = [p for g in opt.param_groups for p in g["params"]]
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    loss = total.reshape(1)
    if ddp:
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    if check and not torch.isfinite(loss).all():  # a sync: cheap insurance for the weights
        raise FloatingPointError(f"loss is {loss.item()}")
    opt.step()
    ema_update(target, getattr(enc, "module", enc), m)  # 4. the target follows slowly
    return loss[0], gnorm, h, n_all[1] > 0


OBJECTIVE = "I-JEPA: smooth-L1 to the EMA target's layer-normed features"  # logged; forks rename
CURVES = (("target_std", "target_std (batch)"), ("target_erank", "target_erank (directions used)"))


def train(c: Config):
    ddp, rank, world, device = plumbing.setup_distributed(c.device, c.batch_size)
    ckpt_path, log_path = os.path.join(c.out, "ckpt.pt"), os.path.join(c.out, "log.jsonl")
    master = rank == 0
    torch.manual_seed(c.seed)
    encoder = build_encoder(c).to(device)
    predictor = Predictor(c.width, c.pred_width, c.pred_depth, c.heads, c.grid).to(device)
    target = build_encoder(c).to(device).requires_grad_(False)  # the EMA copy: never trained
    target.load_state_dict(encoder.state_dict())
    opt = torch.optim.AdamW(param_groups(encoder, predictor), lr=c.lr, fused=True)  # betas .9 .999
    modules = dict(encoder=encoder, predictor=predictor, target_encoder=target, optimizer=opt)
    end = c.stop_at or c.steps  # --resume: weights, optimizer state and the step of OUT/ckpt.pt
    step = plumbing.resume(ckpt_path, modules, say=print if master else None) if c.resume else 0
    if step == c.steps:  # re-running a finished run changes nothing and succeeds
        print(f"{ckpt_path} is already at its last step, {step}: nothing to do")
        return encoder, predictor, target
    if step >= end:
        raise BadInput(f"{ckpt_path} is at step {step}, this run ends at step {end}: nothing to "
                       f"train (raise --steps to continue it)")
    head_dims = (c.width // c.heads, c.pred_width // c.heads)
    triton = resolve_kernels(c.kernels, device, head_dims)
    use_kernels(triton, check=dict(width=c.width, head_dims=head_dims, device=device))
    precision = resolve_precision(c.precision, device, triton)  # bf16 needs no loss scaler
    autocast = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else nullcontext()
    paths = list_images(c.data, c.out)
    loader = make_loader(c, paths, step, end, rank, world, pin=device.type == "cuda")
    for module in (encoder, predictor, target) if c.compile else ():  # in place: clean state_dict
        module.compile(dynamic=True)  # keys; dynamic: the packed lengths vary every step
    enc, pred = encoder, predictor  # the raw modules are saved, never the DDP wrappers
    if ddp:  # the buffers are constant position tables: nothing to broadcast
        enc, pred = (nn.parallel.DistributedDataParallel(m, broadcast_buffers=False, device_ids=[
            device.index] if device.type == "cuda" else None) for m in (enc, pred))

    def checkpoint(at):  # rank 0 writes it, atomically
        if master:
            plumbing.save_checkpoint(ckpt_path, at, asdict(c), plumbing.versions(),
                                     **{k: v.state_dict() for k, v in modules.items()})

    if master:  # config.json and the log's header record; prints the run's one-line summary
        n_enc, n_pred = (sum(p.numel() for p in m.parameters()) for m in (encoder, predictor))
        plumbing.start_log(c.out, dict(
            type="header", config=asdict(c), versions=plumbing.versions(), world=world,
            device=str(device), images=len(paths), kernels="triton" if triton else "torch",
            precision=precision, start_step=step, end_step=end, params_encoder=n_enc,
            params_predictor=n_pred, objective=OBJECTIVE))
    # the online probe (rank 0): is the encoder learning anything useful? its step 0 is random init
    probe = master and plumbing.OnlineProbe.open(c.probe_data or c.data, c.img_size, c.probe_images,
                                                 print, c.probe_every, c.steps)
    bar = tqdm(total=end, initial=step, disable=not master, dynamic_ncols=True)
    stats = plumbing.StepStats(next((r["target_erank"] for r in plumbing.read_log(log_path)
                                     if "target_erank" in r), None))  # a resumed run's start
    if probe and step == 0:  # its seconds are kept out of the next log line's img/s
        probe.maybe(log_path, 0, target, autocast, stats, tqdm.write)
    skipped = plumbing.Unreadable(tqdm.write if master else None, c.data, min(10, end - step))
    with plumbing.Preemption() as sig:  # Ctrl-C, SIGTERM: the step ends, a checkpoint, one line
        for bs in plumbing.grouped(loader, c.accum):  # one step: --accum micro-batches
            skipped.note(sum((b.bad for b in bs), []), all(b.stand_in for b in bs))
            if not ddp:  # a stand-in has nothing to learn from; DDP runs it (every process must
                bs = [b for b in bs if not b.stand_in]  # take part in each step's collectives)
            if not bs:
                step += 1
                bar.update(1)
                continue
            bs = [b.to(device) for b in bs]
            lr, wd, m = lr_at(step, c), wd_at(step, c), ema_at(step, c)
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = lr, wd * g["wd_scale"]
            n = step + 1  # `check`: the loss is read (a sync) only where it is logged or saved
            check = n == end or n % c.log_every == 0 or n % c.ckpt_every == 0
            try:
                loss, gnorm, h, stop = train_step(enc, pred, target, opt, bs, m, c.clip, autocast,
                                                  check, c.target_blocks, sig.requested)
            except FloatingPointError as e:  # raised before any update: the checkpoint stays good
                raise BadInput(f"{e} at step {step}: {ckpt_path} keeps the last good checkpoint; "
                               f"try a lower --lr, a longer --warmup or --clip 1.0") from None
            step += 1
            with torch.no_grad():  # collapse: per-dimension std of the pooled targets across images
                std = h.float().mean(1).std(0).mean() if len(h) > 1 else 0.0
            lens = [torch.cat(t).float().mean() for t in zip(*[(b.ctx_len, b.tgt_len) for b in bs])]
            stats.add(loss=loss, std=std, ctx=lens[0], tgt=lens[1],  # read when logged: no sync
                      imgs=sum(len(b.imgs) for b in bs) * world)
            bar.update(1)
            if master and (step % c.log_every == 0 or step == end):
                erank = effective_rank(h.reshape(-1, h.shape[-1])[:4096])  # <= 4096 target tokens
                record, line = stats.record(step, len(skipped.files), lr=lr, wd=wd, ema=m,
                                            grad_norm=gnorm, target_erank=erank)
                plumbing.append_jsonl(log_path, record)
                tqdm.write(line)
            if probe:  # at its steps (not at --stop-at: as an unstopped run)
                probe.maybe(log_path, step, target, autocast, stats, tqdm.write)
            if step % c.ckpt_every == 0:
                checkpoint(step)
            if bool(stop) if ddp and check else sig.signum and not ddp:  # DDP: read when all agree
                break
    bar.close()
    checkpoint(step)
    if master and step == end:
        plumbing.plot_log(log_path, f"{c.out}/loss.png", [("loss", f"loss: {OBJECTIVE}"), *CURVES])
        print(f"done: step {step}, checkpoint {ckpt_path}")
        if probe and (cost := probe.cost()):
            print(cost)
    if ddp:  # wait for rank 0's checkpoint: a rank that tears gloo down alone can abort at exit
        dist.barrier()
        dist.destroy_process_group()
    if step < end:  # stopped by a signal
        sig.stop(step, ckpt_path)
    return encoder, predictor, target


# -------------------------------------------------------------------------------------------------
# Using the weights: the EMA target encoder, for probes and for other libraries.

def load_encoder(path, device="cpu", random_init=False, seed=0):
    """The EMA target encoder of a checkpoint, in eval mode: enc(x [B, 1, H, W] in [0, 1]) -> patch
    tokens [B, N, D]. random_init=True: the same architecture freshly initialised (with `seed`),
    the baseline every probe result should be compared against. A bad checkpoint: BadInput."""
    ck = read_checkpoint(path)
    c = make_config({}, ck["config"])
    with torch.random.fork_rng():  # seeds the init, leaves the caller's RNG alone
        torch.manual_seed(seed)
        enc = build_encoder(c)
    if not random_init:
        plumbing.load_state(enc, ck, "target_encoder", path)
    enc.config = asdict(c)
    return enc.to(device).eval().requires_grad_(False)


def export_main(argv):
    """`radjepa.py export CKPT OUT`: the EMA encoder as a timm folder (plumbing.export_timm)."""
    plumbing.export_cli(argv, load_encoder, sincos_pos_embed, MEAN, STD)


def main(argv=None):
    """The command line: every check, then the claim on --out, then training."""
    given, lock = parse_args(argv), None
    ck_path = os.path.join(given.get("out", Config.out), "ckpt.pt")
    try:
        base = plumbing.resume_config(ck_path) if given.get("resume") else None
        c = make_config(given, base)
        check_masking(c)
        if c.threads:  # idle OpenMP threads spin: on a shared CPU, fewer threads can be much faster
            torch.set_num_threads(c.threads)
        if base:  # another architecture is refused; other changed flags get a warning
            plumbing.check_resume(c, given, base, ARCH_FIELDS, RUN_FIELDS)
        if not c.data:
            raise BadInput("--data is required (chest X-rays, or `python data_prep.py synthetic`)")
        if c.bench_loader:  # the loader alone (decode, crop, masks), no model: the bottleneck?
            t0, loader = time.perf_counter(), make_loader(c, list_images(c.data), 0, c.bench_loader)
            n = sum(len(b.imgs) for b in loader if not b.stand_in) / (time.perf_counter() - t0)
            return print(f"loader: {n:.1f} img/s ({c.workers} workers, {c.img_size} px)")
        paths = list_images(c.data, c.out)  # labels.csv and the images are checked before any work
        if c.probe_data and (why := plumbing.OnlineProbe.why_off(c.probe_data)):
            raise BadInput(f"--probe-data: {why}")
        if int(os.environ.get("RANK", 0)) == 0:  # only rank 0 writes
            lock = plumbing.claim_out(c.out)
            plumbing.check_run_folder(c.out, c.resume, c.restart)
            plumbing.preview_masks(os.path.join(c.out, "masks.png"), CXRDataset(paths, c), Collate(c),
                                   c.patch, c.n_targets)  # the first crops, masked as training has them
        return train(c)
    except BadInput as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: at once, mid-step, so no checkpoint is written
        raise SystemExit(f"stopped at once: {ck_path} keeps the last checkpoint") from None
    finally:
        if lock:
            lock.close()  # releases the lock


if __name__ == "__main__":
    export_main(sys.argv[2:]) if sys.argv[1:2] == ["export"] else main()
